-- Undo of V01_05__tenant_wall.sql: org unprotected again, tenantdb_admin a NOLOGIN role that
-- tenantdb_app may SET ROLE to (the 0.2 arrangement).
DROP POLICY IF EXISTS cross_org_admin ON org;
DROP POLICY IF EXISTS org_isolation ON org;
ALTER TABLE org NO FORCE ROW LEVEL SECURITY;
ALTER TABLE org DISABLE ROW LEVEL SECURITY;
GRANT SELECT, INSERT, UPDATE, DELETE ON org TO tenantdb_app;
ALTER ROLE tenantdb_admin NOLOGIN;
GRANT tenantdb_admin TO tenantdb_app;
