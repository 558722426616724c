//! Embeddings micro-batching: concurrent small embedding requests to one deployment,
//! arriving within a short window, are sent as one upstream call and split back.
//!
//! Sits at the upstream end of the embeddings path: routing picks the deployment, then the
//! deployment's [`EmbeddingBatcher`] collects requests for `[embeddings] batch_window` (or
//! until `batch_max_inputs`), groups them by everything but `input` (model, dimensions,
//! encoding format, user), sends each group as one request, and gives every caller its
//! own slice of `data` with indices from 0, in order, and its share of the usage. The
//! queue is bounded; when it is full a request simply goes upstream on its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::GatewayError;
use crate::routing::Deployment;
use crate::wire::{EmbeddingsRequest, Usage};

/// Requests waiting to be batched per deployment; beyond this they go upstream alone.
const QUEUE_DEPTH: usize = 4096;

type Reply = Result<(Bytes, Option<Usage>), GatewayError>;

struct Job {
    /// Canonical JSON of every field but `input` and `model`: only equal groups merge.
    group: String,
    params: Map<String, Value>,
    inputs: Vec<Value>,
    reply: oneshot::Sender<Reply>,
}

/// The batcher of one deployment.
pub struct EmbeddingBatcher {
    tx: mpsc::Sender<Job>,
    max_inputs: usize,
}

impl EmbeddingBatcher {
    /// Starts the batching task for `deployment`, owned by `tasks` and stopped by `cancel`.
    pub fn start(
        deployment: Arc<Deployment>,
        window: Duration,
        max_inputs: usize,
        tasks: &TaskTracker,
        cancel: CancellationToken,
    ) -> EmbeddingBatcher {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let senders = tasks.clone();
        tasks.spawn(run(deployment, rx, window, max_inputs, senders, cancel));
        EmbeddingBatcher { tx, max_inputs }
    }

    /// Sends `req` through the batcher when it is small enough; `None` means "send it
    /// yourself" (too big, token input, or the queue is full).
    pub async fn submit(&self, req: &EmbeddingsRequest) -> Option<Reply> {
        let inputs: Vec<Value> = match serde_json::from_str::<Value>(req.object.raw("input")?) {
            Ok(Value::String(s)) => vec![Value::String(s)],
            Ok(Value::Array(items)) if items.iter().all(Value::is_string) => items,
            _ => return None,
        };
        if inputs.is_empty() || inputs.len() >= self.max_inputs {
            return None;
        }
        let mut params = Map::new();
        for (key, raw) in req.object.fields() {
            if key != "input" && key != "model" {
                params.insert(key.to_string(), serde_json::from_str(raw).ok()?);
            }
        }
        let group = Value::Object(params.clone()).to_string();
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Job {
                group,
                params,
                inputs,
                reply,
            })
            .ok()?;
        match rx.await {
            Ok(reply) => Some(reply),
            Err(_) => Some(Err(GatewayError::ShuttingDown)),
        }
    }
}

async fn run(
    deployment: Arc<Deployment>,
    mut rx: mpsc::Receiver<Job>,
    window: Duration,
    max_inputs: usize,
    tasks: TaskTracker,
    cancel: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            job = rx.recv() => job,
            _ = cancel.cancelled() => None,
        };
        let Some(first) = first else {
            return;
        };
        let deadline = tokio::time::Instant::now() + window;
        let mut total = first.inputs.len();
        let mut jobs = vec![first];
        while total < max_inputs {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(job)) => {
                    total += job.inputs.len();
                    jobs.push(job);
                }
                _ => break,
            }
        }
        let mut groups: HashMap<String, Vec<Job>> = HashMap::new();
        for job in jobs {
            groups.entry(job.group.clone()).or_default().push(job);
        }
        for (_, group) in groups {
            tasks.spawn(send(deployment.clone(), group));
        }
    }
}

/// Sends one group upstream and splits the answer back to its callers.
async fn send(deployment: Arc<Deployment>, jobs: Vec<Job>) {
    let mut body = jobs[0].params.clone();
    body.insert("model".into(), json!(deployment.model));
    let inputs: Vec<Value> = jobs.iter().flat_map(|j| j.inputs.iter().cloned()).collect();
    let total = inputs.len();
    body.insert("input".into(), Value::Array(inputs));
    metrics::histogram!("switchyard_embeddings_batch_inputs").record(total as f64);
    metrics::counter!("switchyard_embeddings_batched_requests_total").increment(jobs.len() as u64);
    let encoded = match serde_json::to_vec(&Value::Object(body)) {
        Ok(encoded) => encoded,
        Err(e) => {
            let err = GatewayError::Internal(format!("batch encoding: {e}"));
            for job in jobs {
                let _ = job.reply.send(Err(err.clone()));
            }
            return;
        }
    };
    // A batch has no request of its own: it may wait one provider queue wait.
    let queue = crate::admission::QueueBudget::new(deployment.provider.pool().queue().max_wait());
    let result = deployment.provider.embeddings_body(encoded, queue).await;
    let (raw, usage) = match result {
        Ok((raw, usage, _)) => (raw, usage),
        Err(err) => {
            for job in jobs {
                let _ = job.reply.send(Err(err.clone()));
            }
            return;
        }
    };
    match split(&raw, usage, &jobs, total) {
        Ok(parts) => {
            for (job, part) in jobs.into_iter().zip(parts) {
                let _ = job.reply.send(Ok(part));
            }
        }
        Err(message) => {
            let err = GatewayError::UpstreamProtocol {
                provider: deployment.provider.name.to_string(),
                message,
            };
            for job in jobs {
                let _ = job.reply.send(Err(err.clone()));
            }
        }
    }
}

/// Cuts one upstream answer into per-caller answers.
fn split(
    raw: &[u8],
    usage: Option<Usage>,
    jobs: &[Job],
    total: usize,
) -> Result<Vec<(Bytes, Option<Usage>)>, String> {
    let v: Value = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
    let mut data: Vec<Value> = v
        .get("data")
        .and_then(Value::as_array)
        .cloned()
        .ok_or("no data in the embeddings answer")?;
    if data.len() != total {
        return Err(format!("asked for {total} embeddings, got {}", data.len()));
    }
    data.sort_by_key(|d| d.get("index").and_then(Value::as_u64).unwrap_or(u64::MAX));
    let model = v.get("model").cloned().unwrap_or(Value::Null);
    let tokens = usage.map_or(0, |u| u.prompt_tokens);
    let mut out = Vec::with_capacity(jobs.len());
    let mut offset = 0;
    let mut tokens_left = tokens;
    for (i, job) in jobs.iter().enumerate() {
        let n = job.inputs.len();
        let items: Vec<Value> = data[offset..offset + n]
            .iter()
            .enumerate()
            .map(|(k, item)| {
                let mut item = item.clone();
                item["index"] = json!(k);
                item
            })
            .collect();
        offset += n;
        // Usage is shared in proportion to inputs; the last caller takes the rounding.
        let share = if i + 1 == jobs.len() {
            tokens_left
        } else {
            tokens * n as u64 / total as u64
        };
        tokens_left -= share;
        let part_usage = Usage {
            prompt_tokens: share,
            completion_tokens: 0,
            total_tokens: share,
        };
        let body = json!({"object": "list", "data": items, "model": model,
            "usage": {"prompt_tokens": share, "total_tokens": share}});
        out.push((Bytes::from(body.to_string()), usage.map(|_| part_usage)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(inputs: &[&str]) -> Job {
        Job {
            group: String::new(),
            params: Map::new(),
            inputs: inputs.iter().map(|s| json!(s)).collect(),
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn an_answer_is_split_in_order_with_indices_from_zero() {
        let raw = json!({"object": "list", "model": "m", "usage": {"prompt_tokens": 10, "total_tokens": 10},
        "data": [
            {"object": "embedding", "index": 2, "embedding": [2.0]},
            {"object": "embedding", "index": 0, "embedding": [0.0]},
            {"object": "embedding", "index": 1, "embedding": [1.0]},
        ]});
        let jobs = vec![job(&["a"]), job(&["b", "c"])];
        let usage = Some(Usage {
            prompt_tokens: 10,
            completion_tokens: 0,
            total_tokens: 10,
        });
        let parts = split(raw.to_string().as_bytes(), usage, &jobs, 3).unwrap();
        let first: Value = serde_json::from_slice(&parts[0].0).unwrap();
        let second: Value = serde_json::from_slice(&parts[1].0).unwrap();
        assert_eq!(first["data"][0]["embedding"], json!([0.0]));
        assert_eq!(second["data"][0]["index"], 0);
        assert_eq!(second["data"][1]["embedding"], json!([2.0]));
        assert_eq!(
            parts[0].1.unwrap().prompt_tokens + parts[1].1.unwrap().prompt_tokens,
            10
        );
        assert!(
            split(raw.to_string().as_bytes(), None, &jobs[..1], 1).is_err(),
            "count mismatch"
        );
    }
}
