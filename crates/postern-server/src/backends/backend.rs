//! Connecting to a backend: TCP, the PROXY protocol header when the backend wants one,
//! TLS (implicit, or STARTTLS when the login machine asks for it), then the protocol's
//! login machine.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use postern_proto::{BackendMachine, BackendStep, ClientInfo};
use proxy_header::{ProxiedAddress, ProxyHeader, SslInfo, Tlv};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::settings::{BackendTls, Endpoint, ProxyProtocol, TlsClient};

/// Bytes read from a backend per read during the login phase.
const READ_CHUNK: usize = 4096;

/// A backend connection, plaintext or TLS.
#[derive(Debug)]
pub enum BackendStream {
    /// Plaintext TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
}

impl BackendStream {
    async fn upgrade(self, tls: &TlsClient) -> io::Result<Self> {
        match self {
            BackendStream::Plain(tcp) => {
                let connector = TlsConnector::from(Arc::clone(&tls.config));
                let s = connector.connect(tls.name.clone(), tcp).await?;
                Ok(BackendStream::Tls(Box::new(s)))
            }
            BackendStream::Tls(_) => Err(io::Error::other("TLS is already active")),
        }
    }
}

/// Why a backend could not be reached or logged in to; the session logs it and
/// answers the client with a temporary failure.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// TCP connect failed or timed out.
    #[error("connect: {0}")]
    Connect(io::Error),
    /// The TLS handshake failed (certificate, name, protocol).
    #[error("TLS: {0}")]
    Tls(io::Error),
    /// The login conversation failed or timed out.
    #[error("login: {0}")]
    Login(io::Error),
}

impl BackendError {
    /// Whether this says the backend is unreachable (counts against its health),
    /// as opposed to a failure of this one conversation.
    pub fn is_connect(&self) -> bool {
        matches!(self, BackendError::Connect(_))
    }

    /// Whether the backend did not answer in time (slow, or frozen) or is not there.
    pub fn kind(&self) -> crate::backends::service_health::FailureKind {
        let (BackendError::Connect(e) | BackendError::Tls(e) | BackendError::Login(e)) = self;
        if e.kind() == io::ErrorKind::TimedOut {
            crate::backends::service_health::FailureKind::Timeout
        } else {
            crate::backends::service_health::FailureKind::Hard
        }
    }
}

/// What the client side knows that a PROXY v2 header can carry.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// The negotiated version (`TLSv1_3`), when the client connection is TLS.
    pub version: Option<&'static str>,
    /// The negotiated cipher suite (IANA name), when the client connection is TLS.
    pub cipher: Option<&'static str>,
}

/// Connects to `host:endpoint.port`, sends the PROXY header and runs implicit TLS as
/// configured.
pub async fn connect(
    host: &str,
    endpoint: &Endpoint,
    tls: Option<&TlsClient>,
    client: &ClientInfo,
    client_tls: &ClientTls,
    connect_timeout: Duration,
) -> Result<BackendStream, BackendError> {
    let mut tcp = timeout(connect_timeout, TcpStream::connect((host, endpoint.port)))
        .await
        .map_err(|_| BackendError::Connect(io::ErrorKind::TimedOut.into()))?
        .map_err(BackendError::Connect)?;
    let _ = tcp.set_nodelay(true);
    if endpoint.proxy_protocol != ProxyProtocol::None {
        let header = proxy_header(endpoint.proxy_protocol, client, client_tls)
            .map_err(|e| BackendError::Connect(io::Error::other(e.to_string())))?;
        tcp.write_all(&header)
            .await
            .map_err(BackendError::Connect)?;
    }
    let stream = BackendStream::Plain(tcp);
    if endpoint.tls == BackendTls::Implicit {
        let tls = tls.ok_or_else(|| BackendError::Tls(io::Error::other("no TLS settings")))?;
        return timeout(connect_timeout, stream.upgrade(tls))
            .await
            .map_err(|_| BackendError::Tls(io::ErrorKind::TimedOut.into()))?
            .map_err(BackendError::Tls);
    }
    Ok(stream)
}

/// The PROXY header announcing the client: the real client address, the address it
/// connected to, and (v2) whether it came over TLS and which version.
fn proxy_header(
    version: ProxyProtocol,
    client: &ClientInfo,
    client_tls: &ClientTls,
) -> Result<Vec<u8>, proxy_header::Error> {
    let (src, dst) = same_family(client.client, client.local);
    let addr = ProxiedAddress::stream(src, dst);
    let mut out = Vec::with_capacity(64);
    match version {
        ProxyProtocol::None => {}
        ProxyProtocol::V1 => ProxyHeader::with_address(addr).encode_v1(&mut out)?,
        ProxyProtocol::V2 => {
            let mut tlvs = Vec::new();
            if let Some(v) = client_tls.version {
                let mut ssl = SslInfo::new(true, false, false, 0);
                ssl.append_tlv(Tlv::SslVersion(v.into()));
                tlvs.push(Tlv::Ssl(ssl));
            }
            ProxyHeader::with_tlvs(Some(addr), tlvs).encode_v2(&mut out)?;
        }
    }
    Ok(out)
}

/// PROXY headers carry one address family; a dual-stack listener reports IPv4 clients
/// as v4-mapped IPv6, which is put back to IPv4 where both sides allow it.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (s, d) = (canon(src), canon(dst));
    if s.is_ipv4() == d.is_ipv4() {
        return (s, d);
    }
    let v6 = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    };
    (v6(s), v6(d))
}

/// Runs a backend machine (a login, a health check) on `stream` until it is done,
/// upgrading to TLS when the machine asks: the one driver of every backend-facing
/// conversation.
pub async fn drive<M: BackendMachine + ?Sized>(
    machine: &mut M,
    mut stream: BackendStream,
    tls: Option<&TlsClient>,
) -> Result<(M::Outcome, BackendStream), BackendError> {
    let mut out = Vec::new();
    // On the heap and never zeroed (`read_buf` fills spare capacity): an array here
    // would make every future that awaits a login 4 KiB bigger, and each move of it
    // (into a timeout, a select, a box) a 4 KiB copy.
    let mut buf = Vec::with_capacity(READ_CHUNK);
    loop {
        machine.poll_transmit(&mut out);
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(BackendError::Login)?;
            stream.flush().await.map_err(BackendError::Login)?;
            out.clear();
        }
        match machine.poll_step() {
            Some(BackendStep::Done(outcome)) => return Ok((outcome, stream)),
            Some(BackendStep::StartTls) => {
                let tls =
                    tls.ok_or_else(|| BackendError::Tls(io::Error::other("no TLS settings")))?;
                stream = stream.upgrade(tls).await.map_err(BackendError::Tls)?;
                machine.handle_tls_ready();
                continue;
            }
            None => {}
        }
        buf.clear();
        let n = stream
            .read_buf(&mut buf)
            .await
            .map_err(BackendError::Login)?;
        if n == 0 {
            return Err(BackendError::Login(io::ErrorKind::UnexpectedEof.into()));
        }
        machine.handle_input(&buf);
    }
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A TLS client configuration for backends: CA file or the system's roots, and an
/// optional client certificate.
pub fn client_config(
    ca: Option<&std::path::Path>,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<Arc<rustls::ClientConfig>, crate::relay::tls::TlsError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let err = |path: &std::path::Path, reason: String| crate::relay::tls::TlsError::Certificate {
        path: path.display().to_string(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| err(path, e.to_string()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(err(path, "no CA certificate found".into()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| crate::relay::tls::TlsError::Pair {
            cert: String::new(),
            key: String::new(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let (chain, key_der) = crate::relay::tls::load_pair(cert, key)?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                crate::relay::tls::TlsError::Pair {
                    cert: cert.display().to_string(),
                    key: key.display().to_string(),
                    reason: e.to_string(),
                }
            })?
        }
    };
    Ok(Arc::new(config))
}

/// The name a backend certificate must carry (and the SNI sent).
pub fn server_name(name: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(name.to_owned()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(client: &str, local: &str) -> ClientInfo {
        ClientInfo {
            client: client.parse().unwrap(),
            local: local.parse().unwrap(),
            tls: false,
            session_id: "s".into(),
        }
    }

    #[test]
    fn proxy_headers() {
        let i = info("192.0.2.7:40000", "127.0.0.1:143");
        let none = ClientTls {
            version: None,
            cipher: None,
        };
        let v1 = proxy_header(ProxyProtocol::V1, &i, &none).unwrap();
        assert_eq!(v1, b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 143\r\n");
        let tls = ClientTls {
            version: Some("TLSv1_3"),
            cipher: None,
        };
        let v2 = proxy_header(ProxyProtocol::V2, &i, &tls).unwrap();
        let (parsed, len) = ProxyHeader::parse(&v2, Default::default()).unwrap();
        assert_eq!(len, v2.len());
        let addr = parsed.proxied_address().unwrap();
        assert_eq!(addr.source, "192.0.2.7:40000".parse().unwrap());
        let ssl = parsed.ssl().unwrap();
        assert!(ssl.client_ssl());
        assert_eq!(ssl.version(), Some("TLSv1_3"));
        // A v4-mapped client on a v6 listener is announced as IPv4.
        let mapped = info("[::ffff:192.0.2.7]:1", "127.0.0.1:143");
        let v1 = proxy_header(ProxyProtocol::V1, &mapped, &none).unwrap();
        assert!(v1.starts_with(b"PROXY TCP4 192.0.2.7 "));
        let mixed = info("192.0.2.7:1", "[2001:db8::1]:143");
        let v1 = proxy_header(ProxyProtocol::V1, &mixed, &none).unwrap();
        assert!(v1.starts_with(b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 "));
    }
}
