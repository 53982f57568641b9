//! Measures one verification per scheme, with hashes in Dovecot's default cost as
//! `doveadm pw` writes them. Run in release: `cargo run --release --example scheme_costs`.
//! The figures in docs/auth.md come from this program.

use std::time::{Duration, Instant};

use postern_auth::password::{Dummy, Scheme, verify};

/// `doveadm pw -s SCHEME -p 'correct horse'` (Dovecot 2.3.19, default cost).
const VECTORS: &[(&str, &str)] = &[
    ("PLAIN", "{PLAIN}correct horse"),
    (
        "SHA512-CRYPT (rounds 5000)",
        "{SHA512-CRYPT}$6$75lpUmjHac2qnPpa$u937ytt.F2NeMKOw/UBTG/UvUYaNCNg2zuMNlzHomqO7u7Rl7S5F2ntRevR/GUn6o9j99NOt5fF88R0mTAXwW/",
    ),
    (
        "SHA256-CRYPT (rounds 5000)",
        "{SHA256-CRYPT}$5$aIKQl4DxKKACGKvG$sWn5WVEsdYsDiKZBS8GPdpN1O6SWraEUwUkimy2nxW5",
    ),
    (
        "BLF-CRYPT (cost 5)",
        "{BLF-CRYPT}$2y$05$CW14xP5v9lNEA296RuqlPuy2PvIiuFtkz9YBucjGqvnHpIiQyjzbq",
    ),
    (
        "ARGON2I (m=32 MiB, t=4)",
        "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$x5D2c8dqmytVhpWG1tqEsA$EJAWLbUwaI86X5k2Z4XjCzSMum8TXQ6ElrHgopAVZG4",
    ),
    (
        "ARGON2ID (m=64 MiB, t=3)",
        "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$kIwuDMFbAewhxtlaEIvB1w$UoiPHaHaQ8z9SLwn0zYdHym7D6+5+mKwZ7kqYa1nKTU",
    ),
    (
        "PBKDF2 (5000 rounds)",
        "{PBKDF2}$1$w/DDIoNAFl1MaxsV$5000$32013a2ec3ac9c51ea7620a9272637eb8309ebf5",
    ),
    ("MD5-CRYPT", "{MD5-CRYPT}$1$A2ArRHYh$5MEJfT5exof0VlDBnDLYF1"),
    (
        "SSHA512",
        "{SSHA512}Glgl3ZB9/BW+AOecFbVVmhGxCqMRnm/NtuMVDVAFRWnuQSMllOUR5M7Su91gpSyy66iMk8CoI4VIYRdmgE4i9/bo/II=",
    ),
    (
        "SSHA256",
        "{SSHA256}4fG/4IA4fhlgLLwhC7lhpmyAsH7Mw/Umu0rmjWqERvpu2NpQ",
    ),
    ("SSHA", "{SSHA}aNtu8jYW08ucDIjaz46tNxLxqZsQgqsE"),
    ("SMD5", "{SMD5}4YhAlHOL/l6lRHz5LEw8PtcdWpk="),
    (
        "SHA512",
        "{SHA512}VraY3v7bWkNbY0r+MyC7rz/c2SC2xQOkRvx7endrKY1HnRumqLYXgI6wv1ec6aldZoNHvKtxSQhayTyyeZUZew==",
    ),
    (
        "SHA256",
        "{SHA256}QQTTb42iwlQ0n4WDZ5Pr4CngyVcGOjTJHC6SAxh7VjE=",
    ),
    ("SHA1", "{SHA}L55TUjtiq8FBorTWAZ0jy6g129A="),
    ("PLAIN-MD5", "{PLAIN-MD5}3cb4e732631f47e6eb961f34554b7cde"),
    ("LDAP-MD5", "{LDAP-MD5}PLTnMmMfR+brlh80VUt83g=="),
];

/// CPU time this thread has run, from Linux's schedstat, so that other work on a
/// busy machine does not inflate the figures the way wall-clock time would.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// (wall, CPU) time per call.
fn per_call(mut f: impl FnMut()) -> (Duration, Option<Duration>) {
    f();
    let mut n = 0u32;
    let start = Instant::now();
    let cpu_start = cpu_time();
    while start.elapsed() < Duration::from_millis(700) || n < 5 {
        f();
        n += 1;
    }
    let wall = start.elapsed() / n;
    let cpu = cpu_time()
        .zip(cpu_start)
        .map(|(end, start)| (end - start) / n);
    (wall, cpu)
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".to_owned(),
        |d| format!("{:.4}", d.as_secs_f64() * 1e3),
    )
}

fn main() {
    println!(
        "{:<30} {:>12} {:>12} {:>12}",
        "scheme", "wall (ms)", "CPU (ms)", "dummy CPU"
    );
    for (name, stored) in VECTORS {
        assert_eq!(verify(stored, b"correct horse"), Ok(true), "{name}");
        let (wall, cpu) = per_call(|| {
            let _ = std::hint::black_box(verify(stored, b"wrong horse"));
        });
        let dummy = Dummy::like(stored).unwrap_or_else(|_| Dummy::for_scheme(Scheme::Plain));
        let (_, dummy_cpu) = per_call(|| {
            std::hint::black_box(dummy.verify(b"wrong horse"));
        });
        println!(
            "{:<30} {:>12} {:>12} {:>12}",
            name,
            ms(Some(wall)),
            ms(cpu),
            ms(dummy_cpu)
        );
    }
}
