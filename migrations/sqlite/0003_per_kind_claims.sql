-- Claims and the next-due wake-up per kind, so that while one endpoint's outage breaker is open
-- the loop neither claims its keys nor walks past them in the index.
CREATE INDEX store_keys_due_kind ON store_keys (kind, next_attempt_at) WHERE state = 'active';

-- Consecutive attempts the Store refused with AuthenticationTokenInvalid (after a fresh-token
-- retry) while storekeyd could not yet tell a revocation from a credential problem. Reset when
-- the key renews or is replaced.
ALTER TABLE store_keys ADD COLUMN refusals INTEGER NOT NULL DEFAULT 0;
