//! The generic session driver: one task per client connection, for every protocol.
//!
//! ```text
//!  accept ─▶ [PROXY header] ─▶ [implicit TLS] ─▶ pre-auth loop ──────────▶ relay ─▶ log
//!                │ front.poll_event():                               ▲
//!                ├ StartTls      → handshake, handle_tls_ready       │
//!                ├ Authenticate  → route → connect → Login ──────────┘ (Accepted)
//!                │                  └ Refused/Failed → handle_verdict, loop
//!                └ Close         → flush, close
//! ```
//! All protocol decisions live in the sans-IO machines and routing decisions in the
//! router; this module moves bytes, applies timeouts, reports backend health and logs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use postern_proto::proxy;
use postern_proto::{ClientInfo, Event, Failure, FrontEnd, Limit, Shutdown, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use crate::backend::{BackendStream, ClientTls};
use crate::ctx::Ctx;
use crate::driver::Driver;
use crate::login::{Attempt, Login, login};
use crate::registry::SessionGuard;
use crate::relay::{self, Stats};
use crate::settings::{ListenerSettings, TlsMode};
use crate::stream::ClientStream;

/// How a session ended, for its last log line.
enum End {
    /// The client or the machine closed before login.
    PreAuth(&'static str),
    /// Relayed until this.
    Relayed(Stats),
}

/// Bytes read from a peer per read during the login phase.
const READ_CHUNK: usize = 4096;

/// Runs one client connection to its end.
pub(crate) async fn run<D: Driver>(
    ctx: Arc<Ctx>,
    driver: Arc<D>,
    listener: Arc<ListenerSettings>,
    tcp: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) {
    let id = session_id();
    let span = info_span!(
        "session",
        id = %id,
        proto = %D::PROTOCOL,
        listener = %listener.name,
        client = %peer,
        via = field::Empty,
        user = field::Empty,
        backend = field::Empty,
    );
    async move {
        let started = Instant::now();
        debug!("connected");
        let _open = crate::metrics::connection(D::PROTOCOL, &listener.name);
        // Shutdown reaches the session inside: pre-auth it says goodbye, relayed it
        // runs on until the grace period ends (then its kick token fires).
        let kill = ctx.kill.clone();
        // What a relayed session keeps for hours is this task and the boxes it awaits, so
        // the login phase (buffers, TLS handshake, backend login) runs in a box of its
        // own, freed once the session is handed to the relay. The outer box: each async
        // layer around a future keeps its own copy of it (rust-lang/rust#62958).
        // The kill token bounds the login phase here; a relayed session watches it
        // through its registry token, so it ends as relayed, with its byte counts.
        let (end, facts) = crate::access_log::scope(Box::pin(async {
            let mut relayed = None;
            let end = tokio::select! {
                end = Box::pin(session::<D>(
                    &ctx, &driver, &listener, tcp, peer, local, id.clone(), &mut relayed,
                )) => end,
                () = kill.cancelled() => End::PreAuth("shutdown"),
            };
            match relayed {
                Some(r) => relay_session(&ctx, &*driver, r).await,
                None => end,
            }
        }))
        .await;
        let secs = started.elapsed().as_secs_f64();
        let (reason, relayed) = match &end {
            End::PreAuth(reason) => (*reason, None),
            End::Relayed(s) => (
                s.end.as_str(),
                Some((s.client_to_backend, s.backend_to_client)),
            ),
        };
        if let Some((up, down)) = relayed {
            crate::metrics::relayed_bytes(D::PROTOCOL, up, down);
        }
        crate::access_log::session_ended(
            &ctx.settings.access_log,
            ctx.generation,
            &facts,
            &crate::access_log::Ended {
                id: &id,
                protocol: D::PROTOCOL,
                listener: &listener.name,
                peer,
                reason,
                relayed,
                secs,
            },
        );
        match end {
            End::PreAuth(reason) => info!(reason, secs, "session ended before login"),
            End::Relayed(stats) => info!(
                reason = stats.end.as_str(),
                client_bytes = stats.client_to_backend,
                backend_bytes = stats.backend_to_client,
                secs,
                "session ended"
            ),
        }
    }
    .instrument(span)
    .await;
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
pub(crate) async fn proxied_client(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    deadline: Instant,
) -> Option<SocketAddr> {
    match read_proxy_header(tcp, deadline).await {
        Ok(Some(real)) => {
            let span = Span::current();
            span.record("client", field::display(real));
            span.record("via", field::display(peer));
            crate::access_log::note_client(real);
            Some(real)
        }
        Ok(None) => Some(peer),
        Err(reason) => {
            warn!(reason, "refused: no valid PROXY header from a trusted peer");
            None
        }
    }
}

/// On a listener that takes PROXY headers, checks a peer outside `accept_proxy_from`
/// (`*watching`) on its first read only: a header from it would let anyone claim any
/// address, and run as commands it is noise, so the session is refused (logged here).
pub(crate) fn untrusted_proxy_header(watching: &mut bool, first: &[u8]) -> bool {
    if !std::mem::take(watching) || !proxy::looks_like_header(first) {
        return false;
    }
    warn!("refused: PROXY header from an untrusted address");
    true
}

/// Takes the `n` peeked bytes of a refused header off the socket, so that closing it
/// ends with a FIN, not the RST the kernel sends for unread data.
async fn discard(tcp: &mut TcpStream, buf: &mut [u8], n: usize) -> &'static str {
    let _ = tcp.read_exact(buf.get_mut(..n).unwrap_or_default()).await;
    "invalid PROXY header"
}

#[allow(clippy::too_many_arguments)]
async fn session<D: Driver>(
    ctx: &Ctx,
    driver: &D,
    listener: &ListenerSettings,
    mut tcp: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    id: String,
    relayed: &mut Option<Box<Relayed>>,
) -> End {
    let deadline = Instant::now() + ctx.settings.timeouts.preauth;
    // Only a listener that expects PROXY headers checks for one at all; from an
    // untrusted peer the first bytes are checked instead (below).
    let trusted_proxy = listener.proxy.as_ref().is_some_and(|p| p.trusts(peer.ip()));
    let client = if trusted_proxy {
        match proxied_client(&mut tcp, peer, deadline).await {
            Some(client) => client,
            None => return End::PreAuth("proxy_header"),
        }
    } else {
        peer
    };
    let watch_untrusted_proxy = listener.proxy.is_some() && !trusted_proxy;
    // Counted by the real client's address, known only after the PROXY header.
    let _slot = match ctx.limiter.connect(client.ip(), std::time::Instant::now()) {
        Ok(slot) => slot,
        Err(limit) => {
            crate::metrics::limit_hit(limit);
            let retry_after =
                ctx.limiter
                    .retry_after(client.ip(), limit, std::time::Instant::now());
            return refuse(driver, listener, tcp, &id, limit, retry_after).await;
        }
    };
    let mut stream = ClientStream::Plain(tcp);
    if listener.tls_mode == TlsMode::Implicit {
        stream = match handshake(stream, listener, deadline).await {
            Ok(s) => s,
            Err(end) => return end,
        };
    }
    let mut front = driver.front(stream.is_tls(), &id);
    let mut first_read = watch_untrusted_proxy;
    let mut attempts = 0u32;
    let mut out = Vec::new();
    let mut buf = [0u8; READ_CHUNK];
    loop {
        front.poll_transmit(&mut out);
        if !out.is_empty() {
            match timeout_at(deadline, stream.write_all(&out)).await {
                Ok(Ok(())) => out.clear(),
                Ok(Err(_)) => return End::PreAuth("client_error"),
                Err(_) => return End::PreAuth("preauth_timeout"),
            }
        }
        if let Some(event) = front.poll_event() {
            match event {
                Event::Rejected(reason) => info!(reason, "client input rejected"),
                Event::Close(reason) => {
                    let _ = timeout_at(deadline, stream.shutdown()).await;
                    return End::PreAuth(reason.as_str());
                }
                Event::StartTls => {
                    stream = match handshake(stream, listener, deadline).await {
                        Ok(s) => s,
                        Err(end) => return end,
                    };
                    front.handle_tls_ready();
                }
                Event::Authenticate(creds) => {
                    let info = ClientInfo {
                        client,
                        local,
                        tls: stream.is_tls(),
                        session_id: id.clone(),
                    };
                    let client_tls = ClientTls {
                        version: stream.tls_version(),
                        cipher: stream.tls_cipher(),
                    };
                    attempts = attempts.saturating_add(1);
                    let attempt = Attempt {
                        info: &info,
                        client_tls: &client_tls,
                        auth: listener.auth,
                        number: attempts,
                        deadline,
                    };
                    // Every wait of the login — route lookups, penalty delays,
                    // auth_http's Auth-Wait, backend connect and login — ends at the
                    // pre-auth deadline; the client then hears a temporary failure and
                    // the deadline's goodbye, never silence.
                    // A shutdown does not wait for a login in flight (a slow backend
                    // would hold the exit): the client gets the goodbye and logs in
                    // again elsewhere.
                    let outcome = tokio::select! {
                        r = timeout_at(deadline, login::<D>(ctx, driver, &front, creds, &attempt)) => Some(r),
                        () = ctx.cancel.cancelled() => None,
                    };
                    let outcome = match outcome {
                        Some(Ok(outcome)) => outcome,
                        Some(Err(_)) => {
                            warn!("login did not finish before the pre-auth deadline");
                            Login::Verdict(Verdict::Failed(Failure::Unavailable))
                        }
                        None => {
                            info!("server shutting down: goodbye to a login in flight");
                            return goodbye(
                                &mut front,
                                &mut stream,
                                Shutdown::ServerShutdown,
                                "shutdown",
                            )
                            .await;
                        }
                    };
                    match outcome {
                        Login::Verdict(v) => front.handle_verdict(v),
                        Login::Close(v) => {
                            front.handle_verdict(v);
                            front.poll_transmit(&mut out);
                            let _ = timeout_at(deadline, async {
                                stream.write_all(&out).await?;
                                stream.shutdown().await
                            })
                            .await;
                            return End::PreAuth("auth_refused");
                        }
                        Login::Accepted {
                            backend,
                            leftover,
                            verdict,
                            guard,
                            slot: _slot_of_user,
                        } => {
                            front.handle_verdict(verdict);
                            front.poll_transmit(&mut out);
                            let pipelined = front.into_handoff();
                            let handoff = Handoff {
                                to_client: out,
                                to_backend: pipelined,
                                backend_leftover: leftover,
                            };
                            // The caller relays, once this future is gone.
                            *relayed = Some(Box::new(Relayed {
                                client: stream,
                                backend,
                                handoff,
                                guard,
                                _slots: (_slot, _slot_of_user),
                                _relaying: crate::metrics::relaying(D::PROTOCOL, &listener.name),
                            }));
                            return End::PreAuth("relayed");
                        }
                    }
                }
            }
            continue;
        }
        let read = tokio::select! {
            r = timeout_at(deadline, stream.read(&mut buf)) => r,
            () = ctx.cancel.cancelled() => {
                info!("server shutting down: goodbye before login");
                return goodbye(&mut front, &mut stream, Shutdown::ServerShutdown, "shutdown").await;
            }
        };
        match read {
            Ok(Ok(0)) => return End::PreAuth("client_closed"),
            Ok(Ok(n)) => {
                let bytes = buf.get(..n).unwrap_or_default();
                if untrusted_proxy_header(&mut first_read, bytes) {
                    return End::PreAuth("untrusted_proxy_header");
                }
                front.handle_input(bytes);
            }
            Ok(Err(_)) => return End::PreAuth("client_error"),
            Err(_) => {
                info!("pre-auth timeout");
                return goodbye(
                    &mut front,
                    &mut stream,
                    Shutdown::IdleTimeout,
                    "preauth_timeout",
                )
                .await;
            }
        }
    }
}

/// Ends a pre-auth session from Postern's side with the protocol's goodbye, given one
/// short chance to be written: a client that does not read gets no more time.
async fn goodbye<F: FrontEnd>(
    front: &mut F,
    stream: &mut ClientStream,
    why: Shutdown,
    reason: &'static str,
) -> End {
    front.shutdown(why);
    let mut out = Vec::new();
    front.poll_transmit(&mut out);
    let _ = timeout(REFUSAL_WRITE, async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await;
    End::PreAuth(reason)
}

/// Answers a connection over an abuse-control limit with the protocol's refusal and
/// closes it. An implicit-TLS listener closes without a word: a handshake is exactly the
/// work a flood should not get out of Postern.
async fn refuse<D: Driver>(
    driver: &D,
    listener: &ListenerSettings,
    mut tcp: TcpStream,
    id: &str,
    limit: Limit,
    retry_after: Option<std::time::Duration>,
) -> End {
    warn!(
        limit = limit.as_str(),
        retry_after_secs = retry_after.map(|d| d.as_secs()),
        "connection refused by abuse control"
    );
    if listener.tls_mode != TlsMode::Implicit {
        let mut front = driver.front(false, id);
        front.refuse(limit, retry_after);
        let mut out = Vec::new();
        front.poll_transmit(&mut out);
        let _ = timeout(REFUSAL_WRITE, async {
            tcp.write_all(&out).await?;
            tcp.shutdown().await
        })
        .await;
    }
    End::PreAuth("limited")
}

/// How long a refusal may take to write: the client gets one chance to read it.
const REFUSAL_WRITE: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs the TLS server handshake (implicit TLS or after STARTTLS) within the pre-auth
/// deadline.
async fn handshake(
    stream: ClientStream,
    listener: &ListenerSettings,
    deadline: Instant,
) -> Result<ClientStream, End> {
    let Some(tls) = listener.tls.clone() else {
        return Err(End::PreAuth("listener has no certificate"));
    };
    match timeout_at(deadline, stream.upgrade(tls)).await {
        Ok(Ok(s)) => {
            debug!(version = s.tls_version(), "TLS established");
            Ok(s)
        }
        Ok(Err(e)) => {
            info!(error = %e, "TLS handshake failed");
            Err(End::PreAuth("tls_error"))
        }
        Err(_) => Err(End::PreAuth("preauth_timeout")),
    }
}

/// The bytes in flight at the moment a login succeeds.
#[derive(Default)]
struct Handoff {
    /// The front end's answer to the login (and anything before it).
    to_client: Vec<u8>,
    /// Client bytes pipelined after the login command.
    to_backend: Vec<u8>,
    /// Backend bytes received after its answer.
    backend_leftover: Vec<u8>,
}

/// A logged-in session, ready to relay: what outlives the login phase (boxed, so it is
/// not copied into each future that passes it on).
struct Relayed {
    client: ClientStream,
    backend: BackendStream,
    handoff: Handoff,
    guard: SessionGuard,
    /// The client address's connection slot and the user's session slot (abuse control).
    _slots: (
        postern_limits::ConnectionGuard,
        Option<postern_limits::SessionGuard>,
    ),
    _relaying: crate::metrics::Relaying,
}

/// Finishes the hand-off and relays until the session ends or is kicked.
async fn relay_session<D: Driver>(ctx: &Ctx, driver: &D, mut r: Box<Relayed>) -> End {
    // Fields used in place: moving them out would give each its own slot in this
    // future, next to the box.
    let r = &mut *r;
    // Order matters: the login answer first, then whatever the backend sent after it.
    let hand_off = async {
        r.client.write_all(&r.handoff.to_client).await?;
        r.client.write_all(&r.handoff.backend_leftover).await?;
        r.client.flush().await?;
        r.backend.write_all(&r.handoff.to_backend).await?;
        r.backend.flush().await?;
        std::io::Result::Ok(())
    };
    if timeout(ctx.settings.timeouts.backend_login, hand_off)
        .await
        .map_or(true, |r| r.is_err())
    {
        return End::PreAuth("handoff_error");
    }
    r.handoff = Handoff::default();
    let idle = ctx.settings.timeouts.idle;
    let cancel = r.guard.token().cancelled();
    let mut stats = relay::relay(&mut r.client, &mut r.backend, idle, cancel).await;
    // Sessions Postern ends itself get the protocol's goodbye, so clients show a server
    // message rather than a dropped connection.
    let why = match stats.end {
        relay::End::Cancelled if ctx.kill.is_cancelled() => Some(Shutdown::ServerShutdown),
        relay::End::Cancelled => Some(Shutdown::Kicked),
        relay::End::IdleTimeout => Some(Shutdown::IdleTimeout),
        _ => None,
    };
    if let Some(why) = why {
        if why == Shutdown::Kicked {
            stats.end = relay::End::Kicked;
        } else if why == Shutdown::ServerShutdown {
            stats.end = relay::End::Shutdown;
        }
        let bye = driver.relayed_goodbye(why);
        let _ = timeout(REFUSAL_WRITE, async {
            r.client.write_all(&bye).await?;
            r.client.flush().await?;
            r.client.shutdown().await
        })
        .await;
        let _ = timeout(REFUSAL_WRITE, r.backend.shutdown()).await;
    }
    End::Relayed(stats)
}

/// A session id, unique across restarts and (with overwhelming probability) across
/// instances: a hash of the process start, the pid and a counter.
pub(crate) fn session_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos ^ (u64::from(std::process::id()) << 32)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..].copy_from_slice(&n.to_le_bytes());
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Besides its task and the relay future (bounded in `relay.rs`), an idle relayed
    /// session keeps this box: both streams, the emptied hand-off buffers and the
    /// guards. It is paid once per session for hours, so it must not creep up: the
    /// bound is its size today (256 bytes in a debug build on x86_64).
    #[test]
    fn relayed_state_is_small() {
        let size = std::mem::size_of::<Relayed>();
        assert!(size <= 256, "Relayed is {size} bytes");
    }
}
