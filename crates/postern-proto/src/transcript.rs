//! Transcript tests: a client-facing machine and its backend login, paired in memory
//! and driven by a `.trace` file, so a protocol exchange reads as it does on the wire.
//!
//! ```text
//!  # a comment                       ! name [value]   a directive for the protocol's adapter
//!  S: * OK ready.                    Postern -> client, one line (CRLF implied)
//!  S~ * OK [CAPABILITY               ... a line that starts with this
//!  S* .                              ... skip lines up to one that starts with this
//!                                    (the body of a multi-line answer that is not the point)
//!  C: a LOGIN alice secret           client -> Postern, one line (CRLF added)
//!  C~ a NOOP\r\nb NOOP\r\n           client -> Postern, raw, in ONE read (\r \n \\ \xHH)
//!  B: * OK Dovecot ready.            backend -> Postern, one line (CRLF added)
//!  B~ raw bytes                      backend -> Postern, raw
//!  P: a AUTHENTICATE PLAIN ...       Postern -> backend, one line
//!  P~ a AUTHENTICATE                 ... a line that starts with this
//!  = auth USER                       the client machine asks to log USER in: the backend
//!                                    login starts (its greeting comes with B: lines)
//!  = verdict failed|unavailable|limited   answer the pending login without a backend
//!  = starttls                        the client machine asks for the TLS handshake (done)
//!  = backend-starttls                the backend login asks for it (done)
//!  = accepted                        the login is over and accepted; the handoffs follow:
//!  H> bytes                          client bytes handed to the backend (raw, escapes)
//!  H< bytes                          backend bytes handed to the client (raw, escapes)
//!  = refused | = failed              the backend login ended with that verdict
//!  = close REASON                    the machine closes (`CloseReason::as_str`)
//!  = rejected                        the machine reports a rejected input
//! ```
//! Every line is matched in order; at the end nothing may be left unmatched on either
//! side, so a trace states the whole exchange. Pure code (no I/O), for tests only.

use crate::{BackendLogin, ClientInfo, Event, Failure, FrontEnd, Limit, LoginEvent, Verdict};

/// A trace's directives (`! name value`), for the adapter that builds the machines.
#[derive(Clone, Debug, Default)]
pub struct Directives(Vec<(String, String)>);

impl Directives {
    /// Whether `! name` appears.
    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| n == name)
    }

    /// The value of `! name value`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Builds a protocol's machines from a trace's directives.
pub trait Adapter {
    /// The client-facing machine.
    type Front: FrontEnd;
    /// A new client-facing machine (`tls`: `! tls`, implicit TLS).
    fn front(&self, d: &Directives) -> Self::Front;
    /// The login options for the backend login.
    fn login_options(&self, d: &Directives) -> <Self::Front as FrontEnd>::LoginOptions;
}

/// Parses the directives of a trace.
pub fn directives(trace: &str) -> Directives {
    Directives(
        trace
            .lines()
            .filter_map(|l| l.strip_prefix("! "))
            .map(|l| match l.split_once(' ') {
                Some((n, v)) => (n.trim().to_owned(), v.trim().to_owned()),
                None => (l.trim().to_owned(), String::new()),
            })
            .collect(),
    )
}

/// Decodes `\r`, `\n`, `\t`, `\\` and `\xHH`.
pub fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                let text = std::str::from_utf8(&hex).map_err(|e| e.to_string())?;
                out.push(u8::from_str_radix(text, 16).map_err(|e| format!("\\x{text}: {e}"))?);
            }
            other => return Err(format!("unknown escape \\{:?}", other.map(char::from))),
        }
    }
    Ok(out)
}

fn client() -> ClientInfo {
    ClientInfo {
        client: std::net::SocketAddr::from(([192, 0, 2, 7], 50_007)),
        local: std::net::SocketAddr::from(([127, 0, 0, 1], 143)),
        tls: false,
        session_id: "trace".into(),
    }
}

/// Bytes received from one side, consumed line by line.
#[derive(Default)]
struct Stream(Vec<u8>);

impl Stream {
    fn line(&mut self) -> Option<String> {
        let end = self.0.windows(2).position(|w| w == b"\r\n")?;
        let line: Vec<u8> = self.0.drain(..end + 2).take(end).collect();
        Some(String::from_utf8_lossy(&line).into_owned())
    }
}

struct Run<'a, A: Adapter> {
    adapter: &'a A,
    directives: Directives,
    front: Option<A::Front>,
    login: Option<<A::Front as FrontEnd>::Login>,
    to_client: Stream,
    to_backend: Stream,
    events: Vec<String>,
    handoff: Option<(Vec<u8>, Vec<u8>)>,
}

impl<A: Adapter> Run<'_, A> {
    fn front(&mut self) -> Result<&mut A::Front, String> {
        self.front
            .as_mut()
            .ok_or_else(|| "the session is over".to_owned())
    }

    /// Drains both machines' output and events.
    fn pump(&mut self) -> Result<(), String> {
        loop {
            let mut progressed = false;
            if let Some(front) = self.front.as_mut() {
                front.poll_transmit(&mut self.to_client.0);
                while let Some(e) = front.poll_event() {
                    progressed = true;
                    match e {
                        Event::StartTls => {
                            self.events.push("starttls".into());
                            front.poll_transmit(&mut self.to_client.0);
                            front.handle_tls_ready();
                        }
                        Event::Authenticate(creds) => {
                            self.events.push(format!("auth {}", creds.user));
                            let opts = self.adapter.login_options(&self.directives);
                            self.login = Some(front.start_login(creds, &opts, &client()));
                        }
                        Event::Close(r) => self.events.push(format!("close {}", r.as_str())),
                        Event::Rejected(_) => self.events.push("rejected".into()),
                    }
                    front.poll_transmit(&mut self.to_client.0);
                }
            }
            if let Some(login) = self.login.as_mut() {
                login.poll_transmit(&mut self.to_backend.0);
                if let Some(e) = login.poll_event() {
                    progressed = true;
                    match e {
                        LoginEvent::StartTls => {
                            self.events.push("backend-starttls".into());
                            login.poll_transmit(&mut self.to_backend.0);
                            login.handle_tls_ready();
                        }
                        LoginEvent::Done(verdict) => {
                            let login = self.login.take().ok_or("no login")?;
                            self.finish(verdict, Some(login))?;
                        }
                    }
                }
            }
            if !progressed {
                return Ok(());
            }
        }
    }

    fn finish(
        &mut self,
        verdict: Verdict,
        login: Option<<A::Front as FrontEnd>::Login>,
    ) -> Result<(), String> {
        let accepted = matches!(verdict, Verdict::Accepted(_));
        self.events.push(
            match &verdict {
                Verdict::Accepted(_) => "accepted",
                Verdict::Refused(_) => "refused",
                Verdict::Failed(_) => "failed",
            }
            .into(),
        );
        let front = self.front.as_mut().ok_or("the session is over")?;
        front.handle_verdict(verdict);
        front.poll_transmit(&mut self.to_client.0);
        if accepted {
            let mut front = self.front.take().ok_or("no front")?;
            // Whatever the machine still had to say goes out before the relay.
            front.poll_transmit(&mut self.to_client.0);
            while front.poll_event().is_some() {}
            let to_backend = front.into_handoff();
            let to_client = login.map(BackendLogin::into_handoff).unwrap_or_default();
            self.handoff = Some((to_backend, to_client));
        }
        Ok(())
    }

    fn skip_to(stream: &mut Stream, want: &str, side: &str) -> Result<(), String> {
        while let Some(got) = stream.line() {
            if got.starts_with(want) {
                return Ok(());
            }
        }
        Err(format!("{side}: no line starting with {want:?}"))
    }

    fn expect_line(
        stream: &mut Stream,
        want: &str,
        prefix: bool,
        side: &str,
    ) -> Result<(), String> {
        match stream.line() {
            Some(got) if got == want || (prefix && got.starts_with(want)) => Ok(()),
            Some(got) => Err(format!("{side}: expected {want:?}, got {got:?}")),
            None => Err(format!(
                "{side}: expected {want:?}, got nothing (pending: {:?})",
                String::from_utf8_lossy(&stream.0)
            )),
        }
    }

    fn expect_event(&mut self, want: &str) -> Result<(), String> {
        if self.events.is_empty() {
            return Err(format!("expected event {want:?}, got none"));
        }
        let got = self.events.remove(0);
        if got == want {
            Ok(())
        } else {
            Err(format!("expected event {want:?}, got {got:?}"))
        }
    }

    fn step(&mut self, line: &str) -> Result<(), String> {
        let (tag, rest) = match line.get(..3) {
            Some(t) => (t, line.get(3..).unwrap_or("")),
            None => (line, ""),
        };
        match tag {
            "S: " | "S~ " => {
                self.pump()?;
                Self::expect_line(&mut self.to_client, rest, tag == "S~ ", "to client")
            }
            "S* " => {
                self.pump()?;
                Self::skip_to(&mut self.to_client, rest, "to client")
            }
            "P: " | "P~ " => {
                self.pump()?;
                Self::expect_line(&mut self.to_backend, rest, tag == "P~ ", "to backend")
            }
            "C: " | "C~ " => {
                let mut bytes = if tag == "C: " {
                    rest.as_bytes().to_vec()
                } else {
                    unescape(rest)?
                };
                if tag == "C: " {
                    bytes.extend_from_slice(b"\r\n");
                }
                self.front()?.handle_input(&bytes);
                self.pump()
            }
            "B: " | "B~ " => {
                let mut bytes = if tag == "B: " {
                    rest.as_bytes().to_vec()
                } else {
                    unescape(rest)?
                };
                if tag == "B: " {
                    bytes.extend_from_slice(b"\r\n");
                }
                self.login
                    .as_mut()
                    .ok_or("backend bytes, but no backend login is running")?
                    .handle_input(&bytes);
                self.pump()
            }
            "H> " | "H< " => {
                self.pump()?;
                let (to_backend, to_client) = self
                    .handoff
                    .as_ref()
                    .ok_or("a handoff, but the login was not accepted")?;
                let (got, side) = if tag == "H> " {
                    (to_backend, "client bytes for the backend")
                } else {
                    (to_client, "backend bytes for the client")
                };
                let want = unescape(rest)?;
                if *got == want {
                    Ok(())
                } else {
                    Err(format!(
                        "{side}: expected {:?}, got {:?}",
                        String::from_utf8_lossy(&want),
                        String::from_utf8_lossy(got)
                    ))
                }
            }
            _ => match line.strip_prefix("= ") {
                Some(verdict) if verdict.starts_with("verdict ") => {
                    self.pump()?;
                    let failure = match verdict.trim_start_matches("verdict ") {
                        "failed" => Failure::AuthFailed,
                        "unavailable" => Failure::Unavailable,
                        "limited" => Failure::Limited(Limit::AuthFailures),
                        other => return Err(format!("unknown verdict {other:?}")),
                    };
                    self.login = None;
                    self.finish(Verdict::Failed(failure), None)?;
                    // The canned verdict's own event is not part of the trace.
                    self.events.retain(|e| e != "failed");
                    self.pump()
                }
                Some(event) => {
                    self.pump()?;
                    self.expect_event(event)
                }
                None => Err(format!("cannot read trace line {line:?}")),
            },
        }
    }
}

/// Runs one trace (its text: reading files is the caller's business); the error names
/// the line that did not hold.
pub fn run<A: Adapter>(adapter: &A, trace: &str) -> Result<(), String> {
    let directives = directives(trace);
    let front = adapter.front(&directives);
    let mut run = Run {
        adapter,
        directives,
        front: Some(front),
        login: None,
        to_client: Stream::default(),
        to_backend: Stream::default(),
        events: Vec::new(),
        handoff: None,
    };
    for (n, line) in trace.lines().enumerate() {
        // Only the line end: a trailing space can be part of what is stated ("+ ").
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() || line.starts_with('#') || line.starts_with("! ") {
            continue;
        }
        run.step(line)
            .map_err(|e| format!("line {}: {line}\n  {e}", n + 1))?;
    }
    run.pump()?;
    let mut left = Vec::new();
    if let Some(l) = run.to_client.line() {
        left.push(format!("to client: {l:?}"));
    }
    if let Some(l) = run.to_backend.line() {
        left.push(format!("to backend: {l:?}"));
    }
    if !run.to_client.0.is_empty() || !run.to_backend.0.is_empty() {
        left.push("a partial line".into());
    }
    left.extend(run.events.iter().map(|e| format!("event {e:?}")));
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the trace ended with output it does not state: {}",
            left.join(", ")
        ))
    }
}
