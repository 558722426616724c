//! Long-term memory in a turn: the memories relevant to the newest user message go into
//! the context (a system message after the instructions, in a slot of `[memory]
//! slot_tokens` taken from the history's share), and once the turn is stored its new
//! messages are handed to extraction.
//!
//! Memory is on for an alias with `memory = true`, or for one request with the header
//! `x-switchyard-memory: on`; `x-switchyard-memory: off` turns it off whatever the alias
//! says. It needs a subject: the request's `user` (or `safety_identifier`), else the
//! conversation's `user` metadata. Without one the turn runs without memory, and the
//! response's metadata says so (`"memory": "no_subject"`).

use std::sync::Arc;

use axum::http::HeaderMap;

use super::Conversations;
use crate::auth::Principal;
use crate::error::GatewayError;
use crate::memory::{MAX_SUBJECT_CHARS, Subject};
use crate::tokens::TokenizerKind;
use crate::wire::responses::{Item, MessageRole, Part};

/// The request header that turns memory on or off for one request.
pub const HEADER: &str = "x-switchyard-memory";

/// What the request asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MemorySwitch {
    /// The alias decides.
    #[default]
    Alias,
    On,
    Off,
}

impl MemorySwitch {
    /// As stored with a background response's job.
    pub fn as_str(self) -> &'static str {
        match self {
            MemorySwitch::Alias => "",
            MemorySwitch::On => "on",
            MemorySwitch::Off => "off",
        }
    }

    /// Reads [`MemorySwitch::as_str`]'s spelling (anything else: the alias decides).
    pub fn parse(s: &str) -> MemorySwitch {
        match s {
            "on" => MemorySwitch::On,
            "off" => MemorySwitch::Off,
            _ => MemorySwitch::Alias,
        }
    }

    /// Reads the header.
    ///
    /// # Errors
    /// 400 for a value other than `on` or `off`.
    pub fn from_headers(headers: &HeaderMap) -> Result<MemorySwitch, GatewayError> {
        match headers.get(HEADER).map(|v| v.to_str().map(str::trim)) {
            None => Ok(MemorySwitch::Alias),
            Some(Ok(v)) if v.eq_ignore_ascii_case("on") => Ok(MemorySwitch::On),
            Some(Ok(v)) if v.eq_ignore_ascii_case("off") => Ok(MemorySwitch::Off),
            Some(_) => Err(GatewayError::invalid(
                format!("Invalid value for the '{HEADER}' header: use 'on' or 'off'."),
                None,
            )),
        }
    }
}

/// What memory brought to a turn.
#[derive(Debug, Default)]
pub struct Recalled {
    /// Whose memories: the turn's messages are extracted for it once stored.
    pub subject: Option<Subject>,
    /// The system message's text, when any memory was found.
    pub text: Option<String>,
    /// Its tokens, taken from the history's share of the window.
    pub tokens: u64,
    /// Memory was on but the request named no subject.
    pub no_subject: bool,
}

/// Opens the memory slot's message.
const SLOT_HEADING: &str = "Things you remember about this user from earlier conversations \
(use them when they are relevant; do not mention this list):";

impl Conversations {
    /// Whether memory is on for a turn of `alias`.
    pub(super) fn memory_on(&self, alias: &str, switch: MemorySwitch) -> bool {
        match switch {
            MemorySwitch::Off => false,
            MemorySwitch::On => true,
            MemorySwitch::Alias => self.memory.is_on_for(alias),
        }
    }

    /// The memories for a turn whose new input is `input`, within the slot.
    ///
    /// # Errors
    /// 503 when a subject's memories must be read and the store cannot answer.
    pub(super) async fn recall(
        &self,
        principal: Option<&Arc<Principal>>,
        user: Option<&str>,
        conversation: Option<&str>,
        input: &[(Item, i64)],
        tokenizer: TokenizerKind,
    ) -> Result<Recalled, GatewayError> {
        let owner = principal.map(|p| &*p.key_id);
        let user = match user {
            Some(user) => Some(user.to_owned()),
            None => match conversation {
                Some(id) => self
                    .store
                    .conversation(owner, id)
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, "conversation store");
                        GatewayError::DependencyUnavailable("The conversation store")
                    })?
                    .and_then(|c| c.user_id),
                None => None,
            },
        };
        let Some(user) = user.filter(|u| !u.is_empty() && u.chars().count() <= MAX_SUBJECT_CHARS)
        else {
            return Ok(Recalled {
                no_subject: true,
                ..Recalled::default()
            });
        };
        let subject = Subject::new(owner, &user);
        let query = input
            .iter()
            .rev()
            .find_map(|(item, _)| user_text(item))
            .unwrap_or_default();
        let config = self.memory.config();
        let found = if query.is_empty() {
            Vec::new()
        } else {
            self.memory
                .recall(&subject, &query, config.max_recalled, principal)
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "memory store");
                    GatewayError::DependencyUnavailable("The memory store")
                })?
        };
        let slot = u64::from(config.slot_tokens);
        let mut text = String::from(SLOT_HEADING);
        let mut tokens = crate::tokens::count(tokenizer, &text);
        let mut kept = 0usize;
        for memory in &found {
            let line = format!("\n- {}", memory.memory);
            let cost = crate::tokens::count(tokenizer, &line);
            if tokens + cost > slot {
                continue;
            }
            tokens += cost;
            text.push_str(&line);
            kept += 1;
        }
        metrics::histogram!("switchyard_memory_recalled").record(kept as f64);
        Ok(Recalled {
            subject: Some(subject),
            text: (kept > 0).then_some(text),
            tokens: if kept > 0 { tokens } else { 0 },
            no_subject: false,
        })
    }

    /// Hands a stored turn's messages to extraction (never waits: a full hand-off queue
    /// drops them, counted).
    pub(super) fn observe(&self, turn: &super::Turn) {
        let Some(subject) = &turn.memory_subject else {
            return;
        };
        let mut messages: Vec<(String, String)> = turn
            .input
            .iter()
            .filter_map(|(item, _)| user_text(item).map(|t| ("user".to_owned(), t)))
            .collect();
        if messages.is_empty() {
            return;
        }
        messages.extend(turn.response.output.iter().filter_map(|item| match item {
            Item::Message(m) if m.role == MessageRole::Assistant => {
                let text = part_text(&m.content);
                (!text.is_empty()).then(|| ("assistant".to_owned(), text))
            }
            _ => None,
        }));
        self.memory.observe(crate::memory::Observed {
            subject: subject.clone(),
            conversation: turn.response.conversation.as_ref().map(|c| c.id.clone()),
            messages,
            alias: turn.response.model.clone(),
        });
    }
}

/// The text of a user message item.
fn user_text(item: &Item) -> Option<String> {
    match item {
        Item::Message(m) if m.role == MessageRole::User => {
            let text = part_text(&m.content);
            (!text.is_empty()).then_some(text)
        }
        _ => None,
    }
}

fn part_text(parts: &[Part]) -> String {
    parts
        .iter()
        .filter_map(|p| match p {
            Part::InputText { text } | Part::OutputText { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}
