//! The fake backend: just enough IMAP and POP3 for the benchmarks, cheap enough to hold
//! tens of thousands of idle sessions, so the numbers describe the proxy, not Dovecot.
//!
//! Every login succeeds. IMAP answers CAPABILITY, ID, LOGIN (synchronizing and
//! non-synchronizing literals too: nginx sends its credentials as synchronizing
//! literals), AUTHENTICATE PLAIN (with or without SASL-IR), SELECT/EXAMINE, IDLE/DONE,
//! FETCH (a literal of `--fetch-size` bytes, or of N bytes for a `<0.N>` partial),
//! NOOP and LOGOUT. POP3 answers CAPA, USER/PASS, AUTH PLAIN, XCLIENT, STAT, LIST,
//! RETR, NOOP and QUIT.
//!
//! A session keeps no buffer while it waits: it awaits readability, then reads into a
//! stack array; only an incomplete command is kept on the heap until it completes.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// IMAP listen address (port 0: the kernel picks one; the ready line tells which).
    #[arg(long, default_value = "127.0.0.1:0")]
    imap: SocketAddr,
    /// POP3 listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pop3: SocketAddr,
    /// Size in bytes of the literal a FETCH without a `<0.N>` partial returns.
    #[arg(long, default_value_t = 20_000_000)]
    fetch_size: u64,
    /// Worker threads (1: single-threaded, the lightest on a shared 2-core machine).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// Largest command (literals included) or literal accepted; anything bigger closes the
/// session, so a confused client cannot grow our memory.
const MAX_MESSAGE: usize = 1 << 20;
/// Largest FETCH literal served.
const MAX_FETCH: u64 = 1 << 32;

const CAPS: &str = "IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN IDLE ID";

struct Shared {
    fetch_size: u64,
    /// Whole lines of printable text, none starting with '.', written over and over.
    body: Vec<u8>,
    sessions: AtomicU64,
    active: AtomicU64,
    body_bytes: AtomicU64,
}

#[derive(Serialize)]
struct Ready {
    event: &'static str,
    pid: u32,
    imap: SocketAddr,
    pop3: SocketAddr,
}

#[derive(Serialize)]
struct Stopped {
    event: &'static str,
    sessions: u64,
    active: u64,
    body_bytes: u64,
}

pub(crate) fn run(args: Args) -> Result<()> {
    crate::runtime(args.threads)?.block_on(serve(args))
}

async fn serve(args: Args) -> Result<()> {
    let imap = TcpListener::bind(args.imap)
        .await
        .with_context(|| format!("cannot listen on {}", args.imap))?;
    let pop3 = TcpListener::bind(args.pop3)
        .await
        .with_context(|| format!("cannot listen on {}", args.pop3))?;
    let shared = Arc::new(Shared {
        fetch_size: args.fetch_size,
        body: body_pattern(),
        sessions: AtomicU64::new(0),
        active: AtomicU64::new(0),
        body_bytes: AtomicU64::new(0),
    });
    let ready = Ready {
        event: "ready",
        pid: std::process::id(),
        imap: imap.local_addr()?,
        pop3: pop3.local_addr()?,
    };
    crate::emit(&ready)?;
    eprintln!(
        "fake backend: IMAP on {}, POP3 on {}, FETCH literal {} bytes",
        ready.imap, ready.pop3, args.fetch_size
    );
    tokio::spawn(accept_loop(imap, Arc::clone(&shared), || {
        Box::new(Imap::default()) as Box<dyn Dialogue>
    }));
    tokio::spawn(accept_loop(pop3, Arc::clone(&shared), || {
        Box::new(Pop3::default()) as Box<dyn Dialogue>
    }));
    shutdown_signal().await;
    let stopped = Stopped {
        event: "stopped",
        sessions: shared.sessions.load(Relaxed),
        active: shared.active.load(Relaxed),
        body_bytes: shared.body_bytes.load(Relaxed),
    };
    eprintln!(
        "fake backend: stopped after {} sessions ({} still open), {} body bytes sent",
        stopped.sessions, stopped.active, stopped.body_bytes
    );
    crate::emit(&stopped)
}

/// SIGINT or SIGTERM, whichever comes first.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn body_pattern() -> Vec<u8> {
    let mut body = Vec::with_capacity(256 * 1024);
    let mut i = 0u32;
    while body.len() < 256 * 1024 {
        body.extend_from_slice(
            format!("{i:08} Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do.\r\n")
                .as_bytes(),
        );
        i += 1;
    }
    body
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, make: fn() -> Box<dyn Dialogue>) {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                let _ = sock.set_nodelay(true);
                tokio::spawn(session(sock, make(), Arc::clone(&shared)));
            }
            // Out of descriptors: wait for sessions to end rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// What the I/O loop does after a command's reply is queued.
enum Action {
    Continue,
    /// Send `size` body bytes, then `tail`.
    Body {
        size: u64,
        tail: Vec<u8>,
    },
    Close,
}

/// One protocol's side of the conversation, free of I/O.
trait Dialogue: Send {
    fn greeting(&self) -> &'static [u8];
    /// Length of the first complete message in `buf`, if there is one; may queue
    /// continuation requests in `out`.
    fn frame(&mut self, buf: &[u8], out: &mut Vec<u8>) -> Option<usize>;
    /// Answers one complete message.
    fn handle(&mut self, msg: &[u8], out: &mut Vec<u8>, shared: &Shared) -> Action;
}

struct ActiveGuard<'a>(&'a AtomicU64);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

async fn session(mut sock: TcpStream, mut dialogue: Box<dyn Dialogue>, shared: Arc<Shared>) {
    shared.sessions.fetch_add(1, Relaxed);
    shared.active.fetch_add(1, Relaxed);
    let _active = ActiveGuard(&shared.active);
    // Errors are the client's business (a reset at the end of a run is routine).
    let _ = converse(&mut sock, dialogue.as_mut(), &shared).await;
}

async fn converse(sock: &mut TcpStream, d: &mut dyn Dialogue, shared: &Shared) -> io::Result<()> {
    sock.write_all(d.greeting()).await?;
    let mut pending: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    loop {
        while let Some(len) = d.frame(&pending, &mut out) {
            let action = match pending.get(..len) {
                Some(msg) => d.handle(msg, &mut out, shared),
                None => Action::Close,
            };
            pending.drain(..len.min(pending.len()));
            match action {
                Action::Continue => {}
                Action::Body { size, tail } => {
                    sock.write_all(&out).await?;
                    out.clear();
                    send_body(sock, &shared.body, size).await?;
                    shared.body_bytes.fetch_add(size, Relaxed);
                    sock.write_all(&tail).await?;
                }
                Action::Close => {
                    sock.write_all(&out).await?;
                    return Ok(());
                }
            }
        }
        if !out.is_empty() {
            sock.write_all(&out).await?;
            out = Vec::new();
        }
        if pending.len() > MAX_MESSAGE {
            return Ok(());
        }
        if pending.is_empty() {
            // Idle sessions hold no heap buffer.
            pending = Vec::new();
        }
        sock.readable().await?;
        // The array lives only between awaits, so it is not part of the session's
        // future: an idle session costs its socket and a few words.
        let mut chunk = [0u8; 4096];
        match sock.try_read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => pending.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

async fn send_body(sock: &mut TcpStream, body: &[u8], size: u64) -> io::Result<()> {
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(body.len());
        sock.write_all(body.get(..n).unwrap_or_default()).await?;
        left -= n as u64;
    }
    Ok(())
}

/// Position just past the first LF in `buf`.
fn line_end(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n').map(|p| p + 1)
}

/// `{N}` (synchronizing) or `{N+}` at the end of a line.
fn literal_suffix(line: &[u8]) -> Option<(usize, bool)> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let digits = inner.get(open + 1..)?;
    let (digits, sync) = match digits.strip_suffix(b"+") {
        Some(d) => (d, false),
        None => (digits, true),
    };
    let n: usize = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some((n, sync))
}

fn words(msg: &[u8]) -> (String, String, String) {
    let first = msg
        .get(..line_end(msg).unwrap_or(msg.len()))
        .unwrap_or_default();
    let text = String::from_utf8_lossy(first);
    let mut parts = text.trim_end().splitn(3, ' ');
    let a = parts.next().unwrap_or_default().to_owned();
    let b = parts.next().unwrap_or_default().to_owned();
    let c = parts.next().unwrap_or_default().to_owned();
    (a, b, c)
}

#[derive(Default)]
enum ImapMode {
    #[default]
    Command,
    /// AUTHENTICATE without an initial response: the next line is the response.
    AuthResponse(String),
    /// IDLE: the next line should be DONE.
    Idle(String),
}

#[derive(Default)]
struct Imap {
    mode: ImapMode,
    /// Synchronizing literals of the current command already answered with `+`.
    acked: usize,
}

impl Dialogue for Imap {
    fn greeting(&self) -> &'static [u8] {
        b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN IDLE ID] Fake backend ready.\r\n"
    }

    fn frame(&mut self, buf: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        let mut pos = 0;
        let mut literals = 0;
        loop {
            let end = pos + line_end(buf.get(pos..)?)?;
            let Some((n, sync)) = literal_suffix(buf.get(pos..end)?) else {
                self.acked = 0;
                return Some(end);
            };
            if n > MAX_MESSAGE {
                // Cannot be skipped safely. A length past the buffer closes the session.
                return Some(usize::MAX);
            }
            literals += 1;
            if sync && literals > self.acked {
                out.extend_from_slice(b"+ OK\r\n");
                self.acked = literals;
            }
            pos = end + n;
            if buf.len() < pos {
                return None;
            }
        }
    }

    fn handle(&mut self, msg: &[u8], out: &mut Vec<u8>, shared: &Shared) -> Action {
        match std::mem::take(&mut self.mode) {
            ImapMode::AuthResponse(tag) => {
                if msg.starts_with(b"*") {
                    out.extend_from_slice(format!("{tag} BAD Cancelled.\r\n").as_bytes());
                } else {
                    out.extend_from_slice(
                        format!("{tag} OK [CAPABILITY {CAPS}] Logged in.\r\n").as_bytes(),
                    );
                }
                return Action::Continue;
            }
            ImapMode::Idle(tag) => {
                if msg.eq_ignore_ascii_case(b"DONE\r\n") || msg.eq_ignore_ascii_case(b"DONE\n") {
                    out.extend_from_slice(format!("{tag} OK Idle completed.\r\n").as_bytes());
                } else {
                    out.extend_from_slice(format!("{tag} BAD Expected DONE.\r\n").as_bytes());
                }
                return Action::Continue;
            }
            ImapMode::Command => {}
        }
        let (tag, mut verb, mut rest) = words(msg);
        verb.make_ascii_uppercase();
        if verb == "UID" {
            let (v, r) = rest.split_once(' ').unwrap_or((rest.as_str(), ""));
            let (v, r) = (v.to_ascii_uppercase(), r.to_owned());
            verb = v;
            rest = r;
        }
        let reply = |out: &mut Vec<u8>, text: &str| {
            out.extend_from_slice(format!("{tag} {text}\r\n").as_bytes());
        };
        match verb.as_str() {
            "CAPABILITY" => {
                out.extend_from_slice(format!("* CAPABILITY {CAPS}\r\n").as_bytes());
                reply(out, "OK Capability completed.");
            }
            "NOOP" | "CHECK" => reply(out, "OK NOOP completed."),
            "ID" => {
                out.extend_from_slice(b"* ID NIL\r\n");
                reply(out, "OK ID completed.");
            }
            "LOGIN" => reply(out, &format!("OK [CAPABILITY {CAPS}] Logged in.")),
            "AUTHENTICATE" => {
                if rest.trim().contains(' ') {
                    reply(out, &format!("OK [CAPABILITY {CAPS}] Logged in."));
                } else {
                    out.extend_from_slice(b"+ \r\n");
                    self.mode = ImapMode::AuthResponse(tag);
                }
            }
            "SELECT" | "EXAMINE" => {
                out.extend_from_slice(
                    b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n\
                      * OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags permitted.\r\n\
                      * 1 EXISTS\r\n* 0 RECENT\r\n\
                      * OK [UIDVALIDITY 1] UIDs valid\r\n* OK [UIDNEXT 2] Predicted next UID\r\n",
                );
                reply(out, "OK [READ-WRITE] Select completed.");
            }
            "IDLE" => {
                out.extend_from_slice(b"+ idling\r\n");
                self.mode = ImapMode::Idle(tag);
            }
            "FETCH" => {
                let (size, partial) = match partial_size(&rest) {
                    Some(n) => (n.min(MAX_FETCH), true),
                    None => (shared.fetch_size, false),
                };
                let section = if partial { "BODY[]<0>" } else { "BODY[]" };
                out.extend_from_slice(format!("* 1 FETCH ({section} {{{size}}}\r\n").as_bytes());
                let tail = format!(")\r\n{tag} OK Fetch completed.\r\n").into_bytes();
                return Action::Body { size, tail };
            }
            "LOGOUT" => {
                out.extend_from_slice(b"* BYE Logging out.\r\n");
                reply(out, "OK Logout completed.");
                return Action::Close;
            }
            "STARTTLS" => reply(out, "NO No TLS on the fake backend."),
            _ => reply(out, "BAD Unknown command."),
        }
        Action::Continue
    }
}

/// N from a `<0.N>` (or `<offset.N>`) partial in a FETCH.
fn partial_size(args: &str) -> Option<u64> {
    let start = args.find('<')?;
    let inner = args.get(start + 1..)?;
    let inner = inner.get(..inner.find('>')?)?;
    inner.split_once('.')?.1.parse().ok()
}

#[derive(Default)]
struct Pop3 {
    /// AUTH PLAIN without an initial response: the next line is the response.
    auth_response: bool,
}

impl Dialogue for Pop3 {
    fn greeting(&self) -> &'static [u8] {
        b"+OK Fake backend ready.\r\n"
    }

    fn frame(&mut self, buf: &[u8], _out: &mut Vec<u8>) -> Option<usize> {
        line_end(buf)
    }

    fn handle(&mut self, msg: &[u8], out: &mut Vec<u8>, shared: &Shared) -> Action {
        if std::mem::take(&mut self.auth_response) {
            out.extend_from_slice(b"+OK Logged in.\r\n");
            return Action::Continue;
        }
        let (mut verb, arg, _) = words(msg);
        verb.make_ascii_uppercase();
        let size = shared.fetch_size;
        match verb.as_str() {
            "CAPA" => out.extend_from_slice(b"+OK\r\nUSER\r\nSASL PLAIN\r\nTOP\r\nUIDL\r\n.\r\n"),
            "USER" | "XCLIENT" | "NOOP" | "RSET" | "DELE" => out.extend_from_slice(b"+OK\r\n"),
            "PASS" => out.extend_from_slice(b"+OK Logged in.\r\n"),
            "AUTH" if arg.is_empty() => out.extend_from_slice(b"+OK\r\nPLAIN\r\n.\r\n"),
            "AUTH" => {
                if msg.split(|&b| b == b' ').filter(|w| !w.is_empty()).count() >= 3 {
                    out.extend_from_slice(b"+OK Logged in.\r\n");
                } else {
                    out.extend_from_slice(b"+ \r\n");
                    self.auth_response = true;
                }
            }
            "STAT" => out.extend_from_slice(format!("+OK 1 {size}\r\n").as_bytes()),
            "LIST" => {
                out.extend_from_slice(format!("+OK 1 messages\r\n1 {size}\r\n.\r\n").as_bytes())
            }
            "UIDL" => out.extend_from_slice(b"+OK\r\n1 msg1\r\n.\r\n"),
            "RETR" => {
                out.extend_from_slice(format!("+OK {size} octets\r\n").as_bytes());
                // The body pattern is whole lines; a cut one is closed before the dot.
                return Action::Body {
                    size,
                    tail: b"\r\n.\r\n".to_vec(),
                };
            }
            "QUIT" => {
                out.extend_from_slice(b"+OK Logging out.\r\n");
                return Action::Close;
            }
            "STLS" => out.extend_from_slice(b"-ERR No TLS on the fake backend.\r\n"),
            _ => out.extend_from_slice(b"-ERR Unknown command.\r\n"),
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared {
            fetch_size: 10,
            body: body_pattern(),
            sessions: AtomicU64::new(0),
            active: AtomicU64::new(0),
            body_bytes: AtomicU64::new(0),
        }
    }

    #[test]
    fn nginx_style_login_with_synchronizing_literals() {
        let mut imap = Imap::default();
        let mut out = Vec::new();
        let mut buf = b"a1 LOGIN {4}\r\n".to_vec();
        assert_eq!(imap.frame(&buf, &mut out), None);
        assert_eq!(out, b"+ OK\r\n");
        out.clear();
        buf.extend_from_slice(b"user {2}\r\n");
        assert_eq!(imap.frame(&buf, &mut out), None);
        assert_eq!(out, b"+ OK\r\n", "one continuation per literal");
        out.clear();
        buf.extend_from_slice(b"pw\r\n");
        assert_eq!(imap.frame(&buf, &mut out), Some(buf.len()));
        assert!(out.is_empty());
        let action = imap.handle(&buf, &mut out, &shared());
        assert!(matches!(action, Action::Continue));
        assert!(out.starts_with(b"a1 OK [CAPABILITY"));
    }

    #[test]
    fn non_synchronizing_literal_gets_no_continuation() {
        let mut imap = Imap::default();
        let mut out = Vec::new();
        let buf = b"L LOGIN {4+}\r\nuser {2+}\r\npw\r\nX NOOP\r\n";
        assert_eq!(imap.frame(buf, &mut out), Some(buf.len() - 8));
        assert!(out.is_empty());
    }

    #[test]
    fn fetch_partial_and_idle() {
        let mut imap = Imap::default();
        let mut out = Vec::new();
        let s = shared();
        match imap.handle(b"f UID FETCH 1 BODY.PEEK[]<0.1234>\r\n", &mut out, &s) {
            Action::Body { size, tail } => {
                assert_eq!(size, 1234);
                assert_eq!(tail, b")\r\nf OK Fetch completed.\r\n");
            }
            _ => panic!("expected a body"),
        }
        assert_eq!(out, b"* 1 FETCH (BODY[]<0> {1234}\r\n");
        out.clear();
        imap.handle(b"i IDLE\r\n", &mut out, &s);
        assert_eq!(out, b"+ idling\r\n");
        out.clear();
        imap.handle(b"DONE\r\n", &mut out, &s);
        assert_eq!(out, b"i OK Idle completed.\r\n");
    }

    #[test]
    fn authenticate_with_and_without_initial_response() {
        let s = shared();
        let mut imap = Imap::default();
        let mut out = Vec::new();
        imap.handle(b"L AUTHENTICATE PLAIN AGEAYg==\r\n", &mut out, &s);
        assert!(out.starts_with(b"L OK"));
        out.clear();
        imap.handle(b"M AUTHENTICATE PLAIN\r\n", &mut out, &s);
        assert_eq!(out, b"+ \r\n");
        out.clear();
        imap.handle(b"AGEAYg==\r\n", &mut out, &s);
        assert!(out.starts_with(b"M OK"));
    }

    #[test]
    fn pop3_dialogue() {
        let s = shared();
        let mut pop = Pop3::default();
        let mut out = Vec::new();
        pop.handle(b"AUTH PLAIN AGEAYg==\r\n", &mut out, &s);
        assert_eq!(out, b"+OK Logged in.\r\n");
        out.clear();
        pop.handle(b"STAT\r\n", &mut out, &s);
        assert_eq!(out, b"+OK 1 10\r\n");
        out.clear();
        assert!(matches!(
            pop.handle(b"QUIT\r\n", &mut out, &s),
            Action::Close
        ));
    }

    #[test]
    fn body_lines_never_start_with_a_dot() {
        let body = body_pattern();
        assert!(body.len() >= 256 * 1024);
        assert!(body.split(|&b| b == b'\n').all(|l| !l.starts_with(b".")));
    }
}
