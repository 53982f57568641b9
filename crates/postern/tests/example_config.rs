//! The example configuration documents every key; it must stay a valid configuration.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use postern::config::Config;

#[test]
fn example_config_is_valid_and_complete() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["mail.example.com".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(repo.join("config/postern.toml")).unwrap();
    // Only the certificate paths differ from the file as shipped.
    let text = text
        .replace(
            "/etc/postern/tls/fullchain.pem",
            cert_path.to_str().unwrap(),
        )
        .replace("/etc/postern/tls/privkey.pem", key_path.to_str().unwrap());
    let config = Config::from_toml(&text, dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
    let limits = &config.settings.limits;
    assert_eq!(limits.trusted_networks.len(), 2);
    assert_eq!(limits.max_failures_per_ip, 20);
}

#[test]
fn unknown_keys_are_refused_with_their_path() {
    let Err(err) = Config::from_toml("[limits]\nmax_failures = 3\n", Path::new(".")) else {
        panic!("an unknown key is an error");
    };
    assert!(format!("{err:#}").contains("limits"), "{err:#}");
}
