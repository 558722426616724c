-- Server-side state of the Responses and Conversations APIs. Every row carries the key_id of
-- its owner (NULL when auth is off); the store matches owners as COALESCE(key_id, ''), so
-- the indexes that serve owner lookups are on that expression.

-- A conversation: its metadata (JSON object text) and a running count of its items.
-- updated_ms is the last activity, the order conversations are listed in.
CREATE TABLE conversations (
    id          TEXT PRIMARY KEY,
    key_id      TEXT,
    created_at  BIGINT NOT NULL,
    updated_ms  BIGINT NOT NULL,
    metadata    TEXT NOT NULL,
    user_id     TEXT,
    archived_at BIGINT,
    item_count  BIGINT NOT NULL DEFAULT 0
);

-- A key's conversations by activity. Archived ones stay in this index and are filtered
-- while scanning: one index serves both the default list and include_archived.
CREATE INDEX conversations_owner_activity
    ON conversations (COALESCE(key_id, ''), updated_ms DESC, id DESC);
-- One user's conversations under a key; partial, so it costs nothing when no user is set.
CREATE INDEX conversations_owner_user
    ON conversations (COALESCE(key_id, ''), user_id, updated_ms DESC, id DESC)
    WHERE user_id IS NOT NULL;
-- The admin list over every key, and the stats' recent-activity count.
CREATE INDEX conversations_activity ON conversations (updated_ms DESC, id DESC);

-- The metadata object as one row per pair, so lists filter on a pair without JSON
-- functions (which differ between the engines). Rewritten whole on update.
CREATE TABLE conversation_metadata (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    key             TEXT NOT NULL,
    value           TEXT NOT NULL,
    PRIMARY KEY (conversation_id, key)
);

CREATE INDEX conversation_metadata_pair ON conversation_metadata (key, value, conversation_id);

-- A stored response: the full Response JSON in body, plus what lookups need as columns.
-- previous_response_id is no foreign key: an ancestor may be deleted, which ends the chain.
CREATE TABLE responses (
    id                   TEXT PRIMARY KEY,
    key_id               TEXT,
    created_at           BIGINT NOT NULL,
    status               TEXT NOT NULL,
    model                TEXT NOT NULL,
    previous_response_id TEXT,
    conversation_id      TEXT REFERENCES conversations (id) ON DELETE SET NULL,
    body                 TEXT NOT NULL,
    input_tokens         BIGINT NOT NULL,
    output_tokens        BIGINT NOT NULL
);

-- Deleting a key's data.
CREATE INDEX responses_owner ON responses (COALESCE(key_id, ''), created_at);
-- Deleting a conversation clears this column.
CREATE INDEX responses_conversation ON responses (conversation_id);

-- One row per item, in a conversation, a response, or both; written once with its token
-- count and never rewritten when others are appended. seq is the total order of items.
CREATE TABLE items (
    seq             BIGSERIAL PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    key_id          TEXT,
    conversation_id TEXT REFERENCES conversations (id) ON DELETE SET NULL,
    response_id     TEXT REFERENCES responses (id) ON DELETE SET NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('input', 'output')),
    item_type       TEXT NOT NULL,
    body            TEXT NOT NULL,
    tokens          BIGINT NOT NULL,
    created_at      BIGINT NOT NULL
);

CREATE INDEX items_conversation ON items (conversation_id, seq);
CREATE INDEX items_response ON items (response_id, seq);
