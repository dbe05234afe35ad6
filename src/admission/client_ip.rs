//! Deciding the client IP (DESIGN.md "Admission": "The client IP is the TCP peer, unless the
//! peer is in `trusted_proxies`…", and "Fine print" on `X-Forwarded-For`).
//!
//! Only a trusted peer may tell us who the client is. Its header is read right to left,
//! because each proxy appends the address it saw: the right-most entries were written by our
//! own (trusted) proxies, everything to the left of the first untrusted entry was written by
//! the client and is worth nothing.

use crate::config::TrustedProxiesConfig;
use hyper::header::{HeaderMap, HeaderName};
use ipnet::{IpNet, Ipv4Net};
use std::net::{IpAddr, SocketAddr};

/// The compiled `[trusted_proxies]` section.
#[derive(Debug, Clone)]
pub struct TrustedProxies {
    cidrs: Vec<IpNet>,
    header: HeaderName,
    proxy_protocol: bool,
}

impl TrustedProxies {
    /// Compiles the section. The header name was checked by `Config::validate`; should an
    /// invalid one get here anyway, `x-forwarded-for` is used.
    pub fn new(cfg: &TrustedProxiesConfig) -> TrustedProxies {
        let header = HeaderName::from_bytes(cfg.header.as_bytes())
            .unwrap_or_else(|_| HeaderName::from_static("x-forwarded-for"));
        TrustedProxies {
            cidrs: cfg.cidrs.iter().map(|n| canonical_net(*n)).collect(),
            header,
            proxy_protocol: cfg.proxy_protocol,
        }
    }

    /// Whether `ip` is in one of the trusted networks. IPv4-mapped IPv6 addresses count as
    /// IPv4, so `::ffff:10.0.0.1` is trusted by `10.0.0.0/8`.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.cidrs.iter().any(|n| n.contains(&ip))
    }

    /// The header trusted peers put the client's address in (lower case).
    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// Whether trusted peers send a PROXY protocol header instead of the HTTP header.
    pub fn proxy_protocol(&self) -> bool {
        self.proxy_protocol
    }
}

/// A network written in IPv4-mapped form (`::ffff:10.0.0.0/104`) becomes the IPv4 network it
/// stands for, since addresses are compared in canonical form.
fn canonical_net(n: IpNet) -> IpNet {
    if let IpNet::V6(v6) = n {
        if let (Some(a), true) = (v6.network().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            if let Ok(v4) = Ipv4Net::new(a, v6.prefix_len() - 96) {
                return IpNet::V4(v4);
            }
        }
    }
    n
}

/// The client IP of a request, by DESIGN.md's rules:
///
/// - the TCP `peer`, unless it is trusted;
/// - with `proxy_protocol` on, `peer` itself (the header is never read in that mode: the
///   caller passes the address the PROXY header gave, or the TCP peer for a `LOCAL` one);
/// - otherwise the right-most untrusted entry of the configured header: all its occurrences,
///   in order, comma-separated, read right to left, skipping trusted entries; if every entry
///   is trusted, the left-most one. Entries left of the one chosen are never looked at, so a
///   client cannot influence the result by prepending anything.
///
/// Entries may carry a port or brackets (`[2001:db8::1]:443`, `1.2.3.4:5678`); IPv4-mapped
/// IPv6 counts as IPv4. An entry that does not parse (examined before an untrusted one was
/// found) makes the peer itself the client: a broken chain is not guessed at. Empty list
/// elements are skipped (RFC 9110 §5.6.1). Header absent → the peer.
///
/// The result is canonical; its `Display` is RFC 5952 text for IPv6.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
    let peer = peer.to_canonical();
    if trusted.proxy_protocol || !trusted.is_trusted(peer) {
        return peer;
    }
    let mut leftmost = None;
    for value in headers.get_all(&trusted.header).iter().rev() {
        // A value with bytes outside visible ASCII is not an address list.
        let Ok(list) = value.to_str() else {
            return peer;
        };
        for entry in list.rsplit(',') {
            let entry = entry.trim_matches([' ', '\t']);
            if entry.is_empty() {
                continue;
            }
            let Some(ip) = parse_entry(entry) else {
                return peer;
            };
            if !trusted.is_trusted(ip) {
                return ip;
            }
            leftmost = Some(ip);
        }
    }
    leftmost.unwrap_or(peer)
}

/// One list entry: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]` or
/// `[2001:db8::1]:443`, in canonical form.
fn parse_entry(s: &str) -> Option<IpAddr> {
    let ip = if let Ok(ip) = s.parse::<IpAddr>() {
        ip
    } else if let Ok(sa) = s.parse::<SocketAddr>() {
        sa.ip()
    } else {
        s.strip_prefix('[')?.strip_suffix(']')?.parse::<std::net::Ipv6Addr>().ok()?.into()
    };
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted(cidrs: &[&str]) -> TrustedProxies {
        TrustedProxies::new(&TrustedProxiesConfig {
            cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            ..Default::default()
        })
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn untrusted_peer_header_is_ignored() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(client_ip(ip("203.0.113.9"), &xff(&["1.1.1.1"]), &t), ip("203.0.113.9"));
        // Nothing trusted at all: the default config.
        let none = trusted(&[]);
        assert_eq!(client_ip(ip("10.0.0.1"), &xff(&["1.1.1.1"]), &none), ip("10.0.0.1"));
    }

    #[test]
    fn header_absent_or_empty_gives_the_peer() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &HeaderMap::new(), &t), ip("10.0.0.1"));
        assert_eq!(client_ip(ip("10.0.0.1"), &xff(&[""]), &t), ip("10.0.0.1"));
        assert_eq!(client_ip(ip("10.0.0.1"), &xff(&[" , ,"]), &t), ip("10.0.0.1"));
    }

    #[test]
    fn trusted_peer_single_entry() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &xff(&["198.51.100.7"]), &t), ip("198.51.100.7"));
    }

    #[test]
    fn right_most_untrusted_through_a_chain_of_trusted_proxies() {
        let t = trusted(&["10.0.0.0/8"]);
        let h = xff(&["198.51.100.7, 10.1.1.1,10.2.2.2"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &t), ip("198.51.100.7"));
    }

    #[test]
    fn spoofed_entries_on_the_left_do_not_win() {
        let t = trusted(&["10.0.0.0/8"]);
        // The client sent "X-Forwarded-For: 6.6.6.6, 10.9.9.9"; our proxy appended what it saw.
        let h = xff(&["6.6.6.6, 10.9.9.9, 198.51.100.7"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &t), ip("198.51.100.7"));
        // Garbage on the left is never examined, so it cannot push the decision to the
        // balancer's own address (which would pool every client into one budget).
        let h = xff(&["not-an-ip, [bogus, 198.51.100.7"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &t), ip("198.51.100.7"));
    }

    #[test]
    fn all_occurrences_read_right_to_left() {
        let t = trusted(&["10.0.0.0/8"]);
        // The client's own header line first, the proxy's appended line last.
        let h = xff(&["6.6.6.6", "198.51.100.7, 10.3.3.3"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &t), ip("198.51.100.7"));
        let h = xff(&["198.51.100.7", "10.3.3.3"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &t), ip("198.51.100.7"));
    }

    #[test]
    fn all_trusted_gives_the_left_most() {
        let t = trusted(&["10.0.0.0/8"]);
        let h = xff(&["10.5.5.5, 10.6.6.6", "10.7.7.7"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &t), ip("10.5.5.5"));
    }

    #[test]
    fn unparseable_entry_gives_the_peer() {
        let t = trusted(&["10.0.0.0/8"]);
        for bad in ["unknown", "1.2.3", "198.51.100.7:port", "fe80::1%eth0", "[::1", "1.2.3.4 5.6.7.8", "_hidden"] {
            assert_eq!(client_ip(ip("10.0.0.1"), &xff(&[bad]), &t), ip("10.0.0.1"), "{bad}");
        }
        // Also behind trusted entries: the chain is broken, nothing is guessed.
        assert_eq!(client_ip(ip("10.0.0.1"), &xff(&["198.51.100.7, junk, 10.2.2.2"]), &t), ip("10.0.0.1"));
        // A value that is not visible ASCII.
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_bytes(b"198.51.100.7\xff").unwrap());
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &t), ip("10.0.0.1"));
    }

    #[test]
    fn ports_and_brackets() {
        let t = trusted(&["10.0.0.0/8"]);
        let cases = [
            ("1.2.3.4:5678", "1.2.3.4"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("2001:db8::1", "2001:db8::1"),
            ("  1.2.3.4\t", "1.2.3.4"),
        ];
        for (entry, want) in cases {
            assert_eq!(client_ip(ip("10.0.0.1"), &xff(&[entry]), &t), ip(want), "{entry}");
        }
    }

    #[test]
    fn ipv4_mapped_counts_as_ipv4() {
        let t = trusted(&["10.0.0.0/8"]);
        // A mapped peer is trusted by an IPv4 network.
        assert_eq!(client_ip(ip("::ffff:10.0.0.1"), &xff(&["198.51.100.7"]), &t), ip("198.51.100.7"));
        // A mapped entry is reported, and judged, as IPv4.
        let got = client_ip(ip("10.0.0.1"), &xff(&["::ffff:198.51.100.7"]), &t);
        assert_eq!(got, ip("198.51.100.7"));
        assert!(got.is_ipv4());
        assert_eq!(client_ip(ip("10.0.0.1"), &xff(&["198.51.100.7, [::ffff:10.4.4.4]:80"]), &t), ip("198.51.100.7"));
        // An untrusted mapped peer comes back as IPv4 too.
        assert_eq!(client_ip(ip("::ffff:203.0.113.9"), &HeaderMap::new(), &t), ip("203.0.113.9"));
        // A trusted network written in mapped form.
        let mapped = trusted(&["::ffff:10.0.0.0/104"]);
        assert!(mapped.is_trusted(ip("10.1.2.3")));
        assert!(!mapped.is_trusted(ip("11.1.2.3")));
    }

    #[test]
    fn ipv6_is_canonical_rfc5952_text() {
        let t = trusted(&["10.0.0.0/8", "fd00::/8"]);
        let got = client_ip(ip("fd00::1"), &xff(&["2001:DB8:0:0:0:0:0:1"]), &t);
        assert_eq!(got.to_string(), "2001:db8::1");
        let got = client_ip(ip("10.0.0.1"), &xff(&["[2001:0db8:0000:0000:0001:0000:0000:0001]:9"]), &t);
        assert_eq!(got.to_string(), "2001:db8::1:0:0:1");
    }

    #[test]
    fn custom_header_and_proxy_protocol_mode() {
        let cfg = TrustedProxiesConfig {
            cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            header: "X-Real-IP".into(),
            proxy_protocol: false,
        };
        let t = TrustedProxies::new(&cfg);
        assert_eq!(t.header().as_str(), "x-real-ip");
        let mut h = xff(&["6.6.6.6"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &t), ip("10.0.0.1"), "x-forwarded-for is not the configured header");
        h.insert("x-real-ip", HeaderValue::from_static("198.51.100.7"));
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &t), ip("198.51.100.7"));
        // With the PROXY protocol the header is never read.
        let pp = TrustedProxies::new(&TrustedProxiesConfig { proxy_protocol: true, ..cfg });
        assert!(pp.proxy_protocol());
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &pp), ip("10.0.0.1"));
    }
}
