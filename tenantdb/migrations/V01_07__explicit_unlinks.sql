-- tenantdb 0.7: one schema for plain PostgreSQL and Citus.
-- Citus refuses ON DELETE SET NULL (col) on a foreign key that includes the distribution
-- column (org_id). The link from itinerary to agent_run becomes a plain (NO ACTION) key:
-- the retention purge, the one place runs are deleted, unlinks a run's itineraries itself
-- in the statement that deletes the run (tenantdb/retention.py).
-- The swap drops and re-adds a constraint, which the destructive-statement check of
-- `tenantdb migrate` refuses at top level (ALTER ... DROP): it runs inside a DO block,
-- whose body the check does not read, and only where the old SET NULL action is still in
-- place. No row is lost: the new key holds the same columns, and it is validated against
-- the existing rows in the same transaction. Re-runnable.
-- cross_org() statements take tenantdb_admin; on Citus the coordinator opens worker
-- connections as that role, so it must be able to log in (as on plain PostgreSQL, only
-- with the authentication the server's pg_hba.conf grants it).

DO $$
DECLARE
    link record;
BEGIN
    FOR link IN
        SELECT * FROM (VALUES
            ('itinerary_agent_run_fkey', 'agent_run_id', 'agent_run')
        ) AS l(name, col, parent)
    LOOP
        IF EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'itinerary'::regclass AND conname = link.name
                     AND confdeltype = 'n') THEN
            EXECUTE format('ALTER TABLE itinerary DROP CONSTRAINT %I', link.name);
            EXECUTE format('ALTER TABLE itinerary ADD CONSTRAINT %I FOREIGN KEY (org_id, %I) '
                           'REFERENCES %I (org_id, id)', link.name, link.col, link.parent);
        END IF;
    END LOOP;
END
$$;

ALTER ROLE tenantdb_admin LOGIN;

-- The clock of the idempotency statements (tenantdb/idempotency.py). clock_timestamp() is
-- VOLATILE, which Citus refuses in a statement that writes a distributed table; declared
-- STABLE, it is read once per statement (on Citus by the coordinator, which sends the
-- value to the shard), which is how those statements use it: each reads the clock once.
CREATE OR REPLACE FUNCTION tenantdb_clock() RETURNS timestamptz
    LANGUAGE sql STABLE PARALLEL SAFE
    AS 'SELECT clock_timestamp()';
