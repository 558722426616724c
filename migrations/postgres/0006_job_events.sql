-- A streamed background response's events, as its worker produced them: a client that
-- lost its connection replays them after a sequence number and follows the rest, from
-- any instance. Removed with their job.
CREATE TABLE job_events (
    job_id TEXT NOT NULL,
    seq    BIGINT NOT NULL,
    frame  TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
