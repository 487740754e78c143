-- storekeyd_keep_newer() runs as the schema's owner (SECURITY DEFINER) so that a backend role
-- that may only write store_keys can run the upsert. Its saved search_path ("$user", public)
-- left pg_temp implicit, and PostgreSQL then searches the caller's temporary schema first for
-- tables: a backend role could put a store_key_lineage and a store_key_events of its own there,
-- the second with a trigger, and have the owner run it. As PostgreSQL's "Writing SECURITY
-- DEFINER Functions Safely" says: every table is named with its schema (the one this migration
-- finds store_keys in), and the path holds only pg_catalog, then pg_temp, last.
--
-- Row-level security keeps `state` storekeyd's to decide, for a role that may not write the lease
-- (a backend with the README's column grants): a row it inserts or updates must be 'pending',
-- as the upsert leaves it. It may not mark a key active, flag it, or write another key over an
-- active row without sending it back to be checked (else that key would inherit the old key's
-- claims and standing). The table's owner, as storekeyd usually runs, bypasses the policies:
-- its renewals pay nothing (row triggers doing the same cost about 45 us of PostgreSQL's CPU
-- per renewal in a drain).

DO $migration$
DECLARE
    s TEXT := (SELECT n.nspname FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
               WHERE c.oid = 'store_keys'::regclass);
BEGIN
    EXECUTE format($f$
CREATE OR REPLACE FUNCTION %1$I.storekeyd_keep_newer() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
BEGIN
    IF EXISTS (SELECT 1 FROM %1$I.store_key_lineage AS l
               WHERE l.key_id = OLD.id AND l.tail = right(btrim(NEW.key, E' \t\n\r'), 22)) THEN
        INSERT INTO %1$I.store_key_events (key_id, at, outcome, key_fp, detail)
        VALUES (OLD.id, floor(extract(epoch FROM now()))::bigint, 'stale_key_kept', OLD.key_fp,
                'the backend stored a key this row was already renewed past; the newer key is kept');
        RETURN NULL;
    END IF;
    IF NEW.key <> OLD.key AND btrim(NEW.key, E' \t\n\r') = OLD.key THEN
        RETURN NULL;
    END IF;
    IF NEW.state = 'pending' THEN
        NEW.lease_until := NULL;
    END IF;
    RETURN NEW;
END;
$body$;

ALTER FUNCTION %1$I.storekeyd_notify_pending() SET search_path = pg_catalog, pg_temp;

ALTER TABLE %1$I.store_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY storekeyd_read ON %1$I.store_keys FOR SELECT USING (true);
CREATE POLICY storekeyd_delete ON %1$I.store_keys FOR DELETE USING (true);
CREATE POLICY storekeyd_insert ON %1$I.store_keys FOR INSERT
WITH CHECK (state = 'pending' OR pg_catalog.has_column_privilege(%2$L, 'lease_until', 'UPDATE'));
CREATE POLICY storekeyd_update ON %1$I.store_keys FOR UPDATE USING (true)
WITH CHECK (state = 'pending' OR pg_catalog.has_column_privilege(%2$L, 'lease_until', 'UPDATE'));
$f$, s, format('%I.store_keys', s));
END;
$migration$;
