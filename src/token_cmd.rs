//! `wsgate token`: mint an HS256 development token.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Signs `{sub, iat, exp[, aud][, iss]}` with HS256. The secret must be at least 32 bytes,
/// the same rule the proxy applies to its own HMAC keys.
pub fn mint(secret: &[u8], sub: &str, ttl: Duration, aud: Option<&str>, iss: Option<&str>) -> Result<String, String> {
    if secret.len() < 32 {
        return Err(format!("the secret is {} bytes; at least 32 are required", secret.len()));
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs();
    let mut claims = json!({ "sub": sub, "iat": now, "exp": now.saturating_add(ttl.as_secs()) });
    if let Some(a) = aud {
        claims["aud"] = json!(a);
    }
    if let Some(i) = iss {
        claims["iss"] = json!(i);
    }
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret)).map_err(|e| e.to_string())
}
