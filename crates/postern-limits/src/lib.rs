//! Abuse control at the edge: Postern refuses a brute-forcing address or a hammered
//! user before any backend or password hash is involved.
//!
//! | limit | key | refused with |
//! |---|---|---|
//! | failed logins in a sliding window | client address (IPv6 by prefix) | [`Limit::AuthFailures`] |
//! | failed logins in a sliding window | normalized user | [`Limit::AuthFailures`] |
//! | penalty delay before a failure is answered | client address | (a delay, doubling per failure) |
//! | concurrent connections | client address | [`Limit::IpConnections`] |
//! | connections per minute | client address | [`Limit::ConnectionRate`] |
//! | concurrent sessions | normalized user | [`Limit::UserSessions`] |
//!
//! Trusted networks (webmail, the operator's own hosts) are exempt from every limit
//! keyed by address, and from the delay; the per-user limits apply to everyone, since a
//! webmail front can carry a brute force against one user too.
//!
//! No clock and no runtime here: every call takes `now`, and the delay is returned for
//! the driver to sleep without blocking a worker thread. State lives in memory, per
//! instance: N instances behind a balancer allow up to N times each limit.
//!
//! Memory is bounded: at most [`Settings::max_tracked`] addresses and as many users.
//! When a table is full even after dropping idle entries, new keys go untracked (and
//! [`Limiter::overflows`] counts them) rather than evicting live counts an attacker
//! would like to see reset.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

mod window;

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipnet::IpNet;
pub use postern_proto::Limit;

use crate::window::Window;

/// The limits; `0` turns a count limit off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Networks exempt from the address-keyed limits and the delay.
    pub trusted_networks: Vec<IpNet>,
    /// IPv6 clients are counted per prefix of this length: one host owns a /64.
    pub ipv6_prefix: u8,
    /// The sliding window of failed logins.
    pub failure_window: Duration,
    /// Failed logins from one address within the window before its logins are refused.
    pub max_failures_per_ip: u32,
    /// Failed logins for one user within the window before its logins are refused.
    pub max_failures_per_user: u32,
    /// The delay before answering the first failure from an address; it doubles with
    /// each further failure in the window.
    pub failure_delay: Duration,
    /// The longest delay.
    pub max_failure_delay: Duration,
    /// Concurrent connections from one address, all listeners together.
    pub max_connections_per_ip: u32,
    /// New connections from one address per minute.
    pub connection_rate_per_ip: u32,
    /// Concurrent sessions (logins) of one user, all protocols together.
    pub max_sessions_per_user: u32,
    /// Addresses (and, separately, users) tracked at most.
    pub max_tracked: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            trusted_networks: Vec::new(),
            ipv6_prefix: 64,
            failure_window: Duration::from_secs(15 * 60),
            max_failures_per_ip: 20,
            max_failures_per_user: 10,
            failure_delay: Duration::from_secs(1),
            max_failure_delay: Duration::from_secs(15),
            max_connections_per_ip: 50,
            connection_rate_per_ip: 120,
            max_sessions_per_user: 50,
            max_tracked: 100_000,
        }
    }
}

const RATE_WINDOW: Duration = Duration::from_secs(60);
const SHARDS: usize = 16;

#[derive(Debug)]
struct IpEntry {
    connections: u32,
    rate: Window,
    failures: Window,
    /// Login attempts not yet answered: each may still fail, so each counts against the
    /// failure limit, and concurrency cannot beat it.
    in_flight: u32,
}

#[derive(Debug)]
struct UserEntry {
    sessions: u32,
    failures: Window,
    in_flight: u32,
}

/// A map split into shards, so that sessions on different cores rarely wait for each
/// other.
#[derive(Debug)]
struct Table<K, V> {
    shards: Vec<Mutex<HashMap<K, V>>>,
    per_shard: usize,
}

impl<K: Hash + Eq, V> Table<K, V> {
    fn new(max: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: max.div_ceil(SHARDS).max(1),
        }
    }

    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> MutexGuard<'_, HashMap<K, V>>
    where
        K: std::borrow::Borrow<Q>,
    {
        let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
        key.hash(&mut hasher);
        let i = (std::hash::Hasher::finish(&hasher) as usize) % SHARDS;
        // A poisoned lock only means a panic elsewhere mid-update of plain counters;
        // the counts stay usable.
        match self.shards.get(i).or_else(|| self.shards.first()) {
            Some(m) => m.lock().unwrap_or_else(|e| e.into_inner()),
            None => unreachable_shard(),
        }
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |m| m.len()))
            .sum()
    }
}

#[cold]
fn unreachable_shard() -> ! {
    // SHARDS is a non-zero constant; `Table::new` always creates them.
    std::process::abort()
}

/// The address key: IPv4 as is, IPv6 by prefix, IPv4-mapped IPv6 as IPv4.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct IpKey(IpAddr);

/// Abuse-control state of one instance.
#[derive(Debug)]
pub struct Limiter {
    settings: Settings,
    ips: Table<IpKey, IpEntry>,
    users: Table<String, UserEntry>,
    overflows: AtomicU64,
}

/// Holds one connection slot of an address; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnectionGuard {
    limiter: Option<(Arc<Limiter>, IpKey)>,
}

impl ConnectionGuard {
    /// A slot that counts nothing, for connections no per-address limit applies to
    /// (LMTP from the operator's own MTAs).
    pub fn unlimited() -> Self {
        ConnectionGuard { limiter: None }
    }
}

/// A login attempt in flight, counted against the failure limits until dropped.
#[derive(Debug)]
pub struct LoginTicket {
    limiter: Arc<Limiter>,
    ip: Option<IpKey>,
    user: Option<String>,
}

impl Drop for LoginTicket {
    fn drop(&mut self) {
        self.limiter
            .end_login(self.ip.as_ref(), self.user.as_deref());
    }
}

/// Holds one session slot of a user; dropping it frees the slot.
#[derive(Debug)]
pub struct SessionGuard {
    limiter: Option<(Arc<Limiter>, String)>,
}

impl Limiter {
    /// A limiter with empty tables.
    pub fn new(settings: Settings) -> Arc<Self> {
        let max = settings.max_tracked;
        Arc::new(Self {
            settings,
            ips: Table::new(max),
            users: Table::new(max),
            overflows: AtomicU64::new(0),
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Whether `ip` is in a trusted network.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.settings
            .trusted_networks
            .iter()
            .any(|n| n.contains(&ip))
    }

    fn key(&self, ip: IpAddr) -> IpKey {
        match canonical(ip) {
            IpAddr::V6(v6) => {
                let prefix = self.settings.ipv6_prefix.min(128);
                let net = ipnet::Ipv6Net::new(v6, prefix).map_or(v6, |n| n.trunc().addr());
                IpKey(IpAddr::V6(net))
            }
            v4 => IpKey(v4),
        }
    }

    /// A new connection from `ip`: counted against the rate and the concurrency cap.
    /// A refused attempt counts towards the rate too, so a client that keeps hammering
    /// stays refused.
    pub fn connect(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<ConnectionGuard, Limit> {
        let s = &self.settings;
        if self.is_trusted(ip) || (s.max_connections_per_ip == 0 && s.connection_rate_per_ip == 0) {
            return Ok(ConnectionGuard { limiter: None });
        }
        let key = self.key(ip);
        let mut shard = self.ips.shard(&key);
        let Some(entry) = entry_or_insert(&mut shard, key, self.ips_cap(), now, |now| IpEntry {
            connections: 0,
            rate: Window::new(now),
            failures: Window::new(now),
            in_flight: 0,
        }) else {
            self.overflows.fetch_add(1, Ordering::Relaxed);
            return Ok(ConnectionGuard { limiter: None });
        };
        let rate = entry.rate.count(now, RATE_WINDOW);
        entry.rate.add(now, RATE_WINDOW);
        if s.connection_rate_per_ip > 0 && rate >= s.connection_rate_per_ip {
            return Err(Limit::ConnectionRate);
        }
        if s.max_connections_per_ip > 0 && entry.connections >= s.max_connections_per_ip {
            return Err(Limit::IpConnections);
        }
        entry.connections += 1;
        Ok(ConnectionGuard {
            limiter: Some((Arc::clone(self), key)),
        })
    }

    /// How long a client refused by `limit` should wait before trying again, for the
    /// refusal's text; `None` when no wait helps by itself (concurrent connections or
    /// sessions: one of them has to end).
    pub fn retry_after(&self, ip: IpAddr, limit: Limit, now: Instant) -> Option<Duration> {
        let s = &self.settings;
        let (len, max) = match limit {
            Limit::ConnectionRate => (RATE_WINDOW, s.connection_rate_per_ip),
            Limit::AuthFailures => (s.failure_window, s.max_failures_per_ip),
            _ => return None,
        };
        let key = self.key(ip);
        let shard = self.ips.shard(&key);
        let e = shard.get(&key)?;
        let window = match limit {
            Limit::ConnectionRate => &e.rate,
            _ => &e.failures,
        };
        Some(
            window
                .time_until_below(now, len, max)
                .max(Duration::from_secs(1)),
        )
    }

    /// Whether a login attempt from `ip` for `user` (normalized) may go ahead.
    pub fn check_login(&self, ip: IpAddr, user: &str, now: Instant) -> Result<(), Limit> {
        let s = &self.settings;
        if s.max_failures_per_ip > 0 && !self.is_trusted(ip) {
            let key = self.key(ip);
            let mut shard = self.ips.shard(&key);
            if let Some(e) = shard.get_mut(&key)
                && e.failures.count(now, s.failure_window) >= s.max_failures_per_ip
            {
                return Err(Limit::AuthFailures);
            }
        }
        if s.max_failures_per_user > 0 {
            let mut shard = self.users.shard(user);
            if let Some(e) = shard.get_mut(user)
                && e.failures.count(now, s.failure_window) >= s.max_failures_per_user
            {
                return Err(Limit::AuthFailures);
            }
        }
        Ok(())
    }

    /// Starts a login attempt from `ip` for `user` (normalized), if the failure limits
    /// allow it: failures in the window plus the attempts still in flight, each of
    /// which may yet fail, must stay under each limit. Hold the ticket until the
    /// attempt is answered (its penalty delay included), so that concurrent guesses
    /// count, and so do the connections they hold.
    pub fn begin_login(
        self: &Arc<Self>,
        ip: IpAddr,
        user: &str,
        now: Instant,
    ) -> Result<LoginTicket, Limit> {
        let s = &self.settings;
        let window = s.failure_window;
        let mut ticket = LoginTicket {
            limiter: Arc::clone(self),
            ip: None,
            user: None,
        };
        if s.max_failures_per_ip > 0 && !self.is_trusted(ip) {
            let key = self.key(ip);
            let mut shard = self.ips.shard(&key);
            if let Some(e) = entry_or_insert(&mut shard, key, self.ips_cap(), now, |now| IpEntry {
                connections: 0,
                rate: Window::new(now),
                failures: Window::new(now),
                in_flight: 0,
            }) {
                let failures = e.failures.count(now, window);
                if failures >= s.max_failures_per_ip {
                    return Err(Limit::AuthFailures);
                }
                if failures.saturating_add(e.in_flight) >= s.max_failures_per_ip {
                    return Err(Limit::LoginsInFlight);
                }
                e.in_flight += 1;
                ticket.ip = Some(key);
            } else {
                self.overflows.fetch_add(1, Ordering::Relaxed);
            }
        }
        if s.max_failures_per_user > 0 {
            let mut shard = self.users.shard(user);
            if let Some(e) =
                entry_or_insert(&mut shard, user.to_owned(), self.users_cap(), now, |now| {
                    UserEntry {
                        sessions: 0,
                        failures: Window::new(now),
                        in_flight: 0,
                    }
                })
            {
                let failures = e.failures.count(now, window);
                if failures >= s.max_failures_per_user {
                    return Err(Limit::AuthFailures);
                }
                if failures.saturating_add(e.in_flight) >= s.max_failures_per_user {
                    return Err(Limit::LoginsInFlight);
                }
                e.in_flight += 1;
                ticket.user = Some(user.to_owned());
            } else {
                self.overflows.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(ticket)
    }

    fn end_login(&self, ip: Option<&IpKey>, user: Option<&str>) {
        if let Some(key) = ip {
            let mut shard = self.ips.shard(key);
            if let Some(e) = shard.get_mut(key) {
                e.in_flight = e.in_flight.saturating_sub(1);
            }
        }
        if let Some(user) = user {
            let mut shard = self.users.shard(user);
            if let Some(e) = shard.get_mut(user) {
                e.in_flight = e.in_flight.saturating_sub(1);
            }
        }
    }

    /// Records a failed login (wrong password, unknown user) and returns how long to
    /// wait before answering it.
    /// `user` is `None` when the name was not even valid.
    pub fn failed(&self, ip: IpAddr, user: Option<&str>, now: Instant) -> Duration {
        let s = &self.settings;
        let window = s.failure_window;
        if let Some(user) = user.filter(|_| s.max_failures_per_user > 0) {
            let mut shard = self.users.shard(user);
            match entry_or_insert(&mut shard, user.to_owned(), self.users_cap(), now, |now| {
                UserEntry {
                    sessions: 0,
                    failures: Window::new(now),
                    in_flight: 0,
                }
            }) {
                Some(e) => e.failures.add(now, window),
                None => {
                    self.overflows.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if self.is_trusted(ip) {
            return Duration::ZERO;
        }
        let key = self.key(ip);
        let mut shard = self.ips.shard(&key);
        let failures = match entry_or_insert(&mut shard, key, self.ips_cap(), now, |now| IpEntry {
            connections: 0,
            rate: Window::new(now),
            failures: Window::new(now),
            in_flight: 0,
        }) {
            Some(e) => {
                e.failures.add(now, window);
                e.failures.count(now, window)
            }
            None => {
                self.overflows.fetch_add(1, Ordering::Relaxed);
                1
            }
        };
        drop(shard);
        self.delay_for(failures)
    }

    /// The delay before answering anything but success to `ip` (a refused login as
    /// much as a failed one): what its failures in the window have earned it.
    pub fn penalty(&self, ip: IpAddr, now: Instant) -> Duration {
        if self.is_trusted(ip) {
            return Duration::ZERO;
        }
        let key = self.key(ip);
        let mut shard = self.ips.shard(&key);
        let failures = shard
            .get_mut(&key)
            .map_or(0, |e| e.failures.count(now, self.settings.failure_window));
        drop(shard);
        self.delay_for(failures)
    }

    fn delay_for(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let doublings = (failures - 1).min(20);
        self.settings
            .failure_delay
            .saturating_mul(1u32 << doublings)
            .min(self.settings.max_failure_delay)
    }

    /// A successful login: the user's failures are forgotten (the address's are not:
    /// an attacker's own valid account must not launder its failures).
    pub fn succeeded(&self, user: &str, now: Instant) {
        let mut shard = self.users.shard(user);
        if let Some(e) = shard.get_mut(user) {
            e.failures.clear(now);
        }
    }

    /// Takes a session slot of `user` (normalized) for the life of the session.
    pub fn session(self: &Arc<Self>, user: &str, now: Instant) -> Result<SessionGuard, Limit> {
        let max = self.settings.max_sessions_per_user;
        if max == 0 {
            return Ok(SessionGuard { limiter: None });
        }
        let mut shard = self.users.shard(user);
        let Some(e) = entry_or_insert(&mut shard, user.to_owned(), self.users_cap(), now, |now| {
            UserEntry {
                sessions: 0,
                failures: Window::new(now),
                in_flight: 0,
            }
        }) else {
            self.overflows.fetch_add(1, Ordering::Relaxed);
            return Ok(SessionGuard { limiter: None });
        };
        if e.sessions >= max {
            return Err(Limit::UserSessions);
        }
        e.sessions += 1;
        Ok(SessionGuard {
            limiter: Some((Arc::clone(self), user.to_owned())),
        })
    }

    /// Drops the entries that count nothing any more. Run it now and then; inserts
    /// also sweep a full shard.
    pub fn sweep(&self, now: Instant) {
        let window = self.settings.failure_window;
        for shard in &self.ips.shards {
            let mut m = shard.lock().unwrap_or_else(|e| e.into_inner());
            m.retain(|_, e| !e.idle(now, window));
        }
        for shard in &self.users.shards {
            let mut m = shard.lock().unwrap_or_else(|e| e.into_inner());
            m.retain(|_, e| !e.idle(now, window));
        }
    }

    /// Addresses and users currently tracked.
    pub fn tracked(&self) -> (usize, usize) {
        (self.ips.len(), self.users.len())
    }

    /// Keys that went untracked because a table was full.
    pub fn overflows(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }

    fn ips_cap(&self) -> (usize, Duration) {
        (self.ips.per_shard, self.settings.failure_window)
    }

    fn users_cap(&self) -> (usize, Duration) {
        (self.users.per_shard, self.settings.failure_window)
    }

    fn release_connection(&self, key: IpKey) {
        let mut shard = self.ips.shard(&key);
        if let Some(e) = shard.get_mut(&key) {
            e.connections = e.connections.saturating_sub(1);
        }
    }

    fn release_session(&self, user: &str) {
        let mut shard = self.users.shard(user);
        if let Some(e) = shard.get_mut(user) {
            e.sessions = e.sessions.saturating_sub(1);
        }
    }
}

fn ip_idle(e: &mut IpEntry, now: Instant, window: Duration) -> bool {
    e.connections == 0
        && e.in_flight == 0
        && e.rate.is_empty(now, RATE_WINDOW)
        && e.failures.is_empty(now, window)
}

/// The entry for `key`, inserted if missing; `None` when the shard is full of live
/// entries.
fn entry_or_insert<K: Hash + Eq, V>(
    shard: &mut HashMap<K, V>,
    key: K,
    (max, window): (usize, Duration),
    now: Instant,
    make: impl FnOnce(Instant) -> V,
) -> Option<&mut V>
where
    V: Idle,
{
    if !shard.contains_key(&key) && shard.len() >= max {
        shard.retain(|_, v| !v.idle(now, window));
        if shard.len() >= max {
            return None;
        }
    }
    Some(shard.entry(key).or_insert_with(|| make(now)))
}

/// Whether an entry counts nothing and can be dropped.
trait Idle {
    fn idle(&mut self, now: Instant, window: Duration) -> bool;
}

impl Idle for IpEntry {
    fn idle(&mut self, now: Instant, window: Duration) -> bool {
        ip_idle(self, now, window)
    }
}

impl Idle for UserEntry {
    fn idle(&mut self, now: Instant, window: Duration) -> bool {
        self.sessions == 0 && self.in_flight == 0 && self.failures.is_empty(now, window)
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, from dual-stack sockets) are IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Some((limiter, key)) = self.limiter.take() {
            limiter.release_connection(key);
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if let Some((limiter, user)) = self.limiter.take() {
            limiter.release_session(&user);
        }
    }
}

#[cfg(test)]
mod tests;
