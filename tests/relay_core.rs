//! Issue 2: wss:// in, ws:// out — messages both ways byte-exact and in order, fragments,
//! ping/pong, close codes forwarded, 502/504, backend dying mid-session, plain TCP.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn text_and_binary_both_ways_byte_exact_in_order() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, "max_frame_size = \"64KiB\""));
    let (mut ws, _) = connect(&proxy, &pki).go().await.unwrap();
    let sizes = [0usize, 1, 125, 126, 127, 1000, 65535, 65536];
    let mut sent = Vec::new();
    for (i, n) in sizes.iter().enumerate() {
        let bin: Vec<u8> = (0..*n).map(|j| (i * 31 + j * 7) as u8).collect();
        sent.push(Message::Binary(bin.into()));
        let text: String = (0..*n).map(|j| char::from(b'a' + ((i + j) % 26) as u8)).collect();
        sent.push(Message::Text(text.into()));
    }
    for m in &sent {
        ws.send(m.clone()).await.unwrap();
    }
    for m in &sent {
        let got = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(&got, m);
    }
    ws.close(None).await.unwrap();
    let seen = backend.next_session().await;
    let data: Vec<_> = seen.messages.iter().filter(|m| !m.is_close()).cloned().collect();
    assert_eq!(data, sent);
}

#[tokio::test]
async fn frame_over_limit_closes_1009() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, "max_frame_size = \"1KiB\""));
    let (mut ws, _) = connect(&proxy, &pki).go().await.unwrap();
    ws.send(Message::Binary(vec![7u8; 1025].into())).await.unwrap();
    assert_eq!(expect_close(&mut ws, Duration::from_secs(5)).await.map(|c| c.0), Some(1009));
}

#[tokio::test]
async fn fragmented_message_is_relayed_whole() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    let mut s = raw_upgrade(&proxy, &pki).await;
    use tokio::io::AsyncWriteExt;
    let mut bytes = raw_frame(false, 1, true, "héllo, ".as_bytes());
    bytes.extend(raw_frame(false, 0, true, b"fragmented "));
    bytes.extend(raw_frame(true, 9, true, b"ping-in-between"));
    bytes.extend(raw_frame(true, 0, true, "wörld".as_bytes()));
    s.write_all(&bytes).await.unwrap();
    // The proxy answers the ping itself; the echo of the joined message follows.
    let mut got_pong = false;
    let mut text = Vec::new();
    while text.is_empty() || !String::from_utf8_lossy(&text).ends_with("wörld") {
        let (op, p) = read_raw_frame(&mut s).await.expect("frame");
        match op {
            0xA => {
                assert_eq!(p, b"ping-in-between");
                got_pong = true;
            }
            1 | 0 => text.extend_from_slice(&p),
            other => panic!("unexpected opcode {other}"),
        }
    }
    assert!(got_pong);
    assert_eq!(String::from_utf8(text).unwrap(), "héllo, fragmented wörld");
    s.write_all(&raw_frame(true, 8, true, &1000u16.to_be_bytes())).await.unwrap();
    let seen = backend.next_session().await;
    assert_eq!(seen.messages[0], Message::Text("héllo, fragmented wörld".into()));
}

#[tokio::test]
async fn ping_is_answered_with_same_payload() {
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    let (mut ws, _) = connect(&proxy, &pki).go().await.unwrap();
    ws.send(Message::Ping(b"are you there".to_vec().into())).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"are you there"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn close_code_and_reason_forwarded_client_to_backend() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    let (mut ws, _) = connect(&proxy, &pki).go().await.unwrap();
    ws.send(close_frame(4001, "bye now")).await.unwrap();
    // tungstenite's backend echoes the close; the client sees it.
    assert_eq!(expect_close(&mut ws, Duration::from_secs(5)).await, Some((4001, "bye now".into())));
    let seen = backend.next_session().await;
    match seen.messages.last() {
        Some(Message::Close(Some(f))) => {
            assert_eq!(u16::from(f.code), 4001);
            assert_eq!(f.reason.as_str(), "bye now");
        }
        other => panic!("backend saw {other:?}"),
    }
}

#[tokio::test]
async fn close_code_and_reason_forwarded_backend_to_client() {
    let pki = Pki::new();
    // A backend that closes with 4002 "kicked" right after the handshake.
    let addr = scripted_backend(|_, mut ws| async move {
        ws.send(close_frame(4002, "kicked")).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    let proxy = Proxy::start(&pki, &config(addr, ""));
    let (mut ws, _) = connect(&proxy, &pki).go().await.unwrap();
    assert_eq!(expect_close(&mut ws, Duration::from_secs(5)).await, Some((4002, "kicked".into())));
}

#[tokio::test]
async fn backend_not_listening_is_502() {
    let pki = Pki::new();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let proxy = Proxy::start(&pki, &config(dead, ""));
    let err = connect(&proxy, &pki).go().await.unwrap_err();
    assert_eq!(err.status(), 502);
}

/// A backend that accepts TCP connections, writes `greeting` on each and holds them open.
async fn holding_backend(greeting: &'static [u8]) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(greeting).await;
            held.push(s);
        }
    });
    (addr, hold)
}

#[tokio::test]
async fn backend_silent_is_504_within_connect_timeout() {
    let pki = Pki::new();
    let (addr, hold) = holding_backend(b"").await;
    let proxy = Proxy::start(&pki, &config(addr, ""));
    let t0 = Instant::now();
    let err = connect(&proxy, &pki).go().await.unwrap_err();
    assert_eq!(err.status(), 504);
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "took {took:?}");
    hold.abort();
}

#[tokio::test]
async fn backend_killed_mid_session_gives_1011_and_proxy_keeps_serving() {
    let pki = Pki::new();
    // First session: dropped without a close after one message. Later: echo.
    let addr = scripted_backend(|n, mut ws| async move {
        if n == 0 {
            let _ = ws.next().await;
            return;
        }
        while let Some(Ok(m)) = ws.next().await {
            if m.is_text() && ws.send(m).await.is_err() {
                break;
            }
        }
    })
    .await;
    let proxy = Proxy::start(&pki, &config(addr, ""));
    let (mut ws, _) = connect(&proxy, &pki).go().await.unwrap();
    ws.send(Message::Text("hi".into())).await.unwrap();
    assert_eq!(expect_close(&mut ws, Duration::from_secs(5)).await.map(|c| c.0), Some(1011));
    let (mut ws2, _) = connect(&proxy, &pki).go().await.unwrap();
    ws2.send(Message::Text("again".into())).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), ws2.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(got, Message::Text("again".into()));
}

#[tokio::test]
async fn plain_tcp_to_tls_port_fails_fast() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, ""));
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let t0 = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await.expect("proxy hung on plaintext");
    // Either an EOF/reset or a TLS alert, but quickly, and never an HTTP answer.
    if let Ok(n) = r {
        assert!(n == 0 || !buf[..n].starts_with(b"HTTP/"), "plaintext got an HTTP answer");
    }
    assert!(t0.elapsed() < Duration::from_secs(2));
}

/// Sends `frame` on a raw upgraded stream, reads the proxy's close frame and returns its
/// code, after checking that the stream then ends cleanly: `close_notify`, so a read returns
/// 0 (rustls reports a TCP end without it as an UnexpectedEof error).
async fn close_code_then_clean_tls_end(extra_limits: &str, frame: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let backend = Backend::start(Mode::Echo).await;
    let proxy = Proxy::start(&pki, &config(backend.addr, extra_limits));
    let mut s = raw_upgrade(&proxy, &pki).await;
    s.write_all(frame).await.unwrap();
    let (op, payload) = read_raw_frame(&mut s).await.expect("a close frame");
    assert_eq!(op, 0x8);
    let mut rest = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut rest)).await.expect("the proxy ends the stream");
    assert_eq!(n.expect("a clean TLS end (close_notify)"), 0);
    u16::from_be_bytes([payload[0], payload[1]])
}

/// After a close handshake the client gets the close reply and then a clean TLS end, never a
/// truncated stream; the proxy sends both in one write, which must not reorder them.
#[tokio::test]
async fn close_reply_is_followed_by_a_clean_tls_end() {
    let mut close = 4000u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"done");
    assert_eq!(close_code_then_clean_tls_end("", &raw_frame(true, 0x8, true, &close)).await, 4000);
}

/// A close the proxy starts (here 1009, a frame over the limit) ends TLS cleanly too.
#[tokio::test]
async fn a_close_the_proxy_starts_also_ends_tls_cleanly() {
    let big = raw_frame(true, 0x1, true, &[b'a'; 2048]);
    assert_eq!(close_code_then_clean_tls_end("max_frame_size = \"1KiB\"", &big).await, 1009);
}

/// A `wss://` echo backend serving the PKI's localhost certificate. Each session reports
/// how its TLS stream ended after the close handshake: `Ok(())` for close_notify then EOF.
async fn tls_echo_backend(pki: &Pki) -> (std::net::SocketAddr, tokio::sync::mpsc::Receiver<Result<(), String>>) {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::AsyncReadExt;
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(&pki.cert_path).unwrap().map(|c| c.unwrap()).collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&pki.key_path).unwrap();
    let cfg =
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else { return };
                // Echo until the close handshake is over (tungstenite answers the close);
                // "close-me" makes the backend start it.
                while let Some(Ok(m)) = ws.next().await {
                    if m == Message::Text("close-me".into()) {
                        let _ = ws.send(close_frame(4001, "backend closes")).await;
                    } else if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        return;
                    }
                }
                let mut rest = [0u8; 16];
                let end = match tokio::time::timeout(Duration::from_secs(5), ws.get_mut().read(&mut rest)).await {
                    Ok(Ok(0)) => Ok(()),
                    Ok(Ok(n)) => Err(format!("{n} bytes after the close")),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("the proxy never ended the stream".to_string()),
                };
                let _ = tx.send(end).await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn wss_backend_with_ca_file_relays_and_gets_a_clean_tls_end() {
    let pki = Pki::new();
    let (addr, mut ends) = tls_echo_backend(&pki).await;
    let ca = pki.dir.path().join("ca.pem");
    let wss = format!("url = \"wss://localhost:{}\"\nca_file = \"{}\"", addr.port(), ca.display());
    let proxy = Proxy::start(&pki, &config(addr, "").replace(&format!("url = \"ws://{addr}\""), &wss));

    let (mut ws, _) = connect(&proxy, &pki).go().await.unwrap();
    ws.send(Message::Text("over wss".into())).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(got, Message::Text("over wss".into()));
    ws.send(close_frame(1000, "bye")).await.unwrap();
    assert_eq!(expect_close(&mut ws, Duration::from_secs(5)).await.map(|c| c.0), Some(1000));
    let end = tokio::time::timeout(Duration::from_secs(5), ends.recv()).await.unwrap().unwrap();
    assert_eq!(end, Ok(()), "the backend's TLS stream did not end with close_notify");

    // The backend starts the close: its stream ends cleanly too.
    let (mut ws, _) = connect(&proxy, &pki).go().await.unwrap();
    ws.send(Message::Text("close-me".into())).await.unwrap();
    assert_eq!(expect_close(&mut ws, Duration::from_secs(5)).await.map(|c| c.0), Some(4001));
    // Reading on lets tungstenite send its close reply.
    let _ = tokio::time::timeout(Duration::from_secs(3), async { while let Some(Ok(_)) = ws.next().await {} }).await;
    let end = tokio::time::timeout(Duration::from_secs(5), ends.recv()).await.unwrap().unwrap();
    assert_eq!(end, Ok(()), "backend-initiated close: no close_notify");

    // The same backend without `ca_file`: its certificate is not in the system roots (502).
    let untrusted = format!("url = \"wss://localhost:{}\"", addr.port());
    let proxy = Proxy::start(&pki, &config(addr, "").replace(&format!("url = \"ws://{addr}\""), &untrusted));
    let refused = connect(&proxy, &pki).go().await.expect_err("an untrusted backend certificate");
    assert_eq!(refused.status(), 502);
}

/// A backend that answers in another protocol (an SSH banner on the configured port) is a
/// 502 as soon as its first line arrives, not a 504 when `connect_timeout` runs out.
#[tokio::test]
async fn backend_answering_something_not_http_is_502_at_once() {
    let pki = Pki::new();
    let (addr, hold) = holding_backend(b"SSH-2.0-OpenSSH_9.6\r\n").await;
    let cfg = config(addr, "").replace("connect_timeout = \"1s\"", "connect_timeout = \"4s\"");
    let proxy = Proxy::start(&pki, &cfg);
    let t0 = Instant::now();
    let err = connect(&proxy, &pki).go().await.unwrap_err();
    assert_eq!(err.status(), 502);
    assert!(t0.elapsed() < Duration::from_secs(2), "took {:?}", t0.elapsed());
    hold.abort();
}
