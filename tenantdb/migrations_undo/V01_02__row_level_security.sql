-- Undo of V01_02__row_level_security.sql. The roles stay: they belong to the whole cluster
-- and other databases on it may use them.
DO $$
DECLARE
    tbl text;
BEGIN
    FOREACH tbl IN ARRAY ARRAY['idempotency_key', 'itinerary', 'agent_run', 'embedding',
                               'knowledge_item', 'destination', 'refresh_token', 'app_user']
    LOOP
        EXECUTE format('DROP POLICY IF EXISTS cross_org_admin ON %I', tbl);
        EXECUTE format('DROP POLICY IF EXISTS tenant_isolation ON %I', tbl);
        EXECUTE format('ALTER TABLE %I NO FORCE ROW LEVEL SECURITY', tbl);
        EXECUTE format('ALTER TABLE %I DISABLE ROW LEVEL SECURITY', tbl);
        EXECUTE format('REVOKE ALL ON %I FROM tenantdb_app, tenantdb_admin', tbl);
    END LOOP;
END
$$;
REVOKE ALL ON org FROM tenantdb_app, tenantdb_admin;
REVOKE USAGE ON SCHEMA public FROM tenantdb_app, tenantdb_admin;
