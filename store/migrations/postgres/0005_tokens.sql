-- API tokens: only a SHA-256 hash of each is kept; scopes space-separated.
CREATE TABLE rabbitry_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    scopes TEXT NOT NULL,
    rate_per_second BIGINT,
    expires_at BIGINT,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
