//! nginx's auth_http responder (see shared/docs/nginx-mail.md §2): every login is
//! accepted and sent to one backend address, so nginx can stand in front of the same
//! fake backend as Postern.
//!
//! nginx opens a new connection per login, sends `GET ... HTTP/1.0` with `Auth-*`
//! headers and reads headers back: `Auth-Status: OK`, `Auth-Server` (an IP literal),
//! `Auth-Port`, and, for IMAP and POP3, `Auth-Pass` (nginx refuses to log in to the
//! backend without it). The password is echoed as received: nginx %-escapes it in the
//! request and does not decode the reply, which is the same for the bench's passwords.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Listen address (port 0: the kernel picks one; the ready line tells which).
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    /// Backend address returned in Auth-Server (nginx accepts only an IP literal).
    #[arg(long, default_value = "127.0.0.1")]
    backend_host: IpAddr,
    /// Backend port for IMAP logins.
    #[arg(long)]
    imap_port: u16,
    /// Backend port for POP3 logins.
    #[arg(long)]
    pop3_port: Option<u16>,
    /// Backend port for SMTP logins.
    #[arg(long)]
    smtp_port: Option<u16>,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// nginx's request is a few hundred bytes; this bounds a confused client.
const MAX_REQUEST: usize = 8 * 1024;

#[derive(Serialize)]
struct Ready {
    event: &'static str,
    pid: u32,
    addr: SocketAddr,
}

#[derive(Serialize)]
struct Stopped {
    event: &'static str,
    requests: u64,
}

pub(crate) fn run(args: Args) -> Result<()> {
    crate::runtime(args.threads)?.block_on(serve(args))
}

async fn serve(args: Args) -> Result<()> {
    let listener = TcpListener::bind(args.bind)
        .await
        .with_context(|| format!("cannot listen on {}", args.bind))?;
    let ready = Ready {
        event: "ready",
        pid: std::process::id(),
        addr: listener.local_addr()?,
    };
    crate::emit(&ready)?;
    eprintln!(
        "fake auth_http: on {}, sending logins to {} (imap {}, pop3 {:?}, smtp {:?})",
        ready.addr, args.backend_host, args.imap_port, args.pop3_port, args.smtp_port
    );
    let requests = Arc::new(AtomicU64::new(0));
    let args = Arc::new(args);
    let accept = {
        let requests = Arc::clone(&requests);
        async move {
            loop {
                match listener.accept().await {
                    Ok((sock, _)) => {
                        let _ = sock.set_nodelay(true);
                        let args = Arc::clone(&args);
                        let requests = Arc::clone(&requests);
                        tokio::spawn(async move {
                            let answered =
                                tokio::time::timeout(Duration::from_secs(10), answer(sock, &args))
                                    .await;
                            if matches!(answered, Ok(Ok(()))) {
                                requests.fetch_add(1, Relaxed);
                            }
                        });
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
    };
    tokio::spawn(accept);
    crate::backend::shutdown_signal().await;
    let requests = requests.load(Relaxed);
    eprintln!("fake auth_http: stopped after {requests} requests");
    crate::emit(&Stopped {
        event: "stopped",
        requests,
    })
}

async fn answer(mut sock: TcpStream, args: &Args) -> std::io::Result<()> {
    let mut req = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut chunk).await?;
        if n == 0 || req.len() + n > MAX_REQUEST {
            return Ok(());
        }
        req.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
    let reply = reply(&String::from_utf8_lossy(&req), args);
    sock.write_all(reply.as_bytes()).await?;
    sock.shutdown().await
}

fn reply(request: &str, args: &Args) -> String {
    let header = |name: &str| -> Option<&str> {
        request.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    };
    let port = match header("Auth-Protocol")
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("imap") => Some(args.imap_port),
        Some("pop3") => args.pop3_port,
        Some("smtp") => args.smtp_port,
        _ => None,
    };
    let Some(port) = port else {
        return "HTTP/1.0 200 OK\r\nAuth-Status: No backend for this protocol\r\n\r\n".to_owned();
    };
    let pass = header("Auth-Pass").unwrap_or_default();
    format!(
        "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: {}\r\nAuth-Port: {port}\r\nAuth-Pass: {pass}\r\n\r\n",
        args.backend_host
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Args {
        Args {
            bind: "127.0.0.1:0".parse().unwrap(),
            backend_host: "127.0.0.1".parse().unwrap(),
            imap_port: 1143,
            pop3_port: Some(1110),
            smtp_port: None,
            threads: 1,
        }
    }

    #[test]
    fn routes_by_protocol_and_echoes_the_password() {
        let req = "GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\nAuth-Method: plain\r\n\
                   Auth-User: bench1@example.test\r\nAuth-Pass: benchpw\r\n\
                   Auth-Protocol: pop3\r\nAuth-Login-Attempt: 1\r\nClient-IP: 127.0.0.1\r\n\r\n";
        let r = reply(req, &args());
        assert!(r.contains("Auth-Status: OK\r\n"));
        assert!(r.contains("Auth-Server: 127.0.0.1\r\n"));
        assert!(r.contains("Auth-Port: 1110\r\n"));
        assert!(r.contains("Auth-Pass: benchpw\r\n"));
        assert!(r.ends_with("\r\n\r\n"));
    }

    #[test]
    fn unknown_protocol_is_refused() {
        let req = "GET / HTTP/1.0\r\nAuth-Protocol: smtp\r\n\r\n";
        assert!(!reply(req, &args()).contains("Auth-Status: OK"));
    }
}
