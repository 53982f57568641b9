//! The comparison table: reads the JSON lines a `scripts/bench-compare.sh` run wrote
//! (one object per measurement, tagged with `target` and `scenario`) and prints the
//! markdown tables of `docs/benchmarks.md`. Repeated runs of one measurement are
//! summarized by their median, with the range beside it.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::stats::median;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// JSON-lines files with the results (non-JSON lines are skipped).
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

pub(crate) fn run(args: Args) -> Result<()> {
    let mut results = Vec::new();
    for file in &args.files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        results.extend(
            text.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v.get("kind").is_some()),
        );
    }
    print!("{}", render(&Results(results)));
    Ok(())
}

struct Results(Vec<Value>);

const TARGETS: [&str; 4] = ["direct", "nginx", "haproxy", "postern"];

/// A number inside a JSON object, by path (`steps` arrays are handled by callers).
fn num(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter()
        .try_fold(v, |v, k| v.get(*k))
        .and_then(Value::as_f64)
}

/// The step of an idle run with the most (`last`) or fewest sessions.
fn idle_step(v: &Value, last: bool) -> Option<&Value> {
    let steps = v.get("steps")?.as_array()?;
    if last { steps.last() } else { steps.first() }
}

impl Results {
    fn runs<'a>(&'a self, scenario: &'a str, target: &'a str) -> impl Iterator<Item = &'a Value> {
        self.0.iter().filter(move |v| {
            v.get("scenario").and_then(Value::as_str) == Some(scenario)
                && v.get("target").and_then(Value::as_str) == Some(target)
        })
    }

    fn values(&self, scenario: &str, target: &str, f: &dyn Fn(&Value) -> Option<f64>) -> Vec<f64> {
        self.runs(scenario, target).filter_map(f).collect()
    }

    fn median(
        &self,
        scenario: &str,
        target: &str,
        f: &dyn Fn(&Value) -> Option<f64>,
    ) -> Option<f64> {
        median(&self.values(scenario, target, f))
    }

    fn first(&self, scenario: &str) -> Option<&Value> {
        self.0
            .iter()
            .find(|v| v.get("scenario").and_then(Value::as_str) == Some(scenario))
    }
}

/// How a row shows its numbers.
#[derive(Clone, Copy)]
enum Ratio {
    /// Postern ÷ nginx and Postern ÷ HAProxy.
    ToProxies,
    /// No ratio columns.
    None,
}

/// Picks one number out of a result object.
type Metric<'a> = Box<dyn Fn(&Value) -> Option<f64> + 'a>;

struct Row<'a> {
    label: String,
    scenario: &'a str,
    targets: &'a [&'a str],
    f: Metric<'a>,
    decimals: usize,
    ratio: Ratio,
}

fn fmt(v: f64, decimals: usize) -> String {
    format!("{v:.decimals$}")
}

fn cell(values: &[f64], decimals: usize) -> String {
    match median(values) {
        None => "–".to_owned(),
        Some(m) if values.len() > 1 => {
            let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!(
                "{} ({}–{})",
                fmt(m, decimals),
                fmt(lo, decimals),
                fmt(hi, decimals)
            )
        }
        Some(m) => fmt(m, decimals),
    }
}

fn ratio_cell(num: Option<f64>, den: Option<f64>) -> String {
    match (num, den) {
        (Some(n), Some(d)) if d != 0.0 => format!("{:.2}×", n / d),
        _ => "–".to_owned(),
    }
}

/// The figures the rows' labels name: the rates, sizes and session counts of this run.
struct Params {
    rate: f64,
    tls_rate: f64,
    hs_conc: f64,
    relay_mb: f64,
    idle_small: f64,
    idle_big: f64,
    tls_small: f64,
    tls_big: f64,
}

impl Params {
    fn of(r: &Results) -> Self {
        let first = |scenario: &str, key: &str| {
            r.first(scenario)
                .and_then(|v| num(v, &[key]))
                .unwrap_or(0.0)
        };
        let idle_size = |scenario: &str, last: bool| {
            r.first(scenario)
                .and_then(|v| idle_step(v, last))
                .and_then(|s| num(s, &["sessions"]))
                .unwrap_or(0.0)
        };
        Self {
            rate: first("imap-login", "rate"),
            tls_rate: first("imap-login-tls", "rate"),
            hs_conc: first("tls-handshake", "concurrency"),
            relay_mb: first("relay", "size") / 1e6,
            idle_small: idle_size("idle-plain", false),
            idle_big: idle_size("idle-plain", true),
            tls_small: idle_size("idle-tls", false),
            tls_big: idle_size("idle-tls", true),
        }
    }
}

const ALL: &[&str] = &TARGETS;
const PROXIES: &[&str] = &["nginx", "haproxy", "postern"];

fn row(
    label: impl Into<String>,
    scenario: &'static str,
    targets: &'static [&'static str],
    f: Metric<'static>,
    decimals: usize,
    ratio: Ratio,
) -> Row<'static> {
    Row {
        label: label.into(),
        scenario,
        targets,
        f,
        decimals,
        ratio,
    }
}

fn cpu_per_session() -> Metric<'static> {
    Box::new(|v| num(v, &["proxy_cpu_us_per_session"]))
}

/// A latency quantile of the session, in ms.
fn latency(q: &'static str) -> Metric<'static> {
    Box::new(move |v| num(v, &["session_us", q]).map(|x| x / 1000.0))
}

/// A figure of an idle run's largest (`last`) or smallest step.
fn idle_figure(last: bool, key: &'static str) -> Metric<'static> {
    Box::new(move |v| idle_step(v, last).and_then(|s| num(s, &[key])))
}

fn login_rows(p: &Params) -> Vec<Row<'static>> {
    let rate = p.rate;
    vec![
        row(
            format!("IMAP login session, plaintext, {rate:.0}/s: proxy CPU per session (µs)"),
            "imap-login",
            PROXIES,
            cpu_per_session(),
            0,
            Ratio::ToProxies,
        ),
        row(
            "… plus nginx's auth_http responder, CPU per session (µs)",
            "imap-login",
            &["nginx"],
            Box::new(|v| num(v, &["aux_cpu_us_per_session"])),
            0,
            Ratio::None,
        ),
        row(
            "… session latency p50 (ms)",
            "imap-login",
            ALL,
            latency("p50"),
            3,
            Ratio::None,
        ),
        row(
            "… session latency p99 (ms)",
            "imap-login",
            ALL,
            latency("p99"),
            3,
            Ratio::None,
        ),
        row(
            format!("POP3 login session, plaintext, {rate:.0}/s: proxy CPU per session (µs)"),
            "pop3-login",
            PROXIES,
            cpu_per_session(),
            0,
            Ratio::ToProxies,
        ),
        row(
            "… session latency p99 (ms)",
            "pop3-login",
            ALL,
            latency("p99"),
            3,
            Ratio::None,
        ),
    ]
}

fn relay_rows(p: &Params) -> Vec<Row<'static>> {
    let mb = p.relay_mb;
    let throughput = || -> Metric<'static> { Box::new(|v| num(v, &["mb_per_s", "p50"])) };
    let per_gb = || -> Metric<'static> { Box::new(|v| num(v, &["proxy_cpu_ms_per_gb"])) };
    let mut rows = Vec::new();
    for (scenario, what) in [
        ("relay", format!("{mb:.0} MB FETCH on one connection")),
        (
            "relay-4",
            format!("{mb:.0} MB FETCHes on 4 connections at once"),
        ),
    ] {
        rows.push(row(
            format!("Relay, {what}: MB/s (median FETCH)"),
            scenario,
            ALL,
            throughput(),
            0,
            Ratio::ToProxies,
        ));
        rows.push(row(
            "… proxy CPU per GB relayed (ms)",
            scenario,
            PROXIES,
            per_gb(),
            0,
            Ratio::ToProxies,
        ));
    }
    rows
}

fn idle_rows(p: &Params) -> Vec<Row<'static>> {
    let mut rows = Vec::new();
    for (scenario, what, small, big) in [
        ("idle-plain", "plaintext", p.idle_small, p.idle_big),
        ("idle-tls", "implicit TLS", p.tls_small, p.tls_big),
    ] {
        rows.push(row(
            format!("Idle IMAP session (IDLE), {what}: proxy KiB per session at {big:.0}"),
            scenario,
            PROXIES,
            idle_figure(true, "kib_per_session"),
            2,
            Ratio::ToProxies,
        ));
        rows.push(row(
            format!("… at {small:.0}"),
            scenario,
            PROXIES,
            idle_figure(false, "kib_per_session"),
            2,
            Ratio::ToProxies,
        ));
        rows.push(row(
            format!("… marginal, {small:.0} → {big:.0}"),
            scenario,
            PROXIES,
            idle_figure(true, "marginal_kib_per_session"),
            2,
            Ratio::ToProxies,
        ));
    }
    rows.push(row(
        "Kernel slab growth per idle plaintext session, machine-wide: its 4 loopback sockets (KiB)",
        "idle-plain",
        PROXIES,
        idle_figure(true, "slab_kib_per_session"),
        1,
        Ratio::None,
    ));
    rows
}

fn tls_rows(p: &Params) -> Vec<Row<'static>> {
    let (tls_rate, hs_conc) = (p.tls_rate, p.hs_conc);
    vec![
        row(
            format!(
                "IMAP login session, implicit TLS, {tls_rate:.0}/s: proxy CPU per session (µs)"
            ),
            "imap-login-tls",
            PROXIES,
            cpu_per_session(),
            0,
            Ratio::ToProxies,
        ),
        row(
            "… session latency p50 (ms)",
            "imap-login-tls",
            PROXIES,
            latency("p50"),
            3,
            Ratio::None,
        ),
        row(
            "… session latency p99 (ms)",
            "imap-login-tls",
            PROXIES,
            latency("p99"),
            3,
            Ratio::None,
        ),
        row(
            format!(
                "TLS handshakes/s (connect, handshake, greeting, LOGOUT; {hs_conc:.0} in flight, load generator on the same 2 cores)"
            ),
            "tls-handshake",
            PROXIES,
            Box::new(|v| num(v, &["sessions_per_s"])),
            0,
            Ratio::ToProxies,
        ),
        row(
            "… proxy CPU per handshake session (µs)",
            "tls-handshake",
            PROXIES,
            cpu_per_session(),
            0,
            Ratio::ToProxies,
        ),
    ]
}

/// The main table: each row's medians (with ranges) per target, and Postern's ratios.
fn main_table(r: &Results, rows: &[Row<'_>]) -> String {
    let mut out = String::new();
    out.push_str(
        "| Measurement | direct | nginx | HAProxy | Postern | Postern ÷ nginx | Postern ÷ HAProxy |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    for row in rows {
        let cells: Vec<String> = TARGETS
            .iter()
            .map(|t| {
                if row.targets.contains(t) {
                    cell(&r.values(row.scenario, t, &*row.f), row.decimals)
                } else {
                    "–".to_owned()
                }
            })
            .collect();
        let ratio = |to: &str| match row.ratio {
            Ratio::ToProxies => ratio_cell(
                r.median(row.scenario, "postern", &*row.f),
                r.median(row.scenario, to, &*row.f),
            ),
            Ratio::None => String::new(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.label,
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            ratio("nginx"),
            ratio("haproxy"),
        );
    }
    out
}

/// Rows derived from several measurements: differences against direct, and the TLS
/// cost per handshake.
fn derived_table(r: &Results, rate: f64) -> String {
    let mut out = String::new();
    let p =
        |scenario: &str, target: &str, q: &'static str| r.median(scenario, target, &*latency(q));
    let diff = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
    let show = |v: Option<f64>, d: usize| v.map_or("–".to_owned(), |x| format!("{x:+.d$}"));
    out.push_str("| Derived | nginx | HAProxy | Postern |\n|---|---:|---:|---:|\n");
    let row3 = |out: &mut String, label: &str, f: &dyn Fn(&str) -> String| {
        let _ = writeln!(
            out,
            "| {label} | {} | {} | {} |",
            f(PROXIES[0]),
            f(PROXIES[1]),
            f(PROXIES[2])
        );
    };
    for (scenario, name) in [("imap-login", "IMAP"), ("pop3-login", "POP3")] {
        for q in ["p50", "p90", "p99"] {
            row3(
                &mut out,
                &format!("{name} login, plaintext, {rate:.0}/s: added {q} latency vs direct (ms)"),
                &|t| show(diff(p(scenario, t, q), p(scenario, "direct", q)), 3),
            );
        }
    }
    let relay_ratio = |t: &str| {
        let f = |v: &Value| num(v, &["mb_per_s", "p50"]);
        Some(r.median("relay", t, &f)? / r.median("relay", "direct", &f)?)
    };
    row3(&mut out, "Relay throughput ÷ direct", &|t| {
        relay_ratio(t).map_or("–".into(), |x| format!("{x:.2}×"))
    });
    let cpu = |scenario: &str, t: &str| r.median(scenario, t, &*cpu_per_session());
    let hs = |t: &str| diff(cpu("imap-login-tls", t), cpu("imap-login", t));
    row3(
        &mut out,
        "CPU per TLS handshake: TLS login − plaintext login (µs)",
        &|t| hs(t).map_or("–".into(), |x| format!("{x:.0}")),
    );
    // What one core could sustain if the proxy had it to itself: the closed-loop rate
    // above shares two cores with the load generator and, for nginx, waits out its
    // Nagle stalls.
    let per_core = |t: &str| cpu("tls-handshake", t).map(|us| 1e6 / us);
    row3(
        &mut out,
        "TLS handshake sessions per core-second (10⁶ ÷ CPU per handshake session)",
        &|t| per_core(t).map_or("–".into(), |x| format!("{x:.0}")),
    );
    out
}

fn render(r: &Results) -> String {
    let p = Params::of(r);
    let mut rows = login_rows(&p);
    rows.extend(relay_rows(&p));
    rows.extend(idle_rows(&p));
    rows.extend(tls_rows(&p));
    let mut out = main_table(r, &rows);
    out.push('\n');
    out.push_str(&derived_table(r, p.rate));
    out.push('\n');
    out.push_str(&targets(r, p.rate));
    out
}

fn yes_no(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "**met**",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

/// Issue 17's targets (and issue 8's latency one) against this run's medians. Every
/// comparison is to a proxy measured in the same run, never to a figure from elsewhere.
fn targets(r: &Results, rate: f64) -> String {
    let cpu = |s: &str, t: &str| r.median(s, t, &|v: &Value| num(v, &["proxy_cpu_us_per_session"]));
    let p99 = |t: &str| r.median("imap-login", t, &|v: &Value| num(v, &["session_us", "p99"]));
    let gb = |s: &str, t: &str| r.median(s, t, &|v: &Value| num(v, &["proxy_cpu_ms_per_gb"]));
    let idle = |s: &str, t: &str| {
        r.median(s, t, &|v: &Value| {
            idle_step(v, true).and_then(|st| num(st, &["kib_per_session"]))
        })
    };
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    let times = |x: Option<f64>| x.map_or("–".into(), |x| format!("{x:.2}×"));
    let mut out = String::new();
    out.push_str("| Target | Measured (medians of this run) | Status |\n|---|---|---|\n");

    for (scenario, name) in [("imap-login", "IMAP"), ("pop3-login", "POP3")] {
        let p = cpu(scenario, "postern");
        for (to, label, limit) in [("haproxy", "HAProxy", 0.6), ("nginx", "nginx", 0.5)] {
            let c = ratio(p, cpu(scenario, to));
            let _ = writeln!(
                out,
                "| {name} login CPU per session ≤ {limit}× {label} | Postern {} µs, {label} {} µs: {} | {} |",
                opt(p, 0),
                opt(cpu(scenario, to), 0),
                times(c),
                yes_no(c.map(|x| x <= limit)),
            );
        }
    }
    let added = (|| Some((p99("postern")? - p99("direct")?) / 1000.0))();
    let _ = writeln!(
        out,
        "| Added p99 latency ≤ 1 ms at {rate:.0} logins/s | {} ms | {} |",
        added.map_or("–".into(), |x| format!("{x:+.3}")),
        yes_no(added.map(|x| x <= 1.0)),
    );
    for (scenario, name) in [("relay", "one connection"), ("relay-4", "4 connections")] {
        let _ = writeln!(
            out,
            "| Relay CPU ≤ 300 ms per GB, {name} | Postern {} ms/GB (nginx {}, HAProxy {}) | {} |",
            opt(gb(scenario, "postern"), 0),
            opt(gb(scenario, "nginx"), 0),
            opt(gb(scenario, "haproxy"), 0),
            yes_no(gb(scenario, "postern").map(|x| x <= 300.0)),
        );
    }
    for (scenario, name, limit) in [("idle-plain", "plaintext", 3.0), ("idle-tls", "TLS", 8.0)] {
        let sessions = r
            .first(scenario)
            .and_then(|v| idle_step(v, true))
            .and_then(|s| num(s, &["sessions"]))
            .unwrap_or(0.0);
        let _ = writeln!(
            out,
            "| Idle session ≤ {limit:.0} KiB RSS, {name}, at {sessions:.0} sessions | Postern {} KiB (nginx {}, HAProxy {}) | {} |",
            opt(idle(scenario, "postern"), 2),
            opt(idle(scenario, "nginx"), 2),
            opt(idle(scenario, "haproxy"), 2),
            yes_no(idle(scenario, "postern").map(|x| x <= limit)),
        );
    }
    out
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("–".to_owned(), |x| format!("{x:.decimals$}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table_from_results() {
        let mut v = Vec::new();
        for (t, cpu, p99) in [
            ("direct", None, 400.0),
            ("nginx", Some(290.0), 900.0),
            ("haproxy", Some(200.0), 800.0),
            ("postern", Some(140.0), 700.0),
        ] {
            for k in 0..3 {
                v.push(json!({
                    "kind": "logins", "scenario": "imap-login", "target": t, "rate": 500.0,
                    "proxy_cpu_us_per_session": cpu.map(|c| c + k as f64),
                    "session_us": {"p50": 300.0, "p99": p99},
                }));
            }
        }
        v.push(json!({"kind":"relay","scenario":"relay","target":"direct","size":20e6,"mb_per_s":{"p50":2000.0}}));
        v.push(json!({"kind":"relay","scenario":"relay","target":"postern","size":20e6,"mb_per_s":{"p50":1900.0},"proxy_cpu_ms_per_gb":100.0}));
        v.push(json!({"kind":"idle","scenario":"idle-plain","target":"postern",
            "steps":[{"sessions":4000,"kib_per_session":3.5},{"sessions":8000,"kib_per_session":2.5,"marginal_kib_per_session":2.4}]}));
        let text = render(&Results(v));
        assert!(
            text.contains("| 291 (290–292) | 201 (200–202) | 141 (140–142) | 0.48× | 0.70× |"),
            "{text}"
        );
        assert!(
            text.contains("| IMAP login CPU per session ≤ 0.6× HAProxy | Postern 141 µs, HAProxy 201 µs: 0.70× | **not met** |"),
            "{text}"
        );
        assert!(
            text.contains("| IMAP login CPU per session ≤ 0.5× nginx | Postern 141 µs, nginx 291 µs: 0.48× | **met** |"),
            "{text}"
        );
        assert!(
            text.contains("Relay CPU ≤ 300 ms per GB, one connection | Postern 100 ms/GB (nginx –, HAProxy –) | **met**"),
            "{text}"
        );
        assert!(
            text.contains("Relay CPU ≤ 300 ms per GB, 4 connections | Postern – ms/GB (nginx –, HAProxy –) | not measured"),
            "{text}"
        );
        assert!(
            text.contains("Added p99 latency ≤ 1 ms at 500 logins/s | +0.300 ms | **met**"),
            "{text}"
        );
        assert!(
            text.contains("plaintext, at 8000 sessions | Postern 2.50 KiB"),
            "{text}"
        );
        assert!(
            text.contains("TLS, at 0 sessions | Postern – KiB (nginx –, HAProxy –) | not measured"),
            "{text}"
        );
    }
}
