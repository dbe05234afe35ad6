//! The sockets the relay drives, and what it needs from them beyond reading and writing:
//! ending a TLS stream's output in the same write as its last bytes, and knowing whether
//! closing the socket alone ends the stream properly.

use std::io::Write;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A socket the relay pump drives.
pub trait RelayIo: AsyncRead + AsyncWrite + Unpin {
    /// Buffers `last`, the final bytes this stream will ever carry, and when all of it was
    /// taken, the end of the stream's output after it (TLS `close_notify`), for the next
    /// flush to send together. Returns how many bytes of `last` were taken; 0 when the stream
    /// cannot do this (plain TCP) or has output queued ahead, and then nothing changed.
    ///
    /// Why: after a close handshake the final close frame and the `close_notify` would
    /// otherwise leave in two writes, two packets, on every session.
    fn buffer_last(&mut self, _last: &[u8]) -> usize {
        0
    }

    /// Whether the stream ends with a message of its own (TLS `close_notify`) that only
    /// [`RelayIo::buffer_last`] or a shutdown sends. Plain TCP has none: closing the socket
    /// sends its FIN, so a shutdown before the close adds nothing on the wire. (No default:
    /// a TLS stream that said `false` would lose its `close_notify`.)
    fn has_end_message(&self) -> bool;
}

impl<T: RelayIo + ?Sized> RelayIo for Box<T> {
    fn buffer_last(&mut self, last: &[u8]) -> usize {
        (**self).buffer_last(last)
    }

    fn has_end_message(&self) -> bool {
        (**self).has_end_message()
    }
}

impl RelayIo for TcpStream {
    fn has_end_message(&self) -> bool {
        false
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> RelayIo for tokio_rustls::server::TlsStream<IO> {
    fn buffer_last(&mut self, last: &[u8]) -> usize {
        tls_buffer_last(self.get_mut().1, last)
    }

    fn has_end_message(&self) -> bool {
        true
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> RelayIo for tokio_rustls::client::TlsStream<IO> {
    fn buffer_last(&mut self, last: &[u8]) -> usize {
        tls_buffer_last(self.get_mut().1, last)
    }

    fn has_end_message(&self) -> bool {
        true
    }
}

fn tls_buffer_last<D>(conn: &mut rustls::ConnectionCommon<D>, last: &[u8]) -> usize {
    if conn.is_handshaking() || conn.wants_write() {
        return 0;
    }
    // rustls takes up to its send-buffer limit (64 KiB by default); a close frame always fits.
    let n = conn.writer().write(last).unwrap_or(0);
    if n == last.len() {
        conn.send_close_notify();
    }
    n
}
