//! `wsgate demo`: try the proxy in one command. A self-signed certificate (rcgen), a built-in
//! plaintext chat backend (fastwebsockets; every message is broadcast to every session) that
//! also serves a small chat page, JWT on with a random secret, and the proxy in front.

use crate::config::Config;
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use http_body_util::{Either, Empty, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::Path;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};

const PAGE: &str = include_str!("demo_page.html");

/// Everything the demo made: where to point a browser and what to send.
#[derive(Debug, Clone)]
pub struct DemoInfo {
    /// `https://localhost:PORT/`
    pub page_url: String,
    /// `wss://localhost:PORT/ws`
    pub ws_url: String,
    /// The origin the proxy allows (the page's own).
    pub origin: String,
    /// A signed demo token (HS256, 1 h).
    pub token: String,
    /// PEM of the self-signed certificate (clients can trust it).
    pub cert_pem: String,
}

/// Starts the built-in chat backend on a loopback port.
pub async fn start_chat_backend() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, _) = broadcast::channel::<String>(256);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| serve_backend(req, tx.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Ok(addr)
}

type DemoBody = Either<Full<Bytes>, Empty<Bytes>>;

async fn serve_backend(
    mut req: Request<hyper::body::Incoming>,
    tx: broadcast::Sender<String>,
) -> Result<Response<DemoBody>, std::convert::Infallible> {
    if fastwebsockets::upgrade::is_upgrade_request(&req) {
        return Ok(match fastwebsockets::upgrade::upgrade(&mut req) {
            Ok((resp, fut)) => {
                tokio::spawn(async move {
                    if let Ok(ws) = fut.await {
                        let _ = chat_session(ws, tx).await;
                    }
                });
                resp.map(Either::Right)
            }
            Err(_) => status(StatusCode::BAD_REQUEST),
        });
    }
    let mut r = Response::new(Either::Left(Full::new(Bytes::from_static(PAGE.as_bytes()))));
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/html; charset=utf-8"));
    Ok(r)
}

fn status(s: StatusCode) -> Response<DemoBody> {
    let mut r = Response::new(Either::Right(Empty::new()));
    *r.status_mut() = s;
    r
}

/// One chat member: a reader task feeding the broadcast, a writer fed by it. `read_frame` is
/// not cancel-safe, so it never sits in a `select!`; the halves talk through bounded channels.
async fn chat_session(
    ws: fastwebsockets::WebSocket<TokioIo<hyper::upgrade::Upgraded>>,
    tx: broadcast::Sender<String>,
) -> Result<(), WebSocketError> {
    let (mut rx, mut wr) = ws.split(tokio::io::split);
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<(OpCode, Vec<u8>)>(16);
    let mut sub = tx.subscribe();
    let writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                m = sub.recv() => match m {
                    Ok(text) => {
                        if wr.write_frame(Frame::text(Payload::Owned(text.into_bytes()))).await.is_err() { return; }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                },
                c = ctl_rx.recv() => match c {
                    Some((op, payload)) => {
                        let close = op == OpCode::Close;
                        let _ = wr.write_frame(Frame::new(true, op, None, Payload::Owned(payload))).await;
                        if close { return; }
                    }
                    None => return,
                },
            }
        }
    });
    loop {
        let ctl = ctl_tx.clone();
        let frame = rx
            .read_frame(&mut move |f: Frame<'_>| {
                let ctl = ctl.clone();
                let owned = (f.opcode, f.payload.to_vec());
                async move {
                    let _ = ctl.send(owned).await;
                    Ok::<(), WebSocketError>(())
                }
            })
            .await;
        match frame {
            Ok(f) if f.opcode == OpCode::Text => {
                let text = String::from_utf8_lossy(&f.payload).into_owned();
                // Plain text, exactly as sent, to every session (DESIGN.md: no names, no notices).
                let _ = tx.send(text);
            }
            Ok(f) if f.opcode == OpCode::Close => break,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    drop(ctl_tx);
    let _ = writer.await;
    Ok(())
}

/// Makes the demo's certificate, secret and config in `dir`.
pub fn prepare(dir: &Path, listen: SocketAddr, backend: SocketAddr) -> Result<(Config, DemoInfo), String> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .map_err(|e| format!("certificate: {e}"))?;
    let cert_pem = cert.cert.pem();
    let write = |name: &str, data: &[u8]| {
        let p = dir.join(name);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options
            .open(&p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, data))
            .map_err(|e| format!("write {}: {e}", p.display()))
            .map(|_| p)
    };
    let cert_path = write("cert.pem", cert_pem.as_bytes())?;
    let key_path = write("key.pem", cert.signing_key.serialize_pem().as_bytes())?;
    let mut secret = [0u8; 32];
    crate::tls::fill_random(&mut secret).map_err(|e| format!("random: {e:?}"))?;
    let secret_hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let secret_path = write("jwt.secret", secret_hex.as_bytes())?;
    let port = listen.port();
    let origin = if port == 443 { "https://localhost".to_string() } else { format!("https://localhost:{port}") };
    let toml = format!(
        r#"[server]
listen = "{listen}"
shutdown_grace = "5s"
[tls]
cert = "{cert}"
key = "{key}"
[backend]
url = "ws://{backend}"
http = "proxy"
[origin]
allow = ["{origin}", "https://127.0.0.1:{port}"]
[auth]
mode = "jwt"
algorithms = ["HS256"]
secret_file = "{secret}"
[auth.forward_claims]
sub = "X-Auth-User"
[admin]
listen = "127.0.0.1:0"
[log]
format = "text"
level = "info"
"#,
        cert = cert_path.display(),
        key = key_path.display(),
        secret = secret_path.display(),
    );
    let config = Config::parse(&toml).map_err(|e| e.to_string())?;
    // A day: the demo runs until Ctrl-C, and its sessions end when the token expires.
    let day = std::time::Duration::from_secs(24 * 3600);
    let token =
        crate::token_cmd::mint(secret_hex.as_bytes(), "demo", day, None, None).map_err(|e| format!("token: {e}"))?;
    let info = DemoInfo {
        page_url: format!("https://localhost:{port}/"),
        ws_url: format!("wss://localhost:{port}/ws"),
        origin,
        token,
        cert_pem,
    };
    Ok((config, info))
}
