-- tenantdb 0.6: tenantdb_protect(regclass), one statement that makes an application's own
-- table tenant-safe. An application's migration calls it after CREATE TABLE:
--     SELECT tenantdb_protect('trip_note');
-- It checks the rules every package table follows (org_id uuid NOT NULL; primary key,
-- unique keys and unique indexes that include org_id; foreign keys to tenant tables paired
-- on org_id) and raises one error naming every violation, so nothing is half set up. A
-- table that passes gets what the package's tables have: row-level security enabled and
-- forced, the two standard policies, and the grants of the application and admin roles
-- (and of the sequences it owns). Idempotent: calling it again changes nothing.
-- Re-runnable: CREATE OR REPLACE.

CREATE OR REPLACE FUNCTION tenantdb_protect(tbl regclass) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    problems text[] := '{}';
    org_type text;
    org_not_null boolean;
    has_pk boolean := false;
    rec record;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = tbl) NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'tenantdb_protect(%): not a table', tbl
            USING ERRCODE = 'wrong_object_type';
    END IF;

    SELECT format_type(a.atttypid, a.atttypmod), a.attnotnull INTO org_type, org_not_null
    FROM pg_attribute a
    WHERE a.attrelid = tbl AND a.attname = 'org_id' AND a.attnum > 0 AND NOT a.attisdropped;
    IF org_type IS NULL THEN
        problems := problems || 'no org_id column (add org_id uuid NOT NULL REFERENCES org (id))'::text;
    ELSE
        IF org_type <> 'uuid' THEN
            problems := problems || format('org_id is %s, not uuid', org_type);
        END IF;
        IF NOT org_not_null THEN
            problems := problems || 'org_id is nullable (declare it NOT NULL)'::text;
        END IF;
    END IF;

    -- Primary and unique keys, their columns in key order.
    FOR rec IN
        SELECT c.conname, c.contype,
               array(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY AS k(num, ord)
                     JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.num
                     ORDER BY k.ord) AS cols
        FROM pg_constraint c
        WHERE c.conrelid = tbl AND c.contype IN ('p', 'u')
        ORDER BY c.contype, c.conname
    LOOP
        has_pk := has_pk OR rec.contype = 'p';
        IF NOT 'org_id' = ANY(rec.cols) THEN
            problems := problems || format('%s %s (%s) lacks org_id',
                CASE rec.contype WHEN 'p' THEN 'primary key' ELSE 'unique key' END,
                rec.conname, array_to_string(rec.cols, ', '));
        END IF;
    END LOOP;
    IF NOT has_pk THEN
        problems := problems || 'no primary key (make it (org_id, id))'::text;
    END IF;

    -- Unique indexes that back no constraint (expression columns have no name).
    FOR rec IN
        SELECT i.relname,
               array(SELECT coalesce(a.attname, '<expression>')
                     FROM unnest(x.indkey::int2[]) WITH ORDINALITY AS k(num, ord)
                     LEFT JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.num
                     ORDER BY k.ord) AS cols
        FROM pg_index x
        JOIN pg_class i ON i.oid = x.indexrelid
        WHERE x.indrelid = tbl AND x.indisunique
          AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = x.indexrelid
                                                        AND k.conrelid = tbl)
        ORDER BY i.relname
    LOOP
        IF NOT 'org_id' = ANY(rec.cols) THEN
            problems := problems || format('unique index %s (%s) lacks org_id',
                                           rec.relname, array_to_string(rec.cols, ', '));
        END IF;
    END LOOP;

    -- Foreign keys to tenant tables (those with org_id, and the table itself) must pair
    -- org_id with org_id, so a row can never point at another org's row.
    FOR rec IN
        SELECT c.conname, c.confrelid::regclass AS target,
               array(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY AS k(num, ord)
                     JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.num
                     ORDER BY k.ord) AS cols
        FROM pg_constraint c
        WHERE c.conrelid = tbl AND c.contype = 'f'
          AND (c.confrelid = tbl
               OR EXISTS (SELECT 1 FROM pg_attribute t WHERE t.attrelid = c.confrelid
                            AND t.attname = 'org_id' AND NOT t.attisdropped))
          AND NOT EXISTS (
              SELECT 1 FROM unnest(c.conkey, c.confkey) AS k(src, dst)
              JOIN pg_attribute s ON s.attrelid = c.conrelid AND s.attnum = k.src
              JOIN pg_attribute d ON d.attrelid = c.confrelid AND d.attnum = k.dst
              WHERE s.attname = 'org_id' AND d.attname = 'org_id')
        ORDER BY c.conname
    LOOP
        problems := problems || format(
            'foreign key %s (%s) to tenant table %s does not pair org_id: make it '
            '(org_id, %s) REFERENCES %s (org_id, id)', rec.conname,
            array_to_string(rec.cols, ', '), rec.target,
            array_to_string(rec.cols, ', '), rec.target);
    END LOOP;

    IF cardinality(problems) > 0 THEN
        RAISE EXCEPTION 'tenantdb_protect(%): % violation(s): %', tbl, cardinality(problems),
                        array_to_string(problems, '; ')
            USING ERRCODE = 'invalid_table_definition',
                  HINT = 'A tenant table has org_id uuid NOT NULL, keys that include org_id '
                         'and foreign keys (org_id, x_id) REFERENCES x (org_id, id).';
    END IF;

    -- The same grants and policies as the package's tenant tables (V01_02).
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO tenantdb_app, tenantdb_admin',
                   tbl);
    FOR rec IN
        SELECT d.objid::regclass AS seq FROM pg_depend d
        JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
        WHERE d.classid = 'pg_class'::regclass AND d.refobjid = tbl AND d.deptype IN ('a', 'i')
    LOOP
        EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %s TO tenantdb_app, tenantdb_admin',
                       rec.seq);
    END LOOP;
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', tbl);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', tbl);
    IF NOT EXISTS (SELECT 1 FROM pg_policy
                   WHERE polrelid = tbl AND polname = 'tenant_isolation') THEN
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %s FOR ALL TO tenantdb_app '
            'USING (org_id = current_setting(''tenantdb.org_id'')::uuid) '
            'WITH CHECK (org_id = current_setting(''tenantdb.org_id'')::uuid)', tbl);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policy
                   WHERE polrelid = tbl AND polname = 'cross_org_admin') THEN
        EXECUTE format('CREATE POLICY cross_org_admin ON %s FOR ALL TO tenantdb_admin '
                       'USING (true) WITH CHECK (true)', tbl);
    END IF;
END
$fn$;

-- Only the migrating login (the owner) calls it.
REVOKE ALL ON FUNCTION tenantdb_protect(regclass) FROM PUBLIC;
