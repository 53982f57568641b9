//! What the kernel says about the processes under test: CPU time from
//! `/proc/PID/stat`, resident memory from `/proc/PID/status`, TCP buffer memory from
//! `/proc/net/sockstat`.

use std::fs;

use anyhow::{Context, Result, anyhow};
use serde::Serialize;

/// `/proc/PID/stat` counts CPU time in USER_HZ ticks, which the kernel ABI fixes at 100
/// on every architecture Postern targets (sysconf(_SC_CLK_TCK) would need unsafe FFI).
/// 10 ms resolution: runs are sized so the proxy spends seconds, not ticks.
const TICK_US: u64 = 10_000;

/// utime + stime of one process (all its threads, dead ones included), in µs.
pub(crate) fn cpu_us(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // The command name is in parentheses and may hold spaces: count fields after it.
    let rest = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 1..))
        .ok_or_else(|| anyhow!("/proc/{pid}/stat: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is the first after ')'; utime is field 14, stime field 15.
    let tick = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or_else(|| anyhow!("/proc/{pid}/stat: no field {}", i + 3))
    };
    Ok((tick(11)? + tick(12)?) * TICK_US)
}

/// Summed CPU time of several processes (nginx's master and workers), in µs.
pub(crate) fn cpu_us_sum(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|&p| cpu_us(p)).sum()
}

/// Resident memory of a set of processes, in KiB.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct Mem {
    /// VmRSS: what the targets are stated in.
    pub(crate) rss_kib: u64,
    /// RssAnon: heap and stacks only, without file pages that happen to be mapped in.
    pub(crate) anon_kib: u64,
}

/// Summed VmRSS and RssAnon of `pids`.
pub(crate) fn mem_sum(pids: &[u32]) -> Result<Mem> {
    let mut total = Mem::default();
    for &pid in pids {
        let status = fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("cannot read /proc/{pid}/status"))?;
        total.rss_kib += status_kib(&status, "VmRSS:")?;
        total.anon_kib += status_kib(&status, "RssAnon:").unwrap_or(0);
    }
    Ok(total)
}

fn status_kib(status: &str, key: &str) -> Result<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no {key} in /proc/PID/status"))
}

/// The system-wide TCP line of `/proc/net/sockstat`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct TcpStat {
    /// Sockets in use (established and listening).
    pub(crate) inuse: u64,
    /// Memory held by TCP socket buffers, all sockets, in KiB.
    pub(crate) mem_kib: u64,
}

/// Reads `/proc/net/sockstat` (its `mem` is in pages).
pub(crate) fn tcp_stat() -> Result<TcpStat> {
    let text =
        fs::read_to_string("/proc/net/sockstat").context("cannot read /proc/net/sockstat")?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .ok_or_else(|| anyhow!("/proc/net/sockstat has no TCP line"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let value = |key: &str| -> u64 {
        words
            .iter()
            .position(|w| *w == key)
            .and_then(|i| words.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(TcpStat {
        inuse: value("inuse"),
        mem_kib: value("mem") * page_kib(),
    })
}

/// The kernel page size in KiB, read from our own smaps (4 on x86_64).
fn page_kib() -> u64 {
    fs::read_to_string("/proc/self/smaps")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("KernelPageSize:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(4)
}

/// Kernel slab memory (`Slab:` in /proc/meminfo), in KiB: where socket structures,
/// inodes and files live; machine-wide.
pub(crate) fn slab_kib() -> Result<u64> {
    let text = fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    status_kib(&text, "Slab:")
}

/// `/proc/loadavg`, kept with every result so noisy runs can be told apart.
pub(crate) fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// CPU counters of everything a run looks at, taken at one instant.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CpuSnapshot {
    proxy: Option<u64>,
    aux: Option<u64>,
    client: u64,
}

/// CPU spent between two snapshots, in µs.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct CpuDelta {
    /// The processes under test (`--pid`), summed; absent without `--pid`.
    pub(crate) proxy_us: Option<u64>,
    /// The helper processes (`--aux-pid`: backend, auth_http), summed.
    pub(crate) aux_us: Option<u64>,
    /// This load generator.
    pub(crate) client_us: u64,
}

impl CpuSnapshot {
    /// Reads the counters now.
    pub(crate) fn take(proxy: &[u32], aux: &[u32]) -> Result<Self> {
        let sum = |pids: &[u32]| -> Result<Option<u64>> {
            if pids.is_empty() {
                Ok(None)
            } else {
                cpu_us_sum(pids).map(Some)
            }
        };
        Ok(Self {
            proxy: sum(proxy)?,
            aux: sum(aux)?,
            client: cpu_us(std::process::id())?,
        })
    }

    /// What was spent since `earlier`.
    pub(crate) fn since(&self, earlier: &CpuSnapshot) -> CpuDelta {
        let d = |now: Option<u64>, then: Option<u64>| Some(now?.saturating_sub(then?));
        CpuDelta {
            proxy_us: d(self.proxy, earlier.proxy),
            aux_us: d(self.aux, earlier.aux),
            client_us: self.client.saturating_sub(earlier.client),
        }
    }
}
