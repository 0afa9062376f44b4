-- Undo of V01_07: the itinerary link to its run clears itself again (plain PostgreSQL only: Citus
-- refuses this key on distributed tables). tenantdb_admin keeps LOGIN (V01_05 grants it).
ALTER TABLE itinerary DROP CONSTRAINT IF EXISTS itinerary_agent_run_fkey;
ALTER TABLE itinerary ADD CONSTRAINT itinerary_agent_run_fkey FOREIGN KEY (org_id, agent_run_id)
    REFERENCES agent_run (org_id, id) ON DELETE SET NULL (agent_run_id);
DROP FUNCTION IF EXISTS tenantdb_clock();
