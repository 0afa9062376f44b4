"""Per-org top-10 search: tenantdb's search_knowledge vs naive filtered HNSW vs exact scan.

A clustered synthetic set of 1536-dim unit vectors (200 gaussian clusters, spread mostly in
a 64-dim subspace) is spread over orgs of skewed sizes, from 0.1 % to 50 % of the table
(plus tiny orgs of 5 and 10 rows, and filler orgs). Org membership is independent of
content: the worst case for filtering after an approximate scan. Rows are loaded with binary
COPY as the owner, the HNSW index is built afterwards (as the migration defines it), and
for every org size each strategy answers the same queries:

- tenantdb: ``search_knowledge(org, q, 10)`` as the application role (row-level security
  on), counting and strategy choice included;
- naive: ``WHERE org_id = ... ORDER BY vector <=> q LIMIT 10`` with the default
  ``hnsw.ef_search`` (40), what an ORM query runs;
- exact: the org's rows ranked exactly (``ORDER BY (vector <=> q) + 0``).

Recall@10 is measured against numpy brute force over the org's rows; latency is one round
trip (or two, for tenantdb) from Python, p50/p95 over the queries. The strategies take turns
query by query, so machine noise hits them alike.

    python bench/knowledge.py [--rows 100000] [--queries 40] [--keep]

Uses TENANTDB_DATABASE_URL's server if set (a scratch database is created and dropped),
else an embedded server in a temporary folder (shared_buffers raised to 2GB).
"""

from __future__ import annotations

import argparse
import io
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg2
from _scratch import scratch_database

from tenantdb import db, migrate
from tenantdb.knowledge import search_knowledge

DIM = 1536
K = 10
SUBSPACE = 64
CLUSTERS = 200
CHUNKS_PER_ITEM = 8
# Named org sizes as fractions of the table; tiny orgs check the count when n < k, n == k.
FRACTIONS = {"0.1%": 0.001, "0.5%": 0.005, "1%": 0.01, "2%": 0.02, "5%": 0.05, "6%": 0.06,
             "10%": 0.10, "25%": 0.25, "50%": 0.50}
TINY = {"5 rows": 5, "10 rows": 10}
FILLER_ORGS = 30

NAIVE_SQL = ("SELECT id FROM embedding WHERE org_id = %s ORDER BY vector <=> %s::vector "
             "LIMIT %s")
EXACT_SQL = ("SELECT id, (vector <=> %s::vector) + 0 AS d FROM embedding WHERE org_id = %s "
             "ORDER BY d LIMIT %s")
COPY_EMBEDDING_SQL = ("COPY embedding (org_id, id, knowledge_item_id, chunk_index, content, "
                      "vector, model) FROM STDIN (FORMAT binary)")
COPY_ITEM_SQL = "COPY knowledge_item (org_id, id, title, content) FROM STDIN"
HNSW_INDEX_SQL = ("CREATE INDEX embedding_vector_hnsw_idx ON embedding "
                  "USING hnsw (vector vector_cosine_ops)")


@dataclass(frozen=True)
class DataSet:
    vectors: np.ndarray
    org_of_row: np.ndarray
    org_names: list[str]
    org_ids: list[uuid.UUID]
    row_ids: list[uuid.UUID]
    queries: dict[str, np.ndarray]


@dataclass(frozen=True)
class Cell:
    strategy: str
    org: str
    rows: int
    recall_mean: float
    recall_min: float
    p50_ms: float
    p95_ms: float
    short: int


# -- data ----------------------------------------------------------------------------------


def make_data(rows: int, queries: int, seed: int = 20240601) -> DataSet:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = np.linalg.qr(rng.standard_normal((DIM, SUBSPACE)))[0].astype(np.float32)

    def sample(r: np.random.Generator, n: int) -> np.ndarray:
        x = centres[r.integers(0, CLUSTERS, n)]
        x = x + (r.standard_normal((n, SUBSPACE)).astype(np.float32) * 0.12) @ basis.T
        x += r.standard_normal((n, DIM)).astype(np.float32) * 0.006
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    sizes = {name: max(1, round(f * rows)) for name, f in FRACTIONS.items()} | TINY
    rest = rows - sum(sizes.values())
    if rest < FILLER_ORGS:
        raise SystemExit("--rows too small for the org sizes")
    weights = 0.9 ** np.arange(FILLER_ORGS)
    filler = np.floor(weights / weights.sum() * rest).astype(int)
    filler[0] += rest - filler.sum()
    sizes |= {f"filler{i}": int(n) for i, n in enumerate(filler)}
    names = list(sizes)
    org_of_row = np.repeat(np.arange(len(names)), [sizes[n] for n in names])
    rng.shuffle(org_of_row)
    query_rng = np.random.default_rng(seed + 1)
    return DataSet(
        vectors=sample(rng, rows), org_of_row=org_of_row, org_names=names,
        org_ids=[uuid.uuid4() for _ in names], row_ids=[uuid.uuid4() for _ in range(rows)],
        queries={name: sample(query_rng, queries) for name in [*FRACTIONS, *TINY]},
    )


def load(url: str, data: DataSet) -> None:
    """COPY orgs, items and embeddings as the owner, then build the HNSW index."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    cur = conn.cursor()
    # Building the graph once after the load is far faster than growing it row by row.
    cur.execute("DROP INDEX IF EXISTS embedding_vector_hnsw_idx")
    cur.executemany("INSERT INTO org (id, name, slug) VALUES (%s, %s, %s)",
                    [(str(o), n, f"org-{i}") for i, (o, n)
                     in enumerate(zip(data.org_ids, data.org_names, strict=True))])
    items = _item_ids(data)
    start = time.perf_counter()
    buf = io.StringIO()
    for org_index, item in sorted({(org_index, item) for org_index, item, _ in items}):
        buf.write(f"{data.org_ids[org_index]}\t{item}\tItem {item}\tsynthetic\n")
    buf.seek(0)
    cur.copy_expert(COPY_ITEM_SQL, buf)
    for begin in range(0, len(data.row_ids), 10_000):
        cur.copy_expert(COPY_EMBEDDING_SQL, _copy_chunk(data, items, begin, 10_000))
    print(f"COPY {len(data.row_ids)} embeddings: {time.perf_counter() - start:.1f} s", flush=True)
    cur.execute("VACUUM ANALYZE embedding")
    cur.execute("VACUUM ANALYZE knowledge_item")
    cur.execute("SET maintenance_work_mem = '4GB'; SET max_parallel_maintenance_workers = 1")
    start = time.perf_counter()
    cur.execute(HNSW_INDEX_SQL)
    print(f"HNSW build (m=16, ef_construction=64): {time.perf_counter() - start:.1f} s",
          flush=True)
    cur.execute("VACUUM ANALYZE embedding")
    cur.execute("SELECT pg_size_pretty(pg_table_size('embedding')), "
                "pg_size_pretty(pg_relation_size('embedding_vector_hnsw_idx'))")
    print("table, HNSW index size:", cur.fetchone(), flush=True)
    conn.close()


def _item_ids(data: DataSet) -> list[tuple[int, uuid.UUID, int]]:
    """(org index, item id, chunk index) per row: an org's chunks, in groups, share an item."""
    seen: dict[int, int] = {}
    item_of: dict[tuple[int, int], uuid.UUID] = {}
    out = []
    for org_index in data.org_of_row.tolist():
        n = seen.get(org_index, 0)
        seen[org_index] = n + 1
        key = (org_index, n // CHUNKS_PER_ITEM)
        out.append((org_index, item_of.setdefault(key, uuid.uuid4()), n % CHUNKS_PER_ITEM))
    return out


def _copy_chunk(data: DataSet, items: list[tuple[int, uuid.UUID, int]], begin: int,
                size: int) -> io.BytesIO:
    buf = io.BytesIO()
    buf.write(b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0))
    vector_header = struct.pack("!ihh", 4 + 4 * DIM, DIM, 0)
    model = b"bench-synthetic"
    block = data.vectors[begin:begin + size].astype(">f4")
    for offset, vector in enumerate(block):
        row = begin + offset
        org_index, item, chunk_index = items[row]
        content = f"chunk {row} ".encode() + b"lorem ipsum dolor sit amet " * 14
        buf.write(struct.pack("!h", 7))
        for value in (data.org_ids[org_index].bytes, data.row_ids[row].bytes, item.bytes):
            buf.write(struct.pack("!i", 16) + value)
        buf.write(struct.pack("!ii", 4, chunk_index))
        buf.write(struct.pack("!i", len(content)) + content)
        buf.write(vector_header + vector.tobytes())
        buf.write(struct.pack("!i", len(model)) + model)
    buf.write(b"\xff\xff")
    buf.seek(0)
    return buf


# -- measurement ---------------------------------------------------------------------------


def measure(url: str, data: DataSet) -> list[Cell]:
    db.connect(db.with_login(url, db.APP_ROLE), admin_url=url)  # the application login: RLS on
    raw = psycopg2.connect(url)  # naive and exact: the owner, plain psycopg2
    raw.autocommit = True
    cur = raw.cursor()
    position = {row_id: i for i, row_id in enumerate(data.row_ids)}

    def naive(org: uuid.UUID, q: np.ndarray) -> list[uuid.UUID]:
        cur.execute(NAIVE_SQL, (str(org), _literal(q), K))
        return [uuid.UUID(str(r[0])) for r in cur.fetchall()]

    def exact(org: uuid.UUID, q: np.ndarray) -> list[uuid.UUID]:
        cur.execute(EXACT_SQL, (_literal(q), str(org), K))
        return [uuid.UUID(str(r[0])) for r in cur.fetchall()]

    def tenantdb(org: uuid.UUID, q: np.ndarray) -> list[uuid.UUID]:
        return [hit.embedding.id for hit in search_knowledge(org, q, K)]

    strategies: dict[str, Callable[[uuid.UUID, np.ndarray], list[uuid.UUID]]] = {
        "tenantdb": tenantdb, "naive HNSW": naive, "exact scan": exact}
    cells = []
    for name in [*TINY, *FRACTIONS]:
        org_index = data.org_names.index(name)
        org = data.org_ids[org_index]
        rows = np.flatnonzero(data.org_of_row == org_index)
        samples: dict[str, tuple[list[float], list[float], list[int]]] = {
            s: ([], [], []) for s in strategies}
        for qi, q in enumerate(data.queries[name]):
            wanted = min(K, len(rows))
            # Ties at the k-th distance count as hits.
            cutoff = np.sort(1.0 - data.vectors[rows] @ q)[wanted - 1] + 1e-5
            order = list(strategies.items())
            for strategy, fn in order[qi % 3:] + order[:qi % 3]:
                if qi == 0:
                    fn(org, q)  # warm-up: caches, connections
                start = time.perf_counter()
                found = fn(org, q)
                elapsed = (time.perf_counter() - start) * 1000
                hits = sum(1 for rid in found if data.org_of_row[position[rid]] == org_index
                           and 1.0 - float(data.vectors[position[rid]] @ q) <= cutoff)
                recalls, latencies, shorts = samples[strategy]
                recalls.append(hits / wanted)
                latencies.append(elapsed)
                shorts.append(int(len(found) < wanted))
        for strategy, (recalls, latencies, shorts) in samples.items():
            cell = Cell(strategy, name, len(rows), float(np.mean(recalls)),
                        float(np.min(recalls)), float(np.percentile(latencies, 50)),
                        float(np.percentile(latencies, 95)), sum(shorts))
            cells.append(cell)
            print(f"{cell.strategy:<11} {cell.org:<8} rows {cell.rows:6d}  recall "
                  f"{cell.recall_mean:.3f} (min {cell.recall_min:.2f})  p50 {cell.p50_ms:7.2f} "
                  f"ms  p95 {cell.p95_ms:7.2f} ms  short {cell.short}", flush=True)
    raw.close()
    db.close()
    return cells


def print_table(cells: list[Cell], queries: int) -> None:
    orgs = list(dict.fromkeys(c.org for c in cells))
    strategies = list(dict.fromkeys(c.strategy for c in cells))
    by = {(c.strategy, c.org): c for c in cells}
    print(f"\nrecall@10 mean (min) | p50 / p95 ms | short results out of {queries} queries")
    header = "| org | rows | " + " | ".join(strategies) + " |"
    print(header)
    print("|---|---:|" + "---|" * len(strategies))
    for org in orgs:
        parts = []
        for strategy in strategies:
            c = by[(strategy, org)]
            short = f", short {c.short}" if c.short else ""
            parts.append(f"{c.recall_mean:.3f} ({c.recall_min:.1f}) | {c.p50_ms:.1f} / "
                         f"{c.p95_ms:.1f}{short}")
        print(f"| {org} | {by[(strategies[0], org)].rows} | " + " | ".join(
            p.replace(" | ", " · ") for p in parts) + " |")


def _literal(q: Any) -> str:
    return "[" + ",".join(f"{x:.9g}" for x in q) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()
    start = time.perf_counter()
    data = make_data(args.rows, args.queries)
    print(f"generated {args.rows} x {DIM} vectors: {time.perf_counter() - start:.1f} s",
          flush=True)
    # The table (~700 MB of inline vectors) and its index should fit in shared buffers, as
    # they would on a sized server.
    with scratch_database(shared_buffers="2GB", keep=args.keep) as url:
        migrate.migrate(url)
        load(url, data)
        cells = measure(url, data)
    print_table(cells, args.queries)


if __name__ == "__main__":
    main()
