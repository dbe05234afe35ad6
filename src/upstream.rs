//! The backend side: URL joining, the request the backend sees (forwarding headers added,
//! client copies and credentials scrubbed), and the client handshake over `ws://` or `wss://`.
//!
//! The handshake is written out here rather than taken from fastwebsockets' `handshake::client`
//! because that one does not verify `Sec-WebSocket-Accept` (DESIGN.md, known gaps) and would
//! hand back a boxed hyper `Upgraded` stream; ours returns the raw stream for the relay.

use crate::config::ConfigError;
use base64::Engine;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use sha1::{Digest, Sha1};
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// The GUID of RFC 6455 §1.3.
const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest backend handshake response we read.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// A parsed `backend.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendUrl {
    /// `wss://`
    pub tls: bool,
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// Port (default 80 / 443).
    pub port: u16,
    /// Value of the `Host` header.
    pub authority: String,
    /// Path prefix without a trailing slash ("" for none).
    pub prefix: String,
}

impl BackendUrl {
    /// Parses `ws://host[:port][/prefix]` or `wss://…`; a query or fragment is refused.
    pub fn parse(url: &str) -> Result<BackendUrl, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("ws://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("wss://") {
            (true, r)
        } else {
            return Err(format!("{url:?} must start with ws:// or wss://"));
        };
        if rest.contains(['?', '#']) {
            return Err(format!("{url:?}: a query or fragment is not allowed in the backend URL"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("{url:?}: missing or invalid host"));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| format!("{url:?}: unclosed IPv6 bracket"))?;
            let port = match after {
                "" => default_port,
                p => {
                    p.strip_prefix(':').and_then(|p| p.parse().ok()).ok_or_else(|| format!("{url:?}: invalid port"))?
                }
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| format!("{url:?}: invalid port"))?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?}: missing host"));
        }
        Ok(BackendUrl {
            tls,
            host,
            port,
            authority: authority.to_string(),
            prefix: path.trim_end_matches('/').to_string(),
        })
    }

    /// Joins the prefix and the client's path and query without doubling a slash.
    pub fn join(&self, path_and_query: &str) -> String {
        let pq =
            if path_and_query.starts_with('/') { path_and_query.to_string() } else { format!("/{path_and_query}") };
        format!("{}{}", self.prefix, pq)
    }
}

/// Headers the proxy sets itself; client copies are always removed and claim headers may not
/// use these names.
pub fn is_reserved_header(name: &HeaderName) -> bool {
    const RESERVED: &[&str] = &[
        "host",
        "connection",
        "upgrade",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "content-length",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
        "forwarded",
    ];
    RESERVED.contains(&name.as_str())
}

/// `name` with underscores read as dashes, when it has any. CGI, WSGI and Rack backends turn
/// both into one variable (`X_Real_IP` and `X-Real-IP` are both `HTTP_X_REAL_IP`), so names
/// are compared in this form: a client's underscore spelling of a header the proxy removes
/// would spoof it, and so would a configured claim header spelt with underscores.
pub fn dashed(name: &HeaderName) -> Option<HeaderName> {
    let s = name.as_str();
    if !s.contains('_') {
        return None;
    }
    HeaderName::from_bytes(s.replace('_', "-").as_bytes()).ok()
}

/// Why the backend handshake failed: 502 or 504.
#[derive(Debug)]
pub enum UpstreamError {
    /// Refused, unreachable, TLS failure or a non-101 answer (502).
    Unreachable(String),
    /// Not done within `connect_timeout` (504).
    Timeout,
}

/// A connected backend stream, plain or TLS.
pub enum BackendStream {
    /// `ws://`
    Plain(TcpStream),
    /// `wss://`
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for BackendStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl crate::relay::RelayIo for BackendStream {
    fn buffer_last(&mut self, last: &[u8]) -> usize {
        match self {
            BackendStream::Plain(s) => s.buffer_last(last),
            BackendStream::Tls(s) => s.buffer_last(last),
        }
    }

    fn has_end_message(&self) -> bool {
        match self {
            BackendStream::Plain(s) => s.has_end_message(),
            BackendStream::Tls(s) => s.has_end_message(),
        }
    }
}

/// Everything needed to reach the backend, built once per config.
pub struct Upstream {
    /// The parsed URL.
    pub url: BackendUrl,
    /// TLS client config for `wss://`.
    tls: Option<tokio_rustls::TlsConnector>,
    /// `connect_timeout`.
    pub timeout: Duration,
}

impl Upstream {
    /// Builds from `[backend]`.
    pub fn new(cfg: &crate::config::BackendConfig) -> Result<Upstream, ConfigError> {
        let url = BackendUrl::parse(&cfg.url).map_err(|e| ConfigError(format!("backend.url: {e}")))?;
        let tls = if url.tls {
            let mut c = (*crate::tls::client_config(cfg.ca_file.as_deref(), "backend.ca_file")?).clone();
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(tokio_rustls::TlsConnector::from(Arc::new(c)))
        } else {
            // Unused with ws://, but a file the config names must exist and parse all the same.
            if cfg.ca_file.is_some() {
                crate::tls::client_config(cfg.ca_file.as_deref(), "backend.ca_file")?;
            }
            None
        };
        Ok(Upstream { url, tls, timeout: cfg.connect_timeout.get() })
    }

    /// Opens TCP (and TLS) to the backend.
    pub async fn connect_stream(&self) -> Result<BackendStream, UpstreamError> {
        self.connect_sending(&[]).await.map(|(stream, _)| stream)
    }

    /// Opens TCP (and TLS) to the backend. Over plain TCP, `first` goes out as soon as the
    /// connection is up (see [`connect_tcp`]); the answer says how much of it was sent.
    async fn connect_sending(&self, first: &[u8]) -> Result<(BackendStream, usize), UpstreamError> {
        let first = if self.tls.is_none() { first } else { &[] };
        let (tcp, sent) = connect_tcp(&self.url.host, self.url.port, first)
            .await
            .map_err(|e| UpstreamError::Unreachable(format!("connect {}: {e}", self.url.authority)))?;
        match &self.tls {
            None => Ok((BackendStream::Plain(tcp), sent)),
            Some(conn) => {
                let name = rustls_pki_types::ServerName::try_from(self.url.host.clone())
                    .map_err(|e| UpstreamError::Unreachable(format!("backend host name: {e}")))?;
                let s = conn
                    .connect(name, tcp)
                    .await
                    .map_err(|e| UpstreamError::Unreachable(format!("TLS to {}: {e}", self.url.authority)))?;
                Ok((BackendStream::Tls(Box::new(s)), 0))
            }
        }
    }

    /// Connects and performs the WebSocket handshake within `connect_timeout`.
    pub async fn handshake(&self, req: &BackendRequest) -> Result<Connected, UpstreamError> {
        match tokio::time::timeout(self.timeout, self.handshake_inner(req)).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Timeout),
        }
    }

    async fn handshake_inner(&self, req: &BackendRequest) -> Result<Connected, UpstreamError> {
        let key = {
            let mut k = [0u8; 16];
            crate::tls::fill_random(&mut k).map_err(|e| UpstreamError::Unreachable(format!("random key: {e:?}")))?;
            base64::engine::general_purpose::STANDARD.encode(k)
        };
        let head = req.encode(&self.url, &key);
        let (mut stream, sent) = self.connect_sending(&head).await?;
        stream.write_all(&head[sent..]).await.map_err(|e| UpstreamError::Unreachable(format!("write: {e}")))?;
        stream.flush().await.map_err(|e| UpstreamError::Unreachable(format!("flush: {e}")))?;

        let mut buf = Vec::with_capacity(1024);
        let mut line_checked = false;
        let head_len = loop {
            if let Some(i) = find_head_end(&buf) {
                break i;
            }
            if !line_checked {
                match first_line_valid(&buf, false) {
                    Some(false) => {
                        return Err(UpstreamError::Unreachable("backend answered something that is not HTTP".into()))
                    }
                    Some(true) => line_checked = true,
                    None => line_checked = buf.len() > FIRST_LINE_CHECKED,
                }
            }
            if buf.len() >= MAX_RESPONSE_HEAD {
                return Err(UpstreamError::Unreachable("backend response head too large".into()));
            }
            buf.reserve(2048);
            let n = stream.read_buf(&mut buf).await.map_err(|e| UpstreamError::Unreachable(format!("read: {e}")))?;
            if n == 0 {
                return Err(UpstreamError::Unreachable("backend closed during the handshake".into()));
            }
        };
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        resp.parse(&buf[..head_len]).map_err(|e| UpstreamError::Unreachable(format!("bad response: {e}")))?;
        let status = resp.code.unwrap_or(0);
        if status != 101 {
            return Err(UpstreamError::Unreachable(format!("backend answered {status} instead of 101")));
        }
        let get = |n: &str| resp.headers.iter().find(|h| h.name.eq_ignore_ascii_case(n)).map(|h| h.value);
        let has_token = |n: &str, t: &str| {
            resp.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case(n))
                .flat_map(|h| h.value.split(|b| *b == b','))
                .any(|v| v.trim_ascii().eq_ignore_ascii_case(t.as_bytes()))
        };
        if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
            return Err(UpstreamError::Unreachable("backend 101 without Upgrade: websocket".into()));
        }
        if get("sec-websocket-accept") != Some(accept_key(key.as_bytes()).as_bytes()) {
            return Err(UpstreamError::Unreachable("backend sent a wrong Sec-WebSocket-Accept".into()));
        }
        if get("sec-websocket-extensions").is_some() {
            return Err(UpstreamError::Unreachable("backend negotiated an extension that was not offered".into()));
        }
        let protocol = match get("sec-websocket-protocol") {
            None => None,
            Some(p) => {
                let p =
                    std::str::from_utf8(p).map_err(|_| UpstreamError::Unreachable("bad subprotocol".into()))?.trim();
                if !req.protocols.iter().any(|o| o == p) {
                    return Err(UpstreamError::Unreachable("backend chose a subprotocol that was not offered".into()));
                }
                Some(p.to_string())
            }
        };
        let starts =
            |name: &str, prefix: &str| name.get(..prefix.len()).is_some_and(|p| p.eq_ignore_ascii_case(prefix));
        let passes = |name: &str| {
            !NOT_PASSED_BACK.iter().any(|n| name.eq_ignore_ascii_case(n))
                && !starts(name, "sec-websocket-")
                && !starts(name, "websocket-")
                // Headers the backend's `Connection` names are hop-by-hop too (RFC 9110 §7.6.1).
                && !has_token("connection", name)
        };
        let mut passed = Vec::new();
        for h in resp.headers.iter().filter(|h| passes(h.name)) {
            passed.extend_from_slice(h.name.as_bytes());
            passed.extend_from_slice(b": ");
            passed.extend_from_slice(h.value);
            passed.extend_from_slice(b"\r\n");
        }
        let leftover = buf.split_off(head_len);
        Ok(Connected { stream, protocol, leftover, headers: passed })
    }
}

/// Headers of the backend's 101 that the client's 101 does not repeat, besides every
/// `Sec-WebSocket-*` and `WebSocket-*` one (the handshake's own, answered by the proxy for its
/// side; a legacy `Sec-WebSocket-Location` would also name the backend's address) and those
/// the backend's `Connection` names: hop-by-hop ones, framing, and `Server`/`Date` (as nginx
/// hides them). The rest (`Set-Cookie`, the backend's own `X-` headers) reach the client, as
/// behind nginx.
const NOT_PASSED_BACK: [&str; 11] = [
    "upgrade",
    "connection",
    "content-length",
    "transfer-encoding",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "server",
    "date",
];

/// TCP to `host:port`, trying each resolved address in turn as `TcpStream::connect` does,
/// with `TCP_NODELAY` set; `first` (may be empty) is sent as soon as the connection is up,
/// and the answer says how much of it went.
///
/// `TcpStream::connect` returns only after the runtime has reported the new socket
/// writable, so the upgrade request used to wait a trip through the scheduler and a
/// `getsockopt`. When the backend answers at once (on the same host the kernel completes the
/// three-way handshake inside `connect`), the request now leaves in the same turn, and the
/// backend, still waking up for its `accept`, finds it there instead of being woken again
/// for it. A backend farther away gets the usual wait for writability and error check.
async fn connect_tcp(host: &str, port: u16, first: &[u8]) -> io::Result<(TcpStream, usize)> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        match connect_addr(addr, first).await {
            Ok(x) => return Ok(x),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to connect to")))
}

async fn connect_addr(addr: std::net::SocketAddr, first: &[u8]) -> io::Result<(TcpStream, usize)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    let _ = sock.set_tcp_nodelay(true);
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // Still connecting answers EAGAIN; a refused connection answers its error here.
    let sent = match first.is_empty() {
        true => 0,
        false => match sock.send(first) {
            Ok(n) => n,
            // Linux answers EAGAIN while the handshake is under way; ENOTCONN is the other
            // answer a kernel may give then. Either way the wait below settles it.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOTCONN) => 0,
            Err(e) => return Err(e),
        },
    };
    let tcp = TcpStream::from_std(sock.into())?;
    if sent == 0 {
        tcp.writable().await?;
        if let Some(e) = tcp.take_error()? {
            return Err(e);
        }
    }
    Ok((tcp, sent))
}

/// Whether a comma-separated header (`Connection`, `Upgrade`) lists `token`, in any of its
/// lines, compared case-insensitively.
pub fn header_has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Appends `Name: value\r\n` for every header (HTTP/1.1 head encoding), names in their
/// conventional capitalisation.
pub fn write_headers<'a>(out: &mut Vec<u8>, headers: impl IntoIterator<Item = (&'a HeaderName, &'a HeaderValue)>) {
    for (n, v) in headers {
        write_name(out, n.as_str());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Writes a (lower-case) header name as `X-Forwarded-For`, `Sec-WebSocket-Key`, `X-Real-IP`.
///
/// Why: field names are case-insensitive, but the legacy servers wsgate sits in front of
/// sometimes match them byte for byte, and every browser and proxy sends them capitalised.
fn write_name(out: &mut Vec<u8>, name: &str) {
    for (i, word) in name.split('-').enumerate() {
        if i > 0 {
            out.push(b'-');
        }
        match word {
            "websocket" => out.extend_from_slice(b"WebSocket"),
            "ip" => out.extend_from_slice(b"IP"),
            "www" => out.extend_from_slice(b"WWW"),
            _ => {
                let mut bytes = word.bytes();
                if let Some(first) = bytes.next() {
                    out.push(first.to_ascii_uppercase());
                    out.extend(bytes);
                }
            }
        }
    }
}

/// How much of a head is checked as it arrives (see [`first_line_valid`]): bounded, so a head
/// trickled a byte at a time is not parsed again and again from its start.
pub const FIRST_LINE_CHECKED: usize = 1024;

/// Whether the start of a head can still be HTTP, judged before the head is complete: `Some(false)`
/// when it cannot (a random blob, another protocol's banner), `Some(true)` once its first line
/// is complete and valid, `None` while it may still be either. Bytes that are not HTTP then get
/// their answer at once, not when the head's timeout runs out.
pub fn first_line_valid(buf: &[u8], request: bool) -> Option<bool> {
    let mut none: [httparse::Header<'_>; 0] = [];
    let parsed = if request {
        httparse::Request::new(&mut none).parse(buf).map(|s| s.is_partial())
    } else {
        httparse::Response::new(&mut none).parse(buf).map(|s| s.is_partial())
    };
    match parsed {
        // The first line parsed; the headers that follow are checked with the whole head.
        Err(httparse::Error::TooManyHeaders) | Ok(false) => Some(true),
        Err(_) => Some(false),
        Ok(true) => buf.contains(&b'\n').then_some(true),
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(WS_GUID);
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// A backend that accepted the upgrade.
pub struct Connected {
    /// The stream, positioned after the 101 response.
    pub stream: BackendStream,
    /// The backend's chosen subprotocol.
    pub protocol: Option<String>,
    /// Frame bytes that arrived with the response head.
    pub leftover: Vec<u8>,
    /// The backend 101's headers that the client's 101 repeats, as `Name: value\r\n` lines
    /// (empty, unallocated, when there are none).
    pub headers: Vec<u8>,
}

/// What the backend is sent: path, scrubbed client headers, forwarding and claim headers.
#[derive(Debug, Default)]
pub struct BackendRequest {
    /// Client path and query, token parameter removed.
    pub path_and_query: String,
    /// Client headers that pass through (already scrubbed).
    pub headers: HeaderMap,
    /// Subprotocols offered to the backend (token entries removed).
    pub protocols: Vec<String>,
}

impl BackendRequest {
    /// Builds the backend request from the client's headers: copies end-to-end headers except
    /// reserved ones and `drop` (claim headers and the like, as [`dashed`] names),
    /// then sets `X-Forwarded-For`, `X-Real-IP`, `X-Forwarded-Proto` and `extra`.
    pub fn new(
        path_and_query: String,
        client_headers: &HeaderMap,
        drop: &[HeaderName],
        client_ip: IpAddr,
        extra: Vec<(HeaderName, HeaderValue)>,
        protocols: Vec<String>,
    ) -> BackendRequest {
        // Headers the client's `Connection` names are hop-by-hop for this hop only (RFC 9110
        // §7.6.1), such as an h2c offer's `HTTP2-Settings`. What the proxy sets itself is
        // inserted below, after this filter, so naming it here changes nothing.
        let hop_by_hop = |name: &HeaderName| header_has_token(client_headers, hyper::header::CONNECTION, name.as_str());
        // `drop` holds dashed names (`Policy::build`); client names are compared dashed too.
        let removed = |name: &HeaderName| {
            let d = dashed(name);
            let n = d.as_ref().unwrap_or(name);
            is_reserved_header(n) || drop.contains(n) || hop_by_hop(name) || (d.is_some() && hop_by_hop(n))
        };
        let mut headers = HeaderMap::with_capacity(client_headers.len() + 4);
        for (name, value) in client_headers {
            if removed(name) {
                continue;
            }
            headers.append(name.clone(), value.clone());
        }
        let ip = HeaderValue::from_str(&client_ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        headers.insert(HeaderName::from_static("x-forwarded-for"), ip.clone());
        headers.insert(HeaderName::from_static("x-real-ip"), ip);
        headers.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static("https"));
        for (n, v) in extra {
            headers.insert(n, v);
        }
        BackendRequest { path_and_query, headers, protocols }
    }

    /// The HTTP/1.1 upgrade request head.
    fn encode(&self, url: &BackendUrl, key: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(b"GET ");
        out.extend_from_slice(url.join(&self.path_and_query).as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        out.extend_from_slice(url.authority.as_bytes());
        out.extend_from_slice(
            b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ",
        );
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\r\n");
        if !self.protocols.is_empty() {
            out.extend_from_slice(b"Sec-WebSocket-Protocol: ");
            out.extend_from_slice(self.protocols.join(", ").as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        write_headers(&mut out, &self.headers);
        out.extend_from_slice(b"\r\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_line_is_judged_before_the_head_is_complete() {
        let req = |b: &[u8]| first_line_valid(b, true);
        assert_eq!(req(b"GET /chat HT"), None);
        assert_eq!(req(b"GET /chat HTTP/1.1\r\n"), Some(true));
        assert_eq!(req(b"GET /chat HTTP/1.1\r\nHost: a"), Some(true));
        assert_eq!(req(b"\r\nGET / HTTP/1.1\nHost"), Some(true));
        assert_eq!(req(b"\x16\x03\x01\x02\x00"), Some(false));
        assert_eq!(req(b"GET /chat HTTP/9.1\r\n"), Some(false));
        let resp = |b: &[u8]| first_line_valid(b, false);
        assert_eq!(resp(b"HTTP/1.1 101 Switching"), None);
        assert_eq!(resp(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"), Some(true));
        assert_eq!(resp(b"SSH-2.0-OpenSSH_9.6\r\n"), Some(false));
        assert_eq!(resp(b"-ERR unknown command\r\n"), Some(false));
    }

    #[test]
    fn header_names_are_capitalised() {
        let mut h = HeaderMap::new();
        for n in ["x-forwarded-for", "x-real-ip", "sec-websocket-protocol", "www-authenticate", "origin", "x-auth-user"]
        {
            h.insert(HeaderName::from_static(n), HeaderValue::from_static("v"));
        }
        let mut out = Vec::new();
        write_headers(&mut out, &h);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "X-Forwarded-For: v\r\nX-Real-IP: v\r\nSec-WebSocket-Protocol: v\r\nWWW-Authenticate: v\r\nOrigin: v\r\n\
             X-Auth-User: v\r\n"
        );
    }

    #[test]
    fn headers_named_in_connection_stay_on_the_client_hop() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, X-Hop, x-forwarded-for"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-end", HeaderValue::from_static("2"));
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        let r = BackendRequest::new("/".into(), &h, &[], "203.0.113.1".parse().unwrap(), Vec::new(), Vec::new());
        assert!(r.headers.get("x-hop").is_none());
        assert_eq!(r.headers.get("x-end").unwrap(), "2");
        // Naming a header the proxy sets only removes the client's copy.
        assert_eq!(r.headers.get("x-forwarded-for").unwrap(), "203.0.113.1");
    }

    #[test]
    fn removed_headers_are_compared_with_underscores_read_as_dashes() {
        // A claim header configured as `X_Auth_User`: `Policy::build` stores it dashed.
        let configured = HeaderName::from_static("x_auth_user");
        let drop = [dashed(&configured).unwrap()];
        let mut h = HeaderMap::new();
        for n in ["x-auth-user", "x_auth_user", "x_forwarded_for", "x_custom"] {
            h.insert(HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_static("mallory"));
        }
        let claim = vec![(configured.clone(), HeaderValue::from_static("alice"))];
        let r = BackendRequest::new("/".into(), &h, &drop, "203.0.113.1".parse().unwrap(), claim, Vec::new());
        let names: Vec<&str> = r.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(r.headers.get_all(&configured).iter().collect::<Vec<_>>(), ["alice"]);
        assert!(!names.contains(&"x-auth-user") && !names.contains(&"x_forwarded_for"), "{names:?}");
        assert!(names.contains(&"x_custom"), "{names:?}");
    }

    #[test]
    fn url_parse_and_join() {
        let u = BackendUrl::parse("ws://h:8080/base/").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.prefix.as_str()), ("h", 8080, "/base"));
        assert_eq!(u.join("/chat?room=1"), "/base/chat?room=1");
        let u = BackendUrl::parse("wss://[::1]").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 443));
        assert_eq!(u.join("/"), "/");
        assert!(BackendUrl::parse("ws://h/x?q=1").is_err());
        assert!(BackendUrl::parse("http://h").is_err());
    }

    #[test]
    fn accept_key_rfc_example() {
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }
}
