//! The store's conversations, responses and items (`store::conversations`), on SQLite and
//! on PostgreSQL (`SWITCHYARD_TEST_POSTGRES_URL`): every test runs against every store it
//! can reach, each on a fresh SQLite file or a fresh PostgreSQL schema. Row counts the API
//! does not expose (whether an item was deleted or only detached) are read through a
//! second, raw connection to the same database.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use switchyard::config::{DatabaseConfig, Secret};
use switchyard::store::Store;
use switchyard::store::conversations::{
    ConversationFilter, ConversationRow, ItemRow, NewItem, NewResponse, Order, Page, ResponseRow,
    Scope,
};

/// One database under test: the store, and a raw pool on the same tables.
struct Db {
    kind: &'static str,
    store: Store,
    raw: Raw,
}

enum Raw {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool, String),
}

impl Db {
    /// One number from a raw query, to check what the store left in its tables.
    async fn count(&self, sql: &'static str) -> i64 {
        match &self.raw {
            Raw::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
            Raw::Postgres(p, _) => sqlx::query_scalar(sql).fetch_one(p).await.unwrap(),
        }
    }

    /// Drops a PostgreSQL test schema (a failed test leaves its schema to look at).
    async fn finish(self) {
        self.store.close().await;
        if let Raw::Postgres(p, schema) = &self.raw {
            let ddl = format!("DROP SCHEMA \"{schema}\" CASCADE");
            sqlx::query(sqlx::AssertSqlSafe(ddl))
                .execute(p)
                .await
                .unwrap();
        }
    }
}

fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{tag}_{}_{}_{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// SQLite always (a fresh file); PostgreSQL (a fresh schema) when the environment has it.
async fn stores() -> Vec<Db> {
    let dir = std::env::temp_dir().join(unique("switchyard_store_conv"));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("sy.db").display());
    let store = Store::connect(&DatabaseConfig {
        url: Secret::new(url.clone()),
        ..DatabaseConfig::default()
    })
    .await
    .unwrap();
    let raw = sqlx::SqlitePool::connect(&url).await.unwrap();
    let mut all = vec![Db {
        kind: "sqlite",
        store,
        raw: Raw::Sqlite(raw),
    }];
    let Ok(url) = std::env::var("SWITCHYARD_TEST_POSTGRES_URL") else {
        common::notice(
            "skipped: set SWITCHYARD_TEST_POSTGRES_URL to run the PostgreSQL cases of the conversation store",
        );
        return all;
    };
    let schema = unique("sy_conv");
    let store = Store::connect(&DatabaseConfig {
        url: Secret::new(url.clone()),
        schema: Some(schema.clone()),
        ..DatabaseConfig::default()
    })
    .await
    .unwrap();
    let options = sqlx::postgres::PgConnectOptions::from_str(&url)
        .unwrap()
        .options([("search_path", schema.as_str())]);
    let raw = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .unwrap();
    all.push(Db {
        kind: "postgres",
        store,
        raw: Raw::Postgres(raw, schema),
    });
    all
}

const T0: i64 = 1_700_000_000;

fn item(id: &str, tokens: i64) -> NewItem {
    NewItem {
        id: id.to_owned(),
        kind: "input",
        item_type: "message".to_owned(),
        body: format!(r#"{{"id":"{id}","type":"message"}}"#),
        tokens,
    }
}

fn items(prefix: &str, n: usize, tokens: i64) -> Vec<NewItem> {
    (0..n)
        .map(|i| item(&format!("{prefix}{i}"), tokens))
        .collect()
}

fn conversation(id: &str, key: Option<&str>, updated_ms: i64) -> ConversationRow {
    ConversationRow {
        id: id.to_owned(),
        key_id: key.map(str::to_owned),
        created_at: T0,
        updated_ms,
        metadata: "{}".to_owned(),
        user_id: None,
        archived_at: None,
        item_count: 0,
    }
}

fn response(
    id: &str,
    key: Option<&str>,
    previous: Option<&str>,
    conversation: Option<&str>,
) -> ResponseRow {
    ResponseRow {
        id: id.to_owned(),
        key_id: key.map(str::to_owned),
        created_at: T0 + 5,
        status: "completed".to_owned(),
        model: "m".to_owned(),
        previous_response_id: previous.map(str::to_owned),
        conversation_id: conversation.map(str::to_owned),
        body: format!(r#"{{"id":"{id}","object":"response"}}"#),
        input_tokens: 3,
        output_tokens: 4,
    }
}

/// Saves a stored response with one input and one output item (`{id}_in`, `{id}_out`).
async fn save(db: &Db, row: ResponseRow, tokens: i64) -> Vec<ItemRow> {
    let id = row.id.clone();
    db.store
        .save_response(&NewResponse {
            row,
            input: vec![item(&format!("{id}_in"), tokens)],
            output: vec![item(&format!("{id}_out"), tokens)],
            store: true,
        })
        .await
        .unwrap()
}

fn ids(rows: &[ItemRow]) -> Vec<&str> {
    rows.iter().map(|r| r.id.as_str()).collect()
}

fn conversation_ids(rows: &[ConversationRow]) -> Vec<&str> {
    rows.iter().map(|r| r.id.as_str()).collect()
}

fn page(after: Option<&str>, limit: u32, order: Order) -> Page<'_> {
    Page {
        after,
        limit,
        order,
    }
}

fn filter<'a>(after: Option<&'a str>, limit: u32) -> ConversationFilter<'a> {
    ConversationFilter {
        user: None,
        metadata: None,
        include_archived: false,
        after,
        limit,
    }
}

#[tokio::test]
async fn a_conversation_is_created_read_and_hidden_from_other_owners() {
    for db in stores().await {
        let s = &db.store;
        let k = Some("key_a");
        let other = Some("key_b");
        let mut conv = conversation("conv_a", k, T0 * 1000);
        conv.metadata = r#"{"topic":"x"}"#.to_owned();
        let pairs = vec![("topic".to_owned(), "x".to_owned())];
        let rows = s
            .create_conversation(&conv, &pairs, &items("msg_a", 2, 5))
            .await
            .unwrap();
        assert_eq!(ids(&rows), ["msg_a0", "msg_a1"], "{}", db.kind);
        assert!(rows[0].seq < rows[1].seq);
        for r in &rows {
            assert_eq!(r.kind, "input");
            assert_eq!(r.conversation_id.as_deref(), Some("conv_a"));
            assert_eq!(r.response_id, None);
            assert_eq!(r.created_at, T0);
            assert_eq!(r.tokens, 5);
        }

        let got = s.conversation(k, "conv_a").await.unwrap().unwrap();
        assert_eq!(got.item_count, 2);
        assert_eq!(got.metadata, r#"{"topic":"x"}"#);
        assert_eq!(got.key_id.as_deref(), Some("key_a"));
        assert_eq!(got.created_at, T0);
        assert_eq!(got.updated_ms, T0 * 1000);
        let one = s
            .conversation_item(k, "conv_a", "msg_a1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(one.body, r#"{"id":"msg_a1","type":"message"}"#);

        // Another owner, or auth off, sees nothing and changes nothing.
        for who in [other, None] {
            assert!(s.conversation(who, "conv_a").await.unwrap().is_none());
            assert!(
                s.conversation_items(who, "conv_a", &page(None, 10, Order::Asc))
                    .await
                    .unwrap()
                    .is_none()
            );
            assert!(
                s.conversation_item(who, "conv_a", "msg_a0")
                    .await
                    .unwrap()
                    .is_none()
            );
            assert!(
                s.append_items(who, "conv_a", &[item(&format!("x_{who:?}"), 1)])
                    .await
                    .unwrap()
                    .is_none()
            );
            assert!(
                s.delete_conversation_item(who, "conv_a", "msg_a0")
                    .await
                    .unwrap()
                    .is_none()
            );
            assert!(
                s.update_conversation_metadata(who, "conv_a", "{}", None, &[])
                    .await
                    .unwrap()
                    .is_none()
            );
            assert!(
                s.set_conversation_archived(who, "conv_a", Some(T0))
                    .await
                    .unwrap()
                    .is_none()
            );
            assert!(
                s.recent_conversation_items(who, "conv_a", 1000, 100)
                    .await
                    .unwrap()
                    .is_none()
            );
            assert!(!s.delete_conversation(who, "conv_a").await.unwrap());
        }
        let got = s.conversation(k, "conv_a").await.unwrap().unwrap();
        assert_eq!(
            (got.item_count, got.archived_at, got.updated_ms),
            (2, None, T0 * 1000)
        );
        assert_eq!(db.count("SELECT COUNT(*) FROM items").await, 2);

        // Rows written with auth off belong to the empty owner only.
        s.create_conversation(&conversation("conv_open", None, T0 * 1000), &[], &[])
            .await
            .unwrap();
        assert!(s.conversation(None, "conv_open").await.unwrap().is_some());
        assert!(s.conversation(k, "conv_open").await.unwrap().is_none());
        assert!(s.conversation(k, "conv_missing").await.unwrap().is_none());
        assert!(
            s.conversation_items(k, "conv_missing", &page(None, 10, Order::Asc))
                .await
                .unwrap()
                .is_none()
        );

        // Metadata is rewritten whole and counts as activity; archiving does not.
        let pairs = vec![("project".to_owned(), "p1".to_owned())];
        let updated = s
            .update_conversation_metadata(k, "conv_a", r#"{"project":"p1"}"#, Some("u1"), &pairs)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(updated.metadata, r#"{"project":"p1"}"#);
        assert_eq!(updated.user_id.as_deref(), Some("u1"));
        assert!(updated.updated_ms > T0 * 1000);
        assert_eq!(
            db.count("SELECT COUNT(*) FROM conversation_metadata WHERE key = 'topic'")
                .await,
            0
        );
        let archived = s
            .set_conversation_archived(k, "conv_a", Some(T0 + 60))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(archived.archived_at, Some(T0 + 60));
        assert_eq!(archived.updated_ms, updated.updated_ms);
        let restored = s
            .set_conversation_archived(k, "conv_a", None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(restored.archived_at, None);
        db.finish().await;
    }
}

#[tokio::test]
async fn item_pages_run_both_ways_from_a_cursor() {
    for db in stores().await {
        let s = &db.store;
        let k = Some("key_p");
        s.create_conversation(
            &conversation("conv_p", k, T0 * 1000),
            &[],
            &items("i", 2, 1),
        )
        .await
        .unwrap();
        let appended = s
            .append_items(k, "conv_p", &[item("i2", 1), item("i3", 1), item("i4", 1)])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ids(&appended), ["i2", "i3", "i4"]);
        assert!(appended.windows(2).all(|w| w[0].seq < w[1].seq));
        let conv = s.conversation(k, "conv_p").await.unwrap().unwrap();
        assert_eq!(conv.item_count, 5);
        assert!(conv.updated_ms > T0 * 1000, "an append is activity");

        let get = |after, limit, order| {
            let p = page(after, limit, order);
            async move {
                let (rows, more) = s
                    .conversation_items(k, "conv_p", &p)
                    .await
                    .unwrap()
                    .unwrap();
                (ids(&rows).join(","), more)
            }
        };
        assert_eq!(get(None, 2, Order::Asc).await, ("i0,i1".into(), true));
        assert_eq!(get(Some("i1"), 2, Order::Asc).await, ("i2,i3".into(), true));
        assert_eq!(get(Some("i3"), 2, Order::Asc).await, ("i4".into(), false));
        assert_eq!(get(None, 2, Order::Desc).await, ("i4,i3".into(), true));
        assert_eq!(
            get(Some("i3"), 2, Order::Desc).await,
            ("i2,i1".into(), true)
        );
        assert_eq!(get(Some("i1"), 2, Order::Desc).await, ("i0".into(), false));
        assert_eq!(
            get(None, 5, Order::Asc).await,
            ("i0,i1,i2,i3,i4".into(), false)
        );
        assert_eq!(get(Some("i4"), 5, Order::Asc).await, (String::new(), false));
        // A cursor that is no item of this conversation: an empty page, not an error.
        assert_eq!(
            get(Some("nope"), 5, Order::Asc).await,
            (String::new(), false)
        );
        s.create_conversation(&conversation("conv_q", k, T0 * 1000), &[], &[item("q0", 1)])
            .await
            .unwrap();
        assert_eq!(
            get(Some("q0"), 5, Order::Desc).await,
            (String::new(), false)
        );
        // An empty conversation is an empty page, not a missing one.
        let (rows, more) = s
            .conversation_items(k, "conv_q", &page(Some("q0"), 5, Order::Asc))
            .await
            .unwrap()
            .unwrap();
        assert!(rows.is_empty() && !more);

        // A response's input items page the same way and leave its output out.
        let r = response("resp_p", k, None, None);
        s.save_response(&NewResponse {
            row: r,
            input: items("in", 3, 1),
            output: items("out", 2, 1),
            store: true,
        })
        .await
        .unwrap();
        let inputs = |after, limit, order| {
            let p = page(after, limit, order);
            async move {
                let (rows, more) = s
                    .response_input_items(k, "resp_p", &p)
                    .await
                    .unwrap()
                    .unwrap();
                (ids(&rows).join(","), more)
            }
        };
        assert_eq!(
            inputs(None, 10, Order::Asc).await,
            ("in0,in1,in2".into(), false)
        );
        assert_eq!(inputs(None, 2, Order::Desc).await, ("in2,in1".into(), true));
        assert_eq!(
            inputs(Some("in1"), 2, Order::Desc).await,
            ("in0".into(), false)
        );
        assert_eq!(
            inputs(Some("out0"), 2, Order::Asc).await,
            (String::new(), false)
        );
        for who in [Some("key_other"), None] {
            assert!(
                s.response_input_items(who, "resp_p", &page(None, 10, Order::Asc))
                    .await
                    .unwrap()
                    .is_none()
            );
        }
        assert!(
            s.response_input_items(k, "resp_missing", &page(None, 10, Order::Asc))
                .await
                .unwrap()
                .is_none()
        );
        db.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_each_stay_contiguous() {
    // Appends of 20 items, and of 1,200, which the store writes in several statements: an
    // append is contiguous only if the conversation's lock is held across all of them.
    const SIZES: [usize; 5] = [20, 1_200, 20, 20, 1_200];
    for db in stores().await {
        let k = Some("key_c");
        db.store
            .create_conversation(&conversation("conv_c", k, T0 * 1000), &[], &[])
            .await
            .unwrap();
        let start = Arc::new(tokio::sync::Barrier::new(2));
        let tasks: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|task| {
                let store = db.store.clone();
                let start = start.clone();
                tokio::spawn(async move {
                    start.wait().await;
                    for (round, size) in SIZES.into_iter().enumerate() {
                        let batch = items(&format!("{task}{round}_"), size, 1);
                        let rows = store
                            .append_items(k, "conv_c", &batch)
                            .await
                            .unwrap()
                            .unwrap();
                        assert_eq!(rows.len(), size);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let total: usize = 2 * SIZES.iter().sum::<usize>();
        let (rows, more) = db
            .store
            .conversation_items(k, "conv_c", &page(None, 10_000, Order::Asc))
            .await
            .unwrap()
            .unwrap();
        assert!(!more);
        assert_eq!(rows.len(), total, "{}", db.kind);
        // Each append's items form one run, in the order given.
        let mut runs: Vec<(String, Vec<&str>)> = Vec::new();
        for row in &rows {
            let (prefix, _) = row.id.split_once('_').unwrap();
            match runs.last_mut() {
                Some((p, ids)) if p == prefix => ids.push(&row.id),
                _ => runs.push((prefix.to_owned(), vec![&row.id])),
            }
        }
        assert_eq!(
            runs.len(),
            2 * SIZES.len(),
            "{}: an append was interleaved",
            db.kind
        );
        for (prefix, ids) in &runs {
            let round: usize = prefix[1..].parse().unwrap();
            let expected: Vec<String> =
                (0..SIZES[round]).map(|i| format!("{prefix}_{i}")).collect();
            assert_eq!(*ids, expected, "{}", db.kind);
        }
        let conv = db.store.conversation(k, "conv_c").await.unwrap().unwrap();
        assert_eq!(conv.item_count, count(total));
        db.finish().await;
    }
}

#[tokio::test]
async fn concurrent_turns_each_stay_contiguous() {
    // Two writers save turns (two input and two output items each) to one conversation at
    // once: each turn's items must form one run, input before output.
    const TURNS: usize = 10;
    for db in stores().await {
        let k = Some("key_t");
        db.store
            .create_conversation(&conversation("conv_t", k, T0 * 1000), &[], &[])
            .await
            .unwrap();
        let start = Arc::new(tokio::sync::Barrier::new(2));
        let tasks: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|task| {
                let store = db.store.clone();
                let start = start.clone();
                tokio::spawn(async move {
                    start.wait().await;
                    for turn in 0..TURNS {
                        let id = format!("{task}{turn}");
                        let rows = store
                            .save_response(&NewResponse {
                                row: response(&format!("resp_{id}"), k, None, Some("conv_t")),
                                input: items(&format!("{id}_in"), 2, 1),
                                output: items(&format!("{id}_out"), 2, 1),
                                store: true,
                            })
                            .await
                            .unwrap();
                        assert_eq!(
                            ids(&rows),
                            [
                                format!("{id}_in0"),
                                format!("{id}_in1"),
                                format!("{id}_out0"),
                                format!("{id}_out1")
                            ]
                        );
                        assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq));
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let (rows, _) = db
            .store
            .conversation_items(k, "conv_t", &page(None, 100, Order::Asc))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rows.len(), 2 * TURNS * 4, "{}", db.kind);
        for turn in rows.chunks(4) {
            let (id, _) = turn[0].id.split_once('_').unwrap();
            let expected = [
                format!("{id}_in0"),
                format!("{id}_in1"),
                format!("{id}_out0"),
                format!("{id}_out1"),
            ];
            assert_eq!(ids(turn), expected, "{}: a turn was interleaved", db.kind);
        }
        let conv = db.store.conversation(k, "conv_t").await.unwrap().unwrap();
        assert_eq!(conv.item_count, count(2 * TURNS * 4));
        // A turn for a conversation another key owns writes nothing.
        let refused = db
            .store
            .save_response(&NewResponse {
                row: response("resp_x", Some("key_other"), None, Some("conv_t")),
                input: items("x_in", 1, 1),
                output: items("x_out", 1, 1),
                store: true,
            })
            .await;
        assert!(
            matches!(
                refused,
                Err(switchyard::store::StoreError::Database(
                    sqlx::Error::RowNotFound
                ))
            ),
            "{}",
            db.kind
        );
        assert_eq!(
            db.count("SELECT COUNT(*) FROM items WHERE id LIKE 'x_%'")
                .await,
            0
        );
        assert_eq!(
            db.count("SELECT COUNT(*) FROM responses WHERE id = 'resp_x'")
                .await,
            0
        );
        db.finish().await;
    }
}

#[tokio::test]
async fn the_checkpointer_copies_the_log_into_the_database() {
    // Writers leave checkpoints to the background task: without it the database file would
    // not grow until the log reached thousands of pages.
    let dir = std::env::temp_dir().join(unique("switchyard_checkpoint"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sy.db");
    let store = Store::connect(&DatabaseConfig {
        url: Secret::new(format!("sqlite://{}", file.display())),
        ..DatabaseConfig::default()
    })
    .await
    .unwrap();
    let tasks = tokio_util::task::TaskTracker::new();
    let cancel = tokio_util::sync::CancellationToken::new();
    // Let the checkpointer copy what the migrations wrote, then measure from there.
    store.spawn_checkpointer(&tasks, cancel.clone());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let before = std::fs::metadata(&file).unwrap().len();
    let body = "x".repeat(2_000);
    for i in 0..100 {
        let conv = format!("conv_{i}");
        store
            .create_conversation(&conversation(&conv, None, T0 * 1000), &[], &[])
            .await
            .unwrap();
        let mut batch = items(&format!("i{i}_"), 4, 1);
        for item in &mut batch {
            item.body.clone_from(&body);
        }
        store.append_items(None, &conv, &batch).await.unwrap();
    }
    let mut grown = false;
    for _ in 0..50 {
        if std::fs::metadata(&file).unwrap().len() > before + 500_000 {
            grown = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(grown, "the database file stayed at {before} bytes");
    cancel.cancel();
    tasks.close();
    tasks.wait().await;
    store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap()
}

#[tokio::test]
async fn deleting_detaches_shared_items_and_deletes_the_rest() {
    for db in stores().await {
        let s = &db.store;
        let k = Some("key_d");
        s.create_conversation(
            &conversation("conv_d", k, T0 * 1000),
            &[],
            &items("c", 2, 1),
        )
        .await
        .unwrap();
        save(&db, response("resp_d", k, None, Some("conv_d")), 1).await;
        let conv = s.conversation(k, "conv_d").await.unwrap().unwrap();
        assert_eq!(conv.item_count, 4);

        // An item of no response is deleted; one of a response is only detached.
        let conv = s
            .delete_conversation_item(k, "conv_d", "c0")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(conv.item_count, 3);
        assert!(
            s.conversation_item(k, "conv_d", "c0")
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            db.count("SELECT COUNT(*) FROM items WHERE id = 'c0'").await,
            0
        );
        let conv = s
            .delete_conversation_item(k, "conv_d", "resp_d_in")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(conv.item_count, 2);
        let (inputs, _) = s
            .response_input_items(k, "resp_d", &page(None, 10, Order::Asc))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ids(&inputs), ["resp_d_in"]);
        assert_eq!(inputs[0].conversation_id, None);
        let (left, _) = s
            .conversation_items(k, "conv_d", &page(None, 10, Order::Asc))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ids(&left), ["c1", "resp_d_out"]);
        // Unknown item, item of the conversation deleted already, unknown conversation.
        for (conv_id, item_id) in [
            ("conv_d", "nope"),
            ("conv_d", "c0"),
            ("conv_d", "resp_d_in"),
            ("conv_missing", "c1"),
        ] {
            assert!(
                s.delete_conversation_item(k, conv_id, item_id)
                    .await
                    .unwrap()
                    .is_none(),
                "{conv_id}/{item_id}"
            );
        }
        assert_eq!(
            s.conversation(k, "conv_d")
                .await
                .unwrap()
                .unwrap()
                .item_count,
            2
        );

        // Deleting the conversation deletes c1 and detaches the response's output.
        assert!(s.delete_conversation(k, "conv_d").await.unwrap());
        assert!(!s.delete_conversation(k, "conv_d").await.unwrap());
        assert!(s.conversation(k, "conv_d").await.unwrap().is_none());
        assert_eq!(
            db.count("SELECT COUNT(*) FROM items WHERE conversation_id IS NULL AND response_id = 'resp_d'")
                .await,
            2
        );
        assert_eq!(db.count("SELECT COUNT(*) FROM items").await, 2);
        let resp = s.response(k, "resp_d").await.unwrap().unwrap();
        assert_eq!(resp.conversation_id, None);
        assert!(
            !s.delete_response(Some("key_other"), "resp_d")
                .await
                .unwrap()
        );
        assert!(s.delete_response(k, "resp_d").await.unwrap());
        assert!(!s.delete_response(k, "resp_d").await.unwrap());
        assert!(s.response(k, "resp_d").await.unwrap().is_none());
        assert_eq!(db.count("SELECT COUNT(*) FROM items").await, 0);

        // The other way round: the response first, its items stay in the conversation.
        s.create_conversation(&conversation("conv_e", k, T0 * 1000), &[], &[item("e0", 1)])
            .await
            .unwrap();
        save(&db, response("resp_e", k, None, Some("conv_e")), 1).await;
        save(&db, response("resp_solo", k, None, None), 1).await;
        assert!(s.delete_response(k, "resp_e").await.unwrap());
        let (rows, _) = s
            .conversation_items(k, "conv_e", &page(None, 10, Order::Asc))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ids(&rows), ["e0", "resp_e_in", "resp_e_out"]);
        assert!(rows.iter().all(|r| r.response_id.is_none()));
        assert!(s.delete_conversation(k, "conv_e").await.unwrap());
        // Only the unrelated response's items remain.
        assert_eq!(db.count("SELECT COUNT(*) FROM items").await, 2);
        assert!(s.delete_response(k, "resp_solo").await.unwrap());
        assert_eq!(db.count("SELECT COUNT(*) FROM items").await, 0);
        assert_eq!(
            db.count("SELECT COUNT(*) FROM conversation_metadata").await,
            0
        );
        db.finish().await;
    }
}

#[tokio::test]
async fn a_response_is_saved_by_store_and_conversation() {
    for db in stores().await {
        let s = &db.store;
        let k = Some("key_s");

        // store: the response row, items carrying its id, input before output.
        let rows = s
            .save_response(&NewResponse {
                row: response("resp_1", k, None, None),
                input: items("r1in", 2, 3),
                output: items("r1out", 1, 4),
                store: true,
            })
            .await
            .unwrap();
        assert_eq!(ids(&rows), ["r1in0", "r1in1", "r1out0"]);
        assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(
            rows.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>(),
            ["input", "input", "output"]
        );
        assert!(
            rows.iter()
                .all(|r| r.response_id.as_deref() == Some("resp_1")
                    && r.conversation_id.is_none()
                    && r.created_at == T0 + 5)
        );
        let got = s.response(k, "resp_1").await.unwrap().unwrap();
        assert_eq!(
            (
                got.status.as_str(),
                got.model.as_str(),
                got.input_tokens,
                got.output_tokens
            ),
            ("completed", "m", 3, 4)
        );
        assert_eq!(got.body, r#"{"id":"resp_1","object":"response"}"#);
        assert!(
            s.response(Some("key_other"), "resp_1")
                .await
                .unwrap()
                .is_none()
        );
        assert!(s.response(None, "resp_1").await.unwrap().is_none());

        // Background work rewrites status and body, for the owner only.
        assert!(
            s.update_response(k, "resp_1", "failed", r#"{"status":"failed"}"#)
                .await
                .unwrap()
        );
        assert!(
            !s.update_response(Some("key_other"), "resp_1", "x", "{}")
                .await
                .unwrap()
        );
        assert!(
            !s.update_response(k, "resp_missing", "x", "{}")
                .await
                .unwrap()
        );
        let got = s.response(k, "resp_1").await.unwrap().unwrap();
        assert_eq!(got.status, "failed");
        assert_eq!(got.body, r#"{"status":"failed"}"#);

        // Neither store nor a conversation: nothing is written.
        let rows = s
            .save_response(&NewResponse {
                row: response("resp_2", k, None, None),
                input: items("r2in", 1, 1),
                output: items("r2out", 1, 1),
                store: false,
            })
            .await
            .unwrap();
        assert!(rows.is_empty());
        assert!(s.response(k, "resp_2").await.unwrap().is_none());
        assert_eq!(db.count("SELECT COUNT(*) FROM items").await, 3);

        // A conversation without store: the items join it, no response row.
        s.create_conversation(&conversation("conv_s", k, T0 * 1000), &[], &[item("s0", 1)])
            .await
            .unwrap();
        let rows = s
            .save_response(&NewResponse {
                row: response("resp_3", k, None, Some("conv_s")),
                input: items("r3in", 1, 1),
                output: items("r3out", 1, 1),
                store: false,
            })
            .await
            .unwrap();
        assert!(
            rows.iter()
                .all(|r| r.conversation_id.as_deref() == Some("conv_s") && r.response_id.is_none())
        );
        assert!(s.response(k, "resp_3").await.unwrap().is_none());
        let conv = s.conversation(k, "conv_s").await.unwrap().unwrap();
        assert_eq!(conv.item_count, 3);
        assert!(conv.updated_ms > T0 * 1000);

        // Both: the items carry both ids.
        let rows = save(&db, response("resp_4", k, None, Some("conv_s")), 1).await;
        assert!(rows.iter().all(|r| {
            r.conversation_id.as_deref() == Some("conv_s")
                && r.response_id.as_deref() == Some("resp_4")
        }));
        let (all, _) = s
            .conversation_items(k, "conv_s", &page(None, 10, Order::Asc))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            ids(&all),
            ["s0", "r3in0", "r3out0", "resp_4_in", "resp_4_out"]
        );
        assert_eq!(
            s.response(k, "resp_4")
                .await
                .unwrap()
                .unwrap()
                .conversation_id
                .as_deref(),
            Some("conv_s")
        );
        assert_eq!(
            s.conversation(k, "conv_s")
                .await
                .unwrap()
                .unwrap()
                .item_count,
            5
        );

        // Another owner's conversation: an error, and nothing written.
        let before = db.count("SELECT COUNT(*) FROM items").await;
        let refused = s
            .save_response(&NewResponse {
                row: response("resp_5", Some("key_other"), None, Some("conv_s")),
                input: items("r5in", 1, 1),
                output: vec![],
                store: true,
            })
            .await;
        assert!(refused.is_err(), "{}", db.kind);
        assert!(
            s.response(Some("key_other"), "resp_5")
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(db.count("SELECT COUNT(*) FROM items").await, before);
        db.finish().await;
    }
}

#[tokio::test]
async fn chain_items_follow_previous_responses_of_the_same_owner() {
    for db in stores().await {
        let s = &db.store;
        let k = Some("key_h");
        save(&db, response("resp_1", k, None, None), 10).await;
        save(&db, response("resp_2", k, Some("resp_1"), None), 10).await;
        save(&db, response("resp_3", k, Some("resp_2"), None), 10).await;
        // Another owner's response naming resp_3 as its predecessor.
        save(
            &db,
            response("resp_x", Some("key_x"), Some("resp_3"), None),
            10,
        )
        .await;

        let all = s
            .recent_chain_items(k, "resp_3", 1000, 100)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            ids(&all.items),
            [
                "resp_1_in",
                "resp_1_out",
                "resp_2_in",
                "resp_2_out",
                "resp_3_in",
                "resp_3_out"
            ],
            "{}",
            db.kind
        );
        assert_eq!(all.tokens, 60);
        assert!(all.complete);
        let mid = s
            .recent_chain_items(k, "resp_2", 1000, 100)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            ids(&mid.items),
            ["resp_1_in", "resp_1_out", "resp_2_in", "resp_2_out"]
        );

        // Owner-checked at every step: resp_x sees only itself.
        let foreign = s
            .recent_chain_items(Some("key_x"), "resp_x", 1000, 100)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ids(&foreign.items), ["resp_x_in", "resp_x_out"]);
        assert!(
            s.recent_chain_items(Some("key_x"), "resp_3", 1000, 100)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            s.recent_chain_items(k, "resp_missing", 1000, 100)
                .await
                .unwrap()
                .is_none()
        );

        // The budget cuts the oldest items off.
        let cut = s
            .recent_chain_items(k, "resp_3", 35, 100)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ids(&cut.items), ["resp_2_out", "resp_3_in", "resp_3_out"]);
        assert_eq!(cut.tokens, 30);
        assert!(!cut.complete);
        let exact = s
            .recent_chain_items(k, "resp_3", 60, 6)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(exact.items.len(), 6);
        assert!(exact.complete);
        let rows = s
            .recent_chain_items(k, "resp_3", 1000, 5)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rows.items.len(), 5);
        assert!(!rows.complete);

        // A deleted ancestor ends the chain.
        assert!(s.delete_response(k, "resp_1").await.unwrap());
        let rest = s
            .recent_chain_items(k, "resp_3", 1000, 100)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            ids(&rest.items),
            ["resp_2_in", "resp_2_out", "resp_3_in", "resp_3_out"]
        );
        assert!(rest.complete);

        // A chain longer than one batch of responses, read across batches and pages.
        let mut previous: Option<String> = None;
        for n in 0..70 {
            let id = format!("long_{n:02}");
            save(&db, response(&id, k, previous.as_deref(), None), 1).await;
            previous = Some(id);
        }
        let long = s
            .recent_chain_items(k, "long_69", 1000, 1000)
            .await
            .unwrap()
            .unwrap();
        let expected: Vec<String> = (0..70)
            .flat_map(|n| [format!("long_{n:02}_in"), format!("long_{n:02}_out")])
            .collect();
        assert_eq!(ids(&long.items), expected);
        assert!(long.complete);
        let newest = s
            .recent_chain_items(k, "long_69", 1000, 99)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ids(&newest.items), expected[140 - 99..]);
        assert!(!newest.complete);
        db.finish().await;
    }
}

#[tokio::test]
async fn recent_items_stop_at_the_budget() {
    for db in stores().await {
        let s = &db.store;
        let k = Some("key_r");
        s.create_conversation(
            &conversation("conv_r", k, T0 * 1000),
            &[],
            &items("r", 10, 10),
        )
        .await
        .unwrap();
        let recent = |tokens, rows| async move {
            s.recent_conversation_items(k, "conv_r", tokens, rows)
                .await
                .unwrap()
                .unwrap()
        };
        let cut = recent(35, 100).await;
        assert_eq!(ids(&cut.items), ["r7", "r8", "r9"], "{}", db.kind);
        assert_eq!(cut.tokens, 30);
        assert!(!cut.complete);
        let all = recent(100, 100).await;
        assert_eq!(all.items.len(), 10);
        assert_eq!(ids(&all.items)[0], "r0");
        assert!(all.complete);
        let capped = recent(1000, 4).await;
        assert_eq!(ids(&capped.items), ["r6", "r7", "r8", "r9"]);
        assert!(!capped.complete);
        let exact = recent(1000, 10).await;
        assert_eq!(exact.items.len(), 10);
        assert!(exact.complete);
        let none = recent(5, 100).await;
        assert!(none.items.is_empty() && !none.complete);

        // An empty conversation is complete with nothing in it.
        s.create_conversation(&conversation("conv_empty", k, T0 * 1000), &[], &[])
            .await
            .unwrap();
        let empty = s
            .recent_conversation_items(k, "conv_empty", 100, 100)
            .await
            .unwrap()
            .unwrap();
        assert!(empty.items.is_empty() && empty.complete && empty.tokens == 0);
        db.finish().await;
    }
}

#[tokio::test]
async fn a_small_budget_reads_the_end_of_a_long_conversation() {
    for db in stores().await {
        let s = &db.store;
        let k = Some("key_l");
        s.create_conversation(&conversation("conv_l", k, T0 * 1000), &[], &[])
            .await
            .unwrap();
        for chunk in 0..10 {
            let batch: Vec<NewItem> = (0..1000)
                .map(|i| item(&format!("l{:05}", chunk * 1000 + i), 7))
                .collect();
            s.append_items(k, "conv_l", &batch).await.unwrap().unwrap();
        }
        let conv = s.conversation(k, "conv_l").await.unwrap().unwrap();
        assert_eq!(conv.item_count, 10_000);

        let small = s
            .recent_conversation_items(k, "conv_l", 70, 1000)
            .await
            .unwrap()
            .unwrap();
        let expected: Vec<String> = (9990..10_000).map(|i| format!("l{i:05}")).collect();
        assert_eq!(ids(&small.items), expected, "{}", db.kind);
        assert_eq!(small.tokens, 70);
        assert!(!small.complete);

        // Across the 256-row page boundary.
        let wider = s
            .recent_conversation_items(k, "conv_l", 7 * 300, 10_000)
            .await
            .unwrap()
            .unwrap();
        let expected: Vec<String> = (9700..10_000).map(|i| format!("l{i:05}")).collect();
        assert_eq!(ids(&wider.items), expected);
        assert!(!wider.complete);

        let whole = s
            .recent_conversation_items(k, "conv_l", i64::MAX, 10_000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(whole.items.len(), 10_000);
        assert!(whole.items.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(whole.tokens, 70_000);
        assert!(whole.complete);
        db.finish().await;
    }
}

#[tokio::test]
async fn conversations_list_by_activity_with_cursor_and_filters() {
    for db in stores().await {
        let s = &db.store;
        let k = Some("key_l");
        // (id, updated_ms, user, metadata pair)
        type Spec = (
            &'static str,
            i64,
            Option<&'static str>,
            Option<(&'static str, &'static str)>,
        );
        let specs: [Spec; 6] = [
            ("conv_1", 1000, None, Some(("project", "p1"))),
            ("conv_2", 2000, Some("u1"), None),
            ("conv_3a", 3000, None, None),
            ("conv_3b", 3000, None, Some(("project", "p2"))),
            ("conv_4", 4000, Some("u1"), Some(("project", "p1"))),
            ("conv_5", 5000, Some("u2"), None),
        ];
        for (id, updated_ms, user, pair) in specs {
            let mut conv = conversation(id, k, updated_ms);
            conv.user_id = user.map(str::to_owned);
            let pairs: Vec<(String, String)> = pair
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .into_iter()
                .collect();
            s.create_conversation(&conv, &pairs, &[]).await.unwrap();
        }
        s.create_conversation(&conversation("conv_other", Some("key_o"), 3500), &[], &[])
            .await
            .unwrap();
        s.create_conversation(&conversation("conv_open", None, 2500), &[], &[])
            .await
            .unwrap();

        let list = |scope, f: ConversationFilter<'static>| async move {
            let (rows, more) = s.list_conversations(scope, &f).await.unwrap();
            (conversation_ids(&rows).join(","), more)
        };
        let mine = Scope::Key(k);
        assert_eq!(
            list(mine, filter(None, 10)).await,
            ("conv_5,conv_4,conv_3b,conv_3a,conv_2,conv_1".into(), false),
            "{}",
            db.kind
        );
        // Pages of two, continuing strictly after the cursor (ties broken by id).
        assert_eq!(
            list(mine, filter(None, 2)).await,
            ("conv_5,conv_4".into(), true)
        );
        assert_eq!(
            list(mine, filter(Some("conv_4"), 2)).await,
            ("conv_3b,conv_3a".into(), true)
        );
        assert_eq!(
            list(mine, filter(Some("conv_3a"), 2)).await,
            ("conv_2,conv_1".into(), false)
        );
        assert_eq!(
            list(mine, filter(Some("conv_missing"), 2)).await,
            (String::new(), false)
        );
        assert_eq!(
            list(mine, filter(Some("conv_other"), 2)).await,
            (String::new(), false)
        );

        let by_user = ConversationFilter {
            user: Some("u1"),
            ..filter(None, 10)
        };
        assert_eq!(list(mine, by_user).await, ("conv_4,conv_2".into(), false));
        let by_pair = ConversationFilter {
            metadata: Some(("project", "p1")),
            ..filter(None, 10)
        };
        assert_eq!(list(mine, by_pair).await, ("conv_4,conv_1".into(), false));
        let both = ConversationFilter {
            user: Some("u1"),
            metadata: Some(("project", "p1")),
            ..filter(None, 10)
        };
        assert_eq!(list(mine, both).await, ("conv_4".into(), false));
        let paged_pair = ConversationFilter {
            metadata: Some(("project", "p1")),
            ..filter(Some("conv_4"), 10)
        };
        assert_eq!(list(mine, paged_pair).await, ("conv_1".into(), false));

        // Archived conversations only when asked for.
        s.set_conversation_archived(k, "conv_5", Some(T0))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            list(mine, filter(None, 2)).await,
            ("conv_4,conv_3b".into(), true)
        );
        let archived_too = ConversationFilter {
            include_archived: true,
            ..filter(None, 2)
        };
        assert_eq!(
            list(mine, archived_too).await,
            ("conv_5,conv_4".into(), true)
        );

        // Auth off sees only its own; the admin scope sees every key's.
        assert_eq!(
            list(Scope::Key(None), filter(None, 10)).await,
            ("conv_open".into(), false)
        );
        assert_eq!(
            list(Scope::Any, filter(None, 10)).await,
            (
                "conv_4,conv_other,conv_3b,conv_3a,conv_open,conv_2,conv_1".into(),
                false
            )
        );
        assert_eq!(
            list(Scope::Any, filter(Some("conv_other"), 2)).await,
            ("conv_3b,conv_3a".into(), true)
        );

        // Activity moves a conversation to the top.
        s.append_items(k, "conv_1", &[item("bump", 1)])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            list(mine, filter(None, 2)).await,
            ("conv_1,conv_4".into(), true)
        );
        db.finish().await;
    }
}

#[tokio::test]
async fn deleting_a_keys_data_leaves_other_keys_alone() {
    for db in stores().await {
        let s = &db.store;
        for key in ["key_gone", "key_kept"] {
            let k = Some(key);
            let conv_id = format!("conv_{key}");
            let pairs = vec![("a".to_owned(), "b".to_owned())];
            s.create_conversation(
                &conversation(&conv_id, k, T0 * 1000),
                &pairs,
                &items(&format!("{key}_c"), 2, 1),
            )
            .await
            .unwrap();
            save(
                &db,
                response(&format!("resp_{key}_in_conv"), k, None, Some(&conv_id)),
                1,
            )
            .await;
            save(&db, response(&format!("resp_{key}"), k, None, None), 1).await;
        }
        assert_eq!(db.count("SELECT COUNT(*) FROM items").await, 12);

        let removed = s.delete_key_data("key_gone").await.unwrap();
        assert_eq!(removed, (1, 2, 6), "{}", db.kind);
        assert_eq!(s.delete_key_data("key_gone").await.unwrap(), (0, 0, 0));
        assert_eq!(
            db.count("SELECT COUNT(*) FROM items WHERE key_id = 'key_gone'")
                .await,
            0
        );
        assert_eq!(db.count("SELECT COUNT(*) FROM items").await, 6);
        assert_eq!(
            db.count("SELECT COUNT(*) FROM conversation_metadata").await,
            1
        );
        assert!(
            s.conversation(Some("key_kept"), "conv_key_kept")
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            s.response(Some("key_kept"), "resp_key_kept")
                .await
                .unwrap()
                .is_some()
        );
        let (rows, _) = s
            .conversation_items(
                Some("key_kept"),
                "conv_key_kept",
                &page(None, 10, Order::Asc),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rows.len(), 4);
        db.finish().await;
    }
}

#[tokio::test]
async fn conversation_stats_aggregate_every_key() {
    for db in stores().await {
        let s = &db.store;
        let zero = s.conversation_stats(0).await.unwrap();
        assert_eq!(
            (zero.conversations, zero.items, zero.archived),
            (0, 0, 0),
            "{}",
            db.kind
        );
        assert_eq!(zero.avg_items_per_conversation, 0.0);
        assert_eq!(zero.avg_session_seconds, 0.0);

        // Sessions of 100 s, 300 s and 0 s; 2, 4 and 0 items.
        let specs = [
            ("conv_1", Some("key_a"), 1_000, 1_100_000, 2),
            ("conv_2", Some("key_b"), 2_000, 2_300_000, 4),
            ("conv_3", None, 5_000, 5_000_000, 0),
        ];
        for (id, key, created_at, updated_ms, n) in specs {
            let mut conv = conversation(id, key, updated_ms);
            conv.created_at = created_at;
            s.create_conversation(&conv, &[], &items(&format!("{id}_"), n, 1))
                .await
                .unwrap();
        }
        s.set_conversation_archived(Some("key_b"), "conv_2", Some(2_400))
            .await
            .unwrap()
            .unwrap();
        let stats = s.conversation_stats(2_000_000).await.unwrap();
        assert_eq!(stats.conversations, 3);
        assert_eq!(stats.active_last_hour, 2);
        assert_eq!(stats.archived, 1);
        assert_eq!(stats.items, 6);
        assert!((stats.avg_items_per_conversation - 2.0).abs() < 1e-9);
        assert!((stats.avg_session_seconds - 400.0 / 3.0).abs() < 1e-6);
        db.finish().await;
    }
}

/// Usage rows are written in statements of a few fixed sizes inside one transaction:
/// batches of every size around those sizes land whole, each row once.
#[tokio::test]
async fn usage_batches_of_any_size_land_whole() {
    use switchyard::store::usage::UsageRecord;
    for db in stores().await {
        let mut written = 0i64;
        for size in [1usize, 7, 8, 9, 31, 32, 33, 45, 100] {
            let rows: Vec<UsageRecord> = (0..size)
                .map(|i| UsageRecord {
                    ts_ms: T0 * 1000 + i as i64,
                    key_id: None,
                    route: "chat",
                    alias: Some(Arc::from("m")),
                    deployment: None,
                    tokens_in: 1,
                    tokens_out: 2,
                    latency_us: 3,
                    ttfb_us: None,
                    status: 200,
                    cache_hit: false,
                    request_id: Arc::from(format!("req_{size}_{i}")),
                })
                .collect();
            db.store.insert_usage(&rows).await.unwrap();
            written += size as i64;
            assert_eq!(
                db.store.usage_rows().await.unwrap(),
                written,
                "{}: after a batch of {size}",
                db.kind
            );
        }
    }
}
