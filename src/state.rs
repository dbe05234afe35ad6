//! Process state: the reloadable [`Policy`] (config, certificates, keys) behind an `ArcSwap`,
//! and the [`Shared`] parts that live across reloads (limiter tables, metrics, drain signal).

use crate::admission::auth::Authenticator;
use crate::admission::client_ip::TrustedProxies;
use crate::admission::limits::{GlobalCap, IpLimits, MemoryLimiter, PendingTracker, PerIpLimiter};
use crate::admission::origin::OriginPolicy;
use crate::config::{AuthMode, Config, ConfigError, TokenSource};
use crate::metrics::Metrics;
use crate::relay::SessionPolicy;
use crate::tls::CertInfo;
use crate::upstream::Upstream;
use arc_swap::ArcSwap;
use hyper::header::HeaderName;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Everything derived from one config file: swapped whole on reload. Live sessions keep the
/// copy of the limits they were admitted under.
pub struct Policy {
    /// The validated config.
    pub config: Config,
    /// TLS acceptor for new connections.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// Loaded certificates (expiry metric, `check` summary).
    pub certs: Vec<CertInfo>,
    /// Origin allowlist.
    pub origin: OriginPolicy,
    /// JWT verifier (`None` with `auth.mode = "none"`).
    pub auth: Option<Arc<Authenticator>>,
    /// Token sources in order.
    pub sources: Vec<TokenSource>,
    /// Claim → header forwarded to the backend.
    pub claims: Vec<(String, HeaderName)>,
    /// Client headers never passed to the backend besides the fixed reserved set
    /// (`upstream::is_reserved_header`): the claim headers, which only the proxy may set, and
    /// the header trusted proxies name the client in, which a client could forge. Names are
    /// stored with underscores as dashes (`upstream::dashed`), the form they are compared in.
    pub dropped_headers: Vec<HeaderName>,
    /// How to reach the backend.
    pub upstream: Upstream,
    /// Who may tell us the client's address.
    pub trusted: TrustedProxies,
    /// Per-IP limit values.
    pub ip_limits: IpLimits,
    /// Template of each new session's policy.
    pub session: SessionPolicy,
    _jwks_refresh: Option<AbortOnDrop>,
}

/// Aborts a background task when the policy that owns it is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Policy {
    /// Loads certificates and keys for a validated config. Every failure is a config error
    /// (exit 2) naming the key.
    pub async fn build(config: Config) -> Result<Policy, ConfigError> {
        Self::build_after(config, None).await
    }

    /// As [`Policy::build`], for a SIGHUP while `running` serves: a `jwks_url` whose endpoint
    /// is down keeps the keys `running` fetched from the same source, and a reload that would
    /// trade working keys for none is refused ([`Authenticator::reloaded`]).
    pub async fn reloaded(config: Config, running: &Policy) -> Result<Policy, ConfigError> {
        Self::build_after(config, Some(running)).await
    }

    async fn build_after(config: Config, running: Option<&Policy>) -> Result<Policy, ConfigError> {
        let tls = crate::tls::build(&config.tls)?;
        let origin = OriginPolicy::new(&config.origin).map_err(|e| ConfigError(format!("origin.allow: {e}")))?;
        let auth = match (config.auth.mode, running.and_then(|r| r.auth.as_deref())) {
            (Some(AuthMode::Jwt), Some(old)) => Some(Arc::new(Authenticator::reloaded(&config.auth, old).await?)),
            (Some(AuthMode::Jwt), None) => Some(Arc::new(Authenticator::from_config(&config.auth).await?)),
            _ => None,
        };
        let sources = if auth.is_some() {
            config.auth.sources().iter().map(|s| TokenSource::parse(s)).collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        let claims: Vec<(String, HeaderName)> = config
            .auth
            .forward_claims()
            .into_iter()
            .map(|(c, h)| {
                HeaderName::from_bytes(h.as_bytes())
                    .map(|n| (c.clone(), n))
                    .map_err(|_| ConfigError(format!("auth.forward_claims.{c}: invalid header name {h:?}")))
            })
            .collect::<Result<_, _>>()?;
        let trusted = TrustedProxies::new(&config.trusted_proxies);
        let dropped_headers = claims
            .iter()
            .map(|(_, h)| h)
            .chain([trusted.header()])
            .map(|h| crate::upstream::dashed(h).unwrap_or_else(|| h.clone()))
            .collect();
        let upstream = Upstream::new(&config.backend)?;
        let jwks = auth.as_ref().and_then(|a| a.spawn_refresh()).map(AbortOnDrop);
        Ok(Policy {
            acceptor: tokio_rustls::TlsAcceptor::from(tls.config),
            certs: tls.certs,
            origin,
            auth,
            sources,
            claims,
            dropped_headers,
            upstream,
            trusted,
            ip_limits: IpLimits::from_config(&config.limits),
            session: SessionPolicy::from_limits(&config.limits),
            config,
            _jwks_refresh: jwks,
        })
    }

    /// Why this policy cannot admit anyone yet (its `jwks_url` has not been fetched), or
    /// `None` when it can. `/readyz` answers 503 meanwhile.
    pub fn not_ready(&self) -> Option<&str> {
        self.auth.as_ref().and_then(|a| a.no_keys())
    }
}

/// State shared by every connection for the life of the process.
pub struct Shared {
    /// The current policy; `load()` per connection, swapped by SIGHUP.
    pub policy: ArcSwap<Policy>,
    /// Per-IP caps and handshake buckets (one small interface; Redis later).
    pub limiter: Arc<dyn PerIpLimiter>,
    memory_limiter: Arc<MemoryLimiter>,
    /// Global session cap.
    pub global: Arc<GlobalCap>,
    /// Not-yet-upgraded connections per peer.
    pub pending: Arc<PendingTracker>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Cancelled when the drain starts: sessions send 1001.
    pub shutdown: CancellationToken,
    accepting: AtomicBool,
    /// Set when the drain starts; sessions read it (a plain load, no lock) once woken.
    drain: crate::relay::session::Drain,
    /// Connection and session tasks, for the drain.
    pub tasks: TaskTracker,
    /// Where the config came from (reload), if a file.
    pub config_path: Option<PathBuf>,
    /// What a reload cannot change, as the process started with it.
    fixed: Fixed,
}

/// The settings that take a restart: listen addresses and the log format.
struct Fixed {
    listen: Vec<std::net::SocketAddr>,
    admin: std::net::SocketAddr,
    format: crate::config::LogFormat,
}

impl Fixed {
    fn of(c: &Config) -> Fixed {
        Fixed { listen: c.server.listen.addrs(), admin: c.admin.listen, format: c.log.format }
    }
}

impl Shared {
    /// Builds shared state around a first policy.
    pub fn new(policy: Policy, config_path: Option<PathBuf>) -> Arc<Shared> {
        let metrics = Arc::new(Metrics::new());
        metrics.set_certs(&policy.certs);
        let memory_limiter = MemoryLimiter::new();
        Arc::new(Shared {
            fixed: Fixed::of(&policy.config),
            policy: ArcSwap::from_pointee(policy),
            limiter: memory_limiter.clone(),
            memory_limiter,
            global: GlobalCap::new(),
            pending: PendingTracker::new(),
            metrics,
            shutdown: CancellationToken::new(),
            accepting: AtomicBool::new(true),
            drain: Default::default(),
            tasks: TaskTracker::new(),
            config_path,
        })
    }

    /// Starts the per-IP table sweeper (evicts idle entries).
    pub fn spawn_sweeper(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        drop(self.memory_limiter.spawn_sweeper(move || match weak.upgrade() {
            Some(s) => s.policy.load().ip_limits,
            None => IpLimits::from_config(&crate::config::LimitsConfig::default()),
        }));
    }

    /// The drain signal sessions check after the shutdown token woke them.
    pub fn draining(&self) -> &crate::relay::session::Drain {
        &self.drain
    }

    /// Whether new connections are accepted (`/readyz`).
    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Relaxed)
    }

    /// Starts the drain: stop accepting, tell sessions to close with 1001 and to be over
    /// within `grace`.
    pub fn begin_drain(&self, grace: Duration) {
        self.accepting.store(false, Ordering::Relaxed);
        self.drain.begin(Instant::now() + grace);
        self.shutdown.cancel();
        self.tasks.close();
    }

    /// Re-reads the config file and swaps the policy in; a bad config is refused and the old
    /// one stays. Returns the error text when refused.
    pub async fn reload(&self) -> Result<(), String> {
        let Some(path) = &self.config_path else {
            // `wsgate demo` writes its config to a temporary directory and does not read it back.
            tracing::warn!(event = "reload", result = "refused", error = "no config file to reload (demo)");
            self.metrics.reload("refused");
            return Err("no config file to reload".into());
        };
        let result = async {
            let cfg = Config::load(path).map_err(|e| e.to_string())?;
            Policy::reloaded(cfg, &self.policy.load()).await.map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(p) => {
                // Compared with what runs, not with the last reload: a reload back to the
                // running values warns no more, and one that repeats a change still does.
                let new = Fixed::of(&p.config);
                if new.listen != self.fixed.listen || new.admin != self.fixed.admin {
                    tracing::warn!(
                        event = "reload",
                        "listen addresses change only on restart; keeping the current listeners"
                    );
                }
                if new.format != self.fixed.format {
                    tracing::warn!(event = "reload", "log.format changes only on restart; keeping the current format");
                }
                if let Err(e) = crate::logging::set_level(&p.config.log.level) {
                    tracing::warn!(event = "reload", error = %e, "log level not applied");
                }
                self.metrics.set_certs(&p.certs);
                self.policy.store(Arc::new(p));
                self.metrics.reload("ok");
                tracing::info!(event = "reload", result = "ok", "configuration reloaded");
                Ok(())
            }
            Err(e) => {
                self.metrics.reload("refused");
                tracing::error!(event = "reload", result = "refused", error = %e, "new configuration refused; keeping the old one");
                Err(e)
            }
        }
    }
}
