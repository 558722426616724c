//! The built-in `fetch_url` tool: a model reads a web page. Every URL, and every hop of a
//! redirect, is checked by [`super::address`] before anything is sent; the client never
//! uses a proxy from the environment, follows no redirect by itself, and connects only
//! to addresses its resolver has checked. The body is size- and time-bounded, and HTML is
//! reduced to its readable text (readability's algorithm, `dom_smoothie`).

use std::sync::Arc;

use serde_json::{Map, Value};

use super::address::{self, AddressPolicy, check_url};
use crate::config::FetchUrlConfig;

/// The tool's name, as models and apps call it.
pub const NAME: &str = "fetch_url";

pub struct FetchTool {
    pub config: FetchUrlConfig,
    policy: Arc<AddressPolicy>,
    client: reqwest::Client,
}

impl FetchTool {
    /// # Errors
    /// An allow or deny entry that is not an address range, or a client that cannot be
    /// built.
    pub fn new(config: &FetchUrlConfig) -> Result<FetchTool, String> {
        let (policy, resolver) = address::guarded(&config.allow, &config.deny, &config.resolve)
            .map_err(|e| format!("fetch_url: {e}"))?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(resolver)
            .connect_timeout(config.timeout)
            .user_agent(concat!(
                "Switchyard/",
                env!("CARGO_PKG_VERSION"),
                " (fetch_url)"
            ))
            .build()
            .map_err(|e| format!("fetch_url client: {e}"))?;
        Ok(FetchTool {
            config: config.clone(),
            policy,
            client,
        })
    }

    pub fn description() -> &'static str {
        "Fetch a public web page by URL and return its readable text."
    }

    pub fn parameters() -> Value {
        serde_json::json!({
            "type": "object",
            "properties": {"url": {"type": "string", "description": "An http or https URL."}},
            "required": ["url"],
        })
    }

    /// # Errors
    /// When `url` is missing or not a string.
    pub fn check(arguments: &Map<String, Value>) -> Result<(), String> {
        match arguments.get("url") {
            Some(Value::String(url)) if !url.is_empty() => Ok(()),
            Some(_) => Err("'url' must be a non-empty string.".into()),
            None => Err("Missing required argument 'url'.".into()),
        }
    }

    /// The page's readable text.
    ///
    /// # Errors
    /// Why the page could not be read: a refused address, a timeout, a non-2xx answer, too
    /// many redirects, a body that is not text.
    pub async fn call(&self, arguments: &Map<String, Value>) -> Result<String, String> {
        let url = arguments
            .get("url")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let timeout = self.config.timeout;
        tokio::time::timeout(timeout, self.fetch(url))
            .await
            .unwrap_or_else(|_| Err(format!("timed out after {timeout:?}")))
    }

    async fn fetch(&self, url: &str) -> Result<String, String> {
        let mut url = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
        let mut hops = 0;
        let response = loop {
            check_url(&self.policy, &url).map_err(|why| format!("refused: {why}"))?;
            let response = self
                .client
                .get(url.clone())
                .header(
                    reqwest::header::ACCEPT,
                    "text/html, text/plain;q=0.9, */*;q=0.5",
                )
                .send()
                .await
                .map_err(|e| format!("could not fetch: {}", reason(&e)))?;
            if !response.status().is_redirection() {
                break response;
            }
            hops += 1;
            if hops > self.config.max_redirects {
                return Err(format!("more than {} redirects", self.config.max_redirects));
            }
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or("a redirect without a Location")?;
            url = url
                .join(location)
                .map_err(|_| format!("a redirect to an unusable location {location:?}"))?;
        };
        let status = response.status();
        if !status.is_success() {
            return Err(format!("the page answered HTTP {}", status.as_u16()));
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let is_html = content_type.contains("html");
        let is_text = is_html
            || content_type.is_empty()
            || content_type.starts_with("text/")
            || content_type.contains("json")
            || content_type.contains("xml");
        if !is_text {
            return Err(format!("not a text page ({content_type})"));
        }
        let body = read_capped(response, self.config.max_bytes).await?;
        let text = String::from_utf8_lossy(&body).into_owned();
        let readable = if is_html {
            let page_url = url.to_string();
            tokio::task::spawn_blocking(move || readable_text(&text, &page_url))
                .await
                .map_err(|_| "the page could not be read".to_owned())?
        } else {
            text
        };
        Ok(super::http::cut(&readable, self.config.max_output_bytes))
    }
}

/// The body, stopping at `max` bytes (what is past it is not read).
async fn read_capped(mut response: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("the page was cut off: {}", reason(&e)))?
    {
        let room = max.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if room <= chunk.len() {
            break;
        }
    }
    Ok(body)
}

/// The readable text of an HTML page: its title and main content, or, when no article is
/// found, all of its text.
pub fn readable_text(html: &str, url: &str) -> String {
    let config = dom_smoothie::Config {
        max_elements_to_parse: 20_000,
        text_mode: dom_smoothie::TextMode::Formatted,
        ..dom_smoothie::Config::default()
    };
    match dom_smoothie::Readability::new(html, Some(url), Some(config)).and_then(|mut r| r.parse())
    {
        Ok(article) => {
            let text = article.text_content.trim();
            if article.title.is_empty() {
                text.to_owned()
            } else {
                format!("{}\n\n{}", article.title.trim(), text)
            }
        }
        Err(_) => dom_smoothie_fallback(html),
    }
}

/// Every text node of the page, for pages readability finds no article in.
fn dom_smoothie_fallback(html: &str) -> String {
    let document = dom_query::Document::from(html);
    document.select("script, style, noscript").remove();
    document
        .select("body")
        .text()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn reason(e: &reqwest::Error) -> String {
    // The resolver's refusal is the innermost source: say that, not "error sending request".
    let mut source: Option<&dyn std::error::Error> = Some(e);
    let mut innermost = e.to_string();
    while let Some(s) = source {
        innermost = s.to_string();
        source = s.source();
    }
    if e.is_timeout() {
        "timed out".to_owned()
    } else {
        innermost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_becomes_its_readable_text() {
        let html = r#"<html><head><title>Lentil soup</title><script>var x = 1;</script></head>
            <body><nav>Home | About</nav><article><h1>Lentil soup</h1>
            <p>Lentil soup is a soup based on lentils; it may be vegetarian or include meat.</p>
            <p>Lentils are rich in protein and fibre, and cook in about twenty minutes.</p>
            </article><footer>(c) 2026</footer></body></html>"#;
        let text = readable_text(html, "https://example.com/soup");
        assert!(
            text.contains("Lentil soup is a soup based on lentils"),
            "{text}"
        );
        assert!(text.contains("twenty minutes"), "{text}");
        assert!(!text.contains("var x"), "{text}");
        assert!(!text.contains('<'), "{text}");
    }
}
