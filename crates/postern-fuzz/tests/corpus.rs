//! Replays every committed fuzz input (`fuzz/corpus/<target>/*`), and a few thousand
//! generated ones per target, through the same checks libFuzzer runs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use postern_fuzz::TARGETS;

#[test]
fn corpora_replay() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    for (name, run) in TARGETS {
        let dir = root.join(name);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (every target needs seeds)", dir.display()));
        let mut n = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{name}: {} fails", path.display());
            n += 1;
        }
        assert!(n > 0, "{name}: empty corpus");
    }
}

#[test]
fn generated_inputs() {
    // Deterministic, so a failure here reproduces.
    let mut rng = fastrand::Rng::with_seed(0x5057_4552_4e21);
    let alphabet: &[u8] = b"a LOGIN AUTHENTICATE PLAIN STARTTLS USER PASS EHLO AUTH \
        MAIL RCPT DATA {5}\r\n+OK -ERR 250 235 334 + * OK NO BAD \"\\\0\x01\xff=";
    for (name, run) in TARGETS {
        for _ in 0..2000 {
            let len = rng.usize(0..300);
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    if rng.bool() {
                        alphabet[rng.usize(0..alphabet.len())]
                    } else {
                        rng.u8(..)
                    }
                })
                .collect();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{name}: fails on {data:?}");
        }
    }
}
