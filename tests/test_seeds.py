"""Seeds: idempotent loads, all-or-nothing files, errors naming file and record."""

from __future__ import annotations

import json
import math
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers import PYTHON, cli_env

from tenantdb import migrate, seeds
from tenantdb.db import TenantDatabase
from tenantdb.embedder import Embedder, HashingEmbedder
from tenantdb.errors import SeedError
from tenantdb.models import Destination, Embedding, KnowledgeItem, Org, User
from tenantdb.pytest_plugin import TestDatabase
from tenantdb.report import org_summary
from tenantdb.seeds import DEMO_SEEDS, MAX_SEED_DEPTH, SEED_TABLES, load_seeds
from tenantdb.tenancy import cross_org

SEEDS_DIR = Path(__file__).resolve().parents[1] / "seeds"


def table_counts() -> dict[str, int]:
    with cross_org(reason="test: count rows"):
        return {name: model.select().count() for name, model in SEED_TABLES.items()}


def write(tmp_path: Path, data: Any, name: str = "bad.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def org_record() -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "name": "Seeded", "slug": f"s-{uuid.uuid4().hex[:8]}"}


def test_demo_seeds_meet_the_minimums(tenant_db: TenantDatabase) -> None:
    load_seeds(SEEDS_DIR)
    demo = next(s for s in org_summary() if s.slug == "demo-travel")
    assert demo.counts["app_user"] >= 2
    assert demo.counts["destination"] >= 3
    assert demo.counts["knowledge_item"] >= 5
    assert demo.counts["embedding"] >= 5
    assert demo.counts["agent_run"] >= 1
    assert demo.counts["itinerary"] >= 1
    assert len(org_summary()) >= 2


def test_seeds_twice_creates_nothing_the_second_time(tenant_db: TenantDatabase) -> None:
    first = load_seeds(SEEDS_DIR)
    counts = table_counts()

    second = load_seeds(SEEDS_DIR)

    assert first.created > 0 and first.present == 0
    assert second.created == 0 and second.present == first.created
    assert table_counts() == counts


def test_seed_embeddings_come_from_the_embedder(tenant_db: TenantDatabase) -> None:
    load_seeds(SEEDS_DIR)
    with cross_org(reason="test: read embeddings"):
        emb = Embedding.select().first()
    assert emb is not None
    assert emb.model == HashingEmbedder().name
    assert emb.vector == pytest.approx(HashingEmbedder().embed([emb.content])[0], abs=1e-6)


def test_seed_embedder_is_pluggable(tenant_db: TenantDatabase, tmp_path: Path) -> None:
    class Constant:
        dimensions = 1536
        name = "constant"

        def embed(self, texts: Any, /) -> list[list[float]]:
            return [[1 / math.sqrt(1536)] * 1536 for _ in texts]

    embedder: Embedder = Constant()
    load_seeds(SEEDS_DIR, embedder=embedder)
    with cross_org(reason="test: read embeddings"):
        models = {e.model for e in Embedding.select()}
    assert models == {"constant"}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(planet=[{}]), "unknown table 'planet'"),
        (lambda d: d["destination"][0].update(colour="red"),
         r"destination\[0\]: unknown field 'colour'"),
        (lambda d: d["embedding"][0].update(vector=[0.1] * 3),
         r"embedding\[0\]: vector has 3 dimensions, not 1536"),
        (lambda d: d["embedding"][0].update(vector=[0.0] * 1536),
         r"embedding\[0\]: vector is all zeros"),
        (lambda d: d["destination"][0].update(id="nope"),
         r"destination\[0\]: id must be a UUID .*'nope'"),
        (lambda d: d["destination"][0].pop("org_id"), r"destination\[0\]: 'org_id' is required"),
        (lambda d: d["destination"][0].update(name=None),
         r"destination\[0\]: name may not be null"),
        (lambda d: d["agent_run"][0].update(started_at="2026-05-01T09:00:00"),
         r"agent_run\[0\]: started_at must be an ISO 8601 time with its offset"),
        (lambda d: d["embedding"][0].update(chunk_index=2**31),
         r"embedding\[0\]: chunk_index must be an integer from -2147483648 to 2147483647"),
        (lambda d: d["embedding"][0].update(chunk_index=True),
         r"embedding\[0\]: chunk_index must be an integer .*, got True"),
        (lambda d: d["itinerary"][0].update(start_date="2026-02-30"),
         r"itinerary\[0\]: start_date must be an ISO 8601 date"),
        (lambda d: d["itinerary"][0].update(agent_run_id=str(uuid.uuid4())),
         r"itinerary\[0\] \(org_id=.*, id=.*\): .*foreign key"),
    ],
    ids=["unknown-table", "unknown-field", "vector-size", "zero-vector", "bad-uuid", "missing-key",
         "null", "naive-time", "int-range", "bool-as-int", "bad-date", "missing-reference"],
)
def test_bad_seed_file_names_file_and_record_and_writes_nothing(
    tenant_db: TenantDatabase, tmp_path: Path, mutate: Any, message: str
) -> None:
    data = json.loads((SEEDS_DIR / "demo.json").read_text())
    mutate(data)
    path = write(tmp_path, data)
    before = table_counts()

    with pytest.raises(SeedError, match=message) as raised:
        load_seeds(path)

    assert str(path) in str(raised.value)
    assert table_counts() == before


def test_malformed_json_is_a_seed_error(tenant_db: TenantDatabase, tmp_path: Path) -> None:
    path = write(tmp_path, '{"org": [')
    with pytest.raises(SeedError, match="not a readable JSON file"):
        load_seeds(path)


def test_duplicate_natural_key_rolls_back_the_file(tenant_db: TenantDatabase,
                                                   tmp_path: Path) -> None:
    org = org_record()
    rows = [{"org_id": org["id"], "id": str(uuid.uuid4()), "name": "Twice"} for _ in range(2)]
    path = write(tmp_path, {"org": [org], "destination": rows})

    with pytest.raises(SeedError, match=r"destination\[1\].*org_name_key"):
        load_seeds(path)

    assert Org.get_or_none(Org.id == org["id"]) is None


def test_good_file_before_bad_file_stays_loaded(tenant_db: TenantDatabase,
                                                tmp_path: Path) -> None:
    good = org_record()
    write(tmp_path, {"org": [good]}, "01-good.json")
    write(tmp_path, {"org": [{"id": "x"}]}, "02-bad.json")

    with pytest.raises(SeedError, match=r"02-bad\.json"):
        load_seeds(tmp_path)

    assert Org.get_or_none(Org.id == good["id"]) is not None


def test_seeded_orgs_are_isolated(tenant_db: TenantDatabase) -> None:
    load_seeds(SEEDS_DIR)
    with cross_org(reason="find the seeded orgs by slug"):
        demo = Org.get(Org.slug == "demo-travel")
        acme = Org.get(Org.slug == "acme-journeys")
    demo_names = {d.name for d in Destination.select(org_id=demo.id)}
    acme_names = {d.name for d in Destination.select(org_id=acme.id)}
    assert "Lisbon" in demo_names and "Lisbon" in acme_names
    assert {u.email for u in User.select(org_id=acme.id)} == {"cy@acme.example"}
    assert all(k.org_id == acme.id for k in KnowledgeItem.select(org_id=acme.id))


def test_hashing_embedder_is_deterministic_and_unit_length() -> None:
    embedder = HashingEmbedder()
    a, b, c = embedder.embed(["Tram 28 in Lisbon", "Tram 28 in Lisbon", "Kyoto tea"])
    assert a == b
    assert math.isclose(math.fsum(v * v for v in a), 1.0, rel_tol=1e-9)
    near = math.fsum(x * y for x, y in zip(a, embedder.embed(["Lisbon tram"])[0], strict=True))
    far = math.fsum(x * y for x, y in zip(a, c, strict=True))
    assert near > far
    assert len(embedder.embed([""])[0]) == 1536


# -- bounded, unambiguous input -----------------------------------------------------------


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "text",
    [deep(10_000),
     '{"org": ' + deep(10_000) + "}",
     json.dumps({"destination": [{"org_id": str(uuid.uuid4()), "id": str(uuid.uuid4()),
                                   "name": "Deep", "metadata": "@"}]})
     .replace('"@"', '{"a": ' * 10_000 + "1" + "}" * 10_000)],
    ids=["top-level", "table-list", "jsonb-field"],
)
def test_deep_json_is_a_seed_error_naming_the_limit(tenant_db: TenantDatabase, tmp_path: Path,
                                                    text: str) -> None:
    path = write(tmp_path, text)
    before = table_counts()
    with pytest.raises(SeedError, match=f"deeper than {MAX_SEED_DEPTH} levels.*MAX_SEED_DEPTH"):
        load_seeds(path)
    assert table_counts() == before


def test_cli_seed_of_deep_json_prints_one_line(tmp_path: Path,
                                               tenantdb_database: TestDatabase) -> None:
    path = write(tmp_path, deep(10_000))
    done = subprocess.run([PYTHON, "-m", "tenantdb", "seed", str(path)],
                          env=cli_env(TENANTDB_DATABASE_URL=tenantdb_database.url),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert f"deeper than {MAX_SEED_DEPTH} levels" in done.stderr


def test_oversized_seed_file_is_refused_before_reading(
        tenant_db: TenantDatabase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seeds, "MAX_SEED_FILE_BYTES", 100)
    path = write(tmp_path, {"org": [org_record(), org_record()]})
    with pytest.raises(SeedError, match=r"over the limit of 100 bytes.*MAX_SEED_FILE_BYTES"):
        load_seeds(path)


def test_deep_strings_do_not_count_as_nesting(tenant_db: TenantDatabase,
                                              tmp_path: Path) -> None:
    org = org_record()
    org["name"] = "[[[{{{" * 100 + '\\"'
    load_seeds(write(tmp_path, {"org": [org]}))
    assert Org.get(Org.id == org["id"]).name == org["name"]


def test_same_table_twice_is_refused(tenant_db: TenantDatabase, tmp_path: Path) -> None:
    first, second = org_record(), org_record()
    path = write(tmp_path, f'{{"org": [{json.dumps(first)}], "org": [{json.dumps(second)}]}}')
    before = table_counts()
    with pytest.raises(SeedError, match=r"bad\.json: table 'org' appears twice"):
        load_seeds(path)
    assert table_counts() == before


def test_same_field_twice_is_refused(tenant_db: TenantDatabase, tmp_path: Path) -> None:
    org = org_record()
    record = json.dumps(org)[:-1] + ', "name": "Other"}'
    path = write(tmp_path, f'{{"org": [{record}]}}')
    with pytest.raises(SeedError, match=r"bad\.json: org\[0\]: field 'name' appears twice"):
        load_seeds(path)
    assert Org.get_or_none(Org.id == org["id"]) is None


def test_same_primary_key_twice_in_a_file_is_refused(tenant_db: TenantDatabase,
                                                     tmp_path: Path) -> None:
    org = org_record()
    dest_id = str(uuid.uuid4())
    rows = [{"org_id": org["id"], "id": dest_id, "name": name} for name in ("One", "Two")]
    path = write(tmp_path, {"org": [org], "destination": rows})
    with pytest.raises(SeedError, match=rf"bad\.json: destination\[1\] \(org_id={org['id']}, "
                                        rf"id={dest_id}\): the same primary key as "
                                        rf"destination\[0\]"):
        load_seeds(path)
    assert Org.get_or_none(Org.id == org["id"]) is None


def test_seed_demo_loads_the_seeds_shipped_in_the_package(empty_database_url: str) -> None:
    migrate.migrate(empty_database_url)
    env = cli_env(TENANTDB_DATABASE_URL=empty_database_url)
    done = subprocess.run([PYTHON, "-m", "tenantdb", "seed", "--demo"], env=env, cwd="/",
                          capture_output=True, text=True, timeout=120, check=True)
    assert "embedding" in done.stdout
    assert (DEMO_SEEDS / "demo.json").read_bytes() == (SEEDS_DIR / "demo.json").read_bytes()
    assert '"demo_seeds/*.json"' in (SEEDS_DIR.parent / "pyproject.toml").read_text()
    none_here = subprocess.run([PYTHON, "-m", "tenantdb", "seed"], env=env, cwd="/",
                               capture_output=True, text=True, timeout=60, check=False)
    assert none_here.returncode == 1 and "--demo" in none_here.stderr
