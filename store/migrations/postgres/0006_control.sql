-- Registered worker states (control across processes) and webhook subscriptions.
CREATE TABLE rabbitry_worker_controls (
    worker TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    bindings_added TEXT NOT NULL,
    bindings_removed TEXT NOT NULL,
    revision BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- The signing secret is kept as is: the server must sign with it.
CREATE TABLE rabbitry_webhooks (
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    bindings TEXT NOT NULL,
    retry TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
