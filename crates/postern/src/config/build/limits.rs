//! `[limits]`: abuse control.

use anyhow::{Result, anyhow, ensure};

use super::parse_net;
use crate::config::file;

/// `[limits]`. The counters themselves accept any value (0 switches a limit off); only
/// what would make the tables or the delay nonsensical is refused.
pub(super) fn limits(l: &file::Limits) -> Result<postern_limits::Settings> {
    let trusted_networks = l
        .trusted_networks
        .iter()
        .map(|n| {
            parse_net(n).ok_or_else(|| anyhow!("limits.trusted_networks: {n:?} is not a network"))
        })
        .collect::<Result<Vec<_>>>()?;
    ensure!(l.ipv6_prefix <= 128, "limits.ipv6_prefix: at most 128");
    ensure!(
        !l.failure_window.is_zero(),
        "limits.failure_window: must be longer than zero"
    );
    ensure!(
        l.failure_delay <= l.max_failure_delay,
        "limits.failure_delay: longer than limits.max_failure_delay"
    );
    // Below a handful of slots the bounded tables would evict the very entries that
    // are counting an attack.
    ensure!(l.max_tracked >= 16, "limits.max_tracked: at least 16");
    Ok(postern_limits::Settings {
        trusted_networks,
        ipv6_prefix: l.ipv6_prefix,
        failure_window: l.failure_window,
        max_failures_per_ip: l.max_failures_per_ip,
        max_failures_per_user: l.max_failures_per_user,
        failure_delay: l.failure_delay,
        max_failure_delay: l.max_failure_delay,
        max_connections_per_ip: l.max_connections_per_ip,
        connection_rate_per_ip: l.connection_rate_per_ip,
        max_sessions_per_user: l.max_sessions_per_user,
        max_tracked: l.max_tracked,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn of(text: &str) -> Result<postern_limits::Settings> {
        limits(&toml::from_str(text).unwrap())
    }

    #[test]
    fn defaults_are_the_limits_crates() {
        let d = postern_limits::Settings::default();
        let s = of("").unwrap();
        assert!(s.trusted_networks.is_empty());
        assert_eq!(s.ipv6_prefix, d.ipv6_prefix);
        assert_eq!(s.failure_window, d.failure_window);
        assert_eq!(s.max_failures_per_ip, d.max_failures_per_ip);
        assert_eq!(s.failure_delay, d.failure_delay);
        assert_eq!(s.max_failure_delay, d.max_failure_delay);
        assert_eq!(s.max_tracked, d.max_tracked);
    }

    #[test]
    fn trusted_networks_take_networks_and_bare_addresses() {
        let s = of("trusted_networks = [\"10.0.0.0/8\", \"192.0.2.1\", \"::1\"]").unwrap();
        let want: Vec<ipnet::IpNet> = ["10.0.0.0/8", "192.0.2.1/32", "::1/128"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(s.trusted_networks, want);
    }

    #[test]
    fn refusals_name_the_key() {
        for (text, message) in [
            (
                "trusted_networks = [\"10.0.0.0/8\", \"office\"]",
                "limits.trusted_networks: \"office\" is not a network",
            ),
            ("ipv6_prefix = 129", "limits.ipv6_prefix: at most 128"),
            (
                "failure_window = \"0s\"",
                "limits.failure_window: must be longer than zero",
            ),
            (
                "failure_delay = \"10s\"\nmax_failure_delay = \"1s\"",
                "limits.failure_delay: longer than limits.max_failure_delay",
            ),
            ("max_tracked = 15", "limits.max_tracked: at least 16"),
        ] {
            let e = of(text).expect_err(text);
            assert_eq!(format!("{e:#}"), message, "{text}");
        }
        assert_eq!(of("max_tracked = 16").unwrap().max_tracked, 16);
    }
}
