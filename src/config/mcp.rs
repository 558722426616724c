//! `[mcp_servers.LABEL]`: MCP servers the operator runs tools from (a child process on
//! stdio, or a streamable-HTTP endpoint), and `[mcp]`: what a request's own
//! `{"type": "mcp", "server_url": …}` may reach. See [`crate::tools::mcp`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Secret};

/// One configured MCP server: `command` (stdio) or `url` (streamable HTTP).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpServerConfig {
    /// The program to start (stdio transport); looked up on `PATH`.
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    /// Added to the child's environment; values may name secrets with `${VAR}`.
    #[serde(default)]
    pub env: BTreeMap<String, Secret>,
    /// The endpoint (streamable-HTTP transport).
    #[serde(default)]
    pub url: Option<String>,
    /// Sent with every HTTP request; values may name secrets with `${VAR}`.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// Only these of the server's tools are offered (all when absent).
    #[serde(default)]
    pub allowed_tools: Option<Vec<String>>,
    /// Whether a call waits for the client's `mcp_approval_response` first: `never` (the
    /// operator's own server is trusted) or `always`.
    #[serde(default)]
    pub require_approval: ApprovalMode,
    /// The longest one call may take, waiting for a slot included.
    #[serde(default = "default_call_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// The longest starting (or restarting) and listing the tools may take.
    #[serde(default = "default_startup_timeout", with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Calls in flight at once on this server; more wait (within `timeout`).
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
}

/// `require_approval` as one policy for every tool.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalMode {
    #[default]
    Never,
    Always,
}

fn default_call_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_startup_timeout() -> Duration {
    Duration::from_secs(15)
}

fn default_max_concurrent() -> usize {
    16
}

/// The label `server_label` items carry for the operator's HTTP tools.
const RESERVED_LABEL: &str = "switchyard";

impl McpServerConfig {
    pub(super) fn validate(&self, label: &str) -> Result<(), ConfigError> {
        let at = format!("mcp_servers.{label}");
        let valid_label = !label.is_empty()
            && label.len() <= 32
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid_label || label == RESERVED_LABEL || label.contains("__") {
            return Err(ConfigError::Invalid(format!(
                "{at}: a label is 1-32 letters, digits, '_' or '-' (no \"__\"), and not \
                 {RESERVED_LABEL:?}"
            )));
        }
        match (&self.command, &self.url) {
            (Some(command), None) if !command.trim().is_empty() => {}
            (None, Some(url)) if url.starts_with("http://") || url.starts_with("https://") => {
                if reqwest::Url::parse(url).is_err() {
                    return Err(ConfigError::Invalid(format!(
                        "{at}.url: {url:?} is not a URL"
                    )));
                }
            }
            (None, Some(url)) => {
                return Err(ConfigError::Invalid(format!(
                    "{at}.url: {url:?} is not an http(s) URL"
                )));
            }
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "{at}: set exactly one of command (stdio) and url (streamable HTTP)"
                )));
            }
        }
        if self.timeout.is_zero() || self.startup_timeout.is_zero() || self.max_concurrent == 0 {
            return Err(ConfigError::Invalid(format!(
                "{at}: timeout, startup_timeout and max_concurrent must be above zero"
            )));
        }
        Ok(())
    }
}

/// `[mcp]`: the servers a request names itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McpConfig {
    /// Whether a request's `mcp` tool may carry its own `server_url` (it is always
    /// address-checked like `fetch_url`).
    pub request_servers: bool,
    /// Address ranges opened despite being private, CIDR (an intranet's servers).
    pub allow: Vec<String>,
    /// Address ranges refused on top of the built-in rules, CIDR.
    pub deny: Vec<String>,
    /// Fixed addresses for names (like curl's `--resolve`), checked like any other.
    pub resolve: BTreeMap<String, String>,
    /// The longest one call to a request's server may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Sessions with request-named servers kept open for reuse.
    pub max_sessions: u64,
    /// A session unused this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            request_servers: true,
            allow: Vec::new(),
            deny: Vec::new(),
            resolve: BTreeMap::new(),
            timeout: Duration::from_secs(30),
            max_sessions: 256,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

impl McpConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        super::tools::check_address_rules("mcp", &self.allow, &self.deny, &self.resolve)?;
        if self.timeout.is_zero() || self.max_sessions == 0 || self.idle_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "mcp: timeout, max_sessions and idle_timeout must be above zero".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(text: &str) -> Result<(), String> {
        let config: McpServerConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate("files").map_err(|e| e.to_string())
    }

    #[test]
    fn a_server_is_a_command_or_a_url() {
        assert!(server("command = \"npx\"\nargs = [\"-y\", \"server\"]").is_ok());
        assert!(server("url = \"https://mcp.example/mcp\"").is_ok());
        assert!(server("").unwrap_err().contains("exactly one"));
        assert!(
            server("command = \"a\"\nurl = \"https://x/\"")
                .unwrap_err()
                .contains("exactly one")
        );
        assert!(
            server("url = \"ftp://x/\"")
                .unwrap_err()
                .contains("http(s)")
        );
        assert!(
            server("command = \"a\"\ntimeout = \"0s\"")
                .unwrap_err()
                .contains("above zero")
        );
        let ok: McpServerConfig = toml::from_str("command = \"a\"").unwrap();
        assert!(ok.validate("switchyard").is_err());
        assert!(ok.validate("a__b").is_err());
        assert!(ok.validate("has space").is_err());
        assert_eq!(ok.require_approval, ApprovalMode::Never);
    }

    #[test]
    fn the_request_policy_checks_its_ranges() {
        let config: McpConfig = toml::from_str("allow = [\"10.0.0.0/8\"]").unwrap();
        assert!(config.validate().is_ok());
        let config: McpConfig = toml::from_str("deny = [\"nope\"]").unwrap();
        assert!(config.validate().is_err());
    }
}
