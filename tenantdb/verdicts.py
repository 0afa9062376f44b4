"""Verdicts of statements already verified, found again by their SQL.

:func:`tenantdb.verifier.verify` walks a query's nodes (tens of microseconds a statement);
an application sends the same few statement shapes over and over, with other values. Two
query objects that Peewee writes as the same SQL text are the same statement but for their
parameters, and the verifier's decision depends on no parameter but the org's: every org
value it reads must be the statement's one org. So the first verdict for a SQL text is
kept with the places of the org among its parameters; a later statement with that text
reuses it when those places again hold one org, which becomes its verdict's org. Anything
else (places that now differ, a value that is not an org, parameters that cannot be read)
walks the query again.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .verifier import Verdict, tenant_tables_version, verify

__all__ = ["MAX_SHAPES", "clear", "verify_statement"]

#: SQL texts remembered; past it the memory starts again (shapes are few in a real app,
#: and a generated query per request must not grow it without bound).
MAX_SHAPES = 2048


@dataclass(frozen=True)
class _Shape:
    tenant: bool
    org_slots: tuple[int, ...]  # where the org stands among the parameters
    nparams: int
    tables_version: int

    def verdict(self, params: Sequence[Any]) -> Verdict | None:
        """This shape's verdict for ``params``, or ``None`` if it does not apply."""
        if len(params) != self.nparams or self.tables_version != tenant_tables_version():
            return None
        if not self.org_slots:
            return Verdict(self.tenant, None)
        first = params[self.org_slots[0]]
        for slot in self.org_slots[1:]:
            if params[slot] != first:
                return None
        org = _as_org(first)
        return None if org is None else Verdict(self.tenant, org)


_shapes: dict[str, _Shape] = {}
_lock = threading.Lock()


def verify_statement(query: Any, sql: str, params: Sequence[Any] | None) -> Verdict:
    """:func:`~tenantdb.verifier.verify` ``query``, written by Peewee as ``sql`` with
    ``params``, unless a statement with the same SQL was verified before."""
    values = params or ()
    shape = _shapes.get(sql)
    if shape is not None:
        verdict = shape.verdict(values)
        if verdict is not None:
            return verdict
    verdict = verify(query)
    learned = _learn(verdict, values)
    if learned is not None:
        with _lock:
            if len(_shapes) >= MAX_SHAPES:
                _shapes.clear()
            _shapes[sql] = learned
    return verdict


def clear() -> None:
    """Forget every remembered shape."""
    with _lock:
        _shapes.clear()


def _learn(verdict: Verdict, params: Sequence[Any]) -> _Shape | None:
    version = tenant_tables_version()
    if verdict.org is None:
        # Reads no tenant table, whatever its values: the text names the tables.
        return None if verdict.tenant else _Shape(False, (), len(params), version)
    slots = tuple(i for i, value in enumerate(params) if _as_org(value) == verdict.org)
    if not slots:
        return None  # the org is not a parameter as far as this can tell: walk every time
    return _Shape(verdict.tenant, slots, len(params), version)


def _as_org(value: Any) -> uuid.UUID | None:
    """``value`` read as a UUID the way a parameter carries one, or ``None``."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str) and len(value) in (32, 36):
        try:
            return uuid.UUID(value)
        except ValueError:
            return None
    return None
