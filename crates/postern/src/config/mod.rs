//! Configuration: `file` mirrors the TOML, `build` validates it into runtime settings.

mod build;
pub mod file;

pub use build::{Config, StorePlan, redact_url};
