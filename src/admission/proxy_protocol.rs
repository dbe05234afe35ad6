//! PROXY protocol v1 and v2 (HAProxy's specification), read from a trusted peer before TLS
//! when `[trusted_proxies] proxy_protocol = true` (DESIGN.md "Fine print → PROXY protocol").
//!
//! Hand-rolled rather than taken from a crate: only the receiving side of two small fixed
//! formats is needed, and doing it here lets it consume exactly the header's bytes straight
//! from the socket, leaving the TLS ClientHello that follows untouched for rustls.
//!
//! The caller wraps [`read_header`] in `handshake_timeout` and holds the peer's pending slot
//! meanwhile; both matter, since a peer that trickles a header byte by byte is otherwise
//! only bounded by them.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v2 signature: 12 bytes no HTTP or TLS stream can start with.
const V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/protocol, 2-byte length.
const V2_FIXED: usize = 16;
/// Largest v2 address block + TLVs accepted. The largest address block is 216 bytes (AF_UNIX);
/// TLVs from an L4 balancer (AWS VPC endpoint id, Azure link id, a CRC) are small. Anything
/// beyond is refused rather than read into memory.
pub const V2_MAX_LEN: usize = 1024;
/// The longest v1 line, CRLF included ("PROXY TCP6 " + two full IPv6 + two ports).
const V1_MAX: usize = 107;
/// The v1 prefix.
const V1_PREFIX: &[u8] = b"PROXY ";

/// Reads a PROXY v1 or v2 header from the start of `stream`, consuming exactly its bytes:
/// whatever follows (the TLS ClientHello) stays unread in the stream.
///
/// - `Ok(Some(addr))`: the source address the balancer saw (IPv4-mapped IPv6 as IPv4).
/// - `Ok(None)`: v2 `LOCAL` (a balancer's health check), v2 `AF_UNSPEC` or v1
///   `PROXY UNKNOWN`: the peer itself is the client.
/// - `Err`: no header, an invalid or oversized one, an unsupported family (AF_UNIX, UDP), or
///   the connection closed first. The caller closes the connection.
///
/// It does not time out by itself: the caller wraps it in `handshake_timeout`.
pub async fn read_header(stream: &mut TcpStream) -> io::Result<Option<SocketAddr>> {
    // Peek to learn the header's length, then read exactly that many bytes: a plain read
    // could swallow the start of the TLS handshake that follows. While only part of a header
    // has arrived, the bytes seen are all header bytes (no header is shorter than 15 bytes,
    // and a v1 line runs to its CRLF), so they are consumed before peeking again. That keeps
    // the loop from spinning (peek returns at once while anything is queued) and lets a peer
    // that closes mid-header be noticed at once (peek then returns 0).
    let mut head = [0u8; V1_MAX];
    let mut have = 0; // header bytes consumed so far, at head[..have]
    loop {
        // `have < V1_MAX` here: `frame` answers NeedMore only for fewer than V1_MAX bytes.
        let n = stream.peek(&mut head[have..]).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a whole PROXY header"));
        }
        match frame(&head[..have + n])? {
            Framing::V1 { line_len } => {
                stream.read_exact(&mut head[have..line_len + 2]).await?;
                return parse_v1(&head[..line_len]);
            }
            Framing::V2 { total } => {
                let mut hdr = vec![0u8; total];
                hdr[..have].copy_from_slice(&head[..have]);
                stream.read_exact(&mut hdr[have..]).await?;
                return parse_v2(&hdr);
            }
            Framing::NeedMore => {
                stream.read_exact(&mut head[have..have + n]).await?;
                have += n;
            }
        }
    }
}

/// What the bytes seen so far say about the header.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// A v1 line of `line_len` bytes, followed by CRLF.
    V1 { line_len: usize },
    /// A v2 header of `total` bytes in all.
    V2 { total: usize },
    /// A valid prefix of a header; wait for more bytes.
    NeedMore,
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("PROXY protocol: {msg}"))
}

/// Decides from a prefix of the stream whether it holds a whole header and how long it is.
fn frame(got: &[u8]) -> io::Result<Framing> {
    // The two signatures differ in their first byte ('\r' against 'P').
    let k = got.len().min(V2_SIG.len());
    if got[..k] == V2_SIG[..k] {
        if got.len() < V2_FIXED {
            return Ok(Framing::NeedMore);
        }
        let len = usize::from(u16::from_be_bytes([got[14], got[15]]));
        if len > V2_MAX_LEN {
            return Err(invalid(&format!("v2 header of {len} bytes is over the {V2_MAX_LEN}-byte limit")));
        }
        return Ok(Framing::V2 { total: V2_FIXED + len });
    }
    let k = got.len().min(V1_PREFIX.len());
    if got[..k] != V1_PREFIX[..k] {
        return Err(invalid("no PROXY header from a trusted peer"));
    }
    match got.windows(2).position(|w| w == b"\r\n") {
        Some(i) if i + 2 <= V1_MAX => Ok(Framing::V1 { line_len: i }),
        Some(_) => Err(invalid("v1 line longer than 107 bytes")),
        // `buf` holds V1_MAX bytes: a full buffer without CRLF is too long already.
        None if got.len() >= V1_MAX => Err(invalid("v1 line longer than 107 bytes")),
        None => Ok(Framing::NeedMore),
    }
}

/// `PROXY TCP4|TCP6 src dst sport dport` or `PROXY UNKNOWN ...` (CRLF already stripped).
fn parse_v1(line: &[u8]) -> io::Result<Option<SocketAddr>> {
    let line = std::str::from_utf8(line).map_err(|_| invalid("v1 line is not ASCII"))?;
    let mut f = line.split(' ');
    if f.next() != Some("PROXY") {
        return Err(invalid("v1 line does not start with PROXY"));
    }
    let proto = f.next().unwrap_or_default();
    if proto == "UNKNOWN" {
        // The rest of the line may be anything and is ignored (spec §2.1).
        return Ok(None);
    }
    let fields: Vec<&str> = f.collect();
    let [src, dst, sport, dport] = fields.as_slice() else {
        return Err(invalid("v1 line needs exactly: protocol, two addresses and two ports, one space apart"));
    };
    // Both addresses must be of the announced family; the destination is checked only for
    // that (it is our own address).
    let (src, _dst): (IpAddr, IpAddr) = match proto {
        "TCP4" => (v1_addr::<Ipv4Addr>(src)?.into(), v1_addr::<Ipv4Addr>(dst)?.into()),
        "TCP6" => (v1_addr::<Ipv6Addr>(src)?.into(), v1_addr::<Ipv6Addr>(dst)?.into()),
        _ => return Err(invalid("v1 protocol must be TCP4, TCP6 or UNKNOWN")),
    };
    let sport = v1_port(sport)?;
    v1_port(dport)?;
    Ok(Some(SocketAddr::new(src.to_canonical(), sport)))
}

fn v1_addr<A: std::str::FromStr>(s: &str) -> io::Result<A> {
    s.parse().map_err(|_| invalid("v1 address is not of the announced family (TCP4 or TCP6)"))
}

/// A decimal port: digits only (no sign, no spaces), 0-65535.
fn v1_port(s: &str) -> io::Result<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("v1 port is not a number 0-65535"));
    }
    s.parse().map_err(|_| invalid("v1 port is not a number 0-65535"))
}

/// A whole v2 header (`V2_FIXED` + its length), signature already matched.
fn parse_v2(h: &[u8]) -> io::Result<Option<SocketAddr>> {
    let ver_cmd = h[12];
    if ver_cmd >> 4 != 2 {
        return Err(invalid("v2 version must be 2"));
    }
    let body = &h[V2_FIXED..];
    match ver_cmd & 0x0f {
        // LOCAL: the balancer's own connection (health check); the address block, if any, is
        // to be ignored.
        0x0 => return Ok(None),
        0x1 => {}
        _ => return Err(invalid("v2 command must be LOCAL or PROXY")),
    }
    match h[13] {
        // AF_UNSPEC: no address to give, like v1 UNKNOWN.
        0x00 => Ok(None),
        // AF_INET, STREAM: src(4) dst(4) sport(2) dport(2), then TLVs (skipped).
        0x11 => {
            let a = body.get(..12).ok_or_else(|| invalid("v2 IPv4 address block is short"))?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([a[8], a[9]]))))
        }
        // AF_INET6, STREAM: src(16) dst(16) sport(2) dport(2), then TLVs (skipped).
        0x21 => {
            let a = body.get(..36).ok_or_else(|| invalid("v2 IPv6 address block is short"))?;
            let mut src = [0u8; 16];
            src.copy_from_slice(&a[..16]);
            let ip = IpAddr::V6(Ipv6Addr::from(src)).to_canonical();
            Ok(Some(SocketAddr::new(ip, u16::from_be_bytes([a[32], a[33]]))))
        }
        f => Err(invalid(&format!("v2 family/protocol 0x{f:02x} is not TCP over IPv4 or IPv6"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A connected loopback pair: (client side, server side).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    const PAYLOAD: &[u8] = b"\x16\x03\x01\x00\x05hello";

    /// Sends `header` + PAYLOAD, reads the header, then checks PAYLOAD is still unread.
    async fn roundtrip(header: &[u8]) -> io::Result<Option<SocketAddr>> {
        let (mut c, mut s) = pair().await;
        let mut all = header.to_vec();
        all.extend_from_slice(PAYLOAD);
        c.write_all(&all).await.unwrap();
        let got = read_header(&mut s).await?;
        let mut rest = vec![0u8; PAYLOAD.len()];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest, PAYLOAD, "payload after the header must stay unread");
        Ok(got)
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIG.to_vec();
        h.push(0x20 | cmd);
        h.push(fam);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn v1_tcp4() {
        let got = roundtrip(b"PROXY TCP4 198.51.100.7 10.0.0.1 56324 443\r\n").await.unwrap();
        assert_eq!(got, Some(sa("198.51.100.7:56324")));
    }

    #[tokio::test]
    async fn v1_tcp6() {
        let got = roundtrip(b"PROXY TCP6 2001:db8::7 2001:db8::1 56324 443\r\n").await.unwrap();
        assert_eq!(got, Some(sa("[2001:db8::7]:56324")));
        // The longest TCP6 line (104 bytes) is accepted.
        let max = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(max.len(), 104);
        assert_eq!(roundtrip(max).await.unwrap().map(|a| a.port()), Some(65535));
    }

    #[tokio::test]
    async fn v1_length_limit_is_107_bytes() {
        let line = |len: usize| [&b"PROXY UNKNOWN "[..], &vec![b'x'; len - 16], b"\r\n"].concat();
        assert_eq!(line(107).len(), 107);
        assert_eq!(roundtrip(&line(107)).await.unwrap(), None);
        assert_eq!(refused(&line(108)).await.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn v1_unknown_means_the_peer() {
        assert_eq!(roundtrip(b"PROXY UNKNOWN\r\n").await.unwrap(), None);
        assert_eq!(roundtrip(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").await.unwrap(), None);
    }

    #[tokio::test]
    async fn v2_ipv4_with_tlvs_skipped() {
        let mut body = vec![198, 51, 100, 7, 10, 0, 0, 1];
        body.extend_from_slice(&56324u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        // A TLV (PP2_TYPE_AWS, 0xEA) that is consumed and ignored.
        body.extend_from_slice(&[0xEA, 0x00, 0x05, 0x01, b'v', b'p', b'c', b'e']);
        let got = roundtrip(&v2(0x1, 0x11, &body)).await.unwrap();
        assert_eq!(got, Some(sa("198.51.100.7:56324")));
    }

    #[tokio::test]
    async fn v2_ipv6() {
        let src: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let mut body = src.octets().to_vec();
        body.extend_from_slice(&dst.octets());
        body.extend_from_slice(&56324u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        let got = roundtrip(&v2(0x1, 0x21, &body)).await.unwrap();
        assert_eq!(got, Some(sa("[2001:db8::7]:56324")));
        // A mapped source counts as IPv4.
        let mut body = Ipv4Addr::new(198, 51, 100, 7).to_ipv6_mapped().octets().to_vec();
        body.extend_from_slice(&dst.octets());
        body.extend_from_slice(&[0, 80, 1, 187]);
        assert_eq!(roundtrip(&v2(0x1, 0x21, &body)).await.unwrap(), Some(sa("198.51.100.7:80")));
    }

    #[tokio::test]
    async fn v2_local_means_the_peer() {
        // A health check: no address block at all, or one to be ignored.
        assert_eq!(roundtrip(&v2(0x0, 0x00, &[])).await.unwrap(), None);
        assert_eq!(roundtrip(&v2(0x0, 0x11, &[1; 12])).await.unwrap(), None);
        // PROXY with AF_UNSPEC is the v2 form of UNKNOWN.
        assert_eq!(roundtrip(&v2(0x1, 0x00, &[])).await.unwrap(), None);
    }

    #[tokio::test]
    async fn header_split_across_writes() {
        let (mut c, mut s) = pair().await;
        let task = tokio::spawn(async move {
            let h = read_header(&mut s).await;
            let mut rest = [0u8; 3];
            s.read_exact(&mut rest).await.unwrap();
            (h, rest)
        });
        for part in [&b"PRO"[..], b"XY TCP4 198.51.100.7 10.0", b".0.1 1 443\r", b"\nabc"] {
            c.write_all(part).await.unwrap();
            c.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (h, rest) = task.await.unwrap();
        assert_eq!(h.unwrap(), Some(sa("198.51.100.7:1")));
        assert_eq!(&rest, b"abc");
    }

    async fn refused(bytes: &[u8]) -> io::Error {
        let (mut c, mut s) = pair().await;
        c.write_all(bytes).await.unwrap();
        c.shutdown().await.unwrap();
        read_header(&mut s).await.unwrap_err()
    }

    #[tokio::test]
    async fn garbage_and_invalid_headers_are_refused() {
        let cases: Vec<Vec<u8>> = vec![
            // A TLS ClientHello straight away: no header.
            PAYLOAD.to_vec(),
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            b"PROXY TCP4 198.51.100.7 10.0.0.1 56324\r\n".to_vec(),
            b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n".to_vec(),
            b"PROXY TCP6 198.51.100.7 2001:db8::1 1 2\r\n".to_vec(),
            b"PROXY TCP4 198.51.100.7 10.0.0.1 65536 443\r\n".to_vec(),
            b"PROXY TCP4 198.51.100.7 10.0.0.1 +80 443\r\n".to_vec(),
            b"PROXY TCP4  198.51.100.7 10.0.0.1 1 2\r\n".to_vec(),
            b"PROXY UDP4 198.51.100.7 10.0.0.1 1 2\r\n".to_vec(),
            b"PROXY TCP4 198.51.100.7 nope 1 2\r\n".to_vec(),
            // No CRLF within 107 bytes.
            [&b"PROXY TCP4 "[..], &[b'1'; 200]].concat(),
            // v2: wrong version, unknown command, AF_UNIX, UDP, short block, absurd length.
            {
                let mut h = v2(0x1, 0x11, &[0; 12]);
                h[12] = 0x11;
                h
            },
            v2(0x2, 0x11, &[0; 12]),
            v2(0x1, 0x31, &[0; 216]),
            v2(0x1, 0x12, &[0; 12]),
            v2(0x1, 0x11, &[0; 8]),
            v2(0x1, 0x21, &[0; 12]),
            {
                let mut h = v2(0x1, 0x11, &[]);
                h[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
                h
            },
        ];
        for bytes in cases {
            let e = refused(&bytes).await;
            assert_ne!(e.kind(), io::ErrorKind::UnexpectedEof, "{:?}: {e}", String::from_utf8_lossy(&bytes));
        }
    }

    #[tokio::test]
    async fn closed_before_a_whole_header() {
        for bytes in [&b""[..], b"PROXY TCP4 198.51", &V2_SIG[..7], &v2(0x1, 0x11, &[0; 12])[..20]] {
            let e = refused(bytes).await;
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{bytes:?}: {e}");
        }
    }

    #[test]
    fn framing_of_prefixes() {
        assert_eq!(frame(b"P").unwrap(), Framing::NeedMore);
        assert_eq!(frame(b"PROXY TCP4").unwrap(), Framing::NeedMore);
        assert_eq!(frame(b"\r\n\r\n").unwrap(), Framing::NeedMore);
        assert_eq!(frame(b"PROXY UNKNOWN\r\nxyz").unwrap(), Framing::V1 { line_len: 13 });
        assert_eq!(frame(&v2(0, 0, &[9; 40])).unwrap(), Framing::V2 { total: 56 });
        assert!(frame(b"X").is_err());
        assert!(frame(b"PROXY\r\n").is_err());
    }
}
