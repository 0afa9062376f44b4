-- tenantdb 0.2: row-level security, the database's own wall between orgs.
-- The library works as tenantdb_app (no superuser, no BYPASSRLS, NOINHERIT): on every tenant
-- table it sees and writes only rows whose org_id equals the transaction-local setting
-- tenantdb.org_id. Reading that setting when it is unset raises an error (never zero rows):
-- current_setting() fails on an unknown setting, and ''::uuid fails once a transaction that
-- set it has ended. cross_org() statements take tenantdb_admin for their transaction only
-- (SET LOCAL ROLE), whose policy admits every row. NOINHERIT matters: a member that
-- inherited tenantdb_admin's rights would also fall under its policy. Table owners stay
-- bound by the policies too (FORCE ROW LEVEL SECURITY); superusers are not.
-- Re-runnable: roles and policies are created only when missing.

-- Roles belong to the whole cluster, and the migration lock to one database: two databases
-- migrating at once may both try to create a role, so losing that race is not an error.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tenantdb_app') THEN
        CREATE ROLE tenantdb_app LOGIN NOINHERIT NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tenantdb_admin') THEN
        CREATE ROLE tenantdb_admin NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

GRANT tenantdb_admin TO tenantdb_app;
-- The login that migrates (and connects) must be able to take the application role.
GRANT tenantdb_app TO CURRENT_USER;
GRANT USAGE ON SCHEMA public TO tenantdb_app, tenantdb_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON org TO tenantdb_app, tenantdb_admin;

-- The same grants and the same two policies on every tenant table.
DO $$
DECLARE
    tbl text;
BEGIN
    FOREACH tbl IN ARRAY ARRAY['app_user', 'refresh_token', 'destination', 'knowledge_item',
                               'embedding', 'agent_run', 'itinerary', 'idempotency_key']
    LOOP
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I '
                       'TO tenantdb_app, tenantdb_admin', tbl);
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', tbl);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', tbl);
        IF NOT EXISTS (SELECT 1 FROM pg_policies
                       WHERE tablename = tbl AND policyname = 'tenant_isolation') THEN
            EXECUTE format(
                'CREATE POLICY tenant_isolation ON %I FOR ALL TO tenantdb_app '
                'USING (org_id = current_setting(''tenantdb.org_id'')::uuid) '
                'WITH CHECK (org_id = current_setting(''tenantdb.org_id'')::uuid)', tbl);
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_policies
                       WHERE tablename = tbl AND policyname = 'cross_org_admin') THEN
            EXECUTE format('CREATE POLICY cross_org_admin ON %I FOR ALL TO tenantdb_admin '
                           'USING (true) WITH CHECK (true)', tbl);
        END IF;
    END LOOP;
END
$$;
