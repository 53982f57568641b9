//! The byte relay that carries a session once the login is done.
//!
//! Two ways to move bytes, chosen per session:
//!
//! - **splice** (Linux, both sides plaintext TCP): each direction splices from its
//!   source socket into a pipe and from the pipe into the other socket, so the bytes
//!   never enter user space (see [`crate::relay::splice`]). A pipe is held only while bytes are
//!   in flight; an idle session holds none.
//! - **copy** (TLS on either side, or no pipe to be had): each poll reads into a buffer
//!   on the stack and writes it straight to the other side; only bytes the other side
//!   cannot take yet are copied to the heap, and that copy is freed as soon as it
//!   drains.
//!
//! Either way no buffer lives in a session while it is idle: an IMAP session in IDLE for
//! 30 minutes costs its sockets (and, with TLS, rustls's state) and this small future,
//! not two 8 KiB copy buffers as with `tokio::io::copy_bidirectional`. A kTLS variant
//! of the client stream would take the splice path too: it only needs
//! [`RelayIo::plain_tcp`] to return the socket once the kernel does the record layer.
//!
//! End of stream on one side is passed on as a write shutdown of the other (half-close);
//! the relay ends when both directions have ended, on the first I/O error, when no byte
//! has moved in either direction for the idle timeout, or when cancelled. Once the
//! backend has closed (after LOGOUT, QUIT, or a kick on its side) the mail session is
//! over: the client gets [`LINGER`] to close too, then the relay ends, so a client that
//! never closes does not hold its session slot until the idle timeout.

pub mod lean_tls;
#[cfg(target_os = "linux")]
pub(crate) mod splice;
pub mod stream;
pub mod tls;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep, sleep_until};

use crate::backends::backend::BackendStream;
use crate::relay::splice::Fault;
use crate::relay::stream::ClientStream;

/// How long a client may keep its side open after the backend closed.
pub const LINGER: Duration = Duration::from_secs(2);

/// Bytes moved per read on the copy path. On the stack, not in the session. A TLS
/// record carries at most 16 KiB, so a bigger buffer would not read more at once there.
const CHUNK: usize = 16 * 1024;

/// A stream the relay can carry: any async byte stream, plus a way to reach the TCP
/// socket underneath when nothing (TLS) sits in between, for splice(2).
pub trait RelayIo: AsyncRead + AsyncWrite + Unpin {
    /// The plaintext TCP socket this stream is, if it is one.
    fn plain_tcp(&mut self) -> Option<&mut TcpStream> {
        None
    }
}

impl RelayIo for TcpStream {
    fn plain_tcp(&mut self) -> Option<&mut TcpStream> {
        Some(self)
    }
}

impl RelayIo for ClientStream {
    fn plain_tcp(&mut self) -> Option<&mut TcpStream> {
        match self {
            ClientStream::Plain(s) => Some(s),
            ClientStream::Tls(_) => None,
        }
    }
}

impl RelayIo for BackendStream {
    fn plain_tcp(&mut self) -> Option<&mut TcpStream> {
        match self {
            BackendStream::Plain(s) => Some(s),
            BackendStream::Tls(_) => None,
        }
    }
}

impl RelayIo for tokio::io::DuplexStream {}

/// How a relay ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Both sides closed their sending direction.
    Closed,
    /// No traffic in either direction for the idle timeout.
    IdleTimeout,
    /// The session was cancelled (shutdown or kick); the driver names which.
    Cancelled,
    /// Ended on purpose: a move, an operator's kick, the backend taken down.
    Kicked,
    /// Postern stopped, and the shutdown grace period was over.
    Shutdown,
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
            End::Kicked => "kicked",
            End::Shutdown => "shutdown",
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
    /// Whether the bytes moved by splice(2) (both sides plaintext) rather than copies.
    pub spliced: bool,
}

/// One direction of the copy relay.
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
///
/// The future is a plain struct, not an `async fn`: it is what an idle session keeps,
/// and an `async fn` stores its pinned arguments twice (rust-lang/rust#62958) and a
/// `poll_fn` closure a pointer per variable it uses, ~180 bytes more in all. Call it
/// inside the runtime: the idle timer is created here.
pub fn relay<'a, C, B, F>(
    client: &'a mut C,
    backend: &'a mut B,
    idle: Duration,
    cancel: F,
) -> Relay<'a, C, B, F>
where
    C: RelayIo + ?Sized,
    B: RelayIo + ?Sized,
    F: Future<Output = ()>,
{
    let mode = Mode::choose(client, backend);
    let last_activity = Instant::now();
    Relay {
        client,
        backend,
        mode,
        last_activity,
        idle,
        timer: sleep_until(last_activity + idle),
        cancel,
        linger: None,
    }
}

pin_project_lite::pin_project! {
    /// The future of [`relay`].
    #[must_use = "futures do nothing unless polled"]
    pub struct Relay<'a, C: ?Sized, B: ?Sized, F> {
        client: &'a mut C,
        backend: &'a mut B,
        mode: Mode,
        last_activity: Instant,
        idle: Duration,
        // Fires at the idle deadline, or later: it is only re-armed when it fires, not
        // on every packet.
        #[pin]
        timer: Sleep,
        #[pin]
        cancel: F,
        // Armed once the backend has closed: the client's time to close too.
        linger: Option<Pin<Box<Sleep>>>,
    }
}

impl<C, B, F> Future for Relay<'_, C, B, F>
where
    C: RelayIo + ?Sized,
    B: RelayIo + ?Sized,
    F: Future<Output = ()>,
{
    type Output = Stats;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Stats> {
        let mut this = self.project();
        let end = 'end: {
            if this.cancel.poll(cx).is_ready() {
                break 'end End::Cancelled;
            }
            let mut moved = false;
            match this
                .mode
                .step(cx, &mut **this.client, &mut **this.backend, &mut moved)
            {
                (Poll::Ready(Err(Fault::Reader)), _) | (_, Poll::Ready(Err(Fault::Writer))) => {
                    break 'end End::ClientError;
                }
                (Poll::Ready(Err(Fault::Writer)), _) | (_, Poll::Ready(Err(Fault::Reader))) => {
                    break 'end End::BackendError;
                }
                (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => break 'end End::Closed,
                (Poll::Pending, Poll::Ready(Ok(()))) => {
                    let t = this
                        .linger
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER)));
                    if t.as_mut().poll(cx).is_ready() {
                        break 'end End::Closed;
                    }
                }
                _ => {}
            }
            if moved {
                // Cheap: reading the clock is a vDSO call; the timer is only re-armed
                // when it fires (below), not on every packet.
                *this.last_activity = Instant::now();
            }
            while this.timer.as_mut().poll(cx).is_ready() {
                let deadline = *this.last_activity + *this.idle;
                if deadline <= Instant::now() {
                    break 'end End::IdleTimeout;
                }
                this.timer.as_mut().reset(deadline);
            }
            return Poll::Pending;
        };
        Poll::Ready(this.mode.stats(end))
    }
}

/// Whether plaintext sessions are spliced: yes, unless the environment variable
/// `POSTERN_RELAY_SPLICE=0` says otherwise (read once). The switch exists for the
/// benchmark, to measure the copy path on the same build, and as a way out should a
/// kernel misbehave.
#[cfg(target_os = "linux")]
fn splice_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("POSTERN_RELAY_SPLICE").is_none_or(|v| v != "0"))
}

/// The state of both directions after one step.
type Step = (Poll<Result<(), Fault>>, Poll<Result<(), Fault>>);

/// How this session's bytes move: both directions copied, or both spliced.
#[derive(Debug)]
enum Mode {
    Copy(Half, Half),
    #[cfg(target_os = "linux")]
    Splice(Way, Way),
}

impl Mode {
    fn choose<C, B>(client: &mut C, backend: &mut B) -> Mode
    where
        C: RelayIo + ?Sized,
        B: RelayIo + ?Sized,
    {
        #[cfg(target_os = "linux")]
        if splice_enabled() && client.plain_tcp().is_some() && backend.plain_tcp().is_some() {
            return Mode::Splice(Way::default(), Way::default());
        }
        let _ = (client, backend);
        Mode::Copy(Half::default(), Half::default())
    }

    /// Moves what can be moved in both directions, client→backend first.
    fn step<C, B>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        backend: &mut B,
        moved: &mut bool,
    ) -> Step
    where
        C: RelayIo + ?Sized,
        B: RelayIo + ?Sized,
    {
        match self {
            Mode::Copy(up, down) => (
                up.poll_copy(cx, Pin::new(&mut *client), Pin::new(&mut *backend), moved),
                down.poll_copy(cx, Pin::new(&mut *backend), Pin::new(&mut *client), moved),
            ),
            #[cfg(target_os = "linux")]
            Mode::Splice(up, down) => match (client.plain_tcp(), backend.plain_tcp()) {
                (Some(c), Some(b)) => (up.poll(cx, c, b, moved), down.poll(cx, b, c, moved)),
                // Chosen because both were plain TCP; they cannot have changed.
                _ => (
                    Poll::Ready(Err(Fault::Reader)),
                    Poll::Ready(Err(Fault::Reader)),
                ),
            },
        }
    }

    fn stats(&self, end: End) -> Stats {
        let (client_to_backend, backend_to_client, spliced) = match self {
            Mode::Copy(up, down) => (up.bytes, down.bytes, false),
            #[cfg(target_os = "linux")]
            Mode::Splice(up, down) => (up.bytes(), down.bytes(), true),
        };
        Stats {
            client_to_backend,
            backend_to_client,
            end,
            spliced,
        }
    }
}

/// One direction between two plaintext sockets: spliced, or copied once no pipe could
/// be had.
#[cfg(target_os = "linux")]
#[derive(Debug)]
enum Way {
    Splice(crate::relay::splice::SpliceHalf),
    Copy(Half),
}

#[cfg(target_os = "linux")]
impl Default for Way {
    fn default() -> Self {
        Way::Splice(crate::relay::splice::SpliceHalf::default())
    }
}

#[cfg(target_os = "linux")]
impl Way {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut TcpStream,
        dst: &mut TcpStream,
        moved: &mut bool,
    ) -> Poll<Result<(), Fault>> {
        if let Way::Splice(s) = self {
            match ready!(s.poll_splice(cx, src, dst, moved)) {
                Ok(()) => return Poll::Ready(Ok(())),
                Err(Some(fault)) => return Poll::Ready(Err(fault)),
                // Out of descriptors: copy from now on (nothing is in a pipe).
                Err(None) => {
                    *self = Way::Copy(Half {
                        bytes: s.bytes,
                        ..Half::default()
                    });
                }
            }
        }
        match self {
            Way::Copy(h) => h.poll_copy(cx, Pin::new(src), Pin::new(dst), moved),
            Way::Splice(_) => Poll::Pending,
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            Way::Splice(s) => s.bytes,
            Way::Copy(h) => h.bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::pending;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};
    use tokio::net::TcpStream;

    use crate::backends::backend::BackendStream;
    use crate::relay::stream::ClientStream;

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
    /// The relay is what an idle session keeps: its future must stay small (it holds
    /// no buffer; the copy path's 16 KiB lives on the stack only during a poll). With
    /// the cancellation future a session passes, the bound is its size today in a debug
    /// build on x86_64 (an `async fn` with a `poll_fn` took 520).
    #[tokio::test]
    async fn relay_future_is_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        let mut client = ClientStream::Plain(a);
        let mut backend = BackendStream::Plain(b);
        let token = tokio_util::sync::CancellationToken::new();
        let cancel = token.cancelled();
        let f = relay(&mut client, &mut backend, Duration::from_secs(1), cancel);
        let size = std::mem::size_of_val(&f);
        assert!(size <= 344, "relay future is {size} bytes");
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Both plaintext sides over real sockets: the splice path on Linux. 4 MB each way
    /// at once, byte for byte, then a half-close from the client with bytes still
    /// coming from the backend.
    #[tokio::test]
    async fn spliced_relay_is_byte_exact_and_half_closes() {
        let (mut client, proxy_client) = tcp_pair().await;
        let (proxy_backend, mut backend) = tcp_pair().await;
        let task = tokio::spawn(async move {
            let mut c = ClientStream::Plain(proxy_client);
            let mut b = BackendStream::Plain(proxy_backend);
            relay(&mut c, &mut b, Duration::from_secs(60), pending()).await
        });
        let up: Vec<u8> = (0..4_000_000u32).map(|i| (i % 253) as u8).collect();
        let down: Vec<u8> = (0..4_000_000u32).map(|i| (i % 241) as u8).collect();
        let (mut cr, mut cw) = client.split();
        let (mut br, mut bw) = backend.split();
        let client_side = async {
            cw.write_all(&up).await.unwrap();
            cw.shutdown().await.unwrap();
            let mut got = Vec::new();
            cr.read_to_end(&mut got).await.unwrap();
            got
        };
        let backend_side = async {
            let mut got = Vec::new();
            br.read_to_end(&mut got).await.unwrap();
            // The client's half-close arrived; this direction still works.
            bw.write_all(&down).await.unwrap();
            bw.shutdown().await.unwrap();
            got
        };
        let (at_client, at_backend) = tokio::join!(client_side, backend_side);
        assert!(at_backend == up, "client to backend differs");
        assert!(at_client == down, "backend to client differs");
        let stats = task.await.unwrap();
        assert_eq!(stats.end, End::Closed);
        assert_eq!(stats.client_to_backend, 4_000_000);
        assert_eq!(stats.backend_to_client, 4_000_000);
        assert_eq!(stats.spliced, cfg!(target_os = "linux"));
    }

    /// A reader that stops reading: the relay stops reading too (backpressure), and
    /// everything arrives once the reader resumes.
    #[tokio::test]
    async fn spliced_relay_applies_backpressure() {
        let (mut client, proxy_client) = tcp_pair().await;
        let (proxy_backend, mut backend) = tcp_pair().await;
        let task = tokio::spawn(async move {
            let mut c = ClientStream::Plain(proxy_client);
            let mut b = BackendStream::Plain(proxy_backend);
            relay(&mut c, &mut b, Duration::from_secs(60), pending()).await
        });
        let total = 64 * 1024 * 1024;
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 1024 * 1024];
            let mut sent = 0usize;
            while sent < total {
                match tokio::time::timeout(Duration::from_millis(500), backend.write_all(&chunk))
                    .await
                {
                    Ok(r) => r.unwrap(),
                    // Stalled: the client is not reading and every buffer is full.
                    Err(_) => return (sent, backend),
                }
                sent += chunk.len();
            }
            (sent, backend)
        });
        let (sent, mut backend) = writer.await.unwrap();
        assert!(sent < total, "64 MB went out with nobody reading");
        let reader = tokio::spawn(async move {
            let mut got = 0usize;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = client.read(&mut buf).await.unwrap();
                if n == 0 {
                    return got;
                }
                assert!(buf[..n].iter().all(|&b| b == 7 || b"end".contains(&b)));
                got += n;
            }
        });
        backend.write_all(b"end").await.unwrap();
        backend.shutdown().await.unwrap();
        drop(backend);
        let got = reader.await.unwrap();
        assert!(got >= sent, "{got} < {sent}");
        let stats = task.await.unwrap();
        assert_eq!(stats.backend_to_client, got as u64);
    }
}
