//! JWT verification at the handshake (DESIGN.md `[auth]` and the Admission table).
//!
//! An [`Authenticator`] is built once from `[auth]` with `mode = "jwt"` and shared behind an
//! `Arc`. It holds exactly one kind of key:
//!
//! - an HMAC secret (`secret_env` / `secret_file`), which only ever verifies `HS*`;
//! - one public key (`public_key_file`, PEM), which only verifies its own family: an RSA key
//!   `RS*`/`PS*`, an EC key `ES256` (P-256) or `ES384` (P-384), an Ed25519 key `EdDSA`;
//! - a JSON Web Key Set (`jwks_file`, or `jwks_url` fetched over HTTPS), keys chosen by `kid`,
//!   each key only for the algorithms its `kty`/`crv` (and its `alg`, when present) allow.
//!
//! Every token is first checked cheaply (length, shape, header, algorithm allowlist) before
//! any crypto, then verified by `jsonwebtoken` with one [`Validation`] per key family built at
//! startup: signature, `exp` (required), `nbf`, `iss` and `aud` when configured, with the
//! configured leeway. Errors carry a short reason for the logs and never the token.
//!
//! A remote key set is cached in an [`ArcSwap`] (lock-free reads on the hot path), refreshed
//! every `jwks_refresh` by [`Authenticator::spawn_refresh`], and refetched on an unknown `kid`
//! at most once per [`KID_REFETCH_COOLDOWN`] across all requests, so random `kid`s cannot
//! flood the identity provider. A failed refresh keeps the previous keys. An endpoint that is
//! unavailable at start leaves the set empty (every token refused as `no_keys`) and retried,
//! and a reload during an outage keeps the keys fetched from the same URL.

use crate::config::{AuthConfig, AuthMode, ConfigError, ASYM_ALGS, HMAC_ALGS};
use arc_swap::ArcSwap;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::header::{ACCEPT, HOST, USER_AGENT};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, Header, Validation};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr as _;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Tokens longer than this are refused as `malformed` before any parsing. As large as the
/// request head may be (16 KiB): identity providers that list many groups in the token
/// exceed 8 KiB, and the head limit bounds the work anyway.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Shortest HMAC secret accepted (RFC 7518 §3.2: at least the hash output size of HS256).
pub const MIN_HMAC_SECRET_LEN: usize = 32;
/// An unknown `kid` triggers at most one JWKS refetch per this interval, across all requests.
pub const KID_REFETCH_COOLDOWN: Duration = Duration::from_secs(30);
/// Whole-fetch timeout for `jwks_url` (connect, TLS, request, body).
pub const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS response body accepted.
pub const JWKS_MAX_BODY: usize = 1 << 20;
/// After a failed periodic refresh, the next attempt comes after this (or `jwks_refresh` if
/// shorter) rather than a whole refresh interval later.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// First retry of a `jwks_url` that could not be fetched at build; doubled on each failure up
/// to [`NO_KEYS_RETRY_MAX`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between fetches while there are no keys (every handshake refused meanwhile).
const NO_KEYS_RETRY_MAX: Duration = Duration::from_secs(10);

/// Verified token facts the proxy needs.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    /// The token's `exp` claim, in unix seconds (a session may last until `exp + leeway`).
    pub exp: u64,
    /// Every claim of the token, for `forward_claims`.
    pub claims: Map<String, Value>,
}

/// Why a token was refused. The reason is a short fixed word for logs and metrics; it never
/// contains the token or any part of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// The token is invalid. Reasons: `"malformed"`, `"algorithm"`, `"signature"`,
    /// `"expired"`, `"not_yet_valid"`, `"missing_exp"`, `"issuer"`, `"audience"`,
    /// `"unknown_kid"`, `"missing_kid"`, `"key"` (the key could not be used), `"invalid"`.
    Invalid(&'static str),
    /// No key to check it with: a `jwks_url` not fetched yet (reason `"no_keys"`). Not the
    /// token's fault, so not answered as an invalid token (a client would discard it).
    NoKeys,
}

impl TokenError {
    /// The short reason, e.g. `"expired"`.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Invalid(r) => r,
            TokenError::NoKeys => "no_keys",
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid token: {}", self.reason())
    }
}

impl std::error::Error for TokenError {}

const MALFORMED: TokenError = TokenError::Invalid("malformed");
const ALGORITHM: TokenError = TokenError::Invalid("algorithm");
const UNKNOWN_KID: TokenError = TokenError::Invalid("unknown_kid");

/// Which algorithms a key can verify, by its type (and curve).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyFit {
    Hmac,
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyFit {
    fn fits(self, alg: Algorithm) -> bool {
        match self {
            KeyFit::Hmac => alg.family() == AlgorithmFamily::Hmac,
            KeyFit::Rsa => alg.family() == AlgorithmFamily::Rsa,
            KeyFit::P256 => alg == Algorithm::ES256,
            KeyFit::P384 => alg == Algorithm::ES384,
            KeyFit::Ed25519 => alg == Algorithm::EdDSA,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            KeyFit::Hmac => "an HMAC secret",
            KeyFit::Rsa => "an RSA key",
            KeyFit::P256 => "an EC P-256 key",
            KeyFit::P384 => "an EC P-384 key",
            KeyFit::Ed25519 => "an Ed25519 key",
        }
    }
}

/// One verification key with what it may verify.
struct VerifyKey {
    key: DecodingKey,
    fit: KeyFit,
    /// The JWK's `alg`, when it names one: the token's header must then say the same.
    alg: Option<Algorithm>,
}

impl VerifyKey {
    fn accepts(&self, alg: Algorithm) -> bool {
        self.fit.fits(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

/// A key set ready for lookups by `kid`.
#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Vec<Arc<VerifyKey>>>,
    /// The set's only usable key, when it has no `kid`: used for tokens without `kid`.
    sole_unnamed: Option<Arc<VerifyKey>>,
    usable: usize,
}

enum Lookup {
    Found(Arc<VerifyKey>),
    /// The `kid` is known but none of its keys may verify the header's algorithm.
    WrongAlg,
    UnknownKid,
    MissingKid,
}

impl KeySet {
    /// Builds a set from a JWKS, keeping the keys usable with `allowed`. Skipped keys are
    /// reported by `kid` and reason in the second value.
    fn from_jwks(jwks: &JwkSet, allowed: &[Algorithm]) -> (KeySet, Vec<String>) {
        let mut set = KeySet::default();
        let mut skipped = Vec::new();
        let mut unnamed = Vec::new();
        for jwk in &jwks.keys {
            let kid = jwk.common.key_id.clone();
            match key_from_jwk(jwk, allowed) {
                Ok(k) => {
                    let k = Arc::new(k);
                    set.usable += 1;
                    match kid {
                        Some(kid) => set.by_kid.entry(kid).or_default().push(k),
                        None => unnamed.push(k),
                    }
                }
                Err(why) => skipped.push(format!("kid {:?}: {why}", kid.as_deref().unwrap_or("(none)"))),
            }
        }
        if set.usable == 1 && unnamed.len() == 1 {
            set.sole_unnamed = unnamed.pop();
        }
        (set, skipped)
    }

    fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> Lookup {
        let candidates: &[Arc<VerifyKey>] = match kid {
            Some(kid) => match self.by_kid.get(kid) {
                Some(v) => v,
                None => return Lookup::UnknownKid,
            },
            None => match &self.sole_unnamed {
                Some(k) => std::slice::from_ref(k),
                None => return Lookup::MissingKid,
            },
        };
        match candidates.iter().find(|k| k.accepts(alg)) {
            Some(k) => Lookup::Found(k.clone()),
            None => Lookup::WrongAlg,
        }
    }
}

/// Turns one JWK into a verification key, or says why it cannot be used.
fn key_from_jwk(jwk: &Jwk, allowed: &[Algorithm]) -> Result<VerifyKey, String> {
    if let Some(u) = &jwk.common.public_key_use {
        if *u != PublicKeyUse::Signature {
            return Err("\"use\" is not \"sig\"".into());
        }
    }
    if let Some(ops) = &jwk.common.key_operations {
        if !ops.contains(&KeyOperations::Verify) {
            return Err("\"key_ops\" does not include \"verify\"".into());
        }
    }
    let fit = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyFit::Rsa,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => KeyFit::P256,
            EllipticCurve::P384 => KeyFit::P384,
            _ => return Err("unsupported EC curve (P-256 and P-384 are)".into()),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => KeyFit::Ed25519,
            _ => return Err("unsupported OKP curve (Ed25519 is)".into()),
        },
        AlgorithmParameters::OctetKey(_) => return Err("symmetric (oct) keys are never taken from a key set".into()),
        _ => return Err("unsupported key type".into()),
    };
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(ka) => {
            let a = Algorithm::try_from(ka).map_err(|_| format!("\"alg\" {ka} is not a signature algorithm"))?;
            if !fit.fits(a) {
                return Err(format!("\"alg\" {a:?} does not fit {}", fit.describe()));
            }
            if !allowed.contains(&a) {
                return Err(format!("\"alg\" {a:?} is not in auth.algorithms"));
            }
            Some(a)
        }
    };
    if !allowed.iter().any(|a| fit.fits(*a)) {
        return Err(format!("{} fits none of auth.algorithms", fit.describe()));
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable key: {e}"))?;
    check_key_material(&key, fit)?;
    Ok(VerifyKey { key, fit, alg })
}

/// Checks the decoded key material's size against its type, so a broken key is refused when
/// loaded rather than failing every signature later.
fn check_key_material(key: &DecodingKey, fit: KeyFit) -> Result<(), String> {
    let point_len = |want: usize, what: &str| -> Result<(), String> {
        match key.try_get_as_bytes() {
            Ok(b) if b.len() == want && (fit == KeyFit::Ed25519 || b[0] == 0x04) => Ok(()),
            _ => Err(format!("malformed {what} public key")),
        }
    };
    match fit {
        KeyFit::Hmac => Ok(()),
        KeyFit::P256 => point_len(65, "P-256"),
        KeyFit::P384 => point_len(97, "P-384"),
        KeyFit::Ed25519 => point_len(32, "Ed25519"),
        KeyFit::Rsa => {
            let n_len = match key.kind() {
                DecodingKeyKind::RsaModulusExponent { n, .. } => significant_len(n),
                DecodingKeyKind::SecretOrDer(_) => {
                    let jwk = Jwk::from_decoding_key(key, None).map_err(|_| "malformed RSA public key".to_string())?;
                    match &jwk.algorithm {
                        AlgorithmParameters::RSA(p) => URL_SAFE_NO_PAD
                            .decode(&p.n)
                            .map(|n| significant_len(&n))
                            .map_err(|_| "malformed RSA public key".to_string())?,
                        _ => return Err("malformed RSA public key".into()),
                    }
                }
            };
            if !(256..=1024).contains(&n_len) {
                return Err(format!("RSA key of {} bits (2048 to 8192 are accepted)", n_len * 8));
            }
            Ok(())
        }
    }
}

fn significant_len(n: &[u8]) -> usize {
    n.len() - n.iter().take_while(|b| **b == 0).count()
}

/// Where the keys come from.
enum Keys {
    /// An HMAC secret or one public key.
    Static(Arc<VerifyKey>),
    /// A key set (file or URL), swapped atomically on refresh.
    Set { set: ArcSwap<KeySet>, remote: Option<Box<Remote>> },
}

/// The remote side of `jwks_url`.
struct Remote {
    fetcher: JwksFetcher,
    refresh: Duration,
    cooldown: Duration,
    allowed: Vec<Algorithm>,
    /// When the refresh task first fetches: sooner than `refresh` when the build could not
    /// fetch (no keys yet, or keys kept from before a reload).
    first_refresh: Duration,
    /// `jwks_ca_file`, to tell at a reload whether the key source changed.
    ca_file: Option<std::path::PathBuf>,
    /// Held during an unknown-kid refetch; holds the time of the last one.
    kid_refetch: tokio::sync::Mutex<Option<Instant>>,
    /// When a fetch last succeeded, in unix seconds (0: never), for the metrics.
    fetched_at: std::sync::atomic::AtomicU64,
}

impl Remote {
    fn fetched_now(&self) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.fetched_at.store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// One fetch, turned into a key set.
    async fn fetch_set(&self) -> Result<KeySet, FetchError> {
        let jwks = self.fetcher.fetch().await?;
        usable_set(&jwks, &self.allowed).map_err(FetchError::Refused)
    }

    /// Fetches the set and swaps it in. A failure (or a set without a usable key) keeps the
    /// old keys and logs a warning. Returns whether new keys were stored.
    async fn refresh_into(&self, set: &ArcSwap<KeySet>, why: &str) -> bool {
        let url = &self.fetcher.shown;
        match self.fetch_set().await {
            Ok(new) => {
                if set.load().usable == 0 {
                    tracing::info!(%url, keys = new.usable, reason = why, "JWKS fetched; tokens are verified from now on");
                } else {
                    tracing::debug!(%url, keys = new.usable, reason = why, "JWKS refreshed");
                }
                set.store(Arc::new(new));
                self.fetched_now();
                true
            }
            Err(e) => {
                let outcome = match set.load().usable {
                    0 => "still no keys: every handshake with a token is refused (503)",
                    _ => "keeping the previous keys",
                };
                tracing::warn!(%url, error = e.message(), reason = why, "JWKS fetch failed; {outcome}");
                false
            }
        }
    }

    /// An unknown `kid`: refetch, unless one refetch ran within the cooldown. Concurrent
    /// callers queue behind one fetch and then look again, so they share its result.
    async fn refetch_for_unknown_kid(&self, set: &ArcSwap<KeySet>, kid: &str, alg: Algorithm) -> Lookup {
        let mut last = self.kid_refetch.lock().await;
        let again = set.load().lookup(Some(kid), alg);
        if !matches!(again, Lookup::UnknownKid) {
            return again;
        }
        if last.is_some_and(|t| t.elapsed() < self.cooldown) {
            return Lookup::UnknownKid;
        }
        *last = Some(Instant::now());
        self.refresh_into(set, "unknown kid").await;
        set.load().lookup(Some(kid), alg)
    }
}

fn usable_set(jwks: &JwkSet, allowed: &[Algorithm]) -> Result<KeySet, String> {
    let (set, skipped) = KeySet::from_jwks(jwks, allowed);
    for s in &skipped {
        tracing::debug!(key = %s, "JWKS key ignored");
    }
    if set.usable == 0 {
        let detail = if skipped.is_empty() { "the set is empty".to_string() } else { skipped.join("; ") };
        return Err(format!("no usable key for {} ({detail})", alg_list(allowed)));
    }
    Ok(set)
}

/// Verifies JWTs as configured in `[auth]`. `Send + Sync`; share it behind an `Arc`.
pub struct Authenticator {
    allowed: Vec<Algorithm>,
    /// One per key family present in `allowed`, built once.
    validations: Vec<(AlgorithmFamily, Validation)>,
    leeway: Duration,
    keys: Keys,
    /// Why a `jwks_url` set started without keys (its endpoint was unavailable at build).
    no_keys: Option<String>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = match &self.keys {
            Keys::Static(k) => k.fit.describe(),
            Keys::Set { remote: None, .. } => "key set (file)",
            Keys::Set { remote: Some(_), .. } => "key set (url)",
        };
        f.debug_struct("Authenticator")
            .field("algorithms", &self.allowed)
            .field("keys", &keys)
            .field("leeway", &self.leeway)
            .finish()
    }
}

impl Authenticator {
    /// Builds from `[auth]` with `mode = "jwt"`, loading the one configured key source:
    ///
    /// - `secret_env` / `secret_file`: the HMAC secret, at least 32 bytes (one trailing
    ///   newline of a secret file is not part of the secret);
    /// - `public_key_file`: one PEM `PUBLIC KEY` (or `RSA PUBLIC KEY`) block, RSA, EC P-256 /
    ///   P-384 or Ed25519, refused unless it can verify every algorithm in `auth.algorithms`;
    /// - `jwks_file`: a JSON Web Key Set, keys chosen by `kid`;
    /// - `jwks_url`: an https URL fetched once now (an unreachable URL is an error naming
    ///   `auth.jwks_url`), trusting the system roots plus `jwks_ca_file` when set. An endpoint
    ///   that is unavailable (unreachable, 5xx, a timeout) is not a configuration error: the
    ///   authenticator starts without keys, answers every token [`TokenError::NoKeys`] and
    ///   reports it through [`Authenticator::no_keys`] until its refresh task fetches a set.
    ///   An answer that is not a usable key set (404, not JSON, too large, no usable key), or
    ///   a certificate the roots refuse, is an error naming `auth.jwks_url`.
    ///
    /// Every error is a [`ConfigError`] naming the key, never containing a secret.
    pub async fn from_config(cfg: &AuthConfig) -> Result<Authenticator, ConfigError> {
        Self::build(cfg, None).await
    }

    /// As [`Authenticator::from_config`], for a reload while `running` serves. When the
    /// endpoint is unavailable and the key source is unchanged (URL, CA file, algorithms), the
    /// keys `running` holds are kept: the identity provider's outage must not refuse a reload
    /// that renews a certificate. Any other failed fetch refuses the reload while `running`
    /// has keys (so the running configuration stays).
    pub async fn reloaded(cfg: &AuthConfig, running: &Authenticator) -> Result<Authenticator, ConfigError> {
        Self::build(cfg, Some(running)).await
    }

    async fn build(cfg: &AuthConfig, running: Option<&Authenticator>) -> Result<Authenticator, ConfigError> {
        if cfg.mode != Some(AuthMode::Jwt) {
            return Err(ConfigError("auth.mode: the authenticator needs mode = \"jwt\"".into()));
        }
        let allowed = parse_algorithms(&cfg.algorithms())?;
        let hmac = allowed.iter().all(|a| a.family() == AlgorithmFamily::Hmac);
        let sources = [
            ("secret_env", cfg.secret_env.is_some()),
            ("secret_file", cfg.secret_file.is_some()),
            ("public_key_file", cfg.public_key_file.is_some()),
            ("jwks_file", cfg.jwks_file.is_some()),
            ("jwks_url", cfg.jwks_url.is_some()),
        ];
        let set: Vec<&str> = sources.iter().filter(|(_, s)| *s).map(|(n, _)| *n).collect();
        let src = match set.as_slice() {
            [one] => *one,
            [] => {
                return Err(ConfigError(
                    "auth: a key is required: secret_env, secret_file, public_key_file, \
                     jwks_file or jwks_url"
                        .into(),
                ))
            }
            many => {
                let found = many.join(" and ");
                return Err(ConfigError(format!("auth: only one key source may be set, found {found}")));
            }
        };
        let is_secret = matches!(src, "secret_env" | "secret_file");
        if hmac != is_secret {
            let what = if is_secret {
                "an HMAC secret only verifies HS256/HS384/HS512"
            } else {
                "HMAC algorithms need secret_env or secret_file"
            };
            return Err(ConfigError(format!(
                "auth.{src}: does not fit auth.algorithms ({}): {what}",
                alg_list(&allowed)
            )));
        }

        let mut no_keys = None;
        let keys = if let Some(var) = &cfg.secret_env {
            let secret = std::env::var_os(var)
                .ok_or_else(|| ConfigError(format!("auth.secret_env: environment variable {var} is not set")))?;
            Keys::Static(Arc::new(hmac_key("auth.secret_env", os_bytes(&secret))?))
        } else if let Some(path) = &cfg.secret_file {
            let raw = std::fs::read(path)
                .map_err(|e| ConfigError(format!("auth.secret_file: cannot read {}: {e}", path.display())))?;
            let secret = raw.strip_suffix(b"\n").map(|s| s.strip_suffix(b"\r").unwrap_or(s)).unwrap_or(&raw);
            Keys::Static(Arc::new(hmac_key("auth.secret_file", secret.to_vec())?))
        } else if let Some(path) = &cfg.public_key_file {
            Keys::Static(Arc::new(load_public_key(path, &allowed)?))
        } else if let Some(path) = &cfg.jwks_file {
            let text = std::fs::read(path)
                .map_err(|e| ConfigError(format!("auth.jwks_file: cannot read {}: {e}", path.display())))?;
            let jwks: JwkSet = serde_json::from_slice(&text)
                .map_err(|e| ConfigError(format!("auth.jwks_file: {}: not a JSON Web Key Set: {e}", path.display())))?;
            let set = usable_set(&jwks, &allowed)
                .map_err(|e| ConfigError(format!("auth.jwks_file: {}: {e}", path.display())))?;
            Keys::Set { set: ArcSwap::from_pointee(set), remote: None }
        } else if let Some(url) = &cfg.jwks_url {
            let mut remote = Remote {
                fetcher: JwksFetcher::new(url, cfg.jwks_ca_file.as_deref())?,
                refresh: cfg.jwks_refresh(),
                cooldown: KID_REFETCH_COOLDOWN,
                allowed: allowed.clone(),
                first_refresh: cfg.jwks_refresh(),
                ca_file: cfg.jwks_ca_file.clone(),
                kid_refetch: tokio::sync::Mutex::new(None),
                fetched_at: std::sync::atomic::AtomicU64::new(0),
            };
            let url = remote.fetcher.shown.clone();
            let set = match remote.fetch_set().await {
                Ok(set) => {
                    remote.fetched_now();
                    Arc::new(set)
                }
                Err(e) => {
                    let unavailable = matches!(e, FetchError::Unavailable(_));
                    let kept = running.filter(|_| unavailable).and_then(|r| r.keys_to_keep(&remote));
                    if let Some((kept, fetched_at)) = kept {
                        // A reload while the identity provider is down, the key source
                        // unchanged: the keys it served before are still its keys, and a
                        // certificate renewal must not wait for it.
                        let msg = e.message();
                        tracing::warn!(%url, error = msg, "JWKS fetch failed; keeping the keys fetched before the reload");
                        remote.first_refresh = remote.refresh.min(RETRY_AFTER_FAILURE);
                        remote.fetched_at.store(fetched_at, std::sync::atomic::Ordering::Relaxed);
                        kept
                    } else if unavailable && running.is_none_or(|r| r.no_keys().is_some()) {
                        // The identity provider is down, not the configuration wrong, and there
                        // are no keys to lose: start fail-closed (handshakes 503, `/readyz` 503)
                        // and keep trying, rather than exit and stay down after it is back.
                        let msg = e.message();
                        tracing::warn!(
                            %url,
                            error = msg,
                            "JWKS endpoint unavailable; starting without keys: every handshake is refused \
                             (503) and /readyz answers 503 until a fetch succeeds"
                        );
                        no_keys = Some(format!("auth.jwks_url: cannot fetch {url}: {msg}"));
                        remote.first_refresh = FIRST_RETRY.min(remote.refresh);
                        Arc::new(KeySet::default())
                    } else {
                        // A broken answer, or a reload that would trade working keys for none:
                        // refused (at a reload, the running configuration stays).
                        return Err(ConfigError(format!("auth.jwks_url: cannot use {url}: {}", e.message())));
                    }
                }
            };
            Keys::Set { set: ArcSwap::new(set), remote: Some(Box::new(remote)) }
        } else {
            return Err(ConfigError("auth: a key is required".into()));
        };

        let leeway_secs = cfg.leeway().as_secs();
        let mut validations: Vec<(AlgorithmFamily, Validation)> = Vec::new();
        for alg in &allowed {
            let family = alg.family();
            if validations.iter().any(|(f, _)| *f == family) {
                continue;
            }
            let algs: Vec<Algorithm> = allowed.iter().copied().filter(|a| a.family() == family).collect();
            validations.push((family, build_validation(algs, cfg, leeway_secs)));
        }
        Ok(Authenticator { allowed, validations, leeway: Duration::from_secs(leeway_secs), keys, no_keys })
    }

    /// Verifies signature, alg allowlist, exp (required), nbf, iss, aud (string or array
    /// containing it) with leeway. Cheap checks (length, shape, header, algorithm) run before
    /// any crypto. With `jwks_url`, an unknown `kid` may trigger one rate-limited refetch.
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        let header = precheck(token, &self.allowed)?;
        let alg = header.alg;
        let key = match &self.keys {
            Keys::Static(k) if k.accepts(alg) => k.clone(),
            Keys::Static(_) => return Err(ALGORITHM),
            Keys::Set { set, remote } => {
                if set.load().usable == 0 {
                    // The refresh task is already retrying; a refetch per handshake would only
                    // queue every handshake behind it.
                    return Err(TokenError::NoKeys);
                }
                let kid = header.kid.as_deref();
                let found = set.load().lookup(kid, alg);
                let found = match (found, remote, kid) {
                    // Boxed: the fetch (an HTTPS client) is kilobytes of state that every
                    // handshake's future would otherwise reserve for this rare path.
                    (Lookup::UnknownKid, Some(r), Some(kid)) => {
                        Box::pin(r.refetch_for_unknown_kid(set, kid, alg)).await
                    }
                    (other, _, _) => other,
                };
                match found {
                    Lookup::Found(k) => k,
                    Lookup::WrongAlg => return Err(ALGORITHM),
                    Lookup::UnknownKid => return Err(UNKNOWN_KID),
                    Lookup::MissingKid => return Err(TokenError::Invalid("missing_kid")),
                }
            }
        };
        let validation = self.validations.iter().find(|(f, _)| *f == alg.family()).map(|(_, v)| v).ok_or(ALGORITHM)?;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation)
            .map_err(|e| TokenError::Invalid(reason_of(&e)))?;
        // jsonwebtoken takes an `iss` array that contains the issuer; RFC 7519 §4.1.1 makes
        // `iss` one string, and a required issuer is matched as one.
        if validation.iss.is_some() && !matches!(data.claims.get("iss"), Some(Value::String(_))) {
            return Err(TokenError::Invalid("issuer"));
        }
        let exp = match data.claims.get("exp") {
            Some(Value::Number(n)) => {
                n.as_u64().or_else(|| n.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f.round() as u64))
            }
            _ => None,
        }
        .ok_or(TokenError::Invalid("missing_exp"))?;
        Ok(VerifiedToken { exp, claims: data.claims })
    }

    /// Why this authenticator has no keys yet (a `jwks_url` that was unavailable at build and
    /// has not been fetched since); `None` once it can verify tokens.
    pub fn no_keys(&self) -> Option<&str> {
        match &self.keys {
            Keys::Set { set, .. } if set.load().usable == 0 => {
                Some(self.no_keys.as_deref().unwrap_or("auth.jwks_url: no keys fetched yet"))
            }
            _ => None,
        }
    }

    /// The `jwks_url` and when a fetch from it last succeeded (unix seconds, 0: never), for
    /// `wsgate_jwks_last_success_timestamp_seconds`; `None` without `jwks_url`.
    pub fn jwks_fetched_at(&self) -> Option<(&str, u64)> {
        match &self.keys {
            Keys::Set { remote: Some(r), .. } => {
                Some((r.fetcher.shown.as_str(), r.fetched_at.load(std::sync::atomic::Ordering::Relaxed)))
            }
            _ => None,
        }
    }

    /// The keys to keep at a reload whose fetch from `new` failed, with when they were
    /// fetched: only when this authenticator fetches from the same URL, through the same CA
    /// file, for the same algorithms (its set was filtered by them), and has keys.
    fn keys_to_keep(&self, new: &Remote) -> Option<(Arc<KeySet>, u64)> {
        match &self.keys {
            Keys::Set { set, remote: Some(r) }
                if r.fetcher.url == new.fetcher.url
                    && r.ca_file == new.ca_file
                    && r.allowed.iter().all(|a| new.allowed.contains(a))
                    && new.allowed.iter().all(|a| r.allowed.contains(a)) =>
            {
                let set = set.load_full();
                (set.usable > 0).then(|| (set, r.fetched_at.load(std::sync::atomic::Ordering::Relaxed)))
            }
            _ => None,
        }
    }

    /// The leeway (whole seconds, as used for `exp` and `nbf`), so the relay can end sessions
    /// at `exp + leeway`.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// Starts the background JWKS refresh task (only for `jwks_url`; `None` otherwise). Called
    /// once by the server, inside a Tokio runtime. The task refetches every `jwks_refresh`
    /// and keeps the old keys when a fetch fails, retrying after twice the interval, doubling
    /// up to 30 s; with no keys at all it retries after 1 s, doubling up to 10 s. It
    /// holds only a weak reference: it ends when aborted through the returned handle or when
    /// the last `Arc<Authenticator>` is dropped (e.g. replaced by a reload). Dropping the
    /// handle alone detaches the task, as with any Tokio task.
    pub fn spawn_refresh(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let Keys::Set { remote: Some(remote), .. } = &self.keys else {
            return None;
        };
        let (every, first) = (remote.refresh, remote.first_refresh);
        let weak: Weak<Self> = Arc::downgrade(self);
        Some(tokio::spawn(async move {
            let mut delay = first;
            loop {
                tokio::time::sleep(delay).await;
                let Some(this) = weak.upgrade() else { return };
                let Keys::Set { set, remote: Some(remote) } = &this.keys else {
                    return;
                };
                delay = if remote.refresh_into(set, "periodic").await {
                    every
                } else if set.load().usable == 0 {
                    // No keys at all: every handshake fails until a fetch succeeds.
                    (delay * 2).min(NO_KEYS_RETRY_MAX)
                } else {
                    // Keys in hand: back off from twice the interval, at most to 30 s.
                    (delay * 2).min(RETRY_AFTER_FAILURE)
                };
            }
        }))
    }
}

/// Cheap checks before any crypto: length, three base64url parts, a header that parses, an
/// algorithm on the allowlist, no `crit` extensions, a signature present.
fn precheck(token: &str, allowed: &[Algorithm]) -> Result<Header, TokenError> {
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(MALFORMED);
    }
    let mut parts = token.split('.');
    let (h, p, s) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) => (h, p, s),
        _ => return Err(MALFORMED),
    };
    let b64url = |part: &str| part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if h.is_empty() || p.is_empty() || !b64url(h) || !b64url(p) || !b64url(s) {
        return Err(MALFORMED);
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| classify_bad_header(h))?;
    if !allowed.contains(&header.alg) {
        return Err(ALGORITHM);
    }
    if header.crit.is_some() {
        // RFC 7515 §4.1.11: extensions we do not understand must be refused.
        return Err(MALFORMED);
    }
    if s.is_empty() {
        return Err(TokenError::Invalid("signature"));
    }
    Ok(header)
}

/// Only reached for a header that did not parse: an unknown `alg` (such as `"none"`) is an
/// algorithm failure, anything else is malformed.
fn classify_bad_header(h: &str) -> TokenError {
    let alg = URL_SAFE_NO_PAD
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v.get("alg").and_then(Value::as_str).map(|a| Algorithm::from_str(a).is_err()));
    if alg == Some(true) {
        ALGORITHM
    } else {
        MALFORMED
    }
}

fn reason_of(e: &jsonwebtoken::errors::Error) -> &'static str {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "expired",
        K::ImmatureSignature => "not_yet_valid",
        K::InvalidIssuer => "issuer",
        K::InvalidAudience => "audience",
        K::InvalidSignature => "signature",
        K::InvalidAlgorithm | K::MissingAlgorithm | K::UnsupportedAlgorithm | K::InvalidAlgorithmName => "algorithm",
        K::MissingRequiredClaim(c) => match c.as_str() {
            "exp" => "missing_exp",
            "iss" => "issuer",
            "aud" => "audience",
            _ => "invalid",
        },
        K::InvalidToken | K::InvalidClaimFormat(_) | K::Base64(_) | K::Json(_) | K::Utf8(_) => "malformed",
        K::InvalidEcdsaKey | K::InvalidEddsaKey | K::InvalidRsaKey(_) | K::InvalidKeyFormat => "key",
        _ => "invalid",
    }
}

fn build_validation(algs: Vec<Algorithm>, cfg: &AuthConfig, leeway_secs: u64) -> Validation {
    // `algorithms` is replaced right away: the family's allowed algorithms, never empty.
    let mut v = Validation::new(algs.first().copied().unwrap_or_default());
    v.algorithms = algs;
    v.leeway = leeway_secs;
    v.validate_exp = true;
    v.validate_nbf = true;
    let mut required = vec!["exp"];
    if let Some(iss) = &cfg.issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    match &cfg.audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            required.push("aud");
        }
        // No audience configured: tokens that carry one are not refused for it.
        None => v.validate_aud = false,
    }
    v.set_required_spec_claims(&required);
    v
}

fn parse_algorithms(names: &[String]) -> Result<Vec<Algorithm>, ConfigError> {
    let mut out = Vec::new();
    for n in names {
        if !HMAC_ALGS.contains(&n.as_str()) && !ASYM_ALGS.contains(&n.as_str()) {
            return Err(ConfigError(format!(
                "auth.algorithms: {n:?} is not accepted (known: {}, {})",
                HMAC_ALGS.join(", "),
                ASYM_ALGS.join(", ")
            )));
        }
        let a = Algorithm::from_str(n).map_err(|_| ConfigError(format!("auth.algorithms: unknown algorithm {n:?}")))?;
        if !out.contains(&a) {
            out.push(a);
        }
    }
    if out.is_empty() {
        return Err(ConfigError("auth.algorithms: at least one algorithm is required".into()));
    }
    let hmac = out.iter().filter(|a| a.family() == AlgorithmFamily::Hmac).count();
    if hmac != 0 && hmac != out.len() {
        return Err(ConfigError("auth.algorithms: HMAC (HS*) and public-key algorithms cannot be mixed".into()));
    }
    Ok(out)
}

fn alg_list(algs: &[Algorithm]) -> String {
    algs.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ")
}

#[cfg(unix)]
fn os_bytes(s: &std::ffi::OsStr) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt as _;
    s.as_bytes().to_vec()
}

#[cfg(not(unix))]
fn os_bytes(s: &std::ffi::OsStr) -> Vec<u8> {
    s.to_string_lossy().as_bytes().to_vec()
}

fn hmac_key(key_name: &str, secret: Vec<u8>) -> Result<VerifyKey, ConfigError> {
    if secret.len() < MIN_HMAC_SECRET_LEN {
        return Err(ConfigError(format!(
            "{key_name}: the HMAC secret is {} bytes; at least {MIN_HMAC_SECRET_LEN} are required",
            secret.len()
        )));
    }
    Ok(VerifyKey { key: DecodingKey::from_secret(&secret), fit: KeyFit::Hmac, alg: None })
}

/// Loads `public_key_file`: exactly one PEM public key block, whose type decides the family.
fn load_public_key(path: &Path, allowed: &[Algorithm]) -> Result<VerifyKey, ConfigError> {
    let err = |m: String| ConfigError(format!("auth.public_key_file: {}: {m}", path.display()));
    let pem = std::fs::read(path)
        .map_err(|e| ConfigError(format!("auth.public_key_file: cannot read {}: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&pem);
    let tags: Vec<&str> =
        text.lines().filter_map(|l| l.trim().strip_prefix("-----BEGIN ")?.strip_suffix("-----")).collect();
    match tags.as_slice() {
        ["PUBLIC KEY"] | ["RSA PUBLIC KEY"] => {}
        [] => return Err(err("no PEM block found; expected a PUBLIC KEY".into())),
        [t] if t.contains("PRIVATE") => {
            return Err(err(format!("holds a private key ({t}); give the public key (openssl pkey -pubout)")))
        }
        [t] => return Err(err(format!("holds a {t}; expected a PUBLIC KEY"))),
        _ => return Err(err(format!("holds {} PEM blocks; expected exactly one PUBLIC KEY", tags.len()))),
    }
    let (key, fit) = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
        (k, KeyFit::Rsa)
    } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
        let fit = match k.try_get_as_bytes().map(<[u8]>::len) {
            Ok(65) => KeyFit::P256,
            Ok(97) => KeyFit::P384,
            _ => return Err(err("unsupported EC curve (P-256 and P-384 are)".into())),
        };
        (k, fit)
    } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
        (k, KeyFit::Ed25519)
    } else {
        return Err(err("not an RSA, EC or Ed25519 public key".into()));
    };
    check_key_material(&key, fit).map_err(err)?;
    if let Some(bad) = allowed.iter().find(|a| !fit.fits(**a)) {
        let ok: Vec<Algorithm> =
            ASYM_ALGS.iter().filter_map(|n| Algorithm::from_str(n).ok()).filter(|a| fit.fits(*a)).collect();
        return Err(err(format!(
            "{} cannot verify {bad:?} (in auth.algorithms); it fits {}",
            fit.describe(),
            alg_list(&ok)
        )));
    }
    Ok(VerifyKey { key, fit, alg: None })
}

/// Why a JWKS fetch failed.
enum FetchError {
    /// The endpoint could not be reached or said "not now" (5xx, 408, 429, a timeout): the
    /// identity provider's outage, not a problem of the configuration. Worth retrying.
    Unavailable(String),
    /// The endpoint answered with something that is not a usable key set, or with a
    /// certificate the configured roots refuse: the URL or the CA is wrong.
    Refused(String),
}

impl FetchError {
    fn message(&self) -> &str {
        match self {
            FetchError::Unavailable(m) | FetchError::Refused(m) => m,
        }
    }
}

/// Fetches a JWKS over HTTPS: one HTTP/1.1 GET per fetch on a fresh connection.
struct JwksFetcher {
    url: String,
    /// The URL as logs and metrics show it ([`shown_url`]).
    shown: String,
    connect_host: String,
    port: u16,
    host_header: String,
    path: String,
    server_name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
}

/// Aborts a spawned task when dropped (the HTTP connection driver of one fetch).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `url` as messages, logs and metrics show it: a query may carry a credential
/// (`?api_key=`), so it is replaced by `?…`.
pub fn shown_url(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_string(),
    }
}

impl JwksFetcher {
    fn new(url: &str, ca_file: Option<&Path>) -> Result<JwksFetcher, ConfigError> {
        let err = |m: String| ConfigError(format!("auth.jwks_url: {m}"));
        let shown = shown_url(url);
        let uri: hyper::Uri = url.parse().map_err(|e| err(format!("invalid URL {shown:?}: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(err(format!("must be an https:// URL, got {shown:?}")));
        }
        let authority = uri.authority().ok_or_else(|| err(format!("no host in {shown:?}")))?;
        if authority.as_str().contains('@') {
            return Err(err("credentials in the URL are not supported".into()));
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
        if host.is_empty() {
            return Err(err(format!("no host in {shown:?}")));
        }
        let server_name = ServerName::try_from(host.clone()).map_err(|_| err(format!("invalid host name {host:?}")))?;
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            Some(p) if !p.is_empty() => p.to_string(),
            _ => "/".to_string(),
        };
        Ok(JwksFetcher {
            url: url.to_string(),
            shown,
            port: authority.port_u16().unwrap_or(443),
            host_header: authority.as_str().to_string(),
            connect_host: host,
            path,
            server_name,
            tls: jwks_tls(ca_file)?,
        })
    }

    async fn fetch(&self) -> Result<JwkSet, FetchError> {
        tokio::time::timeout(JWKS_FETCH_TIMEOUT, self.fetch_inner())
            .await
            .map_err(|_| FetchError::Unavailable(format!("timed out after {}s", JWKS_FETCH_TIMEOUT.as_secs())))?
    }

    async fn fetch_inner(&self) -> Result<JwkSet, FetchError> {
        use FetchError::{Refused, Unavailable};
        let tcp = TcpStream::connect((self.connect_host.as_str(), self.port))
            .await
            .map_err(|e| Unavailable(format!("connect: {e}")))?;
        let tls = self.tls.connect(self.server_name.clone(), tcp).await.map_err(|e| {
            // A certificate the configured roots refuse, or no TLS at all (a plain-HTTP
            // port), is a configuration problem: wrong `jwks_ca_file` or URL. An alert (an
            // overloaded balancer in front of the provider), a reset or an EOF is the
            // endpoint's.
            let config_problem = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()).is_some_and(|r| {
                matches!(
                    r,
                    rustls::Error::InvalidCertificate(_)
                        | rustls::Error::InvalidMessage(_)
                        | rustls::Error::PeerMisbehaved(_)
                )
            });
            if config_problem {
                Refused(format!("TLS: {e}"))
            } else {
                Unavailable(format!("TLS: {e}"))
            }
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
            .await
            .map_err(|e| Unavailable(format!("HTTP: {e}")))?;
        let _driver = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let req = hyper::Request::get(self.path.as_str())
            .header(HOST, self.host_header.as_str())
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, concat!("wsgate/", env!("CARGO_PKG_VERSION")))
            .body(Empty::<Bytes>::new())
            .map_err(|e| Refused(format!("request: {e}")))?;
        let resp = sender.send_request(req).await.map_err(|e| Unavailable(format!("HTTP: {e}")))?;
        let status = resp.status();
        if status != hyper::StatusCode::OK {
            let msg = format!("HTTP status {status}");
            // 5xx, 408 and 429 say "not now"; 404, a redirect and the rest say "not here".
            let later = status.is_server_error()
                || status == hyper::StatusCode::REQUEST_TIMEOUT
                || status == hyper::StatusCode::TOO_MANY_REQUESTS;
            return Err(if later { Unavailable(msg) } else { Refused(msg) });
        }
        let body = Limited::new(resp.into_body(), JWKS_MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                let msg = format!("body (limit {JWKS_MAX_BODY} bytes): {e}");
                // Too large is what the endpoint serves, not a dropped connection.
                if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                    Refused(msg)
                } else {
                    Unavailable(msg)
                }
            })?
            .to_bytes();
        serde_json::from_slice::<JwkSet>(&body).map_err(|e| Refused(format!("not a JSON Web Key Set: {e}")))
    }
}

/// TLS client config for the JWKS endpoint: system roots plus `jwks_ca_file`, ALPN http/1.1.
fn jwks_tls(ca_file: Option<&Path>) -> Result<tokio_rustls::TlsConnector, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_file {
        let err = |m: String| ConfigError(format!("auth.jwks_ca_file: {}: {m}", path.display()));
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| err(crate::tls::pem_error(&e)))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(crate::tls::pem_error(&e)))?;
        if certs.is_empty() {
            return Err(err("no CERTIFICATE found".into()));
        }
        for c in certs {
            roots.add(c).map_err(|e| err(format!("unusable certificate: {e}")))?;
        }
    }
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if roots.is_empty() {
        return Err(ConfigError("auth.jwks_url: no system root certificates found; set auth.jwks_ca_file".into()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError(format!("auth.jwks_url: TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;
    use jsonwebtoken::{encode, EncodingKey};
    use serde_json::json;
    use std::io::Write as _;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, OnceLock};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";

    #[test]
    fn authenticator_and_verify_future_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: &T) {}
        send_sync::<Authenticator>();
        let cfg = base_cfg(&["HS256"]);
        send(&Authenticator::from_config(&cfg));
        if let Ok(a) = tokio::runtime::Builder::new_current_thread().build() {
            let auth = a.block_on(hmac_auth(|_| {})).0;
            send(&auth.verify("x.y.z"));
        }
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn claims(extra: Value) -> Value {
        let mut c = json!({ "sub": "alice", "exp": now() + 600 });
        if let (Some(c), Value::Object(e)) = (c.as_object_mut(), extra) {
            c.extend(e);
        }
        c
    }

    fn temp_file(contents: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(contents).unwrap();
        f.flush().unwrap();
        f
    }

    fn base_cfg(algs: &[&str]) -> AuthConfig {
        AuthConfig {
            mode: Some(AuthMode::Jwt),
            algorithms: Some(algs.iter().map(|s| s.to_string()).collect()),
            leeway: Some(Dur(Duration::from_secs(5))),
            ..Default::default()
        }
    }

    /// A key pair minted by rcgen, with its PEMs.
    struct Pair {
        enc: EncodingKey,
        public_pem: String,
        public_raw: Vec<u8>,
        alg: Algorithm,
    }

    impl Pair {
        fn new(rc_alg: &'static rcgen::SignatureAlgorithm, alg: Algorithm) -> Pair {
            let kp = rcgen::KeyPair::generate_for(rc_alg).unwrap();
            let pem = kp.serialize_pem();
            let enc = match alg.family() {
                AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(pem.as_bytes()),
                AlgorithmFamily::Ec => EncodingKey::from_ec_pem(pem.as_bytes()),
                AlgorithmFamily::Ed => EncodingKey::from_ed_pem(pem.as_bytes()),
                AlgorithmFamily::Hmac => unreachable!(),
            }
            .unwrap();
            Pair { enc, public_pem: kp.public_key_pem(), public_raw: kp.public_key_raw().to_vec(), alg }
        }

        fn sign(&self, kid: Option<&str>, c: &Value) -> String {
            let mut h = Header::new(self.alg);
            h.kid = kid.map(str::to_string);
            encode(&h, c, &self.enc).unwrap()
        }

        fn jwk(&self, kid: Option<&str>) -> Value {
            let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
            let raw = &self.public_raw;
            let mut v = match self.alg.family() {
                AlgorithmFamily::Rsa => {
                    serde_json::to_value(Jwk::from_encoding_key(&self.enc, self.alg).unwrap()).unwrap()
                }
                AlgorithmFamily::Ec => {
                    let (x, y) = (b64(&raw[1..33]), b64(&raw[33..65]));
                    json!({ "kty": "EC", "crv": "P-256", "x": x, "y": y })
                }
                _ => json!({ "kty": "OKP", "crv": "Ed25519", "x": b64(raw) }),
            };
            if let Some(kid) = kid {
                v["kid"] = json!(kid);
            }
            v
        }
    }

    fn rsa() -> &'static Pair {
        static P: OnceLock<Pair> = OnceLock::new();
        P.get_or_init(|| Pair::new(&rcgen::PKCS_RSA_SHA256, Algorithm::RS256))
    }
    fn ec() -> &'static Pair {
        static P: OnceLock<Pair> = OnceLock::new();
        P.get_or_init(|| Pair::new(&rcgen::PKCS_ECDSA_P256_SHA256, Algorithm::ES256))
    }
    fn ec2() -> &'static Pair {
        static P: OnceLock<Pair> = OnceLock::new();
        P.get_or_init(|| Pair::new(&rcgen::PKCS_ECDSA_P256_SHA256, Algorithm::ES256))
    }
    fn ed() -> &'static Pair {
        static P: OnceLock<Pair> = OnceLock::new();
        P.get_or_init(|| Pair::new(&rcgen::PKCS_ED25519, Algorithm::EdDSA))
    }

    fn hs(alg: Algorithm, secret: &[u8], c: &Value) -> String {
        encode(&Header::new(alg), c, &EncodingKey::from_secret(secret)).unwrap()
    }

    async fn hmac_auth(cfg_edit: impl FnOnce(&mut AuthConfig)) -> (Authenticator, tempfile::NamedTempFile) {
        let f = temp_file(SECRET);
        let mut cfg = base_cfg(&["HS256"]);
        cfg.secret_file = Some(f.path().to_path_buf());
        cfg_edit(&mut cfg);
        (Authenticator::from_config(&cfg).await.unwrap(), f)
    }

    async fn pem_auth(pair: &Pair, algs: &[&str]) -> Result<Authenticator, ConfigError> {
        let f = temp_file(pair.public_pem.as_bytes());
        let mut cfg = base_cfg(algs);
        cfg.public_key_file = Some(f.path().to_path_buf());
        Authenticator::from_config(&cfg).await
    }

    async fn jwks_file_auth(keys: Vec<Value>, algs: &[&str]) -> Result<Authenticator, ConfigError> {
        let f = temp_file(json!({ "keys": keys }).to_string().as_bytes());
        let mut cfg = base_cfg(algs);
        cfg.jwks_file = Some(f.path().to_path_buf());
        Authenticator::from_config(&cfg).await
    }

    fn reason<T: fmt::Debug>(r: Result<T, TokenError>) -> &'static str {
        r.unwrap_err().reason()
    }

    #[tokio::test]
    async fn hs256_verifies_and_reports_exp_and_claims() {
        let (a, _f) = hmac_auth(|_| {}).await;
        let exp = now() + 600;
        let t = hs(Algorithm::HS256, SECRET, &json!({ "sub": "alice", "exp": exp, "room": 7 }));
        let v = a.verify(&t).await.unwrap();
        assert_eq!(v.exp, exp);
        assert_eq!(v.claims["sub"], "alice");
        assert_eq!(v.claims["room"], 7);
        assert_eq!(a.leeway(), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn secret_env_and_trailing_newline_in_secret_file() {
        std::env::set_var("WSGATE_AUTH_TEST_SECRET_OK", std::str::from_utf8(SECRET).unwrap());
        let mut cfg = base_cfg(&["HS256"]);
        cfg.secret_env = Some("WSGATE_AUTH_TEST_SECRET_OK".into());
        let a = Authenticator::from_config(&cfg).await.unwrap();
        assert!(a.verify(&hs(Algorithm::HS256, SECRET, &claims(json!({})))).await.is_ok());

        let f = temp_file(&[SECRET, b"\n"].concat());
        let mut cfg = base_cfg(&["HS256"]);
        cfg.secret_file = Some(f.path().to_path_buf());
        let a = Authenticator::from_config(&cfg).await.unwrap();
        assert!(a.verify(&hs(Algorithm::HS256, SECRET, &claims(json!({})))).await.is_ok());
    }

    #[tokio::test]
    async fn short_or_missing_hmac_secret_is_refused_at_build() {
        let f = temp_file(b"only-31-bytes-long-secret-xxxxx");
        let mut cfg = base_cfg(&["HS256"]);
        cfg.secret_file = Some(f.path().to_path_buf());
        let e = Authenticator::from_config(&cfg).await.unwrap_err();
        assert!(e.0.contains("auth.secret_file") && e.0.contains("31 bytes"), "{e}");
        assert!(!e.0.contains("only-31"), "secret leaked: {e}");

        std::env::set_var("WSGATE_AUTH_TEST_SECRET_SHORT", "short");
        let mut cfg = base_cfg(&["HS256"]);
        cfg.secret_env = Some("WSGATE_AUTH_TEST_SECRET_SHORT".into());
        let e = Authenticator::from_config(&cfg).await.unwrap_err();
        assert!(e.0.contains("auth.secret_env"), "{e}");

        let mut cfg = base_cfg(&["HS256"]);
        cfg.secret_env = Some("WSGATE_AUTH_TEST_SECRET_UNSET".into());
        let e = Authenticator::from_config(&cfg).await.unwrap_err();
        assert!(e.0.contains("not set"), "{e}");
    }

    #[tokio::test]
    async fn public_key_families_verify() {
        for (pair, alg) in [(rsa(), "RS256"), (ec(), "ES256"), (ed(), "EdDSA")] {
            let a = pem_auth(pair, &[alg]).await.unwrap();
            let t = pair.sign(None, &claims(json!({})));
            let v = a.verify(&t).await.unwrap_or_else(|e| panic!("{alg}: {e}"));
            assert_eq!(v.claims["sub"], "alice");
        }
    }

    #[tokio::test]
    async fn rsa_key_also_verifies_ps256_when_allowed() {
        let a = pem_auth(rsa(), &["RS256", "PS256"]).await.unwrap();
        let h = Header::new(Algorithm::PS256);
        let t = encode(&h, &claims(json!({})), &rsa().enc).unwrap();
        assert!(a.verify(&t).await.is_ok());
    }

    #[tokio::test]
    async fn public_key_must_fit_the_algorithms() {
        let e = pem_auth(ec(), &["RS256"]).await.unwrap_err();
        assert!(e.0.contains("auth.public_key_file") && e.0.contains("RS256"), "{e}");
        let e = pem_auth(ec(), &["ES256", "ES384"]).await.unwrap_err();
        assert!(e.0.contains("ES384"), "{e}");
        let e = pem_auth(rsa(), &["EdDSA"]).await.unwrap_err();
        assert!(e.0.contains("auth.public_key_file"), "{e}");
        // A private key is refused with a hint.
        let f = temp_file(rcgen::KeyPair::generate().unwrap().serialize_pem().as_bytes());
        let mut cfg = base_cfg(&["ES256"]);
        cfg.public_key_file = Some(f.path().to_path_buf());
        let e = Authenticator::from_config(&cfg).await.unwrap_err();
        assert!(e.0.contains("private key"), "{e}");
        // Garbage file.
        let f = temp_file(b"not a pem");
        cfg.public_key_file = Some(f.path().to_path_buf());
        assert!(Authenticator::from_config(&cfg).await.is_err());
        // An HMAC secret with a public-key algorithm, and mixed families.
        let s = temp_file(SECRET);
        let mut cfg = base_cfg(&["RS256"]);
        cfg.secret_file = Some(s.path().to_path_buf());
        assert!(Authenticator::from_config(&cfg).await.is_err());
        let mut cfg = base_cfg(&["HS256", "RS256"]);
        cfg.secret_file = Some(s.path().to_path_buf());
        assert!(Authenticator::from_config(&cfg).await.is_err());
        let mut cfg = base_cfg(&["none"]);
        cfg.secret_file = Some(s.path().to_path_buf());
        assert!(Authenticator::from_config(&cfg).await.is_err());
    }

    #[tokio::test]
    async fn time_claims_with_leeway() {
        let (a, _f) = hmac_auth(|_| {}).await;
        let t = |c: Value| hs(Algorithm::HS256, SECRET, &c);
        assert_eq!(reason(a.verify(&t(json!({ "exp": now() - 100 }))).await), "expired");
        assert!(a.verify(&t(json!({ "exp": now() - 2 }))).await.is_ok(), "within leeway");
        assert_eq!(reason(a.verify(&t(json!({ "exp": now() + 600, "nbf": now() + 100 }))).await), "not_yet_valid");
        assert!(a.verify(&t(json!({ "exp": now() + 600, "nbf": now() + 2 }))).await.is_ok());
        assert_eq!(reason(a.verify(&t(json!({ "sub": "x" }))).await), "missing_exp");
        assert_eq!(reason(a.verify(&t(json!({ "exp": "soon" }))).await), "missing_exp");
    }

    #[tokio::test]
    async fn issuer_and_audience() {
        let (a, _f) = hmac_auth(|c| {
            c.issuer = Some("https://idp.example".into());
            c.audience = Some("chat".into());
        })
        .await;
        let t = |c: Value| hs(Algorithm::HS256, SECRET, &claims(c));
        assert!(a.verify(&t(json!({ "iss": "https://idp.example", "aud": "chat" }))).await.is_ok());
        assert!(a.verify(&t(json!({ "iss": "https://idp.example", "aud": ["other", "chat"] }))).await.is_ok());
        assert_eq!(reason(a.verify(&t(json!({ "iss": "https://evil", "aud": "chat" }))).await), "issuer");
        assert_eq!(reason(a.verify(&t(json!({ "aud": "chat" }))).await), "issuer");
        let both = json!({ "iss": ["https://evil", "https://idp.example"], "aud": "chat" });
        assert_eq!(reason(a.verify(&t(both)).await), "issuer", "iss is one string");
        assert_eq!(reason(a.verify(&t(json!({ "iss": "https://idp.example", "aud": "other" }))).await), "audience");
        assert_eq!(reason(a.verify(&t(json!({ "iss": "https://idp.example", "aud": ["a", "b"] }))).await), "audience");
        assert_eq!(reason(a.verify(&t(json!({ "iss": "https://idp.example" }))).await), "audience");

        // No audience configured: a token carrying one is not refused for it.
        let (a, _f) = hmac_auth(|_| {}).await;
        assert!(a.verify(&t(json!({ "aud": "anything" }))).await.is_ok());
        assert!(a.verify(&t(json!({ "aud": ["x", "y"] }))).await.is_ok());
    }

    #[tokio::test]
    async fn bad_signature_and_wrong_secret() {
        let (a, _f) = hmac_auth(|_| {}).await;
        let good = hs(Algorithm::HS256, SECRET, &claims(json!({})));
        let other = hs(Algorithm::HS256, b"another-secret-of-at-least-32-bytes!!", &claims(json!({})));
        assert_eq!(reason(a.verify(&other).await), "signature");
        // Flip one signature character (keep it valid base64url).
        let mut bytes = good.clone().into_bytes();
        let i = bytes.len() - 5;
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        assert_eq!(reason(a.verify(&String::from_utf8(bytes).unwrap()).await), "signature");
        // Tampered payload with the original signature.
        let parts: Vec<&str> = good.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(claims(json!({ "sub": "admin" })).to_string());
        let t = format!("{}.{}.{}", parts[0], forged, parts[2]);
        assert_eq!(reason(a.verify(&t).await), "signature");

        for pair in [rsa(), ec(), ed()] {
            let alg = format!("{:?}", pair.alg);
            let a = pem_auth(pair, &[alg.as_str()]).await.unwrap();
            let t = pair.sign(None, &claims(json!({})));
            let mut p: Vec<String> = t.split('.').map(str::to_string).collect();
            p[1] = URL_SAFE_NO_PAD.encode(claims(json!({ "sub": "admin" })).to_string());
            assert_eq!(reason(a.verify(&p.join(".")).await), "signature", "{alg}");
        }
    }

    #[tokio::test]
    async fn alg_none_is_never_accepted() {
        let (a, _f) = hmac_auth(|_| {}).await;
        let body = URL_SAFE_NO_PAD.encode(claims(json!({})).to_string());
        for header in [r#"{"alg":"none"}"#, r#"{"alg":"none","typ":"JWT"}"#, r#"{"alg":"None"}"#, r#"{"alg":"NONE"}"#] {
            let h = URL_SAFE_NO_PAD.encode(header);
            assert_eq!(reason(a.verify(&format!("{h}.{body}.")).await), "algorithm", "{header}");
            let sig = URL_SAFE_NO_PAD.encode(b"x");
            assert_eq!(reason(a.verify(&format!("{h}.{body}.{sig}")).await), "algorithm", "{header}");
        }
        let a = pem_auth(rsa(), &["RS256"]).await.unwrap();
        let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
        assert_eq!(reason(a.verify(&format!("{h}.{body}.")).await), "algorithm");
    }

    #[tokio::test]
    async fn hs256_signed_with_the_rsa_public_key_fails() {
        let pem = rsa().public_pem.as_bytes();
        let t = hs(Algorithm::HS256, pem, &claims(json!({})));
        let a = pem_auth(rsa(), &["RS256"]).await.unwrap();
        assert_eq!(reason(a.verify(&t).await), "algorithm");
        // Also via a key set, and with a hand-made header.
        let a = jwks_file_auth(vec![rsa().jwk(Some("r1"))], &["RS256"]).await.unwrap();
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("r1".into());
        let t = encode(&h, &claims(json!({})), &EncodingKey::from_secret(pem)).unwrap();
        assert_eq!(reason(a.verify(&t).await), "algorithm");
        // An EdDSA token against an RSA-only allowlist.
        assert_eq!(reason(a.verify(&ed().sign(Some("r1"), &claims(json!({})))).await), "algorithm");
    }

    #[tokio::test]
    async fn alg_not_in_allowlist() {
        let (a, _f) = hmac_auth(|_| {}).await;
        let t = hs(Algorithm::HS384, SECRET, &claims(json!({})));
        assert_eq!(reason(a.verify(&t).await), "algorithm");
        let a = pem_auth(rsa(), &["RS256"]).await.unwrap();
        let t = encode(&Header::new(Algorithm::PS256), &claims(json!({})), &rsa().enc).unwrap();
        assert_eq!(reason(a.verify(&t).await), "algorithm");
    }

    #[tokio::test]
    async fn malformed_tokens() {
        let (a, _f) = hmac_auth(|_| {}).await;
        let good = hs(Algorithm::HS256, SECRET, &claims(json!({})));
        let parts: Vec<&str> = good.split('.').collect();
        let oversize = format!("{}.{}.{}", parts[0], "A".repeat(MAX_TOKEN_LEN), parts[2]);
        let not_json = URL_SAFE_NO_PAD.encode("not json");
        let array_claims = URL_SAFE_NO_PAD.encode("[1,2]");
        let cases = [
            String::new(),
            "garbage".to_string(),
            "a.b".to_string(),
            format!("{}.{}", parts[0], parts[1]),
            format!("{good}.extra"),
            format!("{}..{}", parts[0], parts[2]),
            format!("{} .{}.{}", parts[0], parts[1], parts[2]),
            format!("{}.{}.{}=", parts[0], parts[1], parts[2]),
            format!("{not_json}.{}.{}", parts[1], parts[2]),
            oversize,
            "....".to_string(),
            "Bearer x.y.z".to_string(),
        ];
        for t in &cases {
            assert_eq!(reason(a.verify(t).await), "malformed", "{t:.40}");
        }
        let t = hs(Algorithm::HS256, SECRET, &json!([1, 2]));
        assert_eq!(reason(a.verify(&t).await), "malformed");
        let t = format!("{}.{array_claims}.{}", parts[0], parts[2]);
        assert!(a.verify(&t).await.is_err());
        // crit extensions are refused.
        let mut h = Header::new(Algorithm::HS256);
        h.crit = Some(vec!["exp-ext".into()]);
        let t = encode(&h, &claims(json!({})), &EncodingKey::from_secret(SECRET)).unwrap();
        assert_eq!(reason(a.verify(&t).await), "malformed");
    }

    #[tokio::test]
    async fn errors_never_contain_the_token() {
        let (a, _f) = hmac_auth(|_| {}).await;
        let t = hs(Algorithm::HS256, SECRET, &json!({ "exp": now() - 1000 }));
        let e = a.verify(&t).await.unwrap_err();
        for s in [format!("{e}"), format!("{e:?}")] {
            for part in t.split('.') {
                assert!(!s.contains(part), "{s}");
            }
        }
    }

    #[tokio::test]
    async fn jwks_file_kid_selection() {
        let a =
            jwks_file_auth(vec![ec().jwk(Some("a")), ec2().jwk(Some("b")), ed().jwk(Some("e"))], &["ES256", "EdDSA"])
                .await
                .unwrap();
        let c = claims(json!({}));
        assert!(a.verify(&ec().sign(Some("a"), &c)).await.is_ok());
        assert!(a.verify(&ec2().sign(Some("b"), &c)).await.is_ok());
        assert!(a.verify(&ed().sign(Some("e"), &c)).await.is_ok());
        assert_eq!(reason(a.verify(&ec().sign(Some("b"), &c)).await), "signature");
        assert_eq!(reason(a.verify(&ec().sign(Some("zzz"), &c)).await), "unknown_kid");
        assert_eq!(reason(a.verify(&ec().sign(None, &c)).await), "missing_kid");
        // kty must fit the header alg: an ES256 token naming the Ed25519 key.
        assert_eq!(reason(a.verify(&ec().sign(Some("e"), &c)).await), "algorithm");
    }

    #[tokio::test]
    async fn jwks_file_single_key_without_kid() {
        let a = jwks_file_auth(vec![ec().jwk(None)], &["ES256"]).await.unwrap();
        let c = claims(json!({}));
        assert!(a.verify(&ec().sign(None, &c)).await.is_ok());
        assert_eq!(reason(a.verify(&ec().sign(Some("x"), &c)).await), "unknown_kid");
        // Two keys without kid: neither can be chosen.
        let a = jwks_file_auth(vec![ec().jwk(None), ec2().jwk(None)], &["ES256"]).await.unwrap();
        assert_eq!(reason(a.verify(&ec().sign(None, &c)).await), "missing_kid");
    }

    #[tokio::test]
    async fn jwks_key_alg_must_match_header() {
        let mut k = rsa().jwk(Some("r"));
        k["alg"] = json!("PS256");
        let a = jwks_file_auth(vec![k], &["RS256", "PS256"]).await.unwrap();
        let c = claims(json!({}));
        assert_eq!(reason(a.verify(&rsa().sign(Some("r"), &c)).await), "algorithm");
        let mut h = Header::new(Algorithm::PS256);
        h.kid = Some("r".into());
        assert!(a.verify(&encode(&h, &c, &rsa().enc).unwrap()).await.is_ok());
    }

    #[tokio::test]
    async fn jwks_unusable_keys_are_skipped_or_refused() {
        let mut enc_use = ec().jwk(Some("enc"));
        enc_use["use"] = json!("enc");
        let oct = json!({ "kty": "oct", "kid": "h", "k": URL_SAFE_NO_PAD.encode(SECRET) });
        let mut bad_alg = ec2().jwk(Some("bad"));
        bad_alg["alg"] = json!("ES384");
        let a = jwks_file_auth(vec![enc_use.clone(), oct.clone(), bad_alg.clone(), ec().jwk(Some("ok"))], &["ES256"])
            .await
            .unwrap();
        let c = claims(json!({}));
        assert!(a.verify(&ec().sign(Some("ok"), &c)).await.is_ok());
        assert_eq!(reason(a.verify(&ec().sign(Some("enc"), &c)).await), "unknown_kid");
        assert_eq!(reason(a.verify(&ec2().sign(Some("bad"), &c)).await), "unknown_kid");
        // Nothing usable at all: a startup error naming the key.
        let e = jwks_file_auth(vec![enc_use, oct, bad_alg], &["ES256"]).await.unwrap_err();
        assert!(e.0.contains("auth.jwks_file") && e.0.contains("no usable key"), "{e}");
        let f = temp_file(b"{ not json");
        let mut cfg = base_cfg(&["ES256"]);
        cfg.jwks_file = Some(f.path().to_path_buf());
        let e = Authenticator::from_config(&cfg).await.unwrap_err();
        assert!(e.0.contains("auth.jwks_file"), "{e}");
    }

    // ---- jwks_url against a loopback HTTPS server ----

    struct JwksServer {
        url: String,
        ca: tempfile::NamedTempFile,
        hits: Arc<AtomicUsize>,
        body: Arc<Mutex<(u16, String)>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl JwksServer {
        async fn start(keys: Vec<Value>) -> JwksServer {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().self_signed(&key).unwrap();
            let ca = temp_file(cert.pem().as_bytes());
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let cfg = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![cert.der().clone()],
                    rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                )
                .unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let hits = Arc::new(AtomicUsize::new(0));
            let body = Arc::new(Mutex::new((200, json!({ "keys": keys }).to_string())));
            let (h, b) = (hits.clone(), body.clone());
            let task = tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let (acceptor, hits, body) = (acceptor.clone(), h.clone(), b.clone());
                    tokio::spawn(async move {
                        let Ok(mut tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let mut req = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16384 {
                            match tls.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                        }
                        let text = String::from_utf8_lossy(&req).to_ascii_lowercase();
                        assert!(text.starts_with("get /jwks.json"), "{text}");
                        assert!(text.contains("\r\nhost: 127.0.0.1:"), "{text}");
                        hits.fetch_add(1, Ordering::SeqCst);
                        let (status, payload) = body.lock().unwrap().clone();
                        let resp = format!(
                            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n{payload}",
                            payload.len()
                        );
                        let _ = tls.write_all(resp.as_bytes()).await;
                        let _ = tls.shutdown().await;
                    });
                }
            });
            JwksServer { url: format!("https://127.0.0.1:{}/jwks.json", addr.port()), ca, hits, body, task }
        }

        fn serve(&self, status: u16, payload: String) {
            *self.body.lock().unwrap() = (status, payload);
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }

        fn cfg(&self, refresh: Option<Duration>) -> AuthConfig {
            let mut cfg = base_cfg(&["ES256", "EdDSA"]);
            cfg.jwks_url = Some(self.url.clone());
            cfg.jwks_ca_file = Some(self.ca.path().to_path_buf());
            cfg.jwks_refresh = refresh.map(Dur);
            cfg
        }
    }

    impl Drop for JwksServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    #[tokio::test]
    async fn jwks_url_rotation_via_unknown_kid_refetch() {
        let srv = JwksServer::start(vec![ec().jwk(Some("k1"))]).await;
        let a = Authenticator::from_config(&srv.cfg(None)).await.unwrap();
        assert_eq!(srv.hits(), 1, "fetched once at build");
        let c = claims(json!({}));
        assert!(a.verify(&ec().sign(Some("k1"), &c)).await.is_ok());
        assert_eq!(srv.hits(), 1, "known kid: no fetch");

        // The identity provider rotates: k2 appears. The first token with k2 triggers a refetch.
        srv.serve(200, json!({ "keys": [ec().jwk(Some("k1")), ed().jwk(Some("k2"))] }).to_string());
        assert!(a.verify(&ed().sign(Some("k2"), &c)).await.is_ok());
        assert_eq!(srv.hits(), 2);
        assert!(a.verify(&ec().sign(Some("k1"), &c)).await.is_ok());
        // Within the cooldown another unknown kid is refused without a fetch.
        assert_eq!(reason(a.verify(&ec().sign(Some("k3"), &c)).await), "unknown_kid");
        assert_eq!(srv.hits(), 2);
    }

    #[tokio::test]
    async fn jwks_url_flood_of_unknown_kids_costs_one_fetch() {
        let srv = JwksServer::start(vec![ec().jwk(Some("k1"))]).await;
        let a = Arc::new(Authenticator::from_config(&srv.cfg(None)).await.unwrap());
        assert_eq!(srv.hits(), 1);
        let c = claims(json!({}));
        let mut tasks = Vec::new();
        for i in 0..100 {
            let (a, t) = (a.clone(), ec().sign(Some(&format!("random-{i}")), &c));
            tasks.push(tokio::spawn(async move { a.verify(&t).await }));
        }
        for t in tasks {
            assert_eq!(reason(t.await.unwrap()), "unknown_kid");
        }
        let refetches = srv.hits() - 1;
        assert!((1..=2).contains(&refetches), "{refetches} refetches");
        assert!(a.verify(&ec().sign(Some("k1"), &c)).await.is_ok());
    }

    #[tokio::test]
    async fn jwks_url_periodic_refresh_keeps_old_keys_on_failure_and_stops_on_drop() {
        let srv = JwksServer::start(vec![ec().jwk(Some("k1"))]).await;
        let a = Arc::new(Authenticator::from_config(&srv.cfg(Some(Duration::from_millis(150)))).await.unwrap());
        let c = claims(json!({}));
        // Start the unknown-kid cooldown, so only the periodic task can pick up new keys.
        assert_eq!(reason(a.verify(&ec().sign(Some("nope"), &c)).await), "unknown_kid");
        let handle = a.spawn_refresh().expect("a refresh task for jwks_url");

        srv.serve(200, json!({ "keys": [ed().jwk(Some("k2"))] }).to_string());
        let deadline = Instant::now() + Duration::from_secs(5);
        while a.verify(&ed().sign(Some("k2"), &c)).await.is_err() {
            assert!(Instant::now() < deadline, "periodic refresh did not pick up k2");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // k1 is gone from the new set.
        assert_eq!(reason(a.verify(&ec().sign(Some("k1"), &c)).await), "unknown_kid");

        // Failures (bad JSON, 500, empty set) keep the previous keys.
        for (status, body) in [(200, "not json".to_string()), (500, String::new()), (200, r#"{"keys":[]}"#.to_string())]
        {
            srv.serve(status, body);
            // Two more fetches: at least one failed refresh has completed in between.
            let before = srv.hits();
            let deadline = Instant::now() + Duration::from_secs(5);
            while srv.hits() < before + 2 {
                assert!(Instant::now() < deadline, "no periodic refresh");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(a.verify(&ed().sign(Some("k2"), &c)).await.is_ok());
            // Answer again, so the next case starts from the interval, not a backed-off delay.
            srv.serve(200, json!({ "keys": [ed().jwk(Some("k2"))] }).to_string());
            let before = srv.hits();
            while srv.hits() < before + 2 {
                assert!(Instant::now() < deadline + Duration::from_secs(5), "no refresh after the failures");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        // The task holds a weak reference: dropping the authenticator ends it.
        drop(a);
        tokio::time::timeout(Duration::from_secs(2), handle).await.expect("task ended").unwrap();
    }

    #[tokio::test]
    async fn jwks_url_startup_errors() {
        let srv = JwksServer::start(vec![ec().jwk(Some("k1"))]).await;
        // Untrusted certificate (no jwks_ca_file).
        let mut cfg = srv.cfg(None);
        cfg.jwks_ca_file = None;
        let e = Authenticator::from_config(&cfg).await.unwrap_err();
        assert!(e.0.contains("auth.jwks_url"), "{e}");

        // Non-200 status.
        srv.serve(404, "{}".into());
        let e = Authenticator::from_config(&srv.cfg(None)).await.unwrap_err();
        assert!(e.0.contains("auth.jwks_url") && e.0.contains("404"), "{e}");

        // Plain http is refused.
        let mut cfg = srv.cfg(None);
        cfg.jwks_url = Some(srv.url.replace("https://", "http://"));
        assert!(Authenticator::from_config(&cfg).await.is_err());

        // Only jwks_url gets a refresh task.
        let (h, _f) = hmac_auth(|_| {}).await;
        assert!(Arc::new(h).spawn_refresh().is_none());
    }

    #[tokio::test]
    async fn jwks_url_unavailable_at_start_refuses_every_token_until_a_fetch_succeeds() {
        let c = claims(json!({}));
        // Nothing listens on the port: the identity provider is down, the config is fine.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let srv = JwksServer::start(vec![ec().jwk(Some("k1"))]).await;
        let mut cfg = srv.cfg(None);
        cfg.jwks_url = Some(format!("https://127.0.0.1:{port}/jwks.json?api_key=SECRET"));
        let a = Authenticator::from_config(&cfg).await.expect("an unreachable endpoint is not a config error");
        let why = a.no_keys().expect("no keys");
        assert!(why.contains("auth.jwks_url") && why.contains("connect"), "{why}");
        // A query may hold a credential: not shown in messages, logs or metrics.
        assert!(why.contains("/jwks.json?…") && !why.contains("SECRET"), "{why}");
        assert!(a.jwks_fetched_at().is_some_and(|(url, _)| !url.contains("SECRET")));
        assert_eq!(reason(a.verify(&ec().sign(Some("k1"), &c)).await), "no_keys");
        assert_eq!(reason(a.verify(&ec().sign(None, &c)).await), "no_keys");

        // A 503 is the endpoint's outage too. The refresh task retries within about a second
        // and then verifies.
        srv.serve(503, String::new());
        let a = Arc::new(Authenticator::from_config(&srv.cfg(None)).await.unwrap());
        assert!(a.no_keys().is_some());
        let _task = AbortOnDrop(a.spawn_refresh().unwrap());
        srv.serve(200, json!({ "keys": [ec().jwk(Some("k1"))] }).to_string());
        let deadline = Instant::now() + Duration::from_secs(5);
        while a.no_keys().is_some() {
            assert!(Instant::now() < deadline, "no retry within 5 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(a.verify(&ec().sign(Some("k1"), &c)).await.is_ok());
    }

    #[tokio::test]
    async fn jwks_url_reload_during_an_outage_keeps_the_running_keys() {
        let c = claims(json!({}));
        let srv = JwksServer::start(vec![ec().jwk(Some("k1"))]).await;
        let running = Authenticator::from_config(&srv.cfg(None)).await.unwrap();

        // The same source, the endpoint down: the keys are kept.
        srv.serve(503, String::new());
        let a = Authenticator::reloaded(&srv.cfg(None), &running).await.expect("reload keeps the keys");
        assert!(a.no_keys().is_none());
        assert!(a.verify(&ec().sign(Some("k1"), &c)).await.is_ok());
        // The same algorithms in another order are the same source.
        let mut reordered = srv.cfg(None);
        reordered.algorithms = Some(vec!["EdDSA".into(), "ES256".into()]);
        assert!(Authenticator::reloaded(&reordered, &running).await.is_ok());

        // A different URL, or other algorithms (the kept set was filtered for the old ones),
        // has no keys to keep: the reload is refused rather than trade working keys for none.
        let mut other_url = srv.cfg(None);
        other_url.jwks_url = Some(format!("{}?v=2", srv.url));
        let mut other_algs = srv.cfg(None);
        other_algs.algorithms = Some(vec!["ES256".into()]);
        for cfg in [other_url, other_algs] {
            let e = Authenticator::reloaded(&cfg, &running).await.unwrap_err();
            assert!(e.0.contains("auth.jwks_url") && e.0.contains("503"), "{e}");
        }

        // A broken answer is not an outage: refused too.
        for (status, body) in [(404, String::new()), (200, "not json".to_string())] {
            srv.serve(status, body);
            assert!(Authenticator::reloaded(&srv.cfg(None), &running).await.is_err(), "status {status}");
        }

        // When the endpoint answers, the reload takes what it serves now.
        srv.serve(200, json!({ "keys": [ed().jwk(Some("k2"))] }).to_string());
        let a = Authenticator::reloaded(&srv.cfg(None), &running).await.unwrap();
        assert!(a.verify(&ed().sign(Some("k2"), &c)).await.is_ok());
        assert_eq!(reason(a.verify(&ec().sign(Some("k1"), &c)).await), "unknown_kid");

        // Started without keys, still down at the reload: still without keys, not refused.
        srv.serve(503, String::new());
        let keyless = Authenticator::from_config(&srv.cfg(None)).await.unwrap();
        assert!(Authenticator::reloaded(&srv.cfg(None), &keyless).await.unwrap().no_keys().is_some());
    }
}
