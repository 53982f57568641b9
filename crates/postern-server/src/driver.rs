//! The protocol table: what the generic session driver needs to know about each
//! protocol, in the spirit of nginx's per-protocol handler table.

use std::sync::Arc;

use postern_proto::{FrontEnd, Protocol};

use crate::settings::Backend;

/// One protocol's plug-in for the session driver.
pub(crate) trait Driver: Send + Sync + 'static {
    /// The client-facing machine.
    type Front: FrontEnd<Login = Self::Login, LoginOptions = Self::LoginOptions> + Send + Sync;
    /// The backend login machine.
    type Login: postern_proto::BackendLogin + Send;
    /// Per-backend login settings.
    type LoginOptions: Send + Sync;

    /// The protocol served.
    const PROTOCOL: Protocol;

    /// A new front end for a connection (`tls`: already encrypted).
    fn front(&self, tls: bool) -> Self::Front;

    /// The port and login settings of `backend` for this protocol, if it serves it.
    fn backend<'a>(&self, backend: &'a Backend) -> Option<(u16, &'a Self::LoginOptions)>;
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

    fn front(&self, tls: bool) -> Self::Front {
        postern_imap::Front::new(Arc::clone(&self.options), tls)
    }

    fn backend<'a>(&self, backend: &'a Backend) -> Option<(u16, &'a Self::LoginOptions)> {
        backend.imap.as_ref().map(|b| (b.port, &b.login))
    }
}
