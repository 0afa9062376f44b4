-- Undo of V01_09__binary_quantized_vectors.sql: the search goes back to its exact and HNSW
-- strategies. Dropping the column (and with it its index) does not rewrite the table.
-- One DO block, one command: Citus refuses a string of several commands that change a
-- distributed table.
DO $$
BEGIN
    DROP INDEX IF EXISTS embedding_org_item_bits_idx;
    ALTER TABLE embedding DROP COLUMN IF EXISTS vector_bits;
END $$;
