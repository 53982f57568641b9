//! The submission backend login against scripted backend transcripts.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use postern_proto::{
    BackendLogin, ClientInfo, Credentials, Failure, LoginEvent, Mechanism, Reply, Secret, Verdict,
};
use postern_smtp::{AuthMethod, Login, LoginMethod, LoginOptions, SessionInfo};

const POSTFIX_EHLO: &[u8] = b"250-backend.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n\
    250-AUTH PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n\
    250 XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n";

fn creds(authzid: Option<&str>) -> Credentials {
    Credentials {
        mechanism: Mechanism::Plain,
        authzid: authzid.map(str::to_owned),
        user: "alice@example.test".into(),
        password: Secret::new(b"p w".to_vec()),
        challenge: None,
    }
}

fn client(addr: &str) -> ClientInfo {
    ClientInfo {
        client: addr.parse().unwrap(),
        local: "192.0.2.1:587".parse().unwrap(),
        tls: true,
        session_id: "sid".into(),
    }
}

fn login(opts: LoginOptions, authzid: Option<&str>, addr: &str) -> Login {
    let session = SessionInfo {
        hostname: "postern.test".into(),
        helo: "laptop.example".into(),
        client_name: None,
    };
    Login::new(creds(authzid), session, &opts, &client(addr))
}

fn feed(l: &mut Login, bytes: &[u8]) -> (String, Option<Verdict>) {
    l.handle_input(bytes);
    let mut out = Vec::new();
    l.poll_transmit(&mut out);
    let v = match l.poll_event() {
        Some(LoginEvent::Done(v)) => Some(v),
        Some(LoginEvent::StartTls) => panic!("unexpected StartTls"),
        None => None,
    };
    (String::from_utf8(out).unwrap(), v)
}

fn xclient(proxy_verified: bool) -> LoginOptions {
    LoginOptions {
        method: LoginMethod::Xclient,
        proxy_verified,
        ..LoginOptions::default()
    }
}

#[test]
fn xclient_login_when_the_proxy_verified_the_password() {
    let mut l = login(xclient(true), None, "198.51.100.7:40000");
    let (out, v) = feed(&mut l, b"220 backend.test ESMTP Postfix\r\n");
    assert_eq!(out, "EHLO postern.test\r\n");
    assert!(v.is_none());
    let (out, _) = feed(&mut l, POSTFIX_EHLO);
    assert_eq!(
        out,
        "XCLIENT HELO=laptop.example PROTO=ESMTP LOGIN=alice@example.test \
         DESTADDR=192.0.2.1 DESTPORT=587 NAME=[UNAVAILABLE] PORT=40000 ADDR=198.51.100.7\r\n"
    );
    // Postfix resets to the greeting stage and expects EHLO again.
    let (out, _) = feed(&mut l, b"220 backend.test ESMTP Postfix\r\n");
    assert_eq!(out, "EHLO laptop.example\r\n");
    let (out, v) = feed(&mut l, POSTFIX_EHLO);
    assert_eq!(out, "", "no password on the wire");
    assert_eq!(
        v,
        Some(Verdict::Accepted(Reply {
            preamble: vec![],
            text: b"235 2.7.0 Authentication successful".to_vec(),
        }))
    );
}

#[test]
fn xclient_then_auth_replay_when_not_verified() {
    let mut l = login(xclient(false), Some("bob"), "[2001:db8::5]:1234");
    feed(&mut l, b"220 backend.test ESMTP\r\n");
    let (out, _) = feed(&mut l, POSTFIX_EHLO);
    assert!(
        out.starts_with("XCLIENT HELO=laptop.example PROTO=ESMTP DESTADDR=")
            && out.ends_with(" PORT=1234 ADDR=IPV6:2001:db8::5\r\n")
            && !out.contains("LOGIN="),
        "{out}"
    );
    feed(&mut l, b"220 backend.test ESMTP\r\n");
    let (out, _) = feed(&mut l, POSTFIX_EHLO);
    // bob\0alice@example.test\0p w
    assert_eq!(out, "AUTH PLAIN Ym9iAGFsaWNlQGV4YW1wbGUudGVzdABwIHc=\r\n");
    let (_, v) = feed(
        &mut l,
        b"235 2.7.0 Authentication successful\r\n250 trailing\r\n",
    );
    assert_eq!(
        v,
        Some(Verdict::Accepted(Reply {
            preamble: vec![],
            text: b"235 2.7.0 Authentication successful".to_vec(),
        }))
    );
    assert_eq!(l.into_handoff(), b"250 trailing\r\n");
}

#[test]
fn xclient_is_required_with_addr() {
    for ehlo in [
        &b"250-b\r\n250 AUTH PLAIN\r\n"[..],
        b"250-b\r\n250 XCLIENT NAME HELO\r\n",
    ] {
        let mut l = login(xclient(true), None, "198.51.100.7:1");
        feed(&mut l, b"220 b\r\n");
        let (out, v) = feed(&mut l, ehlo);
        assert_eq!(out, "");
        assert_eq!(v, Some(Verdict::Failed(Failure::Unavailable)));
    }
    // Postfix without Postern in smtpd_authorized_xclient_hosts.
    let mut l = login(xclient(true), None, "198.51.100.7:1");
    feed(&mut l, b"220 b\r\n");
    feed(&mut l, POSTFIX_EHLO);
    let (_, v) = feed(&mut l, b"550 5.7.0 Error: insufficient authorization\r\n");
    assert_eq!(v, Some(Verdict::Failed(Failure::Unavailable)));
}

#[test]
fn auth_replay_plain_split_across_reads() {
    let mut l = login(LoginOptions::default(), None, "198.51.100.7:1");
    let mut out = String::new();
    let mut verdict = None;
    let script = b"220-backend ESMTP\r\n220 more greeting\r\n250-b\r\n250 AUTH LOGIN PLAIN\r\n";
    for b in script {
        let (o, v) = feed(&mut l, &[*b]);
        out.push_str(&o);
        verdict = verdict.or(v);
    }
    assert_eq!(
        out,
        "EHLO laptop.example\r\nAUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABwIHc=\r\n"
    );
    let (_, v) = feed(
        &mut l,
        b"535-5.7.8 Error: authentication failed:\r\n535 5.7.8 bad password\r\n",
    );
    assert_eq!(
        v,
        Some(Verdict::Refused(Reply {
            preamble: b"535-5.7.8 Error: authentication failed:\r\n".to_vec(),
            text: b"535 5.7.8 bad password".to_vec(),
        }))
    );
}

#[test]
fn auth_replay_login() {
    let opts = LoginOptions {
        auth: AuthMethod::Login,
        ..LoginOptions::default()
    };
    let mut l = login(opts, None, "198.51.100.7:1");
    feed(&mut l, b"220 exchange\r\n");
    let (out, _) = feed(&mut l, b"250-ex\r\n250 AUTH LOGIN\r\n");
    assert_eq!(out, "AUTH LOGIN\r\n");
    let (out, _) = feed(&mut l, b"334 VXNlcm5hbWU6\r\n");
    assert_eq!(out, "YWxpY2VAZXhhbXBsZS50ZXN0\r\n");
    let (out, _) = feed(&mut l, b"334 UGFzc3dvcmQ6\r\n");
    assert_eq!(out, "cCB3\r\n");
    let (_, v) = feed(&mut l, b"235 2.7.0 ok\r\n");
    assert!(matches!(v, Some(Verdict::Accepted(_))));

    // Auto picks LOGIN when PLAIN is not offered.
    let mut l = login(LoginOptions::default(), None, "198.51.100.7:1");
    feed(&mut l, b"220 exchange\r\n");
    let (out, _) = feed(&mut l, b"250-ex\r\n250 AUTH LOGIN\r\n");
    assert_eq!(out, "AUTH LOGIN\r\n");
    // A refusal at the user prompt is the answer.
    let (_, v) = feed(&mut l, b"535 5.7.3 nope\r\n");
    assert!(matches!(v, Some(Verdict::Refused(_))));
}

#[test]
fn backend_failures_are_unavailable() {
    let unavailable = Some(Verdict::Failed(Failure::Unavailable));
    let cases: &[&[u8]] = &[
        b"554 5.3.2 go away\r\n",
        b"* OK IMAP4rev1\r\n",
        b"220 b\r\n250 b\r\n", // no AUTH at all
        b"220 b\r\n250-b\r\n250 AUTH PLAIN\r\n454 4.7.0 Temporary failure\r\n",
        b"220 b\r\n250-b\r\n250 AUTH PLAIN\r\n502 5.5.1 not implemented\r\n",
        b"220 b\r\n250-b\r\n250 AUTH PLAIN\r\n334 \r\n",
        b"220 b\r\n550 no EHLO for you\r\n",
    ];
    for case in cases {
        let mut l = login(LoginOptions::default(), None, "198.51.100.7:1");
        assert_eq!(feed(&mut l, case).1, unavailable, "{case:?}");
    }
    let mut l = login(LoginOptions::default(), None, "198.51.100.7:1");
    assert_eq!(feed(&mut l, &vec![b'2'; 5000]).1, unavailable);
}

fn token_login(mechanism: Mechanism, token: &[u8]) -> Login {
    let session = SessionInfo {
        hostname: "postern.test".into(),
        helo: "laptop.example".into(),
        client_name: None,
    };
    let creds = Credentials {
        mechanism,
        authzid: None,
        user: "alice@example.test".into(),
        password: Secret::new(token.to_vec()),
        challenge: None,
    };
    Login::new(
        creds,
        session,
        &LoginOptions::default(),
        &client("127.0.0.2:1"),
    )
}

#[test]
fn bearer_tokens_replayed_with_their_mechanism() {
    let msg = b"user=alice@example.test\x01auth=Bearer t\x01\x01";
    let mut l = token_login(Mechanism::XOAuth2, msg);
    feed(&mut l, b"220 b ESMTP\r\n");
    let (out, _) = feed(&mut l, POSTFIX_EHLO);
    assert_eq!(
        out,
        format!("AUTH XOAUTH2 {}\r\n", postern_proto::sasl::encode(msg))
    );
    // An error challenge is answered with an empty response, then the 535 is final.
    let (out, v) = feed(&mut l, b"334 eyJzdGF0dXMiOiI0MDEifQ==\r\n");
    assert_eq!((out.as_str(), v), ("\r\n", None));
    let (_, v) = feed(&mut l, b"535 5.7.8 Authentication failed\r\n");
    assert!(matches!(v, Some(Verdict::Refused(_))), "{v:?}");

    // A token too long for an initial response waits for the 334; OAUTHBEARER's
    // error challenge is answered with %x01.
    let long = vec![b'a'; 4000];
    let mut l = token_login(Mechanism::OAuthBearer, &long);
    feed(&mut l, b"220 b ESMTP\r\n");
    let (out, _) = feed(&mut l, POSTFIX_EHLO);
    assert_eq!(out, "AUTH OAUTHBEARER\r\n");
    let (out, _) = feed(&mut l, b"334 \r\n");
    assert_eq!(out, format!("{}\r\n", postern_proto::sasl::encode(&long)));
    let (out, _) = feed(&mut l, b"334 e30=\r\n");
    assert_eq!(out, "AQ==\r\n");
    // A second challenge is not answered again: the backend is not following RFC 7628.
    let (out, v) = feed(&mut l, b"334 e30=\r\n");
    assert_eq!(out, "");
    assert_eq!(v, Some(Verdict::Failed(Failure::Unavailable)));
}
