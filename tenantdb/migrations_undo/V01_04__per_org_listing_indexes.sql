-- Undo of V01_04__per_org_listing_indexes.sql.
DROP INDEX IF EXISTS knowledge_item_org_created_idx;
DROP INDEX IF EXISTS destination_org_created_idx;
