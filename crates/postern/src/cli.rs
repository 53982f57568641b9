//! Command-line interface.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use postern_proto::Protocol;
use postern_route::moves::{Left, MoveOutcome};
use postern_route::{RouteError, Router, Source};
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
    /// Show and change where users go. `postern route USER` is `route show USER`.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Route {
        #[command(subcommand)]
        action: Option<RouteAction>,
        /// The user name, as a client would type it.
        user: Option<String>,
        /// The protocol to route for.
        #[arg(long, default_value = "imap")]
        protocol: String,
    },
    /// Manage the route database.
    Db {
        #[command(subcommand)]
        action: DbAction,
    },
    /// Show backends, drain them, take them down, evacuate their users. Acts through
    /// the database: every instance obeys within its watch interval.
    Backend {
        #[command(subcommand)]
        action: BackendAction,
    },
    /// Validate the configuration file, then ask the running server to reload it
    /// (through the admin listener named in its [admin] section).
    Reload {
        /// The admin listener's address, when it is not `admin.bind` (e.g. port 0).
        #[arg(long, value_name = "ADDR")]
        admin: Option<std::net::SocketAddr>,
    },
    /// Translate an nginx configuration (mail {} and/or stream {} with mail upstreams)
    /// into a Postern configuration; what cannot be mapped is printed as warnings.
    ImportNginx {
        /// The nginx configuration file (includes are followed).
        file: PathBuf,
        /// Write the Postern configuration here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum BackendAction {
    /// Every backend: pool, weight, services, operator state, pinned users.
    List,
    /// No new users, and in shared pools no new sessions (users move as they log in).
    Drain {
        /// The backend.
        backend: String,
    },
    /// Undo `drain`.
    Undrain {
        /// The backend.
        backend: String,
    },
    /// No sessions at all: live ones end, shared-pool users fail over.
    Down {
        /// The backend.
        backend: String,
    },
    /// Undo `down` (health checks decide again).
    Up {
        /// The backend.
        backend: String,
    },
    /// Drain, then move every user pinned to the backend to the others of its pool,
    /// in batches of fenced moves.
    Evacuate {
        /// The backend.
        backend: String,
        /// Users per batch.
        #[arg(long, default_value_t = 100)]
        batch: usize,
    },
}

#[derive(Debug, Subcommand)]
enum RouteAction {
    /// Where USER goes and why (writes nothing).
    Show {
        /// The user name, as a client would type it.
        user: String,
        /// The protocol to route for.
        #[arg(long, default_value = "imap")]
        protocol: String,
    },
    /// Pin USER to BACKEND, replacing any pin. Live sessions are not touched: to move a
    /// user who may be logged in, use `route move`.
    Pin {
        /// The user name.
        user: String,
        /// The backend name.
        backend: String,
    },
    /// Remove USER's pin (the unknown-users policy applies at the next login).
    Unpin {
        /// The user name.
        user: String,
    },
    /// Move USER to BACKEND safely: hold new logins, end the user's sessions on every
    /// Postern instance, then switch the pin.
    Move {
        /// The user name.
        user: String,
        /// The backend to move to.
        backend: String,
        /// Switch the pin even if some live instance did not confirm the kick.
        #[arg(long)]
        force: bool,
        /// Finish an interrupted move to BACKEND (a fresh kick, then the new pin).
        #[arg(long, conflicts_with = "abort")]
        resume: bool,
        /// Roll an interrupted move back: clear the hold, keep the old pin.
        #[arg(long)]
        abort: bool,
    },
    /// End USER's sessions on every Postern instance.
    Kick {
        /// The user name.
        user: String,
    },
    /// List the pins, optionally of one backend.
    List {
        /// Only this backend's users.
        #[arg(long)]
        backend: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum DbAction {
    /// Create or upgrade Postern's tables in the configured database.
    Migrate,
    /// Run a SQL script (such as fixtures/sqlite/seed.sql) against the database, in one
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
    if let Command::ImportNginx { file, output } = &cli.command {
        return crate::import_nginx::run(file, output.as_deref());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Run => {
            let config = Config::load(&cli.config)?;
            init_tracing(&config.log_level);
            runtime.block_on(serve(&cli.config, config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => runtime.block_on(check(&cli.config)),
        Command::Reload { admin } => runtime.block_on(reload_remote(&cli.config, admin)),
        Command::Route {
            action,
            user,
            protocol,
        } => {
            let config = Config::load(&cli.config)?;
            let action = match (action, user) {
                (Some(a), _) => a,
                (None, Some(user)) => RouteAction::Show { user, protocol },
                (None, None) => {
                    bail!("route: name a user, or one of show/pin/unpin/move/kick/list")
                }
            };
            runtime.block_on(route(&config, action))
        }
        Command::Db { action } => {
            let config = Config::load(&cli.config)?;
            runtime.block_on(db(&config, action))
        }
        Command::Backend { action } => {
            let config = Config::load(&cli.config)?;
            runtime.block_on(backend_cmd(&config, action))
        }
        Command::ImportNginx { file, output } => crate::import_nginx::run(&file, output.as_deref()),
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

async fn serve(path: &Path, config: Config) -> Result<()> {
    let runtime = postern_server::Runtime::new(&config.settings);
    let router = config
        .router_with(Arc::clone(&runtime.health) as Arc<dyn postern_route::Availability>)
        .await?;
    let server = Server::bind(Arc::new(config.settings), router, runtime).await?;
    let handle = server.handle();
    start_admin(path, &handle).await?;
    tokio::spawn(reload_on_sighup(path.to_owned(), handle));
    server.run(shutdown_signal()).await;
    Ok(())
}

/// Re-reads the configuration file and swaps it in; on any error the running
/// configuration stays and the error is returned (and logged by the caller).
pub(crate) async fn reload(
    path: &Path,
    handle: &postern_server::server::Handle,
) -> Result<postern_server::server::ReloadSummary> {
    let config = Config::load(path)?;
    let runtime = handle.runtime().renew(&config.settings);
    let router = config
        .router_with(Arc::clone(&runtime.health) as Arc<dyn postern_route::Availability>)
        .await?;
    Ok(handle
        .reload(Arc::new(config.settings), router, runtime)
        .await?)
}

/// [`reload`], counted in the metrics (`postern_reloads_total{result}`).
async fn reload_counted(
    path: &Path,
    handle: &postern_server::server::Handle,
) -> Result<postern_server::server::ReloadSummary> {
    let result = reload(path, handle).await;
    postern_server::observability::metrics::reload(result.is_ok());
    result
}

/// Starts the `[admin]` HTTP listener, if configured; its `POST /api/reload` reloads
/// `path` as SIGHUP does.
async fn start_admin(path: &Path, handle: &postern_server::server::Handle) -> Result<()> {
    let reload_path = path.to_owned();
    let reload_handle = handle.clone();
    let reload_fn: postern_server::admin::ReloadFn = Arc::new(move || {
        let path = reload_path.clone();
        let handle = reload_handle.clone();
        Box::pin(async move {
            tracing::info!(config = %path.display(), "admin API: reloading the configuration");
            match reload_counted(&path, &handle).await {
                Ok(summary) => Ok(summary.generation),
                Err(e) => {
                    let e = format!("{e:#}");
                    tracing::error!(
                        error = e,
                        generation = handle.generation(),
                        "reload refused; the running configuration stays"
                    );
                    Err(e)
                }
            }
        })
    });
    let bind = handle.settings().admin.as_ref().map(|a| a.bind.to_string());
    postern_server::admin::start(handle.clone(), reload_fn)
        .await
        .with_context(|| format!("admin listener on {}", bind.unwrap_or_default()))?;
    Ok(())
}

/// `postern reload`: validates the configuration file, then asks the running server
/// (through the admin listener the file names) to reload it.
async fn reload_remote(path: &Path, at: Option<std::net::SocketAddr>) -> Result<ExitCode> {
    let config = Config::load(path)?;
    println!("config {}: valid", path.display());
    let Some(admin) = &config.settings.admin else {
        bail!(
            "{}: no [admin] section: the running server cannot be asked to reload; send it SIGHUP instead",
            path.display()
        );
    };
    let mut addr = at.unwrap_or(admin.bind);
    if addr.port() == 0 {
        bail!("admin.bind has port 0 (the kernel picked one): name it with --admin ADDR");
    }
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let (status, body) = postern_server::admin::post(
        addr,
        "/api/reload",
        admin.token.as_deref(),
        Duration::from_secs(60),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    match status {
        200 => {
            println!(
                "reloaded: generation {}",
                answer["generation"].as_u64().unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        401 => bail!("the admin listener at {addr} refused the token"),
        _ => {
            let why = answer["error"]
                .as_str()
                .map_or_else(|| body.trim().to_owned(), str::to_owned);
            eprintln!(
                "reload refused by the server (HTTP {status}): {why}\nthe running configuration (generation {}) stays",
                answer["generation"].as_u64().unwrap_or_default()
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// SIGHUP: reload. Reloads run one at a time, in the order the signals came.
async fn reload_on_sighup(path: PathBuf, handle: postern_server::server::Handle) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot handle SIGHUP: reload by signal is off");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
        if let Err(e) = reload_counted(&path, &handle).await {
            tracing::error!(
                error = format!("{e:#}"),
                generation = handle.generation(),
                "reload refused; the running configuration stays"
            );
        }
    }
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
        StorePlan::Sql(o) => println!(
            "  routes   {} {}",
            store.kind(),
            crate::config::redact_url(&o.url)
        ),
        StorePlan::Static(m) => println!("  routes   static, {} entries", m.len()),
    }
    for b in config.settings.backends.values() {
        let mut notes = Vec::new();
        for protocol in b.protocols() {
            let Some(port) = b.endpoint(protocol).map(|e| e.port) else {
                continue;
            };
            let name = protocol.as_str();
            let addr = format!("{}:{port}", b.host);
            let reachable = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect(addr.as_str()),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            notes.push(format!(
                "{name} {addr}{}",
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
        "pop3" => Ok(Protocol::Pop3),
        "submission" => Ok(Protocol::Submission),
        "smtp" => Ok(Protocol::Smtp),
        "lmtp" => Ok(Protocol::Lmtp),
        other => {
            bail!("unknown protocol {other:?} (expected imap, pop3, submission, smtp or lmtp)")
        }
    }
}

async fn route(config: &Config, action: RouteAction) -> Result<ExitCode> {
    let router = config.router().await?;
    let store = router.store();
    let normalize = |raw: &str| router.normalizer().normalize(raw).context("user name");
    let backend_exists = |b: &str| -> Result<()> {
        if config.settings.backends.contains_key(b) {
            Ok(())
        } else {
            bail!("no backend named {b:?} in the configuration")
        }
    };
    match action {
        RouteAction::Show { user, protocol } => {
            return show(config, &router, &user, parse_protocol(&protocol)?).await;
        }
        RouteAction::Pin { user, backend } => {
            backend_exists(&backend)?;
            let user = normalize(&user)?;
            store.pin(&user, &backend).await?;
            println!("{user} pinned to {backend}");
        }
        RouteAction::Unpin { user } => {
            let user = normalize(&user)?;
            if store.unpin(&user).await? {
                println!("{user}: pin removed");
            } else {
                println!("{user}: had no pin");
            }
        }
        RouteAction::Move {
            user,
            backend,
            force,
            resume,
            abort,
        } => {
            backend_exists(&backend)?;
            return move_cmd(
                &router,
                store.as_ref(),
                config,
                &user,
                &backend,
                force,
                resume,
                abort,
            )
            .await;
        }
        RouteAction::Kick { user } => {
            let user = normalize(&user)?;
            let acks = postern_route::moves::kick_user(store.as_ref(), &user, config.fence).await?;
            println!(
                "{user}: kick confirmed by {} instance(s){}",
                acks.confirmed.len(),
                missing_note(&acks.missing)
            );
        }
        RouteAction::List { backend } => {
            if let Some(b) = &backend {
                backend_exists(b)?;
            }
            for row in store.list(backend.as_deref()).await? {
                match row.moving_to {
                    Some(to) => println!("{}\t{}\t(moving to {to})", row.user, row.backend),
                    None => println!("{}\t{}", row.user, row.backend),
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `postern route move`: every way out says what is written in the store.
#[allow(clippy::too_many_arguments)]
async fn move_cmd(
    router: &postern_route::Router,
    store: &dyn postern_route::RouteStore,
    config: &Config,
    user: &str,
    backend: &str,
    force: bool,
    resume: bool,
    abort: bool,
) -> anyhow::Result<ExitCode> {
    let current = router.current(user, Protocol::Imap).await?;
    let user = &current.user;
    let from = current.backend.as_str();
    let pending = current.record.as_ref().and_then(|r| r.moving_to.clone());
    if abort {
        let Some(to) = pending else {
            println!("{user}: no move in progress; stays on {from}");
            return Ok(ExitCode::SUCCESS);
        };
        store.abort_move(user).await?;
        println!("{user}: move to {to} rolled back; stays on {from}, logins go there again");
        return Ok(ExitCode::SUCCESS);
    }
    match (&pending, resume) {
        (Some(to), false) => {
            eprintln!(
                "{user}: a move to {to} is in progress or was interrupted (pin still {from}). \
                 Finish it with --resume (to {to}) or roll it back with --abort."
            );
            return Ok(ExitCode::FAILURE);
        }
        (Some(to), true) if to != backend => {
            eprintln!("{user}: the interrupted move goes to {to}, not {backend}");
            return Ok(ExitCode::FAILURE);
        }
        (None, true) if from == backend => {
            println!("{user} is already on {backend}: the move was finished");
            return Ok(ExitCode::SUCCESS);
        }
        (None, true) => {
            eprintln!("{user}: no interrupted move to resume (pinned to {from})");
            return Ok(ExitCode::FAILURE);
        }
        _ => {}
    }
    if from == backend {
        println!("{user} is already on {backend}");
        return Ok(ExitCode::SUCCESS);
    }
    let fence = config.fence;
    let outcome = postern_route::moves::move_user(store, user, from, backend, fence, force).await;
    match outcome {
        MoveOutcome::Moved(acks) => {
            println!(
                "{user} moved from {from} to {backend}; sessions ended by {} instance(s){}",
                acks.confirmed.len(),
                missing_note(&acks.missing)
            );
            Ok(ExitCode::SUCCESS)
        }
        MoveOutcome::RolledBack(acks) => {
            eprintln!(
                "{user}: NOT moved: instance(s) {} did not confirm within {:?}. The move was \
                 rolled back: {user} stays on {from} and logs in there again ({} instance(s) \
                 had ended the sessions). Retry, or use --force.",
                acks.missing.join(", "),
                fence.ack_timeout,
                acks.confirmed.len()
            );
            Ok(ExitCode::FAILURE)
        }
        MoveOutcome::Interrupted { left, hold_until } => {
            let written = match left {
                Left::MaybeHeld => format!(
                    "the store failed on the first write, so {user} may or may not be held \
                     (moving to {backend})"
                ),
                Left::Held => format!(
                    "the hold and the kick are written ({user} is moving to {backend}, logins \
                     refused); the pin still points to {from}"
                ),
                Left::Confirmed => format!(
                    "every live instance ended {user}'s sessions, but the new pin could not be \
                     written; the pin still points to {from}, logins refused"
                ),
            };
            eprintln!(
                "{user}: move interrupted: the route store failed for {:?}. Written: {written}. \
                 When the store is back: `postern route move {user} {backend} --resume` finishes \
                 it, `--abort` rolls it back; if nobody does, the hold ends by itself at unix \
                 time {hold_until} and {user} stays on {from}.",
                fence.store_patience
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

fn missing_note(missing: &[String]) -> String {
    if missing.is_empty() {
        String::new()
    } else {
        format!(" (not confirmed by: {})", missing.join(", "))
    }
}

async fn show(
    config: &Config,
    router: &Router,
    user: &str,
    protocol: Protocol,
) -> Result<ExitCode> {
    match router.explain(user, protocol).await {
        Ok(d) => {
            println!("user:    {} (as typed: {user:?})", d.user);
            let why = match d.source {
                Source::Pinned => {
                    let origin = d.record.as_ref().map(|r| r.origin).unwrap_or_default();
                    format!(
                        "pinned by {} ({} store)",
                        origin.describe(),
                        router.store().kind()
                    )
                }
                Source::Stale => "cached pin; the store is not answering".to_owned(),
                Source::Hashed => {
                    "no pin; chosen by hash (routing.unknown_users = \"hash\")".to_owned()
                }
                Source::Assigned | Source::Reserved => "assigned just now".to_owned(),
                Source::Proposed => {
                    "no pin yet; would be assigned there at the first login".to_owned()
                }
                Source::FailedOver | Source::Temporary | Source::Moved => "failover".to_owned(),
            };
            println!("backend: {} ({why})", d.backend);
            if let Some(b) = config.settings.backends.get(&d.backend)
                && let Some(port) = b.endpoint(protocol).map(|e| e.port)
            {
                println!("{protocol}:    {}:{port}", b.host);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(RouteError::NoRoute) => {
            println!(
                "user:    {user:?}\nbackend: none: no pin, and routing.unknown_users = \"reject\""
            );
            Ok(ExitCode::from(2))
        }
        Err(RouteError::Moving) => {
            println!("user:    {user:?}\nbackend: none right now: a move is in progress");
            Ok(ExitCode::from(2))
        }
        Err(RouteError::Disabled) => {
            println!("user:    {user:?}\nbackend: none: the account is disabled");
            Ok(ExitCode::from(2))
        }
        Err(e) => Err(e.into()),
    }
}

async fn db(config: &Config, action: DbAction) -> Result<ExitCode> {
    let store = config.open_sql().await?;
    match action {
        DbAction::Migrate => {
            store.migrate().await?;
            println!("{}: schema up to date", store.dialect().as_str());
        }
        DbAction::Seed { file } => {
            let sql = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            store
                .execute_script(&sql)
                .await
                .with_context(|| format!("{}", file.display()))?;
            println!("loaded {}", file.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `postern backend list`: the configured backends with their operator state and pins.
async fn backend_list(config: &Config, store: &dyn postern_route::RouteStore) -> Result<()> {
    let states: std::collections::HashMap<String, String> =
        store.backend_states().await?.into_iter().collect();
    let counts: std::collections::HashMap<String, u64> =
        store.counts().await?.into_iter().collect();
    println!(
        "{:<16} {:<12} {:>6} {:<8} {:>8}  services",
        "backend", "pool", "weight", "state", "pinned"
    );
    for b in config.settings.backends.values() {
        let services: Vec<String> = [
            b.imap
                .as_ref()
                .map(|s| format!("imap {}:{}", b.host, s.endpoint.port)),
            b.pop3
                .as_ref()
                .map(|s| format!("pop3 {}:{}", b.host, s.endpoint.port)),
        ]
        .into_iter()
        .flatten()
        .collect();
        println!(
            "{:<16} {:<12} {:>6} {:<8} {:>8}  {}",
            b.name,
            b.pool,
            b.weight,
            states
                .get(&b.name)
                .map(String::as_str)
                .filter(|s| !s.starts_with("up"))
                .unwrap_or("normal"),
            counts.get(&b.name).copied().unwrap_or(0),
            services.join(", ")
        );
    }
    Ok(())
}

/// `postern backend evacuate`: drain, then move every pinned user, in batches.
async fn backend_evacuate(
    config: &Config,
    store: &dyn postern_route::RouteStore,
    backend: &str,
    batch: usize,
) -> Result<ExitCode> {
    let Some(from) = config.settings.backends.get(backend) else {
        bail!("no backend named {backend:?}");
    };
    // Backends an operator drained or took down take no one; "up <time>" is a
    // backend brought back by `backend up`, which can.
    let unavailable: std::collections::HashSet<String> = store
        .backend_states()
        .await?
        .into_iter()
        .filter(|(_, state)| state == "drain" || state == "down")
        .map(|(name, _)| name)
        .collect();
    let targets: Vec<postern_route::hash::Weighted<'_>> = config
        .settings
        .backends
        .values()
        .filter(|b| b.name != backend && b.pool == from.pool && b.weight > 0)
        .filter(|b| !unavailable.contains(&b.name))
        .map(|b| postern_route::hash::Weighted {
            name: &b.name,
            weight: b.weight,
        })
        .collect();
    if targets.is_empty() {
        bail!(
            "no other backend in pool {:?} can take the users",
            from.pool
        );
    }
    store.set_backend_state(backend, Some("drain")).await?;
    let report =
        postern_route::moves::evacuate(store, backend, &targets, batch, config.fence).await?;
    println!(
        "{backend}: drained; {} user(s) moved, {} rolled back",
        report.moved.len(),
        report.stalled.len()
    );
    for (user, to) in &report.moved {
        println!("  {user} -> {to}");
    }
    if !report.stalled.is_empty() {
        eprintln!(
            "not moved, still on {backend} (an instance did not confirm; retry): {}",
            report.stalled.join(", ")
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn backend_cmd(config: &Config, action: BackendAction) -> Result<ExitCode> {
    let store = config.open_store().await?;
    let exists = |b: &str| -> Result<()> {
        if config.settings.backends.contains_key(b) {
            Ok(())
        } else {
            bail!("no backend named {b:?} in the configuration")
        }
    };
    let set = |b: &str, state: Option<&'static str>| {
        let store = Arc::clone(&store);
        let b = b.to_owned();
        async move { store.set_backend_state(&b, state).await }
    };
    match action {
        BackendAction::List => backend_list(config, store.as_ref()).await?,
        BackendAction::Drain { backend } => {
            exists(&backend)?;
            set(&backend, Some("drain")).await?;
            println!("{backend}: draining (no new users or sessions)");
        }
        BackendAction::Down { backend } => {
            exists(&backend)?;
            set(&backend, Some("down")).await?;
            println!("{backend}: down (sessions end; shared-pool users fail over)");
        }
        BackendAction::Undrain { backend } => {
            exists(&backend)?;
            set(&backend, None).await?;
            println!("{backend}: back to normal (health checks decide)");
        }
        BackendAction::Up { backend } => {
            exists(&backend)?;
            // Normal again, and every instance forgets what real logins said of it
            // (a stale passive DOWN): the timestamp makes each `up` a new event.
            let stamp = format!("up {}", postern_route::store::now_secs());
            store.set_backend_state(&backend, Some(&stamp)).await?;
            println!("{backend}: up (health forgotten on every instance; checks decide)");
        }
        BackendAction::Evacuate { backend, batch } => {
            exists(&backend)?;
            return backend_evacuate(config, store.as_ref(), &backend, batch).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}
