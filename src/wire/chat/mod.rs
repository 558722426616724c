//! The OpenAI Chat Completions schema as typed serde values.
//!
//! Field for field these follow the official SDK's types (`openai-python`,
//! `src/openai/types/chat/`); each type names its SDK counterpart. They exist for the code
//! that must *understand* a chat exchange: translating it to another provider, assembling a
//! stream into the answer it stands for, replaying a stored answer as a stream, reading a
//! model's reply (its text, its tool calls). The request path itself does not need them: a
//! request travels as a [`super::JsonObject`] and is forwarded byte for byte.
//!
//! - [`request`]: what a client sends: [`Message`]s (content as a string or [`ContentPart`]s),
//!   [`Tool`]s, [`ToolChoice`], [`ResponseFormat`], [`Stop`].
//! - [`response`]: what a model answers: the [`Completion`] and its [`Choice`]s and
//!   [`CompletionMessage`], the stream's [`Chunk`]s and [`Delta`]s, [`ToolCall`]s and
//!   [`ToolCallDelta`]s, [`CompletionUsage`].
//! - [`assemble`]: chunks merged into a completion ([`ChunkAssembler`], and
//!   [`StreamAssembler`] for framed SSE events), and a completion cut back into chunks
//!   ([`Completion::to_chunks`]).
//!
//! Parsing borrows from the input bytes: big strings are `Cow<'a, str>` (borrowed unless
//! they contain escapes) and opaque JSON (tool `parameters`, a JSON schema) is a
//! `&'a RawValue`, copied once when re-encoded and never built into a `serde_json::Value`
//! tree. A `type` or `role` this gateway does not know parses as an `Other` value naming it,
//! so callers can refuse it in their own words.
//!
//! Unknown fields: usage objects keep every field they carry (providers add their own, such
//! as costs), so usage re-serialises whole. Elsewhere unknown fields are dropped on parse; that
//! is what the stream assembler and the cache replay have always done, and requests are
//! forwarded as received rather than re-encoded from these types.

pub mod assemble;
pub mod request;
pub mod response;

#[cfg(test)]
mod tests;

pub use assemble::{AssembleError, ChunkAssembler, MAX_INDEX, StreamAssembler};
pub use request::{
    AllowedTools, AudioRef, Content, ContentPart, CustomTool, FileInput, FunctionDefinition,
    ImageUrl, InputAudio, JsonSchema, Message, ResponseFormat, Stop, Tool, ToolChoice,
};
pub use response::{
    Annotation, AudioOutput, Choice, ChoiceLogprobs, Chunk, ChunkChoice, Completion,
    CompletionMessage, CompletionTokensDetails, CompletionUsage, CustomToolCall,
    CustomToolCallDelta, Delta, FinishReason, FunctionCall, FunctionCallDelta, PromptTokensDetails,
    Role, TokenLogprob, ToolCall, ToolCallDelta, ToolType, TopLogprob, UrlCitation,
};

/// `object` of a [`Completion`].
pub const COMPLETION_OBJECT: &str = "chat.completion";
/// `object` of a [`Chunk`].
pub const CHUNK_OBJECT: &str = "chat.completion.chunk";

/// A string-valued enum whose unknown values are kept by name in `Other`.
macro_rules! string_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
            /// A value this gateway does not know, kept as sent.
            Other(Box<str>),
        }

        impl $name {
            /// The value as it appears on the wire.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $text,)+
                    Self::Other(other) => other,
                }
            }

            /// The variant for a wire value; unknown values become `Other`.
            pub fn from_wire(value: &str) -> Self {
                match value {
                    $($text => Self::$variant,)+
                    other => Self::Other(other.into()),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str($crate::wire::chat::serde_util::StrVisitor(Self::from_wire))
            }
        }
    };
}
pub(crate) use string_enum;

/// Deserialisation helpers shared by the schema types.
pub(crate) mod serde_util {
    use std::borrow::Cow;
    use std::fmt;

    use serde::Deserializer;
    use serde::de::{self, Visitor};

    /// Maps a string to a value without allocating for it.
    pub struct StrVisitor<T>(pub fn(&str) -> T);

    impl<T> Visitor<'_> for StrVisitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            Ok((self.0)(v))
        }
    }

    /// A string borrowed from the input unless it contained escapes.
    struct CowVisitor;

    impl<'de> Visitor<'de> for CowVisitor {
        type Value = Cow<'de, str>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(v))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v.to_owned()))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v))
        }
    }

    /// An optional string, borrowed where possible (serde's own `Option<Cow<str>>` always
    /// copies).
    pub fn opt_cow<'de: 'a, 'a, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Cow<'a, str>>, D::Error> {
        struct OptVisitor;
        impl<'de> Visitor<'de> for OptVisitor {
            type Value = Option<Cow<'de, str>>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or null")
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_str(CowVisitor).map(Some)
            }
        }
        d.deserialize_option(OptVisitor)
    }

    /// A string field that may be absent (`None`), `null` (`Some(None)`) or set; use with
    /// `#[serde(default)]`.
    pub fn nullable_cow<'de: 'a, 'a, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<Cow<'a, str>>>, D::Error> {
        opt_cow(d).map(Some)
    }

    /// Any field that may be absent (`None`), `null` (`Some(None)`) or set.
    pub fn nullable<'de, T: serde::Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        <Option<T> as serde::Deserialize>::deserialize(d).map(Some)
    }
}
