-- Undo of V01_06__tenantdb_protect.sql. Tables it protected keep their policies and grants.
DROP FUNCTION IF EXISTS tenantdb_protect(regclass);
