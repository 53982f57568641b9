//! Postern's runtime: the only crate that does I/O. It accepts connections, runs TLS,
//! drives the sans-IO protocol machines, asks the router where a user goes, connects and
//! logs in to the backend, and relays bytes.

pub mod access_log;
pub mod admin;
pub mod admission;
pub mod admit;
pub mod metrics;
pub mod registry;
pub mod relay;
pub mod server;
pub mod settings;
pub mod stream;
pub mod tls;
pub mod watch;

mod auth;
mod auth_http;
pub mod backend;
pub mod blame;
mod ctx;
mod driver;
pub mod health;
mod login;
mod prologue;
pub mod service_health;
mod session;
mod smtp_relay;
#[cfg(target_os = "linux")]
mod splice;

pub use server::{Runtime, Server, ServerError};
pub use settings::{
    AuthMode, AuthSettings, Backend, FrontOptions, HttpAuth, ImapBackend, ListenerSettings,
    MasterLogin, MasterStyle, Pop3Backend, Settings, Timeouts, TlsMode,
};
