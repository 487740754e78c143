-- The backend storing the key the row already holds, with whitespace around it (a form, a file):
-- the same key, so nothing changes (storekeyd stores keys trimmed). Without this, every such login
-- made the row pending again, and one landing during a renewal dropped the renewed key.
CREATE TRIGGER store_keys_same_key_padded BEFORE UPDATE OF key ON store_keys
WHEN CAST(NEW.key AS TEXT) <> CAST(OLD.key AS TEXT)
 AND trim(CAST(NEW.key AS TEXT), char(32, 9, 10, 13)) = CAST(OLD.key AS TEXT)
BEGIN
    SELECT RAISE(IGNORE);
END;

-- Canaries are claimed per application, soonest due first, without walking other applications'
-- keys.
CREATE INDEX store_keys_due_client ON store_keys (client_id, next_attempt_at) WHERE state = 'active';

-- Keys an earlier version flagged `invalid` because their refreshUri was spelled differently
-- from the configured endpoint: a configuration matter, rechecked at every start from now on.
UPDATE store_keys SET state = 'misconfigured'
WHERE state = 'invalid' AND reason LIKE 'key''s refreshUri %';
