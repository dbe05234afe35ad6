//! Summaries of connections dropped at accept (over `max_pending_handshakes_per_ip`): at most
//! one log line per IP per 10 s, so a flood cannot flood the log.

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
    /// Counts a drop; logs a summary when the IP's interval has passed.
    pub fn record(&self, ip: IpAddr) {
        let now = Instant::now();
        let Ok(mut map) = self.inner.lock() else { return };
        if map.len() >= MAX_TRACKED {
            map.retain(|_, (t, _)| now.duration_since(*t) < INTERVAL);
            if map.len() >= MAX_TRACKED {
                return;
            }
        }
        let e = map.entry(ip).or_insert((now - INTERVAL, 0));
        e.1 += 1;
        if now.duration_since(e.0) >= INTERVAL {
            tracing::warn!(event = "pending_dropped", client_ip = %ip, dropped = e.1, "connections dropped at accept: too many pending handshakes from this IP");
            *e = (now, 0);
        }
    }
}
