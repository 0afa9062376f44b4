-- Undo of V01_07: the itinerary links clear themselves again (plain PostgreSQL only: Citus
-- refuses these keys on distributed tables). tenantdb_admin keeps LOGIN (V01_05 grants it).
ALTER TABLE itinerary DROP CONSTRAINT IF EXISTS itinerary_agent_run_fkey;
ALTER TABLE itinerary ADD CONSTRAINT itinerary_agent_run_fkey FOREIGN KEY (org_id, agent_run_id)
    REFERENCES agent_run (org_id, id) ON DELETE SET NULL (agent_run_id);
ALTER TABLE itinerary DROP CONSTRAINT IF EXISTS itinerary_destination_fkey;
ALTER TABLE itinerary ADD CONSTRAINT itinerary_destination_fkey
    FOREIGN KEY (org_id, destination_id)
    REFERENCES destination (org_id, id) ON DELETE SET NULL (destination_id);
