-- Undo of V01_03__knowledge_search.sql: drop the HNSW index and give the vector column back
-- pgvector's default storage (EXTERNAL). Rows already stored inline stay inline until they
-- are rewritten; both layouts read the same.

DROP INDEX IF EXISTS embedding_vector_hnsw_idx;

ALTER TABLE embedding ALTER COLUMN vector SET STORAGE EXTERNAL;
