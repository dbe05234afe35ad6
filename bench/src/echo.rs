//! Plain ws:// echo backend: every data frame is sent back as received (same
//! FIN bit and opcode, so fragmented messages come back fragmented the same
//! way), pings are answered, closes are echoed. All frames produced by one
//! read are written back in a single `write_all`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::net::BoxError;
use crate::ws;

const MAX_REQUEST_HEAD: usize = 16 << 10;
const MAX_PAYLOAD: usize = 16 << 20;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(listen: SocketAddr, max_seconds: u64) -> Result<(), BoxError> {
    let listener = crate::net::listen_loopback(listen)?;
    eprintln!("echo backend listening on ws://{listen}");
    let accept = accept_loop(listener);
    if max_seconds == 0 {
        accept.await
    } else {
        match tokio::time::timeout(Duration::from_secs(max_seconds), accept).await {
            Ok(r) => r,
            Err(_) => {
                eprintln!("echo backend: --max-seconds reached, exiting");
                Ok(())
            }
        }
    }
}

pub(crate) async fn accept_loop(listener: TcpListener) -> Result<(), BoxError> {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                tokio::spawn(async move {
                    // Errors on a single connection are the client's business.
                    let _ = serve(sock).await;
                });
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                eprintln!("echo backend: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve(mut sock: TcpStream) -> Result<(), BoxError> {
    sock.set_nodelay(true)?;
    let mut rbuf = BytesMut::with_capacity(4096);
    let head_end = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            if let Some(end) = ws::find_header_end(&rbuf) {
                return Ok::<usize, BoxError>(end);
            }
            if rbuf.len() > MAX_REQUEST_HEAD {
                return Err("request head too large".into());
            }
            rbuf.reserve(4096);
            if sock.read_buf(&mut rbuf).await? == 0 {
                return Err("closed during handshake".into());
            }
        }
    })
    .await
    .map_err(|_| "handshake timeout")??;
    let head = String::from_utf8_lossy(&rbuf[..head_end]).into_owned();
    rbuf.advance(head_end);
    let Some(key) = ws::header_value(&head, "sec-websocket-key") else {
        sock.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?;
        return Ok(());
    };
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        ws::accept_key(key)
    );
    sock.write_all(resp.as_bytes()).await?;

    let mut out: Vec<u8> = Vec::new();
    loop {
        // Echo everything that is complete in the buffer.
        let mut closing = false;
        while let Some(h) = ws::parse_header(&rbuf, MAX_PAYLOAD)? {
            if rbuf.len() < h.frame_len() {
                rbuf.reserve(h.frame_len() - rbuf.len());
                break;
            }
            let Some(mask) = h.mask else {
                return Err("unmasked client frame".into());
            };
            let payload = &mut rbuf[h.header_len..h.frame_len()];
            ws::apply_mask(payload, mask);
            match h.opcode {
                ws::OP_PING => ws::encode_frame(&mut out, true, ws::OP_PONG, payload, None),
                ws::OP_PONG => {}
                ws::OP_CLOSE => {
                    let p: &[u8] = if payload.len() >= 2 { &payload[..2] } else { &[] };
                    ws::encode_frame(&mut out, true, ws::OP_CLOSE, p, None);
                    closing = true;
                }
                op => ws::encode_frame(&mut out, h.fin, op, payload, None),
            }
            rbuf.advance(h.frame_len());
            if closing {
                break;
            }
        }
        if !out.is_empty() {
            sock.write_all(&out).await?;
            out.clear();
            if out.capacity() > 256 << 10 {
                out.shrink_to(64 << 10);
            }
        }
        if closing {
            let _ = sock.shutdown().await;
            return Ok(());
        }
        if rbuf.capacity() - rbuf.len() < 1024 {
            rbuf.reserve(8192);
        }
        if sock.read_buf(&mut rbuf).await? == 0 {
            return Ok(());
        }
    }
}
