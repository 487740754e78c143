//! The database misbehaves: a backend holds the write lock, or writes start failing. The daemon
//! waits, says so, loses no result and recovers.

use std::time::Duration;
use storekeyd::policy::state::State;

use storekeyd::emulator::Faults;

use crate::harness::{TestEnv, full};

/// Ready again once writes work, stopped cleanly, and the database file intact.
async fn assert_recovered(env: &mut TestEnv) {
    env.wait_until("ready again", || async {
        env.get("/readyz").await.0 == 200
    })
    .await;
    env.stop_daemon().await;
    let (check,): (String,) = sqlx::query_as("PRAGMA integrity_check")
        .fetch_one(env.db.pool())
        .await
        .unwrap();
    assert_eq!(check, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_write_lock_delays_but_loses_no_renewal() {
    // The long version holds the lock for 30 s against the default 15 s busy timeout.
    let (hold, busy) = if full() { (30, 15) } else { (4, 1) };
    let mut env = TestEnv::new().await;
    env.config.database_busy_timeout = Duration::from_secs(busy);
    // Results are kept and retried for up to a lease (2 minutes by default).
    env.config.renew.lease = Duration::from_secs(120);
    let keys = 6;
    // A backend's long transaction: holds the write lock while the Store answers.
    let (mut backend, locked) = env.lock_while_renewing(keys).await;
    tokio::time::sleep(Duration::from_secs(hold).saturating_sub(locked.elapsed())).await;
    sqlx::query("COMMIT").execute(&mut backend).await.unwrap();

    env.wait_until("the results written after the lock", || async {
        env.rows().await.iter().all(|r| r.renewals == 1)
    })
    .await;
    eprintln!(
        "db lock: held {hold} s (busy timeout {busy} s); {keys} renewals written {:.1} s after the lock was taken, none lost",
        locked.elapsed().as_secs_f64()
    );
    assert_eq!(
        env.emu.stats().renewed,
        keys,
        "the Store renewed a key twice: a result was lost"
    );
    env.stop_daemon().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_writes_make_it_unready_without_corruption_and_it_recovers() {
    let mut env = TestEnv::new().await;
    env.set_faults(Faults {
        retire_renewed_keys: true,
        ..Faults::default()
    });
    env.add_due_user("alice").await;
    // Writes to the keys table fail the way a full or read-only database fails them. (Tests run
    // as root, who ignores file modes, and cannot mount a small file system here.)
    sqlx::query(
        "CREATE TRIGGER fail_writes BEFORE UPDATE ON store_keys
         BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END",
    )
    .execute(env.db.pool())
    .await
    .unwrap();
    env.spawn_daemon().await;
    // Not ready because of the database (a fresh daemon is also unready until its tokens come).
    env.wait_until("not ready: the database", || async {
        let (status, body) = env.get("/readyz").await;
        status == 503 && body.contains("fail  database")
    })
    .await;
    assert_eq!(
        env.get("/healthz").await.0,
        200,
        "the loop must keep running"
    );
    assert_eq!(
        env.row("alice", storekeyd::policy::claims::Kind::Collections)
            .await
            .state,
        State::Pending
    );

    sqlx::query("DROP TRIGGER fail_writes")
        .execute(env.db.pool())
        .await
        .unwrap();
    env.wait_until("recovered and renewed", || async {
        env.row("alice", storekeyd::policy::claims::Kind::Collections)
            .await
            .renewals
            == 1
    })
    .await;
    assert_recovered(&mut env).await;
}

/// A small tmpfs for the database, unmounted on drop. `None` where mounting is not permitted.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap().keep();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk(dir))
    }

    fn remount(&self, mode: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount {mode} failed");
    }

    /// Fills the file system up to its last byte with a file it can later delete.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write as _;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.write_all(&[0u8; 1]);
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_then_full_disk_is_reported_and_recovered_from() {
    use storekeyd::policy::claims::Kind;
    let Some(disk) = SmallDisk::mount("16M") else {
        eprintln!(
            "cannot mount a tmpfs here (not root?): the trigger-based test covers failing writes"
        );
        return;
    };
    let mut env = TestEnv::with_database(Some(disk.0.join("keys.db"))).await;
    env.config.renew.lease = Duration::from_secs(10);

    // Read-only at start (Linux refuses to remount a file system read-only while a file on it is
    // open for writing, so this is what a read-only disk looks like to storekeyd): a clear error
    // and exit 1, no half-started daemon.
    env.db.close().await;
    disk.remount("ro");
    let config =
        env.write_config_to(&std::env::temp_dir().join(format!("ro-{}.toml", std::process::id())));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_storekeyd"))
        .args(["run", "--config"])
        .arg(&config)
        .env("STOREKEYD_LOG", "off")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "read-only disk: exit {:?}, {}",
        out.status.code(),
        stderr.trim()
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("is not writable (Read-only file system"),
        "{stderr}"
    );
    disk.remount("rw");
    env.db = crate::harness::Backend::open(&env.config.database_url(), None).await;

    // Slow answers, so that the disk fills while renewals are in flight.
    env.set_faults(Faults {
        latency_ms: 1500,
        retire_renewed_keys: true,
        ..Faults::default()
    });
    env.spawn_daemon().await;
    // Full: not a byte left for the results of renewals already in flight.
    for i in 0..100 {
        env.add_due_user(&format!("user-{i}")).await;
    }
    env.wait_until("renewals in flight", || async {
        env.emu.stats().renew_requests >= 5
    })
    .await;
    let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(env.db.pool())
        .await;
    let filler = disk.fill();
    env.wait_until("not ready on a full disk", || async {
        let (status, body) = env.get("/readyz").await;
        status == 503 && body.contains("fail  database")
    })
    .await;
    let (_, body) = env.get("/readyz").await;
    eprintln!(
        "full disk: /readyz says {}",
        body.lines()
            .find(|l| l.contains("database"))
            .unwrap_or_default()
    );
    std::fs::remove_file(filler).unwrap();
    env.wait_until("every key renewed once there is room", || async {
        env.rows().await.iter().all(|r| r.renewals == 1)
    })
    .await;
    assert_recovered(&mut env).await;
    let rows = env.rows().await;
    for row in &rows {
        let user = sqlx::query_as::<_, (String,)>("SELECT user_ref FROM store_keys WHERE id = ?")
            .bind(row.id)
            .fetch_one(env.db.pool())
            .await
            .unwrap()
            .0;
        assert_eq!(
            env.emu.latest_key(Kind::Collections, &user).as_deref(),
            Some(row.key.as_str()),
            "{user}"
        );
    }
    assert_eq!(
        env.emu.stats().renewed as usize,
        rows.len(),
        "a renewal was redone: its result was lost to the full disk"
    );
    eprintln!(
        "full disk: {} keys, {} renewals by the Store (none redone), integrity ok",
        rows.len(),
        env.emu.stats().renewed,
    );
}
