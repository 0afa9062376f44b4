-- tenantdb 0.9: binary-quantized vectors for the mid-sized orgs' knowledge search
-- (tenantdb/knowledge.py, README "Knowledge search").
-- vector_bits holds the sign of each of the 1536 floats (pgvector's binary_quantize, 192
-- bytes), kept by the server from the vector itself, whoever writes the row. The covering
-- index serves an org's (or its items') bits without reading the heap, where each row
-- fills an 8 KB page: the search ranks an org's rows by Hamming distance from the index,
-- then re-ranks the nearest few hundred by their exact cosine distance. On 100,000 rows
-- this took a 5,000-row org from 21 ms (exact scan) to 4-5 ms, with the same ten rows.
-- Only with pgvector 0.7 or later (binary_quantize): on an older one this does nothing,
-- and the search keeps its other strategies (README says how to add it after an upgrade).
-- Adding a stored generated column rewrites the table and rebuilds its indexes, the HNSW
-- one included: minutes per 100,000 rows, with the table locked. On a new (empty) table
-- it is immediate. Re-runnable: nothing happens once the column exists.
-- One DO block, one command: Citus refuses a string of several commands that change a
-- distributed table.

DO $$
BEGIN
    IF to_regprocedure('binary_quantize(vector)') IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM pg_attribute
        WHERE attrelid = 'embedding'::regclass AND attname = 'vector_bits'
          AND NOT attisdropped
    ) THEN
        ALTER TABLE embedding ADD COLUMN vector_bits bit(1536)
            GENERATED ALWAYS AS (binary_quantize(vector)::bit(1536)) STORED;
        CREATE INDEX embedding_org_item_bits_idx ON embedding (org_id, knowledge_item_id)
            INCLUDE (id, vector_bits);
    END IF;
END $$;
