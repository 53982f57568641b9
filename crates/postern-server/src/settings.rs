//! Validated runtime settings. The binary's config layer parses TOML into these; tests
//! build them directly.

use std::collections::BTreeMap;
use std::net::SocketAddr;
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
    /// Log in to backends with the normalized user name (the name the user is pinned
    /// under) instead of the name as typed.
    pub normalized_login: bool,
    /// This server's name (APOP timestamps, SMTP greetings).
    pub hostname: String,
    /// Following the route store's change log (moves, kicks); `None` for stores that
    /// have none (static routes).
    pub watch: Option<WatchSettings>,
}

/// How this instance follows the route store's change log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchSettings {
    /// This instance's id in the `instances` table.
    pub instance_id: String,
    /// Poll interval.
    pub interval: Duration,
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
}

impl FrontOptions {
    /// The protocol these options are for.
    pub fn protocol(&self) -> Protocol {
        match self {
            FrontOptions::Imap(_) => Protocol::Imap,
            FrontOptions::Pop3(_) => Protocol::Pop3,
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
    /// IMAP service, if this backend offers one.
    pub imap: Option<ImapBackend>,
    /// POP3 service, if this backend offers one.
    pub pop3: Option<Pop3Backend>,
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
        p
    }
}

/// A backend's IMAP service.
#[derive(Clone, Debug)]
pub struct ImapBackend {
    /// TCP port.
    pub port: u16,
    /// How to log in.
    pub login: postern_imap::LoginOptions,
}

/// A backend's POP3 service.
#[derive(Clone, Debug)]
pub struct Pop3Backend {
    /// TCP port.
    pub port: u16,
    /// How to log in.
    pub login: postern_pop3::LoginOptions,
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
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            preauth: Duration::from_secs(60),
            backend_connect: Duration::from_secs(10),
            backend_login: Duration::from_secs(30),
            // RFC 9051 §5.4: a client in IDLE re-issues it at least every 29 minutes.
            idle: Duration::from_secs(31 * 60),
        }
    }
}
