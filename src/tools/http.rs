//! One operator-declared HTTP tool: its arguments fill the URL and body templates, the
//! call runs under the tool's concurrency bound and deadline on the shared pooled client,
//! and the answer is trimmed (a JSON pointer, a byte cap) before it goes back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Map, Value};
use tokio::sync::{Notify, Semaphore, watch};

use crate::config::{BatchConfig, ToolConfig, ToolMethod, placeholders};
use crate::routing::breaker::{CircuitBreaker, Ticket};

/// What a URL argument keeps unescaped: RFC 3986's unreserved characters.
const URL_ARGUMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The most of an answer read before trimming, whatever `max_output_bytes` says.
const MAX_READ_BYTES: usize = 4 << 20;

/// A declared HTTP tool, ready to call.
pub struct HttpTool {
    pub name: String,
    pub config: ToolConfig,
    /// The names `parameters.required` lists.
    required: Vec<String>,
    slots: Arc<Semaphore>,
    /// The OAuth2 access token and when to stop using it; the lock also makes concurrent
    /// calls wait for one token request instead of each making its own.
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
    /// The breaker of the tool's host (shared by the tools on it): a dead API is not
    /// waited on by every call.
    breaker: Arc<CircuitBreaker>,
    /// Batches gathering calls, by the calls' other arguments (only calls that agree on
    /// everything else share one).
    batches: Mutex<HashMap<String, Arc<Batch>>>,
}

/// Calls gathered into one: their values of the batched argument, a signal that it is
/// full, and where its answer appears.
struct Batch {
    values: Mutex<Vec<String>>,
    full: Notify,
    answer: watch::Receiver<Option<BatchAnswer>>,
}

/// Each value's element of the answer, or why the batch failed.
type BatchAnswer = Arc<Result<HashMap<String, String>, String>>;

/// A breaker ticket that is given back if the call ends without an outcome (cancelled).
struct Pass<'a> {
    breaker: &'a CircuitBreaker,
    ticket: Option<Ticket>,
}

impl Pass<'_> {
    fn record(mut self, healthy: bool) {
        if let Some(ticket) = self.ticket.take() {
            self.breaker.record(ticket, healthy);
        }
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.breaker.release(ticket);
        }
    }
}

/// A token is refreshed this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(30);

/// Why a call produced no output: said to the model (or the invoking app) as the output.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("the tool answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("the tool could not be reached: {0}")]
    Transport(String),
    #[error("the answer has no {0}")]
    Pointer(String),
    #[error("no OAuth2 token: {0}")]
    Token(String),
    #[error("not called: the tool's host failed repeatedly and is being left alone (circuit open)")]
    CircuitOpen,
    #[error("the answer has nothing for {0:?}")]
    Missing(String),
    #[error("{0}")]
    Batch(String),
}

impl HttpTool {
    pub fn new(name: &str, config: &ToolConfig, breaker: Arc<CircuitBreaker>) -> HttpTool {
        let required = config
            .parameters
            .get("required")
            .and_then(Value::as_array)
            .map(|r| {
                r.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        HttpTool {
            name: name.to_owned(),
            config: config.clone(),
            required,
            slots: Arc::new(Semaphore::new(config.max_concurrent)),
            token: tokio::sync::Mutex::new(None),
            breaker,
            batches: Mutex::new(HashMap::new()),
        }
    }

    /// Checks arguments before anything is sent: an object, with every required property
    /// and every argument a template names.
    ///
    /// # Errors
    /// A sentence for the caller naming what is missing or wrong.
    pub fn check(&self, arguments: &Map<String, Value>) -> Result<(), String> {
        let mut needed: Vec<&str> = self.required.iter().map(String::as_str).collect();
        needed.extend(placeholders(&self.config.url));
        for name in needed {
            match arguments.get(name) {
                None | Some(Value::Null) => {
                    return Err(format!("Missing required argument '{name}'."));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The tool's answer for `arguments` (already [`check`](Self::check)ed).
    ///
    /// # Errors
    /// A timeout, a non-2xx answer, a transport failure, or a pointer that finds nothing.
    pub async fn call(
        &self,
        client: &reqwest::Client,
        arguments: &Map<String, Value>,
    ) -> Result<String, CallError> {
        if let Some(batch) = &self.config.batch {
            return self.batched(client, arguments, batch).await;
        }
        self.guarded(async {
            let body = self.send(client, arguments, None).await?;
            self.trim(&body)
        })
        .await
    }

    /// Runs one upstream call under the breaker, the concurrency bound and the deadline.
    async fn guarded<T>(
        &self,
        call: impl Future<Output = Result<T, CallError>>,
    ) -> Result<T, CallError> {
        let timeout = self.config.timeout;
        let pass = Pass {
            breaker: &self.breaker,
            ticket: Some(self.breaker.try_acquire().ok_or(CallError::CircuitOpen)?),
        };
        let result = tokio::time::timeout(timeout, async {
            // Closed never: the semaphore lives as long as the tool.
            let _slot = self.slots.acquire().await.ok();
            call.await
        })
        .await
        .unwrap_or(Err(CallError::Timeout(timeout)));
        // The host is unwell when it cannot be reached, is too slow, or fails itself; an
        // answer it gave on purpose (a 4xx, a shape without the pointer) is not its fault.
        let healthy = match &result {
            Ok(_) | Err(CallError::Pointer(_) | CallError::Token(_)) => true,
            Err(CallError::Status { status, .. }) => *status < 500,
            Err(_) => false,
        };
        pass.record(healthy);
        result
    }

    /// The state of the breaker of the tool's host.
    pub fn circuit(&self) -> crate::routing::breaker::CircuitState {
        self.breaker.state()
    }

    /// The `host:port` of the tool's URL: what its breaker is keyed by.
    pub fn host_key(config: &ToolConfig) -> String {
        let sample = placeholders(&config.url)
            .into_iter()
            .fold(config.url.clone(), |url, p| {
                url.replace(&format!("{{{p}}}"), "x")
            });
        reqwest::Url::parse(&sample).map_or_else(
            |_| config.url.clone(),
            |u| {
                format!(
                    "{}:{}",
                    u.host_str().unwrap_or_default(),
                    u.port_or_known_default().unwrap_or(0)
                )
            },
        )
    }

    /// Joins a batch, or starts one and sends it once its window has passed or it is
    /// full; returns this call's element of the answer.
    async fn batched(
        &self,
        client: &reqwest::Client,
        arguments: &Map<String, Value>,
        batch: &BatchConfig,
    ) -> Result<String, CallError> {
        let value = arguments
            .get(&batch.argument)
            .map(argument_text)
            .unwrap_or_default();
        let mut rest = arguments.clone();
        rest.remove(&batch.argument);
        let group = serde_json::to_string(&rest).unwrap_or_default();
        let (mut answer, leader) = {
            let mut batches = self.batches.lock().unwrap_or_else(|p| p.into_inner());
            let joined = batches.get(&group).and_then(|open| {
                let mut values = open.values.lock().unwrap_or_else(|p| p.into_inner());
                (values.len() < batch.max).then(|| {
                    values.push(value.clone());
                    if values.len() == batch.max {
                        open.full.notify_one();
                    }
                    open.answer.clone()
                })
            });
            match joined {
                Some(answer) => (answer, None),
                None => {
                    let (tx, rx) = watch::channel(None);
                    let open = Arc::new(Batch {
                        values: Mutex::new(vec![value.clone()]),
                        full: Notify::new(),
                        answer: rx.clone(),
                    });
                    batches.insert(group.clone(), open.clone());
                    (rx, Some((tx, open)))
                }
            }
        };
        if let Some((tx, open)) = leader {
            tokio::select! {
                () = tokio::time::sleep(batch.window) => {}
                () = open.full.notified() => {}
            }
            let values = {
                let mut batches = self.batches.lock().unwrap_or_else(|p| p.into_inner());
                if batches.get(&group).is_some_and(|b| Arc::ptr_eq(b, &open)) {
                    batches.remove(&group);
                }
                open.values
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            };
            let result = self
                .guarded(async {
                    let body = self.send(client, &rest, Some((batch, &values))).await?;
                    self.split(&body, batch)
                })
                .await
                .map_err(|e| e.to_string());
            let _ = tx.send(Some(Arc::new(result)));
        }
        let landed = answer
            .wait_for(Option::is_some)
            .await
            .map_err(|_| CallError::Transport("the batched call was abandoned".into()))?
            .clone()
            .unwrap_or_else(|| Arc::new(Err(String::new())));
        match &*landed {
            Ok(elements) => elements
                .get(&value)
                .map(|element| cut(element, self.config.max_output_bytes))
                .ok_or_else(|| CallError::Missing(value.clone())),
            Err(error) => Err(CallError::Batch(error.clone())),
        }
    }

    /// A batch's answer as each value's element: the list (at `pointer`, when set), each
    /// element under the value at `key` within it.
    fn split(
        &self,
        body: &[u8],
        batch: &BatchConfig,
    ) -> Result<HashMap<String, String>, CallError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|_| CallError::Pointer("JSON list to split by value".into()))?;
        let list = match &self.config.pointer {
            Some(pointer) if !pointer.is_empty() => value.pointer(pointer),
            _ => Some(&value),
        }
        .and_then(Value::as_array)
        .ok_or_else(|| CallError::Pointer("list of results".into()))?;
        Ok(list
            .iter()
            .filter_map(|element| {
                let key = element.pointer(&batch.key).map(argument_text)?;
                let text = match element {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                Some((key, text))
            })
            .collect())
    }

    /// A single call's answer, trimmed: the part at `pointer`, then the byte cap.
    fn trim(&self, body: &[u8]) -> Result<String, CallError> {
        let text = match &self.config.pointer {
            Some(pointer) if !pointer.is_empty() => {
                let value: Value = serde_json::from_slice(body)
                    .map_err(|_| CallError::Pointer(format!("JSON to read {pointer} from")))?;
                match value.pointer(pointer) {
                    Some(Value::String(s)) => s.clone(),
                    Some(found) => found.to_string(),
                    None => return Err(CallError::Pointer(pointer.clone())),
                }
            }
            _ => String::from_utf8_lossy(body).into_owned(),
        };
        Ok(cut(&text, self.config.max_output_bytes))
    }

    /// Sends the call (with a batch's values in place of its argument) and reads the
    /// answer's body, failing on a non-2xx status.
    async fn send(
        &self,
        client: &reqwest::Client,
        arguments: &Map<String, Value>,
        batch: Option<(&BatchConfig, &[String])>,
    ) -> Result<Vec<u8>, CallError> {
        let url = match batch {
            Some((batch, values)) => {
                let joined = values
                    .iter()
                    .map(|v| encode_argument(v))
                    .collect::<Vec<_>>()
                    .join(&batch.separator);
                // The values go in first: encoded, they hold no braces for the rest.
                let template = self
                    .config
                    .url
                    .replace(&format!("{{{}}}", batch.argument), &joined);
                fill_url(&template, arguments)
            }
            None => fill_url(&self.config.url, arguments),
        };
        let method = match self.config.method {
            ToolMethod::Get => reqwest::Method::GET,
            ToolMethod::Post => reqwest::Method::POST,
            ToolMethod::Put => reqwest::Method::PUT,
            ToolMethod::Delete => reqwest::Method::DELETE,
        };
        let mut request = client.request(method, url);
        for (name, value) in &self.config.headers {
            request = request.header(name.as_str(), value.expose());
        }
        if let Some(body) = &self.config.body {
            let mut arguments = arguments.clone();
            if let Some((batch, values)) = batch {
                arguments.insert(batch.argument.clone(), Value::from(values.to_vec()));
            }
            request = request.json(&fill_body(body, &arguments));
        }
        if self.config.oauth2.is_some() {
            request = request.bearer_auth(self.access_token(client).await?);
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| CallError::Transport(transport_reason(&e)))?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED && self.config.oauth2.is_some() {
            // Revoked or expired early: the next call fetches a new token.
            *self.token.lock().await = None;
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| CallError::Transport(transport_reason(&e)))?
        {
            let room = MAX_READ_BYTES.saturating_sub(body.len());
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if room <= chunk.len() {
                break;
            }
        }
        if !status.is_success() {
            return Err(CallError::Status {
                status: status.as_u16(),
                body: cut(&String::from_utf8_lossy(&body), 200),
            });
        }
        Ok(body)
    }
}

impl HttpTool {
    /// The cached OAuth2 token, or a new one from the token endpoint (client credentials,
    /// HTTP Basic client authentication).
    async fn access_token(&self, client: &reqwest::Client) -> Result<String, CallError> {
        let Some(oauth) = &self.config.oauth2 else {
            return Err(CallError::Token("no oauth2 configured".into()));
        };
        let mut cached = self.token.lock().await;
        if let Some((token, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Ok(token.clone());
        }
        let mut form = "grant_type=client_credentials".to_owned();
        if let Some(scope) = &oauth.scope {
            form.push_str("&scope=");
            form.push_str(&encode_argument(scope));
        }
        let response = client
            .post(&oauth.token_url)
            .basic_auth(&oauth.client_id, Some(oauth.client_secret.expose()))
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form)
            .send()
            .await
            .map_err(|e| CallError::Token(transport_reason(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(CallError::Token(format!("HTTP {}", status.as_u16())));
        }
        let grant: Value = response
            .json()
            .await
            .map_err(|_| CallError::Token("the answer is not JSON".into()))?;
        let token = grant
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or_else(|| CallError::Token("the answer has no access_token".into()))?
            .to_owned();
        let lifetime = grant
            .get("expires_in")
            .and_then(Value::as_u64)
            .map_or(Duration::from_secs(3600), Duration::from_secs);
        let until = Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN);
        *cached = Some((token.clone(), until));
        Ok(token)
    }
}

/// The text of an argument as it fills a template: strings as they are, anything else as
/// JSON.
fn argument_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `text` percent-encoded as one URL query or path value.
pub(crate) fn encode_argument(text: &str) -> String {
    utf8_percent_encode(text, URL_ARGUMENT).to_string()
}

/// The URL template with each `{name}` replaced by its argument, percent-encoded, so an
/// argument can never add a path segment, a query parameter or a fragment.
pub fn fill_url(template: &str, arguments: &Map<String, Value>) -> String {
    let mut url = template.to_owned();
    for name in placeholders(template) {
        let text = arguments.get(name).map(argument_text).unwrap_or_default();
        let encoded = utf8_percent_encode(&text, URL_ARGUMENT).to_string();
        url = url.replace(&format!("{{{name}}}"), &encoded);
    }
    url
}

/// The body template with arguments in place: a string that is exactly `{name}` takes the
/// argument's JSON value (a number stays a number), `{name}` inside a string its text.
pub fn fill_body(template: &Value, arguments: &Map<String, Value>) -> Value {
    match template {
        Value::String(s) => {
            let names = placeholders(s);
            if let [name] = names.as_slice()
                && *s == format!("{{{name}}}")
            {
                return arguments.get(*name).cloned().unwrap_or(Value::Null);
            }
            let mut text = s.clone();
            for name in names {
                let value = arguments.get(name).map(argument_text).unwrap_or_default();
                text = text.replace(&format!("{{{name}}}"), &value);
            }
            Value::String(text)
        }
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| fill_body(v, arguments)).collect())
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), fill_body(v, arguments)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
pub(crate) fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// A transport failure without the URL (which may carry an argument or a key).
fn transport_reason(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "connection failed".to_owned()
    } else if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_body() || e.is_decode() {
        "the answer was cut off".to_owned()
    } else {
        "request failed".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn url_arguments_cannot_escape_their_place() {
        let a = args(json!({"q": "a b&c=d/../#x?", "n": 5}));
        assert_eq!(
            fill_url("http://h/s?q={q}&n={n}", &a),
            "http://h/s?q=a%20b%26c%3Dd%2F..%2F%23x%3F&n=5"
        );
    }

    #[test]
    fn body_arguments_keep_their_types() {
        let a = args(json!({"ids": [1, 2], "q": "soup", "n": 3}));
        let body = fill_body(
            &json!({"ids": "{ids}", "search": "find {q} x{n}", "page": {"size": "{n}"}, "fixed": true}),
            &a,
        );
        assert_eq!(
            body,
            json!({"ids": [1, 2], "search": "find soup x3", "page": {"size": 3}, "fixed": true})
        );
    }

    #[test]
    fn cuts_fall_on_character_boundaries() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("héllo", 3), "hé");
        assert_eq!(cut("abc", 10), "abc");
    }
}
