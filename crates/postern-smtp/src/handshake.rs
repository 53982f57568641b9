//! The opening of every backend conversation: greeting, EHLO, XCLIENT, EHLO again.
//! Shared by the submission login ([`crate::Login`]) and the relay ([`crate::Relay`]).
//!
//! ```text
//!  with XCLIENT:
//!   Greeting ─220─▶ send "EHLO <postern>" ─▶ Probe ─250 lists XCLIENT ADDR─▶
//!     send XCLIENT ─▶ Xclient ─220 (one per XCLIENT command)─▶
//!     send "<verb> <client name>" ─▶ Final ─250─▶ Ready(extensions)
//!  without:
//!   Greeting ─220─▶ send "<verb> <client name>" ─▶ Final ─250─▶ Ready(extensions)
//!  any other reply ─▶ Failed(reason)
//! ```
//!
//! After XCLIENT, Postfix resets the session to the greeting stage and sends a new
//! `220`; the client must say EHLO again (XCLIENT_README). The second greeting carries
//! the client's own HELO name, so the backend's session looks like the client's.
//!
//! TLS to the backend (a later issue) goes between `Probe` and the XCLIENT: when the
//! backend lists STARTTLS and the backend settings require it, send `STARTTLS`, wait for
//! `220`, report an event so that the driver runs the TLS handshake on the backend
//! socket, then send the probe EHLO again (RFC 3207 §4.2: forget what was learned).

use std::collections::VecDeque;

use crate::ehlo::Extensions;
use crate::reply::BackendReply;
use crate::xclient::{self, ClientAttrs};

/// The greeting command, as the client used it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verb {
    Ehlo,
    Helo,
    Lhlo,
}

impl Verb {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Verb::Ehlo => "EHLO",
            Verb::Helo => "HELO",
            Verb::Lhlo => "LHLO",
        }
    }

    /// The XCLIENT PROTO value for a client that greeted with this verb.
    pub(crate) fn proto(self) -> &'static str {
        match self {
            Verb::Ehlo => "ESMTP",
            Verb::Helo => "SMTP",
            Verb::Lhlo => "LMTP",
        }
    }
}

/// What to say, decided before the connection opens.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// Postern's own name, for the probe EHLO before XCLIENT.
    pub(crate) hostname: String,
    /// How the client greeted; replayed with `helo`.
    pub(crate) verb: Verb,
    /// The client's HELO argument.
    pub(crate) helo: String,
    /// Client identity for XCLIENT, or `None` to send none.
    pub(crate) xclient: Option<ClientAttrs>,
}

#[derive(Debug)]
enum Stage {
    Greeting,
    Probe,
    Xclient(VecDeque<String>),
    Final,
    Done,
}

/// Progress after one backend reply.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// A command was written (or nothing yet); wait for the next reply.
    Wait,
    /// The backend is ready for MAIL or AUTH. `login_sent` says whether XCLIENT LOGIN
    /// went out.
    Ready {
        extensions: Extensions,
        login_sent: bool,
    },
    /// The backend cannot be used; the reason is for the log.
    Failed(&'static str),
}

#[derive(Debug)]
pub(crate) struct Handshake {
    plan: Plan,
    stage: Stage,
    login_sent: bool,
}

impl Handshake {
    pub(crate) fn new(plan: Plan) -> Self {
        Self {
            plan,
            stage: Stage::Greeting,
            login_sent: false,
        }
    }

    pub(crate) fn on_reply(&mut self, reply: &BackendReply, out: &mut Vec<u8>) -> Step {
        let stage = std::mem::replace(&mut self.stage, Stage::Done);
        match stage {
            Stage::Greeting => {
                if reply.code != 220 {
                    return Step::Failed("backend greeting is not 220");
                }
                if self.plan.xclient.is_some() {
                    let verb = if self.plan.verb == Verb::Lhlo {
                        Verb::Lhlo
                    } else {
                        Verb::Ehlo
                    };
                    push_line(out, verb.as_str(), &self.plan.hostname);
                    self.stage = Stage::Probe;
                } else {
                    self.send_final(out);
                }
                Step::Wait
            }
            Stage::Probe => {
                if reply.code != 250 {
                    return Step::Failed("backend refused EHLO");
                }
                let ext = Extensions::from_reply(reply);
                let Some(attrs) = &self.plan.xclient else {
                    return Step::Failed("internal: probe without XCLIENT");
                };
                let offered = ext.params("XCLIENT").into_iter().flatten();
                match xclient::commands(offered, attrs) {
                    Ok((commands, login_sent)) => {
                        self.login_sent = login_sent;
                        let mut commands = VecDeque::from(commands);
                        if let Some(first) = commands.pop_front() {
                            out.extend_from_slice(first.as_bytes());
                        }
                        self.stage = Stage::Xclient(commands);
                        Step::Wait
                    }
                    Err(_) => Step::Failed("backend does not offer XCLIENT with ADDR"),
                }
            }
            Stage::Xclient(mut rest) => {
                if reply.code != 220 {
                    return Step::Failed("backend refused XCLIENT");
                }
                match rest.pop_front() {
                    Some(next) => {
                        out.extend_from_slice(next.as_bytes());
                        self.stage = Stage::Xclient(rest);
                    }
                    None => self.send_final(out),
                }
                Step::Wait
            }
            Stage::Final => {
                if reply.code != 250 {
                    return Step::Failed("backend refused the client's EHLO");
                }
                Step::Ready {
                    extensions: Extensions::from_reply(reply),
                    login_sent: self.login_sent,
                }
            }
            Stage::Done => Step::Failed("reply after the handshake"),
        }
    }

    fn send_final(&mut self, out: &mut Vec<u8>) {
        push_line(out, self.plan.verb.as_str(), &self.plan.helo);
        self.stage = Stage::Final;
    }
}

fn push_line(out: &mut Vec<u8>, verb: &str, arg: &str) {
    out.extend_from_slice(verb.as_bytes());
    out.push(b' ');
    out.extend_from_slice(arg.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Whether `name` is safe to repeat in a command line: 1–255 printable ASCII bytes
/// (domain or address literal; RFC 5321 §4.1.1.1). Anything else is refused with 501.
pub(crate) fn valid_helo(name: &str) -> bool {
    (1..=255).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, text: &str) -> BackendReply {
        BackendReply {
            code,
            bytes: text.as_bytes().to_vec(),
        }
    }

    fn plan(xclient: bool) -> Plan {
        Plan {
            hostname: "postern.test".into(),
            verb: Verb::Ehlo,
            helo: "client.example".into(),
            xclient: xclient.then(|| ClientAttrs {
                client: "198.51.100.7:4000".parse().unwrap(),
                local: "192.0.2.1:587".parse().unwrap(),
                name: None,
                helo: Some("client.example".into()),
                proto: "ESMTP",
                login: None,
                ipv6_prefix: true,
            }),
        }
    }

    #[test]
    fn with_xclient() {
        let mut h = Handshake::new(plan(true));
        let mut out = vec![];
        assert_eq!(h.on_reply(&reply(220, "220 mx\r\n"), &mut out), Step::Wait);
        assert_eq!(out, b"EHLO postern.test\r\n");
        out.clear();
        let probe = reply(250, "250-mx\r\n250 XCLIENT NAME ADDR HELO\r\n");
        assert_eq!(h.on_reply(&probe, &mut out), Step::Wait);
        assert_eq!(
            out,
            b"XCLIENT HELO=client.example NAME=[UNAVAILABLE] ADDR=198.51.100.7\r\n"
        );
        out.clear();
        assert_eq!(h.on_reply(&reply(220, "220 mx\r\n"), &mut out), Step::Wait);
        assert_eq!(out, b"EHLO client.example\r\n");
        let step = h.on_reply(&reply(250, "250-mx\r\n250 PIPELINING\r\n"), &mut out);
        let Step::Ready {
            extensions,
            login_sent,
        } = step
        else {
            panic!("{step:?}");
        };
        assert!(extensions.has("PIPELINING") && !login_sent);
    }

    #[test]
    fn failures() {
        let mut out = vec![];
        let mut h = Handshake::new(plan(true));
        assert!(matches!(
            h.on_reply(&reply(554, "554 no\r\n"), &mut out),
            Step::Failed(_)
        ));
        let mut h = Handshake::new(plan(true));
        let _ = h.on_reply(&reply(220, "220 mx\r\n"), &mut out);
        assert!(matches!(
            h.on_reply(&reply(250, "250-mx\r\n250 PIPELINING\r\n"), &mut out),
            Step::Failed(_)
        ));
        let mut h = Handshake::new(plan(false));
        let _ = h.on_reply(&reply(220, "220 mx\r\n"), &mut out);
        assert!(matches!(
            h.on_reply(&reply(550, "550 no\r\n"), &mut out),
            Step::Failed(_)
        ));
        assert!(valid_helo("[192.0.2.1]") && !valid_helo("a b") && !valid_helo(""));
    }
}
