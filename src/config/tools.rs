//! `[tools.NAME]`: HTTP APIs the operator declares as tools (a stock quote, a food search).
//! Each is offered to models as a function and can be invoked directly through
//! `POST /v1/tools/{name}/invoke`; see [`crate::tools`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Secret};

/// One HTTP tool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolConfig {
    /// What the tool does, for the model.
    pub description: String,
    /// The JSON schema of its arguments (an object schema).
    #[serde(default = "empty_object_schema")]
    pub parameters: serde_json::Value,
    #[serde(default)]
    pub method: ToolMethod,
    /// The URL; `{arg}` is replaced by that argument, percent-encoded.
    pub url: String,
    /// Sent with every call; values may name secrets with `${VAR}`.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// A JSON body template (for POST and PUT): a string that is exactly `"{arg}"` becomes
    /// the argument's JSON value, `{arg}` inside a longer string is replaced by its text.
    #[serde(default)]
    pub body: Option<serde_json::Value>,
    /// The longest a call may take, waiting for a concurrency slot included.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Calls of this tool in flight at once; more wait (within `timeout`).
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// How long an answer is reused for the same arguments; 0 keeps none (identical calls
    /// in flight at the same moment still share one).
    #[serde(default, with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// A JSON pointer (RFC 6901) into the answer: only that part goes back.
    #[serde(default)]
    pub pointer: Option<String>,
    /// What goes back is cut to this many bytes (the model pays for every one).
    #[serde(default = "default_max_output_bytes")]
    pub max_output_bytes: usize,
    /// OAuth2 client credentials (FatSecret's API works this way): a token is fetched
    /// once, cached until it expires, and sent as `Authorization: Bearer`.
    #[serde(default)]
    pub oauth2: Option<OAuth2Config>,
    /// For APIs that take many ids at once: calls arriving within `window` are sent as
    /// one, each caller getting its own element of the answer.
    #[serde(default)]
    pub batch: Option<BatchConfig>,
}

/// A tool's batching window.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// The argument gathered from the calls (one value each): in the URL its values are
    /// joined by `separator`, each percent-encoded; a body string that is exactly
    /// `"{argument}"` becomes the list of values.
    pub argument: String,
    /// How long the first call of a batch waits for others.
    #[serde(default = "default_batch_window", with = "humantime_serde")]
    pub window: Duration,
    /// The most values one call carries; a full batch goes at once.
    #[serde(default = "default_batch_max")]
    pub max: usize,
    #[serde(default = "default_batch_separator")]
    pub separator: String,
    /// A JSON pointer, within each element of the answer's list (found with `pointer`
    /// when set), to the value the element answers.
    #[serde(default = "default_batch_key")]
    pub key: String,
}

fn default_batch_window() -> Duration {
    Duration::from_millis(10)
}

fn default_batch_max() -> usize {
    50
}

fn default_batch_separator() -> String {
    ",".to_owned()
}

fn default_batch_key() -> String {
    "/id".to_owned()
}

/// OAuth2's client-credentials grant (RFC 6749, 4.4).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    #[serde(default)]
    pub scope: Option<String>,
}

/// The HTTP method of a tool.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum ToolMethod {
    #[default]
    Get,
    Post,
    Put,
    Delete,
}

/// `[fetch_url]`: the built-in tool a model reads web pages with. Present: the tool exists
/// (an alias offers it with `tools = ["fetch_url"]`); absent: it does not.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchUrlConfig {
    /// The longest a fetch may take, redirects included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The most of a page read; the rest is not downloaded.
    #[serde(deserialize_with = "super::traffic::de_bytes_usize")]
    pub max_bytes: usize,
    /// What goes back to the model is cut to this many bytes.
    pub max_output_bytes: usize,
    pub max_redirects: u32,
    /// Address ranges opened despite being private (an intranet deployment), CIDR.
    pub allow: Vec<String>,
    /// Address ranges refused on top of the built-in rules, CIDR.
    pub deny: Vec<String>,
    /// Fixed addresses for names (like curl's `--resolve`), checked like any other.
    pub resolve: BTreeMap<String, String>,
    /// How long a page is reused for the same URL; 0 keeps none.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
}

impl Default for FetchUrlConfig {
    fn default() -> Self {
        FetchUrlConfig {
            timeout: Duration::from_secs(10),
            max_bytes: 2 << 20,
            max_output_bytes: 32 * 1024,
            max_redirects: 5,
            allow: Vec::new(),
            deny: Vec::new(),
            resolve: BTreeMap::new(),
            cache_ttl: Duration::ZERO,
        }
    }
}

impl FetchUrlConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.timeout.is_zero() || self.max_bytes == 0 || self.max_output_bytes == 0 {
            return Err(ConfigError::Invalid(
                "fetch_url: timeout, max_bytes and max_output_bytes must be above zero".into(),
            ));
        }
        check_address_rules("fetch_url", &self.allow, &self.deny, &self.resolve)?;
        Ok(())
    }
}

/// Checks `allow` and `deny` (address ranges) and `resolve` (name to address) of
/// `section`, the rules for URLs a model or a request chose.
pub(super) fn check_address_rules(
    section: &str,
    allow: &[String],
    deny: &[String],
    resolve: &BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    for range in allow.iter().chain(deny) {
        let ok = range.parse::<ipnet::IpNet>().is_ok() || range.parse::<std::net::IpAddr>().is_ok();
        if !ok {
            return Err(ConfigError::Invalid(format!(
                "{section}: {range:?} is not an address range (CIDR)"
            )));
        }
    }
    for (name, ip) in resolve {
        if ip.parse::<std::net::IpAddr>().is_err() {
            return Err(ConfigError::Invalid(format!(
                "{section}.resolve.{name}: {ip:?} is not an address"
            )));
        }
    }
    Ok(())
}

/// `[tool_loop]`: bounds on the server's tool calls, across every tool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ToolLoopConfig {
    /// Model calls one turn may make while the model keeps calling server tools; the
    /// last one's calls are not run (the turn ends `incomplete`, `max_tool_calls`).
    pub max_steps: usize,
    /// Tool calls (HTTP, built-in and MCP) in flight at once, across all tools and
    /// turns; more wait, within their tool's timeout.
    pub max_concurrent: usize,
}

impl Default for ToolLoopConfig {
    fn default() -> Self {
        ToolLoopConfig {
            max_steps: 8,
            max_concurrent: 256,
        }
    }
}

impl ToolLoopConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=64).contains(&self.max_steps) || self.max_concurrent == 0 {
            return Err(ConfigError::Invalid(
                "tool_loop: max_steps must be 1-64 and max_concurrent above zero".into(),
            ));
        }
        Ok(())
    }
}

/// `[web_search]`: the built-in `web_search` tool (OpenAI's `{"type": "web_search"}`) and
/// the search API behind it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSearchConfig {
    pub backend: SearchBackend,
    /// The API's base URL: required for SearXNG (its instance), defaults for the others.
    #[serde(default)]
    pub url: Option<String>,
    /// Brave's subscription token or Tavily's key, usually `${VAR}`.
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// Results given to the model per search.
    #[serde(default = "default_max_results")]
    pub max_results: usize,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How long the results of a query are reused.
    #[serde(default = "default_search_ttl", with = "humantime_serde")]
    pub cache_ttl: Duration,
}

/// Which search API `web_search` calls.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SearchBackend {
    /// A SearXNG instance's JSON API (`format=json` must be enabled in its `settings.yml`).
    Searxng,
    /// Brave Search API (`X-Subscription-Token`).
    Brave,
    /// Tavily's search API.
    Tavily,
}

fn default_max_results() -> usize {
    5
}

fn default_search_ttl() -> Duration {
    Duration::from_secs(300)
}

impl WebSearchConfig {
    /// The base URL searches go to.
    pub fn base_url(&self) -> &str {
        match (&self.url, self.backend) {
            (Some(url), _) => url,
            (None, SearchBackend::Brave) => "https://api.search.brave.com",
            (None, SearchBackend::Tavily) => "https://api.tavily.com",
            (None, SearchBackend::Searxng) => "",
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.backend == SearchBackend::Searxng && self.url.is_none() {
            return Err(ConfigError::Invalid(
                "web_search: backend = \"searxng\" needs url (the instance)".into(),
            ));
        }
        if self.backend != SearchBackend::Searxng && self.api_key.is_none() {
            return Err(ConfigError::Invalid(
                "web_search: this backend needs api_key".into(),
            ));
        }
        if let Some(url) = &self.url
            && !matches!(
                reqwest::Url::parse(url)
                    .map(|u| u.scheme().to_owned())
                    .as_deref(),
                Ok("http" | "https")
            )
        {
            return Err(ConfigError::Invalid(format!(
                "web_search.url must be an http(s) URL, got {url:?}"
            )));
        }
        if self.max_results == 0 || self.timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "web_search: max_results and timeout must be above zero".into(),
            ));
        }
        Ok(())
    }
}

fn empty_object_schema() -> serde_json::Value {
    serde_json::json!({"type": "object", "properties": {}})
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_max_concurrent() -> usize {
    16
}

fn default_max_output_bytes() -> usize {
    16 * 1024
}

/// The names of the `{placeholders}` in a template string, in order.
pub fn placeholders(template: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else { break };
        let name = &after[..close];
        if !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            names.push(name);
        }
        rest = &after[close + 1..];
    }
    names
}

impl ToolConfig {
    pub(super) fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let at = format!("tools.{name}");
        // OpenAI's rule for function names, which the model sees.
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ConfigError::Invalid(format!(
                "{at}: a tool name is 1-64 letters, digits, '_' or '-'"
            )));
        }
        if self.description.trim().is_empty() {
            return Err(ConfigError::Invalid(format!("{at}.description is empty")));
        }
        let properties = match self.parameters.get("properties") {
            Some(serde_json::Value::Object(p)) => p,
            None => &serde_json::Map::new(),
            Some(_) => {
                return Err(ConfigError::Invalid(format!(
                    "{at}.parameters.properties must be a table"
                )));
            }
        };
        if self.parameters.get("type").and_then(|t| t.as_str()) != Some("object") {
            return Err(ConfigError::Invalid(format!(
                "{at}.parameters must be an object schema (type = \"object\")"
            )));
        }
        let mut used: Vec<&str> = placeholders(&self.url);
        if let Some(body) = &self.body {
            collect_placeholders(body, &mut used);
        }
        for placeholder in used {
            if !properties.contains_key(placeholder) {
                return Err(ConfigError::Invalid(format!(
                    "{at}: {{{placeholder}}} is not one of parameters.properties"
                )));
            }
        }
        let sample = placeholders(&self.url)
            .into_iter()
            .fold(self.url.clone(), |url, p| {
                url.replace(&format!("{{{p}}}"), "x")
            });
        match reqwest::Url::parse(&sample) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => {}
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "{at}.url must be an http(s) URL, got {:?}",
                    self.url
                )));
            }
        }
        if self.body.is_some() && matches!(self.method, ToolMethod::Get | ToolMethod::Delete) {
            return Err(ConfigError::Invalid(format!(
                "{at}.body needs method = \"POST\" or \"PUT\""
            )));
        }
        if let Some(batch) = &self.batch {
            if !properties.contains_key(&batch.argument) {
                return Err(ConfigError::Invalid(format!(
                    "{at}.batch.argument: {:?} is not one of parameters.properties",
                    batch.argument
                )));
            }
            if batch.max < 2 || batch.window.is_zero() || !batch.key.starts_with('/') {
                return Err(ConfigError::Invalid(format!(
                    "{at}.batch: max must be at least 2, window above zero, and key a JSON \
                     pointer (\"/id\")"
                )));
            }
        }
        if self.timeout.is_zero() || self.max_concurrent == 0 || self.max_output_bytes == 0 {
            return Err(ConfigError::Invalid(format!(
                "{at}: timeout, max_concurrent and max_output_bytes must be above zero"
            )));
        }
        if let Some(pointer) = &self.pointer
            && !(pointer.is_empty() || pointer.starts_with('/'))
        {
            return Err(ConfigError::Invalid(format!(
                "{at}.pointer must be a JSON pointer (\"/data/0\"), got {pointer:?}"
            )));
        }
        if let Some(oauth) = &self.oauth2
            && !matches!(
                reqwest::Url::parse(&oauth.token_url)
                    .map(|u| u.scheme().to_owned())
                    .as_deref(),
                Ok("http" | "https")
            )
        {
            return Err(ConfigError::Invalid(format!(
                "{at}.oauth2.token_url must be an http(s) URL"
            )));
        }
        for header in self.headers.keys() {
            if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                return Err(ConfigError::Invalid(format!(
                    "{at}.headers: {header:?} is not a header name"
                )));
            }
        }
        Ok(())
    }
}

fn collect_placeholders<'a>(value: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match value {
        serde_json::Value::String(s) => out.extend(placeholders(s)),
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_placeholders(v, out)),
        serde_json::Value::Object(map) => map.values().for_each(|v| collect_placeholders(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(extra: &str) -> Result<ToolConfig, ConfigError> {
        let text = format!(
            "description = \"Quote\"\nurl = \"https://api.example.com/q?s={{ticker}}\"\n\
             parameters = {{ type = \"object\", properties = {{ ticker = {{ type = \"string\" }} }} }}\n{extra}"
        );
        let tool: ToolConfig =
            toml::from_str(&text).map_err(|e| ConfigError::Toml(e.to_string()))?;
        tool.validate("quote")?;
        Ok(tool)
    }

    #[test]
    fn a_tool_reads_with_defaults() {
        let t = tool("").unwrap();
        assert_eq!(t.method, ToolMethod::Get);
        assert_eq!(t.timeout, Duration::from_secs(10));
        assert_eq!(t.max_concurrent, 16);
        assert!(t.cache_ttl.is_zero());
        let t = tool("method = \"POST\"\nbody = { symbol = \"{ticker}\" }\ncache_ttl = \"30s\"")
            .unwrap();
        assert_eq!(t.cache_ttl, Duration::from_secs(30));
    }

    #[test]
    fn mistakes_are_named() {
        let err = |extra: &str| tool(extra).unwrap_err().to_string();
        assert!(err("body = { s = \"{ticker}\" }").contains("needs method"));
        assert!(err("method = \"POST\"\nbody = { s = \"{other}\" }").contains("{other}"));
        assert!(err("max_concurrent = 0").contains("above zero"));
        assert!(err("pointer = \"data\"").contains("JSON pointer"));
        assert!(
            err("method = \"PATCH\"").contains("PATCH")
                || err("method = \"PATCH\"").contains("variant")
        );
        let bad_url: ToolConfig = toml::from_str(
            "description = \"d\"\nurl = \"ftp://x/{a}\"\nparameters = { type = \"object\", properties = { a = {} } }",
        )
        .unwrap();
        assert!(
            bad_url
                .validate("t")
                .unwrap_err()
                .to_string()
                .contains("http(s)")
        );
        assert!(
            tool("")
                .unwrap()
                .validate("bad name")
                .unwrap_err()
                .to_string()
                .contains("1-64")
        );
    }

    #[test]
    fn placeholders_are_found_in_order() {
        assert_eq!(
            placeholders("/a/{x}?q={y_1}&r={}&s={not valid}"),
            ["x", "y_1"]
        );
    }
}
