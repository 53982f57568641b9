//! Known answers from Dovecot 2.3.19's `doveadm pw -s SCHEME -p 'correct horse'`
//! (with `-r ROUNDS` where noted), checked with the right and a wrong password.

use postern_auth::password::{
    self, Dummy, Limits, Options, Scheme, SchemeError, apop_matches, plaintext, verify,
    verify_dummy, verify_with,
};

const RIGHT: &[u8] = b"correct horse";
const WRONG: &[u8] = b"correct horsf";

/// (stored value, the scheme it should report)
const VECTORS: &[(&str, Scheme)] = &[
    ("{PLAIN}correct horse", Scheme::Plain),
    ("{CLEAR}correct horse", Scheme::Plain),
    ("{CLEARTEXT}correct horse", Scheme::Plain),
    ("correct horse", Scheme::Plain),
    ("{PLAIN.B64}Y29ycmVjdCBob3JzZQ==", Scheme::Plain),
    ("{PLAIN.HEX}636f727265637420686f727365", Scheme::Plain),
    // CRYPT dispatches on the prefix.
    (
        "{CRYPT}$2y$05$8oIu3AZTYMw6OKZ5mkOUeec73A5f0EBRH2EBa3W58l/JrF2gRLRya",
        Scheme::Crypt,
    ),
    (
        "{CRYPT}$2a$05$8oIu3AZTYMw6OKZ5mkOUeec73A5f0EBRH2EBa3W58l/JrF2gRLRya",
        Scheme::Crypt,
    ),
    (
        "{CRYPT}$2b$05$8oIu3AZTYMw6OKZ5mkOUeec73A5f0EBRH2EBa3W58l/JrF2gRLRya",
        Scheme::Crypt,
    ),
    (
        "{CRYPT}$2x$05$8oIu3AZTYMw6OKZ5mkOUeec73A5f0EBRH2EBa3W58l/JrF2gRLRya",
        Scheme::Crypt,
    ),
    (
        "{CRYPT}$6$75lpUmjHac2qnPpa$u937ytt.F2NeMKOw/UBTG/UvUYaNCNg2zuMNlzHomqO7u7Rl7S5F2ntRevR/GUn6o9j99NOt5fF88R0mTAXwW/",
        Scheme::Crypt,
    ),
    (
        "{CRYPT}$5$aIKQl4DxKKACGKvG$sWn5WVEsdYsDiKZBS8GPdpN1O6SWraEUwUkimy2nxW5",
        Scheme::Crypt,
    ),
    ("{CRYPT}$1$A2ArRHYh$5MEJfT5exof0VlDBnDLYF1", Scheme::Crypt),
    (
        "{MD5-CRYPT}$1$A2ArRHYh$5MEJfT5exof0VlDBnDLYF1",
        Scheme::Md5Crypt,
    ),
    ("{MD5}$1$yi7Zd.SW$HuIaV.XEff8vWx1rkDAFq.", Scheme::Md5Crypt),
    ("$1$yi7Zd.SW$HuIaV.XEff8vWx1rkDAFq.", Scheme::Md5Crypt),
    (
        "{MD5.HEX}243124703450587533524c24324e314a6e364832526d4e6b476558704438332f392f",
        Scheme::Md5Crypt,
    ),
    // Dovecot's MD5 falls back to PLAIN-MD5 for values that are not `$1$`.
    ("{MD5}3cb4e732631f47e6eb961f34554b7cde", Scheme::Md5Crypt),
    (
        "{SHA512-CRYPT}$6$75lpUmjHac2qnPpa$u937ytt.F2NeMKOw/UBTG/UvUYaNCNg2zuMNlzHomqO7u7Rl7S5F2ntRevR/GUn6o9j99NOt5fF88R0mTAXwW/",
        Scheme::Sha512Crypt,
    ),
    // -r 10000
    (
        "{SHA512-CRYPT}$6$rounds=10000$oJTsMOC84P5Ddf9V$cjDMpw35UMMPOzRKcAx8Lqa6PCkKOWRASMLQak7goTic7rpnt8JC1tSgJpFLcbqxe6kmooZt0bmlk19ify9NH1",
        Scheme::Sha512Crypt,
    ),
    // -r 1000
    (
        "{SHA512-CRYPT}$6$rounds=1000$zT9BkDnNegIA.p9F$6uAhN4B4Ofj3znnizV5I/73J7z9Yv//PtKdi6wErnn/7F2Yqap5OfVqKogzMHa3fXlMb7xQahlbOCAJh5Ujdl0",
        Scheme::Sha512Crypt,
    ),
    (
        "{SHA512-CRYPT.B64}JDYkOEtQQjBUYWc2VXZMalU1UCR3dm5JNWdic2dwVDMyLnNpd3B5dEpqRVR0TXdyUDZWT0V4bEIyWlFRUUowUWJqSmlDLi9oLlVEelk0cnVTZDVGcUZ1eW1DRFhnVTZaZXlQMUh1WjlTMQ==",
        Scheme::Sha512Crypt,
    ),
    (
        "{SHA256-CRYPT}$5$aIKQl4DxKKACGKvG$sWn5WVEsdYsDiKZBS8GPdpN1O6SWraEUwUkimy2nxW5",
        Scheme::Sha256Crypt,
    ),
    // scheme names are case-insensitive
    (
        "{sha256-crypt}$5$aC3.hXF3YfrYhX66$xi9/lSvwzHbGbzWYnryem7WmjoFEKk4ZavlnF/nVzh/",
        Scheme::Sha256Crypt,
    ),
    // -r 20000
    (
        "{SHA256-CRYPT}$5$rounds=20000$qTypCQhTHtRMQcaL$q7YH4wlrv2R5H/Meg.pJlwVO7FVI7Pm4KH8OnZkGEN6",
        Scheme::Sha256Crypt,
    ),
    (
        "{BLF-CRYPT}$2y$05$CW14xP5v9lNEA296RuqlPuy2PvIiuFtkz9YBucjGqvnHpIiQyjzbq",
        Scheme::BlfCrypt,
    ),
    // -r 6
    (
        "{BLF-CRYPT}$2y$06$xmka2vdrhs0NWcN8Sb./Fet5UrteXfdqLTfB2oH6sy36NWzG8AsaK",
        Scheme::BlfCrypt,
    ),
    (
        "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$x5D2c8dqmytVhpWG1tqEsA$EJAWLbUwaI86X5k2Z4XjCzSMum8TXQ6ElrHgopAVZG4",
        Scheme::Argon2i,
    ),
    (
        "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$kIwuDMFbAewhxtlaEIvB1w$UoiPHaHaQ8z9SLwn0zYdHym7D6+5+mKwZ7kqYa1nKTU",
        Scheme::Argon2id,
    ),
    (
        "{PBKDF2}$1$w/DDIoNAFl1MaxsV$5000$32013a2ec3ac9c51ea7620a9272637eb8309ebf5",
        Scheme::Pbkdf2,
    ),
    // -r 10000
    (
        "{PBKDF2}$1$TXB6Gop83BZP./lA$10000$640c4199c16322e588007b35a843f4279dde5042",
        Scheme::Pbkdf2,
    ),
    (
        "{SSHA512}Glgl3ZB9/BW+AOecFbVVmhGxCqMRnm/NtuMVDVAFRWnuQSMllOUR5M7Su91gpSyy66iMk8CoI4VIYRdmgE4i9/bo/II=",
        Scheme::Ssha512,
    ),
    (
        "{SSHA512.HEX}8f2257cdaa3a83e58ac80739403e4f0b93cb58f43ab50514fa970a8eb2094574ad8374d97e78238d421c0f89576b710f4310944e521937bb8a57e21231bb482d710f4298",
        Scheme::Ssha512,
    ),
    (
        "{SSHA256}4fG/4IA4fhlgLLwhC7lhpmyAsH7Mw/Umu0rmjWqERvpu2NpQ",
        Scheme::Ssha256,
    ),
    (
        "{SSHA256.HEX}5f8c8fc1626a6de3e924a5fb14fd2adfe2f036facff5737c64e970d39954f1056a11fd1e",
        Scheme::Ssha256,
    ),
    ("{SSHA}aNtu8jYW08ucDIjaz46tNxLxqZsQgqsE", Scheme::Ssha),
    (
        "{SSHA.HEX}bd779cbf33525ca1cf7eac4e25569ebde10be8fa484a77bf",
        Scheme::Ssha,
    ),
    ("{SMD5}4YhAlHOL/l6lRHz5LEw8PtcdWpk=", Scheme::Smd5),
    (
        "{SMD5.HEX}444254f812908c2ccdc2d377f12abd6168d38b29",
        Scheme::Smd5,
    ),
    (
        "{SHA512}VraY3v7bWkNbY0r+MyC7rz/c2SC2xQOkRvx7endrKY1HnRumqLYXgI6wv1ec6aldZoNHvKtxSQhayTyyeZUZew==",
        Scheme::Sha512,
    ),
    (
        "{SHA512.HEX}56b698defedb5a435b634afe3320bbaf3fdcd920b6c503a446fc7b7a776b298d479d1ba6a8b617808eb0bf579ce9a95d668347bcab7149085ac93cb27995197b",
        Scheme::Sha512,
    ),
    // Without a suffix, a value of exactly twice the digest length is taken as hex.
    (
        "{SHA512}56b698defedb5a435b634afe3320bbaf3fdcd920b6c503a446fc7b7a776b298d479d1ba6a8b617808eb0bf579ce9a95d668347bcab7149085ac93cb27995197b",
        Scheme::Sha512,
    ),
    (
        "{SHA256}QQTTb42iwlQ0n4WDZ5Pr4CngyVcGOjTJHC6SAxh7VjE=",
        Scheme::Sha256,
    ),
    (
        "{SHA256.B64}QQTTb42iwlQ0n4WDZ5Pr4CngyVcGOjTJHC6SAxh7VjE=",
        Scheme::Sha256,
    ),
    (
        "{SHA256.HEX}4104d36f8da2c254349f85836793ebe029e0c957063a34c91c2e9203187b5631",
        Scheme::Sha256,
    ),
    ("{SHA}L55TUjtiq8FBorTWAZ0jy6g129A=", Scheme::Sha1),
    ("{SHA1}L55TUjtiq8FBorTWAZ0jy6g129A=", Scheme::Sha1),
    ("{SHA1.B64}L55TUjtiq8FBorTWAZ0jy6g129A=", Scheme::Sha1),
    (
        "{SHA.HEX}2f9e53523b62abc141a2b4d6019d23cba835dbd0",
        Scheme::Sha1,
    ),
    (
        "{sha.hex}2F9E53523B62ABC141A2B4D6019D23CBA835DBD0",
        Scheme::Sha1,
    ),
    (
        "{PLAIN-MD5}3cb4e732631f47e6eb961f34554b7cde",
        Scheme::PlainMd5,
    ),
    ("{PLAIN-MD5.B64}PLTnMmMfR+brlh80VUt83g==", Scheme::PlainMd5),
    ("{LDAP-MD5}PLTnMmMfR+brlh80VUt83g==", Scheme::LdapMd5),
    (
        "{LDAP-MD5.HEX}3cb4e732631f47e6eb961f34554b7cde",
        Scheme::LdapMd5,
    ),
];

#[test]
fn every_vector_accepts_the_right_password_and_rejects_a_wrong_one() {
    for &(stored, scheme) in VECTORS {
        assert_eq!(password::scheme(stored), Ok(scheme), "{stored}");
        assert_eq!(verify(stored, RIGHT), Ok(true), "{stored}");
        assert_eq!(verify(stored, WRONG), Ok(false), "{stored}");
    }
}

#[test]
fn every_scheme_has_a_vector() {
    for s in Scheme::ALL {
        assert!(VECTORS.iter().any(|(_, v)| v == s), "no vector for {s}");
    }
}

#[test]
fn plain_keeps_every_byte() {
    assert_eq!(
        verify("{PLAIN}pass word%ü", "pass word%ü".as_bytes()),
        Ok(true)
    );
    assert_eq!(verify("{PLAIN}pass word%ü", b"pass word%"), Ok(false));
    assert_eq!(verify("{PLAIN}", b""), Ok(true));
    assert_eq!(verify("{PLAIN}", b"x"), Ok(false));
    // A brace that is never closed is no scheme: the whole value is the password.
    assert_eq!(verify("{PLAIN", b"{PLAIN"), Ok(true));
}

#[test]
fn default_scheme_applies_to_bare_values() {
    let options = Options {
        default_scheme: Scheme::Sha256Crypt,
        ..Options::default()
    };
    let bare = "$5$aIKQl4DxKKACGKvG$sWn5WVEsdYsDiKZBS8GPdpN1O6SWraEUwUkimy2nxW5";
    assert_eq!(verify_with(bare, RIGHT, &options), Ok(true));
    assert_eq!(verify(bare, bare.as_bytes()), Ok(true));
}

#[test]
fn unverifiable_and_unknown_schemes() {
    for stored in [
        "{CRAM-MD5}38b57fd1a0c4b46c814aa05f20318edd71c455380655f2c0ac35c5b359528d29",
        "{SCRAM-SHA-256}4096,HgILv94Fp2GR/x7UBcukQA==,rvA/L2GV/BX4aEIWfkQuQy8Mc7XdBFRKeVn2YOELR50=,vF6gR26lpWpz5Tc/RtN7UFa2NosGS0LI5UQXKhFa3Zw=",
        "{DIGEST-MD5}a7fd284e7dd8eab6250998c5b47f9c71",
        "{DES-CRYPT}Du2mJcrwrAlH.",
        // Traditional DES through CRYPT, and prefixes we do not implement.
        "{CRYPT}Du2mJcrwrAlH.",
        "{CRYPT}$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7",
        "{CRYPT}_J9..CCCCXBrJUJV154M",
    ] {
        assert_eq!(
            verify(stored, RIGHT),
            Err(SchemeError::Unsupported),
            "{stored}"
        );
    }
    assert_eq!(
        verify("{ROT13}pbeerpg", RIGHT),
        Err(SchemeError::UnknownScheme)
    );
    assert_eq!(
        verify("{SHA.ROT13}x", RIGHT),
        Err(SchemeError::UnknownScheme)
    );
    assert_eq!(verify("{}x", RIGHT), Err(SchemeError::UnknownScheme));
}

#[test]
fn malformed_values() {
    for stored in [
        "{SHA}L55TUjtiq8FBorTWAZ0jy6g129", // 19 bytes once decoded
        "{SHA}!!!!",                       // not base64
        "{SHA.HEX}2f9e53523b62abc141a2b4d6019d23cba835dbd", // odd hex
        "{SSHA}L55TUjtiq8FBorTWAZ0jy6g129A=", // no salt
        "{SMD5}",
        "{SHA512-CRYPT}$5$aIKQl4DxKKACGKvG$sWn5WVEsdYsDiKZBS8GPdpN1O6SWraEUwUkimy2nxW5", // wrong prefix
        "{SHA512-CRYPT}$6$rounds=10$abc$xyz",
        "{SHA512-CRYPT}$6$rounds=x$abc$u937ytt.F2NeMKOw/UBTG/UvUYaNCNg2zuMNlzHomqO7u7Rl7S5F2ntRevR/GUn6o9j99NOt5fF88R0mTAXwW/",
        "{SHA512-CRYPT}$6$abc",
        "{SHA256-CRYPT}$5$aIKQl4DxKKACGKvG$sWn5WVEsdYsDiKZBS8GPdpN1O6SWraEUwUkimy2nxW",
        "{BLF-CRYPT}$2y$05$short",
        "{BLF-CRYPT}$2y$99$CW14xP5v9lNEA296RuqlPuy2PvIiuFtkz9YBucjGqvnHpIiQyjzbq",
        "{BLF-CRYPT}$2y$0a$CW14xP5v9lNEA296RuqlPuy2PvIiuFtkz9YBucjGqvnHpIiQyjzbq",
        "{BLF-CRYPT}$6$75lpUmjHac2qnPpa$u937ytt",
        "{ARGON2ID}$argon2i$v=19$m=32768,t=4,p=1$x5D2c8dqmytVhpWG1tqEsA$EJAWLbUwaI86X5k2Z4XjCzSMum8TXQ6ElrHgopAVZG4",
        "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$kIwuDMFbAewhxtlaEIvB1w",
        "{ARGON2ID}not a phc string",
        "{PBKDF2}$1$salt$0$32013a2ec3ac9c51ea7620a9272637eb8309ebf5",
        "{PBKDF2}$1$salt$5000$32013a2ec3ac9c51",
        "{PBKDF2}$2$salt$5000$32013a2ec3ac9c51ea7620a9272637eb8309ebf5",
        "{PBKDF2}$1$salt$-1$32013a2ec3ac9c51ea7620a9272637eb8309ebf5",
        "{MD5-CRYPT}$1$A2ArRHYh$5MEJfT5exof0VlDBnDLYF",
        "{MD5-CRYPT}$1$toolongsalt$5MEJfT5exof0VlDBnDLYF1",
        "{MD5-CRYPT}nothex",
        "{PLAIN.HEX}zz",
        "{SHA512-CRYPT.B64}%%%",
    ] {
        assert_eq!(
            verify(stored, RIGHT),
            Err(SchemeError::Malformed),
            "{stored}"
        );
    }
}

#[test]
fn cost_limits_stop_work_before_it_starts() {
    let tight = Options {
        limits: Limits {
            max_sha_crypt_rounds: 5000,
            max_bcrypt_cost: 5,
            max_argon2_memory_kib: 32768,
            max_argon2_iterations: 3,
            max_argon2_lanes: 1,
            max_pbkdf2_rounds: 5000,
        },
        ..Options::default()
    };
    for &(stored, _) in VECTORS {
        let expensive = stored.contains("rounds=10000")
            || stored.contains("rounds=20000")
            || stored.contains("$2y$06$")
            || stored.contains("$argon2") // 32 MiB with t=4, or 64 MiB
            || stored.contains("$10000$");
        let got = verify_with(stored, RIGHT, &tight);
        if expensive {
            assert_eq!(got, Err(SchemeError::TooExpensive), "{stored}");
        } else {
            assert_eq!(got, Ok(true), "{stored}");
        }
    }
    assert_eq!(
        verify(
            "{BLF-CRYPT}$2y$31$CW14xP5v9lNEA296RuqlPuy2PvIiuFtkz9YBucjGqvnHpIiQyjzbq",
            RIGHT
        ),
        Err(SchemeError::TooExpensive)
    );
    assert_eq!(
        verify(
            "{ARGON2ID}$argon2id$v=19$m=4194304,t=3,p=1$kIwuDMFbAewhxtlaEIvB1w$UoiPHaHaQ8z9SLwn0zYdHym7D6+5+mKwZ7kqYa1nKTU",
            RIGHT
        ),
        Err(SchemeError::TooExpensive)
    );
}

/// Fast limits for the exhaustive mangling below: parse paths still run, the slow
/// hashes stop at the cap.
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

#[test]
fn mangled_values_never_panic() {
    let mut n = 0usize;
    for &(stored, _) in VECTORS {
        for (i, _) in stored.char_indices() {
            let _ = verify_with(&stored[..i], RIGHT, &CHEAP);
            let _ = verify_with(&stored[i..], RIGHT, &CHEAP);
            for b in [b'$', b'}', b'.', b'0', b'\0'] {
                let mut m = stored.as_bytes().to_vec();
                m[i] = b;
                if let Ok(m) = std::str::from_utf8(&m) {
                    let _ = verify_with(m, RIGHT, &CHEAP);
                    n += 1;
                }
            }
        }
    }
    assert!(n > 5_000);
    for odd in [
        "", "{", "}", "{}", "$", "$1$", "$1$$", "$1$$$", "{CRYPT}", "{CRYPT}$", "{.HEX}",
    ] {
        let _ = verify(odd, RIGHT);
        let _ = verify(odd, b"");
    }
}

#[test]
fn errors_never_show_secrets() {
    for stored in ["{SHA}secretsecret", "{ROT13}secret", "{CRAM-MD5}secret"] {
        let err = verify(stored, b"hunter2").unwrap_err();
        let shown = format!("{err} {err:?} {}", err.as_str());
        assert!(
            !shown.contains("secret") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}

#[test]
fn plaintext_is_offered_only_for_plain_values() {
    assert_eq!(plaintext("{PLAIN}correct horse"), Some("correct horse"));
    assert_eq!(plaintext("{clear}x"), Some("x"));
    assert_eq!(plaintext("{CLEARTEXT}"), Some(""));
    assert_eq!(plaintext("bare"), Some("bare"));
    assert_eq!(plaintext("{PLAIN.B64}Y29ycmVjdCBob3JzZQ=="), None);
    assert_eq!(plaintext("{SSHA}aNtu8jYW08ucDIjaz46tNxLxqZsQgqsE"), None);
    assert_eq!(plaintext("$1$yi7Zd.SW$HuIaV.XEff8vWx1rkDAFq."), None);
    assert_eq!(plaintext("{NOPE}x"), None);
}

#[test]
fn apop_rfc1939_example() {
    let ts = "<1896.697170952@dbc.mtview.ca.us>";
    assert!(apop_matches(
        ts,
        b"tanstaaf",
        b"c4c9334bac560ecc979e58001b3e22fb"
    ));
    assert!(apop_matches(
        ts,
        b"tanstaaf",
        b"C4C9334BAC560ECC979E58001B3E22FB"
    ));
    assert!(!apop_matches(
        ts,
        b"tanstaaF",
        b"c4c9334bac560ecc979e58001b3e22fb"
    ));
    assert!(!apop_matches(
        "<1896.697170953@dbc.mtview.ca.us>",
        b"tanstaaf",
        b"c4c9334bac560ecc979e58001b3e22fb"
    ));
    assert!(!apop_matches(
        ts,
        b"tanstaaf",
        b"c4c9334bac560ecc979e58001b3e22f"
    ));
    assert!(!apop_matches(
        ts,
        b"tanstaaf",
        b"c4c9334bac560ecc979e58001b3e22fbb"
    ));
    assert!(!apop_matches(
        ts,
        b"tanstaaf",
        b"g4c9334bac560ecc979e58001b3e22fb"
    ));
    assert!(!apop_matches(ts, b"tanstaaf", b""));
}

#[test]
fn dummy_checks_always_fail() {
    for s in Scheme::ALL {
        assert!(!verify_dummy(s.name(), RIGHT), "{s}");
    }
    assert!(!verify_dummy("{SHA512-CRYPT}", RIGHT));
    assert!(!verify_dummy("no such scheme", RIGHT));
    let stored = "{SHA512-CRYPT}$6$rounds=10000$oJTsMOC84P5Ddf9V$cjDMpw35UMMPOzRKcAx8Lqa6PCkKOWRASMLQak7goTic7rpnt8JC1tSgJpFLcbqxe6kmooZt0bmlk19ify9NH1";
    let dummy = Dummy::like(stored).unwrap();
    assert_eq!(dummy.scheme(), Scheme::Sha512Crypt);
    assert!(!dummy.verify(RIGHT));
    assert!(!dummy.verify(WRONG));
    assert_eq!(
        Dummy::like("{CRAM-MD5}00").unwrap_err(),
        SchemeError::Unsupported
    );
}
