//! `[[listeners]]` and the certificates they serve (`[tls]`, `[tls.sni]`, a listener's
//! own `cert`/`key`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail, ensure};
use postern_server::relay::tls;
use postern_server::settings::ProxyIn;
use postern_server::{AuthMode, Backend, ListenerSettings, TlsMode};

use super::auth::{auth_mode, listener_mode};
use super::fronts::{self, Front};
use super::{parse_net, resolve};
use crate::config::file::{self, File};

type CertPair = (PathBuf, PathBuf);

/// The certificates of the file, each loaded once however many listeners use it (a
/// reload would otherwise read and parse the same chain once per listener).
struct Certificates {
    /// `[tls]`.
    default: Option<CertPair>,
    /// `[tls.sni]`: served by the listeners on the default certificate only, since a
    /// listener with its own certificate is for a name of its own.
    sni: Vec<(String, PathBuf, PathBuf)>,
    loaded: BTreeMap<CertPair, Arc<rustls::ServerConfig>>,
}

impl Certificates {
    fn new(t: Option<&file::Tls>, base: &Path) -> Result<Self> {
        let default = t.map(|t| (resolve(base, &t.cert), resolve(base, &t.key)));
        let mut sni = Vec::new();
        for (name, pair) in t.map(|t| &t.sni).into_iter().flatten() {
            let bare = name.strip_prefix("*.").unwrap_or(name);
            ensure!(
                !bare.is_empty()
                    && bare.split('.').all(|l| {
                        !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    }),
                "tls.sni.{name:?}: not a host name (or *.domain)"
            );
            sni.push((
                name.clone(),
                resolve(base, &pair.cert),
                resolve(base, &pair.key),
            ));
        }
        Ok(Self {
            default,
            sni,
            loaded: BTreeMap::new(),
        })
    }

    fn server_config(&mut self, pair: CertPair, key: &str) -> Result<Arc<rustls::ServerConfig>> {
        if let Some(c) = self.loaded.get(&pair) {
            return Ok(Arc::clone(c));
        }
        let names: Vec<(String, &Path, &Path)> = if Some(&pair) == self.default.as_ref() {
            self.sni
                .iter()
                .map(|(n, c, k)| (n.clone(), c.as_path(), k.as_path()))
                .collect()
        } else {
            Vec::new()
        };
        let c = tls::server_config_sni(&pair.0, &pair.1, &names).with_context(|| key.to_owned())?;
        self.loaded.insert(pair, Arc::clone(&c));
        Ok(c)
    }
}

/// Every listener, in file order (the order sockets are bound and logged in).
pub(super) fn listeners(
    file: &File,
    backends: &BTreeMap<String, Arc<Backend>>,
    hostname: &str,
    base: &Path,
) -> Result<Vec<Arc<ListenerSettings>>> {
    let mut b = Builder {
        file,
        backends,
        hostname,
        base,
        certs: Certificates::new(file.tls.as_ref(), base)?,
    };
    ensure!(
        !file.listeners.is_empty(),
        "listeners: at least one listener is needed"
    );
    let mut names = BTreeSet::new();
    let mut binds = BTreeSet::new();
    let mut listeners = Vec::new();
    for (i, l) in file.listeners.iter().enumerate() {
        let key = format!("listeners[{i}]");
        let name = l
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-{}", fronts::protocol_name(l.protocol), l.bind));
        // Names key the sockets that survive a reload, and label metrics.
        ensure!(
            names.insert(name.clone()),
            "{key}.name: {name:?} is used twice"
        );
        // Port 0 asks the kernel for a free port: several such listeners do not clash.
        ensure!(
            l.bind.port() == 0 || binds.insert(l.bind),
            "{key}.bind: {} is used twice",
            l.bind
        );
        listeners.push(Arc::new(b.listener(l, &key, name)?));
    }
    Ok(listeners)
}

/// What every listener is built from.
struct Builder<'a> {
    file: &'a File,
    backends: &'a BTreeMap<String, Arc<Backend>>,
    hostname: &'a str,
    base: &'a Path,
    certs: Certificates,
}

impl Builder<'_> {
    fn listener(
        &mut self,
        l: &file::Listener,
        key: &str,
        name: String,
    ) -> Result<ListenerSettings> {
        let tls_mode = match l.tls {
            file::TlsMode::None => TlsMode::None,
            file::TlsMode::Starttls => TlsMode::StartTls,
            file::TlsMode::Implicit => TlsMode::Implicit,
        };
        let pair = match (&l.cert, &l.key) {
            (Some(c), Some(k)) => Some((resolve(self.base, c), resolve(self.base, k))),
            (None, None) => self.certs.default.clone(),
            _ => bail!("{key}: cert and key go together"),
        };
        let tls = if tls_mode == TlsMode::None {
            None
        } else {
            let Some(pair) = pair else {
                bail!(
                    "{key}.tls: {} needs a certificate ([tls] or the listener's cert/key)",
                    tls_mode.as_str()
                );
            };
            Some(self.certs.server_config(pair, key)?)
        };
        let auth = auth_mode(listener_mode(self.file, l));
        ensure!(
            !(auth != AuthMode::Backend
                && matches!(l.protocol, file::Protocol::Smtp | file::Protocol::Lmtp)),
            "{key}.auth: MX and LMTP listeners have no authentication"
        );
        let front = Front {
            key,
            listener: l,
            tls_mode,
            auth,
        };
        let front = fronts::front(self.file, &front, self.backends, self.hostname)?;
        Ok(ListenerSettings {
            name,
            bind: l.bind,
            tls_mode,
            tls,
            front,
            proxy: proxy_in(l, key)?,
            auth,
            meters: Default::default(),
        })
    }
}

/// `accept_proxy_from`: an empty list means no PROXY header is accepted at all, so a
/// client cannot claim someone else's address.
fn proxy_in(l: &file::Listener, key: &str) -> Result<Option<ProxyIn>> {
    if l.accept_proxy_from.is_empty() {
        return Ok(None);
    }
    let trusted = l
        .accept_proxy_from
        .iter()
        .map(|n| {
            parse_net(n).ok_or_else(|| anyhow!("{key}.accept_proxy_from: {n:?} is not a network"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(ProxyIn { trusted }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A directory with a self-signed certificate (`cert.pem`, `key.pem`).
    fn certs_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let c = rcgen::generate_simple_self_signed(vec!["mail.example.test".into()]).unwrap();
        std::fs::write(dir.path().join("cert.pem"), c.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), c.signing_key.serialize_pem()).unwrap();
        dir
    }

    const BACKEND: &str = "[backends.b]\nhost = \"h\"\n[backends.b.imap]\nport = 1\n[backends.b.pop3]\nport = 2\n[backends.b.smtp]\nport = 3\n[backends.b.lmtp]\nport = 4\n";

    fn of(top: &str, listeners_text: &str, base: &Path) -> Result<Vec<Arc<ListenerSettings>>> {
        // An array of tables must come after the tables, an inline array before them.
        let text = if listeners_text.starts_with("[[") {
            format!("{top}\n[routing]\n{BACKEND}\n{listeners_text}")
        } else {
            format!("{listeners_text}\n{top}\n[routing]\n{BACKEND}")
        };
        let file: File = toml::from_str(&text).unwrap();
        let backends = super::super::backends::backends(&file, base).unwrap();
        listeners(&file, &backends, "mx.example.test", base)
    }

    fn err(top: &str, listeners_text: &str, base: &Path) -> String {
        format!(
            "{:#}",
            of(top, listeners_text, base).expect_err(listeners_text)
        )
    }

    fn l(protocol: &str, port: u16, extra: &str) -> String {
        format!("[[listeners]]\nprotocol = \"{protocol}\"\nbind = \"127.0.0.1:{port}\"\n{extra}\n")
    }

    const TLS: &str = "[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"";

    #[test]
    fn defaults_names_plaintext_backend_auth_no_proxy() {
        let dir = tempfile::tempdir().unwrap();
        let ls = of("", &l("imap", 143, "tls = \"none\""), dir.path()).unwrap();
        let one = &ls[0];
        assert_eq!(one.name, "imap-127.0.0.1:143");
        assert_eq!(one.tls_mode, TlsMode::None);
        assert!(one.tls.is_none() && one.proxy.is_none());
        assert_eq!(one.auth, AuthMode::Backend);
    }

    #[test]
    fn certificates_are_shared_and_loaded_once() {
        let dir = certs_dir();
        let text = l("imap", 993, "tls = \"implicit\"") + &l("pop3", 995, "tls = \"starttls\"");
        let ls = of(TLS, &text, dir.path()).unwrap();
        let (a, b) = (ls[0].tls.as_ref().unwrap(), ls[1].tls.as_ref().unwrap());
        assert!(Arc::ptr_eq(a, b));
        // A listener's own pair, relative to the file too.
        let text = l(
            "imap",
            993,
            "tls = \"implicit\"\ncert = \"cert.pem\"\nkey = \"key.pem\"",
        );
        assert!(of("", &text, dir.path()).unwrap()[0].tls.is_some());
    }

    #[test]
    fn tls_refusals() {
        let dir = certs_dir();
        assert_eq!(
            err("", &l("imap", 993, "tls = \"implicit\""), dir.path()),
            "listeners[0].tls: implicit needs a certificate ([tls] or the listener's cert/key)"
        );
        assert_eq!(
            err(
                TLS,
                &l("imap", 143, "tls = \"none\"\ncert = \"cert.pem\""),
                dir.path()
            ),
            "listeners[0]: cert and key go together"
        );
        let e = err(
            "",
            &l(
                "imap",
                993,
                "tls = \"implicit\"\ncert = \"absent.pem\"\nkey = \"key.pem\"",
            ),
            dir.path(),
        );
        assert!(e.starts_with("listeners[0]: "), "{e}");
        for bad in ["*.", "a..b", "under_score.test"] {
            let top = format!("{TLS}\n[tls.sni.\"{bad}\"]\ncert = \"cert.pem\"\nkey = \"key.pem\"");
            assert_eq!(
                err(&top, &l("imap", 143, "tls = \"none\""), dir.path()),
                format!("tls.sni.{bad:?}: not a host name (or *.domain)")
            );
        }
        let top =
            format!("{TLS}\n[tls.sni.\"*.example.test\"]\ncert = \"cert.pem\"\nkey = \"key.pem\"");
        assert!(of(&top, &l("imap", 993, "tls = \"implicit\""), dir.path()).is_ok());
    }

    #[test]
    fn names_and_addresses_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            err("", "listeners = []", dir.path()).as_str(),
            "listeners: at least one listener is needed"
        );
        let text = l("imap", 1, "tls = \"none\"\nname = \"a\"")
            + &l("pop3", 2, "tls = \"none\"\nname = \"a\"");
        assert_eq!(
            err("", &text, dir.path()),
            "listeners[1].name: \"a\" is used twice"
        );
        let text = l("imap", 1, "tls = \"none\"") + &l("pop3", 1, "tls = \"none\"");
        assert_eq!(
            err("", &text, dir.path()),
            "listeners[1].bind: 127.0.0.1:1 is used twice"
        );
        // Port 0 is "any free port": no clash, but the default names still must differ.
        let text = l("imap", 0, "tls = \"none\"") + &l("pop3", 0, "tls = \"none\"");
        assert_eq!(of("", &text, dir.path()).unwrap().len(), 2);
    }

    #[test]
    fn relays_have_no_authentication_and_proxy_networks_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            err(
                "",
                &l("smtp", 25, "tls = \"none\"\nauth = \"proxy\""),
                dir.path()
            ),
            "listeners[0].auth: MX and LMTP listeners have no authentication"
        );
        let ls = of(
            "",
            &l(
                "imap",
                143,
                "tls = \"none\"\naccept_proxy_from = [\"10.0.0.0/8\", \"192.0.2.1\"]",
            ),
            dir.path(),
        )
        .unwrap();
        let trusted = &ls[0].proxy.as_ref().unwrap().trusted;
        assert_eq!(trusted.len(), 2);
        assert_eq!(
            err(
                "",
                &l("imap", 143, "tls = \"none\"\naccept_proxy_from = [\"lb\"]"),
                dir.path()
            ),
            "listeners[0].accept_proxy_from: \"lb\" is not a network"
        );
    }
}
