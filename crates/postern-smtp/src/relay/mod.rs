//! The transaction-aware relay for MX (port 25, RFC 5321) and LMTP (RFC 2033): each
//! recipient is routed, and every transaction of the connection goes to the one backend
//! the connection is pinned to.
//!
//! A blind byte relay after the first RCPT would be simpler, and wrong: the second
//! transaction on the same connection (an MTA delivers a whole queue that way) could be
//! for a user pinned elsewhere. So the relay stays in the middle for the whole session:
//!
//! - the first RCPT is routed ([`RelayEvent::RouteRecipient`]); the driver names the
//!   backend, connects ([`RelayEvent::Connect`]), and the machine opens the backend
//!   session (XCLIENT with the real client address for MX; see `handshake.rs`), replays
//!   the MAIL it has answered itself, then the RCPT; the backend's RCPT reply goes to the
//!   client;
//! - every later RCPT is routed as well: same backend → forwarded; another backend →
//!   `452 4.5.3` answered locally, so the sender retries that recipient in a later
//!   transaction (RFC 5321 §4.5.3.1.10), which on a new connection reaches its own
//!   backend. Later transactions on this connection stay with this backend;
//! - DATA bodies are streamed, never held (`body.rs`); BDAT chunks are counted and
//!   streamed; LMTP's per-recipient replies after the data are relayed in order;
//! - replies come back in command order whoever answers them (`slots.rs`).
//!
//! ```text
//!  client side (Mode)
//!   220 ─▶ Command ─RCPT─▶ WaitRoute ─handle_route─┬─ same backend / reject ─▶ Command
//!            ▲  │                                  └─ no backend yet ─▶ WaitBackend
//!            │  ├─DATA (forwarded)─▶ WaitData ─354─▶ Body ─"."─▶ Command    │ handshake
//!            │  │                        └─other reply─▶ Command            │ done or
//!            │  ├─BDAT n─▶ Chunk (n bytes, forwarded or discarded) ─▶ Command failed
//!            │  ├─STARTTLS (MX)─▶ WaitTls ─handle_tls_ready─▶ Command       ▼
//!            └──┴──────────────────────────────────────────────────────── Command
//!   QUIT, too many errors, line too long, backend lost ─▶ Closed (Close once replies are out)
//!
//!  backend side
//!   None ─route─▶ Connecting ─handle_backend_connected─▶ Handshake ─▶ Ready
//!     ▲                 └──────── failure (451 4.4.1 to that RCPT, CloseBackend) ──┘ │
//!     └──── backend closed while idle (no transaction on it) ◀──────────────────────┘
//!   backend closed or garbage during a transaction ─▶ 421 to the client, Close
//! ```
//!
//! ## The driver contract
//!
//! After every `handle_*` call (and [`Relay::shutdown`]) the driver MUST, in order:
//! drain [`Relay::poll_transmit_client`] and send it to the client, drain
//! [`Relay::poll_transmit_backend`] and send it to the backend, then act on each
//! [`Relay::poll_event`] until it returns `None`. Bytes always go out before the event
//! after them is acted on (the `220` to STARTTLS precedes the handshake).
//!
//! - [`RelayEvent::RouteRecipient`]: look the address up (the driver's policy decides
//!   for unknown recipients), then call [`Relay::handle_route`]. No further client
//!   command is processed until then.
//! - [`RelayEvent::Connect`]: open a TCP connection to that backend, then call
//!   [`Relay::handle_backend_connected`], or [`Relay::handle_backend_closed`] if it
//!   fails. Feed backend bytes to [`Relay::handle_backend_input`].
//! - [`RelayEvent::CloseBackend`]: flush backend output and close the backend connection;
//!   the client session goes on (a later RCPT may ask for a new one).
//! - [`RelayEvent::StartTls`]: run the TLS server handshake, then
//!   [`Relay::handle_tls_ready`].
//! - [`RelayEvent::Close`]: flush both sides and close both connections.
//! - Backend EOF or error: [`Relay::handle_backend_closed`]. Client EOF: close both
//!   connections without sending anything more to the backend (a message cut short
//!   never gets its final `.`, so the backend discards it).
//! - Read from the client only while [`Relay::wants_client_input`] is true: that is the
//!   back-pressure of pipelined input while a command waits for routing or the backend.
//! - Timeouts live in the driver; on one it calls [`Relay::shutdown`].
//! - After [`RelayEvent::Close`] every call is ignored.

mod backend;
mod client;
mod slots;

use std::collections::VecDeque;
use std::sync::Arc;

use postern_proto::lines::LineBuf;
use postern_proto::{ClientInfo, CloseReason};

use crate::Shutdown;
use crate::body::DotScanner;
use crate::handshake::{Handshake, Verb, valid_helo};
use crate::reply::ReplyReader;
use slots::{Seq, Slots};

/// Which service a relay listener provides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RelayMode {
    /// Inbound mail from other MTAs on port 25 (RFC 5321), no AUTH.
    #[default]
    Mx,
    /// Local delivery (RFC 2033): LHLO, one reply per recipient after the data.
    Lmtp,
}

/// Settings for one MX or LMTP listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayOptions {
    /// MX or LMTP.
    pub mode: RelayMode,
    /// Postern's host name: greeting, EHLO reply, the probe EHLO before XCLIENT.
    pub hostname: String,
    /// Text after `220 <hostname> ESMTP ` (or `LMTP `).
    pub greeting: String,
    /// Extension lines to advertise, normally [`crate::advertised_extensions`] of a
    /// backend's EHLO/LHLO reply. Lines outside the allowlist are ignored; PIPELINING
    /// and ENHANCEDSTATUSCODES are always added (the relay implements them itself), and
    /// STARTTLS for MX when [`RelayOptions::starttls`] is set. Advertise CHUNKING only
    /// if every backend supports it: a BDAT for a backend without it is refused (451).
    pub extensions: Vec<String>,
    /// Offer STARTTLS (MX only; the listener has a certificate).
    pub starttls: bool,
    /// Send XCLIENT with the client's address, port, HELO and name to the backend, and
    /// refuse backends that do not accept XCLIENT ADDR. On by default for MX (the
    /// open-relay pitfall); off by default for LMTP (Dovecot LMTP takes XCLIENT from
    /// `login_trusted_networks`).
    pub xclient: bool,
    /// Longest command line, CRLF included.
    pub max_line: usize,
    /// Recipients per transaction; more get `452 4.5.3` (RFC 5321 §4.5.3.1.8 asks
    /// for at least 100).
    pub max_recipients: usize,
    /// Commands read but not yet answered; past it, input is left unread.
    pub max_pending: usize,
    /// Unprocessed client bytes above which [`Relay::wants_client_input`] turns false.
    /// Four times this closes the session (a driver that ignores the signal).
    pub max_pipelined: usize,
    /// Invalid or out-of-sequence commands tolerated before the connection is closed.
    pub max_bad_commands: u32,
}

impl RelayOptions {
    /// Defaults for an MX listener.
    pub fn mx() -> Self {
        Self {
            mode: RelayMode::Mx,
            hostname: "localhost".into(),
            greeting: "Postern ready".into(),
            extensions: vec!["8BITMIME".into()],
            starttls: true,
            xclient: true,
            max_line: 4096,
            max_recipients: 100,
            max_pending: 256,
            max_pipelined: 64 * 1024,
            max_bad_commands: 10,
        }
    }

    /// Defaults for an LMTP listener.
    pub fn lmtp() -> Self {
        Self {
            mode: RelayMode::Lmtp,
            starttls: false,
            xclient: false,
            ..Self::mx()
        }
    }
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self::mx()
    }
}

/// A backend, as the driver names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BackendId(pub String);

/// The driver's answer to [`RelayEvent::RouteRecipient`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Deliver to this backend.
    Backend(BackendId),
    /// The route store cannot answer (or the user is being moved): `450 4.3.0`, the
    /// sender queues and retries later.
    TempFail,
    /// No such recipient (the unknown-users policy rejects it): `550 5.1.1`, so the
    /// sending MTA bounces, not the backend (which would send backscatter).
    Reject,
}

/// What the relay asks the driver to do.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "an unhandled event stalls the session"]
pub enum RelayEvent {
    /// Flush client output, run a TLS server handshake, then call
    /// [`Relay::handle_tls_ready`]. Plaintext pipelined after STARTTLS is already gone.
    StartTls,
    /// Route this recipient address (as the client wrote it, without `<>` and quotes)
    /// and answer with [`Relay::handle_route`].
    RouteRecipient(String),
    /// Connect to this backend and call [`Relay::handle_backend_connected`] (or
    /// [`Relay::handle_backend_closed`] on failure).
    Connect(BackendId),
    /// Flush backend output, then close the backend connection; the reason is for the
    /// log. The client session goes on.
    CloseBackend(&'static str),
    /// Flush all output, then close both connections.
    Close(CloseReason),
    /// The client misbehaved and has been answered; for the log, never client bytes.
    Rejected(&'static str),
}

/// What a reply from the backend answers, in the order the commands went out.
#[derive(Debug)]
enum Expect {
    /// The MAIL Postern answered itself, replayed after the handshake.
    MailReplay,
    Mail {
        slot: Seq,
        txn: u64,
    },
    Rcpt {
        slot: Seq,
    },
    /// RSET from the client (`Some`) or Postern's own (after a repeated EHLO).
    Reset {
        slot: Option<Seq>,
    },
    Noop {
        slot: Seq,
    },
    Data {
        slot: Seq,
    },
    /// End of data or BDAT LAST: one reply, or for LMTP one per accepted recipient
    /// (counted when the first arrives, since all RCPT replies precede it).
    Final {
        slot: Seq,
        remaining: Option<usize>,
    },
    Bdat {
        slot: Seq,
    },
    Quit,
}

impl Expect {
    /// Commands after which nothing more may be sent before the reply (RFC 2920 §3.1).
    fn sync(&self) -> bool {
        matches!(
            self,
            Expect::Data { .. } | Expect::Noop { .. } | Expect::Final { .. } | Expect::Quit
        )
    }
}

#[derive(Debug)]
enum Backend {
    None,
    Connecting(BackendId),
    Handshake(BackendId, Box<Handshake>),
    Ready {
        id: BackendId,
        pipelining: bool,
        chunking: bool,
    },
}

#[derive(Debug)]
enum Mode {
    Command,
    /// A RCPT waits for [`Relay::handle_route`].
    WaitRoute {
        slot: Seq,
        line: Vec<u8>,
        /// For the reply when the route is refused.
        address: String,
    },
    /// The first RCPT waits for the backend connection and handshake.
    WaitBackend {
        slot: Seq,
        line: Vec<u8>,
    },
    /// DATA was forwarded; the next bytes are body only after the backend's 354.
    WaitData,
    Body(DotScanner),
    Chunk {
        remaining: usize,
        forward: bool,
    },
    WaitTls,
    Closed,
}

/// The client-side view of the current mail transaction.
#[derive(Debug)]
struct Txn {
    id: u64,
    /// The MAIL line answered locally and not yet sent to a backend.
    mail: Option<Vec<u8>>,
    /// RCPT commands counted against the limit.
    rcpts: usize,
    /// RCPT commands sent to the backend.
    forwarded: usize,
    /// BDAT seen: `Some(true)` chunks go to the backend, `Some(false)` are discarded.
    bdat: Option<bool>,
}

/// Backend failures remembered so that a broken backend is not dialled for every RCPT.
const MAX_FAILED_BACKENDS: usize = 8;

/// One MX or LMTP session: client on one side, at most one backend on the other.
#[derive(Debug)]
pub struct Relay {
    opts: Arc<RelayOptions>,
    client: ClientInfo,
    client_name: Option<String>,
    input: LineBuf,
    reader: ReplyReader,
    to_client: Vec<u8>,
    /// Commands were left unprocessed because `to_client` was full: run them once the
    /// driver has taken the output.
    held_back: bool,
    to_backend: Vec<u8>,
    events: VecDeque<RelayEvent>,
    slots: Slots,
    mode: Mode,
    tls: bool,
    helo: Option<(Verb, String)>,
    txn: Option<Txn>,
    next_txn: u64,
    backend: Backend,
    failed_backends: Vec<BackendId>,
    /// Commands waiting until the backend may take them (no PIPELINING, or after DATA).
    queue: VecDeque<(Vec<u8>, Expect)>,
    /// Replies the backend owes us, oldest first.
    in_flight: VecDeque<Expect>,
    /// RCPTs the backend accepted in its current transaction (reply order).
    stream_accepted: usize,
    /// The backend refused the replayed MAIL: its reply stands for the RCPT replies of
    /// that transaction, which would otherwise say "need MAIL command".
    stream_mail_failed: Option<Vec<u8>>,
    bad_commands: u32,
    closing: Option<CloseReason>,
    close_sent: bool,
}

impl Relay {
    /// Starts a session and queues the greeting. `client` is what the driver knows about
    /// the connection (the real client address after a trusted PROXY header).
    pub fn new(opts: Arc<RelayOptions>, client: ClientInfo) -> Self {
        let tls = client.tls;
        let mut relay = Self {
            opts,
            client,
            client_name: None,
            input: LineBuf::new(),
            reader: ReplyReader::default(),
            to_client: Vec::new(),
            held_back: false,
            to_backend: Vec::new(),
            events: VecDeque::new(),
            slots: Slots::default(),
            mode: Mode::Command,
            tls,
            helo: None,
            txn: None,
            next_txn: 0,
            backend: Backend::None,
            failed_backends: Vec::new(),
            queue: VecDeque::new(),
            in_flight: VecDeque::new(),
            stream_accepted: 0,
            stream_mail_failed: None,
            bad_commands: 0,
            closing: None,
            close_sent: false,
        };
        let kind = match relay.opts.mode {
            RelayMode::Mx => "ESMTP",
            RelayMode::Lmtp => "LMTP",
        };
        let greeting = format!(
            "220 {} {kind} {}\r\n",
            relay.opts.hostname, relay.opts.greeting
        );
        relay.slots.ready(greeting.as_bytes());
        relay.flush();
        relay
    }

    /// Sets the client's verified host name (reverse DNS checked by the driver), for the
    /// XCLIENT NAME attribute; call it before the first RCPT. Without it the backend gets
    /// `[UNAVAILABLE]`. Invalid names are ignored.
    pub fn set_client_name(&mut self, name: &str) {
        if valid_helo(name) {
            self.client_name = Some(name.to_owned());
        }
    }

    /// The backend this session is pinned to, once connected.
    pub fn backend(&self) -> Option<&BackendId> {
        match &self.backend {
            Backend::None => None,
            Backend::Connecting(id) | Backend::Handshake(id, _) | Backend::Ready { id, .. } => {
                Some(id)
            }
        }
    }

    /// Feeds bytes read from the client.
    pub fn handle_client_input(&mut self, bytes: &[u8]) {
        if self.close_sent {
            return;
        }
        match self.mode {
            Mode::Closed => return,
            // Plaintext sent before the TLS handshake: never a command (see Front).
            Mode::WaitTls => return self.rejected("discarded plaintext pipelined after STARTTLS"),
            _ => {}
        }
        self.input.push(bytes);
        self.process();
        if self.input.len() > self.opts.max_pipelined.saturating_mul(4) {
            self.rejected("too much pipelined input");
            self.abort(
                "421 4.7.0 Error: too much pipelined input",
                CloseReason::InputTooLong,
            );
        }
        self.flush();
    }

    /// Reports that the TLS handshake asked for by [`RelayEvent::StartTls`] finished.
    pub fn handle_tls_ready(&mut self) {
        if self.close_sent {
            return;
        }
        if matches!(self.mode, Mode::WaitTls) {
            self.tls = true;
            // RFC 3207 §4.2: forget everything learned before TLS; EHLO again.
            self.helo = None;
            self.mode = Mode::Command;
            self.process();
            self.flush();
        }
    }

    /// Answers the pending [`RelayEvent::RouteRecipient`].
    pub fn handle_route(&mut self, route: Route) {
        if self.close_sent {
            return;
        }
        self.route(route);
        self.pump();
        self.process();
        self.flush();
    }

    /// Reports that the connection asked for by [`RelayEvent::Connect`] is open.
    pub fn handle_backend_connected(&mut self) {
        if self.close_sent {
            return;
        }
        self.connected();
        self.flush();
    }

    /// Feeds bytes read from the backend.
    pub fn handle_backend_input(&mut self, bytes: &[u8]) {
        if self.close_sent {
            return;
        }
        self.backend_input(bytes);
        self.pump();
        self.process();
        self.flush();
    }

    /// Reports that the backend connection failed, closed or errored.
    pub fn handle_backend_closed(&mut self) {
        if self.close_sent {
            return;
        }
        self.backend_closed();
        self.pump();
        self.process();
        self.flush();
    }

    /// Ends the session from the driver's side (idle timeout, server shutdown): replies
    /// already known are sent, then a 421, then [`RelayEvent::Close`].
    pub fn shutdown(&mut self, why: Shutdown) {
        if self.close_sent {
            return;
        }
        let line = crate::shutdown_reply(why, &self.opts.hostname);
        self.abort(&line, CloseReason::Internal);
        self.flush();
    }

    /// Appends bytes to send to the client.
    pub fn poll_transmit_client(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.to_client);
        if self.held_back && !self.close_sent {
            // The driver took the backlog: answer the commands that waited behind it.
            self.held_back = false;
            self.process();
            self.flush();
        }
    }

    /// Whether [`Relay::poll_transmit_client`] has more to give without new input: a
    /// client that pipelines faster than it reads gets its answers in bounded batches,
    /// and the driver must come back for the rest before it waits for I/O.
    pub fn has_client_output(&self) -> bool {
        !self.to_client.is_empty() || self.held_back
    }

    /// Appends bytes to send to the backend.
    pub fn poll_transmit_backend(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.to_backend);
    }

    /// Returns the next action for the driver.
    pub fn poll_event(&mut self) -> Option<RelayEvent> {
        self.events.pop_front()
    }

    /// Whether the driver should read more from the client now.
    pub fn wants_client_input(&self) -> bool {
        !matches!(self.mode, Mode::Closed) && self.input.len() < self.opts.max_pipelined
    }

    fn rejected(&mut self, reason: &'static str) {
        self.events.push_back(RelayEvent::Rejected(reason));
    }

    /// Moves every reply that may be sent to the client output; emits Close once the
    /// session is closing and nothing is left to answer.
    fn flush(&mut self) {
        self.pump();
        self.slots.drain(&mut self.to_client);
        if let Some(reason) = self.closing
            && self.slots.is_empty()
            && !self.close_sent
        {
            self.close_sent = true;
            self.events.push_back(RelayEvent::Close(reason));
        }
    }

    /// Closes the session once the replies already queued are out; nothing more is
    /// read from the client.
    fn close_after(&mut self, reason: CloseReason) {
        self.closing.get_or_insert(reason);
        self.mode = Mode::Closed;
        self.input.clear();
    }

    /// Closes now: replies still waiting for the backend are dropped, `line` (a 421) is
    /// the last thing the client gets.
    fn abort(&mut self, line: &str, reason: CloseReason) {
        let mut reply = line.as_bytes().to_vec();
        if !reply.ends_with(b"\r\n") {
            reply.extend_from_slice(b"\r\n");
        }
        self.slots.cut(Some(&reply));
        self.close_after(reason);
        self.queue.clear();
    }
}

/// Replies held for the client at most, before commands wait in the input buffer:
/// EHLO is 8 bytes in and 200 out, so a client that pipelines and never reads would
/// otherwise make Postern buffer 25 times its input limit.
pub(crate) const MAX_CLIENT_OUTPUT: usize = 16 * 1024;
