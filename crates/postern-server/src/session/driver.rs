//! The protocol table: what the generic session driver needs to know about each
//! protocol, in the spirit of nginx's per-protocol handler table.

use std::sync::Arc;

use postern_proto::{FrontEnd, Protocol, Shutdown};

use crate::settings::{Backend, Endpoint};

/// One protocol's plug-in for the session driver.
pub(crate) trait Driver: Send + Sync + 'static {
    /// The client-facing machine.
    type Front: FrontEnd<Login = Self::Login, LoginOptions = Self::LoginOptions> + Send + Sync;
    /// The backend login machine.
    type Login: postern_proto::BackendLogin + Send + Sized;
    /// Per-backend login settings (the defaults serve backends only an `auth_http`
    /// server knows).
    type LoginOptions: Send + Sync + Default;

    /// The protocol served.
    const PROTOCOL: Protocol;

    /// A new front end for a connection (`tls`: already encrypted; `session_id`:
    /// unique per connection).
    fn front(&self, tls: bool, session_id: &str) -> Self::Front;

    /// How to reach `backend` for this protocol and log in, if it serves it.
    fn backend<'a>(&self, backend: &'a Backend) -> Option<(&'a Endpoint, &'a Self::LoginOptions)>;

    /// The goodbye sent to a relayed client when Postern ends the session itself.
    fn relayed_goodbye(&self, why: Shutdown) -> Vec<u8>;

    /// Login options for a user whose password Postern verified itself, when the
    /// protocol can then log in without any password (SMTP `XCLIENT LOGIN=`).
    fn verified_login_options(&self, _options: &Self::LoginOptions) -> Option<Self::LoginOptions> {
        None
    }

    /// Login options for a backend an auth_http server named that is not configured
    /// here: the protocol's defaults.
    fn http_login_options(&self) -> Self::LoginOptions {
        Self::LoginOptions::default()
    }
}

/// IMAP.
pub(crate) struct Imap {
    pub(crate) options: Arc<postern_imap::Options>,
}

impl Driver for Imap {
    type Front = postern_imap::Front;
    type Login = postern_imap::Login;
    type LoginOptions = postern_imap::LoginOptions;

    const PROTOCOL: Protocol = Protocol::Imap;

    fn relayed_goodbye(&self, why: Shutdown) -> Vec<u8> {
        postern_imap::relayed_goodbye(why)
    }

    fn front(&self, tls: bool, _session_id: &str) -> Self::Front {
        postern_imap::Front::new(Arc::clone(&self.options), tls)
    }

    fn backend<'a>(&self, backend: &'a Backend) -> Option<(&'a Endpoint, &'a Self::LoginOptions)> {
        backend.imap.as_ref().map(|b| (&b.endpoint, &b.login))
    }
}

/// POP3.
pub(crate) struct Pop3 {
    pub(crate) options: Arc<postern_pop3::Options>,
    /// The host part of APOP timestamps.
    pub(crate) hostname: String,
}

impl Driver for Pop3 {
    type Front = postern_pop3::Front;
    type Login = postern_pop3::Login;
    type LoginOptions = postern_pop3::LoginOptions;

    const PROTOCOL: Protocol = Protocol::Pop3;

    fn relayed_goodbye(&self, why: Shutdown) -> Vec<u8> {
        postern_pop3::relayed_goodbye(why)
    }

    fn front(&self, tls: bool, session_id: &str) -> Self::Front {
        // RFC 1939 §7: the timestamp must differ for every greeting, or a captured
        // digest could be replayed. The session id is unique per process and start.
        let timestamp = self.options.apop.then(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            postern_pop3::apop_timestamp(&format!("{session_id}.{now}"), &self.hostname)
        });
        postern_pop3::Front::new(Arc::clone(&self.options), tls, timestamp.flatten())
    }

    fn backend<'a>(&self, backend: &'a Backend) -> Option<(&'a Endpoint, &'a Self::LoginOptions)> {
        backend.pop3.as_ref().map(|b| (&b.endpoint, &b.login))
    }
}

/// Message submission (587, 465).
pub(crate) struct Submission {
    /// The listener's settings; the extensions are replaced by what the backends'
    /// EHLO says once the health checks have probed them.
    pub(crate) options: Arc<postern_smtp::Options>,
    pub(crate) health: Arc<crate::backends::health::Health>,
    pub(crate) current: std::sync::RwLock<Arc<postern_smtp::Options>>,
}

impl Submission {
    pub(crate) fn new(
        options: Arc<postern_smtp::Options>,
        health: Arc<crate::backends::health::Health>,
    ) -> Self {
        Self {
            current: std::sync::RwLock::new(Arc::clone(&options)),
            options,
            health,
        }
    }

    /// The options with the probed extensions, rebuilt only when they change.
    fn options(&self) -> Arc<postern_smtp::Options> {
        let current = self
            .current
            .read()
            .map(|c| Arc::clone(&c))
            .unwrap_or_else(|_| Arc::clone(&self.options));
        match self.health.extensions(Protocol::Submission) {
            Some(ext) if ext != current.extensions => {
                let fresh = Arc::new(postern_smtp::Options {
                    extensions: ext,
                    ..(*self.options).clone()
                });
                if let Ok(mut c) = self.current.write() {
                    *c = Arc::clone(&fresh);
                }
                fresh
            }
            _ => current,
        }
    }
}

impl Driver for Submission {
    type Front = postern_smtp::Front;
    type Login = postern_smtp::Login;
    type LoginOptions = postern_smtp::LoginOptions;

    const PROTOCOL: Protocol = Protocol::Submission;

    fn relayed_goodbye(&self, why: Shutdown) -> Vec<u8> {
        postern_smtp::relayed_goodbye(why, &self.options().hostname)
    }

    fn front(&self, tls: bool, _session_id: &str) -> Self::Front {
        postern_smtp::Front::new(self.options(), tls)
    }

    /// nginx's `xclient on` (its default): the backend is told the client and, when
    /// the auth server sent no password, the user (`XCLIENT LOGIN=`).
    fn http_login_options(&self) -> Self::LoginOptions {
        postern_smtp::LoginOptions {
            method: postern_smtp::LoginMethod::Xclient,
            ..postern_smtp::LoginOptions::default()
        }
    }

    fn verified_login_options(&self, options: &Self::LoginOptions) -> Option<Self::LoginOptions> {
        (options.method == postern_smtp::LoginMethod::Xclient).then(|| postern_smtp::LoginOptions {
            proxy_verified: true,
            ..options.clone()
        })
    }

    fn backend<'a>(&self, backend: &'a Backend) -> Option<(&'a Endpoint, &'a Self::LoginOptions)> {
        backend.submission.as_ref().map(|b| (&b.endpoint, &b.login))
    }
}
