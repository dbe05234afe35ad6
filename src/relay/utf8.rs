//! Incremental UTF-8 validation for text messages split across fragments: a code point may
//! straddle two frames, so up to three trailing bytes are carried to the next fragment.

/// Validator state for one text message.
#[derive(Debug, Default, Clone)]
pub struct Utf8Stream {
    tail: [u8; 4],
    tail_len: u8,
}

impl Utf8Stream {
    /// Resets for a new message.
    pub fn reset(&mut self) {
        self.tail_len = 0;
    }

    /// Feeds the next fragment's payload; `fin` marks the message's last fragment.
    /// Returns `false` as soon as the bytes cannot be valid UTF-8.
    pub fn feed(&mut self, mut data: &[u8], fin: bool) -> bool {
        if self.tail_len > 0 {
            // Complete the carried code point first.
            let have = self.tail_len as usize;
            let need = utf8_len(self.tail[0]);
            let take = (need - have).min(data.len());
            self.tail[have..have + take].copy_from_slice(&data[..take]);
            self.tail_len += take as u8;
            data = &data[take..];
            let cur = &self.tail[..self.tail_len as usize];
            if (self.tail_len as usize) < need {
                // Still incomplete: the prefix must be a valid start of a sequence.
                return valid_prefix(cur) && !fin;
            }
            if std::str::from_utf8(cur).is_err() {
                return false;
            }
            self.tail_len = 0;
        }
        match std::str::from_utf8(data) {
            Ok(_) => true,
            Err(e) => {
                if e.error_len().is_some() || fin {
                    return false;
                }
                let rest = &data[e.valid_up_to()..];
                self.tail[..rest.len()].copy_from_slice(rest);
                self.tail_len = rest.len() as u8;
                true
            }
        }
    }
}

/// Length of the sequence a lead byte starts (1 for invalid leads, caught by validation).
fn utf8_len(b: u8) -> usize {
    match b {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => 1,
    }
}

/// Whether `p` (shorter than its sequence) can still become valid: checks the second byte's
/// restricted ranges (overlongs, surrogates, > U+10FFFF) so bad input fails fast.
fn valid_prefix(p: &[u8]) -> bool {
    if p.len() < 2 {
        return utf8_len(p[0]) > 1;
    }
    let ok2 = match p[0] {
        0xE0 => (0xA0..=0xBF).contains(&p[1]),
        0xED => (0x80..=0x9F).contains(&p[1]),
        0xF0 => (0x90..=0xBF).contains(&p[1]),
        0xF4 => (0x80..=0x8F).contains(&p[1]),
        _ => (0x80..=0xBF).contains(&p[1]),
    };
    ok2 && p[2..].iter().all(|b| (0x80..=0xBF).contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_code_points() {
        let s = "aé€😀z".as_bytes();
        for cut in 0..=s.len() {
            let mut v = Utf8Stream::default();
            assert!(v.feed(&s[..cut], false), "cut {cut}");
            assert!(v.feed(&s[cut..], true), "cut {cut}");
        }
        // Byte by byte.
        let mut v = Utf8Stream::default();
        for (i, b) in s.iter().enumerate() {
            assert!(v.feed(std::slice::from_ref(b), i == s.len() - 1));
        }
    }

    #[test]
    fn invalid() {
        let mut v = Utf8Stream::default();
        assert!(!v.feed(&[0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5, 0xed, 0xa0, 0x80], true));
        let mut v = Utf8Stream::default();
        assert!(v.feed(&[0xf4], false));
        assert!(!v.feed(&[0x90], false), "beyond U+10FFFF fails fast");
        let mut v = Utf8Stream::default();
        assert!(!v.feed(&[0xe2, 0x82], true), "truncated at fin");
        let mut v = Utf8Stream::default();
        assert!(v.feed(&[0xe2], false));
        assert!(!v.feed(&[0x82], true));
        let mut v = Utf8Stream::default();
        assert!(!v.feed(&[0xff], false));
    }
}
