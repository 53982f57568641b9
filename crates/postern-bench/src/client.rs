//! The client side of a benchmark session: a connection (plaintext or TLS) with a line
//! reader, and the IMAP and POP3 dialogues the load generators run.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::target::{Target, TlsMode};

/// A client connection, plaintext or TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while a handshake holds the TCP stream, or after it failed.
    Gone,
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "connection lost in a TLS handshake",
    )
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }
}

/// Longest server line accepted; real responses during these dialogues are < 1 KiB.
const MAX_LINE: usize = 16 * 1024;

/// A connection with a read buffer for line-oriented dialogue.
pub(crate) struct Conn {
    stream: Stream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Conn {
    /// Connects to the target; with implicit TLS, also does the handshake.
    pub(crate) async fn connect(target: &Target, buf_size: usize) -> Result<Self> {
        let tcp = TcpStream::connect(target.args.addr)
            .await
            .with_context(|| format!("connect {}", target.args.addr))?;
        tcp.set_nodelay(true).context("TCP_NODELAY")?;
        let mut conn = Self {
            stream: Stream::Plain(tcp),
            buf: vec![0; buf_size.max(MAX_LINE)].into_boxed_slice(),
            start: 0,
            end: 0,
        };
        if target.args.tls == TlsMode::Implicit {
            conn.upgrade(target).await?;
        }
        Ok(conn)
    }

    /// TLS handshake on the plaintext connection (implicit TLS, or after STARTTLS).
    pub(crate) async fn upgrade(&mut self, target: &Target) -> Result<()> {
        ensure!(
            self.start == self.end,
            "server sent bytes before the TLS handshake"
        );
        let (connector, name) = target
            .tls
            .as_ref()
            .ok_or_else(|| anyhow!("no TLS configuration"))?;
        // The handshake consumes the TCP stream by value.
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            bail!("TLS is already on");
        };
        let tls = connector
            .connect(name.clone(), tcp)
            .await
            .context("TLS handshake")?;
        self.stream = Stream::Tls(Box::new(tls));
        Ok(())
    }

    /// Sends bytes and flushes them (TLS records go out on flush).
    pub(crate) async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await.context("write")?;
        self.stream.flush().await.context("flush")?;
        Ok(())
    }

    async fn fill(&mut self) -> Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let Some(free) = self.buf.get_mut(self.end..).filter(|f| !f.is_empty()) else {
            bail!("server line longer than {} bytes", self.buf.len());
        };
        let n = self.stream.read(free).await.context("read")?;
        if n == 0 {
            bail!("connection closed by the server");
        }
        self.end += n;
        Ok(())
    }

    /// Next line, CRLF included.
    pub(crate) async fn read_line(&mut self) -> Result<String> {
        loop {
            let pending = self.buf.get(self.start..self.end).unwrap_or_default();
            if let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                let line =
                    String::from_utf8_lossy(pending.get(..=pos).unwrap_or_default()).into_owned();
                self.start += pos + 1;
                return Ok(line);
            }
            self.fill().await?;
        }
    }

    /// Reads and drops exactly `n` bytes (a literal), straight from the socket into the
    /// buffer without line scanning.
    pub(crate) async fn discard(&mut self, mut n: u64) -> Result<()> {
        while n > 0 {
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
                let want = usize::try_from(n).unwrap_or(usize::MAX).min(self.buf.len());
                let Some(free) = self.buf.get_mut(..want) else {
                    bail!("buffer");
                };
                let got = self.stream.read(free).await.context("read")?;
                if got == 0 {
                    bail!("connection closed inside a literal");
                }
                n -= got as u64;
                continue;
            }
            let take = usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(self.end - self.start);
            self.start += take;
            n -= take as u64;
        }
        Ok(())
    }

    /// Waits (boundedly, by the caller's timeout) for the server to close, so the
    /// session's teardown is part of the run that caused it.
    pub(crate) async fn wait_close(mut self) {
        let mut scratch = [0u8; 512];
        while let Ok(n) = self.stream.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    }
}

/// `{123}` or `{123+}` at the end of a line (before CRLF): the literal that follows.
pub(crate) fn literal_len(line: &str) -> Option<u64> {
    let body = line.trim_end_matches(['\r', '\n']);
    let inner = body.strip_suffix('}')?;
    let open = inner.rfind('{')?;
    let digits = inner.get(open + 1..)?.trim_end_matches('+');
    digits.parse().ok()
}

/// Reads responses until the one tagged `tag`; fails unless it is `OK`. Literals in
/// untagged responses are skipped.
pub(crate) async fn imap_wait(conn: &mut Conn, tag: &str) -> Result<()> {
    loop {
        let line = conn.read_line().await?;
        if let Some(n) = literal_len(&line) {
            conn.discard(n).await?;
            continue;
        }
        if let Some(rest) = line.strip_prefix(tag).and_then(|r| r.strip_prefix(' ')) {
            if rest.starts_with("OK") {
                return Ok(());
            }
            bail!("{tag}: {}", line.trim_end());
        }
    }
}

/// Sends `tag command` and waits for its tagged OK.
pub(crate) async fn imap_command(conn: &mut Conn, tag: &str, command: &str) -> Result<()> {
    conn.send(format!("{tag} {command}\r\n").as_bytes()).await?;
    imap_wait(conn, tag).await
}

/// Reads the greeting; fails unless it is `* OK`.
pub(crate) async fn imap_greeting(conn: &mut Conn) -> Result<()> {
    let line = conn.read_line().await?;
    ensure!(line.starts_with("* OK"), "greeting: {}", line.trim_end());
    Ok(())
}

/// Connect, greeting, STARTTLS if asked, LOGIN: a logged-in IMAP connection.
pub(crate) async fn imap_login(target: &Target, n: u64, buf_size: usize) -> Result<Conn> {
    let mut conn = Conn::connect(target, buf_size).await?;
    imap_greeting(&mut conn).await?;
    if target.args.tls == TlsMode::Starttls {
        imap_command(&mut conn, "s", "STARTTLS").await?;
        conn.upgrade(target).await?;
    }
    let login = format!(
        "LOGIN {} {}",
        quoted(&target.user(n)),
        quoted(&target.args.password)
    );
    imap_command(&mut conn, "a", &login).await?;
    Ok(conn)
}

/// An IMAP quoted string (the bench's names and passwords are plain ASCII).
fn quoted(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// Reads one POP3 status line; fails unless it is `+OK`.
pub(crate) async fn pop3_ok(conn: &mut Conn) -> Result<()> {
    let line = conn.read_line().await?;
    ensure!(line.starts_with("+OK"), "POP3: {}", line.trim_end());
    Ok(())
}

/// Sends a POP3 command and reads its `+OK`.
pub(crate) async fn pop3_command(conn: &mut Conn, command: &str) -> Result<()> {
    conn.send(format!("{command}\r\n").as_bytes()).await?;
    pop3_ok(conn).await
}

/// Connect, greeting, STLS if asked: a POP3 connection ready for USER.
pub(crate) async fn pop3_open(target: &Target) -> Result<Conn> {
    let mut conn = Conn::connect(target, 0).await?;
    pop3_ok(&mut conn).await?;
    if target.args.tls == TlsMode::Starttls {
        pop3_command(&mut conn, "STLS").await?;
        conn.upgrade(target).await?;
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_lengths() {
        assert_eq!(
            literal_len("* 1 FETCH (BODY[] {20000000}\r\n"),
            Some(20_000_000)
        );
        assert_eq!(literal_len("a LOGIN {4+}\r\n"), Some(4));
        assert_eq!(literal_len("* OK done\r\n"), None);
        assert_eq!(literal_len("* OK {x}\r\n"), None);
    }

    #[test]
    fn quoting() {
        assert_eq!(quoted("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
