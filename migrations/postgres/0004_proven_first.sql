-- Keys the Store has renewed at least once are claimed ahead of keys it never has. A key's
-- claims are unsigned: a player can store any number of keys that look due, and they must not
-- crowd out the renewals of keys the Store has proven genuine. Each active row is in exactly
-- one of the two indexes, so a renewal writes as many index entries as before.
DROP INDEX store_keys_due_kind;
CREATE INDEX store_keys_due_proven ON store_keys (kind, next_attempt_at)
    WHERE state = 'active' AND last_renewed_at IS NOT NULL;
CREATE INDEX store_keys_due_new ON store_keys (kind, next_attempt_at)
    WHERE state = 'active' AND last_renewed_at IS NULL;
