//! Test CA, server certificate and HS256 tokens for the benchmark.

use std::fs;
use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::net::BoxError;

/// Writes `ca.pem`, `cert.pem` (server certificate followed by the CA),
/// `key.pem` (PKCS#8) and `combined.pem` (chain + key, for HAProxy) to `out`.
pub fn write_certs(out: &Path, names: &[String]) -> Result<(), BoxError> {
    fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "wsgate bench CA");
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(DnType::CommonName, names.first().map(String::as_str).unwrap_or("localhost"));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer)?;

    let chain = format!("{}{}", cert.pem(), ca_cert.pem());
    let key_pem = key.serialize_pem();
    let write = |name: &str, data: &str| -> Result<(), BoxError> {
        let p = out.join(name);
        fs::write(&p, data).map_err(|e| format!("writing {}: {e}", p.display()).into())
    };
    write("ca.pem", &ca_cert.pem())?;
    write("cert.pem", &chain)?;
    write("key.pem", &key_pem)?;
    write("combined.pem", &format!("{chain}{key_pem}"))?;
    Ok(())
}

/// An HS256 token with `sub`, `iat` and `exp = now + ttl_secs`.
pub fn mint_token(
    secret: &[u8],
    sub: &str,
    ttl_secs: u64,
    aud: Option<&str>,
    iss: Option<&str>,
) -> Result<String, BoxError> {
    if secret.len() < 32 {
        return Err("JWT secret must be at least 32 bytes".into());
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let mut claims = serde_json::json!({ "sub": sub, "iat": now, "exp": now + ttl_secs });
    if let Some(a) = aud {
        claims["aud"] = a.into();
    }
    if let Some(i) = iss {
        claims["iss"] = i.into();
    }
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    let key = jsonwebtoken::EncodingKey::from_secret(secret);
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}
