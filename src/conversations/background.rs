//! Background responses (`background: true`): the create request is checked like any
//! other (a mistake is a 400 at once), then stored as a `queued` response with a job row
//! in one transaction, and the client is answered. A worker of any instance
//! ([`crate::jobs`]) claims the job, prepares the turn again from the stored request (the
//! history as it is when the job runs), calls the model through `inference` (the tool loop
//! included) and saves the result over the queued row in the same transaction that
//! completes the job, fenced by the claim's attempt number: a result is stored once
//! however many workers a lost lease let start it.
//!
//! With `stream: true` the worker stores every event as it is produced (`job_events`,
//! numbered by `sequence_number`), and the creating request — like any later
//! `GET /v1/responses/{id}?stream=true&starting_after=N` on any instance — follows them
//! from the store ([`Conversations::follow`]): a client that lost its connection resumes
//! where it left off and sees every later event once. A streamed job whose worker died
//! mid-stream is not run again (its client has already seen part of an answer): its
//! stream is ended with `error` and `response.failed` after the events that stand.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::Stream;
use serde_json::json;

use super::events::Sequencer;
use super::recall::MemorySwitch;
use super::{Conversations, Turn, end_frames, fail_response};
use crate::error::GatewayError;
use crate::inference::CallContext;
use crate::store::conversations::ResponseRow;
use crate::store::jobs::{JobRow, NewJob};
use crate::wire::responses::ResponseObject;

/// The job kind of a background response.
pub const RESPONSE_JOB: &str = "response";

/// The error a worker gets when its claim moved to another worker while it ran: it stops
/// and records nothing.
pub const SUPERSEDED: &str = "the job's claim moved to another worker";

/// Events stored per write at most (a burst of deltas goes in one transaction).
const EVENT_BATCH: usize = 64;
/// Events a follower reads per query.
const FOLLOW_PAGE: i64 = 256;
/// How often a follower looks for events written by another instance.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// How long a follower waits for the last events of a job that has ended.
const FOLLOW_GRACE: Duration = Duration::from_secs(2);

impl Conversations {
    /// Stores a prepared background turn as queued, with its job; returns the queued
    /// response's JSON.
    ///
    /// # Errors
    /// 503 when the store cannot take it.
    pub async fn queue_background(
        &self,
        turn: &Turn,
        body: &Bytes,
        switch: MemorySwitch,
    ) -> Result<String, GatewayError> {
        let response = &turn.response;
        let json = serde_json::to_string(response)
            .map_err(|e| GatewayError::Internal(format!("response unrenderable: {e}")))?;
        let row = ResponseRow {
            id: response.id.clone(),
            key_id: turn.owner.clone(),
            created_at: i64::try_from(response.created_at).unwrap_or(i64::MAX),
            status: response.status.clone(),
            model: response.model.clone(),
            previous_response_id: response.previous_response_id.clone(),
            conversation_id: response.conversation.as_ref().map(|c| c.id.clone()),
            body: json.clone(),
            input_tokens: 0,
            output_tokens: 0,
        };
        let options = json!({"memory": switch.as_str(), "stream": turn.stream}).to_string();
        // The body was read as JSON, so it is UTF-8.
        let payload = String::from_utf8_lossy(body);
        let job = NewJob {
            id: &response.id,
            kind: RESPONSE_JOB,
            owner: turn.owner.as_deref().unwrap_or(""),
            payload: &payload,
            options: &options,
        };
        self.store
            .queue_response(&row, &job, crate::memory::now_ms())
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "queueing a background response failed");
                GatewayError::DependencyUnavailable("The conversation store")
            })?;
        Ok(json)
    }

    /// Runs a claimed background response to its stored result: the turn prepared again
    /// from the job's request under its id, marked `in_progress`, completed (the tool loop
    /// included) and saved over the queued row with the job's completion.
    ///
    /// # Errors
    /// The turn's refusals and failures (the job decides whether to retry); an internal
    /// error saying [`SUPERSEDED`] when another worker's claim took the job.
    pub async fn run_background(
        self: &Arc<Self>,
        ctx: &CallContext,
        job: &JobRow,
    ) -> Result<(), GatewayError> {
        let owner = (!job.owner.is_empty()).then_some(job.owner.as_str());
        let Some(queued) = self.store.response(owner, &job.id).await.map_err(|e| {
            tracing::warn!(error = %e, "reading a background response failed");
            GatewayError::DependencyUnavailable("The conversation store")
        })?
        else {
            return Err(GatewayError::NotFound(format!(
                "Response with id '{}' was deleted before it ran.",
                job.id
            )));
        };
        let options: serde_json::Value = serde_json::from_str(&job.options).unwrap_or_default();
        let switch = MemorySwitch::parse(options["memory"].as_str().unwrap_or(""));
        let mut turn = self
            .prepare(
                ctx.principal.as_ref(),
                Bytes::from(job.payload.clone()),
                switch,
            )
            .await?;
        turn.response.id.clone_from(&job.id);
        turn.response.created_at = u64::try_from(queued.created_at).unwrap_or(0);
        turn.response.status = "in_progress".into();
        turn.job_attempt = Some(job.attempts);
        let body = serde_json::to_string(&turn.response).unwrap_or_default();
        let mine = self
            .store
            .start_response_job(&job.id, job.attempts, &body)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "marking a background response in progress failed");
                GatewayError::DependencyUnavailable("The conversation store")
            })?;
        if !mine {
            return Err(GatewayError::Internal(SUPERSEDED.into()));
        }
        if !turn.stream {
            return self.complete(ctx, turn).await.map(|_| ());
        }
        let (id, attempt) = (job.id.clone(), job.attempts);
        if self
            .store
            .last_job_event(&id)
            .await
            .map_err(store_away)?
            .is_some()
        {
            // An earlier attempt streamed part of an answer: those events stand, and the
            // job fails (its stream is closed after them when the failure is recorded).
            return Err(GatewayError::Internal(
                "the worker running this response stopped mid-stream".into(),
            ));
        }
        let mut frames = self.stream(ctx, turn).await?.frames;
        // Frame n carries sequence number n.
        let mut next = 0i64;
        let mut batch: Vec<(i64, String)> = Vec::with_capacity(EVENT_BATCH);
        while let Some(frame) = frames.recv().await {
            batch.push((next, String::from_utf8_lossy(&frame).into_owned()));
            next += 1;
            while batch.len() < EVENT_BATCH {
                let Ok(frame) = frames.try_recv() else { break };
                batch.push((next, String::from_utf8_lossy(&frame).into_owned()));
                next += 1;
            }
            let mine = self
                .store
                .append_job_events(&id, attempt, &batch)
                .await
                .map_err(store_away)?;
            if !mine {
                return Err(GatewayError::Internal(SUPERSEDED.into()));
            }
            batch.clear();
            self.job_events.notify_waiters();
        }
        Ok(())
    }

    /// Ends a streamed background response's stored events with `error` and
    /// `response.failed` (the stored response as failed, `failed_body`), after whatever
    /// events stand: a job that failed before or while streaming still tells its
    /// followers how it ended. Nothing for a job created without `stream`.
    pub async fn close_failed_stream(&self, job: &JobRow, failed_body: &str, message: &str) {
        if !streamed(&job.options) {
            return;
        }
        let Ok(response) = serde_json::from_str::<ResponseObject>(failed_body) else {
            return;
        };
        let next = match self.store.last_job_event(&job.id).await {
            Ok(last) => last.map_or(0, |n| n + 1),
            Err(e) => {
                tracing::warn!(error = %e, "ending a background stream failed");
                return;
            }
        };
        let mut seq = Sequencer::starting_at(u64::try_from(next).unwrap_or(0));
        let mut out = Vec::new();
        end_frames(&mut seq, &response, Some(message.to_owned()), &mut out);
        let events: Vec<(i64, String)> = out
            .iter()
            .zip(next..)
            .map(|(frame, n)| (n, String::from_utf8_lossy(frame).into_owned()))
            .collect();
        match self
            .store
            .append_job_events(&job.id, job.attempts, &events)
            .await
        {
            Ok(_) => self.job_events.notify_waiters(),
            Err(e) => tracing::warn!(error = %e, "ending a background stream failed"),
        }
    }

    /// A streamed background response's events after sequence number `after`, then the
    /// rest as they are stored (by a worker here or on another instance), until its
    /// terminal event. Reads the store a page at a time: a follower holds at most one
    /// page, however far behind it is.
    pub fn follow(
        self: &Arc<Self>,
        id: String,
        after: Option<i64>,
    ) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
        let follower = Follower {
            conversations: self.clone(),
            id,
            last: after,
            pending: VecDeque::new(),
            done: false,
            ended_at: None,
        };
        futures_util::stream::unfold(follower, |mut f| async move {
            f.next().await.map(|frame| (Ok(frame), f))
        })
    }
}

struct Follower {
    conversations: Arc<Conversations>,
    id: String,
    last: Option<i64>,
    pending: VecDeque<Bytes>,
    done: bool,
    /// When the job was first seen ended with no event left to read.
    ended_at: Option<Instant>,
}

impl Follower {
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Some(frame);
            }
            if self.done {
                return None;
            }
            let store = &self.conversations.store;
            // Registered before the read, so a write right after it still wakes us.
            let written = self.conversations.job_events.notified();
            let events = match store.job_events(&self.id, self.last, FOLLOW_PAGE).await {
                Ok(events) => events,
                Err(e) => {
                    // The client resumes from its last sequence number once it is back.
                    tracing::warn!(error = %e, "following a background response failed");
                    return None;
                }
            };
            if !events.is_empty() {
                for (seq, frame) in events {
                    self.last = Some(seq);
                    self.done |= is_terminal(&frame);
                    self.pending.push_back(Bytes::from(frame));
                }
                self.ended_at = None;
                continue;
            }
            match store.job_state(&self.id).await {
                Ok(Some((status, _))) if matches!(status.as_str(), "queued" | "running") => {}
                // Ended (or removed): its last events follow its result by moments.
                Ok(_) => {
                    if self.ended_at.get_or_insert_with(Instant::now).elapsed() > FOLLOW_GRACE {
                        return None;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "following a background response failed");
                    return None;
                }
            }
            tokio::select! {
                () = written => {}
                () = tokio::time::sleep(FOLLOW_POLL) => {}
            }
        }
    }
}

/// Whether a job's options (as [`Conversations::queue_background`] stores them) say its
/// request was streamed: its events are kept.
pub fn streamed(options: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(options).is_ok_and(|o| o["stream"] == true)
}

/// Whether a stored frame ends its response's stream.
fn is_terminal(frame: &str) -> bool {
    ["completed", "failed", "incomplete"].iter().any(|end| {
        frame
            .strip_prefix("event: response.")
            .is_some_and(|rest| rest.starts_with(end) && rest[end.len()..].starts_with('\n'))
    })
}

fn store_away(e: crate::store::StoreError) -> GatewayError {
    tracing::warn!(error = %e, "the store failed under a background response");
    GatewayError::DependencyUnavailable("The conversation store")
}

/// A stored background response's JSON rewritten as ended with `status` (`queued` again
/// for a retry, `failed` with `error`, `cancelled`).
pub fn ended(stored: &str, status: &str, error: Option<&str>) -> String {
    let Ok(mut response) = serde_json::from_str::<ResponseObject>(stored) else {
        return stored.to_owned();
    };
    match error {
        Some(message) if status == "failed" => fail_response(&mut response, message),
        _ => {
            response.status = status.into();
            response.completed_at = None;
        }
    }
    serde_json::to_string(&response).unwrap_or_else(|_| stored.to_owned())
}
