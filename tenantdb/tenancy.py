"""Tenant scoping of models: every Peewee entry point of a tenant table names its org.

:class:`TenantModel` is the base of every tenant table's model. Reads and writes take the
org explicitly (``Destination.select(org_id=org)``, ``Destination.update({...}, org_id=org)``)
and raise :class:`~tenantdb.errors.MissingOrgError` without one, instead of running
unscoped. Joins from a scoped query are constrained to the same org, relations
(:class:`TenantForeignKey`) resolve within the instance's own org, and a loaded row's
``org_id`` cannot change. Whatever slips past these conveniences meets the execute-time
verifier (:mod:`tenantdb.verifier`) and then row-level security in the database.
"""

from __future__ import annotations

import contextvars
import functools
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import peewee
from peewee import JOIN, Case, ModelBase, ModelSelect, UUIDField, Value, chunked

from . import peewee_internals as pi
from .context import (
    OrgLike,
    Scope,
    cross_org,
    cross_org_reason,
    org_unless_cross_org,
    require_org,
    scope_of,
    with_scope,
)
from .db import database
from .errors import CrossOrgError, MissingOrgError
from .planned import by_id_statement
from .scoping import execute_scoped
from .verifier import ORG_COLUMN, register_tenant_table, verify

__all__ = [
    "BaseModel",
    "OrgLike",
    "TenantForeignKey",
    "TenantModel",
    "TenantRootModel",
    "TenantSelect",
    "cross_org",
    "cross_org_reason",
    "execute_scoped",
    "prefetch",
    "require_org",
]

_M = TypeVar("_M", bound="TenantModel")

if TYPE_CHECKING:  # generic in peewee's stubs only
    _ModelSelect = ModelSelect[Any]
else:
    _ModelSelect = ModelSelect


class BaseModel(peewee.Model):
    """Base of every tenantdb model: bound to :data:`tenantdb.db.database`."""

    class Meta:
        database = database
        legacy_table_names = False


# -- the model class ----------------------------------------------------------------------


class _TenantModelBase(ModelBase):
    """Registers tenant tables, and refuses the class-level shortcuts that cannot name an org
    (``Model[pk]``, ``pk in Model``, ``len(Model)``, ``iter(Model)``) outside ``cross_org``."""

    def __new__(mcs, name: str, bases: tuple[type, ...], attrs: dict[str, Any],
                **kwargs: Any) -> Any:
        cls = super().__new__(mcs, name, bases, attrs, **kwargs)  # type: ignore[no-untyped-call]
        if not attrs.get("_tenantdb_abstract"):
            register_tenant_table(cls._meta.table_name)
        return cls

    def __getitem__(cls, key: Any) -> Any:
        _refuse_shortcut(cls, "Model[pk]", "get_by_id(pk, org_id=...)")
        return super().__getitem__(key)  # type: ignore[no-untyped-call]

    def __setitem__(cls, key: Any, value: Any) -> None:
        _refuse_shortcut(cls, "Model[pk] = ...", "set_by_id(pk, data, org_id=...)")
        super().__setitem__(key, value)

    def __delitem__(cls, key: Any) -> None:
        _refuse_shortcut(cls, "del Model[pk]", "delete_by_id(pk, org_id=...)")
        super().__delitem__(key)

    def __contains__(cls, key: Any) -> bool:
        _refuse_shortcut(cls, "pk in Model", "get_or_none(..., org_id=...)")
        return bool(super().__contains__(key))

    def __len__(cls) -> int:
        _refuse_shortcut(cls, "len(Model)", "select(org_id=...).count()")
        return int(super().__len__())

    def __iter__(cls) -> Iterator[Any]:
        _refuse_shortcut(cls, "iter(Model)", "select(org_id=...)")
        return iter(super().__iter__())  # type: ignore[no-untyped-call]


def _refuse_shortcut(cls: Any, shortcut: str, instead: str) -> None:
    if cross_org_reason() is None:
        raise MissingOrgError(f"{shortcut} cannot name an org: use {cls.__name__}.{instead}")


class _OrgIdAccessor(peewee.FieldAccessor):
    """Remembers a row's org; a row read from (or written to) the database keeps it."""

    def __set__(self, instance: Any, value: Any) -> None:
        state = instance.__dict__
        known = state.get("_tenantdb_row_org")  # None while Peewee is still filling a loaded row
        if state.get("_tenantdb_persisted") and known is not None and not _same_org(known, value):
            raise CrossOrgError(
                f"{type(instance).__name__}.org_id cannot change on a stored row "
                f"({known} -> {value}): insert a copy under the other org"
            )
        state["_tenantdb_row_org"] = value
        super().__set__(instance, value)


class OrgIdField(UUIDField):
    """The ``org_id`` column of a tenant table."""

    accessor_class = _OrgIdAccessor


class TenantSelect(_ModelSelect):
    """A ``SELECT`` pinned to one org: joins to tenant tables get the same org.

    Rows it loads remember that org (a later ``save()`` writes only there, however few
    columns were selected).
    """

    _tenantdb_scope: Scope | None = None

    def join(self, dest: Any, join_type: str = JOIN.INNER, on: Any = None, src: Any = None,
             attr: Any = None) -> Any:
        scope = self._tenantdb_scope
        if scope is None or _tenant_model(dest) is None:
            return super().join(dest, join_type, on, src, attr)
        org = scope.org
        if on is None and join_type != JOIN.CROSS:
            on = _infer_join(src if src is not None else pi.join_context(self), dest)
        join_type = JOIN.INNER if join_type == JOIN.CROSS else join_type
        org_term = dest.org_id == org
        query: Any = super().join(dest, join_type,  # Any: the stubs omit the private _where
                                  org_term if on is None else (on & org_term), src, attr)
        if join_type in _KEEPS_LEFT_ROWS_NULL:
            # ON cannot filter a preserved side: its org goes to WHERE; the base table's
            # WHERE term lets through the rows this join null-extends (org_id is NOT NULL,
            # so IS NULL holds only for those), which the verifier accepts.
            keep_dest = join_type in _KEEPS_RIGHT_ROWS_NULL
            query = query.where(((dest.org_id == org) | dest.org_id.is_null())
                                if keep_dest else dest.org_id == org)
            pi.set_where(query, _null_tolerant_base(pi.where(query), scope.term))
        return query

    def __sql_selection__(self, ctx: Any, is_subquery: bool = False) -> Any:
        """Peewee's column list; the default one (every field of the model) is rendered once
        per model, alias and SQL context, then replayed as text.

        Peewee renders each column through several nodes on every call: for an 8-column model
        that was half of building a page query's SQL. The replayed text is Peewee's own
        output for the same inputs, so the statement is byte for byte what Peewee sends."""
        model = self.model
        fields = model._meta.sorted_fields
        returning = pi.returning(self)
        table = model._meta.table
        if (is_subquery or not pi.is_default_selection(self) or len(returning) != len(fields)
                or any(a is not b for a, b in zip(returning, fields, strict=True))
                or pi.table_alias(table) is not None):
            return super().__sql_selection__(ctx, is_subquery)
        key = (model, tuple(fields), ctx.alias_manager[table], pi.context_key(ctx))
        text = _selections.get(key)
        if text is not None:
            return ctx.literal(text)
        text = pi.render_text(ctx, lambda: super(TenantSelect, self).__sql_selection__(
            ctx, is_subquery))
        if text is not None:
            if len(_selections) >= _MAX_SELECTIONS:
                _selections.clear()
            _selections[key] = text
        return ctx

    def orwhere(self, *expressions: Any) -> Any:
        """Refused when it would weaken the org scope (it always does on a tenant query)."""
        query = super().orwhere(*expressions)
        verify(query)
        return query

    def cte(self, name: str, recursive: bool = False, columns: Any = None,
            materialized: bool | None = None) -> Any:
        """Peewee's ``cte()``; its ``select_from`` reads the CTE without asking the model
        for an org (Peewee's would call ``Model.select()``)."""
        return _TenantCTE(name, self, recursive=recursive, columns=columns,
                          materialized=materialized)

    def _get_cursor_wrapper(self, cursor: Any) -> Any:
        wrapper = super()._get_cursor_wrapper(cursor)  # type: ignore[misc]
        process_row = getattr(wrapper, "process_row", None)
        scope = self._tenantdb_scope
        if process_row is None or scope is None:
            return wrapper
        model = getattr(wrapper, "constructor", None)
        if (type(wrapper) is peewee.ModelObjectCursorWrapper and isinstance(model, type)
                and issubclass(model, TenantModel)):
            # The common case, one model per row: the org rides in with the constructor
            # (cheaper than wrapping every row).
            wrapper.constructor = _row_constructor(model, scope.org)
            return wrapper
        # Only a wrapper that attaches joined rows can assign None to a relation.
        joins = isinstance(wrapper, peewee.ModelCursorWrapper)
        wrapper.process_row = _RowLoader(process_row, scope.org, joins)
        return wrapper


class _TenantCTE(peewee.CTE):
    """A CTE over a tenant query. ``select_from`` builds the outer query as Peewee does,
    minus the ``Model.select()`` call that would demand an org for a query that reads only
    the CTE (whose own query carries the org, and is verified with the statement)."""

    def select_from(self, *columns: Any) -> Any:
        query = pi.cte_query(self)
        model = getattr(query, "model", None)
        if not columns or model is None:
            return super().select_from(*columns)
        select = peewee.ModelSelect(model, columns).from_(self).with_cte(self)
        return select.bind(pi.query_database(query))

    def union_all(self, rhs: Any) -> Any:
        return _TenantCTE(pi.alias(self), pi.cte_query(self).clone() + rhs,
                          pi.is_recursive(self), pi.cte_columns(self))

    def union(self, rhs: Any) -> Any:
        return _TenantCTE(pi.alias(self), pi.cte_query(self).clone() | rhs,
                          pi.is_recursive(self), pi.cte_columns(self))

    __add__ = union_all
    __or__ = union


# Default column lists already rendered (TenantSelect.__sql_selection__): a few per model.
_selections: dict[tuple[Any, ...], str] = {}
_MAX_SELECTIONS = 1024

# A RIGHT or FULL join null-extends the left side (the base table among it); a FULL join
# null-extends the right side too.
_KEEPS_LEFT_ROWS_NULL = frozenset({JOIN.RIGHT_OUTER, JOIN.FULL, JOIN.FULL_OUTER})
_KEEPS_RIGHT_ROWS_NULL = frozenset({JOIN.FULL, JOIN.FULL_OUTER})
# Set while Peewee builds rows: its joins then assign None for a missing joined row.
_loading: contextvars.ContextVar[bool] = contextvars.ContextVar("tenantdb_loading",
                                                                default=False)


class _RowLoader:
    """Wraps a cursor wrapper's ``process_row``: stamps each loaded row (and the rows joined
    to it) with the org of the query that read it."""

    __slots__ = ("joins", "org", "process_row")

    def __init__(self, process_row: Any, org: uuid.UUID, joins: bool) -> None:
        self.process_row = process_row
        self.org = org
        self.joins = joins

    def __call__(self, row: Any) -> Any:
        if self.joins:
            token = _loading.set(True)
            try:
                obj = self.process_row(row)
            finally:
                _loading.reset(token)
        else:
            obj = self.process_row(row)
        if isinstance(obj, (TenantModel, TenantRootModel)):
            _stamp(obj, self.org)
        return obj


def _row_constructor(model: Any, org: uuid.UUID) -> Any:
    """What builds ``model``'s rows read for ``org``: called by Peewee's cursor wrapper as
    ``constructor(__no_default__=1, **columns)``, as it would call the model."""
    if model.__init__ is not TenantModel.__init__:
        return functools.partial(model, __tenantdb_org__=org)
    if not _stores_columns_as_given(model):
        def initialised(**columns: Any) -> Any:
            # TenantModel.__init__ for a loaded row, minus its keyword handling.
            obj = model.__new__(model)
            peewee.Model.__init__(obj, **columns)
            _loaded_in(obj.__dict__, org)
            return obj

        return initialised

    fields = model._meta.fields.keys()

    def loaded(**columns: Any) -> Any:
        # Every accessor would only store its column: the row's data is the columns as given
        # (a dict of this call's own), with no setattr per field. Once per row.
        columns.pop(pi.NO_DEFAULT, None)
        if not columns.keys() <= fields:  # also selected expressions: plain attributes
            extra = {name: columns.pop(name) for name in columns.keys() - fields}
            obj = pi.loaded_instance(model, columns)
            obj.__dict__.update(extra)
        else:
            obj = pi.loaded_instance(model, columns)
        state = obj.__dict__
        state["_tenantdb_row_org"] = columns.get(ORG_COLUMN)
        _loaded_in(state, org)
        return obj

    return loaded


def _loaded_in(state: dict[str, Any], org: uuid.UUID) -> None:
    """Mark a row just read for ``org``: stored, and of the org it was read as (unless its
    ``org_id`` column was read, which :class:`_OrgIdAccessor` recorded)."""
    state["_tenantdb_persisted"] = True
    if state.get("_tenantdb_row_org") is None:
        state["_tenantdb_row_org"] = org


@functools.cache
def _stores_columns_as_given(model: Any) -> bool:
    """Whether setting each of ``model``'s fields on a new row only stores the value: Peewee's
    plain ``FieldAccessor``, or the org column's accessor (which also remembers the org).
    A foreign key's accessor (or any other) does more, and gets the model's own path."""
    for field in model._meta.sorted_fields:
        accessor = next((vars(c)[field.name] for c in model.__mro__ if field.name in vars(c)),
                        None)
        if type(accessor) not in (peewee.FieldAccessor, _OrgIdAccessor):
            return False
    return True


def _stamp(obj: Any, org: uuid.UUID) -> None:
    if obj.__dict__.get("_tenantdb_row_org") is None:
        obj.__dict__["_tenantdb_row_org"] = org
    for related in obj.__rel__.values():
        if isinstance(related, (TenantModel, TenantRootModel)):
            _stamp(related, org)


def _null_tolerant_base(where: Any, term: Any) -> Any:
    """``where`` with the base table's scope ``term`` (identified by identity) widened to
    ``term OR <org column> IS NULL``; unchanged if the term is not an AND-ed part of it."""
    if term is None or where is None:
        return where
    if where is term:
        return term | term.lhs.is_null()
    if isinstance(where, peewee.Expression) and where.op == peewee.OP.AND:
        left = _null_tolerant_base(where.lhs, term)
        right = _null_tolerant_base(where.rhs, term)
        if left is not where.lhs or right is not where.rhs:
            return peewee.Expression(left, peewee.OP.AND, right)
    return where


class TenantRootModel(BaseModel):
    """Base of the tenant root (``org``): each row *is* an org, and its ``id`` is the org.

    Reads are scoped by that id: ``Org.select(org_id=A)`` is ``WHERE id = A``, as is any query
    whose WHERE pins ``Org.id`` (``Org.get_by_id(A)``); an unscoped read is refused when it
    runs outside :func:`cross_org`. ``UPDATE`` of the org's own row is allowed; creating and
    deleting orgs is admin work (:func:`tenantdb.orgs.create_org`,
    :func:`tenantdb.orgs.delete_org`), and the application role has no right to either.
    """

    @classmethod
    def select(cls, *fields: Any, org_id: OrgLike | None = None) -> TenantSelect:
        """``SELECT ... WHERE id = org``, or unscoped (then refused outside ``cross_org``)."""
        query = TenantSelect(cls, fields or cls._meta.sorted_fields, is_default=not fields)
        if org_id is None:
            return query
        org = require_org(org_id, f"{cls.__name__}.select()")
        term = cls._meta.primary_key == org
        return with_scope(query.where(term), Scope(org, term))

    def save(self, force_insert: bool = False, only: Any = None) -> int:
        """Peewee's ``save``, refused when a row read as one org now names another.

        :raises CrossOrgError: the row's ``id`` was changed after it was read.
        """
        known = self.__dict__.get("_tenantdb_row_org")
        current = self.__data__.get(_id_field(type(self)).name)
        if known is not None and not _same_org(known, current):
            raise CrossOrgError(f"{type(self).__name__} {known} cannot be saved as {current}: "
                                "an org's id never changes")
        return int(super().save(force_insert=force_insert, only=only))


class TenantModel(BaseModel, metaclass=_TenantModelBase):
    """Base of every tenant table: rows belong to one org, and every entry point names it.

    Reads: ``select``, ``get``, ``get_or_none``, ``get_by_id``, ``get_or_create``, ``filter``,
    ``raw`` take ``org_id=``. Writes: ``create``/``insert`` rows carry their ``org_id``;
    ``insert_many``/``bulk_create``/``replace_many`` take ``org_id=`` or rows of one org;
    ``update``, ``delete``, ``set_by_id``, ``delete_by_id``, ``bulk_update``, ``insert_from``
    take ``org_id=``; ``save``/``delete_instance`` act on ``WHERE org_id AND key`` and raise
    ``DoesNotExist`` when that matches no row. Inside :func:`cross_org` the reads and the
    ``update``/``delete`` builders may omit the org.
    """

    _tenantdb_abstract = True
    org_id = OrgIdField()
    # Set by Peewee on every model class and instance; declared for the type checker.
    DoesNotExist: type[peewee.DoesNotExist]
    _dirty: set[str]
    __rel__: dict[str, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Peewee builds rows read from the database with __no_default__; a scoped query
        # adds the org it read them from.
        loaded = bool(kwargs.get(pi.NO_DEFAULT))
        org = kwargs.pop("__tenantdb_org__", None)
        super().__init__(*args, **kwargs)
        self.__dict__["_tenantdb_persisted"] = loaded
        if org is not None and self.__dict__.get("_tenantdb_row_org") is None:
            self.__dict__["_tenantdb_row_org"] = org

    # -- reads --

    @classmethod
    def select(
        cls, *fields: Any, org_id: OrgLike | None = None
    ) -> TenantSelect:
        """``SELECT ... WHERE org_id = org``; ``org_id`` is required outside :func:`cross_org`.

        :raises MissingOrgError: no org (or not a UUID) outside a ``cross_org`` block.
        """
        query = TenantSelect(cls, fields or cls._meta.sorted_fields, is_default=not fields)
        org = org_unless_cross_org(org_id, f"{cls.__name__}.select()")
        if org is None:
            return query
        term = cls.org_id == org
        return with_scope(query.where(term), Scope(org, term))

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
        row: _M = select.get()
        return row

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
        """The row of ``org_id`` whose ``id`` is ``pk``.

        The statement's SQL is built and verified once per model (:mod:`tenantdb.planned`);
        a model that overrides ``select`` or ``get`` goes through them instead.
        """
        if org_id is None or not _plain_reads(cls):
            return cls.get(_id_field(cls) == pk, org_id=org_id)
        org = require_org(org_id, f"{cls.__name__}.get_by_id()")
        statement = by_id_statement(cls)
        params = statement.bind(org, pk)
        row = database.execute_verified(statement.sql, params, org).fetchone()
        if row is None:
            raise cls.DoesNotExist(f"{cls.__name__} instance matching query does not exist:"
                                   f"\nSQL: {statement.sql}\nParams: {list(params)}")
        found: _M = _row_constructor(cls, org)(**{pi.NO_DEFAULT: 1}, **statement.columns(row))
        pi.clear_dirty(found)  # as Peewee's cursor wrapper does after its constructor
        return found

    @classmethod
    def get_or_create(cls: type[_M], *, org_id: OrgLike | None = None,
                      defaults: dict[str, Any] | None = None,
                      **kwargs: Any) -> tuple[_M, bool]:
        """The org's row matching ``kwargs``, or a new one (with ``defaults``) and ``True``."""
        org = require_org(org_id, f"{cls.__name__}.get_or_create()")
        defaults = dict(defaults or {})
        given = defaults.pop(ORG_COLUMN, None)
        if given is not None and require_org(given, f"{cls.__name__}.get_or_create()") != org:
            raise CrossOrgError(f"{cls.__name__}.get_or_create(): defaults name org {given}, "
                                f"the call org {org}")
        if ORG_COLUMN in kwargs:
            raise ValueError(f"{cls.__name__}.get_or_create(): pass the org as org_id=..., "
                             "not among the filters")
        query = cls.select(org_id=org)
        for name, value in kwargs.items():
            query = query.where(getattr(cls, name) == value)
        try:
            found: _M = query.get()
            return found, False
        except peewee.DoesNotExist:
            try:
                with cls._meta.database.atomic():
                    return cls.create(org_id=org, **{**kwargs, **defaults}), True
            except peewee.IntegrityError:
                found = query.get()  # a concurrent creator won the race
                return found, False

    @classmethod
    def filter(cls, *dq_nodes: Any, org_id: OrgLike | None = None,
               **filters: Any) -> Any:
        """Peewee's ``filter`` (``field__op=value`` lookups) within one org."""
        return cls.select(org_id=org_id).filter(*dq_nodes, **filters)

    @classmethod
    def raw(cls, sql: str, *params: Any, org_id: OrgLike | None = None) -> Any:
        """Raw SQL returning model rows, run with the org set (row-level security holds).

        Outside :func:`cross_org` the org is required; put the ``org_id`` predicate in the
        SQL too (the database hides other orgs' rows either way).
        """
        query = super().raw(sql, *params)
        org = org_unless_cross_org(org_id, f"{cls.__name__}.raw()")
        return query if org is None else with_scope(query, Scope(org))

    # -- writes --

    @classmethod
    def create(cls: type[_M], **query: Any) -> _M:
        """Insert one row; ``org_id=`` is required.

        :raises MissingOrgError: no org, or not a UUID.
        """
        require_org(query.get("org_id"), f"{cls.__name__}.create()")
        inst = cls(**query)
        inst.save(force_insert=True)
        return inst

    @classmethod
    def insert(cls, data: Any = None, /, **insert: Any) -> Any:
        """``INSERT`` one row, which must carry its ``org_id``."""
        row: dict[Any, Any] = {**_field_names(data or {}), **insert}
        require_org(row.get(ORG_COLUMN), f"{cls.__name__}.insert()")
        return super().insert(data, **insert)

    @classmethod
    def insert_many(cls, rows: Iterable[Any], fields: Sequence[Any] | None = None, *,
                    org_id: OrgLike | None = None) -> Any:
        """``INSERT`` rows of one org: ``org_id=`` fills rows without one and must match
        the rest; without it every row must carry the same org.

        :raises CrossOrgError: a row of another org.
        :raises MissingOrgError: no org anywhere.
        """
        rows = list(rows)
        scope = require_org(org_id, f"{cls.__name__}.insert_many()") if org_id else None
        names = [n for n in (_name(f) for f in fields or ()) if n is not None]
        checked = [_row_in_org(cls, row, names, scope) for row in rows]
        orgs = {org for _, org in checked}
        if len(orgs) > 1:
            raise CrossOrgError(f"{cls.__name__}.insert_many() writes one org, got {len(orgs)}")
        return super().insert_many([row for row, _ in checked], fields)

    @classmethod
    def insert_from(cls, query: Any, fields: Sequence[Any], *,
                    org_id: OrgLike | None = None) -> Any:
        """``INSERT ... SELECT`` whose selected rows are all of ``org_id``.

        :raises CrossOrgError: the SELECT is scoped to another org.
        """
        org = require_org(org_id, f"{cls.__name__}.insert_from()")
        insert = super().insert_from(query, fields)
        if verify(insert).org != org:
            raise CrossOrgError(f"{cls.__name__}.insert_from(): the rows are not of org {org}")
        return insert

    @classmethod
    def replace(cls, data: Any = None, /, **insert: Any) -> Any:
        """PostgreSQL's "replace": insert, or overwrite the org's row with the same key."""
        return cls.insert(data, **insert).on_conflict(
            conflict_target=_pk_fields(cls), preserve=_non_pk_fields(cls))

    @classmethod
    def replace_many(cls, rows: Iterable[Any], fields: Sequence[Any] | None = None, *,
                     org_id: OrgLike | None = None) -> Any:
        """:meth:`replace` for many rows of one org."""
        return cls.insert_many(rows, fields, org_id=org_id).on_conflict(
            conflict_target=_pk_fields(cls), preserve=_non_pk_fields(cls))

    @classmethod
    def update(cls, data: Any = None, /, *, org_id: OrgLike | None = None,
               **update: Any) -> Any:
        """``UPDATE ... WHERE org_id = org``; ``org_id`` itself can never be set.

        :raises CrossOrgError: the data sets ``org_id``.
        """
        if ORG_COLUMN in _field_names(data or {}):
            raise CrossOrgError(f"{cls.__name__}.update() cannot change org_id; org_id= is the "
                                "scope of the update")
        query = super().update(data, **update)
        org = org_unless_cross_org(org_id, f"{cls.__name__}.update()")
        return query if org is None else query.where(cls.org_id == org)

    @classmethod
    def delete(cls, *, org_id: OrgLike | None = None) -> Any:
        """``DELETE ... WHERE org_id = org``."""
        query = super().delete()
        org = org_unless_cross_org(org_id, f"{cls.__name__}.delete()")
        return query if org is None else query.where(cls.org_id == org)

    @classmethod
    def set_by_id(cls, key: Any, value: dict[str, Any], *, org_id: OrgLike | None = None) -> Any:
        """Update the org's row ``key`` with ``value``, or insert ``value`` if ``key`` is None."""
        org = require_org(org_id, f"{cls.__name__}.set_by_id()")
        if key is None:
            return cls.insert({**_field_names(value), ORG_COLUMN: org}).execute()
        return cls.update(value, org_id=org).where(_id_field(cls) == key).execute()

    @classmethod
    def delete_by_id(cls, pk: Any, *, org_id: OrgLike | None = None) -> Any:
        """Delete the org's row ``pk``; returns the number of rows deleted (0 or 1)."""
        org = require_org(org_id, f"{cls.__name__}.delete_by_id()")
        return cls.delete(org_id=org).where(_id_field(cls) == pk).execute()

    @classmethod
    def bulk_create(cls, model_list: Iterable[Any], batch_size: int | None = None, *,
                    org_id: OrgLike | None = None) -> None:
        """Insert unsaved instances of one org (``org_id=`` fills those without one)."""
        instances = list(model_list)
        scope = require_org(org_id, f"{cls.__name__}.bulk_create()") if org_id else None
        for inst in instances:
            if inst.org_id is None and scope is not None:
                inst.org_id = scope
            elif scope is not None and not _same_org(inst.org_id, scope):
                raise CrossOrgError(f"{cls.__name__}.bulk_create(): a row of org {inst.org_id} "
                                    f"in a write to org {scope}")
        super().bulk_create(instances, batch_size)
        for inst in instances:
            inst.__dict__["_tenantdb_persisted"] = True

    @classmethod
    def bulk_update(cls, model_list: Iterable[Any], fields: Sequence[Any],
                    batch_size: int | None = None, *, org_id: OrgLike | None = None) -> int:
        """Update ``fields`` of stored instances of one org, a batch per statement.

        :raises CrossOrgError: an instance of another org, or ``org_id`` among ``fields``.
        """
        instances = list(model_list)
        if not instances:
            return 0
        orgs = [inst._write_org("bulk_update()") for inst in instances]
        org = require_org(org_id if org_id is not None else orgs[0],
                          f"{cls.__name__}.bulk_update()")
        if any(not _same_org(row_org, org) for row_org in orgs):
            raise CrossOrgError(f"{cls.__name__}.bulk_update() writes one org ({org})")
        targets = [cls._meta.fields[f] if isinstance(f, str) else f for f in fields]
        if any(f.name in (ORG_COLUMN, "id") for f in targets):
            raise CrossOrgError(f"{cls.__name__}.bulk_update() cannot change org_id or id")
        id_field, total = _id_field(cls), 0
        for batch in chunked(instances, batch_size or len(instances)):
            data = {f: Case(id_field, [(i.id, Value(getattr(i, f.name), converter=f.db_value))
                                       for i in batch], f) for f in targets}
            total += cls.update(data, org_id=org).where(
                id_field.in_([i.id for i in batch])).execute()
        return total

    def save(self, force_insert: bool = False, only: Any = None) -> int:
        """Insert a new row, or update this one: ``WHERE org_id = <its org> AND <key>``.

        :raises MissingOrgError: the row has no org.
        :raises peewee.DoesNotExist: the update matched no row (deleted, or never inserted).
        """
        org = self._write_org("save()")
        if force_insert or not self.__dict__.get("_tenantdb_persisted"):
            rows = int(super().save(force_insert=True, only=only))
            self.__dict__["_tenantdb_persisted"] = True
            return rows
        keys = {f.name for f in _pk_fields(type(self))}
        names = [_name(f) for f in only] if only is not None else list(self.__data__)
        data = {n: self.__data__[n] for n in names if n in self.__data__ and n not in keys}
        if not data:
            raise ValueError("no data to save!")
        rows = int(type(self).update(data, org_id=org).where(*self._key_terms()).execute())
        if rows == 0:
            raise self.DoesNotExist(f"{type(self).__name__}.save() matched no row of org {org} "
                                    f"with {self._key_text()}: deleted, or never inserted")
        self._dirty -= set(data)
        return rows

    def delete_instance(self, recursive: bool = False, delete_nullable: bool = False) -> int:
        """Delete this row: ``WHERE org_id = <its org> AND <key>``.

        Dependent rows go through the database's composite foreign keys (``ON DELETE
        CASCADE`` / ``SET NULL``), which never reach another org; the flags are accepted
        for compatibility and change nothing.

        :raises peewee.DoesNotExist: no such row in its org.
        """
        org = self._write_org("delete_instance()")
        rows = int(type(self).delete(org_id=org).where(*self._key_terms()).execute())
        if rows == 0:
            raise self.DoesNotExist(f"{type(self).__name__}.delete_instance() matched no row "
                                    f"of org {org} with {self._key_text()}")
        self.__dict__["_tenantdb_persisted"] = False
        return rows

    def _write_org(self, what: str) -> uuid.UUID:
        """The org a write of this row goes to: the one it was read from or created in.

        A row read by a query scoped to org A remembers A even when ``org_id`` was not
        selected; its ``org_id`` can never name another org.

        :raises CrossOrgError: ``org_id`` now names another org than the row's own.
        :raises MissingOrgError: a new row without an org.
        """
        where = f"{type(self).__name__}.{what}"
        known = self.__dict__.get("_tenantdb_row_org")
        current = self.__data__.get(ORG_COLUMN)
        if self.__dict__.get("_tenantdb_persisted") and known is not None:
            org = require_org(known, where)
            if current is not None and not _same_org(current, org):
                raise CrossOrgError(f"{where}: the row belongs to org {org}, its org_id says "
                                    f"{current}; insert a copy under the other org")
            if current is None:
                self.__data__[ORG_COLUMN] = org
            return org
        return require_org(current, where)

    def _key_terms(self) -> list[Any]:
        return [f == getattr(self, f.name) for f in _pk_fields(type(self))
                if f.name != ORG_COLUMN]

    def _key_text(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in _pk_fields(type(self))
                         if f.name != ORG_COLUMN)


# -- relations ----------------------------------------------------------------------------


class TenantForeignKey(UUIDField):
    """A ``*_id`` column pointing at another tenant table's ``id`` within the same org.

    The database holds the relation as a composite key ``(org_id, x_id)``, which Peewee's
    ``ForeignKeyField`` cannot express; this field adds the accessors: ``row.user`` (the
    ``user_id`` row of ``row``'s org) and, on the target, ``user.<backref>`` (a query of
    the rows of ``user``'s org pointing at it).

    :param rel_model: the target model.
    :param backref: the name of the reverse accessor on ``rel_model``.
    """

    def __init__(self, rel_model: type[TenantModel], *args: Any, backref: str | None = None,
                 **kwargs: Any) -> None:
        self.rel_model = rel_model
        self.backref = backref
        super().__init__(*args, **kwargs)

    @property
    def object_name(self) -> str:
        return self.name[:-3] if self.name.endswith("_id") else f"{self.name}_object"

    def bind(self, model: Any, name: str, set_attribute: bool = True) -> None:
        super().bind(model, name, set_attribute)
        setattr(model, self.object_name, _RelatedObject(self))
        if self.backref:
            setattr(self.rel_model, self.backref, _Backref(self))


class _RelatedObject:
    def __init__(self, fk: TenantForeignKey) -> None:
        self.fk = fk

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self
        target = instance.__data__.get(self.fk.name)
        if target is None:
            return None
        cached = instance.__rel__.get(self.fk.object_name)
        if cached is not None and cached.id == target:
            return cached
        row = self.fk.rel_model.get_by_id(target, org_id=instance.org_id)
        instance.__rel__[self.fk.object_name] = row
        return row

    def __set__(self, instance: Any, value: Any) -> None:
        if _loading.get():
            # Peewee attaching a joined row while it reads: the column keeps the value read.
            # An outer join that found no row assigns None, and a joined row may lack its
            # id; neither says anything about the column (a later save() must not write it).
            instance.__rel__[self.fk.object_name] = value
            return
        if value is not None and not _same_org(value.org_id, instance.org_id):
            raise CrossOrgError(f"{type(instance).__name__}.{self.fk.object_name}: a row of org "
                                f"{value.org_id} cannot be linked from org {instance.org_id}")
        setattr(instance, self.fk.name, None if value is None else value.id)
        instance.__rel__[self.fk.object_name] = value


class _Backref:
    def __init__(self, fk: TenantForeignKey) -> None:
        self.fk = fk

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self
        return self.fk.model.select(org_id=instance.org_id).where(self.fk == instance.id)


def prefetch(query: Any, *related: Any) -> list[Any]:
    """Run ``query`` and load related rows of the same org, a query per relation.

    Each of ``related`` is a tenant model (or a query of one, scoped to the same org)
    related by a :class:`TenantForeignKey` to the query's model or an earlier one. Children
    land in a list under the backref name (``dest.knowledge_items``); parents are cached for
    their accessor (``item.destination``).

    :raises MissingOrgError: ``query`` is not scoped to an org.
    :raises CrossOrgError: a related query is scoped to another org.
    """
    scope = scope_of(query)
    org = scope.org if scope is not None else verify(query).org
    if org is None:
        raise MissingOrgError("prefetch() needs a query scoped with org_id=...")
    loaded: list[tuple[type[TenantModel], list[Any]]] = [(query.model, list(query))]
    for rel in related:
        source: Any = rel
        rel_query = source.select(org_id=org) if isinstance(rel, type) else rel
        if verify(rel_query).org != org:
            raise CrossOrgError(f"prefetch(): related rows must be of org {org}")
        fk, parents = _find_relation(rel_query.model, loaded)
        rows = _attach(fk, rel_query, parents)
        loaded.append((rel_query.model, rows))
    return loaded[0][1]


def _find_relation(model: type[TenantModel], loaded: list[tuple[type[TenantModel], list[Any]]]
                   ) -> tuple[TenantForeignKey, list[Any]]:
    for loaded_model, rows in reversed(loaded):  # the nearest loaded model first
        links = _foreign_keys(model, loaded_model) + _foreign_keys(loaded_model, model)
        if links:
            return links[0], rows
    raise ValueError(f"prefetch(): no TenantForeignKey links {model.__name__} to the query")


def _attach(fk: TenantForeignKey, rel_query: Any, parents: list[Any]) -> list[Any]:
    if fk.model is rel_query.model:  # children pointing at the parents
        ids = [p.id for p in parents]
        rows = list(rel_query.where(fk.in_(ids))) if ids else []
        by_parent: dict[Any, list[Any]] = defaultdict(list)
        for row in rows:
            by_parent[getattr(row, fk.name)].append(row)
        for parent in parents:
            parent.__dict__[fk.backref or f"{fk.model._meta.name}_set"] = by_parent[parent.id]
        return rows
    targets = {getattr(p, fk.name) for p in parents} - {None}
    rows = list(rel_query.where(_id_field(fk.rel_model).in_(targets))) if targets else []
    by_id = {row.id: row for row in rows}
    for parent in parents:
        parent.__rel__[fk.object_name] = by_id.get(getattr(parent, fk.name))
    return rows


def _foreign_keys(model: Any, target: Any) -> list[TenantForeignKey]:
    return [f for f in model._meta.sorted_fields
            if isinstance(f, TenantForeignKey) and f.rel_model is target]


def _infer_join(src: Any, dest: Any) -> Any:
    src_model, dest_model = _tenant_model(src), _tenant_model(dest)
    candidates = [(dest, fk, src) for fk in _foreign_keys(dest_model, src_model)]
    candidates += [(src, fk, dest) for fk in _foreign_keys(src_model, dest_model)]
    if len(candidates) != 1:
        raise ValueError(f"join to {getattr(dest_model, '__name__', dest)}: give on=... "
                         f"({len(candidates)} TenantForeignKey links found)")
    holder, fk, target = candidates[0]
    return getattr(holder, fk.name) == target.id


# -- helpers ------------------------------------------------------------------------------


def _tenant_model(source: Any) -> Any:
    model = source.model if isinstance(source, peewee.ModelAlias) else source
    return model if isinstance(model, type) and issubclass(model, TenantModel) else None


def _plain_reads(model: Any) -> bool:
    """Whether ``model`` reads as :class:`TenantModel` does (no ``select``/``get`` of its
    own, an ``id`` column, tenantdb's database): its get-by-id may skip building SQL."""
    return ("id" in model._meta.fields and model._meta.database is database
            and model.select.__func__ is _TENANT_SELECT and model.get.__func__ is _TENANT_GET)


def _id_field(model: Any) -> Any:
    field = model._meta.fields.get("id")
    if field is None:
        raise TypeError(f"{model.__name__} has no id column; use its key fields with org_id=...")
    return field


def _pk_fields(model: Any) -> list[Any]:
    pk = model._meta.primary_key
    if isinstance(pk, peewee.CompositeKey):
        return [model._meta.fields[name] for name in pk.field_names]
    return [pk]


def _non_pk_fields(model: Any) -> list[Any]:
    keys = {f.name for f in _pk_fields(model)}
    return [f for f in model._meta.sorted_fields if f.name not in keys]


def _name(field: Any) -> str | None:
    if isinstance(field, str):
        return field
    return getattr(field, "name", None)


def _field_names(data: Any) -> dict[Any, Any]:
    return {_name(k): v for k, v in data.items()} if isinstance(data, dict) else {}


def _row_in_org(model: Any, row: Any, names: list[str], scope: uuid.UUID | None
                ) -> tuple[Any, uuid.UUID]:
    where = f"{model.__name__}.insert_many()"
    if isinstance(row, dict):
        named = _field_names(row)
        if named.get(ORG_COLUMN) is None:
            return {**row, ORG_COLUMN: require_org(scope, where)}, require_org(scope, where)
        org = require_org(named[ORG_COLUMN], where)
    elif ORG_COLUMN in names:
        org = require_org(row[names.index(ORG_COLUMN)], where)
    else:
        raise MissingOrgError(f"{where}: rows given as tuples must include org_id in fields")
    if scope is not None and org != scope:
        raise CrossOrgError(f"{where}: a row of org {org} in a write to org {scope}")
    return row, org


def _same_org(a: Any, b: Any) -> bool:
    try:
        return uuid.UUID(str(a)) == uuid.UUID(str(b))
    except ValueError:
        return bool(a == b)


# The functions behind TenantModel's classmethods, to tell a model that overrides them.
_TENANT_SELECT = vars(TenantModel)["select"].__func__
_TENANT_GET = vars(TenantModel)["get"].__func__
