//! What operators are told about each application's credential: its kind, a certificate's
//! thumbprint and end of validity, and the warning when it ends soon. Pure.

use std::time::Duration;

use crate::clock::utc;
use crate::remote::entra::TokenStatus;

/// `certificate credential (x5t#S256 …, valid until …)`, `secret credential`, ….
pub fn describe(status: &TokenStatus) -> String {
    match &status.certificate {
        Some(c) => format!(
            "{} credential (x5t#S256 {}, valid until {})",
            status.kind,
            c.thumbprint,
            utc(c.not_after)
        ),
        None => format!("{} credential", status.kind),
    }
}

/// The warning for a certificate that has expired or expires within `window` of `now`.
pub fn expiry_warning(status: &TokenStatus, now: i64, window: Duration) -> Option<String> {
    let cert = status.certificate.as_ref()?;
    let window = i64::try_from(window.as_secs()).unwrap_or(i64::MAX);
    let left = cert.not_after.saturating_sub(now);
    if left > window {
        return None;
    }
    let when = if left <= 0 {
        format!("expired at {}", utc(cert.not_after))
    } else {
        let days = left / 86_400;
        format!("expires at {} (in {days} days)", utc(cert.not_after))
    };
    Some(format!(
        "the certificate of application {} (x5t#S256 {}) {when}: register a new certificate on the application in Entra ID and point `certificate_file` at it",
        status.label, cert.thumbprint
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CredentialKind;
    use crate::remote::entra::CertificateSummary;

    fn status(not_after: Option<i64>) -> TokenStatus {
        TokenStatus {
            label: "cert-app".into(),
            client_id: "c".into(),
            kind: if not_after.is_some() {
                CredentialKind::Certificate
            } else {
                CredentialKind::Secret
            },
            certificate: not_after.map(|t| CertificateSummary {
                thumbprint: "abc".into(),
                not_after: t,
            }),
            last: None,
        }
    }

    #[test]
    fn warns_within_the_window_and_after_expiry_only() {
        let day = 86_400;
        let window = Duration::from_secs(30 * day as u64);
        assert_eq!(expiry_warning(&status(None), 0, window), None);
        assert_eq!(expiry_warning(&status(Some(31 * day)), 0, window), None);
        let soon = expiry_warning(&status(Some(29 * day + 5)), 0, window).unwrap();
        assert!(
            soon.contains("cert-app") && soon.contains("(in 29 days)"),
            "{soon}"
        );
        let gone = expiry_warning(&status(Some(10)), 20, window).unwrap();
        assert!(gone.contains("expired at 1970-01-01T00:00:10Z"), "{gone}");
        assert_eq!(describe(&status(None)), "secret credential");
        assert!(
            describe(&status(Some(0)))
                .starts_with("certificate credential (x5t#S256 abc, valid until")
        );
    }
}
