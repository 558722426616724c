//! The request side of Chat Completions: messages, content parts, tools, `tool_choice`,
//! `response_format`, `stop` (SDK: `chat_completion_*_param.py`, `completion_create_params.py`,
//! `shared_params/`).
//!
//! A request body is a [`crate::wire::JsonObject`]; these types are parsed from its raw
//! fields on demand, e.g. `serde_json::from_str::<Vec<Message>>(object.raw("messages")?)`,
//! borrowing from the body.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::response::{CompletionMessage, FunctionCall, Role, ToolCall};
use super::serde_util::opt_cow;

/// One message of `messages` (SDK: `ChatCompletionMessageParam`, the union of the
/// developer, system, user, assistant, tool and function message params).
///
/// One struct for every role: the roles share most fields, and a message is read by
/// `role` first anyway. Which fields a role may carry:
/// - `system`, `developer`: `content` (a string or text parts), `name`.
/// - `user`: `content` (a string or text, image, audio and file parts), `name`.
/// - `assistant`: `content` (a string, text or refusal parts, or null), `refusal`,
///   `tool_calls`, `name`, `audio`, `function_call` (deprecated).
/// - `tool`: `content`, `tool_call_id`.
/// - `function` (deprecated): `content`, `name`.
///
/// Unknown fields are dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message<'a> {
    pub role: Role,
    #[serde(default, borrow)]
    pub content: Content<'a>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Cow<'a, str>>,
    #[serde(
        default,
        borrow,
        deserialize_with = "opt_cow",
        skip_serializing_if = "Option::is_none"
    )]
    pub refusal: Option<Cow<'a, str>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall<'a>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<Cow<'a, str>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub audio: Option<AudioRef<'a>>,
    /// Deprecated in favour of `tool_calls`.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub function_call: Option<FunctionCall<'a>>,
}

impl<'a> Message<'a> {
    /// A message of `role` with text content and nothing else.
    pub fn new(role: Role, text: impl Into<Cow<'a, str>>) -> Self {
        Message {
            role,
            content: Content::Text(text.into()),
            name: None,
            refusal: None,
            tool_calls: None,
            tool_call_id: None,
            audio: None,
            function_call: None,
        }
    }

    pub fn system(text: impl Into<Cow<'a, str>>) -> Self {
        Message::new(Role::System, text)
    }

    pub fn developer(text: impl Into<Cow<'a, str>>) -> Self {
        Message::new(Role::Developer, text)
    }

    pub fn user(text: impl Into<Cow<'a, str>>) -> Self {
        Message::new(Role::User, text)
    }

    pub fn assistant(text: impl Into<Cow<'a, str>>) -> Self {
        Message::new(Role::Assistant, text)
    }

    /// The answer to the tool call `tool_call_id`.
    pub fn tool(tool_call_id: impl Into<Cow<'a, str>>, text: impl Into<Cow<'a, str>>) -> Self {
        Message {
            tool_call_id: Some(tool_call_id.into()),
            ..Message::new(Role::Tool, text)
        }
    }
}

impl<'a> From<CompletionMessage<'a>> for Message<'a> {
    /// A model's reply as the assistant turn of the next request's history.
    fn from(reply: CompletionMessage<'a>) -> Self {
        Message {
            role: Role::Assistant,
            content: reply.content.map_or(Content::Null, Content::Text),
            name: None,
            refusal: reply.refusal,
            tool_calls: reply.tool_calls,
            tool_call_id: None,
            audio: reply.audio.map(|audio| AudioRef {
                id: Cow::Owned(audio.id),
            }),
            function_call: reply.function_call,
        }
    }
}

/// A previous audio reply, referred to by id (SDK: assistant message param `Audio`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AudioRef<'a> {
    #[serde(borrow)]
    pub id: Cow<'a, str>,
}

/// A message's `content`: a string, an array of parts, or null/absent.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Content<'a> {
    #[default]
    Null,
    Text(Cow<'a, str>),
    Parts(Vec<ContentPart<'a>>),
}

impl<'a> Content<'a> {
    /// The text of the content: the string, or its text parts joined (other parts are
    /// skipped); `None` for null content.
    pub fn text(&self) -> Option<Cow<'_, str>> {
        match self {
            Content::Null => None,
            Content::Text(text) => Some(Cow::Borrowed(text)),
            Content::Parts(parts) => {
                let mut texts = parts.iter().filter_map(|part| match part {
                    ContentPart::Text { text } => Some(&**text),
                    _ => None,
                });
                let first = texts.next().unwrap_or("");
                match texts.next() {
                    None => Some(Cow::Borrowed(first)),
                    Some(second) => {
                        let mut joined = format!("{first}{second}");
                        texts.for_each(|t| joined.push_str(t));
                        Some(Cow::Owned(joined))
                    }
                }
            }
        }
    }
}

impl Serialize for Content<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Content::Null => s.serialize_unit(),
            Content::Text(text) => s.serialize_str(text),
            Content::Parts(parts) => s.collect_seq(parts),
        }
    }
}

// Hand-written rather than `#[serde(untagged)]`, which would buffer every part (and its
// base64 image data) into an intermediate tree before trying each variant.
impl<'de: 'a, 'a> Deserialize<'de> for Content<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ContentVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for ContentVisitor<'a> {
            type Value = Content<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, an array of content parts or null")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Content::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Content::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Content::Text(Cow::Owned(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Content::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Content::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut parts = Vec::with_capacity(seq.size_hint().unwrap_or(2));
                while let Some(part) = seq.next_element()? {
                    parts.push(part);
                }
                Ok(Content::Parts(parts))
            }
        }
        deserializer.deserialize_any(ContentVisitor(PhantomData))
    }
}

/// One element of an array `content` (SDK: `ChatCompletionContentPartParam`, plus the
/// assistant's `ChatCompletionContentPartRefusalParam`). A part's `prompt_cache_breakpoint`
/// is dropped.
#[derive(Debug, Clone, PartialEq)]
pub enum ContentPart<'a> {
    /// `{"type":"text","text":..}`; a missing `text` reads as empty.
    Text { text: Cow<'a, str> },
    /// `{"type":"image_url","image_url":{"url":..,"detail":..}}`: an https or `data:` URL.
    ImageUrl { image_url: ImageUrl<'a> },
    /// `{"type":"input_audio","input_audio":{"data":..,"format":..}}`.
    InputAudio { input_audio: InputAudio<'a> },
    /// `{"type":"file","file":{"file_data"|"file_id":..,"filename":..}}`.
    File { file: FileInput<'a> },
    /// `{"type":"refusal","refusal":..}`, in assistant history only.
    Refusal { refusal: Cow<'a, str> },
    /// A part type this gateway does not know; only its type is kept.
    Other { kind: Cow<'a, str> },
}

impl<'a> ContentPart<'a> {
    /// A text part.
    pub fn text(text: impl Into<Cow<'a, str>>) -> Self {
        ContentPart::Text { text: text.into() }
    }

    /// The part's `type`.
    pub fn kind(&self) -> &str {
        match self {
            ContentPart::Text { .. } => "text",
            ContentPart::ImageUrl { .. } => "image_url",
            ContentPart::InputAudio { .. } => "input_audio",
            ContentPart::File { .. } => "file",
            ContentPart::Refusal { .. } => "refusal",
            ContentPart::Other { kind } => kind,
        }
    }
}

impl Serialize for ContentPart<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut part = s.serialize_struct("ContentPart", 2)?;
        part.serialize_field("type", self.kind())?;
        match self {
            ContentPart::Text { text } => part.serialize_field("text", text)?,
            ContentPart::ImageUrl { image_url } => part.serialize_field("image_url", image_url)?,
            ContentPart::InputAudio { input_audio } => {
                part.serialize_field("input_audio", input_audio)?
            }
            ContentPart::File { file } => part.serialize_field("file", file)?,
            ContentPart::Refusal { refusal } => part.serialize_field("refusal", refusal)?,
            ContentPart::Other { .. } => {}
        }
        part.end()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for ContentPart<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Every variant's fields in one flat struct: read in one pass, no buffering.
        #[derive(Deserialize)]
        struct Fields<'a> {
            #[serde(rename = "type", borrow)]
            kind: Cow<'a, str>,
            #[serde(default, borrow)]
            text: Cow<'a, str>,
            #[serde(default, borrow)]
            refusal: Cow<'a, str>,
            #[serde(default, borrow)]
            image_url: Option<ImageUrl<'a>>,
            #[serde(default, borrow)]
            input_audio: Option<InputAudio<'a>>,
            #[serde(default, borrow)]
            file: Option<FileInput<'a>>,
        }
        let f = Fields::deserialize(deserializer)?;
        let missing = |field: &'static str| {
            de::Error::custom(format_args!(
                "a '{}' content part needs a '{field}' object",
                f.kind
            ))
        };
        Ok(match &*f.kind {
            "text" => ContentPart::Text { text: f.text },
            "refusal" => ContentPart::Refusal { refusal: f.refusal },
            "image_url" => ContentPart::ImageUrl {
                image_url: f.image_url.ok_or_else(|| missing("image_url"))?,
            },
            "input_audio" => ContentPart::InputAudio {
                input_audio: f.input_audio.ok_or_else(|| missing("input_audio"))?,
            },
            "file" => ContentPart::File {
                file: f.file.ok_or_else(|| missing("file"))?,
            },
            _ => ContentPart::Other { kind: f.kind },
        })
    }
}

/// SDK: `ImageURL` of `ChatCompletionContentPartImageParam`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageUrl<'a> {
    /// An https URL or `data:<media type>;base64,<data>`.
    #[serde(borrow)]
    pub url: Cow<'a, str>,
    /// `auto`, `low` or `high`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Cow<'a, str>>,
}

/// SDK: `InputAudio` of `ChatCompletionContentPartInputAudioParam`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputAudio<'a> {
    /// Base64-encoded audio.
    #[serde(borrow)]
    pub data: Cow<'a, str>,
    /// `wav` or `mp3`.
    #[serde(borrow)]
    pub format: Cow<'a, str>,
}

/// SDK: `FileFile` of the `file` content part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileInput<'a> {
    /// Base64-encoded file content.
    #[serde(
        default,
        borrow,
        deserialize_with = "opt_cow",
        skip_serializing_if = "Option::is_none"
    )]
    pub file_data: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_id: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<Cow<'a, str>>,
}

/// One element of `tools` (SDK: `ChatCompletionToolUnionParam`).
#[derive(Debug, Clone)]
pub enum Tool<'a> {
    /// `{"type":"function","function":{..}}`.
    Function { function: FunctionDefinition<'a> },
    /// `{"type":"custom","custom":{..}}`: free-form input instead of JSON arguments.
    Custom { custom: CustomTool<'a> },
    /// A tool type this gateway does not know; only its type is kept.
    Other { kind: Cow<'a, str> },
}

impl<'a> Tool<'a> {
    /// The tool's `type`.
    pub fn kind(&self) -> &str {
        match self {
            Tool::Function { .. } => "function",
            Tool::Custom { .. } => "custom",
            Tool::Other { kind } => kind,
        }
    }

    /// A function tool.
    pub fn function(function: FunctionDefinition<'a>) -> Self {
        Tool::Function { function }
    }
}

impl Serialize for Tool<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut tool = s.serialize_struct("Tool", 2)?;
        tool.serialize_field("type", self.kind())?;
        match self {
            Tool::Function { function } => tool.serialize_field("function", function)?,
            Tool::Custom { custom } => tool.serialize_field("custom", custom)?,
            Tool::Other { .. } => {}
        }
        tool.end()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Tool<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Fields<'a> {
            #[serde(rename = "type", borrow)]
            kind: Cow<'a, str>,
            #[serde(default, borrow)]
            function: Option<FunctionDefinition<'a>>,
            #[serde(default, borrow)]
            custom: Option<CustomTool<'a>>,
        }
        let f = Fields::deserialize(deserializer)?;
        Ok(match &*f.kind {
            "function" => Tool::Function {
                function: f.function.ok_or_else(|| {
                    de::Error::custom("a function tool needs a 'function' object")
                })?,
            },
            "custom" => Tool::Custom {
                custom: f
                    .custom
                    .ok_or_else(|| de::Error::custom("a custom tool needs a 'custom' object"))?,
            },
            _ => Tool::Other { kind: f.kind },
        })
    }
}

/// SDK: `shared_params.FunctionDefinition`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionDefinition<'a> {
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    #[serde(
        default,
        borrow,
        deserialize_with = "opt_cow",
        skip_serializing_if = "Option::is_none"
    )]
    pub description: Option<Cow<'a, str>>,
    /// A JSON Schema object, kept as sent.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<&'a RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// SDK: `Custom` of `ChatCompletionCustomToolParam`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CustomTool<'a> {
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    #[serde(
        default,
        borrow,
        deserialize_with = "opt_cow",
        skip_serializing_if = "Option::is_none"
    )]
    pub description: Option<Cow<'a, str>>,
    /// `{"type":"text"}` or `{"type":"grammar","grammar":{..}}`, kept as sent.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub format: Option<&'a RawValue>,
}

/// `tool_choice` (SDK: `ChatCompletionToolChoiceOptionParam`).
#[derive(Debug, Clone)]
pub enum ToolChoice<'a> {
    /// `"none"`: the model must not call a tool.
    None,
    /// `"auto"`: the model decides.
    Auto,
    /// `"required"`: the model must call one or more tools.
    Required,
    /// `{"type":"function","function":{"name":..}}`: this function, and only it.
    Function { name: Cow<'a, str> },
    /// `{"type":"custom","custom":{"name":..}}`: this custom tool.
    Custom { name: Cow<'a, str> },
    /// `{"type":"allowed_tools","allowed_tools":{"mode":..,"tools":[..]}}`: a subset of
    /// `tools`, each a tool reference kept as sent.
    AllowedTools(AllowedTools<'a>),
}

/// SDK: `ChatCompletionAllowedToolsParam`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AllowedTools<'a> {
    /// `auto` or `required`.
    #[serde(borrow)]
    pub mode: Cow<'a, str>,
    #[serde(borrow)]
    pub tools: Vec<&'a RawValue>,
}

#[derive(Serialize, Deserialize)]
struct Named<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
}

impl Serialize for ToolChoice<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (kind, key) = match self {
            ToolChoice::None => return s.serialize_str("none"),
            ToolChoice::Auto => return s.serialize_str("auto"),
            ToolChoice::Required => return s.serialize_str("required"),
            ToolChoice::Function { .. } => ("function", "function"),
            ToolChoice::Custom { .. } => ("custom", "custom"),
            ToolChoice::AllowedTools(_) => ("allowed_tools", "allowed_tools"),
        };
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("type", kind)?;
        match self {
            ToolChoice::Function { name } | ToolChoice::Custom { name } => {
                map.serialize_entry(key, &Named { name: name.clone() })?
            }
            ToolChoice::AllowedTools(allowed) => map.serialize_entry(key, allowed)?,
            ToolChoice::None | ToolChoice::Auto | ToolChoice::Required => {}
        }
        map.end()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for ToolChoice<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ChoiceVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for ChoiceVisitor<'a> {
            type Value = ToolChoice<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("'none', 'auto', 'required' or a named tool choice object")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v {
                    "none" => Ok(ToolChoice::None),
                    "auto" => Ok(ToolChoice::Auto),
                    "required" => Ok(ToolChoice::Required),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                #[derive(Deserialize)]
                struct Fields<'a> {
                    #[serde(rename = "type", borrow)]
                    kind: Cow<'a, str>,
                    #[serde(default, borrow)]
                    function: Option<Named<'a>>,
                    #[serde(default, borrow)]
                    custom: Option<Named<'a>>,
                    #[serde(default, borrow)]
                    allowed_tools: Option<AllowedTools<'a>>,
                }
                let f = Fields::deserialize(MapAccessDeserializer::new(map))?;
                let missing = |key: &str| {
                    de::Error::custom(format_args!(
                        "a '{}' tool choice needs a '{key}' object",
                        f.kind
                    ))
                };
                match &*f.kind {
                    "function" => Ok(ToolChoice::Function {
                        name: f.function.ok_or_else(|| missing("function"))?.name,
                    }),
                    "custom" => Ok(ToolChoice::Custom {
                        name: f.custom.ok_or_else(|| missing("custom"))?.name,
                    }),
                    "allowed_tools" => Ok(ToolChoice::AllowedTools(
                        f.allowed_tools.ok_or_else(|| missing("allowed_tools"))?,
                    )),
                    other => Err(de::Error::unknown_variant(
                        other,
                        &["function", "custom", "allowed_tools"],
                    )),
                }
            }
        }
        deserializer.deserialize_any(ChoiceVisitor(PhantomData))
    }
}

/// `response_format` (SDK: `ResponseFormatText`, `ResponseFormatJSONObject`,
/// `ResponseFormatJSONSchema`).
#[derive(Debug, Clone)]
pub enum ResponseFormat<'a> {
    /// `{"type":"text"}`: the default.
    Text,
    /// `{"type":"json_object"}`: any valid JSON object.
    JsonObject,
    /// `{"type":"json_schema","json_schema":{..}}`: JSON conforming to a schema. A missing
    /// `json_schema` object reads as an empty one.
    JsonSchema { json_schema: JsonSchema<'a> },
    /// A format this gateway does not know; only its type is kept.
    Other { kind: Cow<'a, str> },
}

impl ResponseFormat<'_> {
    /// The format's `type`.
    pub fn kind(&self) -> &str {
        match self {
            ResponseFormat::Text => "text",
            ResponseFormat::JsonObject => "json_object",
            ResponseFormat::JsonSchema { .. } => "json_schema",
            ResponseFormat::Other { kind } => kind,
        }
    }
}

impl Serialize for ResponseFormat<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut format = s.serialize_struct("ResponseFormat", 2)?;
        format.serialize_field("type", self.kind())?;
        if let ResponseFormat::JsonSchema { json_schema } = self {
            format.serialize_field("json_schema", json_schema)?;
        }
        format.end()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for ResponseFormat<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Fields<'a> {
            #[serde(rename = "type", borrow)]
            kind: Cow<'a, str>,
            #[serde(default, borrow)]
            json_schema: Option<JsonSchema<'a>>,
        }
        let f = Fields::deserialize(deserializer)?;
        Ok(match &*f.kind {
            "text" => ResponseFormat::Text,
            "json_object" => ResponseFormat::JsonObject,
            "json_schema" => ResponseFormat::JsonSchema {
                json_schema: f.json_schema.unwrap_or_default(),
            },
            _ => ResponseFormat::Other { kind: f.kind },
        })
    }
}

/// SDK: `JSONSchema` of `ResponseFormatJSONSchema`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JsonSchema<'a> {
    /// Required by OpenAI; empty when a client left it out.
    #[serde(default, borrow)]
    pub name: Cow<'a, str>,
    #[serde(
        default,
        borrow,
        deserialize_with = "opt_cow",
        skip_serializing_if = "Option::is_none"
    )]
    pub description: Option<Cow<'a, str>>,
    /// The JSON Schema, kept as sent.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub schema: Option<&'a RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `stop`: one sequence or several.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    /// The stop sequences as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(one) => vec![one],
            Stop::Many(many) => many,
        }
    }
}
