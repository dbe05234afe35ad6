//! The frame pump of one session: a single task drives both sockets and one timer.
//!
//! Why one hand-written poll loop instead of two tasks around `read_frame`: no lock between
//! halves of a TLS stream, no cancel-safety trap, and batching. Bytes are read into a
//! per-thread scratch buffer, every whole frame in it is checked and re-masked in place, and
//! the run of frames to forward is written with one `poll_write` (one TLS record batch, one
//! syscall). Only an incomplete frame or output the peer has not taken yet is kept per
//! session, so an idle session holds no buffers at all.

use super::flow::{Flow, Source, Stop, Violation};
use super::frame::{self, MaskGen, OP_CLOSE, OP_PING};
use super::io::RelayIo;
use super::policy::SessionPolicy;
use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::sync::CancellationToken;

/// Longest delay before a session's traffic shows in the global metrics.
const METRICS_FLUSH: Duration = Duration::from_secs(1);
/// How long a close handshake may take before the sockets are dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Stop reading a peer while this much output is waiting for the other side (backpressure).
/// The kernel's socket buffers hold the bulk of a transfer; this queue only bridges the
/// moment the socket is full, and is what a stalled reader costs beyond one read and the TLS
/// buffer (64 KiB: about 250 KiB per stalled session in all, 256 KiB: 450 KiB).
const HIGH_WATER: usize = 64 * 1024;
/// Size of the per-thread read buffer.
const SCRATCH: usize = 64 * 1024;
/// Loop turns per poll before yielding to other tasks.
const MAX_TURNS: usize = 64;

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; SCRATCH]);
}

/// The drain signal sessions watch, set once when the proxy starts shutting down.
#[derive(Debug, Default)]
pub struct Drain {
    /// When the process stops waiting for sessions (`shutdown_grace` after the drain began).
    deadline: OnceLock<Instant>,
    /// Sessions that reached the deadline before their close handshake was over.
    cut: AtomicUsize,
}

impl Drain {
    /// Starts the drain; sessions must be over by `deadline`.
    pub fn begin(&self, deadline: Instant) {
        let _ = self.deadline.set(deadline);
    }

    /// The drain's deadline, once it has begun.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline.get().copied()
    }

    /// How many sessions the deadline cut short (their peer never answered the close).
    pub fn cut(&self) -> usize {
        self.cut.load(Ordering::Relaxed)
    }
}

/// How long before the drain deadline a session stops waiting for its close handshake, so it
/// still logs and counts its end before the process exits.
const DRAIN_MARGIN: Duration = Duration::from_millis(100);

/// Who started the close that ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    /// The client sent a close or went away.
    Client,
    /// The backend sent a close.
    Backend,
    /// The proxy closed (policy, timeout, shutdown, backend vanished).
    Proxy,
}

impl Initiator {
    /// Label value for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Initiator::Client => "client",
            Initiator::Backend => "backend",
            Initiator::Proxy => "proxy",
        }
    }
}

/// How a session ended, for the session-end log line and metrics.
#[derive(Debug, Clone)]
pub struct SessionEnd {
    /// The close code that ended the session (1006 when a peer vanished without one).
    pub code: u16,
    /// Who started it.
    pub initiator: Initiator,
    /// Why, when the proxy closed.
    pub reason: &'static str,
    /// Messages and payload bytes from the client.
    pub msgs_in: u64,
    /// Payload bytes from the client.
    pub bytes_in: u64,
    /// Messages to the client.
    pub msgs_out: u64,
    /// Payload bytes to the client.
    pub bytes_out: u64,
    /// Messages refused or dropped by the rate limit.
    pub rate_limited: u64,
}

/// Live traffic counters, flushed to the global metrics now and then (not per frame).
pub trait TrafficSink: Send + Sync {
    /// Adds deltas: client→backend messages and bytes, backend→client messages and bytes,
    /// rate-limited messages.
    fn add(&self, c2b_msgs: u64, c2b_bytes: u64, b2c_msgs: u64, b2c_bytes: u64, rate_limited: u64);
}

/// One socket with its pending output and close state.
struct Side<S> {
    io: S,
    /// Start of an incomplete frame (empty when none).
    rbuf: Vec<u8>,
    /// Size of that frame, once its header is known.
    need: usize,
    /// `rbuf` holds bytes not yet processed (handshake leftovers).
    unprocessed: bool,
    wbuf: Vec<u8>,
    wpos: usize,
    flush_pending: bool,
    /// No more frames will be read from this peer.
    read_done: bool,
    /// A close was sent to this peer (nothing else may follow).
    close_sent: bool,
    /// The socket failed or hit EOF.
    dead: bool,
    /// The stream's end message (TLS `close_notify`) was queued with the last output.
    end_queued: bool,
    /// This peer's close frame was read (not a violation that stopped reading early).
    close_read: bool,
    /// The pong owed for this peer's latest ping while its own queue is over [`HIGH_WATER`]
    /// (it reads slowly): one frame at most, queued once the queue drains. Boxed: it is rare,
    /// and every idle session carries the field (a `Vec` here cost 0.5 KB per session).
    #[allow(clippy::box_collection)] // a thin pointer is the point: 8 bytes instead of 24
    owed_pong: Option<Box<Vec<u8>>>,
}

impl<S: RelayIo> Side<S> {
    fn new(io: S, pre: Vec<u8>) -> Side<S> {
        Side {
            io,
            unprocessed: !pre.is_empty(),
            rbuf: pre,
            need: 0,
            wbuf: Vec::new(),
            wpos: 0,
            flush_pending: false,
            read_done: false,
            close_sent: false,
            dead: false,
            end_queued: false,
            close_read: false,
            owed_pong: None,
        }
    }

    fn pending_out(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Writes `data` now if nothing is queued before it; queues what the socket did not take.
    fn send(&mut self, cx: &mut Context<'_>, data: &[u8]) {
        if self.dead || data.is_empty() {
            return;
        }
        let mut off = 0;
        if self.pending_out() == 0 {
            while off < data.len() {
                match Pin::new(&mut self.io).poll_write(cx, &data[off..]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        self.dead = true;
                        return;
                    }
                    Poll::Ready(Ok(n)) => off += n,
                    Poll::Pending => break,
                }
            }
            self.flush_pending = true;
        }
        if off < data.len() {
            self.compact();
            self.wbuf.extend_from_slice(&data[off..]);
        }
    }

    /// Queues a whole control frame.
    fn queue_frame(&mut self, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) {
        if !self.dead {
            self.compact();
            frame::write_frame(&mut self.wbuf, opcode, mask, payload);
        }
    }

    /// Drops the written front of the queue before more is appended, once it is at least
    /// half the buffer (so each byte is moved at most once on average). Without this, a peer
    /// that reads slowly but never quite catches up keeps the queue from ever emptying, and
    /// the buffer grows by everything relayed to it while only its tail is pending.
    fn compact(&mut self) {
        if self.wpos > 0 && self.wpos >= self.wbuf.len() / 2 {
            self.drop_written();
        }
    }

    /// Drops the written front of the queue.
    fn drop_written(&mut self) {
        self.wbuf.drain(..self.wpos);
        self.wpos = 0;
    }

    /// Keeps only the last whole frame of `owed_pong`: RFC 6455 §5.5.3 lets an endpoint
    /// answer only the most recent of several pings.
    fn keep_last_pong(&mut self) {
        let Some(owed) = self.owed_pong.as_mut() else { return };
        let (mut last, mut pos) = (0, 0);
        while let Ok(Some(h)) = frame::parse_header(&owed[pos..]) {
            let end = pos + h.header_len + h.len as usize;
            if end > owed.len() {
                break;
            }
            (last, pos) = (pos, end);
        }
        owed.drain(..last);
    }

    /// Writes queued output and flushes. Returns true if anything moved.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> bool {
        if self.dead {
            return false;
        }
        let mut moved = false;
        if self.owed_pong.is_some() && (self.close_sent || self.pending_out() <= HIGH_WATER) {
            let owed = self.owed_pong.take().unwrap_or_default();
            // Nothing may follow our close frame (RFC 6455 §5.5.1), pongs included.
            if !self.close_sent {
                self.compact();
                self.wbuf.extend_from_slice(&owed);
            }
        }
        if self.close_sent && self.read_done && self.pending_out() > 0 {
            // Both closes are through: this is the last output, so a TLS stream sends it and
            // its close_notify in one write (the shutdown that follows finds nothing to add).
            // Its written front goes first, so the rest is the queue.
            self.drop_written();
            let n = self.io.buffer_last(&self.wbuf);
            if n > 0 {
                self.end_queued = n == self.wbuf.len();
                self.wpos = n;
                self.flush_pending = true;
                moved = true;
            }
        }
        while self.wpos < self.wbuf.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    self.dead = true;
                    return true;
                }
                Poll::Ready(Ok(n)) => {
                    self.wpos += n;
                    self.flush_pending = true;
                    moved = true;
                }
                Poll::Pending => break,
            }
        }
        if self.wpos == self.wbuf.len() && !self.wbuf.is_empty() {
            // Release the buffer: idle sessions should hold none.
            self.wbuf = Vec::new();
            self.wpos = 0;
        }
        if self.flush_pending {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.flush_pending = false,
                Poll::Ready(Err(_)) => self.dead = true,
                Poll::Pending => {}
            }
        }
        moved
    }

    /// Whether the close handshake with this peer is over.
    fn finished(&self) -> bool {
        self.dead || (self.close_sent && self.read_done && self.pending_out() == 0 && !self.flush_pending)
    }

    /// Whether closing the socket still needs a shutdown first: output is queued, the
    /// stream's end message has not gone out, or reading stopped before the peer's close
    /// (unread input turns a bare close into a reset; a shutdown sends the FIN first). When
    /// not, dropping the socket sends the same FIN, and the session saves the shutdown call
    /// and its timer.
    fn needs_shutdown(&self) -> bool {
        !self.dead && !(self.finished() && self.close_read && (self.end_queued || !self.io.has_end_message()))
    }

    /// Whether the proxy stopped reading this live peer before its close (a violation): its
    /// input is then drained before the socket closes (see [`linger`]).
    fn lingers(&self) -> bool {
        !self.dead && self.read_done && !self.close_read
    }
}

/// Shuts a peer's stream down (`shut`), then lingers on its input (`linger`).
async fn end_stream<S: RelayIo>(io: &mut S, shut: bool, linger_on: bool) {
    use tokio::io::AsyncWriteExt;
    if shut {
        let _ = io.shutdown().await;
    }
    if linger_on {
        linger(io).await;
    }
}

/// Most input a lingering close reads and drops.
const LINGER_MAX: usize = 1 << 20;

/// Lingering close, like nginx's `lingering_close`: reads and drops a peer's input until its
/// EOF (the caller bounds the time). Closing a socket with unread input sends a reset, which
/// fails the peer's writes still in flight and can reach it before it has read the close
/// frame; drained, the peer's close reply and late frames are taken, and the socket closes
/// on its EOF.
async fn linger<S: RelayIo>(io: &mut S) {
    use tokio::io::AsyncReadExt;
    // Allocated only here, so it is not part of every session's future.
    let mut sink = vec![0u8; 4096];
    let mut total = 0;
    while total < LINGER_MAX {
        match io.read(&mut sink).await {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

/// What one read-and-process turn of a direction saw.
#[derive(Default)]
struct Turn {
    progressed: bool,
    data_seen: bool,
    pong_seen: bool,
    eof: bool,
    stop: Option<StopOwned>,
}

enum StopOwned {
    Violation(Violation),
    Close(Vec<u8>),
}

/// Reads from `src`, processes whole frames, forwards them to `dst`.
#[allow(clippy::too_many_arguments)]
fn pump<S, T>(
    cx: &mut Context<'_>,
    src: &mut Side<S>,
    dst: &mut Side<T>,
    flow: &mut Flow,
    policy: &SessionPolicy,
    now: Instant,
    masks: &mut MaskGen,
    scratch: &mut [u8],
) -> Turn
where
    S: RelayIo,
    T: RelayIo,
{
    let mut turn = Turn::default();
    if src.dead && !src.read_done {
        // A write to this peer failed (a reset, say): it is gone just as if its stream had
        // ended, and the other side must hear so rather than talk on into nothing.
        turn.eof = true;
        return turn;
    }
    if src.read_done || src.dead {
        return turn;
    }
    if dst.pending_out() > HIGH_WATER {
        // The other side is slow: stop reading (TCP backpressure reaches the sender). A
        // peer that is itself slow to read is still read: its messages and its close must
        // reach the other side, and what it adds to its own queue is one pong at most.
        return turn;
    }
    let discard = dst.close_sent;
    if src.rbuf.is_empty() {
        let n = match read_into(cx, &mut src.io, &mut ReadBuf::new(scratch)) {
            Poll::Pending => return turn,
            Poll::Ready(0) => {
                turn.eof = true;
                return turn;
            }
            Poll::Ready(n) => n,
        };
        turn.progressed = true;
        let consumed = process(cx, &mut scratch[..n], src, dst, flow, policy, now, masks, discard, &mut turn);
        if turn.stop.is_none() && consumed < n {
            src.rbuf.reserve_exact(src.need.max(n - consumed));
            src.rbuf.extend_from_slice(&scratch[consumed..n]);
        }
    } else {
        if !src.unprocessed {
            let want = src.need.max(src.rbuf.len() + 4096);
            src.rbuf.reserve(want - src.rbuf.len());
            let n = match read_into(cx, &mut src.io, &mut ReadBuf::uninit(src.rbuf.spare_capacity_mut())) {
                Poll::Pending => return turn,
                Poll::Ready(0) => {
                    turn.eof = true;
                    return turn;
                }
                Poll::Ready(n) => n,
            };
            // SAFETY: the reads initialised `n` bytes at the start of the spare capacity.
            unsafe { src.rbuf.set_len(src.rbuf.len() + n) };
        }
        src.unprocessed = false;
        turn.progressed = true;
        let mut buf = std::mem::take(&mut src.rbuf);
        let consumed = process(cx, &mut buf, src, dst, flow, policy, now, masks, discard, &mut turn);
        buf.drain(..consumed);
        if buf.is_empty() {
            buf = Vec::new();
        } else if buf.capacity() > 4 * buf.len().max(16 * 1024) && src.need <= buf.len() {
            buf.shrink_to_fit();
        }
        src.rbuf = buf;
    }
    if src.rbuf.is_empty() {
        src.need = 0;
    }
    turn
}

/// One read into `buf`; returns the bytes read, `Ready(0)` at EOF or on an error.
///
/// One read is enough to gather a burst: tokio-rustls (0.26) copies every decrypted record it
/// has into the buffer until it is full or the socket is empty, and a plain socket read takes
/// everything queued. Reading again after data would also lose an error tokio-rustls holds
/// back for the next read (it hands it out once).
fn read_into<S: AsyncRead + Unpin>(cx: &mut Context<'_>, io: &mut S, buf: &mut ReadBuf<'_>) -> Poll<usize> {
    let before = buf.filled().len();
    match Pin::new(io).poll_read(cx, buf) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Ok(())) => Poll::Ready(buf.filled().len() - before),
        Poll::Ready(Err(_)) => Poll::Ready(0),
    }
}

/// Runs the flow over `buf` until it needs more bytes or stops; returns bytes consumed.
#[allow(clippy::too_many_arguments)]
fn process<S, T>(
    cx: &mut Context<'_>,
    buf: &mut [u8],
    src: &mut Side<S>,
    dst: &mut Side<T>,
    flow: &mut Flow,
    policy: &SessionPolicy,
    now: Instant,
    masks: &mut MaskGen,
    discard: bool,
    turn: &mut Turn,
) -> usize
where
    S: RelayIo,
    T: RelayIo,
{
    let mut pos = 0;
    loop {
        // Replies (pongs) are appended to the queue directly, or held aside as one owed pong
        // while the queue is over the high-water mark.
        src.compact();
        let backlogged = src.pending_out() > HIGH_WATER;
        let replies = if backlogged { src.owed_pong.get_or_insert_default() } else { &mut src.wbuf };
        let queued = replies.len();
        let step = flow.process(&mut buf[pos..], policy, now, discard, masks, replies);
        if src.close_sent {
            // Nothing may follow our close frame (RFC 6455 §5.5.1), pongs included.
            replies.truncate(queued);
        } else if backlogged {
            src.keep_last_pong();
        }
        for &(a, b) in &step.segs[..step.nsegs] {
            dst.send(cx, &buf[pos + a..pos + b]);
        }
        turn.data_seen |= step.data_seen;
        turn.pong_seen |= step.pong_seen;
        src.need = step.need;
        match step.stop {
            Some(Stop::Violation(v)) => {
                turn.stop = Some(StopOwned::Violation(v));
                return pos + step.consumed;
            }
            Some(Stop::Close(a, b)) => {
                turn.stop = Some(StopOwned::Close(buf[pos + a..pos + b].to_vec()));
                return pos + step.consumed;
            }
            None => {}
        }
        pos += step.consumed;
        if step.consumed == 0 || pos == buf.len() {
            return pos;
        }
    }
}

/// Session state besides the sockets.
struct State {
    policy: SessionPolicy,
    c2b: Flow,
    b2c: Flow,
    masks: MaskGen,
    end: Option<(u16, Initiator, &'static str)>,
    closing_deadline: Option<Instant>,
    last_activity: Instant,
    next_ping: Instant,
    awaiting_pong: bool,
    flushed: [u64; 5],
    /// When counts not yet in the global metrics must be flushed (`None`: nothing pending).
    flush_due: Option<Instant>,
    /// The counts were flushed when the close began.
    flushed_at_close: bool,
}

impl State {
    fn record_end(&mut self, code: u16, who: Initiator, reason: &'static str, now: Instant) {
        if self.end.is_none() {
            self.end = Some((code, who, reason));
        }
        self.closing_deadline.get_or_insert(now + CLOSE_TIMEOUT);
    }

    fn counts(&self) -> [u64; 5] {
        [self.c2b.msgs, self.c2b.bytes, self.b2c.msgs, self.b2c.bytes, self.c2b.rate_limited]
    }

    fn flush_metrics(&mut self, sink: &dyn TrafficSink) {
        self.flush_due = None;
        let cur = self.counts();
        let mut d = [0u64; 5];
        for i in 0..5 {
            d[i] = cur[i] - self.flushed[i];
        }
        if d != [0; 5] {
            sink.add(d[0], d[1], d[2], d[3], d[4]);
        }
        self.flushed = cur;
    }

    fn next_deadline(&self) -> Instant {
        if let Some(d) = self.closing_deadline {
            return d;
        }
        let mut d = self.next_ping.min(self.last_activity + self.policy.idle_timeout);
        if let Some(e) = self.policy.expires_at {
            d = d.min(e);
        }
        if let Some(f) = self.flush_due {
            d = d.min(f);
        }
        d
    }
}

/// Answers `peer`'s close on behalf of the other side, which will not (it vanished, or let the
/// close handshake time out), with the session's close code: RFC 6455 §5.5.1 wants every
/// close answered, and `peer` should not be left waiting for a reply.
fn answer_close<S: RelayIo>(peer: &mut Side<S>, peer_is_backend: bool, st: &mut State) {
    if peer.close_read && !peer.close_sent {
        let code = st.end.map_or(1005, |(c, _, _)| c);
        let payload = if code == 1005 { Vec::new() } else { frame::close_payload(code, "") };
        let m = peer_is_backend.then(|| st.masks.next_mask());
        peer.queue_frame(OP_CLOSE, m, &payload);
        peer.close_sent = true;
    }
}

/// The proxy closes the session: `client_code` to the client, `backend_code` to the backend.
fn proxy_close<C, B>(
    client: &mut Side<C>,
    backend: &mut Side<B>,
    st: &mut State,
    client_code: u16,
    backend_code: u16,
    reason: &'static str,
    now: Instant,
) where
    C: RelayIo,
    B: RelayIo,
{
    st.record_end(client_code, Initiator::Proxy, reason, now);
    if !client.close_sent {
        client.queue_frame(OP_CLOSE, None, &frame::close_payload(client_code, reason));
        client.close_sent = true;
    }
    if !backend.close_sent {
        let m = st.masks.next_mask();
        backend.queue_frame(OP_CLOSE, Some(m), &frame::close_payload(backend_code, reason));
        backend.close_sent = true;
    }
}

/// Relays frames between an upgraded client and a connected backend until the session ends.
///
/// `client_pre` and `backend_pre` are bytes that arrived with the handshakes. `shutdown` wakes
/// the session when the drain starts and `drain` says so (1001 to both sides; the session ends
/// by the drain's deadline even when a peer never answers the close).
#[allow(clippy::too_many_arguments)]
pub async fn run<C, B>(
    client: C,
    client_pre: Vec<u8>,
    backend: B,
    backend_pre: Vec<u8>,
    policy: SessionPolicy,
    shutdown: CancellationToken,
    drain: &Drain,
    traffic: &dyn TrafficSink,
) -> SessionEnd
where
    C: RelayIo,
    B: RelayIo,
{
    let now = Instant::now();
    let mut client = Side::new(client, client_pre);
    let mut backend = Side::new(backend, backend_pre);
    let mut st = State {
        c2b: Flow::new(Source::Client, &policy, now),
        b2c: Flow::new(Source::Backend, &policy, now),
        masks: MaskGen::new(),
        end: None,
        closing_deadline: None,
        last_activity: now,
        next_ping: now + policy.ping_interval,
        awaiting_pong: false,
        flushed: [0; 5],
        flush_due: None,
        flushed_at_close: false,
        policy,
    };
    let timer = tokio::time::sleep_until(st.next_deadline().into());
    tokio::pin!(timer);
    let cancelled = shutdown.cancelled_owned();
    tokio::pin!(cancelled);
    let mut cancel_registered = false;
    let mut draining_now = false;
    let mut drain_seen = false;

    poll_fn(|cx| {
        // One clock read and one timer poll per wake-up, not per turn: the turns of a wake-up
        // take microseconds, and a timer keeps this task's waker until it fires. It is polled
        // again after every reset all the same (`poll_timer`), which costs nothing and does not
        // depend on that detail of tokio's timer.
        let mut now = Instant::now();
        let mut poll_timer = true;
        for _ in 0..MAX_TURNS {
            let mut progressed = false;

            // The cancellation future takes the token's mutex when polled, so it is polled once
            // to register this task's waker; afterwards a plain load of `drain` suffices.
            if !cancel_registered {
                cancel_registered = true;
                if cancelled.as_mut().poll(cx).is_ready() {
                    draining_now = true;
                }
            }
            if !drain_seen && (draining_now || drain.deadline().is_some()) {
                drain_seen = true;
                if st.end.is_none() {
                    proxy_close(&mut client, &mut backend, &mut st, 1001, 1001, "going away", now);
                }
                // Wait for the closes only as long as the process will wait for this session.
                if let Some(d) = drain.deadline() {
                    let d = d.checked_sub(DRAIN_MARGIN).unwrap_or(d).max(now);
                    st.closing_deadline = Some(st.closing_deadline.map_or(d, |c| c.min(d)));
                }
            }

            if poll_timer {
                poll_timer = false;
                if timer.as_mut().poll(cx).is_ready() {
                    // It may have come due during this wake-up's turns: judge it by the clock now.
                    now = Instant::now();
                    on_timer(&mut client, &mut backend, &mut st, now, traffic);
                    if st.closing_deadline.is_some_and(|d| now >= d) {
                        if drain_seen {
                            drain.cut.fetch_add(1, Ordering::Relaxed);
                        }
                        // A close the other side never answered is answered now, if the
                        // socket takes it at once.
                        answer_close(&mut client, false, &mut st);
                        answer_close(&mut backend, true, &mut st);
                        client.poll_out(cx);
                        backend.poll_out(cx);
                        return Poll::Ready(());
                    }
                    timer.as_mut().reset(st.next_deadline().into());
                    poll_timer = true;
                    progressed = true;
                }
            }

            progressed |= client.poll_out(cx);
            progressed |= backend.poll_out(cx);

            let turn = SCRATCH_BUF.with(|s| {
                let mut s = s.borrow_mut();
                pump(cx, &mut client, &mut backend, &mut st.c2b, &st.policy, now, &mut st.masks, &mut s)
            });
            progressed |= handle_turn(turn, Source::Client, &mut client, &mut backend, &mut st, now);

            let turn = SCRATCH_BUF.with(|s| {
                let mut s = s.borrow_mut();
                pump(cx, &mut backend, &mut client, &mut st.b2c, &st.policy, now, &mut st.masks, &mut s)
            });
            progressed |= handle_turn(turn, Source::Backend, &mut backend, &mut client, &mut st, now);

            if client.finished() && backend.finished() {
                return Poll::Ready(());
            }
            if st.closing_deadline.is_some() && !st.flushed_at_close {
                // The close handshake may take its whole timeout: what led to it (the
                // rate-limited message, say) shows in the metrics now, not at the end.
                st.flushed_at_close = true;
                st.flush_metrics(traffic);
            }
            if st.closing_deadline.is_some() && timer.deadline() != st.next_deadline().into() {
                timer.as_mut().reset(st.next_deadline().into());
                poll_timer = true;
                progressed = true;
            }
            if !progressed {
                // New traffic counts reach the global metrics within METRICS_FLUSH: the first
                // uncounted message arms the timer for it (one reset a second at most).
                if st.flush_due.is_none() && st.counts() != st.flushed && st.closing_deadline.is_none() {
                    let due = now + METRICS_FLUSH;
                    st.flush_due = Some(due);
                    if timer.deadline() > due.into() {
                        timer.as_mut().reset(due.into());
                        // Registers the waker again if the timer had fired.
                        if timer.as_mut().poll(cx).is_ready() {
                            cx.waker().wake_by_ref();
                        }
                    }
                }
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;

    // Best-effort graceful shutdown (TLS close_notify, FIN) where the close alone would not
    // end the stream properly, then a lingering close for a peer that broke a rule (its input
    // was left unread): a second at most, both peers at once, never past the drain's deadline.
    let (client_shut, backend_shut) = (client.needs_shutdown(), backend.needs_shutdown());
    let (client_linger, backend_linger) = (client.lingers(), backend.lingers());
    if client_shut || backend_shut || client_linger || backend_linger {
        let mut bound = Duration::from_secs(1);
        if let Some(d) = drain.deadline() {
            bound = bound.min(d.saturating_duration_since(Instant::now()));
        }
        let _ = tokio::time::timeout(bound, async {
            tokio::join!(
                end_stream(&mut client.io, client_shut, client_linger),
                end_stream(&mut backend.io, backend_shut, backend_linger)
            );
        })
        .await;
    }

    st.flush_metrics(traffic);
    let (code, initiator, reason) = st.end.unwrap_or((1006, Initiator::Proxy, "closed"));
    SessionEnd {
        code,
        initiator,
        reason,
        msgs_in: st.c2b.msgs,
        bytes_in: st.c2b.bytes,
        msgs_out: st.b2c.msgs,
        bytes_out: st.b2c.bytes,
        rate_limited: st.c2b.rate_limited,
    }
}

/// Idle, keepalive and expiry checks when the timer fires.
fn on_timer<C, B>(client: &mut Side<C>, backend: &mut Side<B>, st: &mut State, now: Instant, traffic: &dyn TrafficSink)
where
    C: RelayIo,
    B: RelayIo,
{
    if st.closing_deadline.is_some() {
        return;
    }
    if st.flush_due.is_some_and(|d| now >= d) {
        st.flush_metrics(traffic);
    }
    if st.policy.expires_at.is_some_and(|e| now >= e) {
        proxy_close(client, backend, st, 1008, 1001, "token expired", now);
    } else if now >= st.last_activity + st.policy.idle_timeout {
        proxy_close(client, backend, st, 1001, 1001, "idle timeout", now);
    } else if now >= st.next_ping {
        if st.awaiting_pong {
            proxy_close(client, backend, st, 1001, 1001, "ping timeout", now);
        } else {
            client.queue_frame(OP_PING, None, b"wsgate");
            st.awaiting_pong = true;
            st.next_ping = now + st.policy.ping_interval;
            st.flush_metrics(traffic);
        }
    }
}

/// Applies what a direction saw: activity, pongs, closes, violations, EOF.
fn handle_turn<S, T>(
    turn: Turn,
    from: Source,
    src: &mut Side<S>,
    dst: &mut Side<T>,
    st: &mut State,
    now: Instant,
) -> bool
where
    S: RelayIo,
    T: RelayIo,
{
    if turn.data_seen {
        st.last_activity = now;
    }
    if turn.pong_seen && from == Source::Client {
        st.awaiting_pong = false;
    }
    let who = match from {
        Source::Client => Initiator::Client,
        Source::Backend => Initiator::Backend,
    };
    // Frames bound for `dst` are masked when `dst` is the backend.
    let dst_mask = |st: &mut State| (from == Source::Client).then(|| st.masks.next_mask());
    match turn.stop {
        Some(StopOwned::Close(payload)) => {
            src.read_done = true;
            src.close_read = true;
            let code = if payload.len() >= 2 { u16::from_be_bytes([payload[0], payload[1]]) } else { 1005 };
            st.record_end(code, who, "", now);
            if !dst.close_sent {
                let m = dst_mask(st);
                dst.queue_frame(OP_CLOSE, m, &payload);
                dst.close_sent = true;
            }
            if dst.dead && !src.close_sent {
                // Nobody to forward to: answer the close ourselves.
                let m = (from == Source::Backend).then(|| st.masks.next_mask());
                src.queue_frame(OP_CLOSE, m, &payload);
                src.close_sent = true;
            }
            return true;
        }
        Some(StopOwned::Violation(v)) => {
            // The rest of this peer's input cannot be trusted: stop reading it.
            src.read_done = true;
            src.rbuf = Vec::new();
            let (c, b) = match from {
                Source::Client => (v.to_source, v.to_sink),
                Source::Backend => (v.to_sink, v.to_source),
            };
            match from {
                Source::Client => proxy_close(src, dst, st, c, b, v.reason, now),
                Source::Backend => proxy_close(dst, src, st, c, b, v.reason, now),
            }
            return true;
        }
        None => {}
    }
    if turn.eof {
        src.read_done = true;
        src.dead = true;
        if st.end.is_none() {
            match from {
                // The backend vanished without a close: 1011 to the client (initiator proxy).
                Source::Backend => {
                    st.record_end(1011, Initiator::Proxy, "backend went away", now);
                    if !dst.close_sent {
                        dst.queue_frame(OP_CLOSE, None, &frame::close_payload(1011, "backend went away"));
                        dst.close_sent = true;
                    }
                }
                Source::Client => {
                    st.record_end(1006, Initiator::Client, "client went away", now);
                    if !dst.close_sent {
                        let m = st.masks.next_mask();
                        dst.queue_frame(OP_CLOSE, Some(m), &frame::close_payload(1001, "client went away"));
                        dst.close_sent = true;
                    }
                }
            }
        } else {
            // `dst`'s close went to `src`, which vanished instead of answering it.
            answer_close(dst, from == Source::Client, st);
            st.closing_deadline.get_or_insert(now + CLOSE_TIMEOUT);
        }
        return true;
    }
    turn.progressed
}

#[cfg(test)]
mod tests {
    //! Peer failures that real sockets produce only by racing: a write that fails before the
    //! reset is read, a peer that vanishes instead of answering a close, a ping after our close.
    use super::*;
    use crate::config::OnRateLimit;
    use crate::relay::frame::OP_PONG;
    use std::io;
    use tokio::io::{duplex, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

    impl RelayIo for DuplexStream {
        fn has_end_message(&self) -> bool {
            false
        }
    }

    /// A backend whose every write fails (the connection was reset) and whose reset the
    /// relay has not read yet: reads stay pending.
    struct ResetOnWrite;

    impl AsyncRead for ResetOnWrite {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for ResetOnWrite {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl RelayIo for ResetOnWrite {
        fn has_end_message(&self) -> bool {
            false
        }
    }

    struct NoTraffic;

    impl TrafficSink for NoTraffic {
        fn add(&self, _: u64, _: u64, _: u64, _: u64, _: u64) {}
    }

    fn policy() -> SessionPolicy {
        SessionPolicy {
            max_frame_size: 1 << 16,
            max_message_size: 1 << 20,
            messages_per_second: 1000,
            message_burst: 1000,
            bytes_per_second: 1 << 30,
            byte_burst: 1 << 30,
            on_rate_limit: OnRateLimit::Close,
            idle_timeout: Duration::from_secs(60),
            ping_interval: Duration::from_secs(30),
            expires_at: None,
        }
    }

    fn frame_bytes(opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        frame::write_frame(&mut v, opcode, mask, payload);
        v
    }

    /// Reads one small frame (payload under 126 bytes): opcode and unmasked payload.
    async fn read_frame(s: &mut DuplexStream) -> io::Result<(u8, Vec<u8>)> {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await?;
        let masked = h[1] & 0x80 != 0;
        let len = (h[1] & 0x7f) as usize;
        assert!(len < 126, "test frames are small");
        let mut key = [0u8; 4];
        if masked {
            s.read_exact(&mut key).await?;
        }
        let mut p = vec![0u8; len];
        s.read_exact(&mut p).await?;
        if masked {
            frame::apply_mask(&mut p, key);
        }
        Ok((h[0] & 0x0f, p))
    }

    const LIMIT: Duration = Duration::from_secs(3);

    /// A session between two in-memory peers, and the peers' ends (client, backend).
    fn session_between(drain: &Drain) -> (impl Future<Output = SessionEnd> + '_, DuplexStream, DuplexStream) {
        let (client, client_peer) = duplex(1 << 16);
        let (backend, backend_peer) = duplex(1 << 16);
        let session =
            run(client, Vec::new(), backend, Vec::new(), policy(), CancellationToken::new(), drain, &NoTraffic);
        (session, client_peer, backend_peer)
    }

    /// The client sends a close with `payload`; returns once the backend has read it.
    async fn client_close_forwarded(client_peer: &mut DuplexStream, backend_peer: &mut DuplexStream, payload: &[u8]) {
        client_peer.write_all(&frame_bytes(OP_CLOSE, Some([9, 8, 7, 6]), payload)).await.unwrap();
        let forwarded = read_frame(backend_peer).await.unwrap();
        assert_eq!((forwarded.0, &forwarded.1[..]), (OP_CLOSE, payload));
    }

    #[tokio::test]
    async fn a_backend_write_that_fails_closes_the_client_with_1011() {
        let (client, mut client_peer) = duplex(1 << 16);
        let drain = Drain::default();
        let session =
            run(client, Vec::new(), ResetOnWrite, Vec::new(), policy(), CancellationToken::new(), &drain, &NoTraffic);
        let peer = async {
            client_peer.write_all(&frame_bytes(0x1, Some([1, 2, 3, 4]), b"hello")).await.unwrap();
            let got = read_frame(&mut client_peer).await;
            if let Ok((OP_CLOSE, p)) = &got {
                client_peer.write_all(&frame_bytes(OP_CLOSE, Some([1, 2, 3, 4]), p)).await.unwrap();
            }
            got
        };
        let (end, got) = tokio::time::timeout(LIMIT, async { tokio::join!(session, peer) })
            .await
            .expect("the session went on talking to a backend that was gone");
        let (op, payload) = got.expect("a close frame");
        assert_eq!((op, &payload[..2]), (OP_CLOSE, &1011u16.to_be_bytes()[..]));
        assert_eq!(end.code, 1011);
    }

    #[tokio::test]
    async fn a_close_the_vanished_backend_never_answered_is_answered_to_the_client() {
        let drain = Drain::default();
        let (session, mut client_peer, mut backend_peer) = session_between(&drain);
        let peers = async {
            client_close_forwarded(&mut client_peer, &mut backend_peer, &frame::close_payload(1000, "bye")).await;
            drop(backend_peer); // gone without a reply
            read_frame(&mut client_peer).await
        };
        let (end, got) = tokio::time::timeout(LIMIT, async { tokio::join!(session, peers) })
            .await
            .expect("the client's close was left unanswered");
        let (op, payload) = got.expect("a close frame for the client");
        assert_eq!((op, &payload[..]), (OP_CLOSE, &1000u16.to_be_bytes()[..]));
        assert_eq!(end.code, 1000);
    }

    #[tokio::test]
    async fn a_close_the_backend_lets_time_out_is_answered_to_the_client() {
        let drain = Drain::default();
        let (session, mut client_peer, mut backend_peer) = session_between(&drain);
        let peers = async {
            client_close_forwarded(&mut client_peer, &mut backend_peer, &frame::close_payload(4005, "done")).await;
            // The backend stays connected and never answers.
            let got = read_frame(&mut client_peer).await;
            drop(backend_peer);
            got
        };
        let (end, got) = tokio::time::timeout(CLOSE_TIMEOUT + LIMIT, async { tokio::join!(session, peers) })
            .await
            .expect("the session outlived its close timeout");
        let (op, payload) = got.expect("a close frame for the client, not just the end of the stream");
        assert_eq!((op, &payload[..]), (OP_CLOSE, &4005u16.to_be_bytes()[..]));
        assert_eq!(end.code, 4005);
    }

    #[tokio::test]
    async fn no_pong_follows_a_close_frame() {
        let drain = Drain::default();
        let (session, mut client_peer, mut backend_peer) = session_between(&drain);
        let peers = async {
            let close = frame::close_payload(1000, "");
            client_close_forwarded(&mut client_peer, &mut backend_peer, &close).await;
            // The backend pings before it reads our close, then answers the close.
            backend_peer.write_all(&frame_bytes(OP_PING, None, b"late")).await.unwrap();
            backend_peer.write_all(&frame_bytes(OP_CLOSE, None, &close)).await.unwrap();
            let mut rest = Vec::new();
            backend_peer.read_to_end(&mut rest).await.unwrap();
            let _ = read_frame(&mut client_peer).await;
            rest
        };
        let (_, rest) =
            tokio::time::timeout(LIMIT, async { tokio::join!(session, peers) }).await.expect("session ended");
        assert!(rest.is_empty(), "bytes after our close frame: {rest:?} (a pong is opcode {OP_PONG})");
    }
}
