//! Transcript tests for the client-facing POP3 machine: bytes in, bytes and events out.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use postern_pop3::{Front, Options, apop_timestamp, is_apop_timestamp};
use postern_proto::{
    CloseReason, Credentials, Event, Failure, FrontEnd, Mechanism, Reply, Verdict,
};

const TS: &str = "<1896.697170952@dbc.mtview.ca.us>";

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
        Self::with(opts(), tls, None)
    }

    fn with(o: Options, tls: bool, ts: Option<&str>) -> (Self, String) {
        let mut t = T {
            front: Front::new(Arc::new(o), tls, ts.map(str::to_owned)),
            events: vec![],
        };
        let greeting = t.out();
        (t, greeting)
    }

    fn apop() -> Self {
        let o = Options {
            apop: true,
            ..opts()
        };
        Self::with(o, false, Some(TS)).0
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

    fn auths(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Event::Authenticate(_)))
            .count()
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

    fn verdict(&mut self, v: Verdict) -> String {
        self.front.handle_verdict(v);
        self.out()
    }

    fn closed(&self) -> Option<CloseReason> {
        self.events.iter().find_map(|e| match e {
            Event::Close(r) => Some(*r),
            _ => None,
        })
    }

    fn rejected(&self) -> Vec<&'static str> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Rejected(r) => Some(*r),
                _ => None,
            })
            .collect()
    }
}

fn accepted(text: &[u8]) -> Verdict {
    Verdict::Accepted(Reply {
        preamble: vec![],
        text: text.to_vec(),
    })
}

fn refused(text: &[u8]) -> Verdict {
    Verdict::Refused(Reply {
        preamble: vec![],
        text: text.to_vec(),
    })
}

fn b64(data: &[u8]) -> String {
    postern_proto::sasl::encode(data)
}

const CAPA_PLAIN: &str = "+OK Capability list follows\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n\
                          PIPELINING\r\nSTLS\r\n.\r\n";
const CAPA_TLS: &str = "+OK Capability list follows\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n\
                        PIPELINING\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n";

#[test]
fn greetings() {
    assert_eq!(T::new(false).1, "+OK Test ready.\r\n");
    assert_eq!(T::new(true).1, "+OK Test ready.\r\n");
    // APOP: the timestamp follows the text, only when enabled and valid.
    let apop = Options {
        apop: true,
        ..opts()
    };
    let (t, g) = T::with(apop.clone(), false, Some(TS));
    assert_eq!(g, format!("+OK Test ready. {TS}\r\n"));
    assert_eq!(t.front.apop_challenge(), Some(TS));
    let (t, g) = T::with(apop.clone(), false, Some("1896.697170952@dbc"));
    assert_eq!(g, "+OK Test ready.\r\n");
    assert_eq!(t.front.apop_challenge(), None);
    let (_, g) = T::with(apop, false, None);
    assert_eq!(g, "+OK Test ready.\r\n");
    let (t, g) = T::with(opts(), false, Some(TS));
    assert_eq!(g, "+OK Test ready.\r\n");
    assert_eq!(t.front.apop_challenge(), None);
    // A greeting that skipped validation cannot inject a line or a fake timestamp.
    let bad = Options {
        greeting: "hi\r\n+OK <x@y>".into(),
        apop: true,
        ..opts()
    };
    assert!(bad.validate().is_err());
    let (_, g) = T::with(bad, false, Some(TS));
    assert_eq!(g, format!("+OK hi  +OK  x@y  {TS}\r\n"));
}

#[test]
fn capa_before_and_after_tls() {
    let (mut t, _) = T::new(false);
    assert_eq!(t.send(b"CAPA\r\n"), CAPA_PLAIN);
    let (mut t, _) = T::new(true);
    assert_eq!(t.send(b"capa\r\n"), CAPA_TLS);
    // The listener's opt-out: plaintext auth offered, and STLS still.
    let (mut t, _) = T::with(
        Options {
            insecure_plaintext_auth: true,
            ..opts()
        },
        false,
        None,
    );
    assert_eq!(
        t.send(b"CAPA\r\n"),
        "+OK Capability list follows\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n\
         STLS\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"
    );
    // No certificate: no STLS, no way to authenticate in plaintext.
    let (mut t, _) = T::with(
        Options {
            starttls: false,
            ..opts()
        },
        false,
        None,
    );
    assert_eq!(
        t.send(b"CAPA\r\n"),
        "+OK Capability list follows\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n.\r\n"
    );
    assert_eq!(t.send(b"STLS\r\n"), "-ERR STLS is not available.\r\n");
}

#[test]
fn auth_lists_usable_mechanisms() {
    let (mut t, _) = T::new(false);
    assert_eq!(t.send(b"AUTH\r\n"), "+OK Methods supported:\r\n.\r\n");
    let (mut t, _) = T::new(true);
    assert_eq!(
        t.send(b"auth\r\n"),
        "+OK Methods supported:\r\nPLAIN\r\nLOGIN\r\n.\r\n"
    );
}

#[test]
fn plaintext_auth_refused_before_tls() {
    let (mut t, _) = T::new(false);
    let out = t.send(
        b"USER alice\r\nPASS secret\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nAUTH LOGIN\r\nNOOP\r\n",
    );
    let refusal = "-ERR [AUTH] Plaintext authentication disallowed on non-secure connections; \
                   use STLS first.\r\n";
    assert_eq!(out, format!("{}+OK\r\n", refusal.repeat(4)));
    assert_eq!(t.auths(), 0);
    assert_eq!(t.rejected(), ["plaintext authentication before TLS"; 4]);
    assert_eq!(t.closed(), None);
    assert!(!out.contains("secret"));
}

#[test]
fn stls_discards_pipelined_plaintext() {
    let (mut t, _) = T::new(false);
    let out = t.send(b"STLS\r\nUSER alice\r\nPASS secret\r\n");
    assert_eq!(out, "+OK Begin TLS negotiation\r\n");
    assert!(matches!(
        t.events[..],
        [
            Event::Rejected("discarded plaintext pipelined after STLS"),
            Event::StartTls
        ]
    ));
    // Bytes a careless driver feeds before the handshake are dropped as well.
    assert_eq!(t.send(b"PASS secret\r\n"), "");
    t.front.handle_tls_ready();
    // No greeting after STLS, and nothing of the injected commands ran.
    assert_eq!(t.out(), "");
    assert_eq!(t.auths(), 0);
    assert_eq!(
        t.send(b"PASS secret\r\n"),
        "-ERR No user name given, send USER first.\r\n"
    );
    assert_eq!(t.send(b"CAPA\r\n"), CAPA_TLS);
    assert_eq!(t.send(b"STLS\r\n"), "-ERR TLS is already active.\r\n");
}

#[test]
fn stls_forgets_the_user_name() {
    let (mut t, _) = T::with(
        Options {
            insecure_plaintext_auth: true,
            ..opts()
        },
        false,
        None,
    );
    assert_eq!(
        t.send(b"USER alice\r\nSTLS\r\n"),
        "+OK\r\n+OK Begin TLS negotiation\r\n"
    );
    t.front.handle_tls_ready();
    assert_eq!(
        t.send(b"PASS pw\r\n"),
        "-ERR No user name given, send USER first.\r\n"
    );
}

#[test]
fn pipelined_commands_answered_in_order() {
    let (mut t, _) = T::new(true);
    let out = t.send(b"CAPA\r\nNOOP\r\nAUTH\r\nUSER alice\r\nPASS pw\r\nSTAT\r\nLIST\r\n");
    assert_eq!(
        out,
        format!("{CAPA_TLS}+OK\r\n+OK Methods supported:\r\nPLAIN\r\nLOGIN\r\n.\r\n+OK\r\n")
    );
    let c = t.take_auth();
    assert_eq!(
        (c.user.as_str(), c.mechanism),
        ("alice", Mechanism::Cleartext)
    );
    // Nothing more runs while the verdict is pending; later bytes are kept too.
    assert_eq!(t.send(b"RETR 1\r\n"), "");
    assert_eq!(t.verdict(accepted(b"Logged in.")), "+OK Logged in.\r\n");
    assert_eq!(t.front.into_handoff(), b"STAT\r\nLIST\r\nRETR 1\r\n");
}

#[test]
fn user_and_pass() {
    let (mut t, _) = T::new(true);
    assert_eq!(t.send(b"user Alice@Example.Test\r\n"), "+OK\r\n");
    // The whole rest of the line is the password: spaces, leading ones too.
    assert_eq!(t.send(b"pAsS  pass word \r\n"), "");
    let c = t.take_auth();
    assert_eq!(c.user, "Alice@Example.Test");
    assert_eq!(c.password.expose(), b" pass word ");
    assert_eq!((c.authzid, c.challenge), (None, None));
    // A bare LF ends a line too.
    let (mut t, _) = T::new(true);
    assert_eq!(t.send(b"USER bob\nPASS x\n"), "+OK\r\n");
    assert_eq!(t.take_auth().user, "bob");
}

#[test]
fn user_and_pass_errors() {
    let (mut t, _) = T::new(true);
    let out =
        t.send(b"PASS pw\r\nUSER\r\nUSER \r\nUSER al\x01ice\r\nUSER alice\r\nPASS\r\nPASS \r\n");
    assert_eq!(
        out,
        "-ERR No user name given, send USER first.\r\n\
         -ERR Missing user name.\r\n\
         -ERR Missing user name.\r\n\
         -ERR Invalid user name.\r\n\
         +OK\r\n\
         -ERR Missing password.\r\n\
         -ERR Missing password.\r\n"
    );
    assert_eq!(t.auths(), 0);
    // The user name survives a malformed PASS.
    assert_eq!(t.send(b"PASS pw\r\n"), "");
    assert_eq!(t.take_auth().user, "alice");
}

#[test]
fn two_kib_password() {
    let password = vec![b'p'; 2048];
    let (mut t, _) = T::new(true);
    let mut input = b"USER alice\r\nPASS ".to_vec();
    input.extend_from_slice(&password);
    input.extend_from_slice(b"\r\n");
    assert_eq!(t.send(&input), "+OK\r\n");
    assert_eq!(t.take_auth().password.expose(), &password);
}

#[test]
fn six_kib_sasl_response() {
    let password = vec![b'q'; 4700];
    let mut message = b"\0alice\0".to_vec();
    message.extend_from_slice(&password);
    let response = b64(&message);
    assert!(response.len() > 6 * 1024, "{}", response.len());
    // as an initial response
    let (mut t, _) = T::new(true);
    assert_eq!(t.send(format!("AUTH PLAIN {response}\r\n").as_bytes()), "");
    assert_eq!(t.take_auth().password.expose(), &password);
    // after the continuation
    let (mut t, _) = T::new(true);
    assert_eq!(t.send(b"AUTH PLAIN\r\n"), "+ \r\n");
    assert_eq!(t.send(format!("{response}\r\n").as_bytes()), "");
    let c = t.take_auth();
    assert_eq!((c.user.as_str(), c.mechanism), ("alice", Mechanism::Plain));
    assert_eq!(c.password.expose(), &password);
}

#[test]
fn auth_plain_forms() {
    // initial response, upper and lower case
    for cmd in [
        &b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"[..],
        b"auth plain AGFsaWNlAHNlY3JldA\r\n",
    ] {
        let (mut t, _) = T::new(true);
        assert_eq!(t.send(cmd), "");
        let c = t.take_auth();
        assert_eq!((c.user.as_str(), c.mechanism), ("alice", Mechanism::Plain));
        assert_eq!(c.password.expose(), b"secret");
    }
    // continuation, with an authzid
    let (mut t, _) = T::new(true);
    assert_eq!(t.send(b"AUTH PLAIN\r\n"), "+ \r\n");
    assert_eq!(t.send(b"Ym9iAGFkbWluAHB3\r\n"), "");
    let c = t.take_auth();
    assert_eq!(
        (c.authzid.as_deref(), c.user.as_str(), c.mailbox_user()),
        (Some("bob"), "admin", "bob")
    );
    // `*` cancels, as a response or as the initial response; not a failure.
    let (mut t, _) = T::with(
        Options {
            max_auth_failures: 1,
            ..opts()
        },
        true,
        None,
    );
    assert_eq!(t.send(b"AUTH PLAIN\r\n"), "+ \r\n");
    assert_eq!(t.send(b"*\r\n"), "-ERR Authentication cancelled.\r\n");
    assert_eq!(
        t.send(b"AUTH PLAIN *\r\n"),
        "-ERR Authentication cancelled.\r\n"
    );
    assert_eq!(t.closed(), None);
    // bad base64 is a bad command
    assert_eq!(t.send(b"AUTH PLAIN\r\n"), "+ \r\n");
    assert_eq!(t.send(b"%%%\r\n"), "-ERR Invalid base64 data.\r\n");
    assert_eq!(
        t.send(b"AUTH PLAIN %%%\r\n"),
        "-ERR Invalid base64 data.\r\n"
    );
    assert_eq!(t.rejected(), ["bad base64", "bad base64"]);
    // unknown mechanism
    assert_eq!(
        t.send(b"AUTH CRAM-MD5\r\nAUTH XOAUTH2 %%%\r\n"),
        "-ERR Unsupported authentication mechanism.\r\n".repeat(2)
    );
    // `=` is an empty initial response: no credentials in it.
    assert_eq!(
        t.send(b"AUTH PLAIN =\r\n"),
        "-ERR [AUTH] Authentication failed.\r\n"
    );
    assert_eq!(t.closed(), Some(CloseReason::TooManyAuthFailures));
}

#[test]
fn auth_plain_empty_response_after_continuation() {
    let (mut t, _) = T::new(true);
    assert_eq!(t.send(b"AUTH PLAIN\r\n"), "+ \r\n");
    assert_eq!(t.send(b"=\r\n"), "-ERR [AUTH] Authentication failed.\r\n");
    assert_eq!(t.auths(), 0);
}

#[test]
fn auth_login_mechanism() {
    let (mut t, _) = T::new(true);
    assert_eq!(t.send(b"AUTH LOGIN\r\n"), "+ VXNlcm5hbWU6\r\n");
    assert_eq!(t.send(b"YWxpY2U=\r\n"), "+ UGFzc3dvcmQ6\r\n");
    assert_eq!(t.send(b"c2VjcmV0\r\n"), "");
    let c = t.take_auth();
    assert_eq!((c.user.as_str(), c.mechanism), ("alice", Mechanism::Login));
    assert_eq!(c.password.expose(), b"secret");
    // with the user name as initial response
    let (mut t, _) = T::new(true);
    assert_eq!(t.send(b"AUTH LOGIN YWxpY2U=\r\n"), "+ UGFzc3dvcmQ6\r\n");
    assert_eq!(t.send(b"c2VjcmV0\r\n"), "");
    assert_eq!(t.take_auth().user, "alice");
    // `=`: an empty user name; an empty password
    let (mut t, _) = T::new(true);
    assert_eq!(
        t.send(b"AUTH LOGIN =\r\n"),
        "-ERR [AUTH] Authentication failed.\r\n"
    );
    assert_eq!(t.send(b"AUTH LOGIN YWxpY2U=\r\n"), "+ UGFzc3dvcmQ6\r\n");
    assert_eq!(t.send(b"=\r\n"), "-ERR [AUTH] Authentication failed.\r\n");
    // cancelled at the password prompt
    assert_eq!(t.send(b"AUTH LOGIN\r\n"), "+ VXNlcm5hbWU6\r\n");
    assert_eq!(t.send(b"YWxpY2U=\r\n"), "+ UGFzc3dvcmQ6\r\n");
    assert_eq!(t.send(b"*\r\n"), "-ERR Authentication cancelled.\r\n");
    assert_eq!(t.send(b"NOOP\r\n"), "+OK\r\n");
    assert_eq!(t.auths(), 0);
}

#[test]
fn auth_login_bad_user_name_and_bad_base64() {
    let (mut t, _) = T::new(true);
    // A user name with a line break is refused before any password is asked for.
    assert_eq!(t.send(b"AUTH LOGIN\r\n"), "+ VXNlcm5hbWU6\r\n");
    assert_eq!(
        t.send(b"YWwKaWNl\r\n"),
        "-ERR [AUTH] Authentication failed.\r\n"
    );
    assert_eq!(t.send(b"AUTH LOGIN YWxpY2U=\r\n"), "+ UGFzc3dvcmQ6\r\n");
    assert_eq!(t.send(b"!!\r\n"), "-ERR Invalid base64 data.\r\n");
    assert_eq!(t.rejected(), ["undecodable credentials", "bad base64"]);
    assert_eq!(t.send(b"NOOP\r\n"), "+OK\r\n");
    assert_eq!(t.auths(), 0);
}

#[test]
fn apop_when_enabled() {
    // Allowed before TLS: the password never crosses the wire.
    let mut t = T::apop();
    let out = t.send(b"APOP mrose C4C9334BAC560ECC979E58001B3E22FB\r\n");
    assert_eq!(out, "");
    let c = t.take_auth();
    assert_eq!((c.user.as_str(), c.mechanism), ("mrose", Mechanism::Apop));
    assert_eq!(c.password.expose(), b"c4c9334bac560ecc979e58001b3e22fb");
    assert_eq!(c.challenge.as_deref(), Some(TS));
    assert_eq!(
        t.verdict(refused(b"[AUTH] Authentication failed.")),
        "-ERR [AUTH] Authentication failed.\r\n"
    );
    // A user name with a space: the digest is the last word.
    assert_eq!(
        t.send(b"apop m rose c4c9334bac560ecc979e58001b3e22fb\r\n"),
        ""
    );
    assert_eq!(t.take_auth().user, "m rose");
}

#[test]
fn apop_errors() {
    let mut t = T::apop();
    let out = t.send(
        b"APOP\r\nAPOP mrose\r\nAPOP mrose c4c9\r\nAPOP mrose zzc9334bac560ecc979e58001b3e22fb\r\n\
          APOP  c4c9334bac560ecc979e58001b3e22fb\r\n",
    );
    assert_eq!(
        out,
        "-ERR Syntax: APOP name digest.\r\n".repeat(4) + "-ERR [AUTH] Authentication failed.\r\n"
    );
    assert_eq!(t.auths(), 0);
}

#[test]
fn apop_disabled_is_an_unknown_command() {
    for tls in [false, true] {
        let (mut t, g) = T::with(opts(), tls, Some(TS));
        assert!(!g.contains('<'));
        assert_eq!(
            t.send(b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n"),
            "-ERR Unknown command.\r\n"
        );
        assert_eq!(t.rejected(), ["APOP disabled"]);
        assert_eq!(t.auths(), 0);
    }
}

#[test]
fn verdict_mappings() {
    let login = |t: &mut T| {
        assert_eq!(t.send(b"USER alice\r\nPASS pw\r\n"), "+OK\r\n");
        t.take_auth();
    };
    let (mut t, _) = T::with(
        Options {
            max_auth_failures: 10,
            ..opts()
        },
        true,
        None,
    );
    // Dovecot's own words, codes included, go to the client unchanged.
    login(&mut t);
    assert_eq!(
        t.verdict(refused(
            b"[IN-USE] Mailbox is locked by another POP3 session."
        )),
        "-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n"
    );
    login(&mut t);
    assert_eq!(
        t.verdict(refused(b"[SYS/TEMP] Temporary authentication failure.")),
        "-ERR [SYS/TEMP] Temporary authentication failure.\r\n"
    );
    login(&mut t);
    assert_eq!(
        t.verdict(refused(b"")),
        "-ERR [AUTH] Authentication failed.\r\n"
    );
    login(&mut t);
    assert_eq!(
        t.verdict(Verdict::Failed(Failure::AuthFailed)),
        "-ERR [AUTH] Authentication failed.\r\n"
    );
    login(&mut t);
    assert_eq!(
        t.verdict(Verdict::Failed(Failure::Unavailable)),
        "-ERR [SYS/TEMP] Service temporarily unavailable, try again later.\r\n"
    );
    // A backend text cannot add a line; a preamble has no place in POP3.
    login(&mut t);
    assert_eq!(
        t.verdict(refused(b"bad\r\n+OK fake")),
        "-ERR bad  +OK fake\r\n"
    );
    login(&mut t);
    let out = t.verdict(Verdict::Accepted(Reply {
        preamble: b"* OK [ALERT] imap only\r\n".to_vec(),
        text: b"Logged in.".to_vec(),
    }));
    assert_eq!(out, "+OK Logged in.\r\n");
    assert_eq!(t.closed(), None);
    // A verdict nobody asked for is ignored.
    assert_eq!(t.verdict(accepted(b"again")), "");
}

#[test]
fn accepted_without_text() {
    let (mut t, _) = T::new(true);
    t.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n");
    t.take_auth();
    assert_eq!(t.verdict(accepted(b"")), "+OK Logged in.\r\n");
    assert!(t.front.into_handoff().is_empty());
}

#[test]
fn unexpected_verdict_before_authenticate() {
    let (mut t, _) = T::new(true);
    assert_eq!(t.verdict(accepted(b"x")), "");
    assert_eq!(t.send(b"NOOP\r\n"), "+OK\r\n");
}

#[test]
fn refused_login_goes_on_with_pipelined_commands() {
    let (mut t, _) = T::new(true);
    assert_eq!(
        t.send(b"USER alice\r\nPASS wrong\r\nNOOP\r\nUSER alice\r\n"),
        "+OK\r\n"
    );
    t.take_auth();
    assert_eq!(
        t.verdict(refused(b"[AUTH] Authentication failed.")),
        "-ERR [AUTH] Authentication failed.\r\n+OK\r\n+OK\r\n"
    );
    assert_eq!(t.send(b"PASS right\r\n"), "");
    assert_eq!(t.take_auth().password.expose(), b"right");
}

#[test]
fn auth_failures_are_bounded() {
    let (mut t, _) = T::new(true);
    for _ in 0..2 {
        t.send(b"USER alice\r\nPASS x\r\n");
        t.take_auth();
        t.verdict(Verdict::Failed(Failure::AuthFailed));
    }
    assert_eq!(t.closed(), None);
    t.send(b"USER alice\r\nPASS x\r\nNOOP\r\n");
    t.take_auth();
    // The third failure is answered, then the connection closes with nothing after it.
    assert_eq!(
        t.verdict(refused(b"[AUTH] Authentication failed.")),
        "-ERR [AUTH] Authentication failed.\r\n"
    );
    assert_eq!(t.closed(), Some(CloseReason::TooManyAuthFailures));
    assert_eq!(t.send(b"NOOP\r\n"), "");
}

#[test]
fn bad_commands_counted_then_closed() {
    let (mut t, _) = T::with(
        Options {
            max_bad_commands: 3,
            ..opts()
        },
        true,
        None,
    );
    let out = t.send(b"STAT\r\nFOO\r\n\r\nNOOP x\r\n\x00\xff\r\nNOOP\r\n");
    assert_eq!(
        out,
        "-ERR Not logged in.\r\n\
         -ERR Unknown command.\r\n\
         -ERR Unknown command.\r\n\
         -ERR Too many invalid commands, closing connection.\r\n"
    );
    assert_eq!(
        t.rejected(),
        [
            "command needs login",
            "unknown command",
            "unknown command",
            "bad syntax"
        ]
    );
    assert_eq!(t.closed(), Some(CloseReason::TooManyErrors));
    assert_eq!(t.send(b"NOOP\r\n"), "");
}

#[test]
fn trailing_blanks_after_commands_are_tolerated() {
    let (mut t, _) = T::new(true);
    assert_eq!(t.send(b"NOOP \r\nnoop\r\n"), "+OK\r\n+OK\r\n");
    assert_eq!(
        t.send(b"AUTH \r\n"),
        "+OK Methods supported:\r\nPLAIN\r\nLOGIN\r\n.\r\n"
    );
}

#[test]
fn quit_closes() {
    let (mut t, _) = T::new(false);
    assert_eq!(t.send(b"QUIT\r\nNOOP\r\n"), "+OK Logging out.\r\n");
    assert_eq!(t.closed(), Some(CloseReason::Logout));
    assert_eq!(t.send(b"NOOP\r\n"), "");
}

#[test]
fn overlong_line_closes() {
    let (mut t, _) = T::new(true);
    let mut line = b"PASS ".to_vec();
    line.extend(std::iter::repeat_n(b'x', 20_000));
    let out = t.send(&line);
    assert_eq!(out, "-ERR Line too long, closing connection.\r\n");
    assert_eq!(t.rejected(), ["line too long"]);
    assert_eq!(t.closed(), Some(CloseReason::InputTooLong));
    assert_eq!(t.send(b"\r\nNOOP\r\n"), "");
    // The limit counts CRLF, and holds for SASL responses too.
    let o = Options {
        max_line: 600,
        ..opts()
    };
    let (mut t, _) = T::with(o.clone(), true, None);
    let line = format!("NOOP{}\r\n", " ".repeat(594));
    assert_eq!(t.send(line.as_bytes()), "+OK\r\n");
    let (mut t, _) = T::with(o, true, None);
    assert_eq!(t.send(b"AUTH PLAIN\r\n"), "+ \r\n");
    let out = t.send(format!("{}\r\n", "A".repeat(600)).as_bytes());
    assert_eq!(out, "-ERR Line too long, closing connection.\r\n");
    assert_eq!(t.closed(), Some(CloseReason::InputTooLong));
}

#[test]
fn byte_at_a_time_equals_one_read() {
    let script: &[u8] = b"CAPA\r\nAUTH\r\nNOOP\r\nAUTH LOGIN\r\nYWxpY2U=\r\n*\r\n\
                          AUTH PLAIN\r\n=\r\nUSER alice\r\nPASS s e c\r\nSTAT\r\n";
    let (mut whole, _) = T::new(true);
    let all = whole.send(script);
    let (mut split, _) = T::new(true);
    let mut pieces = String::new();
    for b in script {
        pieces += &split.send(std::slice::from_ref(b));
    }
    assert_eq!(all, pieces);
    assert_eq!(whole.take_auth(), split.take_auth());
    assert_eq!(whole.rejected(), split.rejected());
    whole.verdict(accepted(b"ok"));
    split.verdict(accepted(b"ok"));
    assert_eq!(whole.front.into_handoff(), split.front.into_handoff());
}

#[test]
fn replies_never_echo_secrets() {
    let (mut t, _) = T::new(true);
    let mut out = t.send(b"PASS hunter2\r\nUSER alice\r\nPASS hunter2\r\n");
    t.take_auth();
    out += &t.verdict(Verdict::Failed(Failure::AuthFailed));
    out += &t.send(b"AUTH LOGIN aHVudGVyMg==\r\n*\r\nAUTH PLAIN aHVudGVyMg\r\n");
    assert!(
        !out.contains("hunter2") && !out.contains("aHVudGVyMg"),
        "{out}"
    );
}

#[test]
fn options_and_timestamps() {
    assert_eq!(Options::default().validate(), Ok(()));
    assert_eq!(Options::default().max_line, 16 * 1024);
    for bad in [
        Options {
            max_line: 100,
            ..opts()
        },
        Options {
            max_auth_failures: 0,
            ..opts()
        },
        Options {
            greeting: "a\tb".into(),
            ..opts()
        },
        Options {
            greeting: "<x>".into(),
            apop: true,
            ..opts()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    assert!(is_apop_timestamp(TS));
    for bad in [
        "", "<>", "<@>", "<a@>", "<@b>", "a@b", "<a b@c>", "<a<@b>", "<a@b\r>",
    ] {
        assert!(!is_apop_timestamp(bad), "{bad:?}");
    }
    assert!(!is_apop_timestamp(&format!("<{}@b>", "a".repeat(300))));
    assert_eq!(
        apop_timestamp("4f2a.17", "mail.example.test").as_deref(),
        Some("<4f2a.17@mail.example.test>")
    );
    assert_eq!(apop_timestamp("a b", "host"), None);
}

#[test]
fn machines_can_move_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Front>();
    send_sync::<postern_pop3::Login>();
}

#[test]
fn oauth_mechanisms_when_enabled() {
    let oauth = || Options {
        oauth: true,
        ..opts()
    };
    let (mut t, _) = T::with(oauth(), true, None);
    let capa = t.send(b"CAPA\r\n");
    assert!(
        capa.contains("SASL PLAIN LOGIN XOAUTH2 OAUTHBEARER\r\n"),
        "{capa}"
    );
    let msg = b"user=alice@x\x01auth=Bearer tok\x01\x01";
    let b64 = postern_proto::sasl::encode(msg);
    assert_eq!(t.send(format!("AUTH XOAUTH2 {b64}\r\n").as_bytes()), "");
    let c = t.take_auth();
    assert_eq!(
        (c.user.as_str(), c.mechanism),
        ("alice@x", Mechanism::XOAuth2)
    );
    assert_eq!(c.password.expose(), msg);
    let (mut t, _) = T::with(oauth(), true, None);
    assert_eq!(t.send(b"AUTH OAUTHBEARER\r\n"), "+ \r\n");
    let bad = postern_proto::sasl::encode(b"n,,\x01auth=Bearer t\x01\x01");
    let out = t.send(format!("{bad}\r\n").as_bytes());
    assert!(out.starts_with("-ERR"), "{out}");
    assert_eq!(t.auths(), 0);
    // Off by default.
    let (mut t, _) = T::new(true);
    assert!(!t.send(b"CAPA\r\n").contains("XOAUTH2"));
    let out = t.send(format!("AUTH XOAUTH2 {b64}\r\n").as_bytes());
    assert!(out.starts_with("-ERR"), "{out}");
    assert_eq!(t.auths(), 0);
}

#[test]
fn commands_before_login_are_bounded() {
    let (mut t, _) = T::with(
        Options {
            max_commands: 3,
            ..opts()
        },
        true,
        None,
    );
    let out = t.send(b"NOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n");
    assert!(
        out.ends_with("-ERR Too many commands before login, closing connection.\r\n"),
        "{out}"
    );
    assert_eq!(t.closed(), Some(CloseReason::TooManyErrors));
}

#[test]
fn abuse_control_refusals() {
    use postern_proto::Limit;
    let (mut t, _) = T::new(true);
    t.front.refuse(
        Limit::ConnectionRate,
        Some(std::time::Duration::from_secs(42)),
    );
    assert_eq!(
        t.out(),
        "-ERR [SYS/TEMP] Connecting too fast, try again in 42 s (limit: connection_rate).\r\n"
    );
    assert_eq!(t.closed(), Some(CloseReason::Limited));

    let (mut t, _) = T::new(true);
    t.send(b"USER alice\r\nPASS pw\r\n");
    t.take_auth();
    assert_eq!(
        t.verdict(Verdict::Failed(Failure::Limited(Limit::AuthFailures))),
        "-ERR [LOGIN-DELAY] Too many failed logins, try again later.\r\n"
    );
    t.send(b"USER alice\r\nPASS pw\r\n");
    t.take_auth();
    assert_eq!(
        t.verdict(Verdict::Failed(Failure::Limited(Limit::UserSessions))),
        "-ERR [IN-USE] Too many sessions for this user.\r\n"
    );
}

#[test]
fn driver_shutdown_says_goodbye_once() {
    use postern_proto::Shutdown;
    let (mut t, _) = T::new(false);
    t.front.shutdown(Shutdown::IdleTimeout);
    assert_eq!(t.out(), "-ERR Disconnected for inactivity.\r\n");
    assert_eq!(t.closed(), Some(CloseReason::Internal));
    t.front.shutdown(Shutdown::ServerShutdown);
    assert_eq!(t.out(), "");

    let (mut t, _) = T::new(false);
    t.front.shutdown(Shutdown::ServerShutdown);
    assert_eq!(t.out(), "-ERR Server shutting down.\r\n");
}
