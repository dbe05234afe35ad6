//! RFC 6455 frame headers: parsing, encoding and masking.
//!
//! The relay owns its frame codec instead of fastwebsockets' because it must see what that
//! crate hides: the mask bit (unmasked client frames must be refused), the header before the
//! payload (size limits checked before reading), and frames in place in the read buffer (so
//! forwarded frames are re-masked where they lie and written in one batch, without a copy).

/// Opcode: continuation frame.
pub const OP_CONT: u8 = 0x0;
/// Opcode: text frame.
pub const OP_TEXT: u8 = 0x1;
/// Opcode: binary frame.
pub const OP_BINARY: u8 = 0x2;
/// Opcode: close.
pub const OP_CLOSE: u8 = 0x8;
/// Opcode: ping.
pub const OP_PING: u8 = 0x9;
/// Opcode: pong.
pub const OP_PONG: u8 = 0xA;

/// A 64-bit payload length with its most significant bit set (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadLength;

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// FIN bit.
    pub fin: bool,
    /// RSV1..3 bits (must be 0: no extension is negotiated through the proxy).
    pub rsv: u8,
    /// Opcode.
    pub opcode: u8,
    /// Masking key, if the MASK bit was set.
    pub mask: Option<[u8; 4]>,
    /// Payload length.
    pub len: u64,
    /// Bytes taken by the header itself (2 to 14).
    pub header_len: usize,
}

impl Header {
    /// Control frames have the high opcode bit set.
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// Parses a frame header from the start of `buf`; `None` when more bytes are needed.
/// Returns `Err` for a 64-bit length with the most significant bit set (RFC 6455 §5.2).
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, BadLength> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    let masked = b1 & 0x80 != 0;
    let (len, mut off) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let l = u64::from_be_bytes(b);
            if l >> 63 != 0 {
                return Err(BadLength);
            }
            (l, 10)
        }
        l => (l as u64, 2),
    };
    let mask = if masked {
        if buf.len() < off + 4 {
            return Ok(None);
        }
        let m = [buf[off], buf[off + 1], buf[off + 2], buf[off + 3]];
        off += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(Header { fin: b0 & 0x80 != 0, rsv: (b0 >> 4) & 0x7, opcode: b0 & 0x0f, mask, len, header_len: off }))
}

/// Appends a frame header to `out`.
pub fn write_header(out: &mut Vec<u8>, fin: bool, opcode: u8, mask: Option<[u8; 4]>, len: usize) {
    out.push(if fin { 0x80 | opcode } else { opcode });
    let m = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.push(m | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(m | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if let Some(k) = mask {
        out.extend_from_slice(&k);
    }
}

/// Appends a whole frame (control frames: close, ping, pong), masked when `mask` is given.
pub fn write_frame(out: &mut Vec<u8>, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) {
    write_header(out, true, opcode, mask, payload.len());
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(k) = mask {
        apply_mask(&mut out[start..], k);
    }
}

/// XORs `buf` with the repeating 4-byte `mask` (starting at mask offset 0). Works a word at a
/// time: this runs over every client payload byte.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let m32 = u32::from_ne_bytes(mask);
    let m64 = (m32 as u64) | ((m32 as u64) << 32);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let v = u64::from_ne_bytes(w) ^ m64;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    let rest = chunks.into_remainder();
    for (i, b) in rest.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Whether a close code may appear on the wire (RFC 6455 §7.4).
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Builds a close payload: code and reason (the reason truncated to fit 125 bytes on a
/// character boundary).
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut r = reason;
    while r.len() > 123 {
        let mut end = 123;
        while !r.is_char_boundary(end) {
            end -= 1;
        }
        r = &r[..end];
    }
    let mut p = Vec::with_capacity(2 + r.len());
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(r.as_bytes());
    p
}

/// A fast, non-cryptographic generator for the masks of frames sent to the backend. Masking
/// exists to stop browser scripts from steering bytes on the wire (cache poisoning of
/// intermediaries); the proxy's backend link has no such scripts, so a per-session seed from
/// a CSPRNG and a fast sequence are enough, and cheaper than a CSPRNG call per frame.
#[derive(Debug, Clone)]
pub struct MaskGen(u64);

impl MaskGen {
    /// Seeds from the process's CSPRNG.
    pub fn new() -> MaskGen {
        let mut b = [0u8; 8];
        // On failure the fallback seed is still a valid mask source (masks only need to vary).
        let _ = crate::tls::fill_random(&mut b);
        MaskGen(u64::from_ne_bytes(b) | 1)
    }

    /// The next masking key (wyrand).
    pub fn next_mask(&mut self) -> [u8; 4] {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = (self.0 as u128).wrapping_mul((self.0 ^ 0xe703_7ed1_a0b4_28db) as u128);
        (((t >> 64) as u64 ^ t as u64) as u32).to_ne_bytes()
    }
}

impl Default for MaskGen {
    fn default() -> Self {
        MaskGen::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        for len in [0usize, 1, 125, 126, 65535, 65536, 1 << 20] {
            let mut out = Vec::new();
            write_header(&mut out, true, OP_BINARY, Some([1, 2, 3, 4]), len);
            let h = parse_header(&out).unwrap().unwrap();
            assert_eq!(
                (h.fin, h.opcode, h.mask, h.len, h.header_len),
                (true, OP_BINARY, Some([1, 2, 3, 4]), len as u64, out.len())
            );
            for cut in 0..out.len() {
                assert_eq!(parse_header(&out[..cut]), Ok(None));
            }
        }
    }

    #[test]
    fn mask_is_involution_and_matches_bytewise() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        for len in [0, 1, 3, 7, 8, 9, 64, 999] {
            let mut a = data[..len].to_vec();
            apply_mask(&mut a, [9, 8, 7, 6]);
            let want: Vec<u8> = data[..len].iter().enumerate().map(|(i, b)| b ^ [9, 8, 7, 6][i % 4]).collect();
            assert_eq!(a, want);
            apply_mask(&mut a, [9, 8, 7, 6]);
            assert_eq!(a, &data[..len]);
        }
    }

    #[test]
    fn huge_length_rejected() {
        let mut f = vec![0x82, 127];
        f.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(parse_header(&f), Err(BadLength));
    }

    #[test]
    fn close_codes() {
        assert!(valid_close_code(1000) && valid_close_code(4999) && valid_close_code(1014));
        assert!(
            !valid_close_code(1005)
                && !valid_close_code(1006)
                && !valid_close_code(1015)
                && !valid_close_code(999)
                && !valid_close_code(5000)
        );
        assert_eq!(close_payload(1000, &"é".repeat(100)).len(), 2 + 122);
    }
}
