-- The key's userId claim, stored by ingest beside the other claims, so that an attempt checks that
-- a successor is for the same user without decoding the stored key again. NULL on rows activated
-- before this column existed: their first renewal fills it.
ALTER TABLE store_keys ADD COLUMN user_id TEXT;
