"""Org-scoped similarity search over embeddings, with a guaranteed result count.

:func:`search_knowledge` returns the ``k`` chunks of one org nearest to a query vector
(cosine distance), each with its knowledge item. :func:`add_knowledge` stores an item and
its embedded chunks in one transaction.

Why not a plain ``WHERE org_id = ... ORDER BY vector <=> q LIMIT k``: pgvector 0.6 (the
version pgserver ships; ``hnsw.iterative_scan`` only arrives in 0.8) filters *after* the HNSW
scan, which yields at most ``hnsw.ef_search`` candidates (default 40) over the whole table.
An org holding 1 % of the rows then gets about 0.4 of its 10 rows back. The search
therefore picks a strategy per call, from the number of rows it has to rank (the org's, or
the org's rows of one destination) against the table's size (``pg_class.reltuples``):

- at most :data:`EXACT_SCAN_FRACTION` of the table: an exact scan of those rows through the
  ``(org_id, id)`` primary key, ranked by a top-k sort (``+ 0`` on the distance keeps the
  planner off the HNSW index). Exact, and cheap because the rows are few;
- more: the HNSW index with ``hnsw.ef_search`` raised to :data:`HNSW_EF_SEARCH` for the one
  statement. With at least 5 % of the candidates belonging to the org, about 20 of the 400
  survive the filter, enough for ``k = 10`` at recall above 0.95;
- if the HNSW scan still returns fewer than ``min(k, rows)`` rows (a clustered org, a
  ``k`` near ``ef_search``), the exact scan runs instead: the result count is never short.

Measured with ``bench/knowledge.py`` (PostgreSQL 16.2, pgvector 0.6.2, 100k clustered
1536-dim vectors, orgs of 0.1 % to 50 % of the rows, 40 queries each, 2 busy cores):
recall@10 0.985-1.000 at every org size; p50 2-6 ms up to 2 % of the table, 16 ms at the
5 % threshold (exact: about 2.5 ms per 1,000 rows), 10-11 ms on the HNSW path whatever the
org's size (p95 <= 21 ms). An exact scan of the 50 % org costs 101 ms; naive filtered HNSW
(ef_search 40) came back short for 38-40 of 40 queries at 1-10 % (recall 0.03-0.38).

The rows to rank are counted with a capped index-only count (it stops one past the
threshold), so deciding costs at most as much as the exact scan it may replace. A table
never analysed (``reltuples`` -1) is scanned exactly. The vector column is stored inline
(``STORAGE PLAIN``, migration V01_03): exact scans then read no TOAST and run 2.5-3x
faster. Row-level security does not change the plans: the planner folds its
``org_id = current_setting(...)`` into a one-time filter beside the explicit predicate.

``hnsw.ef_search`` is set with ``set_config(..., true)``: it lasts until the end of the
transaction, which is the statement itself in autocommit mode; inside a caller's
transaction it stays raised until that transaction ends (it only makes later HNSW scans
more thorough).
"""

from __future__ import annotations

import math
import numbers
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .context import OrgLike, parse_uuid, require_org
from .db import database
from .embedder import Embedder, default_embedder
from .models import EMBEDDING_DIMENSIONS, Embedding, KnowledgeItem
from .tenancy import execute_scoped

__all__ = [
    "EXACT_SCAN_FRACTION",
    "HNSW_EF_SEARCH",
    "HNSW_EF_SEARCH_MAX",
    "MAX_K",
    "KnowledgeHit",
    "add_knowledge",
    "search_knowledge",
]

# Strategy constants, measured on PostgreSQL 16.2 + pgvector 0.6.2 with 100k x 1536 clustered
# vectors on 2 cores: bench/knowledge.py, and a one-off ef_search sweep of the same data set
# (ef 100/200/400/1000 x org sizes 1-50 %) made while choosing them:
#: Orgs (or org + destination) with at most this fraction of the table's rows are scanned
#: exactly: ~10 ms at 5 % of 100k rows, and HNSW with ef_search 400 keeps recall@10 >= 0.95
#: from 5 % upwards (at 1 % it returned short results for every query).
EXACT_SCAN_FRACTION = 0.05
#: ef_search of the HNSW path: 200 left 21/50 queries short at 5 %; 400 none, at a p50 of
#: 7-13 ms; 1000 costs ~30 ms for no better recall.
HNSW_EF_SEARCH = 400
#: pgvector's upper bound for hnsw.ef_search.
HNSW_EF_SEARCH_MAX = 1000
#: The largest k accepted: an HNSW scan cannot return more than ef_search rows.
MAX_K = HNSW_EF_SEARCH_MAX
# float32 is what pgvector stores: a larger finite double would become infinite there.
_FLOAT32_MAX = 3.4028234663852886e38

# SQL
# Rows to rank, counted up to one past the exact-scan threshold (or k), and the table's
# planner row count (-1 before the first ANALYZE). Parameters: org (org, dest), fraction, k.
# On Citus the coordinator's reltuples says nothing (the rows live in shards): the size
# summed from the shards' statistics comes in as a parameter there, NULL elsewhere.
_ROWS_SQL = ("(SELECT coalesce(%s::float8, reltuples) FROM pg_class "
             "WHERE oid = 'embedding'::regclass)")
_CAP_SQL = f"(SELECT greatest(floor(greatest({_ROWS_SQL}, 0) * %s), %s)::bigint + 1)"
COUNT_SQL = (
    "SELECT (SELECT count(*) FROM (SELECT 1 FROM embedding WHERE org_id = %s "
    f"LIMIT {_CAP_SQL}) capped), {_ROWS_SQL}"
)
COUNT_DESTINATION_SQL = (
    "SELECT (SELECT count(*) FROM (SELECT 1 FROM embedding e JOIN knowledge_item i "
    "ON i.org_id = e.org_id AND i.id = e.knowledge_item_id "
    "WHERE e.org_id = %s AND i.org_id = %s AND i.destination_id = %s "
    f"LIMIT {_CAP_SQL}) capped), {_ROWS_SQL}"
)
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
# large org) and keeps a top-k heap. The item join comes
# after the LIMIT: joining every row of a large org first costs more than the ranking.
# Parameters: query vector, org, k.
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
# HNSW: ef_search is raised for this transaction only (set_config's third argument), in
# the same round trip. Parameters: ef_search, vector, org, vector, limit.
_EF_SQL = "SELECT set_config('hnsw.ef_search', %s, true); "
HNSW_SQL = (
    f"{_EF_SQL}SELECT {_HIT_COLUMNS} FROM (SELECT {_EMBEDDING_COLUMNS}, "
    "e.vector <=> %s::vector AS distance FROM embedding e WHERE e.org_id = %s "
    f"ORDER BY e.vector <=> %s::vector LIMIT %s) h {_ITEM_JOIN} ORDER BY h.distance"
)
# HNSW within one destination: the inner scan takes every candidate of the org (at most
# ef_search), the join keeps the destination's. Parameters: ef_search, vector, org, vector,
# ef_search, dest, k.
HNSW_DESTINATION_SQL = (
    f"{_EF_SQL}SELECT {_HIT_COLUMNS} FROM (SELECT {_EMBEDDING_COLUMNS}, "
    "e.vector <=> %s::vector AS distance FROM embedding e WHERE e.org_id = %s "
    f"ORDER BY e.vector <=> %s::vector LIMIT %s) h {_ITEM_JOIN} "
    "WHERE i.destination_id = %s ORDER BY h.distance LIMIT %s"
)

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


def search_knowledge(org_id: OrgLike, query_vector: Sequence[float], k: int = 10, *,
                     destination_id: uuid.UUID | str | None = None) -> list[KnowledgeHit]:
    """The ``k`` chunks of ``org_id`` nearest to ``query_vector``, nearest first.

    Exactly ``k`` hits when the org (or the destination) holds at least ``k`` chunks, else
    all of them. Which strategy runs is explained in the module docstring.

    :param query_vector: :data:`~tenantdb.models.EMBEDDING_DIMENSIONS` finite numbers, not
        all zero (a numpy array or any sequence).
    :param k: how many hits, 1 to :data:`MAX_K`.
    :param destination_id: only chunks of knowledge items about this destination.
    :raises MissingOrgError: no org, or not a UUID.
    :raises ValueError: a wrong dimension, NaN or infinite values, a zero vector, a ``k``
        out of range, or a ``destination_id`` that is not a UUID. Nothing runs then.
    """
    org = require_org(org_id, "search_knowledge()")
    vector = _vector_literal(query_vector, "query_vector")
    _check_k(k)
    destination = _optional_uuid(destination_id, "destination_id")
    rows, total = _count_rows(org, k, destination)
    if total < 0 or rows <= EXACT_SCAN_FRACTION * total:
        return _exact_search(org, vector, k, destination)
    hits = _hnsw_search(org, vector, k, destination)
    if len(hits) < min(k, rows):  # the index's candidates held too few of the org's rows
        return _exact_search(org, vector, k, destination)
    return hits


def add_knowledge(org_id: OrgLike, title: str, content: str, *,
                  destination_id: uuid.UUID | str | None = None,
                  chunks: Sequence[str] | None = None, embedder: Embedder | None = None,
                  source_url: str | None = None,
                  metadata: Mapping[str, Any] | None = None) -> KnowledgeItem:
    """Store a knowledge item and one embedding per chunk, in one transaction.

    The chunks are embedded before the transaction opens, so a slow embedder holds no locks.

    :param chunks: the texts to embed, in order (``chunk_index`` 0, 1, ...); default
        ``[content]``.
    :param embedder: default :func:`~tenantdb.embedder.default_embedder`; its vectors must
        have :data:`~tenantdb.models.EMBEDDING_DIMENSIONS` finite values.
    :raises MissingOrgError: no org, or not a UUID.
    :raises ValueError: a non-text title, content or chunk, no chunks, an embedder of another
        dimension or one returning bad vectors, or a ``destination_id`` that is not a UUID.
    :raises peewee.IntegrityError: the destination does not exist in this org.
    """
    org = require_org(org_id, "add_knowledge()")
    destination = _optional_uuid(destination_id, "destination_id")
    texts = _check_texts(title, content, [content] if chunks is None else chunks)
    embedder = embedder or default_embedder()
    vectors = _embed(embedder, texts)
    with database.atomic():
        item = KnowledgeItem.create(org_id=org, destination_id=destination, title=title,
                                    content=content, source_url=source_url,
                                    metadata=dict(metadata or {}))
        Embedding.insert_many(
            [{"org_id": org, "knowledge_item_id": item.id, "chunk_index": index,
              "content": text, "vector": vector, "model": embedder.name}
             for index, (text, vector) in enumerate(zip(texts, vectors, strict=True))],
            org_id=org,
        ).execute()
    return item


# -- strategies ----------------------------------------------------------------------------


def _count_rows(org: uuid.UUID, k: int, destination: uuid.UUID | None) -> tuple[int, float]:
    """Rows to rank (exact up to the threshold, or k; capped beyond) and the table's size."""
    shards = _shard_rows()
    if destination is None:
        row = execute_scoped(org, COUNT_SQL,
                             (org, shards, EXACT_SCAN_FRACTION, k, shards)).fetchone()
    else:
        row = execute_scoped(org, COUNT_DESTINATION_SQL,
                             (org, org, destination, shards, EXACT_SCAN_FRACTION, k, shards)
                             ).fetchone()
    return int(row[0]), float(row[1])


def _exact_search(org: uuid.UUID, vector: str, k: int,
                  destination: uuid.UUID | None) -> list[KnowledgeHit]:
    """Exact top-k of the org's (or destination's) rows: reads all of them."""
    if destination is None:
        cursor = execute_scoped(org, EXACT_SQL, (vector, org, k))
    else:
        cursor = execute_scoped(org, EXACT_DESTINATION_SQL, (vector, org, org, destination, k))
    return [_hit(row) for row in cursor.fetchall()]


def _hnsw_search(org: uuid.UUID, vector: str, k: int,
                 destination: uuid.UUID | None) -> list[KnowledgeHit]:
    """Approximate top-k through the HNSW index; may return fewer than k rows."""
    ef = min(HNSW_EF_SEARCH_MAX, max(HNSW_EF_SEARCH, k))
    if destination is None:
        cursor = _execute_with_ef(org, HNSW_SQL, (str(ef), vector, org, vector, k))
    else:
        cursor = _execute_with_ef(org, HNSW_DESTINATION_SQL,
                                  (str(ef), vector, org, vector, ef, destination, k))
    return [_hit(row) for row in cursor.fetchall()]


# -- Citus hooks: the table's size from its shards, ef_search on the workers ---------------


def _shard_rows() -> float | None:
    """The embedding table's size summed from its shards on Citus; ``None`` elsewhere."""
    from .citus import cached_table_rows

    return cached_table_rows(database.connection(), "embedding")


def _execute_with_ef(org: uuid.UUID, statement: str, params: tuple[Any, ...]) -> Any:
    """Run an HNSW statement (``_EF_SQL`` first, ef_search its first parameter). On Citus
    ``set_config`` stays on the coordinator, so ef_search goes as a propagated SET LOCAL."""
    from .citus import is_coordinator

    if not is_coordinator(database.connection()):
        return execute_scoped(org, statement, params)
    return database.execute_scoped_sql(org, statement[len(_EF_SQL):], params[1:],
                                       settings={"hnsw.ef_search": params[0]})


# -- helpers -------------------------------------------------------------------------------


def _hit(row: Sequence[Any]) -> KnowledgeHit:
    embedding_values = row[:7]
    item_values = row[7:15]
    org = embedding_values[0]
    embedding = _model(Embedding, {"vector": None,
                                   **dict(zip(_EMBEDDING_FIELDS, embedding_values, strict=True))})
    item = _model(KnowledgeItem,
                  {"org_id": org, **dict(zip(_ITEM_FIELDS, item_values, strict=True))})
    return KnowledgeHit(item=item, embedding=embedding, distance=float(row[15]))


def _model(model: type[Any], values: Mapping[str, Any]) -> Any:
    """A row as Peewee itself builds it from a cursor: values converted, marked as stored."""
    fields = model._meta.fields
    converted = {name: (value if value is None else fields[name].python_value(value))
                 for name, value in values.items()}
    return model(__no_default__=True, **converted)


def _vector_literal(values: object, name: str) -> str:
    """``values`` in pgvector's text form, checked by :func:`_check_vector`."""
    return "[" + ",".join(map(repr, _check_vector(values, name))) + "]"


def _check_vector(values: object, name: str) -> list[float]:
    """``values`` as floats, or ValueError naming what is wrong."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence of {EMBEDDING_DIMENSIONS} floats, "
                         f"got {type(values).__name__}")
    floats = []
    for value in values:
        if not isinstance(value, numbers.Real):
            raise ValueError(f"{name} holds a {type(value).__name__}: only numbers")
        floats.append(float(value))
    if len(floats) != EMBEDDING_DIMENSIONS:
        raise ValueError(f"{name} has {len(floats)} dimensions; embedding.vector has "
                         f"{EMBEDDING_DIMENSIONS}: embed with a {EMBEDDING_DIMENSIONS}-dim model")
    if not all(math.isfinite(x) and abs(x) <= _FLOAT32_MAX for x in floats):
        raise ValueError(f"{name} holds NaN or infinite values (or beyond float32)")
    if not any(floats):
        raise ValueError(f"{name} is all zeros: cosine distance to it is undefined")
    return floats


def _check_k(k: object) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an int from 1 to {MAX_K}, got {k!r}")


def _optional_uuid(value: object, name: str) -> uuid.UUID | None:
    parsed = parse_uuid(value)
    if value is None or parsed is not None:
        return parsed
    raise ValueError(f"{name} must be a UUID or None, got {value!r}")


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
    if embedder.dimensions != EMBEDDING_DIMENSIONS:
        raise ValueError(f"embedder {embedder.name!r} makes {embedder.dimensions}-dim vectors; "
                         f"embedding.vector has {EMBEDDING_DIMENSIONS}")
    vectors = embedder.embed(texts)
    if len(vectors) != len(texts):
        raise ValueError(f"embedder {embedder.name!r} returned {len(vectors)} vectors for "
                         f"{len(texts)} chunks")
    return [_check_vector(vector, f"chunk {index}'s vector")
            for index, vector in enumerate(vectors)]
