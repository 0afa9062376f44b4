-- tenantdb 0.3: a database wall that nothing sent on an application connection can lower.
-- 1. tenantdb_app is a member of no role that bypasses row-level security: it no longer
--    belongs to tenantdb_admin, so SET ROLE tenantdb_admin (or set_config('role', ...)) on
--    a connection logged in as tenantdb_app fails.
-- 2. tenantdb_admin becomes a login of its own (NOBYPASSRLS still: its cross_org_admin
--    policies admit every row), used by cross_org work on connections of its own. Its
--    password is set by the operator (ALTER ROLE tenantdb_admin PASSWORD ...). The owner,
--    which migrates, may take it (in development the admin URL is the owner's).
-- 3. org is a protected table: the application role sees and updates only the org of its
--    statement (tenantdb.org_id), and cannot insert or delete orgs, so no cascading delete
--    from org is reachable from it. Creating and deleting orgs is admin work.
-- Re-runnable: every step checks or is idempotent. Nothing here deletes data.

REVOKE tenantdb_admin FROM tenantdb_app;
GRANT tenantdb_admin TO CURRENT_USER;
DO $$
BEGIN
    IF NOT (SELECT rolcanlogin FROM pg_roles WHERE rolname = 'tenantdb_admin') THEN
        ALTER ROLE tenantdb_admin LOGIN;
    END IF;
END
$$;

REVOKE INSERT, DELETE ON org FROM tenantdb_app;
GRANT SELECT, UPDATE ON org TO tenantdb_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON org TO tenantdb_admin;
ALTER TABLE org ENABLE ROW LEVEL SECURITY;
ALTER TABLE org FORCE ROW LEVEL SECURITY;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_policies
                   WHERE tablename = 'org' AND policyname = 'org_isolation') THEN
        CREATE POLICY org_isolation ON org FOR ALL TO tenantdb_app
            USING (id = current_setting('tenantdb.org_id')::uuid)
            WITH CHECK (id = current_setting('tenantdb.org_id')::uuid);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policies
                   WHERE tablename = 'org' AND policyname = 'cross_org_admin') THEN
        CREATE POLICY cross_org_admin ON org FOR ALL TO tenantdb_admin
            USING (true) WITH CHECK (true);
    END IF;
END
$$;
