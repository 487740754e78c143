-- The processes running on this database (several replicas on PostgreSQL; on SQLite a daemon and,
-- briefly, a second one during a restart). Each refreshes its row every few seconds; the rate
-- limit is split among the rows that are fresh.
CREATE TABLE storekeyd_replicas (
    id      TEXT    PRIMARY KEY,
    seen_at INTEGER NOT NULL
);

-- The process that raised an alarm: its breaker and clock alarms go when it stops or its row
-- lapses; a credential alarm stays until a renewal proves the credential works.
ALTER TABLE storekeyd_alarms ADD COLUMN owner TEXT;
