//! The client connection, plaintext or TLS, behind one type so the session driver and
//! the relay need not care which (and a kTLS variant could be added here later).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::relay::lean_tls::LeanTlsStream;

/// A client connection.
#[derive(Debug)]
pub enum ClientStream {
    /// Plaintext TCP.
    Plain(TcpStream),
    /// TLS over TCP, implicit or after STARTTLS, with buffers that are freed while
    /// the session is idle (see [`crate::relay::lean_tls`]).
    Tls(Box<LeanTlsStream>),
}

impl ClientStream {
    /// Runs the server side of a TLS handshake over a plaintext connection. Nothing is
    /// buffered between the plaintext phase and the handshake: the driver reads the
    /// socket directly, so bytes pipelined after STARTTLS reach rustls (and fail the
    /// handshake) instead of being executed.
    pub async fn upgrade(self, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        match self {
            ClientStream::Plain(tcp) => {
                let tls = LeanTlsStream::accept(tcp, config).await?;
                Ok(ClientStream::Tls(Box::new(tls)))
            }
            ClientStream::Tls(_) => Err(io::Error::other("TLS is already active")),
        }
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// The negotiated cipher suite's IANA name (`TLS13_AES_256_GCM_SHA384`).
    pub fn tls_cipher(&self) -> Option<&'static str> {
        match self {
            ClientStream::Plain(_) => None,
            ClientStream::Tls(s) => s.tls_cipher(),
        }
    }

    /// The negotiated TLS version, for logs.
    pub fn tls_version(&self) -> Option<&'static str> {
        match self {
            ClientStream::Plain(_) => None,
            ClientStream::Tls(s) => s.tls_version(),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
