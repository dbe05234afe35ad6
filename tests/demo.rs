//! `wsgate demo` prints a URL, an origin and a token, and a wss client using them chats
//! through it (the token sent as the `access_token` subprotocol pair, as the page does).

mod common;

use futures_util::{SinkExt, StreamExt};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn demo_prints_url_and_token_and_chats() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let child = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut fields = std::collections::HashMap::new();
    let end = Instant::now() + Duration::from_secs(20);
    while !fields.contains_key("cert") {
        let line = rx.recv_timeout(end.saturating_duration_since(Instant::now())).expect("demo output");
        if let Some((k, v)) = line.trim().split_once(':') {
            if ["page", "websocket", "origin", "token", "cert"].contains(&k) {
                fields.insert(k.to_string(), v.trim().to_string());
            }
        }
    }
    assert!(fields["page"].starts_with("https://localhost:"));
    let ws_url = fields["websocket"].clone();
    assert!(ws_url.starts_with("wss://localhost:") && ws_url.ends_with("/ws"));
    let cert_path = fields["cert"].split(' ').next().unwrap().to_string();
    let pem = std::fs::read(&cert_path).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    roots.add(rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();

    let port: u16 = ws_url.trim_start_matches("wss://localhost:").trim_end_matches("/ws").parse().unwrap();
    assert_eq!(fields["page"], format!("https://localhost:{port}/"));
    let join = || async {
        let mut req = ws_url.as_str().into_client_request().unwrap();
        req.headers_mut().insert("Origin", fields["origin"].parse().unwrap());
        let pair = format!("access_token, {}", fields["token"]);
        req.headers_mut().insert("Sec-WebSocket-Protocol", pair.parse().unwrap());
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let connector = tokio_tungstenite::Connector::Rustls(Arc::new(tls.clone()));
        let (ws, resp) = tokio_tungstenite::client_async_tls_with_config(req, tcp, None, Some(connector))
            .await
            .expect("demo handshake");
        assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), "access_token");
        ws
    };
    let (mut a, mut b) = (join().await, join().await);
    // Plain text, exactly as sent, to every session, the sender included: no names, no
    // join notices. B may subscribe a moment after its 101, so A repeats until B has it.
    let hello = Message::Text("hello from the test".into());
    let deadline = Instant::now() + Duration::from_secs(10);
    let first_at_b = loop {
        a.send(hello.clone()).await.unwrap();
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(200), b.next()).await {
            break m.unwrap().unwrap();
        }
        assert!(Instant::now() < deadline, "B never got A's message");
    };
    assert_eq!(first_at_b, hello);
    let first_at_a = tokio::time::timeout(Duration::from_secs(5), a.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first_at_a, hello);

    // Ctrl-C drains and exits 0, and the directory with the key and the JWT secret is gone.
    drop((a, b));
    let mut child = child;
    let st = Command::new("kill").args(["-INT", &child.0.id().to_string()]).status().unwrap();
    assert!(st.success());
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "the demo did not exit within 10 s of SIGINT");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
    let dir = std::path::Path::new(&cert_path).parent().unwrap();
    assert!(!dir.exists(), "{} left behind", dir.display());
}
