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
use std::sync::Arc;

use serde_json::Value;

use crate::error::GatewayError;
use crate::store::Store;
use crate::store::conversations::ItemRow;
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
    history: Vec<Arc<CachedItem>>,
    truncated: bool,
    version: Option<(i64, i64)>,
}

/// A stored item, parsed, with what context assembly needs of its row.
#[derive(Debug)]
pub struct CachedItem {
    pub seq: i64,
    pub item: Item,
    pub tokens: i64,
    /// Its stored JSON's length: what it weighs in the cache.
    pub bytes: u32,
}

/// The newest items of recently used conversations, parsed, between turns: a turn then
/// reads one indexed row (the conversation's version) instead of its items, and parses
/// nothing. An entry is used only when the stored version still matches it, so appends
/// and deletions by any instance are seen; a turn's own items extend the entry it read.
/// Bounded by bytes (`CONTEXT_CACHE_BYTES`), least recently used out first, and an entry
/// unused for `CONTEXT_CACHE_IDLE` leaves on its own: a conversation whose user has gone
/// gives its memory back instead of holding it until newer ones push it out.
pub struct ContextCache {
    entries: moka::sync::Cache<String, Arc<CacheEntry>>,
}

/// One conversation's newest items at one version.
pub struct CacheEntry {
    version: (i64, i64),
    /// Oldest first.
    items: Vec<Arc<CachedItem>>,
    /// Every item of the conversation is here.
    complete: bool,
    bytes: u64,
}

/// Bytes of stored item JSON the context cache holds.
pub const CONTEXT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// How long an unused conversation stays cached. Longer than the pause between a chat's
/// turns; a turn after it reads the conversation's newest items from the store once.
pub const CONTEXT_CACHE_IDLE: std::time::Duration = std::time::Duration::from_secs(5 * 60);

impl Default for ContextCache {
    fn default() -> Self {
        ContextCache::new(CONTEXT_CACHE_BYTES)
    }
}

impl ContextCache {
    pub fn new(max_bytes: u64) -> ContextCache {
        ContextCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .time_to_idle(CONTEXT_CACHE_IDLE)
                .weigher(|_: &String, entry: &Arc<CacheEntry>| {
                    u32::try_from(entry.bytes).unwrap_or(u32::MAX)
                })
                .build(),
        }
    }

    /// The newest cached items that fit `room` tokens, oldest first, and whether they are
    /// the whole conversation; `None` when the entry is missing, stale, or too short for
    /// the budget (older items exist that it does not hold).
    fn newest(
        &self,
        id: &str,
        version: (i64, i64),
        room: i64,
    ) -> Option<(Vec<Arc<CachedItem>>, bool)> {
        let entry = self.entries.get(id)?;
        if entry.version != version {
            return None;
        }
        let mut used: i64 = 0;
        let mut start = entry.items.len();
        let max = usize::try_from(MAX_HISTORY_ITEMS).unwrap_or(usize::MAX);
        while start > 0 && entry.items.len() - start < max {
            let tokens = entry.items[start - 1].tokens;
            if used.saturating_add(tokens) > room {
                // The budget is spent before the cached items are: a cut to fit.
                return Some((entry.items[start..].to_vec(), false));
            }
            used = used.saturating_add(tokens);
            start -= 1;
        }
        if start == 0 && entry.complete {
            return Some((entry.items.clone(), true));
        }
        if start > 0 {
            // Past the row limit: a cut as well.
            return Some((entry.items[start..].to_vec(), false));
        }
        // The budget wants older items than the entry holds: read the store.
        None
    }

    fn put(&self, id: &str, version: (i64, i64), items: Vec<Arc<CachedItem>>, complete: bool) {
        let bytes = items.iter().map(|i| u64::from(i.bytes)).sum();
        self.entries.insert(
            id.to_owned(),
            Arc::new(CacheEntry {
                version,
                items,
                complete,
                bytes,
            }),
        );
    }

    /// A turn's items were appended to the conversation it read at `read_at`: the entry
    /// read then (if still there) gains them at their version. Another instance's append
    /// in between makes the computed version differ from the stored one, so the next turn
    /// reads the store instead.
    pub fn extend(&self, id: &str, read_at: (i64, i64), added: Vec<Arc<CachedItem>>) {
        let Some(entry) = self.entries.get(id) else {
            return;
        };
        if entry.version != read_at || added.is_empty() {
            if entry.version != read_at {
                self.entries.invalidate(id);
            }
            return;
        }
        let newest = added.iter().map(|i| i.seq).max().unwrap_or(read_at.1);
        let count = read_at.0 + i64::try_from(added.len()).unwrap_or(0);
        let mut items = entry.items.clone();
        items.extend(added);
        // Keep the entry to what a turn could read.
        let max = usize::try_from(MAX_HISTORY_ITEMS).unwrap_or(usize::MAX);
        let complete = entry.complete && items.len() <= max;
        if items.len() > max {
            items.drain(..items.len() - max);
        }
        self.put(id, (count, newest), items, complete);
    }

    /// Forgets a conversation (deleted, or changed in a way the version alone would
    /// also show; saves a stale read).
    pub fn forget(&self, id: &str) {
        self.entries.invalidate(id);
    }
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
        cache: &ContextCache,
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
        let mut version = None;
        let (mut items, complete) = match history {
            History::None => {
                return Ok(Context {
                    history: Vec::new(),
                    truncated: false,
                    version: None,
                });
            }
            History::Chain(id) => {
                let recent = store
                    .recent_chain_items(owner, id, room, MAX_HISTORY_ITEMS)
                    .await
                    .map_err(store_unavailable)?
                    .ok_or_else(|| {
                        GatewayError::NotFound(format!(
                            "Previous response with id '{id}' not found."
                        ))
                    })?;
                (cached_rows(recent.items), recent.complete)
            }
            History::Conversation(id) => {
                // One indexed row says whether the cached items are still the stored ones.
                let current = store
                    .conversation_version(owner, id)
                    .await
                    .map_err(store_unavailable)?
                    .ok_or_else(|| {
                        GatewayError::NotFound(format!("Conversation with id '{id}' not found."))
                    })?;
                version = Some(current);
                match cache.newest(id, current, room) {
                    Some(hit) => hit,
                    None => {
                        let recent = store
                            .recent_conversation_items(owner, id, room, MAX_HISTORY_ITEMS)
                            .await
                            .map_err(store_unavailable)?
                            .ok_or_else(|| {
                                GatewayError::NotFound(format!(
                                    "Conversation with id '{id}' not found."
                                ))
                            })?;
                        let items = cached_rows(recent.items);
                        cache.put(id, current, items.clone(), recent.complete);
                        (items, recent.complete)
                    }
                }
            }
        };
        if !complete && !auto {
            return Err(context_length_exceeded(match window {
                Some(window) => format!(
                    "The history and input are more than {window} tokens, this model's window \
                     less its output reserve."
                ),
                None => format!("The history is longer than {MAX_HISTORY_ITEMS} items."),
            }));
        }
        let truncated = !complete;
        // A cut that fell between a call and its output leaves outputs with no call.
        let calls: HashSet<&str> = items
            .iter()
            .filter_map(|cached| match &cached.item {
                Item::FunctionCall(call) => Some(call.call_id.as_str()),
                _ => None,
            })
            .collect();
        // (A call deleted from a conversation leaves its output the same way; that is
        // not a cut to fit the window.)
        let orphan = |cached: &Arc<CachedItem>| match &cached.item {
            Item::FunctionCallOutput(output) => !calls.contains(output.call_id.as_str()),
            _ => false,
        };
        if items.iter().any(orphan) {
            let keep: Vec<bool> = items.iter().map(|c| !orphan(c)).collect();
            let mut flags = keep.into_iter();
            items.retain(|_| flags.next().unwrap_or(true));
        }
        if truncated {
            metrics::counter!("switchyard_context_truncations_total").increment(1);
        }
        Ok(Context {
            history: items,
            truncated,
            version,
        })
    }

    /// The history items, oldest first, then the new input.
    pub fn items<'a>(&'a self, input: &'a [(Item, i64)]) -> impl Iterator<Item = &'a Item> {
        self.history
            .iter()
            .map(|cached| &cached.item)
            .chain(input.iter().map(|(item, _)| item))
    }

    /// The conversation's version the history was read at (conversation turns only).
    pub fn version(&self) -> Option<(i64, i64)> {
        self.version
    }

    /// Whether older items were left out.
    pub fn truncated(&self) -> bool {
        self.truncated
    }
}

/// Stored rows as items; a row this build cannot read (written by a newer one) is left
/// out of the context rather than failing the turn.
fn cached_rows(rows: Vec<ItemRow>) -> Vec<Arc<CachedItem>> {
    rows.into_iter()
        .filter_map(|row| match serde_json::from_str::<Item>(&row.body) {
            Ok(item) => Some(Arc::new(CachedItem {
                seq: row.seq,
                item,
                tokens: row.tokens,
                bytes: u32::try_from(row.body.len()).unwrap_or(u32::MAX),
            })),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn items(tokens: &[i64]) -> Vec<Arc<CachedItem>> {
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Arc::new(CachedItem {
                    seq: i as i64 + 1,
                    item: Item::user_text(format!("item {i}")),
                    tokens: *t,
                    bytes: 10,
                })
            })
            .collect()
    }

    fn seqs(found: &[Arc<CachedItem>]) -> Vec<i64> {
        found.iter().map(|c| c.seq).collect()
    }

    #[test]
    fn the_cache_serves_the_newest_items_that_fit_at_the_same_version_only() {
        let cache = ContextCache::default();
        cache.put("conv_a", (3, 3), items(&[10, 10, 10]), true);
        let (all, complete) = cache.newest("conv_a", (3, 3), 100).unwrap();
        assert_eq!((seqs(&all), complete), (vec![1, 2, 3], true));
        let (cut, complete) = cache.newest("conv_a", (3, 3), 25).unwrap();
        assert_eq!((seqs(&cut), complete), (vec![2, 3], false));
        // Another instance appended or deleted: the version differs.
        assert!(cache.newest("conv_a", (4, 9), 100).is_none());
        assert!(cache.newest("conv_b", (3, 3), 100).is_none());
    }

    #[test]
    fn a_partial_entry_defers_to_the_store_when_the_budget_wants_older_items() {
        let cache = ContextCache::default();
        cache.put("conv_a", (10, 10), items(&[10, 10]), false);
        assert!(cache.newest("conv_a", (10, 10), 100).is_none());
        let (cut, complete) = cache.newest("conv_a", (10, 10), 15).unwrap();
        assert_eq!((seqs(&cut), complete), (vec![2], false));
    }

    #[test]
    fn a_turn_extends_the_entry_it_read_and_a_racing_turn_drops_it() {
        let cache = ContextCache::default();
        cache.put("conv_a", (2, 2), items(&[10, 10]), true);
        let mut added = items(&[10, 10, 10, 10]);
        let added: Vec<_> = added.drain(2..).collect();
        cache.extend("conv_a", (2, 2), added);
        let (all, complete) = cache.newest("conv_a", (4, 4), 1_000).unwrap();
        assert_eq!((seqs(&all), complete), (vec![1, 2, 3, 4], true));
        // A turn that read the old version finishes after: the entry is no longer trusted.
        cache.extend("conv_a", (2, 2), items(&[10]));
        assert!(cache.newest("conv_a", (4, 4), 1_000).is_none());
    }
}
