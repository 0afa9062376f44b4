"""How a scoped statement carries its org (and local settings) to every node that runs it.

Row-level security reads ``tenantdb.org_id`` on whichever server scans the rows. The
strategy is chosen per database (:func:`tenantdb.citus.is_coordinator`, cached):

- plain PostgreSQL: ``set_config(name, value, true)`` calls prepended to the statement, in
  the same string: one round trip, transaction-local;
- Citus coordinator: ``set_config`` is not propagated to the workers, and a ``SET LOCAL``
  is propagated (with ``citus.propagate_set_commands = 'local'``) only when its query
  string holds no distributed statement, because Citus forwards that string whole to each
  worker. So the settings go as ``SET LOCAL`` statements in a string of their own, which
  also turns propagation on for the transaction (no session setup, no startup option).
  Outside a transaction the string opens one (``BEGIN; SET LOCAL ...``) and a ``COMMIT``
  follows the statement: three round trips. Inside a transaction: two (the ``SET LOCAL``
  string, then the statement).

Measured side by side in ``bench/citus_scoping.py``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg2.extensions import TRANSACTION_STATUS_IDLE

from .context import OrgLike, require_org

__all__ = ["ORG_SETTING", "ScopePlan", "execute_scoped", "run_scoped", "scope_statements"]

ORG_SETTING = "tenantdb.org_id"
# Plain PostgreSQL: one set_config per setting, prepended to the statement.
SET_CONFIG_SQL = "set_config('{name}', %s, true)"
_SETTING_NAME = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?")
# Citus: SET LOCAL takes no bind parameters for its name, so names are checked against
# this list (they come from the library, never from users); values are bound.
_CITUS_PROPAGATE_SQL = "SET LOCAL citus.propagate_set_commands = 'local'"
_SET_LOCAL_SQL = {
    ORG_SETTING: "SET LOCAL tenantdb.org_id = %s",
    "hnsw.ef_search": "SET LOCAL hnsw.ef_search = %s",
    "hnsw.iterative_scan": "SET LOCAL hnsw.iterative_scan = %s",
    "hnsw.max_scan_tuples": "SET LOCAL hnsw.max_scan_tuples = %s",
    "ivfflat.probes": "SET LOCAL ivfflat.probes = %s",
}
BEGIN_SQL = "BEGIN"
COMMIT_SQL = "COMMIT"
ROLLBACK_SQL = "ROLLBACK"

Send = Callable[[str, Any], Any]


@dataclass(frozen=True)
class ScopePlan:
    """What to send for one scoped statement.

    :param prefix: SQL prepended to the statement in the same string (plain PostgreSQL).
    :param prefix_params: its parameters, before the statement's.
    :param setup: a string sent alone before the statement (Citus), or ``None``.
    :param setup_params: its parameters.
    :param commit: whether a ``COMMIT`` follows the statement (``setup`` opened a
        transaction).
    """

    prefix: str
    prefix_params: tuple[Any, ...]
    setup: str | None = None
    setup_params: tuple[Any, ...] = ()
    commit: bool = False


def scope_statements(org: uuid.UUID, settings: Mapping[str, str] | None = None, *,
                     citus: bool, in_transaction: bool, role: str | None = None) -> ScopePlan:
    """The plan for a statement of ``org`` with ``settings`` (name -> value) local to its
    transaction, as ``role`` when given (``SET LOCAL ROLE`` for the transaction).

    The role is always set on the coordinator only, in the statement's own string: it
    decides which login Citus opens worker connections as, and a propagated ``SET ROLE``
    would also reach connections a ``cross_org`` statement opened as another login.

    :raises ValueError: on Citus, a setting this module does not know how to ``SET LOCAL``.
    """
    values = {**(settings or {}), ORG_SETTING: str(org)}
    role_values = {"role": role} if role else {}
    if not citus:
        return ScopePlan(*_set_config_prefix({**role_values, **values}))
    unknown = sorted(set(values) - set(_SET_LOCAL_SQL))
    if unknown:
        raise ValueError(f"cannot SET LOCAL {', '.join(unknown)} on Citus: add it to "
                         "tenantdb.scoping._SET_LOCAL_SQL")
    statements = [_CITUS_PROPAGATE_SQL, *(_SET_LOCAL_SQL[name] for name in values)]
    if not in_transaction:
        statements.insert(0, BEGIN_SQL)
    prefix, prefix_params = _set_config_prefix(role_values)
    return ScopePlan(prefix, prefix_params, "; ".join(statements), tuple(values.values()),
                     commit=not in_transaction)


def execute_scoped(org_id: OrgLike, sql: str, params: Sequence[Any] = (), /) -> Any:
    """Run raw ``sql`` (``%s`` placeholders, ``%%`` for a literal ``%``) for one org; returns
    the DB-API cursor.

    The org is set for the statement's transaction in the same round trip, which is what
    row-level security checks: rows of other orgs stay invisible even if ``sql`` forgets
    its ``org_id`` predicate (write it anyway: it lets indexes work).

    :raises MissingOrgError: no org, or not a UUID.
    """
    # Imported here: tenantdb.db imports this module for run_scoped.
    from .db import database

    org = require_org(org_id, "execute_scoped()")
    return database.execute_scoped_sql(org, sql, tuple(params))


def run_scoped(database: Any, send: Send, sql: str, params: Any, org: uuid.UUID, *,
               settings: Mapping[str, str] | None = None, role: str | None = None) -> Any:
    """Send ``sql`` for ``org`` through ``send`` (the database's plain ``execute_sql``),
    scoped by the engine's plan; returns the statement's cursor.

    ``database`` is the Peewee database; its connection tells the engine and whether a
    transaction is open. On Citus a statement that opened its own transaction commits it,
    or rolls it back on error before the error propagates. Inside a transaction the
    ``SET LOCAL`` string is sent before every statement: a cached "already set" would be
    wrong after a rollback to a savepoint, which Peewee sends without this module seeing.
    """
    from .citus import is_coordinator

    conn = database.connection()
    plan = scope_statements(
        org, settings, citus=is_coordinator(conn), role=role,
        in_transaction=conn.get_transaction_status() != TRANSACTION_STATUS_IDLE)
    if plan.setup is None:
        return send(plan.prefix + sql, (*plan.prefix_params, *(params or ())))
    send(plan.setup, plan.setup_params)
    if not plan.commit:
        return send(plan.prefix + sql, (*plan.prefix_params, *(params or ())))
    try:
        cursor = send(plan.prefix + sql, (*plan.prefix_params, *(params or ())))
    except BaseException:
        if not conn.closed and conn.get_transaction_status() != TRANSACTION_STATUS_IDLE:
            send(ROLLBACK_SQL, None)  # through send: the pool then takes the connection back
        raise
    # The cursor keeps its rows after COMMIT: psycopg2 fetched them when the statement ran.
    send(COMMIT_SQL, None)
    return cursor


def _set_config_prefix(values: Mapping[str, str]) -> tuple[str, tuple[Any, ...]]:
    """``SELECT set_config('name', %s, true), ...; `` with the values bound. The names are
    written out (the library's own, checked): the statement log then says what it sets."""
    if not values:
        return "", ()
    bad = [name for name in values if not _SETTING_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"not a setting name: {bad[0]!r}")
    calls = ", ".join(SET_CONFIG_SQL.format(name=name) for name in values)
    return f"SELECT {calls}; ", tuple(values.values())
