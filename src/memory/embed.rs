//! Memory vectors, when `[memory] embeddings` names an embeddings alias.
//!
//! A memory's vector is computed by a background worker, never on a turn's path: every
//! memory stored without one (added, rewritten, or computed by another model before the
//! setting changed) is in the worker's queue, the rows whose `embedding` is null. The
//! worker embeds them in batches through `inference` under the owner's key (route
//! `memory` in the usage log) and stores each vector only if its memory still has the
//! text it was computed from. A batch that fails for a reason that may pass (a timeout, a
//! key's budget) stays queued for the next pass; one the model refuses is retried memory by
//! memory, and a memory it still refuses gets an empty vector, so it ranks by full text
//! alone instead of blocking the queue.
//!
//! A search embeds its query (cached per key and text, bounded by
//! `query_embedding_timeout`; past it the search ranks by full text alone, counted).
//!
//! Vectors are stored as little-endian `f32`s and held in the index normalised and
//! quantised to `i8` (a quarter of the memory; the cosine keeps about two decimal places,
//! more than a ranking needs).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Memory;
use crate::auth::Principal;
use crate::error::GatewayError;
use crate::inference::{CallContext, Inference};
use crate::state::AppState;
use crate::store::memories::Unembedded;
use crate::wire::EmbeddingsRequest;
use crate::wire::responses::new_id;

/// Memories embedded per call.
const BATCH: i64 = 64;
/// How often the worker looks for memories without vectors when nothing woke it.
const POLL: Duration = Duration::from_secs(5);
/// Query vectors kept, across keys.
const QUERY_CACHE: u64 = 10_000;

/// A unit vector quantised to `i8`: `values[i] * scale` is the original component.
#[derive(Debug, Clone, PartialEq)]
pub struct Vector {
    values: Box<[i8]>,
    scale: f32,
}

impl Vector {
    /// Normalises and quantises `v`; `None` for an empty, zero or non-finite vector.
    pub fn quantize(v: &[f32]) -> Option<Vector> {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if v.is_empty() || !norm.is_finite() || norm == 0.0 {
            return None;
        }
        let max = v.iter().fold(0f32, |m, x| m.max(x.abs())) / norm;
        let step = max / 127.0;
        let values = v
            .iter()
            .map(|x| (x / norm / step).round().clamp(-127.0, 127.0) as i8)
            .collect();
        Some(Vector {
            values,
            scale: step,
        })
    }

    /// Reads a stored vector (little-endian `f32`s).
    pub fn decode(bytes: &[u8]) -> Option<Vector> {
        if bytes.is_empty() || !bytes.len().is_multiple_of(4) {
            return None;
        }
        let floats: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Vector::quantize(&floats)
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The cosine of two vectors; `None` when their dimensions differ (two models').
    pub fn cosine(&self, other: &Vector) -> Option<f32> {
        if self.values.len() != other.values.len() {
            return None;
        }
        // i8 × i8 into i32 lanes: the compiler vectorises this loop.
        let dot: i32 = self
            .values
            .iter()
            .zip(other.values.iter())
            .map(|(&a, &b)| i32::from(a) * i32::from(b))
            .sum();
        Some(dot as f32 * self.scale * other.scale)
    }
}

/// Encodes a vector for the store.
pub fn encode(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Computes vectors with the embeddings alias.
pub struct Embedder {
    alias: String,
    dimensions: Option<u32>,
    timeout: Duration,
    inference: Arc<Inference>,
    /// Query vectors by (key id, text): a conversation's repeated searches and the
    /// extraction's per-fact searches embed once.
    queries: moka::future::Cache<(Arc<str>, String), Arc<Vector>>,
}

impl Embedder {
    pub fn new(
        alias: String,
        dimensions: Option<u32>,
        timeout: Duration,
        inference: Arc<Inference>,
    ) -> Embedder {
        Embedder {
            alias,
            dimensions,
            timeout,
            inference,
            queries: moka::future::Cache::builder()
                .max_capacity(QUERY_CACHE)
                .time_to_live(Duration::from_secs(600))
                .build(),
        }
    }

    pub fn alias(&self) -> &str {
        &self.alias
    }

    /// The vector of a search's query, or `None` (counted) when the model does not answer
    /// within the timeout or fails: the search then ranks by full text alone.
    pub async fn query(
        &self,
        principal: Option<&Arc<Principal>>,
        text: &str,
    ) -> Option<Arc<Vector>> {
        let owner: Arc<str> = principal.map_or_else(|| Arc::from(""), |p| p.key_id.clone());
        let init = async {
            let ctx =
                self.inference
                    .context("memory", Arc::from(new_id("memq")), principal.cloned());
            let vectors = tokio::time::timeout(self.timeout, self.embed(&ctx, &[text]))
                .await
                .map_err(|_| "timeout")?
                .map_err(|e| {
                    tracing::debug!(error = %e, "memory: query embedding failed");
                    "error"
                })?;
            vectors
                .first()
                .and_then(|v| Vector::quantize(v))
                .map(Arc::new)
                .ok_or("empty")
        };
        match self
            .queries
            .try_get_with((owner, text.to_owned()), init)
            .await
        {
            Ok(vector) => Some(vector),
            Err(why) => {
                metrics::counter!("switchyard_memory_query_embedding_failures_total", "why" => *why)
                    .increment(1);
                None
            }
        }
    }

    /// One embeddings call for `texts`, the vectors in their order.
    ///
    /// # Errors
    /// As the call fails; an answer that is not one vector per text is a protocol error.
    pub async fn embed(
        &self,
        ctx: &CallContext,
        texts: &[&str],
    ) -> Result<Vec<Vec<f32>>, GatewayError> {
        let mut body = json!({"model": self.alias, "input": texts, "encoding_format": "float"});
        if let Some(d) = self.dimensions {
            body["dimensions"] = json!(d);
        }
        let request = EmbeddingsRequest::parse(Bytes::from(body.to_string()))?;
        let answer = self.inference.embed(ctx, request).await?;
        #[derive(Deserialize)]
        struct List {
            data: Vec<Datum>,
        }
        #[derive(Deserialize)]
        struct Datum {
            index: usize,
            embedding: Vec<f32>,
        }
        let bad = |message: String| GatewayError::UpstreamProtocol {
            provider: self.alias.clone(),
            message,
        };
        let list: List = serde_json::from_slice(&answer.body)
            .map_err(|e| bad(format!("unreadable embeddings answer: {e}")))?;
        let mut out = vec![Vec::new(); texts.len()];
        for datum in list.data {
            let slot = out
                .get_mut(datum.index)
                .ok_or_else(|| bad(format!("embedding index {} out of range", datum.index)))?;
            *slot = datum.embedding;
        }
        if out.iter().any(Vec::is_empty) {
            return Err(bad("fewer embeddings than inputs".into()));
        }
        Ok(out)
    }
}

/// Starts the worker that gives memories their vectors; it ends with `cancel`.
pub fn start(state: Arc<AppState>, cancel: CancellationToken) {
    if state.memory.embedder().is_none() {
        return;
    }
    state.lifecycle.tasks.clone().spawn(backfill(state, cancel));
}

/// Embeds memories without vectors, pass after pass: each pass walks the queue once in
/// `seq` order, so a key whose calls fail (over budget, say) delays nobody else's
/// memories; what failed is tried again on the next pass.
async fn backfill(state: Arc<AppState>, cancel: CancellationToken) {
    let memory = state.memory.clone();
    let Some(embedder) = memory.embedder() else {
        return;
    };
    match memory
        .store()
        .reset_memory_embeddings(embedder.alias())
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            memories = n,
            model = embedder.alias(),
            "memory: the embeddings model changed; recomputing vectors"
        ),
        Err(e) => tracing::warn!(error = %e, "memory: resetting old vectors failed"),
    }
    loop {
        let mut after = 0i64;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let batch = match memory.store().unembedded_memories(after, BATCH).await {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(error = %e, "memory: reading memories to embed failed");
                    break;
                }
            };
            let Some(last) = batch.last() else { break };
            after = last.seq;
            let mut by_owner: Vec<(String, Vec<Unembedded>)> = Vec::new();
            for row in batch {
                match by_owner.iter_mut().find(|(o, _)| *o == row.owner) {
                    Some((_, rows)) => rows.push(row),
                    None => by_owner.push((row.owner.clone(), vec![row])),
                }
            }
            for (owner, rows) in by_owner {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = embed_rows(&state, &memory, embedder, &owner, rows) => {}
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = memory.embed_wake.notified() => {}
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Embeds one owner's rows and stores the vectors.
async fn embed_rows(
    state: &AppState,
    memory: &Memory,
    embedder: &Embedder,
    owner: &str,
    rows: Vec<Unembedded>,
) {
    let principal = if owner.is_empty() {
        None
    } else {
        match state.auth.principal_of_key(owner).await {
            Ok(Some(p)) => Some(p),
            // A revoked key's memories wait: deleting its data removes them.
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "memory: reading the owner's key failed");
                return;
            }
        }
    };
    let ctx = state
        .inference
        .context("memory", Arc::from(new_id("memembed")), principal);
    let texts: Vec<&str> = rows.iter().map(|r| r.memory.as_str()).collect();
    let vectors: Vec<Vec<u8>> = match embedder.embed(&ctx, &texts).await {
        Ok(vectors) => vectors.iter().map(|v| encode(v)).collect(),
        Err(e) if refused(&e) => {
            // One memory may be what the model refuses (too long, say): ask one by one,
            // and keep an empty vector for each it still refuses.
            let mut each = Vec::with_capacity(rows.len());
            for text in &texts {
                match embedder.embed(&ctx, &[text]).await {
                    Ok(v) => each.push(encode(&v[0])),
                    Err(e) if refused(&e) => {
                        metrics::counter!("switchyard_memory_embeddings_refused_total")
                            .increment(1);
                        tracing::warn!(error = %e, "memory: the embeddings model refused a memory");
                        each.push(Vec::new());
                    }
                    Err(_) => return,
                }
            }
            each
        }
        Err(e) => {
            tracing::debug!(error = %e, "memory: embedding failed; retried on the next pass");
            metrics::counter!("switchyard_memory_embedding_failures_total").increment(1);
            return;
        }
    };
    let pairs: Vec<(Unembedded, Vec<u8>)> = rows.into_iter().zip(vectors).collect();
    match memory
        .store()
        .set_memory_embeddings(embedder.alias(), &pairs)
        .await
    {
        Ok(n) => {
            metrics::counter!("switchyard_memory_embedded_total").increment(n);
            let mut subjects: Vec<super::Subject> = pairs
                .iter()
                .map(|(m, _)| super::Subject {
                    owner: m.owner.clone(),
                    user: m.subject.clone(),
                })
                .collect();
            subjects.dedup();
            for subject in &subjects {
                memory.mark_stale(subject);
            }
        }
        Err(e) => tracing::warn!(error = %e, "memory: storing vectors failed"),
    }
}

/// Whether the model refused the input itself (a retry with the same input fails again).
fn refused(e: &GatewayError) -> bool {
    matches!(
        e,
        GatewayError::InvalidRequest { .. } | GatewayError::UpstreamRejected { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantised_cosines_stay_close_to_the_real_ones() {
        let a = [0.3f32, -1.2, 0.5, 2.0, 0.0, -0.7];
        let b = [0.1f32, -1.0, 0.9, 1.5, 0.2, -0.1];
        let exact = {
            let dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
            dot / n(&a) / n(&b)
        };
        let qa = Vector::quantize(&a).unwrap();
        let qb = Vector::decode(&encode(&b)).unwrap();
        assert!((qa.cosine(&qb).unwrap() - exact).abs() < 0.02);
        assert!((qa.cosine(&qa).unwrap() - 1.0).abs() < 0.02);
    }

    #[test]
    fn unusable_vectors_are_refused() {
        assert!(Vector::quantize(&[]).is_none());
        assert!(Vector::quantize(&[0.0, 0.0]).is_none());
        assert!(Vector::quantize(&[f32::NAN, 1.0]).is_none());
        assert!(Vector::decode(&[1, 2, 3]).is_none());
        assert!(Vector::decode(&[]).is_none());
        let a = Vector::quantize(&[1.0, 0.0]).unwrap();
        let b = Vector::quantize(&[1.0, 0.0, 0.0]).unwrap();
        assert_eq!(a.cosine(&b), None);
    }
}
