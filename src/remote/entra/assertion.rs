//! Client assertions: the short-lived JWT a certificate credential signs for every token request
//! (Microsoft identity platform, "certificate credentials"). Pure: the time and the `jti` are
//! given.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::certificate::SigningCertificate;
use crate::config::AssertionAlgorithm;

/// The `client_assertion_type` of both certificate and federated assertions.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How long an assertion is valid: long enough for one request and its retries on the way,
/// short enough that a captured one is useless soon.
pub const LIFETIME_SECS: i64 = 300;

#[derive(Serialize)]
struct Header<'a> {
    alg: &'static str,
    typ: &'static str,
    #[serde(rename = "x5t#S256")]
    x5t_s256: &'a str,
}

/// The claims of a client assertion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssertionClaims {
    pub aud: String,
    pub iss: String,
    pub sub: String,
    pub jti: String,
    pub nbf: i64,
    pub iat: i64,
    pub exp: i64,
}

impl AssertionClaims {
    /// `aud` is the token URL the assertion is sent to; `iss` and `sub` are the client ID.
    pub fn new(client_id: &str, token_url: &str, now: i64, jti: String) -> Self {
        AssertionClaims {
            aud: token_url.to_owned(),
            iss: client_id.to_owned(),
            sub: client_id.to_owned(),
            jti,
            nbf: now,
            iat: now,
            exp: now.saturating_add(LIFETIME_SECS),
        }
    }
}

/// A fresh, unique `jti`: 128 random bits from the system's generator, as a UUID.
pub fn new_jti() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| "the system's random generator failed")?;
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

/// The signed assertion: `base64url(header).base64url(claims).base64url(signature)`.
pub fn sign(cert: &SigningCertificate, claims: &AssertionClaims) -> Result<SecretString, String> {
    let header = Header {
        alg: match cert.algorithm() {
            AssertionAlgorithm::PS256 => "PS256",
            AssertionAlgorithm::RS256 => "RS256",
        },
        typ: "JWT",
        x5t_s256: &cert.info.thumbprint,
    };
    let mut jwt = format!("{}.{}", base64_json(&header)?, base64_json(claims)?);
    let signature = cert.sign(jwt.as_bytes())?;
    jwt.push('.');
    jwt.push_str(&URL_SAFE_NO_PAD.encode(signature));
    Ok(SecretString::from(jwt))
}

fn base64_json(value: &impl Serialize) -> Result<String, String> {
    let json = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    Ok(URL_SAFE_NO_PAD.encode(json))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    use secrecy::ExposeSecret;

    fn certificate(algorithm: AssertionAlgorithm) -> SigningCertificate {
        let (cert, key) = crate::remote::entra::certificate::generated();
        SigningCertificate::from_pem(&cert, "c", &key, "k", algorithm).unwrap()
    }

    #[test]
    fn the_assertion_verifies_against_the_certificate_and_says_what_entra_needs() {
        for (ours, theirs) in [
            (AssertionAlgorithm::PS256, Algorithm::PS256),
            (AssertionAlgorithm::RS256, Algorithm::RS256),
        ] {
            let cert = certificate(ours);
            let url = "https://login.microsoftonline.com/t/oauth2/v2.0/token";
            let claims = AssertionClaims::new("client", url, 1_000, new_jti().unwrap());
            let jwt = sign(&cert, &claims).unwrap();
            let header = jsonwebtoken::decode_header(jwt.expose_secret()).unwrap();
            assert_eq!(header.alg, theirs);
            assert_eq!(
                header.x5t_s256.as_deref(),
                Some(cert.info.thumbprint.as_str())
            );
            let mut validation = Validation::new(theirs);
            validation.set_audience(&[url]);
            validation.validate_exp = false;
            let decoded = jsonwebtoken::decode::<AssertionClaims>(
                jwt.expose_secret(),
                &DecodingKey::from_rsa_der(&cert.info.public_key),
                &validation,
            )
            .unwrap()
            .claims;
            assert_eq!(decoded, claims);
            assert_eq!(
                (decoded.iss.as_str(), decoded.sub.as_str()),
                ("client", "client")
            );
            assert_eq!(
                (decoded.nbf, decoded.iat, decoded.exp),
                (1_000, 1_000, 1_300)
            );
        }
    }

    #[test]
    fn every_jti_is_new() {
        let a = new_jti().unwrap();
        assert_eq!(a.len(), 36);
        assert_ne!(a, new_jti().unwrap());
    }
}
