//! Transcript tests for the submission front end: bytes in, bytes and events out.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use postern_proto::{
    BackendLogin, ClientInfo, CloseReason, Credentials, Event, Failure, FrontEnd, Mechanism, Reply,
    Verdict,
};
use postern_smtp::{Front, LoginOptions, Options, Shutdown};

fn opts() -> Options {
    Options {
        hostname: "mx.test".into(),
        extensions: vec![
            "PIPELINING".into(),
            "SIZE 1000".into(),
            "XCLIENT ADDR".into(),
            "STARTTLS".into(),
            "AUTH CRAM-MD5".into(),
        ],
        ..Options::default()
    }
}

struct T {
    front: Front,
    events: Vec<Event>,
}

impl T {
    fn new(tls: bool) -> (Self, String) {
        Self::with(opts(), tls)
    }

    fn with(o: Options, tls: bool) -> (Self, String) {
        let mut t = T {
            front: Front::new(Arc::new(o), tls),
            events: vec![],
        };
        let greeting = t.out();
        (t, greeting)
    }

    fn out(&mut self) -> String {
        let mut out = Vec::new();
        self.front.poll_transmit(&mut out);
        while let Some(e) = self.front.poll_event() {
            self.events.push(e);
        }
        String::from_utf8(out).unwrap()
    }

    fn send(&mut self, bytes: &[u8]) -> String {
        self.front.handle_input(bytes);
        self.out()
    }

    fn take_auth(&mut self) -> Credentials {
        let i = self
            .events
            .iter()
            .position(|e| matches!(e, Event::Authenticate(_)))
            .expect("an Authenticate event");
        match self.events.remove(i) {
            Event::Authenticate(c) => c,
            _ => unreachable!(),
        }
    }

    fn has_auth(&self) -> bool {
        self.events
            .iter()
            .any(|e| matches!(e, Event::Authenticate(_)))
    }

    fn closed(&self) -> Option<CloseReason> {
        self.events.iter().find_map(|e| match e {
            Event::Close(r) => Some(*r),
            _ => None,
        })
    }
}

const EHLO_TLS: &str = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 AUTH PLAIN LOGIN\r\n";

#[test]
fn greeting_and_ehlo_before_and_after_tls() {
    let (mut t, g) = T::new(false);
    assert_eq!(g, "220 mx.test ESMTP Postern ready\r\n");
    // Before TLS: STARTTLS, no AUTH; the backend's XCLIENT, STARTTLS and AUTH lines
    // from the options never show.
    assert_eq!(
        t.send(b"EHLO client.example\r\n"),
        "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 STARTTLS\r\n"
    );
    assert_eq!(t.send(b"HELO client.example\r\n"), "250 mx.test\r\n");
    let (mut t, _) = T::new(true);
    assert_eq!(t.send(b"ehlo client.example\r\n"), EHLO_TLS);
    let (mut t, _) = T::with(
        Options {
            insecure_plaintext_auth: true,
            starttls: false,
            ..opts()
        },
        false,
    );
    assert_eq!(t.send(b"EHLO c\r\n"), EHLO_TLS);
}

#[test]
fn starttls_discards_pipelined_plaintext_and_forgets_ehlo() {
    let (mut t, _) = T::new(false);
    t.send(b"EHLO c.example\r\n");
    let out = t.send(b"STARTTLS\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
    assert_eq!(out, "220 2.0.0 Ready to start TLS\r\n");
    assert!(matches!(t.events[0], Event::Rejected(_)));
    assert!(matches!(t.events[1], Event::StartTls));
    // Bytes arriving before the handshake finishes are not read as commands either.
    assert_eq!(t.send(b"NOOP\r\n"), "");
    t.front.handle_tls_ready();
    assert_eq!(t.out(), "");
    assert!(!t.has_auth());
    assert_eq!(t.front.helo(), None);
    // EHLO again is required after TLS (RFC 3207 §4.2).
    let out = t.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
    assert_eq!(out, "503 5.5.1 Error: send EHLO first\r\n");
    assert_eq!(t.send(b"EHLO c.example\r\n"), EHLO_TLS);
    assert_eq!(
        t.send(b"STARTTLS\r\n"),
        "503 5.5.1 Error: TLS already active\r\n"
    );
}

#[test]
fn auth_refused_before_tls_and_before_ehlo() {
    let (mut t, _) = T::new(false);
    assert_eq!(
        t.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"),
        "503 5.5.1 Error: send EHLO first\r\n"
    );
    t.send(b"EHLO c\r\n");
    let out = t.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<a@b.example>\r\n");
    assert_eq!(
        out,
        "530 5.7.0 Must issue a STARTTLS command first\r\n\
         530 5.7.0 Must issue a STARTTLS command first\r\n"
    );
    assert!(!t.has_auth());
    // Never echo AUTH data.
    assert!(!out.contains("AGFs"));
    let (mut t, _) = T::new(true);
    t.send(b"EHLO c\r\n");
    assert_eq!(
        t.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\n"),
        "530 5.7.0 Authentication required\r\n530 5.7.0 Authentication required\r\n"
    );
}

#[test]
fn auth_plain_forms() {
    // Initial response.
    let (mut t, _) = T::new(true);
    assert_eq!(
        t.send(b"EHLO c\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"),
        EHLO_TLS
    );
    let c = t.take_auth();
    assert_eq!(
        (c.user.as_str(), c.password.expose().as_slice(), c.mechanism),
        ("alice", &b"secret"[..], Mechanism::Plain)
    );
    // Continuation, with authzid, split in odd places.
    let (mut t, _) = T::new(true);
    t.send(b"EHLO c\r\n");
    assert_eq!(t.send(b"AUTH PLA"), "");
    assert_eq!(t.send(b"IN\r\n"), "334 \r\n");
    assert_eq!(t.send(b"Ym9iAGFsaWNlAHB3"), "");
    assert_eq!(t.send(b"\r\n"), "");
    let c = t.take_auth();
    assert_eq!(
        (c.authzid.as_deref(), c.user.as_str()),
        (Some("bob"), "alice")
    );
    // `=` is an empty initial response: not valid PLAIN.
    let (mut t, _) = T::new(true);
    t.send(b"EHLO c\r\n");
    assert_eq!(
        t.send(b"AUTH PLAIN =\r\n"),
        "535 5.7.8 Authentication credentials invalid\r\n"
    );
    // `*` cancels.
    assert_eq!(t.send(b"AUTH PLAIN\r\n"), "334 \r\n");
    assert_eq!(t.send(b"*\r\n"), "501 5.7.0 Authentication aborted\r\n");
    assert_eq!(
        t.send(b"AUTH PLAIN !!!\r\n"),
        "501 5.5.2 Cannot decode response\r\n"
    );
    assert_eq!(
        t.send(b"AUTH CRAM-MD5\r\n"),
        "504 5.5.4 Unrecognized authentication type\r\n"
    );
    assert!(!t.has_auth());
}

#[test]
fn auth_login_forms() {
    let (mut t, _) = T::new(true);
    t.send(b"EHLO c\r\n");
    assert_eq!(t.send(b"AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
    assert_eq!(t.send(b"YWxpY2U=\r\n"), "334 UGFzc3dvcmQ6\r\n");
    assert_eq!(t.send(b"c2VjcmV0\r\n"), "");
    let c = t.take_auth();
    assert_eq!(
        (c.user.as_str(), c.password.expose().as_slice(), c.mechanism),
        ("alice", &b"secret"[..], Mechanism::Login)
    );
    // With the user as initial response.
    let (mut t, _) = T::new(true);
    t.send(b"EHLO c\r\n");
    assert_eq!(t.send(b"AUTH LOGIN YWxpY2U=\r\n"), "334 UGFzc3dvcmQ6\r\n");
    assert_eq!(t.send(b"*\r\n"), "501 5.7.0 Authentication aborted\r\n");
    assert_eq!(t.send(b"AUTH LOGIN YWxpY2U=\r\n"), "334 UGFzc3dvcmQ6\r\n");
    assert_eq!(
        t.send(b"=\r\n"),
        "535 5.7.8 Authentication credentials invalid\r\n"
    );
}

#[test]
fn auth_login_failures_at_each_step() {
    let (mut t, _) = T::new(true);
    t.send(b"EHLO c\r\n");
    // A user name with a line break is refused before any password is asked for.
    assert_eq!(t.send(b"AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
    assert_eq!(
        t.send(b"YWwKaWNl\r\n"),
        "535 5.7.8 Authentication credentials invalid\r\n"
    );
    assert_eq!(t.send(b"AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
    assert_eq!(t.send(b"YWxpY2U=\r\n"), "334 UGFzc3dvcmQ6\r\n");
    assert_eq!(t.send(b"!!\r\n"), "501 5.5.2 Cannot decode response\r\n");
    assert_eq!(t.send(b"NOOP\r\n"), "250 2.0.0 Ok\r\n");
    assert!(!t.has_auth());
    assert_eq!(t.closed(), None);
}

#[test]
fn verdicts() {
    let accepted = |reply: Reply| {
        let (mut t, _) = T::new(true);
        t.send(b"EHLO c\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO");
        t.take_auth();
        // Nothing after AUTH is answered before the verdict.
        assert_eq!(t.out(), "");
        t.front.handle_verdict(Verdict::Accepted(reply));
        let out = t.out();
        t.front.handle_input(b":<bob@example.test>\r\n");
        (out, t.front.into_handoff())
    };
    let (out, handoff) = accepted(Reply {
        preamble: vec![],
        text: b"235 2.7.0 Authentication successful (backend)".to_vec(),
    });
    assert_eq!(out, "235 2.7.0 Authentication successful (backend)\r\n");
    assert_eq!(
        handoff,
        b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
    );
    // A reply that is not a 235 line is replaced, never relayed.
    let (out, _) = accepted(Reply {
        preamble: vec![],
        text: b"250 ok\r\n250 injected".to_vec(),
    });
    assert_eq!(out, "235 2.7.0 Authentication successful\r\n");

    let (mut t, _) = T::new(true);
    t.send(b"EHLO c\r\n");
    let mut round = |v: Verdict| {
        t.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
        t.take_auth();
        t.front.handle_verdict(v);
        t.out()
    };
    assert_eq!(
        round(Verdict::Refused(Reply {
            preamble: b"535-5.7.8 first\r\n".to_vec(),
            text: b"535 5.7.8 Error: authentication failed: bad".to_vec(),
        })),
        "535-5.7.8 first\r\n535 5.7.8 Error: authentication failed: bad\r\n"
    );
    assert_eq!(
        round(Verdict::Failed(Failure::Unavailable)),
        "454 4.7.0 Temporary authentication failure\r\n"
    );
    assert_eq!(
        round(Verdict::Failed(Failure::AuthFailed)),
        "535 5.7.8 Authentication credentials invalid\r\n"
    );
    assert_eq!(
        round(Verdict::Failed(Failure::AuthFailed)),
        "535 5.7.8 Authentication credentials invalid\r\n\
         421 4.7.0 mx.test Error: too many authentication failures\r\n"
    );
    assert_eq!(t.closed(), Some(CloseReason::TooManyAuthFailures));
}

#[test]
fn pipelined_commands_answered_in_order() {
    let (mut t, _) = T::new(true);
    let out = t.send(b"EHLO c\r\nNOOP\r\nRSET\r\nVRFY x\r\nHELP\r\nETRN x\r\nQUIT\r\nNOOP\r\n");
    assert_eq!(
        out,
        format!(
            "{EHLO_TLS}250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n252 2.0.0 Cannot VRFY user\r\n\
             214 2.0.0 Commands: EHLO HELO STARTTLS AUTH NOOP RSET QUIT\r\n\
             502 5.5.1 Error: command not implemented\r\n221 2.0.0 Bye\r\n"
        )
    );
    assert_eq!(t.closed(), Some(CloseReason::Logout));
}

#[test]
fn bad_commands_counted_then_closed() {
    let (mut t, _) = T::new(true);
    for _ in 0..10 {
        assert_eq!(
            t.send(b"XYZZY\r\n"),
            "500 5.5.2 Error: command not recognized\r\n"
        );
    }
    assert_eq!(
        t.send(b"XCLIENT ADDR=1.2.3.4\r\n"),
        "500 5.5.2 Error: command not recognized\r\n421 4.7.0 mx.test Error: too many errors\r\n"
    );
    assert_eq!(t.closed(), Some(CloseReason::TooManyErrors));
    assert!(
        t.events
            .iter()
            .all(|e| !matches!(e, Event::Rejected(r) if r.contains("XYZZY")))
    );
}

#[test]
fn line_limits() {
    // A long AUTH line (an OAuth token) is fine up to the AUTH limit...
    let (mut t, _) = T::new(true);
    t.send(b"EHLO c\r\n");
    let mut line = b"AUTH PLAIN ".to_vec();
    line.extend(std::iter::repeat_n(b'A', 12_000));
    line.extend_from_slice(b"\r\n");
    let out = t.send(&line);
    assert!(out.starts_with("535 "), "{out}");
    // ...but a command line over 4 KiB closes the session.
    let (mut t, _) = T::new(true);
    let out = t.send(&[b'N'; 5000]);
    assert_eq!(out, "500 5.5.0 Error: line too long\r\n");
    assert_eq!(t.closed(), Some(CloseReason::InputTooLong));
    let (mut t, _) = T::new(true);
    t.send(b"EHLO c\r\nAUTH PLAIN\r\n");
    assert_eq!(
        t.send(&[b'A'; 17_000]),
        "500 5.5.0 Error: line too long\r\n"
    );
}

#[test]
fn input_pipelined_behind_auth_is_bounded() {
    let (mut t, _) = T::new(true);
    t.send(b"EHLO c\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
    t.take_auth();
    assert_eq!(t.send(&[b'x'; 60_000]), "");
    assert_eq!(
        t.send(&[b'x'; 10_000]),
        "421 4.7.0 mx.test Error: too much pipelined input\r\n"
    );
    assert_eq!(t.closed(), Some(CloseReason::InputTooLong));
}

#[test]
fn bdat_before_auth_skips_its_data() {
    let (mut t, _) = T::new(true);
    t.send(b"EHLO c\r\n");
    let out = t.send(b"BDAT 17 LAST\r\nAUTH PLAIN AAAA\r\nNOOP\r\n");
    assert_eq!(out, "530 5.7.0 Authentication required\r\n250 2.0.0 Ok\r\n");
    assert!(!t.has_auth());
}

#[test]
fn shutdown_and_login_construction() {
    let (mut t, _) = T::new(true);
    t.send(b"EHLO client.example\r\n");
    t.front.set_client_name("host.client.example");
    t.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
    let creds = t.take_auth();
    let client = ClientInfo {
        client: "192.0.2.9:5555".parse().unwrap(),
        local: "192.0.2.1:587".parse().unwrap(),
        tls: true,
        session_id: "s".into(),
    };
    let opts = LoginOptions {
        method: postern_smtp::LoginMethod::Xclient,
        ..LoginOptions::default()
    };
    let mut login = t.front.start_login(creds, &opts, &client);
    login.handle_input(b"220 backend ESMTP\r\n250-backend\r\n250 XCLIENT NAME ADDR HELO\r\n");
    let mut out = vec![];
    login.poll_transmit(&mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "EHLO mx.test\r\nXCLIENT HELO=client.example NAME=host.client.example ADDR=192.0.2.9\r\n"
    );
    t.front.shutdown(Shutdown::IdleTimeout);
    assert_eq!(t.out(), "421 4.4.2 mx.test Error: timeout exceeded\r\n");
    assert_eq!(t.closed(), Some(CloseReason::Internal));
}

#[test]
fn oauth_mechanisms_when_enabled() {
    let oauth = || Options {
        oauth: true,
        ..opts()
    };
    let (mut t, _) = T::with(oauth(), true);
    let ehlo = t.send(b"EHLO c\r\n");
    assert!(
        ehlo.contains("250 AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER\r\n"),
        "{ehlo}"
    );
    let msg = b"n,a=alice@x,\x01auth=Bearer tok\x01\x01";
    let b64 = postern_proto::sasl::encode(msg);
    assert_eq!(t.send(format!("AUTH OAUTHBEARER {b64}\r\n").as_bytes()), "");
    let c = t.take_auth();
    assert_eq!(
        (c.user.as_str(), c.mechanism),
        ("alice@x", Mechanism::OAuthBearer)
    );
    assert_eq!(c.password.expose(), msg);
    // Without an initial response; a message without a user is a failed login.
    let (mut t, _) = T::with(oauth(), true);
    t.send(b"EHLO c\r\n");
    assert_eq!(t.send(b"AUTH XOAUTH2\r\n"), "334 \r\n");
    let bad = postern_proto::sasl::encode(b"auth=Bearer t\x01\x01");
    assert_eq!(
        t.send(format!("{bad}\r\n").as_bytes()),
        "535 5.7.8 Authentication credentials invalid\r\n"
    );
    assert!(!t.has_auth());
    // Off by default: neither offered nor accepted.
    let (mut t, _) = T::new(true);
    assert!(!t.send(b"EHLO c\r\n").contains("XOAUTH2"));
    assert_eq!(
        t.send(format!("AUTH XOAUTH2 {b64}\r\n").as_bytes()),
        "504 5.5.4 Unrecognized authentication type\r\n"
    );
}

#[test]
fn commands_before_auth_are_bounded() {
    let (mut t, _) = T::with(
        Options {
            max_commands: 3,
            ..opts()
        },
        true,
    );
    let out = t.send(b"NOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n");
    assert_eq!(
        out,
        "250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n\
         421 4.7.0 mx.test Error: too many commands before authentication\r\n"
    );
    assert_eq!(t.closed(), Some(CloseReason::TooManyErrors));
}

#[test]
fn abuse_control_refusals() {
    use postern_proto::Limit;
    let (mut t, _) = T::new(true);
    t.front.refuse(Limit::IpConnections, None);
    assert_eq!(
        t.out(),
        "421 4.7.0 mx.test Error: Too many connections from your address, try again later (limit: ip_connections)\r\n"
    );
    assert_eq!(t.closed(), Some(CloseReason::Limited));

    let limited = |limit| {
        let (mut t, _) = T::new(true);
        t.send(b"EHLO c\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
        t.take_auth();
        t.front
            .handle_verdict(Verdict::Failed(Failure::Limited(limit)));
        (t.out(), t.closed())
    };
    assert_eq!(
        limited(Limit::AuthFailures),
        (
            "421 4.7.0 mx.test Error: Too many failed logins, try again later (limit: auth_failures)\r\n"
                .to_string(),
            Some(CloseReason::Limited)
        )
    );
    assert_eq!(
        limited(Limit::UserSessions),
        (
            "454 4.7.0 Too many sessions for this user, try again later\r\n".to_string(),
            None
        )
    );
}

#[test]
fn driver_shutdown_says_goodbye_once() {
    use postern_proto::{FrontEnd, Shutdown};
    let (mut t, _) = T::new(false);
    FrontEnd::shutdown(&mut t.front, Shutdown::IdleTimeout);
    assert_eq!(t.out(), "421 4.4.2 mx.test Error: timeout exceeded\r\n");
    assert_eq!(t.closed(), Some(CloseReason::Internal));
    FrontEnd::shutdown(&mut t.front, Shutdown::ServerShutdown);
    assert_eq!(t.out(), "");

    let (mut t, _) = T::new(false);
    FrontEnd::shutdown(&mut t.front, Shutdown::ServerShutdown);
    assert_eq!(t.out(), "421 4.3.2 mx.test Service shutting down\r\n");
}
