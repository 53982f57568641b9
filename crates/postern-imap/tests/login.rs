//! The backend login machine against scripted backend transcripts.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use postern_imap::id::ClientId;
use postern_imap::{Login, LoginMethod, LoginOptions};
use postern_proto::{
    BackendLogin, ClientInfo, Credentials, Failure, LoginEvent, Mechanism, Reply, Secret, Verdict,
};

const DOVECOT: &[u8] = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n";

fn creds(authzid: Option<&str>) -> Credentials {
    Credentials {
        mechanism: Mechanism::Cleartext,
        authzid: authzid.map(str::to_owned),
        user: "alice@example.test".into(),
        password: Secret::new(b"p\"w".to_vec()),
        challenge: None,
    }
}

fn client() -> ClientInfo {
    ClientInfo {
        client: "127.0.0.2:5555".parse().unwrap(),
        local: "127.0.0.1:143".parse().unwrap(),
        tls: true,
        session_id: "sid1".into(),
    }
}

fn login(method: LoginMethod, forward: bool, id: Option<ClientId>, authzid: Option<&str>) -> Login {
    let opts = LoginOptions {
        method,
        forward_client: forward,
        starttls: false,
    };
    Login::new(creds(authzid), id, &opts, &client())
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

#[test]
fn dovecot_gets_authenticate_plain_with_ir() {
    let mut l = login(LoginMethod::Auto, false, None, None);
    let (out, v) = feed(&mut l, DOVECOT);
    assert_eq!(
        out,
        "L AUTHENTICATE PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABwInc=\r\n"
    );
    assert!(v.is_none());
    let (out, v) = feed(
        &mut l,
        b"L OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n* 1 EXISTS\r\n",
    );
    assert_eq!(out, "");
    assert_eq!(
        v,
        Some(Verdict::Accepted(Reply {
            preamble: vec![],
            text: b"[CAPABILITY IMAP4rev1 IDLE] Logged in".to_vec()
        }))
    );
    assert_eq!(l.into_handoff(), b"* 1 EXISTS\r\n");
}

#[test]
fn id_is_forwarded_and_its_answer_swallowed() {
    let id = ClientId::sanitize([(&b"name"[..], Some(&b"Thunderbird"[..]))]);
    let mut l = login(LoginMethod::Auto, true, Some(id), None);
    let (out, _) = feed(&mut l, DOVECOT);
    let (id_line, auth) = out.split_once("\r\n").unwrap();
    assert!(id_line.starts_with("I ID (\"name\" \"Thunderbird\" \"x-originating-ip\" \"127.0.0.2\" \"x-originating-port\" \"5555\""), "{id_line}");
    assert!(auth.starts_with("L AUTHENTICATE PLAIN "));
    let (_, v) = feed(
        &mut l,
        b"* ID (\"name\" \"Dovecot\")\r\nI OK ID completed.\r\n* OK [ALERT] Quota low\r\nL NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
    );
    assert_eq!(
        v,
        Some(Verdict::Refused(Reply {
            preamble: b"* OK [ALERT] Quota low\r\n".to_vec(),
            text: b"[AUTHENTICATIONFAILED] Authentication failed.".to_vec()
        }))
    );
}

#[test]
fn login_with_synchronizing_literals() {
    let mut l = login(LoginMethod::Auto, false, None, None);
    let (out, _) = feed(&mut l, b"* OK [CAPABILITY IMAP4rev1] old server\r\n");
    assert_eq!(out, "L LOGIN {18}\r\n");
    let (out, _) = feed(&mut l, b"+ go ahead\r\n");
    assert_eq!(out, "alice@example.test {3}\r\n");
    let (out, _) = feed(&mut l, b"+ \r\n");
    assert_eq!(out, "p\"w\r\n");
    let (_, v) = feed(&mut l, b"L OK done\r\n");
    assert!(matches!(v, Some(Verdict::Accepted(_))));
}

#[test]
fn login_with_literal_plus_in_one_write() {
    let mut l = login(LoginMethod::Login, false, None, None);
    let (out, _) = feed(&mut l, DOVECOT);
    assert_eq!(out, "L LOGIN {18+}\r\nalice@example.test {3+}\r\np\"w\r\n");
}

#[test]
fn greeting_without_capabilities_asks_for_them() {
    let mut l = login(LoginMethod::Auto, false, None, Some("bob"));
    let (out, _) = feed(&mut l, b"* OK ready\r\n");
    assert_eq!(out, "C CAPABILITY\r\n");
    let (out, _) = feed(
        &mut l,
        b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nC OK done\r\n",
    );
    // authzid forces PLAIN; no SASL-IR means a continuation round trip
    assert_eq!(out, "L AUTHENTICATE PLAIN\r\n");
    let (out, _) = feed(&mut l, b"+ \r\n");
    assert_eq!(out, "Ym9iAGFsaWNlQGV4YW1wbGUudGVzdABwInc=\r\n");
}

#[test]
fn broken_backends_are_unavailable() {
    let unavailable = Some(Verdict::Failed(Failure::Unavailable));
    for greeting in [
        &b"* BYE Too many connections\r\n"[..],
        b"* PREAUTH [CAPABILITY IMAP4rev1] hi\r\n",
        b"220 smtp.example ESMTP\r\n",
    ] {
        let mut l = login(LoginMethod::Auto, false, None, None);
        assert_eq!(feed(&mut l, greeting).1, unavailable, "{greeting:?}");
    }
    let mut l = login(LoginMethod::Auto, false, None, None);
    feed(&mut l, DOVECOT);
    assert_eq!(feed(&mut l, b"+ unexpected\r\n").1, unavailable);
    let mut l = login(LoginMethod::Auto, false, None, None);
    feed(&mut l, DOVECOT);
    assert_eq!(feed(&mut l, b"* BYE shutting down\r\n").1, unavailable);
    let mut l = login(LoginMethod::Auto, false, None, None);
    assert_eq!(feed(&mut l, &vec![b'x'; 70_000]).1, unavailable);
}

#[test]
fn starttls_comes_before_any_credential() {
    let opts = LoginOptions {
        method: LoginMethod::Auto,
        forward_client: false,
        starttls: true,
    };
    let mut l = Login::new(creds(None), None, &opts, &client());
    let (out, _) = feed(
        &mut l,
        b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] hi\r\n",
    );
    assert_eq!(out, "S STARTTLS\r\n");
    l.handle_input(b"S OK Begin TLS\r\n* injected\r\n");
    assert!(matches!(l.poll_event(), Some(LoginEvent::StartTls)));
    let mut out = Vec::new();
    l.poll_transmit(&mut out);
    assert!(out.is_empty());
    l.handle_tls_ready();
    l.poll_transmit(&mut out);
    assert_eq!(out, b"C CAPABILITY\r\n");
    let (out, _) = feed(
        &mut l,
        b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN\r\nC OK done\r\n",
    );
    assert!(out.starts_with("L AUTHENTICATE PLAIN "), "{out}");
}

#[test]
fn a_backend_without_starttls_is_not_logged_in_to_in_plaintext() {
    let opts = LoginOptions {
        method: LoginMethod::Auto,
        forward_client: false,
        starttls: true,
    };
    let mut l = Login::new(creds(None), None, &opts, &client());
    let (out, v) = feed(&mut l, DOVECOT);
    assert_eq!(out, "");
    assert_eq!(v, Some(Verdict::Failed(Failure::Unavailable)));
}

#[test]
fn bearer_tokens_are_replayed_unchanged() {
    let msg = b"user=alice@example.test\x01auth=Bearer tok\x01\x01".to_vec();
    let creds = Credentials {
        mechanism: Mechanism::XOAuth2,
        authzid: None,
        user: "alice@example.test".into(),
        password: Secret::new(msg.clone()),
        challenge: None,
    };
    let opts = LoginOptions::default();
    let mut l = Login::new(creds, None, &opts, &client());
    let (out, _) = feed(&mut l, DOVECOT);
    assert_eq!(
        out,
        format!(
            "L AUTHENTICATE XOAUTH2 {}\r\n",
            postern_proto::sasl::encode(&msg)
        )
    );
    // A failure challenge gets the dummy response, then the NO is passed on.
    let (out, _) = feed(&mut l, b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n");
    assert_eq!(out, "\r\n");
    let (_, v) = feed(&mut l, b"L NO [AUTHENTICATIONFAILED] bad token\r\n");
    assert!(matches!(v, Some(Verdict::Refused(_))));
}
