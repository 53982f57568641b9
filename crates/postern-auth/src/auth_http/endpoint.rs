//! The `auth_http` URL, read as nginx's `ngx_mail_auth_http` directive reads it.

use std::fmt;

/// Where to send requests and what to put in the request line and `Host` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The address to connect to.
    pub target: Target,
    /// The `Host` header: the URL's host without the port (brackets kept for IPv6),
    /// or `localhost` for a unix socket.
    pub host: String,
    /// The request path, `/` when the URL has none.
    pub uri: String,
}

/// The auth server's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A host name or IP literal (no brackets) and a port. nginx resolves the name
    /// once, at configuration load, and uses only the first address.
    Tcp {
        /// Host name or IP literal.
        host: String,
        /// Port, 80 by default.
        port: u16,
    },
    /// A unix socket path (`unix:/path[:/uri]`).
    Unix(String),
}

/// Why an `auth_http` URL was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointError(&'static str);

impl fmt::Display for EndpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid auth_http URL: {}", self.0)
    }
}

impl std::error::Error for EndpointError {}

impl Endpoint {
    /// Parses `[http://]host[:port][/uri]`, `[http://][v6]:port/uri` or
    /// `unix:/path[:/uri]`. `https://` is refused: nginx has no TLS to the auth server.
    pub fn parse(url: &str) -> Result<Endpoint, EndpointError> {
        if url.bytes().any(|b| b <= 0x20 || b == 0x7f) {
            return Err(EndpointError(
                "spaces and control characters are not allowed",
            ));
        }
        let url = url.strip_prefix("http://").unwrap_or(url);
        if url.contains("://") {
            return Err(EndpointError("only http:// is supported"));
        }
        if let Some(rest) = url.strip_prefix("unix:") {
            let (path, uri) = rest.split_once(':').unwrap_or((rest, ""));
            if path.is_empty() {
                return Err(EndpointError("empty unix socket path"));
            }
            return Ok(Endpoint {
                target: Target::Unix(path.to_owned()),
                host: "localhost".to_owned(),
                uri: uri_or_root(uri),
            });
        }
        let (authority, uri) = match url.find('/') {
            Some(i) => url.split_at(i),
            None => (url, ""),
        };
        let (host, host_header, port) = if let Some(rest) = authority.strip_prefix('[') {
            let (v6, after) = rest
                .split_once(']')
                .ok_or(EndpointError("unterminated IPv6 literal"))?;
            if v6.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(EndpointError("invalid IPv6 literal"));
            }
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or(EndpointError("invalid port"))?),
            };
            let header = authority.get(..v6.len() + 2).unwrap_or(authority);
            (v6, header, port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, host, Some(port)),
                None => (authority, authority, None),
            }
        };
        if host.is_empty() {
            return Err(EndpointError("no host"));
        }
        let port = match port {
            None => 80,
            Some(p) => Some(p)
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|&p| p != 0)
                .ok_or(EndpointError("invalid port"))?,
        };
        Ok(Endpoint {
            target: Target::Tcp {
                host: host.to_owned(),
                port,
            },
            host: host_header.to_owned(),
            uri: uri_or_root(uri),
        })
    }
}

fn uri_or_root(uri: &str) -> String {
    if uri.is_empty() {
        "/".to_owned()
    } else {
        uri.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Target {
        Target::Tcp {
            host: host.to_owned(),
            port,
        }
    }

    #[test]
    fn nginx_url_forms() {
        let e = Endpoint::parse("http://127.0.0.1:9000/auth").unwrap();
        assert_eq!(
            (e.target, e.host.as_str(), e.uri.as_str()),
            (tcp("127.0.0.1", 9000), "127.0.0.1", "/auth")
        );
        let e = Endpoint::parse("auth.example.org").unwrap();
        assert_eq!(
            (e.target, e.host.as_str(), e.uri.as_str()),
            (tcp("auth.example.org", 80), "auth.example.org", "/")
        );
        let e = Endpoint::parse("[::1]:8080/a?b=c").unwrap();
        assert_eq!(
            (e.target, e.host.as_str(), e.uri.as_str()),
            (tcp("::1", 8080), "[::1]", "/a?b=c")
        );
        let e = Endpoint::parse("unix:/run/auth.sock:/mail").unwrap();
        assert_eq!(
            (e.target, e.host.as_str(), e.uri.as_str()),
            (Target::Unix("/run/auth.sock".into()), "localhost", "/mail")
        );
        let e = Endpoint::parse("unix:/run/auth.sock").unwrap();
        assert_eq!(e.uri, "/");
        for bad in [
            "https://x/",
            "x:0/",
            "x:99999/",
            "x:/",
            ":80/",
            "[::1/",
            "[nope]:1/",
            "a b/",
            "unix:",
            "x:+80/",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
