-- Background work: a row per job, claimed by the workers of any instance. A claim sets
-- status 'running', counts an attempt (the fence every later write of the job checks) and
-- moves run_at to the end of the lease; a worker that dies leaves a running job whose
-- run_at passes, and the next claim takes it again. kind 'response' is a background
-- response: its id is the response's, payload its create request.
CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    kind             TEXT NOT NULL,
    owner            TEXT NOT NULL,
    payload          TEXT NOT NULL,
    options          TEXT NOT NULL,
    status           TEXT NOT NULL
        CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled')),
    attempts         BIGINT NOT NULL DEFAULT 0,
    run_at           BIGINT NOT NULL,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    error            TEXT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);

-- What a claimer scans: due jobs, oldest first.
CREATE INDEX jobs_due ON jobs (status, run_at);
-- Retention: finished jobs by age.
CREATE INDEX jobs_finished ON jobs (updated_at)
    WHERE status IN ('completed', 'failed', 'cancelled');
