//! Transcript tests for the client-facing IMAP machine: bytes in, bytes and events out.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use postern_imap::{Front, Options};
use postern_proto::{
    CloseReason, Credentials, Event, Failure, FrontEnd, Mechanism, Reply, Verdict,
};

fn opts() -> Options {
    Options {
        greeting: "Test ready.".into(),
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

    fn closed(&self) -> Option<CloseReason> {
        self.events.iter().find_map(|e| match e {
            Event::Close(r) => Some(*r),
            _ => None,
        })
    }
}

fn accepted() -> Verdict {
    Verdict::Accepted(Reply {
        preamble: b"* OK [ALERT] hello\r\n".to_vec(),
        text: b"[CAPABILITY IMAP4rev1 IDLE] Logged in".to_vec(),
    })
}

#[test]
fn greeting_before_and_after_tls() {
    let (_, g) = T::new(false);
    assert_eq!(
        g,
        "* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID STARTTLS LOGINDISABLED] Test ready.\r\n"
    );
    let (_, g) = T::new(true);
    assert_eq!(
        g,
        "* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN] Test ready.\r\n"
    );
    let (_, g) = T::with(
        Options {
            insecure_plaintext_auth: true,
            starttls: false,
            ..opts()
        },
        false,
    );
    assert!(g.contains("ID AUTH=PLAIN AUTH=LOGIN]"), "{g}");
}

#[test]
fn pipelined_commands_answered_in_order() {
    let (mut t, _) = T::new(true);
    let out = t.send(b"a1 CAPABILITY\r\na2 NOOP\r\na3 ID (\"name\" \"mutt\")\r\na4 LOGOUT\r\n");
    assert_eq!(
        out,
        "* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN\r\n\
         a1 OK Capability completed.\r\n\
         a2 OK NOOP completed.\r\n\
         * ID NIL\r\na3 OK ID completed.\r\n\
         * BYE Logging out.\r\na4 OK Logout completed.\r\n"
    );
    assert_eq!(t.closed(), Some(CloseReason::Logout));
    assert_eq!(t.front.client_id().unwrap().fields()[0].0, "name");
}

#[test]
fn plaintext_login_refused_before_tls() {
    let (mut t, _) = T::new(false);
    let out = t.send(b"a LOGIN alice secret\r\nb AUTHENTICATE PLAIN AGEAYg==\r\n");
    assert!(out.starts_with("a NO [PRIVACYREQUIRED] "), "{out}");
    assert!(out.contains("\r\nb NO [PRIVACYREQUIRED] "), "{out}");
    assert!(!t.events.iter().any(|e| matches!(e, Event::Authenticate(_))));
    // Secrets never appear in what we send back.
    assert!(!out.contains("secret"));
}

#[test]
fn starttls_discards_pipelined_plaintext() {
    let (mut t, _) = T::new(false);
    let out = t.send(b"a STARTTLS\r\nb LOGIN alice secret\r\n");
    assert_eq!(out, "a OK Begin TLS negotiation now.\r\n");
    assert!(matches!(t.events[0], Event::Rejected(_)));
    assert!(matches!(t.events[1], Event::StartTls));
    t.front.handle_tls_ready();
    assert_eq!(t.out(), "");
    let out = t.send(b"c CAPABILITY\r\n");
    assert!(
        out.contains("AUTH=PLAIN") && !out.contains("STARTTLS"),
        "{out}"
    );
    assert!(!t.events.iter().any(|e| matches!(e, Event::Authenticate(_))));
    let out = t.send(b"d STARTTLS\r\n");
    assert_eq!(out, "d BAD TLS is already active.\r\n");
}

#[test]
fn login_argument_forms() {
    let cases: &[(&[u8], &str, &[u8])] = &[
        (b"a LOGIN alice secret\r\n", "alice", b"secret"),
        (
            b"a login \"al\\\"ice\" \"s\\\\e c\"\r\n",
            "al\"ice",
            b"s\\e c",
        ),
        (
            b"a LOGIN {5+}\r\nalice {6+}\r\nsec\r\nt\r\n",
            "alice",
            b"sec\r\nt",
        ),
    ];
    for (input, user, pass) in cases {
        let (mut t, _) = T::new(true);
        assert_eq!(t.send(input), "");
        let c = t.take_auth();
        assert_eq!(
            (c.user.as_str(), c.password.expose().as_slice()),
            (*user, *pass)
        );
        assert_eq!(c.mechanism, Mechanism::Cleartext);
    }
}

#[test]
fn synchronizing_literals_get_continuations() {
    let (mut t, _) = T::new(true);
    assert_eq!(t.send(b"a LOGIN {5}\r\n"), "+ OK\r\n");
    assert_eq!(t.send(b"alice {6}\r\n"), "+ OK\r\n");
    assert_eq!(t.send(b"secret\r\n"), "");
    assert_eq!(t.take_auth().user, "alice");
}

#[test]
fn oversized_literals() {
    let (mut t, _) = T::new(true);
    // A synchronizing literal over the limit is refused without a continuation, and the
    // session goes on.
    let out = t.send(b"a LOGIN {999999}\r\n");
    assert_eq!(out, "a BAD [TOOBIG] Literal too large.\r\n");
    assert_eq!(t.send(b"b NOOP\r\n"), "b OK NOOP completed.\r\n");
    // A non-synchronizing one is already on the wire: close.
    let out = t.send(b"c LOGIN {999999+}\r\n");
    assert!(
        out.ends_with("* BYE Literal too large, closing connection.\r\n"),
        "{out}"
    );
    assert_eq!(t.closed(), Some(CloseReason::InputTooLong));
    // 2^63 and beyond do not overflow.
    let (mut t, _) = T::new(true);
    let out = t.send(b"a LOGIN {9223372036854775808}\r\n");
    assert!(out.starts_with("a BAD [TOOBIG]"), "{out}");
    let out = t.send(b"a LOGIN {184467440737095516160000+}\r\n");
    assert!(out.contains("* BYE"), "{out}");
}

#[test]
fn overlong_line_closes() {
    let (mut t, _) = T::new(true);
    let mut line = b"a1 LOGIN ".to_vec();
    line.extend(std::iter::repeat_n(b'x', 20_000));
    let out = t.send(&line);
    assert_eq!(
        out,
        "a1 BAD Command line too long.\r\n* BYE Input too long, closing connection.\r\n"
    );
    assert_eq!(t.closed(), Some(CloseReason::InputTooLong));
    assert_eq!(t.send(b"\r\nb NOOP\r\n"), "");
}

/// RFC 2971's largest ID: 30 fields of 30 octets, each with a 1024-octet value.
fn largest_id(tag: &str) -> Vec<u8> {
    let mut line = format!("{tag} ID (").into_bytes();
    for i in 0..30 {
        if i > 0 {
            line.push(b' ');
        }
        let field = format!("field{i:02}{}", "f".repeat(23));
        assert_eq!(field.len(), 30);
        line.extend_from_slice(format!("\"{field}\" \"{}\"", "v".repeat(1024)).as_bytes());
    }
    line.extend_from_slice(b")\r\n");
    line
}

#[test]
fn id_at_its_rfc_size_is_answered_with_the_default_limits() {
    let (mut t, _) = T::new(true);
    let line = largest_id("a1");
    assert!(line.len() > Options::default().max_line, "{}", line.len());
    // In reads of a few KiB, as from a socket.
    let mut out = String::new();
    for chunk in line.chunks(4096) {
        out.push_str(&t.send(chunk));
    }
    assert_eq!(out, "* ID NIL\r\na1 OK ID completed.\r\n");
    assert_eq!(t.front.client_id().unwrap().fields().len(), 30);
    assert_eq!(t.closed(), None);
    // Only ID gets the larger bound: the same length as another command is refused.
    let mut other = b"a2 NOOP ".to_vec();
    other.extend(std::iter::repeat_n(b'x', line.len()));
    let out = t.send(&other);
    assert!(out.starts_with("a2 BAD Command line too long."), "{out}");
    assert_eq!(t.closed(), Some(CloseReason::InputTooLong));
}

#[test]
fn id_past_its_rfc_bound_is_refused() {
    let (mut t, _) = T::new(true);
    let mut line = b"a1 ID (\"name\" \"".to_vec();
    line.extend(std::iter::repeat_n(b'v', postern_imap::front::MAX_ID_LINE));
    let out = t.send(&line);
    assert!(out.starts_with("a1 BAD Command line too long."), "{out}");
    assert_eq!(t.closed(), Some(CloseReason::InputTooLong));
}

#[test]
fn bad_commands_counted_then_closed() {
    let (mut t, _) = T::with(
        Options {
            max_bad_commands: 2,
            ..opts()
        },
        true,
    );
    let out = t.send(b"a SELECT INBOX\r\nb FOO\r\n\x00\xff\r\n");
    assert_eq!(
        out,
        "a BAD Command not permitted before authentication.\r\n\
         b BAD Error in IMAP command: unknown command or bad syntax.\r\n\
         * BAD Error in IMAP command: unknown command or bad syntax.\r\n\
         * BYE Too many invalid commands.\r\n"
    );
    assert_eq!(t.closed(), Some(CloseReason::TooManyErrors));
}

#[test]
fn authenticate_plain_forms() {
    // SASL-IR
    let (mut t, _) = T::new(true);
    assert_eq!(t.send(b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n"), "");
    let c = t.take_auth();
    assert_eq!((c.user.as_str(), c.mechanism), ("alice", Mechanism::Plain));
    // continuation, with an authzid
    let (mut t, _) = T::new(true);
    assert_eq!(t.send(b"a AUTHENTICATE PLAIN\r\n"), "+ \r\n");
    assert_eq!(t.send(b"Ym9iAGFkbWluAHB3\r\n"), "");
    let c = t.take_auth();
    assert_eq!(
        (c.authzid.as_deref(), c.user.as_str()),
        (Some("bob"), "admin")
    );
    // cancel
    let (mut t, _) = T::new(true);
    t.send(b"a AUTHENTICATE PLAIN\r\n");
    assert_eq!(t.send(b"*\r\n"), "a BAD Authentication cancelled.\r\n");
    // bad base64, then an empty response
    assert_eq!(t.send(b"b AUTHENTICATE PLAIN\r\n"), "+ \r\n");
    assert_eq!(
        t.send(b"%%%\r\n"),
        "b BAD Invalid base64 data in SASL response.\r\n"
    );
    let out = t.send(b"c AUTHENTICATE PLAIN =\r\n");
    assert_eq!(
        out,
        "c NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    );
    // unknown mechanism
    let out = t.send(b"d AUTHENTICATE CRAM-MD5\r\n");
    assert_eq!(out, "d NO Unsupported authentication mechanism.\r\n");
}

#[test]
fn authenticate_login_mechanism() {
    let (mut t, _) = T::new(true);
    assert_eq!(t.send(b"a AUTHENTICATE LOGIN\r\n"), "+ VXNlcm5hbWU6\r\n");
    assert_eq!(t.send(b"YWxpY2U=\r\n"), "+ UGFzc3dvcmQ6\r\n");
    assert_eq!(t.send(b"c2VjcmV0\r\n"), "");
    let c = t.take_auth();
    assert_eq!((c.user.as_str(), c.mechanism), ("alice", Mechanism::Login));
    assert_eq!(c.password.expose(), b"secret");
    // with the user name as initial response
    let (mut t, _) = T::new(true);
    assert_eq!(
        t.send(b"a AUTHENTICATE LOGIN YWxpY2U=\r\n"),
        "+ UGFzc3dvcmQ6\r\n"
    );
    assert_eq!(t.send(b"c2VjcmV0\r\n"), "");
    assert_eq!(t.take_auth().user, "alice");
}

#[test]
fn authenticate_login_failures_at_each_step() {
    let (mut t, _) = T::new(true);
    // A user name with a line break is refused before any password is asked for.
    assert_eq!(t.send(b"a AUTHENTICATE LOGIN\r\n"), "+ VXNlcm5hbWU6\r\n");
    assert_eq!(
        t.send(b"YWwKaWNl\r\n"),
        "a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    );
    // Cancelled or undecodable at the password prompt.
    assert_eq!(
        t.send(b"b AUTHENTICATE LOGIN YWxpY2U=\r\n"),
        "+ UGFzc3dvcmQ6\r\n"
    );
    assert_eq!(t.send(b"*\r\n"), "b BAD Authentication cancelled.\r\n");
    assert_eq!(t.send(b"c AUTHENTICATE LOGIN\r\n"), "+ VXNlcm5hbWU6\r\n");
    assert_eq!(t.send(b"YWxpY2U=\r\n"), "+ UGFzc3dvcmQ6\r\n");
    assert_eq!(
        t.send(b"!!\r\n"),
        "c BAD Invalid base64 data in SASL response.\r\n"
    );
    assert_eq!(t.send(b"d NOOP\r\n"), "d OK NOOP completed.\r\n");
    assert!(!t.events.iter().any(|e| matches!(e, Event::Authenticate(_))));
    assert_eq!(t.closed(), None);
}

#[test]
fn accepted_login_hands_off_pipelined_bytes() {
    let (mut t, _) = T::new(true);
    assert_eq!(t.send(b"a1 LOGIN alice pw\r\na2 SELECT INBOX\r\na3 NO"), "");
    t.take_auth();
    // nothing is processed while the verdict is pending
    assert_eq!(t.send(b"OP\r\n"), "");
    t.front.handle_verdict(accepted());
    assert_eq!(
        t.out(),
        "* OK [ALERT] hello\r\na1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
    );
    assert_eq!(t.front.into_handoff(), b"a2 SELECT INBOX\r\na3 NOOP\r\n");
}

#[test]
fn refusals_and_failures() {
    let (mut t, _) = T::new(true);
    t.send(b"a LOGIN alice wrong\r\nb NOOP\r\n");
    t.take_auth();
    t.front.handle_verdict(Verdict::Refused(Reply {
        preamble: vec![],
        text: b"[AUTHENTICATIONFAILED] Authentication failed.".to_vec(),
    }));
    assert_eq!(
        t.out(),
        "a NO [AUTHENTICATIONFAILED] Authentication failed.\r\nb OK NOOP completed.\r\n"
    );
    t.send(b"c LOGIN alice x\r\n");
    t.take_auth();
    t.front
        .handle_verdict(Verdict::Failed(Failure::Unavailable));
    assert_eq!(
        t.out(),
        "c NO [UNAVAILABLE] Service temporarily unavailable, try again later.\r\n"
    );
    t.send(b"d LOGIN alice x\r\n");
    t.take_auth();
    t.front.handle_verdict(Verdict::Failed(Failure::AuthFailed));
    let mut out = t.send(b"e LOGIN alice x\r\n");
    t.take_auth();
    t.front.handle_verdict(Verdict::Failed(Failure::AuthFailed));
    out += &t.out();
    assert_eq!(
        out,
        "d NO [AUTHENTICATIONFAILED] Authentication failed.\r\n\
         e NO [AUTHENTICATIONFAILED] Authentication failed.\r\n\
         * BYE Too many authentication failures.\r\n"
    );
    assert_eq!(t.closed(), Some(CloseReason::TooManyAuthFailures));
}

#[test]
fn byte_at_a_time_equals_one_read() {
    let script: &[u8] = b"a1 CAPABILITY\r\na2 ID NIL\r\na3 LOGIN {5}\r\nalice \"pw\"\r\n";
    let (mut whole, _) = T::new(true);
    let all = whole.send(script);
    let (mut split, _) = T::new(true);
    let mut pieces = String::new();
    for b in script {
        pieces += &split.send(std::slice::from_ref(b));
    }
    assert_eq!(all, pieces);
    assert_eq!(whole.take_auth(), split.take_auth());
}

#[test]
fn oauth_mechanisms_when_enabled() {
    let (mut t, g) = T::with(
        Options {
            oauth: true,
            ..opts()
        },
        true,
    );
    assert!(g.contains("AUTH=XOAUTH2 AUTH=OAUTHBEARER"), "{g}");
    let msg = b"user=alice@x\x01auth=Bearer tok\x01\x01";
    let b64 = postern_proto::sasl::encode(msg);
    assert_eq!(
        t.send(format!("a AUTHENTICATE XOAUTH2 {b64}\r\n").as_bytes()),
        ""
    );
    let c = t.take_auth();
    assert_eq!(
        (c.user.as_str(), c.mechanism),
        ("alice@x", Mechanism::XOAuth2)
    );
    assert_eq!(c.password.expose(), msg);
    // Without an initial response, and a message with no user: refused.
    let (mut t, _) = T::with(
        Options {
            oauth: true,
            ..opts()
        },
        true,
    );
    assert_eq!(t.send(b"b AUTHENTICATE OAUTHBEARER\r\n"), "+ \r\n");
    let bad = postern_proto::sasl::encode(b"n,,\x01auth=Bearer t\x01\x01");
    let out = t.send(format!("{bad}\r\n").as_bytes());
    assert!(out.starts_with("b NO [AUTHENTICATIONFAILED]"), "{out}");
    // Off by default: not offered, not accepted.
    let (mut t, g) = T::new(true);
    assert!(!g.contains("XOAUTH2"));
    let out = t.send(format!("c AUTHENTICATE XOAUTH2 {b64}\r\n").as_bytes());
    assert!(out.starts_with("c NO Unsupported"), "{out}");
}

#[test]
fn commands_before_login_are_bounded() {
    let (mut t, _) = T::with(
        Options {
            max_commands: 3,
            ..opts()
        },
        true,
    );
    let out = t.send(b"a NOOP\r\nb NOOP\r\nc NOOP\r\nd NOOP\r\ne NOOP\r\n");
    assert!(
        out.ends_with("c OK NOOP completed.\r\n* BYE Too many commands before login.\r\n"),
        "{out}"
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
        "* BYE [LIMIT] Too many connections from your address, try again later (limit: ip_connections).\r\n"
    );
    assert_eq!(t.closed(), Some(CloseReason::Limited));

    let (mut t, _) = T::new(true);
    t.send(b"a LOGIN alice pw\r\n");
    t.take_auth();
    t.front
        .handle_verdict(Verdict::Failed(Failure::Limited(Limit::UserSessions)));
    assert_eq!(t.out(), "a NO [LIMIT] Too many sessions for this user.\r\n");
    t.send(b"b LOGIN alice pw\r\n");
    t.take_auth();
    t.front
        .handle_verdict(Verdict::Failed(Failure::Limited(Limit::AuthFailures)));
    assert_eq!(
        t.out(),
        "b NO [LIMIT] Too many failed logins, try again later.\r\n"
    );
    assert_eq!(t.closed(), None);
}

#[test]
fn driver_shutdown_says_goodbye_once() {
    use postern_proto::Shutdown;
    let (mut t, _) = T::new(false);
    t.send(b"a NOOP\r\n");
    t.front.shutdown(Shutdown::IdleTimeout);
    assert_eq!(t.out(), "* BYE Disconnected for inactivity.\r\n");
    assert_eq!(t.closed(), Some(CloseReason::Internal));
    t.front.shutdown(Shutdown::ServerShutdown);
    assert_eq!(t.out(), "");

    let (mut t, _) = T::new(false);
    t.front.shutdown(Shutdown::ServerShutdown);
    assert_eq!(t.out(), "* BYE Server shutting down.\r\n");
}
