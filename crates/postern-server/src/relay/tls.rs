//! TLS server configuration from PEM files, with rustls's safe defaults (TLS 1.2 and
//! 1.3, no renegotiation, no compression) and the aws-lc-rs provider.

use std::path::Path;
use std::sync::Arc;

use std::collections::HashMap;

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a certificate could not be loaded. Messages name the file, never key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is missing, unreadable or holds no certificate.
    #[error("certificate {path}: {reason}")]
    Certificate {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The key file is missing, unreadable or holds no private key.
    #[error("private key {path}: {reason}")]
    Key {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the pair (e.g. the key does not match the certificate).
    #[error("certificate {cert} with key {key}: {reason}")]
    Pair {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
        /// What rustls said.
        reason: String,
    },
}

/// Loads a certificate chain and its key into a server configuration.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_sni(cert, key, &[])
}

/// A server configuration that picks the certificate by the client's SNI name: `sni`
/// maps names (`mail.example.org`, or `*.example.org` for one label) to a chain and key;
/// clients that send no name, or one not in the map, get the default pair.
pub fn server_config_sni(
    cert: &Path,
    key: &Path,
    sni: &[(String, &Path, &Path)],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let default = Arc::new(certified_key(cert, key, &provider)?);
    let mut names = HashMap::new();
    for (name, cert, key) in sni {
        names.insert(
            name.to_ascii_lowercase(),
            Arc::new(certified_key(cert, key, &provider)?),
        );
    }
    let resolver = SniResolver { default, names };
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.with_no_client_auth()
                .with_cert_resolver(Arc::new(resolver))
        })
        .map_err(|e| TlsError::Pair {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
            reason: e.to_string(),
        })?;
    Ok(Arc::new(config))
}

fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let (certs, key_der) = load_pair(cert, key)?;
    // from_der also checks that the key belongs to the certificate.
    CertifiedKey::from_der(certs, key_der, provider).map_err(|e| TlsError::Pair {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        reason: e.to_string(),
    })
}

/// Reads a PEM certificate chain (at least one certificate) and its private key.
pub(crate) fn load_pair(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| TlsError::Certificate {
            path: cert.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Certificate {
            path: cert.display().to_string(),
            reason: "no certificate found".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok((certs, key_der))
}

/// Picks a certificate by SNI name: exact name, then `*.` + the parent domain, then
/// the default.
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    names: HashMap<String, Arc<CertifiedKey>>,
}

impl SniResolver {
    fn pick(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name.map(str::to_ascii_lowercase) else {
            return Arc::clone(&self.default);
        };
        if let Some(k) = self.names.get(&name) {
            return Arc::clone(k);
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(k) = self.names.get(&format!("*.{parent}"))
        {
            return Arc::clone(k);
        }
        Arc::clone(&self.default)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let cert = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.cert.pem()).unwrap();
        std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
        (c, k)
    }

    fn leaf(key: &CertifiedKey) -> Vec<u8> {
        key.cert.first().unwrap().to_vec()
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_default() {
        let dir = tempfile::tempdir().unwrap();
        let (dc, dk) = pair(dir.path(), "default.test");
        let (ec, ek) = pair(dir.path(), "mail.example.org");
        let (wc, wk) = pair(dir.path(), "any.example.net");
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let resolver = SniResolver {
            default: Arc::new(certified_key(&dc, &dk, &provider).unwrap()),
            names: [("mail.example.org", &ec, &ek), ("*.example.net", &wc, &wk)]
                .into_iter()
                .map(|(n, c, k)| {
                    (
                        n.to_owned(),
                        Arc::new(certified_key(c, k, &provider).unwrap()),
                    )
                })
                .collect(),
        };
        let default = leaf(&resolver.default);
        let exact = leaf(&resolver.pick(Some("MAIL.example.org")));
        let wild = leaf(&resolver.pick(Some("imap.example.net")));
        assert_ne!(exact, default);
        assert_ne!(wild, default);
        assert_ne!(exact, wild);
        assert_eq!(leaf(&resolver.pick(None)), default);
        assert_eq!(leaf(&resolver.pick(Some("other.example.org"))), default);
        // One label only: a.b.example.net is not *.example.net.
        assert_eq!(leaf(&resolver.pick(Some("a.b.example.net"))), default);
        assert_eq!(leaf(&resolver.pick(Some("example.net"))), default);
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, _) = pair(dir.path(), "one.test");
        let (_, k2) = pair(dir.path(), "two.test");
        let err = server_config(&c1, &k2).unwrap_err();
        assert!(matches!(err, TlsError::Pair { .. }), "{err}");
    }
}
