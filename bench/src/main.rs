//! wsgate-bench: echo backend, load generator and helpers for comparing wsgate
//! with nginx and HAProxy. See bench/README.md.

mod certs;
mod echo;
mod load;
mod net;
mod procstat;
mod relay;
mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::load::{Probe, Report};
use crate::net::{BoxError, Dialer};

#[derive(Parser)]
#[command(name = "wsgate-bench", version, about = "Load generator and echo backend for the wsgate benchmark")]
struct Cli {
    /// Tokio worker threads (1 = current-thread runtime, the cheapest on a pinned core).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Plain ws:// echo backend.
    Echo {
        #[arg(long, default_value = "127.0.0.1:19000")]
        listen: SocketAddr,
        /// Exit after this many seconds (0 = run until killed).
        #[arg(long, default_value_t = 0)]
        max_seconds: u64,
    },
    /// Plain tokio-rustls byte relay (TLS in, bytes copied to the backend): the
    /// parse-nothing reference for wsgate's CPU per message.
    Relay {
        #[arg(long, default_value = "127.0.0.1:19446")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:19000")]
        backend: SocketAddr,
        /// Certificate chain (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Private key (PEM).
        #[arg(long)]
        key: PathBuf,
        /// Exit after this many seconds (0 = run until killed).
        #[arg(long, default_value_t = 0)]
        max_seconds: u64,
    },
    /// N sessions each sending messages with W in flight; every echo checked.
    Throughput {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 50)]
        sessions: usize,
        /// Messages per session (0 = unlimited, use --duration).
        #[arg(long, default_value_t = 0)]
        messages: u64,
        /// Stop sending new messages after this many seconds (0 = no limit, use --messages).
        #[arg(long, default_value_t = 0.0)]
        duration: f64,
        /// Message size in bytes (at least 16).
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Messages in flight per session.
        #[arg(long, default_value_t = 8)]
        window: usize,
    },
    /// Open N sessions, hold them, measure the proxy's RSS per session.
    Idle {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 9000)]
        sessions: usize,
        /// Sessions being opened at the same time.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Seconds to hold the sessions open (counted from the start).
        #[arg(long, default_value_t = 5.0)]
        hold: f64,
        /// Seconds to wait after the last session opened before reading RSS.
        #[arg(long, default_value_t = 2.0)]
        settle: f64,
    },
    /// New TCP + TLS + upgrade + one echo + close per session.
    Handshake {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 2000)]
        sessions: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Write a test CA and a server certificate (ca.pem, cert.pem, key.pem, combined.pem).
    Certs {
        #[arg(long)]
        out: PathBuf,
        /// Subject alternative names (DNS names or IP addresses).
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        names: Vec<String>,
    },
    /// Print an HS256 token, alone on stdout.
    Token {
        /// HMAC secret (at least 32 bytes); or use --secret-env.
        #[arg(long, conflicts_with = "secret_env")]
        secret: Option<String>,
        #[arg(long)]
        secret_env: Option<String>,
        #[arg(long, default_value = "bench")]
        sub: String,
        /// Lifetime in seconds (default 30 days).
        #[arg(long, default_value_t = 30 * 24 * 3600)]
        ttl_secs: u64,
        #[arg(long)]
        aud: Option<String>,
        #[arg(long)]
        iss: Option<String>,
    },
}

#[derive(Args)]
struct Common {
    /// ws:// or wss:// URL of the target (loopback only).
    #[arg(long)]
    url: String,
    /// CA certificate (PEM) to trust for wss://.
    #[arg(long)]
    ca: Option<String>,
    /// Allow a ws:// (no TLS) target.
    #[arg(long)]
    insecure_plain: bool,
    /// JWT sent as `Authorization: Bearer`.
    #[arg(long)]
    token: Option<String>,
    /// Origin header value.
    #[arg(long)]
    origin: Option<String>,
    /// Comma-separated loopback source addresses; sessions are spread over them.
    #[arg(long, default_value = "")]
    sources: String,
    /// PID(s) of the proxy under test (comma-separated) for CPU and RSS.
    #[arg(long, default_value = "")]
    pid: String,
    /// PID(s) of the backend, to report its CPU utilisation beside the generator's.
    #[arg(long, default_value = "")]
    backend_pid: String,
    /// Target label in the JSON output (e.g. wsgate, nginx).
    #[arg(long, default_value = "target")]
    label: String,
    /// Workload label in the JSON output (default: the mode).
    #[arg(long)]
    workload: Option<String>,
    /// Per-operation timeout (connect, handshake, one read or write), seconds.
    #[arg(long, default_value_t = 10.0)]
    io_timeout: f64,
    /// Whole-run timeout, seconds: a stuck run reports errors instead of hanging.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
}

fn secs(v: f64, what: &str) -> Result<Duration, BoxError> {
    Duration::try_from_secs_f64(v).map_err(|_| format!("bad {what}: {v}").into())
}

impl Common {
    fn dialer(&self) -> Result<Arc<Dialer>, BoxError> {
        Ok(Arc::new(Dialer::new(
            &self.url,
            self.ca.as_deref(),
            self.insecure_plain,
            self.token.clone(),
            self.origin.clone(),
            &self.sources,
            secs(self.io_timeout, "--io-timeout")?,
        )?))
    }

    fn probe(&self) -> Result<Probe, BoxError> {
        let p = Probe::new(procstat::parse_pids(&self.pid)?, procstat::parse_pids(&self.backend_pid)?);
        if p.active() {
            // Fail early on a wrong PID rather than after the run.
            p.rss().ok_or("cannot read the proxy's /proc entries")?;
        }
        Ok(p)
    }

    fn report(&self, mode: &str) -> Report {
        Report::new(mode, &self.label, self.workload.as_deref())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("wsgate-bench: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<bool, BoxError> {
    procstat::raise_nofile();
    match cli.cmd {
        Cmd::Certs { out, names } => {
            certs::write_certs(&out, &names)?;
            eprintln!("wrote ca.pem, cert.pem, key.pem, combined.pem to {}", out.display());
            return Ok(true);
        }
        Cmd::Token { secret, secret_env, sub, ttl_secs, aud, iss } => {
            let secret = match (secret, secret_env) {
                (Some(s), _) => s,
                (None, Some(var)) => {
                    std::env::var(&var).map_err(|_| format!("environment variable {var} is not set"))?
                }
                (None, None) => return Err("--secret or --secret-env is required".into()),
            };
            println!("{}", certs::mint_token(secret.as_bytes(), &sub, ttl_secs, aud.as_deref(), iss.as_deref())?);
            return Ok(true);
        }
        _ => {}
    }

    let rt = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(cli.threads).enable_all().build()?
    };
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Echo { listen, max_seconds } => {
                echo::run(listen, max_seconds).await?;
                Ok(true)
            }
            Cmd::Relay { listen, backend, cert, key, max_seconds } => {
                relay::run(listen, backend, &cert, &key, max_seconds).await?;
                Ok(true)
            }
            Cmd::Throughput { common, sessions, messages, duration, size, window } => {
                if size < 16 {
                    return Err("--size must be at least 16 bytes".into());
                }
                if messages == 0 && duration <= 0.0 {
                    return Err("give --messages or --duration".into());
                }
                if sessions == 0 || window == 0 {
                    return Err("--sessions and --window must be positive".into());
                }
                let args = load::ThroughputArgs {
                    sessions,
                    messages,
                    duration: secs(duration, "--duration")?,
                    size,
                    window,
                    timeout: secs(common.timeout, "--timeout")?,
                };
                let r = common.report("throughput");
                Ok(load::throughput(common.dialer()?, args, common.probe()?, r).await)
            }
            Cmd::Idle { common, sessions, concurrency, hold, settle } => {
                let args = load::IdleArgs {
                    sessions,
                    concurrency,
                    hold: secs(hold, "--hold")?,
                    settle: secs(settle, "--settle")?,
                    timeout: secs(common.timeout, "--timeout")?,
                };
                let r = common.report("idle");
                Ok(load::idle(common.dialer()?, args, common.probe()?, r).await)
            }
            Cmd::Handshake { common, sessions, concurrency } => {
                let args = load::HandshakeArgs { sessions, concurrency, timeout: secs(common.timeout, "--timeout")? };
                let r = common.report("handshake");
                Ok(load::handshake(common.dialer()?, args, common.probe()?, r).await)
            }
            Cmd::Certs { .. } | Cmd::Token { .. } => Ok(true),
        }
    })
}
