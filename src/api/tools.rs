//! `GET /v1/tools` and `POST /v1/tools/{name}/invoke`: the operator's tools, listed and
//! called directly by an app (a food search or a stock quote through Switchyard's pool,
//! cache and bounds) without a model in between.

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};

use super::guard::Caller;
use crate::error::GatewayError;
use crate::state::AppState;
use crate::tools::InvokeError;
use crate::wire::JsonObject;

/// `GET /v1/tools`: every configured tool as a function definition.
pub async fn list(State(state): State<Arc<AppState>>, Caller(_): Caller) -> Response {
    axum::Json(json!({"object": "list", "data": state.tools.definitions()})).into_response()
}

/// `POST /v1/tools/{name}/invoke` with `{"arguments": {…}}`: the tool's answer, or in
/// `error` why there is none (a tool failure is not the caller's: still a 200).
pub async fn invoke(
    State(state): State<Arc<AppState>>,
    Caller(principal): Caller,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // The call is a usage row under the caller's key, route `tool`, and counts against
    // the key's request rate.
    let ctx = state
        .inference
        .context("tool", super::request_id(&headers), principal);
    let metering = ctx.metering.clone();
    let result = async {
        if !state.tools.contains(&name) {
            return Err(GatewayError::NotFound(
                InvokeError::Unknown(name.clone()).to_string(),
            ));
        }
        state.inference.charge_request(&ctx).await?;
        let body = body.map_err(|r| {
            GatewayError::from_body_rejection(r, state.settings.server.max_body_bytes)
        })?;
        let object = JsonObject::parse(body)?;
        if let Some((field, _)) = object.fields().find(|(k, _)| *k != "arguments") {
            return Err(GatewayError::invalid(
                format!("Unknown parameter: '{field}'."),
                None,
            ));
        }
        let arguments: Value = object
            .get("arguments")?
            .unwrap_or_else(|| Value::Object(serde_json::Map::new()));
        let invocation = state
            .tools
            .invoke(&name, &arguments, Some(&metering))
            .await
            .map_err(|e| match e {
                InvokeError::Unknown(_) => GatewayError::NotFound(e.to_string()),
                InvokeError::Arguments(message) => {
                    GatewayError::invalid(message, Some("arguments"))
                }
            })?;
        let (output, error) = match invocation.output {
            Ok(output) => (Value::String(output.to_string()), Value::Null),
            Err(error) => (Value::Null, Value::String(error)),
        };
        Ok(json!({
            "object": "tool.invocation",
            "tool": name,
            "output": output,
            "error": error,
            "cached": invocation.cached,
            "duration_ms": u64::try_from(invocation.duration.as_millis()).unwrap_or(u64::MAX),
        }))
    }
    .await;
    result.map_or_else(IntoResponse::into_response, |v| {
        axum::Json(v).into_response()
    })
}
