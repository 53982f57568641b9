//! Prometheus metrics: one process-wide registry (it outlives configuration reloads, so
//! counters never restart from zero), updated at the points where things happen, plus
//! the values read at scrape time (backend health, sessions per backend, route lookups,
//! the configuration generation).
//!
//! Every metric is named `postern_*`; docs/operations.md lists them with their labels.

use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use postern_proto::{Failure, Limit, Protocol, Verdict};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::backends::admit::Admission;
use crate::backends::health::Health;
use crate::registry::Registry as Sessions;
use crate::settings::Settings;

/// What the gauges mirror, read from the running server at scrape time (the caller
/// takes it from its handle; the metrics do not reach into the server).
#[derive(Clone, Copy)]
pub struct State<'a> {
    /// The configuration generation in use.
    pub generation: u64,
    /// Backend health.
    pub health: &'a Health,
    /// Logins in flight and waiting, per backend service.
    pub admission: &'a Admission,
    /// Live sessions.
    pub registry: &'a Sessions,
    /// The settings in use (which backends exist).
    pub settings: &'a Settings,
}

/// Login results, as counted in `postern_logins_total{result}`.
pub const LOGIN_RESULTS: [&str; 5] = ["accepted", "failed", "refused", "limited", "error"];

/// Every protocol, in display order.
pub const PROTOCOLS: [Protocol; 5] = [
    Protocol::Imap,
    Protocol::Pop3,
    Protocol::Submission,
    Protocol::Smtp,
    Protocol::Lmtp,
];

/// `protocol`, `listener`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// The protocol.
    pub protocol: &'static str,
    /// The listener's name.
    pub listener: String,
}

/// `protocol`, `listener`, `state` (`preauth` or `relayed`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    /// The protocol.
    pub protocol: &'static str,
    /// The listener's name.
    pub listener: String,
    /// `preauth` or `relayed`.
    pub state: &'static str,
}

/// `protocol`, `result`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoginLabels {
    /// The protocol.
    pub protocol: &'static str,
    /// One of [`LOGIN_RESULTS`].
    pub result: &'static str,
}

/// `protocol`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    /// The protocol.
    pub protocol: &'static str,
}

/// `limit`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// The abuse-control limit's name.
    pub limit: &'static str,
}

/// `protocol`, `direction`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// The protocol.
    pub protocol: &'static str,
    /// `client_to_backend` or `backend_to_client`.
    pub direction: &'static str,
}

/// `result`, `version`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    /// `ok` or `error`.
    pub result: &'static str,
    /// The negotiated version (`TLSv1_3`), empty on errors.
    pub version: &'static str,
}

/// `result`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// `backend`, `protocol`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendProtocolLabels {
    /// The backend's name.
    pub backend: String,
    /// The protocol.
    pub protocol: &'static str,
}

/// `backend`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// The backend's name.
    pub backend: String,
}

/// The process's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Connections accepted.
    pub connections: Family<ListenerLabels, Counter>,
    /// Open sessions by state.
    pub sessions: Family<SessionLabels, Gauge>,
    /// Login attempts by result.
    pub logins: Family<LoginLabels, Counter>,
    /// Failed logins (bad credentials, refused by the backend or the auth server).
    pub auth_failures: Family<ProtocolLabels, Counter>,
    /// Connections and logins refused by abuse control.
    pub limit_hits: Family<LimitLabels, Counter>,
    /// Bytes relayed.
    pub bytes: Family<BytesLabels, Counter>,
    /// Client TLS handshakes.
    pub tls: Family<TlsLabels, Counter>,
    /// Configuration reloads.
    pub reloads: Family<ResultLabels, Counter>,
    /// The configuration generation in use.
    pub generation: Gauge,
    /// Backend services up (1) or down (0), as health checks see them.
    pub backend_up: Family<BackendProtocolLabels, Gauge>,
    /// Backends under an operator's drain (1) or down (2); 0 otherwise.
    pub backend_admin: Family<BackendLabels, Gauge>,
    /// Live sessions per backend.
    pub backend_sessions: Family<BackendLabels, Gauge>,
    /// Process start, Unix seconds.
    pub start_time: Gauge,
    /// Logins holding an admission slot, per backend service.
    pub admission_in_flight: Family<BackendProtocolLabels, Gauge>,
    /// Logins waiting for an admission slot, per backend service.
    pub admission_queued: Family<BackendProtocolLabels, Gauge>,
    /// Logins refused by admission control, by reason.
    pub admission_refused: Family<AdmissionLabels, Counter>,
}

/// `backend`, `protocol`, `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// The backend's name.
    pub backend: String,
    /// The protocol.
    pub protocol: &'static str,
    /// `queue_full` or `deadline`.
    pub reason: &'static str,
}

/// The process-wide metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("postern");
        let m = Metrics {
            registry: Registry::default(),
            connections: Family::default(),
            sessions: Family::default(),
            logins: Family::default(),
            auth_failures: Family::default(),
            limit_hits: Family::default(),
            bytes: Family::default(),
            tls: Family::default(),
            reloads: Family::default(),
            generation: Gauge::default(),
            backend_up: Family::default(),
            backend_admin: Family::default(),
            backend_sessions: Family::default(),
            start_time: Gauge::default(),
            admission_in_flight: Family::default(),
            admission_queued: Family::default(),
            admission_refused: Family::default(),
        };
        registry.register(
            "backend_logins_in_flight",
            "Logins holding an admission slot (connecting or logging in), per backend service",
            m.admission_in_flight.clone(),
        );
        registry.register(
            "backend_login_queue",
            "Logins waiting for an admission slot, per backend service",
            m.admission_queued.clone(),
        );
        registry.register(
            "backend_admission_refused",
            "Logins refused by admission control: queue_full (at once) or deadline (waited until the pre-auth deadline)",
            m.admission_refused.clone(),
        );
        registry.register(
            "connections",
            "Client connections accepted",
            m.connections.clone(),
        );
        registry.register(
            "sessions",
            "Open client sessions, before login (preauth) and relayed",
            m.sessions.clone(),
        );
        registry.register("logins", "Login attempts by result", m.logins.clone());
        registry.register(
            "auth_failures",
            "Failed logins: wrong credentials, refused by the backend or the auth server",
            m.auth_failures.clone(),
        );
        registry.register(
            "limit_hits",
            "Connections and logins refused by abuse control, by limit",
            m.limit_hits.clone(),
        );
        registry.register(
            "relayed_bytes",
            "Bytes relayed after login",
            m.bytes.clone(),
        );
        registry.register(
            "tls_handshakes",
            "Client TLS handshakes (implicit and STARTTLS)",
            m.tls.clone(),
        );
        registry.register(
            "reloads",
            "Configuration reloads by result",
            m.reloads.clone(),
        );
        registry.register(
            "config_generation",
            "The configuration generation in use (1, then one more per reload)",
            m.generation.clone(),
        );
        registry.register(
            "backend_up",
            "Backend service health: 1 up, 0 down",
            m.backend_up.clone(),
        );
        registry.register(
            "backend_admin_state",
            "Operator state of a backend: 0 normal, 1 drain, 2 down",
            m.backend_admin.clone(),
        );
        registry.register(
            "backend_sessions",
            "Live sessions per backend",
            m.backend_sessions.clone(),
        );
        registry.register(
            "start_time_seconds",
            "Process start time, Unix seconds",
            m.start_time.clone(),
        );
        registry.register_collector(Box::new(RouteCollector));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
        m.start_time.set(now);
        Metrics { registry, ..m }
    }

    /// Reads what is known only at scrape time from the running server (health,
    /// sessions per backend, generation), then renders the Prometheus text format.
    pub fn render(&self, state: State<'_>) -> String {
        self.refresh(state);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// Updates the gauges that mirror the server's state.
    pub fn refresh(&self, state: State<'_>) {
        self.generation
            .set(i64::try_from(state.generation).unwrap_or(i64::MAX));
        let settings = state.settings;
        // Backends removed by a reload must disappear from the output.
        self.backend_up.clear();
        self.backend_admin.clear();
        self.backend_sessions.clear();
        for r in state.health.reports() {
            self.backend_up
                .get_or_create(&BackendProtocolLabels {
                    backend: r.backend.clone(),
                    protocol: r.protocol.as_str(),
                })
                .set(i64::from(r.up));
            let admin = match r.admin {
                None => 0,
                Some(crate::backends::health::AdminState::Drain) => 1,
                Some(crate::backends::health::AdminState::Down) => 2,
            };
            self.backend_admin
                .get_or_create(&BackendLabels { backend: r.backend })
                .set(admin);
        }
        self.admission_in_flight.clear();
        self.admission_queued.clear();
        for r in state.admission.reports() {
            let labels = BackendProtocolLabels {
                backend: r.backend,
                protocol: r.protocol.as_str(),
            };
            self.admission_in_flight
                .get_or_create(&labels)
                .set(i64::from(r.in_flight));
            self.admission_queued
                .get_or_create(&labels)
                .set(i64::try_from(r.queued).unwrap_or(i64::MAX));
        }
        let per_backend = state.registry.per_backend();
        for name in settings.backends.keys() {
            let n = per_backend.get(name).copied().unwrap_or(0);
            self.backend_sessions
                .get_or_create(&BackendLabels {
                    backend: name.clone(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// A counter's value (for the status page).
    pub fn login_count(&self, protocol: Protocol, result: &'static str) -> u64 {
        self.logins
            .get(&LoginLabels {
                protocol: protocol.as_str(),
                result,
            })
            .map_or(0, |c| c.get())
    }

    /// Bytes relayed for a protocol in one direction (for the status page).
    pub fn bytes_count(&self, protocol: Protocol, direction: &'static str) -> u64 {
        self.bytes
            .get(&BytesLabels {
                protocol: protocol.as_str(),
                direction,
            })
            .map_or(0, |c| c.get())
    }

    /// Connections accepted on one listener (for the status page).
    pub fn connection_count(&self, protocol: Protocol, listener: &str) -> u64 {
        self.connections
            .get(&ListenerLabels {
                protocol: protocol.as_str(),
                listener: listener.to_owned(),
            })
            .map_or(0, |c| c.get())
    }

    /// Open sessions of one listener in one state (for the status page).
    pub fn session_count(&self, protocol: Protocol, listener: &str, state: &'static str) -> i64 {
        self.sessions
            .get(&SessionLabels {
                protocol: protocol.as_str(),
                listener: listener.to_owned(),
                state,
            })
            .map_or(0, |g| g.get())
    }
}

/// Route lookups: read from the route crate's process-wide totals at scrape time.
#[derive(Debug)]
struct RouteCollector;

impl Collector for RouteCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use postern_route::stats::{LATENCY_BUCKETS_US, PROCESS};
        use std::sync::atomic::Ordering::Relaxed;
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct RouteResult {
            result: &'static str,
        }
        let mut lookups = encoder.encode_descriptor(
            "route_lookups",
            "Route lookups by result: hit (cache), miss (store answered), stale (store failed, cached route served), error (store failed, nothing served)",
            None,
            MetricType::Counter,
        )?;
        for (result, v) in [
            ("hit", &PROCESS.hits),
            ("miss", &PROCESS.misses),
            ("stale", &PROCESS.stale),
            ("error", &PROCESS.errors),
        ] {
            let c = ConstCounter::new(v.load(Relaxed));
            c.encode(lookups.encode_family(&RouteResult { result })?)?;
        }
        let assigned = ConstCounter::new(PROCESS.assigned.load(Relaxed));
        assigned.encode(encoder.encode_descriptor(
            "route_assignments",
            "Users assigned a backend at their first login",
            None,
            assigned.metric_type(),
        )?)?;
        let latency = PROCESS.latency();
        let mut previous = 0;
        let buckets: Vec<(f64, u64)> = latency
            .cumulative
            .iter()
            .enumerate()
            .map(|(i, &cum)| {
                let upper = LATENCY_BUCKETS_US
                    .get(i)
                    .map_or(f64::INFINITY, |&us| us as f64 / 1e6);
                let n = cum.saturating_sub(previous);
                previous = cum;
                (upper, n)
            })
            .collect();
        let mut h = encoder.encode_descriptor(
            "route_store_lookup_seconds",
            "Latency of route store lookups (cache misses)",
            None,
            MetricType::Histogram,
        )?;
        h.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            latency.sum_us as f64 / 1e6,
            latency.count,
            &buckets,
            None,
        )
    }
}

// ---- recording points -------------------------------------------------------------

/// The gauge of one listener's sessions in one state. Gauges are shared handles: a
/// session keeps the handle (8 bytes), not the labels it was found by.
fn session_gauge(protocol: Protocol, listener: &str, state: &'static str) -> Gauge {
    get()
        .sessions
        .get_or_create(&SessionLabels {
            protocol: protocol.as_str(),
            listener: listener.to_owned(),
            state,
        })
        .clone()
}

/// A listener's session metrics, found in their families once per listener and
/// configuration generation instead of once per connection: each lookup hashes the
/// labels and copies the listener's name, four times per login. The first call's
/// protocol and name are the ones kept: a listener has one of each.
#[derive(Clone, Debug, Default)]
pub struct ListenerMeters(OnceLock<Arc<Meters>>);

#[derive(Debug)]
pub(crate) struct Meters {
    connections: Counter,
    preauth: Gauge,
    relayed: Gauge,
}

impl ListenerMeters {
    fn get(&self, protocol: Protocol, listener: &str) -> &Arc<Meters> {
        self.0.get_or_init(|| {
            let connections = get()
                .connections
                .get_or_create(&ListenerLabels {
                    protocol: protocol.as_str(),
                    listener: listener.to_owned(),
                })
                .clone();
            Arc::new(Meters {
                connections,
                preauth: session_gauge(protocol, listener, "preauth"),
                relayed: session_gauge(protocol, listener, "relayed"),
            })
        })
    }

    /// A connection accepted on the listener; the returned guard keeps it counted as
    /// an open pre-auth session until dropped.
    pub(crate) fn connection(&self, protocol: Protocol, listener: &str) -> SessionGauge {
        let meters = self.get(protocol, listener);
        meters.connections.inc();
        meters.preauth.inc();
        SessionGauge(Arc::clone(meters))
    }

    /// The session logged in and is being relayed: while the guard lives it counts as
    /// `relayed` instead of `preauth`.
    pub(crate) fn relaying(&self, protocol: Protocol, listener: &str) -> Relaying {
        let meters = self.get(protocol, listener);
        meters.preauth.dec();
        meters.relayed.inc();
        Relaying(Arc::clone(meters))
    }
}

/// Counts a session as open in one state while alive.
#[derive(Debug)]
pub(crate) struct SessionGauge(Arc<Meters>);

impl Drop for SessionGauge {
    fn drop(&mut self) {
        self.0.preauth.dec();
    }
}

/// See [`ListenerMeters::relaying`].
#[derive(Debug)]
pub(crate) struct Relaying(Arc<Meters>);

impl Drop for Relaying {
    fn drop(&mut self) {
        self.0.relayed.dec();
        self.0.preauth.inc();
    }
}

/// A login got no admission slot.
pub(crate) fn admission_refused(
    backend: &str,
    protocol: Protocol,
    why: crate::backends::admit::Refused,
) {
    get()
        .admission_refused
        .get_or_create(&AdmissionLabels {
            backend: backend.to_owned(),
            protocol: protocol.as_str(),
            reason: why.as_str(),
        })
        .inc();
}

/// The result label of a login's verdict.
pub fn login_result(verdict: &Verdict) -> &'static str {
    match verdict {
        Verdict::Accepted(_) => "accepted",
        Verdict::Refused(_) => "refused",
        Verdict::Failed(Failure::AuthFailed) => "failed",
        Verdict::Failed(Failure::Limited(_)) => "limited",
        Verdict::Failed(_) => "error",
    }
}

/// One login attempt ended with `verdict`.
pub(crate) fn login(protocol: Protocol, verdict: &Verdict) {
    let m = get();
    let result = login_result(verdict);
    m.logins
        .get_or_create(&LoginLabels {
            protocol: protocol.as_str(),
            result,
        })
        .inc();
    match verdict {
        Verdict::Failed(Failure::AuthFailed) | Verdict::Refused(_) => {
            m.auth_failures
                .get_or_create(&ProtocolLabels {
                    protocol: protocol.as_str(),
                })
                .inc();
        }
        Verdict::Failed(Failure::Limited(limit)) => limit_hit(*limit),
        _ => {}
    }
}

/// Abuse control refused a connection or a login.
pub(crate) fn limit_hit(limit: Limit) {
    get()
        .limit_hits
        .get_or_create(&LimitLabels {
            limit: limit.as_str(),
        })
        .inc();
}

/// Bytes relayed by one session.
pub(crate) fn relayed_bytes(protocol: Protocol, client_to_backend: u64, backend_to_client: u64) {
    let m = get();
    for (direction, n) in [
        ("client_to_backend", client_to_backend),
        ("backend_to_client", backend_to_client),
    ] {
        m.bytes
            .get_or_create(&BytesLabels {
                protocol: protocol.as_str(),
                direction,
            })
            .inc_by(n);
    }
}

/// A client TLS handshake: the negotiated version, or `None` when it failed.
pub(crate) fn tls_handshake(version: Option<&'static str>) {
    let labels = match version {
        Some(version) => TlsLabels {
            result: "ok",
            version,
        },
        None => TlsLabels {
            result: "error",
            version: "",
        },
    };
    get().tls.get_or_create(&labels).inc();
}

/// A configuration reload was attempted.
pub fn reload(ok: bool) {
    get()
        .reloads
        .get_or_create(&ResultLabels {
            result: if ok { "ok" } else { "error" },
        })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_results_are_labelled() {
        use postern_proto::Limit;
        assert_eq!(
            login_result(&Verdict::Failed(Failure::AuthFailed)),
            "failed"
        );
        assert_eq!(
            login_result(&Verdict::Failed(Failure::Limited(Limit::UserSessions))),
            "limited"
        );
        assert_eq!(
            login_result(&Verdict::Failed(Failure::Unavailable)),
            "error"
        );
        let before = get().login_count(Protocol::Pop3, "limited");
        login(
            Protocol::Pop3,
            &Verdict::Failed(Failure::Limited(Limit::AuthFailures)),
        );
        assert_eq!(get().login_count(Protocol::Pop3, "limited"), before + 1);
    }

    #[test]
    fn session_states_balance() {
        let meters = ListenerMeters::default();
        let g = meters.connection(Protocol::Lmtp, "test-balance");
        assert_eq!(
            get().session_count(Protocol::Lmtp, "test-balance", "preauth"),
            1
        );
        {
            let _r = meters.relaying(Protocol::Lmtp, "test-balance");
            assert_eq!(
                get().session_count(Protocol::Lmtp, "test-balance", "preauth"),
                0
            );
            assert_eq!(
                get().session_count(Protocol::Lmtp, "test-balance", "relayed"),
                1
            );
        }
        drop(g);
        assert_eq!(
            get().session_count(Protocol::Lmtp, "test-balance", "preauth"),
            0
        );
        assert_eq!(
            get().session_count(Protocol::Lmtp, "test-balance", "relayed"),
            0
        );
        assert_eq!(get().connection_count(Protocol::Lmtp, "test-balance"), 1);
        // A reload builds the listener's settings again, with meters of their own:
        // they count in the same series, and a session of the old generation still
        // balances its gauge.
        let old = meters.connection(Protocol::Lmtp, "test-balance");
        let reloaded = ListenerMeters::default();
        let new = reloaded.connection(Protocol::Lmtp, "test-balance");
        assert_eq!(
            get().session_count(Protocol::Lmtp, "test-balance", "preauth"),
            2
        );
        assert_eq!(get().connection_count(Protocol::Lmtp, "test-balance"), 3);
        drop((old, new));
        assert_eq!(
            get().session_count(Protocol::Lmtp, "test-balance", "preauth"),
            0
        );
    }

    #[test]
    fn text_format_has_route_histogram() {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &get().registry).unwrap();
        assert!(
            out.contains("postern_route_lookups_total{result=\"hit\"}"),
            "{out}"
        );
        assert!(
            out.contains("postern_route_store_lookup_seconds_bucket{le=\"+Inf\"}"),
            "{out}"
        );
        assert!(
            out.contains("# TYPE postern_connections_total counter"),
            "{out}"
        );
    }
}
