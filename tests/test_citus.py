"""Citus: distribution by migrate, check, scoping on the workers, cross_org, knowledge sizes.

These run with ``pytest --citus`` (``make test-citus``) on a coordinator and two workers.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import psycopg2
import pytest
from helpers import PYTHON, cli_env

from tenantdb import citus, knowledge, migrate
from tenantdb.check import check_schema
from tenantdb.context import cross_org
from tenantdb.db import APP_ROLE, TenantDatabase
from tenantdb.knowledge import search_knowledge
from tenantdb.models import AgentRun, Destination, Embedding, Itinerary, User
from tenantdb.orgs import create_org
from tenantdb.pytest_plugin import TestDatabase
from tenantdb.scoping import scope_statements
from tenantdb.tenancy import execute_scoped

pytestmark = pytest.mark.citus

TENANT_TABLES = {"app_user", "refresh_token", "destination", "knowledge_item", "embedding",
                 "agent_run", "itinerary", "idempotency_key"}


def owner(url: str) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    return conn


@pytest.fixture
def fresh_database(tenantdb_database: TestDatabase) -> Iterator[str]:
    """A new database on every node of the cluster, not yet migrated."""
    server = tenantdb_database.url.rsplit("/", 1)[0] + "/postgres"
    name = "tenantdb_citus_" + uuid.uuid4().hex[:10]
    citus.create_database(server, name)
    try:
        yield tenantdb_database.url.rsplit("/", 1)[0] + "/" + name
    finally:
        citus.drop_database(server, name)


def test_the_session_database_is_a_distributed_coordinator(
        tenantdb_database: TestDatabase) -> None:
    conn = owner(tenantdb_database.url)
    try:
        assert citus.is_coordinator(conn)
        with conn.cursor() as cur:
            cur.execute("SELECT logicalrelid::text, partmethod, repmodel, colocationid, "
                        "column_to_column_name(logicalrelid, partkey) FROM pg_dist_partition")
            rows = {r[0]: r[1:] for r in cur.fetchall()}
            cur.execute("SELECT count(*) FROM pg_dist_node WHERE groupid <> 0")
            assert cur.fetchone() == (2,)
    finally:
        conn.close()
    assert rows["org"][:2] == ("n", "t")  # a reference table
    assert {t for t, r in rows.items() if r[0] == "h" and r[3] == "org_id"} == TENANT_TABLES
    assert len({rows[t][2] for t in TENANT_TABLES}) == 1  # one colocation group


def test_migrate_distributes_and_is_idempotent(fresh_database: str) -> None:
    applied = migrate.migrate(fresh_database)
    assert applied[0].startswith("V01_01")
    assert check_schema(fresh_database) == []
    assert migrate.migrate(fresh_database) == []  # the second run changes nothing
    conn = owner(fresh_database)
    try:
        assert citus.distribute(conn) == []
        with conn.cursor() as cur:
            # The storage setting was made before distribution and reached the shards.
            cur.execute("SELECT DISTINCT result FROM run_command_on_shards('embedding', "
                        "$$SELECT attstorage FROM pg_attribute WHERE attrelid = '%s'::regclass"
                        " AND attname = 'vector'$$)")
            assert cur.fetchall() == [("p",)]
    finally:
        conn.close()


def test_concurrent_migrate_runs_distribute_once(fresh_database: str) -> None:
    env = cli_env(TENANTDB_DATABASE_URL=fresh_database)
    procs = [subprocess.Popen([PYTHON, "-m", "tenantdb", "migrate"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert check_schema(fresh_database) == []


def test_check_reports_undistributed_tables_and_migrate_redistributes(
        fresh_database: str) -> None:
    migrate.migrate(fresh_database)
    conn = owner(fresh_database)
    try:
        with conn.cursor() as cur:
            # Every table linked by a foreign key goes back to the coordinator.
            cur.execute("SELECT undistribute_table('refresh_token', "
                        "cascade_via_foreign_keys => true)")
    finally:
        conn.close()
    problems = {v.where: v.problem for v in check_schema(fresh_database)}
    assert set(problems) == TENANT_TABLES | {"org"}
    assert problems["org"].startswith("is not a reference table")
    migrate.migrate(fresh_database)  # restartable: the next run distributes them again
    assert check_schema(fresh_database) == []


def test_a_table_distributed_by_another_column_is_refused_not_rewritten(
        fresh_database: str) -> None:
    conn = owner(fresh_database)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE note (org_id uuid NOT NULL, id uuid NOT NULL, "
                        "PRIMARY KEY (org_id, id))")
            cur.execute("SELECT create_distributed_table('note', 'id')")
    finally:
        conn.close()
    from tenantdb.errors import MigrationError
    with pytest.raises(MigrationError, match="note: is distributed by id"):
        migrate.migrate(fresh_database)


def test_scoped_statements_reach_the_workers(
        tenantdb_committed: TenantDatabase, tenantdb_database: TestDatabase) -> None:
    a = create_org("A", f"a-{uuid.uuid4().hex[:8]}").id
    b = create_org("B", f"b-{uuid.uuid4().hex[:8]}").id
    for org in (a, b):
        Destination.create(org_id=org, name="Lisbon")
    # The setting each worker's policy reads is the statement's org, in and out of a
    # transaction, and a later org in the same transaction replaces it.
    query = "SELECT current_setting('tenantdb.org_id') FROM destination WHERE org_id = %s"
    assert execute_scoped(a, query, (a,)).fetchall() == [(str(a),)]
    with tenantdb_committed.atomic():
        assert execute_scoped(a, query, (a,)).fetchall() == [(str(a),)]
        assert execute_scoped(b, query, (b,)).fetchall() == [(str(b),)]
        # No predicate: a multi-shard scan, each worker's policy keeps only b's row.
        assert execute_scoped(b, "SELECT org_id FROM destination").fetchall() == [(b,)]
    assert [d.org_id for d in Destination.select(org_id=a)] == [a]


def test_a_failing_scoped_statement_leaves_no_transaction_open(
        tenantdb_committed: TenantDatabase) -> None:
    a = create_org("A", f"a-{uuid.uuid4().hex[:8]}").id
    with pytest.raises(Exception, match="division by zero"):
        execute_scoped(a, "SELECT 1 / 0 FROM destination WHERE org_id = %s", (a,))
    conn = tenantdb_committed.connection()
    assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    assert Destination.select(org_id=a).count() == 0


def test_raw_sql_as_app_role_is_held_by_the_workers_policies(
        tenantdb_committed: TenantDatabase, tenantdb_database: TestDatabase) -> None:
    a = create_org("A", f"a-{uuid.uuid4().hex[:8]}").id
    b = create_org("B", f"b-{uuid.uuid4().hex[:8]}").id
    for org in (a, b):
        Destination.create(org_id=org, name="Lisbon")
    conn = psycopg2.connect(tenantdb_database.url, options=f"-c role={APP_ROLE}")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            with pytest.raises(psycopg2.Error, match=r"tenantdb\.org_id"):
                cur.execute("SELECT count(*) FROM destination")
            # set_config stays on the coordinator: the workers still fail closed.
            with pytest.raises(psycopg2.Error):
                cur.execute("BEGIN; SELECT set_config('tenantdb.org_id', %s, true); "
                            "SELECT count(*) FROM destination", (str(a),))
            cur.execute("ROLLBACK")
            cur.execute("BEGIN; SET LOCAL citus.propagate_set_commands = 'local'; "
                        "SET LOCAL tenantdb.org_id = %s", (str(a),))
            cur.execute("SELECT org_id::text FROM destination")
            assert cur.fetchall() == [(str(a),)]
            cur.execute("UPDATE destination SET name = 'x' WHERE org_id = %s", (str(b),))
            assert cur.rowcount == 0
            with pytest.raises(psycopg2.Error, match="row-level security"):
                cur.execute("INSERT INTO destination (org_id, name) VALUES (%s, 'y')",
                            (str(b),))
            cur.execute("ROLLBACK")
    finally:
        conn.close()


def test_cross_org_opens_worker_connections_as_the_admin_role(
        tenantdb_committed: TenantDatabase) -> None:
    orgs = [create_org(f"O{i}", f"o{i}-{uuid.uuid4().hex[:8]}").id for i in range(4)]
    for org in orgs:
        Destination.create(org_id=org, name="Lisbon")
    with cross_org(reason="test: count across orgs"):
        assert Destination.select().where(Destination.org_id.in_(orgs)).count() == 4


def test_purge_of_runs_unlinks_itineraries_org_by_org(
        tenantdb_committed: TenantDatabase) -> None:
    from datetime import datetime, timedelta, timezone

    from tenantdb.retention import purge
    old = datetime.now(timezone.utc) - timedelta(days=400)
    orgs = [create_org(f"O{i}", f"p{i}-{uuid.uuid4().hex[:8]}").id for i in range(3)]
    for org in orgs:
        user = User.create(org_id=org, email="u@example.com")
        for _ in range(3):
            run = AgentRun.create(org_id=org, user_id=user.id, created_at=old)
            Itinerary.create(org_id=org, user_id=user.id, agent_run_id=run.id, title="t")
    assert purge("agent_runs", batch_size=2, all_orgs=True) == 9
    with cross_org(reason="test: check"):
        assert AgentRun.select().where(AgentRun.org_id.in_(orgs)).count() == 0
        links = Itinerary.select(Itinerary.agent_run_id).where(Itinerary.org_id.in_(orgs))
        assert [i.agent_run_id for i in links] == [None] * 9


def test_knowledge_sizes_from_shards_and_ef_search_on_workers(
        tenantdb_committed: TenantDatabase, tenantdb_database: TestDatabase,
        monkeypatch: pytest.MonkeyPatch) -> None:
    org = create_org("K", f"k-{uuid.uuid4().hex[:8]}").id
    from tenantdb.models import KnowledgeItem
    item = KnowledgeItem.create(org_id=org, title="t", content="c")
    Embedding.insert_many([{"org_id": org, "knowledge_item_id": item.id, "chunk_index": i,
                            "content": str(i), "vector": [1.0, float(i)] + [0.0] * 1534,
                            "model": "test"} for i in range(30)], org_id=org).execute()
    conn = owner(tenantdb_database.url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT run_command_on_shards('embedding', 'ANALYZE %s')")
            assert citus.table_rows(cur, "embedding") == 30
            cur.execute("SELECT reltuples FROM pg_class WHERE oid = 'embedding'::regclass")
            assert cur.fetchone()[0] <= 0  # what the coordinator alone would have said
    finally:
        conn.close()
    citus.forget_engines()
    hits = search_knowledge(org, [1.0] + [0.0] * 1535, k=7)
    assert len(hits) == 7
    # The size that picks the strategy is the shards' (30), not the coordinator's (<= 0):
    # counted up to one past floor(sqrt(30) * 0.5) = 2.
    assert knowledge._count_org_rows(org, None, (0, 0.0, 0.5)) == (3, 30.0)
    # The quantized search (V01_09's column, on the shards) runs as one router statement.
    # These vectors' bits are all alike: the margin check hands over to the exact scan.
    monkeypatch.setattr(knowledge, "QUANTIZED_MIN_CANDIDATES", 5)
    monkeypatch.setattr(knowledge, "QUANTIZED_CANDIDATES_PER_K", 0)
    assert knowledge._has_quantized_vectors()
    query = [1.0, 3.0] + [0.0] * 1534
    vector, bits = knowledge._query_literals(query, "q")
    quantized = knowledge._quantized_search(org, vector, bits, 5, None)
    exact = knowledge._exact_search(org, vector, 5, None)
    assert [h.embedding.id for h in quantized] == [h.embedding.id for h in exact]
    assert [h.embedding.content for h in search_knowledge(org, query, k=5)] == [
        h.embedding.content for h in exact]
    # An org too large for an exact scan goes through the index on the workers, with its
    # settings propagated, and still gets exactly k hits.
    monkeypatch.setattr(knowledge, "_has_quantized_vectors", lambda: False)
    monkeypatch.setattr(knowledge, "EXACT_SCAN_MIN_ROWS", 0)
    monkeypatch.setattr(knowledge, "EXACT_SCAN_ROWS_PER_SQRT", 0.5)
    knowledge._forget_sizes(org)
    assert knowledge._org_size(org, None, rule="iterative").rows is None
    assert len(search_knowledge(org, [1.0] + [0.0] * 1535, k=7)) == 7
    plan = scope_statements(org, {"hnsw.ef_search": "400"}, citus=True, in_transaction=False)
    assert plan.setup is not None and "SET LOCAL hnsw.ef_search" in plan.setup
