//! The JSON access log: one line per session end, beside the human-readable tracing
//! log. Configured by `[log] access` (`"off"`, `"stdout"` or a file path, appended to
//! and reopened after each reload, so log rotation is "move the file, then reload").
//!
//! What the session learns on the way (the real client address behind a PROXY header,
//! the TLS version, the user, the backend) is noted in a task-local [`Facts`] by the
//! code that learns it; the session's end writes the line. Never a password, a SASL
//! exchange or any other client byte: only names Postern itself decided on.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::SystemTime;

use postern_proto::Protocol;
use serde::Serialize;

pub use crate::settings::AccessLog;

/// What a session learned about itself, for its access-log line.
#[derive(Clone, Debug, Default)]
pub(crate) struct Facts {
    client: Option<SocketAddr>,
    tls: Option<&'static str>,
    user: Option<String>,
    backend: Option<String>,
    login: Option<&'static str>,
    logins: u32,
}

impl Facts {
    /// The real client address (from a PROXY header).
    pub(crate) fn client(&mut self, addr: SocketAddr) {
        self.client = Some(addr);
    }

    /// The negotiated TLS version.
    pub(crate) fn tls(&mut self, version: Option<&'static str>) {
        self.tls = version;
    }

    /// The (normalized) user.
    pub(crate) fn user(&mut self, user: &str) {
        self.user = Some(user.to_owned());
    }

    /// The backend the session was routed to.
    pub(crate) fn backend(&mut self, backend: &str) {
        self.backend = Some(backend.to_owned());
    }

    /// The result of a login attempt (one of `metrics::LOGIN_RESULTS`).
    pub(crate) fn login(&mut self, result: &'static str) {
        self.login = Some(result);
        self.logins = self.logins.saturating_add(1);
    }
}

/// How a session ended.
#[derive(Debug)]
pub(crate) struct Ended<'a> {
    pub(crate) id: &'a str,
    pub(crate) protocol: Protocol,
    pub(crate) listener: &'a str,
    /// The TCP peer (the real client is in the facts when a PROXY header named it).
    pub(crate) peer: SocketAddr,
    /// Why it ended (`closed`, `idle_timeout`, `client_closed`, `auth_refused`...).
    pub(crate) reason: &'a str,
    /// Bytes client → backend and backend → client, when it was relayed.
    pub(crate) relayed: Option<(u64, u64)>,
    pub(crate) secs: f64,
}

/// One access-log line.
#[derive(Debug, Serialize)]
struct Line<'a> {
    timestamp: String,
    session: &'a str,
    protocol: &'static str,
    listener: &'a str,
    client_ip: String,
    client_port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    via: Option<String>,
    tls: Option<&'static str>,
    user: Option<&'a str>,
    backend: Option<&'a str>,
    /// `relayed` (logged in and relayed) or `not_relayed`.
    result: &'static str,
    reason: &'a str,
    /// The last login attempt's result, if any.
    login: Option<&'static str>,
    login_attempts: u32,
    bytes_in: u64,
    bytes_out: u64,
    duration: f64,
}

fn render(ended: &Ended<'_>, facts: &Facts, now: SystemTime) -> String {
    let client = facts.client.unwrap_or(ended.peer);
    let (bytes_in, bytes_out) = ended.relayed.unwrap_or((0, 0));
    let line = Line {
        timestamp: rfc3339(now),
        session: ended.id,
        protocol: ended.protocol.as_str(),
        listener: ended.listener,
        client_ip: client.ip().to_canonical().to_string(),
        client_port: client.port(),
        via: facts
            .client
            .filter(|c| *c != ended.peer)
            .map(|_| ended.peer.ip().to_canonical().to_string()),
        tls: facts.tls,
        user: facts.user.as_deref(),
        backend: facts.backend.as_deref(),
        result: if ended.relayed.is_some() {
            "relayed"
        } else {
            "not_relayed"
        },
        reason: ended.reason,
        login: facts.login,
        login_attempts: facts.logins,
        bytes_in,
        bytes_out,
        duration: (ended.secs * 1000.0).round() / 1000.0,
    };
    serde_json::to_string(&line).unwrap_or_default()
}

/// The open sink, and the configuration generation it was opened for.
struct Sink {
    generation: u64,
    target: AccessLog,
    file: Option<std::fs::File>,
}

static SINK: Mutex<Sink> = Mutex::new(Sink {
    generation: 0,
    target: AccessLog::Off,
    file: None,
});

/// Writes the session's line, if the access log is on.
/// `generation`: the configuration generation the session belongs to (a newer one
/// reopens the file, which is how a rotated log is let go).
pub(crate) fn session_ended(target: &AccessLog, generation: u64, facts: &Facts, ended: &Ended<'_>) {
    if *target == AccessLog::Off {
        return;
    }
    let mut line = render(ended, facts, SystemTime::now());
    line.push('\n');
    write(generation, target, line.as_bytes());
}

fn write(generation: u64, target: &AccessLog, line: &[u8]) {
    let mut sink = SINK.lock().unwrap_or_else(|e| e.into_inner());
    // A newer generation (a reload) reopens the file, even under the same name: that is
    // how a rotated log is let go. Sessions of older generations write where the newest
    // configuration says.
    if generation > sink.generation {
        sink.generation = generation;
        sink.target = target.clone();
        sink.file = None;
        if let AccessLog::File(path) = target {
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                Ok(f) => sink.file = Some(f),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot open the access log")
                }
            }
        }
    }
    let sink = &mut *sink;
    let result = match (&sink.target, sink.file.as_mut()) {
        (AccessLog::Stdout, _) => std::io::stdout().lock().write_all(line),
        // One write per line: appends of whole lines do not interleave.
        (AccessLog::File(_), Some(f)) => f.write_all(line),
        _ => Ok(()),
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "access log write failed");
    }
}

/// `2026-05-01T12:34:56.789Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_123); // 2000-02-29
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_767_225_599); // last second of 2025
        assert_eq!(rfc3339(t), "2025-12-31T23:59:59.000Z");
    }

    #[test]
    fn line_has_every_field_and_the_real_client() {
        let facts = Facts {
            client: Some("203.0.113.9:5555".parse().unwrap()),
            tls: Some("TLSv1_3"),
            user: Some("alice@example.test".into()),
            backend: Some("b1".into()),
            login: Some("accepted"),
            logins: 1,
        };
        let ended = Ended {
            id: "abc",
            protocol: Protocol::Imap,
            listener: "imap",
            peer: "127.0.0.1:4000".parse().unwrap(),
            reason: "closed",
            relayed: Some((10, 2000)),
            secs: 1.23456,
        };
        let line = render(&ended, &facts, UNIX_EPOCH);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["client_ip"], "203.0.113.9");
        assert_eq!(v["client_port"], 5555);
        assert_eq!(v["via"], "127.0.0.1");
        assert_eq!(v["user"], "alice@example.test");
        assert_eq!(v["backend"], "b1");
        assert_eq!(v["result"], "relayed");
        assert_eq!(v["bytes_in"], 10);
        assert_eq!(v["bytes_out"], 2000);
        assert_eq!(v["duration"], 1.235);
        assert_eq!(v["tls"], "TLSv1_3");
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn parse_targets() {
        let base = std::path::Path::new("/etc/postern");
        assert_eq!(AccessLog::parse("off", base).unwrap(), AccessLog::Off);
        assert_eq!(AccessLog::parse("stdout", base).unwrap(), AccessLog::Stdout);
        assert_eq!(
            AccessLog::parse("access.log", base).unwrap(),
            AccessLog::File("/etc/postern/access.log".into())
        );
    }

    #[test]
    fn a_session_record_keeps_the_last_login_and_counts_them() {
        let mut facts = Facts::default();
        facts.user("bob");
        facts.backend("b2");
        facts.login("failed");
        facts.login("accepted");
        assert_eq!(facts.user.as_deref(), Some("bob"));
        assert_eq!(facts.backend.as_deref(), Some("b2"));
        assert_eq!(facts.login, Some("accepted"));
        assert_eq!(facts.logins, 2);
    }
}
