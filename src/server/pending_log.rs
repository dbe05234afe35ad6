//! Summaries of connections dropped at accept (over `max_pending_handshakes_per_ip`): at most
//! one log line per IP per 10 s, so a flood cannot flood the log, and every drop is in some
//! line's `dropped` count (a timer flushes the counts, and the drain flushes the rest).
//!
//! "Per IP" is per key of the cap ([`IpKey`]): a spray from the addresses of one IPv6 /64 is
//! one line, not one per address.

use crate::admission::limits::IpKey;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const INTERVAL: Duration = Duration::from_secs(10);
/// Above this many tracked IPs, stale entries are purged (bounded memory under a spray).
const MAX_TRACKED: usize = 10_000;

/// Per-IP drop counts since the last summary line.
#[derive(Default)]
pub struct DropLog {
    inner: Mutex<HashMap<IpKey, (Instant, u64)>>,
}

impl DropLog {
    /// Counts a drop. The first drop from an IP without a line in the last interval is logged
    /// at once (with any drops counted since its last line); the following ones are counted
    /// and told by [`DropLog::flush`].
    pub fn record(&self, ip: IpKey) {
        let Ok(mut map) = self.inner.lock() else { return };
        record_at(&mut map, ip, Instant::now(), &mut log);
    }

    /// Logs the drops counted since each IP's last line, once its interval has passed (`all`:
    /// now, at exit), and forgets quiet IPs. Called every [`INTERVAL`] and at the end.
    pub fn flush(&self, all: bool) {
        let Ok(mut map) = self.inner.lock() else { return };
        flush_at(&mut map, Instant::now(), all, &mut log);
    }
}

type Counts = HashMap<IpKey, (Instant, u64)>;

fn record_at(map: &mut Counts, ip: IpKey, now: Instant, emit: &mut dyn FnMut(IpKey, u64)) {
    if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
        // Forget IPs whose interval is over, telling their counts first.
        map.retain(|ip, (t, n)| {
            if now.duration_since(*t) < INTERVAL {
                return true;
            }
            if *n > 0 {
                emit(*ip, *n);
            }
            false
        });
        if map.len() >= MAX_TRACKED {
            // More than MAX_TRACKED IPs dropped within one interval: this one is counted in
            // the metrics only; a line each would let a spray flood the log.
            return;
        }
    }
    match map.get_mut(&ip) {
        // Within the interval of the last line: counted, told by `flush`.
        Some(e) if now.duration_since(e.0) < INTERVAL => e.1 += 1,
        // The interval is over and the flush timer has not run yet: tell the count now.
        Some(e) => {
            emit(ip, e.1 + 1);
            *e = (now, 0);
        }
        None => {
            emit(ip, 1);
            map.insert(ip, (now, 0));
        }
    }
}

fn flush_at(map: &mut Counts, now: Instant, all: bool, emit: &mut dyn FnMut(IpKey, u64)) {
    map.retain(|ip, (t, n)| {
        if now.duration_since(*t) < INTERVAL && !all {
            return true;
        }
        if *n == 0 {
            return false;
        }
        emit(*ip, *n);
        *t = now;
        *n = 0;
        true
    });
}

fn log(key: IpKey, dropped: u64) {
    // One address is written as an address (`192.0.2.7`), a group as its network.
    let net = key.net();
    let client_ip = if net.prefix_len() == net.max_prefix_len() { net.addr().to_string() } else { net.to_string() };
    tracing::warn!(
        event = "pending_dropped",
        client_ip,
        dropped,
        "connections dropped at accept: too many pending handshakes from this IP"
    );
}

/// The summary interval, for the caller's flush timer.
pub const FLUSH_EVERY: Duration = INTERVAL;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_drop_is_in_some_line_when_the_flood_outlasts_the_interval() {
        let mut map = Counts::new();
        let mut lines: Vec<(IpKey, u64)> = Vec::new();
        let ip = IpKey::new("192.0.2.7".parse().unwrap(), 32, 64);
        let t0 = Instant::now();
        // 100 drops a second for 25 s; the flush timer ticks every 10 s, out of step.
        let mut drops = 0;
        for ms in (0..25_000u64).step_by(10) {
            let now = t0 + Duration::from_millis(ms);
            record_at(&mut map, ip, now, &mut |ip, n| lines.push((ip, n)));
            drops += 1;
            if ms % 10_000 == 7_000 {
                flush_at(&mut map, now, false, &mut |ip, n| lines.push((ip, n)));
            }
        }
        flush_at(&mut map, t0 + Duration::from_secs(26), true, &mut |ip, n| lines.push((ip, n)));
        assert_eq!(lines.iter().map(|l| l.1).sum::<u64>(), drops, "{lines:?}");
        assert!(lines.len() <= 5, "at most one line per 10 s, and the last at exit: {lines:?}");
    }
}
