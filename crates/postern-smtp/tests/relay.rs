//! Byte transcripts of the MX / LMTP relay: client bytes, backend bytes, routing
//! answers in; client bytes, backend bytes and events out.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use postern_proto::{ClientInfo, CloseReason};
use postern_smtp::{BackendId, Relay, RelayEvent, RelayOptions, Route, Shutdown};

/// Postfix's EHLO reply before XCLIENT (what the probe EHLO gets).
const PROBE: &[u8] = b"250-store-a.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n\
    250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-CHUNKING\r\n\
    250 XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n";
/// The EHLO reply after XCLIENT.
const CAPS: &[u8] = b"250-store-a.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n\
    250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 CHUNKING\r\n";

struct H {
    r: Relay,
    events: Vec<RelayEvent>,
}

fn a() -> BackendId {
    BackendId("store-a".into())
}

fn b() -> BackendId {
    BackendId("store-b".into())
}

fn info(addr: &str) -> ClientInfo {
    ClientInfo {
        client: addr.parse().unwrap(),
        local: "192.0.2.25:25".parse().unwrap(),
        tls: false,
        session_id: "sid".into(),
    }
}

fn mx() -> RelayOptions {
    RelayOptions {
        hostname: "mx.test".into(),
        extensions: vec![
            "SIZE 10240000".into(),
            "8BITMIME".into(),
            "CHUNKING".into(),
            "XCLIENT ADDR".into(),
        ],
        ..RelayOptions::mx()
    }
}

fn lmtp() -> RelayOptions {
    RelayOptions {
        hostname: "lmtp.test".into(),
        ..RelayOptions::lmtp()
    }
}

impl H {
    fn new(opts: RelayOptions) -> (H, String) {
        Self::at(opts, "198.51.100.7:40000")
    }

    fn at(opts: RelayOptions, addr: &str) -> (H, String) {
        let mut h = H {
            r: Relay::new(Arc::new(opts), info(addr)),
            events: vec![],
        };
        let (c, _) = h.drain();
        (h, c)
    }

    /// Client output, backend output; events are collected.
    fn drain(&mut self) -> (String, String) {
        let mut c = vec![];
        let mut b = vec![];
        self.r.poll_transmit_client(&mut c);
        self.r.poll_transmit_backend(&mut b);
        while let Some(e) = self.r.poll_event() {
            self.events.push(e);
        }
        (String::from_utf8(c).unwrap(), String::from_utf8(b).unwrap())
    }

    fn c(&mut self, bytes: &[u8]) -> (String, String) {
        self.r.handle_client_input(bytes);
        self.drain()
    }

    fn b(&mut self, bytes: &[u8]) -> (String, String) {
        self.r.handle_backend_input(bytes);
        self.drain()
    }

    fn route(&mut self, route: Route) -> (String, String) {
        self.r.handle_route(route);
        self.drain()
    }

    fn take(&mut self) -> Vec<RelayEvent> {
        std::mem::take(&mut self.events)
    }

    /// The routing request for `addr` must be the only pending event.
    fn expect_route(&mut self, addr: &str) {
        assert_eq!(
            self.take(),
            [RelayEvent::RouteRecipient(addr.into())],
            "route request"
        );
    }

    /// Answers a route with a backend not connected yet, runs the XCLIENT handshake,
    /// and returns what goes to the backend once it is ready (MAIL + RCPT).
    fn open_mx(&mut self, id: BackendId, helo: &str, xclient_line: &str) -> String {
        assert_eq!(
            self.route(Route::Backend(id.clone())),
            (String::new(), String::new())
        );
        assert_eq!(self.take(), [RelayEvent::Connect(id)]);
        self.r.handle_backend_connected();
        assert_eq!(self.drain(), (String::new(), String::new()));
        let (c, to_b) = self.b(b"220 store-a.test ESMTP Postfix\r\n");
        assert_eq!((c.as_str(), to_b.as_str()), ("", "EHLO mx.test\r\n"));
        let (c, to_b) = self.b(PROBE);
        assert_eq!(c, "");
        assert_eq!(to_b, xclient_line);
        let (c, to_b) = self.b(b"220 store-a.test ESMTP Postfix\r\n");
        assert_eq!(c, "");
        assert_eq!(to_b, format!("EHLO {helo}\r\n"));
        let (c, to_b) = self.b(CAPS);
        assert_eq!(c, "");
        to_b
    }

    fn closed(&self) -> Option<CloseReason> {
        self.events.iter().find_map(|e| match e {
            RelayEvent::Close(r) => Some(*r),
            _ => None,
        })
    }
}

const XCLIENT_V4: &str = "XCLIENT HELO=sender.example PROTO=ESMTP DESTADDR=192.0.2.25 \
    DESTPORT=25 NAME=[UNAVAILABLE] PORT=40000 ADDR=198.51.100.7\r\n";

const EHLO_MX: &str = "250-mx.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n\
    250-SIZE 10240000\r\n250-8BITMIME\r\n250-CHUNKING\r\n250 STARTTLS\r\n";

#[test]
fn one_recipient_full_session() {
    let (mut h, greeting) = H::new(mx());
    assert_eq!(greeting, "220 mx.test ESMTP Postern ready\r\n");
    assert_eq!(h.c(b"EHLO sender.example\r\n").0, EHLO_MX);
    // MAIL is answered locally: no backend is chosen before the first RCPT.
    assert_eq!(
        h.c(b"MAIL FROM:<joe@sender.example> SIZE=500\r\n"),
        ("250 2.1.0 Ok\r\n".into(), String::new())
    );
    assert_eq!(
        h.c(b"RCPT TO:<Alice@Example.test>\r\n"),
        (String::new(), String::new())
    );
    h.expect_route("Alice@Example.test");
    let to_b = h.open_mx(a(), "sender.example", XCLIENT_V4);
    assert_eq!(
        to_b,
        "MAIL FROM:<joe@sender.example> SIZE=500\r\nRCPT TO:<Alice@Example.test>\r\n"
    );
    assert_eq!(h.r.backend(), Some(&a()));
    // The MAIL reply was already given; the RCPT reply is the backend's.
    let (c, _) = h.b(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
    assert_eq!(c, "250 2.1.5 Ok\r\n");
    assert_eq!(h.c(b"DATA\r\n"), (String::new(), "DATA\r\n".into()));
    let (c, _) = h.b(b"354 End data with <CR><LF>.<CR><LF>\r\n");
    assert_eq!(c, "354 End data with <CR><LF>.<CR><LF>\r\n");
    let (c, to_b) = h.c(b"Subject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n");
    assert_eq!(c, "");
    assert_eq!(to_b, "Subject: hi\r\n\r\nhello\r\n.\r\n");
    // QUIT waits for the answer to the data, and goes to the backend after it.
    assert_eq!(h.closed(), None);
    let (c, to_b) = h.b(b"250 2.0.0 Ok: queued as 4Xyz\r\n");
    assert_eq!(c, "250 2.0.0 Ok: queued as 4Xyz\r\n221 2.0.0 Bye\r\n");
    assert_eq!(to_b, "QUIT\r\n");
    assert_eq!(h.closed(), Some(CloseReason::Logout));
}

#[test]
fn two_recipients_same_backend() {
    let (mut h, _) = H::new(mx());
    h.c(b"EHLO sender.example\r\nMAIL FROM:<>\r\nRCPT TO:<a1@example.test>\r\n");
    h.expect_route("a1@example.test");
    h.open_mx(a(), "sender.example", XCLIENT_V4);
    let (c, _) = h.b(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
    assert_eq!(c, "250 2.1.5 Ok\r\n");
    h.c(b"RCPT TO:<a2@example.test>\r\n");
    h.expect_route("a2@example.test");
    assert_eq!(
        h.route(Route::Backend(a())),
        (String::new(), "RCPT TO:<a2@example.test>\r\n".into())
    );
    assert_eq!(h.b(b"250 2.1.5 Ok\r\n").0, "250 2.1.5 Ok\r\n");
}

#[test]
fn recipient_on_another_backend_gets_452() {
    let (mut h, _) = H::new(mx());
    h.c(b"EHLO sender.example\r\nMAIL FROM:<>\r\nRCPT TO:<a1@example.test>\r\n");
    h.expect_route("a1@example.test");
    h.open_mx(a(), "sender.example", XCLIENT_V4);
    h.b(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
    h.c(b"RCPT TO:<b1@example.test>\r\n");
    h.expect_route("b1@example.test");
    assert_eq!(
        h.route(Route::Backend(b())),
        (
            "452 4.5.3 Error: too many recipients for this connection\r\n".into(),
            String::new()
        )
    );
    assert!(h.take().is_empty(), "no second connection");
}

#[test]
fn pipelined_group_with_a_local_452_in_the_middle() {
    let (mut h, _) = H::new(mx());
    h.c(b"EHLO sender.example\r\n");
    // One read: MAIL, three RCPTs, DATA (RFC 2920).
    let (c, to_b) = h.c(
        b"MAIL FROM:<joe@sender.example>\r\nRCPT TO:<a1@example.test>\r\n\
        RCPT TO:<b1@example.test>\r\nRCPT TO:<a2@example.test>\r\nDATA\r\n",
    );
    assert_eq!((c.as_str(), to_b.as_str()), ("250 2.1.0 Ok\r\n", ""));
    h.expect_route("a1@example.test");
    let to_b = h.open_mx(a(), "sender.example", XCLIENT_V4);
    assert_eq!(
        to_b,
        "MAIL FROM:<joe@sender.example>\r\nRCPT TO:<a1@example.test>\r\n"
    );
    // The second RCPT is routed while the first reply is still outstanding.
    h.expect_route("b1@example.test");
    assert_eq!(h.route(Route::Backend(b())), (String::new(), String::new()));
    h.expect_route("a2@example.test");
    // a2 and DATA go out pipelined; nothing reaches the client out of order.
    assert_eq!(
        h.route(Route::Backend(a())),
        (
            String::new(),
            "RCPT TO:<a2@example.test>\r\nDATA\r\n".into()
        )
    );
    let (c, _) = h.b(b"250 2.1.0 Ok\r\n250 2.1.5 a1 ok\r\n");
    assert_eq!(
        c,
        "250 2.1.5 a1 ok\r\n452 4.5.3 Error: too many recipients for this connection\r\n"
    );
    let (c, _) = h.b(b"250 2.1.5 a2 ok\r\n354 go\r\n");
    assert_eq!(c, "250 2.1.5 a2 ok\r\n354 go\r\n");
    let (_, to_b) = h.c(b"body\r\n.\r\n");
    assert_eq!(to_b, "body\r\n.\r\n");
}

#[test]
fn second_transaction_stays_on_the_backend() {
    let (mut h, _) = H::new(mx());
    h.c(b"EHLO sender.example\r\nMAIL FROM:<>\r\nRCPT TO:<a1@example.test>\r\n");
    h.expect_route("a1@example.test");
    h.open_mx(a(), "sender.example", XCLIENT_V4);
    h.b(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
    h.c(b"DATA\r\n");
    h.b(b"354 go\r\n");
    h.c(b"one\r\n.\r\n");
    assert_eq!(h.b(b"250 2.0.0 queued 1\r\n").0, "250 2.0.0 queued 1\r\n");
    // Second transaction, pipelined: MAIL goes straight to the backend now, and a
    // recipient pinned to another backend is deferred.
    let (c, to_b) = h.c(
        b"MAIL FROM:<x@sender.example>\r\nRCPT TO:<b1@example.test>\r\n\
        RCPT TO:<a3@example.test>\r\nDATA\r\n",
    );
    assert_eq!(
        (c.as_str(), to_b.as_str()),
        ("", "MAIL FROM:<x@sender.example>\r\n")
    );
    h.expect_route("b1@example.test");
    assert_eq!(h.route(Route::Backend(b())), (String::new(), String::new()));
    h.expect_route("a3@example.test");
    assert_eq!(
        h.route(Route::Backend(a())).1,
        "RCPT TO:<a3@example.test>\r\nDATA\r\n"
    );
    let (c, _) = h.b(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n");
    assert_eq!(
        c,
        "250 2.1.0 Ok\r\n452 4.5.3 Error: too many recipients for this connection\r\n\
         250 2.1.5 Ok\r\n354 go\r\n"
    );
    assert!(h.take().is_empty(), "never a second backend connection");
}

#[test]
fn dot_stuffed_body_split_across_reads() {
    let (mut h, _) = H::new(mx());
    h.c(b"EHLO sender.example\r\nMAIL FROM:<>\r\nRCPT TO:<a1@example.test>\r\n");
    h.expect_route("a1@example.test");
    h.open_mx(a(), "sender.example", XCLIENT_V4);
    h.b(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
    h.c(b"DATA\r\n");
    h.b(b"354 go\r\n");
    let body = b"..leading dot\r\n.\r.\r\nbare\nlf\r\n..\r\n.\r\nNOOP\r\n";
    let mut to_b = String::new();
    for piece in body.chunks(3) {
        let (c, b) = h.c(piece);
        assert_eq!(c, "");
        to_b.push_str(&b);
    }
    // Forwarded as sent (still stuffed), a bare LF sent as CRLF, up to the end only;
    // the NOOP after it is a command again, queued behind the end of data.
    assert_eq!(to_b, "..leading dot\r\n.\r.\r\nbare\r\nlf\r\n..\r\n.\r\n");
    let (c, to_b) = h.b(b"250 2.0.0 queued\r\n");
    assert_eq!(c, "250 2.0.0 queued\r\n");
    assert_eq!(to_b, "NOOP\r\n");
    assert_eq!(h.b(b"250 2.0.0 Ok\r\n").0, "250 2.0.0 Ok\r\n");
}

#[test]
fn smuggled_end_of_data_reaches_the_backend_as_the_real_end() {
    let (mut h, _) = H::new(mx());
    h.c(b"EHLO sender.example\r\nMAIL FROM:<>\r\nRCPT TO:<a1@example.test>\r\n");
    h.expect_route("a1@example.test");
    h.open_mx(a(), "sender.example", XCLIENT_V4);
    h.b(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
    h.c(b"DATA\r\n");
    h.b(b"354 go\r\n");
    // "\n.\n" ends the data for Postern, so what follows is a command that Postern
    // routes; the backend sees a clean "\r\n.\r\n" and nothing else before it.
    let (_, to_b) = h.c(b"x\n.\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<b1@example.test>\r\n");
    assert_eq!(to_b, "x\r\n.\r\n");
    let (_, to_b) = h.b(b"250 2.0.0 queued\r\n");
    assert_eq!(to_b, "MAIL FROM:<evil@x.example>\r\n");
    h.expect_route("b1@example.test");
    assert_eq!(h.route(Route::Backend(b())).1, "");
}

#[test]
fn bdat_chunks_are_counted_and_streamed() {
    let (mut h, _) = H::new(mx());
    h.c(b"EHLO sender.example\r\nMAIL FROM:<> BODY=BINARYMIME\r\nRCPT TO:<a1@example.test>\r\n");
    h.expect_route("a1@example.test");
    h.open_mx(a(), "sender.example", XCLIENT_V4);
    h.b(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
    // Chunk bytes that look like commands (even an end of data) are only data.
    let (c, to_b) = h.c(b"BDAT 11\r\n.\r\nQUIT\r\nxxBDAT 5 LA");
    assert_eq!(c, "");
    assert_eq!(to_b, "BDAT 11\r\n.\r\nQUIT\r\nxx");
    let (_, to_b) = h.c(b"ST\r\nab");
    assert_eq!(to_b, "BDAT 5 LAST\r\nab");
    // The MAIL of the next transaction waits for the reply to BDAT LAST.
    let (_, to_b) = h.c(b"c\r\nMAIL FROM:<>\r\n");
    assert_eq!(to_b, "c\r\n");
    let (c, to_b) = h.b(b"250 2.0.0 11 octets\r\n250 2.0.0 queued\r\n");
    assert_eq!(c, "250 2.0.0 11 octets\r\n250 2.0.0 queued\r\n");
    assert_eq!(to_b, "MAIL FROM:<>\r\n");
}

#[test]
fn bdat_without_backend_chunking_is_refused_and_skipped() {
    let (mut h, _) = H::new(mx());
    h.c(b"EHLO sender.example\r\nMAIL FROM:<>\r\nRCPT TO:<a1@example.test>\r\n");
    h.expect_route("a1@example.test");
    h.route(Route::Backend(a()));
    h.take();
    h.r.handle_backend_connected();
    h.b(b"220 old\r\n");
    h.b(b"250-old\r\n250 XCLIENT ADDR\r\n");
    h.b(b"220 old\r\n");
    let (_, to_b) = h.b(b"250-old\r\n250 PIPELINING\r\n");
    assert_eq!(to_b, "MAIL FROM:<>\r\nRCPT TO:<a1@example.test>\r\n");
    h.b(b"250 ok\r\n250 ok\r\n");
    let (c, to_b) = h.c(b"BDAT 6 LAST\r\nRSET\r\nRSET\r\n");
    assert_eq!(
        c,
        "451 4.3.0 Error: BDAT not supported by the mail store\r\n"
    );
    assert_eq!(to_b, "RSET\r\n");
}

#[test]
fn lmtp_replies_per_recipient() {
    let (mut h, greeting) = H::new(lmtp());
    assert_eq!(greeting, "220 lmtp.test LMTP Postern ready\r\n");
    assert_eq!(
        h.c(b"EHLO x\r\n").0,
        "500 5.5.1 Error: use LHLO in LMTP\r\n"
    );
    assert!(matches!(h.take()[..], [RelayEvent::Rejected(_)]));
    assert_eq!(
        h.c(b"LHLO mta.test\r\n").0,
        "250-lmtp.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n"
    );
    h.c(
        b"MAIL FROM:<s@x.test>\r\nRCPT TO:<u1@example.test>\r\nRCPT TO:<u2@example.test>\r\n\
        RCPT TO:<u3@example.test>\r\nDATA\r\n",
    );
    h.expect_route("u1@example.test");
    h.route(Route::Backend(a()));
    assert_eq!(h.take(), [RelayEvent::Connect(a())]);
    h.r.handle_backend_connected();
    // No XCLIENT for LMTP by default: the client's LHLO is replayed directly.
    let (_, to_b) = h.b(b"220 store-a LMTP ready\r\n");
    assert_eq!(to_b, "LHLO mta.test\r\n");
    let (_, to_b) =
        h.b(b"250-store-a\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 PIPELINING\r\n");
    assert_eq!(
        to_b,
        "MAIL FROM:<s@x.test>\r\nRCPT TO:<u1@example.test>\r\n"
    );
    h.expect_route("u2@example.test");
    assert_eq!(
        h.route(Route::Backend(a())).1,
        "RCPT TO:<u2@example.test>\r\n"
    );
    h.expect_route("u3@example.test");
    assert_eq!(
        h.route(Route::Backend(a())).1,
        "RCPT TO:<u3@example.test>\r\nDATA\r\n"
    );
    let (c, _) = h.b(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n550 5.1.1 <u2@example.test> User doesn't exist\r\n250 2.1.5 OK\r\n354 OK\r\n");
    // The MAIL reply is Postern's own (given before any backend was chosen).
    assert_eq!(
        c,
        "250 2.1.5 OK\r\n550 5.1.1 <u2@example.test> User doesn't exist\r\n\
         250 2.1.5 OK\r\n354 OK\r\n"
    );
    h.c(b"msg\r\n.\r\nQUIT\r\n");
    // Two recipients accepted: two replies after the data, relayed as they come.
    let (c, to_b) = h.b(b"250 2.0.0 <u1@example.test> Saved\r\n");
    assert_eq!(c, "250 2.0.0 <u1@example.test> Saved\r\n");
    assert_eq!(to_b, "");
    assert_eq!(h.closed(), None);
    let (c, to_b) = h.b(b"452 4.2.2 <u3@example.test> Quota exceeded\r\n");
    assert_eq!(
        c,
        "452 4.2.2 <u3@example.test> Quota exceeded\r\n221 2.0.0 Bye\r\n"
    );
    assert_eq!(to_b, "QUIT\r\n");
    assert_eq!(h.closed(), Some(CloseReason::Logout));
}

#[test]
fn lmtp_bdat_last_gets_one_reply_per_recipient() {
    let (mut h, _) = H::new(RelayOptions {
        xclient: true,
        ..lmtp()
    });
    h.c(b"LHLO mta.test\r\nMAIL FROM:<>\r\nRCPT TO:<u1@example.test>\r\n");
    h.expect_route("u1@example.test");
    h.route(Route::Backend(a()));
    h.take();
    h.r.handle_backend_connected();
    assert_eq!(h.b(b"220 dovecot\r\n").1, "LHLO lmtp.test\r\n");
    // Dovecot-style XCLIENT: ADDR without the IPV6: prefix for LMTP.
    let (_, to_b) = h.b(b"250-dovecot\r\n250 XCLIENT ADDR PORT TTL TIMEOUT HELO LOGIN\r\n");
    assert_eq!(
        to_b,
        "XCLIENT HELO=mta.test PORT=40000 ADDR=198.51.100.7\r\n"
    );
    assert_eq!(h.b(b"220 dovecot\r\n").1, "LHLO mta.test\r\n");
    h.b(b"250-dovecot\r\n250-PIPELINING\r\n250 CHUNKING\r\n");
    h.c(b"RCPT TO:<u2@example.test>\r\n");
    h.expect_route("u2@example.test");
    h.route(Route::Backend(a()));
    // BDAT LAST pipelined before the RCPT replies are in: the reply count is taken
    // when the first reply to it arrives.
    let (_, to_b) = h.c(b"BDAT 3 LAST\r\nabc");
    assert_eq!(to_b, "BDAT 3 LAST\r\nabc");
    let (c, _) = h.b(b"250 ok\r\n250 ok\r\n250 ok\r\n250 saved u1\r\n");
    assert_eq!(c, "250 ok\r\n250 ok\r\n250 saved u1\r\n");
    assert_eq!(h.b(b"250 saved u2\r\n").0, "250 saved u2\r\n");
}

#[test]
fn ipv6_client_and_client_name() {
    let (mut h, _) = H::at(mx(), "[2001:db8::25]:2525");
    h.r.set_client_name("mail.sender.example");
    h.c(b"HELO sender.example\r\nMAIL FROM:<>\r\nRCPT TO:<a1@example.test>\r\n");
    h.expect_route("a1@example.test");
    h.route(Route::Backend(a()));
    h.take();
    h.r.handle_backend_connected();
    h.b(b"220 x\r\n");
    // Only the attributes this backend lists; HELO client → PROTO=SMTP, HELO replayed.
    let (_, to_b) = h.b(b"250-x\r\n250 XCLIENT ADDR NAME PROTO\r\n");
    assert_eq!(
        to_b,
        "XCLIENT PROTO=SMTP NAME=mail.sender.example ADDR=IPV6:2001:db8::25\r\n"
    );
    assert_eq!(h.b(b"220 x\r\n").1, "HELO sender.example\r\n");
    // Without PIPELINING (HELO gives no extensions) commands go one at a time.
    assert_eq!(h.b(b"250 x\r\n").1, "MAIL FROM:<>\r\n");
    assert_eq!(h.b(b"250 ok\r\n").1, "RCPT TO:<a1@example.test>\r\n");
}

#[test]
fn backend_without_xclient_is_not_used() {
    let (mut h, _) = H::new(mx());
    h.c(b"EHLO sender.example\r\nMAIL FROM:<>\r\nRCPT TO:<a1@example.test>\r\n");
    h.expect_route("a1@example.test");
    h.route(Route::Backend(a()));
    h.take();
    h.r.handle_backend_connected();
    h.b(b"220 x\r\n");
    let (c, to_b) = h.b(b"250-x\r\n250 PIPELINING\r\n");
    assert_eq!(
        c,
        "451 4.4.1 Error: mail store temporarily unavailable, try again later\r\n"
    );
    assert_eq!(to_b, "");
    assert!(matches!(h.take()[..], [RelayEvent::CloseBackend(_)]));
    // The same backend is not dialled again in this session...
    h.c(b"RCPT TO:<a2@example.test>\r\n");
    h.expect_route("a2@example.test");
    assert!(h.route(Route::Backend(a())).0.starts_with("451 4.4.1"));
    // ...but another one is, and the locally answered MAIL is replayed to it.
    h.c(b"RCPT TO:<b1@example.test>\r\n");
    h.expect_route("b1@example.test");
    h.route(Route::Backend(b()));
    assert_eq!(h.take(), [RelayEvent::Connect(b())]);
    h.r.handle_backend_closed();
    assert!(h.drain().0.starts_with("451 4.4.1"));
}

#[test]
fn route_failures_and_limits() {
    let (mut h, _) = H::new(RelayOptions {
        max_recipients: 2,
        ..mx()
    });
    h.c(b"EHLO sender.example\r\nMAIL FROM:<>\r\nRCPT TO:<x@example.test>\r\n");
    h.expect_route("x@example.test");
    assert_eq!(
        h.route(Route::TempFail).0,
        "450 4.3.0 <x@example.test>: Recipient address temporarily unavailable, try again later\r\n"
    );
    h.c(b"RCPT TO:<y@example.test>\r\n");
    h.expect_route("y@example.test");
    assert_eq!(
        h.route(Route::Reject).0,
        "550 5.1.1 <y@example.test>: Recipient address rejected: User unknown\r\n"
    );
    let (c, _) = h.c(b"RCPT TO:<z@example.test>\r\nDATA\r\nBDAT 3\r\nabcRSET\r\n");
    assert_eq!(
        c,
        "452 4.5.3 Error: too many recipients\r\n554 5.5.1 Error: no valid recipients\r\n\
         554 5.5.1 Error: no valid recipients\r\n250 2.0.0 Ok\r\n"
    );
}

#[test]
fn sequence_errors() {
    let (mut h, _) = H::new(mx());
    let (c, _) = h.c(
        b"MAIL FROM:<>\r\nEHLO sender.example\r\nRCPT TO:<a@b.example>\r\nDATA\r\n\
        MAIL FROM:<>\r\nMAIL FROM:<>\r\nAUTH PLAIN AAAA\r\nBDAT 4 LAST\r\nQUITRSET\r\n",
    );
    assert_eq!(
        c,
        format!(
            "503 5.5.1 Error: send HELO/EHLO first\r\n{EHLO_MX}\
             503 5.5.1 Error: need MAIL command\r\n503 5.5.1 Error: need MAIL command\r\n\
             250 2.1.0 Ok\r\n503 5.5.1 Error: nested MAIL command\r\n\
             503 5.5.1 Error: authentication not enabled\r\n\
             554 5.5.1 Error: no valid recipients\r\n250 2.0.0 Ok\r\n"
        )
    );
    assert!(
        h.events
            .iter()
            .all(|e| matches!(e, RelayEvent::Rejected(_)))
    );
}

#[test]
fn mail_refused_by_backend_after_local_250() {
    let (mut h, _) = H::new(mx());
    h.c(b"EHLO sender.example\r\nMAIL FROM:<spam@bad.example>\r\nRCPT TO:<a1@example.test>\r\n");
    h.expect_route("a1@example.test");
    h.open_mx(a(), "sender.example", XCLIENT_V4);
    // The client already has its 250 for MAIL; the refusal stands in for the RCPT
    // reply, instead of the backend's confusing "need MAIL command".
    let (c, _) = h.b(b"554 5.7.1 <spam@bad.example>: Sender address rejected\r\n\
        503 5.5.1 Error: need MAIL command\r\n");
    assert_eq!(
        c,
        "554 5.7.1 <spam@bad.example>: Sender address rejected\r\n"
    );
}

#[test]
fn starttls_discards_injected_commands() {
    let (mut h, _) = H::new(mx());
    h.c(b"EHLO sender.example\r\n");
    let (c, _) = h.c(b"STARTTLS\r\nMAIL FROM:<>\r\nRCPT TO:<a@example.test>\r\n");
    assert_eq!(c, "220 2.0.0 Ready to start TLS\r\n");
    assert!(matches!(
        h.take()[..],
        [RelayEvent::Rejected(_), RelayEvent::StartTls]
    ));
    h.r.handle_tls_ready();
    assert_eq!(h.drain(), (String::new(), String::new()));
    assert!(h.take().is_empty(), "no routing of injected RCPT");
    let (c, _) = h.c(b"MAIL FROM:<>\r\nEHLO sender.example\r\n");
    assert!(c.starts_with("503 5.5.1 Error: send HELO/EHLO first\r\n"));
    assert!(!c.contains("STARTTLS"), "{c}");
    assert_eq!(
        h.c(b"STARTTLS\r\n").0,
        "503 5.5.1 Error: TLS already active\r\n"
    );
}

#[test]
fn backend_lost_mid_transaction() {
    let (mut h, _) = H::new(mx());
    h.c(b"EHLO sender.example\r\nMAIL FROM:<>\r\nRCPT TO:<a1@example.test>\r\n");
    h.expect_route("a1@example.test");
    h.open_mx(a(), "sender.example", XCLIENT_V4);
    h.b(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
    h.c(b"DATA\r\n");
    h.b(b"354 go\r\n");
    h.c(b"partial body\r\n");
    h.r.handle_backend_closed();
    let (c, _) = h.drain();
    assert_eq!(c, "421 4.4.2 Error: connection to the mail store lost\r\n");
    assert_eq!(h.closed(), Some(CloseReason::Internal));
    // Nothing more is read.
    assert_eq!(h.c(b".\r\n"), (String::new(), String::new()));
}

#[test]
fn backend_421_is_relayed_and_ends_the_session() {
    let (mut h, _) = H::new(mx());
    h.c(b"EHLO sender.example\r\nMAIL FROM:<>\r\nRCPT TO:<a1@example.test>\r\n");
    h.expect_route("a1@example.test");
    h.open_mx(a(), "sender.example", XCLIENT_V4);
    let (c, _) = h.b(b"250 2.1.0 Ok\r\n421 4.3.2 Service shutting down\r\n");
    assert_eq!(c, "421 4.3.2 Service shutting down\r\n");
    assert_eq!(h.closed(), Some(CloseReason::Internal));
}

#[test]
fn idle_backend_may_go_away_and_a_new_one_is_opened() {
    let (mut h, _) = H::new(mx());
    h.c(b"EHLO sender.example\r\nMAIL FROM:<>\r\nRCPT TO:<a1@example.test>\r\n");
    h.expect_route("a1@example.test");
    h.open_mx(a(), "sender.example", XCLIENT_V4);
    h.b(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
    let (_, to_b) = h.c(b"RSET\r\n");
    assert_eq!(to_b, "RSET\r\n");
    h.b(b"250 2.0.0 Ok\r\n");
    // Postfix times out the idle session.
    h.b(b"421 4.4.2 store-a.test Error: timeout exceeded\r\n");
    assert!(matches!(h.take()[..], [RelayEvent::CloseBackend(_)]));
    assert_eq!(h.r.backend(), None);
    assert_eq!(h.closed(), None);
    h.c(b"MAIL FROM:<>\r\nRCPT TO:<b1@example.test>\r\n");
    h.expect_route("b1@example.test");
    h.route(Route::Backend(b()));
    assert_eq!(h.take(), [RelayEvent::Connect(b())]);
}

#[test]
fn back_pressure_and_shutdown() {
    let (mut h, _) = H::new(RelayOptions {
        max_pipelined: 100,
        ..mx()
    });
    h.c(b"EHLO sender.example\r\nMAIL FROM:<>\r\nRCPT TO:<a1@example.test>\r\n");
    h.expect_route("a1@example.test");
    assert!(h.r.wants_client_input());
    h.c(&b"RCPT TO:<more@example.test>\r\n".repeat(4));
    assert!(
        !h.r.wants_client_input(),
        "waiting for routing, input piling up"
    );
    // A driver that keeps reading anyway: the session ends.
    assert_eq!(
        h.c(&[b'x'; 300]).0,
        "421 4.7.0 Error: too much pipelined input\r\n"
    );
    assert_eq!(h.closed(), Some(CloseReason::InputTooLong));
    assert!(!h.r.wants_client_input());
    // The routing answer that comes too late changes nothing.
    assert_eq!(h.route(Route::Backend(a())), (String::new(), String::new()));

    let (mut h, _) = H::new(mx());
    h.c(b"EHLO sender.example\r\nMAIL FROM:<>\r\nRCPT TO:<a1@example.test>\r\n");
    h.expect_route("a1@example.test");
    h.r.shutdown(Shutdown::ServerShutdown);
    assert_eq!(h.drain().0, "421 4.3.2 mx.test Service shutting down\r\n");
    assert_eq!(h.closed(), Some(CloseReason::Internal));
}

#[test]
fn many_local_replies_do_not_stall() {
    let (mut h, _) = H::new(RelayOptions {
        max_pending: 4,
        ..mx()
    });
    let (c, _) = h.c(&b"NOOP\r\n".repeat(50));
    assert_eq!(c.matches("250 2.0.0 Ok\r\n").count(), 50);
}

#[test]
fn overlong_line_and_error_budget() {
    let (mut h, _) = H::new(mx());
    assert_eq!(h.c(&[b'a'; 5000]).0, "500 5.5.0 Error: line too long\r\n");
    assert_eq!(h.closed(), Some(CloseReason::InputTooLong));
    let (mut h, _) = H::new(mx());
    let (c, _) = h.c(&b"FOO\r\n".repeat(12));
    assert!(c.ends_with(
        "500 5.5.2 Error: command not recognized\r\n421 4.7.0 mx.test Error: too many errors\r\n"
    ));
    assert_eq!(c.matches("500 ").count(), 11);
    assert_eq!(h.closed(), Some(CloseReason::TooManyErrors));
}

#[test]
fn a_client_that_pipelines_and_does_not_read_gets_bounded_batches() {
    let (mut h, _) = H::new(mx());
    // 4 000 EHLOs: ~32 KB in, ~500 KB of replies if all were answered at once.
    h.r.handle_client_input(&b"EHLO x\r\n".repeat(4000));
    let mut answered = 0;
    let mut batches = 0;
    loop {
        let mut out = Vec::new();
        h.r.poll_transmit_client(&mut out);
        // One batch may reach the bound plus one reply, no more.
        assert!(out.len() < 20 * 1024, "a batch of {} bytes", out.len());
        answered += out.windows(4).filter(|w| w == b"250 ").count();
        batches += 1;
        if !h.r.has_client_output() {
            break;
        }
        assert!(batches < 1000, "no progress");
    }
    assert_eq!(answered, 4000);
    assert!(batches > 10, "{batches} batches");
    assert!(h.r.wants_client_input());
}
