//! `postern import-nginx`: translate an nginx configuration with a `mail {}` block
//! (auth_http proxying) and/or a `stream {}` block with mail upstreams (plain TCP
//! balancing) into a Postern configuration, and say what could not be mapped.
//!
//! Three steps, each testable alone: [`parse`] reads nginx's syntax (includes resolved,
//! errors with file and line), `translate` turns the mail and stream directives into a
//! plan of Postern keys plus warnings (one module per block), `emit` writes the plan
//! as TOML through the `toml` crate, with the warnings and notes as comments. Only keys `config::file` knows are produced; the tests load every
//! result with the real loader. docs/migrating-from-nginx.md is the directive table.

mod emit;
pub mod parse;
mod translate;
mod units;

use std::fmt;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};

pub use parse::{Loc, ParseError};

/// Something not mapped, or mapped with a difference the operator should know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// Where the directive was written (none for whole-file remarks).
    pub loc: Option<Loc>,
    /// The directive's name.
    pub directive: String,
    /// What happened to it, and why.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.loc {
            Some(loc) => write!(f, "{loc}: {}: {}", self.directive, self.message),
            None => write!(f, "{}: {}", self.directive, self.message),
        }
    }
}

/// Why nothing could be produced.
#[derive(Debug)]
pub enum Error {
    /// The nginx file is not valid nginx syntax (or an include cannot be read).
    Parse(ParseError),
    /// The file parses but yields no usable Postern configuration.
    Nothing(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Parse(e) => e.fmt(f),
            Error::Nothing(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

impl From<ParseError> for Error {
    fn from(e: ParseError) -> Self {
        Error::Parse(e)
    }
}

/// The result of an import.
#[derive(Debug)]
pub struct Import {
    /// The Postern configuration, TOML, the warnings repeated as comments at the top.
    pub toml: String,
    /// What could not be mapped (or was mapped with a difference).
    pub warnings: Vec<Warning>,
}

/// Imports the nginx configuration at `path` (and what it includes). Relative paths in
/// it (certificates, includes) are taken from its directory, nginx's configuration
/// prefix; the output names certificates by absolute path.
pub fn import_file(path: &Path) -> Result<Import, Error> {
    let directives = parse::parse_file(path)?;
    let prefix = std::path::absolute(path.parent().unwrap_or(Path::new("")))
        .unwrap_or_else(|_| path.parent().unwrap_or(Path::new("")).to_path_buf());
    translate::translate(&directives, &path.display().to_string(), &prefix)
}

/// Imports nginx configuration text; `name` labels warnings and errors, `prefix` is the
/// directory relative paths are taken from.
pub fn import_str(text: &str, name: &Path, prefix: &Path) -> Result<Import, Error> {
    let directives = parse::parse_str(text, name, prefix)?;
    translate::translate(&directives, &name.display().to_string(), prefix)
}

/// `postern import-nginx FILE [-o OUT]`: the configuration to OUT (or standard output),
/// the warnings to standard error.
pub fn run(file: &Path, out: Option<&Path>) -> Result<ExitCode> {
    let import = import_file(file).map_err(|e| anyhow::anyhow!("import-nginx: {e}"))?;
    for w in &import.warnings {
        eprintln!("postern: warning: {w}");
    }
    match out {
        Some(path) => {
            std::fs::write(path, &import.toml)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!(
                "postern: wrote {} ({} warning(s)); check it with `postern check -c {}`",
                path.display(),
                import.warnings.len(),
                path.display()
            );
        }
        None => print!("{}", import.toml),
    }
    Ok(ExitCode::SUCCESS)
}
