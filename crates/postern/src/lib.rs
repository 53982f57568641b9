//! The `postern` binary's library half: configuration loading and the command line.
//! Kept as a library so tests and tools (the benchmark) load configurations the same way
//! the proxy does.

pub mod cli;
pub mod config;
pub mod import_nginx;
