"""A query carries its org in one frozen :class:`~tenantdb.context.Scope`, through clones."""

from __future__ import annotations

import uuid

import pytest

from tenantdb.context import Scope, cross_org, org_unless_cross_org, scope_of
from tenantdb.errors import MissingOrgError
from tenantdb.models import Destination, Org

ORG = uuid.uuid4()


def test_a_scoped_select_carries_its_org_and_term_through_clones() -> None:
    query = Destination.select(org_id=ORG)
    scope = scope_of(query)
    assert scope == Scope(ORG, scope.term if scope else None) and scope is not None
    assert scope.term is query._where  # the term that pins the base table
    clone = query.where(Destination.name == "Lisbon").order_by(Destination.name).limit(3)
    assert scope_of(clone) is scope
    with pytest.raises(AttributeError):
        scope.org = uuid.uuid4()  # type: ignore[misc]


def test_raw_root_and_unscoped_queries() -> None:
    assert scope_of(Destination.raw("SELECT 1", org_id=str(ORG))) == Scope(ORG)
    assert scope_of(Org.select(org_id=ORG)).org == ORG  # type: ignore[union-attr]
    with cross_org("unscoped on purpose"):
        assert scope_of(Destination.select()) is None
        assert scope_of(Destination.raw("SELECT 1")) is None


def test_org_unless_cross_org_is_the_one_preamble() -> None:
    assert org_unless_cross_org(str(ORG), "x()") == ORG
    with pytest.raises(MissingOrgError, match=r"x\(\) needs org_id"):
        org_unless_cross_org(None, "x()")
    with cross_org("admin"):
        assert org_unless_cross_org(None, "x()") is None
        assert org_unless_cross_org(ORG, "x()") == ORG
        with pytest.raises(MissingOrgError, match="not a UUID"):
            org_unless_cross_org("nope", "x()")
