//! The submission backend login under arbitrary backend answers: never a panic, and an
//! outcome (or a wish for more input) for every input; the password never travels
//! outside AUTH.

use postern_proto::{BackendLogin, ClientInfo, Credentials, Mechanism, Secret};
use postern_smtp::{AuthMethod, Login, LoginMethod, LoginOptions, SessionInfo};

/// One fuzz input; panics on a broken invariant.
pub fn run(data: &[u8]) {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let creds = Credentials {
        mechanism: Mechanism::Plain,
        authzid: (control & 1 == 1).then(|| "bob".to_owned()),
        user: "alice".into(),
        password: Secret::new(b"hunter2".to_vec()),
        challenge: None,
    };
    let opts = LoginOptions {
        method: if control & 2 == 2 {
            LoginMethod::Xclient
        } else {
            LoginMethod::Auth
        },
        auth: match control >> 2 & 3 {
            0 => AuthMethod::Plain,
            1 => AuthMethod::Login,
            _ => AuthMethod::Auto,
        },
        proxy_verified: control & 16 == 16,
    };
    let client = ClientInfo {
        client: if control & 32 == 32 {
            "[2001:db8::1]:1000".parse().unwrap()
        } else {
            "192.0.2.1:1000".parse().unwrap()
        },
        local: "192.0.2.2:587".parse().unwrap(),
        tls: true,
        session_id: "fuzz".into(),
    };
    let session = SessionInfo {
        hostname: "postern.fuzz".into(),
        helo: "client.fuzz".into(),
        client_name: None,
    };
    let mut login = Login::new(creds, session, &opts, &client);
    let chunk = usize::from(control >> 6).max(1) * 7;
    let mut out = Vec::new();
    for piece in input.chunks(chunk) {
        login.handle_input(piece);
        login.poll_transmit(&mut out);
        // The password only leaves as base64, never in clear text.
        assert!(!out.windows(7).any(|w| w == b"hunter2"));
        // Every command is one CRLF-terminated line with no stray CR/LF inside.
        for line in out.split_inclusive(|&b| b == b'\n') {
            assert!(line.ends_with(b"\r\n"));
            assert!(!line[..line.len() - 2].contains(&b'\r'));
            assert!(line.len() <= 512 || line.starts_with(b"AUTH "));
        }
        out.clear();
        if login.poll_event().is_some() {
            break;
        }
    }
}
