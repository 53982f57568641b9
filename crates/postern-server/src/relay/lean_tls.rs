//! The server side of a client's TLS connection, on rustls's unbuffered API, so that
//! Postern owns every buffer and an idle session holds none.
//!
//! `tokio_rustls` wraps rustls's buffered `ServerConnection`, whose receive buffer
//! never shrinks below 4 KiB for the life of the connection: with thousands of IMAP
//! sessions sitting in IDLE that is most of what TLS costs per session. Here the
//! connection state is rustls's, and the three buffers are this stream's own:
//!
//! - `incoming`: TLS bytes read from the socket and not yet processed (at most a
//!   record or two, [`MAX_INCOMING`]; more is refused);
//! - `plain`: decrypted bytes the caller's read buffer had no room for;
//! - `outgoing`: TLS bytes encoded and not yet taken by the kernel (handshake flights,
//!   session tickets, a KeyUpdate, a close_notify, or one write's records).
//!
//! Each is replaced by an unallocated `Vec` once it is empty: `plain` at once,
//! `incoming` when the socket has nothing more to read, `outgoing` on a flush (the relay
//! flushes whenever its source has nothing more for now; in between, a download reuses
//! the allocation from record to record instead of allocating and zeroing each time).
//! So while a session waits nothing is allocated here. Writes take at most [`MAX_WRITE`] bytes and only once the previous records are
//! in the kernel, so plaintext never piles up in user space.

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The largest TLS record on the wire: a 5-byte header and 16 KiB of plaintext plus
/// the 2 KiB of expansion TLS 1.2 allows (rustls refuses anything longer).
const MAX_RECORD: usize = 5 + 16 * 1024 + 2048;

/// Unprocessed TLS bytes this stream holds at most. A complete record is always
/// processed before more is read, so one incomplete record is what normally waits; two
/// leave room for a handshake message that spans records (rustls joins those in place,
/// in this buffer). A peer that needs more is refused.
pub(crate) const MAX_INCOMING: usize = 2 * MAX_RECORD;

/// Plaintext taken per `poll_write`: one full record.
pub(crate) const MAX_WRITE: usize = 16 * 1024;

/// Encoded bytes beyond which reading stops until the socket takes them: a peer that
/// keeps asking for answers (KeyUpdates) without reading them cannot grow `outgoing`.
const MAX_BACKLOG: usize = 2 * MAX_RECORD;

/// A TLS server connection over TCP whose buffers are freed while idle.
pub struct LeanTlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// TLS bytes received; `incoming[start..]` are not processed yet.
    incoming: Vec<u8>,
    start: usize,
    /// Decrypted bytes not yet handed to a reader; `plain[plain_pos..]` are left.
    plain: Vec<u8>,
    plain_pos: usize,
    /// TLS bytes to send: `outgoing[out_pos..out_end]` are not sent yet. The `Vec`'s
    /// length is only how much of it is initialized: while records keep going out the
    /// allocation is reused without zeroing it again for every record.
    outgoing: Vec<u8>,
    out_pos: usize,
    out_end: usize,
    /// The peer's close_notify was processed: reads see end of stream.
    peer_closed: bool,
    /// The socket reached end of stream.
    tcp_eof: bool,
    /// Our close_notify is encoded (or there is no session to close).
    close_sent: bool,
    /// rustls reported a fatal error: the connection is not touched again (rustls
    /// must not be asked to process the same bad bytes twice).
    failed: bool,
}

impl fmt::Debug for LeanTlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeanTlsStream")
            .field("tcp", &self.tcp)
            .field("version", &self.tls_version())
            .field("incoming", &self.incoming.len().saturating_sub(self.start))
            .field("plain", &self.plain.len().saturating_sub(self.plain_pos))
            .field("outgoing", &self.unsent())
            .field("peer_closed", &self.peer_closed)
            .finish_non_exhaustive()
    }
}

/// What [`LeanTlsStream::pump`] got done.
#[derive(Debug, Default)]
struct Pumped {
    /// The handshake is complete and nothing is left to process: application data may
    /// be sent, and more can only come from the socket.
    traffic: bool,
    /// Plaintext bytes encrypted from the caller's write.
    written: usize,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// What [`LeanTlsStream::poll_send`] does with the outgoing buffer once it is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drained {
    /// Free it: nothing more is expected soon.
    Free,
    /// Keep it for the next write, which is coming (a write in progress).
    Keep,
}

/// Appends what `encode` writes to `out` at `*end`, growing `out` to the size rustls
/// asks for (only the growth is zeroed). `guess` is the room tried first.
fn append_encoded(
    out: &mut Vec<u8>,
    end: &mut usize,
    guess: usize,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> io::Result<()> {
    let mut room = guess;
    // Twice at most: the first answer names the size needed.
    for _ in 0..2 {
        let want = *end + room;
        if out.len() < want {
            out.resize(want, 0);
        }
        match encode(out.get_mut(*end..want).unwrap_or_default()) {
            Ok(n) => {
                *end += n.min(room);
                return Ok(());
            }
            Err(Some(needed)) if needed > room => room = needed,
            Err(_) => break,
        }
    }
    Err(io::Error::other("TLS record could not be encoded"))
}

fn encode_error(e: EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(s) => Some(s.required_size),
        EncodeError::AlreadyEncoded => None,
    }
}

fn encrypt_error(e: EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        EncryptError::EncryptExhausted => None,
    }
}

impl LeanTlsStream {
    /// Runs the server handshake on `tcp`. Nothing has been read from the socket for
    /// TLS before: whatever the client sent is the handshake's (bytes pipelined after
    /// STARTTLS fail it instead of being executed).
    pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut s = LeanTlsStream {
            tcp,
            conn,
            incoming: Vec::new(),
            start: 0,
            plain: Vec::new(),
            plain_pos: 0,
            outgoing: Vec::new(),
            out_pos: 0,
            out_end: 0,
            peer_closed: false,
            tcp_eof: false,
            close_sent: false,
            failed: false,
        };
        poll_fn(|cx| s.poll_handshake(cx)).await?;
        Ok(s)
    }

    /// The negotiated TLS version's name (`TLSv1_3`).
    pub fn tls_version(&self) -> Option<&'static str> {
        self.conn.protocol_version().and_then(|v| v.as_str())
    }

    /// The negotiated cipher suite's IANA name.
    pub fn tls_cipher(&self) -> Option<&'static str> {
        self.conn
            .negotiated_cipher_suite()
            .and_then(|c| c.suite().as_str())
    }

    /// Bytes of heap this stream holds in its own buffers (rustls's state aside):
    /// zero while the session is idle.
    pub fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.plain.capacity() + self.outgoing.capacity()
    }

    /// Encoded bytes not yet taken by the socket.
    fn unsent(&self) -> usize {
        self.out_end.saturating_sub(self.out_pos)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            // The server's flight goes out before it waits for the client's answer.
            ready!(self.poll_send(cx, Drained::Free))?;
            let pumped = match self.pump(None, None, false) {
                Ok(p) => p,
                Err(e) => return Poll::Ready(Err(self.fail(cx, e))),
            };
            if pumped.traffic {
                if self.unsent() == 0 {
                    return Poll::Ready(Ok(()));
                }
                // Session tickets, sent right after the handshake.
                continue;
            }
            if self.unsent() > 0 {
                continue;
            }
            if self.tcp_eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed during the TLS handshake",
                )));
            }
            ready!(self.poll_fill(cx))?;
        }
    }

    /// Best effort to send the alert rustls queued for a fatal error, then `e`.
    fn fail(&mut self, cx: &mut Context<'_>, e: io::Error) -> io::Error {
        if std::mem::replace(&mut self.failed, true) {
            return e;
        }
        // rustls keeps the alert in its queue and hands it out on the next call, before
        // it looks at the input again. Only that one call: a second would process the
        // bad bytes again (and, in debug builds, trip rustls's assertion that one fatal
        // alert is sent at most). The unprocessed bytes are passed as rustls expects
        // them (it indexes into them).
        let unprocessed = self.incoming.get_mut(self.start..).unwrap_or_default();
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(unprocessed);
        if let Ok(ConnectionState::EncodeTlsData(mut enc)) = state
            && append_encoded(&mut self.outgoing, &mut self.out_end, 64, |b| {
                enc.encode(b).map_err(encode_error)
            })
            .is_ok()
        {
            let _ = self.poll_send(cx, Drained::Free);
        }
        self.incoming = Vec::new();
        self.start = 0;
        e
    }

    /// Runs rustls's state machine over the unprocessed input until it needs more bytes
    /// from the socket (or, with `read`, until `read` is full). Decrypted bytes go to
    /// `read`, the rest to `plain`; encoded records are appended to `outgoing`. Once the
    /// handshake is done, `write` (up to [`MAX_WRITE`] bytes) is encrypted, and with
    /// `close` a close_notify is queued.
    fn pump(
        &mut self,
        mut read: Option<&mut ReadBuf<'_>>,
        write: Option<&[u8]>,
        close: bool,
    ) -> io::Result<Pumped> {
        if self.failed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS connection failed earlier",
            ));
        }
        let mut pumped = Pumped::default();
        loop {
            let unprocessed = self.incoming.get_mut(self.start..).unwrap_or_default();
            let UnbufferedStatus { discard, state } = self.conn.process_tls_records(unprocessed);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    // rustls remembers how far it got into this buffer; the next call
                    // (for the alert, in `fail`) must see the same bytes.
                    self.start += discard;
                    return Err(tls_error(e));
                }
            };
            let mut stop = false;
            match state {
                ConnectionState::EncodeTlsData(mut enc) => {
                    append_encoded(&mut self.outgoing, &mut self.out_end, 1024, |b| {
                        enc.encode(b).map_err(encode_error)
                    })?;
                }
                // The encoded bytes wait in `outgoing`, in order, and are sent before
                // anything encoded later.
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::BlockedHandshake => stop = true,
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let payload = record.map_err(tls_error)?.payload;
                        let mut rest = payload;
                        if let Some(buf) = read.as_deref_mut()
                            && self.plain.is_empty()
                        {
                            let n = rest.len().min(buf.remaining());
                            let (now, later) = rest.split_at(n);
                            buf.put_slice(now);
                            rest = later;
                        }
                        self.plain.extend_from_slice(rest);
                    }
                    stop = read.as_deref().is_some_and(|b| b.remaining() == 0);
                }
                ConnectionState::WriteTraffic(mut traffic) => {
                    if let Some(data) = write.filter(|d| !d.is_empty() && pumped.written == 0) {
                        let data = data.get(..data.len().min(MAX_WRITE)).unwrap_or(data);
                        let records = data.len() / (16 * 1024) + 1;
                        let guess = data.len() + 64 * records;
                        append_encoded(&mut self.outgoing, &mut self.out_end, guess, |b| {
                            traffic.encrypt(data, b).map_err(encrypt_error)
                        })?;
                        pumped.written = data.len();
                    }
                    if close && !self.close_sent {
                        append_encoded(&mut self.outgoing, &mut self.out_end, 64, |b| {
                            traffic.queue_close_notify(b).map_err(encrypt_error)
                        })?;
                        self.close_sent = true;
                    }
                    pumped.traffic = true;
                    stop = true;
                }
                ConnectionState::PeerClosed => self.peer_closed = true,
                ConnectionState::Closed => {
                    self.peer_closed = true;
                    pumped.traffic = true;
                    stop = true;
                }
                // Early data is off in the configuration (rustls's default); any other
                // state is one this code does not know how to handle safely.
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "unexpected TLS connection state",
                    ));
                }
            }
            self.start += discard;
            if self.start >= self.incoming.len() {
                // Everything processed: keep the allocation while bytes keep coming; it
                // is freed when the socket runs dry (`poll_fill`).
                self.incoming.clear();
                self.start = 0;
            }
            if stop {
                return Ok(pumped);
            }
        }
    }

    /// Reads more TLS bytes from the socket into `incoming`. Ready(Ok) when bytes came
    /// or the socket ended (`tcp_eof`).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.start > 0 {
            self.incoming.drain(..self.start);
            self.start = 0;
        }
        let room = MAX_INCOMING.saturating_sub(self.incoming.len());
        if room == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS record too large",
            )));
        }
        loop {
            // Readiness first, the buffer after: an idle session allocates nothing
            // while it waits.
            ready!(self.tcp.poll_read_ready(cx))?;
            self.incoming.reserve_exact(room.min(MAX_RECORD));
            // `try_read_buf` reads into the spare capacity, which the reservations keep
            // within MAX_INCOMING; past it the next call refuses the peer.
            match self.tcp.try_read_buf(&mut self.incoming) {
                Ok(0) => {
                    self.tcp_eof = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(_) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.incoming.is_empty() {
                        self.incoming = Vec::new();
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Sends `outgoing` until it is empty or the socket is full; once empty, the buffer
    /// is freed or kept as `drained` says.
    fn poll_send(&mut self, cx: &mut Context<'_>, drained: Drained) -> Poll<io::Result<()>> {
        while let Some(rest) = self
            .outgoing
            .get(self.out_pos..self.out_end)
            .filter(|r| !r.is_empty())
        {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.out_pos = 0;
        self.out_end = 0;
        if drained == Drained::Free {
            self.outgoing = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Hands out plaintext kept from an earlier record; frees the buffer once drained.
    fn take_plain(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let Some(rest) = self.plain.get(self.plain_pos..).filter(|r| !r.is_empty()) else {
            return false;
        };
        let n = rest.len().min(buf.remaining());
        buf.put_slice(rest.get(..n).unwrap_or_default());
        self.plain_pos += n;
        if self.plain_pos >= self.plain.len() {
            self.plain = Vec::new();
            self.plain_pos = 0;
        }
        true
    }
}

impl AsyncRead for LeanTlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.take_plain(buf) {
                return Poll::Ready(Ok(()));
            }
            // What rustls asked to send (tickets, a KeyUpdate) goes out even while the
            // caller only reads; only a large backlog stops the reading.
            // The buffer is kept: a relay polls this read on every wake-up of a
            // download, between the writes that reuse it. A flush frees it.
            match this.poll_send(cx, Drained::Keep) {
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if this.unsent() > MAX_BACKLOG => {
                    return Poll::Pending;
                }
                _ => {}
            }
            if this.peer_closed {
                // Nothing after the close_notify is read.
                this.incoming = Vec::new();
                this.start = 0;
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            if let Err(e) = this.pump(Some(buf), None, false) {
                return Poll::Ready(Err(this.fail(cx, e)));
            }
            if this.unsent() > 0 {
                // Registers the writer's wake-up should the socket be full; the next
                // read sends the rest.
                if let Poll::Ready(Err(e)) = this.poll_send(cx, Drained::Keep) {
                    return Poll::Ready(Err(e));
                }
            }
            if buf.filled().len() > before || this.plain.len() > this.plain_pos {
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                continue;
            }
            if this.tcp_eof {
                this.incoming = Vec::new();
                this.start = 0;
                // Many clients just drop the connection; the relay treats this kind
                // as an ordinary end of stream, as with tokio-rustls.
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
            ready!(this.poll_fill(cx))?;
        }
    }
}

impl AsyncWrite for LeanTlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // New bytes are taken only once the kernel has all the earlier records. The
        // buffer is kept for the next write; a flush frees it (the relay flushes
        // whenever its source has nothing more for now).
        ready!(this.poll_send(cx, Drained::Keep))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let pumped = match this.pump(None, Some(buf), false) {
            Ok(p) => p,
            Err(e) => return Poll::Ready(Err(this.fail(cx, e))),
        };
        if pumped.written == 0 {
            return Poll::Ready(Err(io::Error::other("TLS connection cannot send")));
        }
        // Start sending now; what the socket cannot take waits for the next call.
        if let Poll::Ready(Err(e)) = this.poll_send(cx, Drained::Keep) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(pumped.written))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx, Drained::Free))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            if let Err(e) = this.pump(None, None, true) {
                return Poll::Ready(Err(this.fail(cx, e)));
            }
            this.close_sent = true;
        }
        ready!(this.poll_send(cx, Drained::Free))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsConnector;
    use tokio_rustls::client::TlsStream;

    struct Certs {
        server: Arc<ServerConfig>,
        roots: rustls::RootCertStore,
    }

    fn certs() -> Certs {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.cert.pem()).unwrap();
        std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
        let server = crate::relay::tls::server_config(&c, &k).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        Certs { server, roots }
    }

    fn client_config(
        roots: &rustls::RootCertStore,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        Arc::new(config)
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    /// A rustls client and the lean server over loopback, handshake done.
    async fn tls_pair(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (TlsStream<TcpStream>, LeanTlsStream) {
        let certs = certs();
        let (client, server) = tcp_pair().await;
        let connector = TlsConnector::from(client_config(&certs.roots, version));
        let name = ServerName::try_from("localhost").unwrap();
        let (c, s) = tokio::join!(
            connector.connect(name, client),
            LeanTlsStream::accept(server, certs.server)
        );
        (c.unwrap(), s.unwrap())
    }

    const VERSIONS: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS12, &rustls::version::TLS13];

    #[tokio::test]
    async fn handshakes_with_tls12_and_tls13() {
        for (version, name) in VERSIONS.into_iter().zip(["TLSv1_2", "TLSv1_3"]) {
            let (client, server) = tls_pair(version).await;
            assert_eq!(server.tls_version(), Some(name));
            assert_eq!(
                server.tls_cipher(),
                client
                    .get_ref()
                    .1
                    .negotiated_cipher_suite()
                    .and_then(|c| c.suite().as_str())
            );
            assert!(server.tls_cipher().is_some());
        }
    }

    /// Session tickets (TLS 1.3) and the session ID cache (TLS 1.2) work: the tickets
    /// rustls queues after the handshake reach a client although the server never
    /// writes application data, and a second connection resumes.
    #[tokio::test]
    async fn tickets_reach_the_client_and_sessions_resume() {
        for version in VERSIONS {
            let certs = certs();
            let config = client_config(&certs.roots, version);
            for (round, expected) in [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed]
                .into_iter()
                .enumerate()
            {
                let (client, server) = tcp_pair().await;
                let connector = TlsConnector::from(Arc::clone(&config));
                let name = ServerName::try_from("localhost").unwrap();
                let (c, s) = tokio::join!(
                    connector.connect(name, client),
                    LeanTlsStream::accept(server, Arc::clone(&certs.server))
                );
                let (mut client, mut server) = (c.unwrap(), s.unwrap());
                assert_eq!(
                    client.get_ref().1.handshake_kind(),
                    Some(expected),
                    "{version:?} round {round}"
                );
                client.write_all(b"ping").await.unwrap();
                client.shutdown().await.unwrap();
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.unwrap();
                assert_eq!(got, b"ping");
                server.shutdown().await.unwrap();
                // Reading to the close_notify processes the tickets sent before it.
                client.read_to_end(&mut Vec::new()).await.unwrap();
            }
        }
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// The server echoes everything with reads and writes of `chunk` bytes until the
    /// client's close_notify, then closes with its own; the client must get back
    /// exactly what it sent and a clean end (tokio-rustls reports a close without
    /// close_notify as an error).
    async fn echo(version: &'static rustls::SupportedProtocolVersion, size: usize, chunk: usize) {
        let (client, mut server) = tls_pair(version).await;
        let echo = tokio::spawn(async move {
            let mut buf = vec![0u8; chunk];
            let mut total = 0;
            loop {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                total += n;
                for piece in buf[..n].chunks(chunk) {
                    server.write_all(piece).await.unwrap();
                }
            }
            server.shutdown().await.unwrap();
            (total, server)
        });
        let data = pattern(size);
        let (mut rd, mut wr) = tokio::io::split(client);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(chunk.max(1)) {
                wr.write_all(piece).await.unwrap();
                if chunk == 1 {
                    wr.flush().await.unwrap();
                }
            }
            wr.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        rd.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        let (total, server) = echo.await.unwrap();
        assert_eq!(total, size);
        assert_eq!(back.len(), data.len());
        assert!(back == data, "echoed bytes differ");
        assert_eq!(server.buffered_capacity(), 0);
    }

    #[tokio::test]
    async fn echoes_every_size_both_versions() {
        for version in VERSIONS {
            for size in [0, 1, 2, 100, 4095, 16383, 16384, 16385, 50_000, 100_000] {
                echo(version, size, 64 * 1024).await;
            }
            for size in [1, 17, 3000] {
                echo(version, size, 1).await;
            }
            // Reads smaller than a record: the rest waits as plaintext.
            echo(version, 100_000, 1000).await;
        }
    }

    #[tokio::test]
    async fn survives_client_key_updates() {
        let (mut client, mut server) = tls_pair(&rustls::version::TLS13).await;
        for round in 0..5u8 {
            client.get_mut().1.refresh_traffic_keys().unwrap();
            let msg = vec![round; 20_000];
            client.write_all(&msg).await.unwrap();
            let mut got = vec![0u8; msg.len()];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, msg);
            // The server must have switched its read keys on the client's KeyUpdate
            // (the data after it would not decrypt otherwise). Its answer goes out
            // behind its own KeyUpdate (RFC 8446 §4.6.3; rustls sends it before the
            // next record), which the client must accept for this read to succeed.
            server.write_all(&got).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(back, msg);
        }
    }

    #[tokio::test]
    async fn client_close_notify_is_end_of_stream_and_a_bare_close_is_not() {
        for version in VERSIONS {
            let (mut client, mut server) = tls_pair(version).await;
            client.write_all(b"last words").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"last words");
            // Half-close: the server may still answer after the client's close_notify.
            server.write_all(b"goodbye").await.unwrap();
            server.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"goodbye");

            let (mut client, mut server) = tls_pair(version).await;
            // Read what the server sent (with TLS 1.3 the session tickets come after
            // the handshake), so that the close is a FIN, not a reset.
            server.write_all(b"x").await.unwrap();
            let mut x = [0u8; 1];
            client.read_exact(&mut x).await.unwrap();
            let tcp = client.into_inner().0;
            drop(tcp);
            let e = server.read_to_end(&mut Vec::new()).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        }
    }

    /// A buffered rustls client driven by hand over a std socket, so that every TLS
    /// byte can be sent in a segment of its own (TCP_NODELAY) and the server sees
    /// partial records, and several records can be sent in one write.
    struct ManualClient {
        conn: rustls::ClientConnection,
        tcp: std::net::TcpStream,
    }

    impl ManualClient {
        fn send(&mut self, byte_at_a_time: bool) {
            let mut out = Vec::new();
            while self.conn.wants_write() {
                self.conn.write_tls(&mut out).unwrap();
            }
            if byte_at_a_time {
                for b in &out {
                    self.tcp.write_all(std::slice::from_ref(b)).unwrap();
                }
            } else {
                self.tcp.write_all(&out).unwrap();
            }
        }

        fn handshake(&mut self) {
            while self.conn.is_handshaking() {
                self.send(true);
                if self.conn.is_handshaking() && self.conn.wants_read() {
                    self.receive();
                }
            }
            self.send(true);
        }

        fn receive(&mut self) {
            self.conn.read_tls(&mut self.tcp).unwrap();
            self.conn.process_new_packets().unwrap();
        }

        fn read_exact(&mut self, n: usize) -> Vec<u8> {
            let mut got = vec![0u8; n];
            let mut filled = 0;
            while filled < n {
                match self.conn.reader().read(&mut got[filled..]) {
                    Ok(k) => filled += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.receive(),
                    Err(e) => panic!("{e}"),
                }
            }
            got
        }
    }

    async fn manual_pair(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (
        ManualClient,
        tokio::task::JoinHandle<io::Result<LeanTlsStream>>,
    ) {
        let certs = certs();
        let (client, server) = tcp_pair().await;
        let server = tokio::spawn(LeanTlsStream::accept(server, certs.server));
        let tcp = client.into_std().unwrap();
        tcp.set_nonblocking(false).unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let conn =
            rustls::ClientConnection::new(client_config(&certs.roots, version), name).unwrap();
        (ManualClient { conn, tcp }, server)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partial_records_and_several_records_per_read() {
        for version in VERSIONS {
            let (mut client, server) = manual_pair(version).await;
            let mut client = tokio::task::spawn_blocking(move || {
                client.handshake();
                client
            })
            .await
            .unwrap();
            let mut server = server.await.unwrap().unwrap();
            let data = pattern(40_000);
            let sent = data.clone();
            let client = tokio::task::spawn_blocking(move || {
                // Records cut into single bytes.
                client.conn.writer().write_all(&sent[..20_000]).unwrap();
                client.send(true);
                // Many small records in one write.
                for piece in sent[20_000..].chunks(100) {
                    client.conn.writer().write_all(piece).unwrap();
                }
                client.send(false);
                let back = client.read_exact(sent.len());
                (client, back)
            });
            let mut got = vec![0u8; data.len()];
            server.read_exact(&mut got).await.unwrap();
            assert!(got == data, "received bytes differ");
            server.write_all(&got).await.unwrap();
            let (_client, back) = client.await.unwrap();
            assert!(back == data, "echoed bytes differ");
        }
    }

    /// Deterministic junk: a ClientHello that is not one must fail the handshake with an
    /// error, never a panic or a hang.
    #[tokio::test]
    async fn garbage_instead_of_a_client_hello_is_an_error() {
        let certs = certs();
        let mut cases: Vec<Vec<u8>> = vec![
            b"a1 LOGIN user secret\r\n".to_vec(),
            // A handshake record header announcing more than a record may hold.
            vec![0x16, 0x03, 0x01, 0xff, 0xff, 0x01],
            // A ClientHello header with nonsense inside.
            [
                &[0x16, 0x03, 0x01, 0x00, 0x30, 0x01, 0x00, 0x00, 0x2c][..],
                &[0xaa; 0x2c],
            ]
            .concat(),
            // Truncated: the connection ends mid-record.
            vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01],
        ];
        let mut x: u32 = 0x2545_f491;
        for len in [1usize, 5, 6, 40, 300, 5000] {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            cases.push([&[0x16, 0x03, 0x03][..], &junk].concat());
            cases.push(junk);
        }
        for junk in cases {
            let (mut client, server) = tcp_pair().await;
            let accept = tokio::spawn(LeanTlsStream::accept(server, Arc::clone(&certs.server)));
            client.write_all(&junk).await.unwrap();
            client.shutdown().await.unwrap();
            let result = tokio::time::timeout(Duration::from_secs(30), accept)
                .await
                .expect("handshake neither failed nor finished")
                .expect("accept panicked");
            assert!(result.is_err(), "junk {junk:02x?} was accepted");
            // rustls's alert for what it refused is sent before the connection ends.
            let mut answer = Vec::new();
            let _ = client.read_to_end(&mut answer).await;
            if junk.starts_with(b"a1 LOGIN") {
                assert_eq!(
                    answer.first(),
                    Some(&0x15),
                    "no alert record: {answer:02x?}"
                );
            }
        }
    }

    /// Junk after the handshake, in place of records or inside one: the read fails,
    /// and every later call fails too without asking rustls again (it must not process
    /// bad bytes twice) and without panicking.
    #[tokio::test]
    async fn junk_after_the_handshake_is_an_error_every_time() {
        let junk: [&[u8]; 3] = [
            b"a2 LOGOUT\r\n",
            // An application-data record whose contents are not a valid encryption.
            &[
                0x17, 0x03, 0x03, 0x00, 0x20, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55,
                0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55,
                0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55,
            ],
            // A record type TLS does not have.
            &[0x42, 0x03, 0x03, 0x00, 0x01, 0x00],
        ];
        for version in VERSIONS {
            for bytes in junk {
                let (mut client, mut server) = tls_pair(version).await;
                client.get_mut().0.write_all(bytes).await.unwrap();
                let mut buf = [0u8; 64];
                assert!(
                    server.read(&mut buf).await.is_err(),
                    "{bytes:02x?} was read"
                );
                assert!(server.read(&mut buf).await.is_err());
                assert!(server.write_all(b"* BYE\r\n").await.is_err());
                let _ = server.shutdown().await;
                assert_eq!(server.buffered_capacity(), 0);
            }
        }
    }

    #[tokio::test]
    async fn an_oversized_record_is_refused() {
        let certs = certs();
        let (mut client, server) = tcp_pair().await;
        let accept = tokio::spawn(LeanTlsStream::accept(server, certs.server));
        // Valid-looking handshake records, never completing a message, past the bound.
        let mut junk = Vec::new();
        while junk.len() < 4 * MAX_INCOMING {
            junk.extend_from_slice(&[0x16, 0x03, 0x01, 0x40, 0x00]);
            junk.extend_from_slice(&[0x01, 0xff, 0xff, 0xff]);
            junk.resize(junk.len() + 0x4000 - 4, 0);
        }
        let _ = client.write_all(&junk).await;
        assert!(accept.await.unwrap().is_err());
    }

    /// After traffic, once the relay waits for the next byte, the stream holds no
    /// buffer at all: what an idle TLS session costs is rustls's connection state only.
    #[tokio::test]
    async fn an_idle_relayed_stream_holds_no_buffer() {
        use crate::relay::stream::ClientStream;
        for version in VERSIONS {
            let (mut client, server) = tls_pair(version).await;
            let mut server = ClientStream::Tls(Box::new(server));
            let (mut backend, mut proxy_backend) = tokio::io::duplex(64 * 1024);
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let relay = tokio::spawn(async move {
                let stats = crate::relay::relay(
                    &mut server,
                    &mut proxy_backend,
                    Duration::from_secs(3600),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
                (stats, server)
            });
            let up = pattern(70_000);
            client.write_all(&up).await.unwrap();
            let mut got = vec![0u8; up.len()];
            backend.read_exact(&mut got).await.unwrap();
            assert!(got == up);
            backend.write_all(&up).await.unwrap();
            let mut back = vec![0u8; up.len()];
            client.read_exact(&mut back).await.unwrap();
            assert!(back == up);
            // All bytes are through; the relay is waiting on both sides.
            stop.send(()).unwrap();
            let (stats, server) = relay.await.unwrap();
            assert_eq!(stats.client_to_backend, up.len() as u64);
            let ClientStream::Tls(server) = server else {
                panic!("not TLS")
            };
            assert_eq!(server.buffered_capacity(), 0);
            // The stream itself, boxed in ClientStream: 1 232 bytes with rustls
            // 0.23.46, nearly all of it rustls's connection core held inline.
            assert!(
                size_of::<LeanTlsStream>() <= 1280,
                "LeanTlsStream grew to {} bytes",
                size_of::<LeanTlsStream>()
            );
        }
    }
}
