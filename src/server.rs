//! The accept loop and each connection's way to a session: pending-handshake guard, PROXY
//! header, TLS, the request head (408/431), admission, backend handshake, 101, relay.
//!
//! The upgrade request head is read and answered here directly (httparse, the parser hyper
//! uses) rather than through hyper's connection machinery: the proxy needs the 408/431 rules of
//! DESIGN.md, must answer only after the backend accepted, and hands the raw TLS stream to
//! the relay. Plain HTTP passthrough (`backend.http = "proxy"`) is served by hyper, see
//! [`crate::server::passthrough`].

mod client_socket;
mod passthrough;
mod pending_log;

use crate::admission::{self, client_ip, proxy_protocol, Rejection};
use crate::state::Shared;
use crate::upstream::{self, UpstreamError};
use client_socket::ClientSocket;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::StatusCode;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head (DESIGN.md: headers over 16 KiB get 431).
pub const MAX_HEAD: usize = 16 * 1024;

/// Serves every listener until the drain starts.
pub async fn serve(shared: Arc<Shared>, listeners: Vec<TcpListener>) {
    let drops = Arc::new(pending_log::DropLog::default());
    let mut loops = Vec::new();
    for l in listeners {
        loops.push(tokio::spawn(accept_loop(shared.clone(), l, drops.clone())));
    }
    let d = drops.clone();
    let flusher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(pending_log::FLUSH_EVERY);
        loop {
            tick.tick().await;
            d.flush(false);
        }
    });
    for l in loops {
        let _ = l.await;
    }
    flusher.abort();
    drops.flush(true);
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, drops: Arc<pending_log::DropLog>) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(event = "accept_error", error = %e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (key, max) = {
            let policy = shared.policy.load();
            let limits = &policy.config.limits;
            let ip = peer.ip().to_canonical();
            // Grouped by prefix like every per-IP limit, except trusted balancers: each one
            // is a peer of its own, whatever network it shares with the others.
            let key = match policy.trusted.is_trusted(ip) {
                true => admission::limits::IpKey::new(ip, 32, 128),
                false => admission::limits::IpKey::from_config(ip, limits),
            };
            (key, limits.max_pending_handshakes_per_ip)
        };
        let Some(guard) = shared.pending.try_enter(key, max) else {
            // Dropped before any TLS work; summarised in the log, not one line each.
            shared.metrics.handshake("pending_dropped");
            drops.record(key);
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let s = shared.clone();
        shared.tasks.spawn(async move {
            connection(s, tcp, peer, guard).await;
        });
    }
}

/// A parsed request head.
pub struct Head {
    /// Method.
    pub method: String,
    /// Path and query as sent.
    pub target: String,
    /// HTTP/1.x minor version.
    pub version: u8,
    /// Headers.
    pub headers: HeaderMap,
}

enum HeadError {
    TooLarge,
    Timeout { started: bool },
    Closed,
    Malformed,
}

/// Reads the request head until its empty line; returns it and any bytes after it.
async fn read_head<S: AsyncRead + Unpin>(io: &mut S, deadline: Instant) -> Result<(Head, Vec<u8>), HeadError> {
    let mut buf = Vec::with_capacity(2048);
    // Where the next search for the end starts: a head trickled a byte per record is not
    // scanned again from its start after every read.
    let mut scanned = 0;
    let mut line_checked = false;
    loop {
        if let Some(end) = head_end(&buf, scanned) {
            let head = parse_head(&buf[..end])?;
            return Ok((head, buf.split_off(end)));
        }
        if !line_checked && !buf.is_empty() {
            match upstream::first_line_valid(&buf, true) {
                Some(false) => return Err(HeadError::Malformed),
                Some(true) => line_checked = true,
                None => line_checked = buf.len() > upstream::FIRST_LINE_CHECKED,
            }
        }
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        // An end could start with the last two bytes (`\n\r` before a `\n`).
        scanned = buf.len().saturating_sub(2);
        // Straight into `buf`: a stack chunk would be held across the await, in every
        // connection's future.
        let want = 4096.min(MAX_HEAD + 4 - buf.len());
        buf.reserve(want);
        match tokio::time::timeout_at(deadline.into(), io.read_buf(&mut bytes::BufMut::limit(&mut buf, want))).await {
            Err(_) => return Err(HeadError::Timeout { started: !buf.is_empty() }),
            Ok(Ok(0)) | Ok(Err(_)) => return Err(HeadError::Closed),
            Ok(Ok(_)) => {}
        }
    }
}

/// Where the head ends: after the first empty line. Lines may end in a bare LF (RFC 9112
/// §2.2 lets a server accept it, as nginx and hyper do); the request sent on is rebuilt, so
/// the backend sees CRLF either way.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut from = from;
    while let Some(i) = buf[from..].iter().position(|&b| b == b'\n').map(|i| from + i) {
        match buf.get(i + 1..) {
            Some([b'\n', ..]) => return Some(i + 2),
            Some([b'\r', b'\n', ..]) => return Some(i + 3),
            _ => from = i + 1,
        }
    }
    None
}

/// The request target as path and query. The absolute form (`GET https://host/chat`), which
/// a server must accept (RFC 9112 §3.2.2), is reduced to its path and query; `*` and the
/// authority form name no resource.
fn origin_form(target: &str) -> Option<String> {
    if target.starts_with('/') {
        return Some(target.to_string());
    }
    let uri: hyper::Uri = target.parse().ok()?;
    uri.scheme()?;
    // `http://h?x=1` has the path and query `?x=1`: the path is `/`.
    let pq = uri.path_and_query().map_or("", |p| p.as_str());
    Some(if pq.starts_with('/') { pq.to_string() } else { format!("/{pq}") })
}

fn parse_head(bytes: &[u8]) -> Result<Head, HeadError> {
    let mut hs = [httparse::EMPTY_HEADER; 128];
    let mut many = Vec::new();
    let mut req = httparse::Request::new(&mut hs);
    let mut parsed = req.parse(bytes);
    if let Err(httparse::Error::TooManyHeaders) = parsed {
        // Only the head's size is limited (431 is decided before parsing): a head under it
        // with many short headers is parsed in full. A header takes a line, so the line
        // count bounds the array.
        many.resize(bytes.iter().filter(|&&b| b == b'\n').count(), httparse::EMPTY_HEADER);
        req = httparse::Request::new(&mut many);
        parsed = req.parse(bytes);
    }
    match parsed {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(HeadError::Malformed),
    }
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| HeadError::Malformed)?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| HeadError::Malformed)?;
        headers.append(name, value);
    }
    let version = req.version.unwrap_or(1);
    // HTTP/1.1 requires exactly one Host (RFC 9112 §3.2: 400 otherwise); 1.0 at most one.
    let hosts = headers.get_all(hyper::header::HOST).iter().count();
    if hosts > 1 || (hosts == 0 && version >= 1) {
        return Err(HeadError::Malformed);
    }
    Ok(Head {
        method: req.method.unwrap_or("").to_string(),
        target: origin_form(req.path.unwrap_or("/")).ok_or(HeadError::Malformed)?,
        version,
        headers,
    })
}

/// Writes a short error response and closes.
async fn respond<S: AsyncWrite + Unpin>(io: &mut S, status: StatusCode, extra: &[(HeaderName, HeaderValue)]) {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\nConnection: close\r\nContent-Type: text/plain\r\n");
    upstream::write_headers(&mut out, extra.iter().map(|(n, v)| (n, v)));
    let body = status.canonical_reason().unwrap_or("error");
    out.extend_from_slice(format!("Content-Length: {}\r\n\r\n{body}\n", body.len() + 1).as_bytes());
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = io.write_all(&out).await;
        let _ = io.shutdown().await;
    })
    .await;
}

/// Logs and counts a refused handshake, then answers it.
async fn reject<S: AsyncWrite + Unpin>(shared: &Shared, io: &mut S, client_ip: IpAddr, start: Instant, r: Rejection) {
    shared.metrics.handshake(r.reason);
    shared.metrics.handshake_duration.observe(start.elapsed().as_secs_f64());
    log_rejected(client_ip, &r, false);
    respond(io, r.status, &r.headers).await;
}

/// The answer to a backend that failed (502, or 504 when too slow), counted in
/// `wsgate_backend_connect_errors_total`; the caller answers and logs it, with the detail.
fn backend_failed(shared: &Shared, e: UpstreamError) -> Rejection {
    let (status, reason, detail) = match e {
        UpstreamError::Unreachable(d) => (StatusCode::BAD_GATEWAY, "backend_unreachable", d),
        UpstreamError::Timeout => (StatusCode::GATEWAY_TIMEOUT, "backend_timeout", "timed out".into()),
    };
    shared.metrics.backend_errors.get_or_create(&crate::metrics::ResultLabel { result: reason }).inc();
    Rejection { error: Some(detail), ..Rejection::new(status, reason) }
}

/// The one log line of a refused request (DESIGN.md: every rejection is logged once). A
/// backend failure is the operator's problem rather than the client's: warn, with its detail.
fn log_rejected(client_ip: IpAddr, r: &Rejection, passthrough: bool) {
    let (status, passthrough) = (r.status.as_u16(), passthrough.then_some(true));
    match &r.error {
        Some(error) => {
            tracing::warn!(event = "rejected", client_ip = %client_ip, reason = r.reason, status, passthrough, error = %error)
        }
        None => {
            tracing::info!(event = "rejected", client_ip = %client_ip, reason = r.reason, status, passthrough, detail = r.detail)
        }
    }
}

/// The answer to an upgrade the drain overtook. Not `global_cap`: a deploy must not look like
/// the session cap being hit.
fn draining() -> Rejection {
    Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "draining")
}

/// Runs a phase until the drain starts (`None` then). Before the upgrade request is complete,
/// connections that are not sessions yet (port scans, slow or half-sent requests) must not
/// hold the exit back until `handshake_timeout`: they are dropped without an answer.
async fn or_drain<F: std::future::Future>(shared: &Shared, phase: F) -> Option<F::Output> {
    tokio::select! {
        r = phase => Some(r),
        _ = shared.shutdown.cancelled() => None,
    }
}

async fn connection(
    shared: Arc<Shared>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    pending: admission::limits::PendingGuard,
) {
    let start = Instant::now();
    let policy = shared.policy.load_full();
    let deadline = start + policy.config.server.handshake_timeout.get();

    // PROXY protocol from a trusted balancer names the client; anyone else is a direct client.
    let mut peer_ip = peer.ip().to_canonical();
    if policy.trusted.proxy_protocol() && policy.trusted.is_trusted(peer_ip) {
        let Some(header) =
            or_drain(&shared, tokio::time::timeout_at(deadline.into(), proxy_protocol::read_header(&mut tcp))).await
        else {
            return;
        };
        match header {
            Ok(Ok(Some(src))) => peer_ip = src.ip().to_canonical(),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                // `reason` is the metric's label; status 0: closed without an HTTP answer.
                tracing::info!(event = "rejected", client_ip = %peer_ip, reason = "bad_request", status = 0, error = %e);
                shared.metrics.handshake("bad_request");
                return;
            }
            Err(_) => {
                shared.metrics.handshake("handshake_timeout");
                tracing::info!(event = "rejected", client_ip = %peer_ip, reason = "handshake_timeout", status = 0);
                return;
            }
        }
    }

    let Some(accepted) =
        or_drain(&shared, tokio::time::timeout_at(deadline.into(), policy.acceptor.accept(ClientSocket::new(tcp))))
            .await
    else {
        return;
    };
    let mut tls = match accepted {
        Ok(Ok(mut s)) => {
            s.get_mut().0.handshake_done();
            // Boxed once here: the stream (1.2 KiB of rustls state) then moves through this
            // future, the session task and the relay as a pointer. Unboxed, each of those
            // futures kept its own copy (async fn arguments are stored beside the locals they
            // move into): 3.6 KiB more per idle session and a memcpy at every hand-over.
            Box::new(s)
        }
        Ok(Err(e)) => {
            // A rejection like any other (a client certificate missing or from another CA,
            // or no TLS at all); status 0: closed without an HTTP answer.
            shared.metrics.handshake("tls_failed");
            tracing::info!(event = "rejected", client_ip = %peer_ip, reason = "tls_failed", status = 0, error = %e);
            return;
        }
        Err(_) => {
            shared.metrics.handshake("handshake_timeout");
            tracing::info!(event = "rejected", client_ip = %peer_ip, reason = "handshake_timeout", status = 0);
            return;
        }
    };

    let Some(head) = or_drain(&shared, read_head(&mut tls, deadline)).await else { return };
    let (head, leftover) = match head {
        Ok(x) => x,
        Err(HeadError::TooLarge) => {
            let r = Rejection::new(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large");
            return reject(&shared, &mut tls, peer_ip, start, r).await;
        }
        Err(HeadError::Timeout { started }) => {
            shared.metrics.handshake("handshake_timeout");
            tracing::info!(event = "rejected", client_ip = %peer_ip, reason = "handshake_timeout", status = if started { 408 } else { 0 });
            if started {
                shared.metrics.handshake_duration.observe(start.elapsed().as_secs_f64());
                respond(&mut tls, StatusCode::REQUEST_TIMEOUT, &[]).await;
            }
            return;
        }
        Err(HeadError::Malformed) => {
            let r = Rejection::new(StatusCode::BAD_REQUEST, "bad_request");
            return reject(&shared, &mut tls, peer_ip, start, r).await;
        }
        Err(HeadError::Closed) => return,
    };

    // The client IP: the peer, or what a trusted proxy's header says.
    let client_ip = if policy.trusted.proxy_protocol() {
        peer_ip
    } else {
        client_ip::client_ip(peer_ip, &head.headers, &policy.trusted)
    };

    if !upstream::header_has_token(&head.headers, hyper::header::UPGRADE, "websocket") {
        if policy.config.backend.http == crate::config::HttpMode::Proxy {
            drop(pending);
            return passthrough::serve(shared.clone(), policy, tls, head, leftover, peer_ip).await;
        }
        let r = Rejection::new(StatusCode::UPGRADE_REQUIRED, "not_websocket")
            .with(hyper::header::UPGRADE, HeaderValue::from_static("websocket"));
        return reject(&shared, &mut tls, client_ip, start, r).await;
    }
    let Some(key) = valid_upgrade(&head) else {
        // RFC 6455 §4.4: a refused upgrade (perhaps of another version) names the one we speak.
        let r = Rejection::new(StatusCode::BAD_REQUEST, "bad_request")
            .with(hyper::header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return reject(&shared, &mut tls, client_ip, start, r).await;
    };

    // Admission may wait too (a JWKS refetch for an unknown key id): the drain cuts it short.
    let Some(admitted) =
        or_drain(&shared, admission::admit(&shared, &policy, &head.headers, &head.target, client_ip)).await
    else {
        return reject(&shared, &mut tls, client_ip, start, draining()).await;
    };
    let admitted = match admitted {
        Ok(a) => a,
        Err(r) => return reject(&shared, &mut tls, client_ip, start, r).await,
    };

    // A drain answers an upgrade still waiting on the backend at once, instead of holding the
    // exit back for `connect_timeout` or leaving it unanswered at `shutdown_grace`.
    let Some(connected) = or_drain(&shared, policy.upstream.handshake(&admitted.backend_request)).await else {
        return reject(&shared, &mut tls, client_ip, start, draining()).await;
    };
    let connected = match connected {
        Ok(c) => c,
        Err(e) => {
            let r = backend_failed(&shared, e);
            return reject(&shared, &mut tls, client_ip, start, r).await;
        }
    };
    if shared.shutdown.is_cancelled() {
        return reject(&shared, &mut tls, client_ip, start, draining()).await;
    }

    // Answer 101 with the backend's chosen subprotocol.
    let protocol = match (&connected.protocol, admitted.token_in_protocol) {
        (Some(p), _) => Some(p.as_str()),
        (None, true) => Some(admission::token::TOKEN_PROTOCOL),
        (None, false) => None,
    };
    let mut resp = Vec::with_capacity(256);
    resp.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    resp.extend_from_slice(upstream::accept_key(key.as_bytes()).as_bytes());
    if let Some(p) = protocol {
        resp.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
        resp.extend_from_slice(p.as_bytes());
    }
    resp.extend_from_slice(b"\r\n");
    resp.extend_from_slice(&connected.headers);
    resp.extend_from_slice(b"\r\n");
    if tls.write_all(&resp).await.is_err() || tls.flush().await.is_err() {
        return;
    }
    drop(pending);
    shared.metrics.handshake("accepted");
    shared.metrics.handshake_duration.observe(start.elapsed().as_secs_f64());
    drop(policy);

    // The relay runs in a task of its own: this handshake future (buffers, headers, TLS
    // accept state) is freed now instead of living as long as the session.
    let session = Session {
        client: tls,
        client_pre: leftover,
        backend: connected.stream,
        backend_pre: connected.leftover,
        policy: admitted.policy,
        client_ip,
        sub: admitted.sub,
        _permits: (admitted.ip_permit, admitted.global_permit),
    };
    shared.tasks.spawn(run_session(shared.clone(), session));
}

/// An admitted session: both sockets, its policy, and the permits it holds until it ends.
struct Session {
    client: Box<tokio_rustls::server::TlsStream<ClientSocket>>,
    client_pre: Vec<u8>,
    backend: upstream::BackendStream,
    backend_pre: Vec<u8>,
    policy: crate::relay::SessionPolicy,
    client_ip: IpAddr,
    sub: Option<String>,
    /// Per-IP and global slots, released when the session is dropped, on every path.
    _permits: (admission::limits::SessionPermit, admission::limits::GlobalPermit),
}

async fn run_session(shared: Arc<Shared>, s: Session) {
    shared.metrics.sessions_active.inc();
    let began = Instant::now();
    let end = crate::relay::run(
        s.client,
        s.client_pre,
        s.backend,
        s.backend_pre,
        s.policy,
        shared.shutdown.clone(),
        shared.draining(),
        shared.metrics.as_ref(),
    )
    .await;
    shared.metrics.sessions_active.dec();
    shared.metrics.close(end.code, end.initiator.as_str());
    tracing::info!(
        event = "session_end",
        client_ip = %s.client_ip,
        sub = s.sub.as_deref().unwrap_or(""),
        duration_ms = began.elapsed().as_millis() as u64,
        msgs_in = end.msgs_in,
        msgs_out = end.msgs_out,
        bytes_in = end.bytes_in,
        bytes_out = end.bytes_out,
        close_code = end.code,
        initiator = end.initiator.as_str(),
        reason = end.reason,
    );
}

/// Checks the RFC 6455 §4.2.1 requirements; returns the `Sec-WebSocket-Key`.
fn valid_upgrade(head: &Head) -> Option<String> {
    use base64::Engine;
    if head.method != "GET" || head.version != 1 {
        return None;
    }
    if !upstream::header_has_token(&head.headers, hyper::header::CONNECTION, "upgrade") {
        return None;
    }
    // Key and version appear exactly once in a request (RFC 6455 §11.3.1, §11.3.5): with two,
    // the proxy and the backend could each read another.
    let once = |name| {
        let mut all = head.headers.get_all(name).iter();
        all.next().filter(|_| all.next().is_none())
    };
    if once(hyper::header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return None;
    }
    // An upgrade carries no body: a length or chunked coding is refused (no smuggling).
    if head.headers.contains_key(hyper::header::TRANSFER_ENCODING)
        || head.headers.get(hyper::header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0")
    {
        return None;
    }
    let key = once(hyper::header::SEC_WEBSOCKET_KEY)?.to_str().ok()?.trim();
    let raw = base64::engine::general_purpose::STANDARD.decode(key).ok()?;
    (raw.len() == 16).then(|| key.to_string())
}

/// Binds every `server.listen` address.
pub async fn bind(addrs: &[SocketAddr]) -> io::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for a in addrs {
        let sock = if a.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        sock.set_reuseaddr(true)?;
        sock.bind(*a).map_err(|e| io::Error::new(e.kind(), format!("bind {a}: {e}")))?;
        out.push(sock.listen(4096)?);
    }
    Ok(out)
}
