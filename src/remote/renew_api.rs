//! The Store's renew call: one POST of `{serviceTicket, key}` to a configured endpoint.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::policy::claims::KeyText;
use crate::policy::outcome::{self, Outcome, Response};
use crate::remote::entra::AccessToken;
use crate::remote::http::{self, BodyError, MsHeaders};
use crate::remote::server_time::ServerTime;

#[derive(Debug, Clone)]
pub struct RenewClient {
    http: reqwest::Client,
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
    pub fn new(http: reqwest::Client, max_body: usize, server_time: Arc<ServerTime>) -> Self {
        RenewClient {
            http,
            max_body,
            server_time,
        }
    }

    /// `endpoint` comes from the configuration, never from the key (DESIGN.md, first invariant).
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
        let sent = self.http.post(endpoint.clone()).json(&body).send().await;
        let mut result = match sent {
            Err(e) => RenewResponse {
                outcome: Outcome::Transient {
                    detail: http::describe(&e),
                },
                status: None,
                error_code: None,
                ms: MsHeaders::default(),
                duration_ms: 0,
                started_at: 0,
            },
            Ok(resp) => {
                self.server_time
                    .observe(resp.status().as_u16(), resp.headers());
                self.read(resp, now).await
            }
        };
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
            Err(BodyError::TooLarge(max)) => (
                Outcome::Unexpected {
                    detail: format!("HTTP {status} with a body over {max} bytes"),
                },
                None,
            ),
            // A body cut off mid-way is the network failing, not the Store answering.
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
