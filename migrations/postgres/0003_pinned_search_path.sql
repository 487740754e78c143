-- storekeyd_keep_newer() runs as the schema's owner (SECURITY DEFINER) so that a backend role
-- that may only write store_keys can run the upsert. Its saved search_path ("$user", public)
-- left pg_temp implicit, and PostgreSQL then searches the caller's temporary schema first for
-- tables: a backend role could put a store_key_lineage and a store_key_events of its own there,
-- the second with a trigger, and have the owner run it. As PostgreSQL's "Writing SECURITY
-- DEFINER Functions Safely" says: every table is named with its schema (the one this migration
-- finds store_keys in), and the path holds only pg_catalog, then pg_temp, last.
--
-- Two more triggers keep `state` storekeyd's to decide, for a role that may not write the lease
-- (a backend with the README's column grants): it may set `state` to 'pending' (a recheck) and
-- to nothing else, and a key it writes with a plain UPDATE is checked again as the upsert's is
-- (else the row would stay active with another key under the old key's claims). Both run as
-- their caller and look at the caller's own privileges.
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

CREATE FUNCTION %1$I.storekeyd_state_is_ours() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $body$
BEGIN
    IF NOT has_column_privilege(TG_RELID, 'lease_until', 'UPDATE') THEN
        RAISE EXCEPTION 'permission denied to set store_keys.state to %%', quote_literal(NEW.state)
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'a backend writes a key with state = ''pending''; storekeyd sets the other states';
    END IF;
    RETURN NEW;
END;
$body$;

CREATE FUNCTION %1$I.storekeyd_backend_key() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $body$
BEGIN
    IF NOT has_column_privilege(TG_RELID, 'lease_until', 'UPDATE') THEN
        NEW.state := 'pending';
        NEW.lease_until := NULL;
    END IF;
    RETURN NEW;
END;
$body$;

-- Named to fire before store_keys_keep_newer (triggers fire in name order), whose condition
-- then sees the row as pending, as after the upsert. Not for storekeyd's own key writes (a
-- renewal counts one more; a check activates a pending row), as migration 2 keeps the lineage
-- check off them: a trigger function per renewal costs.
CREATE TRIGGER store_keys_backend_key BEFORE UPDATE OF key ON %1$I.store_keys
FOR EACH ROW
WHEN (NEW.key IS DISTINCT FROM OLD.key AND NEW.renewals = OLD.renewals
      AND (OLD.state <> 'pending' OR NEW.state = 'pending'))
EXECUTE FUNCTION %1$I.storekeyd_backend_key();

CREATE TRIGGER store_keys_state_is_ours BEFORE UPDATE OF state ON %1$I.store_keys
FOR EACH ROW WHEN (NEW.state IS DISTINCT FROM OLD.state AND NEW.state <> 'pending')
EXECUTE FUNCTION %1$I.storekeyd_state_is_ours();
$f$, s);
END;
$migration$;
