//! Issue 5: what an operator sees. `/metrics` parsed with a Prometheus text-format parser,
//! `/healthz` and `/readyz`, SIGHUP reloads (origin list, broken file, certificate swap),
//! SIGTERM drain, systemd notifications, logs (JSON, redaction, session-end fields),
//! `wsgate check`, and `systemd-analyze verify` on the unit.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------------
// helpers

/// One scrape of `/metrics`, parsed by `prometheus-parse`.
struct Scrape(prometheus_parse::Scrape);

impl Scrape {
    async fn of(proxy: &Proxy) -> Scrape {
        let (status, body) = proxy.admin_get("/metrics").await;
        assert_eq!(status, 200, "/metrics status");
        let lines = body.lines().map(|l| Ok(l.to_string()));
        Scrape(prometheus_parse::Scrape::parse(lines).expect("/metrics does not parse"))
    }

    /// The value of the series `name` whose labels include `labels` (None: no such series).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                other => panic!("{name} is not a scalar: {other:?}"),
            })
            .next()
    }

    /// Like `get`, 0 when the series does not exist yet (a counter never incremented).
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    fn histogram_buckets(&self, name: &str) -> Vec<prometheus_parse::HistogramCount> {
        self.0
            .samples
            .iter()
            .find_map(|s| match &s.value {
                prometheus_parse::Value::Histogram(h) if s.metric == name => Some(h.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no histogram {name}"))
    }
}

/// Polls `/metrics` until `pred` holds (sessions publish their counters when they end).
async fn wait_metrics(proxy: &Proxy, what: &str, pred: impl Fn(&Scrape) -> bool) -> Scrape {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let s = Scrape::of(proxy).await;
        if pred(&s) {
            return s;
        }
        if Instant::now() > end {
            panic!("metrics never showed {what}:\n{}", proxy.metrics().await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every captured log line parsed as JSON; panics on a line that is not.
fn json_lines(proxy: &Proxy) -> Vec<serde_json::Value> {
    proxy
        .logs
        .lock()
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}")))
        .collect()
}

fn events(proxy: &Proxy, event: &str) -> Vec<serde_json::Value> {
    json_lines(proxy).into_iter().filter(|v| v["event"] == event).collect()
}

/// Waits until there are `n` lines of this event (log capture runs in other threads).
async fn wait_events(proxy: &Proxy, event: &str, n: usize) -> Vec<serde_json::Value> {
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        let v = events(proxy, event);
        if v.len() >= n || Instant::now() > end {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for the process to exit; returns its status and how long it took.
async fn wait_exit(proxy: &mut Proxy, timeout: Duration) -> (std::process::ExitStatus, Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(st) = proxy.child.try_wait().unwrap() {
            let took = t0.elapsed();
            // The log reader threads may lag behind the exit: a clean exit ends with "stopped".
            if st.success() {
                proxy.wait_log("\"event\":\"stopped\"", Duration::from_secs(2)).await;
            }
            return (st, took);
        }
        assert!(t0.elapsed() < timeout, "wsgate still running {timeout:?} after the signal");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for the proxy's close frame, then keeps reading so that tungstenite sends its
/// reply and sees the connection end; returns the close code.
async fn closed_with(ws: &mut Client) -> Option<u16> {
    let code = expect_close(ws, Duration::from_secs(5)).await.map(|c| c.0);
    let _ = tokio::time::timeout(Duration::from_secs(3), async { while let Some(Ok(_)) = ws.next().await {} }).await;
    code
}

/// Rewrites one line of the running proxy's config file (for SIGHUP tests).
fn edit_config(proxy: &Proxy, from: &str, to: &str) {
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    assert!(text.contains(from), "config has no {from:?}");
    std::fs::write(&proxy.config_path, text.replace(from, to)).unwrap();
}

/// Sends SIGHUP and waits for the `reload` line with this result (the n-th one overall).
async fn reload(proxy: &Proxy, result: &str) {
    let before = events(proxy, "reload").iter().filter(|v| v["result"] == result).count();
    proxy.signal("HUP");
    let end = Instant::now() + Duration::from_secs(5);
    while events(proxy, "reload").iter().filter(|v| v["result"] == result).count() == before {
        assert!(Instant::now() < end, "no reload {result} line; logs:\n{}", proxy.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn echo(ws: &mut Client, text: &str) {
    ws.send(Message::Text(text.to_string().into())).await.unwrap();
    loop {
        let got = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("no echo").unwrap().unwrap();
        if !matches!(got, Message::Ping(_) | Message::Pong(_)) {
            assert_eq!(got, Message::Text(text.to_string().into()));
            return;
        }
    }
}

/// The serial number of the certificate the proxy serves, as seen by a rustls client.
async fn served_serial(proxy: &Proxy, pki: &Pki) -> Vec<u8> {
    use x509_parser::prelude::*;
    let tls = raw_tls(proxy, pki).await;
    let der = tls.get_ref().1.peer_certificates().expect("no peer certificate")[0].clone();
    let (_, cert) = X509Certificate::from_der(der.as_ref()).unwrap();
    cert.raw_serial().to_vec()
}

fn not_after_of(path: &Path) -> i64 {
    use x509_parser::prelude::*;
    let pem = std::fs::read(path).unwrap();
    let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    let (_, cert) = X509Certificate::from_der(der.as_ref()).unwrap();
    cert.validity().not_after.timestamp()
}

use rustls_pki_types::pem::PemObject;

// ---------------------------------------------------------------------------------------------
// /metrics, /healthz, /readyz

#[tokio::test]
async fn backend_connect_errors_are_counted() {
    let pki = Pki::new();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let proxy = Proxy::start(&pki, &config(dead, ""));
    assert_eq!(connect(&proxy, &pki).go().await.unwrap_err().status(), 502);
    let m = Scrape::of(&proxy).await;
    assert_eq!(m.count("wsgate_handshakes_total", &[("result", "backend_unreachable")]), 1.0);
    assert_eq!(m.count("wsgate_backend_connect_errors_total", &[("result", "backend_unreachable")]), 1.0);
    assert_eq!(m.count("wsgate_backend_connect_errors_total", &[("result", "backend_timeout")]), 0.0);
    let r = wait_events(&proxy, "rejected", 1).await;
    assert_eq!((r[0]["reason"].as_str(), r[0]["status"].as_u64()), (Some("backend_unreachable"), Some(502)));
    // Logged once (DESIGN.md), at warn, with what the operator needs to fix it.
    assert_eq!(r[0]["level"], "WARN", "{}", r[0]);
    assert!(r[0]["error"].as_str().is_some_and(|e| e.contains("connect")), "{}", r[0]);
    let about_client = json_lines(&proxy).into_iter().filter(|v| v["client_ip"] == "127.0.0.1").count();
    assert_eq!(about_client, 1, "{}", proxy.log_text());
}

#[tokio::test]
async fn backend_close_is_counted_and_logged_as_the_backend_s() {
    let pki = Pki::new();
    // A backend that closes with 4002 "kicked" after the first message.
    let addr = scripted_backend(|_, mut ws| async move {
        let _ = ws.next().await;
        ws.send(close_frame(4002, "kicked")).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    let proxy = Proxy::start(&pki, &config(addr, ""));
    let (mut ws, _) = connect(&proxy, &pki).go().await.unwrap();
    ws.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(closed_with(&mut ws).await, Some(4002));
    wait_metrics(&proxy, "the backend's close", |m| {
        m.count("wsgate_closes_total", &[("code", "4002"), ("initiator", "backend")]) == 1.0
            && m.get("wsgate_sessions_active", &[]) == Some(0.0)
    })
    .await;
    let end = wait_events(&proxy, "session_end", 1).await;
    assert_eq!(end[0]["close_code"], 4002);
    assert_eq!(end[0]["initiator"], "backend");
    assert_eq!(end[0]["msgs_in"], 1);
    assert_eq!(end[0]["bytes_in"], 5);
}

#[tokio::test]
async fn metrics_follow_sessions_rejections_and_closes() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));

    let m = Scrape::of(&proxy).await;
    assert_eq!(m.get("wsgate_sessions_active", &[]), Some(0.0));
    // Certificate expiry: the served certificate's notAfter, labelled with its first DNS name.
    assert_eq!(
        m.get("wsgate_tls_certificate_expiry_timestamp_seconds", &[("server_name", "localhost")]),
        Some(not_after_of(&pki.cert_path) as f64)
    );
    for dir in ["client_to_backend", "backend_to_client"] {
        assert_eq!(m.get("wsgate_messages_total", &[("direction", dir)]), Some(0.0), "{dir}");
        assert_eq!(m.get("wsgate_bytes_total", &[("direction", dir)]), Some(0.0), "{dir}");
    }
    assert_eq!(m.get("wsgate_handshake_duration_seconds_count", &[]), Some(0.0));
    // Known label values exist at 0 from the start: the first refusal of a kind is an increase.
    for result in [
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
    ] {
        assert_eq!(m.get("wsgate_handshakes_total", &[("result", result)]), Some(0.0), "{result}");
    }
    // `draining` is ours, not the contract's: it shows only once a drain refused an upgrade.
    assert_eq!(m.get("wsgate_handshakes_total", &[("result", "draining")]), None);
    for result in ["ok", "refused"] {
        assert_eq!(m.get("wsgate_config_reloads_total", &[("result", result)]), Some(0.0), "{result}");
    }

    // A rejection: Origin not on the list.
    let err = connect(&proxy, &pki).header("Origin", "https://evil.example.net").go().await.unwrap_err();
    assert_eq!(err.status(), 403);
    let m = Scrape::of(&proxy).await;
    assert_eq!(m.count("wsgate_handshakes_total", &[("result", "origin_denied")]), 1.0);
    assert_eq!(m.count("wsgate_handshakes_total", &[("result", "accepted")]), 0.0);

    // An accepted session: active while open, traffic counted by direction after it ends.
    let (mut ws, _) = connect(&proxy, &pki).go().await.unwrap();
    let m = wait_metrics(&proxy, "one active session", |m| m.get("wsgate_sessions_active", &[]) == Some(1.0)).await;
    assert_eq!(m.count("wsgate_handshakes_total", &[("result", "accepted")]), 1.0);
    echo(&mut ws, "hello").await; // 5 bytes
    echo(&mut ws, "operator!").await; // 9 bytes
    ws.send(Message::Binary(vec![0u8; 100].into())).await.unwrap();
    let _ = ws.next().await.unwrap().unwrap();
    ws.send(close_frame(1000, "done")).await.unwrap();
    assert_eq!(expect_close(&mut ws, Duration::from_secs(5)).await.map(|c| c.0), Some(1000));

    let m = wait_metrics(&proxy, "the session's end", |m| {
        m.count("wsgate_closes_total", &[("code", "1000"), ("initiator", "client")]) == 1.0
    })
    .await;
    assert_eq!(m.get("wsgate_sessions_active", &[]), Some(0.0));
    for dir in ["client_to_backend", "backend_to_client"] {
        assert_eq!(m.get("wsgate_messages_total", &[("direction", dir)]), Some(3.0), "{dir}");
        assert_eq!(m.get("wsgate_bytes_total", &[("direction", dir)]), Some(114.0), "{dir}");
    }
    // Every answered upgrade is observed: the 403 and the 101.
    assert_eq!(m.get("wsgate_handshake_duration_seconds_count", &[]), Some(2.0));
    let buckets = m.histogram_buckets("wsgate_handshake_duration_seconds");
    let inf = buckets.iter().find(|b| b.less_than.is_infinite()).expect("+Inf bucket");
    assert_eq!(inf.count, 2.0);
    assert_eq!(m.count("wsgate_rate_limited_messages_total", &[]), 0.0);

    // A close started by the proxy (frame over max_frame_size) is counted with its code and side.
    let (mut ws, _) = connect(&proxy, &pki).go().await.unwrap();
    ws.send(Message::Binary(vec![0u8; 65 * 1024].into())).await.unwrap();
    assert_eq!(closed_with(&mut ws).await, Some(1009));
    let m = wait_metrics(&proxy, "the 1009", |m| {
        m.count("wsgate_closes_total", &[("code", "1009"), ("initiator", "proxy")]) == 1.0
    })
    .await;
    assert_eq!(m.get("wsgate_sessions_active", &[]), Some(0.0));
}

#[tokio::test]
async fn traffic_counters_move_during_a_long_session() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    // Sessions publish their counters within a second of the traffic, not only when they end
    // or at the keepalive tick (30 s by default, far beyond the 5 s this test waits).
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    let (mut ws, _) = connect(&proxy, &pki).go().await.unwrap();
    echo(&mut ws, "live traffic").await;
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        // Keep reading, so that the client answers the proxy's pings.
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(100), ws.next()).await {
            assert!(matches!(m, Ok(Message::Ping(_))), "{m:?}");
        }
        let m = Scrape::of(&proxy).await;
        if m.get("wsgate_messages_total", &[("direction", "client_to_backend")]) == Some(1.0)
            && m.get("wsgate_bytes_total", &[("direction", "backend_to_client")]) == Some(12.0)
        {
            assert_eq!(m.get("wsgate_sessions_active", &[]), Some(1.0));
            break;
        }
        assert!(Instant::now() < end, "traffic of the open session not in the metrics:\n{}", proxy.metrics().await);
    }
    // The session goes on (the client answers the pings) and its end does not count twice.
    echo(&mut ws, "more").await;
    ws.send(close_frame(1000, "")).await.unwrap();
    assert_eq!(closed_with(&mut ws).await, Some(1000));
    wait_metrics(&proxy, "the totals after the end", |m| {
        m.get("wsgate_sessions_active", &[]) == Some(0.0)
            && m.get("wsgate_messages_total", &[("direction", "client_to_backend")]) == Some(2.0)
            && m.get("wsgate_bytes_total", &[("direction", "backend_to_client")]) == Some(16.0)
    })
    .await;
}

#[tokio::test]
async fn healthz_and_readyz_then_503_while_draining() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let mut proxy =
        Proxy::start(&pki, &config(backend.addr, "").replace("shutdown_grace = \"5s\"", "shutdown_grace = \"3s\""));
    assert_eq!(proxy.admin_get("/healthz").await.0, 200);
    assert_eq!(proxy.admin_get("/readyz").await.0, 200);

    // A client that never answers the close keeps the drain going until shutdown_grace.
    let mut stuck = raw_upgrade(&proxy, &pki).await;
    let t0 = Instant::now();
    proxy.signal("TERM");
    let (op, payload) = read_raw_frame(&mut stuck).await.expect("close frame");
    assert_eq!(op, 8);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1001);
    assert_eq!(proxy.admin_get("/readyz").await.0, 503, "/readyz while draining");
    assert_eq!(proxy.admin_get("/healthz").await.0, 200, "/healthz while draining");
    // No new session while draining.
    assert!(connect(&proxy, &pki).go().await.is_err(), "a new session was admitted during the drain");

    let (status, _) = wait_exit(&mut proxy, Duration::from_secs(6)).await;
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(took >= Duration::from_millis(2500) && took < Duration::from_millis(4500), "exit after {took:?}");
    assert_eq!(events(&proxy, "drain_timeout").len(), 1, "{}", proxy.log_text());
    // The session cut at the deadline still logs its end (and so is counted).
    let ends = events(&proxy, "session_end");
    assert_eq!(ends.len(), 1, "{}", proxy.log_text());
    assert_eq!((ends[0]["close_code"].as_u64(), ends[0]["initiator"].as_str()), (Some(1001), Some("proxy")));
}

// ---------------------------------------------------------------------------------------------
// SIGTERM

#[tokio::test]
async fn sigterm_closes_sessions_with_1001_and_exits_0_at_once() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let mut proxy = Proxy::start(&pki, &config(backend.addr, ""));
    let (mut a, _) = connect(&proxy, &pki).go().await.unwrap();
    let (mut b, _) = connect(&proxy, &pki).go().await.unwrap();
    echo(&mut a, "a").await;
    echo(&mut b, "b").await;

    let t0 = Instant::now();
    proxy.signal("TERM");
    assert_eq!(closed_with(&mut a).await, Some(1001));
    assert_eq!(closed_with(&mut b).await, Some(1001));
    // The backend is told too.
    for _ in 0..2 {
        let seen = backend.next_session().await;
        assert!(matches!(seen.messages.last(), Some(Message::Close(Some(f))) if u16::from(f.code) == 1001));
    }
    // shutdown_grace is 5 s; with every session closed the process does not wait for it.
    let (status, _) = wait_exit(&mut proxy, Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert!(t0.elapsed() < Duration::from_secs(2), "exit took {:?}", t0.elapsed());
    let ends = events(&proxy, "session_end");
    assert_eq!(ends.len(), 2);
    assert!(ends.iter().all(|e| e["close_code"] == 1001 && e["initiator"] == "proxy"), "{ends:?}");
    assert_eq!(events(&proxy, "stopped").len(), 1);
}

#[tokio::test]
async fn upgrade_in_flight_at_sigterm_gets_503_counted_as_draining() {
    let pki = Pki::new();
    // A backend that takes 700 ms to answer its handshake.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(700)).await;
                if let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await {
                    while let Some(Ok(_)) = ws.next().await {}
                }
            });
        }
    });
    let mut proxy = Proxy::start(&pki, &config(addr, ""));
    let attempt = connect(&proxy, &pki).go();
    let term = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.signal("TERM");
    };
    let (result, ()) = tokio::join!(attempt, term);
    assert_eq!(result.unwrap_err().status(), 503);
    let r = wait_events(&proxy, "rejected", 1).await;
    assert_eq!(r[0]["reason"], "draining", "{r:?}");
    assert_eq!(r[0]["status"], 503);
    assert_eq!(wait_exit(&mut proxy, Duration::from_secs(5)).await.0.code(), Some(0));
}

#[tokio::test]
async fn sigint_drains_like_sigterm() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let mut proxy = Proxy::start(&pki, &config(backend.addr, ""));
    let (mut ws, _) = connect(&proxy, &pki).go().await.unwrap();
    proxy.signal("INT");
    assert_eq!(closed_with(&mut ws).await, Some(1001));
    let (status, took) = wait_exit(&mut proxy, Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0));
    assert!(took < Duration::from_secs(2), "exit took {took:?}");
}

#[tokio::test]
async fn sigterm_does_not_wait_for_connections_that_never_became_sessions() {
    use tokio::io::AsyncWriteExt;
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    // handshake_timeout 3 s, shutdown_grace 5 s: half-open connections (port scanners,
    // slowloris) are not sessions and must not hold the exit back.
    let mut proxy = Proxy::start(&pki, &config(backend.addr, ""));
    let _idle_tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut half_request = raw_tls(&proxy, &pki).await;
    half_request.write_all(b"GET /chat HTTP/1.1\r\nHost: localhost\r\n").await.unwrap();
    half_request.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.signal("TERM");
    let (status, took) = wait_exit(&mut proxy, Duration::from_secs(6)).await;
    assert_eq!(status.code(), Some(0));
    assert!(took < Duration::from_secs(1), "exit took {took:?}: waited for handshakes, not sessions");
}

// ---------------------------------------------------------------------------------------------
// SIGHUP

#[tokio::test]
async fn sighup_origin_change_applies_to_new_sessions_while_open_one_relays() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    let (mut old, _) = connect(&proxy, &pki).go().await.unwrap();
    echo(&mut old, "before").await;

    edit_config(&proxy, &format!("allow = [\"{ORIGIN}\", "), "allow = [\"https://new.example.net\", ");
    reload(&proxy, "ok").await;

    let err = connect(&proxy, &pki).go().await.unwrap_err();
    assert_eq!(err.status(), 403, "the old origin is still allowed after the reload");
    let (mut new, _) = connect(&proxy, &pki).header("Origin", "https://new.example.net").go().await.unwrap();
    echo(&mut new, "new origin").await;
    echo(&mut old, "after").await;

    let m = Scrape::of(&proxy).await;
    assert_eq!(m.count("wsgate_config_reloads_total", &[("result", "ok")]), 1.0);
    assert_eq!(m.count("wsgate_config_reloads_total", &[("result", "refused")]), 0.0);
    assert_eq!(m.get("wsgate_sessions_active", &[]), Some(2.0));
}

#[tokio::test]
async fn sighup_with_broken_file_keeps_old_config() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    let (mut open, _) = connect(&proxy, &pki).go().await.unwrap();
    let good = std::fs::read_to_string(&proxy.config_path).unwrap();

    // Not TOML at all, then valid TOML with a bad value: both refused.
    std::fs::write(&proxy.config_path, "[server\nlisten = ").unwrap();
    reload(&proxy, "refused").await;
    std::fs::write(&proxy.config_path, good.replace("[origin]\nallow = [", "[origin]\nallow = [\"not a url\", "))
        .unwrap();
    reload(&proxy, "refused").await;
    let refused = events(&proxy, "reload");
    assert!(refused.iter().all(|v| v["level"] == "ERROR" && v["error"].as_str().is_some_and(|e| !e.is_empty())));
    assert!(refused[1]["error"].as_str().unwrap().contains("origin"), "{}", refused[1]);

    // Still serving, with the old policy: the old origin is admitted; the open session relays.
    let (mut ws, _) = connect(&proxy, &pki).go().await.unwrap();
    echo(&mut ws, "still here").await;
    echo(&mut open, "me too").await;
    assert_eq!(proxy.admin_get("/readyz").await.0, 200);

    std::fs::write(&proxy.config_path, &good).unwrap();
    reload(&proxy, "ok").await;
    let m = Scrape::of(&proxy).await;
    assert_eq!(m.count("wsgate_config_reloads_total", &[("result", "refused")]), 2.0);
    assert_eq!(m.count("wsgate_config_reloads_total", &[("result", "ok")]), 1.0);
}

#[tokio::test]
async fn sighup_rereads_the_jwt_secret_file() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    let (mut open, _) = connect(&proxy, &pki).go().await.unwrap();
    // Key rotation: a new secret in the same file.
    let new_secret = "a-brand-new-secret-of-more-than-32-bytes";
    std::fs::write(proxy.config_path.parent().unwrap().join("secret"), new_secret).unwrap();
    reload(&proxy, "ok").await;
    let now = now_unix() as i64;
    let new_token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": "rotated", "iat": now, "exp": now + 600}),
        &jsonwebtoken::EncodingKey::from_secret(new_secret.as_bytes()),
    )
    .unwrap();
    let old = connect(&proxy, &pki).go().await.unwrap_err();
    assert_eq!(old.status(), 401, "a token signed with the old secret is still accepted");
    let (mut ws, _) = connect(&proxy, &pki).header("Authorization", &format!("Bearer {new_token}")).go().await.unwrap();
    echo(&mut ws, "rotated").await;
    // The session admitted under the old secret goes on.
    echo(&mut open, "still open").await;
}

#[tokio::test]
async fn certificate_swapped_on_disk_is_served_after_reload() {
    let mut pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    assert_eq!(served_serial(&proxy, &pki).await, vec![1, 2, 3, 4]);
    let (mut open, _) = connect(&proxy, &pki).go().await.unwrap();

    // Half a renewal (new certificate, old key still on disk): refused, the old pair stays.
    let old_key = std::fs::read(&pki.key_path).unwrap();
    pki.issue(&[9, 9, 9]);
    let new_key = std::fs::read(&pki.key_path).unwrap();
    std::fs::write(&pki.key_path, &old_key).unwrap();
    reload(&proxy, "refused").await;
    assert!(events(&proxy, "reload").last().unwrap()["error"].as_str().unwrap().contains("do not match"));
    assert_eq!(served_serial(&proxy, &pki).await, vec![1, 2, 3, 4]);
    std::fs::write(&pki.key_path, &new_key).unwrap();
    // Not before the reload: no file watching surprises.
    assert_eq!(served_serial(&proxy, &pki).await, vec![1, 2, 3, 4]);
    reload(&proxy, "ok").await;
    assert_eq!(served_serial(&proxy, &pki).await, vec![9, 9, 9]);
    let (mut ws, _) = connect(&proxy, &pki).go().await.unwrap();
    echo(&mut ws, "new cert").await;
    echo(&mut open, "old connection").await;
    let m = Scrape::of(&proxy).await;
    assert_eq!(
        m.get("wsgate_tls_certificate_expiry_timestamp_seconds", &[("server_name", "localhost")]),
        Some(not_after_of(&pki.cert_path) as f64)
    );
}

/// The certificate the proxy serves for `name` (SNI), as DER.
async fn served_for(proxy: &Proxy, pki: &Pki, name: &'static str) -> Vec<u8> {
    let tls = tls_connect(proxy, pki.client_config(), name).await.unwrap();
    tls.get_ref().1.peer_certificates().expect("no peer certificate")[0].to_vec()
}

/// Upgrades over TLS with this client config: the answer's first bytes or the error.
async fn upgrade_with(proxy: &Proxy, cc: std::sync::Arc<rustls::ClientConfig>) -> Result<Vec<u8>, String> {
    let mut s = tls_connect(proxy, cc, "localhost").await.map_err(|e| e.to_string())?;
    send_upgrade(&mut s).await
}

#[tokio::test]
async fn reload_reads_sni_certificates_again_and_applies_client_ca() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let (chat_c, chat_k) = pki.issue_for("chat", &["chat.example.com"]);
    let sni = format!(
        "[[tls.sni]]\nserver_names = [\"chat.example.com\"]\ncert = \"{}\"\nkey = \"{}\"\n[backend]",
        chat_c.display(),
        chat_k.display()
    );
    let proxy = Proxy::start(&pki, &config(backend.addr, "").replace("[backend]", &sni));
    let first = served_for(&proxy, &pki, "chat.example.com").await;

    // The SNI certificate renewed on disk (new key and serial): served after the reload.
    pki.issue_for("chat", &["chat.example.com"]);
    assert_eq!(served_for(&proxy, &pki, "chat.example.com").await, first, "no reload yet");
    reload(&proxy, "ok").await;
    let renewed = served_for(&proxy, &pki, "chat.example.com").await;
    assert_ne!(renewed, first, "the renewed SNI certificate is not served");
    assert_eq!(renewed, rustls_pki_types::CertificateDer::from_pem_file(&chat_c).unwrap().to_vec());

    // client_ca added by a reload: new connections need a client certificate from that CA.
    assert_eq!(upgrade_with(&proxy, pki.client_config()).await.as_deref(), Ok(&b"HTTP/1.1 101"[..]));
    let ca = pki.dir.path().join("ca.pem");
    edit_config(&proxy, "[tls]\n", &format!("[tls]\nclient_ca = \"{}\"\n", ca.display()));
    reload(&proxy, "ok").await;
    let refused = upgrade_with(&proxy, pki.client_config()).await;
    assert!(refused.as_ref().is_err_and(|e| e.contains("CertificateRequired")), "{refused:?}");
    assert_eq!(upgrade_with(&proxy, pki.client_config_with_cert()).await.as_deref(), Ok(&b"HTTP/1.1 101"[..]));
}

// ---------------------------------------------------------------------------------------------
// systemd notifications

#[tokio::test]
async fn notify_socket_gets_ready_reloading_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let recv = |proxy: &mut Proxy| {
        let mut buf = [0u8; 4096];
        match sock.recv(&mut buf) {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).to_string(),
            Err(e) => panic!("no notification ({e}); wsgate {:?}; logs:\n{}", proxy.child.try_wait(), proxy.log_text()),
        }
    };
    let lines = |msg: &str| msg.lines().map(str::to_string).collect::<Vec<_>>();

    let mut proxy =
        Proxy::start_with_env(&pki, &config(backend.addr, ""), &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())]);
    assert!(lines(&recv(&mut proxy)).contains(&"READY=1".to_string()));

    proxy.signal("HUP");
    let reloading = lines(&recv(&mut proxy));
    assert!(reloading.contains(&"RELOADING=1".to_string()), "{reloading:?}");
    // systemd >= 253 wants the reload's start time with it.
    assert!(reloading.iter().any(|l| l.starts_with("MONOTONIC_USEC=")), "{reloading:?}");
    assert!(lines(&recv(&mut proxy)).contains(&"READY=1".to_string()));

    proxy.signal("TERM");
    assert!(lines(&recv(&mut proxy)).contains(&"STOPPING=1".to_string()));
    assert_eq!(wait_exit(&mut proxy, Duration::from_secs(5)).await.0.code(), Some(0));
}

#[tokio::test]
async fn sighup_right_after_ready_is_a_reload_not_the_end() {
    use std::os::unix::net::UnixDatagram;
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let secret = pki.dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let config_path = pki.dir.path().join("wsgate.toml");
    std::fs::write(&config_path, fill(&config(backend.addr, ""), &pki, &secret)).unwrap();
    // What systemd does: ExecReload (SIGHUP) as soon as the service is up (READY=1).
    for round in 0..5 {
        let sock_path = pki.dir.path().join(format!("notify{round}.sock"));
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(["run", "--config"])
            .arg(&config_path)
            .env("NOTIFY_SOCKET", &sock_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("no READY=1");
        assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
        let pid = child.id().to_string();
        assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
        let n = sock.recv(&mut buf).unwrap_or_else(|_| panic!("round {round}: no RELOADING=1; {:?}", child.try_wait()));
        assert!(String::from_utf8_lossy(&buf[..n]).contains("RELOADING=1"));
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        assert_eq!(child.wait().unwrap().code(), Some(0), "round {round}");
    }
}

// ---------------------------------------------------------------------------------------------
// logs

#[tokio::test]
async fn tokens_never_reach_the_log_and_session_end_has_top_level_fields() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    // trace: what an operator turns on when something goes wrong must not leak either.
    let cfg = config(backend.addr, "").replace("level = \"info\"", "level = \"trace\"");
    let mut proxy = Proxy::start(&pki, &cfg);

    let (hdr, query, cookie, proto) = (token("hdr", 600), token("qry", 600), token("cky", 600), token("pro", 600));
    let bad = {
        // Right shape, wrong signature: refused as token_invalid, must not be logged either.
        let mut t = token("bad", 600);
        t.push_str("AAAA");
        t
    };
    let (mut ws, _) = connect(&proxy, &pki).go().await.unwrap(); // alice, Bearer header
    let bearer = connect(&proxy, &pki).headers.iter().find(|(k, _)| k == "Authorization").unwrap().1.clone();
    ws.send(Message::Text("hi".into())).await.unwrap();
    ws.send(Message::Binary(vec![1u8; 10].into())).await.unwrap();
    let _ = ws.next().await;
    let _ = ws.next().await;
    ws.send(close_frame(4000, "bye")).await.unwrap();
    expect_close(&mut ws, Duration::from_secs(5)).await;

    let no_auth = || connect(&proxy, &pki).without("Authorization");
    let (mut a, _) = connect(&proxy, &pki).header("Authorization", &format!("Bearer {hdr}")).go().await.unwrap();
    let (mut b, _) = no_auth().path(&format!("/chat?room=1&access_token={query}")).go().await.unwrap();
    let (mut c, _) = no_auth().header("Cookie", &format!("theme=dark; access_token={cookie}")).go().await.unwrap();
    let (mut d, _) =
        no_auth().header("Sec-WebSocket-Protocol", &format!("chat, access_token, {proto}")).go().await.unwrap();
    for ws in [&mut a, &mut b, &mut c, &mut d] {
        echo(ws, "x").await;
    }
    // Refusals with tokens in every place.
    for conn in [
        connect(&proxy, &pki).header("Authorization", &format!("Bearer {bad}")),
        no_auth().path(&format!("/chat?access_token={bad}")),
        no_auth().header("Cookie", &format!("access_token={bad}")),
        connect(&proxy, &pki).header("Origin", "https://evil.example.net").path(&format!("/chat?access_token={query}")),
    ] {
        let st = conn.go().await.unwrap_err().status();
        assert!(st == 401 || st == 403, "{st}");
    }
    // A drain ends the other sessions (session_end lines for all of them).
    proxy.signal("TERM");
    for ws in [&mut a, &mut b, &mut c, &mut d] {
        assert_eq!(closed_with(ws).await, Some(1001));
    }
    assert_eq!(wait_exit(&mut proxy, Duration::from_secs(5)).await.0.code(), Some(0));

    let text = proxy.log_text();
    let bearer_token = bearer.trim_start_matches("Bearer ").to_string();
    for t in [&bearer_token, &hdr, &query, &cookie, &proto, &bad] {
        let sig = t.rsplit('.').next().unwrap();
        assert!(!text.contains(sig), "a token (or its signature) is in the log:\n{text}");
    }
    assert!(!text.contains(SECRET), "the HMAC secret is in the log");

    // Every line is JSON; rejections carry client_ip, reason, status at the top level.
    let rejected = events(&proxy, "rejected");
    assert_eq!(rejected.len(), 4, "{rejected:?}");
    for r in &rejected {
        assert_eq!(r["client_ip"], "127.0.0.1");
        assert!(r["status"].is_u64(), "{r}");
        assert!(r["reason"].is_string(), "{r}");
    }
    let reasons: Vec<_> = rejected.iter().map(|r| r["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["token_invalid", "token_invalid", "token_invalid", "origin_denied"]);
    assert_eq!(rejected[3]["status"], 403);

    // session_end: the DESIGN.md fields, at the top level, numbers as numbers.
    let ends = events(&proxy, "session_end");
    assert_eq!(ends.len(), 5, "{ends:?}");
    let first = &ends[0];
    assert_eq!(first["client_ip"], "127.0.0.1");
    assert_eq!(first["sub"], "alice");
    assert!(first["duration_ms"].is_u64(), "{first}");
    assert_eq!(first["msgs_in"], 2);
    assert_eq!(first["msgs_out"], 2);
    assert_eq!(first["bytes_in"], 12);
    assert_eq!(first["bytes_out"], 12);
    assert_eq!(first["close_code"], 4000);
    assert_eq!(first["initiator"], "client");
    let mut subs: Vec<_> = ends[1..].iter().map(|e| e["sub"].as_str().unwrap().to_string()).collect();
    subs.sort();
    assert_eq!(subs, ["cky", "hdr", "pro", "qry"]);
    assert!(ends[1..].iter().all(|e| e["close_code"] == 1001 && e["initiator"] == "proxy" && e["msgs_in"] == 1));
}

#[tokio::test]
async fn every_refusal_is_logged_with_the_metric_reason_and_a_status() {
    use tokio::io::AsyncWriteExt;
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let cfg = config(backend.addr, "[trusted_proxies]\ncidrs = [\"127.0.0.2/32\"]\nproxy_protocol = true")
        .replace("handshake_timeout = \"3s\"", "handshake_timeout = \"1s\"");
    let proxy = Proxy::start(&pki, &cfg);
    // A trusted balancer sending garbage instead of a PROXY header.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut s = sock.connect(proxy.addr).await.unwrap();
    s.write_all(b"HELLO THERE\r\n\r\n").await.unwrap();
    // A TCP connection that never starts TLS (times out), a 426, a 401.
    let _silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut plain = raw_tls(&proxy, &pki).await;
    plain.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    assert_eq!(connect(&proxy, &pki).without("Authorization").go().await.unwrap_err().status(), 401);

    let rejected = wait_events(&proxy, "rejected", 4).await;
    let m = Scrape::of(&proxy).await;
    let mut reasons: Vec<_> = rejected.iter().map(|r| r["reason"].as_str().unwrap().to_string()).collect();
    reasons.sort();
    assert_eq!(reasons, ["bad_request", "handshake_timeout", "not_websocket", "token_missing"], "{rejected:?}");
    for r in &rejected {
        let reason = r["reason"].as_str().unwrap();
        assert!(r["client_ip"].is_string(), "{r}");
        assert!(r["status"].is_u64(), "no status: {r}");
        assert_eq!(m.count("wsgate_handshakes_total", &[("result", reason)]), 1.0, "{reason}");
    }
}

#[tokio::test]
async fn connections_dropped_at_accept_are_summarised_with_their_count() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let cfg =
        config(backend.addr, "").replace("max_pending_handshakes_per_ip = 500", "max_pending_handshakes_per_ip = 1");
    let mut proxy = Proxy::start(&pki, &cfg);
    let _pending = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut flood = Vec::new();
    for _ in 0..20 {
        flood.push(tokio::net::TcpStream::connect(proxy.addr).await.unwrap());
    }
    wait_metrics(&proxy, "20 drops", |m| m.count("wsgate_handshakes_total", &[("result", "pending_dropped")]) == 20.0)
        .await;
    proxy.signal("TERM");
    assert_eq!(wait_exit(&mut proxy, Duration::from_secs(5)).await.0.code(), Some(0));
    // Not one line per drop, and the lines account for every drop (none left untold at exit).
    let lines = events(&proxy, "pending_dropped");
    assert!(!lines.is_empty() && lines.len() <= 2, "{lines:?}");
    assert!(lines.iter().all(|l| l["client_ip"] == "127.0.0.1" && l["level"] == "WARN"), "{lines:?}");
    let total: u64 = lines.iter().map(|l| l["dropped"].as_u64().unwrap()).sum();
    assert_eq!(total, 20, "{lines:?}");
}

#[tokio::test]
async fn json_format_means_every_stdout_and_stderr_line_is_json() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let mut proxy = Proxy::start(&pki, &config(backend.addr, ""));
    let (mut ws, _) = connect(&proxy, &pki).go().await.unwrap();
    echo(&mut ws, "x").await;
    let _ = connect(&proxy, &pki).without("Authorization").go().await.unwrap_err();
    // Plaintext on the TLS port, a broken reload, a good reload, a drain.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
    }
    let good = std::fs::read_to_string(&proxy.config_path).unwrap();
    std::fs::write(&proxy.config_path, "nonsense = ").unwrap();
    reload(&proxy, "refused").await;
    std::fs::write(&proxy.config_path, good.replacen("127.0.0.1:0", "127.0.0.1:1", 1)).unwrap();
    reload(&proxy, "ok").await; // says listen addresses change only on restart
    proxy.signal("TERM");
    assert_eq!(closed_with(&mut ws).await, Some(1001));
    assert_eq!(wait_exit(&mut proxy, Duration::from_secs(5)).await.0.code(), Some(0));
    let lines = json_lines(&proxy);
    assert!(lines.iter().all(|v| v["level"].is_string() && v["event"].is_string()), "{lines:?}");
    assert!(
        lines.iter().any(|v| v["event"] == "reload" && v["message"].as_str().unwrap_or("").contains("restart")),
        "{lines:?}"
    );

    // A fatal error at start-up is a JSON line on stderr too.
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(backend.addr, "").replace("{cert}", "/nonexistent/cert.pem");
    let path = dir.path().join("wsgate.toml");
    std::fs::write(&path, fill(&cfg, &pki, &dir.path().join("secret"))).unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate")).args(["run", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!all.trim().is_empty());
    for l in all.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["message"].as_str().unwrap_or("").contains("tls.cert"), "{l}");
    }
}

/// stdout closed under the proxy (a log shipper that died): it keeps serving, and stderr
/// gets no plain-text complaint per event (tracing-subscriber's default), so it stays JSON.
#[tokio::test]
async fn closed_stdout_adds_no_plain_text_to_stderr() {
    use std::io::{BufRead, Read};
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(backend.addr, "");
    let path = dir.path().join("wsgate.toml");
    std::fs::write(&path, fill(&cfg, &pki, &dir.path().join("secret"))).unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["run", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    out.read_line(&mut first).unwrap();
    let started: serde_json::Value = serde_json::from_str(&first).unwrap();
    let admin: std::net::SocketAddr = started["admin"].as_str().unwrap().parse().unwrap();
    drop(out); // the reading end goes away
    for _ in 0..3 {
        assert_eq!(http_get(admin, "/healthz").await.0, 200);
        let listen = started["listen"].as_str().unwrap().trim_matches(|c| c == '[' || c == ']').to_string();
        // Plaintext on the TLS port: a `tls_failed` rejection line.
        let mut s = tokio::net::TcpStream::connect(listen.as_str()).await.unwrap();
        let _ = tokio::io::AsyncWriteExt::write_all(&mut s, b"GET / HTTP/1.1\r\n\r\n").await;
        let _ =
            tokio::time::timeout(Duration::from_secs(2), tokio::io::AsyncReadExt::read(&mut s, &mut [0u8; 64])).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    for l in err.lines().filter(|l| !l.trim().is_empty()) {
        assert!(serde_json::from_str::<serde_json::Value>(l).is_ok(), "not JSON on stderr: {l}");
    }
}

// ---------------------------------------------------------------------------------------------
// wsgate check

/// config.example.toml with the test certificate, in a temp dir; (dir, path).
fn example_config(pki: &Pki, edit: impl Fn(String) -> String) -> (tempfile::TempDir, std::path::PathBuf) {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml")).unwrap();
    let text = text
        .replace("\"/etc/wsgate/tls/fullchain.pem\"", &format!("{:?}", pki.cert_path.display().to_string()))
        .replace("\"/etc/wsgate/tls/privkey.pem\"", &format!("{:?}", pki.key_path.display().to_string()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wsgate.toml");
    std::fs::write(&path, edit(text)).unwrap();
    (dir, path)
}

/// Runs `wsgate check`; `secret` "" leaves WSGATE_JWT_SECRET unset.
fn check(path: &Path, secret: &str) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
    cmd.args(["check", "--config"]).arg(path).env_remove("WSGATE_JWT_SECRET");
    if !secret.is_empty() {
        cmd.env("WSGATE_JWT_SECRET", secret);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.code().expect("killed by a signal"), stdout, stderr)
}

#[test]
fn check_accepts_the_example_config() {
    let pki = Pki::new();
    let (_dir, path) = example_config(&pki, |t| t);
    let (code, stdout, stderr) = check(&path, SECRET);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    // The example says `format = "json"`: one JSON object, like every line `run` prints.
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    assert_eq!(v["result"], "valid", "{stdout}");
    assert_eq!(v["certificates"][0]["server_name"], "localhost", "{stdout}");
    assert!(stderr.is_empty() && !stdout.contains(SECRET), "{stderr}");

    // Under `format = "text"`, a summary for a person.
    let (_dir, path) = example_config(&pki, |t| t.replace("format = \"json\"", "format = \"text\""));
    let (code, stdout, stderr) = check(&path, SECRET);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("is valid") && stdout.contains("localhost"), "{stdout}");
    assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET));
}

#[test]
fn check_refuses_broken_configs_naming_the_key() {
    let pki = Pki::new();
    let other_key = {
        let k = rcgen::KeyPair::generate().unwrap();
        let p = pki.dir.path().join("other-key.pem");
        std::fs::write(&p, k.serialize_pem()).unwrap();
        p
    };
    let key_line = format!("key = {:?}", pki.key_path.display().to_string());
    type Edit<'a> = Box<dyn Fn(String) -> String + 'a>;
    let cases: Vec<(&str, Edit, &str, &[&str])> = vec![
        (
            "unknown key",
            Box::new(|t| t.replacen("[server]\n", "[server]\nlisten_adress = \"x\"\n", 1)),
            SECRET,
            &["listen_adress", "line"],
        ),
        (
            "bad duration",
            Box::new(|t| t.replace("handshake_timeout = \"10s\"", "handshake_timeout = \"ten seconds\"")),
            SECRET,
            &["handshake_timeout"],
        ),
        (
            "missing cert file",
            Box::new(|t| {
                let cert = format!("{:?}", pki.cert_path.display().to_string());
                t.replace(&cert, "\"/nonexistent/fullchain.pem\"")
            }),
            SECRET,
            &["tls.cert", "/nonexistent/fullchain.pem"],
        ),
        (
            "cert/key mismatch",
            Box::new(|t| t.replace(&key_line, &format!("key = {:?}", other_key.display().to_string()))),
            SECRET,
            &["tls", "match"],
        ),
        ("missing auth.mode", Box::new(|t| t.replacen("mode = \"jwt\"\n", "", 1)), SECRET, &["auth.mode"]),
        (
            // Named but unused (the example's backend is ws://): still a file that must be there.
            "missing backend.ca_file",
            Box::new(|t| t.replace("# ca_file = \"/etc/wsgate/backend-ca.pem\"", "ca_file = \"/nonexistent/ca.pem\"")),
            SECRET,
            &["backend.ca_file", "/nonexistent/ca.pem"],
        ),
        (
            "absurd duration",
            Box::new(|t| t.replace("handshake_timeout = \"10s\"", "handshake_timeout = \"300000000000y\"")),
            SECRET,
            &["handshake_timeout", "too long"],
        ),
        ("short HMAC secret", Box::new(|t| t), "too-short", &["auth.secret_env", "32"]),
        ("HMAC secret variable unset", Box::new(|t| t), "", &["auth.secret_env", "WSGATE_JWT_SECRET"]),
    ];
    for (what, edit, secret, needles) in cases {
        let (_dir, path) = example_config(&pki, &edit);
        let (code, stdout, stderr) = check(&path, secret);
        assert_eq!(code, 2, "{what}: exit {code}\nstdout:\n{stdout}\nstderr:\n{stderr}");
        // `format = "json"` (even in a file that does not parse): the error is a JSON line.
        let v: serde_json::Value =
            serde_json::from_str(stderr.trim()).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {stderr}"));
        let message = v["message"].as_str().unwrap_or_default();
        for n in needles {
            assert!(message.contains(n), "{what}: message does not name {n:?}:\n{stderr}");
        }
    }
}

#[test]
fn a_text_format_file_that_does_not_parse_gets_a_text_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wsgate.toml");
    std::fs::write(&path, "[log]\nformat = \"text\"  # for people\n\n[server\n").unwrap();
    let (code, _, stderr) = check(&path, SECRET);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.starts_with("wsgate check: ") && stderr.contains("line 4"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate")).args(["run", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("wsgate: "), "{out:?}");
}

/// `wsgate token | head -c0`: a closed stdout is not a panic (exit 101); the command's own
/// exit code stands.
#[test]
fn a_closed_stdout_does_not_panic_token_or_check() {
    let pki = Pki::new();
    let (_dir, path) = example_config(&pki, |t| t);
    let commands: [&[&str]; 2] = [
        &["token", "--secret-env", "WSGATE_JWT_SECRET", "--sub", "alice"],
        &["check", "--config", path.to_str().unwrap()],
    ];
    for args in commands {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(args)
            .env("WSGATE_JWT_SECRET", SECRET)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // closed before the command writes
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn missing_config_file_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    let (code, _, stderr) = check(&path, SECRET);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("nope.toml"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate")).args(["run", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.toml"));
}

// ---------------------------------------------------------------------------------------------
// deploy/systemd

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/deploy/verify_systemd.sh");
    let out = Command::new("bash").arg(script).env("WSGATE_SECURITY", "0").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let have_tool =
        Command::new("sh").args(["-c", "command -v systemd-analyze"]).output().is_ok_and(|o| o.status.success());
    if !have_tool {
        println!("NOTE: skipped, systemd-analyze is not installed and could not be installed:\n{stderr}");
        return;
    }
    assert!(out.status.success(), "verify_systemd.sh failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("OK, systemd-analyze verify is clean"), "{stdout}");
}

#[tokio::test]
async fn sighup_applies_a_new_log_level() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    let refuse = || connect(&proxy, &pki).header("Origin", "https://evil.example.net").go();
    assert_eq!(refuse().await.unwrap_err().status(), 403);
    assert_eq!(wait_events(&proxy, "rejected", 1).await.len(), 1);

    // info -> warn: rejections (info) are no longer logged. The new level applies to the
    // reload's own (info) line too, so wait for the metric instead.
    edit_config(&proxy, "level = \"info\"", "level = \"warn\"");
    proxy.signal("HUP");
    wait_metrics(&proxy, "the reload", |m| m.count("wsgate_config_reloads_total", &[("result", "ok")]) == 1.0).await;
    assert_eq!(refuse().await.unwrap_err().status(), 403);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(events(&proxy, "rejected").len(), 1, "log level not applied on reload:\n{}", proxy.log_text());

    // warn -> info again.
    edit_config(&proxy, "level = \"warn\"", "level = \"info\"");
    reload(&proxy, "ok").await; // logged: the level is info again
    assert_eq!(refuse().await.unwrap_err().status(), 403);
    assert_eq!(wait_events(&proxy, "rejected", 2).await.len(), 2);
}

#[tokio::test]
async fn upgrade_waiting_on_a_silent_backend_at_sigterm_gets_503_at_once() {
    let pki = Pki::new();
    // A backend that accepts and never answers; connect_timeout 4 s, longer than the test
    // waits: the drain, not the timeout, must answer.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let cfg = config(addr, "").replace("connect_timeout = \"1s\"", "connect_timeout = \"4s\"");
    let mut proxy = Proxy::start(&pki, &cfg);
    let attempt = async {
        let t0 = Instant::now();
        (connect(&proxy, &pki).go().await, t0.elapsed())
    };
    let term = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.signal("TERM");
    };
    let ((result, took), ()) = tokio::join!(attempt, term);
    assert_eq!(result.unwrap_err().status(), 503);
    assert!(took < Duration::from_millis(1500), "answered after {took:?}");
    let r = wait_events(&proxy, "rejected", 1).await;
    assert_eq!((r[0]["reason"].as_str(), r[0]["status"].as_u64()), (Some("draining"), Some(503)), "{r:?}");
    let (status, took) = wait_exit(&mut proxy, Duration::from_secs(6)).await;
    assert_eq!(status.code(), Some(0));
    assert!(took < Duration::from_secs(1), "exit took {took:?}");
}
