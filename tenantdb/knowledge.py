"""Org-scoped similarity search over embeddings, with a guaranteed result count.

:func:`search_knowledge` returns the ``k`` chunks of one org nearest to a query (a vector,
or a text embedded with the embedder that made the org's vectors), cosine distance, each
with its knowledge item. :func:`add_knowledge` stores an item and its embedded chunks in one
transaction.

Why not a plain ``WHERE org_id = ... ORDER BY vector <=> q LIMIT k``: without pgvector 0.8's
iterative scan, the filter runs *after* the HNSW scan, which yields at most
``hnsw.ef_search`` candidates (default 40) over the whole table: an org holding 1 % of the
rows gets about 0.4 of its 10 rows back. The search therefore picks a strategy per call,
from the number of rows it has to rank (the org's, or the org's rows of one destination),
the table's size (``pg_class.reltuples``) and the server's pgvector:

- few rows (at most :data:`EXACT_SCAN_FRACTION` of the table on pgvector < 0.8;
  :func:`exact_scan_rows` on pgvector >= 0.8, or :func:`quantized_candidates` where
  migration V01_09 added the quantized bits): an exact scan of those rows through the
  ``(org_id, id)`` primary key, ranked by a top-k sort (``+ 0`` on the distance keeps the
  planner off the HNSW index). Exact, and cheap because the rows are few;
- more, up to :func:`quantized_scan_rows`, on pgvector >= 0.8 with V01_09: the rows ranked
  by the Hamming distance of their binary-quantized vectors (``vector_bits``, read from a
  covering index without touching the 8 KB heap pages), the nearest
  :func:`quantized_candidates` re-ranked by their exact distance. Where the candidates'
  cutoff lies too near the worst hit (:data:`QUANTIZED_MIN_MARGIN`), as on vectors without
  structure, the exact scan answers instead;
- more, on pgvector >= 0.8: the HNSW index with ``hnsw.iterative_scan`` (relaxed order,
  :data:`ITERATIVE_FETCH` candidates re-ranked exactly), ``hnsw.ef_search`` growing with
  the table (:func:`iterative_ef_search`) and the scan bounded by ``hnsw.max_scan_tuples``
  (:data:`ITERATIVE_MAX_SCAN_TUPLES`): the scan goes on until enough of the org's rows
  passed the filter, whatever the org's share of the table;
- more, on pgvector < 0.8: the HNSW index with ``hnsw.ef_search`` raised to
  :data:`HNSW_EF_SEARCH` for the one statement. With at least 5 % of the candidates
  belonging to the org, about 20 of the 400 survive the filter;
- if the HNSW scan still returns fewer than ``k`` rows (an org smaller than it was, a scan
  that hit its bound, a ``k`` near ``ef_search``), the exact scan runs instead: the result
  count is never short.

The org's size (counted with a capped index-only count that stops one past the
threshold) is cached per process for :data:`SIZE_CACHE_SECONDS`, so a small org pays one
round trip per search, not two. The cache only chooses the faster plan: every plan
returns exactly ``min(k, rows)`` hits whatever the cached size says, so a stale size
costs time, never results. ``add_knowledge`` drops the org's entries; an exact scan that
returns fewer than ``k`` rows has just counted the org, and a short HNSW result forgets it.

All ``hnsw.*`` settings go with ``set_config(..., true)`` in the search's own round trip:
they last until the end of the transaction, which is the statement itself in autocommit
mode. Inside a caller's transaction they are put back (``SET LOCAL ... TO DEFAULT``) right
after the search, so later statements of that transaction see the session's values.

The vector column is stored inline (``STORAGE PLAIN``, migration V01_03): exact scans then
read no TOAST and run 2.5-3x faster. Row-level security does not change the plans: the
planner folds its ``org_id = current_setting(...)`` into a one-time filter beside the
explicit predicate. The figures behind the constants are in README "Knowledge search".
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

from . import peewee_internals as pi
from .context import OrgLike, require_org
from .db import database
from .embedder import Embedder, default_embedder, get_embedder, register_embedder
from .models import EMBEDDING_DIMENSIONS, Embedding, KnowledgeItem
from .scoping import execute_scoped
from .validation import check_int, check_optional_uuid, check_vector

__all__ = [
    "EXACT_SCAN_FRACTION",
    "EXACT_SCAN_MIN_ROWS",
    "EXACT_SCAN_ROWS_PER_SQRT",
    "HNSW_EF_SEARCH",
    "HNSW_EF_SEARCH_MAX",
    "ITERATIVE_EF_SEARCH",
    "ITERATIVE_EF_SEARCH_PER_SQRT",
    "ITERATIVE_FETCH",
    "ITERATIVE_MAX_SCAN_TUPLES",
    "MAX_K",
    "QUANTIZED_CANDIDATES_PER_K",
    "QUANTIZED_MIN_CANDIDATES",
    "QUANTIZED_MIN_MARGIN",
    "QUANTIZED_ROWS_PER_SQRT",
    "QUANTIZED_SCAN_MIN_ROWS",
    "SIZE_CACHE_SECONDS",
    "KnowledgeHit",
    "add_knowledge",
    "exact_scan_rows",
    "iterative_ef_search",
    "quantized_candidates",
    "quantized_scan_rows",
    "search_knowledge",
]

# -- strategy constants ------------------------------------------------------------------------
# pgvector < 0.8, measured on PostgreSQL 16.2 + pgvector 0.6.2 with 100k x 1536 clustered
# vectors on 2 cores (bench/knowledge.py and an ef_search sweep, ef 100-1000 x orgs 1-50 %):
#: pgvector < 0.8: orgs (or org + destination) with at most this fraction of the table's
#: rows are scanned exactly; HNSW with ef_search 400 keeps recall@10 >= 0.95 from 5 % up.
EXACT_SCAN_FRACTION = 0.05
#: pgvector < 0.8: ef_search of the HNSW path (200 left 21/50 queries short at 5 %).
HNSW_EF_SEARCH = 400
#: pgvector's upper bound for hnsw.ef_search.
HNSW_EF_SEARCH_MAX = 1000
#: The largest k accepted: an HNSW scan cannot return more than ef_search rows at a time.
MAX_K = HNSW_EF_SEARCH_MAX
# pgvector >= 0.8 (iterative scans), measured on PostgreSQL 18.4 + pgvector 0.8.5 with the
# same data set (README "Knowledge search"). An exact scan costs in proportion to the org's
# rows; a filtered iterative scan in proportion to the rows it must visit to meet k of the
# org's, about ef / share = ef * table / rows: they cross near sqrt(table), hence the rule.
#: pgvector >= 0.8: exact scan up to max(EXACT_SCAN_MIN_ROWS, this * sqrt(table rows)).
#: On V01_08's graph both cost about the same near 4,500 rows at 100k rows (14 x sqrt;
#: a 5,000-row org took 0.5-0.66x its exact scan through the index) and above 8,000 at
#: 400k (an 8,000-row org took 1.5x its exact scan through the index, a 20,000-row one
#: 0.31x); 15 puts the switch at 4,743 and 9,486 rows (README "Knowledge search").
EXACT_SCAN_ROWS_PER_SQRT = 15.0
#: pgvector >= 0.8 without V01_09: orgs this small are always scanned exactly (about
#: 4 ms); with V01_09, QUANTIZED_SCAN_MIN_ROWS plays this part. Below it the
#: filtered scan also loses recall where an org has few rows per neighbourhood: on 20k
#: rows, orgs of 1,000-1,200 rows got recall 0.72-0.89 even at ef_search 400.
EXACT_SCAN_MIN_ROWS = 2000
#: pgvector >= 0.8: hnsw.ef_search of the iterative scan (candidates per step), on the
#: graph of V01_08 (m 24, ef_construction 128): max(this, ITERATIVE_EF_SEARCH_PER_SQRT *
#: sqrt(table rows)), at most HNSW_EF_SEARCH_MAX (iterative_ef_search()). A larger graph
#: needs more candidates to reach the same rows: on 100k rows (40 queries per org of
#: 5-50 %) 60, 100 and 200 gave every query recall 1.0 and 40 left some at 0 (the graph
#: search settled in another cluster); on 400k rows 100 left queries at 0 and 0.3 (5 %,
#: 10 %) and ran slower than 200 (more iterations), while 200 and 400 gave every query
#: 1.0. (On V01_03's graph, m 16 and ef_construction 64, even 400 and 1,000 left some
#: queries at 0.8.)
ITERATIVE_EF_SEARCH = 100
#: pgvector >= 0.8: see ITERATIVE_EF_SEARCH: 101 at 100k rows, 202 at 400k, 320 at 1M.
ITERATIVE_EF_SEARCH_PER_SQRT = 0.32
#: pgvector >= 0.8: candidates taken from the relaxed-order scan (at least k), then
#: re-ranked exactly. Each one more makes the scan find one more of the org's rows; with
#: k of them every query of the benchmark got all of its 10 nearest (README).
ITERATIVE_FETCH = 10
#: pgvector >= 0.8: hnsw.max_scan_tuples; a scan stopped by it comes back short and the
#: exact scan answers (the org is then small for the table anyway).
ITERATIVE_MAX_SCAN_TUPLES = 40_000
# pgvector >= 0.8 with migration V01_09's binary-quantized vectors (vector_bits), measured
# on the same data set: an org's rows ranked by the Hamming distance of their bits, read
# from a covering index (0.4-0.7 us a row), and the nearest candidates re-ranked by
# their exact distance (about 7 us each, one 8 KB heap page apiece).
#: pgvector >= 0.8 with V01_09: orgs of up to max(QUANTIZED_SCAN_MIN_ROWS, this *
#: sqrt(table rows)) are ranked through their quantized bits, larger ones through the HNSW
#: index (quantized_scan_rows()): 8,000 rows at 100k, 15,811 at 400k. The quantized
#: search costs about 3.5 ms plus 0.6 us per row of the org, the iterative HNSW scan about
#: the same whatever the org but more as the table grows. On 100k rows (40 queries an
#: org, tenantdb's whole call) one run had the quantized search at 6.5-7.0 ms from 2,000
#: to 6,000 rows and 10.7 at 10,000, the HNSW scan at 8.2-10.5 from 10,000 up; at 400k
#: the HNSW scan took 11.5-13.4 ms (README "Knowledge search").
QUANTIZED_ROWS_PER_SQRT = 25.0
#: pgvector >= 0.8 with V01_09: ... and always up to this many (about 8 ms by the cost
#: above). On 20k rows the HNSW scan took 13 ms for orgs of 5,000 and 10,000 rows, and the
#: quantized search 6-8 ms for such orgs at 100k: a small table is no cheaper to search
#: through the index for an org's rows.
QUANTIZED_SCAN_MIN_ROWS = 8000
#: pgvector >= 0.8 with V01_09: candidates re-ranked exactly, at least this many ...
QUANTIZED_MIN_CANDIDATES = 200
#: ... and this many per hit asked for (quantized_candidates()). On 100k rows, 100
#: candidates for k = 10 gave every query of every org size its ten nearest rows, and 50
#: left queries at 0.7 (500-row org) and 0.8 (1,000 and 2,000): twice what sufficed.
QUANTIZED_CANDIDATES_PER_K = 20
#: pgvector >= 0.8 with V01_09: how far, in standard deviations of a Hamming distance,
#: the candidates' cutoff must lie beyond the worst hit's distance for the quantized
#: result to stand; nearer, and the exact scan answers (_confident()). Bits rank
#: structured vectors (real embeddings, the benchmark's clusters) well, random ones
#: badly: 200 candidates of 2,000 random gaussian vectors held 0.74 of their ten nearest
#: (one query 0.4). Such queries had margins of 0 to 1.1 standard deviations; those of the
#: benchmark from 5 % up 8 to 12, and at 0.5-2 % a median of 2-4.5 (numpy, README).
QUANTIZED_MIN_MARGIN = 1.5
#: How long an org's counted size chooses its plan without being counted again.
SIZE_CACHE_SECONDS = 30.0
_MAX_VERSIONS_CACHED = 64
_MAX_SIZES_CACHED = 10_000

# -- SQL -----------------------------------------------------------------------------------------
# Rows to rank, counted up to one past the exact-scan threshold (an index-only count that
# stops there), and the table's planner row count (-1 before the first ANALYZE). The
# threshold is max(min rows, table * fraction, sqrt(table) * per_sqrt); _threshold() is
# the same in Python. Parameters: org (org, org, dest), min rows, fraction, per_sqrt.
_CAP_SQL = ("(SELECT greatest(%s, floor(greatest(reltuples, 0) * %s), "
            "floor(sqrt(greatest(reltuples, 0)) * %s))::bigint + 1 "
            "FROM pg_class WHERE oid = 'embedding'::regclass)")
COUNT_SQL = (
    "SELECT (SELECT count(*) FROM (SELECT 1 FROM embedding WHERE org_id = %s "
    f"LIMIT {_CAP_SQL}) capped), "
    "(SELECT reltuples FROM pg_class WHERE oid = 'embedding'::regclass)"
)
COUNT_DESTINATION_SQL = (
    "SELECT (SELECT count(*) FROM (SELECT 1 FROM embedding e JOIN knowledge_item i "
    "ON i.org_id = e.org_id AND i.id = e.knowledge_item_id "
    "WHERE e.org_id = %s AND i.org_id = %s AND i.destination_id = %s "
    f"LIMIT {_CAP_SQL}) capped), "
    "(SELECT reltuples FROM pg_class WHERE oid = 'embedding'::regclass)"
)
# On a Citus coordinator the table's size comes from its shards (tenantdb.citus), not from
# the coordinator's reltuples (-1 or 0 there): the cap is then computed here and bound.
# Parameters: org (org, org, dest), cap.
CAPPED_COUNT_SQL = ("SELECT count(*) FROM (SELECT 1 FROM embedding WHERE org_id = %s "
                    "LIMIT %s) capped")
CAPPED_COUNT_DESTINATION_SQL = (
    "SELECT count(*) FROM (SELECT 1 FROM embedding e JOIN knowledge_item i "
    "ON i.org_id = e.org_id AND i.id = e.knowledge_item_id "
    "WHERE e.org_id = %s AND i.org_id = %s AND i.destination_id = %s LIMIT %s) capped"
)
# The server's pgvector version, and whether migration V01_09 added the quantized bits
# (it adds the column and its index together, and its undo drops both).
FEATURES_SQL = ("SELECT (SELECT extversion FROM pg_extension WHERE extname = 'vector'), "
                "to_regclass('embedding_org_item_bits_idx') IS NOT NULL")
# The model of the org's stored vectors (add_knowledge keeps one model per org).
ORG_MODEL_SQL = "SELECT model FROM embedding WHERE org_id = %s LIMIT 1"
# Column order of every search statement; _hit() reads rows in this order. The vector is
# not fetched: callers want the text, and 1536 floats per hit would travel as text and be
# parsed back.
_HIT_COLUMNS = (
    "h.org_id, h.id, h.knowledge_item_id, h.chunk_index, h.content, h.model, h.created_at, "
    "i.id, i.destination_id, i.title, i.content, i.source_url, i.metadata, i.created_at, "
    "i.updated_at, h.distance"
)
_EMBEDDING_COLUMNS = ("e.org_id, e.id, e.knowledge_item_id, e.chunk_index, e.content, e.model, "
                      "e.created_at")
_ITEM_JOIN = "JOIN knowledge_item i ON i.org_id = h.org_id AND i.id = h.knowledge_item_id"
# Exact: "+ 0" makes the ORDER BY expression unusable for the HNSW index, so the planner
# reads the org's rows (through an org_id-leading index, or a sequential scan for a very
# large org) and keeps a top-k heap. The item join comes after the LIMIT: joining every
# row of a large org first costs more than the ranking. Parameters: query vector, org, k.
EXACT_SQL = (
    f"SELECT {_HIT_COLUMNS} FROM (SELECT {_EMBEDDING_COLUMNS}, "
    "(e.vector <=> %s::vector) + 0 AS distance FROM embedding e WHERE e.org_id = %s "
    f"ORDER BY distance LIMIT %s) h {_ITEM_JOIN} ORDER BY h.distance"
)
# Exact within one destination: the planner starts from the destination's items
# ((org_id, destination_id) index) and reaches their chunks through the
# (org_id, knowledge_item_id, chunk_index) key. Parameters: vector, org, org, dest, k.
EXACT_DESTINATION_SQL = (
    f"SELECT {_HIT_COLUMNS} FROM (SELECT {_EMBEDDING_COLUMNS}, "
    "(e.vector <=> %s::vector) + 0 AS distance FROM embedding e "
    "JOIN knowledge_item d ON d.org_id = e.org_id AND d.id = e.knowledge_item_id "
    "WHERE e.org_id = %s AND d.org_id = %s AND d.destination_id = %s "
    f"ORDER BY distance LIMIT %s) h {_ITEM_JOIN} ORDER BY h.distance"
)
# pgvector < 0.8, HNSW: ef_search is raised for this transaction only (set_config's third
# argument), in the same round trip. "ORDER BY distance" is the select list's expression,
# which the index orders by: the 1536-float literal is sent and parsed once, not twice.
# Parameters: ef_search, vector, org, limit.
_EF_SQL = "SELECT set_config('hnsw.ef_search', %s, true); "
HNSW_SQL = (
    f"{_EF_SQL}SELECT {_HIT_COLUMNS} FROM (SELECT {_EMBEDDING_COLUMNS}, "
    "e.vector <=> %s::vector AS distance FROM embedding e WHERE e.org_id = %s "
    f"ORDER BY distance LIMIT %s) h {_ITEM_JOIN} ORDER BY h.distance"
)
# pgvector < 0.8, HNSW within one destination: the inner scan takes every candidate of the
# org (at most ef_search), the join keeps the destination's. Parameters: ef_search,
# vector, org, ef_search, dest, k.
HNSW_DESTINATION_SQL = (
    f"{_EF_SQL}SELECT {_HIT_COLUMNS} FROM (SELECT {_EMBEDDING_COLUMNS}, "
    "e.vector <=> %s::vector AS distance FROM embedding e WHERE e.org_id = %s "
    f"ORDER BY distance LIMIT %s) h {_ITEM_JOIN} "
    "WHERE i.destination_id = %s ORDER BY h.distance LIMIT %s"
)
# pgvector >= 0.8: an iterative scan, in relaxed order (faster than strict order): the
# index returns the candidates only roughly by distance, so the fetched ones are re-ranked
# by their exact distance and the best k kept. The re-ranking sorts by "distance + 0": by
# plain "distance" the planner would take the index scan's order as given and drop the
# sort (a MATERIALIZED CTE does not stop it either: PostgreSQL 17 passes a CTE's sort
# order on). The filter sits on the index scan itself, so the scan goes on until it has
# `fetch` rows that pass it (or max_scan_tuples). Sorts are priced out for the statement:
# the size rule has already chosen the index, and pgvector 0.8's estimate otherwise
# prefers reading the whole org and sorting it whenever the org is a large share of a
# small table (the re-ranking sort has no alternative, so it stays). Parameters:
# ef_search, max_scan_tuples, vector, org, fetch, k.
_ITERATIVE_SETTINGS_SQL = (
    "SELECT set_config('hnsw.ef_search', %s, true), "
    "set_config('hnsw.iterative_scan', 'relaxed_order', true), "
    "set_config('hnsw.max_scan_tuples', %s, true), set_config('enable_sort', 'off', true); "
)
_RERANK = (f"candidates ORDER BY distance + 0 LIMIT %s) h {_ITEM_JOIN} "
           "ORDER BY h.distance")
ITERATIVE_SQL = (
    f"{_ITERATIVE_SETTINGS_SQL}SELECT {_HIT_COLUMNS} FROM (SELECT * FROM ("
    f"SELECT {_EMBEDDING_COLUMNS}, e.vector <=> %s::vector AS distance FROM embedding e "
    f"WHERE e.org_id = %s ORDER BY distance LIMIT %s) {_RERANK}"
)
# Within one destination: the destination's item ids become an array (an InitPlan), so
# the filter stays on the index scan and the iterative scan applies it. Parameters:
# ef_search, max_scan_tuples, vector, org, org, dest, fetch, k.
ITERATIVE_DESTINATION_SQL = (
    f"{_ITERATIVE_SETTINGS_SQL}SELECT {_HIT_COLUMNS} FROM (SELECT * FROM ("
    f"SELECT {_EMBEDDING_COLUMNS}, e.vector <=> %s::vector AS distance FROM embedding e "
    "WHERE e.org_id = %s AND e.knowledge_item_id = ANY (ARRAY(SELECT d.id FROM "
    "knowledge_item d WHERE d.org_id = %s AND d.destination_id = %s)) "
    f"ORDER BY distance LIMIT %s) {_RERANK}"
)
# pgvector >= 0.8 with V01_09: the org's rows ranked by the Hamming distance of their
# binary-quantized vectors, read from the covering index embedding_org_item_bits_idx (an
# index-only scan and a top-N sort, no heap page); the nearest `candidates` of them are
# fetched through the primary key (an InitPlan array: one probe an id, never the org's
# other rows) and re-ranked by their exact distance ("+ 0" keeps the HNSW index out). The
# query's bits come as a literal (_query_literals), so its 1536 floats are parsed once.
# Each hit also carries its own Hamming distance, the candidates' largest (the cutoff) and
# how many candidates there were, for _confident(): taken from the CTE, as a window over
# the fetched rows would copy their 6 KB vectors (it doubled the statement's time).
# Parameters: bits, org, candidates, bits, vector, org, k.
_BITS = f"%s::bit({EMBEDDING_DIMENSIONS})"
_RERANK_CANDIDATES = (
    "ORDER BY hamming LIMIT %s) "
    f"SELECT {_HIT_COLUMNS}, h.vector_bits <~> {_BITS}, "
    "(SELECT max(hamming) FROM candidates), (SELECT count(*) FROM candidates) FROM ("
    f"SELECT {_EMBEDDING_COLUMNS}, e.vector_bits, (e.vector <=> %s::vector) + 0 AS distance "
    "FROM embedding e WHERE e.org_id = %s AND e.id = ANY (ARRAY(SELECT id FROM candidates)) "
    f"ORDER BY distance LIMIT %s) h {_ITEM_JOIN} ORDER BY h.distance"
)
_CANDIDATES = ("WITH candidates AS MATERIALIZED (SELECT b.id, "
               f"b.vector_bits <~> {_BITS} AS hamming FROM embedding b ")
QUANTIZED_SQL = f"{_CANDIDATES}WHERE b.org_id = %s {_RERANK_CANDIDATES}"
# Within one destination: the bits of the destination's items only, found through the
# index's second column. Parameters: bits, org, org, dest, candidates, bits, vector, org, k.
QUANTIZED_DESTINATION_SQL = (
    f"{_CANDIDATES}WHERE b.org_id = %s AND b.knowledge_item_id = ANY (ARRAY(SELECT d.id "
    f"FROM knowledge_item d WHERE d.org_id = %s AND d.destination_id = %s)) {_RERANK_CANDIDATES}"
)
# Inside a caller's transaction: back to the session's values for the rest of it.
RESET_SETTINGS_SQL = ("SET LOCAL hnsw.ef_search TO DEFAULT; "
                      "SET LOCAL hnsw.iterative_scan TO DEFAULT; "
                      "SET LOCAL hnsw.max_scan_tuples TO DEFAULT; "
                      "SET LOCAL enable_sort TO DEFAULT")
RESET_EF_SEARCH_SQL = "SET LOCAL hnsw.ef_search TO DEFAULT"

_EMBEDDING_FIELDS = ("org_id", "id", "knowledge_item_id", "chunk_index", "content", "model",
                     "created_at")
_ITEM_FIELDS = ("id", "destination_id", "title", "content", "source_url", "metadata",
                "created_at", "updated_at")


@dataclass(frozen=True)
class KnowledgeHit:
    """One search result.

    :param item: the knowledge item the chunk belongs to.
    :param embedding: the matching chunk; its ``vector`` is not loaded (``None``).
    :param distance: cosine distance to the query, 0 (same direction) to 2 (opposite).
    """

    item: KnowledgeItem
    embedding: Embedding
    distance: float


# -- public API ----------------------------------------------------------------------------


def search_knowledge(org_id: OrgLike, query: str | Sequence[float], k: int = 10, *,
                     destination_id: uuid.UUID | str | None = None,
                     embedder: Embedder | None = None) -> list[KnowledgeHit]:
    """The ``k`` chunks of ``org_id`` nearest to ``query``, nearest first.

    Exactly ``k`` hits when the org (or the destination) holds at least ``k`` chunks, else
    all of them. Which strategy runs is explained in the module docstring.

    :param query: a text, embedded with ``embedder``; or a vector of
        :data:`~tenantdb.models.EMBEDDING_DIMENSIONS` finite numbers whose norm neither
        underflows nor overflows float32 (a numpy array or any sequence).
    :param k: how many hits, 1 to :data:`MAX_K`.
    :param destination_id: only chunks of knowledge items about this destination.
    :param embedder: for a text query: default, the embedder named by the org's stored
        vectors (``embedding.model``), found with :func:`~tenantdb.embedder.get_embedder`.
        Its ``name`` must be that model. Not allowed with a vector query.
    :raises MissingOrgError: no org, or not a UUID.
    :raises ValueError: a wrong dimension, NaN or infinite values, a zero vector or one
        whose norm underflows, a ``k`` out of range, a ``destination_id`` that is not a
        UUID, an ``embedder`` with a vector query, or an embedder whose name is not the
        model of the org's vectors. Nothing runs then (a text query first reads that model).
    :raises LookupError: a text query, and no embedder registered under the org's model.
    """
    org = require_org(org_id, "search_knowledge()")
    _check_k(k)
    destination = _optional_uuid(destination_id, "destination_id")
    if isinstance(query, str):
        if embedder is not None:
            _check_embedder(embedder)
        found = _embed_query(org, query, embedder)
        if found is None:  # the org has no vectors: nothing to rank
            return []
        vector, bits = found
    else:
        if embedder is not None:
            raise ValueError("embedder= is for a text query; a vector query is searched as is")
        vector, bits = _query_literals(query, "query")
    if _has_iterative_scan():
        return _iterative_search(org, vector, k, destination, bits=bits)
    return _legacy_search(org, vector, k, destination)


def add_knowledge(org_id: OrgLike, title: str, content: str, *,
                  destination_id: uuid.UUID | str | None = None,
                  chunks: Sequence[str] | None = None, embedder: Embedder | None = None,
                  source_url: str | None = None,
                  metadata: Mapping[str, Any] | None = None) -> KnowledgeItem:
    """Store a knowledge item and one embedding per chunk, in one transaction.

    The chunks are embedded before the transaction opens, so a slow embedder holds no locks.
    The embedder is registered by name (:func:`~tenantdb.embedder.register_embedder`) so
    that a text search in this process finds it; an org keeps one model: vectors of two
    embedders cannot be ranked against each other.

    :param chunks: the texts to embed, in order (``chunk_index`` 0, 1, ...); default
        ``[content]``.
    :param embedder: default :func:`~tenantdb.embedder.default_embedder`; its vectors must
        have :data:`~tenantdb.models.EMBEDDING_DIMENSIONS` finite values, not all zero,
        with a norm that neither underflows nor overflows float32.
    :raises MissingOrgError: no org, or not a UUID.
    :raises ValueError: a non-text title, content or chunk, no chunks, an embedder of another
        dimension or one returning bad vectors, or a ``destination_id`` that is not a UUID
        (nothing runs then); an embedder whose name is not the model of the org's stored
        vectors (nothing is written).
    :raises peewee.IntegrityError: the destination does not exist in this org.
    """
    org = require_org(org_id, "add_knowledge()")
    destination = _optional_uuid(destination_id, "destination_id")
    texts = _check_texts(title, content, [content] if chunks is None else chunks)
    embedder = embedder or default_embedder()
    vectors = _embed(embedder, texts)
    with database.atomic():
        stored = _org_model(org)
        if stored is not None and embedder.name is not None and stored != embedder.name:
            raise ValueError(
                f"org {org}'s vectors were made by {stored!r}; embedder {embedder.name!r} "
                "would mix models the search cannot compare: embed with "
                f"{stored!r}, or re-embed the org's knowledge with the new embedder"
            )
        item = KnowledgeItem.create(org_id=org, destination_id=destination, title=title,
                                    content=content, source_url=source_url,
                                    metadata=dict(metadata or {}))
        Embedding.insert_many(
            [{"org_id": org, "knowledge_item_id": item.id, "chunk_index": index,
              "content": text, "vector": vector, "model": embedder.name}
             for index, (text, vector) in enumerate(zip(texts, vectors, strict=True))],
            org_id=org,
        ).execute()
    _forget_sizes(org)
    if isinstance(embedder.name, str) and embedder.name:
        # Another object registered under that name stays: the first one wins.
        with contextlib.suppress(ValueError):
            register_embedder(embedder)
    return item


def iterative_ef_search(table_rows: float) -> int:
    """pgvector >= 0.8: ``hnsw.ef_search`` of the iterative scan on a table this large.

    :param table_rows: the embedding table's row count (``pg_class.reltuples``).
    """
    return min(HNSW_EF_SEARCH_MAX, _threshold(table_rows, ITERATIVE_EF_SEARCH, 0.0,
                                              ITERATIVE_EF_SEARCH_PER_SQRT))


def quantized_candidates(k: int) -> int:
    """pgvector >= 0.8 with V01_09: how many rows, nearest by their quantized bits, are
    re-ranked exactly for ``k`` hits. An org (or destination) with no more rows than this
    is scanned exactly instead.
    """
    return max(QUANTIZED_MIN_CANDIDATES, QUANTIZED_CANDIDATES_PER_K * k)


def quantized_scan_rows(table_rows: float) -> int:
    """pgvector >= 0.8 with V01_09: the most rows an org may have to be ranked through its
    quantized bits; larger ones go through the HNSW index.

    :param table_rows: the embedding table's row count (``pg_class.reltuples``).
    """
    return _threshold(table_rows, QUANTIZED_SCAN_MIN_ROWS, 0.0, QUANTIZED_ROWS_PER_SQRT)


def exact_scan_rows(table_rows: float) -> int:
    """pgvector >= 0.8: the most rows an org may have to be scanned exactly.

    :param table_rows: the embedding table's row count (``pg_class.reltuples``).
    """
    return _threshold(table_rows, EXACT_SCAN_MIN_ROWS, 0.0, EXACT_SCAN_ROWS_PER_SQRT)


# -- strategies ----------------------------------------------------------------------------


def _iterative_search(org: uuid.UUID, vector: str, k: int, destination: uuid.UUID | None,
                      *, bits: str) -> list[KnowledgeHit]:
    """pgvector >= 0.8: exact scan for small orgs; then, with V01_09's bits, the quantized
    search up to quantized_scan_rows(); else an iterative HNSW scan."""
    if _has_quantized_vectors():
        size = _org_size(org, destination, rule="quantized")
        if size.rows is not None and size.rows <= quantized_candidates(k):
            return _exact_search(org, vector, k, destination)
        if size.rows is not None:
            return _quantized_search(org, vector, bits, k, destination)
    else:
        size = _org_size(org, destination, rule="iterative")
        if size.rows is not None:
            return _exact_search(org, vector, k, destination)
    hits = _iterative_hnsw_search(org, vector, k, destination, table_rows=size.table)
    if len(hits) < k:  # fewer rows than it had, or the scan hit its bound
        _forget_sizes(org)
        return _exact_search(org, vector, k, destination)
    return hits


def _legacy_search(org: uuid.UUID, vector: str, k: int,
                   destination: uuid.UUID | None) -> list[KnowledgeHit]:
    """pgvector < 0.8: exact scan up to 5 % of the table, else HNSW with ef_search 400."""
    if _org_size(org, destination, rule="legacy").rows is not None:
        return _exact_search(org, vector, k, destination)
    hits = _hnsw_search(org, vector, k, destination)
    if len(hits) < k:  # the index's candidates held too few of the org's rows
        _forget_sizes(org)
        return _exact_search(org, vector, k, destination)
    return hits


def _exact_search(org: uuid.UUID, vector: str, k: int,
                  destination: uuid.UUID | None) -> list[KnowledgeHit]:
    """Exact top-k of the org's (or destination's) rows: reads all of them."""
    if destination is None:
        cursor = execute_scoped(org, EXACT_SQL, (vector, org, k))
    else:
        cursor = execute_scoped(org, EXACT_DESTINATION_SQL, (vector, org, org, destination, k))
    return [_hit(row) for row in cursor.fetchall()]


def _quantized_search(org: uuid.UUID, vector: str, bits: str, k: int,
                      destination: uuid.UUID | None) -> list[KnowledgeHit]:
    """Top-k of the org's (or destination's) rows nearest by their quantized bits, re-ranked
    exactly: ``min(k, rows)`` hits, since at least ``k`` candidates are re-ranked; the
    exact scan's instead where the bits ranked the rows too closely to be trusted."""
    candidates = quantized_candidates(k)
    if destination is None:
        cursor = execute_scoped(org, QUANTIZED_SQL,
                                (bits, org, candidates, bits, vector, org, k))
    else:
        cursor = execute_scoped(org, QUANTIZED_DESTINATION_SQL,
                                (bits, org, org, destination, candidates, bits, vector, org, k))
    rows = cursor.fetchall()
    if not _confident(rows, candidates):
        return _exact_search(org, vector, k, destination)
    return [_hit(row) for row in rows]


def _confident(rows: Sequence[Sequence[Any]], candidates: int) -> bool:
    """Whether no row left out of the candidates is likely to belong among the hits.

    Every row left out has a Hamming distance of at least the cutoff (the candidates'
    largest). A row as near as the worst hit has bits about as far as the worst hit's,
    give or take sqrt(n p (1 - p)) for n bits with p of them differing (each bit a coin
    of its own, as for random hyperplanes): with the cutoff QUANTIZED_MIN_MARGIN of those
    beyond, such a row is unlikely to have been left out. Fewer candidates than asked
    for means every row was one: the result is exact.
    """
    if not rows or rows[0][-1] < candidates:
        return True
    worst = max(int(row[-3]) for row in rows)
    cutoff = int(rows[0][-2])
    share = min(max(worst, 1), EMBEDDING_DIMENSIONS - 1) / EMBEDDING_DIMENSIONS
    spread = math.sqrt(EMBEDDING_DIMENSIONS * share * (1.0 - share))
    return cutoff - worst >= QUANTIZED_MIN_MARGIN * spread


def _hnsw_search(org: uuid.UUID, vector: str, k: int,
                 destination: uuid.UUID | None) -> list[KnowledgeHit]:
    """pgvector < 0.8: approximate top-k through the HNSW index; may return fewer than k."""
    ef = min(HNSW_EF_SEARCH_MAX, max(HNSW_EF_SEARCH, k))
    workers = _worker_settings({"hnsw.ef_search": str(ef)})
    if destination is None:
        cursor = database.execute_scoped_sql(org, HNSW_SQL, (str(ef), vector, org, k),
                                             settings=workers)
    else:
        cursor = database.execute_scoped_sql(
            org, HNSW_DESTINATION_SQL, (str(ef), vector, org, ef, destination, k),
            settings=workers)
    hits = [_hit(row) for row in cursor.fetchall()]
    _reset_settings(RESET_EF_SEARCH_SQL)
    return hits


def _iterative_hnsw_search(org: uuid.UUID, vector: str, k: int,
                           destination: uuid.UUID | None, *,
                           table_rows: float = 0.0) -> list[KnowledgeHit]:
    """pgvector >= 0.8: iterative HNSW top-k; short only if the scan hit its bound."""
    ef = min(HNSW_EF_SEARCH_MAX, max(iterative_ef_search(table_rows), k))
    fetch = max(ITERATIVE_FETCH, k)
    settings = (str(ef), str(ITERATIVE_MAX_SCAN_TUPLES))
    workers = _worker_settings({"hnsw.ef_search": settings[0],
                                "hnsw.iterative_scan": "relaxed_order",
                                "hnsw.max_scan_tuples": settings[1]})
    if destination is None:
        cursor = database.execute_scoped_sql(
            org, ITERATIVE_SQL, (*settings, vector, org, fetch, k), settings=workers)
    else:
        cursor = database.execute_scoped_sql(
            org, ITERATIVE_DESTINATION_SQL,
            (*settings, vector, org, org, destination, fetch, k), settings=workers)
    hits = [_hit(row) for row in cursor.fetchall()]
    _reset_settings(RESET_SETTINGS_SQL)
    return hits


def _worker_settings(settings: Mapping[str, str]) -> Mapping[str, str] | None:
    """On a Citus coordinator, the index settings again, for tenantdb.scoping to send as
    propagated ``SET LOCAL``s (the statement's own ``set_config`` calls stay on the
    coordinator, and the workers run the index scans); ``None`` elsewhere."""
    return settings if _table_rows_on_shards() is not None else None


def _table_rows_on_shards() -> float | None:
    """The embedding table's size from its shards on a Citus coordinator, else ``None``."""
    from .citus import cached_table_rows

    return cached_table_rows(database.connection(), "embedding")


def _reset_settings(statement: str) -> None:
    """Inside a caller's transaction, give its later statements the session's settings."""
    if database.in_transaction():
        database.execute_sql(statement)


# -- the org's size, cached ----------------------------------------------------------------

class _Size(NamedTuple):
    rows: int | None  # the rows to rank, up to the rule's bound; None: more, HNSW ranks them
    table: float  # the table's rows when they were counted (-1: never analysed)


_Rule = Literal["legacy", "iterative", "quantized"]
_SizeKey = tuple[object, uuid.UUID, "uuid.UUID | None", _Rule]
_sizes: dict[_SizeKey, tuple[float, _Size]] = {}


class _Features(NamedTuple):
    iterative: bool  # pgvector >= 0.8: hnsw.iterative_scan
    quantized: bool  # migration V01_09's embedding.vector_bits


_features: dict[object, _Features] = {}
_cache_lock = threading.Lock()


def _org_size(org: uuid.UUID, destination: uuid.UUID | None, *, rule: _Rule) -> _Size:
    """The rows to rank if they are few enough for ``rule``'s exact or quantized search,
    else ``None`` (use HNSW), and the table's size.

    ``rule``: "quantized" bounds the count at :func:`quantized_scan_rows`; "iterative" at
    :func:`exact_scan_rows` (pgvector >= 0.8 without V01_09); "legacy" at
    :data:`EXACT_SCAN_FRACTION` of the table (pgvector < 0.8). Under the last two, a table
    never analysed (``reltuples`` -1) gets ``-1``: every org is then scanned exactly; the
    first keeps the count (orgs of up to QUANTIZED_SCAN_MIN_ROWS are then ranked without
    HNSW).
    """
    key: _SizeKey = (_server_key(), org, destination, rule)
    now = time.monotonic()
    with _cache_lock:
        cached = _sizes.get(key)
    if cached is not None and now - cached[0] < SIZE_CACHE_SECONDS:
        return cached[1]
    bounds = {"quantized": (QUANTIZED_SCAN_MIN_ROWS, 0.0, QUANTIZED_ROWS_PER_SQRT),
              "iterative": (EXACT_SCAN_MIN_ROWS, 0.0, EXACT_SCAN_ROWS_PER_SQRT),
              "legacy": (0, EXACT_SCAN_FRACTION, 0.0)}[rule]
    counted, table = _count_org_rows(org, destination, bounds)
    rows: int | None = counted
    if table < 0 and rule != "quantized":  # the bound needs the table's size
        rows = -1
    elif counted > _threshold(table, *bounds):
        rows = None
    with _cache_lock:
        if len(_sizes) >= _MAX_SIZES_CACHED:  # keep the live entries only
            for stale in [k for k, (at, _) in _sizes.items() if now - at >= SIZE_CACHE_SECONDS]:
                del _sizes[stale]
            if len(_sizes) >= _MAX_SIZES_CACHED:
                _sizes.clear()
        _sizes[key] = (now, _Size(rows, table))
    return _Size(rows, table)


def _count_org_rows(org: uuid.UUID, destination: uuid.UUID | None,
                    rule: tuple[int, float, float]) -> tuple[int, float]:
    """The org's rows, counted up to one past the threshold, and the table's size."""
    shards = _table_rows_on_shards()
    if shards is not None:  # Citus: the size from the shards, the cap computed here
        cap = _threshold(shards, *rule) + 1
        if destination is None:
            row = execute_scoped(org, CAPPED_COUNT_SQL, (org, cap)).fetchone()
        else:
            row = execute_scoped(org, CAPPED_COUNT_DESTINATION_SQL,
                                 (org, org, destination, cap)).fetchone()
        return int(row[0]), shards
    if destination is None:
        row = execute_scoped(org, COUNT_SQL, (org, *rule)).fetchone()
    else:
        row = execute_scoped(org, COUNT_DESTINATION_SQL, (org, org, destination, *rule)
                             ).fetchone()
    return int(row[0]), float(row[1])


def _threshold(table: float, min_rows: int, fraction: float, per_sqrt: float) -> int:
    """What _CAP_SQL computes, minus the one past it (the two must agree)."""
    table = max(table, 0.0)
    return max(min_rows, math.floor(table * fraction), math.floor(math.sqrt(table) * per_sqrt))


def _forget_sizes(org: uuid.UUID) -> None:
    with _cache_lock:
        for key in [key for key in _sizes if key[1] == org]:
            del _sizes[key]


def _server_key() -> object:
    """Which database the pool is bound to: caches are per database."""
    return (database.database, tuple(sorted((str(k), str(v)) for k, v
                                            in database.connect_params.items())))


def _has_iterative_scan() -> bool:
    """Whether the database's pgvector has ``hnsw.iterative_scan`` (0.8 and later)."""
    return _server_features().iterative


def _has_quantized_vectors() -> bool:
    """Whether the embedding table has V01_09's ``vector_bits`` (pgvector 0.7 and later)."""
    return _server_features().quantized


def _server_features() -> _Features:
    """What the database offers the search, read once per database and process."""
    key = _server_key()
    with _cache_lock:
        known = _features.get(key)
    if known is not None:
        return known
    version, quantized = database.execute_sql(FEATURES_SQL).fetchone()
    found = _Features(version is not None and _version_tuple(str(version)) >= (0, 8),
                      bool(quantized))
    with _cache_lock:
        if len(_features) >= _MAX_VERSIONS_CACHED:
            _features.clear()
        _features[key] = found
    return found


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


# -- text queries ---------------------------------------------------------------------------


def _org_model(org: uuid.UUID) -> str | None:
    row = execute_scoped(org, ORG_MODEL_SQL, (org,)).fetchone()
    return None if row is None else str(row[0])


def _embed_query(org: uuid.UUID, text: str, embedder: Embedder | None
                 ) -> tuple[str, str] | None:
    """The text's vector and bits literals (:func:`_query_literals`), embedded with the
    org's model; ``None``: the org has no vectors."""
    model = _org_model(org)
    if model is None:
        return None
    if embedder is None:
        embedder = get_embedder(model)
    if embedder.name != model:
        raise ValueError(
            f"embedder {embedder.name!r} is not the model of org {org}'s vectors ({model!r}): "
            f"search with the embedder named {model!r} (register_embedder() it at start-up), "
            "or pass a query vector"
        )
    _check_embedder(embedder)
    vectors = embedder.embed([text])
    if len(vectors) != 1:
        raise ValueError(f"embedder {embedder.name!r} returned {len(vectors)} vectors for "
                         "1 text")
    return _query_literals(vectors[0], "the query's vector")


def _check_embedder(embedder: Embedder) -> None:
    if embedder.dimensions != EMBEDDING_DIMENSIONS:
        raise ValueError(f"embedder {embedder.name!r} makes {embedder.dimensions}-dim vectors; "
                         f"embedding.vector has {EMBEDDING_DIMENSIONS}")


# -- helpers -------------------------------------------------------------------------------


def _hit(row: Sequence[Any]) -> KnowledgeHit:
    org = row[0]
    embedding = _stored(Embedding, _EMBEDDING_FIELDS, row[:7])
    embedding.__data__["vector"] = None
    item = _stored(KnowledgeItem, ("org_id", *_ITEM_FIELDS), (org, *row[7:15]))
    return KnowledgeHit(item=item, embedding=embedding, distance=float(row[15]))


def _stored(model: type[Any], names: Sequence[str], values: Sequence[Any]) -> Any:
    """A row as Peewee builds it from a cursor: values converted, nothing dirty.

    Filled in directly rather than through ``Model(**values)``: its per-field setattr
    made building ten hits cost as much as a small org's whole exact scan.
    """
    fields = model._meta.fields
    return pi.loaded_instance(model, {
        name: (value if value is None else fields[name].python_value(value))
        for name, value in zip(names, values, strict=True)})


def _vector_literal(values: object, name: str) -> str:
    """``values`` in pgvector's text form, checked by :func:`~tenantdb.validation.check_vector`."""
    return _query_literals(values, name)[0]


def _query_literals(values: object, name: str) -> tuple[str, str]:
    """``values`` checked by :func:`~tenantdb.validation.check_vector`, in pgvector's text
    form and as the bit string pgvector's ``binary_quantize`` makes of it (1 where a float
    is above zero), in hex: what the quantized search compares with ``vector_bits``."""
    checked = check_vector(values, name, dimensions=EMBEDDING_DIMENSIONS)
    # 9 significant digits give back every float32 exactly; one %-format runs in C.
    literal = _LITERAL_TEMPLATE % tuple(checked)
    # The float32 values the server stores (a float64 below float32's range is 0 there).
    bits = np.packbits(np.frombuffer(checked, dtype=np.float32) > 0)
    return literal, "x" + bits.tobytes().hex()


_LITERAL_TEMPLATE = "[" + ",".join(["%.9g"] * EMBEDDING_DIMENSIONS) + "]"


def _check_k(k: object) -> None:
    check_int(k, "k", minimum=1, maximum=MAX_K)


def _optional_uuid(value: object, name: str) -> uuid.UUID | None:
    return check_optional_uuid(value, name)


def _check_texts(title: object, content: object, chunks: Sequence[object]) -> list[str]:
    if not isinstance(title, str) or not isinstance(content, str):
        raise ValueError("add_knowledge() needs title and content as str")
    if isinstance(chunks, str) or not chunks:
        raise ValueError("chunks must be a non-empty list of str (or None for [content])")
    texts = list(chunks)
    if not all(isinstance(text, str) for text in texts):
        raise ValueError("every chunk must be a str")
    return [str(text) for text in texts]


def _embed(embedder: Embedder, texts: list[str]) -> list[list[float]]:
    """The chunks' vectors, each checked before any SQL runs."""
    _check_embedder(embedder)
    vectors = embedder.embed(texts)
    if len(vectors) != len(texts):
        raise ValueError(f"embedder {embedder.name!r} returned {len(vectors)} vectors for "
                         f"{len(texts)} chunks")
    return [check_vector(vector, f"chunk {index}'s vector",
                         dimensions=EMBEDDING_DIMENSIONS).tolist()
            for index, vector in enumerate(vectors)]
