-- The outbox: events written in the application's own transaction, published by a relay.
CREATE TABLE rabbitry_outbox (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id  TEXT    NOT NULL UNIQUE,
    exchange    TEXT    NOT NULL,
    routing_key TEXT    NOT NULL,
    properties  TEXT    NOT NULL,
    body        BYTEA    NOT NULL,
    created_at  BIGINT NOT NULL,
    lease_until BIGINT,
    attempts    BIGINT NOT NULL DEFAULT 0,
    last_error  TEXT,
    sent_at     BIGINT
);
CREATE INDEX rabbitry_outbox_pending ON rabbitry_outbox (sent_at, seq);
