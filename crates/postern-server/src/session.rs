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

use postern_proto::{
    BackendLogin, ClientInfo, Credentials, Event, Failure, FrontEnd, Limit, Mechanism, Verdict,
};
use postern_route::{Availability, BackendState, RouteError, Router, Source, UserName};
use proxy_header::{ParseConfig, ProxyHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use crate::backend::{self, BackendError, BackendStream, ClientTls};
use crate::driver::Driver;
use crate::health::Health;
use crate::registry::{Registry, SessionGuard, SessionInfo};
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
/// Largest PROXY header accepted: v1 is at most 107 bytes; v2 headers carry TLVs, and
/// balancers send a few hundred bytes at most.
const MAX_PROXY_HEADER: usize = 4096;
/// The PROXY v2 signature.
const PROXY_V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

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
        match ProxyHeader::parse(&buf, ParseConfig::default()) {
            Ok((header, used)) => {
                let client = header.proxied_address().map(|a| a.source);
                return Ok((client, buf.get(used..).unwrap_or_default().to_vec()));
            }
            Err(proxy_header::Error::BufferTooShort) if buf.len() < MAX_PROXY_HEADER => {}
            Err(_) => return Err("invalid PROXY header"),
        }
        match timeout_at(deadline, tcp.read(&mut chunk)).await {
            Ok(Ok(0)) => return Err("closed before the PROXY header"),
            Ok(Ok(n)) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Ok(Err(_)) => return Err("client_error"),
            Err(_) => return Err("preauth_timeout"),
        }
    }
}

fn looks_like_proxy_header(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PROXY ") || bytes.starts_with(PROXY_V2_SIGNATURE)
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
                    };
                    match login::<D>(ctx, driver, &front, creds, &info, &client_tls).await {
                        Login::Verdict(v) => front.handle_verdict(v),
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
                    if looks_like_proxy_header(bytes) {
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

enum Login {
    Verdict(Verdict),
    Accepted {
        backend: BackendStream,
        leftover: Vec<u8>,
        verdict: Verdict,
        guard: SessionGuard,
        /// The user's session slot (abuse control), held while the session lasts.
        slot: postern_limits::SessionGuard,
    },
}

/// Attempts per login: the pinned backend, then once more when its failure just took
/// it down and the pool lets another backend take the user.
const ATTEMPTS: usize = 2;

/// Routes the user and logs in to the chosen backend.
async fn login<D: Driver>(
    ctx: &Ctx,
    driver: &D,
    front: &D::Front,
    mut creds: Credentials,
    info: &ClientInfo,
    client_tls: &ClientTls,
) -> Login {
    let mechanism = creds.mechanism.as_str();
    let ip = info.client.ip();
    let limiter = &ctx.limiter;
    let user = match ctx.router.normalizer().normalize(creds.mailbox_user()) {
        Ok(u) => u,
        Err(e) => {
            info!(error = %e, mechanism, "login refused");
            return failed(limiter, ip, None, Failure::AuthFailed).await;
        }
    };
    if let Err(limit) = limiter.check_login(ip, user.as_str(), std::time::Instant::now()) {
        warn!(
            limit = limit.as_str(),
            user = user.as_str(),
            mechanism,
            "login refused by abuse control"
        );
        tokio::time::sleep(limiter.penalty(ip, std::time::Instant::now())).await;
        return Login::Verdict(Verdict::Failed(Failure::Limited(limit)));
    }
    let slot = match limiter.session(user.as_str(), std::time::Instant::now()) {
        Ok(slot) => slot,
        Err(limit) => {
            warn!(
                limit = limit.as_str(),
                user = user.as_str(),
                mechanism,
                "login refused by abuse control"
            );
            return Login::Verdict(Verdict::Failed(Failure::Limited(limit)));
        }
    };
    let register = || {
        ctx.registry.register(
            SessionInfo {
                id: info.session_id.clone(),
                user: user.as_str().to_owned(),
                protocol: D::PROTOCOL,
                backend: None,
                pinned: None,
                client: info.client,
                since: SystemTime::now(),
            },
            &ctx.cancel,
        )
    };
    // Registered before the route is looked up: a kick from here on reaches us.
    let mut guard = register();
    let unavailable = || Login::Verdict(Verdict::Failed(Failure::Unavailable));
    let mut password_checked = false;
    for attempt in 0..ATTEMPTS {
        let decision = match route(ctx, &user, D::PROTOCOL, mechanism).await {
            Ok(d) => d,
            Err(Failure::AuthFailed) => {
                return failed(limiter, ip, Some(user.as_str()), Failure::AuthFailed).await;
            }
            Err(failure) => return Login::Verdict(Verdict::Failed(failure)),
        };
        if decision.source == Source::Moved {
            // This login moved the user off a draining backend, and the move's kick
            // ended every session of the user, this one included: it starts afresh
            // on the new backend.
            guard = register();
        }
        if creds.mechanism == Mechanism::Apop && !password_checked {
            // APOP proves knowledge of the password without sending it; the backend
            // can only be logged in to with the password itself, so Postern checks
            // the digest against the store's plaintext password and replays that.
            let stored = decision.record.as_ref().and_then(|r| r.password.as_ref());
            match crate::apop::open(&creds, stored) {
                Ok(password) => {
                    creds.password = password;
                    creds.mechanism = Mechanism::Cleartext;
                    creds.challenge = None;
                    password_checked = true;
                }
                Err(why) => {
                    info!(reason = why, mechanism, "login refused");
                    return failed(limiter, ip, Some(user.as_str()), Failure::AuthFailed).await;
                }
            }
        }
        if ctx.settings.normalized_login {
            creds.set_mailbox_user(decision.user.as_str());
        }
        let span = Span::current();
        span.record("user", decision.user.as_str());
        span.record("backend", decision.backend.as_str());
        let temporary = (decision.source == Source::Temporary)
            .then_some(decision.pinned.as_deref())
            .flatten();
        guard.set_backend(&decision.backend, temporary);
        let Some(backend) = ctx.settings.backends.get(&decision.backend) else {
            warn!("backend is not configured");
            return unavailable();
        };
        let Some((endpoint, options)) = driver.backend(backend) else {
            warn!("backend is not configured for this protocol");
            return unavailable();
        };
        let timeouts = &ctx.settings.timeouts;
        let connected = backend::connect(
            &backend.host,
            endpoint,
            backend.tls.as_ref(),
            info,
            client_tls,
            timeouts.backend_connect,
        )
        .await;
        let stream = match connected {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "backend connect failed");
                ctx.health
                    .report(&backend.name, D::PROTOCOL, Err(e.to_string()));
                // The failure may just have taken the backend down: route again, and
                // a shared pool hands the user to another backend.
                let down = ctx.health.state(&backend.name, D::PROTOCOL) == BackendState::Down;
                if e.is_connect() && down && attempt + 1 < ATTEMPTS {
                    continue;
                }
                return unavailable();
            }
        };
        let mut machine = front.start_login(creds, options, info);
        let outcome = timeout(
            timeouts.backend_login,
            backend::login(&mut machine, stream, backend.tls.as_ref()),
        )
        .await;
        let (verdict, stream) = match outcome {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                warn!(error = %e, "backend login failed");
                if matches!(e, BackendError::Tls(_)) {
                    ctx.health
                        .report(&backend.name, D::PROTOCOL, Err(e.to_string()));
                }
                return unavailable();
            }
            Err(_) => {
                warn!("backend login timed out");
                ctx.health
                    .report(&backend.name, D::PROTOCOL, Err("login timed out".into()));
                return unavailable();
            }
        };
        if guard.token().is_cancelled() {
            info!("kicked during login");
            return unavailable();
        }
        return match verdict {
            Verdict::Accepted(_) => {
                limiter.succeeded(user.as_str(), std::time::Instant::now());
                info!(
                    mechanism,
                    route = decision.source.as_str(),
                    tls = info.tls,
                    "login accepted"
                );
                Login::Accepted {
                    backend: stream,
                    leftover: machine.into_handoff(),
                    verdict,
                    guard,
                    slot,
                }
            }
            Verdict::Refused(_) => {
                info!(mechanism, "login refused by backend");
                let delay = limiter.failed(ip, Some(user.as_str()), std::time::Instant::now());
                tokio::time::sleep(delay).await;
                Login::Verdict(verdict)
            }
            Verdict::Failed(f) => {
                warn!(failure = ?f, "backend login did not complete");
                Login::Verdict(verdict)
            }
        };
    }
    unavailable()
}

/// Counts a failed login and answers it once the address's penalty delay has passed.
async fn failed(
    limiter: &postern_limits::Limiter,
    ip: std::net::IpAddr,
    user: Option<&str>,
    failure: Failure,
) -> Login {
    let delay = limiter.failed(ip, user, std::time::Instant::now());
    if !delay.is_zero() {
        debug!(delay_ms = delay.as_millis() as u64, "penalty delay");
        tokio::time::sleep(delay).await;
    }
    Login::Verdict(Verdict::Failed(failure))
}

/// Asks the router, and logs a refusal at the level it deserves.
async fn route(
    ctx: &Ctx,
    user: &UserName,
    protocol: postern_proto::Protocol,
    mechanism: &str,
) -> Result<postern_route::Decision, Failure> {
    match ctx.router.resolve_normalized(user.clone(), protocol).await {
        Ok(d) => Ok(d),
        Err(e) => {
            let failure = e.failure();
            match e {
                RouteError::NoRoute | RouteError::Disabled | RouteError::InvalidUser(_) => {
                    info!(error = %e, mechanism, "login refused");
                }
                _ => warn!(error = %e, mechanism, "cannot route user"),
            }
            Err(failure)
        }
    }
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
