//! Token counts with the model's own tokenizer, and the budgets they are held to.
//!
//! Why this exists: a conversation kept by the gateway (the Responses and Conversations
//! APIs) has to be cut to what the model can read, `context_window − max_output_tokens`,
//! and that needs real counts, not the bytes/4 guess the rate limiter reserves with. The
//! same counts let `/v1/chat/completions` refuse or trim an over-long prompt before any
//! upstream call, for the aliases that ask for it.
//!
//! It is **off the pass-through path**: a chat request to an alias without `preflight`
//! costs one map lookup here and nothing else; nothing is parsed or counted. Counting
//! happens where the gateway owns the text anyway (items stored once, with their count,
//! at write time; never recounted) or where an alias opted in.
//!
//! - [`count`]: tokens of one text: exact `o200k_base` / `cl100k_base` through
//!   `bpe-openai` (vocabularies compiled into the binary, nothing fetched at run time,
//!   linear time; checked token for token against tiktoken-rs in the tests), or
//!   [`TokenizerKind::Approx`] for model families whose tokenizer is not public.
//! - [`count_message`], [`count_messages`], [`count_tools`]: a chat prompt counted the
//!   way OpenAI documents it ([`chat`]).
//! - [`fit_newest`]: which newest items fit a limit, tool calls kept with their outputs.
//! - [`TokenBudget`] / [`TokenBudgets`]: per alias, from config or from the model's name
//!   ([`budget`]).
//! - [`preflight`]: the chat completions check (`preflight = "reject" | "truncate"`).
//! - [`bench`]: `switchyard bench-tokens`.

pub mod bench;
pub mod budget;
pub mod chat;
pub mod fit;
pub mod preflight;

pub use budget::{Preflight, TokenBudget, TokenBudgets};
pub use chat::{
    IMAGE_TOKENS, IMAGE_TOKENS_LOW, REPLY_PRIMING, TOKENS_PER_MESSAGE, TOKENS_PER_NAME,
    TOKENS_PER_TOOL_CALL, count_message, count_messages, count_tools,
};
pub use fit::fit_newest;

use serde::Deserialize;

/// Which tokenizer counts an alias's text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    /// GPT-4o, GPT-4.1, GPT-4.5, GPT-5 and the o-series reasoning models.
    O200kBase,
    /// GPT-4 and GPT-3.5.
    Cl100kBase,
    /// Families whose tokenizer is not public (Claude, DeepSeek, local models): a cheap
    /// estimate, see [`approx`].
    Approx,
}

impl TokenizerKind {
    /// The name used in config.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenizerKind::O200kBase => "o200k_base",
            TokenizerKind::Cl100kBase => "cl100k_base",
            TokenizerKind::Approx => "approx",
        }
    }
}

/// The longest piece of text handed to the tokenizer in one call. Pre-tokenisation and
/// BPE are linear in `bpe-openai` (1 MiB of one character: 7.5 ms whole or in pieces), so
/// this is not what keeps a pathological string cheap here; it bounds the work and memory
/// of any one call whatever the tokenizer underneath. That matters for others: tiktoken-rs
/// fails outright on a 1 MiB run of spaces (its regex runs out of backtracking stack) and
/// counts in 64 KiB pieces without trouble (docs/BENCHMARKS.md, "Tokenizer"). At 64 KiB the
/// cut points cost nothing measurable.
pub const MAX_PIECE_BYTES: usize = 64 * 1024;

/// The tokens `text` makes with `kind`.
///
/// Exact for `o200k_base` and `cl100k_base` (special-token text such as `<|endoftext|>`
/// counts as ordinary text, as a chat API treats user content), with one proviso: text
/// longer than [`MAX_PIECE_BYTES`] is counted in pieces. A piece is cut at a lone space
/// between two non-space characters, where the tokenizer's pre-tokenisation starts a new
/// piece anyway, so the count stays exact for prose, code and JSON. Only a 32 KiB stretch
/// with no such space (one character repeated, base64, a minified blob) is cut at a plain
/// character boundary; that cut can split what would have been one token, adding about
/// one token per 64 KiB.
pub fn count(kind: TokenizerKind, text: &str) -> u64 {
    match kind {
        TokenizerKind::O200kBase => exact(bpe_openai::o200k_base(), text),
        TokenizerKind::Cl100kBase => exact(bpe_openai::cl100k_base(), text),
        TokenizerKind::Approx => approx(text),
    }
}

/// Builds `kind`'s encoder now (it is built on first use otherwise: a few tens of
/// milliseconds to load the compiled-in vocabulary), so no request waits for it.
pub fn warm_up(kind: TokenizerKind) {
    let _ = count(kind, "warm");
}

/// The [`TokenizerKind::Approx`] estimate: 0.3 tokens per ASCII byte, rounded up, plus
/// one per non-ASCII character. One pass over the bytes, no tables.
///
/// Why these figures: 0.3 tokens per English character is the rule of thumb DeepSeek
/// publishes for its tokenizer, and Anthropic's "about 3.5 characters per token" for
/// Claude's is the same; bytes/4 would undercount even `o200k_base`. A CJK character is
/// 3 UTF-8 bytes and 0.6 to 1.5 tokens, an emoji 4 bytes and one to three: one token each
/// keeps those near the mark instead of at a third of it. On the test corpus (prose,
/// code, JSON, CJK, emoji, other scripts) the estimate lands within 1 % of o200k's count
/// and 10 % under cl100k's; it halves digits and base64 and doubles long runs of one
/// character, so a budget counted with it should not be cut to the last token.
pub fn approx(text: &str) -> u64 {
    let bytes = text.as_bytes();
    let ascii = bytes.iter().filter(|b| b.is_ascii()).count() as u64;
    // A non-ASCII character is one lead byte (0b11xx_xxxx) and continuation bytes.
    let non_ascii_chars = bytes.iter().filter(|&&b| b >= 0xC0).count() as u64;
    (ascii * 3).div_ceil(10) + non_ascii_chars
}

fn exact(tokenizer: &bpe_openai::Tokenizer, text: &str) -> u64 {
    pieces(text)
        .map(|piece| tokenizer.count(piece) as u64)
        .sum()
}

/// `text` in pieces of at most [`MAX_PIECE_BYTES`], cut where the count stays exact when
/// there is such a place (see [`count`]).
pub fn pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (piece, tail) = rest.split_at(cut_point(rest));
        rest = tail;
        Some(piece)
    })
}

/// Where the first piece of `text` ends.
fn cut_point(text: &str) -> usize {
    if text.len() <= MAX_PIECE_BYTES {
        return text.len();
    }
    // The latest lone space in the second half of the window: a space whose neighbours
    // are not whitespace always starts a pre-tokenisation piece (` word`, ` 42`, ` {`),
    // and nothing before it reaches across it.
    let from = MAX_PIECE_BYTES / 2;
    let window = &text.as_bytes()[from..MAX_PIECE_BYTES];
    for offset in memchr::memrchr_iter(b' ', window) {
        let at = from + offset;
        let before = text[..at].chars().next_back();
        let after = text[at + 1..].chars().next();
        if before.is_some_and(|c| !c.is_whitespace()) && after.is_some_and(|c| !c.is_whitespace()) {
            return at;
        }
    }
    let mut at = MAX_PIECE_BYTES;
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests;
