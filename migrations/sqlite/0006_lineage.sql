-- The keys each row held before storekeyd renewed it, so that a backend re-storing one (a
-- replayed login, a retried job) cannot replace the newer key. Each is named by its last 22
-- characters, the tail of its signature: unique per key, and no use as a key. Pruned 90 days
-- after the key was retired (it expired long before).
CREATE TABLE store_key_lineage (
    key_id     INTEGER NOT NULL,
    tail       TEXT    NOT NULL,
    retired_at INTEGER NOT NULL,
    PRIMARY KEY (key_id, tail)
) WITHOUT ROWID;

-- The backend's upsert stays as it is: an update that would put a retired key back is skipped,
-- and the event log says so.
CREATE TRIGGER store_keys_keep_newer BEFORE UPDATE OF key ON store_keys
WHEN EXISTS (SELECT 1 FROM store_key_lineage AS l
             WHERE l.key_id = OLD.id AND l.tail = substr(trim(CAST(NEW.key AS TEXT), char(32, 9, 10, 13)), -22))
BEGIN
    INSERT INTO store_key_events (key_id, at, outcome, key_fp, detail)
    VALUES (OLD.id, CAST(strftime('%s', 'now') AS INTEGER), 'stale_key_kept', OLD.key_fp,
            'the backend stored a key this row was already renewed past; the newer key is kept');
    SELECT RAISE(IGNORE);
END;
