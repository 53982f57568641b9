//! Validated runtime settings. The binary's config layer parses TOML into these; tests
//! build them directly.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use postern_proto::Protocol;

/// Everything the server needs to run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The listening sockets.
    pub listeners: Vec<Arc<ListenerSettings>>,
    /// Backends by name.
    pub backends: BTreeMap<String, Arc<Backend>>,
    /// Timers.
    pub timeouts: Timeouts,
    /// Active health checks.
    pub health: HealthSettings,
    /// Log in to backends with the normalized user name (the name the user is pinned
    /// under) instead of the name as typed.
    pub normalized_login: bool,
    /// This server's name (APOP timestamps, SMTP greetings).
    pub hostname: String,
    /// Following the route store's change log (moves, kicks); `None` for stores that
    /// have none (static routes).
    pub watch: Option<WatchSettings>,
    /// Abuse control.
    pub limits: postern_limits::Settings,
    /// Authentication modes' settings.
    pub auth: AuthSettings,
    /// `[log] access`: where the JSON access log goes.
    pub access_log: AccessLog,
    /// `[admin]`: the admin HTTP listener (metrics, API, status page); `None` without.
    pub admin: Option<AdminSettings>,
}

/// How this instance follows the route store's change log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchSettings {
    /// This instance's id in the `instances` table.
    pub instance_id: String,
    /// Poll interval.
    pub interval: Duration,
    /// When movers presume a silent instance dead (`[routing.moves] live_within`): an
    /// instance that stood still this long catches up on the log before serving.
    pub live_within: Duration,
}

/// How a listener uses TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// Plaintext only; no STARTTLS offered.
    None,
    /// Plaintext, upgraded by the protocol's STARTTLS command.
    StartTls,
    /// TLS from the first byte (IMAPS, 993-style).
    Implicit,
}

impl TlsMode {
    /// Name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::None => "none",
            TlsMode::StartTls => "starttls",
            TlsMode::Implicit => "implicit",
        }
    }
}

/// Per-protocol front-end settings of a listener.
#[derive(Clone, Debug)]
pub enum FrontOptions {
    /// IMAP.
    Imap(Arc<postern_imap::Options>),
    /// POP3.
    Pop3(Arc<postern_pop3::Options>),
    /// Message submission with AUTH (587, 465). The extensions advertised are replaced
    /// at run time by what the backends' EHLO says.
    Submission(Arc<postern_smtp::Options>),
    /// MX relay (25) or LMTP, routed per recipient.
    Relay(Arc<postern_smtp::RelayOptions>),
}

impl FrontOptions {
    /// The protocol these options are for.
    pub fn protocol(&self) -> Protocol {
        match self {
            FrontOptions::Imap(_) => Protocol::Imap,
            FrontOptions::Pop3(_) => Protocol::Pop3,
            FrontOptions::Submission(_) => Protocol::Submission,
            FrontOptions::Relay(o) => match o.mode {
                postern_smtp::RelayMode::Mx => Protocol::Smtp,
                postern_smtp::RelayMode::Lmtp => Protocol::Lmtp,
            },
        }
    }
}

/// One listening socket.
#[derive(Clone, Debug)]
pub struct ListenerSettings {
    /// Name for logs.
    pub name: String,
    /// Address to bind (port 0 picks a free port; see `Server::local_addrs`).
    pub bind: SocketAddr,
    /// TLS use.
    pub tls_mode: TlsMode,
    /// Certificate, required unless `tls_mode` is `None`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Protocol and its front-end settings.
    pub front: FrontOptions,
    /// Accept a PROXY protocol header (v1 or v2) from these networks.
    pub proxy: Option<ProxyIn>,
    /// Who checks the credentials of this listener's clients.
    pub auth: AuthMode,
    /// Its session metrics, found on its first connection (`Default` to build).
    pub meters: crate::observability::metrics::ListenerMeters,
}

/// Who decides whether a client's credentials are good.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuthMode {
    /// The backend, when Postern logs in with the client's credentials.
    #[default]
    Backend,
    /// Postern, against the password hash of the route store's lookup query; the
    /// backend is then logged in to as a master user, with `XCLIENT LOGIN=`, or with
    /// the same credentials.
    Proxy,
    /// An nginx `auth_http` server.
    Http,
}

impl AuthMode {
    /// Name for logs and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Backend => "backend",
            AuthMode::Proxy => "proxy",
            AuthMode::Http => "http",
        }
    }
}

/// Authentication settings shared by every listener.
#[derive(Clone, Debug, Default)]
pub struct AuthSettings {
    /// How the backend is logged in to after Postern verified the password itself.
    pub master: Option<MasterLogin>,
    /// Password checks (hashing) running at once; further logins wait for a slot.
    pub max_parallel_checks: usize,
    /// The scheme of the hash an unknown user is checked against, until a real hash has
    /// been seen (then the last real hash's scheme and cost are used).
    pub dummy_scheme: String,
    /// The nginx `auth_http` server, for listeners with [`AuthMode::Http`].
    pub http: Option<HttpAuth>,
}

/// A Dovecot-style master user, which may log in as any user.
#[derive(Clone, Debug)]
pub struct MasterLogin {
    /// The master user's name.
    pub user: String,
    /// Its password.
    pub password: postern_proto::Secret<Vec<u8>>,
    /// How the user to log in as is named.
    pub style: MasterStyle,
}

/// How a master login names the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MasterStyle {
    /// `user<separator>master` as the login name (Dovecot's
    /// `auth_master_user_separator`, usually `*`).
    Separator(String),
    /// SASL PLAIN with the user as authorization identity and the master as
    /// authentication identity.
    Authzid,
}

/// The nginx `auth_http` server.
#[derive(Clone, Debug)]
pub struct HttpAuth {
    /// Where it listens, and the request's URI and Host.
    pub endpoint: postern_auth::auth_http::Endpoint,
    /// Connect, send and read within this.
    pub timeout: Duration,
    /// Extra request headers (nginx `auth_http_header`).
    pub headers: Vec<(String, String)>,
}

/// Which peers may announce the real client with a PROXY protocol header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyIn {
    /// Trusted networks (the L4 balancers). A connection from elsewhere that starts
    /// with a PROXY header is refused and logged.
    pub trusted: Vec<ipnet::IpNet>,
}

impl ProxyIn {
    /// Whether `ip` may send a PROXY header.
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|n| n.contains(&ip))
    }
}

/// Active health checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSettings {
    /// Run them at all.
    pub enabled: bool,
    /// Time between checks of one backend service.
    pub interval: Duration,
    /// Bound on one check.
    pub timeout: Duration,
    /// Consecutive successes that bring a service back up.
    pub rise: u32,
    /// Consecutive failures (checks or real connections) that take it down.
    pub fall: u32,
    /// After start, how long a service that has not answered yet stays *unknown*
    /// (not reported down) while its failures accumulate: backends that start after
    /// Postern are not an outage.
    pub startup_grace: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
            rise: 2,
            fall: 2,
            startup_grace: Duration::from_secs(10),
        }
    }
}

/// A user the health checks log in as.
#[derive(Clone, Debug)]
pub struct Probe {
    /// The user name.
    pub user: String,
    /// The password.
    pub password: postern_proto::Secret<String>,
}

/// A mail server behind Postern.
#[derive(Clone, Debug)]
pub struct Backend {
    /// Name, as routes refer to it.
    pub name: String,
    /// Host name or address.
    pub host: String,
    /// Relative share of new users.
    pub weight: u32,
    /// The pool the backend belongs to.
    pub pool: String,
    /// TLS client settings, for services with `tls` other than `None`.
    pub tls: Option<TlsClient>,
    /// Log in as this user in health checks (otherwise the greeting is checked).
    pub probe: Option<Probe>,
    /// IMAP service, if this backend offers one.
    pub imap: Option<ImapBackend>,
    /// POP3 service, if this backend offers one.
    pub pop3: Option<Pop3Backend>,
    /// Submission service (AUTH), if this backend offers one.
    pub submission: Option<SubmissionBackend>,
    /// SMTP service for mail from other MTAs (MX relay target).
    pub smtp: Option<Endpoint>,
    /// LMTP service (local delivery).
    pub lmtp: Option<Endpoint>,
    /// Admission control: logins in flight and waiting, per service of this backend.
    pub admission: crate::backends::admission::Limits,
}

impl Backend {
    /// The protocols this backend serves.
    pub fn protocols(&self) -> Vec<Protocol> {
        let mut p = Vec::new();
        if self.imap.is_some() {
            p.push(Protocol::Imap);
        }
        if self.pop3.is_some() {
            p.push(Protocol::Pop3);
        }
        if self.submission.is_some() {
            p.push(Protocol::Submission);
        }
        if self.smtp.is_some() {
            p.push(Protocol::Smtp);
        }
        if self.lmtp.is_some() {
            p.push(Protocol::Lmtp);
        }
        p
    }

    /// How to reach this backend for `protocol`.
    pub fn endpoint(&self, protocol: Protocol) -> Option<&Endpoint> {
        match protocol {
            Protocol::Imap => self.imap.as_ref().map(|s| &s.endpoint),
            Protocol::Pop3 => self.pop3.as_ref().map(|s| &s.endpoint),
            Protocol::Submission => self.submission.as_ref().map(|s| &s.endpoint),
            Protocol::Smtp => self.smtp.as_ref(),
            Protocol::Lmtp => self.lmtp.as_ref(),
            _ => None,
        }
    }
}

/// How Postern reaches one service of a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// TCP port.
    pub port: u16,
    /// TLS on the connection to the backend.
    pub tls: BackendTls,
    /// A PROXY protocol header announcing the client, before anything else.
    pub proxy_protocol: ProxyProtocol,
}

/// TLS towards a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendTls {
    /// Plaintext.
    #[default]
    None,
    /// The protocol's STARTTLS before any credential; a backend that does not offer
    /// it fails the login.
    StartTls,
    /// TLS from the first byte.
    Implicit,
}

/// PROXY protocol towards a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// No header.
    #[default]
    None,
    /// Version 1 (text).
    V1,
    /// Version 2 (binary, with the client's TLS details).
    V2,
}

/// TLS client settings for a backend.
#[derive(Clone, Debug)]
pub struct TlsClient {
    /// Roots and client certificate.
    pub config: Arc<rustls::ClientConfig>,
    /// The name sent as SNI and required in the backend's certificate.
    pub name: rustls_pki_types::ServerName<'static>,
}

/// A backend's IMAP service.
#[derive(Clone, Debug)]
pub struct ImapBackend {
    /// How to reach it.
    pub endpoint: Endpoint,
    /// How to log in.
    pub login: postern_imap::LoginOptions,
}

/// A backend's POP3 service.
#[derive(Clone, Debug)]
pub struct Pop3Backend {
    /// How to reach it.
    pub endpoint: Endpoint,
    /// How to log in.
    pub login: postern_pop3::LoginOptions,
}

/// A backend's submission service.
#[derive(Clone, Debug)]
pub struct SubmissionBackend {
    /// How to reach it.
    pub endpoint: Endpoint,
    /// How to open the session (XCLIENT or AUTH replay).
    pub login: postern_smtp::LoginOptions,
}

/// Timers. Each bounds one wait so a silent peer cannot hold a session forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// From accept to login: TLS handshake and the whole pre-auth dialogue.
    pub preauth: Duration,
    /// TCP connect to a backend.
    pub backend_connect: Duration,
    /// From backend connect to its answer to the login.
    pub backend_login: Duration,
    /// After login: no byte in either direction for this long ends the session.
    pub idle: Duration,
    /// MX and LMTP relay: the wait for a command, a reply or a chunk of data (RFC 5321
    /// §4.5.3.2 asks for 5 minutes), and for the client to take our replies.
    pub smtp: Duration,
    /// On shutdown, how long relayed sessions may run on before they are closed.
    pub shutdown_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            preauth: Duration::from_secs(60),
            backend_connect: Duration::from_secs(10),
            backend_login: Duration::from_secs(30),
            // RFC 9051 §5.4: a client in IDLE re-issues it at least every 29 minutes.
            idle: Duration::from_secs(31 * 60),
            smtp: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Where access-log lines go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AccessLog {
    /// Nowhere.
    #[default]
    Off,
    /// Standard output (the tracing log goes to standard error).
    Stdout,
    /// Appended to this file.
    File(PathBuf),
}

impl AccessLog {
    /// Parses the `[log] access` value: `off`, `stdout`, or a path (relative paths are
    /// taken from `base`, the configuration file's directory).
    pub fn parse(value: &str, base: &std::path::Path) -> Result<Self, String> {
        match value {
            "off" | "" => Ok(AccessLog::Off),
            "stdout" | "-" => Ok(AccessLog::Stdout),
            path => {
                let p = PathBuf::from(path);
                if p.is_dir() {
                    return Err(format!("{path} is a directory"));
                }
                Ok(AccessLog::File(if p.is_absolute() {
                    p
                } else {
                    base.join(p)
                }))
            }
        }
    }
}

/// `[admin]`.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// Address of the admin listener.
    pub bind: SocketAddr,
    /// Bearer token required by every endpoint except `/healthz` and `/readyz`.
    pub token: Option<String>,
}

impl fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminSettings")
            .field("bind", &self.bind)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}
