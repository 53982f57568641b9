//! The byte relay that carries a session once the login is done.
//!
//! No buffer lives in a session while it is idle: each poll reads into a buffer on the
//! stack and writes it straight to the other side; only bytes the other side cannot take
//! yet are copied to the heap, and that copy is freed as soon as it drains. An idle
//! IMAP session (IDLE for 30 minutes) therefore costs its sockets and this small future,
//! not two 8 KiB copy buffers as with `tokio::io::copy_bidirectional`.
//!
//! End of stream on one side is passed on as a write shutdown of the other (half-close);
//! the relay ends when both directions have ended, on the first I/O error, when no byte
//! has moved in either direction for the idle timeout, or when cancelled. Once the
//! backend has closed (after LOGOUT, QUIT, or a kick on its side) the mail session is
//! over: the client gets [`LINGER`] to close too, then the relay ends, so a client that
//! never closes does not hold its session slot until the idle timeout.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, sleep_until};

/// How long a client may keep its side open after the backend closed.
pub const LINGER: Duration = Duration::from_secs(2);

/// Bytes moved per read. On the stack, not in the session.
const CHUNK: usize = 16 * 1024;

/// How a relay ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Both sides closed their sending direction.
    Closed,
    /// No traffic in either direction for the idle timeout.
    IdleTimeout,
    /// The session was cancelled (shutdown or kick).
    Cancelled,
    /// Reading from or writing to the client failed.
    ClientError,
    /// Reading from or writing to the backend failed.
    BackendError,
}

impl End {
    /// Name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::IdleTimeout => "idle_timeout",
            End::Cancelled => "cancelled",
            End::ClientError => "client_error",
            End::BackendError => "backend_error",
        }
    }
}

/// What a relay did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Bytes from the client to the backend.
    pub client_to_backend: u64,
    /// Bytes from the backend to the client.
    pub backend_to_client: u64,
    /// Why it ended.
    pub end: End,
}

/// One direction of the relay.
#[derive(Debug, Default)]
struct Half {
    /// Bytes read but not yet accepted by the writer; empty (unallocated) when idle.
    pending: Vec<u8>,
    pos: usize,
    needs_flush: bool,
    read_eof: bool,
    done: bool,
    bytes: u64,
}

/// Which side failed, so the caller can tell client errors from backend errors.
/// The error itself is dropped: a reset from a phone going out of coverage is routine,
/// and the side that failed is what the session log needs.
enum Fault {
    Reader,
    Writer,
}

impl Half {
    /// Moves bytes from `src` to `dst` until `src` would block (Pending) or this
    /// direction is finished (Ready(Ok)). `moved` is set when any byte moved.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut src: Pin<&mut R>,
        mut dst: Pin<&mut W>,
        moved: &mut bool,
    ) -> Poll<Result<(), Fault>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            while let Some(rest) = self.pending.get(self.pos..).filter(|r| !r.is_empty()) {
                let n = ready!(dst.as_mut().poll_write(cx, rest)).map_err(|_| Fault::Writer)?;
                if n == 0 {
                    return Poll::Ready(Err(Fault::Writer));
                }
                self.pos += n;
                *moved = true;
            }
            if !self.pending.is_empty() {
                // Give the memory back: an idle session holds no buffer.
                self.pending = Vec::new();
                self.pos = 0;
                self.needs_flush = true;
            }
            if self.read_eof {
                if self.needs_flush {
                    ready!(dst.as_mut().poll_flush(cx)).map_err(|_| Fault::Writer)?;
                    self.needs_flush = false;
                }
                // The peer may already be gone; a failed shutdown ends nothing else.
                let _ = ready!(dst.as_mut().poll_shutdown(cx));
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let mut stack = [0u8; CHUNK];
            let mut buf = ReadBuf::new(&mut stack);
            match src.as_mut().poll_read(cx, &mut buf) {
                Poll::Pending => {
                    if self.needs_flush {
                        ready!(dst.as_mut().poll_flush(cx)).map_err(|_| Fault::Writer)?;
                        self.needs_flush = false;
                    }
                    return Poll::Pending;
                }
                // Many clients drop the TCP connection without a TLS close_notify;
                // rustls reports that as UnexpectedEof. It is an ordinary end of stream.
                Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    self.read_eof = true;
                    continue;
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Err(Fault::Reader)),
                Poll::Ready(Ok(())) => {}
            }
            let data = buf.filled();
            if data.is_empty() {
                self.read_eof = true;
                continue;
            }
            self.bytes += data.len() as u64;
            *moved = true;
            let mut off = 0;
            while let Some(rest) = data.get(off..).filter(|r| !r.is_empty()) {
                match dst.as_mut().poll_write(cx, rest) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(Fault::Writer));
                    }
                    Poll::Ready(Ok(n)) => off += n,
                    Poll::Ready(Err(_)) => return Poll::Ready(Err(Fault::Writer)),
                    Poll::Pending => {
                        self.pending = rest.to_vec();
                        self.pos = 0;
                        return Poll::Pending;
                    }
                }
            }
            self.needs_flush = true;
        }
    }
}

/// Relays between `client` and `backend` until the session ends. `cancel` ends it early.
pub async fn relay<C, B>(
    client: &mut C,
    backend: &mut B,
    idle: Duration,
    cancel: impl Future<Output = ()>,
) -> Stats
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Half::default();
    let mut down = Half::default();
    let mut last_activity = Instant::now();
    let timer = sleep_until(last_activity + idle);
    tokio::pin!(timer);
    tokio::pin!(cancel);
    let mut linger: Option<Pin<Box<tokio::time::Sleep>>> = None;

    let end = poll_fn(|cx| {
        if cancel.as_mut().poll(cx).is_ready() {
            return Poll::Ready(End::Cancelled);
        }
        let mut moved = false;
        let up_state = up.poll_copy(
            cx,
            Pin::new(&mut *client),
            Pin::new(&mut *backend),
            &mut moved,
        );
        let down_state = down.poll_copy(
            cx,
            Pin::new(&mut *backend),
            Pin::new(&mut *client),
            &mut moved,
        );
        match (up_state, down_state) {
            (Poll::Ready(Err(Fault::Reader)), _) | (_, Poll::Ready(Err(Fault::Writer))) => {
                return Poll::Ready(End::ClientError);
            }
            (Poll::Ready(Err(Fault::Writer)), _) | (_, Poll::Ready(Err(Fault::Reader))) => {
                return Poll::Ready(End::BackendError);
            }
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => return Poll::Ready(End::Closed),
            (Poll::Pending, Poll::Ready(Ok(()))) => {
                let t = linger.get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER)));
                if t.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(End::Closed);
                }
            }
            _ => {}
        }
        if moved {
            // Cheap: reading the clock is a vDSO call; the timer is only re-armed when
            // it fires (below), not on every packet.
            last_activity = Instant::now();
        }
        while timer.as_mut().poll(cx).is_ready() {
            let deadline = last_activity + idle;
            if deadline <= Instant::now() {
                return Poll::Ready(End::IdleTimeout);
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await;

    Stats {
        client_to_backend: up.bytes,
        backend_to_client: down.bytes,
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::pending;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test]
    async fn moves_bytes_and_propagates_half_close() {
        let (mut client, mut proxy_client) = duplex(64);
        let (mut proxy_backend, mut backend) = duplex(64);
        let task = tokio::spawn(async move {
            relay(
                &mut proxy_client,
                &mut proxy_backend,
                Duration::from_secs(60),
                pending(),
            )
            .await
        });
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let payload = payload.clone();
            tokio::spawn(async move {
                client.write_all(&payload).await.unwrap();
                client.shutdown().await.unwrap();
                let mut back = Vec::new();
                client.read_to_end(&mut back).await.unwrap();
                back
            })
        };
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
        // The client's half-close reached the backend; the other direction still works.
        backend.write_all(b"* BYE\r\n").await.unwrap();
        backend.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"* BYE\r\n");
        let stats = task.await.unwrap();
        assert_eq!(stats.end, End::Closed);
        assert_eq!(stats.client_to_backend, 100_000);
        assert_eq!(stats.backend_to_client, 7);
    }

    #[tokio::test(start_paused = true)]
    async fn client_that_never_closes_is_let_go_after_the_backend_closed() {
        let (mut client, mut proxy_client) = duplex(64);
        let (mut proxy_backend, mut backend) = duplex(64);
        let started = Instant::now();
        let task = tokio::spawn(async move {
            relay(
                &mut proxy_client,
                &mut proxy_backend,
                Duration::from_secs(1800),
                pending(),
            )
            .await
        });
        backend.write_all(b"* BYE\r\n").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut bye = [0u8; 7];
        client.read_exact(&mut bye).await.unwrap();
        assert_eq!(&bye, b"* BYE\r\n");
        // The client keeps its side open and says nothing.
        let stats = task.await.unwrap();
        assert_eq!(stats.end, End::Closed);
        let took = started.elapsed();
        assert!(took >= LINGER && took < LINGER * 2, "{took:?}");
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_counts_both_directions() {
        let (mut client, mut proxy_client) = duplex(64);
        let (mut proxy_backend, mut backend) = duplex(64);
        let task = tokio::spawn(async move {
            relay(
                &mut proxy_client,
                &mut proxy_backend,
                Duration::from_secs(100),
                pending(),
            )
            .await
        });
        let start = Instant::now();
        // Only the backend talks (an IMAP IDLE session receiving updates): the session
        // must survive well past one idle period.
        let mut buf = [0u8; 16];
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(60)).await;
            backend.write_all(b"* 1 EXISTS\r\n").await.unwrap();
            client.read_exact(&mut buf[..12]).await.unwrap();
        }
        let stats = task.await.unwrap();
        assert_eq!(stats.end, End::IdleTimeout);
        let lived = Instant::now() - start;
        assert!(lived >= Duration::from_secs(400), "{lived:?}");
        assert!(lived <= Duration::from_secs(401), "{lived:?}");
    }

    #[tokio::test]
    async fn cancellation_ends_the_relay() {
        let (_client, mut proxy_client) = duplex(64);
        let (mut proxy_backend, _backend) = duplex(64);
        let stats = relay(
            &mut proxy_client,
            &mut proxy_backend,
            Duration::from_secs(60),
            std::future::ready(()),
        )
        .await;
        assert_eq!(stats.end, End::Cancelled);
    }
}
