-- Conditions the daemon has raised and not yet cleared (an open outage breaker, a credential
-- alarm), so that `storekeyd status` in another process can show them. Cleared at daemon start.
CREATE TABLE storekeyd_alarms (
    name   TEXT    PRIMARY KEY,
    detail TEXT    NOT NULL,
    since  INTEGER NOT NULL
);
