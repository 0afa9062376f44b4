"""The checklist's scoped helpers and TenantRepository."""

from __future__ import annotations

import uuid

import pytest
from helpers import StatementLog
from tenancy_fixtures import TwoOrgs

from tenantdb.context import require_org
from tenantdb.errors import CrossOrgError, MissingOrgError
from tenantdb.models import Destination, Org
from tenantdb.repository import (
    TenantRepository,
    scoped_count,
    scoped_get,
    scoped_list,
    scoped_query,
)


@pytest.fixture
def orgs(two_orgs: TwoOrgs) -> TwoOrgs:
    for org in (two_orgs.a, two_orgs.b):
        for name in ("Lisbon", "Porto", "Faro"):
            Destination.create(org_id=org, name=name, country="PT")
    Destination.create(org_id=two_orgs.b, name="Kyoto", country="JP")
    return two_orgs


def test_scoped_helpers_return_only_own_org(orgs: TwoOrgs) -> None:
    assert {d.org_id for d in scoped_query(Destination, orgs.a)} == {orgs.a}
    assert scoped_count(Destination, orgs.a) == 3
    assert scoped_count(Destination, orgs.b) == 4
    assert scoped_count(Destination, orgs.a, country="JP") == 0
    hit = scoped_get(Destination, orgs.a, name="Porto")
    assert hit is not None and hit.org_id == orgs.a
    assert scoped_get(Destination, orgs.a, name="Kyoto") is None


def test_cross_org_audit_selects_zero_rows(orgs: TwoOrgs) -> None:
    b_ids = [d.id for d in scoped_query(Destination, orgs.b)]
    assert scoped_query(Destination, orgs.a).where(Destination.id.in_(b_ids)).count() == 0


def test_scoped_list_pages(orgs: TwoOrgs) -> None:
    first = scoped_list(Destination, orgs.b, limit=2)
    rest = scoped_list(Destination, orgs.b, limit=2, offset=2)
    assert len(first) == 2 and len(rest) == 2
    assert {d.id for d in first}.isdisjoint({d.id for d in rest})
    assert all(d.org_id == orgs.b for d in first + rest)


@pytest.mark.parametrize(("limit", "offset"), [(0, 0), (1001, 0), (10, -1), (True, 0)])
def test_scoped_list_rejects_bad_pages(orgs: TwoOrgs, limit: int, offset: int) -> None:
    with pytest.raises(ValueError, match=r"limit|offset"):
        scoped_list(Destination, orgs.a, limit=limit, offset=offset)


def test_unknown_filter_names_model_and_field(orgs: TwoOrgs) -> None:
    with pytest.raises(ValueError, match="Destination has no field 'colour'"):
        scoped_query(Destination, orgs.a, colour="red")


def test_model_without_org_id_is_a_type_error(orgs: TwoOrgs) -> None:
    with pytest.raises(TypeError, match="Org is not a tenant model"):
        scoped_query(Org, orgs.a)  # type: ignore[type-var]
    with pytest.raises(TypeError):
        TenantRepository(Org, orgs.a)  # type: ignore[type-var]


@pytest.mark.parametrize("bad", [None, "", 0, "nope"])
def test_helpers_refuse_a_missing_org(orgs: TwoOrgs, bad: object) -> None:
    with pytest.raises(MissingOrgError):
        scoped_query(Destination, bad)  # type: ignore[arg-type]
    with pytest.raises(MissingOrgError):
        TenantRepository(Destination, bad)  # type: ignore[arg-type]


def test_repository_crud_stays_in_its_org(orgs: TwoOrgs) -> None:
    repo = TenantRepository(Destination, orgs.a)
    made = repo.create(name="Braga")
    assert made.org_id == orgs.a and repo.count() == 4
    assert repo.update({"country": "XX"}, name="Lisbon") == 1
    assert scoped_get(Destination, orgs.b, name="Lisbon").country == "PT"  # type: ignore[union-attr]
    assert repo.delete(name="Porto") == 1
    assert scoped_count(Destination, orgs.b, name="Porto") == 1
    assert [d.name for d in repo.list(limit=10) if d.name == "Braga"] == ["Braga"]
    assert repo.get(name="Kyoto") is None


def test_repository_refuses_writes_to_another_org(orgs: TwoOrgs) -> None:
    repo = TenantRepository(Destination, orgs.a)
    with pytest.raises(CrossOrgError):
        repo.create(org_id=orgs.b, name="Sneaky")
    with pytest.raises(CrossOrgError):
        repo.update({"org_id": orgs.b}, name="Lisbon")
    assert scoped_count(Destination, orgs.b) == 4
    assert repo.create(org_id=str(orgs.a), name="Explicit").org_id == orgs.a
    with pytest.raises(ValueError, match="no field 'colour'"):
        repo.create(colour="red")


def test_repository_org_is_checked_once(orgs: TwoOrgs, monkeypatch: pytest.MonkeyPatch,
                                        sql_log: StatementLog) -> None:
    seen: list[object] = []

    def spy(org_id: object, where: str) -> uuid.UUID:
        seen.append(org_id)
        return require_org(org_id, where)

    monkeypatch.setattr("tenantdb.repository.require_org", spy)
    repo = TenantRepository(Destination, str(orgs.a))
    assert repo.org_id == orgs.a and isinstance(repo.org_id, uuid.UUID)
    assert sql_log.statements == []  # checked without a round trip
    repo.count()
    repo.list(name="Porto")
    repo.get(name="Faro")
    repo.create(name="Braga")
    repo.update({"country": "pt"}, name="Braga")
    repo.delete(name="Braga")
    # The text form was parsed once, at construction; every method reused that UUID.
    assert [org for org in seen if not isinstance(org, uuid.UUID)] == [str(orgs.a)]
    assert all(org is repo.org_id for org in seen[1:])
