//! The built-in `web_search` tool: a query to the configured search API (SearXNG's JSON
//! API, Brave Search or Tavily), answered as a short JSON list of results (`title`, `url`,
//! `snippet`) for the model. The backend is the operator's, so its URL is not subject to
//! the address guard (a SearXNG instance on the private network is the usual setup).

use serde_json::{Map, Value, json};

use crate::config::{SearchBackend, WebSearchConfig};

/// The tool's name, as models see it.
pub const NAME: &str = "web_search";

/// Characters of a result's snippet the model reads.
const SNIPPET_CHARS: usize = 400;

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
        let timeout = self.config.timeout;
        let results = tokio::time::timeout(timeout, self.search(client, query))
            .await
            .unwrap_or_else(|_| Err(format!("timed out after {timeout:?}")))?;
        Ok(serde_json::to_string(&results).unwrap_or_default())
    }

    async fn search(
        &self,
        client: &reqwest::Client,
        query: &str,
    ) -> Result<Vec<SearchResult>, String> {
        let base = self.config.base_url().trim_end_matches('/');
        let n = self.config.max_results;
        let key = self.config.api_key.as_ref().map(|k| k.expose().to_owned());
        let q = super::http::encode_argument(query);
        let request = match self.config.backend {
            SearchBackend::Searxng => client.get(format!("{base}/search?q={q}&format=json")),
            SearchBackend::Brave => client
                .get(format!("{base}/res/v1/web/search?q={q}&count={n}"))
                .header("X-Subscription-Token", key.unwrap_or_default()),
            SearchBackend::Tavily => client
                .post(format!("{base}/search"))
                .bearer_auth(key.unwrap_or_default())
                .json(&json!({"query": query, "max_results": n})),
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
        Ok(read_results(self.config.backend, &body, n))
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
}
