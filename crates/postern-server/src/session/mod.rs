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

pub(crate) mod driver;
pub(crate) mod prologue;
pub(crate) mod smtp_relay;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use postern_proto::{ClientInfo, Event, Failure, FrontEnd, Shutdown, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use crate::backends::backend::{BackendStream, ClientTls};
use crate::ctx::Ctx;
use crate::login::{Attempt, Login, login};
use crate::observability::access_log::Facts;
use crate::registry::SessionGuard;
use crate::relay::stream::ClientStream;
use crate::relay::{self, Stats};
use crate::session::driver::Driver;
use crate::settings::ListenerSettings;
use prologue::{Limits, REFUSAL_WRITE, untrusted_proxy_header};

/// How a session ended, for its last log line.
enum End {
    /// The client or the machine closed before login.
    PreAuth(&'static str),
    /// Relayed until this.
    Relayed(Stats),
}

/// Bytes read from a peer per read during the login phase.
const READ_CHUNK: usize = 4096;

/// Runs one client connection: its login phase in this task; once logged in, the relay
/// in a task of its own (see [`relay_task`]), and this one ends.
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
        let open = listener.meters.connection(D::PROTOCOL, &listener.name);
        // Shutdown reaches the session inside: pre-auth it says goodbye, relayed it
        // runs on until the grace period ends (then its kick token fires).
        let kill = ctx.kill.clone();
        // The kill token bounds the login phase here; a relayed session watches it
        // through its registry token, so it ends as relayed, with its byte counts.
        // The session's own record for its access-log line, filled in by the opening,
        // the TLS handshakes and the logins.
        let mut facts = Facts::default();
        // The login phase (buffers, TLS handshake, backend login, the hand-off) runs in
        // a box: it is big, and this task's cell is allocated for the whole login.
        let (end, relayed) = Box::pin(async {
            let mut relayed = None;
            let end = tokio::select! {
                end = session::<D>(
                    &ctx, &driver, &listener, tcp, peer, local, id.clone(), &mut relayed,
                    &mut facts,
                ) => end,
                () = kill.cancelled() => End::PreAuth("shutdown"),
            };
            // Here, not in the relay task: its future would keep the hand-off's state
            // and the emptied buffers for the whole session.
            match relayed {
                Some((mut r, handoff)) => {
                    if hand_off(&ctx, &mut r, handoff).await {
                        (end, Some(r))
                    } else {
                        (End::PreAuth("handoff_error"), None)
                    }
                }
                None => (end, None),
            }
        })
        .await;
        let ending = Ending {
            id,
            listener,
            peer,
            started,
            facts,
            _open: open,
        };
        match relayed {
            // What a relayed session keeps for hours is its task, so the relay gets a
            // task of its own holding only what it needs; this one, and everything the
            // login needed, is freed now. On the same tracker: graceful shutdown waits
            // for relayed sessions too (this task still counts until the new one is
            // spawned, so the tracker is never empty in between).
            Some(relayed) => {
                let live = Live { relayed, ending };
                let task = relay_task(Arc::clone(&ctx), driver, live, Span::current());
                ctx.tracker.spawn(task);
            }
            None => ending.report::<D>(&ctx, end),
        }
    }
    .instrument(span)
    .await;
}

/// What a session's end reports (its access-log line, its metrics, its last log line),
/// carried from the login task into the relay task.
struct Ending {
    id: String,
    listener: Arc<ListenerSettings>,
    peer: SocketAddr,
    started: Instant,
    /// What the login phase noted for the access log. Nothing is noted once the
    /// session is relayed, so the relay task carries them as they are, with no
    /// task-local scope of its own.
    facts: Facts,
    /// Counts the connection as open until the session's end.
    _open: crate::observability::metrics::SessionGauge,
}

impl Ending {
    /// Writes the session's access-log line, byte metrics and last log line.
    fn report<D: Driver>(self, ctx: &Ctx, end: End) {
        let secs = self.started.elapsed().as_secs_f64();
        let (reason, relayed) = match &end {
            End::PreAuth(reason) => (*reason, None),
            End::Relayed(s) => (
                s.end.as_str(),
                Some((s.client_to_backend, s.backend_to_client)),
            ),
        };
        if let Some((up, down)) = relayed {
            crate::observability::metrics::relayed_bytes(D::PROTOCOL, up, down);
        }
        crate::observability::access_log::session_ended(
            &ctx.settings.access_log,
            ctx.generation,
            &self.facts,
            &crate::observability::access_log::Ended {
                id: &self.id,
                protocol: D::PROTOCOL,
                listener: &self.listener.name,
                peer: self.peer,
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
}

/// A relayed session's task: all an idle session keeps besides its sockets' kernel
/// state, its registry entry and its heap-held parts (TLS state, names). The session
/// ([`Live`]) is in the future itself, not in a box of its own: one allocation, and
/// the unit tests bound its size. Not an `async fn`: its arguments would be stored
/// twice in the future (rust-lang/rust#62958); an `async move` block's captures are
/// used in place.
fn relay_task<D: Driver>(
    ctx: Arc<Ctx>,
    driver: Arc<D>,
    mut live: Live,
    span: Span,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let end = relay_session(&ctx, &*driver, &mut live.relayed).await;
        let Live { relayed, ending } = live;
        // As before the split: the registry entry, the limits' slots and the sockets
        // go before the session's end is reported.
        drop(relayed);
        ending.report::<D>(&ctx, end);
    }
    .instrument(span)
}

/// A logged-in session and what its end reports: what the relay task owns.
struct Live {
    relayed: Relayed,
    ending: Ending,
}

/// The pre-auth phase of one connection: the opening, then the front end's dialogue
/// until a login is accepted (the session is left in `relayed` for the caller to
/// relay) or the session ends.
#[allow(clippy::too_many_arguments)]
async fn session<D: Driver>(
    ctx: &Ctx,
    driver: &D,
    listener: &ListenerSettings,
    tcp: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    id: String,
    relayed: &mut Option<(Relayed, Handoff)>,
    facts: &mut Facts,
) -> End {
    let deadline = Instant::now() + ctx.settings.timeouts.preauth;
    let refusal = |limit, retry_after| {
        let mut front = driver.front(false, &id);
        front.refuse(limit, retry_after);
        let mut out = Vec::new();
        front.poll_transmit(&mut out);
        out
    };
    let limits = Limits::Apply(refusal);
    let opened = match prologue::open(ctx, listener, tcp, peer, deadline, limits, facts).await {
        Ok(o) => o,
        Err(reason) => return End::PreAuth(reason),
    };
    let mut stream = opened.stream;
    let mut front = driver.front(stream.is_tls(), &id);
    let mut pre = PreAuth {
        ctx,
        driver,
        listener,
        client: opened.client,
        local,
        id: &id,
        deadline,
        attempts: 0,
        facts,
    };
    let mut first_read = opened.watch_untrusted_proxy;
    let mut out = Vec::new();
    // On the heap and never zeroed, like the backend driver's (see `backend::drive`).
    let mut buf = Vec::with_capacity(READ_CHUNK);
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
            match pre.event(&mut front, &mut stream, event).await {
                Next::Continue => {}
                Next::End(end) => return end,
                Next::StartTls => {
                    stream = match prologue::handshake(stream, listener, deadline, pre.facts).await
                    {
                        Ok(s) => s,
                        Err(reason) => return End::PreAuth(reason),
                    };
                    front.handle_tls_ready();
                }
                Next::Relay(accepted) => {
                    front.handle_verdict(accepted.verdict);
                    front.poll_transmit(&mut out);
                    let handoff = Handoff {
                        to_client: out,
                        to_backend: front.into_handoff(),
                        backend_leftover: accepted.leftover,
                    };
                    // The caller hands off and relays, once this future is gone.
                    let r = Relayed {
                        client: stream,
                        backend: accepted.backend,
                        guard: accepted.guard,
                        _slots: (opened.slot, accepted.slot),
                        _relaying: listener.meters.relaying(D::PROTOCOL, &listener.name),
                    };
                    *relayed = Some((r, handoff));
                    return End::PreAuth("relayed");
                }
            }
            continue;
        }
        buf.clear();
        let read = tokio::select! {
            r = timeout_at(deadline, stream.read_buf(&mut buf)) => r,
            () = ctx.cancel.cancelled() => {
                info!("server shutting down: goodbye before login");
                return goodbye(&mut front, &mut stream, Shutdown::ServerShutdown, "shutdown").await;
            }
        };
        match read {
            Ok(Ok(0)) => return End::PreAuth("client_closed"),
            Ok(Ok(_)) => {
                let bytes = buf.as_slice();
                if untrusted_proxy_header(&mut first_read, bytes) {
                    return End::PreAuth("untrusted_proxy_header");
                }
                front.handle_input(bytes);
            }
            Ok(Err(_)) => return End::PreAuth("client_error"),
            Err(_) => {
                info!("pre-auth timeout");
                let why = Shutdown::IdleTimeout;
                return goodbye(&mut front, &mut stream, why, "preauth_timeout").await;
            }
        }
    }
}

/// What a connection in its pre-auth phase knows besides its front end and stream.
struct PreAuth<'a, D: Driver> {
    ctx: &'a Ctx,
    driver: &'a D,
    listener: &'a ListenerSettings,
    client: SocketAddr,
    local: SocketAddr,
    id: &'a str,
    /// Every wait of the phase ends here.
    deadline: Instant,
    /// Login attempts so far (`Auth-Login-Attempt`).
    attempts: u32,
    /// The session's record for its access-log line.
    facts: &'a mut Facts,
}

/// What the pre-auth loop does after an event.
enum Next {
    Continue,
    End(End),
    /// Upgrade the connection, then tell the front end.
    StartTls,
    /// Logged in: answer the client and relay.
    Relay(Box<Accepted>),
}

/// An accepted login, from [`Login::Accepted`].
struct Accepted {
    backend: BackendStream,
    leftover: Vec<u8>,
    verdict: Verdict,
    guard: SessionGuard,
    slot: Option<postern_limits::SessionGuard>,
}

impl<D: Driver> PreAuth<'_, D> {
    async fn event(
        &mut self,
        front: &mut D::Front,
        stream: &mut ClientStream,
        event: Event,
    ) -> Next {
        match event {
            Event::Rejected(reason) => {
                info!(reason, "client input rejected");
                Next::Continue
            }
            Event::Close(reason) => {
                let _ = timeout_at(self.deadline, stream.shutdown()).await;
                Next::End(End::PreAuth(reason.as_str()))
            }
            Event::StartTls => Next::StartTls,
            Event::Authenticate(creds) => self.authenticate(front, stream, creds).await,
        }
    }

    /// Runs a login attempt and answers it (an accepted one is the caller's to
    /// answer, with the hand-off).
    async fn authenticate(
        &mut self,
        front: &mut D::Front,
        stream: &mut ClientStream,
        creds: postern_proto::Credentials,
    ) -> Next {
        let ctx = self.ctx;
        let info = ClientInfo {
            client: self.client,
            local: self.local,
            tls: stream.is_tls(),
            session_id: self.id.to_owned(),
        };
        let client_tls = ClientTls {
            version: stream.tls_version(),
            cipher: stream.tls_cipher(),
        };
        self.attempts = self.attempts.saturating_add(1);
        let attempt = Attempt {
            info: &info,
            client_tls: &client_tls,
            auth: self.listener.auth,
            number: self.attempts,
            deadline: self.deadline,
        };
        // Every wait of the login — route lookups, penalty delays, auth_http's
        // Auth-Wait, backend connect and login — ends at the pre-auth deadline; the
        // client then hears a temporary failure and the deadline's goodbye, never
        // silence. A shutdown does not wait for a login in flight (a slow backend would
        // hold the exit): the client gets the goodbye and logs in again elsewhere.
        // Boxed: the login's future is most of this one, and the timeout and the
        // select below would each move it.
        let login = Box::pin(login::<D>(
            ctx,
            self.driver,
            front,
            creds,
            &attempt,
            self.facts,
        ));
        let outcome = tokio::select! {
            r = timeout_at(self.deadline, login) => Some(r),
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
                let why = Shutdown::ServerShutdown;
                return Next::End(goodbye(front, stream, why, "shutdown").await);
            }
        };
        match outcome {
            Login::Verdict(v) => {
                front.handle_verdict(v);
                Next::Continue
            }
            Login::Close(v) => {
                front.handle_verdict(v);
                let mut out = Vec::new();
                front.poll_transmit(&mut out);
                let _ = timeout_at(self.deadline, async {
                    stream.write_all(&out).await?;
                    stream.shutdown().await
                })
                .await;
                Next::End(End::PreAuth("auth_refused"))
            }
            Login::Accepted {
                backend,
                leftover,
                verdict,
                guard,
                slot,
            } => Next::Relay(Box::new(Accepted {
                backend,
                leftover,
                verdict,
                guard,
                slot,
            })),
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

/// The bytes in flight at the moment a login succeeds.
struct Handoff {
    /// The front end's answer to the login (and anything before it).
    to_client: Vec<u8>,
    /// Client bytes pipelined after the login command.
    to_backend: Vec<u8>,
    /// Backend bytes received after its answer.
    backend_leftover: Vec<u8>,
}

/// A logged-in session, ready to relay: what outlives the login phase.
struct Relayed {
    client: ClientStream,
    backend: BackendStream,
    guard: SessionGuard,
    /// The client address's connection slot and the user's session slot (abuse control).
    _slots: (
        postern_limits::ConnectionGuard,
        Option<postern_limits::SessionGuard>,
    ),
    _relaying: crate::observability::metrics::Relaying,
}

/// Writes what was in flight when the login succeeded: whether it was written within
/// the backend-login timeout.
async fn hand_off(ctx: &Ctx, r: &mut Relayed, handoff: Handoff) -> bool {
    // Order matters: the login answer first, then whatever the backend sent after it.
    let write = async {
        r.client.write_all(&handoff.to_client).await?;
        r.client.write_all(&handoff.backend_leftover).await?;
        r.client.flush().await?;
        r.backend.write_all(&handoff.to_backend).await?;
        r.backend.flush().await?;
        std::io::Result::Ok(())
    };
    timeout(ctx.settings.timeouts.backend_login, write)
        .await
        .is_ok_and(|r| r.is_ok())
}

/// Relays until the session ends or is kicked.
async fn relay_session<D: Driver>(ctx: &Ctx, driver: &D, r: &mut Relayed) -> End {
    // Fields used in place: moving them out would give each its own slot in this
    // future, next to the session the relay task already holds.
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
        // One await here, not two: a value alive across several awaits of this future
        // gets a slot beside the relay's state instead of sharing its space (24 bytes
        // of the relay task, by `relay_task_is_small`).
        relayed_goodbye(r, driver.relayed_goodbye(why)).await;
    }
    End::Relayed(stats)
}

/// Writes the goodbye to a relayed client and closes both sides, each given one short
/// chance: a peer that does not read gets no more time.
async fn relayed_goodbye(r: &mut Relayed, bye: Vec<u8>) {
    let _ = timeout(REFUSAL_WRITE, async {
        r.client.write_all(&bye).await?;
        r.client.flush().await?;
        r.client.shutdown().await
    })
    .await;
    let _ = timeout(REFUSAL_WRITE, r.backend.shutdown()).await;
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

    /// The part of the relay task (bounded as a whole below) that the login hands over:
    /// both streams and the guards (the hand-off is written before). It is paid once per
    /// session for hours, so it must not creep up: the bound is its size today (184
    /// bytes in a debug build on x86_64).
    #[test]
    fn relayed_state_is_small() {
        let size = std::mem::size_of::<Relayed>();
        assert!(size <= 184, "Relayed is {size} bytes");
    }

    /// The size of the value `f` returns, without calling it: the size of a future
    /// as the task cell stores it, with no server to build its arguments from.
    fn output_size<F, A, B, C, S, R>(_: &F) -> usize
    where
        F: FnOnce(A, B, C, S) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// `output_size` for the login phase's longer signatures.
    fn output_size6<F, A, B, C, D2, E, G, R>(_: &F) -> usize
    where
        F: FnOnce(A, B, C, D2, E, G) -> R,
    {
        std::mem::size_of::<R>()
    }

    fn output_size9<F, A, B, C, D2, E, G, H, I, J, R>(_: &F) -> usize
    where
        F: FnOnce(A, B, C, D2, E, G, H, I, J) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// The login phase's futures are moved whole into each timeout, select and box
    /// that wraps them, once per login: with a 4 KiB read buffer on the stack of the
    /// session and of the backend driver they were 15 136 and 9 120 bytes (debug,
    /// x86_64) and those copies were a third of a login's user-space instructions. The
    /// bounds are their sizes since the buffers moved to the heap, plus a little.
    #[test]
    fn login_phase_futures_are_small() {
        let session = output_size9(&session::<driver::Imap>);
        assert!(
            session <= 3_200,
            "the pre-auth session future is {session} bytes"
        );
        let login = output_size6(&crate::login::login::<driver::Imap>);
        assert!(login <= 5_400, "the login future is {login} bytes");
    }

    /// The relay task's future is what an idle relayed session keeps in its task cell
    /// for hours: the session itself (both streams, guards, what its end reports) and
    /// the relay's state, idle timer and cancellation future. The bound is its size
    /// today in a debug build on x86_64, for every protocol. Tokio adds ~104 bytes of
    /// its own and rounds the cell up to 128 bytes: 880 takes 1 024 (1 152 before the
    /// relay's future and the hand-off were slimmed).
    #[test]
    fn relay_task_is_small() {
        for (protocol, size) in [
            ("imap", output_size(&relay_task::<driver::Imap>)),
            ("pop3", output_size(&relay_task::<driver::Pop3>)),
            ("submission", output_size(&relay_task::<driver::Submission>)),
        ] {
            assert!(size <= 880, "{protocol}: the relay task is {size} bytes");
        }
    }
}
