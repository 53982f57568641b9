//! The POP3 backend login under arbitrary backend answers: never a panic, an outcome
//! (or a wish for more input) for every input, nothing sent after the outcome, and only
//! whole command lines on the wire.

use postern_pop3::{Login, LoginMethod, LoginOptions};
use postern_proto::{BackendLogin, ClientInfo, Credentials, LoginEvent, Mechanism, Secret};

/// One fuzz input; panics on a broken invariant.
pub fn run(data: &[u8]) {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let password: &[u8] = match control >> 2 & 3 {
        0 => b"pw",
        1 => b"p w\r\nDELE 1",
        2 => &[b'x'; 300],
        _ => b"",
    };
    let creds = Credentials {
        mechanism: Mechanism::Cleartext,
        authzid: (control & 16 == 16).then(|| "bob".to_owned()),
        user: "alice".into(),
        password: Secret::new(password.to_vec()),
        challenge: None,
    };
    let opts = LoginOptions {
        method: if control & 1 == 1 {
            LoginMethod::User
        } else {
            LoginMethod::Plain
        },
        forward_client: control & 2 == 2,
        starttls: control & 4 == 4,
    };
    let client = ClientInfo {
        client: "[2001:db8::1]:1000".parse().unwrap(),
        local: "192.0.2.2:110".parse().unwrap(),
        tls: true,
        session_id: "fuzz".into(),
    };
    let mut login = Login::new(creds, &opts, &client);
    let chunk = usize::from(control >> 5).max(1);
    let mut out = Vec::new();
    let mut done = login.poll_event().is_some();
    for piece in input.chunks(chunk) {
        login.handle_input(piece);
        login.poll_transmit(&mut out);
        assert!(!done || out.is_empty(), "sent after the outcome");
        assert!(out.is_empty() || out.ends_with(b"\r\n"));
        // A password with CRLF never travels outside base64.
        assert!(!out.windows(6).any(|w| w == b"DELE 1"));
        out.clear();
        match login.poll_event() {
            Some(LoginEvent::StartTls) => login.handle_tls_ready(),
            Some(LoginEvent::Done(_)) => done = true,
            None => {}
        }
    }
}
