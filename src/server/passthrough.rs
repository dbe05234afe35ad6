//! Plain HTTP passthrough (`backend.http = "proxy"`): the chat's own pages, served by hyper.
//! Not subject to Origin or JWT, but the per-IP rate, header scrubbing and token removal
//! apply exactly as for upgrades (DESIGN.md, fine print).

use super::Head;
use crate::admission::{self, client_ip, token};
use crate::state::{Policy, Shared};
use crate::upstream::UpstreamError;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How long a backend may take to send its response head.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Headers per request hyper parses (its default is 100). The upgrade path takes as many as
/// fit in the 16 KiB head; here each request reserves room for this many (32 bytes each),
/// so it is a bound rather than the head's worst case of one header per 4 bytes.
const MAX_HEADERS: usize = 1024;

type Body = BoxBody<Bytes, hyper::Error>;

/// A stream that first replays bytes already read (the request head).
struct Prefixed<S> {
    pre: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.pos < self.pre.len() {
            let n = (self.pre.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.pre[start..start + n]);
            self.pos += n;
            if self.pos == self.pre.len() {
                self.pre = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn encode_head(head: &Head) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target.as_bytes());
    out.extend_from_slice(if head.version == 0 { b" HTTP/1.0\r\n" } else { b" HTTP/1.1\r\n" });
    crate::upstream::write_headers(&mut out, &head.headers);
    out.extend_from_slice(b"\r\n");
    out
}

fn plain(status: StatusCode, headers: &[(HeaderName, HeaderValue)]) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(status.canonical_reason().unwrap_or("error"))).map_err(|n| match n {}).boxed(),
    );
    *r.status_mut() = status;
    for (n, v) in headers {
        r.headers_mut().insert(n.clone(), v.clone());
    }
    r
}

/// Serves the rest of the connection with hyper, starting with the request already read.
pub async fn serve<S>(shared: Arc<Shared>, policy: Arc<Policy>, io: S, head: Head, leftover: Vec<u8>, peer_ip: IpAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut pre = encode_head(&head);
    pre.extend_from_slice(&leftover);
    let io = TokioIo::new(Prefixed { pre, pos: 0, inner: io });
    // The next request's head must arrive within `handshake_timeout`, as the first one did:
    // a kept-alive connection is not a way around the slowloris bound, and an idle one ends.
    let head_timeout = policy.config.server.handshake_timeout.get();
    let svc_shared = shared.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = svc_shared.clone();
        let policy = policy.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(&shared, &policy, req, peer_ip).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_headers(MAX_HEADERS)
        .max_buf_size(super::MAX_HEAD.max(8192))
        .serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shared.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(Duration::from_secs(5), conn).await.unwrap_or(Ok(()))
        }
    };
    if let Err(e) = result {
        hyper_refused(&shared, peer_ip, &e);
    }
}

/// hyper answers a request head it cannot parse itself (431, 400) and then ends the
/// connection with the error: that answer is a rejection like ours, logged once and counted.
/// A head that did not come in time ends the connection without an answer, as most often it
/// is a kept-alive connection gone quiet, which is no one's fault.
fn hyper_refused(shared: &Shared, peer_ip: IpAddr, e: &hyper::Error) {
    let r = if e.is_parse_too_large() {
        super::Rejection::new(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large")
    } else if e.is_parse() {
        super::Rejection::new(StatusCode::BAD_REQUEST, "bad_request")
    } else {
        return;
    };
    note_rejection(shared, peer_ip, &r);
}

async fn handle(shared: &Shared, policy: &Policy, req: Request<Incoming>, peer_ip: IpAddr) -> Response<Body> {
    let client_ip = client_ip::client_ip(peer_ip, req.headers(), &policy.trusted);
    if let Err(r) = admission::check_rate(shared, policy, client_ip) {
        return rejected(shared, client_ip, r);
    }
    // A WebSocket upgrade is admitted (Origin, token) only as the first request of its own
    // connection; here it is a logged refusal that closes this one, so the client's retry
    // starts fresh. Any other `Upgrade` (h2c, ...) is an offer a proxy may ignore: it is
    // hop-by-hop, removed with `Connection`, and the request goes through as plain HTTP.
    if crate::upstream::header_has_token(req.headers(), hyper::header::UPGRADE, "websocket") {
        let close = HeaderValue::from_static("close");
        let r = super::Rejection::new(StatusCode::BAD_REQUEST, "bad_request").with(hyper::header::CONNECTION, close);
        return rejected(shared, client_ip, r);
    }
    let (parts, body) = req.into_parts();
    let target = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let url = &policy.upstream.url;
    let path = url.join(&token::scrub_path(target, &policy.sources, None));

    let mut headers = parts.headers.clone();
    token::scrub_headers(&mut headers, &policy.sources, None);
    let scrubbed = crate::upstream::BackendRequest::new(
        path.clone(),
        &headers,
        &policy.dropped_headers,
        client_ip,
        Vec::new(),
        Vec::new(),
    );
    let mut out = Request::builder().method(parts.method).uri(path);
    if let Some(h) = out.headers_mut() {
        *h = scrubbed.headers;
        if let Ok(v) = HeaderValue::from_str(&url.authority) {
            h.insert(hyper::header::HOST, v);
        }
        if let Some(len) = parts.headers.get(hyper::header::CONTENT_LENGTH) {
            h.insert(hyper::header::CONTENT_LENGTH, len.clone());
        }
        if let Some(te) = parts.headers.get(hyper::header::TRANSFER_ENCODING) {
            h.insert(hyper::header::TRANSFER_ENCODING, te.clone());
        }
    }
    let Ok(out) = out.body(body) else { return plain(StatusCode::BAD_REQUEST, &[]) };

    // A backend failure is answered, logged and counted like the upgrade path's 502/504.
    let failed = |e: UpstreamError| rejected(shared, client_ip, super::backend_failed(shared, e));
    let stream = match tokio::time::timeout(policy.upstream.timeout, policy.upstream.connect_stream()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return failed(e),
        Err(_) => return failed(UpstreamError::Timeout),
    };
    // Title-case names like the upgrade path (`X-Forwarded-For`): legacy servers may match
    // header names byte for byte.
    let handshake = hyper::client::conn::http1::Builder::new().title_case_headers(true).handshake(TokioIo::new(stream));
    let (mut sender, conn) = match handshake.await {
        Ok(x) => x,
        Err(e) => return failed(UpstreamError::Unreachable(format!("HTTP handshake: {e}"))),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    match tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(out)).await {
        // Passthrough requests never ask to upgrade (those take the WebSocket path, with its
        // Origin and token checks): a 101 here is a broken backend, not a switch to relay.
        Ok(Ok(resp)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            failed(UpstreamError::Unreachable("a 101 to a request that did not ask to upgrade".into()))
        }
        Ok(Ok(resp)) => resp.map(|b| b.boxed()),
        Ok(Err(e)) => failed(UpstreamError::Unreachable(format!("request: {e}"))),
        Err(_) => failed(UpstreamError::Timeout),
    }
}

/// Logs and counts a refused passthrough request, and answers it.
fn rejected(shared: &Shared, client_ip: IpAddr, r: super::Rejection) -> Response<Body> {
    note_rejection(shared, client_ip, &r);
    plain(r.status, &r.headers)
}

/// The count and the one log line of a passthrough rejection, whoever answered it.
fn note_rejection(shared: &Shared, client_ip: IpAddr, r: &super::Rejection) {
    shared.metrics.handshake(r.reason);
    super::log_rejected(client_ip, r, true);
}
