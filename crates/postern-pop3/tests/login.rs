//! The backend login machine against scripted backend transcripts. The Dovecot lines
//! are what Dovecot 2.3.19 sent on loopback (login_trusted_networks = 127.0.0.0/8).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use postern_pop3::{Login, LoginMethod, LoginOptions};
use postern_proto::{
    BackendLogin, ClientInfo, Credentials, Failure, LoginEvent, Mechanism, Reply, Secret, Verdict,
};

/// Dovecot's greeting to a trusted network.
const DOVECOT: &[u8] = b"+OK [XCLIENT] Dovecot pop3probe ready.\r\n";
/// Dovecot's greeting to anyone else.
const DOVECOT_UNTRUSTED: &[u8] = b"+OK Dovecot pop3u ready.\r\n";
const UNAVAILABLE: Option<Verdict> = Some(Verdict::Failed(Failure::Unavailable));
const AUTH_FAILED: Option<Verdict> = Some(Verdict::Failed(Failure::AuthFailed));

fn creds(user: &str, password: &[u8], authzid: Option<&str>) -> Credentials {
    Credentials {
        mechanism: Mechanism::Cleartext,
        authzid: authzid.map(str::to_owned),
        user: user.into(),
        password: Secret::new(password.to_vec()),
        challenge: None,
    }
}

fn alice() -> Credentials {
    creds("alice@example.test", b"pa ss", None)
}

fn client() -> ClientInfo {
    ClientInfo {
        client: "127.0.0.2:5555".parse().unwrap(),
        local: "127.0.0.1:110".parse().unwrap(),
        tls: true,
        session_id: "sid1".into(),
    }
}

fn login(c: Credentials, method: LoginMethod, forward: bool) -> Login {
    login_from(c, method, forward, &client())
}

fn login_from(c: Credentials, method: LoginMethod, forward: bool, info: &ClientInfo) -> Login {
    let opts = LoginOptions {
        method,
        forward_client: forward,
        starttls: false,
    };
    Login::new(c, &opts, info)
}

fn feed(l: &mut Login, bytes: &[u8]) -> (String, Option<Verdict>) {
    l.handle_input(bytes);
    let mut out = Vec::new();
    l.poll_transmit(&mut out);
    let v = done(l.poll_event());
    (String::from_utf8(out).unwrap(), v)
}

fn done(e: Option<LoginEvent>) -> Option<Verdict> {
    match e {
        Some(LoginEvent::Done(v)) => Some(v),
        Some(LoginEvent::StartTls) => panic!("unexpected StartTls"),
        None => None,
    }
}

fn accepted(text: &[u8]) -> Option<Verdict> {
    Some(Verdict::Accepted(Reply {
        preamble: vec![],
        text: text.to_vec(),
    }))
}

fn refused(text: &[u8]) -> Option<Verdict> {
    Some(Verdict::Refused(Reply {
        preamble: vec![],
        text: text.to_vec(),
    }))
}

#[test]
fn defaults() {
    let o = LoginOptions::default();
    assert_eq!((o.method, o.forward_client), (LoginMethod::Plain, false));
}

#[test]
fn auth_plain_with_initial_response() {
    let mut l = login(alice(), LoginMethod::Plain, false);
    // Nothing before the greeting.
    assert_eq!(feed(&mut l, b""), (String::new(), None));
    let (out, v) = feed(&mut l, DOVECOT);
    assert_eq!(out, "AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABwYSBzcw==\r\n");
    assert!(v.is_none());
    let (out, v) = feed(&mut l, b"+OK Logged in.\r\n+OK 2 320\r\n");
    assert_eq!(out, "");
    assert_eq!(v, accepted(b"Logged in."));
    assert!(!l.client_forwarded());
    // What the backend sent after its answer belongs to the client.
    assert_eq!(l.into_handoff(), b"+OK 2 320\r\n");
}

#[test]
fn long_credentials_go_after_the_continuation() {
    // RFC 5034 §4: AUTH with its initial response must fit in 255 octets.
    let pw = vec![b'x'; 2048];
    let mut l = login(
        creds("alice@example.test", &pw, None),
        LoginMethod::Plain,
        false,
    );
    let (out, _) = feed(&mut l, DOVECOT);
    assert_eq!(out, "AUTH PLAIN\r\n");
    let (out, v) = feed(&mut l, b"+ \r\n");
    let mut message = b"\0alice@example.test\0".to_vec();
    message.extend_from_slice(&pw);
    assert_eq!(
        out,
        format!("{}\r\n", postern_proto::sasl::encode(&message))
    );
    assert!(v.is_none());
    assert_eq!(
        feed(&mut l, b"+OK Logged in.\r\n").1,
        accepted(b"Logged in.")
    );

    // The longest line that still carries its initial response (base64 grows in steps
    // of 4: 253 octets, the next step would be 257).
    let mut l = login(creds("u", &[b'y'; 177], None), LoginMethod::Plain, false);
    let (out, _) = feed(&mut l, DOVECOT);
    assert_eq!(out.len(), 253, "{out}");
    assert!(out.starts_with("AUTH PLAIN AHUA"));
    let mut l = login(creds("u", &[b'y'; 178], None), LoginMethod::Plain, false);
    assert_eq!(feed(&mut l, DOVECOT).0, "AUTH PLAIN\r\n");
    // A bare `+` is a continuation too.
    let (out, _) = feed(&mut l, b"+\r\n");
    assert!(out.starts_with("AHUAeXl5"), "{out}");
}

#[test]
fn user_and_pass() {
    let mut l = login(alice(), LoginMethod::User, false);
    let (out, _) = feed(&mut l, DOVECOT);
    assert_eq!(out, "USER alice@example.test\r\n");
    // One command at a time: PASS waits for USER's answer.
    let (out, v) = feed(&mut l, b"+OK\r\n");
    assert_eq!(out, "PASS pa ss\r\n");
    assert!(v.is_none());
    let (out, v) = feed(&mut l, b"+OK Logged in.\r\n");
    assert_eq!(out, "");
    assert_eq!(v, accepted(b"Logged in."));
    assert!(l.into_handoff().is_empty());
}

#[test]
fn authzid_always_uses_plain() {
    let mut l = login(
        creds("admin", b"pw", Some("bob@example.test")),
        LoginMethod::User,
        false,
    );
    let (out, _) = feed(&mut l, DOVECOT);
    assert_eq!(out, "AUTH PLAIN Ym9iQGV4YW1wbGUudGVzdABhZG1pbgBwdw==\r\n");
}

#[test]
fn xclient_forwards_the_client() {
    let mut l = login(alice(), LoginMethod::Plain, true);
    let (out, v) = feed(&mut l, DOVECOT);
    assert_eq!(out, "XCLIENT ADDR=127.0.0.2 PORT=5555 SESSION=sid1\r\n");
    assert!(v.is_none());
    let (out, _) = feed(&mut l, b"+OK Updated\r\n");
    assert_eq!(out, "AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABwYSBzcw==\r\n");
    assert!(l.client_forwarded());
    assert_eq!(
        feed(&mut l, b"+OK Logged in.\r\n").1,
        accepted(b"Logged in.")
    );

    // USER/PASS after XCLIENT, and the whole exchange one byte at a time.
    let mut l = login(alice(), LoginMethod::User, true);
    let mut out = String::new();
    let mut verdict = None;
    for chunk in [
        DOVECOT,
        b"+OK Updated\r\n",
        b"+OK\r\n",
        b"+OK Logged in.\r\nx",
    ] {
        for b in chunk {
            let (o, v) = feed(&mut l, std::slice::from_ref(b));
            out += &o;
            verdict = verdict.or(v);
        }
    }
    assert_eq!(
        out,
        "XCLIENT ADDR=127.0.0.2 PORT=5555 SESSION=sid1\r\nUSER alice@example.test\r\nPASS pa ss\r\n"
    );
    assert_eq!(verdict, accepted(b"Logged in."));
    assert_eq!(l.into_handoff(), b"x");
}

#[test]
fn xclient_address_forms() {
    let cases = [
        (
            "[2001:db8::1]:4242",
            "sess-2_x",
            "XCLIENT ADDR=2001:db8::1 PORT=4242 SESSION=sess-2_x\r\n",
        ),
        // A dual-stack listener's v4-mapped address is logged as IPv4.
        (
            "[::ffff:192.0.2.7]:1",
            "a",
            "XCLIENT ADDR=192.0.2.7 PORT=1 SESSION=a\r\n",
        ),
        // Ids that could split the argument list, or too long for Dovecot, are left out.
        (
            "192.0.2.7:1",
            "has space",
            "XCLIENT ADDR=192.0.2.7 PORT=1\r\n",
        ),
        ("192.0.2.7:1", "", "XCLIENT ADDR=192.0.2.7 PORT=1\r\n"),
        (
            "192.0.2.7:1",
            &"s".repeat(65),
            "XCLIENT ADDR=192.0.2.7 PORT=1\r\n",
        ),
    ];
    for (addr, id, want) in cases {
        let info = ClientInfo {
            client: addr.parse().unwrap(),
            session_id: id.into(),
            ..client()
        };
        let mut l = login_from(alice(), LoginMethod::Plain, true, &info);
        assert_eq!(feed(&mut l, DOVECOT).0, want);
    }
}

#[test]
fn no_xclient_where_the_backend_does_not_offer_it() {
    // Dovecot answers an untrusted XCLIENT with "+OK You are not from trusted IP -
    // ignoring": only the greeting tells whether it would be honoured.
    let mut l = login(alice(), LoginMethod::Plain, true);
    let (out, _) = feed(&mut l, DOVECOT_UNTRUSTED);
    assert!(out.starts_with("AUTH PLAIN "), "{out}");
    assert_eq!(
        feed(&mut l, b"+OK Logged in.\r\n").1,
        accepted(b"Logged in.")
    );
    assert!(!l.client_forwarded());
}

#[test]
fn refused_xclient_is_unavailable() {
    let mut l = login(alice(), LoginMethod::Plain, true);
    feed(&mut l, DOVECOT);
    assert_eq!(
        feed(&mut l, b"-ERR Invalid parameters\r\n"),
        (String::new(), UNAVAILABLE)
    );
}

#[test]
fn refusals_keep_the_backend_code() {
    let cases: [(&[u8], &[u8]); 3] = [
        (
            b"-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n",
            b"[IN-USE] Mailbox is locked by another POP3 session.",
        ),
        (
            b"-ERR [AUTH] Authentication failed.\r\n",
            b"[AUTH] Authentication failed.",
        ),
        (b"-ERR\r\n", b""),
    ];
    for (line, text) in cases {
        let mut l = login(alice(), LoginMethod::Plain, false);
        feed(&mut l, DOVECOT);
        assert_eq!(feed(&mut l, line), (String::new(), refused(text)));
        let mut l = login(alice(), LoginMethod::User, false);
        feed(&mut l, DOVECOT);
        feed(&mut l, b"+OK\r\n");
        assert_eq!(feed(&mut l, line), (String::new(), refused(text)));
    }
    // USER itself refused (e.g. a server that disables it): PASS is never sent.
    let mut l = login(alice(), LoginMethod::User, false);
    feed(&mut l, DOVECOT);
    assert_eq!(
        feed(
            &mut l,
            b"-ERR [AUTH] Plaintext authentication disallowed.\r\n"
        ),
        (
            String::new(),
            refused(b"[AUTH] Plaintext authentication disallowed.")
        )
    );
    // Refused at the continuation of a long AUTH PLAIN.
    let mut l = login(creds("u", &[b'y'; 300], None), LoginMethod::Plain, false);
    feed(&mut l, DOVECOT);
    assert_eq!(
        feed(&mut l, b"-ERR [SYS/TEMP] try later\r\n").1,
        refused(b"[SYS/TEMP] try later")
    );
}

#[test]
fn broken_backends_are_unavailable() {
    for greeting in [
        &b"-ERR [SYS/TEMP] Too many connections\r\n"[..],
        b"* OK [CAPABILITY IMAP4rev1] Dovecot ready.\r\n",
        b"220 smtp.example ESMTP\r\n",
        b"+OKAY\r\n",
        b"+ \r\n",
        b"\r\n",
    ] {
        let mut l = login(alice(), LoginMethod::Plain, false);
        assert_eq!(
            feed(&mut l, greeting),
            (String::new(), UNAVAILABLE),
            "{greeting:?}"
        );
    }
    // An endless line.
    let mut l = login(alice(), LoginMethod::Plain, false);
    assert_eq!(feed(&mut l, &vec![b'+'; 9000]).1, UNAVAILABLE);
    // A challenge after the initial response; `+OK` to a bare AUTH PLAIN.
    let mut l = login(alice(), LoginMethod::Plain, false);
    feed(&mut l, DOVECOT);
    assert_eq!(feed(&mut l, b"+ Zm9v\r\n").1, UNAVAILABLE);
    let mut l = login(creds("u", &[b'y'; 300], None), LoginMethod::Plain, false);
    feed(&mut l, DOVECOT);
    assert_eq!(feed(&mut l, b"+OK\r\n").1, UNAVAILABLE);
    // A continuation after USER or PASS; garbage instead of an answer.
    for answers in [
        &[&b"+ \r\n"[..]][..],
        &[b"+OK\r\n", b"+ \r\n"],
        &[b"OK\r\n"],
    ] {
        let mut l = login(alice(), LoginMethod::User, false);
        feed(&mut l, DOVECOT);
        let mut v = None;
        for a in answers {
            v = feed(&mut l, a).1;
        }
        assert_eq!(v, UNAVAILABLE, "{answers:?}");
    }
}

#[test]
fn credentials_that_cannot_be_replayed() {
    // CR, LF or NUL would break a USER or PASS line: nothing is sent.
    for c in [
        creds("alice", b"pw\r\nDELE 1", None),
        creds("alice", b"p\0w", None),
        creds("ali\rce", b"pw", None),
        creds("alice", b"", None),
        creds("", b"pw", None),
    ] {
        let mut l = login(c, LoginMethod::User, false);
        assert_eq!(done(l.poll_event()), AUTH_FAILED);
        assert_eq!(feed(&mut l, DOVECOT), (String::new(), None));
    }
    // Base64 carries CR and LF safely; NUL would shift PLAIN's fields.
    let mut l = login(
        creds("alice", b"pw\r\nDELE 1", None),
        LoginMethod::Plain,
        false,
    );
    assert_eq!(
        feed(&mut l, DOVECOT).0,
        "AUTH PLAIN AGFsaWNlAHB3DQpERUxFIDE=\r\n"
    );
    let mut l = login(creds("alice", b"p\0w", None), LoginMethod::Plain, false);
    assert_eq!(done(l.poll_event()), AUTH_FAILED);
    // APOP credentials must have been verified and replaced by the driver.
    let apop = Credentials {
        mechanism: Mechanism::Apop,
        challenge: Some("<1.2@host>".into()),
        ..creds("alice", b"c4c9334bac560ecc979e58001b3e22fb", None)
    };
    let mut l = login(apop, LoginMethod::Plain, false);
    assert_eq!(done(l.poll_event()), UNAVAILABLE);
    assert_eq!(feed(&mut l, DOVECOT), (String::new(), None));
}

#[test]
fn bytes_after_the_answer_are_handed_off() {
    // The answer and the start of what follows in one read; the rest in the next one,
    // kept as it is (not parsed) once the verdict is out.
    let mut l = login(alice(), LoginMethod::Plain, false);
    feed(&mut l, DOVECOT);
    let (_, v) = feed(&mut l, b"+OK Logged in.\r\n+OK 1 ");
    assert_eq!(v, accepted(b"Logged in."));
    assert_eq!(feed(&mut l, b"messages\r\n"), (String::new(), None));
    assert_eq!(l.into_handoff(), b"+OK 1 messages\r\n");
}

#[test]
fn stls_comes_first_and_xclient_follows_inside_tls() {
    let opts = LoginOptions {
        method: LoginMethod::Plain,
        forward_client: true,
        starttls: true,
    };
    let mut l = Login::new(creds("alice@example.test", b"pw", None), &opts, &client());
    let (out, _) = feed(&mut l, b"+OK [XCLIENT] Dovecot ready.\r\n");
    assert_eq!(out, "STLS\r\n");
    l.handle_input(b"+OK Begin TLS negotiation now.\r\n+OK injected\r\n");
    assert!(matches!(l.poll_event(), Some(LoginEvent::StartTls)));
    l.handle_tls_ready();
    let mut out = Vec::new();
    l.poll_transmit(&mut out);
    assert!(String::from_utf8(out).unwrap().starts_with("XCLIENT ADDR="));
}

#[test]
fn a_backend_refusing_stls_is_not_logged_in_to() {
    let opts = LoginOptions {
        method: LoginMethod::User,
        forward_client: false,
        starttls: true,
    };
    let mut l = Login::new(creds("alice@example.test", b"pw", None), &opts, &client());
    feed(&mut l, b"+OK ready\r\n");
    let (out, v) = feed(&mut l, b"-ERR STLS not available\r\n");
    assert_eq!(out, "");
    assert_eq!(v, UNAVAILABLE);
}

#[test]
fn bearer_tokens_replayed_with_their_mechanism() {
    let msg = b"n,a=alice@x,\x01auth=Bearer t\x01\x01";
    let mut c = creds("alice@x", msg, None);
    c.mechanism = Mechanism::OAuthBearer;
    let mut l = login(c, LoginMethod::User, false);
    let (out, _) = feed(&mut l, DOVECOT);
    assert_eq!(
        out,
        format!("AUTH OAUTHBEARER {}\r\n", postern_proto::sasl::encode(msg))
    );
    let (out, v) = feed(&mut l, b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n");
    assert_eq!((out.as_str(), v), ("AQ==\r\n", None));
    let (_, v) = feed(&mut l, b"-ERR [AUTH] Authentication failed.\r\n");
    assert!(matches!(v, Some(Verdict::Refused(_))), "{v:?}");
}
