//! The backend contract in README.md is the SQL the code and the tests use.

use storekeyd::storage::contract::{
    PG_BACKEND_GRANTS, PG_READ_KEY, PG_UPSERT_KEY, READ_KEY, UPSERT_KEY,
};

use crate::harness::{Db, on_backend};
use storekeyd::policy::state::State;

#[test]
fn readme_documents_the_exact_backend_statements() {
    let readme = include_str!("../../README.md");
    for sql in [UPSERT_KEY, READ_KEY, PG_UPSERT_KEY, PG_READ_KEY] {
        assert!(
            readme.contains(sql),
            "README.md must contain, verbatim:\n{sql}"
        );
    }
    // The grants sit in a list item: the same lines, indented.
    let unindented = |text: &str| {
        text.lines()
            .map(str::trim_start)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        unindented(readme).contains(&unindented(PG_BACKEND_GRANTS)),
        "README.md must contain the backend's grants:\n{PG_BACKEND_GRANTS}"
    );
}

/// A replayed login writes back a key the row was already renewed past: the newer key stays, and
/// the event log says so. (Before, the row went `pending` with the old key and the newer one was
/// gone.)
async fn re_storing_an_older_key_keeps_the_newer_one(db: Db) {
    use std::time::Duration;

    use storekeyd::policy::claims::Kind;

    use crate::harness::{DAY, TestEnv};

    let mut env = TestEnv::on(db).await;
    let first = env.add_due_user("alice").await;
    env.add_user("bob").await;
    env.spawn_daemon().await;
    env.run_until(Duration::from_secs(DAY), "alice renewed twice", || async {
        env.row("alice", Kind::Collections).await.renewals >= 2
    })
    .await;
    env.stop_daemon().await;
    let newest = env.row("alice", Kind::Collections).await.key;
    // The key renewed once, then again: both ancestors are refused, with the upsert as it is.
    let events: Vec<(String,)> = on_backend!(
        env.db,
        "SELECT outcome FROM store_key_events WHERE key_id = 1 AND outcome = 'renewed'",
        |pool, sql| sqlx::query_as(sql).fetch_all(pool).await.unwrap()
    );
    assert!(events.len() >= 2);
    env.store("alice", Kind::Collections, &first).await;
    env.store("alice", Kind::Collections, &format!("{first}\n"))
        .await;
    let row = env.row("alice", Kind::Collections).await;
    assert!(row.key == newest, "the newer key was replaced");
    assert_eq!(row.state, State::Active);
    let (kept,): (i64,) = on_backend!(
        env.db,
        "SELECT COUNT(*) FROM store_key_events WHERE key_id = ? AND outcome = 'stale_key_kept'",
        |pool, sql| sqlx::query_as(sql)
            .bind(row.id)
            .fetch_one(pool)
            .await
            .unwrap()
    );
    assert_eq!(kept, 2);
    // The newest key itself, padded (a form, a file): the same key, nothing changes.
    env.store("alice", Kind::Collections, &format!(" {newest}\n"))
        .await;
    let row = env.row("alice", Kind::Collections).await;
    assert!(row.key == newest, "the padded copy replaced the key");
    assert_eq!(row.state, State::Active);

    // A genuinely new key (a new login) still replaces it.
    let fresh = env.mint(Kind::Collections, crate::harness::APP, "alice");
    env.store("alice", Kind::Collections, &fresh).await;
    let row = env.row("alice", Kind::Collections).await;
    assert!(row.key == fresh, "a new login's key was refused");
    assert_eq!(row.state, State::Pending);
    // And bob, never renewed, is untouched by alice's lineage.
    assert_eq!(env.row("bob", Kind::Collections).await.state, State::Active);
}

crate::backend::on_both_databases!(re_storing_an_older_key_keeps_the_newer_one);
