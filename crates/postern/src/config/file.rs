//! The configuration file as written by the operator: serde structs that mirror the TOML
//! one to one. Unknown keys are errors (a typo must not silently leave a safe default
//! off). Every field is documented in docs/config.md; keep the two in step.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// `[server]`: instance-wide settings.
    #[serde(default)]
    pub server: Server,
    /// `[log]`: logging.
    #[serde(default)]
    pub log: Log,
    /// `[admin]`: the admin HTTP listener (none without this section).
    pub admin: Option<Admin>,
    /// `[tls]`: the default certificate for TLS listeners.
    pub tls: Option<Tls>,
    /// `[timeouts]`: timers.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// `[imap]`: IMAP front-end limits and texts.
    #[serde(default)]
    pub imap: Imap,
    /// `[pop3]`: POP3 front-end limits and texts.
    #[serde(default)]
    pub pop3: Pop3,
    /// `[submission]`: the submission front end (587, 465).
    #[serde(default)]
    pub submission: Submission,
    /// `[smtp]`: the MX relay front end (25).
    #[serde(default)]
    pub smtp: Relay,
    /// `[lmtp]`: the LMTP front end.
    #[serde(default = "Relay::lmtp")]
    pub lmtp: Relay,
    /// `[routing]`: where users go.
    pub routing: Routing,
    /// `[health]`: active health checks.
    #[serde(default)]
    pub health: Health,
    /// `[limits]`: abuse control.
    #[serde(default)]
    pub limits: Limits,
    /// `[auth]`: who checks credentials.
    #[serde(default)]
    pub auth: Auth,
    /// `[pools.NAME]`: pool policies.
    #[serde(default)]
    pub pools: BTreeMap<String, Pool>,
    /// `[backends.NAME]`: the mail servers (optional only when an auth_http server
    /// names them).
    #[serde(default)]
    pub backends: BTreeMap<String, Backend>,
    /// `[[listeners]]`: the sockets clients connect to.
    pub listeners: Vec<Listener>,
}

/// `[server]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// This server's name, as clients see it (APOP timestamps, SMTP greetings).
    pub hostname: Option<String>,
}

/// `[health]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    /// Run active checks.
    pub enabled: bool,
    /// Time between checks of one backend service.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Bound on one check.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes to come back up.
    pub rise: u32,
    /// Consecutive failures to go down.
    pub fall: u32,
    /// How long a service never seen up stays unknown after start.
    #[serde(with = "humantime_serde")]
    pub startup_grace: Duration,
}

impl Default for Health {
    fn default() -> Self {
        let h = postern_server::settings::HealthSettings::default();
        Self {
            enabled: h.enabled,
            interval: h.interval,
            timeout: h.timeout,
            rise: h.rise,
            fall: h.fall,
            startup_grace: h.startup_grace,
        }
    }
}

/// `pools.NAME.mode`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PoolMode {
    /// Each backend owns its users' mail.
    #[default]
    OwnStorage,
    /// The backends share one store.
    Shared,
}

/// `pools.NAME.failover`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PoolFailover {
    /// Re-pin for good.
    #[default]
    Repin,
    /// Only for the outage.
    Temporary,
}

/// `[pools.NAME]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Pool {
    /// Shared store or own storage.
    pub mode: PoolMode,
    /// What a failover writes (shared pools).
    pub failover: PoolFailover,
}

/// `[log]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// A tracing filter such as `info` or `postern_server=debug,info`; `RUST_LOG` wins.
    pub level: String,
    /// The JSON access log: `"off"`, `"stdout"` or a file path.
    pub access: String,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            level: "info".into(),
            access: "off".into(),
        }
    }
}

/// `[admin]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Address of the admin HTTP listener.
    pub bind: SocketAddr,
    /// Bearer token, inline.
    pub token: Option<String>,
    /// Bearer token, the first line of this file.
    pub token_file: Option<PathBuf>,
}

/// A certificate chain and its key, PEM files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Certificate chain (leaf first).
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// `[tls.sni."NAME"]`: certificates chosen by the client's SNI name.
    #[serde(default)]
    pub sni: BTreeMap<String, CertPair>,
}

/// A certificate chain and its key (`[tls.sni."NAME"]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertPair {
    /// Certificate chain (leaf first).
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// `[timeouts]`, as humantime durations (`60s`, `31m`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// From accept to login, TLS handshake included.
    #[serde(with = "humantime_serde")]
    pub preauth: Duration,
    /// TCP connect to a backend.
    #[serde(with = "humantime_serde")]
    pub backend_connect: Duration,
    /// Backend greeting to its answer to the login.
    #[serde(with = "humantime_serde")]
    pub backend_login: Duration,
    /// After login, no traffic either way for this long closes the session.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// MX and LMTP relay: the wait for a command, a reply or a chunk of data.
    #[serde(with = "humantime_serde")]
    pub smtp: Duration,
    /// On SIGTERM, how long relayed sessions may run on before they are closed.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let t = postern_server::Timeouts::default();
        Self {
            preauth: t.preauth,
            backend_connect: t.backend_connect,
            backend_login: t.backend_login,
            idle: t.idle,
            smtp: t.smtp,
            shutdown_grace: t.shutdown_grace,
        }
    }
}

/// `[limits]`: abuse control (see `postern_limits::Settings`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Networks (or addresses) exempt from per-address limits and the delay.
    pub trusted_networks: Vec<String>,
    /// IPv6 clients are counted per prefix of this length.
    pub ipv6_prefix: u8,
    /// Sliding window of failed logins.
    #[serde(with = "humantime_serde")]
    pub failure_window: Duration,
    /// Failed logins per address per window.
    pub max_failures_per_ip: u32,
    /// Failed logins per user per window.
    pub max_failures_per_user: u32,
    /// Delay before answering the first failure; doubles per failure.
    #[serde(with = "humantime_serde")]
    pub failure_delay: Duration,
    /// Longest delay.
    #[serde(with = "humantime_serde")]
    pub max_failure_delay: Duration,
    /// Concurrent connections per address.
    pub max_connections_per_ip: u32,
    /// New connections per address per minute.
    pub connection_rate_per_ip: u32,
    /// Concurrent sessions per user.
    pub max_sessions_per_user: u32,
    /// Addresses and users tracked at most.
    pub max_tracked: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let l = postern_limits::Settings::default();
        Self {
            trusted_networks: Vec::new(),
            ipv6_prefix: l.ipv6_prefix,
            failure_window: l.failure_window,
            max_failures_per_ip: l.max_failures_per_ip,
            max_failures_per_user: l.max_failures_per_user,
            failure_delay: l.failure_delay,
            max_failure_delay: l.max_failure_delay,
            max_connections_per_ip: l.max_connections_per_ip,
            connection_rate_per_ip: l.connection_rate_per_ip,
            max_sessions_per_user: l.max_sessions_per_user,
            max_tracked: l.max_tracked,
        }
    }
}

/// `[imap]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Imap {
    /// Greeting text after the capability code.
    pub greeting: String,
    /// Longest pre-auth command, literals included.
    pub max_line_length: usize,
    /// Largest pre-auth literal.
    pub max_literal_size: usize,
    /// Invalid commands before the connection is closed.
    pub max_bad_commands: u32,
    /// Failed logins per connection before it is closed.
    pub max_auth_failures: u32,
    /// Commands of any kind accepted before authentication.
    pub max_commands: u32,
    /// Offer XOAUTH2 and OAUTHBEARER; tokens are passed to the backend to check.
    pub oauth: bool,
}

impl Default for Imap {
    fn default() -> Self {
        let o = postern_imap::Options::default();
        Self {
            greeting: o.greeting,
            max_line_length: o.max_line,
            max_literal_size: o.max_literal,
            max_bad_commands: o.max_bad_commands,
            max_auth_failures: o.max_auth_failures,
            max_commands: o.max_commands,
            oauth: o.oauth,
        }
    }
}

/// `[pop3]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pop3 {
    /// Greeting text after `+OK `.
    pub greeting: String,
    /// Longest pre-auth command or SASL line, CRLF included.
    pub max_line_length: usize,
    /// Invalid commands before the connection is closed.
    pub max_bad_commands: u32,
    /// Failed logins per connection before it is closed.
    pub max_auth_failures: u32,
    /// Commands of any kind accepted before authentication.
    pub max_commands: u32,
    /// Offer XOAUTH2 and OAUTHBEARER; tokens are passed to the backend to check.
    pub oauth: bool,
    /// Accept APOP (needs plaintext passwords from the route store's lookup query).
    pub apop: bool,
}

impl Default for Pop3 {
    fn default() -> Self {
        let o = postern_pop3::Options::default();
        Self {
            greeting: o.greeting,
            max_line_length: o.max_line,
            max_bad_commands: o.max_bad_commands,
            max_auth_failures: o.max_auth_failures,
            max_commands: o.max_commands,
            oauth: o.oauth,
            apop: o.apop,
        }
    }
}

/// `[submission]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Submission {
    /// Text after `220 <hostname> ESMTP `.
    pub greeting: String,
    /// Longest command line, CRLF included.
    pub max_line_length: usize,
    /// Longest AUTH line or SASL response, CRLF included.
    pub max_auth_line_length: usize,
    /// Invalid commands before the connection is closed.
    pub max_bad_commands: u32,
    /// Failed authentications per connection before it is closed.
    pub max_auth_failures: u32,
    /// Commands of any kind accepted before authentication.
    pub max_commands: u32,
    /// Offer XOAUTH2 and OAUTHBEARER; tokens are passed to the backend to check.
    pub oauth: bool,
}

impl Default for Submission {
    fn default() -> Self {
        let o = postern_smtp::Options::default();
        Self {
            greeting: o.greeting,
            max_line_length: o.max_line,
            max_auth_line_length: o.max_auth_line,
            max_bad_commands: o.max_bad_commands,
            max_auth_failures: o.max_auth_failures,
            max_commands: o.max_commands,
            oauth: o.oauth,
        }
    }
}

/// `[smtp]` and `[lmtp]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Relay {
    /// Text after `220 <hostname> ESMTP ` (or `LMTP `).
    pub greeting: String,
    /// Send XCLIENT with the real client to the backend (and refuse backends without it).
    pub xclient: bool,
    /// Longest command line, CRLF included.
    pub max_line_length: usize,
    /// Recipients per transaction.
    pub max_recipients: usize,
    /// Invalid commands before the connection is closed.
    pub max_bad_commands: u32,
}

impl Default for Relay {
    fn default() -> Self {
        Self::from(postern_smtp::RelayOptions::mx())
    }
}

impl Relay {
    fn lmtp() -> Self {
        Self::from(postern_smtp::RelayOptions::lmtp())
    }
}

impl From<postern_smtp::RelayOptions> for Relay {
    fn from(o: postern_smtp::RelayOptions) -> Self {
        Self {
            greeting: o.greeting,
            xclient: o.xclient,
            max_line_length: o.max_line,
            max_recipients: o.max_recipients,
            max_bad_commands: o.max_bad_commands,
        }
    }
}

/// `routing.store`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// `[routing.sql]`: SQLite, MySQL/MariaDB or PostgreSQL.
    #[default]
    Sql,
    /// `[routing.static]`.
    Static,
}

/// `routing.unknown_users`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnknownUsers {
    /// Refuse the login.
    #[default]
    Reject,
    /// Pick a backend by consistent hash, not written.
    Hash,
    /// Pick a backend and pin the user there.
    Assign,
}

/// `routing.assign_policy`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AssignPolicy {
    /// Fewest pinned users per unit of weight.
    #[default]
    LeastLoaded,
    /// Consistent hash of the user name.
    Hash,
}

/// `[routing]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    /// Which store holds the pins.
    #[serde(default)]
    pub store: StoreKind,
    /// What to do with users without a pin.
    #[serde(default)]
    pub unknown_users: UnknownUsers,
    /// How `assign` picks a backend.
    #[serde(default)]
    pub assign_policy: AssignPolicy,
    /// How often the change log is polled for moves and kicks.
    #[serde(default = "one_second", with = "humantime_serde")]
    pub watch_interval: Duration,
    /// This instance's id in the `instances` table (default: host:pid:start).
    pub instance_id: Option<String>,
    /// `[routing.normalize]`.
    #[serde(default)]
    pub normalize: Normalize,
    /// `[routing.cache]`.
    #[serde(default)]
    pub cache: Cache,
    /// `[routing.moves]`.
    #[serde(default)]
    pub moves: Moves,
    /// Most failovers per second from this instance (0: unlimited).
    #[serde(default = "fifty")]
    pub failover_rate: u32,
    /// `[routing.sql]`.
    pub sql: Option<Sql>,
    /// `[routing.static]`: user = backend.
    #[serde(rename = "static")]
    pub static_routes: Option<BTreeMap<String, String>>,
}

fn fifty() -> u32 {
    50
}

fn one_second() -> Duration {
    Duration::from_secs(1)
}

/// `[routing.normalize]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Normalize {
    /// Lower-case user names.
    pub lowercase: bool,
    /// Strip surrounding white space.
    pub trim: bool,
    /// Appended to names without `@`.
    pub default_domain: Option<String>,
    /// Log in to backends with the normalized name instead of the name as typed.
    pub apply_to_backend_login: bool,
}

impl Default for Normalize {
    fn default() -> Self {
        Self {
            lowercase: true,
            trim: true,
            default_domain: None,
            apply_to_backend_login: true,
        }
    }
}

/// `[routing.sql]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sql {
    /// `sqlite:PATH`, `mysql://...`, `postgres://...`.
    pub url: String,
    /// Pool size.
    #[serde(default = "eight")]
    pub max_connections: u32,
    /// Connect (and pool wait) bound.
    #[serde(default = "five_seconds", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Per-statement bound.
    #[serde(default = "two_seconds", with = "humantime_serde")]
    pub query_timeout: Duration,
    /// The operator's lookup query over an existing user table.
    pub lookup_query: Option<String>,
    /// Apply Postern's schema migrations when opening.
    #[serde(default = "yes")]
    pub migrate: bool,
    /// `wsrep_sync_wait = 1` on MySQL-dialect connections; unset: when the server
    /// reports `wsrep_on`.
    pub sync_wait: Option<bool>,
}

fn eight() -> u32 {
    8
}

fn two_seconds() -> Duration {
    Duration::from_secs(2)
}

fn five_seconds() -> Duration {
    Duration::from_secs(5)
}

/// `[routing.cache]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cache {
    /// Serve a found route without asking the store for this long.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Remember "no such user" for this long.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// Serve a found route this long after it was fetched while the store fails.
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    /// Most users cached.
    pub capacity: usize,
}

impl Default for Cache {
    fn default() -> Self {
        let c = postern_route::CacheOptions::default();
        Self {
            ttl: c.ttl,
            negative_ttl: c.negative_ttl,
            stale_if_error: c.stale_if_error,
            capacity: c.capacity,
        }
    }
}

/// `[routing.moves]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Moves {
    /// Logins of a user being moved get a temporary failure for at most this long.
    #[serde(with = "humantime_serde")]
    pub hold: Duration,
    /// How long a move or kick waits for every live instance to confirm.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Instances silent for longer than this are considered gone.
    #[serde(with = "humantime_serde")]
    pub live_within: Duration,
    /// How long `route move` retries a failing store before it says what it left.
    #[serde(with = "humantime_serde")]
    pub store_patience: Duration,
}

impl Default for Moves {
    fn default() -> Self {
        let f = postern_route::moves::FenceOptions::default();
        Self {
            hold: f.hold,
            ack_timeout: f.ack_timeout,
            live_within: f.live_within,
            store_patience: f.store_patience,
        }
    }
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

fn default_pool() -> String {
    "default".into()
}

/// `[backends.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// Host name or address.
    pub host: String,
    /// Share of new users.
    #[serde(default = "one")]
    pub weight: u32,
    /// The pool the backend belongs to.
    #[serde(default = "default_pool")]
    pub pool: String,
    /// `[backends.NAME.imap]`.
    pub imap: Option<ImapBackend>,
    /// `[backends.NAME.pop3]`.
    pub pop3: Option<Pop3Backend>,
    /// `[backends.NAME.submission]`.
    pub submission: Option<SubmissionBackend>,
    /// `[backends.NAME.smtp]`: where MX mail goes.
    pub smtp: Option<PlainEndpoint>,
    /// `[backends.NAME.lmtp]`: where LMTP deliveries go.
    pub lmtp: Option<PlainEndpoint>,
    /// `[backends.NAME.tls]`: TLS client settings.
    pub tls: Option<BackendTlsFile>,
    /// `[backends.NAME.health]`: probe login.
    pub health: Option<BackendHealth>,
    /// `[backends.NAME.admission]`: logins in flight and waiting.
    #[serde(default)]
    pub admission: BackendAdmission,
}

/// `[backends.NAME.admission]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendAdmission {
    /// Connects and logins in flight at once per service; 0: no cap.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// Logins waiting for a slot per service; beyond it, the temporary failure.
    #[serde(default = "default_max_queue")]
    pub queue: u32,
}

impl Default for BackendAdmission {
    fn default() -> Self {
        Self {
            max_in_flight: default_max_in_flight(),
            queue: default_max_queue(),
        }
    }
}

fn default_max_in_flight() -> u32 {
    postern_server::backends::admission::Limits::default().max_in_flight
}

fn default_max_queue() -> u32 {
    postern_server::backends::admission::Limits::default().max_queue
}

/// `backends.NAME.submission.login`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SubmissionLogin {
    /// Replay AUTH.
    #[default]
    Auth,
    /// Postfix XCLIENT.
    Xclient,
}

/// `backends.NAME.submission.auth`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SubmissionAuth {
    /// PLAIN if offered (or needed), else LOGIN.
    #[default]
    Auto,
    /// AUTH PLAIN.
    Plain,
    /// AUTH LOGIN.
    Login,
}

/// `[backends.NAME.submission]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmissionBackend {
    /// TCP port.
    pub port: u16,
    /// How the session is opened.
    #[serde(default)]
    pub login: SubmissionLogin,
    /// Which SASL mechanism replays credentials.
    #[serde(default)]
    pub auth: SubmissionAuth,
    /// TLS to this service.
    #[serde(default)]
    pub tls: BackendTlsMode,
    /// PROXY protocol header to this service.
    #[serde(default)]
    pub proxy_protocol: ProxyVersion,
}

/// `[backends.NAME.smtp]`, `[backends.NAME.lmtp]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlainEndpoint {
    /// TCP port.
    pub port: u16,
    /// TLS to this service.
    #[serde(default)]
    pub tls: BackendTlsMode,
    /// PROXY protocol header to this service.
    #[serde(default)]
    pub proxy_protocol: ProxyVersion,
}

/// `[backends.NAME.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTlsFile {
    /// CA certificates (PEM); default: the system's roots.
    pub ca: Option<PathBuf>,
    /// Client certificate chain (mTLS).
    pub cert: Option<PathBuf>,
    /// Client key (mTLS).
    pub key: Option<PathBuf>,
    /// Name sent as SNI and required in the certificate (default: host).
    pub name: Option<String>,
}

/// `[backends.NAME.health]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendHealth {
    /// User the checks log in as.
    pub probe_user: String,
    /// Its password.
    pub probe_password: String,
}

/// `backends.NAME.*.tls`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendTlsMode {
    /// Plaintext.
    #[default]
    None,
    /// The protocol's STARTTLS.
    Starttls,
    /// TLS from the first byte.
    Implicit,
}

/// `backends.NAME.*.proxy_protocol`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// No header.
    #[default]
    None,
    /// Version 1.
    V1,
    /// Version 2.
    V2,
}

/// `backends.NAME.pop3.login`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pop3Login {
    /// AUTH PLAIN with an initial response.
    #[default]
    Plain,
    /// USER then PASS.
    User,
}

/// `backends.NAME.pop3.forward_client`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pop3Forward {
    /// Nothing.
    #[default]
    None,
    /// Dovecot's XCLIENT ADDR/PORT/SESSION.
    Xclient,
}

/// `[backends.NAME.pop3]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pop3Backend {
    /// TCP port.
    pub port: u16,
    /// TLS to this service.
    #[serde(default)]
    pub tls: BackendTlsMode,
    /// PROXY protocol header to this service.
    #[serde(default)]
    pub proxy_protocol: ProxyVersion,
    /// How to replay credentials.
    #[serde(default)]
    pub login: Pop3Login,
    /// How to tell the backend the client's address.
    #[serde(default)]
    pub forward_client: Pop3Forward,
}

/// `backends.NAME.imap.login`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ImapLogin {
    /// AUTHENTICATE PLAIN when the backend offers SASL-IR and PLAIN, else LOGIN.
    #[default]
    Auto,
    /// LOGIN with literals.
    Login,
    /// AUTHENTICATE PLAIN.
    Authenticate,
}

/// `backends.NAME.imap.forward_client`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ForwardClient {
    /// Nothing.
    #[default]
    None,
    /// ID with x-originating-ip and friends.
    Id,
}

/// `[backends.NAME.imap]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImapBackend {
    /// TCP port.
    pub port: u16,
    /// TLS to this service.
    #[serde(default)]
    pub tls: BackendTlsMode,
    /// PROXY protocol header to this service.
    #[serde(default)]
    pub proxy_protocol: ProxyVersion,
    /// How to replay credentials.
    #[serde(default)]
    pub login: ImapLogin,
    /// How to tell the backend the client's address.
    #[serde(default)]
    pub forward_client: ForwardClient,
}

/// `listeners[].protocol`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// IMAP.
    Imap,
    /// POP3.
    Pop3,
    /// Message submission with AUTH.
    Submission,
    /// MX relay.
    Smtp,
    /// LMTP delivery.
    Lmtp,
}

/// `listeners[].tls`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plaintext only.
    None,
    /// Plaintext upgraded by STARTTLS.
    Starttls,
    /// TLS from the first byte.
    Implicit,
}

/// `[[listeners]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Name for logs (default: protocol-address).
    pub name: Option<String>,
    /// The protocol spoken.
    pub protocol: Protocol,
    /// Address and port.
    pub bind: SocketAddr,
    /// TLS use.
    pub tls: TlsMode,
    /// Allow authentication before TLS.
    #[serde(default)]
    pub insecure_plaintext_auth: bool,
    /// Networks allowed to send a PROXY protocol header (enables PROXY in).
    #[serde(default)]
    pub accept_proxy_from: Vec<String>,
    /// Certificate overriding `[tls]`.
    pub cert: Option<PathBuf>,
    /// Key overriding `[tls]`.
    pub key: Option<PathBuf>,
    /// Authentication mode overriding `auth.mode`.
    pub auth: Option<AuthMode>,
}

/// `auth.mode`, `listeners[].auth`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// The backend checks the credentials.
    #[default]
    Backend,
    /// Postern checks the password against the route store's hash.
    Proxy,
    /// An nginx auth_http server decides.
    Http,
}

/// `[auth]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// Default mode of every listener.
    pub mode: AuthMode,
    /// Password checks at once (0: the number of CPUs).
    pub max_parallel_checks: usize,
    /// Scheme of the stand-in hash unknown users are checked against.
    pub dummy_scheme: String,
    /// `[auth.master]`: log in to backends as a master user after a proxy check.
    pub master: Option<Master>,
    /// `[auth.http]`: the nginx auth_http server.
    pub http: Option<AuthHttp>,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            mode: AuthMode::Backend,
            max_parallel_checks: 0,
            dummy_scheme: "SHA512-CRYPT".into(),
            master: None,
            http: None,
        }
    }
}

/// `[auth.master]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Master {
    /// The master user's name.
    pub user: String,
    /// Its password (or `password_file`).
    pub password: Option<String>,
    /// A file holding the password (first line), relative to the config file.
    pub password_file: Option<PathBuf>,
    /// `"separator"` (`user*master`) or `"authzid"` (SASL PLAIN authorization id).
    #[serde(default)]
    pub style: MasterStyle,
    /// For `style = "separator"`: Dovecot's `auth_master_user_separator`.
    #[serde(default = "default_separator")]
    pub separator: String,
}

fn default_separator() -> String {
    "*".into()
}

/// `auth.master.style`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum MasterStyle {
    /// `user*master`.
    #[default]
    Separator,
    /// SASL PLAIN authzid.
    Authzid,
}

/// `[auth.http]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthHttp {
    /// `http://host[:port][/uri]` or `unix:/path[:/uri]`, as nginx's `auth_http`.
    pub url: String,
    /// For the whole exchange (nginx `auth_http_timeout`).
    #[serde(default = "default_auth_http_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Extra request headers (nginx `auth_http_header`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_auth_http_timeout() -> Duration {
    Duration::from_secs(60)
}
