-- The table backends write keys into and read fresh keys from (the contract is in README.md).
-- Times are Unix seconds (UTC).
CREATE TABLE store_keys (
    id              INTEGER PRIMARY KEY,
    -- The backend's own reference for the player (its user ID, account ID ...).
    user_ref        TEXT    NOT NULL,
    kind            TEXT    NOT NULL CHECK (kind IN ('collections', 'purchase')),
    key             TEXT    NOT NULL,
    -- pending: written by the backend, not yet checked; active: checked and kept renewed;
    -- revoked / expired / invalid: the client must mint a new key;
    -- misconfigured: storekeyd's configuration must change (no credential for the clientId ...).
    state           TEXT    NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'active', 'revoked', 'expired', 'invalid', 'misconfigured')),
    reason          TEXT,
    -- Decoded from the key by storekeyd; never written by backends.
    key_fp          TEXT,
    client_id       TEXT,
    issued_at       INTEGER,
    expires_at      INTEGER,
    -- When storekeyd next acts on an active key (scheduled renewal or retry).
    next_attempt_at INTEGER,
    -- Set while one attempt holds the key; a crashed attempt is retried after it.
    lease_until     INTEGER,
    last_renewed_at INTEGER,
    -- Consecutive failed attempts since the last success.
    attempts        INTEGER NOT NULL DEFAULT 0,
    renewals        INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER)),
    updated_at      INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER)),
    UNIQUE (user_ref, kind)
);

-- Ingest finds new and replaced keys without scanning the table.
CREATE INDEX store_keys_pending ON store_keys (id) WHERE state = 'pending';
-- The due-key query and the "next due" wake-up time.
CREATE INDEX store_keys_due ON store_keys (next_attempt_at) WHERE state = 'active';
-- The earliest expiry among active keys (a metric and an alert).
CREATE INDEX store_keys_active_exp ON store_keys (expires_at) WHERE state = 'active';
-- Status: flagged keys and counts by state.
CREATE INDEX store_keys_state ON store_keys (state, kind);

-- One row per attempt and per decision storekeyd takes on a key. Pruned after events.retention.
CREATE TABLE store_key_events (
    id             INTEGER PRIMARY KEY,
    key_id         INTEGER NOT NULL,
    at             INTEGER NOT NULL,
    -- renewed, revoked, client_id_mismatch, throttled, transient, unexpected, token_error,
    -- superseded, expired, invalid, misconfigured, accepted
    outcome        TEXT    NOT NULL,
    key_fp         TEXT,
    http_status    INTEGER,
    error_code     TEXT,
    detail         TEXT,
    correlation_id TEXT,
    request_id     TEXT,
    cv             TEXT,
    duration_ms    INTEGER
);

CREATE INDEX store_key_events_key ON store_key_events (key_id, id);
CREATE INDEX store_key_events_at ON store_key_events (at);
