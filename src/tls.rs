//! TLS termination: the rustls server configuration built from `[tls]`.
//!
//! PEM comes from `rustls-pki-types`' `PemObject` (rustls-pemfile is archived, RUSTSEC-2025-0134).
//! Certificates for `[[tls.sni]]` names are chosen by a small resolver; an unknown or absent
//! SNI gets the `[tls]` certificate.

use crate::config::{ConfigError, TlsConfig};
use rustls::crypto::aws_lc_rs;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// Fills `buf` from aws-lc's DRBG, the generator rustls itself uses: seeded from the OS and
/// reseeded by aws-lc, it costs no syscall per call, where `getrandom` costs one. Every
/// session asks twice (the backend's `Sec-WebSocket-Key` and the mask seed).
pub fn fill_random(buf: &mut [u8]) -> Result<(), rustls::crypto::GetRandomFailed> {
    static RNG: OnceLock<&'static dyn rustls::crypto::SecureRandom> = OnceLock::new();
    RNG.get_or_init(|| aws_lc_rs::default_provider().secure_random).fill(buf)
}

/// Facts about one loaded certificate, for the expiry metric and `wsgate check`.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// The certificate's first DNS name (or its file path when it has none).
    pub server_name: String,
    /// `notAfter` as seconds since the Unix epoch.
    pub not_after: i64,
}

/// A built server config plus what was loaded into it.
pub struct LoadedTls {
    /// The rustls config handed to the acceptor.
    pub config: Arc<rustls::ServerConfig>,
    /// One entry per certificate, the default first.
    pub certs: Vec<CertInfo>,
}

/// A PEM error as text. rustls-pki-types prints the marker line it choked on as a byte array
/// (`missing section end marker: [45, 45, …]`); an operator reading a refused reload needs the
/// text. Only marker lines are quoted (never key material), clipped to 80 characters.
pub fn pem_error(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().chars().take(80).collect::<String>();
    match e {
        Error::MissingSectionEnd { end_marker } => format!("no \"-----END {}-----\" line", text(end_marker)),
        Error::IllegalSectionStart { line } => format!("malformed BEGIN line \"{}\"", text(line)),
        other => other.to_string(),
    }
}

/// Reads a PEM certificate chain.
pub fn load_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| ConfigError(format!("{key}: cannot read {}: {}", path.display(), pem_error(&e))))?;
    let certs: Vec<_> = iter
        .collect::<Result<_, _>>()
        .map_err(|e| ConfigError(format!("{key}: invalid PEM in {}: {}", path.display(), pem_error(&e))))?;
    if certs.is_empty() {
        return Err(ConfigError(format!("{key}: no CERTIFICATE block in {}", path.display())));
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path, key: &str) -> Result<PrivateKeyDer<'static>, ConfigError> {
    // Read first so that an unreadable file and a file without a key get distinct messages.
    let bytes = std::fs::read(path).map_err(|e| ConfigError(format!("{key}: cannot read {}: {e}", path.display())))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        ConfigError(format!(
            "{key}: no usable private key (PKCS#8, PKCS#1 or SEC1 PEM) in {}: {}",
            path.display(),
            pem_error(&e)
        ))
    })
}

/// Loads a chain and its key, and checks that they belong together.
fn certified_key(cert: &Path, key: &Path, what: &str) -> Result<(Arc<CertifiedKey>, CertInfo), ConfigError> {
    let chain = load_certs(cert, &format!("{what}.cert"))?;
    let der = load_key(key, &format!("{what}.key"))?;
    let signing = aws_lc_rs::default_provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| ConfigError(format!("{what}.key: unsupported private key in {}: {e}", key.display())))?;
    let info = cert_info(&chain[0], cert);
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| {
        ConfigError(format!("{what}: certificate {} and key {} do not match ({e})", cert.display(), key.display()))
    })?;
    Ok((Arc::new(ck), info))
}

fn cert_info(der: &CertificateDer<'_>, path: &Path) -> CertInfo {
    use x509_parser::prelude::*;
    match X509Certificate::from_der(der.as_ref()) {
        Ok((_, cert)) => {
            let name = cert
                .subject_alternative_name()
                .ok()
                .flatten()
                .and_then(|san| {
                    san.value.general_names.iter().find_map(|n| match n {
                        GeneralName::DNSName(d) => Some(d.to_string()),
                        _ => None,
                    })
                })
                .unwrap_or_else(|| path.display().to_string());
            CertInfo { server_name: name, not_after: cert.validity().not_after.timestamp() }
        }
        Err(_) => CertInfo { server_name: path.display().to_string(), not_after: 0 },
    }
}

/// Reads a PEM bundle into a root store.
pub fn load_roots(path: &Path, key: &str) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path, key)? {
        roots.add(c).map_err(|e| ConfigError(format!("{key}: unusable CA certificate in {}: {e}", path.display())))?;
    }
    Ok(roots)
}

/// Picks a certificate by SNI: exact names, then `*.suffix`, then the default.
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else { return Some(self.default.clone()) };
        let name = name.to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return Some(k.clone());
        }
        if let Some((_, suffix)) = name.split_once('.') {
            if let Some(k) = self.wildcard.get(suffix) {
                return Some(k.clone());
            }
        }
        Some(self.default.clone())
    }
}

/// Builds the server config from `[tls]`: versions, ALPN `http/1.1`, SNI, optional mTLS.
pub fn build(cfg: &TlsConfig) -> Result<LoadedTls, ConfigError> {
    let (default, info) = certified_key(&cfg.cert, &cfg.key, "tls")?;
    let mut certs = vec![info];
    let mut resolver = SniResolver { default, exact: HashMap::new(), wildcard: HashMap::new() };
    for (i, sni) in cfg.sni.iter().enumerate() {
        let (ck, info) = certified_key(&sni.cert, &sni.key, &format!("tls.sni[{i}]"))?;
        certs.push(info);
        for n in &sni.server_names {
            let n = n.to_ascii_lowercase();
            match n.strip_prefix("*.") {
                Some(suffix) => resolver.wildcard.insert(suffix.to_string(), ck.clone()),
                None => resolver.exact.insert(n, ck.clone()),
            };
        }
    }
    let versions: &[&'static rustls::SupportedProtocolVersion] = match cfg.min_version.as_str() {
        "1.3" => &[&rustls::version::TLS13],
        _ => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let provider = Arc::new(aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| ConfigError(format!("tls.min_version: {e}")))?;
    let builder = match &cfg.client_ca {
        Some(ca) => {
            let roots = load_roots(ca, "tls.client_ca")?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ConfigError(format!("tls.client_ca: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // One TLS 1.3 ticket per connection, not rustls' two: a chat client holds one WebSocket
    // at a time and its resumed connection gets a fresh ticket, and the 256-entry session
    // cache then serves twice as many recent clients. Measured: 2 % less CPU per new session
    // (bench/RESULTS.md).
    config.send_tls13_tickets = 1;
    Ok(LoadedTls { config: Arc::new(config), certs })
}

/// A rustls client config for `wss://` backends and the JWKS endpoint: the given CA file,
/// or the system roots.
pub fn client_config(ca_file: Option<&Path>, key: &str) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    let roots = match ca_file {
        Some(p) => load_roots(p, key)?,
        None => {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                // Unparseable system certificates are skipped, as every TLS client does.
                let _ = roots.add(c);
            }
            roots
        }
    };
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError(format!("{key}: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_pem_names_the_missing_line_as_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chain.pem");
        std::fs::write(&path, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
        let e = load_certs(&path, "tls.cert").unwrap_err().0;
        assert!(e.contains("no \"-----END CERTIFICATE-----\" line"), "{e}");
        std::fs::write(&path, "-----BEGIN CERTIFICATE\nMIIB\n").unwrap();
        let e = load_certs(&path, "tls.cert").unwrap_err().0;
        assert!(!e.contains('[') && e.contains("-----BEGIN CERTIFICATE"), "{e}");
    }

    /// `server::client_socket` holds handshake-time encrypted records back until the first
    /// response. That is only safe while the server sends nothing encrypted of its own accord
    /// between its flight and the client's Finished: no half-RTT data, no 0-RTT.
    #[test]
    fn server_config_sends_no_half_rtt_or_early_data() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
        let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let cfg = TlsConfig {
            cert: cert_path,
            key: key_path,
            min_version: "1.2".to_string(),
            client_ca: None,
            sni: Vec::new(),
        };
        let loaded = build(&cfg).unwrap();
        assert!(!loaded.config.send_half_rtt_data);
        assert_eq!(loaded.config.max_early_data_size, 0);
    }
}
