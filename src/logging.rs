//! Log setup (tracing-subscriber): `json` puts every field at the top level of one JSON object
//! per line; `text` is for people. Logs go to stdout. No token or secret is ever a field: the
//! code logs reasons and client addresses, never request lines or credential headers.

use crate::config::LogFormat;
use std::sync::OnceLock;
use tracing_subscriber::{reload, EnvFilter};

type SetLevel = Box<dyn Fn(EnvFilter) -> Result<(), reload::Error> + Send + Sync>;

/// Swaps the installed subscriber's filter (SIGHUP applies a new `log.level`).
static SET_LEVEL: OnceLock<SetLevel> = OnceLock::new();

fn remember<S: 'static>(handle: reload::Handle<EnvFilter, S>) {
    let _ = SET_LEVEL.set(Box::new(move |f| handle.reload(f)));
}

/// Installs the global subscriber. A second call (tests, reload) is ignored.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    // A failed write (stdout closed) is not reported on stderr: that report is plain text,
    // and every line must stay JSON under `format = "json"`.
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stdout).log_internal_errors(false);
    match format {
        LogFormat::Json => {
            let b = builder.json().flatten_event(true).with_current_span(false).with_span_list(false);
            let b = b.with_filter_reloading();
            let handle = b.reload_handle();
            if b.try_init().is_ok() {
                remember(handle);
                json_panics();
            }
        }
        LogFormat::Text => {
            let b = builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())).with_filter_reloading();
            let handle = b.reload_handle();
            if b.try_init().is_ok() {
                remember(handle);
            }
        }
    }
}

/// With `format = "json"` every stderr line is JSON too: a panic is reported as an error event
/// (message, location, thread) instead of the default hook's plain text.
fn json_panics() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
            (Some(s), _) => s,
            (_, Some(s)) => s.as_str(),
            _ => "panic",
        };
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        let thread = std::thread::current();
        tracing::error!(event = "panic", location, thread = thread.name().unwrap_or(""), "{msg}");
    }));
}

/// Applies a new level or filter (`log.level`) to the installed subscriber; a no-op when
/// [`init`] did not install one. The format changes only on restart.
pub fn set_level(level: &str) -> Result<(), String> {
    let Some(set) = SET_LEVEL.get() else { return Ok(()) };
    let filter = EnvFilter::try_new(level).map_err(|e| format!("log.level: {e}"))?;
    set(filter).map_err(|e| format!("log.level: {e}"))
}
