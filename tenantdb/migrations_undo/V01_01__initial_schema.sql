-- Undo of V01_01__initial_schema.sql, children before parents.
-- The vector extension stays: other schemas in the same database may use it, and
-- re-applying V01_01 finds it with CREATE EXTENSION IF NOT EXISTS.
DROP TABLE IF EXISTS idempotency_key;
DROP TABLE IF EXISTS itinerary;
DROP TABLE IF EXISTS agent_run;
DROP TABLE IF EXISTS embedding;
DROP TABLE IF EXISTS knowledge_item;
DROP TABLE IF EXISTS destination;
DROP TABLE IF EXISTS refresh_token;
DROP TABLE IF EXISTS app_user;
DROP TABLE IF EXISTS org;
