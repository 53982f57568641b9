//! Relay throughput: one logged-in IMAP session (or `--connections` of them at once)
//! FETCHes a large literal (20 MB by default) through the target, `--repeat` times
//! each. Reports MB/s (10^6 bytes per second) and, with `--pid`, the proxy's CPU per GB
//! moved.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use crate::client::{self, Conn, literal_len};
use crate::procfs::{self, CpuDelta, CpuSnapshot};
use crate::stats::Summary;
use crate::target::{Target, TargetArgs, TlsMode};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    target: TargetArgs,
    /// Bytes per FETCH (asked for as a `<0.N>` partial).
    #[arg(long, default_value_t = 20_000_000)]
    size: u64,
    /// FETCHes measured, per connection.
    #[arg(long, default_value_t = 50)]
    repeat: u32,
    /// Sessions FETCHing at the same time, all as the first user (whose mailbox holds
    /// the big message).
    #[arg(long, default_value_t = 1)]
    connections: u32,
    /// FETCHes before measuring (TCP windows grow, buffers get allocated).
    #[arg(long, default_value_t = 3)]
    warmup: u32,
    /// Client read size in bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    read_size: usize,
}

#[derive(Serialize)]
struct Output {
    kind: &'static str,
    target: String,
    scenario: String,
    tls: TlsMode,
    size: u64,
    repeat: u32,
    connections: u32,
    /// Per FETCH, MB/s.
    mb_per_s: Summary,
    /// All bytes over the time the FETCHes took (wall clock, all connections), MB/s.
    aggregate_mb_per_s: f64,
    elapsed_s: f64,
    cpu: CpuDelta,
    proxy_cpu_ms_per_gb: Option<f64>,
    aux_cpu_ms_per_gb: Option<f64>,
    client_cpu_ms_per_gb: f64,
    loadavg_before: String,
    loadavg_after: String,
}

pub(crate) fn run(args: Args) -> Result<()> {
    crate::runtime(args.target.threads)?.block_on(measure(args))
}

async fn measure(args: Args) -> Result<()> {
    let target = Target::new(args.target.clone())?;
    let timeout = Duration::from_secs_f64(target.args.timeout.max(0.001));
    let mut conns = Vec::new();
    for _ in 0..args.connections.max(1) {
        let mut conn =
            tokio::time::timeout(timeout, client::imap_login(&target, 0, args.read_size))
                .await
                .context("login timed out")??;
        client::imap_command(&mut conn, "s", "SELECT INBOX").await?;
        for i in 0..args.warmup {
            tokio::time::timeout(timeout, fetch(&mut conn, i, args.size))
                .await
                .context("FETCH timed out")??;
        }
        conns.push(conn);
    }
    let loadavg_before = procfs::loadavg();
    let before = CpuSnapshot::take(&target.args.pid, &target.args.aux_pid)?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut conn in conns {
        let (warmup, repeat, size) = (args.warmup, args.repeat, args.size);
        tasks.spawn(async move {
            let mut rates = Vec::with_capacity(repeat as usize);
            for i in 0..repeat {
                let took = tokio::time::timeout(timeout, fetch(&mut conn, warmup + i, size))
                    .await
                    .context("FETCH timed out")??;
                rates.push(size as f64 / took.as_secs_f64() / 1e6);
            }
            anyhow::Ok((conn, rates))
        });
    }
    let mut rates = Vec::new();
    let mut conns = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (conn, r) = done.context("FETCH task failed")??;
        rates.extend(r);
        conns.push(conn);
    }
    let busy = started.elapsed();
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = CpuSnapshot::take(&target.args.pid, &target.args.aux_pid)?.since(&before);
    for conn in &mut conns {
        client::imap_command(conn, "z", "LOGOUT").await?;
    }
    let fetches = u64::from(args.repeat) * conns.len() as u64;
    let gb = (args.size * fetches) as f64 / 1e9;
    let per_gb = |us: Option<u64>| us.map(|u| u as f64 / 1000.0 / gb);
    let out = Output {
        kind: "relay",
        target: target.args.name.clone(),
        scenario: target.args.scenario.clone(),
        tls: target.args.tls,
        size: args.size,
        repeat: args.repeat,
        connections: conns.len() as u32,
        mb_per_s: Summary::of(&mut rates),
        aggregate_mb_per_s: gb * 1000.0 / busy.as_secs_f64(),
        elapsed_s: elapsed,
        proxy_cpu_ms_per_gb: per_gb(cpu.proxy_us),
        aux_cpu_ms_per_gb: per_gb(cpu.aux_us),
        client_cpu_ms_per_gb: cpu.client_us as f64 / 1000.0 / gb,
        cpu,
        loadavg_before,
        loadavg_after: procfs::loadavg(),
    };
    eprintln!(
        "{} relay {} x {} x {} bytes: median {:.0} MB/s (min {:.0}, max {:.0}), aggregate {:.0} MB/s, \
         proxy CPU {} ms/GB, backend {} ms/GB, client {:.0} ms/GB",
        out.target,
        out.connections,
        out.repeat,
        out.size,
        out.mb_per_s.p50,
        out.mb_per_s.min,
        out.mb_per_s.max,
        out.aggregate_mb_per_s,
        out.proxy_cpu_ms_per_gb
            .map_or("?".to_owned(), |v| format!("{v:.0}")),
        out.aux_cpu_ms_per_gb
            .map_or("?".to_owned(), |v| format!("{v:.0}")),
        out.client_cpu_ms_per_gb,
    );
    crate::emit(&out)
}

/// One FETCH of `size` bytes; returns how long it took, request to tagged OK.
async fn fetch(conn: &mut Conn, i: u32, size: u64) -> Result<Duration> {
    let tag = format!("f{i}");
    let t = Instant::now();
    conn.send(format!("{tag} FETCH 1 BODY.PEEK[]<0.{size}>\r\n").as_bytes())
        .await?;
    let header = conn.read_line().await?;
    let Some(n) = literal_len(&header) else {
        bail!("unexpected FETCH response: {}", header.trim_end());
    };
    ensure!(n == size, "asked for {size} bytes, got a literal of {n}");
    conn.discard(n).await?;
    client::imap_wait(conn, &tag).await?;
    Ok(t.elapsed())
}
