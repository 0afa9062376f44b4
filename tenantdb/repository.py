"""The checklist's scoped helpers and a per-org repository, over TenantModel.

``scoped_query(Model, org_id, **filters)`` and friends take equality filters by field name;
an unknown name raises ``ValueError`` naming the model and the field, and a model without
``org_id`` raises ``TypeError``, both before any SQL. Peewee models are bound to their
database, so the checklist's ``session`` argument has no counterpart here.
"""

from __future__ import annotations

import uuid
from typing import Any, Generic, TypeVar

from .context import OrgLike, require_org
from .errors import CrossOrgError
from .tenancy import TenantModel, TenantSelect
from .validation import check_int

__all__ = [
    "MAX_LIMIT",
    "TenantRepository",
    "scoped_count",
    "scoped_get",
    "scoped_list",
    "scoped_query",
]

MAX_LIMIT = 1000
_M = TypeVar("_M", bound=TenantModel)


def scoped_query(model: type[_M], org_id: OrgLike, /, **filters: Any) -> TenantSelect:
    """``SELECT`` of ``model`` in ``org_id`` with ``field=value`` equality filters.

    :raises TypeError: ``model`` is not a tenant model (it has no ``org_id``).
    :raises ValueError: a filter names no field of ``model``.
    :raises MissingOrgError: no org, or not a UUID.
    """
    _check_model(model)
    terms = [_field(model, name) == value for name, value in filters.items()]
    query = model.select(org_id=require_org(org_id, f"scoped_query({model.__name__})"))
    return query.where(*terms) if terms else query


def scoped_get(model: type[_M], org_id: OrgLike, /, **filters: Any) -> _M | None:
    """The one row of ``org_id`` matching ``filters``, or ``None``."""
    row: _M | None = scoped_query(model, org_id, **filters).first()
    return row


def scoped_list(model: type[_M], org_id: OrgLike, /, limit: int = 50, offset: int = 0,
                **filters: Any) -> list[_M]:
    """A page of ``org_id``'s rows matching ``filters``, in key order.

    :raises ValueError: ``limit`` outside 1..1000 or a negative ``offset``.
    """
    limit = check_int(limit, "limit", minimum=1, maximum=MAX_LIMIT)
    offset = check_int(offset, "offset", minimum=0)
    query = scoped_query(model, org_id, **filters)
    keys = model._meta.get_primary_keys()  # type: ignore[no-untyped-call]
    return list(query.order_by(*keys).limit(limit).offset(offset))


def scoped_count(model: type[_M], org_id: OrgLike, /, **filters: Any) -> int:
    """How many of ``org_id``'s rows match ``filters``."""
    return int(scoped_query(model, org_id, **filters).count())


class TenantRepository(Generic[_M]):
    """The rows of one model in one org: every method is pinned to that org.

    :param model: a tenant model.
    :param org_id: the org; checked once, here.
    :raises TypeError: ``model`` is not a tenant model.
    :raises MissingOrgError: no org, or not a UUID.
    """

    def __init__(self, model: type[_M], org_id: OrgLike) -> None:
        _check_model(model)
        self.model = model
        self.org_id: uuid.UUID = require_org(org_id, f"TenantRepository({model.__name__})")

    def query(self, **filters: Any) -> TenantSelect:
        return scoped_query(self.model, self.org_id, **filters)

    def get(self, **filters: Any) -> _M | None:
        return scoped_get(self.model, self.org_id, **filters)

    def list(self, limit: int = 50, offset: int = 0, **filters: Any) -> list[_M]:
        return scoped_list(self.model, self.org_id, limit=limit, offset=offset, **filters)

    def count(self, **filters: Any) -> int:
        return scoped_count(self.model, self.org_id, **filters)

    def create(self, **values: Any) -> _M:
        """Insert a row in this org.

        :raises CrossOrgError: ``values`` name another org.
        """
        given = values.pop("org_id", None)
        if given is not None and require_org(given, "TenantRepository.create()") != self.org_id:
            raise CrossOrgError(f"TenantRepository of org {self.org_id} cannot create a row "
                                f"of org {given}")
        for name in values:
            _field(self.model, name)
        return self.model.create(org_id=self.org_id, **values)

    def update(self, values: dict[str, Any], /, **filters: Any) -> int:
        """Set ``values`` on this org's rows matching ``filters``; returns rows changed."""
        fields = {_field(self.model, name): value for name, value in values.items()}
        terms = [_field(self.model, name) == value for name, value in filters.items()]
        query = self.model.update(fields, org_id=self.org_id)
        return int((query.where(*terms) if terms else query).execute())

    def delete(self, **filters: Any) -> int:
        """Delete this org's rows matching ``filters`` (all of them when none are given)."""
        terms = [_field(self.model, name) == value for name, value in filters.items()]
        query = self.model.delete(org_id=self.org_id)
        return int((query.where(*terms) if terms else query).execute())


def _check_model(model: object) -> None:
    if not (isinstance(model, type) and issubclass(model, TenantModel)):
        name = getattr(model, "__name__", repr(model))
        raise TypeError(f"{name} is not a tenant model (no org_id): scoped helpers take "
                        "TenantModel subclasses")


def _field(model: type[TenantModel], name: str) -> Any:
    field = model._meta.fields.get(name)
    if field is None:
        raise ValueError(f"{model.__name__} has no field {name!r}")
    return field

