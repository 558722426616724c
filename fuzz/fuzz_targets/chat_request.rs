//! The chat and embeddings request readers: bytes → model, stream flag, fields.
//!
//! Properties: what the reader accepts is a JSON object that serde_json reads too; the
//! model and stream flag it reports are the object's own; a rewrite that overrides the
//! model yields JSON with the new model and every other field unchanged.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use switchyard::wire::{ChatRequest, EmbeddingsRequest};

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    let parsed = serde_json::from_slice::<Value>(data).ok();
    if let Ok(req) = ChatRequest::parse(body.clone()) {
        let Some(Value::Object(object)) = &parsed else {
            panic!("the chat reader accepted what is not a JSON object");
        };
        assert_eq!(
            object.get("model").and_then(Value::as_str),
            Some(req.model.as_str())
        );
        assert_eq!(
            object
                .get("stream")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            req.stream
        );
        assert!(object.get("messages").is_some_and(Value::is_array));
        let rewritten = req.object.rewrite(&[("model", Some("\"other\""))]);
        let Ok(Value::Object(rewritten)) = serde_json::from_slice::<Value>(&rewritten) else {
            panic!("a rewrite is not a JSON object");
        };
        assert_eq!(rewritten.get("model"), Some(&Value::from("other")));
        for (key, value) in object {
            if key != "model" {
                assert_eq!(rewritten.get(key), Some(value), "field {key} changed");
            }
        }
    }
    if let Ok(req) = EmbeddingsRequest::parse(body) {
        let Some(Value::Object(object)) = &parsed else {
            panic!("the embeddings reader accepted what is not a JSON object");
        };
        assert_eq!(
            object.get("model").and_then(Value::as_str),
            Some(req.model.as_str())
        );
    }
});
