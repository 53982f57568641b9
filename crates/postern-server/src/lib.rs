//! Postern's runtime: the only crate that does I/O. It accepts connections, runs TLS,
//! drives the sans-IO protocol machines, asks the router where a user goes, connects and
//! logs in to the backend, and relays bytes.

pub mod admin;
pub mod backends;
pub mod observability;
pub mod registry;
pub mod relay;
pub mod server;
pub mod settings;
pub mod watch;

mod auth;
mod auth_http;
mod ctx;
mod login;
mod session;

pub use server::{Runtime, Server, ServerError};
pub use settings::{
    AuthMode, AuthSettings, Backend, FrontOptions, HttpAuth, ImapBackend, ListenerSettings,
    MasterLogin, MasterStyle, Pop3Backend, Settings, Timeouts, TlsMode,
};
