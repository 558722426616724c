//! Server-side state of the Responses and Conversations APIs: conversations with their
//! metadata pairs, stored responses, and the items of both (tables from migration 0002).
//!
//! An item is one row in `items`, written once with its token count and never rewritten
//! when others are appended; `seq` orders all items. An item belongs to a conversation, a
//! response, or both: deleting one side detaches the item from it, and the item is deleted
//! once it belongs to neither. Every row carries its owner's `key_id` (NULL with auth off),
//! matched as `COALESCE(key_id, '')`; a row of another owner reads exactly as a missing one.
//!
//! Every write that adds items to or removes them from a conversation first updates the
//! conversation's row in its transaction. That row lock serialises those writers on
//! PostgreSQL, so each append's items are contiguous in `seq` (SQLite serialises writers
//! anyway). Context assembly ([`Store::recent_conversation_items`],
//! [`Store::recent_chain_items`]) reads backwards in pages and stops at the token budget, so
//! it costs what it returns, not what the conversation holds.
//!
//! On PostgreSQL page queries run unprepared (`Store::plans_once`), so they are planned
//! with the real values: a cached generic plan, fitted to the typical short conversation,
//! reads a long one's items whole and sorts them instead of walking its index backwards.
//! SQLite has no generic plans, so there they are prepared once and cached.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Pool, Store, StoreError, retrying, timed};

/// Rows read per page when walking a conversation or chain backwards: a typical context
/// in one round trip, while a small budget reads little.
const RECENT_PAGE: i64 = 256;

/// How far `previous_response_id` is followed: bounds the recursive walk (and the ids
/// held in memory) for a pathological chain.
const CHAIN_DEPTH: i64 = 10_000;

/// Responses whose items one statement reads while walking a chain. Fixed, so the SQL is
/// one text built once; a short batch repeats its last id.
const CHAIN_BATCH: usize = 32;

/// Item inserts of up to this many rows are prepared once and cached (SQLite).
const CACHED_INSERT_ROWS: usize = 4;

/// Rows per multi-row `INSERT`: nine binds each stays far below SQLite's 32,766 and
/// PostgreSQL's 65,535 bind limits.
const INSERT_CHUNK: usize = 500;

/// Which owners' rows a listing covers.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// One owner's: a key id, or `None` for rows written with auth off.
    Key(Option<&'a str>),
    /// Everyone's (admin listings).
    Any,
}

/// The direction of a page, by `seq` for items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

/// One page of a list. An `after` id unknown in that list yields an empty page.
#[derive(Debug, Clone, Copy)]
pub struct Page<'a> {
    pub after: Option<&'a str>,
    pub limit: u32,
    pub order: Order,
}

/// An item to insert.
#[derive(Debug, Clone)]
pub struct NewItem {
    pub id: String,
    /// Not read by the store: the method and list an item is passed in decide its kind
    /// (`input` for conversation items, `input`/`output` by list in a response).
    pub kind: &'static str,
    pub item_type: String,
    pub body: String,
    /// Counted by the caller once, at write time.
    pub tokens: i64,
}

/// A stored item.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ItemRow {
    pub seq: i64,
    pub id: String,
    pub kind: String,
    pub item_type: String,
    pub body: String,
    pub tokens: i64,
    pub created_at: i64,
    pub conversation_id: Option<String>,
    pub response_id: Option<String>,
}

/// A stored conversation.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ConversationRow {
    pub id: String,
    pub key_id: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Last activity, unix milliseconds: the order of [`Store::list_conversations`].
    pub updated_ms: i64,
    /// The metadata object as JSON text.
    pub metadata: String,
    pub user_id: Option<String>,
    pub archived_at: Option<i64>,
    pub item_count: i64,
}

/// A stored response.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ResponseRow {
    pub id: String,
    pub key_id: Option<String>,
    pub created_at: i64,
    pub status: String,
    pub model: String,
    pub previous_response_id: Option<String>,
    pub conversation_id: Option<String>,
    /// The full Response JSON.
    pub body: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

/// A response to save with its items (see [`Store::save_response`]).
#[derive(Debug, Clone)]
pub struct NewResponse {
    pub row: ResponseRow,
    pub input: Vec<NewItem>,
    pub output: Vec<NewItem>,
    /// Whether the response itself is stored (`store` in the request).
    pub store: bool,
}

/// Which conversations [`Store::list_conversations`] returns.
#[derive(Debug, Clone, Copy)]
pub struct ConversationFilter<'a> {
    pub user: Option<&'a str>,
    /// One metadata pair the conversation must have.
    pub metadata: Option<(&'a str, &'a str)>,
    pub include_archived: bool,
    /// A conversation id: the page continues strictly after it.
    pub after: Option<&'a str>,
    pub limit: u32,
}

/// The newest items that fit a budget.
#[derive(Debug, Clone, Default)]
pub struct Recent {
    /// Oldest first.
    pub items: Vec<ItemRow>,
    /// The sum of the items' tokens.
    pub tokens: i64,
    /// Whether every item of the conversation or chain is in `items`.
    pub complete: bool,
}

/// Conversation figures across every key, for the dashboard.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ConversationStats {
    pub conversations: i64,
    pub active_last_hour: i64,
    pub archived: i64,
    pub items: i64,
    pub avg_items_per_conversation: f64,
    pub avg_session_seconds: f64,
}

/// The columns of [`ItemRow`].
macro_rules! item_columns {
    () => {
        "seq, id, kind, item_type, body, tokens, created_at, conversation_id, response_id"
    };
}

/// The columns of [`ConversationRow`].
macro_rules! conversation_columns {
    () => {
        "id, key_id, created_at, updated_ms, metadata, user_id, archived_at, item_count"
    };
}

/// The columns of [`ResponseRow`].
macro_rules! response_columns {
    () => {
        "id, key_id, created_at, status, model, previous_response_id, conversation_id, body, \
         input_tokens, output_tokens"
    };
}

/// Inserts a response row (`$row: &ResponseRow`) in transaction `$tx`.
macro_rules! insert_response {
    ($tx:expr, $row:expr) => {
        sqlx::query(concat!(
            "INSERT INTO responses (",
            response_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        ))
        .bind(&$row.id)
        .bind(&$row.key_id)
        .bind($row.created_at)
        .bind(&$row.status)
        .bind(&$row.model)
        .bind(&$row.previous_response_id)
        .bind(&$row.conversation_id)
        .bind(&$row.body)
        .bind($row.input_tokens)
        .bind($row.output_tokens)
        .execute(&mut *$tx)
        .await?
    };
}

/// Sets `updated_ms` to `$n` unless it is already later: activity written by an instance
/// whose clock runs behind never moves a conversation back in the list.
macro_rules! bump_updated {
    ($n:literal) => {
        concat!(
            "updated_ms = CASE WHEN updated_ms > ",
            $n,
            " THEN updated_ms ELSE ",
            $n,
            " END"
        )
    };
}

/// A page of a conversation's items. `$3` is the `after` cursor ('' for none); a cursor
/// that is not an item of this conversation compares with NULL, so the page is empty.
macro_rules! conversation_items_sql {
    ($cmp:literal, $none:literal, $order:literal) => {
        concat!(
            "SELECT ",
            item_columns!(),
            " FROM items WHERE conversation_id = $1 AND COALESCE(key_id, '') = $2 AND seq ",
            $cmp,
            " CASE WHEN $3 = '' THEN ",
            $none,
            " ELSE (SELECT s.seq FROM items s WHERE s.id = $3 AND s.conversation_id = $1) END \
             ORDER BY seq ",
            $order,
            " LIMIT $4"
        )
    };
}

/// A page of a response's input items, with the cursor as in `conversation_items_sql!`.
macro_rules! input_items_sql {
    ($cmp:literal, $none:literal, $order:literal) => {
        concat!(
            "SELECT ",
            item_columns!(),
            " FROM items WHERE response_id = $1 AND COALESCE(key_id, '') = $2 \
             AND kind = 'input' AND seq ",
            $cmp,
            " CASE WHEN $3 = '' THEN ",
            $none,
            " ELSE (SELECT s.seq FROM items s WHERE s.id = $3 AND s.response_id = $1 \
             AND s.kind = 'input') END ORDER BY seq ",
            $order,
            " LIMIT $4"
        )
    };
}

/// Inserts `$items` (pairs of [`NewItem`] and kind) where `$place` says, in chunks of
/// [`INSERT_CHUNK`] rows, inside the transaction `$tx`; evaluates to their rows in input
/// order. A macro, not a function: the body is compiled once per engine by `on_pool!`.
macro_rules! insert_items {
    ($tx:ident, $place:expr, $items:expr, $cache:expr) => {{
        let place: &Placement<'_> = $place;
        let items: &[(&NewItem, &'static str)] = $items;
        let mut rows = Vec::with_capacity(items.len());
        for chunk in items.chunks(INSERT_CHUNK) {
            let mut insert = sqlx::QueryBuilder::new(
                "INSERT INTO items (id, key_id, conversation_id, response_id, kind, item_type, \
                 body, tokens, created_at) ",
            );
            insert.push_values(chunk, |mut row, (item, kind)| {
                row.push_bind(item.id.as_str())
                    .push_bind(place.key_id)
                    .push_bind(place.conversation_id)
                    .push_bind(place.response_id)
                    .push_bind(*kind)
                    .push_bind(item.item_type.as_str())
                    .push_bind(item.body.as_str())
                    .push_bind(item.tokens)
                    .push_bind(place.created_at);
            });
            // RETURNING's row order is unspecified on SQLite: match the seqs up by id.
            insert.push(" RETURNING seq, id");
            // Prepared and cached on SQLite for the common small sizes (a turn writes two
            // or three items); other sizes would each be a statement of their own.
            let seqs: HashMap<String, i64> = insert
                .build_query_as::<(i64, String)>()
                .persistent($cache && chunk.len() <= CACHED_INSERT_ROWS)
                .fetch_all(&mut *$tx)
                .await?
                .into_iter()
                .map(|(seq, id)| (id, seq))
                .collect();
            for (item, kind) in chunk {
                let seq = seqs
                    .get(&item.id)
                    .copied()
                    .ok_or(sqlx::Error::RowNotFound)?;
                rows.push(place.row(seq, item, kind));
            }
        }
        rows
    }};
}

/// Writes a conversation's metadata pairs inside the transaction `$tx`.
macro_rules! insert_pairs {
    ($tx:ident, $conversation_id:expr, $pairs:expr) => {{
        let conversation_id: &str = $conversation_id;
        let pairs: &[(String, String)] = $pairs;
        for chunk in pairs.chunks(INSERT_CHUNK) {
            let mut insert = sqlx::QueryBuilder::new(
                "INSERT INTO conversation_metadata (conversation_id, key, value) ",
            );
            insert.push_values(chunk, |mut row, (key, value)| {
                row.push_bind(conversation_id)
                    .push_bind(key.as_str())
                    .push_bind(value.as_str());
            });
            insert.build().persistent(false).execute(&mut *$tx).await?;
        }
    }};
}

/// Takes the conversation's row lock (by updating its activity and item count) before any
/// of its items are written or deleted; `$1` now, `$2` the change in item count, `$3` the
/// id, `$4` the owner. No row: not the owner's conversation.
const LOCK_CONVERSATION: &str = concat!(
    "UPDATE conversations SET ",
    bump_updated!("$1"),
    ", item_count = item_count + $2 WHERE id = $3 AND COALESCE(key_id, '') = $4"
);

/// PostgreSQL: a whole turn in one statement, so one round trip and its commit: data-
/// modifying `WITH` clauses lock the conversation (the item insert reads from the update,
/// so it runs after the row lock is held: concurrent turns keep a total order), add the
/// response row and the items. Without the owner's conversation nothing is written and no
/// row comes back.
async fn save_in_one_statement(
    pool: &sqlx::PgPool,
    response: &NewResponse,
    place: &Placement<'_>,
    pending: &[(&NewItem, &'static str)],
) -> Result<Vec<ItemRow>, sqlx::Error> {
    let row = &response.row;
    let mut sql = sqlx::QueryBuilder::<sqlx::Postgres>::new("WITH ");
    if let Some(conversation_id) = place.conversation_id {
        sql.push("conv AS (UPDATE conversations SET updated_ms = GREATEST(updated_ms, ")
            .push_bind(now_ms())
            .push("), item_count = item_count + ")
            .push_bind(count(pending.len()))
            .push(" WHERE id = ")
            .push_bind(conversation_id)
            .push(" AND COALESCE(key_id, '') = ")
            .push_bind(owner_key(place.key_id))
            .push(" RETURNING id), ");
    }
    if response.store {
        sql.push(concat!(
            "resp AS (INSERT INTO responses (",
            response_columns!(),
            ") SELECT "
        ));
        let mut values = sql.separated(", ");
        values
            .push_bind(&row.id)
            .push_bind(&row.key_id)
            .push_bind(row.created_at)
            .push_bind(&row.status)
            .push_bind(&row.model)
            .push_bind(&row.previous_response_id)
            .push_bind(&row.conversation_id)
            .push_bind(&row.body)
            .push_bind(row.input_tokens)
            .push_bind(row.output_tokens);
        if place.conversation_id.is_some() {
            sql.push(" FROM conv");
        }
        sql.push(" RETURNING id), ");
    }
    sql.push(
        "ins AS (INSERT INTO items (id, key_id, conversation_id, response_id, kind, item_type, \
         body, tokens, created_at) SELECT v.id, ",
    )
    .push_bind(place.key_id)
    .push(", ")
    .push_bind(place.conversation_id)
    .push(", ")
    .push_bind(place.response_id)
    .push(", v.kind, v.item_type, v.body, v.tokens, ")
    .push_bind(place.created_at)
    .push(" FROM (VALUES ");
    for (ord, (item, kind)) in pending.iter().enumerate() {
        if ord > 0 {
            sql.push(", ");
        }
        sql.push("(")
            .push_bind(count(ord))
            .push(", ")
            .push_bind(item.id.as_str())
            .push(", ")
            .push_bind(*kind)
            .push(", ")
            .push_bind(item.item_type.as_str())
            .push(", ")
            .push_bind(item.body.as_str())
            .push(", ")
            .push_bind(item.tokens)
            .push(")");
    }
    sql.push(") AS v (ord, id, kind, item_type, body, tokens)");
    if place.conversation_id.is_some() {
        sql.push(", conv");
    }
    sql.push(" ORDER BY v.ord RETURNING seq, id) SELECT seq, id FROM ins");
    let seqs: HashMap<String, i64> = sql
        .build_query_as::<(i64, String)>()
        // A turn writes a few items: those statement shapes are prepared once.
        .persistent(pending.len() <= 2 * CACHED_INSERT_ROWS)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(seq, id)| (id, seq))
        .collect();
    if seqs.len() != pending.len() {
        // Only a missing conversation inserts nothing.
        return Err(sqlx::Error::RowNotFound);
    }
    pending
        .iter()
        .map(|(item, kind)| {
            let seq = seqs
                .get(&item.id)
                .copied()
                .ok_or(sqlx::Error::RowNotFound)?;
            Ok(place.row(seq, item, kind))
        })
        .collect()
}

/// Where inserted items go.
struct Placement<'a> {
    key_id: Option<&'a str>,
    conversation_id: Option<&'a str>,
    response_id: Option<&'a str>,
    created_at: i64,
}

impl Placement<'_> {
    fn row(&self, seq: i64, item: &NewItem, kind: &str) -> ItemRow {
        ItemRow {
            seq,
            id: item.id.clone(),
            kind: kind.to_owned(),
            item_type: item.item_type.clone(),
            body: item.body.clone(),
            tokens: item.tokens,
            created_at: self.created_at,
            conversation_id: self.conversation_id.map(str::to_owned),
            response_id: self.response_id.map(str::to_owned),
        }
    }
}

/// Items taken newest first until the next one would pass the token budget or the row cap.
struct Budget {
    token_limit: i64,
    row_limit: usize,
    items: Vec<ItemRow>,
    tokens: i64,
}

impl Budget {
    fn new(token_limit: i64, row_limit: u32) -> Self {
        Budget {
            token_limit,
            row_limit: usize::try_from(row_limit).unwrap_or(usize::MAX),
            items: Vec::new(),
            tokens: 0,
        }
    }

    /// Takes `row` if it fits; false (the row left out) once the budget is spent.
    fn take(&mut self, row: ItemRow) -> bool {
        let tokens = self.tokens.saturating_add(row.tokens);
        if self.items.len() >= self.row_limit || tokens > self.token_limit {
            return false;
        }
        self.tokens = tokens;
        self.items.push(row);
        true
    }

    /// Rows to read next: a page, or one more than may still fit, so that a budget filled
    /// exactly still learns whether anything was left out.
    fn want(&self) -> i64 {
        let left = self.row_limit.saturating_sub(self.items.len());
        i64::try_from(left)
            .unwrap_or(i64::MAX)
            .saturating_add(1)
            .min(RECENT_PAGE)
    }

    fn finish(mut self, complete: bool) -> Recent {
        self.items.reverse();
        Recent {
            items: self.items,
            tokens: self.tokens,
            complete,
        }
    }
}

/// Items of up to [`CHAIN_BATCH`] responses (`$1`…), newest first, below a `seq`.
static CHAIN_ITEMS: LazyLock<String> = LazyLock::new(|| {
    let ids: Vec<String> = (1..=CHAIN_BATCH).map(|n| format!("${n}")).collect();
    format!(
        concat!(
            "SELECT ",
            item_columns!(),
            " FROM items WHERE response_id IN ({}) AND seq < ${} ORDER BY seq DESC LIMIT ${}"
        ),
        ids.join(", "),
        CHAIN_BATCH + 1,
        CHAIN_BATCH + 2
    )
});

fn owner_key(owner: Option<&str>) -> &str {
    owner.unwrap_or("")
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Rows to fetch for a page of `limit`: one more, to learn whether there are more.
fn fetch_limit(limit: u32) -> i64 {
    i64::from(limit) + 1
}

/// Cuts the probe row off a page; true when there was one.
fn split_more<T>(rows: &mut Vec<T>, limit: u32) -> bool {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = rows.len() > limit;
    rows.truncate(limit);
    more
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Store {
    /// `persistent` for page queries and small inserts: prepared once and cached on
    /// SQLite, whose planner has no generic plans and where preparing is most of a short
    /// query's cost; planned per call on PostgreSQL, which would otherwise switch a cached
    /// statement to a generic plan fitted to short conversations (see the module doc).
    fn plans_once(&self) -> bool {
        matches!(self.pool, Pool::Sqlite(_))
    }

    /// Creates a conversation with its metadata pairs and first items (kind `input`,
    /// created at `conv.created_at`) in one transaction; `item_count` is set from `items`.
    ///
    /// # Errors
    /// When the database fails, or an id is already taken.
    pub async fn create_conversation(
        &self,
        conv: &ConversationRow,
        metadata: &[(String, String)],
        items: &[NewItem],
    ) -> Result<Vec<ItemRow>, StoreError> {
        let place = Placement {
            key_id: conv.key_id.as_deref(),
            conversation_id: Some(&conv.id),
            response_id: None,
            created_at: conv.created_at,
        };
        let pending: Vec<(&NewItem, &'static str)> = items.iter().map(|i| (i, "input")).collect();
        timed("create_conversation", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                sqlx::query(
                    "INSERT INTO conversations (id, key_id, created_at, updated_ms, metadata, \
                     user_id, archived_at, item_count) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&conv.id)
                .bind(&conv.key_id)
                .bind(conv.created_at)
                .bind(conv.updated_ms)
                .bind(&conv.metadata)
                .bind(&conv.user_id)
                .bind(conv.archived_at)
                .bind(count(items.len()))
                .execute(&mut *tx)
                .await?;
                insert_pairs!(tx, &conv.id, metadata);
                let rows = insert_items!(tx, &place, &pending, self.plans_once());
                tx.commit().await?;
                Ok::<_, sqlx::Error>(rows)
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// The owner's conversation `id`.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn conversation(
        &self,
        owner: Option<&str>,
        id: &str,
    ) -> Result<Option<ConversationRow>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            conversation_columns!(),
            " FROM conversations WHERE id = $1 AND COALESCE(key_id, '') = $2"
        );
        retrying("conversation", 3, || async {
            on_pool!(&self.pool, |p| sqlx::query_as::<_, ConversationRow>(SQL)
                .bind(id)
                .bind(owner_key(owner))
                .fetch_optional(p)
                .await)
        })
        .await
    }

    /// The owner's conversation's version: its item count and its newest item's `seq`
    /// (0 when empty). Any append raises the second, any removal lowers the first, so two
    /// reads that agree saw the same items: what a cache of its items checks. One indexed
    /// row; `None` when it is not the owner's.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn conversation_version(
        &self,
        owner: Option<&str>,
        id: &str,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        const SQL: &str = "SELECT c.item_count, \
             COALESCE((SELECT MAX(i.seq) FROM items i WHERE i.conversation_id = c.id), 0) \
             FROM conversations c WHERE c.id = $1 AND COALESCE(c.key_id, '') = $2";
        retrying("conversation_version", 3, || async {
            on_pool!(&self.pool, |p| sqlx::query_as::<_, (i64, i64)>(SQL)
                .bind(id)
                .bind(owner_key(owner))
                .fetch_optional(p)
                .await)
        })
        .await
    }

    /// Replaces a conversation's metadata (the JSON text, its `user`, and the pairs lists
    /// filter on) and bumps its activity; `None` when it is not the owner's.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn update_conversation_metadata(
        &self,
        owner: Option<&str>,
        id: &str,
        metadata: &str,
        user_id: Option<&str>,
        pairs: &[(String, String)],
    ) -> Result<Option<ConversationRow>, StoreError> {
        const SQL: &str = concat!(
            "UPDATE conversations SET metadata = $1, user_id = $2, ",
            bump_updated!("$3"),
            " WHERE id = $4 AND COALESCE(key_id, '') = $5 RETURNING ",
            conversation_columns!()
        );
        // The whole rewrite is idempotent, so a transient failure may run it again.
        retrying("update_conversation_metadata", 3, || async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                let Some(row) = sqlx::query_as::<_, ConversationRow>(SQL)
                    .bind(metadata)
                    .bind(user_id)
                    .bind(now_ms())
                    .bind(id)
                    .bind(owner_key(owner))
                    .fetch_optional(&mut *tx)
                    .await?
                else {
                    return Ok(None);
                };
                sqlx::query("DELETE FROM conversation_metadata WHERE conversation_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                insert_pairs!(tx, id, pairs);
                tx.commit().await?;
                Ok(Some(row))
            })
        })
        .await
    }

    /// Archives (`Some(at)`) or restores (`None`) a conversation. Not activity: its place
    /// in the list stays. `None` when it is not the owner's.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn set_conversation_archived(
        &self,
        owner: Option<&str>,
        id: &str,
        archived_at: Option<i64>,
    ) -> Result<Option<ConversationRow>, StoreError> {
        const SQL: &str = concat!(
            "UPDATE conversations SET archived_at = $1 WHERE id = $2 \
             AND COALESCE(key_id, '') = $3 RETURNING ",
            conversation_columns!()
        );
        retrying("set_conversation_archived", 3, || async {
            on_pool!(&self.pool, |p| sqlx::query_as::<_, ConversationRow>(SQL)
                .bind(archived_at)
                .bind(id)
                .bind(owner_key(owner))
                .fetch_optional(p)
                .await)
        })
        .await
    }

    /// Deletes a conversation with its metadata and the items that belong to no response;
    /// items of a response are detached and stay with it. False when it is not the owner's.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn delete_conversation(
        &self,
        owner: Option<&str>,
        id: &str,
    ) -> Result<bool, StoreError> {
        timed("delete_conversation", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                // The row lock first, as appends take it: none lands while items are deleted.
                let found = sqlx::query(
                    "UPDATE conversations SET item_count = 0 \
                     WHERE id = $1 AND COALESCE(key_id, '') = $2",
                )
                .bind(id)
                .bind(owner_key(owner))
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if found == 0 {
                    return Ok(false);
                }
                // Detach what still belongs to a response, then delete what is left. A
                // concurrent delete_response may have detached an item's other side after
                // this statement's snapshot: the re-check skips it here and the DELETE
                // (a fresh snapshot) removes it, so no item is left belonging to nothing.
                sqlx::query(
                    "UPDATE items SET conversation_id = NULL \
                     WHERE conversation_id = $1 AND response_id IS NOT NULL",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM items WHERE conversation_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "UPDATE responses SET conversation_id = NULL WHERE conversation_id = $1",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?;
                sqlx::query("DELETE FROM conversation_metadata WHERE conversation_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM conversations WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(true)
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// A page of conversations, newest activity first (`updated_ms`, then id, descending).
    /// With `after`, the page continues strictly after that conversation; one that is not
    /// in `owner`'s scope gives an empty page. Also returns whether more follow.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn list_conversations(
        &self,
        owner: Scope<'_>,
        filter: &ConversationFilter<'_>,
    ) -> Result<(Vec<ConversationRow>, bool), StoreError> {
        // Only the filters given are in the SQL, so each shape gets its own indexes (owner,
        // user or metadata pair).
        let mut rows: Vec<ConversationRow> = retrying("list_conversations", 3, || async {
            on_pool!(&self.pool, |p| {
                let mut q = sqlx::QueryBuilder::new(concat!(
                    "SELECT ",
                    conversation_columns!(),
                    " FROM conversations WHERE 1 = 1"
                ));
                if let Scope::Key(key) = owner {
                    q.push(" AND COALESCE(key_id, '') = ")
                        .push_bind(owner_key(key));
                }
                if !filter.include_archived {
                    q.push(" AND archived_at IS NULL");
                }
                if let Some(user) = filter.user {
                    q.push(" AND user_id = ").push_bind(user);
                }
                if let Some((key, value)) = filter.metadata {
                    q.push(
                        " AND id IN (SELECT m.conversation_id FROM conversation_metadata m \
                         WHERE m.key = ",
                    )
                    .push_bind(key)
                    .push(" AND m.value = ")
                    .push_bind(value)
                    .push(")");
                }
                if let Some(after) = filter.after {
                    // No such conversation: the comparison is with NULL, the page empty.
                    q.push(
                        " AND (updated_ms, id) < (SELECT a.updated_ms, a.id \
                         FROM conversations a WHERE a.id = ",
                    )
                    .push_bind(after);
                    if let Scope::Key(key) = owner {
                        q.push(" AND COALESCE(a.key_id, '') = ")
                            .push_bind(owner_key(key));
                    }
                    q.push(")");
                }
                q.push(" ORDER BY updated_ms DESC, id DESC LIMIT ")
                    .push_bind(fetch_limit(filter.limit));
                q.build_query_as::<ConversationRow>()
                    .persistent(self.plans_once())
                    .fetch_all(p)
                    .await
            })
        })
        .await?;
        let more = split_more(&mut rows, filter.limit);
        Ok((rows, more))
    }

    /// Appends items (kind `input`) to the owner's conversation in one transaction and
    /// bumps its activity; `None` when it is not the owner's. The conversation's row is
    /// updated first: on PostgreSQL its lock makes concurrent appends wait for each other,
    /// so each append's items are contiguous in `seq`.
    ///
    /// # Errors
    /// When the database fails, or an item id is already taken.
    pub async fn append_items(
        &self,
        owner: Option<&str>,
        conversation_id: &str,
        items: &[NewItem],
    ) -> Result<Option<Vec<ItemRow>>, StoreError> {
        let now = now_ms();
        let place = Placement {
            key_id: owner,
            conversation_id: Some(conversation_id),
            response_id: None,
            created_at: now / 1000,
        };
        let pending: Vec<(&NewItem, &'static str)> = items.iter().map(|i| (i, "input")).collect();
        timed("append_items", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                let found = sqlx::query(LOCK_CONVERSATION)
                    .bind(now)
                    .bind(count(items.len()))
                    .bind(conversation_id)
                    .bind(owner_key(owner))
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if found == 0 {
                    return Ok(None);
                }
                let rows = insert_items!(tx, &place, &pending, self.plans_once());
                tx.commit().await?;
                Ok::<_, sqlx::Error>(Some(rows))
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// One page of items (`limit + 1` rows, to tell whether more follow) by one of the page
    /// statements: `$1` the parent's id, `$2` the owner, `$3` the cursor, `$4` the count.
    async fn item_page(
        &self,
        op: &'static str,
        sql: &'static str,
        parent: &str,
        owner: Option<&str>,
        page: &Page<'_>,
    ) -> Result<Vec<ItemRow>, StoreError> {
        retrying(op, 3, || async {
            on_pool!(&self.pool, |p| sqlx::query_as::<_, ItemRow>(sql)
                .bind(parent)
                .bind(owner_key(owner))
                .bind(page.after.unwrap_or(""))
                .bind(fetch_limit(page.limit))
                .persistent(self.plans_once())
                .fetch_all(p)
                .await)
        })
        .await
    }

    /// A page of a conversation's items by `seq` in `page.order`, and whether more follow;
    /// `None` when the conversation is not the owner's.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn conversation_items(
        &self,
        owner: Option<&str>,
        conversation_id: &str,
        page: &Page<'_>,
    ) -> Result<Option<(Vec<ItemRow>, bool)>, StoreError> {
        let sql = match page.order {
            Order::Asc => conversation_items_sql!(">", "0", "ASC"),
            Order::Desc => conversation_items_sql!("<", "9223372036854775807", "DESC"),
        };
        let mut rows = self
            .item_page("conversation_items", sql, conversation_id, owner, page)
            .await?;
        // Only an empty page needs telling an empty conversation from a missing one.
        if rows.is_empty() && self.conversation(owner, conversation_id).await?.is_none() {
            return Ok(None);
        }
        let more = split_more(&mut rows, page.limit);
        Ok(Some((rows, more)))
    }

    /// One item of the owner's conversation.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn conversation_item(
        &self,
        owner: Option<&str>,
        conversation_id: &str,
        item_id: &str,
    ) -> Result<Option<ItemRow>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            item_columns!(),
            " FROM items WHERE id = $1 AND conversation_id = $2 AND COALESCE(key_id, '') = $3"
        );
        retrying("conversation_item", 3, || async {
            on_pool!(&self.pool, |p| sqlx::query_as::<_, ItemRow>(SQL)
                .bind(item_id)
                .bind(conversation_id)
                .bind(owner_key(owner))
                .fetch_optional(p)
                .await)
        })
        .await
    }

    /// Removes an item from the owner's conversation: deleted if it belongs to no response,
    /// else detached. Returns the updated conversation; `None` when the conversation is not
    /// the owner's or the item is not in it.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn delete_conversation_item(
        &self,
        owner: Option<&str>,
        conversation_id: &str,
        item_id: &str,
    ) -> Result<Option<ConversationRow>, StoreError> {
        const SQL: &str = concat!(
            "UPDATE conversations SET ",
            bump_updated!("$1"),
            ", item_count = CASE WHEN item_count > 0 THEN item_count - 1 ELSE 0 END \
             WHERE id = $2 AND COALESCE(key_id, '') = $3 RETURNING ",
            conversation_columns!()
        );
        timed("delete_conversation_item", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                // The conversation's row lock first, as every writer of its items takes it.
                let Some(row) = sqlx::query_as::<_, ConversationRow>(SQL)
                    .bind(now_ms())
                    .bind(conversation_id)
                    .bind(owner_key(owner))
                    .fetch_optional(&mut *tx)
                    .await?
                else {
                    return Ok(None);
                };
                // Detach, then delete what is left (see delete_conversation).
                let detached = sqlx::query(
                    "UPDATE items SET conversation_id = NULL \
                     WHERE id = $1 AND conversation_id = $2 AND response_id IS NOT NULL",
                )
                .bind(item_id)
                .bind(conversation_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                let deleted =
                    sqlx::query("DELETE FROM items WHERE id = $1 AND conversation_id = $2")
                        .bind(item_id)
                        .bind(conversation_id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                if detached + deleted == 0 {
                    // Dropping the transaction rolls the count back.
                    return Ok(None);
                }
                tx.commit().await?;
                Ok::<_, sqlx::Error>(Some(row))
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// The newest items of the owner's conversation that fit `token_limit` and `row_limit`,
    /// oldest first; `None` when the conversation is not the owner's. Reads backwards in
    /// pages of at most 256 rows and stops at the first item that does not fit.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn recent_conversation_items(
        &self,
        owner: Option<&str>,
        conversation_id: &str,
        token_limit: i64,
        row_limit: u32,
    ) -> Result<Option<Recent>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            item_columns!(),
            " FROM items WHERE conversation_id = $1 AND COALESCE(key_id, '') = $2 \
             AND seq < $3 ORDER BY seq DESC LIMIT $4"
        );
        let mut budget = Budget::new(token_limit, row_limit);
        let mut before = i64::MAX;
        loop {
            let want = budget.want();
            let page: Vec<ItemRow> = retrying("recent_conversation_items", 3, || async {
                on_pool!(&self.pool, |p| sqlx::query_as::<_, ItemRow>(SQL)
                    .bind(conversation_id)
                    .bind(owner_key(owner))
                    .bind(before)
                    .bind(want)
                    .persistent(self.plans_once())
                    .fetch_all(p)
                    .await)
            })
            .await?;
            if page.is_empty()
                && before == i64::MAX
                && self.conversation(owner, conversation_id).await?.is_none()
            {
                return Ok(None);
            }
            let exhausted = count(page.len()) < want;
            for row in page {
                before = row.seq;
                if !budget.take(row) {
                    return Ok(Some(budget.finish(false)));
                }
            }
            if exhausted {
                return Ok(Some(budget.finish(true)));
            }
        }
    }

    /// Saves a response and its items in one transaction. With a conversation, its row is
    /// locked and bumped first (as in [`Store::append_items`], owner `row.key_id`) and the
    /// items join it; with `store`, the response row is written and the items carry its id.
    /// Input items come before output items, in the order given. Writes nothing without
    /// either. Returns the inserted items.
    ///
    /// # Errors
    /// When the database fails or an id is taken; `StoreError::Database(RowNotFound)` when
    /// the conversation is not (or no longer) the owner's, and then nothing is written.
    pub async fn save_response(&self, response: &NewResponse) -> Result<Vec<ItemRow>, StoreError> {
        self.save_fenced(response, None)
            .await
            .map(Option::unwrap_or_default)
    }

    /// Saves a background response's result over its queued row, and completes its job in
    /// the same transaction, if the job's claim is still attempt `attempt`: `None` (and
    /// nothing written) when another worker's claim took it.
    ///
    /// # Errors
    /// As [`Store::save_response`].
    pub async fn save_job_response(
        &self,
        response: &NewResponse,
        attempt: i64,
    ) -> Result<Option<Vec<ItemRow>>, StoreError> {
        self.save_fenced(response, Some(attempt)).await
    }

    async fn save_fenced(
        &self,
        response: &NewResponse,
        job_attempt: Option<i64>,
    ) -> Result<Option<Vec<ItemRow>>, StoreError> {
        let row = &response.row;
        if !response.store && row.conversation_id.is_none() {
            return Ok(Some(Vec::new()));
        }
        let place = Placement {
            key_id: row.key_id.as_deref(),
            conversation_id: row.conversation_id.as_deref(),
            response_id: response.store.then_some(row.id.as_str()),
            created_at: row.created_at,
        };
        let pending: Vec<(&NewItem, &'static str)> = response
            .input
            .iter()
            .map(|i| (i, "input"))
            .chain(response.output.iter().map(|i| (i, "output")))
            .collect();
        if let Pool::Postgres(p) = &self.pool
            && job_attempt.is_none()
            && !pending.is_empty()
            && pending.len() <= INSERT_CHUNK
        {
            return timed(
                "save_response",
                save_in_one_statement(p, response, &place, &pending),
            )
            .await
            .map(Some)
            .map_err(StoreError::from);
        }
        timed("save_response", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                if let Some(attempt) = job_attempt {
                    let mine = sqlx::query(
                        "UPDATE jobs SET status = 'completed', updated_at = $1 \
                         WHERE id = $2 AND status = 'running' AND attempts = $3",
                    )
                    .bind(now_ms())
                    .bind(&row.id)
                    .bind(attempt)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if mine == 0 {
                        return Ok(None);
                    }
                    // The queued row the client was shown is replaced by the result; a
                    // response deleted while it ran stays deleted.
                    let queued = sqlx::query("DELETE FROM responses WHERE id = $1")
                        .bind(&row.id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if queued == 0 {
                        tx.commit().await?;
                        return Ok(Some(Vec::new()));
                    }
                }
                if let Some(conversation_id) = &row.conversation_id {
                    let found = sqlx::query(LOCK_CONVERSATION)
                        .bind(now_ms())
                        .bind(count(pending.len()))
                        .bind(conversation_id)
                        .bind(owner_key(row.key_id.as_deref()))
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if found == 0 {
                        return Err(sqlx::Error::RowNotFound);
                    }
                }
                if response.store {
                    insert_response!(tx, row);
                }
                let rows = insert_items!(tx, &place, &pending, self.plans_once());
                tx.commit().await?;
                Ok(Some(rows))
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// Stores a background response as queued, and its job, in one transaction.
    ///
    /// # Errors
    /// When the database fails or an id is taken.
    pub async fn queue_response(
        &self,
        row: &ResponseRow,
        job: &super::jobs::NewJob<'_>,
        now: i64,
    ) -> Result<(), StoreError> {
        timed("queue_response", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                insert_response!(tx, row);
                insert_job!(tx, job, now);
                tx.commit().await?;
                Ok::<_, sqlx::Error>(())
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// Sets a stored response's status and body; false when it is not the owner's.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn update_response(
        &self,
        owner: Option<&str>,
        id: &str,
        status: &str,
        body: &str,
    ) -> Result<bool, StoreError> {
        retrying("update_response", 3, || async {
            on_pool!(&self.pool, |p| sqlx::query(
                "UPDATE responses SET status = $1, body = $2 \
                 WHERE id = $3 AND COALESCE(key_id, '') = $4"
            )
            .bind(status)
            .bind(body)
            .bind(id)
            .bind(owner_key(owner))
            .execute(p)
            .await
            .map(|r| r.rows_affected() == 1))
        })
        .await
    }

    /// The owner's stored response `id`.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn response(
        &self,
        owner: Option<&str>,
        id: &str,
    ) -> Result<Option<ResponseRow>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            response_columns!(),
            " FROM responses WHERE id = $1 AND COALESCE(key_id, '') = $2"
        );
        retrying("response", 3, || async {
            on_pool!(&self.pool, |p| sqlx::query_as::<_, ResponseRow>(SQL)
                .bind(id)
                .bind(owner_key(owner))
                .fetch_optional(p)
                .await)
        })
        .await
    }

    /// Deletes a stored response and its items that belong to no conversation; items of a
    /// conversation are detached and stay in it. False when it is not the owner's.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn delete_response(&self, owner: Option<&str>, id: &str) -> Result<bool, StoreError> {
        timed("delete_response", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                // Items carry their response's owner, so these touch nothing of another
                // owner; the final DELETE decides (no row: roll everything back).
                // Detach, then delete what is left (see delete_conversation).
                sqlx::query(
                    "UPDATE items SET response_id = NULL WHERE response_id = $1 \
                     AND COALESCE(key_id, '') = $2 AND conversation_id IS NOT NULL",
                )
                .bind(id)
                .bind(owner_key(owner))
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "DELETE FROM items WHERE response_id = $1 AND COALESCE(key_id, '') = $2",
                )
                .bind(id)
                .bind(owner_key(owner))
                .execute(&mut *tx)
                .await?;
                let deleted = sqlx::query(
                    "DELETE FROM responses WHERE id = $1 AND COALESCE(key_id, '') = $2",
                )
                .bind(id)
                .bind(owner_key(owner))
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if deleted == 0 {
                    return Ok(false);
                }
                tx.commit().await?;
                Ok::<_, sqlx::Error>(true)
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// A page of a stored response's input items by `seq` in `page.order`, and whether
    /// more follow; `None` when the response is not the owner's.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn response_input_items(
        &self,
        owner: Option<&str>,
        id: &str,
        page: &Page<'_>,
    ) -> Result<Option<(Vec<ItemRow>, bool)>, StoreError> {
        let sql = match page.order {
            Order::Asc => input_items_sql!(">", "0", "ASC"),
            Order::Desc => input_items_sql!("<", "9223372036854775807", "DESC"),
        };
        let mut rows = self
            .item_page("response_input_items", sql, id, owner, page)
            .await?;
        if rows.is_empty() && self.response(owner, id).await?.is_none() {
            return Ok(None);
        }
        let more = split_more(&mut rows, page.limit);
        Ok(Some((rows, more)))
    }

    /// The newest items (input and output) of a response and its ancestors by
    /// `previous_response_id` that fit `token_limit` and `row_limit`, oldest first; `None`
    /// when the response is not the owner's. The chain stops at an ancestor that is
    /// missing or another owner's, and after 10,000 responses (then `complete` is false).
    ///
    /// A response's items are written when it is saved, after its predecessor's, so `seq`
    /// order is chain order: the items are read newest first, 32 responses and at most 256
    /// rows per statement, until the budget is spent.
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn recent_chain_items(
        &self,
        owner: Option<&str>,
        response_id: &str,
        token_limit: i64,
        row_limit: u32,
    ) -> Result<Option<Recent>, StoreError> {
        const CHAIN: &str = "WITH RECURSIVE chain (id, previous_response_id, depth) AS ( \
             SELECT id, previous_response_id, CAST(0 AS BIGINT) FROM responses \
             WHERE id = $1 AND COALESCE(key_id, '') = $2 \
             UNION ALL \
             SELECT r.id, r.previous_response_id, c.depth + 1 \
             FROM chain c JOIN responses r ON r.id = c.previous_response_id \
             WHERE COALESCE(r.key_id, '') = $2 AND c.depth + 1 < $3) \
             SELECT id, previous_response_id, depth FROM chain ORDER BY depth";
        let chain: Vec<(String, Option<String>, i64)> =
            retrying("recent_chain_items", 3, || async {
                on_pool!(&self.pool, |p| sqlx::query_as(CHAIN)
                    .bind(response_id)
                    .bind(owner_key(owner))
                    .bind(CHAIN_DEPTH)
                    .fetch_all(p)
                    .await)
            })
            .await?;
        let Some((_, oldest_previous, oldest_depth)) = chain.last() else {
            return Ok(None);
        };
        let cut_short = oldest_previous.is_some() && *oldest_depth >= CHAIN_DEPTH - 1;
        let mut budget = Budget::new(token_limit, row_limit);
        for batch in chain.chunks(CHAIN_BATCH) {
            let ids: Vec<&str> = (0..CHAIN_BATCH)
                .map(|i| batch.get(i).or(batch.last()).map_or("", |r| r.0.as_str()))
                .collect();
            let mut before = i64::MAX;
            loop {
                let want = budget.want();
                let page: Vec<ItemRow> = retrying("recent_chain_items", 3, || async {
                    on_pool!(&self.pool, |p| {
                        let mut q = sqlx::query_as::<_, ItemRow>(CHAIN_ITEMS.as_str());
                        for id in &ids {
                            q = q.bind(*id);
                        }
                        q.bind(before)
                            .bind(want)
                            .persistent(self.plans_once())
                            .fetch_all(p)
                            .await
                    })
                })
                .await?;
                let exhausted = count(page.len()) < want;
                for row in page {
                    before = row.seq;
                    if !budget.take(row) {
                        return Ok(Some(budget.finish(false)));
                    }
                }
                if exhausted {
                    break;
                }
            }
        }
        Ok(Some(budget.finish(!cut_short)))
    }

    /// Deletes every conversation, response and item of a key (its tenancy data);
    /// returns how many of each were removed.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn delete_key_data(&self, key_id: &str) -> Result<(u64, u64, u64), StoreError> {
        timed("delete_key_data", async {
            on_pool!(&self.pool, |p| {
                let mut tx = p.begin().await?;
                // Every item belongs to a conversation or a response of its owner, so these
                // two find all of the key's items through indexes.
                let mut items = sqlx::query(
                    "DELETE FROM items WHERE conversation_id IN \
                     (SELECT id FROM conversations WHERE COALESCE(key_id, '') = $1)",
                )
                .bind(key_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                items += sqlx::query(
                    "DELETE FROM items WHERE response_id IN \
                     (SELECT id FROM responses WHERE COALESCE(key_id, '') = $1)",
                )
                .bind(key_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                let responses =
                    sqlx::query("DELETE FROM responses WHERE COALESCE(key_id, '') = $1")
                        .bind(key_id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                sqlx::query(
                    "DELETE FROM conversation_metadata WHERE conversation_id IN \
                     (SELECT id FROM conversations WHERE COALESCE(key_id, '') = $1)",
                )
                .bind(key_id)
                .execute(&mut *tx)
                .await?;
                let conversations =
                    sqlx::query("DELETE FROM conversations WHERE COALESCE(key_id, '') = $1")
                        .bind(key_id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                tx.commit().await?;
                Ok::<_, sqlx::Error>((conversations, responses, items))
            })
        })
        .await
        .map_err(StoreError::from)
    }

    /// Conversation figures across every key: counts, conversations active since
    /// `active_since_ms`, items per conversation and the mean session length (last
    /// activity minus creation).
    ///
    /// # Errors
    /// When the database fails (after retries).
    pub async fn conversation_stats(
        &self,
        active_since_ms: i64,
    ) -> Result<ConversationStats, StoreError> {
        type Row = (i64, i64, i64, i64, Option<f64>);
        let (conversations, active, archived, items, session): Row =
            retrying("conversation_stats", 3, || async {
                on_pool!(&self.pool, |p| sqlx::query_as::<_, Row>(
                    "SELECT COUNT(*), \
                     CAST(COALESCE(SUM(CASE WHEN updated_ms >= $1 THEN 1 ELSE 0 END), 0) AS BIGINT), \
                     CAST(COALESCE(SUM(CASE WHEN archived_at IS NOT NULL THEN 1 ELSE 0 END), 0) \
                     AS BIGINT), \
                     CAST(COALESCE(SUM(item_count), 0) AS BIGINT), \
                     CAST(AVG(updated_ms / 1000 - created_at) AS DOUBLE PRECISION) \
                     FROM conversations"
                )
                .bind(active_since_ms)
                .fetch_one(p)
                .await)
            })
            .await?;
        Ok(ConversationStats {
            conversations,
            active_last_hour: active,
            archived,
            items,
            avg_items_per_conversation: if conversations > 0 {
                items as f64 / conversations as f64
            } else {
                0.0
            },
            avg_session_seconds: session.unwrap_or(0.0),
        })
    }
}
