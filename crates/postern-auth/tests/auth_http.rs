//! nginx's auth_http protocol: requests byte for byte against shared/docs/nginx-mail.md
//! §2 (and nginx's `ngx_mail_auth_http_module.c`), answers read as nginx reads them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use postern_auth::auth_http::{
    AuthMethod, AuthProtocol, ClientCertInfo, Decision, Error, MAX_RESPONSE_HEADER, Parsed,
    ProxyProtocolInfo, Refusal, Request, Response, SmtpEnvelope, Status, TlsInfo, Upstream, decide,
    parse_response, parse_response_at_eof, parse_response_with_limit,
};
use postern_proto::{Credentials, Mechanism, Reply, Secret};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn secret(s: &str) -> Secret<Vec<u8>> {
    Secret::new(s.as_bytes().to_vec())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn imap_login_over_starttls_matches_the_nginx_capture() {
    let mut req = Request::new(
        AuthMethod::Plain,
        AuthProtocol::Imap,
        "user",
        secret("pw"),
        LOCALHOST,
    );
    req.tls = Some(TlsInfo {
        protocol: "TLSv1.2".into(),
        cipher: "ECDHE-RSA-AES256-GCM-SHA384".into(),
        client_cert: None,
    });
    req.headers.push(("X-Auth-Key".into(), "secret".into()));
    assert_eq!(
        text(&req.encode("/auth", "127.0.0.1")),
        "GET /auth HTTP/1.0\r\n\
         Host: 127.0.0.1\r\n\
         Auth-Method: plain\r\n\
         Auth-User: user\r\n\
         Auth-Pass: pw\r\n\
         Auth-Protocol: imap\r\n\
         Auth-Login-Attempt: 1\r\n\
         Client-IP: 127.0.0.1\r\n\
         Auth-SSL: on\r\n\
         Auth-SSL-Protocol: TLSv1.2\r\n\
         Auth-SSL-Cipher: ECDHE-RSA-AES256-GCM-SHA384\r\n\
         X-Auth-Key: secret\r\n\
         \r\n"
    );
}

#[test]
fn credentials_are_escaped_like_nginx() {
    let user = "first last%\u{1}é";
    let mut pass = b"p a\x00ss\r\n%\x7f\xff".to_vec();
    let req = Request::new(
        AuthMethod::Plain,
        AuthProtocol::Pop3,
        user,
        Secret::new(pass.clone()),
        LOCALHOST,
    );
    let out = req.encode("/", "auth");
    let mut expected_user = b"Auth-User: first%20last%25%01".to_vec();
    expected_user.extend_from_slice("é\r\n".as_bytes());
    assert!(out.windows(expected_user.len()).any(|w| w == expected_user));
    let expected_pass = b"Auth-Pass: p%20a%00ss%0D%0A%25\x7f\xff\r\n";
    assert!(out.windows(expected_pass.len()).any(|w| w == expected_pass));
    pass.clear();
}

#[test]
fn smtp_relay_check_sends_envelope_and_no_credentials() {
    let mut req = Request::new(
        AuthMethod::None,
        AuthProtocol::Smtp,
        "stale-user",
        secret("stale-pass"),
        "192.0.2.7".parse().unwrap(),
    );
    req.login_attempt = 2;
    req.client_host = Some("[UNAVAILABLE]".into());
    req.smtp = SmtpEnvelope {
        helo: "client.example.org".into(),
        from: "MAIL FROM:<s@x.org> SIZE=100".into(),
        to: "RCPT TO:<r@y.org>".into(),
    };
    assert_eq!(
        text(&req.encode("/smtp", "auth.local")),
        "GET /smtp HTTP/1.0\r\n\
         Host: auth.local\r\n\
         Auth-Method: none\r\n\
         Auth-User: \r\n\
         Auth-Pass: \r\n\
         Auth-Protocol: smtp\r\n\
         Auth-Login-Attempt: 2\r\n\
         Client-IP: 192.0.2.7\r\n\
         Client-Host: [UNAVAILABLE]\r\n\
         Auth-SMTP-Helo: client.example.org\r\n\
         Auth-SMTP-From: MAIL FROM:<s@x.org> SIZE=100\r\n\
         Auth-SMTP-To: RCPT TO:<r@y.org>\r\n\
         \r\n"
    );
}

#[test]
fn smtp_headers_only_for_method_none() {
    let mut req = Request::new(
        AuthMethod::Plain,
        AuthProtocol::Smtp,
        "u",
        secret("p"),
        LOCALHOST,
    );
    req.smtp.helo = "h".into();
    assert!(!text(&req.encode("/", "h")).contains("Auth-SMTP"));
}

#[test]
fn apop_salt_proxy_protocol_and_client_certificate() {
    let creds = Credentials {
        mechanism: Mechanism::Apop,
        authzid: None,
        user: "mrose".into(),
        password: secret("c4c9334bac560ecc979e58001b3e22fb"),
        challenge: Some("<1896.697170952@dbc.mtview.ca.us>".into()),
    };
    let client: IpAddr = "2001:db8::1".parse().unwrap();
    let mut req = Request::from_credentials(&creds, AuthProtocol::Pop3, client).unwrap();
    req.proxy_protocol = Some(ProxyProtocolInfo {
        addr: client,
        port: 40000,
        server_addr: "2001:db8::2".parse().unwrap(),
        server_port: 995,
    });
    req.tls = Some(TlsInfo {
        protocol: "TLSv1.3".into(),
        cipher: "TLS_AES_256_GCM_SHA384".into(),
        client_cert: Some(ClientCertInfo {
            verify: "SUCCESS".into(),
            subject: "CN=client".into(),
            issuer: "CN=ca".into(),
            serial: "".into(),
            fingerprint: "29d6a80a123d13355ed16b4b04605e29cb55a5ad".into(),
            pem: Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into()),
        }),
    });
    assert_eq!(
        text(&req.encode("/", "[::1]")),
        "GET / HTTP/1.0\r\n\
         Host: [::1]\r\n\
         Auth-Method: apop\r\n\
         Auth-User: mrose\r\n\
         Auth-Pass: c4c9334bac560ecc979e58001b3e22fb\r\n\
         Auth-Salt: <1896.697170952@dbc.mtview.ca.us>\r\n\
         Auth-Protocol: pop3\r\n\
         Auth-Login-Attempt: 1\r\n\
         Client-IP: 2001:db8::1\r\n\
         Proxy-Protocol-Addr: 2001:db8::1\r\n\
         Proxy-Protocol-Port: 40000\r\n\
         Proxy-Protocol-Server-Addr: 2001:db8::2\r\n\
         Proxy-Protocol-Server-Port: 995\r\n\
         Auth-SSL: on\r\n\
         Auth-SSL-Protocol: TLSv1.3\r\n\
         Auth-SSL-Cipher: TLS_AES_256_GCM_SHA384\r\n\
         Auth-SSL-Verify: SUCCESS\r\n\
         Auth-SSL-Subject: CN=client\r\n\
         Auth-SSL-Issuer: CN=ca\r\n\
         Auth-SSL-Fingerprint: 29d6a80a123d13355ed16b4b04605e29cb55a5ad\r\n\
         Auth-SSL-Cert: -----BEGIN%20CERTIFICATE-----%0AMIIB%0A-----END%20CERTIFICATE-----%0A\r\n\
         \r\n"
    );
}

#[test]
fn salt_is_sent_only_for_challenge_methods_and_mapped_addresses_are_unmapped() {
    let mut req = Request::new(
        AuthMethod::Plain,
        AuthProtocol::Imap,
        "u",
        secret("p"),
        IpAddr::V6(Ipv4Addr::new(198, 51, 100, 9).to_ipv6_mapped()),
    );
    req.salt = Some("<x@y>".into());
    let out = text(&req.encode("/", "h"));
    assert!(!out.contains("Auth-Salt"));
    assert!(out.contains("Client-IP: 198.51.100.9\r\n"));
    req.method = AuthMethod::CramMd5;
    assert!(text(&req.encode("/", "h")).contains("Auth-Salt: <x@y>\r\n"));
}

#[test]
fn oauth_has_no_nginx_method() {
    let creds = Credentials {
        mechanism: Mechanism::XOAuth2,
        authzid: None,
        user: "u".into(),
        password: secret("token"),
        challenge: None,
    };
    assert!(Request::from_credentials(&creds, AuthProtocol::Imap, LOCALHOST).is_none());
}

#[test]
fn verbatim_values_cannot_inject_headers() {
    let mut req = Request::new(
        AuthMethod::None,
        AuthProtocol::Smtp,
        "",
        secret(""),
        LOCALHOST,
    );
    req.smtp.helo = "evil\r\nAuth-Status: OK".into();
    req.headers.push(("X-Key".into(), "a\nb".into()));
    let out = text(&req.encode("/a b\r\n", "h\r\nX: y"));
    assert!(out.starts_with("GET /a%20b%0D%0A HTTP/1.0\r\nHost: h%0D%0AX: y\r\n"));
    assert!(out.contains("Auth-SMTP-Helo: evil%0D%0AAuth-Status: OK\r\n"));
    assert!(out.contains("X-Key: a%0Ab\r\n"));
    assert_eq!(out.matches("\r\n").count(), 13);
}

#[test]
fn debug_never_shows_secrets() {
    let mut req = Request::new(
        AuthMethod::Plain,
        AuthProtocol::Imap,
        "user",
        secret("hunter2"),
        LOCALHOST,
    );
    req.headers
        .push(("X-Auth-Key".into(), "sharedsecret".into()));
    let shown = format!("{req:?}");
    assert!(shown.contains("X-Auth-Key") && shown.contains("user"));
    assert!(
        !shown.contains("hunter2") && !shown.contains("sharedsecret"),
        "{shown}"
    );

    let resp = parse_complete(
        b"Auth-Status: OK\r\nAuth-Server: ::1\r\nAuth-Port: 143\r\nAuth-Pass: hunter2\r\n\r\n",
    );
    assert!(!format!("{resp:?}").contains("hunter2"));
    let decision = decide(resp, AuthProtocol::Imap).unwrap();
    assert!(!format!("{decision:?}").contains("hunter2"));
}

fn parse_complete(bytes: &[u8]) -> Response {
    match parse_response(bytes) {
        Ok(Parsed::Complete(r)) => r,
        other => panic!("expected a complete response, got {other:?}"),
    }
}

const OK_IMAP: &[u8] = b"HTTP/1.0 200 OK\r\n\
    Auth-Status: OK\r\n\
    Auth-Server: 192.0.2.10\r\n\
    Auth-Port: 143\r\n\
    Auth-User: renamed@example.org\r\n\
    Auth-Pass: pw%20raw\r\n\
    \r\n\
    body is ignored";

#[test]
fn ok_response() {
    let resp = parse_complete(OK_IMAP);
    assert_eq!(resp.status, Status::Ok);
    assert_eq!(resp.server, Some("192.0.2.10".parse().unwrap()));
    assert_eq!(resp.port, Some(143));
    assert_eq!(resp.user.as_deref(), Some("renamed@example.org"));
    // Values are used verbatim: no %-decoding.
    assert_eq!(resp.pass.as_ref().unwrap().expose(), b"pw%20raw");
    assert_eq!(
        decide(resp, AuthProtocol::Imap).unwrap(),
        Decision::Login(Upstream {
            server: "192.0.2.10:143".parse().unwrap(),
            user: Some("renamed@example.org".into()),
            pass: Some(secret("pw%20raw")),
        })
    );
}

#[test]
fn status_line_is_ignored_and_optional() {
    let body =
        b"Auth-Status: OK\r\nAuth-Server: 10.0.0.1\r\nAuth-Port: 110\r\nAuth-Pass: x\r\n\r\n";
    for prefix in [
        &b""[..],
        b"HTTP/1.0 500 Internal Server Error\r\n",
        b"HTTP/garbage\n",
    ] {
        let mut bytes = prefix.to_vec();
        bytes.extend_from_slice(body);
        let resp = parse_complete(&bytes);
        assert_eq!(resp.status, Status::Ok, "{}", text(prefix));
    }
}

#[test]
fn header_names_are_case_insensitive_values_trimmed_of_spaces_only() {
    let resp = parse_complete(
        b"auth-status:    Invalid login or password   \r\nAUTH-WAIT: 3\r\nauth-server:\texample\r\n\r\n",
    );
    assert_eq!(
        resp.status,
        Status::Fail(b"Invalid login or password".to_vec())
    );
    assert_eq!(resp.wait, Some(3));
    // A tab is part of the value, so this is no IP; harmless for a failure.
    assert_eq!(resp.server, None);
    // The status value itself is case-sensitive, as in nginx.
    assert_eq!(
        parse_complete(b"Auth-Status: ok\r\n\r\n").status,
        Status::Fail(b"ok".to_vec())
    );
}

#[test]
fn bare_lf_line_endings_and_name_only_lines() {
    let resp = parse_complete(
        b"Auth-Status: OK\nX-Flag\nAuth-Server: ::1\nAuth-Port: 993\nAuth-Pass:\n\n",
    );
    assert_eq!(resp.server, Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    // An empty Auth-Pass is a password (empty), as in nginx.
    assert_eq!(resp.pass.as_ref().unwrap().expose(), b"");
    assert!(matches!(
        decide(resp, AuthProtocol::Imap),
        Ok(Decision::Login(_))
    ));
}

#[test]
fn wait_asks_again() {
    let resp = parse_complete(b"HTTP/1.0 200 OK\r\nAuth-Status: WAIT\r\nAuth-Wait: 2\r\n\r\n");
    assert_eq!(resp.status, Status::Wait);
    assert_eq!(
        decide(resp, AuthProtocol::Pop3).unwrap(),
        Decision::AskAgain {
            after: Duration::from_secs(2)
        }
    );
    let resp = parse_complete(b"Auth-Status: WAIT\r\n\r\n");
    assert_eq!(
        decide(resp, AuthProtocol::Pop3).unwrap(),
        Decision::AskAgain {
            after: Duration::ZERO
        }
    );
}

#[test]
fn failure_without_wait_closes_with_wait_lets_the_client_retry() {
    let resp = parse_complete(b"Auth-Status: Invalid login\r\n\r\n");
    let Decision::Refuse(refusal) = decide(resp, AuthProtocol::Imap).unwrap() else {
        panic!()
    };
    assert_eq!(
        refusal.reply,
        Reply {
            preamble: vec![],
            text: b"Invalid login".to_vec()
        }
    );
    assert!(refusal.closes());

    let resp = parse_complete(b"Auth-Status: Invalid login\r\nAuth-Wait: 0\r\n\r\n");
    let Decision::Refuse(refusal) = decide(resp, AuthProtocol::Pop3).unwrap() else {
        panic!()
    };
    assert!(refusal.closes());

    let resp = parse_complete(b"Auth-Status: Invalid login\r\nAuth-Wait: 5\r\n\r\n");
    assert_eq!(
        decide(resp, AuthProtocol::Pop3).unwrap(),
        Decision::Refuse(Refusal {
            reply: Reply {
                preamble: vec![],
                text: b"Invalid login".to_vec()
            },
            delay: Some(Duration::from_secs(5)),
        })
    );
}

#[test]
fn a_failing_status_outranks_ok_and_wait() {
    for bytes in [
        &b"Auth-Status: OK\r\nAuth-Status: nope\r\nAuth-Server: 1.2.3.4\r\nAuth-Port: 1\r\n\r\n"[..],
        b"Auth-Status: nope\r\nAuth-Status: OK\r\n\r\n",
        b"Auth-Status: WAIT\r\nAuth-Status: nope\r\n\r\n",
    ] {
        assert_eq!(parse_complete(bytes).status, Status::Fail(b"nope".to_vec()));
    }
    assert_eq!(
        parse_complete(b"Auth-Status: OK\r\nAuth-Status: WAIT\r\n\r\n").status,
        Status::Wait
    );
}

#[test]
fn smtp_error_code() {
    let resp = parse_complete(b"Auth-Status: Temporary server problem, try again later\r\nAuth-Error-Code: 451 4.3.0\r\nAuth-Wait: 3\r\n\r\n");
    let Decision::Refuse(refusal) = decide(resp, AuthProtocol::Smtp).unwrap() else {
        panic!()
    };
    assert_eq!(
        text(&refusal.reply.text),
        "451 4.3.0 Temporary server problem, try again later"
    );
    assert_eq!(refusal.delay, Some(Duration::from_secs(3)));

    let resp = parse_complete(b"Auth-Status: Invalid login or password\r\n\r\n");
    let Decision::Refuse(refusal) = decide(resp, AuthProtocol::Smtp).unwrap() else {
        panic!()
    };
    assert_eq!(
        text(&refusal.reply.text),
        "535 5.7.0 Invalid login or password"
    );

    // IMAP and POP3 ignore the code.
    let resp = parse_complete(b"Auth-Status: no\r\nAuth-Error-Code: 451 4.3.0\r\n\r\n");
    let Decision::Refuse(refusal) = decide(resp, AuthProtocol::Imap).unwrap() else {
        panic!()
    };
    assert_eq!(refusal.reply.text, b"no");
}

#[test]
fn server_must_be_an_ip_literal() {
    for (server, expected) in [
        (
            "mail.example.org",
            Error::InvalidServer("mail.example.org".into()),
        ),
        ("[::1]", Error::InvalidServer("[::1]".into())),
        (
            "192.0.2.1:143",
            Error::InvalidServer("192.0.2.1:143".into()),
        ),
        ("fe80::1%eth0", Error::InvalidServer("fe80::1%eth0".into())),
    ] {
        let bytes = format!(
            "Auth-Status: OK\r\nAuth-Server: {server}\r\nAuth-Port: 143\r\nAuth-Pass: x\r\n\r\n"
        );
        assert_eq!(parse_response(bytes.as_bytes()), Err(expected), "{server}");
    }
    // Only checked when the answer is OK, as in nginx.
    let resp = parse_complete(b"Auth-Status: no\r\nAuth-Server: mail.example.org\r\n\r\n");
    assert_eq!(resp.server, None);
}

#[test]
fn port_must_be_1_to_65535() {
    for port in ["0", "65536", "x", "+143", "-1", "143 1"] {
        let bytes = format!(
            "Auth-Status: OK\r\nAuth-Server: 10.0.0.1\r\nAuth-Port: {port}\r\nAuth-Pass: x\r\n\r\n"
        );
        assert_eq!(
            parse_response(bytes.as_bytes()),
            Err(Error::InvalidPort(port.into())),
            "{port}"
        );
    }
    let resp = parse_complete(
        b"Auth-Status: OK\r\nAuth-Server: 10.0.0.1\r\nAuth-Port: 0143\r\nAuth-Pass: x\r\n\r\n",
    );
    assert_eq!(resp.port, Some(143));
}

#[test]
fn ok_needs_server_port_and_for_imap_pop3_a_password() {
    for bytes in [
        &b"Auth-Status: OK\r\nAuth-Port: 143\r\n\r\n"[..],
        b"Auth-Status: OK\r\nAuth-Server: 10.0.0.1\r\n\r\n",
        b"Auth-Status: OK\r\nAuth-Server:\r\nAuth-Port: 143\r\n\r\n",
    ] {
        assert_eq!(parse_response(bytes), Err(Error::MissingServer));
    }
    let no_pass = b"Auth-Status: OK\r\nAuth-Server: 10.0.0.1\r\nAuth-Port: 25\r\n\r\n";
    assert_eq!(
        decide(parse_complete(no_pass), AuthProtocol::Imap),
        Err(Error::MissingPass)
    );
    assert_eq!(
        decide(parse_complete(no_pass), AuthProtocol::Pop3),
        Err(Error::MissingPass)
    );
    assert_eq!(
        decide(parse_complete(no_pass), AuthProtocol::Smtp),
        Ok(Decision::Login(Upstream {
            server: "10.0.0.1:25".parse().unwrap(),
            user: None,
            pass: None
        }))
    );
}

#[test]
fn missing_status_is_refused() {
    assert_eq!(
        parse_response(b"Auth-Server: 10.0.0.1\r\nAuth-Port: 143\r\nAuth-Pass: x\r\n\r\n"),
        Err(Error::MissingStatus)
    );
}

#[test]
fn non_utf8_user_is_refused() {
    assert_eq!(
        parse_response(b"Auth-Status: OK\r\nAuth-Server: ::1\r\nAuth-Port: 1\r\nAuth-Pass: x\r\nAuth-User: \xff\r\n\r\n"),
        Err(Error::InvalidUser)
    );
}

#[test]
fn invalid_wait_is_ignored_and_huge_wait_saturates() {
    assert_eq!(
        parse_complete(b"Auth-Status: x\r\nAuth-Wait: soon\r\n\r\n").wait,
        None
    );
    assert_eq!(
        parse_complete(b"Auth-Status: x\r\nAuth-Wait: 4\r\nAuth-Wait: -1\r\n\r\n").wait,
        Some(4)
    );
    assert_eq!(
        parse_complete(b"Auth-Status: x\r\nAuth-Wait: 99999999999\r\n\r\n").wait,
        Some(u32::MAX)
    );
}

#[test]
fn every_prefix_of_a_valid_answer_is_incomplete() {
    for n in 0..OK_IMAP.len() {
        let prefix = &OK_IMAP[..n];
        let complete_at = OK_IMAP.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        match parse_response(prefix) {
            Ok(Parsed::Incomplete) => assert!(n < complete_at, "{n}"),
            Ok(Parsed::Complete(_)) => assert!(n >= complete_at, "{n}"),
            Err(e) => panic!("prefix of {n} bytes: {e}"),
        }
    }
    assert_eq!(parse_response_at_eof(&OK_IMAP[..40]), Err(Error::Truncated));
    assert!(parse_response_at_eof(OK_IMAP).is_ok());
}

#[test]
fn oversized_headers_fail_at_the_limit() {
    let mut big = b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n".to_vec();
    while big.len() < MAX_RESPONSE_HEADER {
        big.extend_from_slice(b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    assert_eq!(
        parse_response(&big[..MAX_RESPONSE_HEADER - 1]),
        Ok(Parsed::Incomplete)
    );
    assert_eq!(parse_response(&big), Err(Error::TooLarge));

    // nginx's own 1024-byte bound: a block that ends on byte 1024 fits, one more does not.
    let mut fits = b"Auth-Status: no\r\nX: ".to_vec();
    fits.resize(1024 - 4, b'a');
    fits.extend_from_slice(b"\r\n\r\n");
    assert_eq!(fits.len(), 1024);
    assert!(matches!(
        parse_response_with_limit(&fits, 1024),
        Ok(Parsed::Complete(_))
    ));
    fits.insert(20, b'a');
    assert_eq!(parse_response_with_limit(&fits, 1024), Err(Error::TooLarge));
}

#[test]
fn garbage_is_an_error_not_a_hang() {
    for bytes in [
        &b"\x00\x01\x02"[..],
        b"Auth Status: OK\r\n\r\n",
        b"_Auth-Status: OK\r\n\r\n",
        b"Auth_Status: OK\r\n\r\n",
        b"-Auth-Status: OK\r\n\r\n",
        b"Auth-Status: OK\r\r\n\r\n",
        b"Auth-Status: OK\r\n\rx",
        b"HTTP/1.0 200\rOK\r\n\r\n",
        b"<html>",
        b" Auth-Status: OK\r\n\r\n",
    ] {
        assert_eq!(
            parse_response(bytes),
            Err(Error::InvalidHeader),
            "{}",
            text(bytes)
        );
    }
}

#[test]
fn encode_reads_back() {
    let resp = Response {
        status: Status::Fail(b"go away".to_vec()),
        server: Some("2001:db8::5".parse().unwrap()),
        port: Some(2525),
        user: Some("u@example.org".into()),
        pass: Some(secret("p w")),
        wait: Some(7),
        error_code: Some("451 4.3.0".into()),
    };
    assert_eq!(parse_complete(&resp.encode()), resp);
    let ok = parse_complete(OK_IMAP);
    assert_eq!(parse_complete(&ok.encode()), ok);
    let login = match decide(ok, AuthProtocol::Imap).unwrap() {
        Decision::Login(l) => l,
        other => panic!("{other:?}"),
    };
    assert_eq!(login.server, SocketAddr::from(([192, 0, 2, 10], 143)));
}
