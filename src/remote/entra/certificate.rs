//! A certificate credential: the X.509 certificate registered on the application and the RSA
//! private key that signs its client assertions. Parsing only; no I/O.

use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256, RSA_PSS_SHA256, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use x509_cert::Certificate;
use x509_cert::der::Decode as _;
use zeroize::Zeroizing;

use crate::config::AssertionAlgorithm;

const RSA_ENCRYPTION_OID: &str = "1.2.840.113549.1.1.1";

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("{0}: not PEM: {1}")]
    Pem(String, String),
    #[error("{0}: no `-----BEGIN CERTIFICATE-----` block")]
    NoCertificate(String),
    #[error("{0}: the certificate is not valid X.509: {1}")]
    Invalid(String, String),
    #[error(
        "{0}: the certificate's key is not RSA (Entra ID signs and checks client assertions with RSA only)"
    )]
    NotRsa(String),
    #[error(
        "{0}: no private key block (`PRIVATE KEY` or `RSA PRIVATE KEY`); if the key is in a file of its own, set `private_key_file`"
    )]
    NoKey(String),
    #[error(
        "{0}: the private key is encrypted; give it unencrypted and protect it by its file mode (0600) or a systemd credential"
    )]
    Encrypted(String),
    #[error("{0}: the private key is not a usable RSA key ({1})")]
    BadKey(String, String),
    #[error("the private key in {key} does not belong to the certificate in {certificate}")]
    Mismatch { key: String, certificate: String },
}

/// What an application's certificate says about itself (no secret in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// base64url of the SHA-256 of the certificate's DER: the `x5t#S256` Entra finds it by.
    pub thumbprint: String,
    pub not_before: i64,
    pub not_after: i64,
    /// The RSA public key, DER `RSAPublicKey` (PKCS#1).
    pub public_key: Vec<u8>,
}

/// The certificate and the key that signs with it.
pub struct SigningCertificate {
    pub info: CertificateInfo,
    key: RsaKeyPair,
    algorithm: AssertionAlgorithm,
}

impl SigningCertificate {
    /// `cert_pem` and `key_pem` may be the same text (one file with both). `cert_name` and
    /// `key_name` name them in errors.
    pub fn from_pem(
        cert_pem: &str,
        cert_name: &str,
        key_pem: &str,
        key_name: &str,
        algorithm: AssertionAlgorithm,
    ) -> Result<Self, CertificateError> {
        // The certificate is the one the key belongs to, wherever it stands in a chain.
        let key = private_key(key_pem, key_name)?;
        let info = CertificateInfo::all_from_pem(cert_pem, cert_name)?
            .into_iter()
            .find(|c| key.public_key().as_ref() == c.public_key.as_slice())
            .ok_or_else(|| CertificateError::Mismatch {
                key: key_name.to_owned(),
                certificate: cert_name.to_owned(),
            })?;
        Ok(SigningCertificate {
            info,
            key,
            algorithm,
        })
    }

    pub fn algorithm(&self) -> AssertionAlgorithm {
        self.algorithm
    }

    /// Signs `message` (a JWT's `header.payload`) with the configured algorithm.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        let padding: &'static dyn aws_lc_rs::signature::RsaEncoding = match self.algorithm {
            AssertionAlgorithm::PS256 => &RSA_PSS_SHA256,
            AssertionAlgorithm::RS256 => &RSA_PKCS1_SHA256,
        };
        let mut signature = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(
                padding,
                &aws_lc_rs::rand::SystemRandom::new(),
                message,
                &mut signature,
            )
            .map_err(|_| "the private key could not sign".to_owned())?;
        Ok(signature)
    }
}

impl CertificateInfo {
    /// Every certificate in `pem`; at least one. Private: which of them is the credential's is
    /// for its key to say ([`SigningCertificate::from_pem`]), not their order.
    fn all_from_pem(pem: &str, name: &str) -> Result<Vec<Self>, CertificateError> {
        let blocks = pem_blocks(pem).map_err(|e| CertificateError::Pem(name.to_owned(), e))?;
        let certs = blocks
            .into_iter()
            .filter(|(label, _)| label == "CERTIFICATE")
            .map(|(_, der)| CertificateInfo::from_der(&der, name))
            .collect::<Result<Vec<_>, _>>()?;
        if certs.is_empty() {
            return Err(CertificateError::NoCertificate(name.to_owned()));
        }
        Ok(certs)
    }

    fn from_der(der: &[u8], name: &str) -> Result<Self, CertificateError> {
        let invalid =
            |e: x509_cert::der::Error| CertificateError::Invalid(name.to_owned(), e.to_string());
        let cert = Certificate::from_der(der).map_err(invalid)?;
        let tbs = cert.tbs_certificate();
        let spki = tbs.subject_public_key_info();
        if spki.algorithm.oid.to_string() != RSA_ENCRYPTION_OID {
            return Err(CertificateError::NotRsa(name.to_owned()));
        }
        let secs = |t: &x509_cert::time::Time| {
            i64::try_from(t.to_unix_duration().as_secs()).unwrap_or(i64::MAX)
        };
        Ok(CertificateInfo {
            thumbprint: URL_SAFE_NO_PAD.encode(Sha256::digest(der)),
            not_before: secs(&tbs.validity().not_before),
            not_after: secs(&tbs.validity().not_after),
            public_key: spki.subject_public_key.raw_bytes().to_vec(),
        })
    }
}

fn private_key(pem: &str, name: &str) -> Result<RsaKeyPair, CertificateError> {
    let blocks = pem_blocks(pem).map_err(|e| CertificateError::Pem(name.to_owned(), e))?;
    let bad =
        |e: aws_lc_rs::error::KeyRejected| CertificateError::BadKey(name.to_owned(), e.to_string());
    for (label, der) in blocks {
        match label.as_str() {
            "PRIVATE KEY" => return RsaKeyPair::from_pkcs8(&der).map_err(bad),
            "RSA PRIVATE KEY" => return RsaKeyPair::from_der(&der).map_err(bad),
            "ENCRYPTED PRIVATE KEY" => return Err(CertificateError::Encrypted(name.to_owned())),
            "EC PRIVATE KEY" => {
                return Err(CertificateError::BadKey(
                    name.to_owned(),
                    "an EC key; Entra ID client assertions need RSA".to_owned(),
                ));
            }
            _ => {}
        }
    }
    Err(CertificateError::NoKey(name.to_owned()))
}

/// A PEM block's label and DER bytes, wiped when dropped.
type PemBlock = (String, Zeroizing<Vec<u8>>);

/// Every PEM block in `text` as (label, DER). Text around and between blocks (openssl's "Bag
/// Attributes") is ignored; a legacy encrypted block (with `Proc-Type`) is reported as encrypted.
/// Errors name lines, never their text: the file may be a private key, which is also why every
/// copy of a block's text and bytes is wiped when dropped.
fn pem_blocks(text: &str) -> Result<Vec<PemBlock>, String> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("-----BEGIN ") else {
            continue;
        };
        let label = rest
            .strip_suffix("-----")
            .filter(|l| is_label(l))
            .ok_or_else(|| format!("line {}: a damaged BEGIN line", n + 1))?;
        let end_line = format!("-----END {label}-----");
        let mut body = Zeroizing::new(vec![format!("-----BEGIN {label}-----")]);
        let mut ended = false;
        for (_, line) in lines.by_ref() {
            let line = line.trim();
            body.push(line.to_owned());
            if line == end_line {
                ended = true;
                break;
            }
        }
        if !ended {
            return Err(format!(
                "the `{label}` block of line {} has no END line",
                n + 1
            ));
        }
        if body
            .iter()
            .any(|l| l.starts_with("Proc-Type:") && l.contains("ENCRYPTED"))
        {
            blocks.push((
                "ENCRYPTED PRIVATE KEY".to_owned(),
                Zeroizing::new(Vec::new()),
            ));
            continue;
        }
        let pem = Zeroizing::new(body.join("\n") + "\n");
        let (_, der) = x509_cert::der::pem::decode_vec(pem.as_bytes())
            .map_err(|_| format!("the `{label}` block of line {} is not valid base64", n + 1))?;
        blocks.push((label.to_owned(), Zeroizing::new(der)));
    }
    Ok(blocks)
}

/// PEM labels are a few capital words (`CERTIFICATE`, `RSA PRIVATE KEY`).
fn is_label(label: &str) -> bool {
    (1..=40).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b' ')
}

/// A new self-signed RSA certificate and its key, PEM, for unit tests.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn generated() -> (String, String) {
    generated_with(rcgen::CertificateParams::new(vec!["storekeyd-test".into()]).unwrap())
}

/// [`generated`], valid until `not_after` (Unix seconds).
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn generated_until(not_after: i64) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec!["storekeyd-test".into()]).unwrap();
    params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).unwrap();
    generated_with(params)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
fn generated_with(params: rcgen::CertificateParams) -> (String, String) {
    let key = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        .unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_matching_pair_loads_and_its_thumbprint_is_the_der_digest() {
        let (cert, key) = generated();
        let both = format!("Bag Attributes: x\n{key}\n{cert}");
        let signing =
            SigningCertificate::from_pem(&both, "c.pem", &both, "c.pem", AssertionAlgorithm::PS256)
                .unwrap();
        let der = x509_cert::der::pem::decode_vec(cert.as_bytes()).unwrap().1;
        assert_eq!(
            signing.info.thumbprint,
            URL_SAFE_NO_PAD.encode(Sha256::digest(&der))
        );
        assert_eq!(signing.info.thumbprint.len(), 43);
        assert!(signing.info.not_after > signing.info.not_before);
        assert_eq!(signing.sign(b"m").unwrap().len(), 256);
    }

    #[test]
    fn a_damaged_file_never_shows_its_contents_in_the_error() {
        let (cert, key) = generated();
        let body: Vec<&str> = key.lines().filter(|l| !l.starts_with("-----")).collect();
        let damaged = [
            key.replacen("-----BEGIN PRIVATE KEY-----", "-----BEGIN PRIVATE KEY", 1),
            key.replacen(
                "-----BEGIN PRIVATE KEY-----",
                "----BEGIN PRIVATE KEY-----",
                1,
            ),
            key.replacen("-----END PRIVATE KEY-----", "-----END PRIVATE KEY", 1),
            key.replacen(body[3], "!!!!", 1),
        ];
        for text in damaged {
            let e = SigningCertificate::from_pem(&cert, "c", &text, "k", AssertionAlgorithm::PS256)
                .err()
                .unwrap()
                .to_string();
            assert!(e.starts_with("k: "), "{e}");
            for line in &body {
                assert!(!e.contains(&line[..20]), "the key leaked into: {e}");
            }
        }
    }

    #[test]
    fn the_certificate_of_the_key_is_found_anywhere_in_a_chain() {
        let (leaf, key) = generated();
        let (ca, _) = generated();
        let chain = format!("{ca}{leaf}");
        let signing =
            SigningCertificate::from_pem(&chain, "c", &key, "k", AssertionAlgorithm::PS256)
                .unwrap();
        assert_eq!(
            vec![signing.info],
            CertificateInfo::all_from_pem(&leaf, "leaf").unwrap()
        );
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let (cert, _) = generated();
        let (_, other_key) = generated();
        let e = SigningCertificate::from_pem(
            &cert,
            "c.pem",
            &other_key,
            "k.pem",
            AssertionAlgorithm::RS256,
        )
        .err()
        .unwrap();
        assert_eq!(
            e.to_string(),
            "the private key in k.pem does not belong to the certificate in c.pem"
        );
    }

    #[test]
    fn unusable_files_say_what_is_wrong() {
        let (cert, key) = generated();
        let err = |c: &str, k: &str| {
            SigningCertificate::from_pem(c, "c", k, "k", AssertionAlgorithm::PS256)
                .err()
                .unwrap()
                .to_string()
        };
        assert!(err(&key, &key).contains("c: no `-----BEGIN CERTIFICATE-----` block"));
        assert!(err(&cert, &cert).contains("k: no private key block"));
        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert!(err(&cert, encrypted).contains("k: the private key is encrypted"));
        let legacy = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        assert!(err(&cert, legacy).contains("encrypted"));
        assert!(
            err("-----BEGIN CERTIFICATE-----\nAAAA", &key)
                .contains("c: not PEM: the `CERTIFICATE` block of line 1 has no END line")
        );
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ec_cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&ec)
            .unwrap();
        assert!(err(&ec_cert.pem(), &key).contains("not RSA"));
    }
}
