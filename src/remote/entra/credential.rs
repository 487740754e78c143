//! Reading an application's credential from where the configuration says it is: a secret (file
//! or environment variable), a certificate and its key, a federated token file, or the client ID
//! of a managed identity. Read afresh for every token request, so a rotated file is picked up and
//! a fixed one recovers without a restart.

use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret as _, SecretString};

use super::certificate::{CertificateError, SigningCertificate};
use crate::config::{Application, AssertionAlgorithm, CredentialKind, CredentialSource};
use crate::secret_file::resolve;

/// How an application proves itself to Entra ID, ready for one token request.
pub enum Credential {
    Secret(SecretString),
    Certificate(SigningCertificate),
    /// The token the platform wrote, sent as the client assertion.
    Federated(SecretString),
    /// A token from the instance metadata service, exchanged as a federated assertion.
    ManagedIdentity {
        client_id: String,
    },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Secret(_) => f.write_str("Credential::Secret(<redacted>)"),
            Credential::Certificate(c) => {
                write!(f, "Credential::Certificate(x5t#S256 {})", c.info.thumbprint)
            }
            Credential::Federated(_) => f.write_str("Credential::Federated(<redacted>)"),
            Credential::ManagedIdentity { client_id } => {
                write!(f, "Credential::ManagedIdentity({client_id})")
            }
        }
    }
}

impl Credential {
    pub fn kind(&self) -> CredentialKind {
        match self {
            Credential::Secret(_) => CredentialKind::Secret,
            Credential::Certificate(_) => CredentialKind::Certificate,
            Credential::Federated(_) => CredentialKind::Federated,
            Credential::ManagedIdentity { .. } => CredentialKind::ManagedIdentity,
        }
    }
}

/// Which file an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRole {
    ClientSecret,
    Certificate,
    PrivateKey,
    FederatedToken,
}

impl fmt::Display for FileRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileRole::ClientSecret => "client secret file",
            FileRole::Certificate => "certificate file",
            FileRole::PrivateKey => "private key file",
            FileRole::FederatedToken => "federated token file",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("application `{app}`: cannot read {role} {path}: {source}")]
    Read {
        app: String,
        role: FileRole,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "application `{app}`: {role} {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Permissions {
        app: String,
        role: FileRole,
        path: PathBuf,
        mode: u32,
    },
    #[error("application `{app}`: {role} {path} is not text{}", not_text_hint(*role))]
    NotText {
        app: String,
        role: FileRole,
        path: PathBuf,
    },
    #[error("application `{app}`: environment variable `{var}` is not set")]
    MissingEnv { app: String, var: String },
    #[error("application `{app}`: the {what} is empty")]
    Empty { app: String, what: &'static str },
    #[error("application `{app}`: {source}")]
    Certificate {
        app: String,
        source: CertificateError,
    },
    #[error("application `{app}`: {message}")]
    Config { app: String, message: String },
}

/// What the application's certificate says now, for a certificate credential: a rotated
/// certificate shows at once in `status` and the metrics. The key is read too, because the
/// certificate that matters is the one it signs for, found as a token request finds it: a chain
/// may list its CA first.
pub fn certificate_info(
    app: &Application,
) -> Option<Result<super::certificate::CertificateInfo, CredentialError>> {
    let Ok(CredentialSource::Certificate {
        certificate,
        private_key,
        algorithm,
    }) = app.source()
    else {
        return None;
    };
    Some(signing_certificate(app.label(), &certificate, &private_key, algorithm).map(|c| c.info))
}

fn not_text_hint(role: FileRole) -> &'static str {
    match role {
        FileRole::Certificate | FileRole::PrivateKey => {
            "; PEM is expected: convert a .pfx with `openssl pkcs12 -in app.pfx -nodes -out app.pem`, a DER certificate with `openssl x509 -inform der -in app.cer -out app.pem`"
        }
        FileRole::ClientSecret | FileRole::FederatedToken => "",
    }
}

/// Reads the application's credential.
pub fn load(app: &Application) -> Result<Credential, CredentialError> {
    let label = app.label().to_owned();
    let source = app.source().map_err(|p| CredentialError::Config {
        app: label.clone(),
        message: format!("`{}`: {}", p.field, p.message),
    })?;
    match source {
        CredentialSource::SecretFile(file) => {
            let text = read_private(&label, FileRole::ClientSecret, &resolve(&file))?;
            Ok(Credential::Secret(non_empty(
                &label,
                "client secret",
                text.expose_secret(),
            )?))
        }
        CredentialSource::SecretEnv(var) => {
            let text = std::env::var(&var).map_err(|_| CredentialError::MissingEnv {
                app: label.clone(),
                var,
            })?;
            Ok(Credential::Secret(non_empty(
                &label,
                "client secret",
                &text,
            )?))
        }
        CredentialSource::Certificate {
            certificate,
            private_key,
            algorithm,
        } => signing_certificate(&label, &certificate, &private_key, algorithm)
            .map(Credential::Certificate),
        CredentialSource::FederatedFile(file) => {
            // The platform owns this file and its mode (Kubernetes projects it 0644); the token
            // in it lives an hour or so.
            let (text, _) = read_file(&label, FileRole::FederatedToken, &resolve(&file))?;
            Ok(Credential::Federated(non_empty(
                &label,
                "federated token file",
                text.expose_secret(),
            )?))
        }
        CredentialSource::ManagedIdentity { client_id } => {
            Ok(Credential::ManagedIdentity { client_id })
        }
    }
}

/// The certificate and its key from their files (one file may hold both).
fn signing_certificate(
    label: &str,
    certificate: &Path,
    private_key: &Path,
    algorithm: AssertionAlgorithm,
) -> Result<SigningCertificate, CredentialError> {
    let (cert_path, key_path) = (resolve(certificate), resolve(private_key));
    let (cert_name, key_name) = (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    );
    let (cert, key) = if cert_path == key_path {
        // A certificate alone is no secret: say the key is missing before its mode.
        let (text, mode) = read_file(label, FileRole::Certificate, &cert_path)?;
        if !text.expose_secret().contains("PRIVATE KEY-----") {
            return Err(CredentialError::Certificate {
                app: label.to_owned(),
                source: CertificateError::NoKey(key_name),
            });
        }
        check_private(label, FileRole::PrivateKey, &key_path, mode)?;
        (text.clone(), text)
    } else {
        let key = read_private(label, FileRole::PrivateKey, &key_path)?;
        (read_file(label, FileRole::Certificate, &cert_path)?.0, key)
    };
    SigningCertificate::from_pem(
        cert.expose_secret(),
        &cert_name,
        key.expose_secret(),
        &key_name,
        algorithm,
    )
    .map_err(|source| CredentialError::Certificate {
        app: label.to_owned(),
        source,
    })
}

fn non_empty(app: &str, what: &'static str, text: &str) -> Result<SecretString, CredentialError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(CredentialError::Empty {
            app: app.to_owned(),
            what,
        });
    }
    Ok(SecretString::from(trimmed.to_owned()))
}

const MAX_CREDENTIAL_BYTES: u64 = 1 << 20;

/// The file's text and mode, from one open file (the mode is the file's that was read).
fn read_file(
    app: &str,
    role: FileRole,
    path: &Path,
) -> Result<(SecretString, u32), CredentialError> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;
    let failed = |source| CredentialError::Read {
        app: app.to_owned(),
        role,
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(failed)?;
    let mode = file.metadata().map_err(failed)?.permissions().mode();
    // Credentials are a few KiB: a path to something endless (/dev/zero) is an error, not all
    // of memory.
    let mut bytes = Vec::new();
    file.take(MAX_CREDENTIAL_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(failed)?;
    if bytes.len() as u64 > MAX_CREDENTIAL_BYTES {
        return Err(failed(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "larger than 1 MiB: not a credential",
        )));
    }
    let text = String::from_utf8(bytes).map_err(|_| CredentialError::NotText {
        app: app.to_owned(),
        role,
        path: path.to_owned(),
    })?;
    Ok((SecretString::from(text), mode))
}

/// A file with a secret in it must be its owner's alone, unless systemd handed it over: its
/// credentials directory is the service's alone, and its files show an ACL mask (0440). The
/// exemption holds only for a directory as systemd leaves it.
fn read_private(app: &str, role: FileRole, path: &Path) -> Result<SecretString, CredentialError> {
    let (text, mode) = read_file(app, role, path)?;
    check_private(app, role, path, mode)?;
    Ok(text)
}

fn check_private(app: &str, role: FileRole, path: &Path, mode: u32) -> Result<(), CredentialError> {
    if !crate::secret_file::private_enough(path, mode) {
        return Err(CredentialError::Permissions {
            app: app.to_owned(),
            role,
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    Ok(())
}

#[cfg(test)]
#[path = "credential_tests.rs"]
mod tests;
