//! The reference the CPU targets are set against: a plain tokio-rustls
//! byte relay. It terminates TLS and copies bytes both ways to the backend with
//! `tokio::io::copy_bidirectional`: no HTTP parsing (the client's upgrade
//! request and the backend's 101 pass through as bytes), no frames, no policy.
//! Whatever wsgate costs above this is the price of being frame-aware.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::net::BoxError;

/// Time allowed for the TLS handshake and the backend connect, so a stuck
/// client cannot hold a task forever.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until killed (or `max_seconds`, when not 0).
pub async fn run(
    listen: SocketAddr,
    backend: SocketAddr,
    cert: &Path,
    key: &Path,
    max_seconds: u64,
) -> Result<(), BoxError> {
    if !backend.ip().is_loopback() {
        return Err(format!("refusing a non-loopback backend {backend}").into());
    }
    let acceptor = acceptor(cert, key)?;
    let listener = crate::net::listen_loopback(listen)?;
    eprintln!("byte relay listening on {listen}, backend {backend}");
    let serving = serve(listener, acceptor, backend);
    if max_seconds == 0 {
        serving.await;
    } else {
        let _ = tokio::time::timeout(Duration::from_secs(max_seconds), serving).await;
    }
    Ok(())
}

/// rustls with aws-lc-rs and default settings, one certificate chain.
fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, BoxError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn serve(listener: TcpListener, acceptor: TlsAcceptor, backend: SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A failed session is the client's business; the relay goes on.
                    let _ = relay(sock, acceptor, backend).await;
                });
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                eprintln!("byte relay: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn relay(sock: TcpStream, acceptor: TlsAcceptor, backend: SocketAddr) -> Result<(), BoxError> {
    sock.set_nodelay(true)?;
    let setup = async {
        let tls = acceptor.accept(sock).await?;
        let up = TcpStream::connect(backend).await?;
        up.set_nodelay(true)?;
        Ok::<_, std::io::Error>((tls, up))
    };
    let (mut tls, mut up) = tokio::time::timeout(SETUP_TIMEOUT, setup).await??;
    tokio::io::copy_bidirectional(&mut tls, &mut up).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{self, HandshakeArgs, Probe, Report, ThroughputArgs};
    use crate::net::Dialer;

    /// The byte relay carries the upgrade, echoes checked byte for byte and whole sessions
    /// through real TLS to the echo backend, so a `bytecopy` figure is a working relay's.
    #[tokio::test]
    async fn relays_sessions_to_the_echo_backend() {
        let dir = std::env::temp_dir().join(format!("wsgate-bench-relay-test-{}", std::process::id()));
        crate::certs::write_certs(&dir, &["localhost".to_string()]).unwrap();
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = echo.local_addr().unwrap();
        tokio::spawn(crate::echo::accept_loop(echo));
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = front.local_addr().unwrap().port();
        tokio::spawn(serve(front, acceptor(&dir.join("cert.pem"), &dir.join("key.pem")).unwrap(), backend));

        let ca = dir.join("ca.pem");
        let d = Arc::new(
            Dialer::new(
                &format!("wss://localhost:{port}/echo"),
                ca.to_str(),
                false,
                None,
                None,
                "",
                Duration::from_secs(5),
            )
            .unwrap(),
        );
        let none = || Probe::new(vec![], vec![]);
        let timeout = Duration::from_secs(30);
        for size in [64, 70_000] {
            let a = ThroughputArgs { sessions: 3, messages: 40, duration: Duration::ZERO, size, window: 8, timeout };
            assert!(load::throughput(d.clone(), a, none(), Report::new("throughput", "test", None)).await);
        }
        let a = HandshakeArgs { sessions: 10, concurrency: 4, timeout };
        assert!(load::handshake(d, a, none(), Report::new("handshake", "test", None)).await);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
