//! A key the Store issued is never dropped: while the database stays unwritable the renewed keys
//! are held, then spooled to a 0600 file, and written once the database takes writes again (by
//! the running daemon, or at the next start). The Store retires a key once it renews it, so a
//! lost result would leave a row that can never renew again.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;
use storekeyd::policy::state::State;

use storekeyd::policy::claims::Kind;

use crate::harness::TestEnv;

const KEYS: usize = 6;

/// A daemon whose database a backend locks while renewals are in flight; returns once the Store
/// renewed every key, with the lock held.
async fn locked_env(spool_after: Duration) -> (TestEnv, sqlx::SqliteConnection) {
    let mut env = TestEnv::new().await;
    env.config.database_busy_timeout = Duration::from_millis(500);
    env.config.renew.spool_after = spool_after;
    let (backend, _) = env.lock_while_renewing(KEYS as u64).await;
    (env, backend)
}

/// The spool files in the state directory's `spool/` (`storekeyd-<pid>-<random>.spool`).
fn spools(env: &TestEnv) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(env.dir.path().join("spool"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "spool"))
        .collect()
}

fn spool_lines(env: &TestEnv) -> usize {
    spools(env)
        .iter()
        .map(|p| {
            std::fs::read_to_string(p).map_or(0, |t| t.lines().filter(|l| !l.is_empty()).count())
        })
        .sum()
}

/// Every row holds the newest key the Store issued for its user, renewed exactly once.
async fn assert_every_key_kept(env: &TestEnv) {
    env.wait_until("every renewed key written", || async {
        env.rows().await.iter().all(|r| r.renewals == 1)
    })
    .await;
    for i in 0..KEYS {
        let user = format!("user-{i}");
        let row = env.row(&user, Kind::Collections).await;
        assert_eq!(
            env.emu.latest_key(Kind::Collections, &user).as_deref(),
            Some(row.key.as_str()),
            "{user}: the row does not hold the key the Store issued"
        );
        assert_eq!(row.state, State::Active, "{user}: {:?}", row.reason);
    }
    assert_eq!(
        env.emu.stats().renewed,
        KEYS as u64,
        "a key was renewed twice: a result was lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_spooled_while_the_database_stays_locked_are_written_when_it_frees() {
    let (env, mut backend) = locked_env(Duration::from_secs(1)).await;
    env.wait_until("the renewed keys spooled", || async {
        spool_lines(&env) == KEYS
    })
    .await;
    let mode = std::fs::metadata(&spools(&env)[0])
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the spool holds keys: owner only");
    assert!(
        env.rows().await.iter().all(|r| r.renewals == 0),
        "nothing written while locked"
    );

    sqlx::query("COMMIT").execute(&mut backend).await.unwrap();
    assert_every_key_kept(&env).await;
    env.wait_until("the spool emptied", || async { spools(&env).is_empty() })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_the_database_is_locked_spools_and_the_next_start_writes_first() {
    // Long enough that only the stop makes the daemon give up on the database.
    let (mut env, mut backend) = locked_env(Duration::from_secs(600)).await;
    env.stop_daemon().await;
    assert_eq!(
        spool_lines(&env),
        KEYS,
        "the stop spooled every renewed key"
    );
    sqlx::query("COMMIT").execute(&mut backend).await.unwrap();
    assert!(
        env.rows().await.iter().all(|r| r.renewals == 0),
        "nothing was written while locked"
    );

    env.spawn_daemon().await;
    assert_every_key_kept(&env).await;
    assert!(
        spools(&env).is_empty(),
        "the start applied the spool and removed it"
    );
    env.stop_daemon().await;
}
