"""Property: any composition of where / join / subquery / order / limit / aggregate run as
org A yields no row of org B, and refuses unscoped shapes only with a TenancyError."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peewee import JOIN, fn
from tenancy_fixtures import TwoOrgs

from tenantdb.db import TenantDatabase
from tenantdb.errors import TenancyError
from tenantdb.models import (
    AgentRun,
    Destination,
    Embedding,
    IdempotencyKey,
    Itinerary,
    KnowledgeItem,
    RefreshToken,
    User,
)

MODELS = [User, RefreshToken, Destination, KnowledgeItem, Embedding, AgentRun, Itinerary,
          IdempotencyKey]
# Join conditions between tables; the last entries match across orgs unless the org is added.
JOIN_ON = {
    (Itinerary, User): lambda m, j: m.user_id == j.id,
    (Itinerary, Destination): lambda m, j: m.destination_id == j.id,
    (KnowledgeItem, Destination): lambda m, j: m.destination_id == j.id,
    (Embedding, KnowledgeItem): lambda m, j: m.knowledge_item_id == j.id,
    (AgentRun, User): lambda m, j: m.user_id == j.id,
    (IdempotencyKey, User): lambda m, j: m.user_id == j.id,
}


@dataclass(frozen=True)
class Step:
    kind: str
    model: Any = None
    join_type: str = JOIN.INNER
    number: int = 1


steps = st.one_of(
    st.builds(Step, st.just("join"), st.sampled_from(MODELS),
              st.sampled_from([JOIN.INNER, JOIN.LEFT_OUTER, JOIN.RIGHT_OUTER, JOIN.FULL_OUTER])),
    st.builds(Step, st.sampled_from(["subquery", "subquery_alias", "subquery_other_org",
                                     "exists", "order", "where", "orwhere", "alias_join"]),
              st.sampled_from(MODELS)),
    st.builds(Step, st.just("limit"), number=st.integers(0, 3)),
)


def build(base: Any, plan: list[Step], twins: TwoOrgs, aggregate: bool) -> Any:
    joined = [base]
    query = base.select(base.org_id, org_id=twins.a)
    for step in plan:
        query = apply(query, step, joined, twins)
    columns = [m.org_id for m in joined]
    if aggregate:
        return query.select(base.org_id, fn.COUNT(base.org_id)).group_by(base.org_id).tuples()
    return query.select(*columns).tuples()


def apply(query: Any, step: Step, joined: list[Any], twins: TwoOrgs) -> Any:
    base, model = joined[0], step.model
    if step.kind == "join":
        if model in joined:
            return query
        on = JOIN_ON.get((base, model)) or JOIN_ON.get((model, base))
        # PostgreSQL runs a FULL join only on equality conditions.
        inequality = "created_at" in base._meta.fields and step.join_type != JOIN.FULL_OUTER
        condition = (on(base, model) if (base, model) in JOIN_ON else on(model, base)) if on \
            else (model.created_at <= base.created_at if inequality
                  else model.org_id == base.org_id if step.join_type == JOIN.FULL_OUTER
                  else model.org_id == model.org_id)
        joined.append(model)
        return query.join_from(base, model, step.join_type, on=condition)
    if step.kind == "alias_join":
        alias = model.alias()
        return query.join_from(base, alias, on=(alias.org_id == base.org_id))
    if step.kind == "subquery":
        return query.where(base.org_id.in_(model.select(model.org_id, org_id=twins.a)))
    if step.kind == "subquery_alias":
        alias = model.alias()
        return query.where(base.org_id.in_(alias.select(alias.org_id)))
    if step.kind == "subquery_other_org":
        return query.where(base.org_id.in_(model.select(model.org_id, org_id=twins.b)))
    if step.kind == "exists":
        alias = model.alias()
        inner = alias.select(alias.org_id).where(alias.org_id == base.org_id)
        return query.where(fn.EXISTS(inner))
    if step.kind == "order":
        return query.order_by(base.org_id.desc())
    if step.kind == "where":
        return query.where(base.org_id.is_null(False))
    if step.kind == "orwhere":
        return query.orwhere(base.org_id.is_null(False))
    return query.limit(step.number)



@pytest.fixture(params=["with row-level security", "python layers alone"])
def layers(request: pytest.FixtureRequest, tenant_db: TenantDatabase,
           monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each composition twice: as the application role, and as the superuser login
    (row-level security off), so the verifier and the rewrites are tested on their own."""
    if request.param == "python layers alone":
        (login, superuser) = tenant_db.execute_sql(
            "SELECT session_user, rolsuper FROM pg_roles WHERE rolname = session_user"
        ).fetchone()
        if not superuser:
            pytest.skip("needs a superuser login to switch row-level security off")
        monkeypatch.setattr("tenantdb.db.APP_ROLE", login)
    return str(request.param)


#: Examples that must actually run (not be refused) per layer, of MAX_EXAMPLES, and of
#: those, how many must return org A's rows: a verifier that refused everything, or a query
#: layer that returned nothing, would pass the property, so the property asserts this too.
MAX_EXAMPLES = 150
MIN_RAN = 60
MIN_WITH_ROWS = 30


def test_compositions_never_yield_another_orgs_rows(
    twins: TwoOrgs, tenant_db: TenantDatabase, layers: str,
) -> None:
    counts = {"ran": 0, "refused": 0, "with_rows": 0}

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(base=st.sampled_from(MODELS), plan=st.lists(steps, max_size=5),
           aggregate=st.booleans())
    def composition(base: Any, plan: list[Step], aggregate: bool) -> None:
        try:
            with tenant_db.atomic():  # a savepoint: a refused or failed query leaves no trace
                rows = list(build(base, plan, twins, aggregate))
        except TenancyError:
            counts["refused"] += 1
            return
        counts["ran"] += 1
        orgs = {value for row in rows for value in (row[:1] if aggregate else row)
                if value is not None}
        assert orgs <= {twins.a}, f"rows of another org: {orgs - {twins.a}}"
        assert all(isinstance(org, uuid.UUID) for org in orgs)
        counts["with_rows"] += twins.a in orgs

    composition()
    assert counts["ran"] >= MIN_RAN, f"only {counts} of the examples ran"
    assert counts["with_rows"] >= MIN_WITH_ROWS, f"only {counts} of the examples read rows"
