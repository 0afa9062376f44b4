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

GRANT SELECT, INSERT, UPDATE, DELETE ON app_user TO tenantdb_app, tenantdb_admin;
ALTER TABLE app_user ENABLE ROW LEVEL SECURITY;
ALTER TABLE app_user FORCE ROW LEVEL SECURITY;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_policies
                   WHERE tablename = 'app_user' AND policyname = 'tenant_isolation') THEN
        CREATE POLICY tenant_isolation ON app_user FOR ALL TO tenantdb_app
            USING (org_id = current_setting('tenantdb.org_id')::uuid)
            WITH CHECK (org_id = current_setting('tenantdb.org_id')::uuid);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policies
                   WHERE tablename = 'app_user' AND policyname = 'cross_org_admin') THEN
        CREATE POLICY cross_org_admin ON app_user FOR ALL TO tenantdb_admin
            USING (true) WITH CHECK (true);
    END IF;
END
$$;

GRANT SELECT, INSERT, UPDATE, DELETE ON refresh_token TO tenantdb_app, tenantdb_admin;
ALTER TABLE refresh_token ENABLE ROW LEVEL SECURITY;
ALTER TABLE refresh_token FORCE ROW LEVEL SECURITY;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_policies
                   WHERE tablename = 'refresh_token' AND policyname = 'tenant_isolation') THEN
        CREATE POLICY tenant_isolation ON refresh_token FOR ALL TO tenantdb_app
            USING (org_id = current_setting('tenantdb.org_id')::uuid)
            WITH CHECK (org_id = current_setting('tenantdb.org_id')::uuid);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policies
                   WHERE tablename = 'refresh_token' AND policyname = 'cross_org_admin') THEN
        CREATE POLICY cross_org_admin ON refresh_token FOR ALL TO tenantdb_admin
            USING (true) WITH CHECK (true);
    END IF;
END
$$;

GRANT SELECT, INSERT, UPDATE, DELETE ON destination TO tenantdb_app, tenantdb_admin;
ALTER TABLE destination ENABLE ROW LEVEL SECURITY;
ALTER TABLE destination FORCE ROW LEVEL SECURITY;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_policies
                   WHERE tablename = 'destination' AND policyname = 'tenant_isolation') THEN
        CREATE POLICY tenant_isolation ON destination FOR ALL TO tenantdb_app
            USING (org_id = current_setting('tenantdb.org_id')::uuid)
            WITH CHECK (org_id = current_setting('tenantdb.org_id')::uuid);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policies
                   WHERE tablename = 'destination' AND policyname = 'cross_org_admin') THEN
        CREATE POLICY cross_org_admin ON destination FOR ALL TO tenantdb_admin
            USING (true) WITH CHECK (true);
    END IF;
END
$$;

GRANT SELECT, INSERT, UPDATE, DELETE ON knowledge_item TO tenantdb_app, tenantdb_admin;
ALTER TABLE knowledge_item ENABLE ROW LEVEL SECURITY;
ALTER TABLE knowledge_item FORCE ROW LEVEL SECURITY;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_policies
                   WHERE tablename = 'knowledge_item' AND policyname = 'tenant_isolation') THEN
        CREATE POLICY tenant_isolation ON knowledge_item FOR ALL TO tenantdb_app
            USING (org_id = current_setting('tenantdb.org_id')::uuid)
            WITH CHECK (org_id = current_setting('tenantdb.org_id')::uuid);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policies
                   WHERE tablename = 'knowledge_item' AND policyname = 'cross_org_admin') THEN
        CREATE POLICY cross_org_admin ON knowledge_item FOR ALL TO tenantdb_admin
            USING (true) WITH CHECK (true);
    END IF;
END
$$;

GRANT SELECT, INSERT, UPDATE, DELETE ON embedding TO tenantdb_app, tenantdb_admin;
ALTER TABLE embedding ENABLE ROW LEVEL SECURITY;
ALTER TABLE embedding FORCE ROW LEVEL SECURITY;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_policies
                   WHERE tablename = 'embedding' AND policyname = 'tenant_isolation') THEN
        CREATE POLICY tenant_isolation ON embedding FOR ALL TO tenantdb_app
            USING (org_id = current_setting('tenantdb.org_id')::uuid)
            WITH CHECK (org_id = current_setting('tenantdb.org_id')::uuid);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policies
                   WHERE tablename = 'embedding' AND policyname = 'cross_org_admin') THEN
        CREATE POLICY cross_org_admin ON embedding FOR ALL TO tenantdb_admin
            USING (true) WITH CHECK (true);
    END IF;
END
$$;

GRANT SELECT, INSERT, UPDATE, DELETE ON agent_run TO tenantdb_app, tenantdb_admin;
ALTER TABLE agent_run ENABLE ROW LEVEL SECURITY;
ALTER TABLE agent_run FORCE ROW LEVEL SECURITY;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_policies
                   WHERE tablename = 'agent_run' AND policyname = 'tenant_isolation') THEN
        CREATE POLICY tenant_isolation ON agent_run FOR ALL TO tenantdb_app
            USING (org_id = current_setting('tenantdb.org_id')::uuid)
            WITH CHECK (org_id = current_setting('tenantdb.org_id')::uuid);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policies
                   WHERE tablename = 'agent_run' AND policyname = 'cross_org_admin') THEN
        CREATE POLICY cross_org_admin ON agent_run FOR ALL TO tenantdb_admin
            USING (true) WITH CHECK (true);
    END IF;
END
$$;

GRANT SELECT, INSERT, UPDATE, DELETE ON itinerary TO tenantdb_app, tenantdb_admin;
ALTER TABLE itinerary ENABLE ROW LEVEL SECURITY;
ALTER TABLE itinerary FORCE ROW LEVEL SECURITY;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_policies
                   WHERE tablename = 'itinerary' AND policyname = 'tenant_isolation') THEN
        CREATE POLICY tenant_isolation ON itinerary FOR ALL TO tenantdb_app
            USING (org_id = current_setting('tenantdb.org_id')::uuid)
            WITH CHECK (org_id = current_setting('tenantdb.org_id')::uuid);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policies
                   WHERE tablename = 'itinerary' AND policyname = 'cross_org_admin') THEN
        CREATE POLICY cross_org_admin ON itinerary FOR ALL TO tenantdb_admin
            USING (true) WITH CHECK (true);
    END IF;
END
$$;

GRANT SELECT, INSERT, UPDATE, DELETE ON idempotency_key TO tenantdb_app, tenantdb_admin;
ALTER TABLE idempotency_key ENABLE ROW LEVEL SECURITY;
ALTER TABLE idempotency_key FORCE ROW LEVEL SECURITY;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_policies
                   WHERE tablename = 'idempotency_key' AND policyname = 'tenant_isolation') THEN
        CREATE POLICY tenant_isolation ON idempotency_key FOR ALL TO tenantdb_app
            USING (org_id = current_setting('tenantdb.org_id')::uuid)
            WITH CHECK (org_id = current_setting('tenantdb.org_id')::uuid);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policies
                   WHERE tablename = 'idempotency_key' AND policyname = 'cross_org_admin') THEN
        CREATE POLICY cross_org_admin ON idempotency_key FOR ALL TO tenantdb_admin
            USING (true) WITH CHECK (true);
    END IF;
END
$$;
