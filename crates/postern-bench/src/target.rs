//! What every load generator shares: where to connect, how (plaintext, implicit TLS,
//! STARTTLS), as whom, and which processes to measure.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use rustls::client::Resumption;
use rustls::crypto::aws_lc_rs;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use tokio_rustls::TlsConnector;

/// How the client secures the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TlsMode {
    /// Plaintext.
    None,
    /// TLS from the first byte (IMAPS, POP3S).
    Implicit,
    /// Plaintext, upgraded by STARTTLS / STLS before the login.
    Starttls,
}

/// Key exchange groups the client offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kx {
    /// X25519 only: what nginx with OpenSSL 3.0 negotiates, so both proxies do the same
    /// handshake work.
    X25519,
    /// rustls's defaults (X25519MLKEM768 first): what a rustls client does, but a
    /// heavier handshake that OpenSSL 3.0 servers cannot even pick.
    Default,
}

/// Target and identity options shared by `logins`, `relay` and `idle`.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct TargetArgs {
    /// Address to connect to: the proxy, or the backend itself for the direct baseline.
    #[arg(long)]
    pub(crate) addr: SocketAddr,
    /// Name of the target in the results (direct, nginx, postern).
    #[arg(long, default_value = "target")]
    pub(crate) name: String,
    /// Name of the scenario in the results (the report groups by it).
    #[arg(long, default_value = "")]
    pub(crate) scenario: String,
    /// Plaintext, implicit TLS or STARTTLS.
    #[arg(long, value_enum, default_value_t = TlsMode::None)]
    pub(crate) tls: TlsMode,
    /// CA certificate (PEM) that signed the server's certificate; required with TLS.
    #[arg(long)]
    pub(crate) ca: Option<PathBuf>,
    /// Name the server certificate is checked against (SNI too).
    #[arg(long, default_value = "localhost")]
    pub(crate) server_name: String,
    /// Key exchange groups offered.
    #[arg(long, value_enum, default_value_t = Kx::X25519)]
    pub(crate) kx: Kx,
    /// User name pattern; `{n}` becomes the session number modulo --users.
    #[arg(long, default_value = "bench{n}@example.test")]
    pub(crate) user: String,
    /// Distinct users the sessions cycle through.
    #[arg(long, default_value_t = 100)]
    pub(crate) users: u64,
    /// Password of every user.
    #[arg(long, default_value = "benchpw")]
    pub(crate) password: String,
    /// Process(es) under test, whose CPU and memory are measured (the proxy; for nginx
    /// the master and its workers). Repeat or separate with commas.
    #[arg(long, value_delimiter = ',')]
    pub(crate) pid: Vec<u32>,
    /// Helper processes whose CPU is reported separately (auth_http, the backend).
    #[arg(long, value_delimiter = ',')]
    pub(crate) aux_pid: Vec<u32>,
    /// Worker threads of the load generator (1: a single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: usize,
    /// Seconds before one session (or one FETCH) counts as failed.
    #[arg(long, default_value_t = 30.0)]
    pub(crate) timeout: f64,
}

/// A resolved target: the arguments plus the TLS connector built once.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) args: TargetArgs,
    pub(crate) tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Target {
    pub(crate) fn new(args: TargetArgs) -> Result<Arc<Self>> {
        let tls = match args.tls {
            TlsMode::None => None,
            TlsMode::Implicit | TlsMode::Starttls => {
                let Some(ca) = &args.ca else {
                    bail!("--tls {:?} needs --ca", args.tls);
                };
                let name = ServerName::try_from(args.server_name.clone())
                    .context("invalid --server-name")?;
                Some((TlsConnector::from(client_config(ca, args.kx)?), name))
            }
        };
        Ok(Arc::new(Self { args, tls }))
    }

    /// The user name of session `n`.
    pub(crate) fn user(&self, n: u64) -> String {
        let k = n % self.args.users.max(1);
        self.args.user.replace("{n}", &k.to_string())
    }
}

/// A client configuration that does a full handshake every time: session resumption
/// is off, so each session pays for key exchange and the certificate signature, which
/// is the cost a proxy bears for clients that connect fresh (most mail clients after
/// sleep or network changes). No ALPN: nginx's mail module refuses unknown protocols.
fn client_config(ca: &std::path::Path, kx: Kx) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("cannot read CA file {}", ca.display()))?
    {
        let cert = cert.with_context(|| format!("bad certificate in {}", ca.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("unusable CA certificate in {}", ca.display()))?;
    }
    let mut provider = aws_lc_rs::default_provider();
    if kx == Kx::X25519 {
        provider.kx_groups = vec![aws_lc_rs::kx_group::X25519];
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}
