//! Where a token is found (`auth.sources`, in order) and how every configured carrier is
//! scrubbed from what the backend receives, so the token never reaches it.

use crate::config::TokenSource;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, COOKIE, SEC_WEBSOCKET_PROTOCOL};

/// The subprotocol name that announces a token as the next entry (DESIGN.md, fine print).
pub const TOKEN_PROTOCOL: &str = "access_token";

/// A token and the carrier it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The raw token text (never logged).
    pub token: String,
    /// Its carrier.
    pub source: TokenSource,
}

/// The client's offered subprotocols, in order, split on commas and trimmed.
pub fn offered_protocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

/// Index of the `access_token, <jwt>` pair in the offered protocols.
fn token_pair(protocols: &[String]) -> Option<usize> {
    protocols.iter().position(|p| p == TOKEN_PROTOCOL).filter(|i| i + 1 < protocols.len())
}

/// The offered protocols without the token pair (what the backend is offered). `token`, the
/// admitted token, is removed wherever it appears, with the `access_token` entry before it.
pub fn protocols_for_backend(protocols: &[String], sources: &[TokenSource], token: Option<&str>) -> Vec<String> {
    let mut out = protocols.to_vec();
    if sources.contains(&TokenSource::Subprotocol) {
        if let Some(i) = token_pair(&out) {
            out.drain(i..i + 2);
        }
    }
    while let Some(i) = token.and_then(|t| out.iter().position(|p| p == t)) {
        let start = if i > 0 && out[i - 1] == TOKEN_PROTOCOL { i - 1 } else { i };
        out.drain(start..=i);
    }
    out
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        decodes_to(k, name).then_some(v)
    })
}

/// Whether a query parameter's name or value, percent-decoded as the backend's query parser
/// will decode it, is `want`: `access%5Ftoken` is `access_token` to the backend, so it is
/// scrubbed (and read) as one.
fn decodes_to(raw: &str, want: &str) -> bool {
    raw == want || (raw.contains('%') && percent_decoded(raw).eq(want.bytes()))
}

/// `raw` with its `%XX` escapes decoded (a `%` not followed by two hex digits stays as it is).
fn percent_decoded(raw: &str) -> impl Iterator<Item = u8> + '_ {
    let raw = raw.as_bytes();
    let mut i = 0;
    std::iter::from_fn(move || {
        let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
        let b = *raw.get(i)?;
        match (b, hex(raw.get(i + 1)), hex(raw.get(i + 2))) {
            (b'%', Some(h), Some(l)) => {
                i += 3;
                Some((h * 16 + l) as u8)
            }
            _ => {
                i += 1;
                Some(b)
            }
        }
    })
}

/// A token query value as the client meant it: `%2E` is a `.` (a JWT needs no escapes, but
/// a client's URL encoder may add some). Invalid UTF-8 after decoding: taken as sent.
fn query_token(raw: &str) -> std::borrow::Cow<'_, str> {
    if !raw.contains('%') {
        return raw.into();
    }
    String::from_utf8(percent_decoded(raw).collect()).map_or(raw.into(), Into::into)
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    // Only text values are read; scrubbing (below) also scans the others.
    headers.get_all(COOKIE).iter().filter(|v| v.to_str().is_ok()).flat_map(cookie_pairs).find_map(|pair| {
        let (k, v) = cookie_kv(pair)?;
        (k == name.as_bytes()).then(|| std::str::from_utf8(v).ok()).flatten()
    })
}

/// A cookie's name and value, trimmed, the value without its quotes; `None` without `=`.
/// Reading the token and scrubbing it share this, so they agree on what a cookie is.
fn cookie_kv(pair: &[u8]) -> Option<(&[u8], &[u8])> {
    let pair = pair.trim_ascii();
    let i = pair.iter().position(|&b| b == b'=')?;
    let mut v = pair[i + 1..].trim_ascii();
    while let [b'"', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b'"'] = v {
        v = rest;
    }
    Some((pair[..i].trim_ascii(), v))
}

/// The first non-empty `Bearer` credential among the Authorization headers (a `Basic` one
/// for the backend may come before it).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get_all(AUTHORIZATION).iter().find_map(|v| {
        let (scheme, rest) = v.to_str().ok()?.trim().split_once(' ')?;
        let t = rest.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !t.is_empty()).then_some(t)
    })
}

/// Looks for a token in the configured sources, in order. `Basic` credentials and empty
/// values count as missing.
pub fn extract(
    sources: &[TokenSource],
    headers: &HeaderMap,
    query: Option<&str>,
    protocols: &[String],
) -> Option<Found> {
    for s in sources {
        let t = match s {
            TokenSource::Header => bearer(headers).map(Into::into),
            TokenSource::Query(n) => query.and_then(|q| query_param(q, n)).map(query_token),
            TokenSource::Cookie(n) => cookie(headers, n).map(Into::into),
            TokenSource::Subprotocol => token_pair(protocols).map(|i| protocols[i + 1].as_str().into()),
        };
        if let Some(t) = t.filter(|t: &std::borrow::Cow<'_, str>| !t.is_empty()) {
            return Some(Found { token: t.to_string(), source: s.clone() });
        }
    }
    None
}

/// The path and query with every configured token query parameter removed, and any
/// parameter whose value is `token` (the admitted token, wherever the client also put it).
pub fn scrub_path(path_and_query: &str, sources: &[TokenSource], token: Option<&str>) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_string();
    };
    let names: Vec<&str> = sources
        .iter()
        .filter_map(|s| match s {
            TokenSource::Query(n) => Some(n.as_str()),
            _ => None,
        })
        .collect();
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            !kv.is_empty() && !names.iter().any(|n| decodes_to(k, n)) && !token.is_some_and(|t| decodes_to(v, t))
        })
        .collect();
    if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

/// The `name=value` pieces of a Cookie header value, untrimmed.
fn cookie_pairs(v: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    v.as_bytes().split(|&b| b == b';')
}

/// The credential of an Authorization value that uses the Bearer scheme (trimmed, maybe
/// empty); `None` for other schemes.
fn bearer_credential(v: &HeaderValue) -> Option<&[u8]> {
    let b = v.as_bytes().trim_ascii_start();
    let bearer =
        b.len() >= 6 && b[..6].eq_ignore_ascii_case(b"bearer") && b.get(6).is_none_or(|c| *c == b' ' || *c == b'\t');
    bearer.then(|| b[6..].trim_ascii())
}

/// Removes every configured token carrier from headers bound for the backend: a `Bearer`
/// Authorization header (other schemes pass), and the token cookies (other cookies pass).
/// `token`, the admitted token, goes from unconfigured carriers too: a Bearer credential or
/// a cookie whose value it is.
pub fn scrub_headers(headers: &mut HeaderMap, sources: &[TokenSource], token: Option<&str>) {
    let any_bearer = sources.contains(&TokenSource::Header);
    if (any_bearer || token.is_some()) && headers.contains_key(AUTHORIZATION) {
        // Every Bearer value goes, not only the first header's: a request may carry several
        // Authorization headers (e.g. Basic, then Bearer).
        let carries = |v: &HeaderValue| {
            bearer_credential(v).is_some_and(|c| any_bearer || token.is_some_and(|t| c == t.as_bytes()))
        };
        let kept: Vec<HeaderValue> = headers.get_all(AUTHORIZATION).iter().filter(|v| !carries(v)).cloned().collect();
        headers.remove(AUTHORIZATION);
        for v in kept {
            headers.append(AUTHORIZATION, v);
        }
    }
    let names: Vec<&str> = sources
        .iter()
        .filter_map(|s| match s {
            TokenSource::Cookie(n) => Some(n.as_str()),
            _ => None,
        })
        .collect();
    if (names.is_empty() && token.is_none()) || !headers.contains_key(COOKIE) {
        return;
    }
    // Bytes, not text: a value with other bytes than visible ASCII is still scanned.
    let carries = |pair: &[u8]| {
        let (k, v) = cookie_kv(pair).unwrap_or((pair.trim_ascii(), &[]));
        names.iter().any(|n| n.as_bytes() == k) || token.is_some_and(|t| t.as_bytes() == v)
    };
    let values: Vec<HeaderValue> = headers.get_all(COOKIE).iter().cloned().collect();
    if !values.iter().any(|v| cookie_pairs(v).any(carries)) {
        return;
    }
    // Only a value with a token cookie is rewritten; the others pass as they came.
    headers.remove(COOKIE);
    for v in values {
        if !cookie_pairs(&v).any(carries) {
            headers.append(COOKIE, v);
            continue;
        }
        let kept: Vec<&[u8]> =
            cookie_pairs(&v).map(<[u8]>::trim_ascii).filter(|p| !p.is_empty() && !carries(p)).collect();
        if kept.is_empty() {
            continue;
        }
        if let Ok(v) = HeaderValue::from_bytes(&kept.join(&b"; "[..])) {
            headers.append(COOKIE, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<TokenSource> {
        ["header", "query:access_token", "cookie:access_token", "subprotocol"]
            .iter()
            .map(|s| TokenSource::parse(s).unwrap())
            .collect()
    }

    #[test]
    fn sources_in_order_and_missing_cases() {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic dXNlcjpwYXNz"));
        h.insert(COOKIE, HeaderValue::from_static("a=1; access_token=CK"));
        let f = extract(&all(), &h, Some("x=1&access_token=QT"), &[]).unwrap();
        assert_eq!(f, Found { token: "QT".into(), source: TokenSource::Query("access_token".into()) });
        // A query value is percent-decoded, as any query parser would; a broken escape stays.
        assert_eq!(extract(&all(), &h, Some("access_token=a%2Eb%2ec"), &[]).unwrap().token, "a.b.c");
        assert_eq!(extract(&all(), &h, Some("access_token=a%2.b%ZZ"), &[]).unwrap().token, "a%2.b%ZZ");
        assert_eq!(extract(&all(), &h, Some("access_token=%FF%2E"), &[]).unwrap().token, "%FF%2E");
        let f = extract(&all(), &h, None, &[]).unwrap();
        assert_eq!(f.token, "CK");
        let mut quoted = HeaderMap::new();
        quoted.insert(COOKIE, HeaderValue::from_static("access_token ; access_token = \"QK\" "));
        assert_eq!(extract(&all(), &quoted, None, &[]).unwrap().token, "QK");
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer "));
        h.remove(COOKIE);
        assert_eq!(extract(&all(), &h, Some("access_token="), &[]), None);
        let protos = vec!["chat".to_string(), "access_token".into(), "JWT".into()];
        assert_eq!(extract(&all(), &h, None, &protos).unwrap().token, "JWT");
        assert_eq!(protocols_for_backend(&protos, &all(), None), vec!["chat"]);
    }

    #[test]
    fn bearer_after_a_basic_header_is_found() {
        let mut h = HeaderMap::new();
        h.append(AUTHORIZATION, HeaderValue::from_static("Basic dXNlcjpwYXNz"));
        h.append(AUTHORIZATION, HeaderValue::from_static("Bearer TK"));
        assert_eq!(extract(&all(), &h, None, &[]).unwrap().token, "TK");
    }

    #[test]
    fn scrubbing() {
        assert_eq!(scrub_path("/c?access_token=x&room=1", &all(), None), "/c?room=1");
        assert_eq!(scrub_path("/c?access_token=x", &all(), None), "/c");
        // The backend's query parser decodes names: an encoded one is the same parameter.
        assert_eq!(scrub_path("/c?access%5Ftoken=x&%61ccess_toke%6e=y&a=%5F", &all(), None), "/c?a=%5F");
        assert_eq!(
            scrub_path("/c?access%5Ftokens=x&access%5=y&access%5F=z", &all(), None),
            "/c?access%5Ftokens=x&access%5=y&access%5F=z"
        );
        assert_eq!(extract(&all(), &HeaderMap::new(), Some("access%5ftoken=QT"), &[]).unwrap().token, "QT");
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        h.append(COOKIE, HeaderValue::from_static("a=1; access_token=CK"));
        h.append(COOKIE, HeaderValue::from_static("b=2"));
        h.append(COOKIE, HeaderValue::from_bytes(b"name=Zo\xc3\xab").unwrap());
        scrub_headers(&mut h, &all(), None);
        assert!(h.get(AUTHORIZATION).is_none());
        let cookies: Vec<_> = h.get_all(COOKIE).iter().map(|v| v.as_bytes()).collect();
        assert_eq!(
            cookies,
            [&b"a=1"[..], b"b=2", b"name=Zo\xc3\xab"],
            "a value without a token cookie passes as it came"
        );
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        scrub_headers(&mut h, &all(), None);
        assert!(h.get(AUTHORIZATION).is_some());
        let mut h = HeaderMap::new();
        h.append(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        h.append(AUTHORIZATION, HeaderValue::from_static("bearer xyz"));
        h.append(AUTHORIZATION, HeaderValue::from_static("Bearer"));
        h.append(AUTHORIZATION, HeaderValue::from_static("Bearerish q"));
        scrub_headers(&mut h, &all(), None);
        let left: Vec<_> = h.get_all(AUTHORIZATION).iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(left, ["Basic abc", "Bearerish q"]);
    }

    #[test]
    fn the_admitted_token_is_scrubbed_from_carriers_not_configured() {
        let header_only = [TokenSource::Header];
        let t = Some("a.b.c");
        assert_eq!(scrub_path("/c?access_token=a.b.c&x=a%2Eb%2Ec&keep=a.b", &header_only, t), "/c?keep=a.b");
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("jwt=\"a.b.c\"; other=1"));
        h.append(AUTHORIZATION, HeaderValue::from_static("Bearer a.b.c"));
        h.append(AUTHORIZATION, HeaderValue::from_static("Bearer other"));
        h.append(COOKIE, HeaderValue::from_bytes(b"x=\xff; t2=a.b.c").unwrap());
        scrub_headers(&mut h, &[TokenSource::Query("t".into())], t);
        let cookies: Vec<_> = h.get_all(COOKIE).iter().map(|v| v.as_bytes()).collect();
        assert_eq!(cookies, [&b"other=1"[..], b"x=\xff"]);
        let left: Vec<_> = h.get_all(AUTHORIZATION).iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(left, ["Bearer other"]);
        let protos: Vec<String> = ["chat", "access_token", "a.b.c", "a.b.c"].map(String::from).into();
        assert_eq!(protocols_for_backend(&protos, &header_only, t), vec!["chat"]);
    }
}
