use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn limiter(edit: impl FnOnce(&mut Settings)) -> Arc<Limiter> {
    let mut s = Settings {
        failure_window: Duration::from_secs(600),
        max_failures_per_ip: 5,
        max_failures_per_user: 3,
        failure_delay: Duration::from_secs(1),
        max_failure_delay: Duration::from_secs(8),
        max_connections_per_ip: 2,
        connection_rate_per_ip: 4,
        max_sessions_per_user: 2,
        trusted_networks: vec!["10.0.0.0/8".parse().unwrap()],
        ..Settings::default()
    };
    edit(&mut s);
    Limiter::new(s)
}

#[test]
fn failures_per_ip_block_and_the_delay_doubles() {
    let l = limiter(|s| s.max_failures_per_user = 0);
    let t = Instant::now();
    let a = ip("192.0.2.1");
    let delays: Vec<_> = (0..5)
        .map(|i| {
            assert_eq!(l.check_login(a, &format!("u{i}"), t), Ok(()));
            l.failed(a, Some(&format!("u{i}")), t).as_secs()
        })
        .collect();
    assert_eq!(delays, [1, 2, 4, 8, 8]);
    assert_eq!(l.check_login(a, "someone", t), Err(Limit::AuthFailures));
    assert_eq!(l.penalty(a, t), Duration::from_secs(8));
    // Another address is not affected.
    assert_eq!(l.check_login(ip("192.0.2.2"), "someone", t), Ok(()));
    assert_eq!(l.penalty(ip("192.0.2.2"), t), Duration::ZERO);
    // The window slides: after two windows everything is forgotten.
    let later = t + Duration::from_secs(1200);
    assert_eq!(l.check_login(a, "someone", later), Ok(()));
    assert_eq!(l.penalty(a, later), Duration::ZERO);
}

#[test]
fn failures_per_user_block_from_any_address_and_success_resets() {
    let l = limiter(|_| {});
    let t = Instant::now();
    for i in 0..3 {
        assert_eq!(
            l.check_login(ip(&format!("198.51.100.{i}")), "alice", t),
            Ok(())
        );
        l.failed(ip(&format!("198.51.100.{i}")), Some("alice"), t);
    }
    assert_eq!(
        l.check_login(ip("203.0.113.9"), "alice", t),
        Err(Limit::AuthFailures)
    );
    // Trusted networks are subject to per-user limits too.
    assert_eq!(
        l.check_login(ip("10.1.1.1"), "alice", t),
        Err(Limit::AuthFailures)
    );
    assert_eq!(l.check_login(ip("203.0.113.9"), "bob", t), Ok(()));
    l.succeeded("alice", t);
    assert_eq!(l.check_login(ip("203.0.113.9"), "alice", t), Ok(()));
}

#[test]
fn trusted_networks_are_exempt_from_address_limits() {
    let l = limiter(|s| s.max_failures_per_user = 0);
    let t = Instant::now();
    let web = ip("10.2.3.4");
    for i in 0..50 {
        assert_eq!(l.failed(web, Some(&format!("u{i}")), t), Duration::ZERO);
    }
    assert_eq!(l.check_login(web, "x", t), Ok(()));
    let guards: Vec<_> = (0..100).map(|_| l.connect(web, t).unwrap()).collect();
    assert_eq!(guards.len(), 100);
    // IPv4-mapped IPv6 is the same address.
    assert!(l.is_trusted(ip("::ffff:10.9.9.9")));
}

#[test]
fn concurrent_connections_capped_and_freed() {
    let l = limiter(|s| s.connection_rate_per_ip = 0);
    let t = Instant::now();
    let a = ip("192.0.2.7");
    let g1 = l.connect(a, t).unwrap();
    let _g2 = l.connect(a, t).unwrap();
    assert_eq!(l.connect(a, t).unwrap_err(), Limit::IpConnections);
    drop(g1);
    assert!(l.connect(a, t).is_ok());
}

#[test]
fn connection_rate_counts_refused_attempts() {
    let l = limiter(|s| s.max_connections_per_ip = 0);
    let t = Instant::now();
    let a = ip("192.0.2.8");
    for _ in 0..4 {
        drop(l.connect(a, t).unwrap());
    }
    assert_eq!(l.connect(a, t).unwrap_err(), Limit::ConnectionRate);
    // Still hammering a minute later: the refused attempts keep it over the rate.
    for s in 1..=30 {
        let _ = l.connect(a, t + Duration::from_secs(s * 2));
    }
    assert_eq!(
        l.connect(a, t + Duration::from_secs(61)).unwrap_err(),
        Limit::ConnectionRate
    );
    // Quiet for two minutes: allowed again.
    assert!(l.connect(a, t + Duration::from_secs(200)).is_ok());
}

#[test]
fn refusals_say_how_long_to_wait() {
    let l = limiter(|s| s.max_connections_per_ip = 0);
    let t = Instant::now();
    let a = ip("192.0.2.9");
    for _ in 0..4 {
        drop(l.connect(a, t).unwrap());
    }
    assert_eq!(l.connect(a, t).unwrap_err(), Limit::ConnectionRate);
    let wait = l.retry_after(a, Limit::ConnectionRate, t).unwrap();
    assert!(wait >= Duration::from_secs(1), "{wait:?}");
    // Waiting that long is enough; a second less is not.
    assert!(l.connect(a, t + wait).is_ok());
    let l2 = limiter(|s| s.max_connections_per_ip = 0);
    for _ in 0..5 {
        let _ = l2.connect(a, t);
    }
    let wait2 = l2.retry_after(a, Limit::ConnectionRate, t).unwrap();
    assert_eq!(wait, wait2);
    assert!(l2.connect(a, t + wait2 - Duration::from_secs(1)).is_err());
    // Concurrency limits have no time to wait; unknown addresses nothing to say.
    assert_eq!(l.retry_after(a, Limit::IpConnections, t), None);
    assert_eq!(
        l.retry_after(ip("192.0.2.10"), Limit::ConnectionRate, t),
        None
    );
}

#[test]
fn ipv6_counted_per_prefix() {
    let l = limiter(|s| s.connection_rate_per_ip = 0);
    let t = Instant::now();
    let _a = l.connect(ip("2001:db8:1:2::1"), t).unwrap();
    let _b = l.connect(ip("2001:db8:1:2:ffff::9"), t).unwrap();
    assert_eq!(
        l.connect(ip("2001:db8:1:2::77"), t).unwrap_err(),
        Limit::IpConnections
    );
    assert!(l.connect(ip("2001:db8:1:3::1"), t).is_ok());
}

#[test]
fn sessions_per_user() {
    let l = limiter(|_| {});
    let t = Instant::now();
    let s1 = l.session("alice", t).unwrap();
    let _s2 = l.session("alice", t).unwrap();
    assert_eq!(l.session("alice", t).unwrap_err(), Limit::UserSessions);
    assert!(l.session("bob", t).is_ok());
    drop(s1);
    assert!(l.session("alice", t).is_ok());
}

#[test]
fn tables_are_bounded_and_swept() {
    let l = limiter(|s| {
        s.max_tracked = 32;
        s.max_failures_per_user = 1;
    });
    let t = Instant::now();
    for i in 0..1000u32 {
        let a = IpAddr::from(std::net::Ipv4Addr::from(0xC000_0000 + i));
        l.failed(a, Some(&format!("user{i}")), t);
    }
    let (ips, users) = l.tracked();
    assert!(ips <= 32 && users <= 32, "{ips} {users}");
    assert!(l.overflows() > 0);
    l.sweep(t + Duration::from_secs(1300));
    assert_eq!(l.tracked(), (0, 0));
    // Room again after the sweep.
    l.failed(ip("192.0.2.1"), Some("u"), t + Duration::from_secs(1300));
    assert_eq!(l.tracked(), (1, 1));
}

#[test]
fn zero_turns_limits_off() {
    let l = Limiter::new(Settings {
        max_failures_per_ip: 0,
        max_failures_per_user: 0,
        max_connections_per_ip: 0,
        connection_rate_per_ip: 0,
        max_sessions_per_user: 0,
        ..Settings::default()
    });
    let t = Instant::now();
    let a = ip("192.0.2.1");
    for _ in 0..100 {
        l.failed(a, Some("u"), t);
    }
    assert_eq!(l.check_login(a, "u", t), Ok(()));
    let conns: Vec<_> = (0..500).map(|_| l.connect(a, t).unwrap()).collect();
    let sessions: Vec<_> = (0..500).map(|_| l.session("u", t).unwrap()).collect();
    assert_eq!((conns.len(), sessions.len()), (500, 500));
}

#[test]
fn attempts_in_flight_count_against_the_failure_limits() {
    // max_failures_per_ip 5, per user 3.
    let l = limiter(|_| {});
    let t = Instant::now();
    let a = ip("192.0.2.50");
    // Five concurrent guesses for five users from one address: the limit is reached by
    // the attempts alone, before any has failed.
    let tickets: Vec<_> = (0..5)
        .map(|i| l.begin_login(a, &format!("v{i}"), t).unwrap())
        .collect();
    assert_eq!(
        l.begin_login(a, "v9", t).unwrap_err(),
        Limit::LoginsInFlight
    );
    // Answered (successes here): the slots come back.
    drop(tickets);
    assert!(l.begin_login(a, "v9", t).is_ok());
    // Per user, from many addresses: three in flight are the limit.
    let held: Vec<_> = (0..3)
        .map(|i| {
            l.begin_login(ip(&format!("192.0.2.{}", 60 + i)), "victim", t)
                .unwrap()
        })
        .collect();
    assert_eq!(
        l.begin_login(ip("192.0.2.70"), "victim", t).unwrap_err(),
        Limit::LoginsInFlight
    );
    // Failures recorded while the attempts were in flight: the real limit takes over.
    for i in 0..3 {
        l.failed(ip(&format!("192.0.2.{}", 60 + i)), Some("victim"), t);
    }
    drop(held);
    assert_eq!(
        l.begin_login(ip("192.0.2.70"), "victim", t).unwrap_err(),
        Limit::AuthFailures
    );
    // Trusted networks are not counted per address.
    let many: Vec<_> = (0..10)
        .map(|i| l.begin_login(ip("10.1.2.3"), &format!("w{i}"), t).unwrap())
        .collect();
    assert_eq!(many.len(), 10);
}
