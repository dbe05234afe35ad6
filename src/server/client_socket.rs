//! The client's TCP socket under TLS, which holds TLS 1.3 session tickets back until
//! wsgate's first response.
//!
//! rustls emits its session tickets the moment it has read the client's `Finished`, and
//! tokio-rustls flushes them before `accept` returns. They would leave in a write and a
//! packet of their own, on every connection, just before the client's upgrade request
//! arrives. Held here, they go out in the same write as the 101 (or the rejection): one
//! syscall, one packet and one wake-up of the client less per connection. A ticket only
//! matters for a later connection; the one cost is that a connection the client opens
//! before this one's 101 arrives cannot resume with it. Holding them must not hold the
//! client up: a client with Nagle's algorithm on waits for the ACK of its `Finished` before
//! it sends the request, so when the request is not there after the handshake that ACK is
//! sent at once (see `poll_read`).
//!
//! What is held, during the handshake only: a write made after the client's data was read,
//! that starts with an encrypted (application data) record. In TLS 1.3 that can only be the
//! tickets, or an alert when the handshake fails. The server's own flights start with a
//! plaintext ServerHello or HelloRetryRequest, TLS 1.2's last flight with ChangeCipherSpec
//! or a NewSessionTicket, and the rest of a flight the kernel took only in part is never held.
//! (rustls sends no half-RTT data or early data here: `tls::build` leaves both off,
//! and a unit test there keeps them off.) Held bytes leave in front of the next write, flush
//! or shutdown, or on drop without blocking (so a failed handshake's alert is still sent).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// TLS record header of an application-data record (content type 23, legacy version 1.2).
const APPLICATION_DATA: [u8; 3] = [0x17, 0x03, 0x03];

/// Slices passed to one `writev`: the held bytes and at most this many of the caller's.
const MAX_SLICES: usize = 16;

/// A client's TCP socket; see the module docs.
#[derive(Debug)]
pub struct ClientSocket {
    tcp: TcpStream,
    /// Still inside the TLS handshake (until [`ClientSocket::handshake_done`]).
    handshaking: bool,
    /// Handshake bookkeeping: something was written, the last write went out whole, and
    /// data was read after it.
    wrote: bool,
    write_whole: bool,
    read_since_write: bool,
    /// Bytes held back, and how many of them have been sent.
    held: Vec<u8>,
    sent: usize,
    /// The first read after the handshake happened (see `poll_read`).
    read_after_handshake: bool,
}

/// Sends the ACK the kernel is holding back for what was read, now; false when it cannot.
#[cfg(target_os = "linux")]
fn ack_now(tcp: &TcpStream) -> bool {
    socket2::SockRef::from(tcp).set_tcp_quickack(true).is_ok()
}

#[cfg(not(target_os = "linux"))]
fn ack_now(_: &TcpStream) -> bool {
    false
}

impl ClientSocket {
    /// Wraps an accepted connection whose TLS handshake has not started.
    pub fn new(tcp: TcpStream) -> Self {
        ClientSocket {
            tcp,
            handshaking: true,
            wrote: false,
            write_whole: false,
            read_since_write: false,
            held: Vec::new(),
            sent: 0,
            read_after_handshake: false,
        }
    }

    /// The handshake is over: writes are no longer held; what is held leaves with the next
    /// write, flush or shutdown.
    pub fn handshake_done(&mut self) {
        self.handshaking = false;
    }

    /// Whether this handshake-time write is held back instead of sent.
    fn holds(&self, first: &[u8]) -> bool {
        self.handshaking
            && (!self.held.is_empty()
                || (self.wrote && self.write_whole && self.read_since_write && first.starts_with(&APPLICATION_DATA)))
    }

    /// Sends the held bytes; `Ready(Ok)` once none is left.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.release();
        Poll::Ready(Ok(()))
    }

    fn release(&mut self) {
        self.held = Vec::new();
        self.sent = 0;
    }
}

impl AsyncRead for ClientSocket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if !this.handshaking && !this.read_after_handshake {
            // The first read after the handshake decides. When the request is not here yet: a
            // client with Nagle's algorithm on (the default of most TCP stacks) holds it back
            // until its `Finished` is ACKed, and with no data to carry it (held tickets;
            // nothing at all after a resumed TLS 1.2 handshake) the kernel delays that ACK by
            // 40 ms: it is sent now, on its own. Sending the tickets would do too, at the cost
            // of a write and a wake-up of the client.
            this.read_after_handshake = true;
            if r.is_pending() && !ack_now(&this.tcp) {
                let _ = this.poll_send_held(cx);
            }
        }
        ready!(r)?;
        if this.handshaking && buf.filled().len() > before {
            this.read_since_write = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ClientSocket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.handshaking {
            let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
            if this.holds(first) {
                let mut n = 0;
                for b in bufs {
                    this.held.extend_from_slice(b);
                    n += b.len();
                }
                return Poll::Ready(Ok(n));
            }
            this.wrote = true;
            this.read_since_write = false;
            // The rest of a flight the kernel took only in part is never held, whatever was
            // read meanwhile.
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            let r = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
            this.write_whole = matches!(r, Poll::Ready(Ok(n)) if n == total);
            return r;
        }
        // The held bytes go first, in the same writev as the caller's.
        while this.sent < this.held.len() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES + 1];
            slices[0] = IoSlice::new(&this.held[this.sent..]);
            let k = bufs.len().min(MAX_SLICES);
            slices[1..=k].copy_from_slice(&bufs[..k]);
            let n = ready!(Pin::new(&mut this.tcp).poll_write_vectored(cx, &slices[..=k]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let held_left = this.held.len() - this.sent;
            if n < held_left {
                this.sent += n;
                continue;
            }
            this.release();
            if n > held_left {
                return Poll::Ready(Ok(n - held_left));
            }
            // Exactly the held bytes went: the caller's are sent below.
        }
        Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // During the handshake a flush is not the end of it: held tickets wait for a response.
        if !this.handshaking {
            ready!(this.poll_send_held(cx))?;
        }
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

impl Drop for ClientSocket {
    /// A failed handshake's alert (or tickets nobody wrote a response after) leaves now, if
    /// the socket takes it without blocking.
    fn drop(&mut self) {
        if self.sent < self.held.len() {
            let _ = self.tcp.try_write(&self.held[self.sent..]);
        }
    }
}
