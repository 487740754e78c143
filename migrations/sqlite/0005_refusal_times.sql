-- When the key's current run of refusals began and when the latest was (Unix milliseconds). The
-- guard believes a refusal only once a renewal begun after it succeeded, and flags a key whose
-- application has no other key to ask only once its refusals span hours: both survive restarts.
-- Reset with `refusals` when the key renews or is replaced.
ALTER TABLE store_keys ADD COLUMN refused_first_ms INTEGER;
ALTER TABLE store_keys ADD COLUMN refused_last_ms INTEGER;
