//! The Store's renew call: one POST of `{serviceTicket, key}` to a configured endpoint.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::policy::claims::KeyText;
use crate::policy::outcome::{self, Outcome, Response};
use crate::remote::deadline;
use crate::remote::entra::AccessToken;
use crate::remote::http::{self, BodyError, MsHeaders};
use crate::remote::server_time::ServerTime;

#[derive(Debug, Clone)]
pub struct RenewClient {
    /// Without a total timeout of its own (see [`deadline`]).
    http: reqwest::Client,
    timeout: Duration,
    max_body: usize,
    server_time: Arc<ServerTime>,
}

/// Everything one renew call produced, for the decision and the event row.
#[derive(Debug, Clone)]
pub struct RenewResponse {
    pub outcome: Outcome,
    pub status: Option<u16>,
    pub error_code: Option<String>,
    pub ms: MsHeaders,
    pub duration_ms: i64,
    /// Unix seconds when the request was sent.
    pub started_at: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RenewBody<'a> {
    service_ticket: &'a str,
    // Lowercase `key`, as the table and the official library send it.
    key: &'a str,
}

impl RenewClient {
    /// `http` must have no total timeout (see [`http::renew_client`]): `timeout` bounds each
    /// call, judged on the time the process ran.
    pub fn new(
        http: reqwest::Client,
        timeout: Duration,
        max_body: usize,
        server_time: Arc<ServerTime>,
    ) -> Self {
        RenewClient {
            http,
            timeout,
            max_body,
            server_time,
        }
    }

    /// `endpoint` comes from the configuration, never from the key (ARCHITECTURE.md, the first
    /// invariant).
    pub async fn renew(
        &self,
        endpoint: &reqwest::Url,
        ticket: &AccessToken,
        key: &KeyText,
        now: SystemTime,
    ) -> RenewResponse {
        let started = Instant::now();
        let body = RenewBody {
            service_ticket: ticket.expose(),
            key: key.trimmed(),
        };
        let call = async {
            match self.http.post(endpoint.clone()).json(&body).send().await {
                Err(e) => unsent_or_unanswered(&e),
                Ok(resp) => {
                    self.server_time
                        .observe(resp.status().as_u16(), resp.headers());
                    self.read(resp, now).await
                }
            }
        };
        let mut result =
            deadline::within(self.timeout, call)
                .await
                .unwrap_or_else(|deadline::Elapsed| {
                    failed(Outcome::Unanswered {
                        detail: "timed out".to_owned(),
                    })
                });
        result.started_at = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        result.duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        result
    }

    async fn read(&self, resp: reqwest::Response, now: SystemTime) -> RenewResponse {
        let status = resp.status().as_u16();
        let ms = MsHeaders::from(resp.headers());
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (outcome, error_code) = match http::read_body(resp, self.max_body).await {
            Ok(body) => outcome::classify(
                Response {
                    status,
                    retry_after: retry_after.as_deref(),
                    body: &body,
                },
                now,
            ),
            // After a 200 the Store may have renewed the key: unanswered.
            Err(BodyError::TooLarge(max)) if status == 200 => (
                Outcome::Unanswered {
                    detail: format!("HTTP 200 with a body over {max} bytes"),
                },
                None,
            ),
            Err(BodyError::TooLarge(max)) => (
                Outcome::Unexpected {
                    detail: format!("HTTP {status} with a body over {max} bytes"),
                },
                None,
            ),
            // A body cut off mid-way is the network failing, not the Store answering; after a
            // 200 the Store did renew the key, and the new one is lost.
            Err(BodyError::Read(e)) if status == 200 => (
                Outcome::Unanswered {
                    detail: format!("HTTP 200, then {}", http::describe(&e)),
                },
                None,
            ),
            Err(BodyError::Read(e)) => (
                Outcome::Transient {
                    detail: http::describe(&e),
                },
                None,
            ),
        };
        RenewResponse {
            outcome,
            status: Some(status),
            error_code,
            ms,
            duration_ms: 0,
            started_at: 0,
        }
    }
}

/// A request that failed: if it could not connect, it never reached the Store; anything later
/// (a reset, a connection closed before the answer) may have reached it.
fn unsent_or_unanswered(e: &reqwest::Error) -> RenewResponse {
    let detail = http::describe(e);
    failed(if e.is_connect() {
        Outcome::Transient { detail }
    } else {
        Outcome::Unanswered { detail }
    })
}

fn failed(outcome: Outcome) -> RenewResponse {
    RenewResponse {
        outcome,
        status: None,
        error_code: None,
        ms: MsHeaders::default(),
        duration_ms: 0,
        started_at: 0,
    }
}
