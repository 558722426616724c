//! Extraction: the workers that turn queued messages into memories.
//!
//! A job runs mem0's two steps, each one model call through `inference` under the owner's
//! key (route `memory` in the usage log), with JSON-schema output:
//! 1. **facts**: the extraction alias lists the facts about the user in the new messages;
//! 2. **decisions**: the subject's memories most similar to those facts are shown to it,
//!    numbered `0…n` (so it cannot name, or invent, a real id), and it answers for each
//!    fact and memory `ADD`, `UPDATE`, `DELETE` or `NONE`.
//!
//! The decisions are mapped back to real ids and applied in one transaction that also
//! completes the job (see [`crate::store::memories`]). A failed attempt is retried with
//! backoff; after `max_attempts` the job is parked as `failed` with its error.
//!
//! Workers run in the instance that claimed the job: a loop claims due jobs up to the free
//! worker slots, runs each in a `JoinSet` with a heartbeat that renews its lease, and
//! removes finished jobs older than `retention` once a minute.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Memory, Subject, now_ms};
use crate::error::GatewayError;
use crate::inference::{CallContext, ChatReply};
use crate::state::AppState;
use crate::store::memories::{Change, JobRow, NewMemory};
use crate::wire::ChatRequest;
use crate::wire::responses::new_id;

/// The `json_schema` name of the facts call (the simulated model recognises it).
pub const FACTS_SCHEMA: &str = "memory_facts";
/// The `json_schema` name of the decisions call.
pub const DECISIONS_SCHEMA: &str = "memory_decisions";
/// Existing memories shown per fact in the decisions call.
const SIMILAR_PER_FACT: usize = 5;
/// How often the loop looks for due jobs when nothing woke it.
const POLL: Duration = Duration::from_millis(500);
/// Finished jobs removed per pass.
const PRUNE_BATCH: i64 = 1_000;
/// Stored turns queued per transaction at most.
const ENQUEUE_BATCH: usize = 128;

const FACTS_PROMPT: &str = "You extract durable facts about the user from a conversation, \
for a memory that later conversations will read. Record personal details, preferences, \
plans, relationships, health and dietary needs, work, places and other facts the user \
states about themselves. One short sentence per fact, in the third person (\"Name is \
Ada\", \"Lives in Lyon\"). Skip greetings, questions, and anything the assistant said \
unless the user confirmed it. Answer with JSON: {\"facts\": [\"...\"]}; an empty list when \
there is nothing worth keeping.";

const DECISIONS_PROMPT: &str = "You keep a memory of facts about a user. You get the \
memories that exist (each with an id) and newly extracted facts. For each new fact decide: \
ADD it as a new memory (a new fact); UPDATE an existing memory when the fact refines or \
changes it (keep its id, give the new text); DELETE an existing memory the fact \
contradicts and replaces nothing; NONE when the fact is already known. Also list the \
existing memories you keep unchanged with NONE. Use only the ids given. Answer with JSON: \
{\"memory\": [{\"id\": \"...\", \"text\": \"...\", \"event\": \"ADD|UPDATE|DELETE|NONE\"}]} \
(for ADD the id may be anything).";

/// Starts the claim loop and the enqueuer of stored turns; both end with `cancel`.
pub fn start(state: Arc<AppState>, cancel: CancellationToken) {
    let tasks = state.lifecycle.tasks.clone();
    let observed = state
        .memory
        .observed_rx
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(observed) = observed {
        tasks.spawn(enqueue(state.memory.clone(), observed, cancel.clone()));
    }
    tasks.spawn(run(state, cancel));
}

/// Queues stored turns as jobs, one at a time; at shutdown what is buffered is queued
/// before it returns.
async fn enqueue(
    memory: Arc<Memory>,
    mut observed: tokio::sync::mpsc::Receiver<super::Observed>,
    cancel: CancellationToken,
) {
    let mut batch = Vec::with_capacity(ENQUEUE_BATCH);
    loop {
        let n = tokio::select! {
            () = cancel.cancelled() => break,
            n = observed.recv_many(&mut batch, ENQUEUE_BATCH) => n,
        };
        if n == 0 {
            return;
        }
        queue_observed(&memory, &mut batch).await;
    }
    observed.close();
    while observed.recv_many(&mut batch, ENQUEUE_BATCH).await > 0 {
        queue_observed(&memory, &mut batch).await;
    }
}

/// Queues the turns that arrived together in one transaction (under load, one write for
/// many turns instead of one each).
async fn queue_observed(memory: &Memory, batch: &mut Vec<super::Observed>) {
    let items: Vec<ToQueue<'_>> = batch
        .iter()
        .map(|turn| ToQueue {
            subject: &turn.subject,
            conversation: turn.conversation.as_deref(),
            messages: &turn.messages,
            metadata: "{}",
            alias: Some(&turn.alias),
        })
        .collect();
    if let Err(e) = memory.queue_many(&items).await {
        for _ in 0..items.len() {
            memory.dropped();
        }
        tracing::warn!(error = %e, turns = items.len(), "memory: queueing extractions failed");
    }
    drop(items);
    batch.clear();
}

async fn run(state: Arc<AppState>, cancel: CancellationToken) {
    let memory = state.memory.clone();
    let config = memory.config().clone();
    let mut running: JoinSet<()> = JoinSet::new();
    let mut last_prune = Instant::now();
    let mut last_count = Instant::now();
    memory.refresh_depth().await;
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            () = memory.wake.notified() => {}
            () = tokio::time::sleep(POLL) => {}
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
        while running.try_join_next().is_some() {}
        if last_count.elapsed() >= Duration::from_secs(1) {
            last_count = Instant::now();
            memory.refresh_depth().await;
        }
        let free = config.workers.saturating_sub(running.len());
        if free > 0 {
            let now = now_ms() / 1000;
            let lease = i64::try_from(config.lease.as_secs()).unwrap_or(120);
            match memory
                .store()
                .claim_memory_jobs(now, now + lease, i64::try_from(free).unwrap_or(1))
                .await
            {
                Ok(jobs) => {
                    for job in jobs {
                        running.spawn(run_job(state.clone(), job));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "memory: claiming jobs failed"),
            }
        }
        if last_prune.elapsed() > Duration::from_secs(60) {
            last_prune = Instant::now();
            let before = now_ms() / 1000 - i64::try_from(config.retention.as_secs()).unwrap_or(0);
            if let Err(e) = memory.store().prune_memory_jobs(before, PRUNE_BATCH).await {
                tracing::warn!(error = %e, "memory: pruning jobs failed");
            }
        }
    }
    // Jobs cut short here keep their claim until the lease runs out; then any instance
    // runs them again, and the attempt fence keeps a half-done one from applying twice.
    running.shutdown().await;
}

/// Runs one claimed job with a heartbeat, then records how it ended.
async fn run_job(state: Arc<AppState>, job: JobRow) {
    let memory = state.memory.clone();
    let config = memory.config().clone();
    let started = Instant::now();
    let lease = config.lease;
    let work = extract(&state, &job);
    tokio::pin!(work);
    let mut beat = tokio::time::interval(lease / 3);
    beat.tick().await;
    let outcome = loop {
        tokio::select! {
            outcome = &mut work => break outcome,
            _ = beat.tick() => {
                let until = now_ms() / 1000 + i64::try_from(lease.as_secs()).unwrap_or(120);
                match memory.store().extend_memory_job(&job.id, job.attempts, until).await {
                    Ok(true) => {}
                    // Another claim took it: stop, its worker runs it.
                    Ok(false) => return,
                    Err(e) => tracing::debug!(error = %e, "memory: lease renewal failed"),
                }
            }
        }
    };
    metrics::histogram!("switchyard_memory_job_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    match outcome {
        Ok(counts) => {
            memory
                .figures
                .completed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            memory.figures.completed_us.fetch_add(
                u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                std::sync::atomic::Ordering::Relaxed,
            );
            metrics::counter!("switchyard_memory_jobs_total", "outcome" => "completed")
                .increment(1);
            for (event, n) in counts {
                metrics::counter!("switchyard_memory_decisions_total", "event" => event)
                    .increment(n);
                memory.figures.decided(event, n);
            }
        }
        Err(err) => {
            let last = job.attempts >= i64::from(config.max_attempts) || !err.retryable;
            let retry_at = (!last).then(|| {
                // 2, 4, 8… seconds, capped at five minutes.
                let wait = 2i64
                    .saturating_pow(u32::try_from(job.attempts).unwrap_or(8))
                    .min(300);
                now_ms() / 1000 + wait
            });
            tracing::warn!(job = %job.id, attempt = job.attempts, error = %err.message,
                parked = last, "memory: extraction failed");
            if let Err(e) = memory
                .store()
                .fail_memory_job(&job.id, job.attempts, &err.message, retry_at)
                .await
            {
                tracing::warn!(error = %e, "memory: recording a failed job failed");
            }
            if last {
                memory
                    .figures
                    .failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                metrics::counter!("switchyard_memory_jobs_total", "outcome" => "failed")
                    .increment(1);
            } else {
                metrics::counter!("switchyard_memory_jobs_total", "outcome" => "retried")
                    .increment(1);
            }
        }
    }
}

/// Why an attempt failed, and whether another could succeed.
#[derive(Debug)]
struct JobError {
    message: String,
    retryable: bool,
}

impl JobError {
    fn permanent(message: impl Into<String>) -> JobError {
        JobError {
            message: message.into(),
            retryable: false,
        }
    }
}

impl From<GatewayError> for JobError {
    fn from(e: GatewayError) -> JobError {
        JobError {
            retryable: e.is_retryable() || e.status().as_u16() == 429,
            message: e.to_string(),
        }
    }
}

impl From<crate::store::StoreError> for JobError {
    fn from(e: crate::store::StoreError) -> JobError {
        JobError {
            message: e.to_string(),
            retryable: true,
        }
    }
}

/// One message of a job.
#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Debug, Deserialize)]
struct Facts {
    facts: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Decisions {
    memory: Vec<Decision>,
}

#[derive(Debug, Deserialize)]
struct Decision {
    id: String,
    #[serde(default)]
    text: String,
    event: String,
}

/// The job's two model calls and the transaction; the count of each decision taken.
async fn extract(state: &AppState, job: &JobRow) -> Result<Vec<(&'static str, u64)>, JobError> {
    let memory = &state.memory;
    let principal = if job.owner.is_empty() {
        None
    } else {
        match state.auth.principal_of_key(&job.owner).await? {
            Some(p) => Some(p),
            None => return Err(JobError::permanent("the key was revoked or deleted")),
        }
    };
    let alias = memory
        .config()
        .extraction_model
        .clone()
        .or_else(|| job.alias.clone())
        .or_else(|| state.settings.models.keys().next().cloned())
        .ok_or_else(|| JobError::permanent("no model to extract with"))?;
    let messages: Vec<Message> = serde_json::from_str(&job.messages)
        .map_err(|e| JobError::permanent(format!("unreadable messages: {e}")))?;
    let ctx = state
        .inference
        .context("memory", Arc::from(job.id.as_str()), principal);
    let conversation: String = messages
        .iter()
        .map(|m| format!("{}: {}\n", m.role, m.content))
        .collect();
    let facts: Facts = ask(
        state,
        &ctx,
        &alias,
        FACTS_PROMPT,
        &conversation,
        FACTS_SCHEMA,
        json!({
            "type": "object",
            "properties": {"facts": {"type": "array", "items": {"type": "string"}}},
            "required": ["facts"],
            "additionalProperties": false
        }),
    )
    .await?;
    let facts: Vec<String> = facts
        .facts
        .into_iter()
        .map(|f| f.trim().to_owned())
        .filter(|f| !f.is_empty() && f.chars().count() <= 2_000)
        .take(50)
        .collect();
    let subject = Subject {
        owner: job.owner.clone(),
        user: job.subject.clone(),
    };
    let mut changes = Vec::new();
    let mut counts: HashMap<&'static str, u64> = HashMap::new();
    if !facts.is_empty() {
        // The existing memories nearest to any fact, numbered for the model.
        let mut shown: Vec<(String, String)> = Vec::new();
        for fact in &facts {
            for found in memory
                .search(&subject, fact, SIMILAR_PER_FACT, ctx.principal.as_ref())
                .await?
            {
                if !shown.iter().any(|(id, _)| *id == found.id) {
                    shown.push((found.id, found.memory));
                }
            }
        }
        let existing: Vec<Value> = shown
            .iter()
            .enumerate()
            .map(|(i, (_, text))| json!({"id": i.to_string(), "text": text}))
            .collect();
        let input = json!({"existing_memories": existing, "new_facts": facts}).to_string();
        let decisions: Decisions = ask(
            state,
            &ctx,
            &alias,
            DECISIONS_PROMPT,
            &input,
            DECISIONS_SCHEMA,
            json!({
                "type": "object",
                "properties": {"memory": {"type": "array", "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "text": {"type": "string"},
                        "event": {"type": "string", "enum": ["ADD", "UPDATE", "DELETE", "NONE"]}
                    },
                    "required": ["id", "text", "event"],
                    "additionalProperties": false
                }}},
                "required": ["memory"],
                "additionalProperties": false
            }),
        )
        .await?;
        let real = |id: &str| -> Option<String> {
            id.trim()
                .parse::<usize>()
                .ok()
                .and_then(|i| shown.get(i))
                .map(|(real, _)| real.clone())
        };
        for decision in decisions.memory {
            let text = decision.text.trim();
            let event = match decision.event.to_ascii_uppercase().as_str() {
                "ADD" if !text.is_empty() => {
                    changes.push(Change::Add(NewMemory {
                        id: new_id("mem"),
                        memory: text.to_owned(),
                        metadata: job.metadata.clone(),
                    }));
                    "add"
                }
                "UPDATE" if !text.is_empty() => match real(&decision.id) {
                    Some(id) => {
                        changes.push(Change::Update {
                            id,
                            memory: text.to_owned(),
                        });
                        "update"
                    }
                    None => "invalid",
                },
                "DELETE" => match real(&decision.id) {
                    Some(id) => {
                        changes.push(Change::Delete { id });
                        "delete"
                    }
                    None => "invalid",
                },
                "NONE" => "none",
                _ => "invalid",
            };
            *counts.entry(event).or_default() += 1;
        }
    }
    let result = json!({"facts": facts.len(), "changes": changes.len()}).to_string();
    let (_, applied) = memory
        .store()
        .apply_memory_changes(
            &job.owner,
            &job.subject,
            &changes,
            Some((&job.id, job.attempts, &result)),
        )
        .await?;
    if !applied {
        // The claim moved to another worker while this one ran: its run counts.
        return Ok(Vec::new());
    }
    if !changes.is_empty() {
        memory.written(&subject);
    }
    Ok(counts.into_iter().collect())
}

/// One JSON-schema call to the extraction alias, its answer parsed as `T`.
async fn ask<T: for<'de> Deserialize<'de>>(
    state: &AppState,
    ctx: &CallContext,
    alias: &str,
    system: &str,
    user: &str,
    schema_name: &str,
    schema: Value,
) -> Result<T, JobError> {
    let body = json!({
        "model": alias,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user}
        ],
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": schema_name, "strict": true, "schema": schema
        }}
    });
    let request = ChatRequest::parse(Bytes::from(body.to_string()))?;
    let ChatReply::Complete(completion) = state.inference.chat(ctx, request).await? else {
        return Err(JobError::permanent("the model answered with a stream"));
    };
    let chat = completion.chat().map_err(|e| JobError {
        message: format!("unreadable completion: {e}"),
        retryable: true,
    })?;
    let text = chat.text().unwrap_or_default();
    serde_json::from_str(strip_fence(text)).map_err(|e| JobError {
        message: format!("the model's answer is not the schema's JSON: {e}"),
        retryable: true,
    })
}

/// A JSON answer without the code fence some models wrap it in.
fn strip_fence(text: &str) -> &str {
    let t = text.trim();
    let t = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .unwrap_or(t);
    t.strip_suffix("```").unwrap_or(t).trim()
}

/// What a queue attempt did.
pub struct QueuedJob {
    pub id: String,
    pub status: &'static str,
}

/// Messages to queue for extraction.
pub struct ToQueue<'a> {
    pub subject: &'a Subject,
    /// A conversation's messages join its queued job.
    pub conversation: Option<&'a str>,
    /// `(role, text)` pairs.
    pub messages: &'a [(String, String)],
    pub metadata: &'a str,
    pub alias: Option<&'a str>,
}

impl Memory {
    /// Queues messages for extraction (see [`Memory::queue_many`]).
    ///
    /// # Errors
    /// When the store fails.
    pub async fn queue(
        &self,
        item: ToQueue<'_>,
    ) -> Result<Option<QueuedJob>, crate::store::StoreError> {
        Ok(self.queue_many(&[item]).await?.pop().flatten())
    }

    /// Queues messages for extraction in one transaction: a conversation's join its
    /// queued job (due once it holds `every` user messages, or after `settle`); others are
    /// due at once. Past the queue bound a new job is refused and counted (`None`); a join
    /// is not refused.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn queue_many(
        &self,
        items: &[ToQueue<'_>],
    ) -> Result<Vec<Option<QueuedJob>>, crate::store::StoreError> {
        use crate::store::memories::{NewJob, Queued};
        let ids: Vec<String> = items.iter().map(|_| new_id("memjob")).collect();
        let encoded: Vec<Vec<String>> = items
            .iter()
            .map(|item| {
                item.messages
                    .iter()
                    .map(|(role, content)| json!({"role": role, "content": content}).to_string())
                    .collect()
            })
            .collect();
        let users = |item: &ToQueue<'_>| {
            i64::try_from(item.messages.iter().filter(|(r, _)| r == "user").count())
                .unwrap_or(i64::MAX)
        };
        let jobs: Vec<NewJob<'_>> = items
            .iter()
            .zip(&ids)
            .zip(&encoded)
            .map(|((item, id), messages)| NewJob {
                id,
                owner: &item.subject.owner,
                subject: &item.subject.user,
                conversation_id: item.conversation,
                messages,
                user_messages: users(item),
                metadata: item.metadata,
                alias: item.alias,
            })
            .collect();
        let every = i64::from(self.config.every);
        let settle = i64::try_from(self.config.settle.as_secs()).unwrap_or(600);
        let due = move |debounced: bool, count: i64| {
            let now = now_ms() / 1000;
            if !debounced || count >= every {
                now
            } else {
                now + settle
            }
        };
        let bound = i64::try_from(self.config.queue_bound).unwrap_or(i64::MAX);
        let outcomes = self
            .store
            .queue_memory_jobs(&jobs, self.config.max_job_messages, due, bound)
            .await?;
        let mut wake = false;
        let queued = outcomes
            .into_iter()
            .zip(items)
            .map(|(outcome, item)| match outcome {
                Queued::New(id) => {
                    self.depth
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    metrics::counter!("switchyard_memory_jobs_queued_total", "how" => "new")
                        .increment(1);
                    // Due now: claimed without waiting for the next poll.
                    wake |= item.conversation.is_none() || users(item) >= every;
                    Some(QueuedJob {
                        id,
                        status: "queued",
                    })
                }
                Queued::Joined(id) => {
                    metrics::counter!("switchyard_memory_jobs_queued_total", "how" => "joined")
                        .increment(1);
                    Some(QueuedJob {
                        id,
                        status: "queued",
                    })
                }
                Queued::Full => {
                    self.dropped();
                    None
                }
            })
            .collect();
        if wake {
            self.wake.notify_one();
        }
        Ok(queued)
    }

    pub(super) fn dropped(&self) {
        self.figures
            .dropped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!("switchyard_memory_jobs_dropped_total").increment(1);
    }

    /// Reads the number of jobs queued or running (the bound's gauge).
    pub async fn refresh_depth(&self) {
        if let Ok(counts) = self.store.memory_job_depth().await {
            self.depth
                .store(counts, std::sync::atomic::Ordering::Relaxed);
            metrics::gauge!("switchyard_memory_queue_depth").set(counts as f64);
        }
    }
}
