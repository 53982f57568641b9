//! The admin endpoints. Every answer is JSON except `/`, `/metrics` and the probes.

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Response, StatusCode};
use postern_proto::Protocol;
use postern_route::{Availability, BackendState, RouteError};
use serde_json::{Value, json};

use super::{Body, State};
use crate::observability::access_log::rfc3339;
use crate::observability::metrics::{self, LOGIN_RESULTS, PROTOCOLS};

const STATUS_HTML: &str = include_str!("status.html");

pub(crate) fn json(status: StatusCode, value: &Value) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    response(status, "application/json", body)
}

fn response(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    h.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json(status, &json!({ "error": message.into() }))
}

/// Dispatches one request.
pub(crate) async fn route(
    state: &State,
    method: &Method,
    path: &str,
    query: &str,
) -> Response<Body> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let get = method == Method::GET || method == Method::HEAD;
    let post = method == Method::POST;
    match (segments.as_slice(), get, post) {
        ([""], true, _) => response(
            StatusCode::OK,
            "text/html; charset=utf-8",
            STATUS_HTML.as_bytes().to_vec(),
        ),
        (["healthz"], true, _) => response(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
        (["readyz"], true, _) => readyz(state).await,
        (["metrics"], true, _) => response(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            {
                let runtime = state.handle.runtime();
                let settings = state.handle.settings();
                metrics::get()
                    .render(metrics::State {
                        generation: state.handle.generation(),
                        health: &runtime.health,
                        admission: &runtime.admission,
                        registry: &runtime.registry,
                        settings: &settings,
                    })
                    .into_bytes()
            },
        ),
        (["api", "status"], true, _) => status(state).await,
        (["api", "backends"], true, _) => json(StatusCode::OK, &backends(state).await),
        (["api", "sessions"], true, _) => sessions(state, param(query, "user").as_deref()),
        (["api", "routes", user], true, _) => {
            let protocol = param(query, "protocol").unwrap_or_else(|| "imap".into());
            routes(state, &percent_decode(user), &protocol).await
        }
        (["api", "kick"], _, true) => kick(state, param(query, "user").as_deref()),
        (["api", "backends", name, action @ ("drain" | "undrain")], _, true) => {
            drain(state, &percent_decode(name), *action == "drain").await
        }
        (["api", "reload"], _, true) => reload(state).await,
        (
            [""]
            | ["healthz" | "readyz" | "metrics"]
            | ["api", "status" | "backends" | "sessions"]
            | ["api", "routes", _],
            false,
            _,
        )
        | (["api", "kick" | "reload"] | ["api", "backends", _, "drain" | "undrain"], _, false) => {
            let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            let allow = if get { "POST" } else { "GET" };
            r.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static(allow),
            );
            r
        }
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

/// The value of `key` in a query string, percent-decoded.
pub(crate) fn param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| percent_decode(v))
}

/// `%XX` and `+` decoding (invalid escapes are kept as they are).
pub(crate) fn percent_decode(s: &str) -> String {
    // Form encoding's `+` first, so an encoded `%2B` still decodes to a plus sign.
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Every protocol some listener serves.
fn served_protocols(state: &State) -> Vec<Protocol> {
    let settings = state.handle.settings();
    let mut v: Vec<Protocol> = settings
        .listeners
        .iter()
        .map(|l| l.front.protocol())
        .collect();
    v.sort_by_key(|p| p.as_str());
    v.dedup();
    v
}

async fn readyz(state: &State) -> Response<Body> {
    let settings = state.handle.settings();
    let runtime = state.handle.runtime();
    let bound = state.handle.local_addrs().await;
    let mut problems = Vec::new();
    for l in &settings.listeners {
        if !bound.iter().any(|(n, _)| *n == l.name) {
            problems.push(format!("listener {} is not bound", l.name));
        }
    }
    for protocol in served_protocols(state) {
        let serving: Vec<&str> = settings
            .backends
            .values()
            .filter(|b| b.endpoint(protocol).is_some())
            .map(|b| b.name.as_str())
            .collect();
        // Without configured backends for it (auth_http names them), nothing to check.
        if serving.is_empty() {
            continue;
        }
        if !serving
            .iter()
            .any(|b| runtime.health.state(b, protocol) != BackendState::Down)
        {
            problems.push(format!("no {protocol} backend is up"));
        }
    }
    let ready = problems.is_empty();
    json(
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        &json!({ "ready": ready, "problems": problems, "generation": state.handle.generation() }),
    )
}

/// How long the backend list waits for the route store's counts.
const COUNTS_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

async fn backends(state: &State) -> Value {
    let settings = state.handle.settings();
    let runtime = state.handle.runtime();
    let router = state.handle.router();
    let store = router.store();
    // Postern's own pins are counted; an operator's lookup query cannot be (it answers
    // per user), which the output says rather than showing a misleading number. A
    // store that does not answer gives null.
    // Bounded: a hung database must not hang the status page; the last counts known
    // are shown instead, marked as such.
    let counted = router.counts_within(COUNTS_WAIT).await;
    let counts_fresh = counted.as_ref().is_some_and(|(_, fresh)| *fresh);
    let pinned: Option<HashMap<String, u64>> = counted.map(|(c, _)| c);
    let uncounted = store.has_uncounted_pins();
    let sessions = runtime.registry.per_backend();
    let admission: HashMap<(String, Protocol), crate::backends::admit::Report> = runtime
        .admission
        .reports()
        .into_iter()
        .map(|r| ((r.backend.clone(), r.protocol), r))
        .collect();
    let mut health: BTreeMap<String, Vec<crate::backends::health::HealthReport>> = BTreeMap::new();
    for r in runtime.health.reports() {
        health.entry(r.backend.clone()).or_default().push(r);
    }
    let list: Vec<Value> = settings
        .backends
        .values()
        .map(|b| {
            let reports = health.get(&b.name).cloned().unwrap_or_default();
            let admin = reports.iter().find_map(|r| r.admin).map(|a| a.as_str());
            let services: serde_json::Map<String, Value> = reports
                .iter()
                .map(|r| {
                    let port = b.endpoint(r.protocol).map(|e| e.port);
                    let gate = admission.get(&(b.name.clone(), r.protocol)).map(|a| {
                        json!({
                            "max_in_flight": a.limits.max_in_flight,
                            "queue_limit": a.limits.max_queue,
                            "in_flight": a.in_flight,
                            "queued": a.queued,
                            "refused_queue_full": a.totals.refused_full,
                            "refused_deadline": a.totals.expired,
                        })
                    });
                    (
                        r.protocol.as_str().to_owned(),
                        json!({
                            "up": r.up,
                            "state": service_state(
                                runtime.health.state(&b.name, r.protocol),
                                r.seen,
                                r.admin,
                            ),
                            "checks": r.seen.as_str(),
                            "degraded": r.degraded,
                            "since": rfc3339(r.since),
                            "since_unix": unix(r.since),
                            "last_error": r.last_error.as_ref().map(|e| e.message.as_str()),
                            "last_error_at": r.last_error.as_ref().map(|e| rfc3339(e.at)),
                            "last_error_unix": r.last_error.as_ref().map(|e| unix(e.at)),
                            "address": port.map(|p| format!("{}:{p}", b.host)),
                            "admission": gate,
                        }),
                    )
                })
                .collect();
            json!({
                "name": b.name,
                "host": b.host,
                "pool": b.pool,
                "weight": b.weight,
                "admin_state": admin.unwrap_or("normal"),
                "up": reports.iter().all(|r| r.up),
                "services": services,
                "sessions": sessions.get(&b.name).copied().unwrap_or(0),
                "pinned_users": pinned
                    .as_ref()
                    .map(|p| p.get(&b.name).copied().unwrap_or(0)),
                "pinned_users_fresh": counts_fresh,
                "pinned_users_counted": if uncounted {
                    "routes table only (pins from routing.sql.lookup_query are not counted)"
                } else {
                    "all"
                },
            })
        })
        .collect();
    json!({ "backends": list })
}

/// A service's state for the API: the router's view, except that a service not yet
/// answering since start is `unknown` rather than `down`.
fn service_state(
    s: BackendState,
    seen: crate::backends::health::Seen,
    admin: Option<crate::backends::health::AdminState>,
) -> &'static str {
    match (s, seen, admin) {
        (_, _, Some(crate::backends::health::AdminState::Down)) => "down",
        (BackendState::Up | BackendState::Down, crate::backends::health::Seen::Unknown, _) => {
            "unknown"
        }
        _ => state_name(s),
    }
}

fn state_name(s: BackendState) -> &'static str {
    match s {
        BackendState::Up => "up",
        BackendState::Down => "down",
        _ => "draining",
    }
}

fn sessions(state: &State, user: Option<&str>) -> Response<Body> {
    let runtime = state.handle.runtime();
    let user = match user.filter(|u| !u.is_empty()) {
        Some(raw) => match state.handle.router().normalizer().normalize(raw) {
            Ok(u) => Some(u.as_str().to_owned()),
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("user: {e}")),
        },
        None => None,
    };
    let mut list = runtime.registry.list(user.as_deref());
    list.sort_by_key(|s| s.since);
    let now = SystemTime::now();
    let sessions: Vec<Value> = list
        .iter()
        .map(|s| {
            json!({
                "id": s.id,
                "user": s.user,
                "protocol": s.protocol.as_str(),
                "backend": s.backend,
                "pinned": s.pinned,
                "client": s.client.to_string(),
                "since": rfc3339(s.since),
                "seconds": now.duration_since(s.since).map_or(0, |d| d.as_secs()),
            })
        })
        .collect();
    json(
        StatusCode::OK,
        &json!({ "count": sessions.len(), "sessions": sessions }),
    )
}

fn parse_protocol(s: &str) -> Option<Protocol> {
    PROTOCOLS.into_iter().find(|p| p.as_str() == s)
}

async fn routes(state: &State, user: &str, protocol: &str) -> Response<Body> {
    let Some(protocol) = parse_protocol(protocol) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("unknown protocol {protocol:?}"),
        );
    };
    let router = state.handle.router();
    let settings = state.handle.settings();
    match router.explain(user, protocol).await {
        Ok(d) => {
            let address = settings.backends.get(&d.backend).and_then(|b| {
                b.endpoint(protocol)
                    .map(|e| format!("{}:{}", b.host, e.port))
            });
            json(
                StatusCode::OK,
                &json!({
                    "user": d.user.as_str(),
                    "as_typed": user,
                    "protocol": protocol.as_str(),
                    "backend": d.backend,
                    "source": d.source.as_str(),
                    "pinned": d.pinned,
                    "address": address,
                    "store": router.store().kind(),
                }),
            )
        }
        Err(e) => {
            let (status, reason) = match &e {
                RouteError::NoRoute => (StatusCode::NOT_FOUND, "no_route"),
                RouteError::Moving => (StatusCode::CONFLICT, "moving"),
                RouteError::Disabled => (StatusCode::NOT_FOUND, "disabled"),
                RouteError::InvalidUser(_) => (StatusCode::BAD_REQUEST, "invalid_user"),
                _ => (StatusCode::SERVICE_UNAVAILABLE, "error"),
            };
            json(
                status,
                &json!({ "as_typed": user, "backend": null, "reason": reason, "error": e.to_string() }),
            )
        }
    }
}

fn kick(state: &State, user: Option<&str>) -> Response<Body> {
    let Some(raw) = user.filter(|u| !u.is_empty()) else {
        return error(StatusCode::BAD_REQUEST, "user= is required");
    };
    let user = match state.handle.router().normalizer().normalize(raw) {
        Ok(u) => u,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("user: {e}")),
    };
    let n = state.handle.runtime().registry.kick_user(user.as_str());
    tracing::info!(
        user = user.as_str(),
        sessions = n,
        "kicked through the admin API"
    );
    json(
        StatusCode::OK,
        &json!({ "user": user.as_str(), "kicked": n }),
    )
}

async fn drain(state: &State, name: &str, on: bool) -> Response<Body> {
    if !state.handle.settings().backends.contains_key(name) {
        return error(StatusCode::NOT_FOUND, format!("no backend named {name:?}"));
    }
    let router = state.handle.router();
    let store = router.store();
    // Through the store, as `postern backend drain`: every instance obeys within its
    // watch interval; this one at once.
    if let Err(e) = store
        .set_backend_state(name, if on { Some("drain") } else { None })
        .await
    {
        return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    match store.backend_states().await {
        Ok(states) => state.handle.runtime().health.set_admin(&states),
        Err(e) => tracing::warn!(error = %e, "cannot re-read backend states"),
    }
    tracing::info!(
        backend = name,
        drain = on,
        "backend state set through the admin API"
    );
    json(
        StatusCode::OK,
        &json!({ "backend": name, "admin_state": if on { "drain" } else { "normal" } }),
    )
}

async fn reload(state: &State) -> Response<Body> {
    let _one_at_a_time = state.reloading.lock().await;
    match (state.reload)().await {
        Ok(generation) => json(
            StatusCode::OK,
            &json!({ "ok": true, "generation": generation }),
        ),
        Err(e) => json(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({ "ok": false, "error": e, "generation": state.handle.generation() }),
        ),
    }
}

async fn status(state: &State) -> Response<Body> {
    let m = metrics::get();
    let settings = state.handle.settings();
    let runtime = state.handle.runtime();
    let bound: HashMap<String, std::net::SocketAddr> =
        state.handle.local_addrs().await.into_iter().collect();
    let listeners: Vec<Value> = settings
        .listeners
        .iter()
        .map(|l| {
            let p = l.front.protocol();
            json!({
                "name": l.name,
                "protocol": p.as_str(),
                "address": bound.get(&l.name).map(|a| a.to_string()),
                "tls": l.tls_mode.as_str(),
                "connections": m.connection_count(p, &l.name),
                "preauth": m.session_count(p, &l.name, "preauth"),
                "relayed": m.session_count(p, &l.name, "relayed"),
            })
        })
        .collect();
    let protocols: Vec<Value> = PROTOCOLS
        .iter()
        .filter(|p| settings.listeners.iter().any(|l| l.front.protocol() == **p))
        .map(|&p| {
            let logins: serde_json::Map<String, Value> = LOGIN_RESULTS
                .iter()
                .map(|r| ((*r).to_owned(), json!(m.login_count(p, r))))
                .collect();
            let (conns, pre, rel) = settings
                .listeners
                .iter()
                .filter(|l| l.front.protocol() == p)
                .fold((0u64, 0i64, 0i64), |(c, a, b), l| {
                    (
                        c + m.connection_count(p, &l.name),
                        a + m.session_count(p, &l.name, "preauth"),
                        b + m.session_count(p, &l.name, "relayed"),
                    )
                });
            json!({
                "protocol": p.as_str(),
                "connections": conns,
                "preauth": pre,
                "relayed": rel,
                "logins": logins,
                "bytes_in": m.bytes_count(p, "client_to_backend"),
                "bytes_out": m.bytes_count(p, "backend_to_client"),
            })
        })
        .collect();
    let backends = backends(state).await;
    json(
        StatusCode::OK,
        &json!({
            "version": env!("CARGO_PKG_VERSION"),
            "hostname": settings.hostname,
            "generation": state.handle.generation(),
            "uptime_seconds": state.started.elapsed().as_secs(),
            "now": rfc3339(SystemTime::now()),
            "sessions": runtime.registry.len(),
            "listeners": listeners,
            "protocols": protocols,
            "backends": backends["backends"],
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded() {
        assert_eq!(
            param("user=alice%40example.test&x=1", "user").as_deref(),
            Some("alice@example.test")
        );
        assert_eq!(param("a=1&user=b+c", "user").as_deref(), Some("b c"));
        assert_eq!(param("user", "user").as_deref(), Some(""));
        assert_eq!(param("a=1", "user"), None);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
        assert_eq!(percent_decode("a%2Bb+c"), "a+b c");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
    }
}
