//! Password verification for hashes stored in Dovecot's syntax: `{SCHEME}data`, or
//! `{SCHEME.HEX}data` / `{SCHEME.B64}data` to override the scheme's encoding.
//!
//! Everything here is a pure, CPU-bound function. Slow schemes (Argon2ID takes 0.1 to
//! 0.3 s and 64 MiB per check with Dovecot's defaults) belong on a blocking thread
//! behind a semaphore. Nothing in this module logs, and no error carries the password
//! or any part of the stored hash.
//!
//! | Scheme | Notes |
//! |---|---|
//! | `PLAIN`, `CLEAR`, `CLEARTEXT` | also any value without `{...}` (see [`Options::default_scheme`]) |
//! | `CRYPT` | dispatches on the prefix: `$6$`, `$5$`, `$2a$`/`$2b$`/`$2x$`/`$2y$`, `$1$`. Traditional DES crypt, `$y$` (yescrypt) and other prefixes are [`SchemeError::Unsupported`] |
//! | `SHA512-CRYPT`, `SHA256-CRYPT`, `BLF-CRYPT`, `MD5-CRYPT` (alias `MD5`) | the named scheme's prefix is required |
//! | `ARGON2I`, `ARGON2ID` | PHC strings as libsodium writes them |
//! | `PBKDF2` | Dovecot's `$1$salt$rounds$hex` (HMAC-SHA1, 20 bytes) |
//! | `SSHA512`, `SSHA256`, `SSHA`, `SMD5` | digest followed by salt, base64 by default |
//! | `SHA512`, `SHA256`, `SHA`/`SHA1`, `LDAP-MD5`, `PLAIN-MD5` | bare digests; hex or base64 guessed from the length like Dovecot |
//!
//! Schemes that store state for a challenge-response mechanism rather than a
//! verifiable hash (`CRAM-MD5`, `HMAC-MD5`, `DIGEST-MD5`, `SCRAM-*`) and the legacy
//! ones not worth a dependency (`PLAIN-MD4`, `NTLM`, `LANMAN`, `OTP`, `SKEY`, `RPA`,
//! `DES-CRYPT`, `PLAIN-TRUNC`) give [`SchemeError::Unsupported`].

mod dummy;
mod md5_crypt;

use std::borrow::Cow;
use std::fmt;

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};
use subtle::ConstantTimeEq;

pub use dummy::{Dummy, verify_dummy};

/// Base64 as Dovecot and LDAP tools write it: standard alphabet, padding optional.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Why a stored password could not be checked. Deliberately carries no text from the
/// stored value: a "scheme" in braces may really be the start of a plaintext password.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SchemeError {
    /// The scheme is known to Dovecot but cannot be verified here (challenge-response
    /// state such as `CRAM-MD5`, or a legacy algorithm such as DES crypt).
    Unsupported,
    /// The name in braces (or its `.SUFFIX`) is not a Dovecot scheme.
    UnknownScheme,
    /// The data after the scheme does not parse for that scheme.
    Malformed,
    /// The hash asks for more work or memory than [`Limits`] allows.
    TooExpensive,
}

impl SchemeError {
    /// Short name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SchemeError::Unsupported => "unsupported_scheme",
            SchemeError::UnknownScheme => "unknown_scheme",
            SchemeError::Malformed => "malformed_hash",
            SchemeError::TooExpensive => "hash_too_expensive",
        }
    }
}

impl fmt::Display for SchemeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SchemeError::Unsupported => "password scheme cannot be verified by Postern",
            SchemeError::UnknownScheme => "unknown password scheme",
            SchemeError::Malformed => "stored password does not parse for its scheme",
            SchemeError::TooExpensive => "stored hash exceeds the configured cost limits",
        })
    }
}

impl std::error::Error for SchemeError {}

/// A verifiable Dovecot password scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Scheme {
    /// `PLAIN`, `CLEAR`, `CLEARTEXT`: the password itself.
    Plain,
    /// `CRYPT`: whatever `crypt(3)` prefix the value carries.
    Crypt,
    /// `MD5-CRYPT` (and its alias `MD5`): `$1$`.
    Md5Crypt,
    /// `SHA256-CRYPT`: `$5$`.
    Sha256Crypt,
    /// `SHA512-CRYPT`: `$6$`.
    Sha512Crypt,
    /// `BLF-CRYPT`: bcrypt, `$2a$`, `$2b$`, `$2x$` or `$2y$`.
    BlfCrypt,
    /// `ARGON2I`: `$argon2i$` PHC string.
    Argon2i,
    /// `ARGON2ID`: `$argon2id$` PHC string.
    Argon2id,
    /// `PBKDF2`: `$1$salt$rounds$hex`, HMAC-SHA1.
    Pbkdf2,
    /// `SSHA512`: SHA-512 of password and salt, then the salt.
    Ssha512,
    /// `SSHA256`: SHA-256 of password and salt, then the salt.
    Ssha256,
    /// `SSHA`: SHA-1 of password and salt, then the salt.
    Ssha,
    /// `SMD5`: MD5 of password and salt, then the salt.
    Smd5,
    /// `SHA512`: unsalted SHA-512.
    Sha512,
    /// `SHA256`: unsalted SHA-256.
    Sha256,
    /// `SHA` / `SHA1`: unsalted SHA-1.
    Sha1,
    /// `PLAIN-MD5`: unsalted MD5, hex by default.
    PlainMd5,
    /// `LDAP-MD5`: unsalted MD5, base64 by default.
    LdapMd5,
}

/// Scheme names Dovecot knows but whose values cannot be verified against a password.
const UNSUPPORTED: &[&str] = &[
    "CRAM-MD5",
    "HMAC-MD5",
    "DIGEST-MD5",
    "SCRAM-SHA-1",
    "SCRAM-SHA-256",
    "PLAIN-MD4",
    "NTLM",
    "LANMAN",
    "OTP",
    "SKEY",
    "RPA",
    "DES-CRYPT",
    "PLAIN-TRUNC",
];

const NAMES: &[(&str, Scheme)] = &[
    ("PLAIN", Scheme::Plain),
    ("CLEAR", Scheme::Plain),
    ("CLEARTEXT", Scheme::Plain),
    ("CRYPT", Scheme::Crypt),
    ("MD5-CRYPT", Scheme::Md5Crypt),
    ("MD5", Scheme::Md5Crypt),
    ("SHA256-CRYPT", Scheme::Sha256Crypt),
    ("SHA512-CRYPT", Scheme::Sha512Crypt),
    ("BLF-CRYPT", Scheme::BlfCrypt),
    ("ARGON2I", Scheme::Argon2i),
    ("ARGON2ID", Scheme::Argon2id),
    ("PBKDF2", Scheme::Pbkdf2),
    ("SSHA512", Scheme::Ssha512),
    ("SSHA256", Scheme::Ssha256),
    ("SSHA", Scheme::Ssha),
    ("SMD5", Scheme::Smd5),
    ("SHA512", Scheme::Sha512),
    ("SHA256", Scheme::Sha256),
    ("SHA", Scheme::Sha1),
    ("SHA1", Scheme::Sha1),
    ("PLAIN-MD5", Scheme::PlainMd5),
    ("LDAP-MD5", Scheme::LdapMd5),
];

impl Scheme {
    /// Every verifiable scheme, for tests, docs and configuration checks.
    pub const ALL: &'static [Scheme] = &[
        Scheme::Plain,
        Scheme::Crypt,
        Scheme::Md5Crypt,
        Scheme::Sha256Crypt,
        Scheme::Sha512Crypt,
        Scheme::BlfCrypt,
        Scheme::Argon2i,
        Scheme::Argon2id,
        Scheme::Pbkdf2,
        Scheme::Ssha512,
        Scheme::Ssha256,
        Scheme::Ssha,
        Scheme::Smd5,
        Scheme::Sha512,
        Scheme::Sha256,
        Scheme::Sha1,
        Scheme::PlainMd5,
        Scheme::LdapMd5,
    ];

    /// Looks up a scheme by its Dovecot name, case-insensitively, with or without
    /// braces and an encoding suffix (`sha512-crypt`, `{SSHA.HEX}`).
    pub fn from_name(name: &str) -> Result<Scheme, SchemeError> {
        let name = name.strip_prefix('{').unwrap_or(name);
        let name = name.strip_suffix('}').unwrap_or(name);
        parse_name(name).map(|(scheme, _)| scheme)
    }

    /// The canonical Dovecot name.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Plain => "PLAIN",
            Scheme::Crypt => "CRYPT",
            Scheme::Md5Crypt => "MD5-CRYPT",
            Scheme::Sha256Crypt => "SHA256-CRYPT",
            Scheme::Sha512Crypt => "SHA512-CRYPT",
            Scheme::BlfCrypt => "BLF-CRYPT",
            Scheme::Argon2i => "ARGON2I",
            Scheme::Argon2id => "ARGON2ID",
            Scheme::Pbkdf2 => "PBKDF2",
            Scheme::Ssha512 => "SSHA512",
            Scheme::Ssha256 => "SSHA256",
            Scheme::Ssha => "SSHA",
            Scheme::Smd5 => "SMD5",
            Scheme::Sha512 => "SHA512",
            Scheme::Sha256 => "SHA256",
            Scheme::Sha1 => "SHA1",
            Scheme::PlainMd5 => "PLAIN-MD5",
            Scheme::LdapMd5 => "LDAP-MD5",
        }
    }

    /// How the scheme's data is encoded when no `.HEX`/`.B64` suffix is given.
    fn default_encoding(self) -> Encoding {
        match self {
            Scheme::Ssha512
            | Scheme::Ssha256
            | Scheme::Ssha
            | Scheme::Smd5
            | Scheme::Sha512
            | Scheme::Sha256
            | Scheme::Sha1
            | Scheme::LdapMd5 => Encoding::Base64,
            Scheme::PlainMd5 => Encoding::Hex,
            _ => Encoding::Raw,
        }
    }

    /// The digest length of the unsalted digest schemes, for which Dovecot guesses
    /// between hex and base64 from the length.
    fn fixed_len(self) -> Option<usize> {
        match self {
            Scheme::Sha512 => Some(64),
            Scheme::Sha256 => Some(32),
            Scheme::Sha1 => Some(20),
            Scheme::PlainMd5 | Scheme::LdapMd5 => Some(16),
            _ => None,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Raw,
    Hex,
    Base64,
}

/// Caps on the cost parameters a stored hash may ask for.
///
/// Stored hashes carry their own cost. A corrupt or hostile row (`m=4194304` for
/// Argon2, bcrypt cost 31) would otherwise pin a CPU for minutes or exhaust memory on
/// a single login; a hash over a cap gives [`SchemeError::TooExpensive`] without any
/// hashing. The defaults are far above what Dovecot writes, so they only catch
/// mistakes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Highest `rounds=` for `$5$` and `$6$` (Dovecot writes 5000; 10 M is about 2 s).
    pub max_sha_crypt_rounds: u32,
    /// Highest bcrypt cost (Dovecot writes 5; each step doubles the time; 16 is about 4 s).
    pub max_bcrypt_cost: u32,
    /// Highest Argon2 memory in KiB (Dovecot writes 65536 for ARGON2ID).
    pub max_argon2_memory_kib: u32,
    /// Highest Argon2 iteration count (Dovecot writes 3 or 4).
    pub max_argon2_iterations: u32,
    /// Highest Argon2 parallelism (lanes are computed one after another here).
    pub max_argon2_lanes: u32,
    /// Highest PBKDF2 iteration count (Dovecot writes 5000).
    pub max_pbkdf2_rounds: u32,
}

impl Limits {
    /// Generous caps that no sane configuration reaches.
    pub const DEFAULT: Limits = Limits {
        max_sha_crypt_rounds: 10_000_000,
        max_bcrypt_cost: 16,
        max_argon2_memory_kib: 1024 * 1024,
        max_argon2_iterations: 16,
        max_argon2_lanes: 64,
        max_pbkdf2_rounds: 10_000_000,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// How [`verify_with`] reads stored values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// The scheme of a value without `{SCHEME}`. Dovecot calls this
    /// `default_pass_scheme`; Postern's default is `PLAIN`. A bare `$1$salt$hash` is
    /// MD5-crypt whatever this says, as in Dovecot.
    pub default_scheme: Scheme,
    /// Cost caps for the slow schemes.
    pub limits: Limits,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            default_scheme: Scheme::Plain,
            limits: Limits::DEFAULT,
        }
    }
}

/// Checks `password` against a stored value in Dovecot's syntax, with the default
/// [`Options`] (bare values are `PLAIN`, default [`Limits`]).
///
/// `Ok(false)` means the password is wrong; an error means the stored value cannot be
/// checked at all, which the caller should log (by user, never by value) and treat as
/// a failed login.
pub fn verify(stored: &str, password: &[u8]) -> Result<bool, SchemeError> {
    verify_with(stored, password, &Options::default())
}

/// [`verify`] with explicit [`Options`].
pub fn verify_with(stored: &str, password: &[u8], options: &Options) -> Result<bool, SchemeError> {
    let parsed = parse(stored, options.default_scheme)?;
    let data = decode(parsed.data, parsed.scheme, parsed.encoding)?;
    check(parsed.scheme, &data, password, &options.limits)
}

/// The scheme a stored value uses (bare values count as `PLAIN`), for logs, metrics
/// and configuration checks.
pub fn scheme(stored: &str) -> Result<Scheme, SchemeError> {
    parse(stored, Scheme::Plain).map(|p| p.scheme)
}

/// The plaintext of a `{PLAIN}`, `{CLEAR}`, `{CLEARTEXT}` or bare value, which APOP
/// and other challenge-response checks need. `None` for every hashed scheme and for
/// encoded plaintext (`{PLAIN.B64}`), which would need an allocation to return.
pub fn plaintext(stored: &str) -> Option<&str> {
    match parse(stored, Scheme::Plain) {
        Ok(Parsed {
            scheme: Scheme::Plain,
            encoding: None,
            data,
        }) => Some(data),
        _ => None,
    }
}

/// Checks a POP3 APOP digest (RFC 1939 §7): `digest_hex` must be the hex MD5 of the
/// greeting's `timestamp` (brackets included) followed by the shared secret. Either
/// hex case is accepted; the comparison is constant-time.
pub fn apop_matches(timestamp: &str, plaintext: &[u8], digest_hex: &[u8]) -> bool {
    let mut given = [0u8; 16];
    if hex::decode_to_slice(digest_hex, &mut given).is_err() {
        return false;
    }
    let mut h = Md5::new();
    h.update(timestamp.as_bytes());
    h.update(plaintext);
    let computed: [u8; 16] = h.finalize().into();
    computed.ct_eq(&given).into()
}

struct Parsed<'a> {
    scheme: Scheme,
    /// The `.HEX`/`.B64` suffix, if any; without one the scheme's own rules apply.
    encoding: Option<Encoding>,
    data: &'a str,
}

/// Splits `{SCHEME[.ENC]}data`, following Dovecot's `password_get_scheme`.
fn parse(stored: &str, default: Scheme) -> Result<Parsed<'_>, SchemeError> {
    if let Some((name, data)) = stored.strip_prefix('{').and_then(|r| r.split_once('}')) {
        let (scheme, encoding) = parse_name(name)?;
        return Ok(Parsed {
            scheme,
            encoding,
            data,
        });
    }
    // Dovecot recognises bare MD5-crypt and drops anything after the hash's `$`.
    if let Some((salt, tail)) = stored.strip_prefix("$1$").and_then(|r| r.split_once('$')) {
        let hash = tail.split_once('$').map_or(tail, |(h, _)| h);
        let end = 3 + salt.len() + 1 + hash.len();
        return Ok(Parsed {
            scheme: Scheme::Md5Crypt,
            encoding: None,
            data: stored.get(..end).unwrap_or(stored),
        });
    }
    Ok(Parsed {
        scheme: default,
        encoding: None,
        data: stored,
    })
}

fn parse_name(name: &str) -> Result<(Scheme, Option<Encoding>), SchemeError> {
    let (base, suffix) = match name.split_once('.') {
        Some((base, suffix)) => (base, Some(suffix)),
        None => (name, None),
    };
    let Some(&(_, scheme)) = NAMES.iter().find(|(n, _)| n.eq_ignore_ascii_case(base)) else {
        return Err(
            if UNSUPPORTED.iter().any(|n| n.eq_ignore_ascii_case(base)) {
                SchemeError::Unsupported
            } else {
                SchemeError::UnknownScheme
            },
        );
    };
    let encoding = match suffix {
        None => None,
        Some(s) if s.eq_ignore_ascii_case("hex") => Some(Encoding::Hex),
        Some(s) if s.eq_ignore_ascii_case("b64") || s.eq_ignore_ascii_case("base64") => {
            Some(Encoding::Base64)
        }
        // Dovecot treats an unknown suffix as an unknown scheme.
        Some(_) => return Err(SchemeError::UnknownScheme),
    };
    Ok((scheme, encoding))
}

/// Decodes the data part, following Dovecot's `password_decode`: for fixed-length
/// digests without an explicit suffix, a value exactly twice the digest length is hex,
/// anything else (or hex that fails) is base64.
fn decode(
    data: &str,
    scheme: Scheme,
    encoding: Option<Encoding>,
) -> Result<Cow<'_, [u8]>, SchemeError> {
    let guess = encoding.is_none();
    let encoding = encoding.unwrap_or(scheme.default_encoding());
    let decoded: Cow<'_, [u8]> = match (encoding, scheme.fixed_len()) {
        (Encoding::Raw, _) => Cow::Borrowed(data.as_bytes()),
        (_, Some(len)) if guess => {
            let hex = (data.len() == len * 2)
                .then(|| hex::decode(data).ok())
                .flatten();
            match hex {
                Some(bytes) => Cow::Owned(bytes),
                None => Cow::Owned(B64.decode(data).map_err(|_| SchemeError::Malformed)?),
            }
        }
        (Encoding::Hex, _) => Cow::Owned(hex::decode(data).map_err(|_| SchemeError::Malformed)?),
        (Encoding::Base64, _) => Cow::Owned(B64.decode(data).map_err(|_| SchemeError::Malformed)?),
    };
    match scheme.fixed_len() {
        Some(len) if decoded.len() != len => Err(SchemeError::Malformed),
        _ => Ok(decoded),
    }
}

fn check(
    scheme: Scheme,
    data: &[u8],
    password: &[u8],
    limits: &Limits,
) -> Result<bool, SchemeError> {
    match scheme {
        Scheme::Plain => Ok(plain_eq(data, password)),
        Scheme::Crypt => crypt(as_str(data)?, password, limits),
        Scheme::Md5Crypt => {
            let s = as_str(data)?;
            if s.starts_with("$1$") {
                md5_crypt(s, password)
            } else {
                // Dovecot's MD5 scheme falls back to PLAIN-MD5 for non-crypt values.
                let digest = decode(s, Scheme::PlainMd5, None)?;
                Ok(digest_eq::<Md5>(&digest, password))
            }
        }
        Scheme::Sha256Crypt => sha_crypt(prefixed(data, "$5$")?, password, limits),
        Scheme::Sha512Crypt => sha_crypt(prefixed(data, "$6$")?, password, limits),
        Scheme::BlfCrypt => bcrypt(as_str(data)?, password, limits),
        Scheme::Argon2i => argon2(as_str(data)?, "argon2i", password, limits),
        Scheme::Argon2id => argon2(as_str(data)?, "argon2id", password, limits),
        Scheme::Pbkdf2 => pbkdf2(as_str(data)?, password, limits),
        Scheme::Ssha512 => salted_eq::<Sha512>(data, password),
        Scheme::Ssha256 => salted_eq::<Sha256>(data, password),
        Scheme::Ssha => salted_eq::<Sha1>(data, password),
        Scheme::Smd5 => salted_eq::<Md5>(data, password),
        Scheme::Sha512 => Ok(digest_eq::<Sha512>(data, password)),
        Scheme::Sha256 => Ok(digest_eq::<Sha256>(data, password)),
        Scheme::Sha1 => Ok(digest_eq::<Sha1>(data, password)),
        Scheme::PlainMd5 | Scheme::LdapMd5 => Ok(digest_eq::<Md5>(data, password)),
    }
}

fn as_str(data: &[u8]) -> Result<&str, SchemeError> {
    std::str::from_utf8(data).map_err(|_| SchemeError::Malformed)
}

fn prefixed<'a>(data: &'a [u8], prefix: &str) -> Result<&'a str, SchemeError> {
    let s = as_str(data)?;
    if s.starts_with(prefix) {
        Ok(s)
    } else {
        Err(SchemeError::Malformed)
    }
}

/// Compares digests of both sides, so the time taken does not depend on where the
/// first difference is, nor on the stored password's length.
fn plain_eq(stored: &[u8], password: &[u8]) -> bool {
    Sha256::digest(stored)
        .ct_eq(&Sha256::digest(password))
        .into()
}

fn digest_eq<D: Digest>(expected: &[u8], password: &[u8]) -> bool {
    D::digest(password).as_slice().ct_eq(expected).into()
}

/// `digest || salt`, where the digest is `H(password || salt)`. Dovecot refuses an
/// empty salt, and so do we.
fn salted_eq<D: Digest>(data: &[u8], password: &[u8]) -> Result<bool, SchemeError> {
    let len = <D as Digest>::output_size();
    let (expected, salt) = data.split_at_checked(len).ok_or(SchemeError::Malformed)?;
    if salt.is_empty() {
        return Err(SchemeError::Malformed);
    }
    let mut h = D::new();
    h.update(password);
    h.update(salt);
    Ok(h.finalize().as_slice().ct_eq(expected).into())
}

fn crypt(s: &str, password: &[u8], limits: &Limits) -> Result<bool, SchemeError> {
    if s.starts_with("$6$") || s.starts_with("$5$") {
        sha_crypt(s, password, limits)
    } else if is_bcrypt(s) {
        bcrypt(s, password, limits)
    } else if s.starts_with("$1$") {
        md5_crypt(s, password)
    } else {
        // DES (13 characters, no `$`), BSDi `_`, yescrypt `$y$`, scrypt `$7$`, ...
        Err(SchemeError::Unsupported)
    }
}

fn is_bcrypt(s: &str) -> bool {
    ["$2a$", "$2b$", "$2x$", "$2y$"]
        .iter()
        .any(|p| s.starts_with(p))
}

fn md5_crypt(s: &str, password: &[u8]) -> Result<bool, SchemeError> {
    let rest = s.strip_prefix("$1$").ok_or(SchemeError::Malformed)?;
    let (salt, hash) = rest.split_once('$').ok_or(SchemeError::Malformed)?;
    if salt.len() > md5_crypt::MAX_SALT
        || hash.len() != md5_crypt::ENCODED_LEN
        || !hash.bytes().all(md5_crypt::is_crypt64)
    {
        return Err(SchemeError::Malformed);
    }
    let computed = md5_crypt::hash(password, salt.as_bytes());
    Ok(computed.ct_eq(hash.as_bytes()).into())
}

/// SHA-crypt (`$5$`/`$6$`, Drepper's spec). The string is checked here first, so the
/// cost cap applies and a bad `rounds=` field is an error rather than, as the crate's
/// own parser would have it, part of the salt.
fn sha_crypt(s: &str, password: &[u8], limits: &Limits) -> Result<bool, SchemeError> {
    use sha_crypt::{PasswordVerifier, ShaCrypt};

    let (rest, hash_len) = if let Some(rest) = s.strip_prefix("$6$") {
        (rest, 86)
    } else if let Some(rest) = s.strip_prefix("$5$") {
        (rest, 43)
    } else {
        return Err(SchemeError::Malformed);
    };
    let fields: Vec<&str> = rest.split('$').collect();
    let (rounds, salt, hash) = match fields.as_slice() {
        [rounds, salt, hash] => {
            let n = rounds
                .strip_prefix("rounds=")
                .and_then(parse_digits)
                .ok_or(SchemeError::Malformed)?;
            if !(1_000..=999_999_999).contains(&n) {
                return Err(SchemeError::Malformed);
            }
            (n, *salt, *hash)
        }
        // Without `rounds=` the spec's default applies.
        [salt, hash] => (5_000, *salt, *hash),
        _ => return Err(SchemeError::Malformed),
    };
    if rounds > u64::from(limits.max_sha_crypt_rounds) {
        return Err(SchemeError::TooExpensive);
    }
    if salt.is_empty()
        || salt.len() > 16
        || hash.len() != hash_len
        || !hash.bytes().all(md5_crypt::is_crypt64)
    {
        return Err(SchemeError::Malformed);
    }
    match ShaCrypt::default().verify_password(password, s) {
        Ok(()) => Ok(true),
        Err(sha_crypt::password_hash::Error::PasswordInvalid) => Ok(false),
        Err(_) => Err(SchemeError::Malformed),
    }
}

fn bcrypt(s: &str, password: &[u8], limits: &Limits) -> Result<bool, SchemeError> {
    if !is_bcrypt(s) || s.len() != 60 {
        return Err(SchemeError::Malformed);
    }
    let cost = s
        .get(4..6)
        .and_then(parse_digits)
        .ok_or(SchemeError::Malformed)?;
    if !(4..=31).contains(&cost) || s.get(6..7) != Some("$") {
        return Err(SchemeError::Malformed);
    }
    if cost > u64::from(limits.max_bcrypt_cost) {
        return Err(SchemeError::TooExpensive);
    }
    ::bcrypt::verify(password, s).map_err(|_| SchemeError::Malformed)
}

fn argon2(s: &str, algorithm: &str, password: &[u8], limits: &Limits) -> Result<bool, SchemeError> {
    use argon2::{Argon2, Params, PasswordHash, PasswordVerifier};

    let hash = PasswordHash::new(s).map_err(|_| SchemeError::Malformed)?;
    if hash.algorithm.as_str() != algorithm || hash.salt.is_none() || hash.hash.is_none() {
        return Err(SchemeError::Malformed);
    }
    let params = Params::try_from(&hash).map_err(|_| SchemeError::Malformed)?;
    if params.m_cost() > limits.max_argon2_memory_kib
        || params.t_cost() > limits.max_argon2_iterations
        || params.p_cost() > limits.max_argon2_lanes
    {
        return Err(SchemeError::TooExpensive);
    }
    match Argon2::default().verify_password(password, &hash) {
        Ok(()) => Ok(true),
        Err(argon2::password_hash::Error::PasswordInvalid) => Ok(false),
        Err(_) => Err(SchemeError::Malformed),
    }
}

/// Dovecot's PBKDF2: `$1$<salt>$<rounds>$<hex of 20 bytes>`, HMAC-SHA1, where the salt
/// is used as the text it is, not decoded.
fn pbkdf2(s: &str, password: &[u8], limits: &Limits) -> Result<bool, SchemeError> {
    let rest = s.strip_prefix("$1$").ok_or(SchemeError::Malformed)?;
    let fields: Vec<&str> = rest.split('$').collect();
    let [salt, rounds, hash] = fields.as_slice() else {
        return Err(SchemeError::Malformed);
    };
    let rounds = parse_digits(rounds).ok_or(SchemeError::Malformed)?;
    if rounds == 0 {
        return Err(SchemeError::Malformed);
    }
    if rounds > u64::from(limits.max_pbkdf2_rounds) {
        return Err(SchemeError::TooExpensive);
    }
    let rounds = u32::try_from(rounds).map_err(|_| SchemeError::TooExpensive)?;
    let mut expected = [0u8; 20];
    hex::decode_to_slice(hash, &mut expected).map_err(|_| SchemeError::Malformed)?;
    let mut computed = [0u8; 20];
    ::pbkdf2::pbkdf2_hmac::<Sha1>(password, salt.as_bytes(), rounds, &mut computed);
    Ok(computed.ct_eq(&expected).into())
}

/// ASCII digits only (no sign, no spaces), as C's `str_to_uint` reads them.
fn parse_digits(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 12 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_names() {
        assert_eq!(Scheme::from_name("sha512-crypt"), Ok(Scheme::Sha512Crypt));
        assert_eq!(Scheme::from_name("{SSHA.HEX}"), Ok(Scheme::Ssha));
        assert_eq!(Scheme::from_name("MD5"), Ok(Scheme::Md5Crypt));
        assert_eq!(Scheme::from_name("CRAM-MD5"), Err(SchemeError::Unsupported));
        assert_eq!(Scheme::from_name("NOPE"), Err(SchemeError::UnknownScheme));
        assert_eq!(
            Scheme::from_name("SHA.ROT13"),
            Err(SchemeError::UnknownScheme)
        );
        for s in Scheme::ALL {
            assert_eq!(Scheme::from_name(s.name()), Ok(*s));
        }
    }

    #[test]
    fn bare_md5_crypt_is_recognised() {
        assert_eq!(
            scheme("$1$FlB/SxMS$KwfZGbn3bB/RNpKi1ImWK0"),
            Ok(Scheme::Md5Crypt)
        );
        assert_eq!(
            verify("$1$FlB/SxMS$KwfZGbn3bB/RNpKi1ImWK0$ignored", b"x"),
            Ok(true)
        );
        // Without a second `$` it is just a plaintext password.
        assert_eq!(verify("$1$abc", b"$1$abc"), Ok(true));
    }

    #[test]
    fn digits() {
        assert_eq!(parse_digits("5000"), Some(5000));
        assert_eq!(parse_digits("+5"), None);
        assert_eq!(parse_digits(""), None);
        assert_eq!(parse_digits("99999999999999"), None);
    }
}
