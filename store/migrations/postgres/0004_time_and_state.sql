-- Saga instances (optimistic concurrency on `version`) and stored cron schedules.
CREATE TABLE rabbitry_sagas (
    saga TEXT NOT NULL,
    saga_key TEXT NOT NULL,
    state TEXT NOT NULL,
    status TEXT NOT NULL,
    completed BIGINT NOT NULL,
    version BIGINT NOT NULL,
    pending TEXT NOT NULL,
    applied TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (saga, saga_key)
);
CREATE INDEX rabbitry_sagas_status ON rabbitry_sagas (status, updated_at);
CREATE INDEX rabbitry_sagas_updated ON rabbitry_sagas (updated_at);

CREATE TABLE rabbitry_schedules (
    name TEXT PRIMARY KEY,
    pattern TEXT NOT NULL,
    time_zone TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
