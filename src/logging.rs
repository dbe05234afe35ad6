//! Log setup (tracing-subscriber): `json` puts every field at the top level of one JSON object
//! per line; `text` is for people. Logs go to stdout. No token or secret is ever a field: the
//! code logs reasons and client addresses, never request lines or credential headers.

use crate::config::LogFormat;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. A second call (tests, reload) is ignored.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stdout);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_span_list(false).try_init(),
        LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())).try_init(),
    };
}
