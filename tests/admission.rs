//! Admission at the handshake (issue 3), end to end through the real binary: every row of
//! DESIGN.md's Admission table with its status and headers, token sources and scrubbing,
//! claim forwarding, client IP behind trusted proxies (header and PROXY protocol), per-IP
//! caps and rates from several 127.0.0.x sources, the pending-handshake guard, slowloris,
//! address spraying, log hygiene and the `wsgate token` command.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Sets `key = value` in the config text: replaces the line that sets it, or adds it under
/// `[section]`.
fn set(cfg: &str, section: &str, key: &str, value: &str) -> String {
    let prefix = format!("{key} = ");
    if cfg.lines().any(|l| l.starts_with(&prefix)) {
        cfg.lines()
            .map(|l| if l.starts_with(&prefix) { format!("{key} = {value}") } else { l.to_string() })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    } else {
        let header = format!("[{section}]\n");
        assert!(cfg.contains(&header), "no [{section}] in config");
        cfg.replacen(&header, &format!("{header}{key} = {value}\n"), 1)
    }
}

/// A TCP connection to the proxy from a given loopback source address.
async fn tcp_from(proxy: &Proxy, source: &str) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
    s.connect(proxy.addr).await
}

async fn tls_over(tcp: TcpStream, pki: &Pki) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let conn = tokio_rustls::TlsConnector::from(pki.client_config());
    conn.connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp).await
}

/// Sends raw request bytes over TLS from `source` and returns the whole response text.
async fn raw_request(proxy: &Proxy, pki: &Pki, source: &str, req: &[u8]) -> String {
    let mut s = tls_over(tcp_from(proxy, source).await.unwrap(), pki).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut out = Vec::new();
    // The proxy may close without close_notify: whatever arrived counts.
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

fn status_of(resp: &str) -> u16 {
    resp.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn header_of(resp: &str, name: &str) -> Option<String> {
    let head = resp.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

/// The value of one series of a metric on /metrics (0 when absent).
fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn handshakes(proxy: &Proxy, result: &str) -> f64 {
    metric(&proxy.metrics().await, "wsgate_handshakes_total", &format!("result=\"{result}\""))
}

fn rejections(proxy: &Proxy) -> Vec<serde_json::Value> {
    proxy
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "rejected")
        .collect()
}

/// Whether a rejection with this reason and status is logged within 3 s (the log is captured
/// by another thread).
async fn rejection_logged(proxy: &Proxy, reason: &str, status: u64) -> bool {
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        if rejections(proxy).iter().any(|r| r["reason"] == reason && r["status"] == status) {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn echo(ws: &mut Client, text: &str) {
    ws.send(Message::Text(text.into())).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(got, Message::Text(text.into()));
}

fn hs_token(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

// ---------------------------------------------------------------- rows before the rate row

#[tokio::test]
async fn headers_over_16_kib_get_431_and_just_under_pass() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));

    let big = format!("X-Padding: {}\r\n", "a".repeat(17 * 1024));
    let resp = raw_request(&proxy, &pki, "127.0.0.1", upgrade_request(&big).as_bytes()).await;
    assert_eq!(status_of(&resp), 431, "{resp}");

    // Many small headers adding up to more than 16 KiB count too.
    let many: String = (0..400).map(|i| format!("X-H{i}: {}\r\n", "b".repeat(40))).collect();
    let resp = raw_request(&proxy, &pki, "127.0.0.1", upgrade_request(&many).as_bytes()).await;
    assert_eq!(status_of(&resp), 431, "{resp}");

    let fits = format!("X-Padding: {}\r\n", "a".repeat(14 * 1024));
    let resp = raw_request(&proxy, &pki, "127.0.0.1", upgrade_request(&fits).as_bytes()).await;
    assert_eq!(status_of(&resp), 101, "{resp}");
    assert!(handshakes(&proxy, "headers_too_large").await >= 2.0);
}

/// Reads an HTTP request head from a raw backend connection.
async fn read_http_head(tcp: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut b).await.unwrap();
        assert!(n > 0, "closed before the end of the head");
        head.extend_from_slice(&b[..n]);
    }
    String::from_utf8_lossy(&head).to_string()
}

/// A raw backend for one connection: reads the request head, writes `reply(head)`, and hands
/// the head over byte for byte. Later connections find nobody listening.
async fn raw_backend_once(
    reply: impl FnOnce(&str) -> String + Send + 'static,
) -> (SocketAddr, tokio::sync::oneshot::Receiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (head_tx, head_rx) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        drop(listener);
        let head = read_http_head(&mut tcp).await;
        tcp.write_all(reply(&head).as_bytes()).await.unwrap();
        let _ = head_tx.send(head);
        let _ = tcp.read(&mut [0u8; 64]).await;
    });
    (addr, head_rx)
}

/// A backend's 101 to the upgrade request `head`, with `extra` header lines.
fn answer_101(head: &str, extra: &str) -> String {
    let key = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().starts_with("sec-websocket-key:").then(|| l[18..].trim().to_string()))
        .unwrap();
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{extra}\r\n",
        wsgate::upstream::accept_key(key.as_bytes())
    )
}

#[tokio::test]
async fn many_short_headers_under_16_kib_pass() {
    // A raw backend: tungstenite's parser stops at 124 headers, and the test needs the head
    // byte for byte.
    let (addr, head_rx) = raw_backend_once(|head| answer_101(head, "")).await;
    let pki = Pki::new();
    let proxy = Proxy::start(&pki, &config(addr, ""));
    // Only the size of the head counts: 300 short headers (about 3 KiB) pass.
    let short: String = (0..300).map(|i| format!("X-S{i}: v\r\n")).collect();
    let resp = raw_request(&proxy, &pki, "127.0.0.1", upgrade_request(&short).as_bytes()).await;
    assert_eq!(status_of(&resp), 101, "{resp}");
    // Legacy backends may match header names byte for byte: the proxy's own are capitalised.
    let head = tokio::time::timeout(Duration::from_secs(5), head_rx).await.unwrap().unwrap();
    for h in ["X-Forwarded-For: 127.0.0.1", "X-Forwarded-Proto: https", "X-Real-IP: 127.0.0.1", "X-S299: v"] {
        assert!(head.contains(&format!("\r\n{h}\r\n")), "{h} not in {head}");
    }
}

/// The backend's own headers on its 101 (a session cookie, say) reach the client, as behind
/// nginx; the handshake's own, hop-by-hop ones and `Server`/`Date` do not.
#[tokio::test]
async fn backend_101_headers_reach_the_client_except_the_handshake_s_own() {
    let extra = "Set-Cookie: chat_session=abc; Secure; HttpOnly\r\nX-Chat-Node: 7\r\nServer: legacy/1.0\r\n\
                 Date: Thu, 01 Jan 2026 00:00:00 GMT\r\nKeep-Alive: timeout=5\r\n\
                 Sec-WebSocket-Location: ws://10.0.0.5:8080/chat\r\nWebSocket-Origin: x\r\nX-Hop: 1\r\n\
                 Connection: X-Hop\r\n";
    let (addr, _head_rx) = raw_backend_once(move |head| answer_101(head, extra)).await;
    let pki = Pki::new();
    let proxy = Proxy::start(&pki, &config(addr, ""));
    let resp = raw_request(&proxy, &pki, "127.0.0.1", upgrade_request("").as_bytes()).await;
    assert_eq!(status_of(&resp), 101, "{resp}");
    assert_eq!(header_of(&resp, "set-cookie").as_deref(), Some("chat_session=abc; Secure; HttpOnly"), "{resp}");
    assert_eq!(header_of(&resp, "x-chat-node").as_deref(), Some("7"), "{resp}");
    for h in ["server", "date", "keep-alive", "sec-websocket-location", "websocket-origin", "x-hop"] {
        assert_eq!(header_of(&resp, h), None, "{h}: {resp}");
    }
    assert_eq!(resp.matches("Sec-WebSocket-Accept").count(), 1, "{resp}");
    assert_eq!(resp.to_ascii_lowercase().matches("\r\nupgrade:").count(), 1, "{resp}");
}

#[tokio::test]
async fn plain_http_passes_through_scrubbed_and_a_dead_backend_is_502() {
    let (addr, head_rx) =
        raw_backend_once(|_| "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".to_string()).await;
    let pki = Pki::new();
    let cfg = config(addr, "").replace("connect_timeout = \"1s\"", "connect_timeout = \"1s\"\nhttp = \"proxy\"");
    let proxy = Proxy::start(&pki, &cfg);
    let req = format!(
        "GET /page HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        token("page", 3600)
    );
    let resp = raw_request(&proxy, &pki, "127.0.0.1", req.as_bytes()).await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    assert!(resp.ends_with("ok"), "{resp}");
    let head = tokio::time::timeout(Duration::from_secs(5), head_rx).await.unwrap().unwrap();
    assert!(head.starts_with("GET /page HTTP/1.1\r\n"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("authorization"), "the token reached the backend: {head}");
    assert!(head.contains("\r\nX-Forwarded-For: 127.0.0.1\r\n"), "{head}");

    // The backend gone: 502, logged and counted.
    let resp = raw_request(&proxy, &pki, "127.0.0.1", req.as_bytes()).await;
    assert_eq!(status_of(&resp), 502, "{resp}");
    assert!(handshakes(&proxy, "backend_unreachable").await >= 1.0);
    assert!(rejection_logged(&proxy, "backend_unreachable", 502).await, "{}", proxy.log_text());
}

/// A backend answering one plain request per connection with `reply`.
async fn http_backend(reply: &'static [u8]) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = read_http_head(&mut tcp).await;
                let _ = tcp.write_all(reply).await;
                let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut [0u8; 64])).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn passthrough_keeps_alive_within_bounds_and_logs_what_hyper_refuses() {
    let addr = http_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let pki = Pki::new();
    let cfg = config(addr, "").replace("connect_timeout = \"1s\"", "connect_timeout = \"1s\"\nhttp = \"proxy\"");
    let proxy = Proxy::start(&pki, &cfg);
    async fn answer(s: &mut tokio_rustls::client::TlsStream<TcpStream>) -> String {
        let mut got = Vec::new();
        loop {
            let mut b = [0u8; 1024];
            match tokio::time::timeout(Duration::from_secs(6), s.read(&mut b)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&b[..n]),
                _ => break,
            }
            let text = String::from_utf8_lossy(&got);
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text[..end]
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().to_string()))
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if got.len() >= end + 4 + len {
                    break;
                }
            }
        }
        String::from_utf8_lossy(&got).to_string()
    }

    // 150 short headers are far under the 16 KiB head: passed as on the upgrade path, also
    // as a second request on the connection (hyper's own limit would be 100).
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let req = format!("GET /a HTTP/1.1\r\nHost: localhost\r\n{many}\r\n");
    let mut s = raw_tls(&proxy, &pki).await;
    s.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(status_of(&answer(&mut s).await), 200);
    s.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(status_of(&answer(&mut s).await), 200);

    // A head over 16 KiB as the next request: 431 from hyper, logged and counted like ours.
    let big = format!("GET /b HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n", "a".repeat(17 * 1024));
    s.write_all(big.as_bytes()).await.unwrap();
    assert_eq!(status_of(&answer(&mut s).await), 431);
    assert!(rejection_logged(&proxy, "headers_too_large", 431).await, "{}", proxy.log_text());
    assert!(handshakes(&proxy, "headers_too_large").await >= 1.0);

    // A kept-alive connection whose next head never completes is closed by handshake_timeout
    // (3 s here), not held open for ever.
    let mut s = raw_tls(&proxy, &pki).await;
    s.write_all(b"GET /c HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    assert_eq!(status_of(&answer(&mut s).await), 200);
    s.write_all(b"GET /d HTTP/1.1\r\nHost: loc").await.unwrap();
    let started = Instant::now();
    let mut b = [0u8; 256];
    let end = tokio::time::timeout(Duration::from_secs(8), s.read(&mut b)).await;
    assert!(matches!(end, Ok(Ok(0)) | Ok(Err(_))), "still open after {:?}", started.elapsed());
    assert!(started.elapsed() >= Duration::from_secs(2), "closed too early: {:?}", started.elapsed());
}

/// A backend that answers a plain request with 101 is broken: the client gets a 502, not a
/// switch to a raw byte relay that no Origin or token check ever admitted.
#[tokio::test]
async fn passthrough_answers_a_backend_101_to_a_plain_request_with_502() {
    let addr = http_backend(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nraw bytes from the backend",
    )
    .await;
    let pki = Pki::new();
    let cfg = config(addr, "").replace("connect_timeout = \"1s\"", "connect_timeout = \"1s\"\nhttp = \"proxy\"");
    let proxy = Proxy::start(&pki, &cfg);
    let mut s = raw_tls(&proxy, &pki).await;
    s.write_all(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut b = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await.unwrap().unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&b[..n]);
    }
    let resp = String::from_utf8_lossy(&got).to_string();
    assert_eq!(status_of(&resp), 502, "{resp}");
    assert!(rejection_logged(&proxy, "backend_unreachable", 502).await, "{}", proxy.log_text());
}

#[tokio::test]
async fn passthrough_ignores_other_upgrades_and_refuses_a_websocket_upgrade_after_a_request() {
    // A backend answering one plain request per connection; it reports each head it read.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (heads_tx, mut heads) = tokio::sync::mpsc::channel::<String>(8);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let heads_tx = heads_tx.clone();
            tokio::spawn(async move {
                let head = read_http_head(&mut tcp).await;
                let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
                let _ = heads_tx.send(head).await;
                let _ = tcp.read(&mut [0u8; 64]).await;
            });
        }
    });
    let pki = Pki::new();
    let cfg = config(addr, "").replace("connect_timeout = \"1s\"", "connect_timeout = \"1s\"\nhttp = \"proxy\"");
    let proxy = Proxy::start(&pki, &cfg);

    // An h2c offer is not a WebSocket upgrade: passed through as plain HTTP, offer removed.
    let h2c = "GET /h2 HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
               HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n";
    let mut s = raw_tls(&proxy, &pki).await;
    s.write_all(h2c.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"ok") {
        let mut b = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await.unwrap().unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&b[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    let head = tokio::time::timeout(Duration::from_secs(5), heads.recv()).await.unwrap().unwrap();
    assert!(head.starts_with("GET /h2 HTTP/1.1\r\n"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("upgrade"), "the offer reached the backend: {head}");
    assert!(!head.to_ascii_lowercase().contains("http2-settings"), "a hop-by-hop header reached the backend: {head}");

    // A WebSocket upgrade as the next request on that connection: refused, logged, counted,
    // and the connection closed so the client retries on a fresh one.
    s.write_all(upgrade_request("").as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    let read_all = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut resp)).await.unwrap();
    let resp = String::from_utf8_lossy(&resp).to_string();
    assert!(read_all.is_ok() || !resp.is_empty(), "{read_all:?}");
    assert_eq!(status_of(&resp), 400, "{resp}");
    assert_eq!(header_of(&resp, "connection").as_deref(), Some("close"), "{resp}");
    assert!(rejection_logged(&proxy, "bad_request", 400).await, "{}", proxy.log_text());
    assert!(handshakes(&proxy, "bad_request").await >= 1.0);
    assert!(heads.try_recv().is_err(), "the upgrade reached the backend");
}

#[tokio::test]
async fn client_ca_requires_a_client_certificate_from_that_ca() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let ca = pki.dir.path().join("ca.pem");
    let cfg = config(backend.addr, "").replace("[backend]", &format!("client_ca = \"{}\"\n[backend]", ca.display()));
    let proxy = Proxy::start(&pki, &cfg);

    // With a certificate from the CA: upgraded.
    let mut s = tls_connect(&proxy, pki.client_config_with_cert(), "localhost").await.unwrap();
    assert_eq!(send_upgrade(&mut s).await.as_deref(), Ok(&b"HTTP/1.1 101"[..]));

    // Without one: refused in the TLS handshake with the alert that says why, logged and
    // counted as tls_failed. (TLS 1.3: the client's side of the handshake completes first.)
    let mut s = tls_connect(&proxy, pki.client_config(), "localhost").await.expect("client side of the handshake");
    let refused = send_upgrade(&mut s).await;
    assert!(refused.as_ref().is_err_and(|e| e.contains("CertificateRequired")), "no alert, but: {refused:?}");
    assert!(handshakes(&proxy, "tls_failed").await >= 1.0);
    assert!(rejection_logged(&proxy, "tls_failed", 0).await, "{}", proxy.log_text());
}

#[tokio::test]
async fn tls13_tickets_resume_the_next_session_and_a_client_with_nagle_on_is_not_kept_waiting() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    // One client config for all connections: its session store keeps the tickets.
    let cc = pki.client_config();

    // The client's sockets leave Nagle's algorithm on (tokio's default, and most stacks'):
    // its upgrade request waits until the proxy has ACKed the client's `Finished`. A proxy
    // that sent nothing after the handshake would leave that ACK to the 40 ms delayed-ACK
    // timer on every connection. The fastest of several tries is far below that.
    let mut fastest = Duration::MAX;
    for i in 0..5 {
        let mut s = tls_connect(&proxy, cc.clone(), "localhost").await.unwrap();
        // The first connection is a full handshake; each later one resumes with the ticket
        // the one before it got, and brings a fresh ticket for the next.
        let kind = if i == 0 { rustls::HandshakeKind::Full } else { rustls::HandshakeKind::Resumed };
        assert_eq!(s.get_ref().1.handshake_kind(), Some(kind), "connection {i}");
        if i == 0 {
            // The handshake is over for the client, yet no data follows it: the ticket waits
            // for the response instead of costing a packet of its own (the ACK carries none).
            let mut b = [0u8; 1];
            let early = tokio::time::timeout(Duration::from_millis(300), s.get_ref().0.peek(&mut b)).await;
            assert!(early.is_err(), "the proxy wrote before the request");
        }
        let started = std::time::Instant::now();
        assert_eq!(send_upgrade(&mut s).await.as_deref(), Ok(&b"HTTP/1.1 101"[..]));
        fastest = fastest.min(started.elapsed());
    }
    assert!(fastest < Duration::from_millis(20), "every upgrade waited for a delayed ACK: {fastest:?}");
}

#[tokio::test]
async fn tls12_and_hello_retry_handshakes_reach_the_101() {
    use rustls::crypto::aws_lc_rs::{default_provider, kx_group};
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    let roots = || {
        let mut r = rustls::RootCertStore::empty();
        use rustls_pki_types::pem::PemObject;
        r.add(rustls_pki_types::CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap()).unwrap();
        r
    };
    let tls12 = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots())
        .with_no_client_auth();
    // A first key share for a group the proxy does not offer (pure ML-KEM): it asks again.
    let provider =
        rustls::crypto::CryptoProvider { kx_groups: vec![kx_group::MLKEM768, kx_group::X25519], ..default_provider() };
    let retry = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots())
        .with_no_client_auth();
    for (cc, kind) in [(tls12, rustls::HandshakeKind::Full), (retry, rustls::HandshakeKind::FullWithHelloRetryRequest)]
    {
        let mut s = tls_connect(&proxy, std::sync::Arc::new(cc), "localhost").await.unwrap();
        assert_eq!(s.get_ref().1.handshake_kind(), Some(kind));
        assert_eq!(send_upgrade(&mut s).await.as_deref(), Ok(&b"HTTP/1.1 101"[..]), "{kind:?}");
    }
}

#[tokio::test]
async fn sni_picks_exact_and_wildcard_certificates_and_falls_back_to_the_default() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let (chat_c, chat_k) = pki.issue_for("chat", &["chat.example.com"]);
    let (wild_c, wild_k) = pki.issue_for("wild", &["*.example.org"]);
    let sni = format!(
        "[[tls.sni]]\nserver_names = [\"chat.example.com\"]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[tls.sni]]\nserver_names = [\"*.example.org\"]\ncert = \"{}\"\nkey = \"{}\"\n[backend]",
        chat_c.display(),
        chat_k.display(),
        wild_c.display(),
        wild_k.display()
    );
    let proxy = Proxy::start(&pki, &config(backend.addr, "").replace("[backend]", &sni));
    // The client verifies the certificate against the name it sent: a handshake that
    // succeeds saw a certificate for that name.
    let handshake = |name: &'static str| {
        let (proxy, cc) = (&proxy, pki.client_config());
        async move { tls_connect(proxy, cc, name).await.is_ok() }
    };
    assert!(handshake("chat.example.com").await, "exact SNI name");
    assert!(handshake("CHAT.example.com").await, "SNI is case-insensitive");
    assert!(handshake("a.example.org").await, "wildcard");
    assert!(handshake("localhost").await, "a name no SNI entry has: the [tls] certificate");
}

#[tokio::test]
async fn plain_request_gets_426_and_malformed_upgrades_get_400() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));

    let resp = raw_request(&proxy, &pki, "127.0.0.1", b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(status_of(&resp), 426, "{resp}");
    assert_eq!(header_of(&resp, "upgrade").as_deref(), Some("websocket"), "{resp}");

    let good = upgrade_request("");
    let bad = [
        good.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
        good.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Key: short"),
        good.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
        // Each at most once in a request (RFC 6455 §11.3.1, §11.3.5).
        good.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Version: 12"),
        good.replace(
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==",
        ),
        good.replace("Connection: Upgrade", "Connection: keep-alive"),
        good.replacen("GET ", "POST ", 1),
        good.replace("HTTP/1.1", "HTTP/1.0"),
        // An upgrade has no body: a length or a chunked coding is refused (no smuggling).
        good.replace("Upgrade: websocket\r\n", "Upgrade: websocket\r\nContent-Length: 5\r\n") + "hello",
        good.replace("Upgrade: websocket\r\n", "Upgrade: websocket\r\nTransfer-Encoding: chunked\r\n") + "0\r\n\r\n",
    ];
    for req in &bad {
        let resp = raw_request(&proxy, &pki, "127.0.0.1", req.as_bytes()).await;
        assert_eq!(status_of(&resp), 400, "{req}\n=> {resp}");
        // RFC 6455 §4.4: the refusal names the version the proxy speaks.
        assert_eq!(header_of(&resp, "sec-websocket-version").as_deref(), Some("13"), "{resp}");
    }
    // Garbage that is not HTTP at all; HTTP/1.1 without exactly one Host (RFC 9112 §3.2); a
    // target that names no resource.
    let not_http = [
        "\x01\x02 nonsense\r\n\r\n".to_string(),
        good.replace("Host: localhost\r\n", ""),
        good.replace("Host: localhost\r\n", "Host: localhost\r\nHost: evil.example.net\r\n"),
        good.replacen("GET /chat ", "GET * ", 1),
        good.replacen("GET /chat ", "GET localhost:443 ", 1),
    ];
    for req in &not_http {
        let resp = raw_request(&proxy, &pki, "127.0.0.1", req.as_bytes()).await;
        assert_eq!(status_of(&resp), 400, "{req:?}\n=> {resp}");
    }
    assert!(handshakes(&proxy, "not_websocket").await >= 1.0);
    assert!(handshakes(&proxy, "bad_request").await >= (bad.len() + not_http.len()) as f64);
    assert!(backend_saw_nothing(backend).await);
}

async fn backend_saw_nothing(mut backend: Backend) -> bool {
    tokio::time::timeout(Duration::from_millis(300), backend.sessions.recv()).await.is_err()
}

// ---------------------------------------------------------------- handshake rate

#[tokio::test]
async fn handshake_rate_is_per_ip_and_answers_429_with_retry_after() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let mut cfg = config(backend.addr, "");
    cfg = set(&cfg, "limits", "handshakes_per_second_per_ip", "1");
    cfg = set(&cfg, "limits", "handshake_burst_per_ip", "3");
    let proxy = Proxy::start(&pki, &cfg);

    // 426 and 400 answer before the rate row and cost nothing.
    for _ in 0..5 {
        let resp = raw_request(&proxy, &pki, "127.0.0.2", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(status_of(&resp), 426);
    }
    // Every upgrade attempt counts, good or bad: two bad tokens and one good use the burst.
    let bad = connect(&proxy, &pki).header("Authorization", "Bearer not.a.token").from("127.0.0.2");
    assert_eq!(bad.go().await.unwrap_err().status(), 401);
    let missing = connect(&proxy, &pki).without("Authorization").from("127.0.0.2");
    assert_eq!(missing.go().await.unwrap_err().status(), 401);
    let (ws, _) = connect(&proxy, &pki).from("127.0.0.2").go().await.unwrap();
    drop(ws);
    // The fourth is over the bucket: 429 with Retry-After, even with a valid token, and even
    // with a bad Origin (the rate row comes first).
    let e = connect(&proxy, &pki).from("127.0.0.2").go().await.unwrap_err();
    assert_eq!(e.status(), 429);
    let retry: u64 = e.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let e = connect(&proxy, &pki).header("Origin", "https://evil.example.net").from("127.0.0.2").go().await;
    assert_eq!(e.unwrap_err().status(), 429);

    // Other addresses have buckets of their own.
    for src in ["127.0.0.3", "127.0.0.4"] {
        let (mut ws, _) = connect(&proxy, &pki).from(src).go().await.unwrap();
        echo(&mut ws, src).await;
    }
    // The bucket refills at the configured rate.
    tokio::time::sleep(Duration::from_millis(1100 * retry)).await;
    connect(&proxy, &pki).from("127.0.0.2").go().await.expect("refilled");
    assert!(handshakes(&proxy, "rate_limited").await >= 2.0);
}

// ---------------------------------------------------------------- origin

#[tokio::test]
async fn origin_allowlist_exact_wildcard_null_and_missing() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    // Allowed: https://chat.example.com and https://*.example.org.
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    let allowed = [
        "https://chat.example.com",
        "HTTPS://CHAT.Example.COM",
        "https://chat.example.com:443",
        "https://a.example.org",
        "https://A-B.Example.Org:443",
    ];
    for o in allowed {
        let r = connect(&proxy, &pki).header("Origin", o).go().await;
        assert!(r.is_ok(), "{o} should be allowed: {r:?}");
    }
    let denied = [
        "https://example.org",
        "https://a.b.example.org",
        "https://example.org.evil.com",
        "https://evilexample.org",
        "https://a.example.org.evil.com",
        "http://chat.example.com",
        "https://chat.example.com:8443",
        "https://chat.example.com.evil.com",
        "https://a.example.org:8443",
        "http://a.example.org",
        "null",
        "",
        "chat.example.com",
    ];
    for o in denied {
        let e = connect(&proxy, &pki).header("Origin", o).go().await.unwrap_err();
        assert_eq!(e.status(), 403, "{o:?}");
    }
    let e = connect(&proxy, &pki).without("Origin").go().await.unwrap_err();
    assert_eq!(e.status(), 403, "missing Origin");
    // A second Origin header must pass too, whichever comes first.
    let evil_first = upgrade_request("").replace(
        &format!("Origin: {ORIGIN}\r\n"),
        &format!("Origin: https://evil.example.net\r\nOrigin: {ORIGIN}\r\n"),
    );
    let two =
        [upgrade_request("Origin: https://evil.example.net\r\n"), upgrade_request("Origin: null\r\n"), evil_first];
    for req in &two {
        let resp = raw_request(&proxy, &pki, "127.0.0.1", req.as_bytes()).await;
        assert_eq!(status_of(&resp), 403, "{req}\n=> {resp}");
    }
    assert!(handshakes(&proxy, "origin_denied").await >= (denied.len() + 1 + two.len()) as f64);
    // Two allowed ones are admitted.
    let mut s = raw_tls(&proxy, &pki).await;
    s.write_all(upgrade_request("Origin: https://a.example.org\r\n").as_bytes()).await.unwrap();
    let mut got = [0u8; 12];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"HTTP/1.1 101");
    drop(s);

    // allow_missing lets clients without Origin in; it does not open the list.
    let cfg = set(&config(backend.addr, ""), "origin", "allow_missing", "true");
    let proxy = Proxy::start(&pki, &cfg);
    connect(&proxy, &pki).without("Origin").go().await.expect("no Origin with allow_missing");
    for o in ["null", "https://evil.example.net", "https://example.org"] {
        let e = connect(&proxy, &pki).header("Origin", o).go().await.unwrap_err();
        assert_eq!(e.status(), 403, "{o:?} with allow_missing");
    }
    // Origin is checked before the token: a bad Origin with no token is 403, not 401.
    let e = connect(&proxy, &pki).header("Origin", "null").without("Authorization").go().await.unwrap_err();
    assert_eq!(e.status(), 403);
}

// ---------------------------------------------------------------- 401

#[tokio::test]
async fn missing_token_is_bearer_and_invalid_token_is_invalid_token() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));

    let missing = [
        connect(&proxy, &pki).without("Authorization"),
        connect(&proxy, &pki).header("Authorization", "Basic dXNlcjpwYXNz"),
        connect(&proxy, &pki).header("Authorization", "Bearer"),
        connect(&proxy, &pki).header("Authorization", "Bearer    "),
        connect(&proxy, &pki).without("Authorization").path("/chat?access_token="),
        connect(&proxy, &pki).without("Authorization").header("Cookie", "access_token=; theme=dark"),
        connect(&proxy, &pki).without("Authorization").header("Sec-WebSocket-Protocol", "chat, access_token"),
    ];
    for (i, c) in missing.into_iter().enumerate() {
        let e = c.go().await.unwrap_err();
        assert_eq!(e.status(), 401, "case {i}");
        assert_eq!(e.header("www-authenticate").as_deref(), Some("Bearer"), "case {i}");
    }
    for bad in ["garbage", "a.b.c", &format!("{}x", token("alice", 600))] {
        let e = connect(&proxy, &pki).header("Authorization", &format!("Bearer {bad}")).go().await.unwrap_err();
        assert_eq!(e.status(), 401, "{bad}");
        assert_eq!(e.header("www-authenticate").as_deref(), Some("Bearer error=\"invalid_token\""), "{bad}");
    }
    assert!(handshakes(&proxy, "token_missing").await >= 7.0);
    assert!(handshakes(&proxy, "token_invalid").await >= 3.0);
    // The log line says why, in a fixed word (an operator wiring up an IdP needs it).
    let expired = token("alice", -600);
    let e = connect(&proxy, &pki).header("Authorization", &format!("Bearer {expired}")).go().await.unwrap_err();
    assert_eq!(e.status(), 401);
    let mut details = Vec::new();
    for _ in 0..150 {
        details = rejections(&proxy).iter().filter_map(|r| r["detail"].as_str().map(str::to_string)).collect();
        if details.iter().any(|d| d == "expired") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(details.iter().any(|d| d == "expired") && details.iter().any(|d| d == "signature"), "{details:?}");
    assert!(!proxy.log_text().contains(&expired));
    assert!(backend_saw_nothing(backend).await);
}

#[tokio::test]
async fn a_signed_exp_beyond_any_clock_is_a_session_that_never_expires() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    for exp in [u64::MAX, 1_000_000_000_000_000] {
        let t = hs_token(serde_json::json!({"sub": "far", "exp": exp}));
        let r = connect(&proxy, &pki).header("Authorization", &format!("Bearer {t}")).go().await;
        let (mut ws, _) = r.unwrap_or_else(|e| panic!("exp {exp}: {}", e.status()));
        echo(&mut ws, &format!("exp {exp}")).await;
        ws.close(None).await.unwrap();
    }
    // Not an integer the token library reads: a clear 401, not a dropped connection.
    let t = hs_token(serde_json::json!({"sub": "far", "exp": 1e300}));
    let e = connect(&proxy, &pki).header("Authorization", &format!("Bearer {t}")).go().await.unwrap_err();
    assert_eq!(e.status(), 401);
    // The proxy is still there and answering.
    let (mut ws, _) = connect(&proxy, &pki).go().await.unwrap();
    echo(&mut ws, "still up").await;
}

// ---------------------------------------------------------------- caps

#[tokio::test]
async fn per_ip_session_cap_is_429_per_address_and_released_on_close() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let cfg = set(&config(backend.addr, ""), "limits", "max_connections_per_ip", "2");
    let proxy = Proxy::start(&pki, &cfg);

    let (mut a1, _) = connect(&proxy, &pki).from("127.0.0.5").go().await.unwrap();
    let (a2, _) = connect(&proxy, &pki).from("127.0.0.5").go().await.unwrap();
    let e = connect(&proxy, &pki).from("127.0.0.5").go().await.unwrap_err();
    assert_eq!(e.status(), 429);
    assert_eq!(e.header("retry-after"), None, "the session cap is not the rate row");
    // A different address is not affected.
    let (b1, _) = connect(&proxy, &pki).from("127.0.0.6").go().await.unwrap();
    let (b2, _) = connect(&proxy, &pki).from("127.0.0.6").go().await.unwrap();

    // Closing a session (cleanly) gives its slot back; so does a client that just vanishes.
    a1.send(close_frame(1000, "")).await.unwrap();
    expect_close(&mut a1, Duration::from_secs(5)).await;
    let (a3, _) = retry_connect(&proxy, &pki, "127.0.0.5").await;
    drop(a2);
    drop(a3);
    let (_a4, _) = retry_connect(&proxy, &pki, "127.0.0.5").await;
    let (_a5, _) = retry_connect(&proxy, &pki, "127.0.0.5").await;
    drop((b1, b2));
    assert!(handshakes(&proxy, "ip_cap").await >= 1.0);
}

/// Connects from `src`, retrying while the answer is a cap (slots are released when the proxy
/// notices the close).
async fn retry_connect(
    proxy: &Proxy,
    pki: &Pki,
    src: &str,
) -> (Client, tokio_tungstenite::tungstenite::http::Response<Option<Vec<u8>>>) {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match connect(proxy, pki).from(src).go().await {
            Ok(x) => return x,
            Err(e) if Instant::now() < end && matches!(e.status(), 429 | 503) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{src}: {e:?}"),
        }
    }
}

#[tokio::test]
async fn global_cap_is_503_and_released_on_close() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let cfg = set(&config(backend.addr, ""), "server", "max_connections", "2");
    let proxy = Proxy::start(&pki, &cfg);

    let (a, _) = connect(&proxy, &pki).from("127.0.0.7").go().await.unwrap();
    let (_b, _) = connect(&proxy, &pki).from("127.0.0.8").go().await.unwrap();
    let e = connect(&proxy, &pki).from("127.0.0.9").go().await.unwrap_err();
    assert_eq!(e.status(), 503);
    // The token is checked before the caps: a bad token at the cap is still a 401.
    let e = connect(&proxy, &pki).header("Authorization", "Bearer x.y.z").from("127.0.0.9").go().await.unwrap_err();
    assert_eq!(e.status(), 401);
    drop(a);
    let (mut c, _) = retry_connect(&proxy, &pki, "127.0.0.9").await;
    echo(&mut c, "in").await;
    assert!(handshakes(&proxy, "global_cap").await >= 1.0);
}

// ---------------------------------------------------------------- token sources

#[tokio::test]
async fn token_sources_are_scrubbed_from_what_the_backend_sees() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    let t = token("alice", 600);

    // Authorization: Bearer — removed.
    let (mut ws, _) = connect(&proxy, &pki).path("/chat?room=1").go().await.unwrap();
    echo(&mut ws, "h").await;
    drop(ws);
    let seen = backend.next_session().await;
    assert_eq!(seen.path, "/chat?room=1");
    assert_eq!(seen.header("authorization"), None);
    assert_eq!(seen.header("x-auth-user").as_deref(), Some("alice"));

    // Query parameter — removed from the path, other parameters kept in order.
    let (mut ws, _) = connect(&proxy, &pki)
        .without("Authorization")
        .path(&format!("/chat?room=1&access_token={t}&lang=en"))
        .go()
        .await
        .unwrap();
    echo(&mut ws, "q").await;
    drop(ws);
    let seen = backend.next_session().await;
    assert_eq!(seen.path, "/chat?room=1&lang=en");
    assert!(!format!("{seen:?}").contains(&t));

    // Cookie — the token cookie removed, the others pass.
    let (mut ws, _) = connect(&proxy, &pki)
        .without("Authorization")
        .header("Cookie", &format!("theme=dark; access_token={t}; lang=en"))
        .go()
        .await
        .unwrap();
    echo(&mut ws, "c").await;
    drop(ws);
    let seen = backend.next_session().await;
    assert_eq!(seen.header_all("cookie").join("; "), "theme=dark; lang=en");
    assert!(!format!("{seen:?}").contains(&t));

    // A Basic Authorization next to a token from another source passes untouched.
    let (ws, _) = connect(&proxy, &pki)
        .header("Authorization", "Basic dXNlcjpwYXNz")
        .path(&format!("/chat?access_token={t}"))
        .go()
        .await
        .unwrap();
    drop(ws);
    let seen = backend.next_session().await;
    assert_eq!(seen.path, "/chat");
    assert_eq!(seen.header("authorization").as_deref(), Some("Basic dXNlcjpwYXNz"));
}

#[tokio::test]
async fn the_admitted_token_never_reaches_the_backend_from_a_carrier_not_configured() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let cfg = set(&config(backend.addr, ""), "auth", "sources", "[\"header\"]");
    let proxy = Proxy::start(&pki, &cfg);
    let t = token("alice", 600);
    // The token is read from the header only; the client put it in the query, a cookie and
    // the subprotocols as well (a library that sends it everywhere).
    let (ws, _) = connect(&proxy, &pki)
        .header("Authorization", &format!("Bearer {t}"))
        .path(&format!("/chat?room=1&token={t}"))
        .header("Cookie", &format!("session={t}; lang=en"))
        .header("Sec-WebSocket-Protocol", &format!("access_token, {t}"))
        .go()
        .await
        .unwrap();
    drop(ws);
    let seen = backend.next_session().await;
    assert_eq!(seen.path, "/chat?room=1");
    assert_eq!(seen.header_all("cookie").join("; "), "lang=en");
    assert!(!format!("{seen:?}").contains(&t), "{seen:?}");
}

#[tokio::test]
async fn subprotocol_pair_anywhere_in_the_list() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    let t = token("bob", 600);
    let proto = |list: &str| connect(&proxy, &pki).without("Authorization").header("Sec-WebSocket-Protocol", list);
    let chosen = |r: &tokio_tungstenite::tungstenite::http::Response<Option<Vec<u8>>>| {
        r.headers().get("sec-websocket-protocol").map(|v| v.to_str().unwrap().to_string())
    };

    // Backend picks one of the rest: the client gets the backend's choice.
    *backend.protocol.lock().unwrap() = Some("chat".into());
    for list in
        [format!("access_token, {t}, chat"), format!("chat, access_token, {t}"), format!("v2, access_token, {t}, chat")]
    {
        let (mut ws, resp) = proto(&list).go().await.unwrap();
        assert_eq!(chosen(&resp).as_deref(), Some("chat"), "{list}");
        echo(&mut ws, "p").await;
        drop(ws);
        let seen = backend.next_session().await;
        let offered = seen.header_all("sec-websocket-protocol").join(", ");
        assert!(!offered.contains(&t) && !offered.contains("access_token"), "{offered}");
        assert!(offered.contains("chat"), "{offered}");
        assert_eq!(seen.header("x-auth-user").as_deref(), Some("bob"));
    }

    // Nothing else offered: the backend is offered nothing, the client gets access_token.
    *backend.protocol.lock().unwrap() = None;
    let (mut ws, resp) = proto(&format!("access_token, {t}")).go().await.unwrap();
    assert_eq!(chosen(&resp).as_deref(), Some("access_token"));
    echo(&mut ws, "only").await;
    drop(ws);
    let seen = backend.next_session().await;
    assert_eq!(seen.header("sec-websocket-protocol"), None);

    // Backend picks none of the remaining ones: access_token too.
    let (_ws, resp) = proto(&format!("chat, access_token, {t}")).go().await.unwrap();
    assert_eq!(chosen(&resp).as_deref(), Some("access_token"));

    // A bad token in the pair is invalid, a lone `access_token` is missing.
    let e = proto("chat, access_token, x.y.z").go().await.unwrap_err();
    assert_eq!(e.header("www-authenticate").as_deref(), Some("Bearer error=\"invalid_token\""));
    // Names are compared exactly (lower case).
    let e = proto(&format!("Access_Token, {t}")).go().await.unwrap_err();
    assert_eq!((e.status(), e.header("www-authenticate").as_deref()), (401, Some("Bearer")));
}

// ---------------------------------------------------------------- forwarded headers

#[tokio::test]
async fn claims_and_forwarding_headers_replace_client_copies() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    fn spoof(c: Connect<'_>) -> Connect<'_> {
        c.header("X-Auth-User", "mallory")
            .header("X-Forwarded-For", "6.6.6.6")
            .header("X-Real-IP", "6.6.6.6")
            .header("X-Forwarded-Proto", "http")
            .header("Forwarded", "for=6.6.6.6;proto=http")
            .header("X-Forwarded-Host", "evil.example.net")
            .header("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")
            // CGI-style backends read `_` as `-`: these would spoof the same variables.
            .header("X_Auth_User", "mallory")
            .header("X_Forwarded_For", "6.6.6.6")
            .header("x_real-ip", "6.6.6.6")
            .header("X_Custom", "kept")
            .from("127.0.0.11")
    }

    let (ws, _) = spoof(connect(&proxy, &pki)).go().await.unwrap();
    drop(ws);
    let seen = backend.next_session().await;
    assert_eq!(seen.header_all("x-auth-user"), vec!["alice"]);
    assert_eq!(seen.header_all("x-forwarded-for"), vec!["127.0.0.11"]);
    assert_eq!(seen.header_all("x-real-ip"), vec!["127.0.0.11"]);
    assert_eq!(seen.header_all("x-forwarded-proto"), vec!["https"]);
    assert_eq!(seen.header("forwarded"), None);
    assert_eq!(seen.header("x-forwarded-host"), None);
    assert_eq!(seen.header("sec-websocket-extensions"), None, "no permessage-deflate through the proxy");
    for n in ["x_auth_user", "x_forwarded_for", "x_real-ip"] {
        assert_eq!(seen.header(n), None, "{n} passed");
    }
    assert_eq!(seen.header("x_custom").as_deref(), Some("kept"));

    // A token without `sub`: admitted, no X-Auth-User at all (the client's copy removed).
    let now = now_unix();
    let nosub = hs_token(serde_json::json!({"iat": now, "exp": now + 600}));
    let (ws, _) = spoof(connect(&proxy, &pki)).header("Authorization", &format!("Bearer {nosub}")).go().await.unwrap();
    drop(ws);
    let seen = backend.next_session().await;
    assert_eq!(seen.header_all("x-auth-user"), Vec::<String>::new());
    assert_eq!(seen.header_all("x-forwarded-for"), vec!["127.0.0.11"]);

    // A claim that cannot be a header value (CR LF) is not forwarded, and injects nothing.
    let evil = hs_token(serde_json::json!({"sub": "eve\r\nX-Injected: 1", "iat": now, "exp": now + 600}));
    let (ws, _) = spoof(connect(&proxy, &pki)).header("Authorization", &format!("Bearer {evil}")).go().await.unwrap();
    drop(ws);
    let seen = backend.next_session().await;
    assert_eq!(seen.header_all("x-auth-user"), Vec::<String>::new());
    assert_eq!(seen.header("x-injected"), None);
}

// ---------------------------------------------------------------- trusted proxies

#[tokio::test]
async fn trusted_proxy_header_is_read_right_to_left_and_ignored_from_others() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let cfg = config(backend.addr, "[trusted_proxies]\ncidrs = [\"127.0.0.12/32\", \"10.0.0.0/8\"]\n");
    let cfg = set(&cfg, "limits", "max_connections_per_ip", "1");
    let proxy = Proxy::start(&pki, &cfg);

    fn xff<'a>(c: Connect<'a>, v: &str) -> Connect<'a> {
        c.header("X-Forwarded-For", v)
    }
    // Trusted peer: the right-most untrusted entry; the client's prepended entries ignored.
    let (s1, _) = xff(connect(&proxy, &pki), "9.9.9.9, 203.0.113.5, 10.1.2.3").from("127.0.0.12").go().await.unwrap();
    // Limits key on that client IP: a second session for 203.0.113.5 is over its cap, another
    // client behind the same balancer is not.
    let e = xff(connect(&proxy, &pki), "203.0.113.5").from("127.0.0.12").go().await.unwrap_err();
    assert_eq!(e.status(), 429);
    let (s2, _) = xff(connect(&proxy, &pki), "203.0.113.6:5555").from("127.0.0.12").go().await.unwrap();
    drop(s1);
    assert_eq!(backend.next_session().await.header_all("x-forwarded-for"), vec!["203.0.113.5"]);
    drop(s2);
    let seen = backend.next_session().await;
    assert_eq!(seen.header_all("x-forwarded-for"), vec!["203.0.113.6"]);
    assert_eq!(seen.header_all("x-real-ip"), vec!["203.0.113.6"]);

    // Untrusted peer: its header is ignored, the peer is the client.
    let (s3, _) = xff(connect(&proxy, &pki), "203.0.113.5").from("127.0.0.13").go().await.unwrap();
    drop(s3);
    assert_eq!(backend.next_session().await.header_all("x-forwarded-for"), vec!["127.0.0.13"]);
    // Only trusted hops: the left-most of them. An entry that does not parse before an
    // untrusted one is found: the peer itself.
    let (s4, _) = xff(connect(&proxy, &pki), "10.8.8.8, 10.9.9.9").from("127.0.0.12").go().await.unwrap();
    drop(s4);
    assert_eq!(backend.next_session().await.header_all("x-forwarded-for"), vec!["10.8.8.8"]);
    let (s4, _) = xff(connect(&proxy, &pki), "203.0.113.8, garbage, 10.9.9.9").from("127.0.0.12").go().await.unwrap();
    drop(s4);
    assert_eq!(backend.next_session().await.header_all("x-forwarded-for"), vec!["127.0.0.12"]);
    let (s5, _) = xff(connect(&proxy, &pki), "203.0.113.7, garbage").from("127.0.0.12").go().await.unwrap();
    drop(s5);
    assert_eq!(backend.next_session().await.header_all("x-forwarded-for"), vec!["127.0.0.12"]);
}

#[tokio::test]
async fn a_custom_client_address_header_is_read_from_trusted_peers_and_never_forwarded() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let cfg = config(backend.addr, "[trusted_proxies]\ncidrs = [\"127.0.0.12/32\"]\nheader = \"x-client-ip\"\n");
    let proxy = Proxy::start(&pki, &cfg);
    // From the trusted balancer: its header names the client, and is replaced by the
    // proxy's own X-Forwarded-For.
    let (s, _) = connect(&proxy, &pki).header("X-Client-IP", "203.0.113.9").from("127.0.0.12").go().await.unwrap();
    drop(s);
    let seen = backend.next_session().await;
    assert_eq!(seen.header_all("x-forwarded-for"), vec!["203.0.113.9"]);
    assert!(seen.header_all("x-client-ip").is_empty(), "the balancer's header reached the backend");
    // Forged by a direct client: ignored, and not passed on for the backend to believe.
    let (s, _) = connect(&proxy, &pki).header("X-Client-IP", "198.51.100.1").from("127.0.0.13").go().await.unwrap();
    drop(s);
    let seen = backend.next_session().await;
    assert_eq!(seen.header_all("x-forwarded-for"), vec!["127.0.0.13"]);
    assert!(seen.header_all("x-client-ip").is_empty(), "a forged client address reached the backend");
}

/// Opens a WebSocket over `tcp` after `prefix` bytes (a PROXY header) were written raw.
async fn ws_after_prefix(proxy: &Proxy, pki: &Pki, mut tcp: TcpStream, prefix: &[u8]) -> Result<Client, String> {
    tcp.write_all(prefix).await.map_err(|e| e.to_string())?;
    let mut req = proxy.url("/chat").into_client_request().unwrap();
    req.headers_mut().insert("origin", ORIGIN.parse().unwrap());
    req.headers_mut().insert("authorization", format!("Bearer {}", token("pp", 600)).parse().unwrap());
    let connector = tokio_tungstenite::Connector::Rustls(pki.client_config());
    let fut = tokio_tungstenite::client_async_tls_with_config(req, tcp, None, Some(connector));
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timeout".into()),
    }
}

fn proxy_v2(src: [u8; 4], sport: u16, local: bool) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    if local {
        h.extend_from_slice(&[0x20, 0x00, 0, 0]);
        return h;
    }
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&443u16.to_be_bytes());
    h
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_from_a_trusted_peer() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let cfg = config(backend.addr, "[trusted_proxies]\ncidrs = [\"127.0.0.14/32\"]\nproxy_protocol = true\n");
    let cfg = set(&cfg, "server", "handshake_timeout", "\"1s\"");
    let proxy = Proxy::start(&pki, &cfg);

    let v1 = b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 443\r\n";
    let mut ws = ws_after_prefix(&proxy, &pki, tcp_from(&proxy, "127.0.0.14").await.unwrap(), v1).await.unwrap();
    echo(&mut ws, "v1").await;
    drop(ws);
    assert_eq!(backend.next_session().await.header_all("x-forwarded-for"), vec!["198.51.100.7"]);

    let v2 = proxy_v2([192, 0, 2, 33], 40001, false);
    let mut ws = ws_after_prefix(&proxy, &pki, tcp_from(&proxy, "127.0.0.14").await.unwrap(), &v2).await.unwrap();
    echo(&mut ws, "v2").await;
    drop(ws);
    assert_eq!(backend.next_session().await.header_all("x-forwarded-for"), vec!["192.0.2.33"]);

    // v1 UNKNOWN stands for the peer itself.
    let ws = ws_after_prefix(&proxy, &pki, tcp_from(&proxy, "127.0.0.14").await.unwrap(), b"PROXY UNKNOWN\r\n")
        .await
        .unwrap();
    drop(ws);
    assert_eq!(backend.next_session().await.header_all("x-forwarded-for"), vec!["127.0.0.14"]);

    // v2 LOCAL (a health check) stands for the peer itself.
    let local = proxy_v2([0; 4], 0, true);
    let ws = ws_after_prefix(&proxy, &pki, tcp_from(&proxy, "127.0.0.14").await.unwrap(), &local).await.unwrap();
    drop(ws);
    assert_eq!(backend.next_session().await.header_all("x-forwarded-for"), vec!["127.0.0.14"]);

    // A trusted peer that sends nothing is closed after handshake_timeout (1 s here).
    let mut idle = tcp_from(&proxy, "127.0.0.14").await.unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf)).await.expect("closed");
    assert!(matches!(r, Ok(0) | Err(_)));
    assert!(t0.elapsed() >= Duration::from_millis(800) && t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    // A trusted peer without a PROXY header is closed.
    let r = ws_after_prefix(&proxy, &pki, tcp_from(&proxy, "127.0.0.14").await.unwrap(), b"").await;
    assert!(r.is_err(), "no PROXY header from a trusted peer must not be served");
    // An untrusted peer's PROXY header is never believed (the TLS handshake fails) ...
    let r = ws_after_prefix(&proxy, &pki, tcp_from(&proxy, "127.0.0.15").await.unwrap(), v1).await;
    assert!(r.is_err());
    // ... and without one it is a direct client.
    let ws = ws_after_prefix(&proxy, &pki, tcp_from(&proxy, "127.0.0.15").await.unwrap(), b"").await.unwrap();
    drop(ws);
    assert_eq!(backend.next_session().await.header_all("x-forwarded-for"), vec!["127.0.0.15"]);
}

// ---------------------------------------------------------------- pending guard, slowloris

#[tokio::test]
async fn pending_handshakes_over_the_cap_are_dropped_at_accept() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let cfg = set(&config(backend.addr, ""), "limits", "max_pending_handshakes_per_ip", "3");
    let proxy = Proxy::start(&pki, &cfg);

    // Three idle TCP connections from one address fill its pending slots.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tcp_from(&proxy, "127.0.0.16").await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The fourth is dropped at accept: no TLS (the handshake fails at once, long before the
    // 3 s handshake_timeout).
    let t0 = Instant::now();
    let r = tls_over(tcp_from(&proxy, "127.0.0.16").await.unwrap(), &pki).await;
    assert!(r.is_err(), "over the pending cap, TLS must not be served");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert!(handshakes(&proxy, "pending_dropped").await >= 1.0);
    // Another address is unaffected.
    connect(&proxy, &pki).from("127.0.0.17").go().await.expect("other address");
    // Freed slots are usable again.
    drop(idle);
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match connect(&proxy, &pki).from("127.0.0.16").go().await {
            Ok(_) => break,
            Err(e) if Instant::now() < end => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

/// The pending cap counts a prefix (`ipv4_prefix = 24` here) as one client, as every per-IP
/// limit does, but each trusted balancer on its own: balancers in one network must not share
/// one budget.
#[tokio::test]
async fn the_pending_cap_groups_clients_by_prefix_but_counts_each_trusted_balancer_alone() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let cfg = config(backend.addr, "[trusted_proxies]\ncidrs = [\"127.0.3.1/32\", \"127.0.3.2/32\"]\n");
    let cfg = set(&cfg, "limits", "max_pending_handshakes_per_ip", "2");
    let cfg = set(&cfg, "limits", "ipv4_prefix", "24");
    let proxy = Proxy::start(&pki, &cfg);
    let mut idle = Vec::new();
    for source in ["127.0.4.1", "127.0.4.2", "127.0.3.1", "127.0.3.1"] {
        idle.push(tcp_from(&proxy, source).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // 127.0.4.3 is in the full 127.0.4.0/24: dropped at accept.
    assert!(tls_over(tcp_from(&proxy, "127.0.4.3").await.unwrap(), &pki).await.is_err());
    // The other balancer has its own slots; the full one has none.
    assert!(tls_over(tcp_from(&proxy, "127.0.3.2").await.unwrap(), &pki).await.is_ok());
    assert!(tls_over(tcp_from(&proxy, "127.0.3.1").await.unwrap(), &pki).await.is_err());
    drop(idle);
}

#[tokio::test]
async fn slowloris_connections_are_all_closed_after_handshake_timeout() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let cfg = set(&config(backend.addr, ""), "server", "handshake_timeout", "\"2s\"");
    let proxy = Proxy::start(&pki, &cfg);

    const N: usize = 200;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..N {
        let src = format!("127.0.1.{}", 10 + i % 20);
        let tcp = tcp_from(&proxy, &src).await.unwrap();
        let cc = pki.client_config();
        tasks.push(tokio::spawn(async move {
            let conn = tokio_rustls::TlsConnector::from(cc);
            let began = Instant::now();
            let Ok(tls) = conn.connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp).await else {
                return (began.elapsed(), String::from("tls closed"));
            };
            let (mut r, mut w) = tokio::io::split(tls);
            let writer = tokio::spawn(async move {
                let req =
                    b"GET /chat HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaa";
                for b in req.iter() {
                    if w.write_all(&[*b]).await.is_err() || w.flush().await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
            });
            let mut out = Vec::new();
            let res = tokio::time::timeout(Duration::from_secs(8), r.read_to_end(&mut out)).await;
            writer.abort();
            assert!(res.is_ok(), "a trickling connection was still open after 8 s");
            (began.elapsed(), String::from_utf8_lossy(&out).to_string())
        }));
    }
    // Some never even finish TLS: they trickle a ClientHello-looking prefix at the TCP level.
    let mut raw = Vec::new();
    for i in 0..20 {
        let mut tcp = tcp_from(&proxy, &format!("127.0.1.{}", 40 + i % 5)).await.unwrap();
        raw.push(tokio::spawn(async move {
            let began = Instant::now();
            let (mut r, mut w) = tcp.split();
            let trickle = async {
                for b in [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03].iter().cycle() {
                    if w.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
            };
            let mut buf = [0u8; 64];
            tokio::select! {
                _ = trickle => {}
                r = tokio::time::timeout(Duration::from_secs(8), async { loop { match r.read(&mut buf).await { Ok(0) | Err(_) => return, Ok(_) => {} } } }) => {
                    assert!(r.is_ok(), "a TLS trickler was still open after 8 s");
                }
            }
            began.elapsed()
        }));
    }
    // Meanwhile a normal client gets in and talks.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut ws, _) = connect(&proxy, &pki).from("127.0.1.10").go().await.expect("normal client during slowloris");
    echo(&mut ws, "still here").await;

    let mut with_408 = 0;
    for t in tasks {
        let (took, resp) = t.await.unwrap();
        assert!(took < Duration::from_millis(4500), "closed after {took:?}");
        assert!(took >= Duration::from_millis(1500), "closed too early, after {took:?}: {resp}");
        if status_of(&resp) == 408 {
            with_408 += 1;
        }
    }
    assert_eq!(with_408, N, "every started request gets 408");
    for t in raw {
        let took = t.await.unwrap();
        assert!(took >= Duration::from_millis(1500) && took < Duration::from_millis(4500), "TLS trickler: {took:?}");
    }
    assert!(start.elapsed() < Duration::from_secs(8));
    assert!(handshakes(&proxy, "handshake_timeout").await >= N as f64);
    echo(&mut ws, "and after").await;
}

// ---------------------------------------------------------------- address spray

#[tokio::test]
async fn address_spray_keeps_the_per_ip_table_bounded() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    let tracked = |text: String| metric(&text, "wsgate_per_ip_tracked_keys", "");

    // 150 distinct sources, one rejected attempt each (a rejected attempt still creates a
    // bucket: every upgrade attempt counts).
    let mut tasks = Vec::new();
    for i in 0..150u32 {
        let src = format!("127.2.{}.{}", i / 100, 1 + i % 100);
        let proxy_addr = proxy.addr;
        let cc = pki.client_config();
        tasks.push(tokio::spawn(async move {
            let s = TcpSocket::new_v4().unwrap();
            s.bind(SocketAddr::new(src.parse().unwrap(), 0)).unwrap();
            let tcp = s.connect(proxy_addr).await.unwrap();
            let conn = tokio_rustls::TlsConnector::from(cc);
            let mut tls =
                conn.connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
            let req = "GET /chat HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                       Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                       Origin: https://evil.example.net\r\n\r\n";
            tls.write_all(req.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
            status_of(&String::from_utf8_lossy(&out))
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 403);
    }
    // The sweeper (every 10 s) publishes the table size; it must have seen the sprayed keys
    // and then come back down once their buckets refilled.
    let end = Instant::now() + Duration::from_secs(25);
    let mut peak = 0.0f64;
    loop {
        let n = tracked(proxy.metrics().await);
        peak = peak.max(n);
        if peak >= 150.0 && n <= 2.0 {
            break;
        }
        assert!(Instant::now() < end, "tracked keys: peak {peak}, now {n}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---------------------------------------------------------------- logs

#[tokio::test]
async fn rejections_log_one_line_each_and_tokens_never_appear() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let cfg = config(backend.addr, "").replace("level = \"info\"", "level = \"debug\"");
    let proxy = Proxy::start(&pki, &cfg);
    let secret_like = |sub: &str| token(sub, 600);
    let (tq, th, tc, tp) = (secret_like("q-user"), secret_like("h-user"), secret_like("c-user"), secret_like("p-user"));
    let no_auth = || connect(&proxy, &pki).without("Authorization");

    // Accepted through each carrier.
    let accepted = [
        no_auth().path(&format!("/chat?access_token={tq}")),
        no_auth().header("Authorization", &format!("Bearer {th}")),
        no_auth().header("Cookie", &format!("access_token={tc}")),
        no_auth().header("Sec-WebSocket-Protocol", &format!("access_token, {tp}")),
    ];
    for c in accepted {
        let (ws, _) = c.go().await.unwrap();
        drop(ws);
    }
    // Refused with tokens in every carrier: bad signature (401), bad origin (403).
    let forged = |t: &str| format!("{t}AAAA");
    let refused: Vec<(Connect<'_>, &str, u16, &str)> = vec![
        (no_auth().path(&format!("/chat?access_token={}", forged(&tq))), "127.0.0.21", 401, "token_invalid"),
        (no_auth().header("Authorization", &format!("Bearer {}", forged(&th))), "127.0.0.22", 401, "token_invalid"),
        (no_auth().header("Cookie", &format!("access_token={}", forged(&tc))), "127.0.0.23", 401, "token_invalid"),
        (
            no_auth().header("Sec-WebSocket-Protocol", &format!("access_token, {}", forged(&tp))),
            "127.0.0.24",
            401,
            "token_invalid",
        ),
        (
            no_auth().header("Origin", "null").path(&format!("/chat?access_token={tq}")),
            "127.0.0.25",
            403,
            "origin_denied",
        ),
        (no_auth(), "127.0.0.26", 401, "token_missing"),
    ];
    for (c, src, status, reason) in refused {
        let e = c.from(src).go().await.unwrap_err();
        assert_eq!(e.status(), status);
        assert!(proxy.wait_log(&format!("\"client_ip\":\"{src}\""), Duration::from_secs(5)).await);
        let lines: Vec<_> = rejections(&proxy).into_iter().filter(|v| v["client_ip"] == src).collect();
        assert_eq!(lines.len(), 1, "{src}: {lines:?}");
        assert_eq!(lines[0]["reason"], reason);
        assert_eq!(lines[0]["status"], status);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = proxy.log_text();
    for t in [&tq, &th, &tc, &tp] {
        // Neither the token nor its signature part appears anywhere.
        let sig = t.rsplit('.').next().unwrap();
        assert!(!logs.contains(t.as_str()) && !logs.contains(sig), "token leaked into the log:\n{logs}");
    }
    assert!(!logs.contains(SECRET));
}

// ---------------------------------------------------------------- wsgate token

#[test]
fn token_command_prints_only_the_token_and_refuses_weak_secrets() {
    let bin = env!("CARGO_BIN_EXE_wsgate");
    let run = |env: Option<&str>, extra: &[&str]| {
        let mut cmd = std::process::Command::new(bin);
        cmd.args(["token", "--secret-env", "WSGATE_TEST_TOKEN_SECRET", "--sub", "carol"]).args(extra);
        cmd.env_remove("WSGATE_TEST_TOKEN_SECRET");
        if let Some(v) = env {
            cmd.env("WSGATE_TEST_TOKEN_SECRET", v);
        }
        cmd.output().unwrap()
    };
    let out = run(Some(SECRET), &["--ttl", "10m", "--aud", "chat", "--iss", "https://idp.test"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.ends_with('\n'));
    let t = stdout.trim_end_matches('\n');
    assert!(!t.contains(char::is_whitespace) && t.split('.').count() == 3, "stdout is the token alone: {stdout:?}");
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.set_audience(&["chat"]);
    v.set_issuer(&["https://idp.test"]);
    let data =
        jsonwebtoken::decode::<serde_json::Value>(t, &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()), &v)
            .expect("a valid HS256 token");
    let c = data.claims;
    assert_eq!(c["sub"], "carol");
    let (iat, exp) = (c["iat"].as_u64().unwrap(), c["exp"].as_u64().unwrap());
    assert_eq!(exp - iat, 600);
    assert!(iat.abs_diff(now_unix()) <= 5);

    // Defaults: 1 h, no aud/iss.
    let out = run(Some(SECRET), &[]);
    let t = String::from_utf8(out.stdout).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.validate_aud = false;
    let c = jsonwebtoken::decode::<serde_json::Value>(
        t.trim(),
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &v,
    )
    .unwrap()
    .claims;
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 3600);
    assert!(c.get("aud").is_none() && c.get("iss").is_none());

    // A lifetime that makes no token (exp == iat) or one the proxy's durations cannot hold.
    for ttl in ["0s", "500ms", "11y"] {
        let out = run(Some(SECRET), &["--ttl", ttl]);
        assert_eq!(out.status.code(), Some(2), "{ttl}: {out:?}");
        assert!(out.stdout.is_empty() && String::from_utf8_lossy(&out.stderr).contains("--ttl"), "{ttl}: {out:?}");
    }

    for env in [None, Some("too-short-secret"), Some("")] {
        let out = run(env, &[]);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{env:?}: nothing on stdout");
        assert!(!out.stderr.is_empty());
    }
}

// ---------------------------------------------------------------- edge cases of the carriers

#[tokio::test]
async fn a_second_authorization_header_with_a_bearer_never_reaches_the_backend() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    let t = token("dup", 600);
    let other = token("someone-else", 600);
    let req = format!(
        "GET /chat?access_token={t} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {ORIGIN}\r\n\
         Authorization: Basic dXNlcjpwYXNz\r\nAuthorization: Bearer {other}\r\n\r\n"
    );
    let mut s = tls_over(tcp_from(&proxy, "127.0.0.1").await.unwrap(), &pki).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    drop(s);
    let seen = backend.next_session().await;
    let auth = seen.header_all("authorization");
    assert!(!format!("{seen:?}").contains(&other), "a Bearer credential reached the backend: {auth:?}");
    assert!(!format!("{seen:?}").contains(&t));
}

#[tokio::test]
async fn the_token_pair_is_answered_even_when_the_token_came_from_another_source() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    // A browser app that sends the pair while a cookie also carries a token: the pair is
    // stripped from what the backend is offered, and the client must still get a protocol
    // back (a browser fails a handshake that offered protocols and got none).
    let t = token("both", 600);
    let r = connect(&proxy, &pki)
        .without("Authorization")
        .header("Cookie", &format!("access_token={t}"))
        .header("Sec-WebSocket-Protocol", &format!("access_token, {t}"))
        .go()
        .await;
    let (mut ws, resp) = r.expect("admitted");
    assert_eq!(resp.headers().get("sec-websocket-protocol").map(|v| v.to_str().unwrap()), Some("access_token"));
    echo(&mut ws, "x").await;
    drop(ws);
    let seen = backend.next_session().await;
    assert_eq!(seen.header("sec-websocket-protocol"), None);
}

// ---------------------------------------------------------------- grouping by prefix

#[tokio::test]
async fn ipv4_prefix_groups_addresses_into_one_limit() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let mut cfg = set(&config(backend.addr, ""), "limits", "max_connections_per_ip", "2");
    cfg = set(&cfg, "limits", "ipv4_prefix", "24");
    let proxy = Proxy::start(&pki, &cfg);
    let (_a, _) = connect(&proxy, &pki).from("127.0.3.1").go().await.unwrap();
    let (_b, _) = connect(&proxy, &pki).from("127.0.3.2").go().await.unwrap();
    let e = connect(&proxy, &pki).from("127.0.3.3").go().await.unwrap_err();
    assert_eq!(e.status(), 429, "the /24 shares one cap");
    connect(&proxy, &pki).from("127.0.4.1").go().await.expect("another /24");
}

#[tokio::test]
async fn ipv6_clients_behind_a_trusted_proxy_are_grouped_by_ipv6_prefix() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let cfg = config(backend.addr, "[trusted_proxies]\ncidrs = [\"127.0.0.18/32\"]\n");
    let cfg = set(&cfg, "limits", "max_connections_per_ip", "1");
    let proxy = Proxy::start(&pki, &cfg);
    let via = |xff: &str| connect(&proxy, &pki).header("X-Forwarded-For", xff).from("127.0.0.18");

    let (a, _) = via("[2001:DB8:0:0::1]:443").go().await.unwrap();
    // Same /64: over the cap. Another /64: fine.
    assert_eq!(via("2001:db8::ffff:1").go().await.unwrap_err().status(), 429);
    let (b, _) = via("2001:db8:0:1::1").go().await.unwrap();
    // An IPv4-mapped address counts as IPv4.
    let (c, _) = via("::ffff:203.0.113.9").go().await.unwrap();
    drop(a);
    assert_eq!(backend.next_session().await.header_all("x-forwarded-for"), vec!["2001:db8::1"]);
    drop(b);
    assert_eq!(backend.next_session().await.header_all("x-real-ip"), vec!["2001:db8:0:1::1"]);
    drop(c);
    assert_eq!(backend.next_session().await.header_all("x-forwarded-for"), vec!["203.0.113.9"]);
}

#[tokio::test]
async fn backend_path_prefix_is_joined_after_the_token_is_removed() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let cfg = config(backend.addr, "")
        .replace(&format!("url = \"ws://{}\"", backend.addr), &format!("url = \"ws://{}/base/\"", backend.addr));
    let proxy = Proxy::start(&pki, &cfg);
    let t = token("prefix", 600);
    let (ws, _) = connect(&proxy, &pki)
        .without("Authorization")
        .path(&format!("/chat?access_token={t}&room=1"))
        .go()
        .await
        .unwrap();
    drop(ws);
    assert_eq!(backend.next_session().await.path, "/base/chat?room=1");

    // The absolute form of the target (RFC 9112 §3.2.2) is its path and query, and lines may
    // end in a bare LF (§2.2): both are upgraded like any other request.
    let absolute = upgrade_request("").replacen("GET /chat ", "GET https://localhost/chat?access_token=x&room=2 ", 1);
    let no_path = upgrade_request("").replacen("GET /chat ", "GET wss://localhost?room=3 ", 1);
    let bare_lf = upgrade_request("").replacen("GET /chat ", "GET /lf ", 1).replace("\r\n", "\n");
    for (req, path) in [(absolute, "/base/chat?room=2"), (no_path, "/base/?room=3"), (bare_lf, "/base/lf")] {
        let mut s = raw_tls(&proxy, &pki).await;
        s.write_all(req.as_bytes()).await.unwrap();
        let mut got = [0u8; 12];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await;
        assert!(matches!(read, Ok(Ok(_))), "no answer to {req:?}");
        assert_eq!(&got, b"HTTP/1.1 101", "{req:?}");
        drop(s);
        assert_eq!(backend.next_session().await.path, path);
    }
}

/// Bytes that cannot begin an HTTP request get their 400 as soon as they arrive, not a 408
/// when `handshake_timeout` (3 s here) runs out waiting for the end of a head.
#[tokio::test]
async fn bytes_that_cannot_be_http_get_400_at_once() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    for junk in [&b"\x00\x01\x02\xff binary, no line end"[..], b"SSH-2.0-OpenSSH_9.6\r\n"] {
        let mut s = raw_tls(&proxy, &pki).await;
        s.write_all(junk).await.unwrap();
        s.flush().await.unwrap();
        let t0 = Instant::now();
        let mut got = Vec::new();
        let mut b = [0u8; 1024];
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&b[..n]);
        }
        let took = t0.elapsed();
        assert!(got.starts_with(b"HTTP/1.1 400"), "{junk:?}: {}", String::from_utf8_lossy(&got));
        assert!(took < Duration::from_secs(1), "{junk:?}: answered after {took:?}");
    }
}
