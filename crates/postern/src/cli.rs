//! Command-line interface.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use postern_proto::Protocol;
use postern_route::RouteError;
use postern_server::Server;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, StorePlan};

/// Postern: a protocol-aware mail proxy with per-user backend pinning.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file.
    #[arg(
        short,
        long,
        global = true,
        env = "POSTERN_CONFIG",
        default_value = "/etc/postern/postern.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy until SIGINT or SIGTERM.
    Run,
    /// Validate the configuration, its certificates and the route store, then exit.
    Check,
    /// Show where a user goes and why.
    Route {
        /// The user name, as a client would type it.
        user: String,
        /// The protocol to route for.
        #[arg(long, default_value = "imap")]
        protocol: String,
    },
    /// Manage the route database.
    Db {
        #[command(subcommand)]
        action: DbAction,
    },
}

#[derive(Debug, Subcommand)]
enum DbAction {
    /// Create or upgrade Postern's tables in the configured store.
    Migrate,
    /// Run a SQL script (such as fixtures/sqlite/seed.sql) against the store, in one
    /// transaction.
    Seed {
        /// The SQL file.
        file: PathBuf,
    },
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("postern: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Run => {
            let config = Config::load(&cli.config)?;
            init_tracing(&config.log_level);
            runtime.block_on(serve(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => runtime.block_on(check(&cli.config)),
        Command::Route { user, protocol } => {
            let config = Config::load(&cli.config)?;
            runtime.block_on(route(&config, &user, &protocol))
        }
        Command::Db { action } => {
            let config = Config::load(&cli.config)?;
            runtime.block_on(db(&config, action))
        }
    }
}

fn init_tracing(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

async fn serve(config: Config) -> Result<()> {
    let router = config.router().await?;
    let server = Server::bind(config.settings, router).await?;
    server.run(shutdown_signal()).await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handlers, run until killed.
        _ => std::future::pending().await,
    }
}

async fn check(path: &Path) -> Result<ExitCode> {
    let config = Config::load(path)?;
    let store = config.open_store().await?;
    store
        .ping()
        .await
        .with_context(|| format!("{} route store", store.kind()))?;
    println!("config {}: OK", path.display());
    for l in &config.settings.listeners {
        println!(
            "  listener {:<16} {:<5} {:<22} tls={}",
            l.name,
            l.front.protocol(),
            l.bind,
            l.tls_mode.as_str()
        );
    }
    match &config.store {
        StorePlan::Sqlite { path, .. } => println!("  routes   sqlite {}", path.display()),
        StorePlan::Static(m) => println!("  routes   static, {} entries", m.len()),
    }
    for b in config.settings.backends.values() {
        let mut notes = Vec::new();
        if let Some(imap) = &b.imap {
            let addr = format!("{}:{}", b.host, imap.port);
            let reachable = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect(addr.as_str()),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            notes.push(format!(
                "imap {addr}{}",
                if reachable { "" } else { " (unreachable now)" }
            ));
        }
        println!("  backend  {:<16} {}", b.name, notes.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_protocol(s: &str) -> Result<Protocol> {
    match s {
        "imap" => Ok(Protocol::Imap),
        other => bail!("unknown protocol {other:?} (expected imap)"),
    }
}

async fn route(config: &Config, user: &str, protocol: &str) -> Result<ExitCode> {
    let protocol = parse_protocol(protocol)?;
    let router = config.router().await?;
    match router.resolve(user, protocol).await {
        Ok(d) => {
            println!("user:    {} (as typed: {user:?})", d.user);
            let why = match d.source {
                postern_route::Source::Pinned => {
                    format!("pinned in the {} store", router.store().kind())
                }
                postern_route::Source::Hashed => {
                    "no pin; chosen by hash (routing.unknown_users = \"hash\")".to_owned()
                }
            };
            println!("backend: {} ({why})", d.backend);
            if let Some(b) = config.settings.backends.get(&d.backend)
                && let Some(imap) = &b.imap
                && protocol == Protocol::Imap
            {
                println!("imap:    {}:{}", b.host, imap.port);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(RouteError::NoRoute) => {
            println!(
                "user:    {user:?}\nbackend: none: no pin, and routing.unknown_users = \"reject\""
            );
            Ok(ExitCode::from(2))
        }
        Err(e) => Err(e.into()),
    }
}

async fn db(config: &Config, action: DbAction) -> Result<ExitCode> {
    let StorePlan::Sqlite { path, .. } = &config.store else {
        bail!("routing.store is not a database");
    };
    // Opening runs the migrations.
    let store = postern_route::store::sqlite::SqliteStore::open(path, true).await?;
    match action {
        DbAction::Migrate => println!("{}: schema up to date", path.display()),
        DbAction::Seed { file } => {
            let sql = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            store
                .execute_script(&sql)
                .await
                .with_context(|| format!("{}", file.display()))?;
            println!("{}: loaded {}", path.display(), file.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
