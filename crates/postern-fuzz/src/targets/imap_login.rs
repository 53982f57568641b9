//! The IMAP backend login under arbitrary backend answers: never a panic, and an
//! outcome (or a wish for more input) for every input.

use postern_imap::{Login, LoginMethod, LoginOptions};
use postern_proto::{BackendLogin, ClientInfo, Credentials, LoginEvent, Mechanism, Secret};

/// One fuzz input; panics on a broken invariant.
pub fn run(data: &[u8]) {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let creds = Credentials {
        mechanism: Mechanism::Cleartext,
        authzid: (control & 1 == 1).then(|| "bob".to_owned()),
        user: "alice".into(),
        password: Secret::new(b"pw".to_vec()),
        challenge: None,
    };
    let opts = LoginOptions {
        method: match control >> 1 & 3 {
            0 => LoginMethod::Login,
            1 => LoginMethod::Plain,
            _ => LoginMethod::Auto,
        },
        forward_client: control & 8 == 8,
        starttls: control & 16 == 16,
    };
    let client = ClientInfo {
        client: "192.0.2.1:1000".parse().unwrap(),
        local: "192.0.2.2:143".parse().unwrap(),
        tls: true,
        session_id: "fuzz".into(),
    };
    let mut login = Login::new(creds, None, &opts, &client);
    let chunk = usize::from(control >> 4).max(1);
    let mut out = Vec::new();
    for piece in input.chunks(chunk) {
        login.handle_input(piece);
        login.poll_transmit(&mut out);
        out.clear();
        match login.poll_event() {
            Some(LoginEvent::StartTls) => login.handle_tls_ready(),
            Some(LoginEvent::Done(_)) => break,
            None => {}
        }
    }
}
