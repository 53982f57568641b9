//! `postern-bench`: Postern's benchmark tool.
//!
//! Load generators (`logins`, `relay`, `idle`) that print one JSON object per run on
//! stdout and a human summary on stderr, the stand-ins they run against
//! (`fake-backend`, `fake-auth-http`), and `report`, which turns the JSON lines of a
//! whole comparison run into the markdown table of `docs/benchmarks.md`.
//! `scripts/bench-compare.sh` drives all of it.

mod auth_http;
mod backend;
mod client;
mod idle;
mod logins;
mod procfs;
mod relay;
mod report;
mod stats;
mod target;

use std::net::{Ipv4Addr, TcpListener};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Parser)]
#[command(name = "postern-bench", version, about = "Postern's benchmark tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A minimal IMAP and POP3 server: accepts any login, answers SELECT, IDLE, FETCH
    /// of a literal of any size, LOGOUT. Prints its addresses as JSON when ready.
    FakeBackend(backend::Args),
    /// nginx's auth_http responder: every login goes to one backend address.
    FakeAuthHttp(auth_http::Args),
    /// Login sessions (connect, greeting, LOGIN, SELECT, LOGOUT) at a target rate.
    Logins(logins::Args),
    /// One logged-in session FETCHing a large literal, repeated: throughput and CPU/GB.
    Relay(relay::Args),
    /// Holds logged-in IMAP IDLE sessions open and measures the proxy's memory growth.
    Idle(idle::Args),
    /// Prints free loopback TCP ports, one per line, for configs that cannot use port 0.
    FreePorts {
        /// How many ports.
        #[arg(default_value_t = 1)]
        count: usize,
    },
    /// Turns the JSON lines of a comparison run into the markdown results table.
    Report(report::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_nofile_limit();
    let result = match cli.command {
        Command::FakeBackend(args) => backend::run(args),
        Command::FakeAuthHttp(args) => auth_http::run(args),
        Command::Logins(args) => logins::run(args),
        Command::Relay(args) => relay::run(args),
        Command::Idle(args) => idle::run(args),
        Command::FreePorts { count } => free_ports(count),
        Command::Report(args) => report::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postern-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A tokio runtime with `threads` workers; one worker means the lighter current-thread
/// scheduler, which is what the stand-in servers and most load runs want on a 2-core
/// machine where every cycle they take is one the proxy under test cannot have.
pub(crate) fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

/// Prints one result object as a JSON line on stdout.
pub(crate) fn emit<T: Serialize>(value: &T) -> Result<()> {
    let line = serde_json::to_string(value).context("cannot encode the result")?;
    println!("{line}");
    Ok(())
}

/// Binds port 0 and reports what the kernel chose. The listeners are closed before
/// printing, so a port could in theory be taken in between; the script uses them at
/// once, and only for nginx, which has no way to report a kernel-chosen port.
fn free_ports(count: usize) -> Result<()> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .context("cannot bind a loopback port")?;
    let ports = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .context("cannot read a bound port")?;
    drop(listeners);
    for port in ports {
        println!("{port}");
    }
    Ok(())
}

/// 8 000 proxied sessions need 8 000 sockets in the load generator and the fake backend
/// each; the soft limit is often 1024 while the hard one allows far more. Raising it
/// needs setrlimit, which is unsafe FFI in Rust without a crate this workspace allows,
/// so util-linux's `prlimit` does it for us. Failure is reported, not fatal: small runs
/// work without it.
fn raise_nofile_limit() {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let Some((soft, hard)) = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| {
            let mut fields = l.split_whitespace().skip(3);
            Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
        })
    else {
        return;
    };
    if soft == hard {
        return;
    }
    let status = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={hard}:{hard}"))
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!(
            "postern-bench: warning: cannot raise the open-files limit from {soft} to {hard}"
        );
    }
}
