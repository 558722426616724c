//! The Batch API's runner: a batch is one job (kind [`BATCH_JOB`]) that validates its
//! input file line by line, runs the lines through `inference` a few at a time, and writes
//! the output and error files in OpenAI's line format.
//!
//! Lines are rows ([`crate::store::files`]): validation stores them (refused ones already
//! as errors, which go to the error file), each line's result is stored as it ends, and a
//! batch whose worker died goes on from the lines still pending. A line starts only while
//! the global admission queue has nobody waiting and a share of its slots free
//! (`[batches] max_admission_share`), so interactive traffic goes first; this is what
//! makes batches work on providers that have no batch API of their own. A line that fails
//! for a reason that may pass (a rate limit, an upstream timeout) is tried again a few
//! times before its failure is recorded. Past `expires_at` the rest of the lines end in
//! the error file as `batch_expired`.

mod pace;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use crate::conversations::recall::MemorySwitch;
use crate::error::GatewayError;
use crate::inference::{CallContext, ChatReply};
use crate::memory::now_ms;
use crate::state::AppState;
use crate::store::files::{BatchEnd, BatchRow, FileRow, NewLine};
use crate::store::jobs::JobRow;
use crate::wire::responses::new_id;
use crate::wire::{ChatRequest, EmbeddingsRequest};

/// The job kind of a batch.
pub const BATCH_JOB: &str = "batch";
/// The endpoints a batch may target.
pub const ENDPOINTS: [&str; 3] = ["/v1/chat/completions", "/v1/responses", "/v1/embeddings"];
/// How long a batch may run: OpenAI's only `completion_window`.
pub const WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Lines stored per transaction while validating.
const INSERT_CHUNK: usize = 500;
/// Pending lines read at a time.
const RUN_PAGE: i64 = 256;
/// Results read at a time while writing the files.
const RESULT_PAGE: i64 = 1_000;
/// Tries of a line that fails for a reason that may pass.
const LINE_TRIES: u32 = 3;
/// How often a line waiting for admission headroom looks again.
const HEADROOM_POLL: Duration = Duration::from_millis(20);
/// The longest `custom_id`.
const MAX_CUSTOM_ID: usize = 512;

fn secs(ms: i64) -> i64 {
    ms / 1000
}

/// A batch as OpenAI shapes it.
pub fn batch_json(row: &BatchRow) -> Value {
    let metadata: Value = row
        .metadata
        .as_deref()
        .and_then(|m| serde_json::from_str(m).ok())
        .unwrap_or(Value::Null);
    let errors: Value = row
        .errors
        .as_deref()
        .and_then(|e| serde_json::from_str(e).ok())
        .map_or(
            Value::Null,
            |data: Value| json!({"object": "list", "data": data}),
        );
    json!({
        "id": row.id,
        "object": "batch",
        "endpoint": row.endpoint,
        "errors": errors,
        "input_file_id": row.input_file_id,
        "completion_window": row.completion_window,
        "status": row.status,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "created_at": secs(row.created_at),
        "in_progress_at": row.in_progress_at.map(secs),
        "expires_at": secs(row.expires_at),
        "finalizing_at": row.finalizing_at.map(secs),
        "completed_at": row.completed_at.map(secs),
        "failed_at": row.failed_at.map(secs),
        "expired_at": row.expired_at.map(secs),
        "cancelling_at": row.cancelling_at.map(secs),
        "cancelled_at": row.cancelled_at.map(secs),
        "request_counts": {
            "total": row.total,
            "completed": row.completed,
            "failed": row.failed,
        },
        "usage": {
            "input_tokens": row.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": row.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": row.input_tokens + row.output_tokens,
        },
        "metadata": metadata,
    })
}

fn store_away(e: crate::store::StoreError) -> GatewayError {
    tracing::warn!(error = %e, "batches: the store failed");
    GatewayError::DependencyUnavailable("The batch store")
}

fn files_away(e: std::io::Error) -> GatewayError {
    tracing::warn!(error = %e, "batches: the file store failed");
    GatewayError::DependencyUnavailable("The file store")
}

/// Runs a claimed batch from wherever it stands; `Ok` once it has ended (the job with it).
///
/// # Errors
/// A batch that cannot go on: the engine retries it or ends it as failed.
pub async fn run(
    state: &Arc<AppState>,
    ctx: &CallContext,
    job: &JobRow,
) -> Result<(), GatewayError> {
    let batch = state
        .store
        .batch(None, &job.id)
        .await
        .map_err(store_away)?
        .ok_or_else(|| GatewayError::NotFound(format!("Batch '{}' is gone.", job.id)))?;
    match batch.status.as_str() {
        "validating" => {
            validate(state, job, &batch).await?;
        }
        // A worker that died while finalizing leaves `finalizing`: the end is written again.
        "in_progress" | "finalizing" => {}
        "cancelling" => return end(state, job, "cancelled", None).await,
        // Ended already (its job's end was recorded with it).
        _ => return Ok(()),
    }
    let share = state.settings.batches.max_admission_share;
    let concurrency = state.settings.batches.concurrency;
    let (endpoint, expires_at, id) = (batch.endpoint.as_str(), batch.expires_at, job.id.as_str());
    let mut after = 0i64;
    let pacer = &pace::Pacer::new(state.settings.batches.yield_cpu);
    loop {
        if now_ms() >= expires_at {
            return end(state, job, "expired", None).await;
        }
        let page = state
            .store
            .pending_batch_lines(&job.id, after, RUN_PAGE)
            .await
            .map_err(store_away)?;
        let Some(last) = page.last() else { break };
        after = last.0;
        let failures = futures_util::stream::iter(page)
            .map(|(line, custom_id, request)| async move {
                let turn = loop {
                    if state.inference.admission().has_headroom(share)
                        && let Some(turn) = pacer.turn(&state.stats)
                    {
                        break turn;
                    }
                    tokio::time::sleep(HEADROOM_POLL).await;
                };
                if now_ms() >= expires_at {
                    return Ok(());
                }
                let started = std::time::Instant::now();
                let (ok, result, tokens) =
                    run_line(state, ctx, endpoint, custom_id.as_deref(), &request).await;
                let finished = state
                    .store
                    .finish_batch_line(id, line, ok, &result, tokens)
                    .await
                    .map_err(store_away);
                if turn.paced {
                    tokio::time::sleep(started.elapsed()).await;
                }
                finished
            })
            .buffer_unordered(concurrency)
            .filter_map(|r| async move { r.err() })
            .collect::<Vec<_>>()
            .await;
        if let Some(e) = failures.into_iter().next() {
            return Err(e);
        }
    }
    end(state, job, "completed", None).await
}

/// Reads the input file line by line into line rows; a line that is not a valid request
/// for the batch's endpoint is stored as an error. Then the batch is `in_progress`.
async fn validate(
    state: &Arc<AppState>,
    job: &JobRow,
    batch: &BatchRow,
) -> Result<(), GatewayError> {
    let input = state
        .store
        .file(&batch.owner, &batch.input_file_id)
        .await
        .map_err(store_away)?
        .ok_or_else(|| {
            GatewayError::invalid(
                format!("The input file '{}' was deleted.", batch.input_file_id),
                Some("input_file_id"),
            )
        })?;
    let file = state.files.open_file(&input.id).await.map_err(files_away)?;
    let mut lines = tokio::io::BufReader::with_capacity(256 * 1024, file).lines();
    let max_lines = state.settings.batches.max_lines;
    let mut seen: HashSet<String> = HashSet::new();
    let mut chunk: Vec<NewLine> = Vec::with_capacity(INSERT_CHUNK);
    let (mut total, mut refused, mut number) = (0i64, 0i64, 0i64);
    loop {
        let text = match lines.next_line().await {
            Ok(Some(text)) => text,
            Ok(None) => break,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(GatewayError::invalid(
                    format!("Line {}: the input file is not UTF-8.", number + 1),
                    Some("input_file_id"),
                ));
            }
            Err(e) => return Err(files_away(e)),
        };
        number += 1;
        if text.trim().is_empty() {
            continue;
        }
        total += 1;
        if usize::try_from(total).unwrap_or(usize::MAX) > max_lines {
            return Err(GatewayError::invalid(
                format!("The input file has more than {max_lines} requests."),
                Some("input_file_id"),
            ));
        }
        let line = match read_line(&text, &batch.endpoint, &mut seen) {
            Ok((custom_id, body)) => NewLine {
                line: number,
                custom_id: Some(custom_id),
                request: body,
                refused: None,
            },
            Err((custom_id, message)) => {
                refused += 1;
                let error = json!({
                    "id": new_id("batch_req"),
                    "custom_id": custom_id,
                    "response": null,
                    "error": {"code": "invalid_request", "message": format!("Line {number}: {message}")},
                });
                NewLine {
                    line: number,
                    custom_id,
                    request: text,
                    refused: Some(error.to_string()),
                }
            }
        };
        chunk.push(line);
        if chunk.len() == INSERT_CHUNK {
            state
                .store
                .insert_batch_lines(&job.id, &chunk)
                .await
                .map_err(store_away)?;
            chunk.clear();
        }
    }
    state
        .store
        .insert_batch_lines(&job.id, &chunk)
        .await
        .map_err(store_away)?;
    let started = state
        .store
        .start_batch(&job.id, job.attempts, total, refused, now_ms())
        .await
        .map_err(store_away)?;
    if !started {
        return Err(GatewayError::Internal(
            crate::conversations::background::SUPERSEDED.into(),
        ));
    }
    Ok(())
}

/// One input line checked: its `custom_id` and request body, or why it is refused (with
/// the `custom_id` when it could be read).
fn read_line(
    text: &str,
    endpoint: &str,
    seen: &mut HashSet<String>,
) -> Result<(String, String), (Option<String>, String)> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| (None, format!("not valid JSON ({e}).")))?;
    let Some(object) = value.as_object() else {
        return Err((None, "a line must be a JSON object.".into()));
    };
    let custom_id = match object.get("custom_id") {
        Some(Value::String(id)) if !id.is_empty() && id.len() <= MAX_CUSTOM_ID => id.clone(),
        Some(Value::String(_)) => {
            return Err((
                None,
                format!("'custom_id' must be 1 to {MAX_CUSTOM_ID} characters."),
            ));
        }
        _ => return Err((None, "'custom_id' must be a string.".into())),
    };
    let refuse = |message: String| Err((Some(custom_id.clone()), message));
    if object.get("method").and_then(Value::as_str) != Some("POST") {
        return refuse("'method' must be \"POST\".".into());
    }
    match object.get("url").and_then(Value::as_str) {
        Some(url) if url == endpoint => {}
        Some(url) => {
            return refuse(format!(
                "'url' is '{url}', but the batch's endpoint is '{endpoint}'."
            ));
        }
        None => return refuse("'url' must be a string.".into()),
    }
    let Some(body) = object.get("body").filter(|b| b.is_object()) else {
        return refuse("'body' must be a JSON object.".into());
    };
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return refuse("'body.stream' cannot be true in a batch.".into());
    }
    if body.get("background").and_then(Value::as_bool) == Some(true) {
        return refuse("'body.background' cannot be true in a batch.".into());
    }
    if !body.get("model").is_some_and(Value::is_string) {
        return refuse("'body.model' must be a string.".into());
    }
    if !seen.insert(custom_id.clone()) {
        return refuse(format!("'custom_id' '{custom_id}' appears more than once."));
    }
    Ok((custom_id, body.to_string()))
}

/// Runs one line's request; whether it succeeded, its result line and its tokens.
async fn run_line(
    state: &Arc<AppState>,
    ctx: &CallContext,
    endpoint: &str,
    custom_id: Option<&str>,
    request: &str,
) -> (bool, String, (i64, i64)) {
    let request_id = new_id("req");
    let ctx = state.inference.context(
        "batch",
        Arc::from(request_id.as_str()),
        ctx.principal.clone(),
    );
    let mut tries = 0;
    let answer = loop {
        tries += 1;
        let answer = call(state, &ctx, endpoint, request).await;
        match &answer {
            Err(e) if tries < LINE_TRIES && may_pass(e) => {
                let wait = e
                    .retry_after()
                    .map_or(Duration::from_secs(1 << tries), Duration::from_secs);
                tokio::time::sleep(wait.min(Duration::from_secs(30))).await;
            }
            _ => break answer,
        }
    };
    let (ok, status, body) = match answer {
        Ok(body) => (true, 200, body),
        Err(e) => {
            let body = serde_json::from_slice(&e.to_json()).unwrap_or(Value::Null);
            (false, e.status().as_u16(), body)
        }
    };
    let tokens = usage_of(&body);
    let line = json!({
        "id": new_id("batch_req"),
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": null,
    });
    (ok, line.to_string(), tokens)
}

/// Whether a failed line may succeed if tried again.
fn may_pass(e: &GatewayError) -> bool {
    e.is_retryable()
        || matches!(
            e,
            GatewayError::KeyRateLimited { .. } | GatewayError::ServiceOverloaded { .. }
        )
}

/// Input and output tokens of an answer in any of the three shapes.
fn usage_of(body: &Value) -> (i64, i64) {
    let usage = &body["usage"];
    let get = |names: [&str; 2]| names.iter().find_map(|n| usage[*n].as_i64()).unwrap_or(0);
    (
        get(["prompt_tokens", "input_tokens"]),
        get(["completion_tokens", "output_tokens"]),
    )
}

/// One request through `inference` (or the Responses engine): the answer's body.
async fn call(
    state: &Arc<AppState>,
    ctx: &CallContext,
    endpoint: &str,
    request: &str,
) -> Result<Value, GatewayError> {
    let bytes = Bytes::copy_from_slice(request.as_bytes());
    let body = match endpoint {
        "/v1/chat/completions" => {
            let req = ChatRequest::parse(bytes)?;
            match state.inference.chat(ctx, req).await? {
                ChatReply::Complete(completion) => completion.body,
                ChatReply::Stream(_) => {
                    return Err(GatewayError::invalid(
                        "A batch line cannot stream.",
                        Some("stream"),
                    ));
                }
            }
        }
        "/v1/embeddings" => {
            let req = EmbeddingsRequest::parse(bytes)?;
            state.inference.embed(ctx, req).await?.body
        }
        _ => {
            let turn = state
                .conversations
                .prepare(ctx.principal.as_ref(), bytes, MemorySwitch::Alias)
                .await?;
            let (_, body) = state.conversations.complete(ctx, turn).await?;
            Bytes::from(body)
        }
    };
    serde_json::from_slice(&body)
        .map_err(|e| GatewayError::Internal(format!("the upstream's answer was not JSON: {e}")))
}

/// Ends a batch that stopped early (cancelled, or failed with `error`): what is done is
/// written out as for a finished one.
pub async fn end_early(state: &Arc<AppState>, job: &JobRow, status: &str, error: Option<&str>) {
    if let Err(e) = end(state, job, status, error).await {
        tracing::warn!(batch = %job.id, error = %e, "batches: ending a batch failed");
    }
}

/// Writes the output and error files and ends the batch and its job in one transaction.
async fn end(
    state: &Arc<AppState>,
    job: &JobRow,
    status: &str,
    error: Option<&str>,
) -> Result<(), GatewayError> {
    let now = now_ms();
    state
        .store
        .set_batch_status(
            &job.id,
            if status == "cancelled" {
                "cancelling"
            } else {
                "finalizing"
            },
            now,
        )
        .await
        .map_err(store_away)?;
    let limit = state.settings.files.max_batch_bytes;
    let output = keep_results(state, job, "output", results(state, &job.id, "ok"), limit).await?;
    let mut errors_stream = results(state, &job.id, "error").boxed();
    if status == "expired" {
        errors_stream = errors_stream.chain(expired_lines(state, &job.id)).boxed();
    }
    let errors_file = match keep_results(state, job, "error", errors_stream, limit).await {
        Ok(file) => file,
        Err(e) => {
            if let Some(file) = &output {
                state.files.remove(&file.id).await;
            }
            return Err(e);
        }
    };
    let errors = error.map(|message| {
        json!([{"code": "batch_failed", "message": message, "param": null, "line": null}])
            .to_string()
    });
    let end = BatchEnd {
        status,
        output: output.as_ref(),
        errors_file: errors_file.as_ref(),
        errors: errors.as_deref(),
        job_error: error,
    };
    let mine = state
        .store
        .end_batch(&job.id, job.attempts, &end, now_ms())
        .await
        .map_err(store_away);
    if !matches!(mine, Ok(true)) {
        for file in [&output, &errors_file].into_iter().flatten() {
            state.files.remove(&file.id).await;
        }
        mine?;
        return Err(GatewayError::Internal(
            crate::conversations::background::SUPERSEDED.into(),
        ));
    }
    metrics::counter!("switchyard_batches_total", "status" => status.to_string()).increment(1);
    Ok(())
}

/// Lines as file text, a page at a time: `fetch(after)` gives the next page of
/// `(line, text)` after line `after`, empty at the end.
fn paged<'a, F, Fut>(mut fetch: F) -> impl Stream<Item = Result<Bytes, GatewayError>> + Send + 'a
where
    F: FnMut(i64) -> Fut + Send + 'a,
    Fut: std::future::Future<Output = Result<Vec<(i64, String)>, GatewayError>> + Send + 'a,
{
    futures_util::stream::try_unfold(0i64, move |after| {
        let page = fetch(after);
        async move {
            let page = page.await?;
            let Some(last) = page.last().map(|(line, _)| *line) else {
                return Ok(None);
            };
            let mut text = String::new();
            for (_, result) in &page {
                text.push_str(result);
                text.push('\n');
            }
            Ok(Some((Bytes::from(text), last)))
        }
    })
}

/// The stored results of the batch's lines with `status`, in line order.
fn results<'a>(
    state: &'a Arc<AppState>,
    id: &'a str,
    status: &'static str,
) -> impl Stream<Item = Result<Bytes, GatewayError>> + Send + 'a {
    paged(move |after| async move {
        state
            .store
            .batch_results(id, status, after, RESULT_PAGE)
            .await
            .map_err(store_away)
    })
}

/// Lines still pending when the batch expired, as `batch_expired` errors.
fn expired_lines<'a>(
    state: &'a Arc<AppState>,
    id: &'a str,
) -> impl Stream<Item = Result<Bytes, GatewayError>> + Send + 'a {
    paged(move |after| async move {
        let page = state
            .store
            .pending_batch_lines(id, after, RESULT_PAGE)
            .await
            .map_err(store_away)?;
        Ok(page
            .into_iter()
            .map(|(line, custom_id, _)| {
                let error = json!({
                    "id": new_id("batch_req"),
                    "custom_id": custom_id,
                    "response": null,
                    "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."},
                });
                (line, error.to_string())
            })
            .collect())
    })
}

/// Streams results into a new `batch_output` file (none when there are no lines).
async fn keep_results<S>(
    state: &Arc<AppState>,
    job: &JobRow,
    which: &str,
    lines: S,
    limit: u64,
) -> Result<Option<FileRow>, GatewayError>
where
    S: Stream<Item = Result<Bytes, GatewayError>>,
{
    let written = state.files.write(lines, limit).await.map_err(|e| match e {
        crate::files::WriteError::Io(e) => files_away(e),
        other => GatewayError::Internal(format!("writing the {which} file: {other}")),
    })?;
    if written.bytes == 0 {
        state.files.discard(written).await;
        return Ok(None);
    }
    let row = FileRow {
        id: written.id.clone(),
        owner: job.owner.clone(),
        filename: format!("{}_{which}.jsonl", job.id),
        purpose: "batch_output".into(),
        bytes: i64::try_from(written.bytes).unwrap_or(i64::MAX),
        sha256: written.sha256.clone(),
        created_at: now_ms(),
        expires_at: None,
    };
    state.files.keep(written).await.map_err(files_away)?;
    Ok(Some(row))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_checked() {
        let mut seen = HashSet::new();
        let good = r#"{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": []}}"#;
        let (id, body) = read_line(good, "/v1/chat/completions", &mut seen).unwrap();
        assert_eq!(id, "a");
        assert!(body.contains("\"model\":\"m\""));
        let (id, message) = read_line(good, "/v1/chat/completions", &mut seen).unwrap_err();
        assert_eq!(id.as_deref(), Some("a"));
        assert!(message.contains("more than once"), "{message}");
        for (line, want) in [
            ("not json", "JSON"),
            ("[1]", "object"),
            (r#"{"custom_id": 5}"#, "custom_id"),
            (r#"{"custom_id": "b", "method": "GET"}"#, "method"),
            (
                r#"{"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {}}"#,
                "endpoint",
            ),
            (
                r#"{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions"}"#,
                "body",
            ),
            (
                r#"{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "stream": true}}"#,
                "stream",
            ),
            (
                r#"{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}"#,
                "model",
            ),
        ] {
            let (_, message) = read_line(line, "/v1/chat/completions", &mut seen).unwrap_err();
            assert!(message.contains(want), "{line}: {message}");
        }
    }

    #[test]
    fn usage_reads_both_spellings() {
        assert_eq!(
            usage_of(&json!({"usage": {"prompt_tokens": 3, "completion_tokens": 4}})),
            (3, 4)
        );
        assert_eq!(
            usage_of(&json!({"usage": {"input_tokens": 5, "output_tokens": 6}})),
            (5, 6)
        );
        assert_eq!(usage_of(&json!({})), (0, 0));
    }
}
