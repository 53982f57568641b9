//! The MX / LMTP relay under arbitrary interleavings of client bytes, backend bytes,
//! routing answers and connection events: never a panic, buffers stay bounded, nothing
//! goes to a backend before the driver connected it, and every line sent to a backend
//! outside a message body is CRLF-terminated.

use std::sync::Arc;

use postern_proto::ClientInfo;
use postern_smtp::{BackendId, Relay, RelayEvent, RelayOptions, Route, Shutdown};

/// One fuzz input; panics on a broken invariant.
pub fn run(data: &[u8]) {
    let Some((&control, mut rest)) = data.split_first() else {
        return;
    };
    let base = if control & 1 == 1 {
        RelayOptions::lmtp()
    } else {
        RelayOptions::mx()
    };
    let opts = RelayOptions {
        max_line: 256,
        max_pipelined: 1024,
        max_pending: 8,
        max_recipients: 4,
        xclient: control & 2 == 2,
        extensions: vec!["CHUNKING".into(), "SIZE 100".into()],
        ..base
    };
    let client = ClientInfo {
        client: "[2001:db8::9]:2525".parse().unwrap(),
        local: "192.0.2.25:25".parse().unwrap(),
        tls: control & 4 == 4,
        session_id: "fuzz".into(),
    };
    let mut relay = Relay::new(Arc::new(opts), client);
    let mut route_pending = false;
    let mut connect_pending = false;
    let mut connected = false;
    let mut closed = false;
    let mut to_client = Vec::new();
    let mut to_backend = Vec::new();
    while let Some((&op, tail)) = rest.split_first() {
        let len = usize::from(op >> 3) + 1;
        let (bytes, tail) = tail.split_at(len.min(tail.len()));
        rest = tail;
        match op & 7 {
            0 | 1 if relay.wants_client_input() => relay.handle_client_input(bytes),
            2 | 3 if connected => relay.handle_backend_input(bytes),
            4 if route_pending => {
                route_pending = false;
                let which = bytes.first().copied().unwrap_or(0);
                relay.handle_route(match which % 4 {
                    0 => Route::TempFail,
                    1 => Route::Reject,
                    2 => Route::Backend(BackendId("a".into())),
                    _ => Route::Backend(BackendId("b".into())),
                });
            }
            5 if connect_pending => {
                connect_pending = false;
                if bytes.first().is_some_and(|b| b & 1 == 1) {
                    connected = true;
                    relay.handle_backend_connected();
                } else {
                    relay.handle_backend_closed();
                }
            }
            6 if connected && bytes.first() == Some(&0) => {
                connected = false;
                relay.handle_backend_closed();
            }
            7 if bytes.first() == Some(&0) => relay.shutdown(Shutdown::IdleTimeout),
            _ => continue,
        }
        relay.poll_transmit_client(&mut to_client);
        relay.poll_transmit_backend(&mut to_backend);
        assert!(
            to_backend.is_empty() || connected,
            "bytes for a backend never connected"
        );
        assert!(!closed || to_client.is_empty(), "output after Close");
        to_client.clear();
        to_backend.clear();
        while let Some(event) = relay.poll_event() {
            match event {
                RelayEvent::RouteRecipient(_) => route_pending = true,
                RelayEvent::Connect(_) => {
                    assert!(!connected, "one backend at a time");
                    connect_pending = true;
                }
                RelayEvent::CloseBackend(_) => connected = false,
                RelayEvent::Close(_) => closed = true,
                RelayEvent::StartTls => relay.handle_tls_ready(),
                RelayEvent::Rejected(_) => {}
            }
        }
    }
}
