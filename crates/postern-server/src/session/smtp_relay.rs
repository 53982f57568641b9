//! The driver of the MX relay (25) and LMTP front: two live connections, the client's
//! and (once the first recipient is routed) one backend's, driven by
//! `postern_smtp::Relay`, which stays in the middle for the whole session so that every
//! recipient reaches the backend it is pinned to. See the driver contract in
//! `postern_smtp::relay`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use postern_proto::{ClientInfo, Protocol};
use postern_route::RouteError;
use postern_smtp::{BackendId, Relay, RelayEvent, RelayOptions, Route, Shutdown};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tracing::{Instrument, debug, field, info, info_span, warn};

use crate::backends::backend::{self, BackendStream, ClientTls};
use crate::ctx::Ctx;
use crate::observability::access_log::Facts;
use crate::relay::stream::ClientStream;
use crate::session::prologue::{self, Limits, untrusted_proxy_header};
use crate::session::session_id;
use crate::settings::ListenerSettings;

const READ_CHUNK: usize = 16 * 1024;

/// Runs one MX or LMTP connection to its end.
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    options: Arc<RelayOptions>,
    protocol: Protocol,
    listener: Arc<ListenerSettings>,
    tcp: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) {
    let id = session_id();
    let span = info_span!(
        "session",
        id = %id,
        proto = %protocol,
        listener = %listener.name,
        client = %peer,
        via = field::Empty,
        backend = field::Empty,
    );
    async move {
        let started = Instant::now();
        let _open = listener.meters.connection(protocol, &listener.name);
        // Shutdown reaches the session inside (a 421), and the kill token after the
        // grace period.
        let kill = ctx.kill.clone();
        let bytes = Bytes::default();
        // The session's own record for its access-log line; like the byte counts, it
        // outlives the session's future, which a kill drops.
        let mut facts = Facts::default();
        let reason = tokio::select! {
            r = session(&ctx, options, protocol, &listener, tcp, peer, local, id.clone(), &bytes, &mut facts) => r,
            () = kill.cancelled() => "shutdown",
        };
        info!(
            reason,
            secs = started.elapsed().as_secs_f64(),
            "session ended"
        );
        crate::observability::access_log::session_ended(
            &ctx.settings.access_log,
            ctx.generation,
            &facts,
            &crate::observability::access_log::Ended {
                id: &id,
                protocol,
                listener: &listener.name,
                peer,
                reason,
                relayed: Some((
                    bytes.from_client.load(Ordering::Relaxed),
                    bytes.to_client.load(Ordering::Relaxed),
                )),
                secs: started.elapsed().as_secs_f64(),
            },
        );
    }
    .instrument(span)
    .await;
}

/// The client's bytes each way, for the access log: an MX session is relayed from its
/// first byte (Postern stays in the middle).
#[derive(Default)]
struct Bytes {
    from_client: AtomicU64,
    to_client: AtomicU64,
}

impl Bytes {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    ctx: &Ctx,
    options: Arc<RelayOptions>,
    protocol: Protocol,
    listener: &ListenerSettings,
    tcp: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    id: String,
    bytes: &Bytes,
    facts: &mut Facts,
) -> &'static str {
    let deadline = Instant::now() + ctx.settings.timeouts.preauth;
    let refusal = |limit, retry_after| {
        let line = postern_smtp::connection_refused(&ctx.settings.hostname, limit, retry_after);
        (line + "\r\n").into_bytes()
    };
    // LMTP comes from the operator's own MTAs: no per-address limits there.
    let limits = if protocol == Protocol::Lmtp {
        Limits::Exempt
    } else {
        Limits::Apply(refusal)
    };
    let opened = match prologue::open(ctx, listener, tcp, peer, deadline, limits, facts).await {
        Ok(o) => o,
        Err(reason) => return reason,
    };
    let _slot = opened.slot;
    let info = ClientInfo {
        client: opened.client,
        local,
        tls: opened.stream.is_tls(),
        session_id: id,
    };
    let options = with_probed_extensions(ctx, options, protocol);
    let mut run = MxSession {
        ctx,
        protocol,
        listener,
        relay: Relay::new(options, info.clone()),
        info,
        backend: None,
        bytes,
        facts,
        deadline,
        first_read: opened.watch_untrusted_proxy,
    };
    run.drive(opened.stream).await
}

/// One MX or LMTP session in progress.
struct MxSession<'a> {
    ctx: &'a Ctx,
    protocol: Protocol,
    listener: &'a ListenerSettings,
    relay: Relay,
    info: ClientInfo,
    backend: Option<(String, BackendStream)>,
    bytes: &'a Bytes,
    /// The session's record for its access-log line.
    facts: &'a mut Facts,
    /// The current wait's deadline: a command, a reply, a chunk.
    deadline: Instant,
    /// Check the first bytes for an untrusted PROXY header.
    first_read: bool,
}

impl MxSession<'_> {
    /// The driver loop (the contract in `postern_smtp::relay`): client output, then
    /// backend output, then events, then wait for either side.
    async fn drive(&mut self, mut client: ClientStream) -> &'static str {
        let smtp_timeout = self.ctx.settings.timeouts.smtp;
        let mut stopping = false;
        let mut out = Vec::new();
        let mut cbuf = vec![0u8; READ_CHUNK];
        let mut bbuf = vec![0u8; READ_CHUNK];
        loop {
            if let Err(reason) = self.transmit(&mut client, &mut out, smtp_timeout).await {
                return reason;
            }
            if let Some(event) = self.relay.poll_event() {
                match self.event(&mut client, event).await {
                    Flow::Continue => {}
                    Flow::End(reason) => return reason,
                    Flow::StartTls => {
                        client = match prologue::handshake(
                            client,
                            self.listener,
                            self.deadline,
                            self.facts,
                        )
                        .await
                        {
                            Ok(s) => s,
                            Err(reason) => return reason,
                        };
                        self.relay.handle_tls_ready();
                    }
                }
                continue;
            }
            if self.relay.has_client_output() {
                continue;
            }
            self.deadline = Instant::now() + smtp_timeout;
            let want_client = self.relay.wants_client_input();
            tokio::select! {
                r = client.read(&mut cbuf), if want_client => match r {
                    Ok(0) | Err(_) => {
                        // A message cut short never gets its final "." at the backend,
                        // which discards it: close both without another byte.
                        if let Some((_, mut b)) = self.backend.take() {
                            let _ = b.shutdown().await;
                        }
                        return "client_closed";
                    }
                    Ok(n) => {
                        Bytes::add(&self.bytes.from_client, n);
                        let input = cbuf.get(..n).unwrap_or_default();
                        if untrusted_proxy_header(&mut self.first_read, input) {
                            return "untrusted_proxy_header";
                        }
                        self.relay.handle_client_input(input);
                    }
                },
                r = read_backend(&mut self.backend, &mut bbuf) => match r {
                    Some(n) if n > 0 => {
                        self.relay.handle_backend_input(bbuf.get(..n).unwrap_or_default());
                    }
                    _ => {
                        self.backend = None;
                        self.relay.handle_backend_closed();
                    }
                },
                () = tokio::time::sleep_until(self.deadline) => {
                    self.relay.shutdown(Shutdown::IdleTimeout);
                }
                // Postern is stopping: 421 now; an interrupted transaction is retried
                // by the client, as after any 421.
                () = self.ctx.cancel.cancelled(), if !stopping => {
                    stopping = true;
                    self.relay.shutdown(Shutdown::ServerShutdown);
                }
            }
        }
    }

    /// Writes the relay's output: the client's, then the backend's.
    async fn transmit(
        &mut self,
        client: &mut ClientStream,
        out: &mut Vec<u8>,
        smtp_timeout: Duration,
    ) -> Result<(), &'static str> {
        self.relay.poll_transmit_client(out);
        if !out.is_empty() {
            // A client that never takes its replies is dropped like a silent one.
            match timeout(smtp_timeout, client.write_all(out)).await {
                Ok(Ok(())) => {
                    Bytes::add(&self.bytes.to_client, out.len());
                    out.clear();
                }
                Ok(Err(_)) => return Err("client_error"),
                Err(_) => {
                    info!("client does not read its replies");
                    return Err("timeout");
                }
            }
        }
        self.relay.poll_transmit_backend(out);
        if !out.is_empty() {
            if let Some((_, b)) = self.backend.as_mut()
                && (b.write_all(out).await.is_err() || b.flush().await.is_err())
            {
                self.relay.handle_backend_closed();
                self.backend = None;
            }
            out.clear();
        }
        Ok(())
    }

    /// Carries out one event of the relay machine.
    async fn event(&mut self, client: &mut ClientStream, event: RelayEvent) -> Flow {
        match event {
            RelayEvent::Rejected(reason) => info!(reason, "client input rejected"),
            RelayEvent::StartTls => return Flow::StartTls,
            RelayEvent::RouteRecipient(address) => {
                let route = route(self.ctx, &address, self.protocol).await;
                self.relay.handle_route(route);
            }
            RelayEvent::Connect(BackendId(name)) => {
                match connect(self.ctx, &name, self.protocol, &self.info).await {
                    Some(stream) => {
                        tracing::Span::current().record("backend", name.as_str());
                        self.facts.backend(&name);
                        self.backend = Some((name, stream));
                        self.relay.handle_backend_connected();
                    }
                    None => self.relay.handle_backend_closed(),
                }
            }
            RelayEvent::CloseBackend(reason) => {
                debug!(reason, "closing the backend connection");
                if let Some((_, mut b)) = self.backend.take() {
                    let _ = b.shutdown().await;
                }
            }
            RelayEvent::Close(reason) => {
                let _ = client.shutdown().await;
                if let Some((_, mut b)) = self.backend.take() {
                    let _ = b.shutdown().await;
                }
                return Flow::End(reason.as_str());
            }
        }
        Flow::Continue
    }
}

/// What the driver loop does after an event.
enum Flow {
    Continue,
    End(&'static str),
    /// Upgrade the client connection, then tell the machine.
    StartTls,
}

/// Reads from the backend, or never completes when there is none.
async fn read_backend(
    backend: &mut Option<(String, BackendStream)>,
    buf: &mut [u8],
) -> Option<usize> {
    match backend {
        Some((_, b)) => b.read(buf).await.ok(),
        None => std::future::pending().await,
    }
}

/// The listener's options with the extensions the backends' EHLO allows.
fn with_probed_extensions(
    ctx: &Ctx,
    options: Arc<RelayOptions>,
    protocol: Protocol,
) -> Arc<RelayOptions> {
    match ctx.health.extensions(protocol) {
        Some(ext) if ext != options.extensions => Arc::new(RelayOptions {
            extensions: ext,
            ..(*options).clone()
        }),
        _ => options,
    }
}

async fn route(ctx: &Ctx, address: &str, protocol: Protocol) -> Route {
    match ctx.router.resolve_recipient(address, protocol).await {
        Ok(d) => {
            debug!(recipient = %d.user, backend = %d.backend, route = d.source.as_str(), "recipient routed");
            Route::Backend(BackendId(d.backend))
        }
        Err(RouteError::InvalidUser(_)) => Route::Reject,
        Err(RouteError::NoRoute) => {
            info!(recipient = %address, "recipient rejected: no pin and routing.unknown_users = reject");
            Route::Reject
        }
        Err(e) => {
            warn!(error = %e, "cannot route recipient");
            Route::TempFail
        }
    }
}

async fn connect(
    ctx: &Ctx,
    name: &str,
    protocol: Protocol,
    info: &ClientInfo,
) -> Option<BackendStream> {
    let backend = ctx.settings.backends.get(name)?;
    let endpoint = backend.endpoint(protocol)?;
    let tls = ClientTls {
        version: None,
        cipher: None,
    };
    match backend::connect(
        &backend.host,
        endpoint,
        backend.tls.as_ref(),
        info,
        &tls,
        ctx.settings.timeouts.backend_connect,
    )
    .await
    {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(backend = name, error = %e, "backend connect failed");
            ctx.health
                .report_failure(name, protocol, e.kind(), e.to_string());
            None
        }
    }
}
