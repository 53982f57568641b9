//! The configuration the Docker deployment mounts (deploy/docker/postern.toml) must load
//! with the real loader. Only the certificate paths differ from the file as shipped: the
//! container's are made by the compose `certs` service. The route database (MariaDB in
//! the compose network) is not contacted: loading validates syntax, keys and values.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use postern::config::Config;

fn load(relative: &str) -> Config {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["mail.example.test".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(repo.join(relative)).unwrap();
    assert!(
        text.contains("/etc/postern/tls/cert.pem"),
        "{relative}: certificate path"
    );
    let text = text
        .replace("/etc/postern/tls/cert.pem", cert_path.to_str().unwrap())
        .replace("/etc/postern/tls/key.pem", key_path.to_str().unwrap());
    Config::from_toml(&text, dir.path()).unwrap_or_else(|e| panic!("{relative}: {e:#}"))
}

#[test]
fn docker_config_loads() {
    let config = load("deploy/docker/postern.toml");
    let mut backends: Vec<_> = config.settings.backends.keys().cloned().collect();
    backends.sort();
    assert_eq!(backends, ["b1", "b2"]);
    let mut listeners: Vec<_> = config
        .settings
        .listeners
        .iter()
        .map(|l| (l.name.clone(), l.bind.port()))
        .collect();
    listeners.sort();
    assert_eq!(
        listeners,
        [
            ("imap".to_owned(), 143),
            ("imaps".to_owned(), 993),
            ("lmtp".to_owned(), 24),
            ("pop3".to_owned(), 110),
            ("pop3s".to_owned(), 995),
            ("smtp".to_owned(), 25),
            ("smtps".to_owned(), 465),
            ("submission".to_owned(), 587),
        ]
    );
}
