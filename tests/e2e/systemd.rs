//! The systemd notify protocol, for real: a Unix datagram socket in NOTIFY_SOCKET.

use std::time::Duration;

use tokio::net::UnixDatagram;
use tokio::process::Command;

use crate::harness::{TestEnv, sigterm};

async fn receive_until(socket: &UnixDatagram, seen: &mut Vec<String>, wanted: &str) {
    receive_count(socket, seen, wanted, 1).await;
}

/// Receives until `count` messages starting with `wanted` have arrived in all.
async fn receive_count(socket: &UnixDatagram, seen: &mut Vec<String>, wanted: &str, count: usize) {
    let mut buf = vec![0u8; 4096];
    let result = tokio::time::timeout(Duration::from_secs(20), async {
        while seen.iter().filter(|m| m.starts_with(wanted)).count() < count {
            let n = socket.recv(&mut buf).await.unwrap();
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.extend(text.lines().map(str::to_owned));
        }
    })
    .await;
    assert!(result.is_ok(), "no `{wanted}` within 20 s; got {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_watchdog_status_and_stopping_reach_systemd() {
    let env = TestEnv::new().await;
    env.add_user("alice").await;
    let config = env.write_config();
    let socket_path = env.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_storekeyd"))
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "2000000")
        .env("STOREKEYD_LOG", "off")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    receive_until(&socket, &mut seen, "READY=1").await;
    receive_until(&socket, &mut seen, "STATUS=").await;
    // The loop keeps feeding the watchdog while the daemon idles: several pets in a row.
    receive_count(&socket, &mut seen, "WATCHDOG=1", 4).await;
    let status = seen.iter().find(|m| m.starts_with("STATUS=")).unwrap();
    assert!(
        status.contains("1 active") && status.contains("next due"),
        "{status}"
    );

    sigterm(&child);
    receive_until(&socket, &mut seen, "STOPPING=1").await;
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_systemd_nothing_is_sent_and_nothing_fails() {
    let env = TestEnv::new().await;
    let config = env.write_config();
    let child = Command::new(env!("CARGO_BIN_EXE_storekeyd"))
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .env("STOREKEYD_LOG", "storekeyd=warn")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    sigterm(&child);
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("systemd"), "{stderr}");
}
