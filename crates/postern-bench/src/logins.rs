//! Login sessions at a target rate: the cost of a proxy on the path every mail client
//! walks many times a day.
//!
//! IMAP: connect, (TLS), greeting, LOGIN, SELECT INBOX, LOGOUT. POP3: connect, (TLS),
//! greeting, USER, PASS, STAT, QUIT. With `--no-login`: connect, (TLS), greeting,
//! LOGOUT/QUIT, which measures what a handshake costs without the backend.
//!
//! Sessions start on a fixed schedule (open loop) so a slow proxy shows up as latency
//! rather than as a lower offered rate; `--concurrency` caps sessions in flight, and a
//! late start is reported. `--rate 0` runs closed-loop: as fast as `--concurrency`
//! sessions allow, for maximum sessions (or handshakes) per second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::ValueEnum;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::client::{self, Conn};
use crate::procfs::{self, CpuDelta, CpuSnapshot};
use crate::stats::Summary;
use crate::target::{Target, TargetArgs, TlsMode};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Proto {
    Imap,
    Pop3,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    target: TargetArgs,
    /// Protocol of the sessions.
    #[arg(long, value_enum, default_value_t = Proto::Imap)]
    protocol: Proto,
    /// Sessions measured.
    #[arg(long, default_value_t = 5000)]
    sessions: u64,
    /// Session starts per second (0: closed loop, as fast as --concurrency allows).
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Most sessions in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Sessions run first and not measured (route cache, allocator, TLS tables).
    #[arg(long, default_value_t = 200)]
    warmup: u64,
    /// Skip the login: connect, (TLS), greeting, LOGOUT. For handshake costs.
    #[arg(long)]
    no_login: bool,
}

#[derive(Serialize)]
struct Output {
    kind: &'static str,
    target: String,
    scenario: String,
    protocol: Proto,
    tls: TlsMode,
    no_login: bool,
    sessions: u64,
    ok: u64,
    failed: u64,
    errors: Vec<String>,
    rate: f64,
    concurrency: usize,
    elapsed_s: f64,
    sessions_per_s: f64,
    /// Whole session, connect to the final tagged OK / +OK, in µs.
    session_us: Summary,
    /// Connect to the login's OK (or to the greeting with --no-login), in µs.
    login_us: Summary,
    /// How late the latest session started against its schedule, in µs.
    start_lag_max_us: f64,
    cpu: CpuDelta,
    proxy_cpu_us_per_session: Option<f64>,
    aux_cpu_us_per_session: Option<f64>,
    client_cpu_us_per_session: f64,
    loadavg_before: String,
    loadavg_after: String,
}

struct Sample {
    session_us: f64,
    login_us: f64,
}

pub(crate) fn run(args: Args) -> Result<()> {
    crate::runtime(args.target.threads)?.block_on(measure(args))
}

async fn measure(args: Args) -> Result<()> {
    let target = Target::new(args.target.clone())?;
    let args = Arc::new(args);
    if args.warmup > 0 {
        let (_, failed, errors) = batch(&target, &args, args.warmup, 0).await?;
        if failed == args.warmup {
            bail!(
                "every warm-up session failed; first error: {}",
                errors.first().map(String::as_str).unwrap_or("?")
            );
        }
    }
    let loadavg_before = procfs::loadavg();
    let before = CpuSnapshot::take(&target.args.pid, &target.args.aux_pid)?;
    let started = Instant::now();
    let (samples, failed, errors) = batch(&target, &args, args.sessions, args.warmup).await?;
    let elapsed = started.elapsed().as_secs_f64();
    // Let the proxy finish closing the last sessions: that work is part of them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu = CpuSnapshot::take(&target.args.pid, &target.args.aux_pid)?.since(&before);
    let (mut session_us, mut login_us): (Vec<f64>, Vec<f64>) =
        samples.iter().map(|s| (s.session_us, s.login_us)).unzip();
    let lag = samples.iter().map(|s| s.lag_us).fold(0.0, f64::max);
    let ok = session_us.len() as u64;
    let per = |us: Option<u64>| us.map(|u| u as f64 / ok.max(1) as f64);
    let out = Output {
        kind: "logins",
        target: target.args.name.clone(),
        scenario: target.args.scenario.clone(),
        protocol: args.protocol,
        tls: target.args.tls,
        no_login: args.no_login,
        sessions: args.sessions,
        ok,
        failed,
        errors,
        rate: args.rate,
        concurrency: args.concurrency,
        elapsed_s: elapsed,
        sessions_per_s: ok as f64 / elapsed,
        session_us: Summary::of(&mut session_us),
        login_us: Summary::of(&mut login_us),
        start_lag_max_us: lag,
        proxy_cpu_us_per_session: per(cpu.proxy_us),
        aux_cpu_us_per_session: per(cpu.aux_us),
        client_cpu_us_per_session: cpu.client_us as f64 / ok.max(1) as f64,
        cpu,
        loadavg_before,
        loadavg_after: procfs::loadavg(),
    };
    eprintln!(
        "{} {:?} {}{}: {ok}/{} ok, {:.0} sessions/s, session p50 {:.2} ms p90 {:.2} ms p99 {:.2} ms, \
         proxy CPU {} µs/session, client CPU {:.0} µs/session, start lag max {:.1} ms",
        out.target,
        out.protocol,
        match out.tls {
            TlsMode::None => "plaintext",
            TlsMode::Implicit => "implicit TLS",
            TlsMode::Starttls => "STARTTLS",
        },
        if out.no_login { " (no login)" } else { "" },
        out.sessions,
        out.sessions_per_s,
        out.session_us.p50 / 1000.0,
        out.session_us.p90 / 1000.0,
        out.session_us.p99 / 1000.0,
        out.proxy_cpu_us_per_session
            .map_or("?".to_owned(), |v| format!("{v:.0}")),
        out.client_cpu_us_per_session,
        lag / 1000.0,
    );
    if failed > 0 {
        eprintln!("  {failed} sessions failed; first errors: {:?}", out.errors);
    }
    crate::emit(&out)
}

struct Timed {
    session_us: f64,
    login_us: f64,
    lag_us: f64,
}

/// Runs `count` sessions numbered from `first` on the schedule; returns the samples of
/// the successful ones, the failure count and the first few errors.
async fn batch(
    target: &Arc<Target>,
    args: &Arc<Args>,
    count: u64,
    first: u64,
) -> Result<(Vec<Timed>, u64, Vec<String>)> {
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut handles = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let t0 = Instant::now();
    let timeout = Duration::from_secs_f64(target.args.timeout.max(0.001));
    for i in 0..count {
        let due = (args.rate > 0.0).then(|| t0 + Duration::from_secs_f64(i as f64 / args.rate));
        if let Some(due) = due {
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let lag_us = due.map_or(0.0, |d| {
            Instant::now().saturating_duration_since(d).as_secs_f64() * 1e6
        });
        let target = Arc::clone(target);
        let args = Arc::clone(args);
        handles.push(tokio::spawn(async move {
            let r = tokio::time::timeout(timeout, one(&target, &args, first + i)).await;
            drop(permit);
            match r {
                Ok(Ok(s)) => Ok(Timed {
                    session_us: s.session_us,
                    login_us: s.login_us,
                    lag_us,
                }),
                Ok(Err(e)) => Err(format!("{e:#}")),
                Err(_) => Err("timed out".to_owned()),
            }
        }));
    }
    let mut samples = Vec::with_capacity(handles.len());
    let mut failed = 0;
    let mut errors = Vec::new();
    for h in handles {
        match h.await {
            Ok(Ok(s)) => samples.push(s),
            Ok(Err(e)) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(e);
                }
            }
            Err(e) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(format!("session task: {e}"));
                }
            }
        }
    }
    Ok((samples, failed, errors))
}

async fn one(target: &Target, args: &Args, n: u64) -> Result<Sample> {
    let start = Instant::now();
    let micros = |t: Instant| t.duration_since(start).as_secs_f64() * 1e6;
    let (conn, login_us) = match args.protocol {
        Proto::Imap => imap(target, args, n, start).await?,
        Proto::Pop3 => pop3(target, args, n, start).await?,
    };
    let session_us = micros(Instant::now());
    // The server closes after LOGOUT/QUIT; wait for it (briefly) so its teardown
    // happens inside the measured run, not in the next one.
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.wait_close()).await;
    Ok(Sample {
        session_us,
        login_us,
    })
}

async fn imap(target: &Target, args: &Args, n: u64, start: Instant) -> Result<(Conn, f64)> {
    if args.no_login {
        let mut conn = Conn::connect(target, 0).await?;
        client::imap_greeting(&mut conn).await?;
        let login_us = start.elapsed().as_secs_f64() * 1e6;
        client::imap_command(&mut conn, "z", "LOGOUT").await?;
        return Ok((conn, login_us));
    }
    let mut conn = client::imap_login(target, n, 0).await?;
    let login_us = start.elapsed().as_secs_f64() * 1e6;
    client::imap_command(&mut conn, "b", "SELECT INBOX").await?;
    client::imap_command(&mut conn, "c", "LOGOUT").await?;
    Ok((conn, login_us))
}

async fn pop3(target: &Target, args: &Args, n: u64, start: Instant) -> Result<(Conn, f64)> {
    let mut conn = client::pop3_open(target).await?;
    if args.no_login {
        let login_us = start.elapsed().as_secs_f64() * 1e6;
        client::pop3_command(&mut conn, "QUIT").await?;
        return Ok((conn, login_us));
    }
    client::pop3_command(&mut conn, &format!("USER {}", target.user(n))).await?;
    client::pop3_command(&mut conn, &format!("PASS {}", target.args.password)).await?;
    let login_us = start.elapsed().as_secs_f64() * 1e6;
    client::pop3_command(&mut conn, "STAT").await?;
    client::pop3_command(&mut conn, "QUIT").await?;
    Ok((conn, login_us))
}
