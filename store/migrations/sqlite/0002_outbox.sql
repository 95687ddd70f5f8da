-- The outbox: events written in the application's own transaction, published by a relay.
CREATE TABLE rabbitry_outbox (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  TEXT    NOT NULL UNIQUE,
    exchange    TEXT    NOT NULL,
    routing_key TEXT    NOT NULL,
    properties  TEXT    NOT NULL,
    body        BLOB    NOT NULL,
    created_at  INTEGER NOT NULL,
    lease_until INTEGER,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    sent_at     INTEGER
);
CREATE INDEX rabbitry_outbox_pending ON rabbitry_outbox (sent_at, seq);
