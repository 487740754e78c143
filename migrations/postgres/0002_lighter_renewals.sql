-- A renewal rewrites its row twice (the claim, the new key); each write of an active row adds
-- an entry to every index that covers it. Two costs that bought nothing go:
--
-- The lineage check runs only for other writers' keys (the backend's upsert, any UPDATE of
-- key). storekeyd's own key writes (a renewal, which counts one more; the check of a pending
-- row, which activates it) carry a key the Store just issued or the backend's own, trimmed:
-- never a retired one.
DROP TRIGGER store_keys_keep_newer ON store_keys;
CREATE TRIGGER store_keys_keep_newer BEFORE UPDATE OF key ON store_keys
FOR EACH ROW
WHEN (NEW.renewals = OLD.renewals AND (OLD.state <> 'pending' OR NEW.state = 'pending'))
EXECUTE FUNCTION storekeyd_keep_newer();

-- Status counts active keys per kind off store_keys_due_kind; the (state, kind) index is
-- needed for the other states only, which rows leave and enter rarely.
DROP INDEX store_keys_state;
CREATE INDEX store_keys_inactive ON store_keys (state, kind) WHERE state <> 'active';
