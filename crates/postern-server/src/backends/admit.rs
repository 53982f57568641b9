//! Executes the admission policy (`admission.rs`): one gate per backend service, a
//! permit per login in flight, and a one-shot channel per waiting login that a release
//! answers. Every decision is the policy's; this module only keeps the channels.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use postern_proto::Protocol;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::backends::admission::{Admit, Gate, Limits, Released, Ticket, Totals};
use crate::settings::Settings;

type Key = (String, Protocol);

/// What a waiting login is told.
#[derive(Debug)]
enum Grant {
    Slot,
    Expired,
}

#[derive(Debug)]
struct Entry {
    gate: Gate,
    waiters: HashMap<Ticket, oneshot::Sender<Grant>>,
}

/// Why a login got no slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue was full.
    QueueFull,
    /// The pre-auth deadline came first.
    Deadline,
}

impl Refused {
    /// The label in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::QueueFull => "queue_full",
            Refused::Deadline => "deadline",
        }
    }
}

/// One backend service's admission state, for metrics and the admin API.
#[derive(Clone, Debug)]
pub struct Report {
    /// Backend name.
    pub backend: String,
    /// Protocol.
    pub protocol: Protocol,
    /// The limits in force.
    pub limits: Limits,
    /// Logins holding a slot.
    pub in_flight: u32,
    /// Logins waiting for one.
    pub queued: usize,
    /// Since start.
    pub totals: Totals,
}

/// Admission control of every backend service; kept across reloads, so logins in
/// flight under the old configuration still count.
#[derive(Debug, Default)]
pub struct Admission {
    gates: Mutex<HashMap<Key, Entry>>,
}

impl Admission {
    /// Gates for every backend service of `settings`.
    pub fn new(settings: &Settings) -> Arc<Self> {
        let a = Arc::new(Self::default());
        a.configure(settings);
        a
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Entry>> {
        // Plain counters and channels: usable after a panic elsewhere.
        self.gates.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a (re)loaded configuration's limits; services no longer configured
    /// keep their gate until its last login is done, then it is dropped.
    pub fn configure(&self, settings: &Settings) {
        let now = std::time::Instant::now();
        let mut gates = self.lock();
        for b in settings.backends.values() {
            for p in b.protocols() {
                let key = (b.name.clone(), p);
                match gates.get_mut(&key) {
                    Some(e) => {
                        let r = e.gate.set_limits(b.admission, now);
                        dispatch(e, r);
                    }
                    None => {
                        gates.insert(
                            key,
                            Entry {
                                gate: Gate::new(b.admission),
                                waiters: HashMap::new(),
                            },
                        );
                    }
                }
            }
        }
        gates.retain(|(name, p), e| {
            settings
                .backends
                .get(name)
                .is_some_and(|b| b.protocols().contains(p))
                || e.gate.in_flight() > 0
                || e.gate.queued() > 0
        });
    }

    /// Waits for a slot on `backend`'s `protocol` service, at most until `deadline`.
    /// A service without a gate (not configured: an auth_http server's address) is
    /// not limited.
    pub async fn acquire(
        self: &Arc<Self>,
        backend: &str,
        protocol: Protocol,
        deadline: Instant,
    ) -> Result<Permit, Refused> {
        let key = (backend.to_owned(), protocol);
        let rx = {
            let mut gates = self.lock();
            let Some(e) = gates.get_mut(&key) else {
                return Ok(Permit { held: None });
            };
            let now = std::time::Instant::now();
            let wait_until = now + deadline.saturating_duration_since(Instant::now());
            match e.gate.request(now, wait_until) {
                Admit::Go => {
                    return Ok(Permit {
                        held: Some((Arc::clone(self), key)),
                    });
                }
                Admit::Full => return Err(Refused::QueueFull),
                Admit::Late => return Err(Refused::Deadline),
                Admit::Wait(ticket) => {
                    let (tx, rx) = oneshot::channel();
                    e.waiters.insert(ticket, tx);
                    Waiting {
                        admission: Arc::clone(self),
                        key: key.clone(),
                        ticket,
                        rx,
                        done: false,
                        deadline_passed: false,
                    }
                }
            }
        };
        let mut waiting = rx;
        match tokio::time::timeout_at(deadline, &mut waiting.rx).await {
            Ok(Ok(Grant::Slot)) => {
                waiting.done = true;
                Ok(Permit {
                    held: Some((Arc::clone(self), key)),
                })
            }
            Ok(Ok(Grant::Expired) | Err(_)) => {
                waiting.done = true;
                Err(Refused::Deadline)
            }
            Err(_) => {
                waiting.deadline_passed = true;
                Err(Refused::Deadline)
            }
        }
    }

    fn release(&self, key: &Key) {
        let mut gates = self.lock();
        if let Some(e) = gates.get_mut(key) {
            let r = e.gate.release(std::time::Instant::now());
            dispatch(e, r);
        }
    }

    /// Every gate's state.
    pub fn reports(&self) -> Vec<Report> {
        let gates = self.lock();
        let mut out: Vec<Report> = gates
            .iter()
            .map(|((b, p), e)| Report {
                backend: b.clone(),
                protocol: *p,
                limits: e.gate.limits(),
                in_flight: e.gate.in_flight(),
                queued: e.gate.queued(),
                totals: e.gate.totals(),
            })
            .collect();
        out.sort_by(|a, b| (&a.backend, a.protocol).cmp(&(&b.backend, b.protocol)));
        out
    }
}

/// Tells the waiters what the policy decided. A waiter whose receiver is gone cannot
/// take its slot, so the slot is released again, to the next one.
fn dispatch(e: &mut Entry, mut r: Released) {
    loop {
        for t in r.expired.drain(..) {
            if let Some(tx) = e.waiters.remove(&t) {
                let _ = tx.send(Grant::Expired);
            }
        }
        let mut lost = 0;
        for t in r.granted.drain(..) {
            let sent = e.waiters.remove(&t).map(|tx| tx.send(Grant::Slot));
            if !matches!(sent, Some(Ok(()))) {
                lost += 1;
            }
        }
        if lost == 0 {
            return;
        }
        let now = std::time::Instant::now();
        for _ in 0..lost {
            let more = e.gate.release(now);
            r.granted.extend(more.granted);
            r.expired.extend(more.expired);
        }
    }
}

/// A login's slot; dropping it (the login answered, failed or was abandoned) passes
/// the slot on.
#[derive(Debug)]
pub struct Permit {
    held: Option<(Arc<Admission>, Key)>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some((a, key)) = self.held.take() {
            a.release(&key);
        }
    }
}

/// A login in the queue. Dropped without its slot taken (the deadline, the client
/// gone, the backend down, a shutdown), it leaves the queue, or hands on the slot it
/// was granted in the meantime.
struct Waiting {
    admission: Arc<Admission>,
    key: Key,
    ticket: Ticket,
    rx: oneshot::Receiver<Grant>,
    done: bool,
    deadline_passed: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut gates = self.admission.lock();
        let Some(e) = gates.get_mut(&self.key) else {
            return;
        };
        e.waiters.remove(&self.ticket);
        // Grants are sent under this lock, so what the channel holds now is final.
        match self.rx.try_recv() {
            Ok(Grant::Slot) => {
                let r = e.gate.release(std::time::Instant::now());
                dispatch(e, r);
            }
            Ok(Grant::Expired) => {}
            Err(_) => {
                e.gate.cancel(self.ticket, self.deadline_passed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn admission(max_in_flight: u32, max_queue: u32) -> Arc<Admission> {
        let a = Arc::new(Admission::default());
        a.lock().insert(
            ("b1".into(), Protocol::Imap),
            Entry {
                gate: Gate::new(Limits {
                    max_in_flight,
                    max_queue,
                }),
                waiters: HashMap::new(),
            },
        );
        a
    }

    fn report(a: &Admission) -> (u32, usize) {
        let r = a.reports().remove(0);
        (r.in_flight, r.queued)
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_get_released_slots_and_time_out_at_their_deadline() {
        let a = admission(1, 1);
        let soon = Instant::now() + Duration::from_secs(5);
        let first = a.acquire("b1", Protocol::Imap, soon).await.unwrap();
        let a2 = Arc::clone(&a);
        let waiter = tokio::spawn(async move { a2.acquire("b1", Protocol::Imap, soon).await });
        tokio::task::yield_now().await;
        assert_eq!(report(&a), (1, 1));
        assert_eq!(
            a.acquire("b1", Protocol::Imap, soon).await.unwrap_err(),
            Refused::QueueFull
        );
        drop(first);
        let second = waiter.await.unwrap().unwrap();
        assert_eq!(report(&a), (1, 0));
        // Nobody releases: the next waiter gives up at its deadline, and leaves.
        let late = a.acquire("b1", Protocol::Imap, soon).await.unwrap_err();
        assert_eq!(late, Refused::Deadline);
        assert_eq!(report(&a), (1, 0));
        assert_eq!(a.reports()[0].totals.expired, 1);
        drop(second);
        assert_eq!(report(&a), (0, 0));
        // A service without a gate is not limited.
        assert!(a.acquire("elsewhere", Protocol::Imap, soon).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_waiter_hands_on_a_slot_granted_meanwhile() {
        let a = admission(1, 4);
        let later = Instant::now() + Duration::from_secs(60);
        let first = a.acquire("b1", Protocol::Imap, later).await.unwrap();
        let a2 = Arc::clone(&a);
        let abandoned = tokio::spawn(async move { a2.acquire("b1", Protocol::Imap, later).await });
        tokio::task::yield_now().await;
        let a3 = Arc::clone(&a);
        let patient = tokio::spawn(async move { a3.acquire("b1", Protocol::Imap, later).await });
        tokio::task::yield_now().await;
        assert_eq!(report(&a), (1, 2));
        // The first waiter's client leaves: its place goes, the order stays.
        abandoned.abort();
        let _ = abandoned.await;
        assert_eq!(report(&a), (1, 1));
        drop(first);
        let p = patient.await.unwrap().unwrap();
        assert_eq!(report(&a), (1, 0));
        drop(p);
        assert_eq!(report(&a), (0, 0));
    }
}
