//! The admin HTTP listener (`[admin]`): liveness and readiness probes, Prometheus
//! metrics, a JSON API (backends, sessions, routes, kick, drain, reload) and an HTML
//! status page. HTTP/1.1 by hyper; loopback by default, with an optional bearer token
//! that every endpoint but `/healthz` and `/readyz` then requires.
//!
//! ```text
//!  GET  /                       status page (status.html, refreshed from /api/status)
//!  GET  /healthz                200 while the process runs
//!  GET  /readyz                 200 when listeners are bound and every protocol served
//!                               has a backend up; 503 and the reasons otherwise
//!  GET  /metrics                Prometheus text format
//!  GET  /api/status             overview: generation, uptime, listeners, counters
//!  GET  /api/backends           backends: health per protocol, admin state, sessions
//!  GET  /api/sessions?user=U    live sessions (of one user)
//!  GET  /api/routes/U           where U goes and why (writes nothing)
//!  POST /api/kick?user=U        end U's sessions on this instance
//!  POST /api/backends/B/drain   as `postern backend drain B` (and /undrain)
//!  POST /api/reload             reload the configuration file
//! ```

mod api;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::server::Handle;

pub use crate::settings::AdminSettings;

/// Reloads the configuration; the new generation, or why the reload was refused.
pub type ReloadFn =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<u64, String>> + Send>> + Send + Sync>;

/// What every request handler sees.
#[derive(Clone)]
pub(crate) struct State {
    pub(crate) handle: Handle,
    pub(crate) reload: ReloadFn,
    pub(crate) started: Instant,
    /// Reloads run one at a time.
    pub(crate) reloading: Arc<tokio::sync::Mutex<()>>,
}

/// The response body type.
pub(crate) type Body = Full<Bytes>;

/// A running admin listener.
#[derive(Debug)]
pub struct Admin {
    /// The address it is bound to (useful with port 0).
    pub local_addr: SocketAddr,
}

/// Binds the admin listener of the current configuration (`None` without `[admin]`)
/// and serves it in the background for the life of the process. `reload` is called by
/// `POST /api/reload`.
pub async fn start(handle: Handle, reload: ReloadFn) -> std::io::Result<Option<Admin>> {
    let Some(settings) = handle.settings().admin.clone() else {
        return Ok(None);
    };
    let listener = TcpListener::bind(settings.bind).await?;
    let local_addr = listener.local_addr()?;
    info!(addr = %local_addr, token = settings.token.is_some(), "admin listener");
    let state = State {
        handle,
        reload,
        started: Instant::now(),
        reloading: Arc::new(tokio::sync::Mutex::new(())),
    };
    tokio::spawn(accept_loop(listener, state));
    Ok(Some(Admin { local_addr }))
}

async fn accept_loop(listener: TcpListener, state: State) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(req, &state).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "admin connection ended");
            }
        });
    }
}

async fn handle(req: Request<Incoming>, state: &State) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let open = matches!(path.as_str(), "/healthz" | "/readyz");
    if !open {
        let token = state
            .handle
            .settings()
            .admin
            .as_ref()
            .and_then(|a| a.token.clone());
        if let Some(token) = token
            && !authorized(req.headers().get(hyper::header::AUTHORIZATION), &token)
        {
            return unauthorized();
        }
    }
    let query = req.uri().query().unwrap_or_default().to_owned();
    // Requests carry no body Postern reads; drain a small one so keep-alive works.
    let _ = http_body_util::Limited::new(req.into_body(), 64 * 1024)
        .collect()
        .await;
    api::route(state, &method, &path, &query).await
}

/// `Authorization: Bearer TOKEN`, or HTTP Basic with TOKEN as the password (what a
/// browser sends for the status page after its login prompt).
fn authorized(header: Option<&hyper::header::HeaderValue>, token: &str) -> bool {
    let Some(value) = header.and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let given = if let Some(t) = value.strip_prefix("Bearer ") {
        t.trim().as_bytes().to_vec()
    } else if let Some(b) = value.strip_prefix("Basic ") {
        use base64::Engine;
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(b.trim()) else {
            return false;
        };
        match decoded.iter().position(|&c| c == b':') {
            Some(i) => decoded.get(i + 1..).unwrap_or_default().to_vec(),
            None => return false,
        }
    } else {
        return false;
    };
    postern_auth::apop::constant_time_eq(&given, token.as_bytes())
}

fn unauthorized() -> Response<Body> {
    let mut r = api::json(
        StatusCode::UNAUTHORIZED,
        &serde_json::json!({"error": "missing or wrong token"}),
    );
    r.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        hyper::header::HeaderValue::from_static("Basic realm=\"postern\", charset=\"UTF-8\""),
    );
    r
}

/// A tiny HTTP client for `postern reload`: POSTs `path` to the admin listener at
/// `addr` with the token; returns the status code and the body.
pub async fn post(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let work = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to the admin listener at {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("admin listener at {addr}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method("POST")
            .uri(path)
            .header(hyper::header::HOST, addr.to_string());
        if let Some(t) = token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("admin listener at {addr}: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("admin listener at {addr}: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("admin listener at {addr}: no answer within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn tokens_bearer_and_basic() {
        let ok = HeaderValue::from_static("Bearer s3cret");
        assert!(authorized(Some(&ok), "s3cret"));
        let wrong = HeaderValue::from_static("Bearer s3cre");
        assert!(!authorized(Some(&wrong), "s3cret"));
        // admin:s3cret
        let basic = HeaderValue::from_static("Basic YWRtaW46czNjcmV0");
        assert!(authorized(Some(&basic), "s3cret"));
        assert!(!authorized(None, "s3cret"));
        let other = HeaderValue::from_static("Token s3cret");
        assert!(!authorized(Some(&other), "s3cret"));
    }

    #[test]
    fn debug_hides_the_token() {
        let s = AdminSettings {
            bind: "127.0.0.1:9190".parse().unwrap(),
            token: Some("s3cret".into()),
        };
        assert!(!format!("{s:?}").contains("s3cret"));
    }
}
