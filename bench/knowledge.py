"""Per-org top-10 search: tenantdb's search_knowledge against the alternatives, side by side.

A clustered synthetic set of 1536-dim unit vectors (200 gaussian clusters, spread mostly in
a 64-dim subspace) is spread over orgs of skewed sizes, from 0.1 % to 50 % of the table
(plus tiny orgs of 5 and 10 rows, and filler orgs). Org membership is independent of
content: the worst case for filtering after an approximate scan. Rows are loaded with binary
COPY as the owner, the HNSW index is built afterwards (as the migration defines it, with
maintenance_work_mem raised and a parallel worker), and for every org size each strategy
answers the same queries:

- tenantdb: ``search_knowledge(org, q, 10)`` as the application role (row-level security
  on), strategy choice included: on pgvector >= 0.8 an exact scan for small orgs, then
  (migration V01_09) the quantized bits re-ranked exactly, an iterative HNSW scan above;
- 0.6 rule: the rule tenantdb applies on pgvector < 0.8 (exact up to 5 % of the table,
  else HNSW with ef_search 400 and the exact fallback), on the same server;
- naive HNSW: ``WHERE org_id = ... ORDER BY vector <=> q LIMIT 10`` with the server's
  defaults (ef_search 40, no iterative scan), what an ORM query runs;
- exact scan: the org's rows ranked exactly (tenantdb's exact statement, plain psycopg2).

Recall@10 is measured against numpy brute force over the org's rows (ties at the 10th
distance count); latency is measured from Python, p50/p95 over the queries. The strategies
take turns query by query in a rotating order, so machine noise hits them alike; "vs
exact" is the median of the per-query ratios tenantdb / exact scan.

    python bench/knowledge.py [--rows 100000,400000] [--queries 40] [--quick] [--keep]
    python bench/knowledge.py --rows 400000 --reuse URL   # measure a kept database again

``--quick``: 20,000 rows and 10 queries (a minute or two). Uses TENANTDB_DATABASE_URL's
server if set (a scratch database per size, dropped afterwards), else an embedded server
in a temporary folder (shared_buffers raised to hold the table and its index: 2 GB
for 100k rows, 7 GB for 400k).
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg2
from _scratch import scratch_database, scratch_server

from tenantdb import db, knowledge, migrate
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
# Row counts of the full run, and of --quick.
FULL_ROWS = (100_000, 400_000)
QUICK_ROWS = (20_000,)
QUICK_QUERIES = 10
SAMPLE_BATCH = 20_000  # rows generated at a time: 400k x 1536 at once would need ~10 GB
COPY_EMBEDDING_SQL = ("COPY embedding (org_id, id, knowledge_item_id, chunk_index, content, "
                      "vector, model) FROM STDIN (FORMAT binary)")
COPY_ITEM_SQL = "COPY knowledge_item (org_id, id, title, content) FROM STDIN"
# The HNSW index as the migrations defined it: dropped before the load, built again after.
INDEX_DEFINITION_SQL = ("SELECT indexdef FROM pg_indexes "
                        "WHERE indexname = 'embedding_vector_hnsw_idx'")


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
    table_rows: int
    strategy: str
    org: str
    rows: int
    recall_mean: float
    recall_min: float
    p50_ms: float
    p95_ms: float
    short: int
    unordered: int  # results not nearest first
    vs_exact: float  # median of per-query ratios to the exact scan


# -- data ----------------------------------------------------------------------------------


def make_data(rows: int, queries: int, seed: int = 20240601) -> DataSet:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = np.linalg.qr(rng.standard_normal((DIM, SUBSPACE)))[0].astype(np.float32)

    def sample(r: np.random.Generator, n: int) -> np.ndarray:
        out = np.empty((n, DIM), dtype=np.float32)
        for begin in range(0, n, SAMPLE_BATCH):
            m = min(SAMPLE_BATCH, n - begin)
            x = centres[r.integers(0, CLUSTERS, m)]
            x = x + (r.standard_normal((m, SUBSPACE), dtype=np.float32) * 0.12) @ basis.T
            x += r.standard_normal((m, DIM), dtype=np.float32) * 0.006
            out[begin:begin + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

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
        org_ids=_ids(seed, 0, len(names)), row_ids=_ids(seed, 1, rows),
        queries={name: sample(query_rng, queries) for name in [*FRACTIONS, *TINY]},
    )


def _ids(seed: int, stream: int, n: int) -> list[uuid.UUID]:
    """``n`` version-4 UUIDs drawn from the seed: a kept database (``--keep``) is measured
    again with ``--reuse``, which must find the same org and row ids."""
    raw = np.random.default_rng((seed, stream)).bytes(16 * n)
    return [uuid.UUID(bytes=raw[i:i + 16], version=4) for i in range(0, 16 * n, 16)]


def load(url: str, data: DataSet) -> None:
    """COPY orgs, items and embeddings as the owner, then build the HNSW index."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    cur = conn.cursor()
    # Building the graph once after the load is far faster than growing it row by row.
    cur.execute(INDEX_DEFINITION_SQL)
    index_sql = cur.fetchone()[0]
    cur.execute("DROP INDEX embedding_vector_hnsw_idx")
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
    # The graph must fit in maintenance_work_mem (about 8 KB per 1536-dim row) or the
    # build goes on row by row on disk, several times slower; one parallel worker doubles
    # the CPUs it uses on a 2-core machine.
    graph_mb = max(1024, len(data.row_ids) * 10 // 1024)
    cur.execute(f"SET maintenance_work_mem = '{graph_mb}MB'; "
                "SET max_parallel_maintenance_workers = 1")
    start = time.perf_counter()
    cur.execute(index_sql)
    print(f"HNSW build ({index_sql.split(' USING ')[1]}, maintenance_work_mem {graph_mb} MB): "
          f"{time.perf_counter() - start:.1f} s", flush=True)
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
    cur.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    print(f"pgvector {cur.fetchone()[0]}; tenantdb uses the iterative scan: "
          f"{knowledge._has_iterative_scan()}, the quantized bits: "
          f"{knowledge._has_quantized_vectors()}", flush=True)

    def naive(org: uuid.UUID, q: np.ndarray) -> list[uuid.UUID]:
        cur.execute(NAIVE_SQL, (str(org), _literal(q), K))
        return [uuid.UUID(str(r[0])) for r in cur.fetchall()]

    def exact(org: uuid.UUID, q: np.ndarray) -> list[uuid.UUID]:
        cur.execute(knowledge.EXACT_SQL, (_literal(q), str(org), K))
        return [uuid.UUID(str(r[1])) for r in cur.fetchall()]

    def tenantdb(org: uuid.UUID, q: np.ndarray) -> list[uuid.UUID]:
        return [hit.embedding.id for hit in search_knowledge(org, q, K)]

    def legacy(org: uuid.UUID, q: np.ndarray) -> list[uuid.UUID]:
        vector = knowledge._vector_literal(q, "q")
        return [hit.embedding.id for hit in knowledge._legacy_search(org, vector, K, None)]

    strategies: dict[str, Callable[[uuid.UUID, np.ndarray], list[uuid.UUID]]] = {
        "tenantdb": tenantdb, "0.6 rule": legacy, "naive HNSW": naive, "exact scan": exact}
    cells = []
    for name in [*TINY, *FRACTIONS]:
        org_index = data.org_names.index(name)
        org = data.org_ids[org_index]
        rows = np.flatnonzero(data.org_of_row == org_index)
        samples: dict[str, tuple[list[float], list[float], list[int], list[int]]] = {
            s: ([], [], [], []) for s in strategies}
        for qi, q in enumerate(data.queries[name]):
            wanted = min(K, len(rows))
            # Ties at the k-th distance count as hits.
            cutoff = np.sort(1.0 - data.vectors[rows] @ q)[wanted - 1] + 1e-5
            order = list(strategies.items())
            turn = qi % len(order)
            for strategy, fn in order[turn:] + order[:turn]:
                if qi == 0:
                    fn(org, q)  # warm-up: caches, connections, the org's size
                start = time.perf_counter()
                found = fn(org, q)
                elapsed = (time.perf_counter() - start) * 1000
                distances = [1.0 - float(data.vectors[position[rid]] @ q) for rid in found]
                hits = sum(1 for rid, d in zip(found, distances, strict=True)
                           if data.org_of_row[position[rid]] == org_index and d <= cutoff)
                recalls, latencies, shorts, unordered = samples[strategy]
                recalls.append(hits / wanted)
                latencies.append(elapsed)
                shorts.append(int(len(found) < wanted))
                # float32 sums on the server: equal rows may differ in the 7th digit
                unordered.append(int(any(a > b + 1e-6 for a, b
                                         in itertools.pairwise(distances))))
        exact_times = samples["exact scan"][1]
        for strategy, (recalls, latencies, shorts, unordered) in samples.items():
            ratio = float(np.median([t / e for t, e in zip(latencies, exact_times, strict=True)]))
            cell = Cell(len(data.row_ids), strategy, name, len(rows), float(np.mean(recalls)),
                        float(np.min(recalls)), float(np.percentile(latencies, 50)),
                        float(np.percentile(latencies, 95)), sum(shorts), sum(unordered),
                        ratio)
            cells.append(cell)
            print(f"{cell.strategy:<11} {cell.org:<8} rows {cell.rows:6d}  recall "
                  f"{cell.recall_mean:.3f} (min {cell.recall_min:.2f})  p50 {cell.p50_ms:7.2f} "
                  f"ms  p95 {cell.p95_ms:7.2f} ms  short {cell.short}  "
                  f"unordered {cell.unordered}  "
                  f"vs exact {cell.vs_exact:.2f}x", flush=True)
    raw.close()
    db.close()
    return cells


def print_table(cells: list[Cell], queries: int) -> bool:
    for table_rows in dict.fromkeys(c.table_rows for c in cells):
        subset = [c for c in cells if c.table_rows == table_rows]
        orgs = list(dict.fromkeys(c.org for c in subset))
        strategies = list(dict.fromkeys(c.strategy for c in subset))
        by = {(c.strategy, c.org): c for c in subset}
        print(f"\n{table_rows:,} rows: recall@10 mean (min) · p50 / p95 ms · short results "
              f"out of {queries} queries; tenantdb / exact = median of per-query ratios")
        print("| org | rows | " + " | ".join(strategies) + " | tenantdb / exact |")
        print("|---|---:|" + "---|" * len(strategies) + "---:|")
        for org in orgs:
            parts = []
            for strategy in strategies:
                c = by[(strategy, org)]
                short = f", short {c.short}" if c.short else ""
                short += f", unordered {c.unordered}" if c.unordered else ""
                parts.append(f"{c.recall_mean:.3f} ({c.recall_min:.1f}) · {c.p50_ms:.1f} / "
                             f"{c.p95_ms:.1f}{short}")
            ratio = by[("tenantdb", org)].vs_exact
            print(f"| {org} | {by[(strategies[0], org)].rows:,} | " + " | ".join(parts)
                  + f" | {ratio:.2f} |")
    return check_targets(cells)


def check_targets(cells: list[Cell]) -> bool:
    """Say which of the targets tenantdb met; False if it returned a short result or one
    out of order (broken promises, which fail the run; recall and timings are reported,
    not enforced)."""
    ours = [c for c in cells if c.strategy == "tenantdb"]
    print("\ntargets (tenantdb):")
    recall_ok = all(c.recall_mean >= 0.95 and c.recall_min >= 0.9 for c in ours)
    print(f"- recall@10 >= 0.95, each query >= 0.9: {'met' if recall_ok else 'MISSED'}")
    complete = all(c.short == 0 for c in ours)
    print(f"- no short result: {'met' if complete else 'MISSED'}")
    ordered = all(c.unordered == 0 for c in ours)
    print(f"- every result nearest first: {'met' if ordered else 'MISSED'}")
    for table_rows in dict.fromkeys(c.table_rows for c in ours):
        worst = max((c for c in ours if c.table_rows == table_rows), key=lambda c: c.p50_ms)
        print(f"- {table_rows:,} rows: largest p50 {worst.p50_ms:.1f} ms ({worst.org})")
    small = [c for c in ours if c.org in TINY or c.org in ("0.1%", "0.5%")]
    print("- small orgs vs exact scan: " + ", ".join(
        f"{c.org} {c.vs_exact:.2f}x" for c in small))
    sizes = sorted({c.table_rows for c in ours})
    if len(sizes) > 1:
        low, high = sizes[0], sizes[-1]
        by = {(c.table_rows, c.org): c for c in ours}
        print(f"- p50 growth {low:,} -> {high:,} rows: " + ", ".join(
            f"{org} {by[(low, org)].p50_ms:.1f} -> {by[(high, org)].p50_ms:.1f} ms"
            for org in dict.fromkeys(c.org for c in ours)))
    return complete and ordered


def _literal(q: Any) -> str:
    return "[" + ",".join(f"{x:.9g}" for x in q) + "]"


def load_and_measure(sizes: tuple[int, ...], queries: int, *, keep: bool,
                     begin: float) -> list[Cell]:
    cells: list[Cell] = []
    # The table and its index (~800 MB each per 100k rows: a 1536-dim vector fills an 8 KB
    # page in both) should stay in memory, as they would on a sized server: with 2 GB for
    # 400k rows the exact scans of the large orgs evicted the index between the searches,
    # and the same search varied from 22 to 54 ms from one run to the next.
    gigabytes = max(2, math.ceil(max(sizes) * 2 * 8.5 / 1024 / 1024))
    with scratch_server(shared_buffers=f"{gigabytes}GB", keep=keep) as server:
        for rows in sizes:
            start = time.perf_counter()
            data = make_data(rows, queries)
            print(f"generated {rows} x {DIM} vectors: {time.perf_counter() - start:.1f} s",
                  flush=True)
            with scratch_database(server, keep=keep) as url:
                migrate.migrate(url)
                load(url, data)
                cells += measure(url, data)
            print(f"{rows:,} rows done after {time.perf_counter() - begin:.0f} s", flush=True)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rows", default=",".join(map(str, FULL_ROWS)),
                        help="table sizes, comma-separated (default: %(default)s)")
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_ROWS[0]:,} rows and {QUICK_QUERIES} queries")
    parser.add_argument("--keep", action="store_true", help="keep the scratch databases")
    parser.add_argument("--reuse", metavar="URL",
                        help="measure the database a --keep run of the same --rows left "
                             "(one size; no load, no index build)")
    args = parser.parse_args()
    sizes = QUICK_ROWS if args.quick else tuple(int(r) for r in args.rows.split(","))
    queries = QUICK_QUERIES if args.quick else args.queries
    begin = time.perf_counter()
    cells: list[Cell] = []
    if args.reuse:
        if len(sizes) != 1:
            raise SystemExit("--reuse measures one database: give the --rows it was loaded with")
        cells += measure(args.reuse, make_data(sizes[0], queries))
    else:
        cells += load_and_measure(sizes, queries, keep=args.keep, begin=begin)
    complete = print_table(cells, queries)
    print(f"\nwhole run: {time.perf_counter() - begin:.0f} s")
    if not complete:
        raise SystemExit("tenantdb returned fewer than min(k, rows) hits, or hits out of "
                         "order: a bug, see above")


if __name__ == "__main__":
    main()
