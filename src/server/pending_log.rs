//! Summaries of connections dropped at accept (over `max_pending_handshakes_per_ip`): at most
//! one log line per IP per 10 s, so a flood cannot flood the log, and every drop is in some
//! line's `dropped` count (a timer flushes the counts, and the drain flushes the rest).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const INTERVAL: Duration = Duration::from_secs(10);
/// Above this many tracked IPs, stale entries are purged (bounded memory under a spray).
const MAX_TRACKED: usize = 10_000;

/// Per-IP drop counts since the last summary line.
#[derive(Default)]
pub struct DropLog {
    inner: Mutex<HashMap<IpAddr, (Instant, u64)>>,
}

impl DropLog {
    /// Counts a drop. The first drop from an IP without a line in the last interval is logged
    /// at once; the following ones are counted and told by [`DropLog::flush`].
    pub fn record(&self, ip: IpAddr) {
        let now = Instant::now();
        let Ok(mut map) = self.inner.lock() else { return };
        if map.len() >= MAX_TRACKED {
            map.retain(|_, (t, _)| now.duration_since(*t) < INTERVAL);
            if map.len() >= MAX_TRACKED {
                return;
            }
        }
        match map.get_mut(&ip) {
            // Within the interval of the last line: counted, told by `flush`.
            Some(e) if now.duration_since(e.0) < INTERVAL => e.1 += 1,
            _ => {
                log(ip, 1);
                map.insert(ip, (now, 0));
            }
        }
    }

    /// Logs the drops counted since each IP's last line, once its interval has passed (`all`:
    /// now, at exit), and forgets quiet IPs. Called every [`INTERVAL`] and at the end.
    pub fn flush(&self, all: bool) {
        let now = Instant::now();
        let Ok(mut map) = self.inner.lock() else { return };
        map.retain(|ip, (t, n)| {
            if now.duration_since(*t) < INTERVAL && !all {
                return true;
            }
            if *n == 0 {
                return false;
            }
            log(*ip, *n);
            *t = now;
            *n = 0;
            true
        });
    }
}

fn log(ip: IpAddr, dropped: u64) {
    tracing::warn!(event = "pending_dropped", client_ip = %ip, dropped, "connections dropped at accept: too many pending handshakes from this IP");
}

/// The summary interval, for the caller's flush timer.
pub const FLUSH_EVERY: Duration = INTERVAL;
