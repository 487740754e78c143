//! The emulator's memory: registered applications, issued keys, faults and counters.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::clock::Clock;
use crate::emulator::identity::{Identities, RegisteredCertificate};
use crate::emulator::keymint::{self, KeySpec};
use crate::policy::claims::Kind;

/// Faults injected into renew calls. Rates are probabilities in `[0, 1]`, drawn in the order
/// listed (timeout, 429, 500, 503, garbage); the rest are answered normally.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added to every renew call before it is answered.
    pub latency_ms: u64,
    /// Never answer (the client's timeout fires).
    pub timeout_rate: f64,
    pub throttle_rate: f64,
    /// `Retry-After` seconds on 429 answers.
    pub retry_after_secs: u64,
    pub error_500_rate: f64,
    pub error_503_rate: f64,
    /// 200 with a body that is not a key.
    pub garbage_rate: f64,
    /// Tickets of these client IDs are refused with `AuthenticationTokenInvalid`, as if the
    /// credential were wrong.
    pub reject_tickets_for: Vec<String>,
    /// Keys of these client IDs get `InconsistentClientId`.
    pub inconsistent_client_ids: Vec<String>,
    /// Token responses give `expires_in` as a string, as the v1 endpoint does.
    pub expires_in_as_string: bool,
    /// 200 with a body far larger than any key (2 MiB).
    pub huge_body_rate: f64,
    /// 200 whose body arrives one byte every 200 ms.
    pub trickle_rate: f64,
    /// Renew, but answer with a key that is not the same credential: `kind`, `client` or `user`
    /// differs.
    pub wrong_successor: Option<WrongSuccessor>,
    /// Renewing a key retires it: from then on the old key is refused (AuthenticationTokenInvalid),
    /// as the Store may do. A client that loses a renewed key cannot renew that user again.
    pub retire_renewed_keys: bool,
    /// Renew the keys of these userIds, then never answer (the client's timeout fires): the
    /// Store renewed the key and the client never learns the successor.
    pub lose_answers_for: Vec<String>,
    /// The emulator's own time runs this far from the shared clock: its `Date` header, its
    /// expiry checks and the keys it mints. Negative plays a host whose clock jumped ahead.
    pub clock_offset_secs: i64,
    /// Draw the faults above from a generator with this seed: the same requests in the same
    /// order meet the same faults on every run (the demo's script). Random when absent.
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WrongSuccessor {
    Kind,
    Client,
    User,
}

/// Request counters, for tests, benchmarks and the demo's summary.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub token_requests: u64,
    pub tokens_issued: u64,
    pub renew_requests: u64,
    pub renewed: u64,
    /// Managed identity tokens the metadata endpoint issued.
    pub identity_tokens_issued: u64,
    /// Renew answers by HTTP status (timeouts are not answered and not counted here).
    pub renew_by_status: BTreeMap<u16, u64>,
    pub timeouts: u64,
}

#[derive(Debug, Clone)]
pub struct Issued {
    pub key: String,
    pub kind: Kind,
    pub client_id: String,
    pub user_id: String,
    pub lifetime_secs: i64,
    pub expires_at: i64,
    pub revoked: bool,
}

/// An application registered in the emulated Entra ID, with every credential it accepts.
#[derive(Debug, Clone, Default)]
pub struct App {
    pub tenant_id: String,
    pub secret: Option<String>,
    pub certificates: Vec<RegisteredCertificate>,
    /// Federated identity credentials: (issuer, subject) pairs whose tokens it accepts.
    pub federated: Vec<(String, String)>,
}

pub struct Emulator {
    pub clock: Clock,
    pub base_url: String,
    pub ticket_secret: [u8; 32],
    pub apps: Mutex<HashMap<String, App>>,
    pub keys: Mutex<HashMap<[u8; 32], Issued>>,
    /// The newest key issued for each (kind, user), by mint or renewal.
    pub latest: Mutex<HashMap<(Kind, String), String>>,
    /// How many times each (kind, user) was renewed: the log that shows a key renewed twice
    /// (two processes at once) or never.
    pub renewals: Mutex<HashMap<(Kind, String), u32>>,
    /// When each (kind, user) was last renewed, Unix milliseconds: shows a call sent after its
    /// claim's lease ran out.
    pub renewed_at: Mutex<HashMap<(Kind, String), i64>>,
    /// Every access token issued, for tests that look for leaks.
    pub tokens: Mutex<Vec<String>>,
    pub faults: Mutex<Faults>,
    pub stats: Mutex<Stats>,
    /// Managed identities, federated token issuers and the client assertions seen.
    pub identities: Identities,
    /// Where fault draws come from (seeded by `Faults::seed`).
    draws: Mutex<fastrand::Rng>,
}

/// Poisoning only follows a panic in another handler; the data is still counters and maps.
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(super) fn key_id(key: &str) -> [u8; 32] {
    Sha256::digest(key.trim().as_bytes()).into()
}

impl Emulator {
    pub fn new(clock: Clock, base_url: String) -> Self {
        let mut ticket_secret = [0u8; 32];
        ticket_secret.iter_mut().for_each(|b| *b = fastrand::u8(..));
        Emulator {
            clock,
            base_url: base_url.trim_end_matches('/').to_owned(),
            ticket_secret,
            apps: Mutex::default(),
            keys: Mutex::default(),
            latest: Mutex::default(),
            renewals: Mutex::default(),
            renewed_at: Mutex::default(),
            tokens: Mutex::default(),
            faults: Mutex::default(),
            stats: Mutex::default(),
            identities: Identities::default(),
            draws: Mutex::new(fastrand::Rng::new()),
        }
    }

    /// The renew URL for a kind, which is also what minted keys advertise as `refreshUri`.
    pub fn renew_url(&self, kind: Kind) -> String {
        format!("{}/{}/v6.0/b2b/keys/renew", self.base_url, kind.as_str())
    }

    /// The Entra authority to configure (`entra.authority`).
    pub fn authority(&self) -> String {
        self.base_url.clone()
    }

    /// Registers an application with a client secret (its other credentials stay).
    pub fn register_app(&self, tenant_id: &str, client_id: &str, secret: &str) {
        self.update_app(tenant_id, client_id, |app| {
            app.secret = Some(secret.to_owned());
        });
    }

    /// Registers the application if new (in `tenant_id`) and changes it.
    pub fn update_app(&self, tenant_id: &str, client_id: &str, change: impl FnOnce(&mut App)) {
        let mut apps = lock(&self.apps);
        let app = apps.entry(client_id.to_owned()).or_insert_with(|| App {
            tenant_id: tenant_id.to_owned(),
            ..App::default()
        });
        app.tenant_id = tenant_id.to_owned();
        change(app);
    }

    /// Mints and remembers a key, as a client's Store call would.
    pub fn mint(&self, kind: Kind, client_id: &str, user_id: &str, lifetime_secs: i64) -> String {
        self.mint_at(kind, client_id, user_id, lifetime_secs, self.now())
    }

    /// Mints a key as if issued at `issued_at`: a key that is already due, for tests and CI.
    pub fn mint_at(
        &self,
        kind: Kind,
        client_id: &str,
        user_id: &str,
        lifetime_secs: i64,
        issued_at: i64,
    ) -> String {
        let spec = KeySpec {
            kind,
            client_id: client_id.to_owned(),
            user_id: user_id.to_owned(),
            issued_at,
            lifetime_secs,
            refresh_uri: self.renew_url(kind),
        };
        let key = keymint::mint(&spec);
        let issued = Issued {
            key: key.clone(),
            kind,
            client_id: spec.client_id,
            user_id: spec.user_id,
            lifetime_secs,
            expires_at: spec.issued_at + lifetime_secs,
            revoked: false,
        };
        lock(&self.latest).insert((kind, issued.user_id.clone()), key.clone());
        lock(&self.keys).insert(key_id(&key), issued);
        key
    }

    /// The newest key issued for a user (by mint or renewal).
    pub fn latest_key(&self, kind: Kind, user_id: &str) -> Option<String> {
        lock(&self.latest).get(&(kind, user_id.to_owned())).cloned()
    }

    /// Every key issued so far.
    pub fn issued_keys(&self) -> Vec<String> {
        lock(&self.keys).values().map(|k| k.key.clone()).collect()
    }

    /// Every access token issued so far.
    pub fn issued_tokens(&self) -> Vec<String> {
        lock(&self.tokens).clone()
    }

    /// Revokes one key; returns whether the emulator had issued it.
    pub fn revoke_key(&self, key: &str) -> bool {
        lock(&self.keys)
            .get_mut(&key_id(key))
            .map(|k| k.revoked = true)
            .is_some()
    }

    /// Revokes every key issued for a user; returns how many.
    pub fn revoke_user(&self, user_id: &str) -> usize {
        let mut keys = lock(&self.keys);
        let mut n = 0;
        for k in keys.values_mut().filter(|k| k.user_id == user_id) {
            k.revoked = true;
            n += 1;
        }
        n
    }

    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.draws) = faults
            .seed
            .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed);
        *lock(&self.faults) = faults;
    }

    /// The next fault draw, uniform in `[0, 1)`.
    pub fn draw(&self) -> f64 {
        lock(&self.draws).f64()
    }

    pub fn faults(&self) -> Faults {
        lock(&self.faults).clone()
    }

    pub fn stats(&self) -> Stats {
        lock(&self.stats).clone()
    }

    /// The emulator's time: the shared clock, shifted by the `clock_offset_secs` fault.
    pub fn now(&self) -> i64 {
        self.clock
            .now()
            .saturating_add(lock(&self.faults).clock_offset_secs)
    }

    /// Whether the emulator issued this key (renewed or not).
    pub fn issued(&self, key: &str) -> bool {
        lock(&self.keys).contains_key(&key_id(key))
    }

    pub fn issued_count(&self) -> usize {
        lock(&self.keys).len()
    }

    /// When the Store last renewed a key of `user` (Unix milliseconds).
    pub fn renewed_at(&self, kind: Kind, user: &str) -> Option<i64> {
        lock(&self.renewed_at)
            .get(&(kind, user.to_owned()))
            .copied()
    }

    /// How many times the Store renewed a key of `user`.
    pub fn renewals_of(&self, kind: Kind, user: &str) -> u32 {
        lock(&self.renewals)
            .get(&(kind, user.to_owned()))
            .copied()
            .unwrap_or(0)
    }
}
