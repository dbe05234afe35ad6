//! The configuration file: its schema (DESIGN.md "Configuration"), defaults and the static
//! validation that runs before anything is loaded. Loading keys and certificates (which can
//! also fail with exit code 2) happens in [`crate::state`].

mod units;

pub use units::{parse_size, Dur, Size, MAX_DURATION};

use ipnet::IpNet;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration problem: exit code 2, with a message that names the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

macro_rules! bail {
    ($($t:tt)*) => { return Err(ConfigError(format!($($t)*))) };
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[server]`: listeners and global caps.
    pub server: ServerConfig,
    /// `[tls]`: the certificate served to clients.
    pub tls: TlsConfig,
    /// `[backend]`: where sessions are relayed to.
    pub backend: BackendConfig,
    /// `[origin]`: the Origin allowlist.
    #[serde(default)]
    pub origin: OriginConfig,
    /// `[auth]`: token checks.
    #[serde(default)]
    pub auth: AuthConfig,
    /// `[limits]`: per-IP and per-session limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// `[trusted_proxies]`: who may tell us the client's address.
    #[serde(default)]
    pub trusted_proxies: TrustedProxiesConfig,
    /// `[admin]`: metrics and health listener.
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[log]`: log format and level.
    #[serde(default)]
    pub log: LogConfig,
}

/// One address or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Listen {
    /// `listen = "0.0.0.0:8443"`
    One(SocketAddr),
    /// `listen = ["0.0.0.0:8443", "[::]:8443"]`
    Many(Vec<SocketAddr>),
}

impl Listen {
    /// Every address to listen on.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        match self {
            Listen::One(a) => vec![*a],
            Listen::Many(v) => v.clone(),
        }
    }
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// TLS listener address(es).
    pub listen: Listen,
    /// TCP accept → TLS → HTTP upgrade must finish within this.
    #[serde(default = "d_10s")]
    pub handshake_timeout: Dur,
    /// Global cap on proxied sessions (503 beyond).
    #[serde(default = "d_10000")]
    pub max_connections: u64,
    /// How long a drain waits for sessions to close.
    #[serde(default = "d_30s")]
    pub shutdown_grace: Dur,
}

/// `[tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// `"1.2"` or `"1.3"`.
    #[serde(default = "d_tls12")]
    pub min_version: String,
    /// Optional CA bundle: when set, clients must present a certificate it signed.
    pub client_ca: Option<PathBuf>,
    /// Extra certificates chosen by SNI.
    #[serde(default)]
    pub sni: Vec<SniConfig>,
}

/// `[[tls.sni]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniConfig {
    /// Exact names or `*.example.com`.
    pub server_names: Vec<String>,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// What to do with plain HTTP requests (not WebSocket upgrades).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum HttpMode {
    /// Answer 426 Upgrade Required.
    #[default]
    Reject,
    /// Pass them through to the backend (its pages), with header scrubbing.
    Proxy,
}

/// `[backend]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `ws://` or `wss://` URL; its path is a prefix for the client's path.
    pub url: String,
    /// TCP + TLS + 101 must finish within this (504 beyond).
    #[serde(default = "d_5s")]
    pub connect_timeout: Dur,
    /// CA bundle for a `wss://` backend (default: system roots).
    pub ca_file: Option<PathBuf>,
    /// Non-upgrade requests: reject (426) or proxy.
    #[serde(default)]
    pub http: HttpMode,
}

/// `[origin]`
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OriginConfig {
    /// Exact origins or one leading `*.` label wildcard.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Accept requests without an Origin header.
    #[serde(default)]
    pub allow_missing: bool,
    /// Accept every Origin (must be said explicitly).
    #[serde(default)]
    pub allow_any: bool,
}

/// `auth.mode`
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Require a valid JWT.
    Jwt,
    /// No authentication (must be said explicitly).
    None,
}

/// `[auth]`. Optional keys stay `None` so that `mode = "none"` beside them can be refused;
/// [`AuthConfig`] accessors give the defaults.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Required: `"jwt"` or `"none"`.
    pub mode: Option<AuthMode>,
    /// Allowed algorithms (default `["HS256"]`).
    pub algorithms: Option<Vec<String>>,
    /// HMAC secret from this environment variable.
    pub secret_env: Option<String>,
    /// HMAC secret from this file.
    pub secret_file: Option<PathBuf>,
    /// RSA / EC / Ed25519 public key (PEM).
    pub public_key_file: Option<PathBuf>,
    /// JSON Web Key Set file.
    pub jwks_file: Option<PathBuf>,
    /// JSON Web Key Set URL (https).
    pub jwks_url: Option<String>,
    /// Refresh interval of `jwks_url` (default 10m).
    pub jwks_refresh: Option<Dur>,
    /// Extra CA for the JWKS endpoint.
    pub jwks_ca_file: Option<PathBuf>,
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Required `aud`.
    pub audience: Option<String>,
    /// Leeway for `exp` and `nbf` (default 30s).
    pub leeway: Option<Dur>,
    /// Where tokens are looked for, in order.
    pub sources: Option<Vec<String>>,
    /// Close live sessions when the token expires (default true).
    pub expire_sessions: Option<bool>,
    /// Claim name → request header sent to the backend.
    pub forward_claims: Option<BTreeMap<String, String>>,
}

impl AuthConfig {
    /// The algorithm allowlist, default `["HS256"]`.
    pub fn algorithms(&self) -> Vec<String> {
        self.algorithms.clone().unwrap_or_else(|| vec!["HS256".into()])
    }
    /// Token sources, default header, query, cookie, subprotocol.
    pub fn sources(&self) -> Vec<String> {
        self.sources.clone().unwrap_or_else(|| {
            ["header", "query:access_token", "cookie:access_token", "subprotocol"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        })
    }
    /// Leeway, default 30 s.
    pub fn leeway(&self) -> Duration {
        self.leeway.map(Dur::get).unwrap_or(Duration::from_secs(30))
    }
    /// JWKS refresh interval, default 10 min.
    pub fn jwks_refresh(&self) -> Duration {
        self.jwks_refresh.map(Dur::get).unwrap_or(Duration::from_secs(600))
    }
    /// Whether live sessions end at `exp + leeway` (default true).
    pub fn expire_sessions(&self) -> bool {
        self.expire_sessions.unwrap_or(true)
    }
    /// Claims forwarded as headers.
    pub fn forward_claims(&self) -> BTreeMap<String, String> {
        self.forward_claims.clone().unwrap_or_default()
    }
}

/// `limits.on_rate_limit`
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnRateLimit {
    /// Close the session with 1008.
    #[default]
    Close,
    /// Discard the message and count it.
    Drop,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Concurrent sessions per client IP prefix (429 beyond).
    pub max_connections_per_ip: u64,
    /// IPv6 clients are grouped by this prefix length.
    pub ipv6_prefix: u8,
    /// IPv4 clients are grouped by this prefix length.
    pub ipv4_prefix: u8,
    /// New upgrades per second per client IP (token bucket refill).
    pub handshakes_per_second_per_ip: u64,
    /// Bucket size of the handshake rate.
    pub handshake_burst_per_ip: u64,
    /// TCP connections not yet upgraded, per peer IP.
    pub max_pending_handshakes_per_ip: u64,
    /// Largest client frame.
    pub max_frame_size: Size,
    /// Largest message after fragments are joined (both directions).
    pub max_message_size: Size,
    /// Client → backend messages per second per session.
    pub messages_per_second: u64,
    /// Message bucket size.
    pub message_burst: u64,
    /// Client → backend bytes per second per session.
    pub bytes_per_second: Size,
    /// Byte bucket size (default: one second's worth).
    pub byte_burst: Option<Size>,
    /// Close (1008) or drop when over a rate.
    pub on_rate_limit: OnRateLimit,
    /// No data frame either way for this long → 1001.
    pub idle_timeout: Dur,
    /// Keepalive ping interval towards the client.
    pub ping_interval: Dur,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections_per_ip: 20,
            ipv6_prefix: 64,
            ipv4_prefix: 32,
            handshakes_per_second_per_ip: 10,
            handshake_burst_per_ip: 20,
            max_pending_handshakes_per_ip: 16,
            max_frame_size: Size(64 << 10),
            max_message_size: Size(1 << 20),
            messages_per_second: 50,
            message_burst: 100,
            bytes_per_second: Size(1 << 20),
            byte_burst: None,
            on_rate_limit: OnRateLimit::Close,
            idle_timeout: Dur(Duration::from_secs(300)),
            ping_interval: Dur(Duration::from_secs(30)),
        }
    }
}

impl LimitsConfig {
    /// The byte bucket size: `byte_burst`, or one second's worth.
    pub fn byte_burst(&self) -> u64 {
        self.byte_burst.unwrap_or(self.bytes_per_second).get()
    }
}

/// `[trusted_proxies]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustedProxiesConfig {
    /// Peers in these networks may tell us the client's address.
    pub cidrs: Vec<IpNet>,
    /// The header they use (default `x-forwarded-for`).
    pub header: String,
    /// Read a PROXY protocol v1/v2 header from trusted peers instead.
    pub proxy_protocol: bool,
}

impl Default for TrustedProxiesConfig {
    fn default() -> Self {
        TrustedProxiesConfig { cidrs: Vec::new(), header: "x-forwarded-for".into(), proxy_protocol: false }
    }
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Plaintext listener for /metrics, /healthz, /readyz.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: SocketAddr::from(([127, 0, 0, 1], 9090)) }
    }
}

/// A parse error quotes the offending line and draws a caret row under it: a 10 MB line made
/// a 20 MB message. Each line is cut to [`MAX_MESSAGE_LINE`] characters.
fn clip_lines(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len().min(4096));
    for (i, line) in msg.lines().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        match line.char_indices().nth(MAX_MESSAGE_LINE) {
            Some((cut, _)) => {
                out.push_str(&line[..cut]);
                out.push('…');
            }
            None => out.push_str(line),
        }
    }
    out
}

/// Longest line of a configuration error message, in characters.
const MAX_MESSAGE_LINE: usize = 200;

/// `log.format`
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable text.
    Text,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `json` or `text`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `wsgate=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Json, level: "info".into() }
    }
}

fn d_10s() -> Dur {
    Dur(Duration::from_secs(10))
}
fn d_30s() -> Dur {
    Dur(Duration::from_secs(30))
}
fn d_5s() -> Dur {
    Dur(Duration::from_secs(5))
}
fn d_10000() -> u64 {
    10_000
}
fn d_tls12() -> String {
    "1.2".into()
}

/// A token source from `auth.sources`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <jwt>`
    Header,
    /// `?name=<jwt>`
    Query(String),
    /// `Cookie: name=<jwt>`
    Cookie(String),
    /// `Sec-WebSocket-Protocol: access_token, <jwt>`
    Subprotocol,
}

impl TokenSource {
    /// Parses one `auth.sources` entry.
    pub fn parse(s: &str) -> Result<TokenSource, ConfigError> {
        let bad = |what: &str| {
            ConfigError(format!(
                "auth.sources: {what} in {s:?}; use \"header\", \"query:NAME\", \"cookie:NAME\" or \"subprotocol\""
            ))
        };
        match s.split_once(':') {
            None if s == "header" => Ok(TokenSource::Header),
            None if s == "subprotocol" => Ok(TokenSource::Subprotocol),
            Some(("query", n)) if valid_token_name(n) => Ok(TokenSource::Query(n.to_string())),
            Some(("cookie", n)) if valid_token_name(n) => Ok(TokenSource::Cookie(n.to_string())),
            Some(("query" | "cookie", _)) => Err(bad("invalid parameter name")),
            _ => Err(bad("unknown source")),
        }
    }
}

fn valid_token_name(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The algorithms wsgate knows, by family.
pub const HMAC_ALGS: &[&str] = &["HS256", "HS384", "HS512"];
/// Public-key algorithms.
pub const ASYM_ALGS: &[&str] = &["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"];

impl Config {
    /// Reads and validates a config file. Errors name the file, the key and, for syntax
    /// errors, the line.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        Config::parse(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }

    /// The `log.format` a config file asks for, read leniently so that an error in the rest
    /// of the file is still reported in that format (JSON, the default, when the file cannot
    /// be read or says nothing usable).
    pub fn format_hint(path: &Path) -> LogFormat {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let format = match toml::from_str::<toml::Table>(&text) {
            Ok(table) => table.get("log").and_then(|l| l.get("format")).and_then(|f| f.as_str()).map(str::to_string),
            // Not TOML at all: look for `format = ...` under `[log]` line by line.
            Err(_) => {
                let mut in_log = false;
                text.lines().map(str::trim).find_map(|l| {
                    if let Some(header) = l.strip_prefix('[') {
                        in_log = header.split(']').next().is_some_and(|h| h.trim() == "log");
                        return None;
                    }
                    let (k, v) = l.split_once('=').filter(|_| in_log)?;
                    let v = v.split('#').next().unwrap_or("").trim().trim_matches(['"', '\'']);
                    (k.trim() == "format").then(|| v.to_string())
                })
            }
        };
        match format.as_deref() {
            Some("text") => LogFormat::Text,
            _ => LogFormat::Json,
        }
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError(clip_lines(e.to_string().trim_end())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Static checks that need no file or environment access.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.listen.addrs().is_empty() {
            bail!("server.listen: at least one address is required");
        }
        nonzero_dur("server.handshake_timeout", s.handshake_timeout)?;
        nonzero("server.max_connections", s.max_connections)?;
        let admin = self.admin.listen;
        // Two listeners on one port clash when their addresses are equal or either is the
        // wildcard; `check` says so rather than `run` failing to bind.
        // An unspecified address covers its own family, and `[::]` (dual-stack) IPv4 too.
        let covers = |w: SocketAddr, o: SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || o.is_ipv4());
        let clash = |a: &SocketAddr| {
            a.port() != 0
                && a.port() == admin.port()
                && (a.ip() == admin.ip() || covers(*a, admin) || covers(admin, *a))
        };
        if let Some(a) = s.listen.addrs().iter().find(|a| clash(a)) {
            bail!("admin.listen: {admin} takes the port of server.listen {a}");
        }

        if !matches!(self.tls.min_version.as_str(), "1.2" | "1.3") {
            bail!("tls.min_version: must be \"1.2\" or \"1.3\", got {:?}", self.tls.min_version);
        }
        for (i, sni) in self.tls.sni.iter().enumerate() {
            if sni.server_names.is_empty() {
                bail!("tls.sni[{i}].server_names: at least one name is required");
            }
            for n in &sni.server_names {
                let bare = n.strip_prefix("*.").unwrap_or(n);
                if bare.is_empty()
                    || bare.contains('*')
                    || !bare.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
                {
                    bail!("tls.sni[{i}].server_names: invalid name {n:?} (exact DNS name or *.example.com)");
                }
            }
        }

        crate::upstream::BackendUrl::parse(&self.backend.url).map_err(|e| ConfigError(format!("backend.url: {e}")))?;
        nonzero_dur("backend.connect_timeout", self.backend.connect_timeout)?;

        if self.origin.allow.is_empty() && !self.origin.allow_any {
            bail!("origin.allow: an allow list is required (or allow_any = true, said explicitly, e.g. when no browser ever connects)");
        }
        for o in &self.origin.allow {
            crate::admission::origin::OriginPattern::parse(o).map_err(|e| ConfigError(format!("origin.allow: {e}")))?;
        }

        self.validate_auth()?;
        self.validate_limits()?;

        let t = &self.trusted_proxies;
        if hyper::header::HeaderName::from_bytes(t.header.as_bytes()).is_err() {
            bail!("trusted_proxies.header: {:?} is not a valid header name", t.header);
        }
        if t.proxy_protocol && t.cidrs.is_empty() {
            bail!("trusted_proxies.proxy_protocol: needs trusted_proxies.cidrs (only trusted peers may send a PROXY header)");
        }
        // A bare word is a valid filter to tracing (every event of a target by that name),
        // so a misspelt level ("inf") would silence the log: each directive must be a level
        // or name one (`wsgate=debug`).
        const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
        let bare_word = self
            .log
            .level
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .any(|d| !d.contains('=') && !LEVELS.iter().any(|l| d.eq_ignore_ascii_case(l)));
        if bare_word || tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            bail!(
                "log.level: {:?} is not a level (trace, debug, info, warn, error, off) or a filter such as \"info,wsgate=debug\"",
                self.log.level
            );
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        let mode = a
            .mode
            .ok_or_else(|| ConfigError("auth.mode: required, \"jwt\" or \"none\" (must be said explicitly)".into()))?;
        let key_sources: Vec<&str> = [
            ("secret_env", a.secret_env.is_some()),
            ("secret_file", a.secret_file.is_some()),
            ("public_key_file", a.public_key_file.is_some()),
            ("jwks_file", a.jwks_file.is_some()),
            ("jwks_url", a.jwks_url.is_some()),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(n, _)| n)
        .collect();
        if mode == AuthMode::None {
            let others = [
                ("algorithms", a.algorithms.is_some()),
                ("jwks_refresh", a.jwks_refresh.is_some()),
                ("jwks_ca_file", a.jwks_ca_file.is_some()),
                ("issuer", a.issuer.is_some()),
                ("audience", a.audience.is_some()),
                ("leeway", a.leeway.is_some()),
                ("sources", a.sources.is_some()),
                ("expire_sessions", a.expire_sessions.is_some()),
                ("forward_claims", a.forward_claims.is_some()),
            ];
            if let Some(k) = key_sources.first().copied().or(others.iter().find(|(_, s)| *s).map(|(n, _)| *n)) {
                bail!("auth.{k}: not allowed with auth.mode = \"none\" (remove it, or use mode = \"jwt\")");
            }
            return Ok(());
        }
        let algs = a.algorithms();
        if algs.is_empty() {
            bail!("auth.algorithms: at least one algorithm is required");
        }
        let mut hmac = false;
        let mut asym = false;
        for alg in &algs {
            if alg.eq_ignore_ascii_case("none") {
                bail!("auth.algorithms: \"none\" is never accepted");
            }
            if HMAC_ALGS.contains(&alg.as_str()) {
                hmac = true;
            } else if ASYM_ALGS.contains(&alg.as_str()) {
                asym = true;
            } else {
                bail!(
                    "auth.algorithms: unknown algorithm {alg:?} (known: {}, {})",
                    HMAC_ALGS.join(", "),
                    ASYM_ALGS.join(", ")
                );
            }
        }
        if hmac && asym {
            bail!("auth.algorithms: HMAC (HS*) and public-key algorithms cannot be mixed: one key family per config");
        }
        match key_sources.as_slice() {
            [] => bail!("auth: a key is required: secret_env, secret_file, public_key_file, jwks_file or jwks_url"),
            [_] => {}
            many => bail!("auth: only one key source may be set, found {}", many.join(" and ")),
        }
        let src = key_sources[0];
        let is_secret = matches!(src, "secret_env" | "secret_file");
        if hmac && !is_secret {
            bail!("auth.{src}: HMAC algorithms ({}) need secret_env or secret_file, not a public key", algs.join(", "));
        }
        if asym && is_secret {
            bail!("auth.{src}: public-key algorithms ({}) need public_key_file, jwks_file or jwks_url, not an HMAC secret", algs.join(", "));
        }
        if let Some(u) = &a.jwks_url {
            if !u.starts_with("https://") {
                let shown = crate::admission::auth::shown_url(u);
                bail!("auth.jwks_url: must be an https:// URL, got {shown:?}");
            }
        }
        if a.jwks_ca_file.is_some() && a.jwks_url.is_none() {
            bail!("auth.jwks_ca_file: only meaningful with auth.jwks_url");
        }
        if a.jwks_refresh.is_some() && a.jwks_url.is_none() {
            bail!("auth.jwks_refresh: only meaningful with auth.jwks_url");
        }
        if let Some(r) = a.jwks_refresh {
            // Each refresh is a TLS connection to the identity provider.
            if r.get() < Duration::from_secs(1) {
                bail!("auth.jwks_refresh: must be at least 1s, got {r}");
            }
        }
        let sources = a.sources();
        if sources.is_empty() {
            bail!("auth.sources: at least one token source is required");
        }
        for s in &sources {
            TokenSource::parse(s)?;
        }
        for (claim, header) in a.forward_claims() {
            let name = hyper::header::HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
                ConfigError(format!("auth.forward_claims.{claim}: {header:?} is not a valid header name"))
            })?;
            if crate::upstream::is_reserved_header(&crate::upstream::dashed(&name).unwrap_or(name)) {
                bail!("auth.forward_claims.{claim}: header {header:?} is set by the proxy itself");
            }
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        nonzero("limits.max_connections_per_ip", l.max_connections_per_ip)?;
        nonzero("limits.handshakes_per_second_per_ip", l.handshakes_per_second_per_ip)?;
        nonzero("limits.handshake_burst_per_ip", l.handshake_burst_per_ip)?;
        nonzero("limits.max_pending_handshakes_per_ip", l.max_pending_handshakes_per_ip)?;
        nonzero("limits.max_frame_size", l.max_frame_size.get())?;
        nonzero("limits.max_message_size", l.max_message_size.get())?;
        nonzero("limits.messages_per_second", l.messages_per_second)?;
        nonzero("limits.message_burst", l.message_burst)?;
        nonzero("limits.bytes_per_second", l.bytes_per_second.get())?;
        if let Some(b) = l.byte_burst {
            nonzero("limits.byte_burst", b.get())?;
        }
        nonzero_dur("limits.idle_timeout", l.idle_timeout)?;
        nonzero_dur("limits.ping_interval", l.ping_interval)?;
        if !(1..=32).contains(&l.ipv4_prefix) {
            bail!("limits.ipv4_prefix: must be between 1 and 32, got {}", l.ipv4_prefix);
        }
        if !(1..=128).contains(&l.ipv6_prefix) {
            bail!("limits.ipv6_prefix: must be between 1 and 128, got {}", l.ipv6_prefix);
        }
        Ok(())
    }
}

fn nonzero(key: &str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        bail!("{key}: must be greater than zero");
    }
    Ok(())
}

fn nonzero_dur(key: &str, d: Dur) -> Result<(), ConfigError> {
    if d.get().is_zero() {
        bail!("{key}: must be greater than zero");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[server]
listen = "127.0.0.1:8443"
[tls]
cert = "c.pem"
key = "k.pem"
[backend]
url = "ws://127.0.0.1:8080"
[origin]
allow = ["https://chat.example.com"]
[auth]
mode = "jwt"
secret_env = "X"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(BASE).unwrap();
        assert_eq!(c.limits.max_frame_size.get(), 65536);
        assert_eq!(c.limits.byte_burst(), 1 << 20);
        assert_eq!(c.auth.algorithms(), vec!["HS256"]);
        assert_eq!(c.server.handshake_timeout.get(), Duration::from_secs(10));
    }

    #[test]
    fn unknown_key_is_refused_with_line() {
        let e = Config::parse(&format!("{BASE}\n[limits]\nmax_frame_sise = 1\n")).unwrap_err();
        assert!(e.0.contains("max_frame_sise"), "{e}");
        assert!(e.0.contains("line"), "{e}");
    }

    #[test]
    fn refusals() {
        let cases = [
            (BASE.replace("allow = [\"https://chat.example.com\"]", ""), "origin.allow"),
            (BASE.replace("mode = \"jwt\"", ""), "auth.mode"),
            (BASE.replace("mode = \"jwt\"", "mode = \"none\""), "auth.secret_env"),
            (format!("{BASE}algorithms = [\"RS256\"]\n"), "public-key"),
            (format!("{BASE}algorithms = [\"none\"]\n"), "never"),
            (format!("{BASE}[limits]\nmax_frame_size = 0\n"), "limits.max_frame_size"),
            (format!("{BASE}[limits]\nidle_timeout = \"soon\"\n"), "invalid duration"),
            (format!("{BASE}[limits]\nidle_timeout = \"300000000000y\"\n"), "too long"),
            (format!("{BASE}leeway = \"100y\"\n"), "too long"),
            (BASE.replace("ws://127.0.0.1:8080", "ws://127.0.0.1:8080/x?y=1"), "query"),
            (BASE.replace("ws://127.0.0.1:8080", "http://127.0.0.1:8080"), "backend.url"),
            (format!("{BASE}[log]\nlevel = \"loud\"\n"), "log.level"),
            (format!("{BASE}jwks_refresh = \"5m\"\n"), "auth.jwks_refresh"),
            (format!("{BASE}[log]\nlevel = \"info,hyper\"\n"), "log.level"),
            (format!("{BASE}[auth.forward_claims]\nsub = \"X_Forwarded_For\"\n"), "set by the proxy"),
            (format!("{BASE}[admin]\nlisten = \"0.0.0.0:8443\"\n"), "admin.listen"),
            (
                BASE.replace(
                    "secret_env = \"X\"",
                    "algorithms = [\"ES256\"]\njwks_url = \"http://idp/j?api_key=S3CR3T\"",
                ),
                "https://",
            ),
            (
                BASE.replace(
                    "secret_env = \"X\"",
                    "algorithms = [\"ES256\"]\njwks_url = \"https://idp/j\"\njwks_refresh = \"100ms\"",
                ),
                "at least 1s",
            ),
            (format!("{BASE}[admin]\nlisten = \"[::]:8443\"\n"), "admin.listen"),
        ];
        for (text, want) in cases {
            let e = Config::parse(&text).unwrap_err();
            assert!(e.0.contains(want), "want {want:?} in {e}");
            assert!(!e.0.contains("S3CR3T"), "a URL query in a message: {e}");
        }
        // Other families on one port do not clash (only `[::]` is dual-stack).
        let v6 = BASE.replace("127.0.0.1:8443", "0.0.0.0:8443");
        assert!(Config::parse(&format!("{v6}[admin]\nlisten = \"[::1]:8443\"\n")).is_ok());
        for level in ["WARN", "off", "info,wsgate=debug", "debug,hyper=info", "info,"] {
            let text = format!("{BASE}[log]\nlevel = \"{level}\"\n");
            assert!(Config::parse(&text).is_ok(), "{level}");
        }
    }

    #[test]
    fn a_huge_line_is_quoted_in_part() {
        let e = Config::parse(&format!("{BASE}issuer = \"{}\"x\n", "z".repeat(100_000))).unwrap_err();
        assert!(e.0.len() < 2_000 && e.0.contains("line"), "{} bytes", e.0.len());
    }

    #[test]
    fn token_sources() {
        assert_eq!(TokenSource::parse("cookie:tok").unwrap(), TokenSource::Cookie("tok".into()));
        assert!(TokenSource::parse("query:").is_err());
        assert!(TokenSource::parse("form:x").is_err());
    }
}
