//! Context assembly: what a turn sends the model, within the alias's token budget.
//!
//! The context is the instructions, the tools, the history and the new input. The fixed
//! part (instructions, tools, new input) must fit the window on its own; the history
//! fills what is left, newest first, read from the store in pages with the token count
//! stored beside each item, so a long conversation costs a bounded read and no
//! tokenizing. With `truncation: "disabled"` a history that does not fit is a 400
//! (`context_length_exceeded`) before any upstream call; with `"auto"` the oldest items
//! are left out, and a tool call's output never stays without its call.

use std::collections::HashSet;

use serde_json::Value;

use crate::error::GatewayError;
use crate::store::Store;
use crate::store::conversations::{ItemRow, Recent};
use crate::tokens::{TokenizerKind, count};
use crate::wire::responses::{Item, Part};

/// Items a history may bring into one turn, however small they are: bounds the rows a
/// turn reads when the alias's window is unknown.
pub const MAX_HISTORY_ITEMS: u32 = 10_000;
/// Tokens of an item's framing (role, separators), as OpenAI counts a chat message.
const ITEM_OVERHEAD: i64 = 4;
/// Tokens an image is counted as: a high-detail 1024×1024 image.
const IMAGE_TOKENS: i64 = 765;

/// Where a turn's history comes from.
#[derive(Debug, Clone)]
pub enum History {
    None,
    /// The chain ending at this response (`previous_response_id`).
    Chain(String),
    /// This conversation's items.
    Conversation(String),
}

/// The history items chosen for a turn (the new input is the caller's).
#[derive(Debug)]
pub struct Context {
    history: Vec<Item>,
    truncated: bool,
}

/// Tokens of one item: its text with the item's tokenizer, plus framing and a fixed
/// estimate per image or file. Computed once, when the item is written.
pub fn item_tokens(kind: TokenizerKind, item: &Item) -> i64 {
    let text: u64 = item.texts().into_iter().map(|t| count(kind, t)).sum();
    let mut tokens = i64::try_from(text).unwrap_or(i64::MAX);
    if let Item::Message(message) = item {
        for part in &message.content {
            tokens = tokens.saturating_add(match part {
                Part::InputImage { .. } => IMAGE_TOKENS,
                // Base64 data is 4/3 of the file; a token is about 4 bytes of text.
                Part::InputFile {
                    file_data: Some(data),
                    ..
                } => i64::try_from(data.len() * 3 / 16).unwrap_or(i64::MAX),
                Part::InputFile { .. } => IMAGE_TOKENS,
                _ => 0,
            });
        }
    }
    tokens.saturating_add(ITEM_OVERHEAD)
}

/// The 400 OpenAI answers when the input does not fit the model's context window.
pub fn context_length_exceeded(detail: String) -> GatewayError {
    GatewayError::InvalidRequest {
        message: format!(
            "Your input exceeds the context window of this model. {detail} Please adjust your \
             input and try again, or set 'truncation' to 'auto'."
        ),
        param: Some("input"),
        code: Some("context_length_exceeded"),
    }
}

impl Context {
    /// Chooses the history of a turn.
    ///
    /// `window` is the input budget (the context window less the output reserve), `None`
    /// when the alias's window is unknown.
    ///
    /// # Errors
    /// 400 `context_length_exceeded`; 404 for an unknown response or conversation; 503
    /// when the store is unreachable.
    #[allow(clippy::too_many_arguments)]
    pub async fn assemble(
        store: &Store,
        owner: Option<&str>,
        history: &History,
        instructions: Option<&str>,
        input: &[(Item, i64)],
        tools: &[Value],
        tokenizer: TokenizerKind,
        window: Option<u64>,
        auto: bool,
    ) -> Result<Context, GatewayError> {
        let mut fixed: i64 = 3;
        if let Some(instructions) = instructions {
            fixed += i64::try_from(count(tokenizer, instructions)).unwrap_or(i64::MAX);
        }
        for tool in tools {
            let text = tool.to_string();
            fixed += i64::try_from(count(tokenizer, &text)).unwrap_or(i64::MAX);
        }
        fixed = input
            .iter()
            .fold(fixed, |sum, (_, tokens)| sum.saturating_add(*tokens));
        let window = window.map(|w| i64::try_from(w).unwrap_or(i64::MAX));
        if let Some(window) = window
            && fixed > window
        {
            return Err(context_length_exceeded(format!(
                "The input is {fixed} tokens; this model takes {window}."
            )));
        }
        let room = window.map_or(i64::MAX, |w| w - fixed);
        let recent: Recent = match history {
            History::None => {
                return Ok(Context {
                    history: Vec::new(),
                    truncated: false,
                });
            }
            History::Chain(id) => store
                .recent_chain_items(owner, id, room, MAX_HISTORY_ITEMS)
                .await
                .map_err(store_unavailable)?
                .ok_or_else(|| {
                    GatewayError::NotFound(format!("Previous response with id '{id}' not found."))
                })?,
            History::Conversation(id) => store
                .recent_conversation_items(owner, id, room, MAX_HISTORY_ITEMS)
                .await
                .map_err(store_unavailable)?
                .ok_or_else(|| {
                    GatewayError::NotFound(format!("Conversation with id '{id}' not found."))
                })?,
        };
        if !recent.complete && !auto {
            return Err(context_length_exceeded(match window {
                Some(window) => format!(
                    "The history and input are more than {window} tokens, this model's window \
                     less its output reserve."
                ),
                None => format!("The history is longer than {MAX_HISTORY_ITEMS} items."),
            }));
        }
        let mut items = parse_rows(recent.items);
        let truncated = !recent.complete;
        // A cut that fell between a call and its output leaves outputs with no call.
        let calls: HashSet<String> = items
            .iter()
            .filter_map(|item| match item {
                Item::FunctionCall(call) => Some(call.call_id.clone()),
                _ => None,
            })
            .collect();
        // (A call deleted from a conversation leaves its output the same way; that is
        // not a cut to fit the window.)
        items.retain(|item| match item {
            Item::FunctionCallOutput(output) => calls.contains(&output.call_id),
            _ => true,
        });
        if truncated {
            metrics::counter!("switchyard_context_truncations_total").increment(1);
        }
        Ok(Context {
            history: items,
            truncated,
        })
    }

    /// The history items, oldest first, then the new input.
    pub fn items<'a>(&'a self, input: &'a [(Item, i64)]) -> impl Iterator<Item = &'a Item> {
        self.history
            .iter()
            .chain(input.iter().map(|(item, _)| item))
    }

    /// Whether older items were left out.
    pub fn truncated(&self) -> bool {
        self.truncated
    }
}

/// Stored rows as items; a row this build cannot read (written by a newer one) is left
/// out of the context rather than failing the turn.
fn parse_rows(rows: Vec<ItemRow>) -> Vec<Item> {
    rows.into_iter()
        .filter_map(|row| match serde_json::from_str::<Item>(&row.body) {
            Ok(item) => Some(item),
            Err(e) => {
                tracing::warn!(item = %row.id, error = %e, "stored item unreadable; left out");
                None
            }
        })
        .collect()
}

fn store_unavailable(e: crate::store::StoreError) -> GatewayError {
    tracing::error!(error = %e, "conversation store");
    GatewayError::DependencyUnavailable("The conversation store")
}
