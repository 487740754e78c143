//! A PostgreSQL server of one test's own (initdb in a temp dir, its own port), for the tests
//! that stop and restart the server under the daemon: the shared server on 5432 serves the
//! other tests meanwhile.

use std::path::PathBuf;
use std::process::Command;

pub(crate) struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// Server settings beyond the defaults (`-c name=value …`).
    settings: String,
}

impl PgServer {
    pub(crate) fn start_new() -> PgServer {
        PgServer::start_new_with(&["-A", "trust"], |_| String::new())
    }

    /// Connections over TCP must give `postgres`'s password (SCRAM); the socket trusts.
    pub(crate) fn start_new_with_password(password: &str) -> PgServer {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), password).unwrap();
        if as_root() {
            run(Command::new("chown").arg("postgres").arg(file.path()));
        }
        let pwfile = format!("--pwfile={}", file.path().display());
        PgServer::start_new_with(
            &["--auth-local=trust", "--auth-host=scram-sha-256", &pwfile],
            |_| String::new(),
        )
    }

    /// With TLS on, serving `cert` (PEM) and its `key`.
    pub(crate) fn start_new_with_tls(cert: &str, key: &str) -> PgServer {
        PgServer::start_new_with(&["-A", "trust"], |dir| {
            let (cert_path, key_path) = (dir.join("server.crt"), dir.join("server.key"));
            std::fs::write(&cert_path, cert).unwrap();
            std::fs::write(&key_path, key).unwrap();
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
            format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert_path.display(),
                key_path.display()
            )
        })
    }

    /// `settings` makes the server's extra settings from its directory (before initdb).
    fn start_new_with(
        auth: &[&str],
        settings: impl FnOnce(&std::path::Path) -> String,
    ) -> PgServer {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL's binaries in /usr/lib/postgresql")
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .find(|b| b.join("initdb").exists())
            .expect("initdb");
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let settings = settings(dir.path());
        let server = PgServer {
            dir,
            bin,
            port,
            settings,
        };
        if as_root() {
            // The server refuses to run as root: it runs as `postgres`, in a directory it owns.
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(server.dir.path()));
        }
        run(server
            .command("initdb")
            .args(auth)
            .args(["-U", "postgres", "--no-sync", "-D"])
            .arg(server.data()));
        server.start();
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    pub(crate) fn start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off{}",
            self.port,
            self.dir.path().display(),
            self.settings
        );
        run(self
            .command("pg_ctl")
            .args(["-w", "-s", "-l"])
            .arg(self.dir.path().join("log"))
            .arg("-D")
            .arg(self.data())
            .args(["-o", &options, "start"]));
    }

    /// As `systemctl stop postgresql` does: sessions ended, the port closed.
    pub(crate) fn stop(&self) {
        run(self
            .command("pg_ctl")
            .args(["-w", "-s", "-m", "fast", "-D"])
            .arg(self.data())
            .arg("stop"));
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-w", "-s", "-m", "immediate", "-D"])
            .arg(self.data())
            .arg("stop")
            .output();
    }
}

fn as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt as _;
        m.uid() == 0
    })
}

fn run(command: &mut Command) {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
