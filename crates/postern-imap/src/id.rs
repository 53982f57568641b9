//! The ID command (RFC 2971): what the client told us, and what we tell the backend.
//!
//! Dovecot trusts `x-originating-ip`, `x-connected-ip` and friends from hosts in its
//! `login_trusted_networks`, and Postern is such a host. A client could put those keys in
//! its own ID to spoof its address, so every `x-` key from the client is dropped and only
//! Postern adds them, and only for backends configured to trust it.

use postern_proto::ClientInfo;

/// RFC 2971: at most 30 field-value pairs, fields up to 30 octets, values up to 1024.
const MAX_FIELDS: usize = 30;
const MAX_FIELD_LEN: usize = 30;
const MAX_VALUE_LEN: usize = 1024;

/// The client's ID parameters, sanitized: printable ASCII only, within RFC 2971's sizes,
/// no `x-` keys. `None` values are NIL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientId {
    fields: Vec<(String, Option<String>)>,
}

impl ClientId {
    /// Keeps the acceptable pairs of a client's ID; others are dropped silently, as
    /// RFC 2971 lets a server ignore what it does not like.
    pub fn sanitize<'a>(pairs: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>) -> Self {
        let mut fields = Vec::new();
        for (key, value) in pairs {
            if fields.len() == MAX_FIELDS {
                break;
            }
            let Some(key) = printable(key, MAX_FIELD_LEN) else {
                continue;
            };
            if key.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("x-")) {
                continue;
            }
            let value = match value {
                None => None,
                Some(v) => match printable(v, MAX_VALUE_LEN) {
                    Some(v) => Some(v),
                    None => continue,
                },
            };
            fields.push((key, value));
        }
        Self { fields }
    }

    /// The sanitized pairs.
    pub fn fields(&self) -> &[(String, Option<String>)] {
        &self.fields
    }
}

fn printable(raw: &[u8], max: usize) -> Option<String> {
    if raw.len() > max || !raw.iter().all(|&b| (0x20..0x7f).contains(&b)) {
        return None;
    }
    String::from_utf8(raw.to_vec()).ok()
}

/// Builds `tag ID (...)` for the backend: the client's sanitized fields, plus Postern's
/// view of the client when the backend trusts Postern.
pub(crate) fn command(
    tag: &str,
    client_id: Option<&ClientId>,
    client: &ClientInfo,
    trusted: bool,
) -> Option<Vec<u8>> {
    let mut fields: Vec<(&str, Option<String>)> = client_id
        .map(|id| {
            id.fields
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    if trusted {
        fields.extend([
            ("x-originating-ip", Some(client.client.ip().to_string())),
            ("x-originating-port", Some(client.client.port().to_string())),
            ("x-connected-ip", Some(client.local.ip().to_string())),
            ("x-connected-port", Some(client.local.port().to_string())),
            ("x-session-id", Some(client.session_id.clone())),
        ]);
    }
    if fields.is_empty() {
        return None;
    }
    let mut out = format!("{tag} ID (").into_bytes();
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        quote(&mut out, key);
        out.push(b' ');
        match value {
            Some(v) => quote(&mut out, v),
            None => out.extend_from_slice(b"NIL"),
        }
    }
    out.extend_from_slice(b")\r\n");
    Some(out)
}

/// Writes an IMAP quoted string. Callers pass printable ASCII only (see `sanitize`).
fn quote(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for b in s.bytes() {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ClientInfo {
        ClientInfo {
            client: "192.0.2.7:40000".parse().unwrap(),
            local: "127.0.0.1:143".parse().unwrap(),
            tls: true,
            session_id: "s1".into(),
        }
    }

    #[test]
    fn client_cannot_spoof_its_address() {
        let id = ClientId::sanitize([
            (&b"name"[..], Some(&b"Mail \"X\""[..])),
            (b"X-Originating-IP", Some(b"10.0.0.1")),
            (b"version", None),
            (b"os", Some(b"caf\xc3\xa9")),
        ]);
        assert_eq!(id.fields().len(), 2);
        let cmd = command("I", Some(&id), &info(), false).unwrap();
        assert_eq!(
            cmd,
            b"I ID (\"name\" \"Mail \\\"X\\\"\" \"version\" NIL)\r\n"
        );
    }

    #[test]
    fn trusted_backend_gets_the_real_address() {
        let cmd = String::from_utf8(command("I", None, &info(), true).unwrap()).unwrap();
        assert!(
            cmd.contains("\"x-originating-ip\" \"192.0.2.7\" \"x-originating-port\" \"40000\"")
        );
        assert!(cmd.contains("\"x-session-id\" \"s1\""));
        assert_eq!(command("I", None, &info(), false), None);
    }

    #[test]
    fn sizes_are_bounded() {
        let long = vec![b'a'; 1025];
        let pairs: Vec<(&[u8], Option<&[u8]>)> = (0..40)
            .map(|_| (&b"k"[..], Some(&b"v"[..])))
            .chain([(&b"big"[..], Some(&long[..]))])
            .collect();
        assert_eq!(ClientId::sanitize(pairs).fields().len(), 30);
    }
}
