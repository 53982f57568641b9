//! nginx `mail {}` and `stream {}` directives to a Postern [`Plan`], with a warning for
//! everything that has no Postern equivalent or maps with a difference.
//!
//! `mail {}`: every `server` becomes listeners in `auth = "http"` mode (nginx's mail
//! module chooses backends only through `auth_http`), so no backend is declared.
//! `stream {}`: each upstream's servers become backends (the n-th server of a host in
//! every protocol's upstream is one backend, the seed's "one port per service per
//! container" layout), each `server { listen; proxy_pass; }` a listener, and users are
//! pinned at their first login instead of being balanced per connection.
//!
//! One module per block: [`mail`] and [`stream`] (with [`upstream`], which turns the
//! upstreams into backends), [`globals`] for the values Postern has once for all
//! listeners, and the helpers both blocks share: [`listen`] (addresses, listener
//! names, PROXY networks) and [`directives`] (argument forms, unmapped directives).

mod directives;
mod globals;
mod listen;
mod mail;
mod stream;
mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::emit::{self, Plan};
use super::parse::{Directive, Loc};
use super::{Error, Import, Warning};
use globals::Globals;
use upstream::Upstream;

/// The translation in progress: what the blocks have produced so far, and what the
/// final passes (backends from upstreams, values for all listeners) still need.
struct Ctx<'a> {
    prefix: &'a Path,
    warnings: Vec<Warning>,
    plan: Plan,
    globals: Globals,
    names: BTreeMap<String, usize>,
    binds: Vec<SocketAddr>,
    /// Stream listeners (index into plan.listeners) with no TLS of their own.
    plain_stream: Vec<usize>,
    /// Stream services to attach to backends: protocol key, upstream, TLS, PROXY.
    registrations: Vec<upstream::Registration>,
    upstreams: BTreeMap<String, Upstream>,
}

impl Ctx<'_> {
    fn warn(&mut self, d: &Directive, message: impl Into<String>) {
        self.warn_at(Some(&d.loc), &d.name, message);
    }

    fn warn_at(&mut self, loc: Option<&Loc>, directive: &str, message: impl Into<String>) {
        let w = Warning {
            loc: loc.cloned(),
            directive: directive.to_owned(),
            message: message.into(),
        };
        if !self.warnings.contains(&w) {
            self.warnings.push(w);
        }
    }

    /// A certificate path: nginx takes relative ones from its configuration prefix.
    /// `..` is folded away by hand (the file need not exist on this machine).
    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        let joined = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.prefix.join(p)
        };
        let mut out = PathBuf::new();
        for c in joined.components() {
            match c {
                std::path::Component::ParentDir if out.file_name().is_some() => {
                    out.pop();
                }
                std::path::Component::CurDir => {}
                c => out.push(c),
            }
        }
        out
    }

    /// A unique listener name from the protocol and port.
    fn name(&mut self, base: String) -> String {
        let n = self.names.entry(base.clone()).or_insert(0);
        *n += 1;
        if *n == 1 { base } else { format!("{base}-{n}") }
    }
}

/// Translates the parsed file.
pub(super) fn translate(
    directives: &[Directive],
    source: &str,
    prefix: &Path,
) -> Result<Import, Error> {
    let mut ctx = Ctx {
        prefix,
        warnings: Vec::new(),
        plan: Plan {
            source: source.to_owned(),
            ..Plan::default()
        },
        globals: Globals::default(),
        names: BTreeMap::new(),
        binds: Vec::new(),
        plain_stream: Vec::new(),
        registrations: Vec::new(),
        upstreams: BTreeMap::new(),
    };
    let mut found = false;
    for d in directives {
        match (d.name.as_str(), &d.block) {
            ("mail", Some(block)) => {
                found = true;
                mail::mail(&mut ctx, block);
            }
            ("stream", Some(block)) => {
                found = true;
                stream::stream(&mut ctx, block);
            }
            ("imap", Some(_)) => ctx.warn(
                d,
                "the pre-0.5.15 name of mail {}: rename it to mail and import again",
            ),
            // http {}, events {} and the process settings (user, worker_processes, pid,
            // load_module, ...) have nothing to do with mail proxying.
            _ => {}
        }
    }
    if !found {
        return Err(Error::Nothing(format!(
            "{source}: no mail {{}} or stream {{}} block (is this the file that includes them?)"
        )));
    }
    upstream::finish_stream(&mut ctx);
    globals::finish_globals(&mut ctx);
    if ctx.plan.listeners.is_empty() {
        let why: Vec<String> = ctx.warnings.iter().map(|w| format!("  {w}")).collect();
        return Err(Error::Nothing(format!(
            "{source}: nothing could be turned into a Postern listener:\n{}",
            why.join("\n")
        )));
    }
    let toml = emit::render(&ctx.plan, &ctx.warnings).map_err(|e| {
        Error::Nothing(format!(
            "{source}: the configuration cannot be written as TOML: {e}"
        ))
    })?;
    Ok(Import {
        toml,
        warnings: ctx.warnings,
    })
}
