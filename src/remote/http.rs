//! The HTTP client both remote calls share: timeouts, no redirects, bounded bodies.

use crate::config::Http;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("response body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading the response body failed: {0}")]
    Read(#[source] reqwest::Error),
}

/// Redirects are never followed: a 3xx could otherwise carry a service ticket to a host we did
/// not choose.
pub fn client(cfg: &Http) -> Result<reqwest::Client, reqwest::Error> {
    builder(cfg).build()
}

/// For the Store's renew calls: no total timeout here, since reqwest judges it before the
/// answer that may be waiting (see [`crate::remote::deadline`], which bounds each call).
pub fn renew_client(cfg: &Http) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(cfg.connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("storekeyd/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// For the instance metadata service, which is on the host's own link: never through a proxy
/// (`HTTPS_PROXY` and friends), which it would refuse and its token would cross in the clear.
pub fn metadata_client(cfg: &Http) -> Result<reqwest::Client, reqwest::Error> {
    builder(cfg).no_proxy().build()
}

fn builder(cfg: &Http) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(cfg.connect_timeout)
        .timeout(cfg.request_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("storekeyd/", env!("CARGO_PKG_VERSION")))
}

/// Reads at most `max` bytes; a body that is larger is an error, not a truncation we would parse.
pub async fn read_body(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, BodyError> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLarge(max));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Read)? {
        if body.len() + chunk.len() > max {
            return Err(BodyError::TooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The correlation headers Microsoft support asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MsHeaders {
    pub correlation_id: Option<String>,
    pub request_id: Option<String>,
    pub cv: Option<String>,
}

impl MsHeaders {
    pub fn from(headers: &reqwest::header::HeaderMap) -> Self {
        let get = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.chars().take(128).collect())
        };
        MsHeaders {
            correlation_id: get("ms-correlationid"),
            request_id: get("ms-requestid"),
            cv: get("ms-cv"),
        }
    }
}

/// Describes a transport failure without the URL's query or anything sent in the body.
pub fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "connection failed".to_owned()
    } else if e.is_body() || e.is_decode() {
        "response body could not be read".to_owned()
    } else {
        "request failed".to_owned()
    }
}
