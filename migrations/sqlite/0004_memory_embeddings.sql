-- Memory vectors: which embeddings alias computed a memory's vector, so a change of
-- `[memory] embeddings` recomputes them instead of comparing vectors of two models.
-- A memory without a vector (new, rewritten, or of another model) is the embedding
-- worker's to do; the partial index is its queue.
ALTER TABLE memories ADD COLUMN embedding_model TEXT;

CREATE INDEX memories_unembedded ON memories (seq) WHERE embedding IS NULL;
