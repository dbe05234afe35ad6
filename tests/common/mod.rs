//! Test harness: a test CA (rcgen), the real `wsgate` binary on loopback, real backends, and
//! tokio-tungstenite as an independent WebSocket client.
#![allow(dead_code, clippy::result_large_err, clippy::zombie_processes)]

use futures_util::{SinkExt, StreamExt};
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request as HsRequest, Response as HsResponse};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The HMAC secret every test config uses (via `secret_file`).
pub const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";
pub const ORIGIN: &str = "https://chat.example.com";

/// A test CA and a server certificate for localhost / 127.0.0.1 signed by it.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub serial: Vec<u8>,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "wsgate test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let ca_pem = ca_cert.pem();
        let ca = rcgen::Issuer::new(ca_params, ca_key);
        let mut pki = Pki {
            cert_path: dir.path().join("cert.pem"),
            key_path: dir.path().join("key.pem"),
            dir,
            ca_pem,
            serial: vec![],
            ca,
        };
        pki.issue(&[1, 2, 3, 4]);
        std::fs::write(pki.dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
        pki
    }

    /// Issues a new server certificate with this serial and writes it over cert.pem/key.pem.
    pub fn issue(&mut self, serial: &[u8]) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        p.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
        let cert = p.signed_by(&key, &self.ca).unwrap();
        std::fs::write(&self.cert_path, cert.pem()).unwrap();
        std::fs::write(&self.key_path, key.serialize_pem()).unwrap();
        self.serial = serial.to_vec();
    }

    /// Issues a server certificate for `names` into `<stem>.pem` / `<stem>.key` in the
    /// PKI's directory; returns their paths.
    pub fn issue_for(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let p = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = p.signed_by(&key, &self.ca).unwrap();
        let (c, k) = (self.dir.path().join(format!("{stem}.pem")), self.dir.path().join(format!("{stem}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        Arc::new(self.client_builder().with_no_client_auth())
    }

    /// A client config that presents a client certificate issued by this CA (for mTLS).
    pub fn client_config_with_cert(&self) -> Arc<rustls::ClientConfig> {
        let key = rcgen::KeyPair::generate().unwrap();
        let p = rcgen::CertificateParams::new(vec!["client.test".to_string()]).unwrap();
        let cert = p.signed_by(&key, &self.ca).unwrap();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Arc::new(self.client_builder().with_client_auth_cert(vec![cert.der().clone()], key).unwrap())
    }

    fn client_builder(&self) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
        let mut roots = rustls::RootCertStore::empty();
        let ca = rustls_pki_types::CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap();
        roots.add(ca).unwrap();
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
    }
}

use rustls_pki_types::pem::PemObject;

/// A running `wsgate run` process; killed on drop.
pub struct Proxy {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub logs: Arc<Mutex<Vec<String>>>,
    pub config_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// Writes `config` (with `{cert}`, `{key}`, `{secret}` placeholders filled) and starts
    /// the binary; waits for its "started" log line.
    pub fn start(pki: &Pki, config: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, SECRET).unwrap();
        let text = fill(config, pki, &secret);
        let config_path = dir.path().join("wsgate.toml");
        std::fs::write(&config_path, text).unwrap();
        Proxy::start_file(config_path, dir)
    }

    /// Like [`Proxy::start`], with extra environment variables for the process (e.g.
    /// `NOTIFY_SOCKET`).
    pub fn start_with_env(pki: &Pki, config: &str, env: &[(&str, &str)]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, SECRET).unwrap();
        let text = fill(config, pki, &secret);
        let config_path = dir.path().join("wsgate.toml");
        std::fs::write(&config_path, text).unwrap();
        Proxy::start_file_env(config_path, dir, env)
    }

    fn start_file(config_path: PathBuf, dir: tempfile::TempDir) -> Proxy {
        Proxy::start_file_env(config_path, dir, &[])
    }

    fn start_file_env(config_path: PathBuf, dir: tempfile::TempDir, env: &[(&str, &str)]) -> Proxy {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(["run", "--config"])
            .arg(&config_path)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wsgate");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let logs = logs.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line.clone());
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => panic!("wsgate did not start; logs: {:?}", logs.lock().unwrap()),
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            if v["event"] == "started" {
                let listen = v["listen"]
                    .as_str()
                    .unwrap()
                    .trim_matches(|c| c == '[' || c == ']')
                    .split(',')
                    .next()
                    .unwrap()
                    .trim()
                    .to_string();
                let admin = v["admin"].as_str().unwrap().to_string();
                return Proxy {
                    child,
                    addr: listen.parse().unwrap(),
                    admin: admin.parse().unwrap(),
                    logs,
                    config_path,
                    _dir: dir,
                };
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("wss://localhost:{}{}", self.addr.port(), path)
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status().unwrap();
        assert!(st.success());
    }

    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits until a log line contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.log_text().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// GETs a path on the admin listener; returns (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.1
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn fill(config: &str, pki: &Pki, secret: &Path) -> String {
    config
        .replace("{cert}", &pki.cert_path.display().to_string())
        .replace("{key}", &pki.key_path.display().to_string())
        .replace("{secret}", &secret.display().to_string())
        .replace("{ca}", &pki.dir.path().join("ca.pem").display().to_string())
}

/// A config for a backend at `backend` with `extra` appended (TOML sections or keys in
/// `[limits]`, which comes last).
pub fn config(backend: SocketAddr, extra_limits: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
handshake_timeout = "3s"
shutdown_grace = "5s"
[tls]
cert = "{{cert}}"
key = "{{key}}"
[backend]
url = "ws://{backend}"
connect_timeout = "1s"
[origin]
allow = ["{ORIGIN}", "https://*.example.org"]
[auth]
mode = "jwt"
algorithms = ["HS256"]
secret_file = "{{secret}}"
[auth.forward_claims]
sub = "X-Auth-User"
[admin]
listen = "127.0.0.1:0"
[log]
format = "json"
level = "info"
[limits]
max_connections_per_ip = 50
handshakes_per_second_per_ip = 1000
handshake_burst_per_ip = 1000
max_pending_handshakes_per_ip = 500
{extra_limits}
"#
    )
}

pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// An HS256 token with the test secret.
pub fn token(sub: &str, ttl_secs: i64) -> String {
    let now = now_unix() as i64;
    let claims = serde_json::json!({"sub": sub, "iat": now, "exp": now + ttl_secs});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Builder for a client handshake.
pub struct Connect<'a> {
    pub proxy: &'a Proxy,
    pub pki: &'a Pki,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub source: Option<IpAddr>,
}

pub fn connect<'a>(proxy: &'a Proxy, pki: &'a Pki) -> Connect<'a> {
    Connect {
        proxy,
        pki,
        path: "/chat".into(),
        headers: vec![
            ("Origin".into(), ORIGIN.into()),
            ("Authorization".into(), format!("Bearer {}", token("alice", 3600))),
        ],
        source: None,
    }
}

impl Connect<'_> {
    pub fn path(mut self, p: &str) -> Self {
        self.path = p.into();
        self
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(k));
        self.headers.push((k.into(), v.into()));
        self
    }
    pub fn without(mut self, k: &str) -> Self {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(k));
        self
    }
    pub fn from(mut self, ip: &str) -> Self {
        self.source = Some(ip.parse().unwrap());
        self
    }

    /// Performs the handshake; Err carries the HTTP status on refusal.
    pub async fn go(self) -> Result<(Client, tokio_tungstenite::tungstenite::handshake::client::Response), Refused> {
        let mut req = self.proxy.url(&self.path).into_client_request().unwrap();
        for (k, v) in &self.headers {
            req.headers_mut().insert(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                hyper::header::HeaderValue::from_str(v).unwrap(),
            );
        }
        let tcp = match self.source {
            Some(ip) => {
                let s = TcpSocket::new_v4().unwrap();
                s.bind(SocketAddr::new(ip, 0)).unwrap();
                s.connect(self.proxy.addr).await.map_err(|e| Refused::Io(e.to_string()))?
            }
            None => TcpStream::connect(self.proxy.addr).await.map_err(|e| Refused::Io(e.to_string()))?,
        };
        let connector = Connector::Rustls(self.pki.client_config());
        let fut = tokio_tungstenite::client_async_tls_with_config(req, tcp, None, Some(connector));
        match tokio::time::timeout(Duration::from_secs(10), fut).await {
            Err(_) => Err(Refused::Io("handshake timed out".into())),
            Ok(Ok(x)) => Ok(x),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => Err(Refused::Status(
                resp.status().as_u16(),
                resp.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect(),
            )),
            Ok(Err(e)) => Err(Refused::Io(e.to_string())),
        }
    }
}

#[derive(Debug)]
pub enum Refused {
    Status(u16, Vec<(String, String)>),
    Io(String),
}

impl Refused {
    pub fn status(&self) -> u16 {
        match self {
            Refused::Status(s, _) => *s,
            Refused::Io(e) => panic!("expected an HTTP status, got I/O error {e}"),
        }
    }
    pub fn header(&self, name: &str) -> Option<String> {
        match self {
            Refused::Status(_, h) => h.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone()),
            Refused::Io(_) => None,
        }
    }
}

/// What a backend saw of one session.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub messages: Vec<Message>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
    }
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone()).collect()
    }
}

/// Backend behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Echo every data message back.
    Echo,
    /// Record only.
    Sink,
}

/// A hand-scripted tokio-tungstenite backend: `script(n, ws)` runs for the `n`-th WebSocket
/// session it accepts (counting from 0), each in its own task.
pub async fn scripted_backend<F, Fut>(script: F) -> SocketAddr
where
    F: Fn(usize, WebSocketStream<TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let script = Arc::new(script);
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let script = script.clone();
            tokio::spawn(async move {
                if let Ok(ws) = tokio_tungstenite::accept_async(tcp).await {
                    script(n, ws).await;
                }
            });
        }
    });
    addr
}

/// A tokio-tungstenite backend. `sessions` receives each session's record when it ends.
pub struct Backend {
    pub addr: SocketAddr,
    pub sessions: mpsc::UnboundedReceiver<Seen>,
    pub protocol: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start(mode: Mode) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let protocol: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let proto = protocol.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let tx = tx.clone();
                let proto = proto.clone();
                tokio::spawn(async move {
                    let seen = Arc::new(Mutex::new(Seen::default()));
                    let s2 = seen.clone();
                    let cb = move |req: &HsRequest, mut resp: HsResponse| {
                        let mut s = s2.lock().unwrap();
                        s.path = req.uri().to_string();
                        s.headers = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                            .collect();
                        if let Some(p) = proto.lock().unwrap().clone() {
                            resp.headers_mut().insert("sec-websocket-protocol", p.parse().unwrap());
                        }
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await else { return };
                    while let Some(Ok(m)) = ws.next().await {
                        match &m {
                            Message::Text(_) | Message::Binary(_) => {
                                seen.lock().unwrap().messages.push(m.clone());
                                if mode == Mode::Echo && ws.send(m).await.is_err() {
                                    break;
                                }
                            }
                            Message::Close(_) => {
                                seen.lock().unwrap().messages.push(m.clone());
                            }
                            _ => {}
                        }
                    }
                    let _ = tx.send(seen.lock().unwrap().clone());
                });
            }
        });
        Backend { addr, sessions: rx, protocol, task }
    }

    /// The next finished session, within a timeout.
    pub async fn next_session(&mut self) -> Seen {
        tokio::time::timeout(Duration::from_secs(10), self.sessions.recv())
            .await
            .expect("backend session timed out")
            .expect("backend gone")
    }
}

/// Reads messages until a close arrives; returns the close frame (code, reason).
pub async fn expect_close(ws: &mut Client, timeout: Duration) -> Option<(u16, String)> {
    let end = Instant::now() + timeout;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Err(_) => panic!("no close within {timeout:?}"),
            Ok(None) => return None,
            Ok(Some(Err(_))) => return None,
            Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| (u16::from(f.code), f.reason.to_string())),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

pub fn close_frame(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: reason.to_string().into() }))
}

/// Minimal HTTP/1.1 GET on a plaintext address.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A raw TLS connection to the proxy (for hand-written requests and frames).
pub async fn raw_tls(proxy: &Proxy, pki: &Pki) -> tokio_rustls::client::TlsStream<TcpStream> {
    tls_connect(proxy, pki.client_config(), "localhost").await.unwrap()
}

/// A TLS connection to the proxy with this client config, sending `name` as SNI. With
/// TLS 1.3 it completes before the proxy has judged the client's side (a missing client
/// certificate shows on the first read).
pub async fn tls_connect(
    proxy: &Proxy,
    cc: Arc<rustls::ClientConfig>,
    name: &'static str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(proxy.addr).await?;
    let name = rustls_pki_types::ServerName::try_from(name).map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(cc).connect(name, tcp).await
}

/// A hand-written upgrade request for /chat with the allowed Origin, a valid token and
/// `extra` header lines.
pub fn upgrade_request(extra: &str) -> String {
    format!(
        "GET /chat HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {ORIGIN}\r\n\
         Authorization: Bearer {}\r\n{extra}\r\n",
        token("raw", 600)
    )
}

/// Sends [`upgrade_request`] and returns the first 12 bytes of the answer (`HTTP/1.1 101`
/// when upgraded), or the error that ended the stream.
pub async fn send_upgrade<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
) -> Result<Vec<u8>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(upgrade_request("").as_bytes()).await.map_err(|e| e.to_string())?;
    let mut got = vec![0u8; 12];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await {
        Ok(Ok(_)) => Ok(got),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 5 s".to_string()),
    }
}

/// Performs an upgrade by hand on a raw TLS stream and returns the stream after the 101.
pub async fn raw_upgrade(proxy: &Proxy, pki: &Pki) -> tokio_rustls::client::TlsStream<TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = raw_tls(proxy, pki).await;
    s.write_all(upgrade_request("").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut b).await.unwrap();
        assert!(n == 1, "closed during upgrade: {}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

/// A masked client frame, written by hand.
pub fn raw_frame(fin: bool, opcode: u8, masked: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 | opcode } else { opcode }];
    let m = if masked { 0x80 } else { 0 };
    if payload.len() < 126 {
        out.push(m | payload.len() as u8);
    } else if payload.len() < 65536 {
        out.push(m | 126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    }
    let key = [0x37, 0xfa, 0x21, 0x3d];
    if masked {
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// Reads one server frame from a raw stream: (opcode, payload).
pub async fn read_raw_frame<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut h)).await.ok()?.ok()?;
    let mut len = (h[1] & 0x7f) as u64;
    if len == 126 {
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.ok()?;
        len = u16::from_be_bytes(b) as u64;
    } else if len == 127 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).await.ok()?;
        len = u64::from_be_bytes(b);
    }
    let mut p = vec![0u8; len as usize];
    s.read_exact(&mut p).await.ok()?;
    Some((h[0] & 0x0f, p))
}
