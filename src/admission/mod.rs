//! Admission at the handshake: everything that decides whether a session may start, in the
//! order of DESIGN.md's Admission table (cheapest first; the first failure answers).
//!
//! - [`origin`]: the Origin allowlist (CSWSH).
//! - [`auth`]: JWT verification and key sources.
//! - [`token`]: token sources and scrubbing them from the backend request.
//! - [`client_ip`]: the client address behind trusted proxies.
//! - [`proxy_protocol`]: PROXY v1/v2 headers from trusted balancers.
//! - [`limits`]: per-IP caps and handshake rates, the global cap, the pending-handshake guard.

pub mod auth;
pub mod client_ip;
pub mod limits;
pub mod origin;
pub mod proxy_protocol;
pub mod token;

use crate::relay::SessionPolicy;
use crate::state::{Policy, Shared};
use crate::upstream::BackendRequest;
use auth::TokenError;
use hyper::header::{HeaderName, HeaderValue, ORIGIN};
use hyper::{HeaderMap, StatusCode};
use limits::{GlobalPermit, IpKey, SessionPermit};
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A refused handshake: the status, the metric/log reason and extra response headers.
#[derive(Debug)]
pub struct Rejection {
    /// HTTP status sent to the client.
    pub status: StatusCode,
    /// `wsgate_handshakes_total{result}` and the log's `reason`.
    pub reason: &'static str,
    /// `WWW-Authenticate`, `Retry-After`, …
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// What went wrong on the proxy's side (a backend failure), for the rejection's log line.
    /// Never client input: no token can reach the log through it.
    pub error: Option<String>,
    /// Why a client's request was refused, in a fixed word (`expired`, `signature`, …), for
    /// the log line: an operator wiring up an identity provider needs it. Never client input.
    pub detail: Option<&'static str>,
}

impl Rejection {
    /// A rejection without extra headers.
    pub fn new(status: StatusCode, reason: &'static str) -> Rejection {
        Rejection { status, reason, headers: Vec::new(), error: None, detail: None }
    }

    /// Adds a response header.
    pub fn with(mut self, name: HeaderName, value: HeaderValue) -> Rejection {
        self.headers.push((name, value));
        self
    }
}

/// What an admitted session carries into the relay: its permits (released on drop, on every
/// path), its policy, and the request for the backend.
pub struct Admitted {
    /// The backend request, scrubbed.
    pub backend_request: BackendRequest,
    /// Limits and timers, fixed at admission.
    pub policy: SessionPolicy,
    /// `sub` claim, for logs.
    pub sub: Option<String>,
    /// The client offered the `access_token, <jwt>` pair (not offered to the backend): answer
    /// `access_token` if the backend picks none, since a browser fails a handshake that
    /// offered protocols and got none back.
    pub token_in_protocol: bool,
    /// Per-IP session slot.
    pub ip_permit: SessionPermit,
    /// Global session slot.
    pub global_permit: GlobalPermit,
}

/// Checks the per-IP handshake rate (every upgrade attempt and passthrough request counts).
pub fn check_rate(shared: &Shared, policy: &Policy, client_ip: IpAddr) -> Result<IpKey, Rejection> {
    let key = IpKey::from_config(client_ip, &policy.config.limits);
    shared.limiter.check_handshake(key, &policy.ip_limits).map_err(|retry| {
        let secs = retry.as_secs().max(1).to_string();
        Rejection::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited")
            .with(hyper::header::RETRY_AFTER, HeaderValue::from_str(&secs).unwrap_or(HeaderValue::from_static("1")))
    })?;
    Ok(key)
}

/// A claim as header text: a string as it is, `null` as absent, anything else as JSON.
fn claim_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// Whether the request's Origin passes. Every Origin header must: a browser sends one, and a
/// second could be the one the backend reads.
fn origins_allowed(allow: &origin::OriginPolicy, headers: &HeaderMap) -> bool {
    let mut origins = headers.get_all(ORIGIN).iter().peekable();
    match origins.peek() {
        None => allow.allows(None),
        Some(_) => origins.all(|o| allow.allows(Some(o.as_bytes()))),
    }
}

/// No keys to verify tokens with yet (`jwks_url` unavailable since the start): 503 with
/// `Retry-After`, result `auth_unavailable`.
fn auth_unavailable() -> Rejection {
    Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "auth_unavailable")
        .with(hyper::header::RETRY_AFTER, HeaderValue::from_static("5"))
}

/// Runs the admission checks after the request was recognised as a well-formed upgrade.
pub async fn admit(
    shared: &Shared,
    policy: &Policy,
    headers: &HeaderMap,
    path_and_query: &str,
    client_ip: IpAddr,
) -> Result<Admitted, Rejection> {
    let key = check_rate(shared, policy, client_ip)?;

    if !origins_allowed(&policy.origin, headers) {
        return Err(Rejection::new(StatusCode::FORBIDDEN, "origin_denied"));
    }

    let offered = token::offered_protocols(headers);
    let mut session = policy.session.clone();
    let mut sub = None;
    let mut extra = Vec::new();
    let mut admitted_token = None;
    if let Some(auth) = &policy.auth {
        let query = path_and_query.split_once('?').map(|(_, q)| q);
        let Some(found) = token::extract(&policy.sources, headers, query, &offered) else {
            return Err(Rejection::new(StatusCode::UNAUTHORIZED, "token_missing")
                .with(hyper::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        };
        let verified = auth.verify(&found.token).await.map_err(|e| match e {
            // The identity provider's outage, not the client's token: 503 and come back.
            TokenError::NoKeys => Rejection { detail: Some(e.reason()), ..auth_unavailable() },
            TokenError::Invalid(_) => Rejection {
                detail: Some(e.reason()),
                ..Rejection::new(StatusCode::UNAUTHORIZED, "token_invalid")
                    .with(hyper::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer error=\"invalid_token\""))
            },
        })?;
        // The log's `sub` is the text the backend gets in a claim header (`sub: 123` too).
        sub = verified.claims.get("sub").and_then(claim_text);
        for (claim, header) in &policy.claims {
            let Some(value) = verified.claims.get(claim).and_then(claim_text) else { continue };
            if let Ok(v) = HeaderValue::from_str(&value) {
                extra.push((header.clone(), v));
            }
        }
        if policy.config.auth.expire_sessions() {
            session.expires_at = expiry_instant(verified.exp, auth.leeway());
        }
        admitted_token = Some(found.token);
    }

    let ip_permit = shared
        .limiter
        .acquire_session(key, &policy.ip_limits)
        .ok_or_else(|| Rejection::new(StatusCode::TOO_MANY_REQUESTS, "ip_cap"))?;
    let global_permit = shared
        .global
        .try_acquire(policy.config.server.max_connections)
        .ok_or_else(|| Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "global_cap"))?;

    // Every configured carrier is scrubbed, and the admitted token where else the client also
    // put it as a whole value: a query parameter, a cookie, a Bearer credential, a subprotocol.
    let admitted = admitted_token.as_deref();
    let mut client_headers = headers.clone();
    token::scrub_headers(&mut client_headers, &policy.sources, admitted);
    // Whichever source yielded the token, a pair the client sent is stripped, and answered.
    let backend_protocols = token::protocols_for_backend(&offered, &policy.sources, admitted);
    // The proxy may answer `access_token` only when it took an offered `access_token` away.
    let offered_pairs = |ps: &[String]| ps.iter().filter(|p| *p == token::TOKEN_PROTOCOL).count();
    let token_in_protocol = offered_pairs(&backend_protocols) < offered_pairs(&offered);
    let backend_request = BackendRequest::new(
        token::scrub_path(path_and_query, &policy.sources, admitted),
        &client_headers,
        &policy.dropped_headers,
        client_ip,
        extra,
        backend_protocols,
    );
    Ok(Admitted { backend_request, policy: session, sub, token_in_protocol, ip_permit, global_permit })
}

/// `exp + leeway` (Unix seconds) as a monotonic instant; `None` when that is further away than
/// the clock can count (a signed token may carry any `exp`, up to `u64::MAX`): such a session
/// never reaches its expiry anyway.
fn expiry_instant(exp: u64, leeway: Duration) -> Option<Instant> {
    let now_unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let at = Duration::from_secs(exp).checked_add(leeway)?;
    Instant::now().checked_add(at.saturating_sub(now_unix))
}
