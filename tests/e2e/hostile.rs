//! Hostile input from both sides: rows no key can be, answers no Store would give.

use std::time::Duration;
use storekeyd::policy::state::State;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use storekeyd::emulator::keymint;
use storekeyd::emulator::{Faults, WrongSuccessor};
use storekeyd::policy::claims::{AUD_COLLECTIONS, CLAIM_CLIENT_ID, Kind};

use crate::harness::{APP, Db, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_cannot_be_keys_are_flagged_and_never_stall_the_others() {
    let mut env = TestEnv::new().await;
    let pool = env.db.pool();
    let upsert = storekeyd::storage::contract::UPSERT_KEY;
    // Bytes that are not UTF-8, bound as a blob; a number; deep JSON; a megabyte claim.
    sqlx::query(upsert)
        .bind("blob")
        .bind("collections")
        .bind(vec![0x80u8, 0xff, 0x00, 0x41])
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(upsert)
        .bind("number")
        .bind("collections")
        .bind(12345i64)
        .execute(pool)
        .await
        .unwrap();
    let deep = format!("{}{}", "[".repeat(5_000), "]".repeat(5_000));
    let deep_key = format!("e30.{}.c2ln", URL_SAFE_NO_PAD.encode(deep));
    env.store("deep", Kind::Collections, &deep_key).await;
    let big = keymint::encode_claims(&serde_json::json!({
        "aud": AUD_COLLECTIONS, "iat": 1, "exp": 4_000_000_000i64, CLAIM_CLIENT_ID: APP, "pad": "x".repeat(1 << 20)
    }));
    env.store("big", Kind::Collections, &big).await;
    env.add_due_user("alice").await;
    env.spawn_daemon().await;

    env.wait_until("alice renewed", || async {
        env.row("alice", Kind::Collections).await.renewals == 1
    })
    .await;
    env.wait_until("the rest flagged", || async {
        env.count(State::Invalid).await == 4
    })
    .await;
    env.stop_daemon().await;
    for (user, why) in [
        ("blob", "not UTF-8"),
        ("number", "not a JWT"),
        ("deep", "not a JSON object"),
        ("big", "more than the"),
    ] {
        let reason = env.row(user, Kind::Collections).await.reason.unwrap();
        assert!(reason.contains(why), "{user}: {reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_no_store_would_give_are_never_written() {
    let mut env = TestEnv::new().await;
    env.config.http.request_timeout = Duration::from_secs(1);
    env.config.renew.lease = Duration::from_secs(5);
    env.spawn_daemon().await;
    let scenarios = [
        (
            "huge",
            Faults {
                huge_body_rate: 1.0,
                ..Faults::default()
            },
            "body over",
        ),
        (
            "trickle",
            Faults {
                trickle_rate: 1.0,
                ..Faults::default()
            },
            "timed out",
        ),
        (
            "kind",
            Faults {
                wrong_successor: Some(WrongSuccessor::Kind),
                ..Faults::default()
            },
            "purchase key",
        ),
        (
            "client",
            Faults {
                wrong_successor: Some(WrongSuccessor::Client),
                ..Faults::default()
            },
            "another clientId",
        ),
        (
            "user",
            Faults {
                wrong_successor: Some(WrongSuccessor::User),
                ..Faults::default()
            },
            "another userId",
        ),
    ];
    for (user, faults, expected) in scenarios {
        env.set_faults(faults);
        let key = env.add_due_user(user).await;
        let id = {
            env.wait_until(&format!("{user}: ingested"), || async {
                env.row(user, Kind::Collections).await.state == State::Active
            })
            .await;
            env.row(user, Kind::Collections).await.id
        };
        env.wait_until(&format!("{user}: a failed attempt"), || async {
            sqlx::query_as::<_, (String,)>("SELECT COALESCE(detail, '') FROM store_key_events WHERE key_id = ? AND outcome IN ('unexpected', 'transient', 'unanswered')")
                .bind(id)
                .fetch_all(env.db.pool())
                .await
                .unwrap()
                .iter()
                .any(|(d,)| d.contains(expected))
        })
        .await;
        let row = env.row(user, Kind::Collections).await;
        assert_eq!(
            (row.key.as_str(), row.state.as_str(), row.renewals),
            (key.as_str(), "active", 0),
            "{user}: the old key must be kept"
        );
    }
    env.set_faults(Faults::default());
    env.wait_until("all renewed once the Store behaves", || async {
        env.rows().await.iter().all(|r| r.renewals == 1)
    })
    .await;
    env.stop_daemon().await;
}

/// A claim holding U+0000 (which PostgreSQL's text cannot) is stored all the same, and the keys
/// written in the same batch are not held up by it.
async fn a_claim_holding_nul_neither_fails_its_batch_nor_stalls_the_others(db: Db) {
    use storekeyd::policy::claims::CLAIM_USER_ID;
    let mut env = TestEnv::on(db).await;
    let now = env.clock.now();
    let nul = keymint::encode_claims(&serde_json::json!({
        "aud": AUD_COLLECTIONS, "iat": now, "exp": now + 30 * 86_400,
        CLAIM_CLIENT_ID: APP, CLAIM_USER_ID: "nul\u{0}user"
    }));
    env.store("nul", Kind::Collections, &nul).await;
    env.add_due_user("alice").await;
    env.spawn_daemon().await;
    env.wait_until("alice renewed", || async {
        env.row("alice", Kind::Collections).await.renewals == 1
    })
    .await;
    env.stop_daemon().await;
    let row = env.row("nul", Kind::Collections).await;
    assert_eq!(
        (row.state.as_str(), row.key.as_str()),
        ("active", nul.as_str())
    );
}

crate::backend::on_both_databases!(
    a_claim_holding_nul_neither_fails_its_batch_nor_stalls_the_others
);

/// A backend row holding a 128 MiB "key" is flagged `invalid` by its length without the daemon
/// reading it (it read the whole value, and copied it, before the 16 KiB limit applied), and
/// the other keys renew meanwhile.
async fn an_oversized_row_is_flagged_without_being_read(db: Db) {
    use crate::harness::{sigterm, spawn_process};
    const BYTES: i64 = 128 << 20;
    let env = TestEnv::on(db).await;
    env.add_due_user("alice").await;
    let insert = match db {
        Db::Sqlite => {
            "INSERT INTO store_keys (user_ref, kind, key)
             VALUES ('huge', 'collections', replace(hex(zeroblob(? / 2)), '0', 'x'))"
        }
        Db::Postgres => {
            "INSERT INTO store_keys (user_ref, kind, key)
             VALUES ('huge', 'collections', repeat('x', CAST(? AS INTEGER)))"
        }
    };
    crate::backend::on_backend!(env.db, insert, |pool, sql| {
        sqlx::query(sql).bind(BYTES).execute(pool).await.unwrap();
    });
    let mut daemon = spawn_process(&env.write_config());
    let reason = || async {
        crate::backend::on_backend!(
            env.db,
            "SELECT reason FROM store_keys WHERE user_ref = 'huge' AND state = 'invalid'",
            |pool, sql| sqlx::query_as::<_, (Option<String>,)>(sql)
                .fetch_optional(pool)
                .await
                .unwrap()
        )
        .and_then(|(r,)| r)
    };
    env.wait_until("the huge row flagged and alice renewed", || async {
        reason().await.is_some() && env.row("alice", Kind::Collections).await.renewals == 1
    })
    .await;
    let peak = peak_memory(daemon.id().unwrap());
    sigterm(&daemon);
    daemon.wait().await.unwrap();
    let reason = reason().await.unwrap();
    assert!(
        reason.contains(&format!("key is {BYTES} bytes, more than the 16384")),
        "{reason}"
    );
    assert!(
        peak < BYTES as u64 / 2,
        "the daemon's peak memory was {peak} bytes: it read the row"
    );
}

/// A process's peak resident memory, in bytes (`VmHWM`).
fn peak_memory(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

crate::backend::on_both_databases!(an_oversized_row_is_flagged_without_being_read);
