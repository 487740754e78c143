//! The README's first command works and shows real renewals.

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_renews_keys_and_flags_the_bad_ones() {
    let output = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_storekeyd"))
            .args(["demo", "--duration", "30s"])
            .output(),
    )
    .await
    .expect("the demo did not finish")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(" renewed "), "no renewal shown:\n{stdout}");
    for flagged in [
        "player-revoked    revoked",
        "player-expired    expired",
        "player-other-app  misconfigured",
        "player-garbage    invalid",
    ] {
        assert!(
            stdout.contains(flagged),
            "missing `{flagged}` in:\n{stdout}"
        );
    }
    for healthy in ["player-1 ", "player-2 ", "player-3 ", "player-4 "] {
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with(healthy.trim_end()))
            .unwrap();
        assert!(line.contains("active"), "{line}");
    }
}
