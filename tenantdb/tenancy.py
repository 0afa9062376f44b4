"""Tenant scoping: every read and write of a tenant table names its org.

:class:`TenantModel` is the base of every tenant table's model. Its entry points take the
org explicitly (``Destination.select(org_id=org)``); without one they raise
:class:`~tenantdb.errors.MissingOrgError` instead of running unscoped. :func:`cross_org` is
the one explicit, logged way to work across orgs (admin jobs: retention, seeds, reports).
"""

from __future__ import annotations

import contextvars
import logging
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import peewee
from peewee import ModelSelect, UUIDField

from .db import database
from .errors import MissingOrgError

__all__ = [
    "BaseModel",
    "OrgLike",
    "TenantModel",
    "cross_org",
    "cross_org_reason",
    "execute_scoped",
    "require_org",
]

OrgLike = uuid.UUID | str
# Transaction-local (the third argument), so a pooled connection never carries an org into
# the next transaction; sent in the same round trip as the statement it scopes.
SET_ORG_SQL = "SELECT set_config('tenantdb.org_id', %s, true); "
_M = TypeVar("_M", bound="TenantModel")

log = logging.getLogger("tenantdb.tenancy")
_cross_org: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tenantdb_cross_org", default=None
)


def require_org(org_id: object, where: str) -> uuid.UUID:
    """Return ``org_id`` as a UUID, or refuse: tenant work never runs without a real org.

    :param where: what needs the org, for the message (``"Destination.select()"``).
    :raises MissingOrgError: ``None``, ``""``, ``0``, or anything that is not a UUID.
    """
    if isinstance(org_id, uuid.UUID):
        return org_id
    if isinstance(org_id, str) and org_id:
        try:
            return uuid.UUID(org_id)
        except ValueError:
            raise MissingOrgError(f"{where}: org_id={org_id!r} is not a UUID") from None
    raise MissingOrgError(
        f"{where} needs org_id=...: pass the org, or use cross_org(reason) for admin work"
        + ("" if org_id is None else f" (got {org_id!r})")
    )


@contextmanager
def cross_org(reason: str) -> Iterator[None]:
    """Allow unscoped access to tenant tables inside the block, for this context only.

    Context-local (a contextvar, so other threads and asyncio tasks are unaffected) and
    logged with its reason.

    :raises ValueError: an empty reason.
    """
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("cross_org() needs a reason, e.g. cross_org(reason='retention purge')")
    log.info("cross_org entered: %s", reason)
    token = _cross_org.set(reason)
    try:
        yield
    finally:
        _cross_org.reset(token)


def cross_org_reason() -> str | None:
    """The reason of the :func:`cross_org` block in force in this context, if any."""
    return _cross_org.get()


def execute_scoped(org_id: OrgLike, sql: str, params: Sequence[Any] = (), /) -> Any:
    """Run raw ``sql`` (``%s`` placeholders) for one org; returns the DB-API cursor.

    The org is set for the statement's transaction in the same round trip, which is what the
    database's row-level security checks. Write the org predicate in ``sql`` as well.

    :raises MissingOrgError: no org, or not a UUID.
    """
    org = require_org(org_id, "execute_scoped()")
    return database.execute_sql(SET_ORG_SQL + sql, (str(org), *params))


class BaseModel(peewee.Model):
    """Base of every tenantdb model: bound to :data:`tenantdb.db.database`."""

    class Meta:
        database = database
        legacy_table_names = False


class TenantModel(BaseModel):
    """Base of every tenant table: rows belong to one org, and every entry point names it."""

    org_id = UUIDField()

    @classmethod
    def select(cls: type[_M], *fields: Any, org_id: OrgLike | None = None) -> ModelSelect[_M]:
        """``SELECT ... WHERE org_id = org``; ``org_id`` is required outside :func:`cross_org`.

        :raises MissingOrgError: no org (or not a UUID) outside a ``cross_org`` block.
        """
        query = super().select(*fields)
        if org_id is None and cross_org_reason() is not None:
            return query
        org = require_org(org_id, f"{cls.__name__}.select()")
        return query.where(cls.org_id == org)

    @classmethod
    def get(cls: type[_M], *query: Any, org_id: OrgLike | None = None, **filters: Any) -> _M:
        """The one row of ``org_id`` matching ``query`` and ``filters``.

        :raises MissingOrgError: no org.
        :raises peewee.DoesNotExist: (the model's own ``DoesNotExist``) no such row in the org.
        """
        select = cls.select(org_id=org_id)
        if query:
            select = select.where(*query)
        if filters:
            select = select.filter(**filters)
        return select.get()

    @classmethod
    def get_or_none(
        cls: type[_M], *query: Any, org_id: OrgLike | None = None, **filters: Any
    ) -> _M | None:
        """Like :meth:`get`, but ``None`` when the org has no such row."""
        try:
            return cls.get(*query, org_id=org_id, **filters)
        except peewee.DoesNotExist:
            return None

    @classmethod
    def get_by_id(cls: type[_M], pk: Any, org_id: OrgLike | None = None) -> _M:
        """The row of ``org_id`` whose ``id`` is ``pk``."""
        id_field = cls._meta.fields.get("id")
        if id_field is None:
            raise TypeError(f"{cls.__name__} has no id column; use get(..., org_id=...)")
        return cls.get(id_field == pk, org_id=org_id)

    @classmethod
    def create(cls: type[_M], **query: Any) -> _M:
        """Insert one row; ``org_id=`` is required.

        :raises MissingOrgError: no org, or not a UUID.
        """
        query["org_id"] = require_org(query.get("org_id"), f"{cls.__name__}.create()")
        inst = cls(**query)
        inst.save(force_insert=True)
        return inst
