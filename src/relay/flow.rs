//! One direction of a session: frames from a source are checked against the policy where they
//! lie in the read buffer, re-masked for the backend when needed, and reported as byte ranges
//! to forward. No I/O and no allocation happens here; the pump in `relay::session` does both.
//!
//! This is the relay's per-message hook: a content rule (JSON-only text, HTML escaping) slots
//! into [`Flow::data_frame`].

use super::frame::{self, Header, MaskGen, OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT};
use super::policy::{Bucket, SessionPolicy};
use super::utf8::Utf8Stream;
use crate::config::OnRateLimit;
use std::time::Instant;

/// Which peer the frames come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client (frames must be masked; rates and frame limit apply).
    Client,
    /// The backend (frames must not be masked; message limit applies).
    Backend,
}

/// The proxy ends the session: close codes for the source and for the other side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    /// Close code sent to the peer that broke the rule.
    pub to_source: u16,
    /// Close code sent to the other peer.
    pub to_sink: u16,
    /// Reason text (also the log reason).
    pub reason: &'static str,
}

/// Why processing stopped before the end of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A rule was broken.
    Violation(Violation),
    /// The source sent a valid close; its (unmasked) payload lies at this range of the buffer.
    Close(usize, usize),
}

/// Up to this many forward ranges per step; more ends the step early (the caller loops).
const MAX_SEGS: usize = 8;

/// The result of one processing step over a buffer.
#[derive(Debug, Default)]
pub struct Step {
    /// Bytes of whole frames handled (the rest is an incomplete frame).
    pub consumed: usize,
    /// Byte ranges to write to the other side, in order.
    pub segs: [(usize, usize); MAX_SEGS],
    /// Number of valid entries in `segs`.
    pub nsegs: usize,
    /// Total size of the incomplete frame at `consumed`, once its header is known.
    pub need: usize,
    /// A data frame was seen (idle timer activity).
    pub data_seen: bool,
    /// A pong was seen (keepalive answered).
    pub pong_seen: bool,
    /// Processing stopped here.
    pub stop: Option<Stop>,
}

impl Step {
    fn push_seg(&mut self, start: usize, end: usize) {
        if self.nsegs > 0 && self.segs[self.nsegs - 1].1 == start {
            self.segs[self.nsegs - 1].1 = end;
        } else {
            self.segs[self.nsegs] = (start, end);
            self.nsegs += 1;
        }
    }
}

/// Per-direction message state and counters.
#[derive(Debug)]
pub struct Flow {
    source: Source,
    /// Inside a fragmented message.
    in_message: bool,
    /// The current message is text.
    text: bool,
    /// The current message is being discarded (rate limit, drop mode).
    dropping: bool,
    msg_size: u64,
    utf8: Utf8Stream,
    msg_bucket: Option<Bucket>,
    byte_bucket: Option<Bucket>,
    /// Messages forwarded.
    pub msgs: u64,
    /// Payload bytes forwarded.
    pub bytes: u64,
    /// Messages discarded or refused by the rate limit.
    pub rate_limited: u64,
}

const fn v(to_source: u16, to_sink: u16, reason: &'static str) -> Violation {
    Violation { to_source, to_sink, reason }
}

impl Flow {
    /// A flow for frames from `source`; rate buckets apply to the client only.
    pub fn new(source: Source, policy: &SessionPolicy, now: Instant) -> Flow {
        let (msg_bucket, byte_bucket) = match source {
            Source::Client => (
                Some(Bucket::new(policy.messages_per_second, policy.message_burst, now)),
                Some(Bucket::new(policy.bytes_per_second, policy.byte_burst, now)),
            ),
            Source::Backend => (None, None),
        };
        Flow {
            source,
            in_message: false,
            text: false,
            dropping: false,
            msg_size: 0,
            utf8: Utf8Stream::default(),
            msg_bucket,
            byte_bucket,
            msgs: 0,
            bytes: 0,
            rate_limited: 0,
        }
    }

    fn protocol_error(&self, reason: &'static str) -> Violation {
        match self.source {
            Source::Client => v(1002, 1001, reason),
            Source::Backend => v(1002, 1011, reason),
        }
    }

    /// Checks a header before its payload is read.
    fn check_header(&self, h: &Header, policy: &SessionPolicy) -> Result<(), Violation> {
        if h.rsv != 0 {
            return Err(self.protocol_error("reserved bits set"));
        }
        match h.opcode {
            OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG => {}
            _ => return Err(self.protocol_error("unknown opcode")),
        }
        match (self.source, h.mask.is_some()) {
            (Source::Client, false) => return Err(self.protocol_error("unmasked client frame")),
            (Source::Backend, true) => return Err(self.protocol_error("masked backend frame")),
            _ => {}
        }
        if h.is_control() {
            if !h.fin {
                return Err(self.protocol_error("fragmented control frame"));
            }
            if h.len > 125 {
                return Err(self.protocol_error("control frame over 125 bytes"));
            }
            return Ok(());
        }
        if h.opcode == OP_CONT && !self.in_message {
            return Err(self.protocol_error("continuation without a message"));
        }
        if h.opcode != OP_CONT && self.in_message {
            return Err(self.protocol_error("new message inside a fragmented one"));
        }
        // `msg_size` still holds the previous message until `data_frame` starts the next one:
        // only a continuation adds to it.
        let so_far = if h.opcode == OP_CONT { self.msg_size } else { 0 };
        match self.source {
            Source::Client => {
                if h.len > policy.max_frame_size {
                    return Err(v(1009, 1001, "frame too large"));
                }
                if so_far.saturating_add(h.len) > policy.max_message_size {
                    return Err(v(1009, 1001, "message too large"));
                }
            }
            Source::Backend => {
                if so_far.saturating_add(h.len) > policy.max_message_size {
                    return Err(v(1009, 1001, "backend message too large"));
                }
            }
        }
        Ok(())
    }

    /// Processes the whole frames at the start of `buf`.
    ///
    /// `discard`: the other side has been sent a close, so nothing is forwarded any more (a
    /// close from this source is still recognised). Ping answers are appended to `replies`
    /// (bound for the source), masked with `masks` when the source is the backend.
    pub fn process(
        &mut self,
        buf: &mut [u8],
        policy: &SessionPolicy,
        now: Instant,
        discard: bool,
        masks: &mut MaskGen,
        replies: &mut Vec<u8>,
    ) -> Step {
        let mut step = Step::default();
        let mut pos = 0usize;
        while step.nsegs < MAX_SEGS {
            let h = match frame::parse_header(&buf[pos..]) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(frame::BadLength) => {
                    step.stop = Some(Stop::Violation(self.protocol_error("invalid frame length")));
                    break;
                }
            };
            if let Err(viol) = self.check_header(&h, policy) {
                step.stop = Some(Stop::Violation(viol));
                break;
            }
            // The header passed the size checks, so `len` fits in memory.
            let total = h.header_len + h.len as usize;
            if buf.len() - pos < total {
                step.need = total;
                break;
            }
            let frame_range = (pos, pos + total);
            let payload = &mut buf[pos + h.header_len..pos + total];
            if let Some(m) = h.mask {
                if h.is_control() {
                    frame::apply_mask(payload, m);
                }
            }
            match h.opcode {
                OP_PING => {
                    let mask = (self.source == Source::Backend).then(|| masks.next_mask());
                    frame::write_frame(replies, OP_PONG, mask, payload);
                }
                OP_PONG => step.pong_seen = true,
                OP_CLOSE => {
                    if let Err(viol) = check_close(payload) {
                        step.stop = Some(Stop::Violation(self.protocol_error(viol)));
                        break;
                    }
                    pos += total;
                    step.consumed = pos;
                    step.stop = Some(Stop::Close(frame_range.0 + h.header_len, frame_range.1));
                    return step;
                }
                _ => {
                    step.data_seen = true;
                    match self.data_frame(&h, &mut buf[frame_range.0..frame_range.1], policy, now, masks) {
                        Err(viol) => {
                            step.stop = Some(Stop::Violation(viol));
                            break;
                        }
                        Ok(true) if !discard => step.push_seg(frame_range.0, frame_range.1),
                        Ok(_) => {}
                    }
                }
            }
            pos += total;
            step.consumed = pos;
        }
        step
    }

    /// A complete data frame: rates, UTF-8, re-masking. `Ok(true)` to forward it.
    fn data_frame(
        &mut self,
        h: &Header,
        frame_bytes: &mut [u8],
        policy: &SessionPolicy,
        now: Instant,
        masks: &mut MaskGen,
    ) -> Result<bool, Violation> {
        let first = h.opcode != OP_CONT;
        if first {
            self.text = h.opcode == OP_TEXT;
            self.msg_size = 0;
            self.dropping = false;
            self.utf8.reset();
        }
        self.msg_size += h.len;
        self.in_message = !h.fin;

        if let (Some(mb), Some(bb)) = (self.msg_bucket.as_mut(), self.byte_bucket.as_mut()) {
            let n = h.len as f64;
            match policy.on_rate_limit {
                OnRateLimit::Close => {
                    let ok = if first { mb.try_take(1.0, now) && bb.try_take(n, now) } else { bb.try_take(n, now) };
                    if !ok {
                        self.rate_limited += 1;
                        return Err(v(1008, 1001, "rate limit exceeded"));
                    }
                }
                OnRateLimit::Drop => {
                    if first {
                        // A message is admitted or dropped whole: decide on its first frame,
                        // and charge its later fragments as debt.
                        if mb.has(1.0, now) && bb.has(n, now) {
                            mb.charge(1.0, now);
                            bb.charge(n, now);
                        } else {
                            self.dropping = true;
                            self.rate_limited += 1;
                        }
                    } else if !self.dropping {
                        bb.charge(n, now);
                    }
                }
            }
        }
        let payload = &mut frame_bytes[h.header_len..];
        if self.dropping {
            // A dropped text message is still checked: the rules that end a session do not
            // depend on whether its message is passed on. Its bytes go nowhere, so they are
            // unmasked in place.
            if self.text {
                if let Some(m) = h.mask {
                    frame::apply_mask(payload, m);
                }
                self.check_utf8(payload, h.fin)?;
            }
            return Ok(false);
        }

        match h.mask {
            Some(old) => {
                let new = masks.next_mask();
                if self.text {
                    frame::apply_mask(payload, old);
                    self.check_utf8(payload, h.fin)?;
                    frame::apply_mask(payload, new);
                } else {
                    let x = [old[0] ^ new[0], old[1] ^ new[1], old[2] ^ new[2], old[3] ^ new[3]];
                    frame::apply_mask(payload, x);
                }
                frame_bytes[h.header_len - 4..h.header_len].copy_from_slice(&new);
            }
            None => {
                // Backend text is checked too: a browser fails the whole connection on invalid
                // UTF-8 with no close code to show for it; the proxy closes cleanly instead
                // (1007 to the backend, 1001 to the client, like an oversized message).
                if self.text {
                    self.check_utf8(payload, h.fin)?;
                }
            }
        }
        self.bytes += h.len;
        if h.fin {
            self.msgs += 1;
        }
        Ok(true)
    }

    /// Feeds an unmasked text payload to the UTF-8 check: 1007 to the source when invalid.
    fn check_utf8(&mut self, payload: &[u8], fin: bool) -> Result<(), Violation> {
        if self.utf8.feed(payload, fin) {
            Ok(())
        } else {
            Err(v(1007, 1001, "invalid UTF-8 in text message"))
        }
    }
}

/// RFC 6455 §5.5.1 / §7.4: a close payload is empty, or a valid code and a UTF-8 reason.
fn check_close(payload: &[u8]) -> Result<(), &'static str> {
    match payload.len() {
        0 => Ok(()),
        1 => Err("close frame with a 1-byte payload"),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !frame::valid_close_code(code) {
                return Err("invalid close code");
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err("close reason is not UTF-8");
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitsConfig;

    fn client_frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame::write_header(&mut out, fin, op, Some([1, 2, 3, 4]), payload.len());
        let s = out.len();
        out.extend_from_slice(payload);
        frame::apply_mask(&mut out[s..], [1, 2, 3, 4]);
        out
    }

    fn run(flow: &mut Flow, policy: &SessionPolicy, bytes: &mut [u8]) -> Step {
        flow.process(bytes, policy, Instant::now(), false, &mut MaskGen::new(), &mut Vec::new())
    }

    #[test]
    fn forwards_remasked_frames_contiguously() {
        let p = SessionPolicy::from_limits(&LimitsConfig::default());
        let mut f = Flow::new(Source::Client, &p, Instant::now());
        let mut buf = client_frame(false, OP_TEXT, "héllo ".as_bytes());
        buf.extend(client_frame(true, OP_CONT, b"world"));
        buf.extend(client_frame(true, OP_BINARY, &[0u8; 3])[..4].to_vec()); // incomplete
        let s = run(&mut f, &p, &mut buf);
        assert_eq!(s.nsegs, 1);
        assert_eq!(s.stop, None);
        assert_eq!(f.msgs, 1);
        // Unmask the forwarded frames with their new keys and compare payloads.
        let (a, b) = s.segs[0];
        let mut seg = buf[a..b].to_vec();
        let mut text = Vec::new();
        let mut pos = 0;
        while pos < seg.len() {
            let h = frame::parse_header(&seg[pos..]).unwrap().unwrap();
            let pl = &mut seg[pos + h.header_len..pos + h.header_len + h.len as usize];
            frame::apply_mask(pl, h.mask.unwrap());
            assert_ne!(h.mask, Some([1, 2, 3, 4]));
            text.extend_from_slice(pl);
            pos += h.header_len + h.len as usize;
        }
        assert_eq!(text, "héllo world".as_bytes());
        assert_eq!(s.consumed, b);
        assert_eq!(s.need, 0, "header of the incomplete frame not yet known");
    }

    #[test]
    fn violations() {
        let p = SessionPolicy { max_frame_size: 10, ..SessionPolicy::from_limits(&LimitsConfig::default()) };
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (vec![0x82, 0x00], 1002),                            // unmasked
            (client_frame(true, 0x3, b""), 1002),                // unknown opcode
            (client_frame(true, OP_CONT, b"x"), 1002),           // continuation without start
            (client_frame(false, OP_PING, b""), 1002),           // fragmented control
            (client_frame(true, OP_PING, &[0; 126]), 1002),      // control too long
            (client_frame(true, OP_BINARY, &[0; 11]), 1009),     // frame too large
            (client_frame(true, OP_TEXT, &[0xff]), 1007),        // bad UTF-8
            (client_frame(true, OP_CLOSE, &[0x03, 0xed]), 1002), // close code 1005
            (client_frame(true, OP_CLOSE, &[0x03]), 1002),       // 1-byte close
        ];
        for (mut bytes, code) in cases {
            let mut f = Flow::new(Source::Client, &p, Instant::now());
            let s = run(&mut f, &p, &mut bytes);
            match s.stop {
                Some(Stop::Violation(v)) => assert_eq!(v.to_source, code, "{v:?}"),
                other => panic!("expected {code}, got {other:?}"),
            }
        }
        let mut rsv = client_frame(true, OP_BINARY, b"x");
        rsv[0] |= 0x40;
        let mut f = Flow::new(Source::Client, &p, Instant::now());
        assert!(matches!(run(&mut f, &p, &mut rsv).stop, Some(Stop::Violation(Violation { to_source: 1002, .. }))));
    }

    #[test]
    fn drop_mode_drops_whole_messages() {
        let p = SessionPolicy {
            messages_per_second: 1,
            message_burst: 1,
            on_rate_limit: OnRateLimit::Drop,
            ..SessionPolicy::from_limits(&LimitsConfig::default())
        };
        let mut f = Flow::new(Source::Client, &p, Instant::now());
        let mut buf = client_frame(true, OP_BINARY, b"one");
        buf.extend(client_frame(false, OP_BINARY, b"tw"));
        buf.extend(client_frame(true, OP_CONT, b"o"));
        let s = run(&mut f, &p, &mut buf);
        assert_eq!((s.nsegs, f.msgs, f.rate_limited), (1, 1, 1));
        assert_eq!(s.consumed, buf.len());

        // A message dropped for the rate is still checked as text: invalid UTF-8 is 1007.
        let mut bad = client_frame(false, OP_TEXT, b"ok");
        bad.extend(client_frame(true, OP_CONT, b"\xff"));
        let s = run(&mut f, &p, &mut bad);
        assert_eq!((s.nsegs, f.rate_limited), (0, 2));
        assert!(matches!(s.stop, Some(Stop::Violation(Violation { to_source: 1007, .. }))), "{s:?}");
    }

    #[test]
    fn close_mode_closes_with_1008() {
        let p = SessionPolicy {
            messages_per_second: 1,
            message_burst: 2,
            ..SessionPolicy::from_limits(&LimitsConfig::default())
        };
        let mut f = Flow::new(Source::Client, &p, Instant::now());
        let mut buf: Vec<u8> = (0..3).flat_map(|_| client_frame(true, OP_TEXT, b"hi")).collect();
        let s = run(&mut f, &p, &mut buf);
        assert_eq!(f.msgs, 2);
        assert!(matches!(s.stop, Some(Stop::Violation(Violation { to_source: 1008, .. }))));
    }
}
