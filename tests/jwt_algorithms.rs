//! JWT verification end to end through the real binary (issue 3): every algorithm family
//! with keys generated here (HS256 secret, RS256/ES256/EdDSA `public_key_file`, `jwks_file`
//! by `kid`, `jwks_url` over HTTPS with rotation), and each way a token can be refused.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const INVALID: &str = "Bearer error=\"invalid_token\"";

/// A generated signing key and what the proxy needs to verify it.
struct Pair {
    enc: EncodingKey,
    public_pem: String,
    public_raw: Vec<u8>,
    alg: Algorithm,
}

impl Pair {
    fn new(alg: Algorithm) -> Pair {
        let rc = match alg {
            Algorithm::RS256 => &rcgen::PKCS_RSA_SHA256,
            Algorithm::ES256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Algorithm::EdDSA => &rcgen::PKCS_ED25519,
            _ => unreachable!(),
        };
        let kp = rcgen::KeyPair::generate_for(rc).unwrap();
        let pem = kp.serialize_pem();
        let enc = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(pem.as_bytes()),
            Algorithm::ES256 => EncodingKey::from_ec_pem(pem.as_bytes()),
            _ => EncodingKey::from_ed_pem(pem.as_bytes()),
        }
        .unwrap();
        Pair { enc, public_pem: kp.public_key_pem(), public_raw: kp.public_key_raw().to_vec(), alg }
    }

    fn sign(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&h, claims, &self.enc).unwrap()
    }

    fn jwk(&self, kid: &str) -> Value {
        let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        let raw = &self.public_raw;
        let mut v = match self.alg {
            Algorithm::RS256 => {
                serde_json::to_value(jsonwebtoken::jwk::Jwk::from_encoding_key(&self.enc, self.alg).unwrap()).unwrap()
            }
            Algorithm::ES256 => json!({ "kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65]) }),
            _ => json!({ "kty": "OKP", "crv": "Ed25519", "x": b64(raw) }),
        };
        v["kid"] = json!(kid);
        v
    }
}

fn claims(sub: &str) -> Value {
    let now = now_unix();
    json!({ "sub": sub, "iat": now, "exp": now + 600 })
}

fn hs(alg: Algorithm, secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
}

/// The base config with `[auth]`'s algorithms and key source replaced.
fn auth_config(backend: std::net::SocketAddr, algs: &str, key_line: &str, auth_extra: &str) -> String {
    let cfg = config(backend, "");
    let old = "algorithms = [\"HS256\"]\nsecret_file = \"{secret}\"\n";
    assert!(cfg.contains(old));
    cfg.replace(old, &format!("algorithms = [{algs}]\n{key_line}\n{auth_extra}"))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

async fn admitted(proxy: &Proxy, pki: &Pki, backend: &mut Backend, token: &str, sub: &str) {
    let r = connect(proxy, pki).header("Authorization", &format!("Bearer {token}")).go().await;
    let (ws, _) = r.unwrap_or_else(|e| panic!("{sub}: refused: {e:?}"));
    drop(ws);
    assert_eq!(backend.next_session().await.header("x-auth-user").as_deref(), Some(sub));
}

async fn refused(proxy: &Proxy, pki: &Pki, token: &str, what: &str) {
    let e = connect(proxy, pki).header("Authorization", &format!("Bearer {token}")).go().await.unwrap_err();
    assert_eq!(e.status(), 401, "{what}");
    assert_eq!(e.header("www-authenticate").as_deref(), Some(INVALID), "{what}");
}

/// `alg: none` with an empty signature.
fn alg_none(claims: &Value) -> String {
    let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let p = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{h}.{p}.")
}

/// Flips one character of the signature.
fn tampered(t: &str) -> String {
    let (rest, sig) = t.rsplit_once('.').unwrap();
    let mut sig: Vec<char> = sig.chars().collect();
    sig[3] = if sig[3] == 'A' { 'B' } else { 'A' };
    format!("{rest}.{}", sig.into_iter().collect::<String>())
}

async fn public_key_family(alg: Algorithm, name: &str) {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let pair = Pair::new(alg);
    let other = Pair::new(alg);
    let pem = write(dir.path(), "jwt.pem", &pair.public_pem);
    let cfg = auth_config(backend.addr, &format!("\"{name}\""), &format!("public_key_file = {:?}", pem), "");
    let proxy = Proxy::start(&pki, &cfg);

    admitted(&proxy, &pki, &mut backend, &pair.sign(None, &claims("pk-user")), "pk-user").await;
    refused(&proxy, &pki, &other.sign(None, &claims("x")), "signed by another key").await;
    refused(&proxy, &pki, &tampered(&pair.sign(None, &claims("x"))), "bad signature").await;
    // Key confusion: HS256 with the public key PEM as the HMAC secret.
    refused(&proxy, &pki, &hs(Algorithm::HS256, pair.public_pem.as_bytes(), &claims("x")), "HS256 with the PEM").await;
    refused(&proxy, &pki, &hs(Algorithm::HS256, &pair.public_raw, &claims("x")), "HS256 with the raw key").await;
    refused(&proxy, &pki, &alg_none(&claims("x")), "alg none").await;
    let now = now_unix();
    let expired = json!({ "sub": "x", "iat": now - 600, "exp": now - 300 });
    refused(&proxy, &pki, &pair.sign(None, &expired), "expired").await;
}

#[tokio::test]
async fn rs256_with_public_key_file() {
    public_key_family(Algorithm::RS256, "RS256").await;
}

#[tokio::test]
async fn es256_with_public_key_file() {
    public_key_family(Algorithm::ES256, "ES256").await;
}

#[tokio::test]
async fn eddsa_with_public_key_file() {
    public_key_family(Algorithm::EdDSA, "EdDSA").await;
}

#[tokio::test]
async fn hs256_claims_checks_and_failures() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let cfg = auth_config(
        backend.addr,
        "\"HS256\"",
        "secret_file = \"{secret}\"",
        "issuer = \"https://idp.test\"\naudience = \"chat\"\nleeway = \"5s\"\n",
    );
    let proxy = Proxy::start(&pki, &cfg);
    let now = now_unix();
    let sign = |c: Value| hs(Algorithm::HS256, SECRET.as_bytes(), &c);
    let base = |extra: Value| {
        let mut c = json!({ "sub": "hs-user", "iat": now, "exp": now + 600, "iss": "https://idp.test", "aud": "chat" });
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };

    admitted(&proxy, &pki, &mut backend, &sign(base(json!({}))), "hs-user").await;
    admitted(&proxy, &pki, &mut backend, &sign(base(json!({ "aud": ["other", "chat"] }))), "hs-user").await;
    // Within the leeway on both ends.
    admitted(&proxy, &pki, &mut backend, &sign(base(json!({ "exp": now - 2, "nbf": now + 2 }))), "hs-user").await;

    let cases = [
        ("expired", sign(base(json!({ "exp": now - 60 })))),
        ("nbf in the future", sign(base(json!({ "nbf": now + 600 })))),
        ("no exp", sign(base(json!({ "exp": null })))),
        ("wrong iss", sign(base(json!({ "iss": "https://evil.test" })))),
        ("no iss", sign(base(json!({ "iss": null })))),
        ("wrong aud", sign(base(json!({ "aud": "other" })))),
        ("aud array without it", sign(base(json!({ "aud": ["a", "b"] })))),
        ("no aud", sign(base(json!({ "aud": null })))),
        ("other secret", hs(Algorithm::HS256, b"another-secret-of-at-least-32-bytes!!", &base(json!({})))),
        ("bad signature", tampered(&sign(base(json!({}))))),
        ("HS384 not on the allowlist", hs(Algorithm::HS384, SECRET.as_bytes(), &base(json!({})))),
        ("alg none", alg_none(&base(json!({})))),
        ("malformed: two parts", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0".to_string()),
        ("malformed: not base64", "a!b.c!d.e!f".to_string()),
        ("malformed: not JSON", format!("{}.{}.sig", URL_SAFE_NO_PAD.encode("nope"), URL_SAFE_NO_PAD.encode("{}"))),
        ("malformed: huge", "a".repeat(9000)),
    ];
    for (what, t) in &cases {
        refused(&proxy, &pki, t, what).await;
    }
    // Each refusal was one token_invalid rejection.
    let m = proxy.metrics().await;
    let n: f64 = m
        .lines()
        .find(|l| l.starts_with("wsgate_handshakes_total") && l.contains("result=\"token_invalid\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert_eq!(n, cases.len() as f64);
}

#[tokio::test]
async fn jwks_file_chooses_the_key_by_kid() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let (rsa, ec, ed) = (Pair::new(Algorithm::RS256), Pair::new(Algorithm::ES256), Pair::new(Algorithm::EdDSA));
    let jwks = json!({ "keys": [rsa.jwk("r1"), ec.jwk("e1"), ed.jwk("d1")] });
    let path = write(dir.path(), "jwks.json", &jwks.to_string());
    let cfg = auth_config(backend.addr, "\"RS256\", \"ES256\", \"EdDSA\"", &format!("jwks_file = {path:?}"), "");
    let proxy = Proxy::start(&pki, &cfg);

    admitted(&proxy, &pki, &mut backend, &rsa.sign(Some("r1"), &claims("rsa-user")), "rsa-user").await;
    admitted(&proxy, &pki, &mut backend, &ec.sign(Some("e1"), &claims("ec-user")), "ec-user").await;
    admitted(&proxy, &pki, &mut backend, &ed.sign(Some("d1"), &claims("ed-user")), "ed-user").await;

    refused(&proxy, &pki, &ec.sign(Some("e9"), &claims("x")), "unknown kid").await;
    refused(&proxy, &pki, &ec.sign(None, &claims("x")), "no kid with several keys").await;
    refused(&proxy, &pki, &ed.sign(Some("e1"), &claims("x")), "EdDSA token naming the EC key").await;
    refused(&proxy, &pki, &Pair::new(Algorithm::ES256).sign(Some("e1"), &claims("x")), "other EC key, same kid").await;
    refused(&proxy, &pki, &hs(Algorithm::HS256, rsa.public_pem.as_bytes(), &claims("x")), "HS256 with RSA PEM").await;
    refused(&proxy, &pki, &alg_none(&claims("x")), "alg none").await;
}

// ---------------------------------------------------------------- jwks_url

/// A loopback HTTPS server for a JWKS, with its own self-signed certificate.
struct JwksServer {
    url: String,
    ca_path: PathBuf,
    hits: Arc<AtomicUsize>,
    body: Arc<Mutex<String>>,
    /// Answer 503 (an identity provider's outage) instead of the set.
    down: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    async fn start(keys: Vec<Value>) -> JwksServer {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().self_signed(&key).unwrap();
        let ca_path = write(dir.path(), "idp-ca.pem", &cert.pem());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let body = Arc::new(Mutex::new(json!({ "keys": keys }).to_string()));
        let down = Arc::new(AtomicBool::new(false));
        let (h, b, d) = (hits.clone(), body.clone(), down.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, hits, body, down) = (acceptor.clone(), h.clone(), b.clone(), d.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16384 {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    hits.fetch_add(1, Ordering::SeqCst);
                    let (status, payload) = match down.load(Ordering::SeqCst) {
                        true => ("503 Service Unavailable", String::new()),
                        false => ("200 OK", body.lock().unwrap().clone()),
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                         Connection: close\r\n\r\n{payload}",
                        payload.len()
                    );
                    let _ = tls.write_all(resp.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        JwksServer {
            url: format!("https://127.0.0.1:{}/jwks.json", addr.port()),
            ca_path,
            hits,
            body,
            down,
            task,
            _dir: dir,
        }
    }

    fn serve(&self, keys: Vec<Value>) {
        *self.body.lock().unwrap() = json!({ "keys": keys }).to_string();
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn key_lines(&self, refresh: &str) -> String {
        format!("jwks_url = \"{}\"\njwks_ca_file = {:?}\njwks_refresh = \"{refresh}\"", self.url, self.ca_path)
    }
}

// Proxy::start blocks while the binary fetches the JWKS: the server needs another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_new_kid_is_picked_up_without_restart() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let (k1, k2) = (Pair::new(Algorithm::ES256), Pair::new(Algorithm::EdDSA));
    let idp = JwksServer::start(vec![k1.jwk("k1")]).await;
    let cfg = auth_config(backend.addr, "\"ES256\", \"EdDSA\"", &idp.key_lines("10m"), "");
    let proxy = Proxy::start(&pki, &cfg);
    assert_eq!(idp.hits(), 1, "fetched once at startup");

    admitted(&proxy, &pki, &mut backend, &k1.sign(Some("k1"), &claims("one")), "one").await;
    assert_eq!(idp.hits(), 1, "known kid: served from the cache");

    // The identity provider rotates in a new key: its first token triggers one refetch.
    idp.serve(vec![k1.jwk("k1"), k2.jwk("k2")]);
    admitted(&proxy, &pki, &mut backend, &k2.sign(Some("k2"), &claims("two")), "two").await;
    assert_eq!(idp.hits(), 2);
    admitted(&proxy, &pki, &mut backend, &k2.sign(Some("k2"), &claims("two")), "two").await;
    assert_eq!(idp.hits(), 2);

    // A flood of unknown kids costs at most one more fetch (rate-limited refetch).
    for i in 0..10 {
        refused(&proxy, &pki, &k2.sign(Some(&format!("random-{i}")), &claims("x")), "unknown kid").await;
    }
    assert_eq!(idp.hits(), 2, "unknown kids within the refetch cooldown cost no fetch");
    refused(&proxy, &pki, &hs(Algorithm::HS256, k1.public_pem.as_bytes(), &claims("x")), "HS256 with the PEM").await;
}

// Proxy::start blocks while the binary fetches the JWKS: the server needs another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_periodic_refresh_drops_a_retired_key() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let (old, new) = (Pair::new(Algorithm::ES256), Pair::new(Algorithm::ES256));
    let idp = JwksServer::start(vec![old.jwk("old")]).await;
    let cfg = auth_config(backend.addr, "\"ES256\"", &idp.key_lines("1s"), "");
    let proxy = Proxy::start(&pki, &cfg);
    admitted(&proxy, &pki, &mut backend, &old.sign(Some("old"), &claims("before")), "before").await;

    idp.serve(vec![new.jwk("new")]);
    let before = idp.hits();
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while idp.hits() == before {
        assert!(std::time::Instant::now() < end, "no periodic refresh within 5 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    refused(&proxy, &pki, &old.sign(Some("old"), &claims("x")), "retired key").await;
    admitted(&proxy, &pki, &mut backend, &new.sign(Some("new"), &claims("after")), "after").await;
}

/// An identity provider that is down does not keep wsgate down: `check` warns, `run` starts
/// fail-closed (503, `/readyz` 503) and picks the keys up once the endpoint answers; a reload
/// during a later outage keeps the fetched keys (a certificate renewal must not wait for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_down_at_start_then_up_then_down_during_a_reload() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let k1 = Pair::new(Algorithm::ES256);
    let idp = JwksServer::start(vec![k1.jwk("k1")]).await;
    idp.set_down(true);
    let cfg = auth_config(backend.addr, "\"ES256\"", &idp.key_lines("10m"), "");

    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "wsgate.toml", &fill(&cfg, &pki, &dir.path().join("unused")));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate")).args(["check", "--config"]).arg(&path).output();
    let out = out.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("warning") && stdout.contains("every upgrade answered 503"), "{stdout}");
    assert!(!stdout.contains("(401)"), "{stdout}");

    let proxy = Proxy::start(&pki, &cfg);
    let fetched_at = |m: String| {
        let line = m.lines().find(|l| l.starts_with("wsgate_jwks_last_success_timestamp_seconds{")).map(str::to_string);
        let line = line.unwrap_or_else(|| panic!("no JWKS gauge:\n{m}"));
        assert!(line.contains(&format!("url=\"{}\"", idp.url)), "{line}");
        line.rsplit(' ').next().unwrap().parse::<f64>().unwrap()
    };
    assert_eq!(fetched_at(proxy.metrics().await), 0.0, "never fetched");
    assert_eq!(proxy.admin_get("/readyz").await.0, 503, "no keys: not ready");
    // Not the token's fault: 503 and come back, not 401 invalid_token (a client would drop it).
    let early = k1.sign(Some("k1"), &claims("early"));
    let e = connect(&proxy, &pki).header("Authorization", &format!("Bearer {early}")).go().await.unwrap_err();
    assert_eq!(e.status(), 503);
    assert!(e.header("retry-after").is_some());
    assert!(e.header("www-authenticate").is_none());
    let logged = "\"reason\":\"auth_unavailable\",\"status\":503,\"detail\":\"no_keys\"";
    assert!(proxy.wait_log(logged, Duration::from_secs(2)).await, "{}", proxy.log_text());

    idp.set_down(false);
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while proxy.admin_get("/readyz").await.0 != 200 {
        assert!(std::time::Instant::now() < end, "keys not fetched within 10 s: {}", proxy.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    admitted(&proxy, &pki, &mut backend, &k1.sign(Some("k1"), &claims("later")), "later").await;
    let first = fetched_at(proxy.metrics().await);
    assert!(first > 1.7e9, "{first}");

    idp.set_down(true);
    let hits = idp.hits();
    proxy.signal("HUP");
    assert!(proxy.wait_log("configuration reloaded", Duration::from_secs(10)).await, "{}", proxy.log_text());
    assert!(idp.hits() > hits, "the reload fetched");
    assert_eq!(proxy.admin_get("/readyz").await.0, 200);
    admitted(&proxy, &pki, &mut backend, &k1.sign(Some("k1"), &claims("kept")), "kept").await;
    assert_eq!(fetched_at(proxy.metrics().await), first, "the kept keys are as old as their fetch");
}

#[tokio::test]
async fn hs256_secret_from_the_environment() {
    let pki = Pki::new();
    let mut backend = Backend::start(Mode::Echo).await;
    let cfg = auth_config(backend.addr, "\"HS256\"", "secret_env = \"WSGATE_TEST_ENV_SECRET\"", "");
    let env_secret = "an-environment-secret-of-32-bytes-or-more";
    let proxy = Proxy::start_with_env(&pki, &cfg, &[("WSGATE_TEST_ENV_SECRET", env_secret)]);
    admitted(&proxy, &pki, &mut backend, &hs(Algorithm::HS256, env_secret.as_bytes(), &claims("env")), "env").await;
    // The file secret the other tests use is not this proxy's key.
    refused(&proxy, &pki, &token("file", 600), "signed with another secret").await;
    assert!(!proxy.log_text().contains(env_secret));
}
