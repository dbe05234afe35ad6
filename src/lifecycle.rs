//! The process lifecycle: bind, serve, tell systemd, reload on SIGHUP, drain on SIGTERM/SIGINT.

use crate::config::{Config, ConfigError};
use crate::state::{Policy, Shared};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Why `run` failed: exit code 2 for configuration problems, 1 for runtime failures.
#[derive(Debug)]
pub enum RunError {
    /// A config, key or certificate problem (exit 2).
    Config(ConfigError),
    /// Anything else, e.g. a listen address in use (exit 1).
    Runtime(String),
}

/// Addresses actually bound (port 0 resolved), reported to the caller (demo, tests).
#[derive(Debug, Clone)]
pub struct Bound {
    /// TLS listeners.
    pub listen: Vec<SocketAddr>,
    /// Admin listener.
    pub admin: SocketAddr,
}

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    // Not running under systemd (no NOTIFY_SOCKET) is fine.
    let _ = sd_notify::notify(false, state);
}

/// Builds the policy, binds, serves until a drain completes. `on_bound` is called once the
/// listeners are up.
pub async fn run(config: Config, path: Option<PathBuf>, on_bound: impl FnOnce(&Bound)) -> Result<(), RunError> {
    // Handlers first: a SIGHUP right after READY=1 (`systemctl reload`, a certbot hook) must
    // not meet the default action, which ends the process.
    let signals = Signals::install();
    let policy = Policy::build(config).await.map_err(RunError::Config)?;
    let listen_addrs = policy.config.server.listen.addrs();
    let admin_addr = policy.config.admin.listen;
    let listeners = crate::server::bind(&listen_addrs).await.map_err(|e| RunError::Runtime(e.to_string()))?;
    let admin = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|e| RunError::Runtime(format!("admin.listen {admin_addr}: {e}")))?;
    let bound = Bound {
        listen: listeners.iter().filter_map(|l| l.local_addr().ok()).collect(),
        admin: admin.local_addr().unwrap_or(admin_addr),
    };
    let shared = Shared::new(policy, path);
    shared.spawn_sweeper();
    tokio::spawn(crate::admin::serve(shared.clone(), admin));
    let server = tokio::spawn(crate::server::serve(shared.clone(), listeners));
    tracing::info!(event = "started", listen = ?bound.listen, admin = %bound.admin, "wsgate is serving");
    on_bound(&bound);
    notify(&[sd_notify::NotifyState::Ready]);

    wait_for_stop(&shared, signals).await;

    notify(&[sd_notify::NotifyState::Stopping]);
    let grace = shared.policy.load().config.server.shutdown_grace.get();
    tracing::info!(event = "draining", sessions = shared.global.active(), grace_ms = grace.as_millis() as u64);
    shared.begin_drain(grace);
    let _ = server.await;
    // Sessions stop waiting for their closes just before the grace ends, so each still logs
    // and counts its end; the wait's own timeout only catches a task stuck elsewhere.
    let finished = tokio::time::timeout(grace, shared.tasks.wait()).await.is_ok();
    let cut = shared.draining().cut() as u64;
    if !finished || cut > 0 {
        tracing::warn!(
            event = "drain_timeout",
            sessions = if finished { cut } else { shared.global.active().max(cut) },
            "shutdown_grace passed before every session finished its close handshake"
        );
    }
    tracing::info!(event = "stopped");
    Ok(())
}

/// SIGHUP, SIGTERM and SIGINT handlers (`None` when they could not be installed).
struct Signals(Option<(Signal, Signal, Signal)>);

impl Signals {
    fn install() -> Signals {
        match (signal(SignalKind::hangup()), signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(hup), Ok(term), Ok(int)) => Signals(Some((hup, term, int))),
            _ => Signals(None),
        }
    }
}

/// Handles SIGHUP (reload) until SIGTERM or SIGINT.
async fn wait_for_stop(shared: &Arc<Shared>, signals: Signals) {
    let Signals(Some((mut hup, mut term, mut int))) = signals else {
        tracing::error!(event = "signals", "cannot install signal handlers; serving until killed");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {
                // systemd >= 253 wants MONOTONIC_USEC with RELOADING=1.
                match sd_notify::NotifyState::monotonic_usec_now() {
                    Ok(m) => notify(&[sd_notify::NotifyState::Reloading, m]),
                    Err(_) => notify(&[sd_notify::NotifyState::Reloading]),
                }
                let _ = shared.reload().await;
                notify(&[sd_notify::NotifyState::Ready]);
            }
            _ = term.recv() => return,
            _ = int.recv() => return,
        }
    }
}
