//! OpenAI wire envelopes, parsed once at the edge of the request path.
//!
//! The gateway needs only a few fields of a request (`model`, `stream`, `stream_options`).
//! [`JsonObject`] records where each top-level field's raw JSON sits in the body, so
//! everything else (messages, tools, `response_format`, image parts...) is forwarded
//! byte-for-byte without ever being deserialised, and re-encoding a request for an
//! OpenAI-compatible upstream is a copy with the model name swapped.
//!
//! Code that must understand a chat exchange (translate it, assemble a stream, read a
//! reply) uses the typed schema in [`chat`].

pub mod chat;
pub mod event;
pub mod responses;
pub mod sse;

pub use event::read_usage;

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use serde::de::{self, DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::error::GatewayError;

/// A JSON object body whose top-level fields are kept as raw slices of the original bytes.
#[derive(Debug, Clone)]
pub struct JsonObject {
    body: Bytes,
    fields: Vec<(Box<str>, Range<usize>)>,
}

impl JsonObject {
    /// Validates `body` as one JSON object and indexes its top-level fields.
    ///
    /// # Errors
    /// 400 when the body is not valid JSON or not an object.
    pub fn parse(body: Bytes) -> Result<JsonObject, GatewayError> {
        let fields = {
            let index: FieldIndex<'_> = serde_json::from_slice(&body).map_err(|e| {
                GatewayError::invalid(
                    format!("We could not parse the JSON body of your request: {e}"),
                    None,
                )
            })?;
            let base = body.as_ptr() as usize;
            index
                .0
                .into_iter()
                .map(|(key, raw)| {
                    // `raw` borrows from `body`, so its offset is a plain pointer difference.
                    let start = raw.get().as_ptr() as usize - base;
                    (key.into(), start..start + raw.get().len())
                })
                .collect()
        };
        Ok(JsonObject { body, fields })
    }

    /// The raw JSON text of a top-level field.
    pub fn raw(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| &**k == key)
            .and_then(|(_, range)| std::str::from_utf8(&self.body[range.clone()]).ok())
    }

    /// Deserialises one field on demand; `Ok(None)` when absent or `null`.
    ///
    /// # Errors
    /// 400 naming `param` when the field has the wrong type.
    pub fn get<T: DeserializeOwned>(&self, key: &'static str) -> Result<Option<T>, GatewayError> {
        match self.raw(key) {
            None | Some("null") => Ok(None),
            Some(raw) => serde_json::from_str(raw).map(Some).map_err(|e| {
                GatewayError::invalid(format!("Invalid value for '{key}': {e}"), Some(key))
            }),
        }
    }

    /// Top-level fields in their original order, as raw JSON.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &str)> {
        self.fields.iter().filter_map(|(k, range)| {
            std::str::from_utf8(&self.body[range.clone()])
                .ok()
                .map(|v| (&**k, v))
        })
    }

    /// Each top-level field's name and the first byte of its raw value, which tells its
    /// JSON type without reading the value.
    fn field_types(&self) -> impl Iterator<Item = (&str, u8)> {
        self.fields
            .iter()
            .map(|(k, range)| (&**k, self.body.get(range.start).copied().unwrap_or(b'n')))
    }

    /// The body as received.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Re-encodes the object with some fields replaced or added: a copy of the raw bytes,
    /// no re-serialisation of untouched fields.
    pub fn rewrite(&self, overrides: &[(&str, Option<&str>)]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 96);
        out.push(b'{');
        let mut first = true;
        let mut push = |out: &mut Vec<u8>, key: &str, value: &str| {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
            write_json_string(out, key);
            out.push(b':');
            out.extend_from_slice(value.as_bytes());
        };
        for (key, value) in self.fields() {
            match overrides.iter().find(|(k, _)| *k == key) {
                Some((_, Some(replacement))) => push(&mut out, key, replacement),
                Some((_, None)) => {}
                None => push(&mut out, key, value),
            }
        }
        for (key, value) in overrides {
            if let Some(value) = value
                && self.raw(key).is_none()
            {
                push(&mut out, key, value);
            }
        }
        out.push(b'}');
        out
    }
}

/// Writes `s` as a JSON string literal.
pub fn write_json_string(out: &mut Vec<u8>, s: &str) {
    // serde_json's escaping into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// A chat completions request: the envelope plus the fields the gateway acts on.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub object: JsonObject,
    pub model: String,
    pub stream: bool,
    /// The client asked for the final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

impl ChatRequest {
    /// Parses and checks the fields every provider relies on.
    ///
    /// # Errors
    /// 400 in OpenAI shape for malformed JSON or a missing/mistyped `model` or `messages`.
    pub fn parse(body: Bytes) -> Result<ChatRequest, GatewayError> {
        let object = JsonObject::parse(body)?;
        let model = required_model(&object)?;
        match object.raw("messages") {
            None => {
                return Err(GatewayError::invalid(
                    "Missing required parameter: 'messages'.",
                    Some("messages"),
                ));
            }
            Some(raw) if !raw.starts_with('[') => {
                return Err(GatewayError::invalid(
                    "Invalid type for 'messages': expected an array.",
                    Some("messages"),
                ));
            }
            Some(raw) if raw[1..].trim_start().starts_with(']') => {
                return Err(GatewayError::invalid(
                    "Invalid 'messages': empty array. Expected an array with minimum length 1.",
                    Some("messages"),
                ));
            }
            Some(_) => {}
        }
        check_field_types(&object, CHAT_FIELD_KINDS)?;
        let stream = object.get::<bool>("stream")?.unwrap_or(false);
        let include_usage = object
            .get::<StreamOptions>("stream_options")?
            .unwrap_or_default()
            .include_usage;
        Ok(ChatRequest {
            object,
            model,
            stream,
            include_usage,
        })
    }
}

/// A JSON type a request field may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JsonKind {
    Number,
    Boolean,
    String,
    Array,
    Object,
}

impl JsonKind {
    /// The kind of a valid JSON value from its first byte; `None` for `null`.
    fn of(first: u8) -> Option<JsonKind> {
        match first {
            b'n' => None,
            b't' | b'f' => Some(JsonKind::Boolean),
            b'"' => Some(JsonKind::String),
            b'[' => Some(JsonKind::Array),
            b'{' => Some(JsonKind::Object),
            _ => Some(JsonKind::Number),
        }
    }

    fn name(self) -> &'static str {
        match self {
            JsonKind::Number => "a number",
            JsonKind::Boolean => "a boolean",
            JsonKind::String => "a string",
            JsonKind::Array => "an array",
            JsonKind::Object => "an object",
        }
    }
}

/// The types OpenAI accepts for the chat request's well-known top-level fields (from the
/// SDK's `CompletionCreateParams`); other fields pass through unchecked.
const CHAT_FIELD_KINDS: &[(&str, &[JsonKind])] = {
    use JsonKind::{Array, Boolean, Number, Object, String};
    &[
        ("temperature", &[Number]),
        ("top_p", &[Number]),
        ("max_tokens", &[Number]),
        ("max_completion_tokens", &[Number]),
        ("n", &[Number]),
        ("seed", &[Number]),
        ("presence_penalty", &[Number]),
        ("frequency_penalty", &[Number]),
        ("top_logprobs", &[Number]),
        ("stream", &[Boolean]),
        ("logprobs", &[Boolean]),
        ("parallel_tool_calls", &[Boolean]),
        ("store", &[Boolean]),
        ("tools", &[Array]),
        ("functions", &[Array]),
        ("modalities", &[Array]),
        ("stream_options", &[Object]),
        ("response_format", &[Object]),
        ("metadata", &[Object]),
        ("logit_bias", &[Object]),
        ("audio", &[Object]),
        ("prediction", &[Object]),
        ("user", &[String]),
        ("reasoning_effort", &[String]),
        ("service_tier", &[String]),
        ("safety_identifier", &[String]),
        ("prompt_cache_key", &[String]),
        ("stop", &[String, Array]),
        ("tool_choice", &[String, Object]),
        ("function_call", &[String, Object]),
    ]
};

/// The types OpenAI accepts for the Responses create request's top-level fields (SDK:
/// `ResponseCreateParams`); `input`, `conversation` and `tools` are read in full later.
pub(crate) const RESPONSES_FIELD_KINDS: &[(&str, &[JsonKind])] = {
    use JsonKind::{Array, Boolean, Number, Object, String};
    &[
        ("model", &[String]),
        ("input", &[String, Array]),
        ("instructions", &[String]),
        ("previous_response_id", &[String]),
        ("conversation", &[String, Object]),
        ("store", &[Boolean]),
        ("stream", &[Boolean]),
        ("stream_options", &[Object]),
        ("background", &[Boolean]),
        ("tools", &[Array]),
        ("tool_choice", &[String, Object]),
        ("parallel_tool_calls", &[Boolean]),
        ("max_output_tokens", &[Number]),
        ("max_tool_calls", &[Number]),
        ("temperature", &[Number]),
        ("top_p", &[Number]),
        ("top_logprobs", &[Number]),
        ("text", &[Object]),
        ("truncation", &[String]),
        ("metadata", &[Object]),
        ("user", &[String]),
        ("safety_identifier", &[String]),
        ("prompt_cache_key", &[String]),
        ("include", &[Array]),
        ("reasoning", &[Object]),
        ("service_tier", &[String]),
    ]
};

/// The types OpenAI accepts for the embeddings request's top-level fields besides `input`.
const EMBEDDINGS_FIELD_KINDS: &[(&str, &[JsonKind])] = &[
    ("dimensions", &[JsonKind::Number]),
    ("encoding_format", &[JsonKind::String]),
    ("user", &[JsonKind::String]),
];

/// A 400 naming the first well-known field whose value has the wrong JSON type, decided
/// from the first byte of each raw value, so the upstream never sees a request it would
/// refuse for that and the check costs nothing measurable.
pub(crate) fn check_field_types(
    object: &JsonObject,
    kinds: &[(&'static str, &[JsonKind])],
) -> Result<(), GatewayError> {
    for (field, first) in object.field_types() {
        let Some(kind) = JsonKind::of(first) else {
            continue;
        };
        let Some(&(field, allowed)) = kinds.iter().find(|(name, _)| *name == field) else {
            continue;
        };
        if !allowed.contains(&kind) {
            let expected = allowed
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(" or ");
            return Err(GatewayError::InvalidRequest {
                message: format!(
                    "Invalid type for '{field}': expected {expected}, but got {} instead.",
                    kind.name()
                ),
                param: Some(field),
                code: Some("invalid_type"),
            });
        }
    }
    Ok(())
}

/// An embeddings request.
#[derive(Debug, Clone)]
pub struct EmbeddingsRequest {
    pub object: JsonObject,
    pub model: String,
}

impl EmbeddingsRequest {
    /// # Errors
    /// 400 for malformed JSON or a missing `model` or `input`.
    pub fn parse(body: Bytes) -> Result<EmbeddingsRequest, GatewayError> {
        let object = JsonObject::parse(body)?;
        let model = required_model(&object)?;
        match object.raw("input") {
            None | Some("null") => Err(GatewayError::invalid(
                "Missing required parameter: 'input'.",
                Some("input"),
            )),
            Some(raw) if raw.starts_with('{') || raw == "true" || raw == "false" => {
                Err(GatewayError::invalid(
                    "Invalid type for 'input': expected a string, an array of strings or an array of token arrays.",
                    Some("input"),
                ))
            }
            Some(raw) => {
                check_input_count(raw)?;
                check_field_types(&object, EMBEDDINGS_FIELD_KINDS)?;
                Ok(EmbeddingsRequest { object, model })
            }
        }
    }
}

/// The most inputs one embeddings request may carry (OpenAI's own limit), checked before
/// the request reaches an upstream.
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// Refuses an `input` array of more than [`MAX_EMBEDDING_INPUTS`] strings or token arrays
/// (an array of integers is one input: a single token array). Counts without keeping.
fn check_input_count(raw: &str) -> Result<(), GatewayError> {
    let Some(items) = raw.strip_prefix('[') else {
        return Ok(());
    };
    if items
        .trim_start()
        .starts_with(|c: char| c == '-' || c.is_ascii_digit())
    {
        return Ok(());
    }
    struct Count;
    impl<'de> Visitor<'de> for Count {
        type Value = usize;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
            let mut n = 0;
            while seq.next_element::<de::IgnoredAny>()?.is_some() {
                n += 1;
            }
            Ok(n)
        }
    }
    let mut de = serde_json::Deserializer::from_str(raw);
    let n = de::Deserializer::deserialize_seq(&mut de, Count).unwrap_or(0);
    if n > MAX_EMBEDDING_INPUTS {
        return Err(GatewayError::invalid(
            format!("Invalid 'input': at most {MAX_EMBEDDING_INPUTS} inputs per request, got {n}."),
            Some("input"),
        ));
    }
    Ok(())
}

fn required_model(object: &JsonObject) -> Result<String, GatewayError> {
    match object.get::<String>("model") {
        Ok(Some(model)) if !model.is_empty() => Ok(model),
        Ok(_) => Err(GatewayError::invalid(
            "Missing required parameter: 'model'.",
            Some("model"),
        )),
        Err(_) => Err(GatewayError::invalid(
            "Invalid type for 'model': expected a string.",
            Some("model"),
        )),
    }
}

/// Token usage as OpenAI reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

/// Indexes a JSON object's top-level fields as borrowed raw values.
/// The most top-level fields a request body may have.
const MAX_TOP_LEVEL_FIELDS: usize = 256;

struct FieldIndex<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for FieldIndex<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IndexVisitor;
        impl<'de> Visitor<'de> for IndexVisitor {
            type Value = FieldIndex<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(12));
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    // The duplicate check is quadratic: bounded here, far above any real
                    // request (OpenAI's chat request has fewer than 50 fields).
                    if fields.len() == MAX_TOP_LEVEL_FIELDS {
                        return Err(de::Error::custom(format_args!(
                            "more than {MAX_TOP_LEVEL_FIELDS} top-level fields"
                        )));
                    }
                    if fields.iter().any(|(k, _): &(Cow<'de, str>, _)| *k == key.0) {
                        return Err(de::Error::custom(format_args!(
                            "duplicate field `{}`",
                            key.0
                        )));
                    }
                    fields.push((key.0, value));
                }
                Ok(FieldIndex(fields))
            }
        }
        deserializer.deserialize_map(IndexVisitor)
    }
}

/// An object key, borrowed unless it contained escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Key<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(body: &str) -> Result<ChatRequest, GatewayError> {
        ChatRequest::parse(Bytes::copy_from_slice(body.as_bytes()))
    }

    #[test]
    fn raw_fields_are_kept_verbatim() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi \u00e9"}],"tools":[{"type":"function"}] , "n" : 2}"#;
        let req = chat(body).unwrap();
        assert_eq!(req.model, "m");
        assert!(!req.stream);
        assert_eq!(
            req.object.raw("messages").unwrap(),
            r#"[{"role":"user","content":"hi \u00e9"}]"#
        );
        assert_eq!(req.object.raw("n").unwrap(), "2");
    }

    #[test]
    fn rewrite_swaps_model_and_adds_fields() {
        let req = chat(r#"{"model":"alias","stream":true,"messages":[1]}"#).unwrap();
        let out = req.object.rewrite(&[
            ("model", Some("\"upstream\"")),
            ("stream_options", Some(r#"{"include_usage":true}"#)),
        ]);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "upstream");
        assert_eq!(v["stream"], true);
        assert_eq!(v["messages"][0], 1);
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn bad_bodies_are_400s_naming_the_param() {
        for (body, param) in [
            ("not json", None),
            ("[1,2]", None),
            (
                r#"{"messages":[{"role":"user","content":"x"}]}"#,
                Some("model"),
            ),
            (r#"{"model":5,"messages":[1]}"#, Some("model")),
            (r#"{"model":"m"}"#, Some("messages")),
            (r#"{"model":"m","messages":[ ]}"#, Some("messages")),
            (r#"{"model":"m","messages":"hi"}"#, Some("messages")),
            (
                r#"{"model":"m","messages":[1],"stream":"yes"}"#,
                Some("stream"),
            ),
            (r#"{"model":"m","model":"n","messages":[1]}"#, None),
        ] {
            match chat(body) {
                Err(GatewayError::InvalidRequest { param: p, .. }) => {
                    assert_eq!(p, param, "{body}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn embeddings_inputs_are_capped_but_a_token_array_is_one_input() {
        let parse = |input: String| {
            EmbeddingsRequest::parse(Bytes::from(format!(r#"{{"model":"m","input":{input}}}"#)))
        };
        let strings = |n: usize| format!("[{}]", vec!["\"a\""; n].join(","));
        assert!(parse(strings(MAX_EMBEDDING_INPUTS)).is_ok());
        match parse(strings(MAX_EMBEDDING_INPUTS + 1)) {
            Err(GatewayError::InvalidRequest { param, message, .. }) => {
                assert_eq!(param, Some("input"));
                assert!(message.contains("2049"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let tokens = format!("[{}]", vec!["1"; 5000].join(","));
        assert!(parse(tokens).is_ok(), "one token array of 5,000 tokens");
        let token_arrays = format!("[{}]", vec!["[1,2]"; 3000].join(","));
        assert!(parse(token_arrays).is_err());
    }

    #[test]
    fn escaped_keys_are_understood() {
        let req = chat(r#"{"mod\u0065l":"m","messages":[1]}"#).unwrap();
        assert_eq!(req.model, "m");
    }

    #[test]
    fn usage_is_read_from_a_chunk() {
        let chunk = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        assert_eq!(read_usage(chunk).unwrap().total_tokens, 7);
        assert!(read_usage(br#"{"choices":[]}"#).is_none());
    }

    proptest::proptest! {
        /// Any bytes at all: a request is parsed or refused with a 400, never a panic.
        #[test]
        fn any_body_is_parsed_or_refused(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            match ChatRequest::parse(Bytes::from(body.clone())) {
                Ok(_) => {}
                Err(err) => proptest::prop_assert_eq!(err.status().as_u16(), 400),
            }
            match EmbeddingsRequest::parse(Bytes::from(body)) {
                Ok(_) => {}
                Err(err) => proptest::prop_assert_eq!(err.status().as_u16(), 400),
            }
        }

        /// A chat body's fields survive the model swap byte for byte, whatever they hold.
        #[test]
        fn rewrite_keeps_every_other_field(
            model in "[a-z0-9/._-]{1,20}",
            upstream in "[a-z0-9/._-]{1,20}",
            text in "\\PC{0,40}",
            temperature in 0.0f64..2.0,
        ) {
            let body = serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": text}],
                "temperature": temperature,
            });
            let req = chat(&body.to_string()).unwrap();
            let name = serde_json::to_string(&upstream).unwrap();
            let out = JsonObject::parse(Bytes::from(req.object.rewrite(&[("model", Some(&name))])))
                .unwrap();
            proptest::prop_assert_eq!(out.get::<String>("model").unwrap(), Some(upstream));
            for field in ["messages", "temperature"] {
                proptest::prop_assert_eq!(out.raw(field), req.object.raw(field), "{}", field);
            }
        }
    }
    proptest::proptest! {
        /// The chat reader reports the object's own model and stream flag, and a rewrite
        /// that replaces the model leaves every other field as it was.
        #[test]
        fn chat_reader_agrees_with_serde_and_rewrites_one_field(
            model in "[ -~]{1,20}",
            stream in proptest::option::of(proptest::bool::ANY),
            extra in proptest::collection::btree_map("[a-z_]{1,8}", "[ -~]{0,10}", 0..6),
        ) {
            let mut object = serde_json::Map::new();
            for (key, value) in &extra {
                object.insert(key.clone(), serde_json::Value::from(value.as_str()));
            }
            object.insert("model".into(), model.clone().into());
            object.insert("messages".into(), json!([{"role": "user", "content": "hi"}]));
            if let Some(stream) = stream {
                object.insert("stream".into(), stream.into());
            }
            let req = ChatRequest::parse(Bytes::from(serde_json::to_vec(&object).unwrap()));
            // Extra keys may collide with typed fields (e.g. `n` as a string): those are
            // refused, and only those.
            let Ok(req) = req else {
                proptest::prop_assert!(extra.keys().any(|k| CHAT_FIELD_KINDS.iter().any(|(f, _)| f == k)));
                return Ok(());
            };
            proptest::prop_assert_eq!(&req.model, &model);
            proptest::prop_assert_eq!(req.stream, stream.unwrap_or(false));
            let rewritten: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&req.object.rewrite(&[("model", Some("\"other\""))])).unwrap();
            for (key, value) in &object {
                if key == "model" {
                    proptest::prop_assert_eq!(&rewritten[key], &json!("other"));
                } else {
                    proptest::prop_assert_eq!(&rewritten[key], value);
                }
            }
        }
    }
}
