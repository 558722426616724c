-- API keys: only a SHA-256 of the secret is stored, with a short prefix for display.
CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    prefix        TEXT NOT NULL,
    hash          TEXT NOT NULL UNIQUE,
    models        TEXT,
    rpm           BIGINT,
    tpm           BIGINT,
    budget_tokens BIGINT,
    budget_period TEXT NOT NULL DEFAULT 'month',
    created_at    BIGINT NOT NULL,
    revoked_at    BIGINT
);

-- One row per model request.
CREATE TABLE usage_log (
    id          BIGSERIAL PRIMARY KEY,
    ts_ms       BIGINT NOT NULL,
    key_id      TEXT,
    route       TEXT NOT NULL,
    alias       TEXT,
    deployment  TEXT,
    tokens_in   BIGINT NOT NULL,
    tokens_out  BIGINT NOT NULL,
    latency_us  BIGINT NOT NULL,
    ttfb_us     BIGINT,
    status      INTEGER NOT NULL,
    cache_hit   BOOLEAN NOT NULL,
    request_id  TEXT NOT NULL
);

CREATE INDEX usage_log_key_ts ON usage_log (key_id, ts_ms);
CREATE INDEX usage_log_ts ON usage_log (ts_ms);
