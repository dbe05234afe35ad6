//! Prometheus metrics (prometheus-client), named as DESIGN.md's Operations section lists.
//!
//! The relay never touches these per frame: sessions keep local counters and add deltas on
//! their keepalive tick and at the end ([`crate::relay::TrafficSink`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Every `result` of `wsgate_handshakes_total` that DESIGN.md lists (Operations and fine
/// print), exported at 0 from the start. One more, `draining` (an upgrade in flight when the
/// drain started, answered 503), appears only once it happens: a process that never drained
/// shows only the contract's values.
pub const HANDSHAKE_RESULTS: [&str; 15] = [
    "accepted",
    "pending_dropped",
    "handshake_timeout",
    "headers_too_large",
    "not_websocket",
    "rate_limited",
    "origin_denied",
    "token_missing",
    "token_invalid",
    "ip_cap",
    "global_cap",
    "backend_unreachable",
    "backend_timeout",
    "bad_request",
    "tls_failed",
];

/// Close codes the proxy sends itself (DESIGN.md's Relay table), exported at 0 from the start
/// with `initiator="proxy"`: 1001 (idle, keepalive, shutdown, a backend's fault), 1002
/// (protocol), 1007 (UTF-8), 1008 (rate limit, token expiry), 1009 (size), 1011 (backend gone).
pub const PROXY_CLOSE_CODES: [u16; 6] = [1001, 1002, 1007, 1008, 1009, 1011];

/// `result` label of handshakes and reloads.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// e.g. `accepted`, `origin_denied`.
    pub result: &'static str,
}

/// Labels of `wsgate_closes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    /// Close code as text.
    pub code: String,
    /// `client`, `backend` or `proxy`.
    pub initiator: &'static str,
}

/// `direction` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirLabel {
    /// `client_to_backend` or `backend_to_client`.
    pub direction: &'static str,
}

/// `server_name` label of the certificate expiry gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabel {
    /// The certificate's first DNS name.
    pub server_name: String,
}

/// Every metric wsgate exports.
pub struct Metrics {
    registry: Registry,
    /// `wsgate_sessions_active`
    pub sessions_active: Gauge,
    /// `wsgate_handshakes_total{result}`
    pub handshakes: Family<ResultLabel, Counter>,
    /// `wsgate_closes_total{code,initiator}`
    pub closes: Family<CloseLabels, Counter>,
    c2b_msgs: Counter,
    c2b_bytes: Counter,
    b2c_msgs: Counter,
    b2c_bytes: Counter,
    /// `wsgate_rate_limited_messages_total`
    pub rate_limited: Counter,
    /// `wsgate_handshake_duration_seconds`
    pub handshake_duration: Histogram,
    /// `wsgate_config_reloads_total{result}`
    pub config_reloads: Family<ResultLabel, Counter>,
    /// `wsgate_tls_certificate_expiry_timestamp_seconds{server_name}`
    pub cert_expiry: Family<CertLabel, Gauge>,
    /// `wsgate_backend_connect_errors_total{result}` (`backend_unreachable`, `backend_timeout`)
    pub backend_errors: Family<ResultLabel, Counter>,
    /// `wsgate_per_ip_tracked_keys`
    pub per_ip_keys: Gauge,
    /// `wsgate_jwks_last_success_timestamp_seconds{url}`, only with `jwks_url`
    pub jwks_fetched: Family<UrlLabel, Gauge>,
    /// The URL of its one series.
    jwks_url: std::sync::Mutex<Option<String>>,
}

/// `url` label of the JWKS gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UrlLabel {
    /// The configured `jwks_url`.
    pub url: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut r = Registry::default();
        let sessions_active = Gauge::default();
        r.register("wsgate_sessions_active", "Proxied WebSocket sessions open now", sessions_active.clone());
        let handshakes = Family::<ResultLabel, Counter>::default();
        r.register("wsgate_handshakes", "Upgrade attempts by result", handshakes.clone());
        let closes = Family::<CloseLabels, Counter>::default();
        r.register("wsgate_closes", "Sessions ended, by close code and who started the close", closes.clone());
        let messages = Family::<DirLabel, Counter>::default();
        r.register("wsgate_messages", "Messages relayed", messages.clone());
        let bytes = Family::<DirLabel, Counter>::default();
        r.register("wsgate_bytes", "Payload bytes relayed", bytes.clone());
        let rate_limited = Counter::default();
        r.register(
            "wsgate_rate_limited_messages",
            "Client messages dropped or refused by a rate limit",
            rate_limited.clone(),
        );
        let handshake_duration =
            Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        r.register(
            "wsgate_handshake_duration_seconds",
            "Time from accepting the connection (TLS included) to the answer to its upgrade request",
            handshake_duration.clone(),
        );
        let config_reloads = Family::<ResultLabel, Counter>::default();
        r.register("wsgate_config_reloads", "Configuration reloads by result", config_reloads.clone());
        let cert_expiry = Family::<CertLabel, Gauge>::default();
        r.register(
            "wsgate_tls_certificate_expiry_timestamp_seconds",
            "notAfter of each served certificate, seconds since the epoch",
            cert_expiry.clone(),
        );
        let backend_errors = Family::<ResultLabel, Counter>::default();
        r.register("wsgate_backend_connect_errors", "Failed backend handshakes", backend_errors.clone());
        let per_ip_keys = Gauge::default();
        r.register(
            "wsgate_per_ip_tracked_keys",
            "Client IP prefixes tracked by the per-IP limiter",
            per_ip_keys.clone(),
        );
        let jwks_fetched = Family::<UrlLabel, Gauge>::default();
        r.register(
            "wsgate_jwks_last_success_timestamp_seconds",
            "When the jwks_url key set was last fetched, seconds since the epoch (0: never)",
            jwks_fetched.clone(),
        );
        // Every known label value exists from the start at 0, so that the first refusal of a
        // kind shows up in `rate()`/`increase()` (a series born at 1 has no increase).
        for result in HANDSHAKE_RESULTS {
            drop(handshakes.get_or_create(&ResultLabel { result }));
        }
        for result in ["ok", "refused"] {
            drop(config_reloads.get_or_create(&ResultLabel { result }));
        }
        for result in ["backend_unreachable", "backend_timeout"] {
            drop(backend_errors.get_or_create(&ResultLabel { result }));
        }
        // The codes DESIGN.md's Relay table has the proxy send. Also, an empty family is not
        // exported at all: without these, `wsgate_closes_total` was missing from a fresh
        // process's /metrics until the first session ended.
        for code in PROXY_CLOSE_CODES {
            drop(closes.get_or_create(&CloseLabels { code: code.to_string(), initiator: "proxy" }));
        }
        let dir = |d| DirLabel { direction: d };
        let c2b_msgs = messages.get_or_create(&dir("client_to_backend")).clone();
        let c2b_bytes = bytes.get_or_create(&dir("client_to_backend")).clone();
        let b2c_msgs = messages.get_or_create(&dir("backend_to_client")).clone();
        let b2c_bytes = bytes.get_or_create(&dir("backend_to_client")).clone();
        Metrics {
            c2b_msgs,
            c2b_bytes,
            b2c_msgs,
            b2c_bytes,
            registry: r,
            sessions_active,
            handshakes,
            closes,
            rate_limited,
            handshake_duration,
            config_reloads,
            cert_expiry,
            backend_errors,
            per_ip_keys,
            jwks_fetched,
            jwks_url: std::sync::Mutex::new(None),
        }
    }

    /// Sets the JWKS gauge from the running authenticator (at scrape time): one series for
    /// the current `jwks_url`, none without one.
    pub fn set_jwks(&self, fetched: Option<(&str, u64)>) {
        // Cleared only when the URL changed (a reload): a clear on every scrape would race
        // with a concurrent scrape, which could then miss the series.
        let mut last = self.jwks_url.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_deref() != fetched.map(|f| f.0) {
            self.jwks_fetched.clear();
            *last = fetched.map(|f| f.0.to_string());
        }
        if let Some((url, at)) = fetched {
            self.jwks_fetched.get_or_create(&UrlLabel { url: url.to_string() }).set(at as i64);
        }
    }

    /// Counts one handshake outcome.
    pub fn handshake(&self, result: &'static str) {
        self.handshakes.get_or_create(&ResultLabel { result }).inc();
    }

    /// Counts one session end.
    pub fn close(&self, code: u16, initiator: &'static str) {
        self.closes.get_or_create(&CloseLabels { code: code.to_string(), initiator }).inc();
    }

    /// Counts one reload.
    pub fn reload(&self, result: &'static str) {
        self.config_reloads.get_or_create(&ResultLabel { result }).inc();
    }

    /// Sets the expiry gauges for the loaded certificates.
    pub fn set_certs(&self, certs: &[crate::tls::CertInfo]) {
        self.cert_expiry.clear();
        for c in certs {
            self.cert_expiry.get_or_create(&CertLabel { server_name: c.server_name.clone() }).set(c.not_after);
        }
    }

    /// The Prometheus text exposition format (0.0.4), as DESIGN.md specifies.
    pub fn encode(&self) -> String {
        let mut om = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut om, &self.registry);
        openmetrics_to_prometheus(&om)
    }
}

/// `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Rewrites prometheus-client's OpenMetrics text as Prometheus text format 0.0.4.
///
/// Why: the two differ only where a strict 0.0.4 parser trips: OpenMetrics names a counter
/// family without `_total` (`# TYPE x counter` over samples `x_total`), which 0.0.4 parsers
/// file as an untyped family, and it ends with `# EOF` and may carry `# UNIT` lines.
fn openmetrics_to_prometheus(om: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        om.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(om.len() + 16 * counters.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| Some((p, line.strip_prefix(p)?)));
        if let Some((prefix, rest)) = meta {
            let name = rest.split(' ').next().unwrap_or("");
            if counters.contains(name) {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total");
                out.push_str(&rest[name.len()..]);
                out.push('\n');
                continue;
            }
        } else if counters.iter().any(|c| line.strip_prefix(c).is_some_and(|r| r.starts_with("_created"))) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

impl crate::relay::TrafficSink for Metrics {
    fn add(&self, c2b_msgs: u64, c2b_bytes: u64, b2c_msgs: u64, b2c_bytes: u64, rate_limited: u64) {
        self.c2b_msgs.inc_by(c2b_msgs);
        self.c2b_bytes.inc_by(c2b_bytes);
        self.b2c_msgs.inc_by(b2c_msgs);
        self.b2c_bytes.inc_by(b2c_bytes);
        self.rate_limited.inc_by(rate_limited);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_prometheus_text_0_0_4() {
        let m = Metrics::new();
        m.handshake("accepted");
        let text = m.encode();
        assert!(text.contains("# TYPE wsgate_handshakes_total counter\n"), "{text}");
        assert!(text.contains("# HELP wsgate_handshakes_total "), "{text}");
        assert!(text.contains("wsgate_handshakes_total{result=\"accepted\"} 1\n"), "{text}");
        assert!(text.contains("# TYPE wsgate_sessions_active gauge\n"), "{text}");
        assert!(text.contains("# TYPE wsgate_handshake_duration_seconds histogram\n"), "{text}");
        assert!(!text.contains("# EOF") && !text.contains("# UNIT") && !text.contains("_created"), "{text}");
        // Every family DESIGN.md names is there before anything happened.
        let fresh = Metrics::new().encode();
        for name in [
            "wsgate_sessions_active",
            "wsgate_handshakes_total",
            "wsgate_closes_total",
            "wsgate_messages_total",
            "wsgate_bytes_total",
            "wsgate_rate_limited_messages_total",
            "wsgate_handshake_duration_seconds",
            "wsgate_config_reloads_total",
        ] {
            assert!(fresh.contains(&format!("# TYPE {name} ")), "{name} missing:\n{fresh}");
        }
        assert!(fresh.contains("wsgate_closes_total{code=\"1008\",initiator=\"proxy\"} 0\n"), "{fresh}");
        // A 0.0.4 parser files the counter under its own name, with its type.
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == "wsgate_handshakes_total" && s.labels.get("result") == Some("accepted"))
            .expect("sample");
        assert!(matches!(s.value, prometheus_parse::Value::Counter(v) if v == 1.0), "{:?}", s.value);
    }
}
