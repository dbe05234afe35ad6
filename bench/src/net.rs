//! Connection setup for the load generator: target URL, optional TLS, source
//! address binding, the HTTP upgrade, and a small WebSocket client with
//! batched writes.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::ws::{self, FrameHeader, Rng, WsError};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest frame payload the client accepts from a server.
const MAX_PAYLOAD: usize = 16 << 20;
/// Largest HTTP response header block accepted during the upgrade.
const MAX_RESPONSE_HEAD: usize = 16 << 10;

#[derive(Debug, Clone)]
pub struct Target {
    pub tls: bool,
    pub host: String,
    pub addr: SocketAddr,
    pub host_header: String,
    pub path: String,
}

impl Target {
    /// Parses `ws://host:port/path` or `wss://host:port/path`. The host must be
    /// an IP address or `localhost` (all load stays on loopback).
    pub fn parse(url: &str) -> Result<Self, BoxError> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("wss://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("ws://") {
            (false, r)
        } else {
            return Err(format!("url must start with ws:// or wss://: {url}").into());
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            let (h, p) = h.split_once(']').ok_or("bad IPv6 authority")?;
            (h.to_string(), p.strip_prefix(':').unwrap_or(""))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p),
                None => (authority.to_string(), ""),
            }
        };
        let port: u16 = if port.is_empty() {
            if tls {
                443
            } else {
                80
            }
        } else {
            port.parse().map_err(|_| format!("bad port in {url}"))?
        };
        let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
            IpAddr::from([127, 0, 0, 1])
        } else {
            host.parse().map_err(|_| format!("host must be an IP address or localhost: {host}"))?
        };
        if !ip.is_loopback() {
            return Err(format!("refusing non-loopback target {ip}: load goes to loopback only").into());
        }
        Ok(Target {
            tls,
            host: host.clone(),
            addr: SocketAddr::new(ip, port),
            host_header: authority.to_string(),
            path: path.to_string(),
        })
    }
}

/// Builds a TLS 1.3 client config trusting only `ca_pem`. Resumption is off so
/// every session is a full handshake; one cipher suite and one key-exchange
/// group (X25519) so every proxy does the same cryptographic work.
pub fn tls_connector(ca_pem: &str) -> Result<TlsConnector, BoxError> {
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_pem)
        .map_err(|e| format!("reading CA {ca_pem}: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("parsing CA {ca_pem}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {ca_pem}").into());
    }
    for c in certs {
        roots.add(c)?;
    }
    let base = rustls::crypto::aws_lc_rs::default_provider();
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256],
        kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
        ..base
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(cfg)))
}

/// Plain TCP or TLS over TCP, without dynamic dispatch.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Everything needed to open one WebSocket session.
#[derive(Clone)]
pub struct Dialer {
    pub target: Target,
    pub tls: Option<TlsConnector>,
    pub server_name: Option<ServerName<'static>>,
    pub token: Option<String>,
    pub origin: Option<String>,
    pub sources: Vec<IpAddr>,
    pub io_timeout: Duration,
}

impl Dialer {
    pub fn new(
        url: &str,
        ca: Option<&str>,
        insecure_plain: bool,
        token: Option<String>,
        origin: Option<String>,
        sources: &str,
        io_timeout: Duration,
    ) -> Result<Self, BoxError> {
        let target = Target::parse(url)?;
        let (tls, server_name) = if target.tls {
            let ca = ca.ok_or("--ca is required for wss:// targets")?;
            let sn =
                ServerName::try_from(target.host.clone()).map_err(|e| format!("server name {}: {e}", target.host))?;
            (Some(tls_connector(ca)?), Some(sn))
        } else {
            if !insecure_plain {
                return Err("ws:// target needs --insecure-plain (no TLS)".into());
            }
            (None, None)
        };
        let sources = parse_sources(sources)?;
        Ok(Dialer { target, tls, server_name, token, origin, sources, io_timeout })
    }

    pub fn source_for(&self, i: usize) -> Option<IpAddr> {
        if self.sources.is_empty() {
            None
        } else {
            Some(self.sources[i % self.sources.len()])
        }
    }

    /// TCP connect (bound to `source` when given), TLS, HTTP upgrade, all
    /// within `io_timeout`.
    pub async fn connect(&self, source: Option<IpAddr>, seed: u64) -> Result<WsClient, BoxError> {
        match tokio::time::timeout(self.io_timeout, self.connect_inner(source, seed)).await {
            Ok(r) => r,
            Err(_) => Err(format!("connect/handshake timed out after {:?}", self.io_timeout).into()),
        }
    }

    async fn connect_inner(&self, source: Option<IpAddr>, seed: u64) -> Result<WsClient, BoxError> {
        let sock = match self.target.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(src) = source {
            sock.bind(SocketAddr::new(src, 0)).map_err(|e| format!("bind {src}: {e}"))?;
        }
        let tcp = sock.connect(self.target.addr).await.map_err(|e| format!("connect {}: {e}", self.target.addr))?;
        tcp.set_nodelay(true)?;
        let stream = match (&self.tls, &self.server_name) {
            (Some(c), Some(sn)) => {
                let s = c.connect(sn.clone(), tcp).await.map_err(|e| format!("tls: {e}"))?;
                Stream::Tls(Box::new(s))
            }
            _ => Stream::Plain(tcp),
        };
        let mut rng = Rng::new(seed);
        let key = rng.ws_key();
        let mut req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n",
            self.target.path, self.target.host_header, key
        );
        if let Some(o) = &self.origin {
            req.push_str(&format!("Origin: {o}\r\n"));
        }
        if let Some(t) = &self.token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        req.push_str("\r\n");
        let mut client = WsClient::new(stream, rng);
        client.stream.write_all(req.as_bytes()).await?;
        client.stream.flush().await?;
        // Read the response head; bytes after it stay in the read buffer.
        let head_end = loop {
            if let Some(end) = ws::find_header_end(&client.rbuf) {
                break end;
            }
            if client.rbuf.len() > MAX_RESPONSE_HEAD {
                return Err("upgrade response headers too large".into());
            }
            client.rbuf.reserve(4096);
            let n = client.stream.read_buf(&mut client.rbuf).await?;
            if n == 0 {
                return Err("connection closed during upgrade".into());
            }
        };
        let head = String::from_utf8_lossy(&client.rbuf[..head_end]).into_owned();
        client.rbuf.advance(head_end);
        let status_line = head.lines().next().unwrap_or("");
        let mut parts = status_line.split_whitespace();
        let _version = parts.next();
        if parts.next() != Some("101") {
            return Err(format!("upgrade refused: {status_line}").into());
        }
        let expected = ws::accept_key(&key);
        match ws::header_value(&head, "sec-websocket-accept") {
            Some(v) if v == expected => {}
            Some(v) => return Err(format!("bad Sec-WebSocket-Accept {v}").into()),
            None => return Err("missing Sec-WebSocket-Accept".into()),
        }
        // Release the handshake-sized buffer: idle sessions should cost the
        // generator as little as possible.
        if client.rbuf.is_empty() {
            client.rbuf = BytesMut::new();
        }
        Ok(client)
    }
}

/// A listening socket on a loopback address (backlog 8192, `SO_REUSEADDR`): the benchmark
/// never serves anything beyond this machine.
pub fn listen_loopback(addr: SocketAddr) -> Result<tokio::net::TcpListener, BoxError> {
    if !addr.ip().is_loopback() {
        return Err(format!("refusing to listen on non-loopback {addr}").into());
    }
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
    socket
        .and_then(|s| {
            s.set_reuseaddr(true)?;
            s.bind(addr)?;
            s.listen(8192)
        })
        .map_err(|e| format!("listen {addr}: {e}").into())
}

pub fn parse_sources(s: &str) -> Result<Vec<IpAddr>, BoxError> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let ip: IpAddr = part.parse().map_err(|_| format!("bad source address {part}"))?;
        if !ip.is_loopback() {
            return Err(format!("source {ip} is not a loopback address").into());
        }
        out.push(ip);
    }
    Ok(out)
}

/// A received message (payload of a complete data message).
pub enum Incoming<'a> {
    Data { opcode: u8, payload: &'a [u8] },
    Close { code: Option<u16> },
}

/// Client side of one WebSocket session. Frames are appended to `wbuf` and go
/// out together on `flush_out`.
pub struct WsClient {
    pub stream: Stream,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    frag: Vec<u8>,
    frag_opcode: Option<u8>,
    /// Bytes of the last returned frame, dropped from `rbuf` on the next call.
    consumed: usize,
    rng: Rng,
}

impl WsClient {
    fn new(stream: Stream, rng: Rng) -> Self {
        WsClient {
            stream,
            rbuf: BytesMut::with_capacity(4096),
            wbuf: Vec::new(),
            frag: Vec::new(),
            frag_opcode: None,
            consumed: 0,
            rng,
        }
    }

    /// Queues a masked frame.
    pub fn queue(&mut self, opcode: u8, payload: &[u8]) {
        let mask = self.rng.mask();
        ws::encode_frame(&mut self.wbuf, true, opcode, payload, Some(mask));
    }

    pub fn queue_close(&mut self, code: u16) {
        self.queue(ws::OP_CLOSE, &code.to_be_bytes());
    }

    /// Writes every queued frame in one `write_all` + flush.
    pub async fn flush_out(&mut self, timeout: Duration) -> Result<(), BoxError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let fut = async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(())) => {
                self.wbuf.clear();
                Ok(())
            }
            Ok(Err(e)) => Err(format!("write: {e}").into()),
            Err(_) => Err("write timed out".into()),
        }
    }

    fn release_consumed(&mut self) {
        if self.consumed > 0 {
            self.rbuf.advance(self.consumed);
            self.consumed = 0;
        }
    }

    /// Reads more bytes from the socket (at least one) within `timeout`.
    pub async fn fill(&mut self, timeout: Duration) -> Result<(), BoxError> {
        self.release_consumed();
        if self.rbuf.capacity() - self.rbuf.len() < 2048 {
            self.rbuf.reserve(16 << 10);
        }
        match tokio::time::timeout(timeout, self.stream.read_buf(&mut self.rbuf)).await {
            Ok(Ok(0)) => Err("connection closed by peer".into()),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("read: {e}").into()),
            Err(_) => Err(format!("read timed out after {timeout:?}").into()),
        }
    }

    /// Returns the next complete message already buffered, answering pings
    /// (the pong is queued, not flushed). `Ok(None)` means: call `fill`.
    /// The returned payload is valid until the next call.
    pub fn next_buffered(&mut self) -> Result<Option<Incoming<'_>>, BoxError> {
        self.release_consumed();
        loop {
            let h: FrameHeader = match ws::parse_header(&self.rbuf, MAX_PAYLOAD)? {
                Some(h) => h,
                None => return Ok(None),
            };
            if self.rbuf.len() < h.frame_len() {
                let need = h.frame_len() - self.rbuf.len();
                self.rbuf.reserve(need);
                return Ok(None);
            }
            if h.mask.is_some() {
                return Err(WsError::Protocol("masked frame from server".into()).into());
            }
            match h.opcode {
                ws::OP_PING => {
                    let payload = self.rbuf[h.header_len..h.frame_len()].to_vec();
                    self.rbuf.advance(h.frame_len());
                    self.queue(ws::OP_PONG, &payload);
                }
                ws::OP_PONG => {
                    self.rbuf.advance(h.frame_len());
                }
                ws::OP_CLOSE => {
                    let p = &self.rbuf[h.header_len..h.frame_len()];
                    let code = if p.len() >= 2 { Some(u16::from_be_bytes([p[0], p[1]])) } else { None };
                    self.rbuf.advance(h.frame_len());
                    return Ok(Some(Incoming::Close { code }));
                }
                ws::OP_TEXT | ws::OP_BINARY if h.fin => {
                    if self.frag_opcode.is_some() {
                        return Err(WsError::Protocol("new message inside a fragmented one".into()).into());
                    }
                    // Zero copy: hand out the slice, consume it on the next call.
                    self.consumed = h.frame_len();
                    return Ok(Some(Incoming::Data {
                        opcode: h.opcode,
                        payload: &self.rbuf[h.header_len..h.frame_len()],
                    }));
                }
                ws::OP_TEXT | ws::OP_BINARY => {
                    if self.frag_opcode.is_some() {
                        return Err(WsError::Protocol("new message inside a fragmented one".into()).into());
                    }
                    self.frag.clear();
                    self.frag.extend_from_slice(&self.rbuf[h.header_len..h.frame_len()]);
                    self.frag_opcode = Some(h.opcode);
                    self.rbuf.advance(h.frame_len());
                }
                _ => {
                    // Continuation.
                    let Some(op) = self.frag_opcode else {
                        return Err(WsError::Protocol("continuation without a message".into()).into());
                    };
                    if self.frag.len() + h.payload_len > MAX_PAYLOAD {
                        return Err(WsError::TooLarge(self.frag.len() + h.payload_len).into());
                    }
                    self.frag.extend_from_slice(&self.rbuf[h.header_len..h.frame_len()]);
                    self.rbuf.advance(h.frame_len());
                    if h.fin {
                        self.frag_opcode = None;
                        return Ok(Some(Incoming::Data { opcode: op, payload: &self.frag }));
                    }
                }
            }
        }
    }

    /// Sends a close and waits (bounded) for the peer's close, then shuts the
    /// stream down. Data frames still arriving are discarded.
    pub async fn close(mut self, timeout: Duration) -> Result<(), BoxError> {
        self.queue_close(1000);
        self.flush_out(timeout).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.next_buffered()? {
                Some(Incoming::Close { .. }) => break,
                Some(Incoming::Data { .. }) => continue,
                None => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        return Err("no close reply".into());
                    }
                    self.fill(left).await.map_err(|e| format!("waiting for close reply: {e}"))?;
                }
            }
        }
        let _ = tokio::time::timeout(timeout, self.stream.shutdown()).await;
        Ok(())
    }
}
