//! Dovecot password strings: arbitrary stored values and passwords through `verify_with`,
//! `scheme`, `plaintext` and `apop_matches`. Nothing may panic, and a value whose
//! plaintext is offered must accept that plaintext.

use postern_auth::password::{self, Limits, Options, Scheme};

/// The slow schemes are capped at their cheapest settings (bcrypt cost 4, 1000 rounds,
/// Argon2 at 64 KiB and one pass), so every input stays well under a millisecond while
/// the parsing in front of each hash still runs in full.
const CHEAP: Options = Options {
    default_scheme: Scheme::Plain,
    limits: Limits {
        max_sha_crypt_rounds: 1000,
        max_bcrypt_cost: 4,
        max_argon2_memory_kib: 64,
        max_argon2_iterations: 1,
        max_argon2_lanes: 1,
        max_pbkdf2_rounds: 1000,
    },
};

/// One fuzz input; panics on a broken invariant.
pub fn run(data: &[u8]) {
    // First byte: where the stored value ends and the password begins.
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let (stored, pw) = rest.split_at(usize::from(split).min(rest.len()));
    let Ok(stored) = std::str::from_utf8(stored) else {
        return;
    };

    let _ = password::verify_with(stored, pw, &CHEAP);
    let _ = password::scheme(stored);
    let _ = Scheme::from_name(stored);
    if let Some(plain) = password::plaintext(stored) {
        assert_eq!(
            password::verify_with(stored, plain.as_bytes(), &CHEAP),
            Ok(true)
        );
    }
    let _ = password::apop_matches(stored, pw, pw);
}
