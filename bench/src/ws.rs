//! Minimal RFC 6455 framing shared by the load generator (client side) and the
//! echo backend (server side).
//!
//! Hand-rolled on purpose: on a two-core machine the load generator's core
//! saturates first, so the client must be cheap per message and must control
//! exactly how frames are batched into writes (every batch of in-flight
//! messages goes out in one `write_all`, i.e. one TLS record run and one
//! syscall). It is independent of the proxy's own WebSocket code.

use std::fmt;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

#[derive(Debug)]
pub enum WsError {
    Protocol(String),
    TooLarge(usize),
}

impl fmt::Display for WsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WsError::Protocol(s) => write!(f, "websocket protocol error: {s}"),
            WsError::TooLarge(n) => write!(f, "websocket frame too large: {n} bytes"),
        }
    }
}

impl std::error::Error for WsError {}

/// A parsed frame header; the payload follows at `header_len`.
#[derive(Debug, Clone, Copy)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub header_len: usize,
    pub payload_len: usize,
}

impl FrameHeader {
    pub fn frame_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Parses a frame header at the start of `buf`. `Ok(None)` means more bytes
/// are needed. Validates RSV bits, opcodes and control-frame rules.
pub fn parse_header(buf: &[u8], max_payload: usize) -> Result<Option<FrameHeader>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Err(WsError::Protocol("reserved bits set".into()));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    match opcode {
        OP_CONT | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin {
                return Err(WsError::Protocol("fragmented control frame".into()));
            }
        }
        other => return Err(WsError::Protocol(format!("unknown opcode {other:#x}"))),
    }
    let masked = b1 & 0x80 != 0;
    let len7 = (b1 & 0x7F) as usize;
    let (payload_len, mut pos) = match len7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(b);
            if n > max_payload as u64 {
                return Err(WsError::TooLarge(usize::try_from(n).unwrap_or(usize::MAX)));
            }
            (n as usize, 10)
        }
        n => (n, 2),
    };
    if opcode >= OP_CLOSE && payload_len > 125 {
        return Err(WsError::Protocol("control frame over 125 bytes".into()));
    }
    if payload_len > max_payload {
        return Err(WsError::TooLarge(payload_len));
    }
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(FrameHeader { fin, opcode, mask, header_len: pos, payload_len }))
}

/// XORs `data` with the 4-byte masking key, starting at key offset 0.
pub fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    // The key repeated twice, in memory order, so one u64 XOR masks 8 bytes.
    let mut kb = [0u8; 8];
    kb[..4].copy_from_slice(&key);
    kb[4..].copy_from_slice(&key);
    let k64 = u64::from_ne_bytes(kb);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        let v = u64::from_ne_bytes(b) ^ k64;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// Appends one frame to `out`; masks the payload when `mask` is given.
pub fn encode_frame(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    let b0 = if fin { 0x80 } else { 0 } | (opcode & 0x0F);
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    out.push(b0);
    let n = payload.len();
    if n < 126 {
        out.push(mbit | n as u8);
    } else if n <= u16::MAX as usize {
        out.push(mbit | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(mbit | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            let start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[start..], key);
        }
        None => out.extend_from_slice(payload),
    }
}

/// `Sec-WebSocket-Accept` for a given `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    use base64::Engine;
    use sha1::{Digest, Sha1};
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Cheap non-cryptographic PRNG (xorshift64*) for masking keys and
/// handshake nonces. A load generator needs variety, not secrecy.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        let s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ nanos;
        Rng(if s == 0 { 0x2545_F491_4F6C_DD1D } else { s })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_ne_bytes()
    }

    pub fn ws_key(&mut self) -> String {
        use base64::Engine;
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&self.next_u64().to_ne_bytes());
        k[8..].copy_from_slice(&self.next_u64().to_ne_bytes());
        base64::engine::general_purpose::STANDARD.encode(k)
    }
}

/// Finds the end of an HTTP header block (index just past `\r\n\r\n`).
pub fn find_header_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Case-insensitive header lookup in a raw HTTP header block.
pub fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        if k.trim().eq_ignore_ascii_case(name) {
            Some(v.trim())
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_masked_and_unmasked() {
        for &n in &[0usize, 1, 7, 8, 9, 125, 126, 127, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut out = Vec::new();
                encode_frame(&mut out, true, OP_BINARY, &payload, mask);
                let h = parse_header(&out, 1 << 20).unwrap().unwrap();
                assert_eq!(h.payload_len, n);
                assert_eq!(h.frame_len(), out.len());
                let mut p = out[h.header_len..].to_vec();
                if let Some(k) = h.mask {
                    apply_mask(&mut p, k);
                }
                assert_eq!(p, payload);
                // Every strict prefix is incomplete, never an error.
                for cut in 0..h.header_len {
                    assert!(parse_header(&out[..cut], 1 << 20).unwrap().is_none());
                }
            }
        }
    }

    #[test]
    fn mask_matches_bytewise() {
        let key = [0xde, 0xad, 0xbe, 0xef];
        let data: Vec<u8> = (0..37u8).collect();
        let mut fast = data.clone();
        apply_mask(&mut fast, key);
        let slow: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ key[i % 4]).collect();
        assert_eq!(fast, slow);
    }

    #[test]
    fn rejects_bad_frames() {
        assert!(parse_header(&[0xC2, 0x00], 100).is_err()); // RSV1
        assert!(parse_header(&[0x83, 0x00], 100).is_err()); // opcode 3
        assert!(parse_header(&[0x09, 0x00], 100).is_err()); // fragmented ping
        assert!(parse_header(&[0x89, 126, 0, 200], 1000).is_err()); // big ping
        assert!(parse_header(&[0x82, 126, 1, 0], 100).is_err()); // too large
    }

    #[test]
    fn accept_key_rfc_example() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }
}
