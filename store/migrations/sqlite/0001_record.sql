-- The record: events, handlings, dead letters and the de-duplication inbox.
-- Times are Unix milliseconds; `properties` are the AMQP properties with their headers as
-- JSON (serde of lapin's BasicProperties: exact, so a stored message can be published again
-- as it was).
CREATE TABLE rabbitry_events (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id     TEXT    NOT NULL UNIQUE,
    event_type     TEXT    NOT NULL,
    exchange       TEXT    NOT NULL,
    routing_key    TEXT    NOT NULL,
    correlation_id TEXT,
    source         TEXT,
    properties     TEXT    NOT NULL,
    body           BLOB    NOT NULL,
    published_at   INTEGER,
    recorded_at    INTEGER NOT NULL
);
CREATE INDEX rabbitry_events_by_type ON rabbitry_events (event_type, seq);
CREATE INDEX rabbitry_events_by_correlation ON rabbitry_events (correlation_id);
CREATE INDEX rabbitry_events_by_time ON rabbitry_events (recorded_at);

CREATE TABLE rabbitry_handlings (
    id          TEXT    PRIMARY KEY,
    worker      TEXT    NOT NULL,
    message_id  TEXT    NOT NULL,
    attempt     INTEGER NOT NULL,
    outcome     TEXT    NOT NULL,
    reason      TEXT,
    duration_us INTEGER NOT NULL,
    handled_at  INTEGER NOT NULL,
    host        TEXT    NOT NULL
);
CREATE INDEX rabbitry_handlings_by_message ON rabbitry_handlings (message_id, handled_at);

CREATE TABLE rabbitry_dead_letters (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    worker           TEXT    NOT NULL,
    message_id       TEXT    NOT NULL,
    failed_at        TEXT    NOT NULL,
    event_type       TEXT    NOT NULL,
    exchange         TEXT    NOT NULL,
    routing_key      TEXT    NOT NULL,
    kind             TEXT,
    reason           TEXT,
    properties       TEXT    NOT NULL,
    body             BLOB    NOT NULL,
    recorded_at      INTEGER NOT NULL,
    state            TEXT    NOT NULL DEFAULT 'waiting',
    state_changed_at INTEGER,
    UNIQUE (worker, message_id, failed_at)
);
CREATE INDEX rabbitry_dead_letters_by_worker ON rabbitry_dead_letters (worker, state, seq);

CREATE TABLE rabbitry_inbox (
    key        TEXT    PRIMARY KEY,
    claimed_at INTEGER NOT NULL
);
CREATE INDEX rabbitry_inbox_by_time ON rabbitry_inbox (claimed_at);
