//! The request nginx sends to its `auth_http` server, byte for byte
//! (`ngx_mail_auth_http_create_request`, nginx 1.31.5).

use std::fmt;
use std::net::IpAddr;

use postern_proto::{Credentials, Mechanism, Protocol, Secret};

/// The `Auth-Method` value. nginx folds every mechanism that carries the password
/// itself into `plain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthMethod {
    /// `plain`: IMAP `LOGIN`, POP3 `USER`/`PASS`, SASL `PLAIN` and `LOGIN`.
    Plain,
    /// `apop`: `Auth-Pass` is the client's digest and `Auth-Salt` the greeting's
    /// timestamp.
    Apop,
    /// `cram-md5`: `Auth-Pass` is the client's digest and `Auth-Salt` the challenge.
    CramMd5,
    /// `external`: SASL EXTERNAL; the user is the authorization identity, which may
    /// be empty, and the password is empty. Meant for client certificates.
    External,
    /// `none`: SMTP relay without AUTH, asked at the first `RCPT`. User and password
    /// are always sent empty, and the `Auth-SMTP-*` headers are added.
    None,
}

impl AuthMethod {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Plain => "plain",
            AuthMethod::Apop => "apop",
            AuthMethod::CramMd5 => "cram-md5",
            AuthMethod::External => "external",
            AuthMethod::None => "none",
        }
    }

    /// The method for credentials a Postern front end produced. `None` for bearer
    /// tokens (XOAUTH2, OAUTHBEARER), which nginx's protocol has no method for.
    pub fn for_mechanism(mechanism: Mechanism) -> Option<AuthMethod> {
        match mechanism {
            Mechanism::Cleartext | Mechanism::Plain | Mechanism::Login => Some(AuthMethod::Plain),
            Mechanism::Apop => Some(AuthMethod::Apop),
            _ => None,
        }
    }
}

/// The `Auth-Protocol` value: nginx knows three.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthProtocol {
    /// `imap`
    Imap,
    /// `pop3`
    Pop3,
    /// `smtp` (submission as well as relay)
    Smtp,
}

impl AuthProtocol {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthProtocol::Imap => "imap",
            AuthProtocol::Pop3 => "pop3",
            AuthProtocol::Smtp => "smtp",
        }
    }

    /// The nginx protocol for a Postern listener's protocol; `None` for LMTP, which
    /// nginx does not proxy.
    pub fn from_protocol(protocol: Protocol) -> Option<AuthProtocol> {
        match protocol {
            Protocol::Imap => Some(AuthProtocol::Imap),
            Protocol::Pop3 => Some(AuthProtocol::Pop3),
            Protocol::Submission | Protocol::Smtp => Some(AuthProtocol::Smtp),
            _ => None,
        }
    }
}

/// The PROXY protocol header the client connection arrived with; nginx forwards it
/// as `Proxy-Protocol-*` headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyProtocolInfo {
    /// Source address from the PROXY header.
    pub addr: IpAddr,
    /// Source port.
    pub port: u16,
    /// Destination address.
    pub server_addr: IpAddr,
    /// Destination port.
    pub server_port: u16,
}

/// What an SMTP client said before a relay (`Auth-Method: none`) authorization.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SmtpEnvelope {
    /// The HELO/EHLO argument.
    pub helo: String,
    /// The whole `MAIL FROM:<...> [params]` command line, without CRLF.
    pub from: String,
    /// The whole first `RCPT TO:<...>` command line, without CRLF.
    pub to: String,
}

/// The client's TLS session; present exactly when the client connection is encrypted
/// (implicit TLS or after STARTTLS).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsInfo {
    /// OpenSSL's protocol name, e.g. `TLSv1.3` (see [`tls_protocol_name`]).
    pub protocol: String,
    /// OpenSSL's cipher name, e.g. `TLS_AES_256_GCM_SHA384` (see [`openssl_cipher_name`]).
    pub cipher: String,
    /// Client certificate details; `Some` exactly when client certificates are
    /// requested (nginx: `ssl_verify_client` is not `off`).
    pub client_cert: Option<ClientCertInfo>,
}

/// Client certificate headers, as nginx formats them. Empty strings are not sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientCertInfo {
    /// `SUCCESS`, `FAILED:<reason>` or `NONE`.
    pub verify: String,
    /// Subject DN (RFC 2253).
    pub subject: String,
    /// Issuer DN (RFC 2253).
    pub issuer: String,
    /// Serial number in hex.
    pub serial: String,
    /// SHA-1 fingerprint in hex.
    pub fingerprint: String,
    /// The PEM certificate, sent %-escaped (nginx: `auth_http_pass_client_cert on`).
    pub pem: Option<String>,
}

/// One `auth_http` request: everything nginx puts in its headers.
///
/// `Debug` shows neither the password nor the values of the configured extra headers
/// (which usually hold a shared secret such as `X-Auth-Key`).
#[derive(Clone, PartialEq, Eq)]
pub struct Request {
    /// `Auth-Method`.
    pub method: AuthMethod,
    /// `Auth-User`: the login name (for SASL PLAIN the authentication identity; nginx
    /// ignores the authorization identity). %-escaped on the wire.
    pub user: String,
    /// `Auth-Pass`: the password, or the client's digest for APOP and CRAM-MD5.
    /// %-escaped on the wire.
    pub pass: Secret<Vec<u8>>,
    /// `Auth-Salt`: the APOP timestamp or CRAM-MD5 challenge, without CRLF. Sent only
    /// for those two methods.
    pub salt: Option<String>,
    /// `Auth-Protocol`.
    pub protocol: AuthProtocol,
    /// `Auth-Login-Attempt`: 1 for the session's first attempt, counting up.
    pub login_attempt: u32,
    /// `Client-IP`: the client address (after a trusted PROXY header).
    pub client_ip: IpAddr,
    /// `Client-Host`: nginx sends it only for SMTP: the verified PTR name,
    /// `[UNAVAILABLE]` or `[TEMPUNAVAIL]`. Not sent when `None` or empty.
    pub client_host: Option<String>,
    /// `Proxy-Protocol-*`: sent when the listener takes PROXY headers.
    pub proxy_protocol: Option<ProxyProtocolInfo>,
    /// `Auth-SMTP-Helo`, `-From`, `-To`: sent only with [`AuthMethod::None`].
    pub smtp: SmtpEnvelope,
    /// `Auth-SSL*`: sent when the client connection is encrypted.
    pub tls: Option<TlsInfo>,
    /// Configured `auth_http_header` lines, `(name, value)`, sent last in this order.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// A request with the required fields; everything optional is left out and the
    /// attempt number is 1.
    pub fn new(
        method: AuthMethod,
        protocol: AuthProtocol,
        user: impl Into<String>,
        pass: Secret<Vec<u8>>,
        client_ip: IpAddr,
    ) -> Request {
        Request {
            method,
            user: user.into(),
            pass,
            salt: None,
            protocol,
            login_attempt: 1,
            client_ip,
            client_host: None,
            proxy_protocol: None,
            smtp: SmtpEnvelope::default(),
            tls: None,
            headers: Vec::new(),
        }
    }

    /// The request for credentials a Postern front end produced: method from the
    /// mechanism, APOP's timestamp as the salt. `None` for mechanisms nginx's protocol
    /// cannot express (see [`AuthMethod::for_mechanism`]).
    pub fn from_credentials(
        credentials: &Credentials,
        protocol: AuthProtocol,
        client_ip: IpAddr,
    ) -> Option<Request> {
        let method = AuthMethod::for_mechanism(credentials.mechanism)?;
        let mut request = Request::new(
            method,
            protocol,
            credentials.user.clone(),
            credentials.password.clone(),
            client_ip,
        );
        request.salt = credentials.challenge.clone();
        Some(request)
    }

    /// The complete HTTP/1.0 request nginx would send to `uri` on `host` (the
    /// `auth_http` URL's path and host, see [`Endpoint`](super::Endpoint)).
    ///
    /// Output differs from nginx only where nginx would let a value break the request:
    /// CR, LF and NUL in a verbatim header value, and controls or spaces in `uri`, are
    /// %-escaped instead of sent raw.
    pub fn encode(&self, uri: &str, host: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(b"GET ");
        push_uri(&mut out, uri);
        out.extend_from_slice(b" HTTP/1.0\r\n");
        header(&mut out, "Host", host);
        header(&mut out, "Auth-Method", self.method.as_str());

        // nginx clears the login for relay checks (CVE-2025-53859 was stale memory
        // leaking here), so `none` never carries credentials whatever the caller set.
        let none = self.method == AuthMethod::None;
        out.extend_from_slice(b"Auth-User: ");
        escape(&mut out, if none { b"" } else { self.user.as_bytes() });
        out.extend_from_slice(b"\r\nAuth-Pass: ");
        escape(&mut out, if none { b"" } else { self.pass.expose() });
        out.extend_from_slice(b"\r\n");

        let challenge = matches!(self.method, AuthMethod::Apop | AuthMethod::CramMd5);
        if let Some(salt) = self.salt.as_deref().filter(|s| challenge && !s.is_empty()) {
            header(&mut out, "Auth-Salt", salt);
        }
        header(&mut out, "Auth-Protocol", self.protocol.as_str());
        header(
            &mut out,
            "Auth-Login-Attempt",
            &self.login_attempt.to_string(),
        );
        header(
            &mut out,
            "Client-IP",
            &self.client_ip.to_canonical().to_string(),
        );
        if let Some(host) = self.client_host.as_deref().filter(|h| !h.is_empty()) {
            header(&mut out, "Client-Host", host);
        }
        if let Some(pp) = &self.proxy_protocol {
            header(&mut out, "Proxy-Protocol-Addr", &pp.addr.to_string());
            header(&mut out, "Proxy-Protocol-Port", &pp.port.to_string());
            header(
                &mut out,
                "Proxy-Protocol-Server-Addr",
                &pp.server_addr.to_string(),
            );
            header(
                &mut out,
                "Proxy-Protocol-Server-Port",
                &pp.server_port.to_string(),
            );
        }
        if none {
            header(&mut out, "Auth-SMTP-Helo", &self.smtp.helo);
            header(&mut out, "Auth-SMTP-From", &self.smtp.from);
            header(&mut out, "Auth-SMTP-To", &self.smtp.to);
        }
        if let Some(tls) = &self.tls {
            out.extend_from_slice(b"Auth-SSL: on\r\n");
            optional(&mut out, "Auth-SSL-Protocol", &tls.protocol);
            optional(&mut out, "Auth-SSL-Cipher", &tls.cipher);
            if let Some(cert) = &tls.client_cert {
                optional(&mut out, "Auth-SSL-Verify", &cert.verify);
                optional(&mut out, "Auth-SSL-Subject", &cert.subject);
                optional(&mut out, "Auth-SSL-Issuer", &cert.issuer);
                optional(&mut out, "Auth-SSL-Serial", &cert.serial);
                optional(&mut out, "Auth-SSL-Fingerprint", &cert.fingerprint);
                if let Some(pem) = cert.pem.as_deref().filter(|p| !p.is_empty()) {
                    out.extend_from_slice(b"Auth-SSL-Cert: ");
                    escape(&mut out, pem.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
            }
        }
        for (name, value) in &self.headers {
            header(&mut out, name, value);
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header_names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("user", &self.user)
            .field("pass", &self.pass)
            .field("salt", &self.salt)
            .field("protocol", &self.protocol)
            .field("login_attempt", &self.login_attempt)
            .field("client_ip", &self.client_ip)
            .field("client_host", &self.client_host)
            .field("proxy_protocol", &self.proxy_protocol)
            .field("smtp", &self.smtp)
            .field("tls", &self.tls)
            .field("headers (values redacted)", &header_names)
            .finish()
    }
}

/// nginx's `NGX_ESCAPE_MAIL_AUTH`: space, `%` and the C0 controls become `%XX`
/// (upper-case hex); DEL and bytes from 0x80 up are sent raw.
pub(crate) fn escape(out: &mut Vec<u8>, bytes: &[u8]) {
    for &b in bytes {
        if b <= 0x20 || b == b'%' {
            push_pct(out, b);
        } else {
            out.push(b);
        }
    }
}

fn push_pct(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push(b'%');
    for nibble in [b >> 4, b & 0x0f] {
        out.push(HEX.get(usize::from(nibble)).copied().unwrap_or(b'0'));
    }
}

/// A header sent verbatim, as nginx does, except for the three bytes that would end
/// or corrupt the line.
fn header(out: &mut Vec<u8>, name: &str, value: &str) {
    push_verbatim(out, name.as_bytes());
    out.extend_from_slice(b": ");
    push_verbatim(out, value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn optional(out: &mut Vec<u8>, name: &str, value: &str) {
    if !value.is_empty() {
        header(out, name, value);
    }
}

fn push_verbatim(out: &mut Vec<u8>, bytes: &[u8]) {
    for &b in bytes {
        if matches!(b, b'\r' | b'\n' | 0) {
            push_pct(out, b);
        } else {
            out.push(b);
        }
    }
}

fn push_uri(out: &mut Vec<u8>, uri: &str) {
    for &b in uri.as_bytes() {
        if b <= 0x20 || b == 0x7f {
            push_pct(out, b);
        } else {
            out.push(b);
        }
    }
}

/// OpenSSL's name for a TLS version as rustls spells it (`TLSv1_3` → `TLSv1.3`), which
/// is what nginx sends in `Auth-SSL-Protocol`. Unknown names come back unchanged.
pub fn tls_protocol_name(rustls_name: &str) -> String {
    match rustls_name {
        "TLSv1_3" => "TLSv1.3".to_owned(),
        "TLSv1_2" => "TLSv1.2".to_owned(),
        "TLSv1_1" => "TLSv1.1".to_owned(),
        "TLSv1_0" => "TLSv1".to_owned(),
        other => other.to_owned(),
    }
}

/// OpenSSL's name for a cipher suite given its IANA name (as rustls's
/// `CipherSuite` prints it), which is what nginx sends in `Auth-SSL-Cipher`. Covers
/// every suite rustls implements; `None` for others.
pub fn openssl_cipher_name(iana_name: &str) -> Option<&'static str> {
    Some(match iana_name {
        "TLS13_AES_128_GCM_SHA256" | "TLS_AES_128_GCM_SHA256" => "TLS_AES_128_GCM_SHA256",
        "TLS13_AES_256_GCM_SHA384" | "TLS_AES_256_GCM_SHA384" => "TLS_AES_256_GCM_SHA384",
        "TLS13_CHACHA20_POLY1305_SHA256" | "TLS_CHACHA20_POLY1305_SHA256" => {
            "TLS_CHACHA20_POLY1305_SHA256"
        }
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => "ECDHE-ECDSA-AES128-GCM-SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => "ECDHE-ECDSA-AES256-GCM-SHA384",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" => "ECDHE-ECDSA-CHACHA20-POLY1305",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => "ECDHE-RSA-AES128-GCM-SHA256",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => "ECDHE-RSA-AES256-GCM-SHA384",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" => "ECDHE-RSA-CHACHA20-POLY1305",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(b: &[u8]) -> String {
        let mut out = Vec::new();
        escape(&mut out, b);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn escaping_matches_nginx_mail_auth_table() {
        assert_eq!(esc(b"user"), "user");
        assert_eq!(esc(b"a b%c"), "a%20b%25c");
        assert_eq!(esc(b"\0\x01\x1f\r\n\t"), "%00%01%1F%0D%0A%09");
        // DEL, `+`, `:` and 8-bit bytes are not escaped.
        assert_eq!(esc(b"\x7f+:/?#&="), "\x7f+:/?#&=");
        let mut out = Vec::new();
        escape(&mut out, "ü".as_bytes());
        assert_eq!(out, "ü".as_bytes());
    }

    #[test]
    fn method_and_protocol_names() {
        assert_eq!(
            AuthMethod::for_mechanism(Mechanism::Login),
            Some(AuthMethod::Plain)
        );
        assert_eq!(
            AuthMethod::for_mechanism(Mechanism::Cleartext),
            Some(AuthMethod::Plain)
        );
        assert_eq!(
            AuthMethod::for_mechanism(Mechanism::Apop),
            Some(AuthMethod::Apop)
        );
        assert_eq!(AuthMethod::for_mechanism(Mechanism::XOAuth2), None);
        assert_eq!(
            AuthProtocol::from_protocol(Protocol::Submission),
            Some(AuthProtocol::Smtp)
        );
        assert_eq!(AuthProtocol::from_protocol(Protocol::Lmtp), None);
        assert_eq!(tls_protocol_name("TLSv1_3"), "TLSv1.3");
        assert_eq!(
            openssl_cipher_name("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"),
            Some("ECDHE-RSA-AES256-GCM-SHA384")
        );
        assert_eq!(
            openssl_cipher_name("TLS13_AES_256_GCM_SHA384"),
            Some("TLS_AES_256_GCM_SHA384")
        );
    }
}
