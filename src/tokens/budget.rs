//! Per-alias token budgets: the context window, the room kept for the answer, the
//! tokenizer, and what chat completions does with a prompt that does not fit.
//!
//! An alias's budget is its `[models."ALIAS"]` settings over the defaults of its upstream
//! model's family ([`TokenBudget::defaults_for`]). [`TokenBudgets`] holds them all, built
//! once at start-up, for callers that assemble context (the Responses API);
//! [`TokenBudget::for_alias`] builds one from its config, which is what config
//! validation and the chat pre-flight use.

use std::collections::HashMap;

use serde::Deserialize;

use super::TokenizerKind;
use crate::config::{ModelConfig, Settings};

/// What `/v1/chat/completions` does, before any upstream call, with a prompt that does
/// not fit `context_window − max output`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preflight {
    /// Nothing: the request is forwarded as sent and the upstream judges it (the
    /// default, so pass-through stays pass-through and costs no counting).
    #[default]
    Off,
    /// Answer 400 `context_length_exceeded` in OpenAI's shape.
    Reject,
    /// Drop the oldest messages (system and developer messages stay; a tool call leaves
    /// with its outputs) until the rest fits, and say how many in
    /// `x-switchyard-truncated`.
    Truncate,
}

/// An alias's token budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBudget {
    /// Input and output together, in tokens; `None` when neither the config nor the
    /// model's name tells (nothing is then checked or cut).
    pub context_window: Option<u64>,
    /// Kept free for the answer when a request does not say how long it may be.
    pub max_output_tokens: u64,
    pub tokenizer: TokenizerKind,
    pub preflight: Preflight,
}

/// The answer room assumed for a model this module does not know: enough for a long
/// answer, small next to any current context window.
const UNKNOWN_MAX_OUTPUT: u64 = 4_096;

/// Known model families, by the start of the upstream model name, most specific first:
/// `(prefix, tokenizer, context window, answer room)`. Windows and output limits are
/// OpenAI's, Anthropic's and DeepSeek's published figures; where a model may write into
/// its whole window, the room is a documented share of it instead.
const FAMILIES: &[(&str, TokenizerKind, u64, u64)] = {
    use TokenizerKind::{Approx, Cl100kBase, O200kBase};
    &[
        // GPT-5 in ChatGPT has the GPT-4o window.
        ("gpt-5-chat", O200kBase, 128_000, 16_384),
        // 400k: 272k in, up to 128k out.
        ("gpt-5", O200kBase, 400_000, 128_000),
        ("gpt-4.1", O200kBase, 1_047_576, 32_768),
        ("gpt-4.5", O200kBase, 128_000, 16_384),
        ("gpt-4o", O200kBase, 128_000, 16_384),
        ("chatgpt-4o", O200kBase, 128_000, 16_384),
        ("o1-mini", O200kBase, 128_000, 65_536),
        ("o1-preview", O200kBase, 128_000, 32_768),
        ("o1", O200kBase, 200_000, 100_000),
        ("o3", O200kBase, 200_000, 100_000),
        ("o4", O200kBase, 200_000, 100_000),
        ("gpt-4-32k", Cl100kBase, 32_768, 4_096),
        ("gpt-4-turbo", Cl100kBase, 128_000, 4_096),
        ("gpt-4-1106", Cl100kBase, 128_000, 4_096),
        ("gpt-4-0125", Cl100kBase, 128_000, 4_096),
        ("gpt-4-vision", Cl100kBase, 128_000, 4_096),
        // The original 8k GPT-4 writes into whatever the prompt leaves; a quarter of the
        // window is kept for it.
        ("gpt-4", Cl100kBase, 8_192, 2_048),
        ("gpt-3.5", Cl100kBase, 16_385, 4_096),
        ("gpt-35", Cl100kBase, 16_385, 4_096),
        // deepseek-reasoner (V3.1 thinking) writes 32k by default, up to 64k.
        ("deepseek-reasoner", Approx, 128_000, 32_768),
        ("deepseek-r1", Approx, 128_000, 32_768),
        // deepseek-chat (V3.1): 128k window, up to 8k out.
        ("deepseek", Approx, 128_000, 8_192),
        // Every current Claude model has a 200k window; 8k of room covers the 4k the
        // Anthropic provider asks for when a client sets no max_tokens.
        ("claude", Approx, 200_000, 8_192),
    ]
};

impl TokenBudget {
    /// The budget of a model by its name: a known family's tokenizer, window and answer
    /// room, or for anything else the estimate tokenizer and no window.
    ///
    /// The name is read the way gateways and clouds spell it: a `provider/` prefix
    /// (`openai/gpt-4o`), a fine-tune's `ft:` prefix and a cloud's region prefix
    /// (`us.anthropic.claude-…`) are looked through, and case is ignored.
    pub fn defaults_for(model_name: &str) -> TokenBudget {
        let name = model_name.to_ascii_lowercase();
        let name = name.rsplit('/').next().unwrap_or(&name);
        let name = name.strip_prefix("ft:").unwrap_or(name);
        let name = name.rsplit("anthropic.").next().unwrap_or(name);
        let family = FAMILIES
            .iter()
            .find(|(prefix, ..)| name.starts_with(prefix));
        match family {
            Some(&(_, tokenizer, window, room)) => TokenBudget {
                context_window: Some(window),
                max_output_tokens: room,
                tokenizer,
                preflight: Preflight::Off,
            },
            None => TokenBudget {
                context_window: None,
                max_output_tokens: UNKNOWN_MAX_OUTPUT,
                tokenizer: TokenizerKind::Approx,
                preflight: Preflight::Off,
            },
        }
    }

    /// The budget of `alias`: its own settings over the defaults of its upstream models.
    ///
    /// Defaults come from the upstream model names of its deployments (the answer room:
    /// at most a quarter of a `context_window` set in config); when they differ
    /// (an alias over `gpt-4o-mini` and `deepseek-chat`), the one with the smallest known
    /// input limit, so a prompt that fits fits every deployment. When no upstream name is
    /// known, the alias's own name is tried.
    pub fn for_alias(alias: &str, config: &ModelConfig) -> TokenBudget {
        let base = config
            .deployments(alias)
            .iter()
            .map(|(_, model, _)| TokenBudget::defaults_for(model))
            .filter(|budget| budget.context_window.is_some())
            .min_by_key(|budget| budget.input_limit())
            .unwrap_or_else(|| TokenBudget::defaults_for(alias));
        // A window set in config (a local model's, or a cap below the model's own) gets
        // at most a quarter of it as default room, so `context_window = 4096` alone
        // works for a model this module does not know.
        let room = match config.context_window {
            Some(window) => base.max_output_tokens.min(window / 4),
            None => base.max_output_tokens,
        };
        TokenBudget {
            context_window: config.context_window.or(base.context_window),
            max_output_tokens: config.max_output_tokens.unwrap_or(room),
            tokenizer: config.tokenizer.unwrap_or(base.tokenizer),
            preflight: config.preflight,
        }
    }

    /// The most tokens a prompt may have, `context_window − max_output_tokens` (0 when
    /// the room is the whole window); `None` without a window.
    pub fn input_limit(&self) -> Option<u64> {
        self.context_window
            .map(|window| window.saturating_sub(self.max_output_tokens))
    }
}

/// Every alias's budget, built once at start-up.
#[derive(Debug, Clone)]
pub struct TokenBudgets {
    by_alias: HashMap<String, TokenBudget>,
    /// For a name that is no configured alias: the defaults of an unknown model.
    unknown: TokenBudget,
}

impl TokenBudgets {
    /// The budgets of every configured alias (see [`TokenBudget::for_alias`]). The
    /// encoders of the tokenizers that aliases with a pre-flight use are built here, so
    /// no request waits for them.
    pub fn from_settings(settings: &Settings) -> TokenBudgets {
        let by_alias: HashMap<String, TokenBudget> = settings
            .models
            .iter()
            .map(|(alias, config)| (alias.clone(), TokenBudget::for_alias(alias, config)))
            .collect();
        for budget in by_alias.values() {
            if budget.preflight != Preflight::Off {
                super::warm_up(budget.tokenizer);
            }
        }
        TokenBudgets {
            by_alias,
            unknown: TokenBudget::defaults_for(""),
        }
    }

    /// Every tokenizer a request may count with: the aliases' and `o200k_base` (items
    /// added to a conversation directly are counted with it), for warming up at start.
    pub fn kinds(&self) -> Vec<super::TokenizerKind> {
        let mut kinds = vec![super::TokenizerKind::O200kBase];
        for budget in self.by_alias.values() {
            if !kinds.contains(&budget.tokenizer) {
                kinds.push(budget.tokenizer);
            }
        }
        kinds
    }

    /// The budget of `alias`; an unknown name gets the defaults of an unknown model.
    pub fn get(&self, alias: &str) -> &TokenBudget {
        self.by_alias.get(alias).unwrap_or(&self.unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn known_families_get_their_tokenizer_and_window() {
        let cases = [
            (
                "gpt-4o-mini",
                TokenizerKind::O200kBase,
                Some(128_000),
                16_384,
            ),
            (
                "gpt-4o-2024-08-06",
                TokenizerKind::O200kBase,
                Some(128_000),
                16_384,
            ),
            (
                "gpt-4.1-nano",
                TokenizerKind::O200kBase,
                Some(1_047_576),
                32_768,
            ),
            (
                "gpt-5-mini",
                TokenizerKind::O200kBase,
                Some(400_000),
                128_000,
            ),
            (
                "gpt-5-chat-latest",
                TokenizerKind::O200kBase,
                Some(128_000),
                16_384,
            ),
            ("o1-mini", TokenizerKind::O200kBase, Some(128_000), 65_536),
            ("o3-mini", TokenizerKind::O200kBase, Some(200_000), 100_000),
            ("o4-mini", TokenizerKind::O200kBase, Some(200_000), 100_000),
            ("gpt-4", TokenizerKind::Cl100kBase, Some(8_192), 2_048),
            (
                "gpt-4-turbo",
                TokenizerKind::Cl100kBase,
                Some(128_000),
                4_096,
            ),
            (
                "gpt-4-32k-0613",
                TokenizerKind::Cl100kBase,
                Some(32_768),
                4_096,
            ),
            (
                "gpt-3.5-turbo",
                TokenizerKind::Cl100kBase,
                Some(16_385),
                4_096,
            ),
            (
                "gpt-35-turbo",
                TokenizerKind::Cl100kBase,
                Some(16_385),
                4_096,
            ),
            (
                "claude-sonnet-4-5",
                TokenizerKind::Approx,
                Some(200_000),
                8_192,
            ),
            ("deepseek-chat", TokenizerKind::Approx, Some(128_000), 8_192),
            (
                "deepseek-reasoner",
                TokenizerKind::Approx,
                Some(128_000),
                32_768,
            ),
            (
                "openai/gpt-4o",
                TokenizerKind::O200kBase,
                Some(128_000),
                16_384,
            ),
            (
                "ft:gpt-4o-mini:acme::abc",
                TokenizerKind::O200kBase,
                Some(128_000),
                16_384,
            ),
            (
                "us.anthropic.claude-3-5-sonnet-20241022-v2:0",
                TokenizerKind::Approx,
                Some(200_000),
                8_192,
            ),
            ("GPT-4O", TokenizerKind::O200kBase, Some(128_000), 16_384),
            (
                "llama-3.1-8b",
                TokenizerKind::Approx,
                None,
                UNKNOWN_MAX_OUTPUT,
            ),
            (
                "mock-model",
                TokenizerKind::Approx,
                None,
                UNKNOWN_MAX_OUTPUT,
            ),
        ];
        for (name, tokenizer, window, room) in cases {
            let budget = TokenBudget::defaults_for(name);
            assert_eq!(budget.tokenizer, tokenizer, "{name}");
            assert_eq!(budget.context_window, window, "{name}");
            assert_eq!(budget.max_output_tokens, room, "{name}");
            assert_eq!(budget.preflight, Preflight::Off, "{name}");
        }
    }

    #[test]
    fn input_limit_saturates() {
        let budget = TokenBudget {
            context_window: Some(1_000),
            max_output_tokens: 300,
            tokenizer: TokenizerKind::Approx,
            preflight: Preflight::Off,
        };
        assert_eq!(budget.input_limit(), Some(700));
        let whole = TokenBudget {
            max_output_tokens: 5_000,
            ..budget
        };
        assert_eq!(whole.input_limit(), Some(0));
        let none = TokenBudget {
            context_window: None,
            ..budget
        };
        assert_eq!(none.input_limit(), None);
    }

    #[test]
    fn alias_settings_override_the_model_defaults() {
        let settings = Settings::from_toml(
            r#"
            [providers.p]
            kind = "openai"
            base_url = "http://127.0.0.1:1/v1"
            [models."gpt-4o"]
            provider = "p"
            [models.mini]
            provider = "p"
            model = "gpt-4o-mini"
            max_output_tokens = 1000
            [models.small]
            provider = "p"
            model = "local-llama"
            context_window = 8192
            tokenizer = "cl100k_base"
            preflight = "truncate"
            [models.mixed]
            deployments = [
              { provider = "p", model = "gpt-4.1" },
              { provider = "p", model = "gpt-4o" },
              { provider = "p", model = "my-own-model" },
            ]
            [models.unknown]
            provider = "p"
            model = "mystery"
            "#,
            &env,
        )
        .unwrap();
        let budgets = TokenBudgets::from_settings(&settings);
        // The alias's own name when the upstream name is the alias.
        assert_eq!(budgets.get("gpt-4o").context_window, Some(128_000));
        let mini = budgets.get("mini");
        assert_eq!(mini.tokenizer, TokenizerKind::O200kBase);
        assert_eq!(mini.input_limit(), Some(127_000));
        let small = budgets.get("small");
        assert_eq!(small.tokenizer, TokenizerKind::Cl100kBase);
        assert_eq!(small.context_window, Some(8192));
        assert_eq!(small.max_output_tokens, 2048);
        assert_eq!(small.preflight, Preflight::Truncate);
        // The smallest known window among the deployments; the unknown one is no limit.
        assert_eq!(budgets.get("mixed").context_window, Some(128_000));
        assert_eq!(budgets.get("unknown").context_window, None);
        assert_eq!(budgets.get("not-configured").context_window, None);
        assert_eq!(budgets.get("not-configured").preflight, Preflight::Off);
    }
}
