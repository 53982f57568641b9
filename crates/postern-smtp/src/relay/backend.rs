//! The backend side of the relay: the handshake, sending queued commands as the
//! backend's PIPELINING allows, and matching each reply to the command it answers.

use postern_proto::CloseReason;

use super::{Backend, Expect, MAX_FAILED_BACKENDS, Mode, Relay, RelayEvent, RelayMode};
use crate::handshake::{Handshake, Plan, Step};
use crate::reply::{BackendReply, Read, ReplyReader};
use crate::xclient::ClientAttrs;

/// The reply to a RCPT whose backend cannot be reached.
pub(super) const UNAVAILABLE: &[u8] =
    b"451 4.4.1 Error: mail store temporarily unavailable, try again later\r\n";

impl Relay {
    pub(super) fn connected(&mut self) {
        if !matches!(self.backend, Backend::Connecting(_)) {
            return;
        }
        let Backend::Connecting(id) = std::mem::replace(&mut self.backend, Backend::None) else {
            return;
        };
        let (verb, helo) = self
            .helo
            .clone()
            .unwrap_or((crate::handshake::Verb::Ehlo, self.opts.hostname.clone()));
        let xclient = self.opts.xclient.then(|| ClientAttrs {
            // The real client, never Postern: the open-relay pitfall.
            client: self.client.client,
            local: self.client.local,
            name: self.client_name.clone(),
            helo: Some(helo.clone()),
            proto: verb.proto(),
            login: None,
            // Dovecot LMTP before 2.3.x wants IPv6 without the Postfix prefix.
            ipv6_prefix: self.opts.mode == RelayMode::Mx,
        });
        let plan = Plan {
            hostname: self.opts.hostname.clone(),
            verb,
            helo,
            xclient,
        };
        self.reader = ReplyReader::default();
        self.stream_accepted = 0;
        self.stream_mail_failed = None;
        self.backend = Backend::Handshake(id, Box::new(Handshake::new(plan)));
    }

    pub(super) fn backend_input(&mut self, bytes: &[u8]) {
        if matches!(self.backend, Backend::Connecting(_)) {
            // Bytes before the "connected" call: the connection is evidently open.
            self.connected();
        }
        if matches!(self.backend, Backend::None) {
            return;
        }
        self.reader.push(bytes);
        loop {
            match self.reader.next() {
                Read::Incomplete => return,
                Read::Invalid => return self.backend_failed("backend sent an invalid reply"),
                Read::Reply(reply) => self.on_reply(reply),
            }
            if matches!(self.backend, Backend::None) {
                return;
            }
        }
    }

    fn on_reply(&mut self, reply: BackendReply) {
        match std::mem::replace(&mut self.backend, Backend::None) {
            Backend::Handshake(id, mut hs) => match hs.on_reply(&reply, &mut self.to_backend) {
                Step::Wait => self.backend = Backend::Handshake(id, hs),
                Step::Ready { extensions, .. } => {
                    self.backend = Backend::Ready {
                        id,
                        pipelining: extensions.has("PIPELINING"),
                        chunking: extensions.has("CHUNKING"),
                    };
                    self.handshake_done();
                }
                Step::Failed(reason) => {
                    self.remember_failure(id);
                    self.handshake_failed(reason);
                }
            },
            ready @ Backend::Ready { .. } => {
                self.backend = ready;
                match self.in_flight.pop_front() {
                    Some(expect) => self.dispatch(expect, reply),
                    None => self.unsolicited(&reply),
                }
            }
            other => self.backend = other,
        }
    }

    /// The first RCPT can go: replay the MAIL answered locally, then the RCPT.
    fn handshake_done(&mut self) {
        if !matches!(self.mode, Mode::WaitBackend { .. }) {
            return;
        }
        let Mode::WaitBackend { slot, line } = std::mem::replace(&mut self.mode, Mode::Command)
        else {
            return;
        };
        if let Some(txn) = &mut self.txn {
            if let Some(mail) = txn.mail.take() {
                self.queue.push_back((mail, Expect::MailReplay));
            }
            txn.forwarded += 1;
        }
        self.queue.push_back((line, Expect::Rcpt { slot }));
    }

    fn remember_failure(&mut self, id: super::BackendId) {
        if self.failed_backends.len() < MAX_FAILED_BACKENDS {
            self.failed_backends.push(id);
        }
    }

    /// The backend could not be opened: the waiting RCPT gets a temporary failure and
    /// the client session goes on without a backend.
    fn handshake_failed(&mut self, reason: &'static str) {
        self.backend = Backend::None;
        self.reader = ReplyReader::default();
        self.in_flight.clear();
        self.queue.clear();
        if let Mode::WaitBackend { slot, .. } = self.mode {
            self.slots.fill(slot, UNAVAILABLE, true);
            self.mode = Mode::Command;
        }
        self.events.push_back(RelayEvent::CloseBackend(reason));
    }

    fn dispatch(&mut self, expect: Expect, reply: BackendReply) {
        let lmtp = self.opts.mode == RelayMode::Lmtp;
        match expect {
            Expect::MailReplay => {
                self.stream_reset();
                if !reply.is_success() {
                    self.stream_mail_failed = Some(reply.bytes.clone());
                }
            }
            Expect::Mail { slot, txn } => {
                self.stream_reset();
                if !reply.is_success() && self.txn.as_ref().is_some_and(|t| t.id == txn) {
                    // The client saw the refusal: its next MAIL is not nested.
                    self.txn = None;
                }
                self.slots.fill(slot, &reply.bytes, true);
            }
            Expect::Rcpt { slot } => {
                if reply.is_success() {
                    self.stream_accepted += 1;
                    self.slots.fill(slot, &reply.bytes, true);
                } else {
                    let bytes = self.stream_mail_failed.as_ref().unwrap_or(&reply.bytes);
                    self.slots.fill(slot, bytes, true);
                }
            }
            Expect::Reset { slot } => {
                self.stream_reset();
                if let Some(slot) = slot {
                    self.slots.fill(slot, &reply.bytes, true);
                }
            }
            Expect::Noop { slot } | Expect::Bdat { slot } => {
                self.slots.fill(slot, &reply.bytes, true);
            }
            Expect::Data { slot } => {
                self.slots.fill(slot, &reply.bytes, true);
                if matches!(self.mode, Mode::WaitData) {
                    self.mode = if reply.code == 354 {
                        Mode::Body(Default::default())
                    } else {
                        Mode::Command
                    };
                }
            }
            Expect::Final { slot, remaining } => {
                // RFC 2033 §4.2: one reply per RCPT the backend accepted. With none
                // accepted the backend answers DATA/BDAT once, with an error.
                let expected =
                    remaining.unwrap_or(if lmtp { self.stream_accepted.max(1) } else { 1 });
                let left = expected.saturating_sub(1);
                self.slots.fill(slot, &reply.bytes, left == 0);
                if left == 0 {
                    self.stream_reset();
                } else {
                    self.in_flight.push_front(Expect::Final {
                        slot,
                        remaining: Some(left),
                    });
                }
            }
            Expect::Quit => {}
        }
        if reply.code == 421 {
            // The backend is closing; its 421 went to the client as the answer.
            self.lost(None);
        }
    }

    fn stream_reset(&mut self) {
        self.stream_accepted = 0;
        self.stream_mail_failed = None;
    }

    /// A reply nobody asked for: a backend timing out (421) while the client is idle,
    /// or garbage.
    fn unsolicited(&mut self, reply: &BackendReply) {
        if self.idle() {
            self.drop_backend(if reply.code == 421 {
                "backend closed the session"
            } else {
                "unexpected reply from backend"
            });
        } else {
            self.lost(Some(LOST));
        }
    }

    /// No transaction lives on the backend and nothing is owed: it can go quietly and
    /// a later RCPT may open another one.
    fn idle(&self) -> bool {
        let txn_on_backend = self.txn.as_ref().is_some_and(|t| t.mail.is_none());
        self.in_flight.is_empty()
            && self.queue.is_empty()
            && !txn_on_backend
            && matches!(self.mode, Mode::Command | Mode::Closed | Mode::WaitTls)
    }

    fn drop_backend(&mut self, reason: &'static str) {
        self.backend = Backend::None;
        self.reader = ReplyReader::default();
        self.events.push_back(RelayEvent::CloseBackend(reason));
    }

    fn backend_failed(&mut self, reason: &'static str) {
        match &self.backend {
            Backend::Connecting(id) | Backend::Handshake(id, _) => {
                let id = id.clone();
                self.remember_failure(id);
                self.handshake_failed(reason);
            }
            Backend::Ready { .. } if self.idle() => self.drop_backend(reason),
            Backend::Ready { .. } => self.lost(Some(LOST)),
            Backend::None => {}
        }
    }

    pub(super) fn backend_closed(&mut self) {
        match &self.backend {
            Backend::Ready { .. } if self.idle() => {
                // The driver knows the connection is gone; nothing to close.
                self.backend = Backend::None;
                self.reader = ReplyReader::default();
            }
            _ => self.backend_failed("backend connection closed"),
        }
    }

    /// The backend went away in the middle of something: the client gets a 421 in
    /// place of the first missing reply (unless `line` is `None`: the backend's own 421
    /// was relayed), and the session closes.
    fn lost(&mut self, line: Option<&[u8]>) {
        // Already closing with every reply out: nothing more to tell the client.
        let line = line.filter(|_| self.closing.is_none() || !self.slots.is_empty());
        self.backend = Backend::None;
        self.in_flight.clear();
        self.queue.clear();
        self.slots.cut(line);
        self.close_after(CloseReason::Internal);
    }

    /// Whether a command may be written to the backend now (RFC 2920: only after the
    /// replies to earlier commands without PIPELINING, and never after DATA, NOOP, QUIT
    /// or the end of data before their reply).
    pub(super) fn may_send(&self) -> bool {
        let Backend::Ready { pipelining, .. } = self.backend else {
            return false;
        };
        self.in_flight.is_empty() || (pipelining && !self.in_flight.iter().any(Expect::sync))
    }

    /// Sends queued commands as far as the backend allows.
    pub(super) fn pump(&mut self) {
        while !self.queue.is_empty() && self.may_send() {
            let Some((bytes, expect)) = self.queue.pop_front() else {
                return;
            };
            self.to_backend.extend_from_slice(&bytes);
            self.in_flight.push_back(expect);
        }
    }
}

const LOST: &[u8] = b"421 4.4.2 Error: connection to the mail store lost\r\n";
