-- Undo of V01_02__row_level_security.sql. The roles stay: they belong to the whole cluster
-- and other databases on it may use them.

DROP POLICY IF EXISTS cross_org_admin ON idempotency_key;
DROP POLICY IF EXISTS tenant_isolation ON idempotency_key;
ALTER TABLE idempotency_key NO FORCE ROW LEVEL SECURITY;
ALTER TABLE idempotency_key DISABLE ROW LEVEL SECURITY;
REVOKE ALL ON idempotency_key FROM tenantdb_app, tenantdb_admin;

DROP POLICY IF EXISTS cross_org_admin ON itinerary;
DROP POLICY IF EXISTS tenant_isolation ON itinerary;
ALTER TABLE itinerary NO FORCE ROW LEVEL SECURITY;
ALTER TABLE itinerary DISABLE ROW LEVEL SECURITY;
REVOKE ALL ON itinerary FROM tenantdb_app, tenantdb_admin;

DROP POLICY IF EXISTS cross_org_admin ON agent_run;
DROP POLICY IF EXISTS tenant_isolation ON agent_run;
ALTER TABLE agent_run NO FORCE ROW LEVEL SECURITY;
ALTER TABLE agent_run DISABLE ROW LEVEL SECURITY;
REVOKE ALL ON agent_run FROM tenantdb_app, tenantdb_admin;

DROP POLICY IF EXISTS cross_org_admin ON embedding;
DROP POLICY IF EXISTS tenant_isolation ON embedding;
ALTER TABLE embedding NO FORCE ROW LEVEL SECURITY;
ALTER TABLE embedding DISABLE ROW LEVEL SECURITY;
REVOKE ALL ON embedding FROM tenantdb_app, tenantdb_admin;

DROP POLICY IF EXISTS cross_org_admin ON knowledge_item;
DROP POLICY IF EXISTS tenant_isolation ON knowledge_item;
ALTER TABLE knowledge_item NO FORCE ROW LEVEL SECURITY;
ALTER TABLE knowledge_item DISABLE ROW LEVEL SECURITY;
REVOKE ALL ON knowledge_item FROM tenantdb_app, tenantdb_admin;

DROP POLICY IF EXISTS cross_org_admin ON destination;
DROP POLICY IF EXISTS tenant_isolation ON destination;
ALTER TABLE destination NO FORCE ROW LEVEL SECURITY;
ALTER TABLE destination DISABLE ROW LEVEL SECURITY;
REVOKE ALL ON destination FROM tenantdb_app, tenantdb_admin;

DROP POLICY IF EXISTS cross_org_admin ON refresh_token;
DROP POLICY IF EXISTS tenant_isolation ON refresh_token;
ALTER TABLE refresh_token NO FORCE ROW LEVEL SECURITY;
ALTER TABLE refresh_token DISABLE ROW LEVEL SECURITY;
REVOKE ALL ON refresh_token FROM tenantdb_app, tenantdb_admin;

DROP POLICY IF EXISTS cross_org_admin ON app_user;
DROP POLICY IF EXISTS tenant_isolation ON app_user;
ALTER TABLE app_user NO FORCE ROW LEVEL SECURITY;
ALTER TABLE app_user DISABLE ROW LEVEL SECURITY;
REVOKE ALL ON app_user FROM tenantdb_app, tenantdb_admin;

REVOKE ALL ON org FROM tenantdb_app, tenantdb_admin;
REVOKE USAGE ON SCHEMA public FROM tenantdb_app, tenantdb_admin;
