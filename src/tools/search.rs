//! The built-in `web_search` tool: a query to the configured search API (SearXNG's JSON
//! API, Brave Search or Tavily), answered as a short JSON list of results (`title`, `url`,
//! `snippet`) for the model. The backend is the operator's, so its URL is not subject to
//! the address guard (a SearXNG instance on the private network is the usual setup).

use serde_json::{Map, Value, json};

use crate::config::{SearchBackend, WebSearchConfig};

/// The tool's name, as models see it.
pub const NAME: &str = "web_search";

/// Characters of a result's snippet the model reads (at `search_context_size` medium).
const SNIPPET_CHARS: usize = 400;

/// The most results asked of a backend for one search.
const MAX_RESULTS: usize = 20;

pub struct SearchTool {
    pub config: WebSearchConfig,
}

/// One result, as the model reads it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SearchResult {
    pub title: String,
    pub url: String,
    pub snippet: String,
}

/// What a request's `{"type": "web_search"}` tool asks of its searches (OpenAI's
/// `filters.allowed_domains`, `search_context_size` and `user_location`). They travel in
/// the call's arguments, so they are part of its cache key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SearchOptions {
    /// Only results on these domains (or their subdomains).
    pub allowed_domains: Vec<String>,
    /// `low`, `medium` or `high`: how many results, and how much of each, the model reads.
    pub context_size: Option<String>,
    /// ISO 3166 country code of the user (`user_location.country`).
    pub country: Option<String>,
}

impl SearchOptions {
    /// Reads the options of a request's search tool.
    ///
    /// # Errors
    /// What is wrong with them, for a 400.
    pub fn from_tool(tool: &Value) -> Result<SearchOptions, String> {
        let mut options = SearchOptions::default();
        match tool.pointer("/filters/allowed_domains") {
            None | Some(Value::Null) => {}
            Some(Value::Array(domains)) => {
                for domain in domains {
                    let domain = domain
                        .as_str()
                        .map(normal_domain)
                        .filter(|d| !d.is_empty() && !d.contains('/'))
                        .ok_or("'filters.allowed_domains' must be a list of domain names")?;
                    options.allowed_domains.push(domain);
                }
            }
            Some(_) => {
                return Err("'filters.allowed_domains' must be a list of domain names".into());
            }
        }
        match tool.get("search_context_size") {
            None | Some(Value::Null) => {}
            Some(Value::String(size)) if matches!(size.as_str(), "low" | "medium" | "high") => {
                options.context_size = Some(size.clone());
            }
            Some(_) => {
                return Err("'search_context_size' must be one of low, medium, high".into());
            }
        }
        match tool.pointer("/user_location/country") {
            None | Some(Value::Null) => {}
            Some(Value::String(country))
                if country.len() == 2 && country.bytes().all(|b| b.is_ascii_alphabetic()) =>
            {
                options.country = Some(country.to_ascii_uppercase());
            }
            Some(_) => {
                return Err("'user_location.country' must be a two-letter ISO country code".into());
            }
        }
        Ok(options)
    }

    /// The model's `arguments` (a JSON object text) with these options added.
    pub fn apply(&self, arguments: &str) -> String {
        if *self == SearchOptions::default() {
            return arguments.to_owned();
        }
        let mut map: Map<String, Value> = serde_json::from_str(arguments).unwrap_or_default();
        if !self.allowed_domains.is_empty() {
            map.insert("allowed_domains".into(), json!(self.allowed_domains));
        }
        if let Some(size) = &self.context_size {
            map.insert("search_context_size".into(), json!(size));
        }
        if let Some(country) = &self.country {
            map.insert("country".into(), json!(country));
        }
        Value::Object(map).to_string()
    }

    fn from_arguments(arguments: &Map<String, Value>) -> SearchOptions {
        SearchOptions {
            allowed_domains: arguments
                .get("allowed_domains")
                .and_then(Value::as_array)
                .map(|d| {
                    d.iter()
                        .filter_map(Value::as_str)
                        .map(normal_domain)
                        .collect()
                })
                .unwrap_or_default(),
            context_size: arguments
                .get("search_context_size")
                .and_then(Value::as_str)
                .map(str::to_owned),
            country: arguments
                .get("country")
                .and_then(Value::as_str)
                .map(str::to_owned),
        }
    }

    /// Results and snippet characters the model reads.
    fn budget(&self, max_results: usize) -> (usize, usize) {
        match self.context_size.as_deref() {
            Some("low") => (max_results.min(3), SNIPPET_CHARS / 2),
            Some("high") => ((max_results * 2).min(MAX_RESULTS), SNIPPET_CHARS * 2),
            _ => (max_results, SNIPPET_CHARS),
        }
    }

    /// Whether `url` is on an allowed domain (any, when none are given).
    fn allows(&self, url: &str) -> bool {
        if self.allowed_domains.is_empty() {
            return true;
        }
        let Some(host) = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
        else {
            return false;
        };
        self.allowed_domains
            .iter()
            .any(|d| host == *d || host.ends_with(&format!(".{d}")))
    }
}

/// `https://www.Example.com/` → `www.example.com`.
fn normal_domain(domain: &str) -> String {
    let domain = domain.trim().to_ascii_lowercase();
    let domain = domain
        .strip_prefix("https://")
        .or_else(|| domain.strip_prefix("http://"))
        .unwrap_or(&domain);
    domain
        .trim_end_matches('/')
        .trim_end_matches('.')
        .to_owned()
}

impl SearchTool {
    pub fn description() -> &'static str {
        "Search the web. Returns the top results (title, url, snippet) for a query."
    }

    pub fn parameters() -> Value {
        json!({
            "type": "object",
            "properties": {"query": {"type": "string", "description": "What to search for."}},
            "required": ["query"],
        })
    }

    /// # Errors
    /// When `query` is missing or empty.
    pub fn check(arguments: &Map<String, Value>) -> Result<(), String> {
        match arguments.get("query") {
            Some(Value::String(q)) if !q.trim().is_empty() => Ok(()),
            Some(_) => Err("'query' must be a non-empty string.".into()),
            None => Err("Missing required argument 'query'.".into()),
        }
    }

    /// The results for `arguments.query`, as the JSON text the model reads.
    ///
    /// # Errors
    /// A timeout, a failed or non-2xx call, or an answer not in the backend's shape.
    pub async fn call(
        &self,
        client: &reqwest::Client,
        arguments: &Map<String, Value>,
    ) -> Result<String, String> {
        let query = arguments
            .get("query")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let options = SearchOptions::from_arguments(arguments);
        let timeout = self.config.timeout;
        let results = tokio::time::timeout(timeout, self.search(client, query, &options))
            .await
            .unwrap_or_else(|_| Err(format!("timed out after {timeout:?}")))?;
        Ok(serde_json::to_string(&results).unwrap_or_default())
    }

    async fn search(
        &self,
        client: &reqwest::Client,
        query: &str,
        options: &SearchOptions,
    ) -> Result<Vec<SearchResult>, String> {
        let base = self.config.base_url().trim_end_matches('/');
        let (keep, snippet_chars) = options.budget(self.config.max_results);
        // Filtered by domain here: ask for more, so that enough are left.
        let n = if options.allowed_domains.is_empty() {
            keep
        } else {
            (keep * 3).min(MAX_RESULTS)
        };
        let country = options
            .country
            .as_deref()
            .map(|c| format!("&country={c}"))
            .unwrap_or_default();
        let key = self.config.api_key.as_ref().map(|k| k.expose().to_owned());
        let q = super::http::encode_argument(query);
        let request = match self.config.backend {
            SearchBackend::Searxng => client.get(format!("{base}/search?q={q}&format=json")),
            SearchBackend::Brave => client
                .get(format!("{base}/res/v1/web/search?q={q}&count={n}{country}"))
                .header("X-Subscription-Token", key.unwrap_or_default()),
            SearchBackend::Tavily => client
                .post(format!("{base}/search"))
                .bearer_auth(key.unwrap_or_default())
                .json(&json!({"query": query, "max_results": n,
                              "include_domains": options.allowed_domains})),
        };
        let response = request
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    "the search service could not be reached".to_owned()
                } else {
                    "the search request failed".to_owned()
                }
            })?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!(
                "the search service answered HTTP {}",
                status.as_u16()
            ));
        }
        let body: Value = response
            .json()
            .await
            .map_err(|_| "the search service's answer is not JSON".to_owned())?;
        let mut results = read_results(self.config.backend, &body, MAX_RESULTS);
        results.retain(|r| options.allows(&r.url));
        results.truncate(keep);
        for result in &mut results {
            if let Some((cut, _)) = result.snippet.char_indices().nth(snippet_chars) {
                result.snippet.truncate(cut);
            }
        }
        Ok(results)
    }
}

/// The results in a backend's answer: SearXNG and Tavily list `results` with `content`,
/// Brave lists `web.results` with `description`.
pub fn read_results(backend: SearchBackend, body: &Value, max: usize) -> Vec<SearchResult> {
    let (list, snippet_field) = match backend {
        SearchBackend::Searxng | SearchBackend::Tavily => (body.get("results"), "content"),
        SearchBackend::Brave => (body.pointer("/web/results"), "description"),
    };
    list.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let url = r.get("url").and_then(Value::as_str)?;
            Some(SearchResult {
                title: r
                    .get("title")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                url: url.to_owned(),
                snippet: r
                    .get(snippet_field)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .chars()
                    .take(SNIPPET_CHARS)
                    .collect(),
            })
        })
        .take(max)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_backends_answer_is_read() {
        let searxng = json!({"query": "q", "results": [
            {"url": "https://a.example/", "title": "A", "content": "about a"},
            {"title": "no url"},
            {"url": "https://b.example/", "title": "B", "content": "about b"},
        ]});
        let brave = json!({"web": {"results": [
            {"url": "https://c.example/", "title": "C", "description": "about c"},
        ]}});
        let tavily = json!({"results": [
            {"url": "https://d.example/", "title": "D", "content": "about d", "score": 0.9},
        ]});
        let urls =
            |results: Vec<SearchResult>| results.into_iter().map(|r| r.url).collect::<Vec<_>>();
        assert_eq!(
            urls(read_results(SearchBackend::Searxng, &searxng, 5)),
            ["https://a.example/", "https://b.example/"]
        );
        assert_eq!(read_results(SearchBackend::Searxng, &searxng, 1).len(), 1);
        let c = &read_results(SearchBackend::Brave, &brave, 5)[0];
        assert_eq!((c.title.as_str(), c.snippet.as_str()), ("C", "about c"));
        assert_eq!(
            urls(read_results(SearchBackend::Tavily, &tavily, 5)),
            ["https://d.example/"]
        );
        assert!(read_results(SearchBackend::Brave, &searxng, 5).is_empty());
    }

    #[test]
    fn a_requests_search_options_are_read_applied_and_checked() {
        let options = SearchOptions::from_tool(&json!({
            "type": "web_search",
            "filters": {"allowed_domains": ["https://News.example/", "wiki.example"]},
            "search_context_size": "low",
            "user_location": {"type": "approximate", "country": "gb", "city": "London"},
        }))
        .unwrap();
        assert_eq!(options.allowed_domains, ["news.example", "wiki.example"]);
        assert_eq!(options.country.as_deref(), Some("GB"));
        assert_eq!(options.budget(5), (3, 200));
        assert!(options.allows("https://news.example/a"));
        assert!(options.allows("https://en.wiki.example/b"));
        assert!(!options.allows("https://blog.example/c"));
        assert!(!options.allows("https://notnews.example/c"));
        let applied = options.apply(r#"{"query":"q"}"#);
        let read = SearchOptions::from_arguments(&serde_json::from_str(&applied).unwrap());
        assert_eq!(read, options);
        assert_eq!(SearchOptions::default().apply("{}"), "{}");
        for bad in [
            json!({"filters": {"allowed_domains": "a.example"}}),
            json!({"filters": {"allowed_domains": ["a.example/path"]}}),
            json!({"search_context_size": "huge"}),
            json!({"user_location": {"country": "Britain"}}),
        ] {
            assert!(SearchOptions::from_tool(&bad).is_err(), "{bad}");
        }
    }
}
