//! The gateway's error type and its OpenAI wire shape.
//!
//! Every failure a client can see, from a malformed body to an upstream timeout, is a
//! [`GatewayError`]. It knows its HTTP status, the OpenAI `type`/`code`/`param`, whether a
//! retry on another deployment could help, and how to render itself either as a JSON
//! response or as a terminal SSE event once a stream has already started.

use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;

/// Everything that can go wrong between a client's request and the upstream's answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// The client sent something we cannot accept (400).
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<&'static str>,
        code: Option<&'static str>,
    },
    /// Missing or wrong credentials (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated, but not allowed here: a client key on an admin route (403).
    #[error("{0}")]
    Forbidden(String),
    /// The alias is not configured (404), named like OpenAI's `model_not_found`.
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    /// A stored object (response, conversation, item) that does not exist for this
    /// caller (404): another key's object answers the same, so ids leak nothing.
    #[error("{0}")]
    NotFound(String),
    /// No such route (404).
    #[error("Unknown request URL: {method} {path}. Please check the URL and method.")]
    RouteNotFound { method: String, path: String },
    /// The route exists but not for this method (405).
    #[error("Method {method} is not allowed for {path}.")]
    MethodNotAllowed { method: String, path: String },
    /// The body is over `server.max_body_bytes` (413).
    #[error("Request body is too large: the limit is {limit} bytes.")]
    PayloadTooLarge { limit: usize },
    /// The client stopped sending its body for longer than `server.body_read_timeout` (408).
    #[error("The request body stalled: nothing arrived for {0} ms.")]
    BodyTimeout(u128),
    /// The request head is over `server.max_header_bytes` (431).
    #[error("Request headers are too large: the limit is {limit} bytes.")]
    HeadersTooLarge { limit: usize },
    /// The upstream answered with a client error that the client must fix (passed through).
    #[error("{message}")]
    UpstreamRejected {
        provider: String,
        status: StatusCode,
        message: String,
        error_type: String,
        param: Option<String>,
        code: Option<String>,
    },
    /// The upstream rate-limited us (429); `retry_after` is passed on in seconds.
    #[error("Provider `{provider}` is rate limiting requests: {message}")]
    UpstreamRateLimited {
        provider: String,
        message: String,
        retry_after: Option<u64>,
    },
    /// The upstream failed: 5xx, bad credentials on our side, or a connection error (502).
    #[error("Provider `{provider}` failed: {message}")]
    UpstreamFailed {
        provider: String,
        /// The upstream HTTP status, when it answered at all.
        status: Option<StatusCode>,
        message: String,
    },
    /// The upstream answered something we could not understand (502).
    #[error("Provider `{provider}` sent an invalid response: {message}")]
    UpstreamProtocol { provider: String, message: String },
    /// The upstream did not answer in time (504). `phase` says which timeout fired.
    #[error("Provider `{provider}` timed out waiting for {phase}.")]
    UpstreamTimeout {
        provider: String,
        phase: &'static str,
    },
    /// This provider's own concurrency limit and queue are full (429).
    #[error("Provider `{provider}` is at its concurrency limit; retry after {retry_after} s.")]
    ProviderBusy { provider: String, retry_after: u64 },
    /// Switchyard's global concurrency limit and queue are full (503).
    #[error("Switchyard is overloaded; retry after {retry_after} s.")]
    ServiceOverloaded { retry_after: u64 },
    /// Every deployment of the model (and its fallbacks) is unavailable: circuits open (503).
    #[error("No deployment of `{model}` is available right now (circuit breakers open).")]
    NoDeployment { model: String },
    /// The whole request ran past `server.request_timeout` (504).
    #[error("The request did not complete within {0} ms.")]
    RequestTimeout(u128),
    /// The API key is over its request or token rate (429).
    #[error(
        "Rate limit reached for this API key ({limit} per minute); retry after {retry_after} s."
    )]
    KeyRateLimited {
        limit: &'static str,
        retry_after: u64,
    },
    /// The API key's token budget cannot hold this request (429, `insufficient_quota`).
    #[error("This API key has used its token budget for the {period}.")]
    BudgetExceeded { period: &'static str },
    /// A database or other dependency the request needs is unreachable (503).
    #[error("{0} is unavailable; retry shortly.")]
    DependencyUnavailable(&'static str),
    /// The service is draining for shutdown (503).
    #[error("Switchyard is shutting down; retry on another instance.")]
    ShuttingDown,
    /// A bug or an unexpected condition on our side (500).
    #[error("Internal error: {0}")]
    Internal(String),
}

/// The OpenAI error envelope: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    message: String,
    #[serde(rename = "type")]
    error_type: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl GatewayError {
    /// Shorthand for a 400 naming the offending parameter.
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        GatewayError::InvalidRequest {
            message: message.into(),
            param,
            code: None,
        }
    }

    /// Turns axum's body-reading rejection into our shape (413 when over the limit).
    pub fn from_body_rejection(rejection: BytesRejection, limit: usize) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            GatewayError::PayloadTooLarge { limit }
        } else if let Some(stalled) = crate::listener::body_stalled(&rejection) {
            GatewayError::BodyTimeout(stalled.as_millis())
        } else {
            GatewayError::invalid(
                format!("Could not read the request body: {}", rejection.body_text()),
                None,
            )
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            GatewayError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            GatewayError::Forbidden(_) => StatusCode::FORBIDDEN,
            GatewayError::ModelNotFound(_)
            | GatewayError::NotFound(_)
            | GatewayError::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            GatewayError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::UpstreamRejected { status, .. } => *status,
            GatewayError::UpstreamRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::UpstreamFailed { .. } | GatewayError::UpstreamProtocol { .. } => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::UpstreamTimeout { .. } | GatewayError::RequestTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            GatewayError::ProviderBusy { .. }
            | GatewayError::KeyRateLimited { .. }
            | GatewayError::BudgetExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::DependencyUnavailable(_)
            | GatewayError::ShuttingDown
            | GatewayError::ServiceOverloaded { .. }
            | GatewayError::NoDeployment { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether the failure says something about the deployment's health (and so counts
    /// towards its circuit breaker). A full local queue or a client error does not.
    pub fn counts_against_deployment(&self) -> bool {
        matches!(
            self,
            GatewayError::UpstreamRateLimited { .. }
                | GatewayError::UpstreamFailed { .. }
                | GatewayError::UpstreamTimeout { .. }
                | GatewayError::UpstreamProtocol { .. }
        )
    }

    /// Classifies upstream client errors that a fallback model may not hit.
    pub fn fallback_class(&self) -> Option<crate::config::FallbackOn> {
        use crate::config::FallbackOn;
        let GatewayError::UpstreamRejected {
            message,
            code,
            error_type,
            ..
        } = self
        else {
            return None;
        };
        let code = code.as_deref().unwrap_or("");
        let text = format!("{code} {error_type} {message}").to_ascii_lowercase();
        if code == "context_length_exceeded"
            || text.contains("context length")
            || text.contains("context window")
            || text.contains("maximum context")
            || text.contains("prompt is too long")
            || text.contains("too many tokens")
        {
            Some(FallbackOn::ContextWindow)
        } else if code == "content_policy_violation"
            || code == "content_filter"
            || text.contains("content policy")
            || text.contains("content management policy")
            || text.contains("content_filter")
        {
            Some(FallbackOn::ContentPolicy)
        } else {
            None
        }
    }

    /// Whether another attempt (on this or another deployment) could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            GatewayError::UpstreamRateLimited { .. }
                | GatewayError::UpstreamFailed { .. }
                | GatewayError::UpstreamTimeout { .. }
                | GatewayError::UpstreamProtocol { .. }
                | GatewayError::ProviderBusy { .. }
        )
    }

    /// A short, stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            GatewayError::InvalidRequest { .. } => "invalid_request",
            GatewayError::Unauthorized(_) => "unauthorized",
            GatewayError::Forbidden(_) => "forbidden",
            GatewayError::ModelNotFound(_) => "model_not_found",
            GatewayError::NotFound(_) => "not_found",
            GatewayError::RouteNotFound { .. } => "route_not_found",
            GatewayError::MethodNotAllowed { .. } => "method_not_allowed",
            GatewayError::PayloadTooLarge { .. } => "payload_too_large",
            GatewayError::BodyTimeout(_) => "body_timeout",
            GatewayError::HeadersTooLarge { .. } => "headers_too_large",
            GatewayError::UpstreamRejected { .. } => "upstream_rejected",
            GatewayError::UpstreamRateLimited { .. } => "upstream_rate_limited",
            GatewayError::UpstreamFailed { .. } => "upstream_failed",
            GatewayError::UpstreamProtocol { .. } => "upstream_protocol",
            GatewayError::UpstreamTimeout { .. } => "upstream_timeout",
            GatewayError::RequestTimeout(_) => "request_timeout",
            GatewayError::ProviderBusy { .. } => "provider_busy",
            GatewayError::ServiceOverloaded { .. } => "service_overloaded",
            GatewayError::NoDeployment { .. } => "no_deployment",
            GatewayError::ShuttingDown => "shutting_down",
            GatewayError::KeyRateLimited { .. } => "key_rate_limited",
            GatewayError::BudgetExceeded { .. } => "budget_exceeded",
            GatewayError::DependencyUnavailable(_) => "dependency_unavailable",
            GatewayError::Internal(_) => "internal",
        }
    }

    /// Seconds the client (or a retry) should wait, when known.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            GatewayError::UpstreamRateLimited { retry_after, .. } => *retry_after,
            GatewayError::ProviderBusy { retry_after, .. }
            | GatewayError::ServiceOverloaded { retry_after }
            | GatewayError::KeyRateLimited { retry_after, .. } => Some(*retry_after),
            GatewayError::DependencyUnavailable(_)
            | GatewayError::ShuttingDown
            | GatewayError::NoDeployment { .. } => Some(1),
            _ => None,
        }
    }

    /// Serialises the OpenAI error envelope.
    pub fn to_json(&self) -> Vec<u8> {
        let (error_type, param, code): (&str, Option<&str>, Option<&str>) = match self {
            GatewayError::InvalidRequest { param, code, .. } => {
                ("invalid_request_error", *param, *code)
            }
            GatewayError::Unauthorized(_) => {
                ("authentication_error", None, Some("invalid_api_key"))
            }
            GatewayError::Forbidden(_) => ("permission_error", None, Some("not_admin")),
            GatewayError::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model"),
                Some("model_not_found"),
            ),
            GatewayError::NotFound(_) => ("invalid_request_error", None, None),
            GatewayError::RouteNotFound { .. } => {
                ("invalid_request_error", None, Some("unknown_url"))
            }
            GatewayError::MethodNotAllowed { .. } => {
                ("invalid_request_error", None, Some("method_not_allowed"))
            }
            GatewayError::PayloadTooLarge { .. } => {
                ("invalid_request_error", None, Some("request_too_large"))
            }
            GatewayError::BodyTimeout(_) => {
                ("invalid_request_error", None, Some("request_timeout"))
            }
            GatewayError::HeadersTooLarge { .. } => (
                "invalid_request_error",
                None,
                Some("request_header_fields_too_large"),
            ),
            GatewayError::UpstreamRejected {
                error_type,
                param,
                code,
                ..
            } => (error_type.as_str(), param.as_deref(), code.as_deref()),
            GatewayError::UpstreamRateLimited { .. } => {
                ("rate_limit_error", None, Some("rate_limit_exceeded"))
            }
            GatewayError::UpstreamFailed { .. } | GatewayError::UpstreamProtocol { .. } => {
                ("upstream_error", None, Some("bad_gateway"))
            }
            GatewayError::UpstreamTimeout { .. } | GatewayError::RequestTimeout(_) => {
                ("timeout_error", None, Some("gateway_timeout"))
            }
            GatewayError::ShuttingDown => ("server_error", None, Some("shutting_down")),
            GatewayError::ProviderBusy { .. } => {
                ("rate_limit_error", None, Some("provider_concurrency_limit"))
            }
            GatewayError::ServiceOverloaded { .. } => {
                ("server_error", None, Some("service_overloaded"))
            }
            GatewayError::NoDeployment { .. } => {
                ("server_error", None, Some("no_deployment_available"))
            }
            GatewayError::KeyRateLimited { .. } => {
                ("rate_limit_error", None, Some("rate_limit_exceeded"))
            }
            GatewayError::BudgetExceeded { .. } => {
                ("insufficient_quota", None, Some("insufficient_quota"))
            }
            GatewayError::DependencyUnavailable(_) => {
                ("server_error", None, Some("dependency_unavailable"))
            }
            GatewayError::Internal(_) => ("server_error", None, None),
        };
        let envelope = ErrorEnvelope {
            error: ErrorBody {
                message: self.to_string(),
                error_type,
                param,
                code,
            },
        };
        serde_json::to_vec(&envelope).unwrap_or_else(|_| {
            br#"{"error":{"message":"error","type":"server_error","param":null,"code":null}}"#
                .to_vec()
        })
    }

    /// The error as a terminal SSE event, for failures after a stream has started:
    /// the OpenAI SDKs raise an `APIError` when a data event carries an `error` key.
    pub fn to_sse_event(&self) -> Bytes {
        let json = self.to_json();
        let mut out = Vec::with_capacity(json.len() + 8);
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&json);
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), self.to_json()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(seconds) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        // Handlers log with the request's context; this extension lets the access log
        // middleware name the error kind without re-parsing the body.
        response.extensions_mut().insert(ErrorKind(self.kind()));
        response
    }
}

/// Marker left on error responses for the access log.
#[derive(Clone, Copy, Debug)]
pub struct ErrorKind(pub &'static str);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_shape_has_all_four_fields() {
        let err = GatewayError::ModelNotFound("nope".into());
        let v: serde_json::Value = serde_json::from_slice(&err.to_json()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("nope"));
        assert_eq!(err.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn sse_error_event_is_a_single_data_event() {
        let ev = GatewayError::UpstreamTimeout {
            provider: "p".into(),
            phase: "the next stream chunk",
        }
        .to_sse_event();
        assert!(ev.starts_with(b"data: {\"error\""));
        assert!(ev.ends_with(b"\n\n"));
    }
}
