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
use postern_proto::{ClientInfo, Event, FrontEnd, Limit};
use postern_route::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use crate::backend::{BackendStream, ClientTls};
use crate::driver::Driver;
use crate::health::Health;
use crate::login::{Attempt, Login, login};
use crate::registry::{Registry, SessionGuard};
use crate::relay::{self, Stats};
use crate::settings::{ListenerSettings, Settings, TlsMode};
use crate::stream::ClientStream;

/// Shared by every session of a server.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) settings: Arc<Settings>,
    pub(crate) router: Arc<Router>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) health: Arc<Health>,
    pub(crate) limiter: Arc<postern_limits::Limiter>,
    pub(crate) verifier: Arc<crate::auth::Verifier>,
    pub(crate) cancel: CancellationToken,
}

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
        let cancel = ctx.cancel.clone();
        let end = tokio::select! {
            end = session::<D>(&ctx, &driver, &listener, tcp, peer, local, id) => end,
            () = cancel.cancelled() => End::PreAuth("shutdown"),
        };
        let secs = started.elapsed().as_secs_f64();
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

/// Reads a PROXY header from a trusted peer: the real client's address, and any bytes
/// that followed the header.
pub(crate) async fn read_proxy_header(
    tcp: &mut TcpStream,
    deadline: Instant,
) -> Result<(Option<SocketAddr>, Vec<u8>), &'static str> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        match proxy::parse(&buf) {
            proxy::Header::Complete { client, len } => {
                return Ok((client, buf.get(len..).unwrap_or_default().to_vec()));
            }
            proxy::Header::Incomplete => {}
            proxy::Header::Invalid => return Err("invalid PROXY header"),
        }
        match timeout_at(deadline, tcp.read(&mut chunk)).await {
            Ok(Ok(0)) => return Err("closed before the PROXY header"),
            Ok(Ok(n)) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Ok(Err(_)) => return Err("client_error"),
            Err(_) => return Err("preauth_timeout"),
        }
    }
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
) -> End {
    let deadline = Instant::now() + ctx.settings.timeouts.preauth;
    let mut client = peer;
    let mut early = Vec::new();
    // Only a listener that expects PROXY headers checks for one at all; from an
    // untrusted peer the first bytes are checked instead (below).
    let trusted_proxy = listener.proxy.as_ref().is_some_and(|p| p.trusts(peer.ip()));
    if trusted_proxy {
        match read_proxy_header(&mut tcp, deadline).await {
            Ok((announced, rest)) => {
                if let Some(real) = announced {
                    client = real;
                    let span = Span::current();
                    span.record("client", field::display(real));
                    span.record("via", field::display(peer));
                }
                early = rest;
            }
            Err(reason) => {
                warn!(reason, "refused: no valid PROXY header from a trusted peer");
                return End::PreAuth("proxy_header");
            }
        }
    }
    let watch_untrusted_proxy = listener.proxy.is_some() && !trusted_proxy;
    // Counted by the real client's address, known only after the PROXY header.
    let _slot = match ctx.limiter.connect(client.ip(), std::time::Instant::now()) {
        Ok(slot) => slot,
        Err(limit) => return refuse(driver, listener, tcp, &id, limit).await,
    };
    let mut stream = ClientStream::Plain(tcp);
    if listener.tls_mode == TlsMode::Implicit {
        if !early.is_empty() {
            // TLS after a PROXY header must start on a clean boundary.
            return End::PreAuth("proxy_header");
        }
        stream = match handshake(stream, listener, deadline).await {
            Ok(s) => s,
            Err(end) => return end,
        };
    }
    let mut front = driver.front(stream.is_tls(), &id);
    if !early.is_empty() {
        front.handle_input(&early);
    }
    drop(early);
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
                    match login::<D>(ctx, driver, &front, creds, &attempt).await {
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
                            return relay_session(ctx, stream, backend, handoff, guard).await;
                        }
                    }
                }
            }
            continue;
        }
        match timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) => return End::PreAuth("client_closed"),
            Ok(Ok(n)) => {
                let bytes = buf.get(..n).unwrap_or_default();
                if first_read {
                    first_read = false;
                    if proxy::looks_like_header(bytes) {
                        warn!("refused: PROXY header from an untrusted address");
                        return End::PreAuth("untrusted_proxy_header");
                    }
                }
                front.handle_input(bytes);
            }
            Ok(Err(_)) => return End::PreAuth("client_error"),
            Err(_) => {
                info!("pre-auth timeout");
                return End::PreAuth("preauth_timeout");
            }
        }
    }
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
) -> End {
    warn!(
        limit = limit.as_str(),
        "connection refused by abuse control"
    );
    if listener.tls_mode != TlsMode::Implicit {
        let mut front = driver.front(false, id);
        front.refuse(limit);
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
struct Handoff {
    /// The front end's answer to the login (and anything before it).
    to_client: Vec<u8>,
    /// Client bytes pipelined after the login command.
    to_backend: Vec<u8>,
    /// Backend bytes received after its answer.
    backend_leftover: Vec<u8>,
}

/// Finishes the hand-off and relays until the session ends or is kicked.
async fn relay_session(
    ctx: &Ctx,
    mut client: ClientStream,
    mut backend: BackendStream,
    handoff: Handoff,
    guard: SessionGuard,
) -> End {
    // Order matters: the login answer first, then whatever the backend sent after it.
    let hand_off = async {
        client.write_all(&handoff.to_client).await?;
        client.write_all(&handoff.backend_leftover).await?;
        client.flush().await?;
        backend.write_all(&handoff.to_backend).await?;
        backend.flush().await?;
        std::io::Result::Ok(())
    };
    if timeout(ctx.settings.timeouts.backend_login, hand_off)
        .await
        .map_or(true, |r| r.is_err())
    {
        return End::PreAuth("handoff_error");
    }
    drop(handoff);
    let idle = ctx.settings.timeouts.idle;
    let stats = relay::relay(&mut client, &mut backend, idle, guard.token().cancelled()).await;
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
