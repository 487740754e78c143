//! A deadline judged on the time the process ran, not on the wall clock alone.
//!
//! A process frozen past a call's deadline (SIGSTOP, a VM paused or migrated, a suspended
//! host) wakes with the timer already expired and the Store's answer waiting in its socket.
//! A plain timeout polls the timer as soon as the process runs again, often before the
//! connection's task has read the answer, and gives up on a key the Store has just renewed.
//! Here a timer that fires far later than it was set for tells of such a pause, and the call
//! gets a grace period to finish.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// A timer this late means the process did not run: no busy runtime is this slow.
const PAUSE_SLACK: Duration = Duration::from_secs(1);
/// What a call gets after a pause: long enough to read an answer that is already here.
const GRACE: Duration = Duration::from_secs(5);

/// The call ran out of time (the process ran all along, or the grace after a pause ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `call` for at most `limit` of running time (see the module's comment).
pub async fn within<F: Future>(limit: Duration, call: F) -> Result<F::Output, Elapsed> {
    tokio::pin!(call);
    let mut deadline = Instant::now() + limit;
    loop {
        tokio::select! {
            biased;
            out = &mut call => return Ok(out),
            () = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                if now.saturating_duration_since(deadline) < PAUSE_SLACK {
                    return Err(Elapsed);
                }
                deadline = now + GRACE.min(limit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    /// A server on its own thread that answers one request at once, and says when it has it.
    fn answering_server() -> (String, std::sync::mpsc::Receiver<()>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/renew", listener.local_addr().unwrap());
        let (got, got_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).unwrap();
            let _ = got.send(());
            conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .unwrap();
            // Held open until the client is done with it.
            let _ = conn.read(&mut buf);
        });
        (url, got_rx)
    }

    /// Freezes the runtime's only thread (as SIGSTOP freezes the process) once the server has
    /// the request, for longer than the call's deadline; the answer arrives meanwhile.
    fn freeze_once_sent(got: std::sync::mpsc::Receiver<()>) {
        tokio::spawn(async move {
            while got.try_recv().is_err() {
                tokio::task::yield_now().await;
            }
            std::thread::sleep(Duration::from_millis(1600));
        });
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_that_arrived_during_a_pause_is_read() {
        let (url, got) = answering_server();
        let client = reqwest::Client::new();
        freeze_once_sent(got);
        let out = within(Duration::from_millis(300), async {
            client.post(&url).send().await?.text().await
        })
        .await;
        assert_eq!(out.map(|r| r.ok()), Ok(Some("ok".to_owned())));
    }

    /// What `within` replaces: reqwest's own timeout looks at its timer before the response,
    /// so the answer is lost. (If this ever passes, reqwest changed and the test above tests
    /// less than it says.)
    #[tokio::test(flavor = "current_thread")]
    async fn reqwests_timeout_loses_it() {
        let (url, got) = answering_server();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        freeze_once_sent(got);
        let out = client.post(&url).send().await;
        assert!(out.is_err_and(|e| e.is_timeout()));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_call_that_never_answers_times_out_at_its_limit() {
        let start = Instant::now();
        let out = within(Duration::from_secs(2), std::future::pending::<()>()).await;
        assert_eq!(out, Err(Elapsed));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }
}
