//! PostgreSQL as studios run it: new keys announced by the database, several replicas on one
//! database, and a server that restarts or cuts connections under them.

use std::time::Duration;

use storekeyd::policy::claims::Kind;

use crate::harness::{Db, TestEnv};

/// A key a backend writes is checked at once: the trigger's `NOTIFY` wakes the loop, which
/// would otherwise look only at its next poll, an hour away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_key_is_checked_long_before_the_next_poll() {
    let mut env = TestEnv::on(Db::Postgres).await;
    env.config.renew.poll_interval = Duration::from_secs(3600);
    env.add_user("alice").await;
    env.spawn_daemon().await;
    env.wait_until("alice checked", || async {
        env.row("alice", Kind::Collections).await.state == "active"
    })
    .await;
    // Idle now: nothing is due for days and the next poll is an hour away.
    env.add_user("bob").await;
    env.wait_until("bob checked, woken by the database", || async {
        env.row("bob", Kind::Collections).await.state == "active"
    })
    .await;
    env.stop_daemon().await;
}
