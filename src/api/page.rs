//! Cursor pages, as OpenAI's list endpoints take and answer them: `after` (an id),
//! `limit` (1–100, default 20), `order` (`asc` or `desc`, default `desc`); answered as
//! `{object: "list", data, first_id, last_id, has_more}`.

use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::error::GatewayError;
use crate::store::conversations::{ItemRow, Order, Page};

/// A query string as its pairs, in order (a key may repeat, as `include[]` does).
pub type QueryPairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// The pairs of a query string, or a 400 naming what could not be read.
///
/// # Errors
/// 400 for a query string that is not form-encoded pairs.
pub fn pairs(query: QueryPairs) -> Result<Vec<(String, String)>, GatewayError> {
    query
        .map(|Query(pairs)| pairs)
        .map_err(|r| GatewayError::invalid(r.body_text(), None))
}

/// A list request's paging, checked.
#[derive(Debug, Clone)]
pub struct PageQuery {
    pub after: Option<String>,
    pub limit: u32,
    pub order: Order,
}

impl PageQuery {
    /// Reads `after`, `limit` and `order` from query pairs; other pairs (`include[]`) are
    /// accepted and ignored.
    ///
    /// # Errors
    /// 400 for a limit out of range or an unknown order.
    pub fn parse(pairs: &[(String, String)]) -> Result<PageQuery, GatewayError> {
        let mut page = PageQuery {
            after: None,
            limit: 20,
            order: Order::Desc,
        };
        for (key, value) in pairs {
            match key.as_str() {
                "after" if !value.is_empty() => page.after = Some(value.clone()),
                "limit" => {
                    page.limit = value
                        .parse::<u32>()
                        .ok()
                        .filter(|n| (1..=100).contains(n))
                        .ok_or_else(|| {
                            GatewayError::invalid(
                                format!(
                                    "Invalid 'limit': '{value}'. Limit can range between 1 and \
                                     100."
                                ),
                                Some("limit"),
                            )
                        })?;
                }
                "order" => {
                    page.order = match value.as_str() {
                        "asc" => Order::Asc,
                        "desc" => Order::Desc,
                        other => {
                            return Err(GatewayError::invalid(
                                format!(
                                    "Invalid 'order': '{other}'. Supported values are: 'asc' \
                                     and 'desc'."
                                ),
                                Some("order"),
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(page)
    }

    pub fn as_page(&self) -> Page<'_> {
        Page {
            after: self.after.as_deref(),
            limit: self.limit,
            order: self.order,
        }
    }
}

/// A page of objects in OpenAI's list shape; `id` reads each object's id.
pub fn list(data: Vec<Value>, has_more: bool) -> Response {
    let id = |v: Option<&Value>| {
        v.and_then(|v| v.get("id"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let first_id = id(data.first());
    let last_id = id(data.last());
    axum::Json(serde_json::json!({
        "object": "list",
        "data": data,
        "first_id": first_id,
        "last_id": last_id,
        "has_more": has_more,
    }))
    .into_response()
}

/// A page of stored items: their JSON as stored.
pub fn item_list(rows: Vec<ItemRow>, has_more: bool) -> Response {
    let data = rows
        .into_iter()
        .map(|row| serde_json::from_str(&row.body).unwrap_or(Value::Null))
        .collect();
    list(data, has_more)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Result<PageQuery, GatewayError> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        PageQuery::parse(&pairs)
    }

    #[test]
    fn defaults_and_limits_are_openais() {
        let page = q(&[("include[]", "x")]).unwrap();
        assert_eq!(
            (page.limit, page.order, page.after),
            (20, Order::Desc, None)
        );
        assert_eq!(q(&[("limit", "100"), ("order", "asc")]).unwrap().limit, 100);
        for bad in [
            ("limit", "0"),
            ("limit", "101"),
            ("limit", "x"),
            ("order", "up"),
        ] {
            assert!(q(&[bad]).is_err(), "{bad:?}");
        }
    }
}
