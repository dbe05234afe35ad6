//! The `wsgate` command line: `run` (default), `check`, `demo`, `token`.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use wsgate::config::{Config, LogFormat};
use wsgate::lifecycle::{self, RunError};

/// mimalloc instead of glibc's malloc: a new session makes about 200 allocations (two thirds
/// in rustls' handshake), and glibc's took about 7 % of its CPU. A/B over 6 interleaved
/// rounds (bench/RESULTS.md): 3 % less CPU per new session, 2 % less per 64 B message, 2 %
/// more memory per idle session.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` in mimalloc's `mi_option_e` (v2 and v3 alike).
const MI_OPTION_ARENA_EAGER_COMMIT: std::ffi::c_int = 4;

unsafe extern "C" {
    /// Sets an option (over its `MIMALLOC_*` environment variable).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// Lets mimalloc give freed memory back to the OS. By default it commits its arenas eagerly
/// where the OS overcommits (Linux), and then does not purge what is freed in them: the
/// buffers a slow reader's queue grows and frees kept about 10 MiB resident per such session,
/// and a stalled reader cost 1.1 MiB instead of 0.4 MiB (bench/RESULTS.md).
///
/// The option is read when the first arena is reserved, at the first allocation, which comes
/// before `main`: so this runs as an ELF constructor. A `MIMALLOC_ARENA_EAGER_COMMIT`
/// environment variable no longer overrides it.
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static TUNE_ALLOCATOR: extern "C" fn() = {
    extern "C" fn tune_allocator() {
        // SAFETY: runs while the process is single-threaded; it only stores a value in
        // mimalloc's option table.
        unsafe { mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) }
    }
    tune_allocator
};

/// `println!` that does not panic when stdout is closed (`wsgate token | head -c0`, a dead
/// log pipe): what was lost is lost, and the exit code still says how the command went.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that does not panic when stderr is closed, like [`say!`].
macro_rules! complain {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

#[derive(Parser)]
#[command(name = "wsgate", version, about = "TLS-terminating WebSocket security proxy for legacy chat backends")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file (for the default `run`).
    #[arg(long, global = true, default_value = "wsgate.toml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Run,
    /// Validate config, keys and certificates; print a summary; exit 0 or 2.
    Check,
    /// Self-signed certificate, built-in chat backend and page, a demo token; until Ctrl-C.
    Demo {
        /// Address of the TLS listener.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
    },
    /// Print an HS256 development token, alone on stdout.
    Token {
        /// Environment variable holding the HMAC secret (32 bytes or more).
        #[arg(long)]
        secret_env: String,
        /// `sub` claim.
        #[arg(long)]
        sub: String,
        /// Lifetime, e.g. "1h".
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// `aud` claim.
        #[arg(long)]
        aud: Option<String>,
        /// `iss` claim.
        #[arg(long)]
        iss: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.config),
        Command::Check => check(cli.config),
        Command::Demo { listen } => demo(listen),
        Command::Token { secret_env, sub, ttl, aud, iss } => {
            // The same bounds as a duration in the config; under a second, `exp` would be `iat`.
            if ttl < Duration::from_secs(1) || ttl > wsgate::config::MAX_DURATION {
                complain!("wsgate token: --ttl must be between 1s and 10 years");
                return ExitCode::from(2);
            }
            let Some(secret) = std::env::var_os(&secret_env) else {
                complain!("wsgate token: environment variable {secret_env} is not set");
                return ExitCode::from(2);
            };
            match wsgate::token_cmd::mint(secret.as_encoded_bytes(), &sub, ttl, aud.as_deref(), iss.as_deref()) {
                Ok(t) => {
                    say!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    complain!("wsgate token: {secret_env}: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// The runtime: one thread when the process may use only one CPU (affinity mask or cgroup
/// quota, as `available_parallelism` reports it: a pinned service or a one-CPU sidecar),
/// otherwise one worker per CPU. With one CPU a multi-thread runtime only adds cross-thread
/// hand-offs and the atomics of work stealing to every wake-up.
fn runtime() -> tokio::runtime::Runtime {
    let one_cpu = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let mut builder = if one_cpu {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            complain!("wsgate: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    }
}

/// Reports a fatal error in the configured log format (JSON lines stay JSON), then exits.
fn fail(format: LogFormat, code: u8, msg: &str) -> ExitCode {
    match format {
        LogFormat::Json => complain!("{}", serde_json::json!({"level": "ERROR", "event": "fatal", "message": msg})),
        LogFormat::Text => complain!("wsgate: {msg}"),
    }
    ExitCode::from(code)
}

fn run(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => return fail(Config::format_hint(&path), 2, &e.to_string()),
    };
    let format = config.log.format;
    wsgate::logging::init(format, &config.log.level);
    let rt = runtime();
    match rt.block_on(lifecycle::run(config, Some(path), |_| {})) {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::Config(e)) => fail(format, 2, &e.to_string()),
        Err(RunError::Runtime(e)) => fail(format, 1, &e),
    }
}

/// `wsgate check`: a summary for a person under `format = "text"`, one JSON object under
/// `"json"` (every line wsgate prints is JSON then, as for `run`).
fn check(path: PathBuf) -> ExitCode {
    let format = Config::format_hint(&path);
    let refused = |e: &dyn std::fmt::Display| {
        match format {
            LogFormat::Json => complain!(
                "{}",
                serde_json::json!({"level": "ERROR", "event": "check", "result": "invalid", "message": e.to_string()})
            ),
            LogFormat::Text => complain!("wsgate check: {e}"),
        }
        ExitCode::from(2)
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => return refused(&e),
    };
    let rt = runtime();
    let p = match rt.block_on(wsgate::state::Policy::build(config)) {
        Ok(p) => p,
        Err(e) => return refused(&e),
    };
    let c = &p.config;
    let l = &c.limits;
    let listen: Vec<String> = c.server.listen.addrs().iter().map(|a| a.to_string()).collect();
    let auth = match &p.auth {
        Some(_) => format!("jwt {:?}, sources {:?}", c.auth.algorithms(), c.auth.sources()),
        None => "none".to_string(),
    };
    let origin = match c.origin.allow_any {
        true => "any (allow_any = true)".to_string(),
        false => format!("{:?} (allow_missing = {})", c.origin.allow, c.origin.allow_missing),
    };
    let limits = format!(
        "{}/ip, {} total, frame {}, message {}, {} msg/s, {}/s",
        l.max_connections_per_ip,
        c.server.max_connections,
        l.max_frame_size,
        l.max_message_size,
        l.messages_per_second,
        l.bytes_per_second
    );
    // Not a configuration error: `run` starts fail-closed and keeps fetching.
    let warning = p.not_ready().map(|why| {
        format!("{why}; `wsgate run` would start without keys: every upgrade answered 503 (Retry-After), /readyz 503, retrying")
    });
    if format == LogFormat::Json {
        let certs: Vec<_> = p
            .certs
            .iter()
            .map(|cert| serde_json::json!({"server_name": cert.server_name, "not_after": cert.not_after}))
            .collect();
        let mut line = serde_json::json!({
            "level": if warning.is_some() { "WARN" } else { "INFO" },
            "event": "check",
            "result": "valid",
            "config": path.display().to_string(),
            "listen": listen,
            "backend": c.backend.url.to_string(),
            "certificates": certs,
            "origin": origin,
            "auth": auth,
            "limits": limits,
            "admin": c.admin.listen.to_string(),
        });
        if let Some(w) = warning {
            line["warning"] = w.into();
        }
        say!("{line}");
        return ExitCode::SUCCESS;
    }
    say!("configuration {} is valid", path.display());
    say!("  listen:      {}", listen.join(", "));
    say!("  backend:     {} (connect_timeout {})", c.backend.url, c.backend.connect_timeout);
    for cert in &p.certs {
        say!("  certificate: {} (expires at unix {})", cert.server_name, cert.not_after);
    }
    say!("  origin:      {origin}");
    say!("  auth:        {auth}");
    say!("  limits:      {limits}");
    say!("  admin:       {}", c.admin.listen);
    if let Some(w) = warning {
        say!("  warning:     {w}");
    }
    ExitCode::SUCCESS
}

fn demo(mut listen: SocketAddr) -> ExitCode {
    if listen.port() == 0 {
        // The page's origin names the port, so resolve it before the config is written.
        match std::net::TcpListener::bind(listen).and_then(|l| l.local_addr()) {
            Ok(a) => listen = a,
            Err(e) => return fail(LogFormat::Text, 1, &format!("demo listen {listen}: {e}")),
        }
    }
    let rt = runtime();
    rt.block_on(async move {
        let dir = match tempdir() {
            Ok(d) => d,
            Err(e) => return fail(LogFormat::Text, 1, &e),
        };
        // The directory holds a key and a JWT secret: removed on every way out.
        let gone = |e: String| {
            let _ = std::fs::remove_dir_all(&dir);
            fail(LogFormat::Text, 1, &e)
        };
        let backend = match wsgate::demo::start_chat_backend().await {
            Ok(a) => a,
            Err(e) => return gone(format!("demo backend: {e}")),
        };
        let (config, info) = match wsgate::demo::prepare(&dir, listen, backend) {
            Ok(x) => x,
            Err(e) => return gone(e),
        };
        wsgate::logging::init(LogFormat::Text, &config.log.level);
        let result = lifecycle::run(config, None, |bound| {
            say!();
            say!("wsgate demo is running (Ctrl-C to stop)");
            say!("  page:      {}", info.page_url);
            say!("  websocket: {}", info.ws_url);
            say!("  origin:    {}", info.origin);
            say!("  admin:     http://{}/metrics", bound.admin);
            say!("  token:     {}", info.token);
            // The token rides in the fragment, which the browser never sends to the server.
            say!("  open:      {}#token={}", info.page_url, info.token);
            say!("  cert:      {} (self-signed; accept it in the browser)", dir.join("cert.pem").display());
            say!();
        })
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(RunError::Config(e)) => fail(LogFormat::Text, 2, &e.to_string()),
            Err(RunError::Runtime(e)) => fail(LogFormat::Text, 1, &e),
        }
    })
}

fn tempdir() -> Result<PathBuf, String> {
    let mut r = [0u8; 8];
    wsgate::tls::fill_random(&mut r).map_err(|e| format!("random: {e:?}"))?;
    let name: String = r.iter().map(|b| format!("{b:02x}")).collect();
    let dir = std::env::temp_dir().join(format!("wsgate-demo-{name}"));
    // Only this user may read the demo's key and JWT secret (0700; the files are 0600 too).
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    // Not recursive: an existing path (someone else's) is an error, not reused with its mode.
    builder.create(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    Ok(dir)
}
