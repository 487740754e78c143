-- Since when (Unix seconds, the Store's time) an attempt on the key may have renewed it
-- without its answer being written: a call that got no answer, or a claim whose lease ran out
-- with no result. A refusal of such a key may mean the Store renewed it and retired this one,
-- so it is not flagged revoked until the process that may hold the answer has had time to
-- write it. Cleared when the key renews or the backend replaces it.
ALTER TABLE store_keys ADD COLUMN unanswered_at BIGINT;
