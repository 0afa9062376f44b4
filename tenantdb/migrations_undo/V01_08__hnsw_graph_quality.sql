-- Undo of V01_08__hnsw_graph_quality.sql: the HNSW index as V01_03 built it (pgvector's
-- defaults, m = 16 and ef_construction = 64). The rebuild holds the table's write lock.
-- One DO block, one command: Citus refuses a string of several commands that change a
-- distributed table's indexes.
DO $$
BEGIN
    DROP INDEX IF EXISTS embedding_vector_hnsw_idx;
    CREATE INDEX embedding_vector_hnsw_idx ON embedding USING hnsw (vector vector_cosine_ops);
END $$;
