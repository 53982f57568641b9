//! The whole server in-process, on 127.0.0.1:0: the listener, the session driver, the
//! login execution and the relay, and a reload, against a scripted IMAP backend. The
//! system tests do the same against real Dovecot; these run in `cargo test` and show
//! the driver's own rules without a daemon.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use postern::config::Config;
use postern_server::Server;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A backend that speaks just enough IMAP: Dovecot's greeting, `AUTHENTICATE PLAIN`
/// with an initial response (alice@example.test/secret accepted), then `NOOP` and `LOGOUT`.
async fn backend(name: &'static str, logins: Arc<AtomicUsize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let logins = Arc::clone(&logins);
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut lines = BufReader::new(r).lines();
                w.write_all(b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID AUTH=PLAIN] ready.\r\n")
                    .await
                    .unwrap();
                while let Ok(Some(line)) = lines.next_line().await {
                    let (tag, rest) = line.split_once(' ').unwrap_or((&line, ""));
                    let reply = if rest.starts_with("AUTHENTICATE PLAIN ") {
                        // base64("\0alice@example.test\0secret"): the normalized name
                        if rest.ends_with("AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=") {
                            logins.fetch_add(1, Ordering::SeqCst);
                            format!("{tag} OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
                        } else {
                            format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
                        }
                    } else if rest.starts_with("ID ") {
                        format!("* ID (\"name\" \"{name}\")\r\n{tag} OK ID completed.\r\n")
                    } else if rest == "LOGOUT" {
                        let _ = w
                            .write_all(format!("* BYE bye\r\n{tag} OK done\r\n").as_bytes())
                            .await;
                        return;
                    } else {
                        format!("{tag} OK {rest} completed.\r\n")
                    };
                    if w.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Two backends, alice pinned to `alice_on`, one plaintext IMAP listener, then
/// `rest` (the sections a test adds).
fn config_with(dir: &Path, b1: SocketAddr, b2: SocketAddr, alice_on: &str, rest: &str) -> Config {
    let text = format!(
        r#"
[limits]
trusted_networks = ["127.0.0.1"]

[routing]
store = "static"
unknown_users = "reject"

[routing.normalize]
default_domain = "example.test"

[routing.static]
"alice@example.test" = "{alice_on}"

[backends.b1]
host = "127.0.0.1"
imap = {{ port = {p1} }}

[backends.b2]
host = "127.0.0.1"
imap = {{ port = {p2} }}

[[listeners]]
name = "imap-plain"
protocol = "imap"
bind = "127.0.0.1:0"
tls = "none"
insecure_plaintext_auth = true
{rest}"#,
        p1 = b1.port(),
        p2 = b2.port(),
    );
    Config::from_toml(&text, dir).unwrap_or_else(|e| panic!("{e:#}"))
}

fn config(dir: &Path, b1: SocketAddr, b2: SocketAddr, alice_on: &str) -> Config {
    config_with(dir, b1, b2, alice_on, "\n[health]\nenabled = false\n")
}

async fn start(config: Config) -> (Server, SocketAddr) {
    let runtime = postern_server::Runtime::new(&config.settings);
    let router = config
        .router_with(Arc::clone(&runtime.health) as Arc<dyn postern_route::Availability>)
        .await
        .unwrap();
    let server = Server::bind(Arc::new(config.settings), router, runtime)
        .await
        .unwrap();
    let addr = server.local_addrs()[0].1;
    (server, addr)
}

struct Client {
    lines: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Client {
    async fn connect(addr: SocketAddr) -> (Self, String) {
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        let mut c = Client {
            lines: BufReader::new(r).lines(),
            w,
        };
        let greeting = c.line().await;
        (c, greeting)
    }

    async fn line(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
            .await
            .expect("an answer within 60 s")
            .unwrap()
            .unwrap_or_default()
    }

    /// Sends a command; returns every line up to the tagged answer.
    async fn cmd(&mut self, tag: &str, command: &str) -> Vec<String> {
        self.w
            .write_all(format!("{tag} {command}\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = Vec::new();
        loop {
            let l = self.line().await;
            let done = l.starts_with(&format!("{tag} ")) || l.is_empty();
            out.push(l);
            if done {
                return out;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_relay_and_reload_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let (n1, n2) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let b1 = backend("b1", Arc::clone(&n1)).await;
    let b2 = backend("b2", Arc::clone(&n2)).await;
    let (server, addr) = start(config(dir.path(), b1, b2, "b1")).await;
    let handle = server.handle();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));

    // Postern's own greeting, the backend's capabilities after the login, the relay.
    let (mut c, greeting) = Client::connect(addr).await;
    assert!(
        greeting.starts_with("* OK [CAPABILITY IMAP4rev1"),
        "{greeting}"
    );
    let login = c.cmd("a", "LOGIN Alice secret").await;
    assert_eq!(
        login.last().unwrap(),
        "a OK [CAPABILITY IMAP4rev1 IDLE] Logged in"
    );
    assert_eq!(c.cmd("b", "ID NIL").await[0], "* ID (\"name\" \"b1\")");
    assert_eq!(c.cmd("c", "NOOP").await, ["c OK NOOP completed."]);
    assert_eq!(n1.load(Ordering::SeqCst), 1);

    // A wrong password is the backend's refusal, passed on; nobody is pinned anew.
    let (mut bad, _) = Client::connect(addr).await;
    let refused = bad.cmd("a", "LOGIN alice wrong").await;
    assert_eq!(
        refused.last().unwrap(),
        "a NO [AUTHENTICATIONFAILED] Authentication failed."
    );
    // An unknown user (static map, reject) never reaches a backend.
    let unknown = bad.cmd("b", "LOGIN mallory secret").await;
    assert!(
        unknown
            .last()
            .unwrap()
            .starts_with("b NO [AUTHENTICATIONFAILED]"),
        "{unknown:?}"
    );

    // A reload that moves alice to b2: the live session is not touched (a static map
    // change is an operator's edit, not a fenced move), and new logins go to b2.
    let new = config(dir.path(), b1, b2, "b2");
    let runtime = handle.runtime().renew(&new.settings);
    let router = new
        .router_with(Arc::clone(&runtime.health) as Arc<dyn postern_route::Availability>)
        .await
        .unwrap();
    let summary = handle
        .reload(Arc::new(new.settings), router, runtime)
        .await
        .unwrap();
    assert_eq!(handle.generation(), 2, "{summary:?}");
    assert_eq!(c.cmd("d", "NOOP").await, ["d OK NOOP completed."]);
    let (mut again, _) = Client::connect(addr).await;
    again.cmd("a", "LOGIN alice secret").await;
    assert_eq!(again.cmd("b", "ID NIL").await[0], "* ID (\"name\" \"b2\")");
    assert_eq!(n2.load(Ordering::SeqCst), 1);

    // Shutdown: a pre-auth client gets the goodbye; the server's run ends.
    let (mut idle, _) = Client::connect(addr).await;
    stop_tx.send(()).unwrap();
    assert_eq!(idle.line().await, "* BYE Server shutting down.");
    drop((c, again, bad));
    tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the server stops")
        .unwrap();
}

/// The opening every listener shares (`prologue.rs`): the per-address connection limit
/// answered with the protocol's refusal, and a PROXY header from a peer outside
/// `accept_proxy_from` refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_opening_refuses_over_the_limit_and_untrusted_proxy_headers() {
    let dir = tempfile::tempdir().unwrap();
    let b1 = backend("b1", Arc::new(AtomicUsize::new(0))).await;
    let text = format!(
        r#"
[limits]
max_connections_per_ip = 1

[routing]
store = "static"

[routing.static]
"alice" = "b1"

[backends.b1]
host = "127.0.0.1"
imap = {{ port = {port} }}

[[listeners]]
name = "imap-plain"
protocol = "imap"
bind = "127.0.0.1:0"
tls = "none"
insecure_plaintext_auth = true
accept_proxy_from = ["10.9.9.9"]

[health]
enabled = false
"#,
        port = b1.port(),
    );
    let config = Config::from_toml(&text, dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
    let (server, addr) = start(config).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));

    let (first, greeting) = Client::connect(addr).await;
    assert!(greeting.starts_with("* OK "), "{greeting}");
    let (mut second, refusal) = Client::connect(addr).await;
    assert!(refusal.starts_with("* BYE [LIMIT]"), "{refusal}");
    assert_eq!(second.line().await, "", "closed after the refusal");
    drop(first);

    // The slot is freed once Postern sees the first client go: a bounded wait.
    let mut proxied = None;
    for _ in 0..100 {
        let (c, greeting) = Client::connect(addr).await;
        if greeting.starts_with("* OK ") {
            proxied = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut proxied = proxied.expect("the first client's slot is freed");
    proxied
        .w
        .write_all(b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 143\r\n")
        .await
        .unwrap();
    assert_eq!(
        proxied.line().await,
        "",
        "an untrusted PROXY header is refused"
    );

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the server stops")
        .unwrap();
}

/// A relayed session runs in a task of its own once its login is done (the login
/// task ends): that task still ends on a kick with the protocol's goodbye, still
/// holds shutdown up until it has said goodbye, and still writes the access-log line
/// with what the login phase learned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_sessions_end_with_their_goodbye_and_access_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let b1 = backend("b1", Arc::new(AtomicUsize::new(0))).await;
    let text = format!(
        r#"
[log]
access = "access.log"

[timeouts]
shutdown_grace = "0s"

[routing]
store = "static"
unknown_users = "reject"

[routing.normalize]
default_domain = "example.test"

[routing.static]
"alice@example.test" = "b1"

[backends.b1]
host = "127.0.0.1"
imap = {{ port = {port} }}

[[listeners]]
name = "imap-plain"
protocol = "imap"
bind = "127.0.0.1:0"
tls = "none"
insecure_plaintext_auth = true

[health]
enabled = false
"#,
        port = b1.port(),
    );
    let config = Config::from_toml(&text, dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
    let (server, addr) = start(config).await;
    let registry = server.registry();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));
    let log_lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };

    // A kick ends a relayed session with the goodbye.
    let (mut kicked, _) = Client::connect(addr).await;
    let login = kicked.cmd("a", "LOGIN alice secret").await;
    assert!(login.last().unwrap().starts_with("a OK "), "{login:?}");
    assert_eq!(registry.kick_user("alice@example.test"), 1);
    assert_eq!(
        kicked.line().await,
        "* BYE [UNAVAILABLE] Session ended by the server, please reconnect."
    );
    assert_eq!(kicked.line().await, "", "closed after the goodbye");

    // Shutdown, with no grace: the relayed session gets the goodbye, and the server's
    // run ends only after the session has ended and logged.
    let (mut relayed, _) = Client::connect(addr).await;
    relayed.cmd("a", "LOGIN alice secret").await;
    assert_eq!(relayed.cmd("b", "NOOP").await, ["b OK NOOP completed."]);
    stop_tx.send(()).unwrap();
    assert_eq!(
        relayed.line().await,
        "* BYE [UNAVAILABLE] Server shutting down."
    );
    tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the server stops")
        .unwrap();

    let lines = log_lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (line, reason) in lines.iter().zip(["kicked", "shutdown"]) {
        assert_eq!(line["reason"], reason, "{line}");
        assert_eq!(line["result"], "relayed", "{line}");
        assert_eq!(line["user"], "alice@example.test", "{line}");
        assert_eq!(line["backend"], "b1", "{line}");
        assert_eq!(line["login"], "accepted", "{line}");
        assert_eq!(line["login_attempts"], 1, "{line}");
        assert_eq!(line["listener"], "imap-plain", "{line}");
        assert_eq!(line["client_ip"], "127.0.0.1", "{line}");
    }
    // The second session relayed a NOOP each way after its login.
    assert_eq!(lines[1]["bytes_in"], "b NOOP\r\n".len(), "{}", lines[1]);
    assert_eq!(
        lines[1]["bytes_out"],
        "b OK NOOP completed.\r\n".len(),
        "{}",
        lines[1]
    );
}

/// A backend that greets and then never answers a login (a Dovecot whose auth hangs,
/// or one frozen after its greeting). Each login line it swallows is announced.
async fn stuck_backend(logins: tokio::sync::mpsc::UnboundedSender<()>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let logins = logins.clone();
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut lines = BufReader::new(r).lines();
                w.write_all(b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID AUTH=PLAIN] ready.\r\n")
                    .await
                    .unwrap();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains("AUTHENTICATE") {
                        let _ = logins.send(());
                    }
                }
                drop(w);
            });
        }
    });
    addr
}

fn shared_pool_config(dir: &Path, b1: SocketAddr, b2: SocketAddr) -> Config {
    let rest = r#"
[pools.default]
mode = "shared"
failover = "temporary"

[timeouts]
# Far beyond the test's bounded waits: only the release at DOWN can answer in time.
preauth = "600s"
backend_login = "600s"

[health]
# No checks: the DOWN below comes from the failures reported to the health state,
# without a start-up grace holding it back.
enabled = false
startup_grace = "0s"
"#;
    config_with(dir, b1, b2, "b1", rest)
}

/// A login that started under the previous configuration generation is released when
/// its backend goes DOWN after the reload, and routed again: a shared-pool user lands
/// on the other backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_waiting_since_before_a_reload_is_released_at_down_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut stuck_logins) = tokio::sync::mpsc::unbounded_channel();
    let b1 = stuck_backend(tx).await;
    let n2 = Arc::new(AtomicUsize::new(0));
    let b2 = backend("b2", Arc::clone(&n2)).await;
    let (server, addr) = start(shared_pool_config(dir.path(), b1, b2)).await;
    let handle = server.handle();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));

    // Alice's login reaches b1 and waits there, in generation 1.
    let (mut c, _) = Client::connect(addr).await;
    c.w.write_all(b"a LOGIN alice secret\r\n").await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), stuck_logins.recv())
        .await
        .expect("the login reaches b1")
        .unwrap();

    // A reload (the same configuration): generation 2, with its own health.
    let new = shared_pool_config(dir.path(), b1, b2);
    let runtime = handle.runtime().renew(&new.settings);
    let router = new
        .router_with(Arc::clone(&runtime.health) as Arc<dyn postern_route::Availability>)
        .await
        .unwrap();
    handle
        .reload(Arc::new(new.settings), router, runtime)
        .await
        .unwrap();
    assert_eq!(handle.generation(), 2);

    // b1 goes DOWN in generation 2 (`fall` failures, as real logins report them).
    let health = handle.runtime().health;
    for _ in 0..2 {
        health.report("b1", postern_proto::Protocol::Imap, Err("refused".into()));
    }
    assert_eq!(
        postern_route::Availability::state(&*health, "b1", postern_proto::Protocol::Imap),
        postern_route::BackendState::Down
    );

    // The waiting login is released and routed again: b2 serves alice.
    let answer = c.line().await;
    assert_eq!(answer, "a OK [CAPABILITY IMAP4rev1 IDLE] Logged in");
    assert_eq!(c.cmd("b", "ID NIL").await[0], "* ID (\"name\" \"b2\")");
    assert_eq!(n2.load(Ordering::SeqCst), 1);
    assert!(
        stuck_logins.try_recv().is_err(),
        "the login was not sent to b1 again"
    );

    stop_tx.send(()).unwrap();
    drop(c);
    tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the server stops")
        .unwrap();
}
