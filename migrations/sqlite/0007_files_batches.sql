-- Uploaded files: the bytes live in [files] dir under the id; the row is written after
-- they are synced, so a row always has its bytes. owner is the key id ('' with auth off).
-- Times are Unix milliseconds.
CREATE TABLE files (
    id         TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    filename   TEXT NOT NULL,
    purpose    TEXT NOT NULL,
    bytes      BIGINT NOT NULL,
    sha256     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT
);

-- Listing a key's files, newest first.
CREATE INDEX files_owner ON files (owner, created_at);
-- The cleaner: files whose time ran out.
CREATE INDEX files_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;

-- Batch API batches. A batch is run by one job (kind 'batch', the same id); its lines are
-- rows, so a batch whose worker died goes on from the lines not yet done.
CREATE TABLE batches (
    id                TEXT PRIMARY KEY,
    owner             TEXT NOT NULL,
    endpoint          TEXT NOT NULL,
    input_file_id     TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status            TEXT NOT NULL,
    metadata          TEXT,
    total             BIGINT NOT NULL DEFAULT 0,
    completed         BIGINT NOT NULL DEFAULT 0,
    failed            BIGINT NOT NULL DEFAULT 0,
    input_tokens      BIGINT NOT NULL DEFAULT 0,
    output_tokens     BIGINT NOT NULL DEFAULT 0,
    output_file_id    TEXT,
    error_file_id     TEXT,
    errors            TEXT,
    created_at        BIGINT NOT NULL,
    expires_at        BIGINT NOT NULL,
    in_progress_at    BIGINT,
    finalizing_at     BIGINT,
    completed_at      BIGINT,
    failed_at         BIGINT,
    expired_at        BIGINT,
    cancelling_at     BIGINT,
    cancelled_at      BIGINT
);

CREATE INDEX batches_owner ON batches (owner, created_at);

-- One row per input line. status: 'pending' (to run), 'ok' (its answer goes to the output
-- file) or 'error' (a line that was not valid, or whose request failed: the error file).
CREATE TABLE batch_lines (
    batch_id  TEXT NOT NULL,
    line      BIGINT NOT NULL,
    custom_id TEXT,
    request   TEXT NOT NULL,
    status    TEXT NOT NULL CHECK (status IN ('pending', 'ok', 'error')),
    result    TEXT,
    PRIMARY KEY (batch_id, line)
);
