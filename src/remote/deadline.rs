//! A deadline judged on the time the process ran, not on the wall clock alone.
//!
//! A process frozen past a call's deadline (SIGSTOP, a VM paused or migrated, a suspended
//! host) wakes with the timer already expired and the Store's answer waiting in its socket.
//! A plain timeout polls the timer as soon as the process runs again, often before the
//! connection's task has read the answer, and gives up on a key the Store has just renewed.
//! Here the call is polled before the timer; when the timer fires the call gets one last short
//! look (the connection's task may not have run since the wake-up), and a timer that fires far
//! later than it was set for tells of a longer pause, after which the call gets a grace period
//! to finish. Graces are few, so a call still ends.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// A timer this late means the process did not run: no busy runtime is this slow.
const PAUSE_SLACK: Duration = Duration::from_secs(1);
/// What a call gets after a pause: long enough to read an answer that is already here.
const GRACE: Duration = Duration::from_secs(5);
/// At most this many graces: a server that trickles its answer to a process that stalls again
/// and again must not hold the call forever.
const MAX_GRACES: u32 = 2;
/// The last look when the timer fires: time for the tasks the wake-up made ready to run.
const LAST_LOOK: Duration = Duration::from_millis(100);

/// The call ran out of time (the process ran all along, or the grace after a pause ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `call` for `limit`, plus a last look of 100 ms, plus up to two graces of at most 5 s
/// each if the process was paused past the deadline (see the module's comment).
pub async fn within<F: Future>(limit: Duration, call: F) -> Result<F::Output, Elapsed> {
    tokio::pin!(call);
    let mut deadline = Instant::now() + limit;
    let mut graces = 0;
    loop {
        tokio::select! {
            biased;
            out = &mut call => return Ok(out),
            () = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                let paused = now.saturating_duration_since(deadline) >= PAUSE_SLACK;
                if !paused || graces == MAX_GRACES {
                    return tokio::time::timeout(LAST_LOOK, &mut call)
                        .await
                        .map_err(|_| Elapsed);
                }
                graces += 1;
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

    /// The calls' deadline: long enough for a loaded machine to send the request in time.
    const LIMIT: Duration = Duration::from_secs(2);

    /// Freezes the runtime's only thread (as SIGSTOP freezes the process) once the server has
    /// the request, for well past the call's deadline; the answer arrives meanwhile.
    fn freeze_once_sent(got: std::sync::mpsc::Receiver<()>) {
        tokio::spawn(async move {
            while got.try_recv().is_err() {
                tokio::task::yield_now().await;
            }
            std::thread::sleep(LIMIT + Duration::from_secs(2));
        });
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_that_arrived_during_a_pause_is_read() {
        let (url, got) = answering_server();
        let client = reqwest::Client::new();
        freeze_once_sent(got);
        let out = within(LIMIT, async {
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
        let client = reqwest::Client::builder().timeout(LIMIT).build().unwrap();
        freeze_once_sent(got);
        let out = client.post(&url).send().await;
        assert!(out.is_err_and(|e| e.is_timeout()));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_call_that_never_answers_times_out_at_its_limit() {
        let start = Instant::now();
        let out = within(Duration::from_secs(2), std::future::pending::<()>()).await;
        assert_eq!(out, Err(Elapsed));
        assert_eq!(start.elapsed(), Duration::from_secs(2) + LAST_LOOK);
    }

    /// A process that stalls again and again past every deadline still ends the call.
    #[tokio::test(flavor = "current_thread")]
    async fn graces_after_pauses_are_bounded() {
        let stall = tokio::spawn(async {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                std::thread::sleep(Duration::from_millis(1300));
            }
        });
        // Unbounded, the graces would go on for ever: the outer timeout ends the test.
        let call = within(Duration::from_millis(200), std::future::pending::<()>());
        let out = tokio::time::timeout(Duration::from_secs(20), call).await;
        stall.abort();
        assert_eq!(out, Ok(Err(Elapsed)));
    }
}
