//! One Entra ID application and how it proves itself: a secret, a certificate, a federated token
//! file (Kubernetes workload identity) or a managed identity. The file names where to find the
//! credential, never the credential.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The variables Azure's workload identity webhook injects (and Azure's SDKs read).
pub(super) const AZURE_CLIENT_ID: &str = "AZURE_CLIENT_ID";
pub(super) const AZURE_TENANT_ID: &str = "AZURE_TENANT_ID";
pub(super) const AZURE_FEDERATED_TOKEN_FILE: &str = "AZURE_FEDERATED_TOKEN_FILE";

/// One Entra ID application (client) whose keys storekeyd renews.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Application {
    /// A label for logs and `status`; defaults to the client ID.
    pub name: Option<String>,
    #[serde(default)]
    pub tenant_id: String,
    #[serde(default)]
    pub client_id: String,
    /// The kind of credential; inferred from the one credential field that is set. Needed only
    /// for a federated credential whose every detail comes from the `AZURE_*` variables.
    pub credential: Option<CredentialKind>,
    /// A file holding the client secret; relative paths are looked up in
    /// `$CREDENTIALS_DIRECTORY` (systemd's `LoadCredential=`), as for every file below.
    pub client_secret_file: Option<PathBuf>,
    /// The name of an environment variable holding the client secret.
    pub client_secret_env: Option<String>,
    /// A PEM file with the certificate registered on the application (it may hold the private
    /// key too).
    pub certificate_file: Option<PathBuf>,
    /// A PEM file with the certificate's RSA private key (PKCS#8 or PKCS#1, unencrypted, mode
    /// 0600); defaults to `certificate_file`.
    pub private_key_file: Option<PathBuf>,
    /// How client assertions are signed: `PS256` (default) or `RS256`.
    pub certificate_algorithm: Option<AssertionAlgorithm>,
    /// A file the platform keeps a fresh federated token in, read at every token request.
    pub federated_token_file: Option<PathBuf>,
    /// The client ID of the user-assigned managed identity the application trusts.
    pub managed_identity_client_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    Secret,
    Certificate,
    Federated,
    ManagedIdentity,
}

impl CredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Secret => "secret",
            CredentialKind::Certificate => "certificate",
            CredentialKind::Federated => "federated",
            CredentialKind::ManagedIdentity => "managed_identity",
        }
    }
}

impl std::fmt::Display for CredentialKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The signature algorithms Entra ID accepts on a client assertion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AssertionAlgorithm {
    #[default]
    PS256,
    RS256,
}

/// Where an application's credential comes from, once the configuration is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    SecretFile(PathBuf),
    SecretEnv(String),
    Certificate {
        certificate: PathBuf,
        private_key: PathBuf,
        algorithm: AssertionAlgorithm,
    },
    FederatedFile(PathBuf),
    ManagedIdentity {
        client_id: String,
    },
}

impl CredentialSource {
    pub fn kind(&self) -> CredentialKind {
        match self {
            CredentialSource::SecretFile(_) | CredentialSource::SecretEnv(_) => {
                CredentialKind::Secret
            }
            CredentialSource::Certificate { .. } => CredentialKind::Certificate,
            CredentialSource::FederatedFile(_) => CredentialKind::Federated,
            CredentialSource::ManagedIdentity { .. } => CredentialKind::ManagedIdentity,
        }
    }
}

/// A field of an application that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    pub field: &'static str,
    pub message: String,
}

fn problem(field: &'static str, message: impl Into<String>) -> FieldProblem {
    FieldProblem {
        field,
        message: message.into(),
    }
}

const SOURCES: &str = "`client_secret_file`, `client_secret_env`, `certificate_file`, `federated_token_file` or `managed_identity_client_id`";

impl Application {
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.client_id)
    }

    /// The credential fields that are set, with the kind each implies.
    fn sources_set(&self) -> Vec<(&'static str, CredentialKind)> {
        let mut set = Vec::new();
        if self.client_secret_file.is_some() {
            set.push(("client_secret_file", CredentialKind::Secret));
        }
        if self.client_secret_env.is_some() {
            set.push(("client_secret_env", CredentialKind::Secret));
        }
        if self.certificate_file.is_some() {
            set.push(("certificate_file", CredentialKind::Certificate));
        }
        if self.federated_token_file.is_some() {
            set.push(("federated_token_file", CredentialKind::Federated));
        }
        if self.managed_identity_client_id.is_some() {
            set.push((
                "managed_identity_client_id",
                CredentialKind::ManagedIdentity,
            ));
        }
        set
    }

    /// The one credential this application is configured with.
    pub fn source(&self) -> Result<CredentialSource, FieldProblem> {
        let set = self.sources_set();
        let (field, kind) = match (set.as_slice(), self.credential) {
            ([], Some(kind)) => return Err(missing_field_for(kind)),
            ([], None) => return Err(problem("credential", format!("set one of {SOURCES}"))),
            ([one], declared) => {
                if declared.is_some_and(|d| d != one.1) {
                    return Err(problem(
                        one.0,
                        format!(
                            "does not go with `credential = \"{}\"`",
                            declared.map_or("", CredentialKind::as_str)
                        ),
                    ));
                }
                *one
            }
            ([first, second, ..], _) => {
                return Err(problem(
                    second.0,
                    format!(
                        "set only one credential per application; `{}` is set too",
                        first.0
                    ),
                ));
            }
        };
        if kind != CredentialKind::Certificate {
            if self.private_key_file.is_some() {
                return Err(problem("private_key_file", "only with `certificate_file`"));
            }
            if self.certificate_algorithm.is_some() {
                return Err(problem(
                    "certificate_algorithm",
                    "only with `certificate_file`",
                ));
            }
        }
        for (name, path) in [
            ("client_secret_file", &self.client_secret_file),
            ("certificate_file", &self.certificate_file),
            ("private_key_file", &self.private_key_file),
            ("federated_token_file", &self.federated_token_file),
        ] {
            if path
                .as_ref()
                .is_some_and(|p| p.as_os_str().to_string_lossy().trim().is_empty())
            {
                return Err(problem(name, "must not be empty"));
            }
        }
        let path = |p: &Option<PathBuf>| p.clone().unwrap_or_default();
        Ok(match field {
            "client_secret_file" => CredentialSource::SecretFile(path(&self.client_secret_file)),
            "client_secret_env" => {
                CredentialSource::SecretEnv(self.client_secret_env.clone().unwrap_or_default())
            }
            "certificate_file" => CredentialSource::Certificate {
                certificate: path(&self.certificate_file),
                private_key: self
                    .private_key_file
                    .clone()
                    .unwrap_or_else(|| path(&self.certificate_file)),
                algorithm: self.certificate_algorithm.unwrap_or_default(),
            },
            "federated_token_file" => {
                CredentialSource::FederatedFile(path(&self.federated_token_file))
            }
            _ => {
                let client_id = self.managed_identity_client_id.clone().unwrap_or_default();
                if client_id.trim().is_empty() {
                    return Err(problem("managed_identity_client_id", "must not be empty"));
                }
                CredentialSource::ManagedIdentity { client_id }
            }
        })
    }

    /// A federated credential takes what the file leaves out from the variables Azure's
    /// workload identity injects, as Azure's own SDKs do.
    pub fn apply_azure_env(&mut self, var: impl Fn(&str) -> Option<String>) {
        let federated = self.credential == Some(CredentialKind::Federated)
            || (self.credential.is_none() && self.federated_token_file.is_some());
        if !federated {
            return;
        }
        if self.client_id.is_empty() {
            self.client_id = var(AZURE_CLIENT_ID).unwrap_or_default();
        }
        if self.tenant_id.is_empty() {
            self.tenant_id = var(AZURE_TENANT_ID).unwrap_or_default();
        }
        if self.federated_token_file.is_none() && self.sources_set().is_empty() {
            self.federated_token_file = var(AZURE_FEDERATED_TOKEN_FILE).map(PathBuf::from);
        }
    }
}

fn missing_field_for(kind: CredentialKind) -> FieldProblem {
    match kind {
        CredentialKind::Secret => problem(
            "client_secret_file",
            "a secret credential needs `client_secret_file` or `client_secret_env`",
        ),
        CredentialKind::Certificate => problem(
            "certificate_file",
            "a certificate credential needs `certificate_file`",
        ),
        CredentialKind::Federated => problem(
            "federated_token_file",
            format!(
                "a federated credential needs `federated_token_file` or {AZURE_FEDERATED_TOKEN_FILE}"
            ),
        ),
        CredentialKind::ManagedIdentity => problem(
            "managed_identity_client_id",
            "a managed identity credential needs `managed_identity_client_id`",
        ),
    }
}

#[cfg(test)]
#[path = "application_tests.rs"]
mod tests;
