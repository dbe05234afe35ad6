//! The Origin allowlist, the defence against cross-site WebSocket hijacking (CSWSH).
//!
//! Origins compare on scheme, host and port, case-insensitively, with default ports
//! normalised. A pattern may start with one `*.` label: `https://*.example.com` matches
//! `https://a.example.com` but not `https://a.b.example.com`, `https://example.com` or
//! `https://example.com.evil.com`. `null` never matches.

use crate::config::OriginConfig;

/// A parsed origin: lower-case scheme and host, explicit port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    /// Parses `scheme://host[:port]`; a path, query, userinfo or fragment is refused.
    fn parse(s: &str) -> Result<Origin, String> {
        let (scheme, rest) =
            s.split_once("://").ok_or_else(|| format!("{s:?} is not an origin (scheme://host[:port])"))?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "https" | "wss" => 443,
            "http" | "ws" => 80,
            _ => return Err(format!("{s:?}: scheme must be http or https")),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!("{s:?} is not an origin (scheme://host[:port], no path)"));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| format!("{s:?}: unclosed IPv6 bracket"))?;
            let port = match after {
                "" => default_port,
                p => p.strip_prefix(':').and_then(|p| p.parse().ok()).ok_or_else(|| format!("{s:?}: invalid port"))?,
            };
            (format!("[{}]", h.to_ascii_lowercase()), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_ascii_lowercase(), p.parse().map_err(|_| format!("{s:?}: invalid port"))?),
                None => (rest.to_ascii_lowercase(), default_port),
            }
        };
        if host.is_empty() || host.starts_with('.') || host.ends_with('.') || host.contains("..") {
            return Err(format!("{s:?}: invalid host"));
        }
        Ok(Origin { scheme, host, port })
    }
}

/// One entry of `origin.allow`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    origin: Origin,
    /// `*.` prefix: `origin.host` holds the suffix without the wildcard label.
    wildcard: bool,
}

impl OriginPattern {
    /// Parses `https://chat.example.com` or `https://*.example.com`.
    pub fn parse(s: &str) -> Result<OriginPattern, String> {
        let (text, wildcard) = match s.split_once("://*.") {
            Some((scheme, rest)) => (format!("{scheme}://{rest}"), true),
            None => (s.to_string(), false),
        };
        if text.contains('*') {
            return Err(format!("{s:?}: only one leading \"*.\" label is allowed"));
        }
        let origin = Origin::parse(&text)?;
        if wildcard && !origin.host.contains('.') {
            return Err(format!("{s:?}: a wildcard needs at least two labels after it (*.example.com)"));
        }
        Ok(OriginPattern { origin, wildcard })
    }

    fn matches(&self, o: &Origin) -> bool {
        if o.scheme != self.origin.scheme || o.port != self.origin.port {
            return false;
        }
        if !self.wildcard {
            return o.host == self.origin.host;
        }
        // Exactly one extra label in front of the suffix: a DNS label (letters, digits,
        // hyphens, underscores), so `*` or `a%2Eb` (which no browser sends) is not one.
        let is_label =
            |l: &str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        match o.host.split_once('.') {
            Some((label, rest)) => is_label(label) && rest == self.origin.host,
            None => false,
        }
    }
}

/// The compiled `[origin]` policy.
#[derive(Debug, Clone)]
pub struct OriginPolicy {
    allow: Vec<OriginPattern>,
    allow_missing: bool,
    allow_any: bool,
}

impl OriginPolicy {
    /// Compiles `[origin]`; the patterns were validated with the config.
    pub fn new(cfg: &OriginConfig) -> Result<OriginPolicy, String> {
        let allow = cfg.allow.iter().map(|s| OriginPattern::parse(s)).collect::<Result<_, _>>()?;
        Ok(OriginPolicy { allow, allow_missing: cfg.allow_missing, allow_any: cfg.allow_any })
    }

    /// Whether a request with this `Origin` header value (or none) may open a session.
    pub fn allows(&self, origin: Option<&[u8]>) -> bool {
        let Some(raw) = origin else {
            return self.allow_missing || self.allow_any;
        };
        let Ok(s) = std::str::from_utf8(raw) else { return false };
        if s.trim().eq_ignore_ascii_case("null") {
            return self.allow_any;
        }
        if self.allow_any {
            return true;
        }
        match Origin::parse(s.trim()) {
            Ok(o) => self.allow.iter().any(|p| p.matches(&o)),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str]) -> OriginPolicy {
        OriginPolicy::new(&OriginConfig {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            allow_missing: false,
            allow_any: false,
        })
        .unwrap()
    }

    #[test]
    fn exact_and_normalised() {
        let p = policy(&["https://Chat.Example.com"]);
        assert!(p.allows(Some(b"https://chat.example.com")));
        assert!(p.allows(Some(b"HTTPS://CHAT.EXAMPLE.COM:443")));
        assert!(!p.allows(Some(b"http://chat.example.com")));
        assert!(!p.allows(Some(b"https://chat.example.com:8443")));
        assert!(!p.allows(Some(b"null")));
        assert!(!p.allows(None));
    }

    #[test]
    fn wildcard_is_one_label() {
        let p = policy(&["https://*.example.com"]);
        assert!(p.allows(Some(b"https://a.example.com")));
        assert!(!p.allows(Some(b"https://a.b.example.com")));
        assert!(!p.allows(Some(b"https://example.com")));
        assert!(!p.allows(Some(b"https://example.com.evil.com")));
        assert!(!p.allows(Some(b"https://evilexample.com")));
        assert!(!p.allows(Some(b"https://.example.com")));
        assert!(!p.allows(Some(b"null")));
        // Not labels: no browser sends these.
        assert!(!p.allows(Some(b"https://*.example.com")));
        assert!(!p.allows(Some(b"https://a%2Eb.example.com")));
        assert!(p.allows(Some(b"https://xn--bcher-kva.example.com")));
        assert!(p.allows(Some(b"https://A-1_b.example.com")));
    }

    #[test]
    fn bad_patterns() {
        assert!(OriginPattern::parse("https://a.*.com").is_err());
        assert!(OriginPattern::parse("chat.example.com").is_err());
        assert!(OriginPattern::parse("https://x.com/path").is_err());
        assert!(OriginPattern::parse("https://*.com").is_err());
    }
}
