//! Per-IP and global admission limits (DESIGN.md "Admission" rows `rate_limited`, `ip_cap`,
//! `global_cap`, `pending_dropped`, and "Fine print → Memory").
//!
//! - [`PerIpLimiter`] is the one small interface the handshake uses for the per-IP handshake
//!   rate and the per-IP session cap. [`MemoryLimiter`] is its first implementation (one
//!   process); a shared one (Redis, "Planned next") can be added behind the same trait without
//!   touching admission.
//! - [`GlobalCap`] caps proxied sessions (`server.max_connections`).
//! - [`PendingTracker`] caps TCP connections not yet upgraded per peer IP, grouped by prefix
//!   (`max_pending_handshakes_per_ip`), at accept, before any TLS work.
//!
//! Every count is held by an RAII guard ([`SessionPermit`], [`GlobalPermit`],
//! [`PendingGuard`]) so it is released on every path a session or connection can end by,
//! panics and cancelled futures included.
//!
//! Limit values are passed in at each call rather than stored, so a config reload changes
//! them for the next call without resetting any count.

use crate::config::LimitsConfig;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::collections::hash_map::{Entry as MapEntry, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::hash::RandomState;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// A client address grouped to `ipv4_prefix` / `ipv6_prefix`: the unit the per-IP limits
/// count. An IPv4-mapped IPv6 address (`::ffff:1.2.3.4`, as a dual-stack socket reports an
/// IPv4 peer) counts as the IPv4 address, so one client cannot get two budgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpKey(IpNet);

impl IpKey {
    /// Groups `ip` to its network: `v4_prefix` for IPv4 (clamped to 32), `v6_prefix` for
    /// IPv6 (clamped to 128). Host bits are cleared, so every address of one prefix gives the
    /// same key.
    pub fn new(ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> IpKey {
        let net = match ip.to_canonical() {
            // The clamp makes `new` infallible; the fallback (a host route) is unreachable
            // but keeps this free of unwrap.
            IpAddr::V4(a) => {
                IpNet::V4(Ipv4Net::new(a, v4_prefix.min(32)).map(|n| n.trunc()).unwrap_or_else(|_| Ipv4Net::from(a)))
            }
            IpAddr::V6(a) => {
                IpNet::V6(Ipv6Net::new(a, v6_prefix.min(128)).map(|n| n.trunc()).unwrap_or_else(|_| Ipv6Net::from(a)))
            }
        };
        IpKey(net)
    }

    /// Groups `ip` with the prefixes of `[limits]`.
    pub fn from_config(ip: IpAddr, cfg: &LimitsConfig) -> IpKey {
        IpKey::new(ip, cfg.ipv4_prefix, cfg.ipv6_prefix)
    }

    /// The network this key stands for (e.g. `2001:db8:1:2::/64`).
    pub fn net(&self) -> IpNet {
        self.0
    }
}

impl fmt::Display for IpKey {
    /// CIDR text, e.g. `203.0.113.7/32` or `2001:db8::/64` (RFC 5952): usable as a log
    /// field or as a key in a shared store.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The per-IP limit values, taken from the live config at each call: a reload changes them
/// without resetting counts or buckets.
#[derive(Clone, Copy, Debug)]
pub struct IpLimits {
    /// Concurrent sessions per key (`max_connections_per_ip`).
    pub max_sessions: u64,
    /// Handshake bucket refill rate, tokens per second (`handshakes_per_second_per_ip`).
    pub handshakes_per_second: u64,
    /// Handshake bucket size (`handshake_burst_per_ip`).
    pub handshake_burst: u64,
}

impl IpLimits {
    /// The per-IP values of `[limits]`.
    pub fn from_config(cfg: &LimitsConfig) -> IpLimits {
        IpLimits {
            max_sessions: cfg.max_connections_per_ip,
            handshakes_per_second: cfg.handshakes_per_second_per_ip,
            handshake_burst: cfg.handshake_burst_per_ip,
        }
    }

    // Config validation refuses zeros; treating them as 1 here keeps the arithmetic below
    // finite (no division by zero, no infinite retry-after) whatever a caller passes.
    fn rate(&self) -> f64 {
        self.handshakes_per_second.max(1) as f64
    }
    fn burst(&self) -> f64 {
        self.handshake_burst.max(1) as f64
    }
}

/// The one small interface the handshake uses for per-IP limits, so that a shared
/// implementation (Redis, for several instances behind one balancer) can be added later
/// without touching admission. Admission holds an `Arc<dyn PerIpLimiter>`.
pub trait PerIpLimiter: Send + Sync + 'static {
    /// Takes one token from the key's handshake bucket. `Err(retry_after)` when the bucket is
    /// empty, rounded up to whole seconds and at least 1 s (the value of `Retry-After`).
    fn check_handshake(&self, key: IpKey, limits: &IpLimits) -> Result<(), Duration>;
    /// Reserves a concurrent-session slot for the key; `None` when it is at `max_sessions`.
    /// The slot is released when the permit is dropped.
    fn acquire_session(&self, key: IpKey, limits: &IpLimits) -> Option<SessionPermit>;
    /// Number of keys currently tracked (for tests and a metric).
    fn tracked_keys(&self) -> usize;
}

/// An RAII per-IP session slot: releases it on drop, on every path a session can end by.
///
/// Implementations of [`PerIpLimiter`] build one with [`SessionPermit::new`] and a release
/// action; a shared-store implementation would, for instance, queue a decrement there (drop
/// cannot await).
#[must_use = "the session slot is released as soon as the permit is dropped"]
pub struct SessionPermit {
    key: IpKey,
    release: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl SessionPermit {
    /// A permit for `key` that runs `release` exactly once, when dropped.
    pub fn new(key: IpKey, release: impl FnOnce() + Send + Sync + 'static) -> SessionPermit {
        SessionPermit { key, release: Some(Box::new(release)) }
    }

    /// The key this slot is counted under.
    pub fn key(&self) -> IpKey {
        self.key
    }
}

impl fmt::Debug for SessionPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionPermit").field("key", &self.key).finish()
    }
}

impl Drop for SessionPermit {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

/// Number of independently locked shards: enough that two cores (or a few more) rarely
/// contend, small enough that a sweep is 16 short lock holds.
const SHARDS: usize = 16;

/// Default hard cap on keys tracked by a [`MemoryLimiter`]. An entry costs about 64 bytes
/// with the map's overhead, so the table stays under roughly 64 MiB even under an IPv6
/// address-spraying attack that outruns the sweeper.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// How often a full shard may be swept from the request path. A forced sweep is a walk of the
/// whole shard under its lock, so it is rate-limited: an attacker filling the table must not
/// be able to make every request pay for one.
const FORCED_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// How often [`MemoryLimiter::spawn_sweeper`] sweeps. An idle entry goes at the first sweep
/// after its bucket has refilled: with the defaults (burst 20 at 10/s, 2 s to refill) that is
/// within 12 s, inside DESIGN.md's "within a minute".
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// What the table stores per key.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Live sessions holding a [`SessionPermit`] for this key.
    sessions: u64,
    /// Handshake tokens left as of `last_refill` (fractional: refill is continuous).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    last_refill: Instant,
}

impl Entry {
    fn new(limits: &IpLimits, now: Instant) -> Entry {
        // A bucket starts full: a client's first burst is never refused.
        Entry { sessions: 0, tokens: limits.burst(), last_refill: now }
    }

    /// Tokens as of `now`, without changing the entry. Elapsed-time based, so no timers run
    /// per key. A burst lowered by a reload caps the tokens at the new size.
    fn tokens_at(&self, limits: &IpLimits, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last_refill).as_secs_f64();
        (self.tokens + elapsed * limits.rate()).min(limits.burst())
    }

    fn take_token(&mut self, limits: &IpLimits, now: Instant) -> Result<(), Duration> {
        self.tokens = self.tokens_at(limits, now);
        self.last_refill = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            // Time until one whole token is back, rounded up to whole seconds (Retry-After
            // carries seconds), at least 1 s.
            let secs = ((1.0 - self.tokens) / limits.rate()).ceil().max(1.0);
            Err(Duration::from_secs(secs as u64))
        }
    }

    /// An entry that can be forgotten without changing any decision: no live session, and a
    /// bucket back to full (a fresh entry would start exactly so).
    fn is_idle(&self, limits: &IpLimits, now: Instant) -> bool {
        self.sessions == 0 && self.tokens_at(limits, now) >= limits.burst()
    }
}

#[derive(Debug)]
struct Shard {
    map: HashMap<IpKey, Entry>,
    /// Last sweep run from the request path because the shard was full.
    last_forced_sweep: Option<Instant>,
}

impl Shard {
    fn sweep(&mut self, limits: &IpLimits, now: Instant) {
        self.map.retain(|_, e| !e.is_idle(limits, now));
    }

    /// The entry for `key`, created (with a full bucket) when absent. `None` when the shard is
    /// at its cap even after a (rate-limited) sweep: see [`MemoryLimiter`] for why that fails
    /// closed.
    fn entry(&mut self, key: IpKey, limits: &IpLimits, now: Instant, cap: usize) -> Option<&mut Entry> {
        if self.map.len() >= cap && !self.map.contains_key(&key) {
            let due = self.last_forced_sweep.is_none_or(|t| now.saturating_duration_since(t) >= FORCED_SWEEP_INTERVAL);
            if due {
                self.last_forced_sweep = Some(now);
                self.sweep(limits, now);
            }
            if self.map.len() >= cap {
                return None;
            }
        }
        Some(match self.map.entry(key) {
            MapEntry::Occupied(o) => o.into_mut(),
            MapEntry::Vacant(v) => v.insert(Entry::new(limits, now)),
        })
    }
}

/// The shared table; [`SessionPermit`]s hold an `Arc` to it, so they outlive nothing.
#[derive(Debug)]
struct Table {
    shards: [Mutex<Shard>; SHARDS],
    /// Picks the shard. Randomly keyed per process so an attacker cannot aim every key at one
    /// shard (each shard's map has its own random SipHash keys as well).
    hasher: RandomState,
    /// Cap per shard: the table-wide cap divided by [`SHARDS`].
    shard_cap: usize,
}

impl Table {
    fn shard(&self, key: &IpKey) -> MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(key) % SHARDS as u64) as usize;
        lock(&self.shards[i])
    }

    fn release_session(&self, key: IpKey) {
        let mut shard = self.shard(&key);
        // The entry cannot have been swept while it had a session; if it is absent anyway,
        // there is nothing to release.
        if let Some(e) = shard.map.get_mut(&key) {
            e.sessions = e.sessions.saturating_sub(1);
        }
        // The entry itself stays until a sweep: its bucket may still be partly empty, and
        // forgetting it now would hand the client a fresh burst.
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves the data consistent
/// (plain counter updates), so a panic elsewhere must not turn into a panic on every
/// handshake.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The in-memory [`PerIpLimiter`]: a sharded `HashMap<IpKey, Entry>` behind
/// `std::sync::Mutex`es held only for a map operation (never across an `.await`).
///
/// Memory stays bounded under an address-spraying attack (every IPv6 /64 is a new key):
/// - [`sweep`](MemoryLimiter::sweep) drops entries with no session and a full bucket (a
///   fresh entry would be identical, so no decision changes);
///   [`MemoryLimiter::spawn_sweeper`] runs it every [`SWEEP_INTERVAL`].
/// - A hard cap ([`DEFAULT_MAX_KEYS`], split evenly across shards) bounds the table between
///   sweeps. A new key arriving at a full shard first triggers a sweep of that shard (at most
///   once per second per shard, so it cannot be used to burn CPU); if the shard is still
///   full, the new key is refused: `check_handshake` answers `Err(1 s)` and
///   `acquire_session` `None`. This fails closed on purpose: failing open would let exactly
///   the spraying attacker bypass the per-IP limits. Keys already tracked are unaffected, so
///   known clients keep working while only never-seen prefixes wait.
#[derive(Debug)]
pub struct MemoryLimiter {
    table: Arc<Table>,
}

impl MemoryLimiter {
    /// An empty limiter with the default cap of [`DEFAULT_MAX_KEYS`] keys.
    pub fn new() -> Arc<MemoryLimiter> {
        MemoryLimiter::with_max_keys(DEFAULT_MAX_KEYS)
    }

    /// An empty limiter tracking at most about `max_keys` keys (rounded up to a multiple of
    /// the shard count).
    pub fn with_max_keys(max_keys: usize) -> Arc<MemoryLimiter> {
        let shards = std::array::from_fn(|_| Mutex::new(Shard { map: HashMap::new(), last_forced_sweep: None }));
        Arc::new(MemoryLimiter {
            table: Arc::new(Table { shards, hasher: RandomState::new(), shard_cap: max_keys.div_ceil(SHARDS).max(1) }),
        })
    }

    /// Drops the entries that have no session and a full bucket. Call periodically (see
    /// [`spawn_sweeper`](MemoryLimiter::spawn_sweeper)); `limits` are the live values, since
    /// "full" depends on the current burst and rate.
    pub fn sweep(&self, limits: &IpLimits) {
        self.sweep_at(limits, Instant::now());
    }

    fn sweep_at(&self, limits: &IpLimits, now: Instant) {
        // One shard at a time: handshakes on the other shards go on meanwhile.
        for shard in &self.table.shards {
            lock(shard).sweep(limits, now);
        }
    }

    /// Spawns a task that sweeps every [`SWEEP_INTERVAL`] with the limits `limits()` returns at
    /// that moment (read the live config there). The sweep itself runs on the blocking pool, so
    /// walking a large table never stalls a runtime worker. The task ends by itself once the
    /// limiter is dropped; abort the handle to end it sooner.
    pub fn spawn_sweeper(
        self: &Arc<Self>,
        limits: impl Fn() -> IpLimits + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        self.spawn_sweeper_every(SWEEP_INTERVAL, limits)
    }

    fn spawn_sweeper_every(
        self: &Arc<Self>,
        every: Duration,
        limits: impl Fn() -> IpLimits + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        // A weak reference, so the sweeper does not keep a replaced limiter alive.
        let weak: Weak<MemoryLimiter> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is immediate; nothing to sweep yet
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { break };
                let l = limits();
                if tokio::task::spawn_blocking(move || me.sweep(&l)).await.is_err() {
                    break; // the runtime is shutting down
                }
            }
        })
    }

    fn check_handshake_at(&self, key: IpKey, limits: &IpLimits, now: Instant) -> Result<(), Duration> {
        let mut shard = self.table.shard(&key);
        match shard.entry(key, limits, now, self.table.shard_cap) {
            Some(e) => e.take_token(limits, now),
            None => Err(Duration::from_secs(1)),
        }
    }

    fn acquire_session_at(&self, key: IpKey, limits: &IpLimits, now: Instant) -> Option<SessionPermit> {
        {
            let mut shard = self.table.shard(&key);
            let e = shard.entry(key, limits, now, self.table.shard_cap)?;
            // `>=`: a reload that lowered the cap below the live count refuses new sessions
            // until enough have ended; live ones are not cut.
            if e.sessions >= limits.max_sessions.max(1) {
                return None;
            }
            e.sessions += 1;
        } // the shard lock is released before the permit exists, so its drop can lock again
        let table = Arc::clone(&self.table);
        Some(SessionPermit::new(key, move || table.release_session(key)))
    }
}

impl PerIpLimiter for MemoryLimiter {
    fn check_handshake(&self, key: IpKey, limits: &IpLimits) -> Result<(), Duration> {
        self.check_handshake_at(key, limits, Instant::now())
    }

    fn acquire_session(&self, key: IpKey, limits: &IpLimits) -> Option<SessionPermit> {
        self.acquire_session_at(key, limits, Instant::now())
    }

    fn tracked_keys(&self) -> usize {
        self.table.shards.iter().map(|s| lock(s).map.len()).sum()
    }
}

/// The global cap on proxied sessions (`server.max_connections`, 503 beyond): a lock-free
/// counter with an RAII permit.
#[derive(Debug, Default)]
pub struct GlobalCap {
    active: AtomicU64,
}

impl GlobalCap {
    /// A cap with no session counted.
    pub fn new() -> Arc<GlobalCap> {
        Arc::new(GlobalCap::default())
    }

    /// Counts one more session unless `max` are already active. `max` is read at each call,
    /// so a reload applies to the next session; one that lowers it below the live count cuts
    /// no session, it only refuses new ones until the count falls under.
    pub fn try_acquire(self: &Arc<Self>, max: u64) -> Option<GlobalPermit> {
        // A compare-and-swap loop rather than fetch_add-then-undo, so the count never
        // overshoots `max`, even for an instant (the gauge reads it).
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| GlobalPermit { cap: Arc::clone(self) })
    }

    /// Sessions currently counted (`wsgate_sessions_active`).
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Acquire)
    }
}

/// One session counted by [`GlobalCap`]; dropping it releases the slot.
#[derive(Debug)]
#[must_use = "the slot is released as soon as the permit is dropped"]
pub struct GlobalPermit {
    cap: Arc<GlobalCap>,
}

impl Drop for GlobalPermit {
    fn drop(&mut self) {
        self.cap.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `max_pending_handshakes_per_ip`: TCP connections accepted but not yet upgraded (nor
/// refused), per TCP peer, checked at accept before any TLS work, before any X-Forwarded-For
/// or PROXY header is read (behind a balancer that peer is the balancer, so set the cap for
/// it). Peers are grouped by `ipv4_prefix` / `ipv6_prefix` like every per-IP limit ([`IpKey`]):
/// an IPv6 client holds a whole /64, and a cap per address would cap nothing.
///
/// An entry exists only while it has a live connection, so the table is bounded by the
/// number of open sockets and needs no sweeping.
#[derive(Debug, Default)]
pub struct PendingTracker {
    map: Mutex<HashMap<IpKey, u64>>,
}

impl PendingTracker {
    /// An empty tracker.
    pub fn new() -> Arc<PendingTracker> {
        Arc::new(PendingTracker::default())
    }

    /// Counts one more pending connection from `peer`, unless it already has `max`.
    /// `None` means: drop the connection now.
    pub fn try_enter(self: &Arc<Self>, peer: IpKey, max: u64) -> Option<PendingGuard> {
        let mut map = lock(&self.map);
        let n = map.entry(peer).or_insert(0);
        if *n >= max {
            if *n == 0 {
                // Only with max == 0 (refused by config validation): leave no empty entry.
                map.remove(&peer);
            }
            return None;
        }
        *n += 1;
        drop(map);
        Some(PendingGuard { tracker: Arc::clone(self), peer })
    }

    /// Peers with at least one pending connection.
    pub fn tracked(&self) -> usize {
        lock(&self.map).len()
    }

    /// Pending connections from `peer` (for tests and logs).
    pub fn pending(&self, peer: IpKey) -> u64 {
        lock(&self.map).get(&peer).copied().unwrap_or(0)
    }
}

/// One pending connection counted by [`PendingTracker`]. Drop it when the connection is
/// upgraded, refused or closed; the peer's entry goes when its count reaches 0.
#[derive(Debug)]
#[must_use = "the pending slot is released as soon as the guard is dropped"]
pub struct PendingGuard {
    tracker: Arc<PendingTracker>,
    peer: IpKey,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut map = lock(&self.tracker.map);
        if let Some(n) = map.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn key(s: &str) -> IpKey {
        IpKey::new(s.parse().unwrap(), 32, 64)
    }

    const L: IpLimits = IpLimits { max_sessions: 3, handshakes_per_second: 2, handshake_burst: 5 };

    #[test]
    fn bucket_allows_burst_then_refuses_with_retry_after() {
        let lim = MemoryLimiter::new();
        let k = key("192.0.2.1");
        let t0 = Instant::now();
        for i in 0..5 {
            assert_eq!(lim.check_handshake_at(k, &L, t0), Ok(()), "token {i}");
        }
        assert_eq!(lim.check_handshake_at(k, &L, t0), Err(Duration::from_secs(1)));
        // Another key has its own bucket.
        assert_eq!(lim.check_handshake_at(key("192.0.2.2"), &L, t0), Ok(()));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let lim = MemoryLimiter::new();
        let k = key("192.0.2.1");
        let t0 = Instant::now();
        let slow = IpLimits { max_sessions: 1, handshakes_per_second: 1, handshake_burst: 1 };
        assert_eq!(lim.check_handshake_at(k, &slow, t0), Ok(()));
        // 0.1 s later 0.1 token is back: 0.9 s to go, answered as 1 s.
        assert_eq!(lim.check_handshake_at(k, &slow, t0 + Duration::from_millis(100)), Err(Duration::from_secs(1)));
    }

    #[test]
    fn bucket_refills_over_time_up_to_burst() {
        let lim = MemoryLimiter::new();
        let k = key("192.0.2.1");
        let t0 = Instant::now();
        for _ in 0..5 {
            lim.check_handshake_at(k, &L, t0).unwrap();
        }
        assert!(lim.check_handshake_at(k, &L, t0).is_err());
        // 2 per second: after 0.5 s exactly one token is back.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(lim.check_handshake_at(k, &L, t1), Ok(()));
        assert!(lim.check_handshake_at(k, &L, t1).is_err());
        // After a long pause the bucket is full again, but never more than the burst.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..5 {
            assert_eq!(lim.check_handshake_at(k, &L, t2), Ok(()));
        }
        assert!(lim.check_handshake_at(k, &L, t2).is_err());
    }

    #[test]
    fn bucket_refills_in_real_time() {
        // The public entry point uses the real clock.
        let lim = MemoryLimiter::new();
        let k = key("192.0.2.9");
        let fast = IpLimits { max_sessions: 1, handshakes_per_second: 50, handshake_burst: 1 };
        assert_eq!(lim.check_handshake(k, &fast), Ok(()));
        assert!(lim.check_handshake(k, &fast).is_err());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(lim.check_handshake(k, &fast), Ok(()));
    }

    #[test]
    fn reload_changes_limits_without_resetting_the_bucket() {
        let lim = MemoryLimiter::new();
        let k = key("192.0.2.1");
        let t0 = Instant::now();
        for _ in 0..5 {
            lim.check_handshake_at(k, &L, t0).unwrap();
        }
        // A bigger burst does not refill an empty bucket.
        let bigger = IpLimits { handshake_burst: 100, ..L };
        assert!(lim.check_handshake_at(k, &bigger, t0).is_err());
        // A smaller burst caps what has refilled.
        let smaller = IpLimits { handshake_burst: 2, ..L };
        let t1 = t0 + Duration::from_secs(60);
        assert!(lim.check_handshake_at(k, &smaller, t1).is_ok());
        assert!(lim.check_handshake_at(k, &smaller, t1).is_ok());
        assert!(lim.check_handshake_at(k, &smaller, t1).is_err());
    }

    #[test]
    fn sessions_capped_and_released_on_drop() {
        let lim = MemoryLimiter::new();
        let k = key("192.0.2.1");
        let a = lim.acquire_session(k, &L).unwrap();
        let b = lim.acquire_session(k, &L).unwrap();
        let c = lim.acquire_session(k, &L).unwrap();
        assert!(lim.acquire_session(k, &L).is_none());
        assert_eq!(c.key(), k);
        // Another key is not affected.
        assert!(lim.acquire_session(key("192.0.2.2"), &L).is_some());
        drop(b);
        let d = lim.acquire_session(k, &L).unwrap();
        assert!(lim.acquire_session(k, &L).is_none());
        // A lowered cap refuses new sessions but cuts none.
        drop(d);
        let lower = IpLimits { max_sessions: 1, ..L };
        assert!(lim.acquire_session(k, &lower).is_none());
        drop((a, c));
        let e = lim.acquire_session(k, &lower).unwrap();
        drop(e);
    }

    #[test]
    fn permit_released_when_its_task_panics() {
        let lim = MemoryLimiter::new();
        let k = key("192.0.2.1");
        let one = IpLimits { max_sessions: 1, ..L };
        let p = lim.acquire_session(k, &one).unwrap();
        let r = std::thread::spawn(move || {
            let _p = p;
            panic!("session task died");
        })
        .join();
        assert!(r.is_err());
        assert!(lim.acquire_session(k, &one).is_some());
    }

    #[test]
    fn sweep_keeps_entries_with_sessions_or_partial_buckets() {
        let lim = MemoryLimiter::new();
        let t0 = Instant::now();
        let busy = key("192.0.2.1");
        let recent = key("192.0.2.2");
        let permit = lim.acquire_session_at(busy, &L, t0).unwrap();
        lim.check_handshake_at(recent, &L, t0).unwrap();
        assert_eq!(lim.tracked_keys(), 2);
        // Right away, neither may go: one has a session, the other a partial bucket.
        lim.sweep_at(&L, t0);
        assert_eq!(lim.tracked_keys(), 2);
        // Once refilled (0.5 s at 2/s), the idle one goes; the busy one stays.
        lim.sweep_at(&L, t0 + Duration::from_secs(1));
        assert_eq!(lim.tracked_keys(), 1);
        drop(permit);
        lim.sweep_at(&L, t0 + Duration::from_secs(1));
        assert_eq!(lim.tracked_keys(), 0);
    }

    #[test]
    fn ipv6_grouped_by_prefix() {
        let a = IpKey::new(v4("2001:db8:1:2::1"), 32, 64);
        let b = IpKey::new(v4("2001:db8:1:2:ffff:ffff:ffff:ffff"), 32, 64);
        let other = IpKey::new(v4("2001:db8:1:3::1"), 32, 64);
        assert_eq!(a, b);
        assert_ne!(a, other);
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        // They share one session budget and one bucket.
        let lim = MemoryLimiter::new();
        let one = IpLimits { max_sessions: 1, handshakes_per_second: 1, handshake_burst: 1 };
        let _p = lim.acquire_session(a, &one).unwrap();
        assert!(lim.acquire_session(b, &one).is_none());
        assert!(lim.acquire_session(other, &one).is_some());
        assert!(lim.check_handshake(a, &one).is_ok());
        assert!(lim.check_handshake(b, &one).is_err());
        assert!(lim.check_handshake(other, &one).is_ok());
    }

    #[test]
    fn ipv4_grouping_and_mapped_addresses() {
        assert_eq!(IpKey::new(v4("203.0.113.7"), 24, 64).to_string(), "203.0.113.0/24");
        assert_eq!(IpKey::new(v4("203.0.113.7"), 32, 64), IpKey::new(v4("203.0.113.7"), 32, 64));
        assert_ne!(IpKey::new(v4("203.0.113.7"), 32, 64), IpKey::new(v4("203.0.113.8"), 32, 64));
        // ::ffff:203.0.113.7 is the same client as 203.0.113.7, grouped with the v4 prefix.
        let mapped = IpAddr::V6(Ipv4Addr::new(203, 0, 113, 7).to_ipv6_mapped());
        assert_eq!(IpKey::new(mapped, 32, 64), IpKey::new(v4("203.0.113.7"), 32, 64));
        assert_eq!(IpKey::new(mapped, 24, 64).to_string(), "203.0.113.0/24");
        // Out-of-range prefixes are clamped rather than panicking.
        assert_eq!(IpKey::new(v4("203.0.113.7"), 99, 200).to_string(), "203.0.113.7/32");
        assert_eq!(IpKey::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 32, 200).to_string(), "::1/128");
    }

    #[test]
    fn ipv6_spray_is_evicted_by_sweep() {
        let lim = MemoryLimiter::new();
        let t0 = Instant::now();
        let n: u64 = 200_000;
        for i in 0..n {
            // A distinct /64 each: 2001:db8:XXXX:XXXX::1
            let ip = Ipv6Addr::new(0x2001, 0xdb8, (i >> 16) as u16, i as u16, 0, 0, 0, 1);
            let k = IpKey::new(IpAddr::V6(ip), 32, 64);
            assert_eq!(lim.check_handshake_at(k, &L, t0), Ok(()));
        }
        assert_eq!(lim.tracked_keys(), n as usize);
        // Once the buckets have refilled, one sweep forgets them all.
        lim.sweep_at(&L, t0 + SWEEP_INTERVAL);
        assert_eq!(lim.tracked_keys(), 0);
    }

    #[test]
    fn hard_cap_fails_closed_for_new_keys_only() {
        let lim = MemoryLimiter::with_max_keys(64); // 4 per shard
        let t0 = Instant::now();
        let known = key("198.51.100.1");
        lim.check_handshake_at(known, &L, t0).unwrap();
        let mut refused = 0;
        for i in 0..1000u32 {
            let k = IpKey::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), 32, 64);
            if let Err(retry) = lim.check_handshake_at(k, &L, t0) {
                assert_eq!(retry, Duration::from_secs(1));
                refused += 1;
            }
        }
        assert!(refused >= 1000 - 64, "refused {refused}");
        assert!(lim.tracked_keys() <= 64);
        // A key already tracked keeps its bucket and its sessions.
        assert!(lim.check_handshake_at(known, &L, t0).is_ok());
        assert!(lim.acquire_session_at(known, &L, t0).is_some());
        // Once the sprayed buckets have refilled, a new key gets in (forced sweep).
        let t1 = t0 + Duration::from_secs(5);
        let fresh = key("198.51.100.2");
        assert!(lim.check_handshake_at(fresh, &L, t1).is_ok());
        // The forced sweep is rate-limited per shard: it ran at t1 at most once.
    }

    #[tokio::test]
    async fn sweeper_evicts_idle_entries_and_ends_with_the_limiter() {
        let lim = MemoryLimiter::new();
        let fast = IpLimits { max_sessions: 1, handshakes_per_second: 1000, handshake_burst: 1 };
        lim.check_handshake(key("192.0.2.1"), &fast).unwrap();
        let h = lim.spawn_sweeper_every(Duration::from_millis(20), move || fast);
        let mut left = usize::MAX;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            left = lim.tracked_keys();
            if left == 0 {
                break;
            }
        }
        assert_eq!(left, 0);
        // Dropping the limiter ends the task at its next tick.
        drop(lim);
        tokio::time::timeout(Duration::from_secs(5), h).await.unwrap().unwrap();
    }

    #[test]
    fn trait_object_usable() {
        let lim: Arc<dyn PerIpLimiter> = MemoryLimiter::new();
        let k = key("192.0.2.1");
        assert!(lim.check_handshake(k, &L).is_ok());
        let p = lim.acquire_session(k, &L);
        assert!(p.is_some());
        assert_eq!(lim.tracked_keys(), 1);
    }

    #[test]
    fn global_cap_caps_and_releases() {
        let cap = GlobalCap::new();
        let a = cap.try_acquire(2).unwrap();
        let b = cap.try_acquire(2).unwrap();
        assert!(cap.try_acquire(2).is_none());
        assert_eq!(cap.active(), 2);
        drop(a);
        assert_eq!(cap.active(), 1);
        let c = cap.try_acquire(2).unwrap();
        // A lowered max refuses, cuts nothing.
        assert!(cap.try_acquire(1).is_none());
        drop((b, c));
        assert_eq!(cap.active(), 0);
        assert!(cap.try_acquire(0).is_none());
    }

    #[test]
    fn global_cap_never_overshoots_under_contention() {
        let cap = GlobalCap::new();
        let held: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..1000).filter_map(|_| cap.try_acquire(100)).collect::<Vec<_>>()))
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(held.len(), 100);
        assert_eq!(cap.active(), 100);
        drop(held);
        assert_eq!(cap.active(), 0);
    }

    #[test]
    fn pending_tracker_caps_per_peer_and_forgets_at_zero() {
        let t = PendingTracker::new();
        let key = |s: &str| IpKey::new(s.parse().unwrap(), 32, 64);
        let a = key("192.0.2.1");
        let g1 = t.try_enter(a, 2).unwrap();
        let g2 = t.try_enter(a, 2).unwrap();
        assert!(t.try_enter(a, 2).is_none());
        // With /32, the neighbour has its own count.
        let g3 = t.try_enter(key("192.0.2.2"), 2).unwrap();
        // A mapped address is the same peer.
        let mapped = IpKey::new(IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped()), 32, 64);
        assert!(t.try_enter(mapped, 2).is_none());
        assert_eq!(t.pending(mapped), 2);
        assert_eq!(t.tracked(), 2);
        // Two addresses of one IPv6 /64 are one peer.
        let g5 = t.try_enter(key("2001:db8:1:2::1"), 1).unwrap();
        assert!(t.try_enter(key("2001:db8:1:2:ffff::9"), 1).is_none());
        drop(g5);
        drop(g1);
        assert_eq!(t.pending(a), 1);
        let g4 = t.try_enter(a, 2).unwrap();
        drop((g2, g3, g4));
        assert_eq!(t.tracked(), 0);
        assert!(t.try_enter(a, 0).is_none());
        assert_eq!(t.tracked(), 0);
    }
}
