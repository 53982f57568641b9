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
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{Instrument, debug, field, info, info_span, warn};

use crate::backend::{self, BackendStream, ClientTls};
use crate::ctx::Ctx;
use crate::session::{proxied_client, session_id, untrusted_proxy_header};
use crate::settings::{ListenerSettings, TlsMode};
use crate::stream::ClientStream;

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
        let _open = crate::metrics::connection(protocol, &listener.name);
        // Shutdown reaches the session inside (a 421), and the kill token after the
        // grace period.
        let kill = ctx.kill.clone();
        let bytes = Bytes::default();
        let (reason, facts) = crate::access_log::scope(async {
            tokio::select! {
                r = session(&ctx, options, protocol, &listener, tcp, peer, local, id.clone(), &bytes) => r,
                () = kill.cancelled() => "shutdown",
            }
        })
        .await;
        info!(
            reason,
            secs = started.elapsed().as_secs_f64(),
            "session ended"
        );
        crate::access_log::session_ended(
            &ctx.settings.access_log,
            ctx.generation,
            &facts,
            &crate::access_log::Ended {
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
    mut tcp: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    id: String,
    bytes: &Bytes,
) -> &'static str {
    let mut deadline = Instant::now() + ctx.settings.timeouts.preauth;
    let trusted_proxy = listener.proxy.as_ref().is_some_and(|p| p.trusts(peer.ip()));
    // From an untrusted peer on a listener that takes PROXY headers, the first bytes are
    // checked for one instead (untrusted_proxy_header).
    let mut first_read = listener.proxy.is_some() && !trusted_proxy;
    let client_addr = if trusted_proxy {
        match proxied_client(&mut tcp, peer, deadline).await {
            Some(client) => client,
            None => return "proxy_header",
        }
    } else {
        peer
    };
    // LMTP comes from the operator's own MTAs: no per-address limits there.
    let _slot = if protocol == Protocol::Lmtp {
        None
    } else {
        match ctx
            .limiter
            .connect(client_addr.ip(), std::time::Instant::now())
        {
            Ok(slot) => Some(slot),
            Err(limit) => {
                crate::metrics::limit_hit(limit);
                let retry_after =
                    ctx.limiter
                        .retry_after(client_addr.ip(), limit, std::time::Instant::now());
                warn!(
                    limit = limit.as_str(),
                    retry_after_secs = retry_after.map(|d| d.as_secs()),
                    "connection refused by abuse control"
                );
                if listener.tls_mode != TlsMode::Implicit {
                    let line = postern_smtp::connection_refused(
                        &ctx.settings.hostname,
                        limit,
                        retry_after,
                    ) + "\r\n";
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        tcp.write_all(line.as_bytes()).await?;
                        tcp.shutdown().await
                    })
                    .await;
                }
                return "limited";
            }
        }
    };
    let mut client = ClientStream::Plain(tcp);
    if listener.tls_mode == TlsMode::Implicit {
        let Some(tls) = listener.tls.clone() else {
            return "listener has no certificate";
        };
        client = match timeout_at(deadline, client.upgrade(tls)).await {
            Ok(Ok(s)) => s,
            _ => return "tls_error",
        };
    }
    let info = ClientInfo {
        client: client_addr,
        local,
        tls: client.is_tls(),
        session_id: id,
    };
    let options = with_probed_extensions(ctx, options, protocol);
    let mut relay = Relay::new(options, info.clone());
    let mut backend: Option<(String, BackendStream)> = None;
    let mut out = Vec::new();
    let smtp_timeout = ctx.settings.timeouts.smtp;
    let mut stopping = false;
    let mut cbuf = vec![0u8; READ_CHUNK];
    let mut bbuf = vec![0u8; READ_CHUNK];
    loop {
        // Client output, then backend output, then events (the driver contract).
        relay.poll_transmit_client(&mut out);
        if !out.is_empty() {
            // A client that never takes its replies is dropped like a silent one.
            match timeout(smtp_timeout, client.write_all(&out)).await {
                Ok(Ok(())) => {
                    Bytes::add(&bytes.to_client, out.len());
                    out.clear();
                }
                Ok(Err(_)) => return "client_error",
                Err(_) => {
                    info!("client does not read its replies");
                    return "timeout";
                }
            }
        }
        relay.poll_transmit_backend(&mut out);
        if !out.is_empty() {
            if let Some((_, b)) = backend.as_mut()
                && (b.write_all(&out).await.is_err() || b.flush().await.is_err())
            {
                relay.handle_backend_closed();
                backend = None;
            }
            out.clear();
        }
        if let Some(event) = relay.poll_event() {
            match event {
                RelayEvent::Rejected(reason) => info!(reason, "client input rejected"),
                RelayEvent::StartTls => {
                    let Some(tls) = listener.tls.clone() else {
                        return "listener has no certificate";
                    };
                    client = match timeout_at(deadline, client.upgrade(tls)).await {
                        Ok(Ok(s)) => s,
                        _ => return "tls_error",
                    };
                    relay.handle_tls_ready();
                }
                RelayEvent::RouteRecipient(address) => {
                    let route = route(ctx, &address, protocol).await;
                    relay.handle_route(route);
                }
                RelayEvent::Connect(BackendId(name)) => {
                    match connect(ctx, &name, protocol, &info).await {
                        Some(stream) => {
                            tracing::Span::current().record("backend", name.as_str());
                            crate::access_log::note_backend(&name);
                            backend = Some((name, stream));
                            relay.handle_backend_connected();
                        }
                        None => relay.handle_backend_closed(),
                    }
                }
                RelayEvent::CloseBackend(reason) => {
                    debug!(reason, "closing the backend connection");
                    if let Some((_, mut b)) = backend.take() {
                        let _ = b.shutdown().await;
                    }
                }
                RelayEvent::Close(reason) => {
                    let _ = client.shutdown().await;
                    if let Some((_, mut b)) = backend.take() {
                        let _ = b.shutdown().await;
                    }
                    return reason.as_str();
                }
            }
            continue;
        }
        if relay.has_client_output() {
            continue;
        }
        // Wait for either side. The deadline is per wait: a command, a reply, a chunk.
        deadline = Instant::now() + smtp_timeout;
        let want_client = relay.wants_client_input();
        tokio::select! {
            r = client.read(&mut cbuf), if want_client => match r {
                Ok(0) | Err(_) => {
                    // A message cut short never gets its final "." at the backend,
                    // which discards it: close both without another byte.
                    if let Some((_, mut b)) = backend.take() {
                        let _ = b.shutdown().await;
                    }
                    return "client_closed";
                }
                Ok(n) => {
                    Bytes::add(&bytes.from_client, n);
                    let input = cbuf.get(..n).unwrap_or_default();
                    if untrusted_proxy_header(&mut first_read, input) {
                        return "untrusted_proxy_header";
                    }
                    relay.handle_client_input(input);
                }
            },
            r = read_backend(&mut backend, &mut bbuf) => match r {
                Some(n) if n > 0 => relay.handle_backend_input(bbuf.get(..n).unwrap_or_default()),
                _ => {
                    backend = None;
                    relay.handle_backend_closed();
                }
            },
            () = tokio::time::sleep_until(deadline) => relay.shutdown(Shutdown::IdleTimeout),
            // Postern is stopping: 421 now; an interrupted transaction is retried by
            // the client, as after any 421.
            () = ctx.cancel.cancelled(), if !stopping => {
                stopping = true;
                relay.shutdown(Shutdown::ServerShutdown);
            }
        }
    }
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
