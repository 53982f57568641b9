//! Idle-session memory: open S logged-in IMAP sessions through the target (LOGIN,
//! SELECT INBOX, IDLE), hold them silent, and read how much the proxy's resident memory
//! grew per session. Measured at each of several sizes (4 000 then 8 000 by default) in
//! one run, so the growth can be seen to be linear: the marginal figure between two
//! sizes leaves out one-time costs (thread stacks, tables) that the average includes.
//!
//! Start the proxy fresh for each idle run. Memory freed by an earlier run stays in the
//! allocator and would be reused by these sessions without growing RSS, making them
//! look free.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::client::{self, Conn};
use crate::procfs::{self, Mem, TcpStat};
use crate::target::{Target, TargetArgs, TlsMode};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    target: TargetArgs,
    /// Total sessions at each measurement, ascending (e.g. 4000,8000).
    #[arg(long, value_delimiter = ',', default_value = "4000,8000")]
    sessions: Vec<u64>,
    /// Sessions being opened at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds to wait after the last session of a step is in IDLE before reading
    /// memory (the proxy's allocator and the kernel settle).
    #[arg(long, default_value_t = 3.0)]
    settle: f64,
    /// Sessions opened and closed one at a time before the baseline, so one-time
    /// set-up (route cache entry, first TLS handshake) is not counted per session.
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    /// Seconds to hold every session after the last measurement.
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
}

#[derive(Serialize)]
struct Step {
    sessions: u64,
    established: u64,
    open_s: f64,
    mem: Mem,
    /// (RSS now - baseline) / sessions established.
    kib_per_session: f64,
    anon_kib_per_session: f64,
    /// (RSS now - RSS at the previous step) / sessions added since.
    marginal_kib_per_session: Option<f64>,
    tcp: TcpStat,
    /// Kernel TCP buffer memory, all sockets on the machine (the proxy's two plus the
    /// client's and the backend's), growth per session.
    tcp_kib_per_session: f64,
    slab_kib: u64,
    /// Kernel slab growth per session, machine-wide (socket, inode, file and epoll
    /// structures of all four sockets of a proxied session); noisy, as anything else
    /// running moves it too.
    slab_kib_per_session: f64,
}

#[derive(Serialize)]
struct Output {
    kind: &'static str,
    target: String,
    scenario: String,
    tls: TlsMode,
    baseline: Mem,
    tcp_baseline: TcpStat,
    slab_baseline_kib: u64,
    steps: Vec<Step>,
    failed: u64,
    errors: Vec<String>,
    /// Sessions that, after the hold, still answered DONE and LOGOUT.
    alive_at_end: u64,
    loadavg_before: String,
    loadavg_after: String,
}

pub(crate) fn run(args: Args) -> Result<()> {
    crate::runtime(args.target.threads)?.block_on(measure(args))
}

async fn measure(args: Args) -> Result<()> {
    ensure!(
        !args.target.pid.is_empty(),
        "idle measures the proxy's memory: give --pid"
    );
    ensure!(
        args.sessions.windows(2).all(|w| w[0] < w[1]) && !args.sessions.is_empty(),
        "--sessions must be ascending"
    );
    let target = Target::new(args.target.clone())?;
    let timeout = Duration::from_secs_f64(target.args.timeout.max(0.001));
    for n in 0..args.warmup {
        let mut conn = tokio::time::timeout(timeout, open(&target, n)).await??;
        tokio::time::timeout(timeout, close(&mut conn)).await??;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loadavg_before = procfs::loadavg();
    let base = Baseline::read(&target.args.pid)?;
    eprintln!(
        "{} idle {}: baseline RSS {} KiB (anon {} KiB)",
        target.args.name,
        tls_name(target.args.tls),
        base.mem.rss_kib,
        base.mem.anon_kib
    );

    let mut sessions = Sessions::new(&args, target, timeout);
    let mut steps: Vec<Step> = Vec::new();
    for &size in &args.sessions {
        let t = Instant::now();
        sessions.open_up_to(size).await?;
        let open_s = t.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs_f64(args.settle.max(0.0))).await;
        let step = base.step(
            &sessions.target.args.pid,
            size,
            sessions.established,
            open_s,
            steps.last(),
        )?;
        step.print();
        steps.push(step);
    }
    if sessions.failed > 0 {
        eprintln!(
            "  {} sessions failed to open; first errors: {:?}",
            sessions.failed, sessions.errors
        );
    }
    tokio::time::sleep(Duration::from_secs_f64(args.hold.max(0.0))).await;
    let established = sessions.established;
    let target = Arc::clone(&sessions.target);
    let (failed, errors, alive) = sessions.close_all().await;
    eprintln!("  {alive} of {established} sessions answered DONE and LOGOUT at the end");
    let out = Output {
        kind: "idle",
        target: target.args.name.clone(),
        scenario: target.args.scenario.clone(),
        tls: target.args.tls,
        baseline: base.mem,
        tcp_baseline: base.tcp,
        slab_baseline_kib: base.slab_kib,
        steps,
        failed,
        errors,
        alive_at_end: alive,
        loadavg_before,
        loadavg_after: procfs::loadavg(),
    };
    crate::emit(&out)
}

/// What the proxy and the kernel held before the first session.
struct Baseline {
    mem: Mem,
    tcp: TcpStat,
    slab_kib: u64,
}

impl Baseline {
    fn read(pid: &[u32]) -> Result<Self> {
        Ok(Self {
            mem: procfs::mem_sum(pid)?,
            tcp: procfs::tcp_stat()?,
            slab_kib: procfs::slab_kib()?,
        })
    }

    /// Reads memory now and expresses it per session, against this baseline and the
    /// previous step.
    fn step(
        &self,
        pid: &[u32],
        sessions: u64,
        established: u64,
        open_s: f64,
        prev: Option<&Step>,
    ) -> Result<Step> {
        let now = Self::read(pid)?;
        let per = |now: u64, then: u64, n: u64| (now as f64 - then as f64) / n.max(1) as f64;
        let marginal = prev.map(|prev| {
            per(
                now.mem.rss_kib,
                prev.mem.rss_kib,
                established.saturating_sub(prev.established),
            )
        });
        Ok(Step {
            sessions,
            established,
            open_s,
            mem: now.mem,
            kib_per_session: per(now.mem.rss_kib, self.mem.rss_kib, established),
            anon_kib_per_session: per(now.mem.anon_kib, self.mem.anon_kib, established),
            marginal_kib_per_session: marginal,
            tcp: now.tcp,
            tcp_kib_per_session: per(now.tcp.mem_kib, self.tcp.mem_kib, established),
            slab_kib: now.slab_kib,
            slab_kib_per_session: per(now.slab_kib, self.slab_kib, established),
        })
    }
}

impl Step {
    fn print(&self) {
        eprintln!(
            "  {} sessions in IDLE (opened in {:.1} s): RSS {} KiB, \
             {:.2} KiB/session (anon {:.2}){}, kernel: TCP buffers {:.2}, slab {:.2} KiB/session",
            self.established,
            self.open_s,
            self.mem.rss_kib,
            self.kib_per_session,
            self.anon_kib_per_session,
            self.marginal_kib_per_session
                .map_or(String::new(), |m| format!(", marginal {m:.2} KiB/session")),
            self.tcp_kib_per_session,
            self.slab_kib_per_session,
        );
    }
}

/// The sessions held open: each a task that sits in IDLE until released.
struct Sessions {
    target: Arc<Target>,
    timeout: Duration,
    warmup: u64,
    permits: Arc<Semaphore>,
    release: watch::Sender<bool>,
    handles: Vec<tokio::task::JoinHandle<bool>>,
    opened: u64,
    established: u64,
    failed: u64,
    errors: Vec<String>,
}

impl Sessions {
    fn new(args: &Args, target: Arc<Target>, timeout: Duration) -> Self {
        Self {
            target,
            timeout,
            warmup: args.warmup,
            permits: Arc::new(Semaphore::new(args.concurrency.max(1))),
            release: watch::channel(false).0,
            handles: Vec::new(),
            opened: 0,
            established: 0,
            failed: 0,
            errors: Vec::new(),
        }
    }

    /// Opens sessions until `size` have been tried, and waits until each is in IDLE
    /// or has failed.
    async fn open_up_to(&mut self, size: u64) -> Result<()> {
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<(), String>>();
        while self.opened < size {
            let permit = Arc::clone(&self.permits).acquire_owned().await?;
            let target = Arc::clone(&self.target);
            let ready = ready_tx.clone();
            let released = self.release.subscribe();
            let n = self.warmup + self.opened;
            let timeout = self.timeout;
            self.handles.push(tokio::spawn(async move {
                let opened = tokio::time::timeout(timeout, open(&target, n)).await;
                drop(permit);
                let mut conn = match opened {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        let _ = ready.send(Err(format!("{e:#}")));
                        return false;
                    }
                    Err(_) => {
                        let _ = ready.send(Err("timed out".to_owned()));
                        return false;
                    }
                };
                let _ = ready.send(Ok(()));
                drop(ready);
                hold_until_released(released).await;
                matches!(
                    tokio::time::timeout(timeout, close(&mut conn)).await,
                    Ok(Ok(()))
                )
            }));
            self.opened += 1;
        }
        drop(ready_tx);
        while let Some(r) = ready_rx.recv().await {
            match r {
                Ok(()) => self.established += 1,
                Err(e) => {
                    self.failed += 1;
                    if self.errors.len() < 5 {
                        self.errors.push(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Releases every session and counts those that still answered DONE and LOGOUT.
    async fn close_all(self) -> (u64, Vec<String>, u64) {
        let _ = self.release.send(true);
        let mut alive = 0;
        for h in self.handles {
            if matches!(h.await, Ok(true)) {
                alive += 1;
            }
        }
        (self.failed, self.errors, alive)
    }
}

fn tls_name(tls: TlsMode) -> &'static str {
    match tls {
        TlsMode::None => "plaintext",
        TlsMode::Implicit => "implicit TLS",
        TlsMode::Starttls => "STARTTLS",
    }
}

/// A logged-in session in IDLE.
async fn open(target: &Target, n: u64) -> Result<Conn> {
    let mut conn = client::imap_login(target, n, 0).await?;
    client::imap_command(&mut conn, "s", "SELECT INBOX").await?;
    conn.send(b"i IDLE\r\n").await?;
    let line = conn.read_line().await?;
    if !line.starts_with('+') {
        bail!("IDLE: {}", line.trim_end());
    }
    Ok(conn)
}

/// Ends the IDLE and logs out: proves the session is still alive end to end.
async fn close(conn: &mut Conn) -> Result<()> {
    conn.send(b"DONE\r\n").await?;
    client::imap_wait(conn, "i").await?;
    client::imap_command(conn, "z", "LOGOUT").await
}

async fn hold_until_released(mut released: watch::Receiver<bool>) {
    let _ = released.wait_for(|r| *r).await;
}
