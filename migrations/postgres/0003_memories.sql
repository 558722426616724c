-- Long-term memory. Every row names its owner: the API key id, or '' with auth off (a
-- plain column rather than the COALESCE(key_id, '') of the conversation tables, since no
-- memory outlives its key's scope). A subject is a user of that key; nothing is shared
-- across owners.

-- A subject's memories. seq is the order they were written in: retrieval treats the
-- memories written next to one another as each other's context.
CREATE TABLE memories (
    seq         BIGSERIAL PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    owner       TEXT NOT NULL,
    subject     TEXT NOT NULL,
    memory      TEXT NOT NULL,
    metadata    TEXT NOT NULL,
    embedding   BYTEA,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE INDEX memories_subject ON memories (owner, subject, seq);

-- One row per subject: its version moves with every change to its memories (the
-- in-memory search index compares it), and its row lock serialises a subject's writers.
CREATE TABLE memory_subjects (
    owner   TEXT NOT NULL,
    subject TEXT NOT NULL,
    version BIGINT NOT NULL,
    PRIMARY KEY (owner, subject)
);

-- Every change to a memory, kept after the memory is deleted.
CREATE TABLE memory_history (
    seq        BIGSERIAL PRIMARY KEY,
    memory_id  TEXT NOT NULL,
    owner      TEXT NOT NULL,
    event      TEXT NOT NULL CHECK (event IN ('ADD', 'UPDATE', 'DELETE')),
    old_memory TEXT,
    new_memory TEXT,
    job_id     TEXT,
    created_at BIGINT NOT NULL
);

CREATE INDEX memory_history_memory ON memory_history (memory_id, seq);

-- Extraction jobs: the new messages of a conversation (or a POST /v1/memories with
-- infer) waiting to be turned into memories. A worker claims a job by setting its lease;
-- a job whose lease ran out (its instance died) is claimable again.
CREATE TABLE memory_jobs (
    id              TEXT PRIMARY KEY,
    owner           TEXT NOT NULL,
    subject         TEXT NOT NULL,
    conversation_id TEXT,
    messages        TEXT NOT NULL,
    user_messages   BIGINT NOT NULL,
    metadata        TEXT NOT NULL,
    alias           TEXT,
    status          TEXT NOT NULL CHECK (status IN ('queued', 'running', 'completed', 'failed')),
    attempts        BIGINT NOT NULL DEFAULT 0,
    run_at          BIGINT NOT NULL,
    lease_until     BIGINT,
    error           TEXT,
    result          TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);

-- What a claimer scans: due jobs, oldest first.
CREATE INDEX memory_jobs_due ON memory_jobs (status, run_at);
-- At most one queued job per conversation: a new turn's messages join it (the debounce).
CREATE UNIQUE INDEX memory_jobs_pending ON memory_jobs (conversation_id)
    WHERE status = 'queued' AND conversation_id IS NOT NULL;
-- Retention: finished jobs by age.
CREATE INDEX memory_jobs_finished ON memory_jobs (updated_at) WHERE status IN ('completed', 'failed');
