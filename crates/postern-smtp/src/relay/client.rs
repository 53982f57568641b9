//! The client side of the relay: reading commands in order and deciding, for each,
//! whether Postern answers it, the backend does, or routing must come first.

use postern_proto::CloseReason;
use postern_proto::lines::Line;

use super::{Backend, Expect, Mode, Relay, RelayEvent, RelayMode, Route, Txn};
use crate::command::{self, Command};
use crate::ehlo;
use crate::front::multi_line;
use crate::handshake::{Verb, valid_helo};

/// Whether a command line was used, or must stay in the buffer until the backend can
/// take it (BDAT, whose data follows at once and is never buffered).
enum Flow {
    Consumed,
    Blocked,
}

impl Relay {
    /// Runs complete commands (and body or chunk data) until one needs the driver.
    pub(super) fn process(&mut self) {
        loop {
            match &self.mode {
                Mode::Command => {}
                Mode::Body(_) => {
                    if !self.body() {
                        return;
                    }
                    continue;
                }
                Mode::Chunk { .. } => {
                    if !self.chunk() {
                        return;
                    }
                    continue;
                }
                Mode::WaitRoute { .. }
                | Mode::WaitBackend { .. }
                | Mode::WaitData
                | Mode::WaitTls
                | Mode::Closed => return,
            }
            // Answered slots do not count against the limit: only commands still
            // waiting for routing or the backend do.
            self.slots.drain(&mut self.to_client);
            if self.slots.len() >= self.opts.max_pending {
                return;
            }
            if self.to_client.len() >= super::MAX_CLIENT_OUTPUT {
                self.held_back = true;
                return;
            }
            match self.input.poll(self.opts.max_line) {
                Line::Incomplete => return,
                Line::TooLong => {
                    // The rest of the line could look like a command: no resync.
                    self.slots.ready(b"500 5.5.0 Error: line too long\r\n");
                    self.rejected("line too long");
                    return self.close_after(CloseReason::InputTooLong);
                }
                Line::Complete(len) => {
                    let raw = self.input.raw(len).to_vec();
                    match self.command(&raw) {
                        Flow::Consumed => self.input.consume(len),
                        Flow::Blocked => return,
                    }
                }
            }
        }
    }

    /// Streams body bytes to the backend; true once the end of data was found.
    fn body(&mut self) -> bool {
        let Mode::Body(scanner) = &mut self.mode else {
            return false;
        };
        let n = self.input.len();
        if n == 0 {
            return false;
        }
        let (used, end) = scanner.feed(self.input.raw(n), &mut self.to_backend);
        self.input.consume(used);
        if end {
            let slot = self.slots.pending();
            self.in_flight.push_back(Expect::Final {
                slot,
                remaining: None,
            });
            self.txn = None;
            self.mode = Mode::Command;
        }
        end
    }

    /// Passes on (or drops) BDAT chunk bytes; true once the chunk is complete.
    fn chunk(&mut self) -> bool {
        let Mode::Chunk { remaining, forward } = &mut self.mode else {
            return false;
        };
        let n = (*remaining).min(self.input.len());
        if *forward {
            self.to_backend.extend_from_slice(self.input.raw(n));
        }
        *remaining -= n;
        let done = *remaining == 0;
        self.input.consume(n);
        if done {
            self.mode = Mode::Command;
        }
        done
    }

    fn command(&mut self, raw: &[u8]) -> Flow {
        let cmd = match command::parse(raw) {
            Ok(cmd) => cmd,
            Err(bad) => {
                self.bad(bad.reply, bad.reason);
                return Flow::Consumed;
            }
        };
        let lmtp = self.opts.mode == RelayMode::Lmtp;
        match cmd {
            Command::Ehlo(name) if !lmtp => self.hello(Verb::Ehlo, name),
            Command::Helo(name) if !lmtp => self.hello(Verb::Helo, name),
            Command::Lhlo(name) if lmtp => self.hello(Verb::Lhlo, name),
            Command::Ehlo(_) | Command::Helo(_) => {
                self.bad("500 5.5.1 Error: use LHLO in LMTP", "HELO/EHLO in LMTP");
            }
            Command::Lhlo(_) => self.bad("500 5.5.2 Error: command not recognized", "LHLO"),
            Command::StartTls => self.starttls(),
            Command::Auth { .. } => {
                self.bad(
                    "503 5.5.1 Error: authentication not enabled",
                    "AUTH on a relay",
                );
            }
            Command::Mail => self.mail(raw),
            Command::Rcpt(address) => self.rcpt(raw, address),
            Command::Data => self.data(),
            Command::Bdat { size, last } => return self.bdat(size, last),
            Command::Rset => self.rset(),
            Command::Noop => self.noop(),
            Command::Quit => self.quit(),
            Command::Vrfy => {
                self.slots
                    .ready(b"252 2.0.0 Cannot VRFY user; try RCPT\r\n");
            }
            Command::Help => {
                self.slots.ready(b"214 2.0.0 See RFC 5321\r\n");
            }
            Command::NotImplemented => {
                self.bad(
                    "502 5.5.1 Error: command not implemented",
                    "command not implemented",
                );
            }
        }
        Flow::Consumed
    }

    fn hello(&mut self, verb: Verb, name: String) {
        if !valid_helo(&name) {
            return self.bad("501 5.5.4 Syntax: EHLO hostname", "invalid EHLO argument");
        }
        // A greeting resets the transaction like RSET (RFC 5321 §4.1.4).
        self.reset_txn();
        let reply = if verb == Verb::Helo {
            format!("250 {}\r\n", self.opts.hostname)
        } else {
            multi_line(250, &self.opts.hostname, &self.ehlo_lines())
        };
        self.slots.ready(reply.as_bytes());
        self.helo = Some((verb, name));
    }

    fn ehlo_lines(&self) -> Vec<String> {
        let mut lines = vec!["PIPELINING".to_owned(), "ENHANCEDSTATUSCODES".to_owned()];
        for line in &self.opts.extensions {
            if ehlo::allowed(line) && !lines.iter().any(|l| l.eq_ignore_ascii_case(line)) {
                lines.push(line.clone());
            }
        }
        if self.starttls_offered() {
            lines.push("STARTTLS".into());
        }
        lines
    }

    fn starttls_offered(&self) -> bool {
        self.opts.mode == RelayMode::Mx && self.opts.starttls && !self.tls
    }

    fn starttls(&mut self) {
        if self.tls {
            return self.bad("503 5.5.1 Error: TLS already active", "STARTTLS under TLS");
        }
        if !self.starttls_offered() {
            return self.bad(
                "502 5.5.1 Error: command not implemented",
                "STARTTLS not offered",
            );
        }
        if self.txn.is_some() || !matches!(self.backend, Backend::None) {
            return self.bad(
                "503 5.5.1 Error: STARTTLS only before the first transaction",
                "STARTTLS after a transaction",
            );
        }
        self.slots.ready(b"220 2.0.0 Ready to start TLS\r\n");
        // Plaintext pipelined behind STARTTLS must not run inside TLS (CVE-2011-0411).
        // The STARTTLS line itself is still in the buffer (the caller consumes it).
        if self.input.len() > self.line_len() {
            self.rejected("discarded plaintext pipelined after STARTTLS");
        }
        self.input.clear();
        self.mode = Mode::WaitTls;
        self.events.push_back(RelayEvent::StartTls);
    }

    /// Length of the command line at the front of the buffer (the one being handled).
    fn line_len(&self) -> usize {
        let all = self.input.raw(self.input.len());
        all.iter()
            .position(|&b| b == b'\n')
            .map_or(all.len(), |i| i + 1)
    }

    fn need_helo(&mut self) -> bool {
        if self.helo.is_some() {
            return false;
        }
        let reply = if self.opts.mode == RelayMode::Lmtp {
            "503 5.5.1 Error: send LHLO first"
        } else {
            "503 5.5.1 Error: send HELO/EHLO first"
        };
        self.bad(reply, "mail command before HELO");
        true
    }

    fn mail(&mut self, raw: &[u8]) {
        if self.need_helo() {
            return;
        }
        if self.txn.is_some() {
            return self.bad("503 5.5.1 Error: nested MAIL command", "nested MAIL");
        }
        let id = self.next_txn;
        self.next_txn += 1;
        let line = normalized(raw);
        let mail = if matches!(self.backend, Backend::Ready { .. }) {
            let slot = self.slots.pending();
            self.queue.push_back((line, Expect::Mail { slot, txn: id }));
            None
        } else {
            // No backend yet: the first RCPT chooses it. Answer now, replay later.
            self.slots.ready(b"250 2.1.0 Ok\r\n");
            Some(line)
        };
        self.txn = Some(Txn {
            id,
            mail,
            rcpts: 0,
            forwarded: 0,
            bdat: None,
        });
    }

    fn rcpt(&mut self, raw: &[u8], address: String) {
        if self.need_helo() {
            return;
        }
        let max = self.opts.max_recipients;
        let Some(txn) = &mut self.txn else {
            return self.bad("503 5.5.1 Error: need MAIL command", "RCPT without MAIL");
        };
        if txn.bdat.is_some() {
            return self.bad("503 5.5.1 Error: RCPT after BDAT", "RCPT after BDAT");
        }
        if txn.rcpts >= max {
            self.slots
                .ready(b"452 4.5.3 Error: too many recipients\r\n");
            return;
        }
        txn.rcpts += 1;
        let slot = self.slots.pending();
        self.mode = Mode::WaitRoute {
            slot,
            line: normalized(raw),
            address: address.clone(),
        };
        self.events.push_back(RelayEvent::RouteRecipient(address));
    }

    /// Applies the driver's routing answer to the waiting RCPT.
    pub(super) fn route(&mut self, route: Route) {
        if !matches!(self.mode, Mode::WaitRoute { .. }) {
            return;
        }
        let Mode::WaitRoute {
            slot,
            line,
            address,
        } = std::mem::replace(&mut self.mode, Mode::Command)
        else {
            return;
        };
        let id = match route {
            Route::TempFail => {
                let reply = refusal(
                    "450 4.3.0",
                    &address,
                    "Recipient address temporarily unavailable, try again later",
                );
                return self.slots.fill(slot, reply.as_bytes(), true);
            }
            Route::Reject => {
                let reply = refusal(
                    "550 5.1.1",
                    &address,
                    "Recipient address rejected: User unknown",
                );
                return self.slots.fill(slot, reply.as_bytes(), true);
            }
            Route::Backend(id) => id,
        };
        match &self.backend {
            Backend::Ready { id: current, .. } if *current == id => {
                self.queue.push_back((line, Expect::Rcpt { slot }));
                if let Some(txn) = &mut self.txn {
                    txn.forwarded += 1;
                }
            }
            // Pinned elsewhere: the sender retries this recipient in another
            // transaction (RFC 5321 §4.5.3.1.10), which a new connection routes anew.
            Backend::Ready { .. } => self.slots.fill(
                slot,
                b"452 4.5.3 Error: too many recipients for this connection\r\n",
                true,
            ),
            Backend::None if self.failed_backends.contains(&id) => {
                self.slots.fill(slot, super::backend::UNAVAILABLE, true);
            }
            Backend::None => {
                self.backend = Backend::Connecting(id.clone());
                self.mode = Mode::WaitBackend { slot, line };
                self.events.push_back(RelayEvent::Connect(id));
            }
            // Not reachable: input is not processed while connecting.
            Backend::Connecting(_) | Backend::Handshake(..) => {
                self.slots.fill(slot, super::backend::UNAVAILABLE, true);
            }
        }
    }

    fn data(&mut self) {
        if self.need_helo() {
            return;
        }
        let Some(txn) = &self.txn else {
            return self.bad("503 5.5.1 Error: need MAIL command", "DATA without MAIL");
        };
        if txn.bdat.is_some() {
            return self.bad("503 5.5.1 Error: DATA after BDAT", "DATA after BDAT");
        }
        if txn.forwarded == 0 {
            let reply = if txn.rcpts == 0 {
                "503 5.5.1 Error: need RCPT command"
            } else {
                "554 5.5.1 Error: no valid recipients"
            };
            return self.bad(reply, "DATA without recipients");
        }
        let slot = self.slots.pending();
        self.queue
            .push_back((b"DATA\r\n".to_vec(), Expect::Data { slot }));
        self.mode = Mode::WaitData;
    }

    fn bdat(&mut self, size: usize, last: bool) -> Flow {
        let forward = match &self.txn {
            None => None,
            Some(txn) if txn.forwarded == 0 || txn.bdat == Some(false) => Some(false),
            Some(_) => Some(true),
        };
        let chunking = matches!(self.backend, Backend::Ready { chunking: true, .. });
        match forward {
            None => {
                self.bad("503 5.5.1 Error: need MAIL command", "BDAT without MAIL");
                if !matches!(self.mode, Mode::Closed) {
                    self.mode = Mode::Chunk {
                        remaining: size,
                        forward: false,
                    };
                }
                return Flow::Consumed;
            }
            Some(true) if chunking => {
                // The chunk follows the command at once and is never buffered: wait
                // until the command can go out immediately.
                self.pump();
                if !self.queue.is_empty() || !self.may_send() {
                    return Flow::Blocked;
                }
                let slot = self.slots.pending();
                let cmd = if last {
                    format!("BDAT {size} LAST\r\n")
                } else {
                    format!("BDAT {size}\r\n")
                };
                self.to_backend.extend_from_slice(cmd.as_bytes());
                self.in_flight.push_back(if last {
                    Expect::Final {
                        slot,
                        remaining: None,
                    }
                } else {
                    Expect::Bdat { slot }
                });
                self.set_bdat(true, last);
                self.mode = Mode::Chunk {
                    remaining: size,
                    forward: true,
                };
            }
            Some(true) => {
                // CHUNKING was advertised (configuration) but this backend lacks it;
                // sending BDAT would let the chunk's bytes run as backend commands.
                self.slots
                    .ready(b"451 4.3.0 Error: BDAT not supported by the mail store\r\n");
                self.set_bdat(false, last);
                self.mode = Mode::Chunk {
                    remaining: size,
                    forward: false,
                };
            }
            Some(false) => {
                self.slots
                    .ready(b"554 5.5.1 Error: no valid recipients\r\n");
                self.set_bdat(false, last);
                self.mode = Mode::Chunk {
                    remaining: size,
                    forward: false,
                };
            }
        }
        Flow::Consumed
    }

    fn set_bdat(&mut self, forward: bool, last: bool) {
        if last {
            self.txn = None;
        } else if let Some(txn) = &mut self.txn {
            txn.bdat = Some(forward);
        }
    }

    fn rset(&mut self) {
        self.txn = None;
        if matches!(self.backend, Backend::Ready { .. }) {
            let slot = self.slots.pending();
            self.queue
                .push_back((b"RSET\r\n".to_vec(), Expect::Reset { slot: Some(slot) }));
        } else {
            self.slots.ready(b"250 2.0.0 Ok\r\n");
        }
    }

    /// Drops the transaction (EHLO again); the backend's part of it too.
    fn reset_txn(&mut self) {
        if self.txn.take().is_some() && matches!(self.backend, Backend::Ready { .. }) {
            self.queue
                .push_back((b"RSET\r\n".to_vec(), Expect::Reset { slot: None }));
        }
    }

    fn noop(&mut self) {
        // Forwarded when connected, so that a client's keep-alive keeps the backend
        // session alive too.
        if matches!(self.backend, Backend::Ready { .. }) {
            let slot = self.slots.pending();
            self.queue
                .push_back((b"NOOP\r\n".to_vec(), Expect::Noop { slot }));
        } else {
            self.slots.ready(b"250 2.0.0 Ok\r\n");
        }
    }

    fn quit(&mut self) {
        self.slots.ready(b"221 2.0.0 Bye\r\n");
        if matches!(self.backend, Backend::Ready { .. }) {
            self.queue.push_back((b"QUIT\r\n".to_vec(), Expect::Quit));
        }
        self.close_after(CloseReason::Logout);
    }

    fn bad(&mut self, reply: &str, reason: &'static str) {
        let mut line = reply.as_bytes().to_vec();
        line.extend_from_slice(b"\r\n");
        self.slots.ready(&line);
        self.rejected(reason);
        self.bad_commands += 1;
        if self.bad_commands > self.opts.max_bad_commands {
            let line = format!(
                "421 4.7.0 {} Error: too many errors\r\n",
                self.opts.hostname
            );
            self.slots.ready(line.as_bytes());
            self.close_after(CloseReason::TooManyErrors);
        }
    }
}

/// A command line as it is forwarded: its content and CRLF, whatever the client ended
/// it with.
fn normalized(raw: &[u8]) -> Vec<u8> {
    let line = raw.strip_suffix(b"\n").unwrap_or(raw);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut out = Vec::with_capacity(line.len() + 2);
    out.extend_from_slice(line);
    out.extend_from_slice(b"\r\n");
    out
}

/// A RCPT refusal in Postfix's words (`550 5.1.1 <a@b>: Recipient address rejected: ...`),
/// which MTAs and log parsers know. The address is the client's: anything but printable
/// ASCII is dropped and its length bounded, so it cannot break the reply line.
fn refusal(code: &str, address: &str, text: &str) -> String {
    const MAX_SHOWN: usize = 256;
    let shown: String = address
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != '<' && *c != '>')
        .take(MAX_SHOWN)
        .collect();
    format!("{code} <{shown}>: {text}\r\n")
}
