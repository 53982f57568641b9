//! What every listener does with a new connection before its protocol speaks: the
//! PROXY header from a trusted balancer, the per-address connection limit (answered
//! with the protocol's refusal), and implicit TLS, all within the pre-auth deadline.
//! Both session drivers — the login-then-relay one ([`crate::session`]) and the MX /
//! LMTP relay ([`crate::session::smtp_relay`]) — start here, so a rule of the opening (what a
//! PROXY header from an untrusted peer gets, whether a TLS listener answers a refusal)
//! is written once.

use std::net::SocketAddr;
use std::time::Duration;

use postern_proto::Limit;
use postern_proto::proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{Span, debug, field, info, warn};

use crate::ctx::Ctx;
use crate::observability::access_log::Facts;
use crate::relay::stream::ClientStream;
use crate::settings::{ListenerSettings, TlsMode};

/// How long a refusal may take to write: the client gets one chance to read it.
pub(crate) const REFUSAL_WRITE: Duration = Duration::from_secs(2);

/// A connection past the opening, ready for its protocol.
pub(crate) struct Opened {
    pub(crate) stream: ClientStream,
    /// The real client: the PROXY header's source, or the peer.
    pub(crate) client: SocketAddr,
    /// The client address's connection slot, held while the session lasts.
    pub(crate) slot: postern_limits::ConnectionGuard,
    /// The first bytes must be checked for a PROXY header (a listener that takes them,
    /// from a peer it does not trust): see [`untrusted_proxy_header`].
    pub(crate) watch_untrusted_proxy: bool,
}

/// How the opening applies the per-address limits.
pub(crate) enum Limits<F> {
    /// They apply; a refused connection gets these bytes (the protocol's refusal for
    /// the limit and its retry time), unless the listener is implicit TLS.
    Apply(F),
    /// They do not (LMTP comes from the operator's own MTAs).
    Exempt,
}

/// Runs the opening; `Err` is the session's end reason (logged here).
pub(crate) async fn open<F>(
    ctx: &Ctx,
    listener: &ListenerSettings,
    mut tcp: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    limits: Limits<F>,
    facts: &mut Facts,
) -> Result<Opened, &'static str>
where
    F: FnOnce(Limit, Option<Duration>) -> Vec<u8>,
{
    // Only a listener that expects PROXY headers checks for one at all; from an
    // untrusted peer the first bytes are checked instead.
    let trusted_proxy = listener.proxy.as_ref().is_some_and(|p| p.trusts(peer.ip()));
    let client = if trusted_proxy {
        match proxied_client(&mut tcp, peer, deadline, facts).await {
            Some(client) => client,
            None => return Err("proxy_header"),
        }
    } else {
        peer
    };
    // Counted by the real client's address, known only after the PROXY header.
    let slot = match limits {
        Limits::Exempt => postern_limits::ConnectionGuard::unlimited(),
        Limits::Apply(refusal) => {
            match ctx.limiter.connect(client.ip(), std::time::Instant::now()) {
                Ok(slot) => slot,
                Err(limit) => {
                    refuse(ctx, listener, tcp, client, limit, refusal).await;
                    return Err("limited");
                }
            }
        }
    };
    let mut stream = ClientStream::Plain(tcp);
    if listener.tls_mode == TlsMode::Implicit {
        stream = handshake(stream, listener, deadline, facts).await?;
    }
    Ok(Opened {
        stream,
        client,
        slot,
        watch_untrusted_proxy: listener.proxy.is_some() && !trusted_proxy,
    })
}

/// Answers a connection over an abuse-control limit and closes it. An implicit-TLS
/// listener closes without a word: a handshake is exactly the work a flood should not
/// get out of Postern.
async fn refuse<F>(
    ctx: &Ctx,
    listener: &ListenerSettings,
    mut tcp: TcpStream,
    client: SocketAddr,
    limit: Limit,
    refusal: F,
) where
    F: FnOnce(Limit, Option<Duration>) -> Vec<u8>,
{
    crate::observability::metrics::limit_hit(limit);
    let retry_after = ctx
        .limiter
        .retry_after(client.ip(), limit, std::time::Instant::now());
    warn!(
        limit = limit.as_str(),
        retry_after_secs = retry_after.map(|d| d.as_secs()),
        "connection refused by abuse control"
    );
    if listener.tls_mode == TlsMode::Implicit {
        return;
    }
    let out = refusal(limit, retry_after);
    let _ = timeout(REFUSAL_WRITE, async {
        tcp.write_all(&out).await?;
        tcp.shutdown().await
    })
    .await;
}

/// Runs the TLS server handshake (implicit TLS or after STARTTLS) within the pre-auth
/// deadline; `Err` is the session's end reason.
pub(crate) async fn handshake(
    stream: ClientStream,
    listener: &ListenerSettings,
    deadline: Instant,
    facts: &mut Facts,
) -> Result<ClientStream, &'static str> {
    let Some(tls) = listener.tls.clone() else {
        return Err("listener has no certificate");
    };
    match timeout_at(deadline, stream.upgrade(tls)).await {
        Ok(Ok(s)) => {
            debug!(version = s.tls_version(), "TLS established");
            crate::observability::metrics::tls_handshake(Some(
                s.tls_version().unwrap_or("unknown"),
            ));
            facts.tls(s.tls_version());
            Ok(s)
        }
        Ok(Err(e)) => {
            info!(error = %e, "TLS handshake failed");
            crate::observability::metrics::tls_handshake(None);
            Err("tls_error")
        }
        Err(_) => Err("preauth_timeout"),
    }
}

/// On a listener that takes PROXY headers, checks a peer outside `accept_proxy_from`
/// (`*watching`) on its first read only: a header from it would let anyone claim any
/// address, and run as commands it is noise, so the session is refused (logged here).
pub(crate) fn untrusted_proxy_header(watching: &mut bool, first: &[u8]) -> bool {
    if !std::mem::take(watching) || !postern_proto::proxy::looks_like_header(first) {
        return false;
    }
    warn!("refused: PROXY header from an untrusted address");
    true
}

/// Reads a PROXY header from a trusted peer: the real client's address. The header is
/// looked at with `peek` and only its own bytes are consumed, so whatever the balancer
/// sent right behind it (a TLS ClientHello, a command) stays in the socket for the
/// next reader.
async fn read_proxy_header(
    tcp: &mut TcpStream,
    deadline: Instant,
) -> Result<Option<SocketAddr>, &'static str> {
    let mut buf = vec![0u8; proxy::MAX_HEADER];
    let mut seen = 0;
    loop {
        let n = match timeout_at(deadline, tcp.peek(&mut buf)).await {
            Ok(Ok(0)) => return Err("closed before the PROXY header"),
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return Err("client_error"),
            Err(_) => return Err("preauth_timeout"),
        };
        match proxy::parse(buf.get(..n).unwrap_or_default()) {
            proxy::Header::Complete { client, len } => {
                let header = buf.get_mut(..len).unwrap_or_default();
                return match timeout_at(deadline, tcp.read_exact(header)).await {
                    Ok(Ok(_)) => Ok(client),
                    _ => Err("client_error"),
                };
            }
            proxy::Header::Invalid => return Err(discard(tcp, &mut buf, n).await),
            proxy::Header::Incomplete if n == buf.len() => {
                return Err(discard(tcp, &mut buf, n).await);
            }
            proxy::Header::Incomplete => {}
        }
        // peek returns at once while the bytes seen are there: wait for more, briefly.
        // Balancers send the header in one segment; this is the rare split one.
        if n == seen {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        seen = n;
    }
}

/// The real client behind a trusted balancer: its PROXY header's source address (or
/// the balancer itself for `LOCAL` / `UNKNOWN`), recorded in the session's span and
/// access-log line. `None`, logged, when there is no valid header.
async fn proxied_client(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    facts: &mut Facts,
) -> Option<SocketAddr> {
    match read_proxy_header(tcp, deadline).await {
        Ok(Some(real)) => {
            let span = Span::current();
            span.record("client", field::display(real));
            span.record("via", field::display(peer));
            facts.client(real);
            Some(real)
        }
        Ok(None) => Some(peer),
        Err(reason) => {
            warn!(reason, "refused: no valid PROXY header from a trusted peer");
            None
        }
    }
}

/// Takes the `n` peeked bytes of a refused header off the socket, so that closing it
/// ends with a FIN, not the RST the kernel sends for unread data.
async fn discard(tcp: &mut TcpStream, buf: &mut [u8], n: usize) -> &'static str {
    let _ = tcp.read_exact(buf.get_mut(..n).unwrap_or_default()).await;
    "invalid PROXY header"
}
