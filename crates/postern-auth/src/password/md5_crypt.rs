//! MD5-crypt (`$1$`), Poul-Henning Kamp's 1994 FreeBSD algorithm, as Dovecot's
//! `MD5-CRYPT` and glibc's `crypt()` compute it.
//!
//! Written here on md-5 rather than taken from `pwhash`, which would bring a second,
//! older set of RustCrypto crates (digest 0.9) into the build for one legacy scheme.

use md5::{Digest, Md5};

/// The magic string that both prefixes the hash and enters the digest.
const MAGIC: &[u8] = b"$1$";

/// The salt is at most 8 characters; longer salts are cut by the algorithm itself.
pub(crate) const MAX_SALT: usize = 8;

/// Length of the encoded 16-byte result in crypt's base64.
pub(crate) const ENCODED_LEN: usize = 22;

/// Computes the 22-character hash part of `$1$<salt>$<hash>`.
pub(crate) fn hash(password: &[u8], salt: &[u8]) -> [u8; ENCODED_LEN] {
    encode(&digest(password, salt))
}

fn digest(password: &[u8], salt: &[u8]) -> [u8; 16] {
    let mut ctx = Md5::new();
    ctx.update(password);
    ctx.update(MAGIC);
    ctx.update(salt);

    let mut alt = Md5::new();
    alt.update(password);
    alt.update(salt);
    alt.update(password);
    let alt: [u8; 16] = alt.finalize().into();

    let mut left = password.len();
    while left > 0 {
        let n = left.min(alt.len());
        ctx.update(alt.get(..n).unwrap_or_default());
        left -= n;
    }

    // The original C reads `pw[0]` here, which is the terminating NUL for an empty
    // password; the loop does not run then, so the default never matters.
    let first = password.first().copied().unwrap_or(0);
    let mut bits = password.len();
    while bits > 0 {
        ctx.update([if bits & 1 == 1 { 0 } else { first }]);
        bits >>= 1;
    }
    let mut fin: [u8; 16] = ctx.finalize().into();

    // The 1000 rounds exist only to make the hash slow (for 1994 hardware).
    for round in 0..1000u32 {
        let mut c = Md5::new();
        if round & 1 == 1 {
            c.update(password);
        } else {
            c.update(fin);
        }
        if round % 3 != 0 {
            c.update(salt);
        }
        if round % 7 != 0 {
            c.update(password);
        }
        if round & 1 == 1 {
            c.update(fin);
        } else {
            c.update(password);
        }
        fin = c.finalize().into();
    }
    fin
}

/// crypt's base64, which emits the bytes in a fixed shuffled order, low 6 bits first.
fn encode(f: &[u8; 16]) -> [u8; ENCODED_LEN] {
    let [
        f0,
        f1,
        f2,
        f3,
        f4,
        f5,
        f6,
        f7,
        f8,
        f9,
        f10,
        f11,
        f12,
        f13,
        f14,
        f15,
    ] = *f;
    let groups = [
        (f0, f6, f12),
        (f1, f7, f13),
        (f2, f8, f14),
        (f3, f9, f15),
        (f4, f10, f5),
    ];
    let mut out = [0u8; ENCODED_LEN];
    let mut chars = out.iter_mut();
    for (a, b, c) in groups {
        let mut v = u32::from(a) << 16 | u32::from(b) << 8 | u32::from(c);
        for slot in chars.by_ref().take(4) {
            *slot = itoa64(v);
            v >>= 6;
        }
    }
    let mut v = u32::from(f11);
    for slot in chars.take(2) {
        *slot = itoa64(v);
        v >>= 6;
    }
    out
}

/// The alphabet `./0-9A-Za-z`, computed rather than looked up so nothing can index
/// out of bounds.
fn itoa64(v: u32) -> u8 {
    // `v & 63` fits in a byte, so the narrowing cannot lose bits.
    let v = (v & 63) as u8;
    match v {
        0 => b'.',
        1 => b'/',
        2..=11 => b'0' + (v - 2),
        12..=37 => b'A' + (v - 12),
        _ => b'a' + (v - 38),
    }
}

/// Whether `c` belongs to crypt's base64 alphabet.
pub(crate) fn is_crypt64(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'.' || c == b'/'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_is_crypt_order() {
        let all: Vec<u8> = (0..64).map(itoa64).collect();
        assert_eq!(
            all,
            b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
        );
        assert!(all.iter().all(|&c| is_crypt64(c)));
    }

    #[test]
    fn known_answers() {
        // From `doveadm pw -s MD5-CRYPT` and `openssl passwd -1 -salt`.
        assert_eq!(&hash(b"x", b"FlB/SxMS"), b"KwfZGbn3bB/RNpKi1ImWK0");
        assert_eq!(&hash(b"password", b"saltsalt"), b"qjXMvbEw8oaL.CzflDtaK/");
        assert_eq!(&hash(b"", b""), b"qRPK7m23GJusamGpoGLby/");
        assert_eq!(
            &hash(
                b"a very long password that is longer than sixteen bytes and more",
                b"ab"
            ),
            b"TolVt0k0iefpaISWvxV4l0"
        );
    }
}
