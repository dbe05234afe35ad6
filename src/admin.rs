//! The admin listener (plaintext, loopback by default): `/metrics` (Prometheus text format),
//! `/healthz` (200 while the process runs) and `/readyz` (200 while accepting; 503 while
//! draining, or while a `jwks_url` has not been fetched yet and every token would be refused).

use crate::state::Shared;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use tokio::net::TcpListener;

fn respond(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
    r
}

fn route<B>(shared: &Shared, req: &Request<B>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => respond(StatusCode::OK, crate::metrics::CONTENT_TYPE, {
            // Live at scrape time: the table grows between sweeps, which is what to watch.
            shared.metrics.per_ip_keys.set(shared.limiter.tracked_keys() as i64);
            shared.metrics.set_jwks(shared.policy.load().auth.as_ref().and_then(|a| a.jwks_fetched_at()));
            shared.metrics.encode()
        }),
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if !shared.is_accepting() => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n"),
        // Every token would be refused: let the balancer send clients to a replica that can.
        "/readyz" if shared.policy.load().not_ready().is_some() => {
            respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "no JWT keys yet (jwks_url not fetched)\n")
        }
        "/readyz" => respond(StatusCode::OK, "text/plain", "ready\n"),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Serves the admin endpoints until the process exits (it keeps answering during a drain).
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let s = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let r = route(&s, &req);
                async move { Ok::<_, std::convert::Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}
