//! The three load modes: throughput, idle and handshake.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use crate::net::{BoxError, Dialer, Incoming, WsClient};
use crate::procstat;
use crate::ws;

/// Payload header: session id (u32 LE) then sequence number (u64 LE).
const PAYLOAD_HEADER: usize = 12;

/// Common output fields and the proxy probe.
pub struct Report {
    pub fields: Map<String, Value>,
}

impl Report {
    pub fn new(mode: &str, label: &str, workload: Option<&str>) -> Self {
        let mut fields = Map::new();
        fields.insert("mode".into(), mode.into());
        fields.insert("label".into(), label.into());
        fields.insert("workload".into(), workload.unwrap_or(mode).into());
        Report { fields }
    }

    pub fn set(&mut self, k: &str, v: impl Into<Value>) {
        self.fields.insert(k.into(), v.into());
    }

    pub fn print(self) {
        println!("{}", Value::Object(self.fields));
    }
}

/// Proxy CPU/RSS probe over an optional list of PIDs.
#[derive(Clone)]
pub struct Probe {
    pids: Vec<u32>,
    backend: Vec<u32>,
}

impl Probe {
    pub fn new(pids: Vec<u32>, backend: Vec<u32>) -> Self {
        Probe { pids, backend }
    }

    /// CPU seconds of this generator, the backend, the proxy and the whole
    /// machine, for utilisation and for spotting runs disturbed by other work.
    fn load_cpu(&self) -> LoadCpu {
        let backend = if self.backend.is_empty() { None } else { procstat::cpu_seconds(&self.backend).ok() };
        let proxy = if self.pids.is_empty() { None } else { procstat::cpu_seconds(&self.pids).ok() };
        LoadCpu { gen: self_cpu(), backend, proxy, machine: procstat::machine_busy_seconds().ok() }
    }

    pub fn active(&self) -> bool {
        !self.pids.is_empty()
    }

    pub fn cpu(&self) -> Option<f64> {
        if self.pids.is_empty() {
            return None;
        }
        match procstat::cpu_seconds(&self.pids) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("warning: proxy cpu: {e}");
                None
            }
        }
    }

    pub fn rss(&self) -> Option<u64> {
        if self.pids.is_empty() {
            return None;
        }
        match procstat::rss_kib(&self.pids) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("warning: proxy rss: {e}");
                None
            }
        }
    }
}

fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(idx.min(sorted.len() - 1)).copied()
}

fn put_latency(r: &mut Report, mut us: Vec<u32>) {
    us.sort_unstable();
    r.set("rtt_p50_us", percentile(&us, 0.50));
    r.set("rtt_p99_us", percentile(&us, 0.99));
    r.set("rtt_max_us", us.last().copied());
}

fn put_cpu(r: &mut Report, cpu0: Option<f64>, cpu1: Option<f64>, per_key: &str, count: u64) {
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        let d = (b - a).max(0.0);
        r.set("proxy_cpu_s", round3(d));
        if count > 0 {
            r.set(per_key, round3(d * 1e6 / count as f64));
        }
    }
}

/// The load generator's own CPU time (all threads).
fn self_cpu() -> Option<f64> {
    procstat::cpu_seconds(&[std::process::id()]).ok()
}

#[derive(Clone, Copy)]
struct LoadCpu {
    gen: Option<f64>,
    backend: Option<f64>,
    proxy: Option<f64>,
    machine: Option<f64>,
}

fn delta(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some((b? - a?).max(0.0))
}

/// `gen_cpu_util` and `backend_cpu_util`: CPU time ÷ wall time of the
/// generator and of the backend (1.0 = one full core; when they share a core
/// and add up to about 1.0, the load side is the bottleneck).
/// `other_cpu_util`: everything else the machine ran meanwhile (in cores); a
/// run with a compiler beside it shows up here.
fn put_gen_cpu(r: &mut Report, c0: Option<LoadCpu>, c1: LoadCpu, wall: Option<f64>) {
    let (Some(c0), Some(w)) = (c0, wall) else {
        return;
    };
    if w <= 0.0 {
        return;
    }
    let g = delta(c0.gen, c1.gen);
    let b = delta(c0.backend, c1.backend);
    let p = delta(c0.proxy, c1.proxy);
    if let Some(g) = g {
        r.set("gen_cpu_util", round3(g / w));
    }
    if let Some(b) = b {
        r.set("backend_cpu_util", round3(b / w));
    }
    // Below a second, clock-tick rounding (10 ms per counter) would swamp it.
    if let (Some(m), Some(g), true) = (delta(c0.machine, c1.machine), g, w >= 1.0) {
        let other = m - g - b.unwrap_or(0.0) - p.unwrap_or(0.0);
        r.set("other_cpu_util", round3(other.max(0.0) / w));
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

struct Errors {
    count: u64,
    first: Option<String>,
}

impl Errors {
    fn new() -> Self {
        Errors { count: 0, first: None }
    }

    fn add(&mut self, e: impl std::fmt::Display) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(e.to_string());
        }
    }

    fn put(self, r: &mut Report) {
        r.set("errors", self.count);
        if let Some(f) = self.first {
            r.set("first_error", f);
        }
    }
}

// ---------------------------------------------------------------- throughput

pub struct ThroughputArgs {
    pub sessions: usize,
    pub messages: u64,
    pub duration: Duration,
    pub size: usize,
    pub window: usize,
    pub timeout: Duration,
}

struct SessionOutcome {
    echoes: u64,
    rtts: Vec<u32>,
    last_echo: Option<Instant>,
    error: Option<String>,
}

fn template(sid: u32, size: usize) -> Vec<u8> {
    let mut rng = ws::Rng::new(u64::from(sid) + 1);
    let mut t = vec![0u8; size];
    for chunk in t.chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    t[..4].copy_from_slice(&sid.to_le_bytes());
    t
}

pub async fn throughput(dialer: Arc<Dialer>, a: ThroughputArgs, probe: Probe, mut report: Report) -> bool {
    report.set("sessions", a.sessions as u64);
    report.set("size", a.size as u64);
    report.set("window", a.window as u64);
    report.set("target", dialer.target.addr.to_string());
    let barrier = Arc::new(Barrier::new(a.sessions + 1));
    let a = Arc::new(a);
    let mut set = JoinSet::new();
    for sid in 0..a.sessions {
        let d = dialer.clone();
        let b = barrier.clone();
        let a = a.clone();
        set.spawn(async move {
            let mut out = SessionOutcome { echoes: 0, rtts: Vec::new(), last_echo: None, error: None };
            let conn = d.connect(d.source_for(sid), sid as u64).await;
            b.wait().await;
            match conn {
                Ok(c) => {
                    if let Err(e) = tp_session(c, sid as u32, &a, d.io_timeout, &mut out).await {
                        out.error = Some(e.to_string());
                    }
                }
                Err(e) => out.error = Some(format!("connect: {e}")),
            }
            out
        });
    }

    let mut outcomes = Vec::with_capacity(a.sessions);
    let mut start: Option<(Instant, Option<f64>)> = None;
    let mut gen0 = None;
    let run = async {
        barrier.wait().await;
        start = Some((Instant::now(), probe.cpu()));
        gen0 = Some(probe.load_cpu());
        while let Some(r) = set.join_next().await {
            outcomes.push(r);
        }
    };
    let timed_out = tokio::time::timeout(a.timeout, run).await.is_err();
    let cpu1 = probe.cpu();
    let gen1 = probe.load_cpu();
    set.abort_all();

    let mut errors = Errors::new();
    if timed_out {
        errors.add(format!("run timed out after {:?}", a.timeout));
    }
    let mut echoes = 0u64;
    let mut rtts: Vec<u32> = Vec::new();
    let mut last = None;
    for o in outcomes {
        match o {
            Ok(o) => {
                echoes += o.echoes;
                rtts.extend_from_slice(&o.rtts);
                if let Some(e) = o.error {
                    errors.add(e);
                }
                last = last.max(o.last_echo);
            }
            Err(e) => errors.add(format!("session task: {e}")),
        }
    }
    let (t0, cpu0) = match start {
        Some((t, c)) => (Some(t), c),
        None => (None, None),
    };
    let secs = match (t0, last) {
        (Some(t0), Some(l)) => l.duration_since(t0).as_secs_f64(),
        (Some(t0), None) => t0.elapsed().as_secs_f64(),
        _ => 0.0,
    };
    report.set("messages", echoes);
    report.set("duration_s", round3(secs));
    report.set("msgs_per_s", if secs > 0.0 { (echoes as f64 / secs).round() } else { 0.0 });
    report.set(
        "mib_per_s",
        if secs > 0.0 { round3(echoes as f64 * a.size as f64 / secs / (1 << 20) as f64) } else { 0.0 },
    );
    put_latency(&mut report, rtts);
    put_cpu(&mut report, cpu0, cpu1, "proxy_cpu_us_per_msg", echoes);
    put_gen_cpu(&mut report, gen0, gen1, t0.map(|t| t.elapsed().as_secs_f64()));
    let ok = errors.count == 0;
    errors.put(&mut report);
    report.print();
    ok
}

async fn tp_session(
    mut c: WsClient,
    sid: u32,
    a: &ThroughputArgs,
    io: Duration,
    out: &mut SessionOutcome,
) -> Result<(), BoxError> {
    let t0 = Instant::now();
    let deadline = if a.duration.is_zero() { None } else { Some(t0 + a.duration) };
    let limit = if a.messages == 0 { u64::MAX } else { a.messages };
    let tmpl = template(sid, a.size);
    let mut msg = tmpl.clone();
    let mut sent_at: VecDeque<Instant> = VecDeque::with_capacity(a.window);
    let (mut sent, mut recv) = (0u64, 0u64);
    if a.messages > 0 && a.messages < 1 << 24 {
        out.rtts.reserve(a.messages as usize);
    }

    let mut now = t0;
    loop {
        // Refill the window; all new frames go out in one write.
        let open = deadline.is_none_or(|d| now < d);
        while open && sent < limit && (sent - recv) < a.window as u64 {
            msg[4..PAYLOAD_HEADER].copy_from_slice(&sent.to_le_bytes());
            c.queue(ws::OP_BINARY, &msg);
            sent_at.push_back(now);
            sent += 1;
        }
        c.flush_out(io).await?;
        if recv == sent {
            break;
        }
        c.fill(io).await?;
        now = Instant::now();
        while let Some(m) = c.next_buffered()? {
            match m {
                Incoming::Data { opcode, payload } => {
                    if opcode != ws::OP_BINARY {
                        return Err(format!("session {sid}: echo {recv} has opcode {opcode}").into());
                    }
                    if payload.len() != tmpl.len()
                        || payload[..4] != tmpl[..4]
                        || payload[4..PAYLOAD_HEADER] != recv.to_le_bytes()
                        || payload[PAYLOAD_HEADER..] != tmpl[PAYLOAD_HEADER..]
                    {
                        return Err(format!(
                            "session {sid}: echo {recv} does not match what was sent (len {})",
                            payload.len()
                        )
                        .into());
                    }
                    let t = sent_at.pop_front().ok_or("echo without a message in flight")?;
                    out.rtts.push(now.duration_since(t).as_micros().min(u128::from(u32::MAX)) as u32);
                    recv += 1;
                    out.echoes = recv;
                    if recv > sent {
                        return Err("more echoes than messages".into());
                    }
                }
                Incoming::Close { code } => {
                    return Err(format!("session {sid}: peer closed (code {code:?}) after {recv} echoes").into());
                }
            }
        }
        out.last_echo = Some(now);
    }
    c.close(io).await.map_err(|e| format!("close: {e}"))?;
    Ok(())
}

// ---------------------------------------------------------------------- idle

pub struct IdleArgs {
    pub sessions: usize,
    pub concurrency: usize,
    pub hold: Duration,
    pub settle: Duration,
    pub timeout: Duration,
}

pub async fn idle(dialer: Arc<Dialer>, a: IdleArgs, probe: Probe, mut report: Report) -> bool {
    report.set("sessions", a.sessions as u64);
    report.set("sources", dialer.sources.len() as u64);
    report.set("target", dialer.target.addr.to_string());
    let rss0 = probe.rss();
    let cpu0 = probe.cpu();
    let t0 = Instant::now();
    let clients: Arc<Mutex<Vec<WsClient>>> = Arc::new(Mutex::new(Vec::with_capacity(a.sessions)));
    let errs: Arc<Mutex<Errors>> = Arc::new(Mutex::new(Errors::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..a.concurrency.max(1) {
        let (d, cl, er, nx) = (dialer.clone(), clients.clone(), errs.clone(), next.clone());
        let n = a.sessions;
        set.spawn(async move {
            loop {
                let i = nx.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                match d.connect(d.source_for(i), i as u64).await {
                    Ok(c) => lock(&cl).push(c),
                    Err(e) => lock(&er).add(format!("connect: {e}")),
                }
            }
        });
    }
    let opened = tokio::time::timeout(a.timeout, async { while set.join_next().await.is_some() {} }).await.is_ok();
    set.abort_all();
    if !opened {
        lock(&errs).add(format!("opening sessions timed out after {:?}", a.timeout));
    }
    let open_s = t0.elapsed().as_secs_f64();
    let cpu1 = probe.cpu();
    tokio::time::sleep(a.settle).await;
    let rss1 = probe.rss();
    let mut clients = std::mem::take(&mut *lock(&clients));
    let open = clients.len() as u64;
    let hold_left = a.hold.saturating_sub(t0.elapsed());
    tokio::time::sleep(hold_left).await;

    // Prove every held session still relays end to end: one echo each.
    let mut alive = 0u64;
    let io = dialer.io_timeout;
    let verify = async {
        for chunk in clients.chunks_mut(512) {
            for c in chunk.iter_mut() {
                c.queue(ws::OP_BINARY, b"idle-check");
            }
            for c in chunk.iter_mut() {
                if let Err(e) = c.flush_out(io).await {
                    lock(&errs).add(format!("idle check write: {e}"));
                }
            }
            for c in chunk.iter_mut() {
                match read_one(c, io).await {
                    Ok(p) if p == b"idle-check" => alive += 1,
                    Ok(_) => lock(&errs).add("idle check: wrong echo"),
                    Err(e) => lock(&errs).add(format!("idle check: {e}")),
                }
            }
        }
    };
    if tokio::time::timeout(a.timeout, verify).await.is_err() {
        lock(&errs).add("idle check timed out");
    }
    drop(clients);

    report.set("sessions_open", open);
    report.set("sessions_alive", alive);
    report.set("open_s", round3(open_s));
    report.set("duration_s", round3(open_s));
    report.set("sessions_per_s", if open_s > 0.0 { (open as f64 / open_s).round() } else { 0.0 });
    if let (Some(r0), Some(r1)) = (rss0, rss1) {
        report.set("rss_before_kib", r0);
        report.set("rss_after_kib", r1);
        if open > 0 {
            let delta = r1.saturating_sub(r0) as f64 * 1024.0;
            report.set("bytes_per_session", (delta / open as f64).round());
        }
    }
    put_cpu(&mut report, cpu0, cpu1, "proxy_cpu_us_per_session", open);
    let e = std::mem::replace(&mut *lock(&errs), Errors::new());
    let ok = e.count == 0;
    e.put(&mut report);
    report.print();
    ok
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn read_one(c: &mut WsClient, io: Duration) -> Result<Vec<u8>, BoxError> {
    for _ in 0..1024 {
        if let Some(m) = c.next_buffered()? {
            return match m {
                Incoming::Data { payload, .. } => Ok(payload.to_vec()),
                Incoming::Close { code } => Err(format!("peer closed (code {code:?})").into()),
            };
        }
        c.flush_out(io).await?; // pongs
        c.fill(io).await?;
    }
    Err("no message after 1024 reads".into())
}

// ----------------------------------------------------------------- handshake

pub struct HandshakeArgs {
    pub sessions: usize,
    pub concurrency: usize,
    pub timeout: Duration,
}

pub async fn handshake(dialer: Arc<Dialer>, a: HandshakeArgs, probe: Probe, mut report: Report) -> bool {
    report.set("sessions", a.sessions as u64);
    report.set("concurrency", a.concurrency as u64);
    report.set("target", dialer.target.addr.to_string());
    let cpu0 = probe.cpu();
    let gen0 = Some(probe.load_cpu());
    let t0 = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..a.concurrency.max(1) {
        let (d, nx) = (dialer.clone(), next.clone());
        let n = a.sessions;
        set.spawn(async move {
            let mut lat = Vec::new();
            let mut errs = Errors::new();
            loop {
                let i = nx.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let s = Instant::now();
                match one_session(&d, i).await {
                    Ok(()) => lat.push(s.elapsed().as_micros().min(u128::from(u32::MAX)) as u32),
                    Err(e) => errs.add(e),
                }
            }
            (lat, errs)
        });
    }
    let mut lat = Vec::new();
    let mut errors = Errors::new();
    let run = async {
        while let Some(r) = set.join_next().await {
            match r {
                Ok((l, e)) => {
                    lat.extend(l);
                    errors.count += e.count;
                    if errors.first.is_none() {
                        errors.first = e.first;
                    }
                }
                Err(e) => errors.add(format!("worker: {e}")),
            }
        }
    };
    if tokio::time::timeout(a.timeout, run).await.is_err() {
        errors.add(format!("run timed out after {:?}", a.timeout));
    }
    set.abort_all();
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = probe.cpu();
    let ok_sessions = lat.len() as u64;
    report.set("sessions_ok", ok_sessions);
    report.set("messages", ok_sessions);
    report.set("duration_s", round3(secs));
    report.set("sessions_per_s", if secs > 0.0 { (ok_sessions as f64 / secs).round() } else { 0.0 });
    put_latency(&mut report, lat);
    put_cpu(&mut report, cpu0, cpu1, "proxy_cpu_us_per_session", ok_sessions);
    put_gen_cpu(&mut report, gen0, probe.load_cpu(), Some(secs));
    let ok = errors.count == 0;
    errors.put(&mut report);
    report.print();
    ok
}

/// New TCP + TLS + upgrade, one echo, close handshake.
async fn one_session(d: &Dialer, i: usize) -> Result<(), BoxError> {
    let mut c = d.connect(d.source_for(i), i as u64).await?;
    let payload = format!("handshake-{i:08}");
    c.queue(ws::OP_BINARY, payload.as_bytes());
    c.flush_out(d.io_timeout).await?;
    let got = read_one(&mut c, d.io_timeout).await?;
    if got != payload.as_bytes() {
        return Err("handshake echo mismatch".into());
    }
    c.close(d.io_timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every mode end to end against the echo backend on loopback.
    #[tokio::test]
    async fn modes_against_echo_backend() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(crate::echo::accept_loop(listener));
        let url = format!("ws://{addr}/x");
        let d = Arc::new(
            Dialer::new(
                &url,
                None,
                true,
                None,
                Some("https://o.example".into()),
                "127.0.0.1,127.0.0.2",
                Duration::from_secs(5),
            )
            .unwrap(),
        );
        let none = || Probe::new(vec![], vec![]);
        let timeout = Duration::from_secs(30);
        for size in [16, 300, 70_000] {
            let a = ThroughputArgs { sessions: 3, messages: 50, duration: Duration::ZERO, size, window: 4, timeout };
            assert!(throughput(d.clone(), a, none(), Report::new("throughput", "test", None)).await);
        }
        let a = ThroughputArgs {
            sessions: 2,
            messages: 0,
            duration: Duration::from_millis(200),
            size: 64,
            window: 8,
            timeout,
        };
        assert!(throughput(d.clone(), a, none(), Report::new("throughput", "test", None)).await);
        let a = HandshakeArgs { sessions: 20, concurrency: 4, timeout };
        assert!(handshake(d.clone(), a, none(), Report::new("handshake", "test", None)).await);
        let a = IdleArgs { sessions: 40, concurrency: 8, hold: Duration::ZERO, settle: Duration::ZERO, timeout };
        assert!(idle(d, a, none(), Report::new("idle", "test", None)).await);
    }

    #[tokio::test]
    async fn refused_target_reports_errors_without_hanging() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let d = Arc::new(
            Dialer::new(&format!("ws://{addr}/"), None, true, None, None, "", Duration::from_secs(2)).unwrap(),
        );
        let a = ThroughputArgs {
            sessions: 2,
            messages: 10,
            duration: Duration::ZERO,
            size: 64,
            window: 2,
            timeout: Duration::from_secs(10),
        };
        assert!(!throughput(d, a, Probe::new(vec![], vec![]), Report::new("throughput", "test", None)).await);
    }
}
