//! The per-session policy a session is admitted under. It is copied into the session at the
//! handshake, so a reload never changes the limits of a live session (DESIGN.md, fine print).

use crate::config::{LimitsConfig, OnRateLimit};
use std::time::{Duration, Instant};

/// Limits and timers of one session.
#[derive(Debug, Clone)]
pub struct SessionPolicy {
    /// Largest client frame payload.
    pub max_frame_size: u64,
    /// Largest message, both directions.
    pub max_message_size: u64,
    /// Client → backend messages per second and burst.
    pub messages_per_second: u64,
    /// Message bucket size.
    pub message_burst: u64,
    /// Client → backend bytes per second.
    pub bytes_per_second: u64,
    /// Byte bucket size.
    pub byte_burst: u64,
    /// Close or drop over a rate.
    pub on_rate_limit: OnRateLimit,
    /// No data frame either way for this long → 1001.
    pub idle_timeout: Duration,
    /// Keepalive interval; a ping unanswered by the next one ends the session.
    pub ping_interval: Duration,
    /// When the token expires (`exp + leeway`), if sessions expire.
    pub expires_at: Option<Instant>,
}

impl SessionPolicy {
    /// The policy from `[limits]`, without an expiry.
    pub fn from_limits(l: &LimitsConfig) -> SessionPolicy {
        SessionPolicy {
            max_frame_size: l.max_frame_size.get(),
            max_message_size: l.max_message_size.get(),
            messages_per_second: l.messages_per_second,
            message_burst: l.message_burst,
            bytes_per_second: l.bytes_per_second.get(),
            byte_burst: l.byte_burst(),
            on_rate_limit: l.on_rate_limit,
            idle_timeout: l.idle_timeout.get(),
            ping_interval: l.ping_interval.get(),
            expires_at: None,
        }
    }
}

/// A token bucket refilled from elapsed time (no timers). `tokens` may go negative: in drop
/// mode the later fragments of an admitted message are charged as debt, so a message is
/// never cut in half.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    cap: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Bucket {
        Bucket { rate: rate as f64, cap: burst as f64, tokens: burst as f64, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        if dt > 0.0 {
            self.tokens = (self.tokens + dt * self.rate).min(self.cap);
            self.last = now;
        }
    }

    /// Takes `n` tokens if there are enough.
    pub fn try_take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Whether `n` tokens are available (without taking them).
    pub fn has(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= n
    }

    /// Takes `n` tokens even into debt; returns whether the bucket stayed non-negative.
    pub fn charge(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        self.tokens -= n;
        self.tokens >= 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, 5, t0);
        assert!((0..5).all(|_| b.try_take(1.0, t0)));
        assert!(!b.try_take(1.0, t0));
        assert!(b.try_take(1.0, t0 + Duration::from_millis(110)));
        assert!(!b.try_take(1.0, t0 + Duration::from_millis(110)));
        assert!(!b.charge(3.0, t0 + Duration::from_millis(110)));
        assert!(!b.try_take(1.0, t0 + Duration::from_millis(300)));
        assert!(b.try_take(1.0, t0 + Duration::from_millis(500)));
    }
}
