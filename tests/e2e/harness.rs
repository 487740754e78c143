//! Starts the emulator on port 0 and the real daemon on a fresh database (a SQLite file, or a
//! PostgreSQL database of the test's own), both on one controllable clock, and reads the
//! database the way a backend would.

use std::sync::{Arc, Once};
use std::time::Duration;

use storekeyd::clock::Clock;
use storekeyd::config::Config;
use storekeyd::daemon::{self, DaemonError};
use storekeyd::demo;
use storekeyd::emulator::{self, Emulator, Faults};
use storekeyd::policy::claims::Kind;
use storekeyd::policy::state::State;
use storekeyd::storage;
use storekeyd::storage::contract;

pub(crate) use crate::backend::{Backend, Db, PgDatabase, on_backend};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub(crate) const TENANT: &str = "test-tenant";
pub(crate) const APP: &str = "app-main";
pub(crate) const OTHER_APP: &str = "app-other";
pub(crate) const DAY: u64 = 86_400;
pub(crate) const KEY_LIFETIME: i64 = 30 * 86_400;

/// Tracing output only when `TEST_LOG` is set (e.g. `TEST_LOG=storekeyd=debug`).
fn init_logging() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
    });
}

/// One key row as the tests look at it.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub id: i64,
    pub key: String,
    pub state: State,
    pub reason: Option<String>,
    pub expires_at: Option<i64>,
    pub next_attempt_at: Option<i64>,
    pub lease_until: Option<i64>,
    pub renewals: i64,
    pub attempts: i64,
    pub key_fp: Option<String>,
}

const ROW_SELECT: &str = "SELECT id, CAST(key AS BLOB), state, reason, expires_at, next_attempt_at, lease_until, renewals, attempts, key_fp FROM store_keys";

type RawRow = (
    i64,
    Vec<u8>,
    String,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    i64,
    i64,
    Option<String>,
);

impl From<RawRow> for Row {
    fn from(r: RawRow) -> Row {
        Row {
            id: r.0,
            key: String::from_utf8_lossy(&r.1).into_owned(),
            state: State::parse(&r.2).unwrap_or_else(|| panic!("a row in state {:?}", r.2)),
            reason: r.3,
            expires_at: r.4,
            next_attempt_at: r.5,
            lease_until: r.6,
            renewals: r.7,
            attempts: r.8,
            key_fp: r.9,
        }
    }
}

pub(crate) struct TestEnv {
    pub clock: Clock,
    pub emu: Arc<Emulator>,
    pub config: Config,
    /// The backend's connection.
    pub db: Backend,
    pub dir: TempDir,
    /// Where the running daemon serves /metrics, /healthz and /readyz.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How long `run_until` and `wait_until` wait (real time) without the clock moving before
    /// failing.
    pub patience: Duration,
    emu_stop: CancellationToken,
    daemon: Option<(CancellationToken, JoinHandle<Result<(), DaemonError>>)>,
}

impl TestEnv {
    pub(crate) async fn new() -> TestEnv {
        TestEnv::with_database(None).await
    }

    /// A test env on `db`: SQLite in the temp dir, or a PostgreSQL database of its own.
    pub(crate) async fn on(db: Db) -> TestEnv {
        match db {
            Db::Sqlite => TestEnv::new().await,
            Db::Postgres => TestEnv::setup(None, Some(PgDatabase::create().await)).await,
        }
    }

    /// A test env on a database of its own on the PostgreSQL server `admin_url` names.
    pub(crate) async fn on_server(admin_url: &str) -> TestEnv {
        TestEnv::setup(None, Some(PgDatabase::create_on(admin_url).await)).await
    }

    /// A test env whose database lives at `path` (a file system the test controls).
    pub(crate) async fn with_database(path: Option<std::path::PathBuf>) -> TestEnv {
        TestEnv::setup(path, None).await
    }

    async fn setup(path: Option<std::path::PathBuf>, pg: Option<PgDatabase>) -> TestEnv {
        init_logging();
        let clock = Clock::system();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let emu = emulator::for_listener(&listener, clock.clone()).unwrap();
        let emu_stop = CancellationToken::new();
        tokio::spawn(emulator::serve(listener, emu.clone(), emu_stop.clone()));
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(&emu, &dir);
        if let Some(path) = path {
            config.database_url = Some(format!("sqlite://{}", path.display()));
        }
        if let Some(pg) = &pg {
            config.database_url = Some(pg.url());
        }
        let db = Backend::open(&config.database_url(), pg).await;
        TestEnv {
            clock,
            emu,
            config,
            db,
            dir,
            metrics_addr: None,
            patience: Duration::from_secs(if full() { 600 } else { 30 }),
            emu_stop,
            daemon: None,
        }
    }

    /// Starts the daemon with this env's config and its own database connection.
    pub(crate) async fn spawn_daemon(&mut self) {
        assert!(self.daemon.is_none(), "daemon already running");
        let db = storage::open(&self.config.database_url(), &self.config.db_options())
            .await
            .unwrap();
        let stop = CancellationToken::new();
        let config = Arc::new(self.config.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.metrics_addr = Some(listener.local_addr().unwrap());
        let handle = tokio::spawn(daemon::run(
            config,
            db,
            self.clock.clone(),
            Some(listener),
            stop.clone(),
        ));
        self.daemon = Some((stop, handle));
    }

    /// Stops the daemon as SIGTERM does and waits for it to exit cleanly.
    pub(crate) async fn stop_daemon(&mut self) {
        let (stop, handle) = self.daemon.take().expect("daemon not running");
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("daemon did not stop within 30 s")
            .expect("daemon task panicked")
            .expect("daemon returned an error");
    }

    pub(crate) fn set_faults(&self, faults: Faults) {
        self.emu.set_faults(faults);
    }

    pub(crate) fn mint(&self, kind: Kind, client_id: &str, user: &str) -> String {
        self.emu.mint(kind, client_id, user, KEY_LIFETIME)
    }

    /// Stores a key with the backend contract's statement.
    pub(crate) async fn store(&self, user: &str, kind: Kind, key: &str) {
        contract::upsert_key(self.db.any(), user, kind.as_str(), key)
            .await
            .unwrap();
    }

    /// Mints a collections key for `user` and stores it.
    pub(crate) async fn add_user(&self, user: &str) -> String {
        let key = self.mint(Kind::Collections, APP, user);
        self.store(user, Kind::Collections, &key).await;
        key
    }

    /// Stores `n` collections keys for `prefix-0` …, issued two days ago: healthy, and not due
    /// for weeks.
    pub(crate) async fn add_healthy_users(&self, prefix: &str, n: usize) {
        for i in 0..n {
            let user = format!("{prefix}-{i}");
            let issued = self.clock.now() - 2 * DAY as i64;
            let key = self
                .emu
                .mint_at(Kind::Collections, APP, &user, KEY_LIFETIME, issued);
            self.store(&user, Kind::Collections, &key).await;
        }
    }

    /// Mints a collections key issued 20 days ago (due now) for `user` and stores it. Tests that
    /// count exact outcomes use these and leave the clock alone: a clock that jumps by days
    /// would also expire access tokens in flight.
    pub(crate) async fn add_due_user(&self, user: &str) -> String {
        self.add_due_key(user, APP).await
    }

    /// Like [`TestEnv::add_due_user`] for any application.
    pub(crate) async fn add_due_key(&self, user: &str, client_id: &str) -> String {
        let issued = self.clock.now() - 20 * DAY as i64;
        let key = self
            .emu
            .mint_at(Kind::Collections, client_id, user, KEY_LIFETIME, issued);
        self.store(user, Kind::Collections, &key).await;
        key
    }

    /// The application's credential alarm, as `/metrics` shows it.
    pub(crate) async fn credential_alarm(&self, app: &str) -> Option<f64> {
        let text = self.get("/metrics").await.1;
        metric(
            &text,
            &format!("storekeyd_credential_alarm{{application=\"{app}\"}}"),
        )
    }

    /// Stores `n` keys for `user-0` … issued 20 days ago (due now), a thousand to a
    /// transaction, as a backend's bulk import would.
    pub(crate) async fn add_due_users(&self, n: usize) -> Vec<String> {
        use storekeyd::policy::claims::KeyText;
        use storekeyd::storage::NewKey;
        let db = storage::connect(&self.config.database_url(), &self.config.db_options())
            .await
            .unwrap();
        let issued = self.clock.now() - 20 * DAY as i64;
        let users: Vec<String> = (0..n).map(|i| format!("user-{i}")).collect();
        for chunk in users.chunks(1000) {
            let keys: Vec<NewKey> = chunk
                .iter()
                .map(|user| NewKey {
                    user_ref: user.clone(),
                    kind: Kind::Collections,
                    key: KeyText::new(self.emu.mint_at(
                        Kind::Collections,
                        APP,
                        user,
                        KEY_LIFETIME,
                        issued,
                    )),
                })
                .collect();
            db.store_keys(&keys).await.unwrap();
        }
        db.close().await;
        users
    }

    /// Rows not renewed yet.
    pub(crate) async fn unrenewed(&self) -> i64 {
        let (n,): (i64,) = on_backend!(
            self.db,
            "SELECT COUNT(*) FROM store_keys WHERE renewals = 0",
            |pool, sql| sqlx::query_as(sql).fetch_one(pool).await.unwrap()
        );
        n
    }

    /// Counts rows by state.
    pub(crate) async fn count(&self, state: State) -> usize {
        self.rows()
            .await
            .iter()
            .filter(|r| r.state == state)
            .count()
    }

    pub(crate) async fn row(&self, user: &str, kind: Kind) -> Row {
        let raw: RawRow = on_backend!(
            self.db,
            format!("{ROW_SELECT} WHERE user_ref = ? AND kind = ?"),
            |pool, sql| sqlx::query_as(sql)
                .bind(user)
                .bind(kind.as_str())
                .fetch_one(pool)
                .await
                .unwrap()
        );
        Row::from(raw)
    }

    pub(crate) async fn rows(&self) -> Vec<Row> {
        let raw: Vec<RawRow> =
            on_backend!(self.db, format!("{ROW_SELECT} ORDER BY id"), |pool, sql| {
                sqlx::query_as(sql).fetch_all(pool).await.unwrap()
            });
        raw.into_iter().map(Row::from).collect()
    }

    /// Outcomes recorded for a row, oldest first.
    pub(crate) async fn outcomes(&self, key_id: i64) -> Vec<(String, i64, Option<i64>)> {
        on_backend!(
            self.db,
            "SELECT outcome, at, http_status FROM store_key_events WHERE key_id = ? ORDER BY id",
            |pool, sql| sqlx::query_as(sql)
                .bind(key_id)
                .fetch_all(pool)
                .await
                .unwrap()
        )
    }

    /// Polls `check` every 20 ms, moving the shared clock forward by up to `step` each time,
    /// until it holds; panics with `what` once `patience` (30 s unless the test sets it; 10
    /// minutes for the long versions) passes without the clock moving, or after ten times that
    /// in all. The clock stands still while a key is due and not yet acted on (see
    /// [`TestEnv::advance_toward_next_due`]), so a slow machine slows the test, never fails it:
    /// hours of simulated time cost a loaded machine more than `patience`, but each step is
    /// progress.
    pub(crate) async fn run_until<F, Fut>(&self, step: Duration, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = tokio::time::Instant::now();
        let (mut stalled_at, give_up) = (start + self.patience, start + self.patience * 10);
        loop {
            if check().await {
                return;
            }
            let now = tokio::time::Instant::now();
            assert!(
                now < stalled_at && now < give_up,
                "timed out waiting for: {what}"
            );
            if self.advance_toward_next_due(step).await {
                stalled_at = now + self.patience;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Moves the clock forward by `step`, but not while a key waits to be checked, is due or is
    /// being worked on: every key the clock made due gets its attempt before time moves on.
    /// Returns whether it moved the clock.
    async fn advance_toward_next_due(&self, step: Duration) -> bool {
        if step.is_zero() {
            return false;
        }
        let (pending, leased, due): (i64, i64, Option<i64>) = on_backend!(
            self.db,
            "SELECT COUNT(CASE WHEN state = 'pending' THEN 1 END),
                    COUNT(CASE WHEN state = 'active' AND lease_until IS NOT NULL THEN 1 END),
                    MIN(CASE WHEN state = 'active' THEN next_attempt_at END)
             FROM store_keys",
            |pool, sql| sqlx::query_as(sql).fetch_one(pool).await.unwrap()
        );
        let now = self.clock.now();
        if pending > 0 || leased > 0 || due.is_some_and(|d| d <= now) {
            return false;
        }
        self.clock.advance(step);
        true
    }

    /// Waits without moving the clock.
    pub(crate) async fn wait_until<F, Fut>(&self, what: &str, check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        self.run_until(Duration::ZERO, what, check).await;
    }
}

impl TestEnv {
    /// Starts the daemon on `keys` due keys (`user-0` …) whose renewals take 700 ms at a Store
    /// that retires renewed keys, and takes the database's write lock (a backend's long
    /// transaction) while they are in flight. Returns once the Store has renewed every key, with
    /// the lock still held, and when it was taken.
    pub(crate) async fn lock_while_renewing(
        &mut self,
        keys: u64,
    ) -> (sqlx::SqliteConnection, std::time::Instant) {
        use sqlx::Connection as _;
        for i in 0..keys {
            self.add_due_user(&format!("user-{i}")).await;
        }
        self.set_faults(Faults {
            latency_ms: 700,
            retire_renewed_keys: true,
            ..Faults::default()
        });
        self.spawn_daemon().await;
        self.wait_until("renewals in flight", || async {
            self.emu.stats().renew_requests >= keys
        })
        .await;
        let mut backend = sqlx::SqliteConnection::connect(&self.config.database_url())
            .await
            .unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut backend)
            .await
            .unwrap();
        let locked = std::time::Instant::now();
        self.wait_until("the Store renewed every key", || async {
            self.emu.stats().renewed >= keys
        })
        .await;
        (backend, locked)
    }
}

/// The value of one sample in Prometheus text, e.g. `storekeyd_breaker_open{kind="collections"}`.
pub(crate) fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

/// Starts `storekeyd run` on a config file, as its own process (a replica), silent unless
/// `TEST_LOG` says otherwise.
pub(crate) fn spawn_process(config: &std::path::Path) -> tokio::process::Child {
    let log = std::env::var("TEST_LOG").unwrap_or_else(|_| "off".to_owned());
    tokio::process::Command::new(env!("CARGO_BIN_EXE_storekeyd"))
        .args(["run", "--config"])
        .arg(config)
        .env("STOREKEYD_LOG", log)
        .stdout(std::process::Stdio::null())
        .stderr(if std::env::var_os("TEST_LOG").is_some() {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        })
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Sends SIGTERM (what systemd sends on stop) to a child process.
pub(crate) fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("the child has exited").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM {pid} failed");
}

/// Whether the `STOREKEYD_FULL` opt-in asks for the long versions of the reliability tests.
pub(crate) fn full() -> bool {
    std::env::var_os("STOREKEYD_FULL").is_some()
}

/// What a run of the binary printed and how it exited.
#[derive(Debug)]
pub(crate) struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl TestEnv {
    /// Writes this env's config to a file for the binary, returning its path.
    pub(crate) fn write_config(&self) -> std::path::PathBuf {
        self.write_config_to(&self.dir.path().join("storekeyd.toml"))
    }

    pub(crate) fn write_config_to(&self, path: &std::path::Path) -> std::path::PathBuf {
        std::fs::write(path, toml::to_string(&self.config).unwrap()).unwrap();
        path.to_owned()
    }

    /// Runs `storekeyd --config <this env's config> ARGS`, feeding `stdin`.
    pub(crate) async fn cli(&self, args: &[&str], stdin: &str) -> Output {
        use tokio::io::AsyncWriteExt as _;
        let config = self.write_config();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_storekeyd"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("STOREKEYD_LOG", "off")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.as_bytes()).await.unwrap();
        drop(input);
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("the command did not finish")
            .unwrap();
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// GETs a path from the running daemon's metrics listener.
    pub(crate) async fn get(&self, path: &str) -> (u16, String) {
        let addr = self.metrics_addr.expect("daemon not running");
        let resp = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some((stop, _)) = &self.daemon {
            stop.cancel();
        }
        self.emu_stop.cancel();
    }
}

/// Production defaults, but fast polling and short timeouts, pointed at the emulator.
pub(crate) fn test_config(emu: &Emulator, dir: &TempDir) -> Config {
    let mut config = Config {
        database_url: Some(format!("sqlite://{}", dir.path().join("keys.db").display())),
        state_directory: Some(dir.path().to_path_buf()),
        ..Config::default()
    };
    demo::point_at_emulator(&mut config, emu);
    for client_id in [APP, OTHER_APP] {
        let secret = format!("secret-of-{client_id}");
        demo::add_emulated_application(&mut config, emu, dir.path(), TENANT, client_id, &secret)
            .unwrap();
    }
    let r = &mut config.renew;
    r.poll_interval = Duration::from_millis(50);
    r.backoff_base = Duration::from_secs(1);
    r.backoff_cap = Duration::from_secs(10);
    r.rate_limit = 1000.0;
    r.lease = Duration::from_secs(10);
    r.shutdown_grace = Duration::from_secs(10);
    // Canaries as often as a test can wait for them.
    config.guard.canary_interval = Duration::from_secs(1);
    config.guard.canary_min_age = Duration::from_secs(2);
    config.metrics.listen = "127.0.0.1:0".parse().unwrap();
    config.http.connect_timeout = Duration::from_secs(1);
    config.http.request_timeout = Duration::from_secs(2);
    config.validate().unwrap();
    config
}

pub(crate) fn write_private(path: &std::path::Path, contents: &str) {
    storekeyd::demo::write_private(path, contents).unwrap();
}
