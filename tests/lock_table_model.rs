//! Property test: one `LockTable` (one shard) against a tiny reference model.
//!
//! The model keeps every lock as a plain struct with `Vec`s of holders,
//! waiters and signals, and answers each command by linear scans, following
//! the rules as the table's docs state them: FIFO queues (a new request never
//! passes a queued one), all shared waiters at the head granted together, one
//! shard-wide token counter, a lock forgotten when its last holder goes (with
//! its signals), deadlines fired one at a time, earliest first (a wait before
//! a lease on a tie; waits in queue order, leases in token order on a tie).
//! Semaphores: a name is a lock or a semaphore while in use (`WrongKind`),
//! every acquire names the semaphore's capacity (`CapacityConflict`), the
//! head is granted while the holders' weights and its own fit the capacity
//! (strict FIFO: a heavy head blocks lighter ones behind it), a lowered
//! capacity ends the queued acquires heavier than it (`OverCapacity`).
//!
//! After every step the test compares the exact list of effects (the order of
//! the pushes of one signal to a lock's holders is unspecified, so those are
//! compared as a set), `inspect` of every name, the counters, the next
//! deadline and the sessions' client names, and runs `check_invariants`.
//!
//! Orders that decide which token goes where are by what things are, never
//! by where they are stored: `EndSession` visits a session's locks in name
//! order; waits due at the same instant time out in (session, request)
//! order. (So a table rebuilt from a snapshot of the log behaves exactly as
//! the one it was taken from.)

use livelock::limits::SIGNALS_PER_LOCK_MAX;
use livelock::lock_table::{
    Acquire, Command, Effect, Hold, LockInfo, LockTable, Mode, Outcome, RequestId, SessionId,
    SignalOp, Wait,
};
use proptest::prelude::*;

const NAMES: [&[u8]; 3] = [b"alpha", b"beta", b"gamma"];
const SIGNALS: [&[u8]; 3] = [b"stop", b"flush", b"reload"];
const CLIENT_NAMES: [&[u8]; 2] = [b"worker", b""];
/// Request ids a test command picks from (so ids of finished requests are
/// reused); a pick that is queued already is replaced by a fresh id.
const REQUEST_IDS: RequestId = 6;
/// Fresh request ids start here; cancel targets that were never queued are
/// below it and above `REQUEST_IDS`.
const FRESH_ID_BASE: RequestId = 1_000;

// ---- the reference model --------------------------------------------------

#[derive(Debug, Clone)]
struct ModelWaiter {
    session: SessionId,
    request_id: RequestId,
    mode: Mode,
    weight: u32,
    lease_ms: u32,
    deadline_ms: Option<u64>,
    /// Order of queueing over the whole table (ties of wait deadlines).
    seq: u64,
}

#[derive(Debug, Clone)]
struct ModelLock {
    name: Vec<u8>,
    mode: Mode,
    /// A semaphore's capacity, 0 for a lock.
    capacity: u32,
    holders: Vec<Hold>,
    waiters: Vec<ModelWaiter>,
    signals: Vec<Vec<u8>>,
}

#[derive(Debug, Default)]
struct Model {
    /// Locks by slot; `None` is a free slot.
    slots: Vec<Option<ModelLock>>,
    /// Free slots, the last freed on top.
    free: Vec<usize>,
    last_token: u64,
    seq: u64,
    /// Client names the sessions introduced themselves with.
    client_names: Vec<(SessionId, Vec<u8>)>,
}

fn reply(session: SessionId, request_id: RequestId, outcome: Outcome, deferred: bool) -> Effect {
    Effect::Reply {
        session,
        request_id,
        outcome,
        deferred,
    }
}

impl Model {
    fn slot_of(&self, name: &[u8]) -> Option<usize> {
        self.slots
            .iter()
            .position(|slot| slot.as_ref().is_some_and(|lock| lock.name == name))
    }

    fn lock(&mut self, slot: usize) -> &mut ModelLock {
        self.slots[slot].as_mut().unwrap()
    }

    fn new_hold(&mut self, session: SessionId, now_ms: u64, weight: u32, lease_ms: u32) -> Hold {
        self.last_token += 1;
        Hold {
            session,
            token: self.last_token,
            weight,
            since_ms: now_ms,
            lease_deadline_ms: if lease_ms == 0 {
                0
            } else {
                now_ms + u64::from(lease_ms)
            },
        }
    }

    /// After the holders or the queue of `slot` changed: grant the head of
    /// the queue while it can go, and forget the lock if nobody holds it.
    fn settle(&mut self, now_ms: u64, slot: usize, out: &mut Vec<Effect>) {
        loop {
            let lock = self.lock(slot);
            let Some(head) = lock.waiters.first().cloned() else {
                break;
            };
            let used: u64 = lock.holders.iter().map(|h| u64::from(h.weight)).sum();
            let can_go = match head.mode {
                Mode::Permits => used + u64::from(head.weight) <= u64::from(lock.capacity),
                _ => {
                    lock.holders.is_empty()
                        || (lock.mode == Mode::Shared && head.mode == Mode::Shared)
                }
            };
            if !can_go {
                break;
            }
            lock.waiters.remove(0);
            let hold = self.new_hold(head.session, now_ms, head.weight, head.lease_ms);
            let lock = self.lock(slot);
            lock.mode = head.mode;
            lock.holders.push(hold);
            out.push(reply(
                head.session,
                head.request_id,
                Outcome::Granted { token: hold.token },
                true,
            ));
        }
        if self.lock(slot).holders.is_empty() {
            assert!(self.lock(slot).waiters.is_empty());
            self.slots[slot] = None;
            self.free.push(slot);
        }
    }

    fn apply(&mut self, now_ms: u64, command: Command<'_>, out: &mut Vec<Effect>) {
        // Due deadlines come before the command (a lease that ran out is
        // gone before an EXTEND or a try-acquire looks at it).
        self.tick(now_ms, out);
        match command {
            Command::Acquire(a) => self.acquire(now_ms, a, out),
            Command::Release {
                session,
                request_id,
                name,
                token,
            } => {
                let held = self.slot_of(name).and_then(|slot| {
                    let at = self
                        .lock(slot)
                        .holders
                        .iter()
                        .position(|h| h.session == session)?;
                    Some((slot, at))
                });
                let outcome = match held {
                    Some((slot, at))
                        if token != 0 && self.lock(slot).holders[at].token != token =>
                    {
                        Outcome::WrongToken
                    }
                    Some((slot, at)) => {
                        self.lock(slot).holders.remove(at);
                        self.settle(now_ms, slot, out);
                        Outcome::Ok
                    }
                    None => Outcome::NotHeld,
                };
                out.push(reply(session, request_id, outcome, false));
            }
            Command::ForceRelease {
                session,
                request_id,
                name,
                token,
            } => {
                let outcome = match self.slot_of(name) {
                    None => Outcome::NotHeld,
                    Some(slot) => {
                        let mut ended: Vec<Hold> = self
                            .lock(slot)
                            .holders
                            .iter()
                            .filter(|h| token == 0 || h.token == token)
                            .copied()
                            .collect();
                        ended.sort_by_key(|h| h.token);
                        for hold in &ended {
                            let slot = self.slot_of(name).expect("held until the last one goes");
                            self.lock(slot).holders.retain(|h| h.token != hold.token);
                            self.settle(now_ms, slot, out);
                            out.push(Effect::LockLost {
                                session: hold.session,
                                token: hold.token,
                                name: name.into(),
                            });
                        }
                        match ended.is_empty() {
                            true => Outcome::WrongToken,
                            false => Outcome::Ok,
                        }
                    }
                };
                out.push(reply(session, request_id, outcome, false));
            }
            Command::Extend {
                session,
                request_id,
                name,
                lease_ms,
                token,
            } => {
                let hold = self.slot_of(name).and_then(|slot| {
                    self.lock(slot)
                        .holders
                        .iter_mut()
                        .find(|h| h.session == session)
                });
                let outcome = match hold {
                    Some(hold) if token != 0 && hold.token != token => Outcome::WrongToken,
                    Some(hold) => {
                        hold.lease_deadline_ms = now_ms + u64::from(lease_ms);
                        Outcome::Ok
                    }
                    None => Outcome::NotHeld,
                };
                out.push(reply(session, request_id, outcome, false));
            }
            Command::Cancel {
                session,
                request_id,
                target,
            } => {
                let outcome = match self.find_waiter(session, target) {
                    Some((slot, at)) => {
                        self.lock(slot).waiters.remove(at);
                        self.settle(now_ms, slot, out);
                        out.push(reply(session, target, Outcome::Cancelled, true));
                        Outcome::Ok
                    }
                    None => Outcome::NoSuchRequest,
                };
                out.push(reply(session, request_id, outcome, false));
            }
            Command::FailWaiter {
                session,
                request_id,
                cycle,
            } => {
                if let Some((slot, at)) = self.find_waiter(session, request_id) {
                    self.lock(slot).waiters.remove(at);
                    self.settle(now_ms, slot, out);
                    out.push(Effect::Deadlock {
                        session,
                        request_id,
                        cycle: cycle.into(),
                    });
                }
            }
            Command::Introduce {
                session,
                client_name,
            } => {
                self.client_names.retain(|(s, _)| *s != session);
                self.client_names.push((session, client_name.to_vec()));
            }
            // Usage observations: no lock changes.
            Command::Tag { .. } => {}
            Command::EndSession { session } => {
                self.client_names.retain(|(s, _)| *s != session);
                let mut slots: Vec<usize> = (0..self.slots.len()).collect();
                slots.sort_by_key(|&slot| self.slots[slot].as_ref().map(|l| l.name.clone()));
                for slot in slots {
                    let Some(lock) = self.slots[slot].as_mut() else {
                        continue;
                    };
                    let before = lock.holders.len() + lock.waiters.len();
                    lock.holders.retain(|h| h.session != session);
                    lock.waiters.retain(|w| w.session != session);
                    if lock.holders.len() + lock.waiters.len() != before {
                        self.settle(now_ms, slot, out);
                    }
                }
            }
            Command::SetCapacity {
                session,
                request_id,
                name,
                capacity,
            } => {
                let outcome = match self.slot_of(name) {
                    None => Outcome::NoSuchLock,
                    Some(slot) if self.lock(slot).mode != Mode::Permits => Outcome::WrongKind,
                    Some(slot) => {
                        self.lock(slot).capacity = capacity;
                        while let Some(at) = self
                            .lock(slot)
                            .waiters
                            .iter()
                            .position(|w| w.weight > capacity)
                        {
                            self.end_wait(now_ms, (slot, at), Outcome::OverCapacity, out);
                        }
                        self.settle(now_ms, slot, out);
                        Outcome::Ok
                    }
                };
                out.push(reply(session, request_id, outcome, false));
            }
            Command::Locked {
                session,
                request_id,
                name,
            } => {
                let held = self.slot_of(name).is_some();
                out.push(reply(session, request_id, Outcome::Bool(held), false));
            }
            Command::Signal {
                session,
                request_id,
                name,
                signal,
                op,
            } => {
                let outcome = match self.slot_of(name) {
                    None => Outcome::NoSuchLock,
                    Some(slot) => {
                        let lock = self.lock(slot);
                        let set = lock.signals.iter().any(|s| s == signal);
                        let outcome = match op {
                            SignalOp::Exists => Outcome::Bool(set),
                            SignalOp::Delete => {
                                lock.signals.retain(|s| s != signal);
                                Outcome::Bool(set)
                            }
                            SignalOp::Set { .. } if set => Outcome::Bool(true),
                            SignalOp::Set { .. } if lock.signals.len() >= SIGNALS_PER_LOCK_MAX => {
                                Outcome::TooManySignals
                            }
                            SignalOp::Set { .. } => {
                                lock.signals.push(signal.to_vec());
                                Outcome::Bool(true)
                            }
                        };
                        // Pushed only when it goes from unset to set.
                        if op == (SignalOp::Set { notify: true })
                            && outcome == Outcome::Bool(true)
                            && !set
                        {
                            for hold in &lock.holders {
                                out.push(Effect::Signal {
                                    session: hold.session,
                                    name: name.into(),
                                    signal: signal.into(),
                                });
                            }
                        }
                        outcome
                    }
                };
                out.push(reply(session, request_id, outcome, false));
            }
        }
    }

    /// Takes waiter `at` of `slot` out of its queue (those behind it may
    /// go), then tells it `outcome`.
    fn end_wait(
        &mut self,
        now_ms: u64,
        (slot, at): (usize, usize),
        outcome: Outcome,
        out: &mut Vec<Effect>,
    ) {
        let waiter = self.lock(slot).waiters.remove(at);
        self.settle(now_ms, slot, out);
        out.push(reply(waiter.session, waiter.request_id, outcome, true));
    }

    fn find_waiter(&self, session: SessionId, request_id: RequestId) -> Option<(usize, usize)> {
        self.slots.iter().enumerate().find_map(|(slot, lock)| {
            let at = lock
                .as_ref()?
                .waiters
                .iter()
                .position(|w| w.session == session && w.request_id == request_id)?;
            Some((slot, at))
        })
    }

    fn acquire(&mut self, now_ms: u64, a: Acquire<'_>, out: &mut Vec<Effect>) {
        let Some(slot) = self.slot_of(a.name) else {
            let hold = self.new_hold(a.session, now_ms, a.weight, a.lease_ms);
            let lock = ModelLock {
                name: a.name.to_vec(),
                mode: a.mode,
                capacity: a.capacity,
                holders: vec![hold],
                waiters: Vec::new(),
                signals: Vec::new(),
            };
            match self.free.pop() {
                Some(slot) => self.slots[slot] = Some(lock),
                None => self.slots.push(Some(lock)),
            }
            out.push(reply(
                a.session,
                a.request_id,
                Outcome::Granted { token: hold.token },
                false,
            ));
            return;
        };
        let lock = self.lock(slot);
        let outcome = if let Some(hold) = lock.holders.iter().find(|h| h.session == a.session) {
            if a.reentrant && lock.mode == a.mode {
                Outcome::Reentered { token: hold.token }
            } else {
                Outcome::AlreadyHeld
            }
        } else if lock.waiters.iter().any(|w| w.session == a.session) {
            Outcome::AlreadyHeld
        } else if (lock.mode == Mode::Permits) != (a.mode == Mode::Permits) {
            Outcome::WrongKind
        } else if lock.capacity != a.capacity {
            Outcome::CapacityConflict
        } else if lock.waiters.is_empty()
            && match a.mode {
                Mode::Permits => {
                    let used: u64 = lock.holders.iter().map(|h| u64::from(h.weight)).sum();
                    used + u64::from(a.weight) <= u64::from(lock.capacity)
                }
                _ => lock.mode == Mode::Shared && a.mode == Mode::Shared,
            }
        {
            let hold = self.new_hold(a.session, now_ms, a.weight, a.lease_ms);
            self.lock(slot).holders.push(hold);
            Outcome::Granted { token: hold.token }
        } else if a.wait == Wait::Try {
            Outcome::Busy
        } else {
            self.seq += 1;
            let waiter = ModelWaiter {
                session: a.session,
                request_id: a.request_id,
                mode: a.mode,
                weight: a.weight,
                lease_ms: a.lease_ms,
                deadline_ms: match a.wait {
                    Wait::Until(deadline) => Some(deadline),
                    _ => None,
                },
                seq: self.seq,
            };
            self.lock(slot).waiters.push(waiter);
            if !a.notify_queued {
                return;
            }
            Outcome::Queued
        };
        out.push(reply(a.session, a.request_id, outcome, false));
    }

    fn tick(&mut self, now_ms: u64, out: &mut Vec<Effect>) {
        loop {
            // The earliest due wait and the earliest due lease.
            let mut wait: Option<(u64, SessionId, RequestId, usize, usize)> = None;
            let mut lease: Option<(u64, u64, usize, usize)> = None;
            for (slot, lock) in self.slots.iter().enumerate() {
                let Some(lock) = lock else { continue };
                for (at, w) in lock.waiters.iter().enumerate() {
                    if let Some(deadline) = w.deadline_ms.filter(|&d| d <= now_ms) {
                        let key = (deadline, w.session, w.request_id, slot, at);
                        wait = Some(wait.map_or(key, |k| k.min(key)));
                    }
                }
                for (at, h) in lock.holders.iter().enumerate() {
                    if h.lease_deadline_ms != 0 && h.lease_deadline_ms <= now_ms {
                        let key = (h.lease_deadline_ms, h.token, slot, at);
                        lease = Some(lease.map_or(key, |k| k.min(key)));
                    }
                }
            }
            match (wait, lease) {
                (Some((deadline, _, _, slot, at)), lease)
                    if lease.map_or(true, |(l, ..)| deadline <= l) =>
                {
                    self.end_wait(now_ms, (slot, at), Outcome::TimedOut, out);
                }
                (_, Some((_, token, slot, at))) => {
                    let lock = self.lock(slot);
                    let name = lock.name.clone();
                    let hold = lock.holders.remove(at);
                    self.settle(now_ms, slot, out);
                    out.push(Effect::LockLost {
                        session: hold.session,
                        token,
                        name: name.into(),
                    });
                }
                _ => break,
            }
        }
    }

    fn inspect(&self, name: &[u8]) -> Option<LockInfo> {
        let lock = self.slots[self.slot_of(name)?].as_ref().unwrap();
        Some(LockInfo {
            name: lock.name.clone().into(),
            mode: lock.mode,
            capacity: lock.capacity,
            holders: lock.holders.clone(),
            waiters: lock.waiters.len(),
            signals: lock.signals.iter().map(|s| s.clone().into()).collect(),
        })
    }

    fn locks(&self) -> impl Iterator<Item = &ModelLock> {
        self.slots.iter().flatten()
    }

    fn next_deadline(&self) -> Option<u64> {
        let waits = self
            .locks()
            .flat_map(|l| l.waiters.iter().filter_map(|w| w.deadline_ms));
        let leases = self.locks().flat_map(|l| {
            l.holders
                .iter()
                .map(|h| h.lease_deadline_ms)
                .filter(|&d| d != 0)
        });
        waits.chain(leases).min()
    }

    fn client_name(&self, session: SessionId) -> Option<&[u8]> {
        self.client_names
            .iter()
            .find(|(s, _)| *s == session)
            .map(|(_, name)| &name[..])
    }

    fn is_queued(&self, session: SessionId, request_id: RequestId) -> bool {
        self.find_waiter(session, request_id).is_some()
    }

    /// The session's queued request ids, oldest first.
    fn queued_of(&self, session: SessionId) -> Vec<RequestId> {
        let mut queued: Vec<(u64, RequestId)> = self
            .locks()
            .flat_map(|l| l.waiters.iter())
            .filter(|w| w.session == session)
            .map(|w| (w.seq, w.request_id))
            .collect();
        queued.sort_unstable();
        queued.into_iter().map(|(_, id)| id).collect()
    }
}

// ---- the operations -------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum WaitPick {
    Try,
    /// Until now + this many ms.
    In(u8),
    Forever,
}

#[derive(Debug, Clone)]
enum Op {
    Acquire {
        session: SessionId,
        request_id: RequestId,
        name: usize,
        /// `Mode::from_u8`: exclusive, shared, permits.
        mode: u8,
        /// Permits: the weight (up to the capacity) and the capacity.
        weight: u32,
        capacity: u32,
        wait: WaitPick,
        lease_ms: u32,
        reentrant: bool,
        notify_queued: bool,
    },
    /// `token`: 0 (any hold) or a small number, so that it sometimes
    /// matches the hold and sometimes not.
    Release {
        session: SessionId,
        request_id: RequestId,
        name: usize,
        token: u64,
    },
    Extend {
        session: SessionId,
        request_id: RequestId,
        name: usize,
        lease_ms: u32,
        token: u64,
    },
    /// An operator's forced release: every hold (token 0) or one.
    ForceRelease {
        session: SessionId,
        request_id: RequestId,
        name: usize,
        token: u64,
    },
    /// Cancel the session's `pick`-th queued acquire, or one never queued.
    Cancel {
        session: SessionId,
        request_id: RequestId,
        pick: usize,
    },
    /// Deadlock detection fails the session's `pick`-th queued acquire, or
    /// one never queued.
    FailWaiter {
        session: SessionId,
        pick: usize,
    },
    EndSession {
        session: SessionId,
    },
    Introduce {
        session: SessionId,
        client_name: usize,
    },
    Locked {
        session: SessionId,
        request_id: RequestId,
        name: usize,
    },
    SetCapacity {
        session: SessionId,
        request_id: RequestId,
        name: usize,
        capacity: u32,
    },
    Signal {
        session: SessionId,
        request_id: RequestId,
        name: usize,
        signal: usize,
        op: SignalOp,
    },
    /// Time passes by this many ms, then the table ticks.
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let session = 0..5u64;
    let request_id = 1..=REQUEST_IDS;
    let name = 0..NAMES.len();
    let token = prop_oneof![2 => Just(0u64), 1 => 1..12u64];
    let wait = prop_oneof![
        2 => Just(WaitPick::Try),
        3 => (0..20u8).prop_map(WaitPick::In),
        2 => Just(WaitPick::Forever),
    ];
    let lease_ms = prop_oneof![2 => Just(0u32), 1 => 1..25u32];
    let signal_op = prop_oneof![
        Just(SignalOp::Set { notify: false }),
        Just(SignalOp::Set { notify: true }),
        Just(SignalOp::Exists),
        Just(SignalOp::Delete),
    ];
    prop_oneof![
        8 => (
            (session.clone(), request_id.clone(), name.clone()),
            (0..3u8, 1..=4u32, 3..=4u32),
            wait,
            lease_ms,
            prop::bool::weighted(0.2),
            any::<bool>(),
        )
            .prop_map(
                |((session, request_id, name), (mode, weight, capacity), wait, lease_ms, reentrant, notify_queued)| {
                    Op::Acquire {
                        session,
                        request_id,
                        name,
                        mode,
                        weight: weight.min(capacity),
                        capacity,
                        wait,
                        lease_ms,
                        reentrant,
                        notify_queued,
                    }
                }
            ),
        1 => (session.clone(), request_id.clone(), name.clone(), 1..=5u32).prop_map(
            |(session, request_id, name, capacity)| Op::SetCapacity {
                session,
                request_id,
                name,
                capacity,
            }
        ),
        4 => (session.clone(), request_id.clone(), name.clone(), token.clone()).prop_map(
            |(session, request_id, name, token)| Op::Release {
                session,
                request_id,
                name,
                token,
            }
        ),
        1 => (session.clone(), request_id.clone(), name.clone(), token.clone()).prop_map(
            |(session, request_id, name, token)| Op::ForceRelease {
                session,
                request_id,
                name,
                token,
            }
        ),
        1 => (session.clone(), request_id.clone(), name.clone(), 1..25u32, token.clone()).prop_map(
            |(session, request_id, name, lease_ms, token)| Op::Extend {
                session,
                request_id,
                name,
                lease_ms,
                token,
            }
        ),
        2 => (session.clone(), request_id.clone(), prop_oneof![3 => Just(0usize), 1 => 1..4usize]).prop_map(
            |(session, request_id, pick)| Op::Cancel {
                session,
                request_id,
                pick,
            }
        ),
        1 => session.clone().prop_map(|session| Op::EndSession { session }),
        1 => (session.clone(), prop_oneof![3 => Just(0usize), 1 => 1..4usize])
            .prop_map(|(session, pick)| Op::FailWaiter { session, pick }),
        1 => (session.clone(), 0..CLIENT_NAMES.len()).prop_map(|(session, client_name)| {
            Op::Introduce {
                session,
                client_name,
            }
        }),
        1 => (session.clone(), request_id.clone(), name.clone()).prop_map(
            |(session, request_id, name)| Op::Locked {
                session,
                request_id,
                name,
            }
        ),
        2 => (session, request_id, name, 0..SIGNALS.len(), signal_op).prop_map(
            |(session, request_id, name, signal, op)| Op::Signal {
                session,
                request_id,
                name,
                signal,
                op,
            }
        ),
        4 => prop_oneof![Just(0u64), 1..8u64, Just(30u64)].prop_map(Op::Advance),
    ]
}

// ---- the comparison -------------------------------------------------------

/// Pushes of one signal to a lock's holders come in an unspecified order:
/// sort each run of consecutive signal pushes.
fn normalize(mut effects: Vec<Effect>) -> Vec<Effect> {
    let mut start = 0;
    while start < effects.len() {
        let mut end = start;
        while end < effects.len() && matches!(effects[end], Effect::Signal { .. }) {
            end += 1;
        }
        effects[start..end].sort_by_key(Effect::session);
        start = end + 1;
    }
    effects
}

/// Holders and signals of a lock are sets.
fn normalize_info(info: Option<LockInfo>) -> Option<LockInfo> {
    info.map(|mut info| {
        info.holders.sort_by_key(|h| h.token);
        info.signals.sort();
        info
    })
}

struct Run {
    table: LockTable,
    model: Model,
    now_ms: u64,
    fresh_id: RequestId,
    /// The usage report the history calls for, per name: acquires,
    /// grants, busy refusals, timeouts, holds ended.
    usage: std::collections::HashMap<Vec<u8>, [u64; 5]>,
}

/// Every hold of the model: (name, token).
type Holds = std::collections::HashSet<(Vec<u8>, u64)>;
/// Every queued acquire of the model: (session, request) -> name.
type Waits = std::collections::HashMap<(SessionId, RequestId), Vec<u8>>;

fn holds_of(model: &Model) -> Holds {
    model
        .locks()
        .flat_map(|l| l.holders.iter().map(move |h| (l.name.clone(), h.token)))
        .collect()
}

fn waits_of(model: &Model) -> Waits {
    model
        .locks()
        .flat_map(|l| {
            l.waiters
                .iter()
                .map(move |w| ((w.session, w.request_id), l.name.clone()))
        })
        .collect()
}

impl Run {
    /// `request_id`, unless the session has it queued: then a fresh one.
    fn id(&mut self, session: SessionId, request_id: RequestId) -> RequestId {
        if self.model.is_queued(session, request_id) {
            self.fresh_id += 1;
            self.fresh_id
        } else {
            request_id
        }
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let now_ms = self.now_ms;
        let command = match *op {
            Op::Acquire {
                session,
                request_id,
                name,
                mode,
                weight,
                capacity,
                wait,
                lease_ms,
                reentrant,
                notify_queued,
            } => Command::Acquire(Acquire {
                session,
                request_id: self.id(session, request_id),
                name: NAMES[name],
                mode: Mode::from_u8(mode).expect("0..3"),
                weight: if mode == Mode::Permits as u8 {
                    weight
                } else {
                    1
                },
                capacity: if mode == Mode::Permits as u8 {
                    capacity
                } else {
                    0
                },
                wait: match wait {
                    WaitPick::Try => Wait::Try,
                    WaitPick::In(ms) => Wait::Until(now_ms + u64::from(ms)),
                    WaitPick::Forever => Wait::Forever,
                },
                lease_ms,
                reentrant,
                notify_queued,
            }),
            Op::Release {
                session,
                request_id,
                name,
                token,
            } => Command::Release {
                session,
                request_id: self.id(session, request_id),
                name: NAMES[name],
                token,
            },
            Op::ForceRelease {
                session,
                request_id,
                name,
                token,
            } => Command::ForceRelease {
                session,
                request_id: self.id(session, request_id),
                name: NAMES[name],
                token,
            },
            Op::Extend {
                session,
                request_id,
                name,
                lease_ms,
                token,
            } => Command::Extend {
                session,
                request_id: self.id(session, request_id),
                name: NAMES[name],
                lease_ms,
                token,
            },
            Op::Cancel {
                session,
                request_id,
                pick,
            } => {
                let queued = self.model.queued_of(session);
                let target = match queued.get(pick) {
                    Some(&target) => target,
                    None => REQUEST_IDS + 1 + pick as RequestId,
                };
                Command::Cancel {
                    session,
                    request_id: self.id(session, request_id),
                    target,
                }
            }
            Op::EndSession { session } => Command::EndSession { session },
            Op::FailWaiter { session, pick } => Command::FailWaiter {
                session,
                request_id: self
                    .model
                    .queued_of(session)
                    .get(pick)
                    .copied()
                    .unwrap_or(REQUEST_IDS + 1 + pick as RequestId),
                cycle: b"deadlock: a cycle",
            },
            Op::Introduce {
                session,
                client_name,
            } => Command::Introduce {
                session,
                client_name: CLIENT_NAMES[client_name],
            },
            Op::Locked {
                session,
                request_id,
                name,
            } => Command::Locked {
                session,
                request_id: self.id(session, request_id),
                name: NAMES[name],
            },
            Op::SetCapacity {
                session,
                request_id,
                name,
                capacity,
            } => Command::SetCapacity {
                session,
                request_id: self.id(session, request_id),
                name: NAMES[name],
                capacity,
            },
            Op::Signal {
                session,
                request_id,
                name,
                signal,
                op,
            } => Command::Signal {
                session,
                request_id: self.id(session, request_id),
                name: NAMES[name],
                signal: SIGNALS[signal],
                op,
            },
            Op::Advance(ms) => {
                self.now_ms += ms;
                let (mut got, mut want) = (Vec::new(), Vec::new());
                let before = (holds_of(&self.model), waits_of(&self.model));
                self.table.tick(self.now_ms, &mut got);
                self.model.tick(self.now_ms, &mut want);
                self.expect_usage(None, &before, &want);
                prop_assert_eq!(normalize(got), normalize(want), "tick at {}", self.now_ms);
                return self.compare();
            }
        };
        let (mut got, mut want) = (Vec::new(), Vec::new());
        let before = (holds_of(&self.model), waits_of(&self.model));
        self.table.apply(now_ms, command, &mut got);
        self.model.apply(now_ms, command, &mut want);
        self.expect_usage(Some(command), &before, &want);
        prop_assert_eq!(
            normalize(got),
            normalize(want),
            "{:?} at {}",
            command,
            now_ms
        );
        self.compare()
    }

    /// What a step adds to the report, from the model's holds and waits
    /// before it and its effects: an acquire asked, holds that appeared
    /// (grants) or went (holds ended), Busy, TimedOut.
    fn expect_usage(
        &mut self,
        command: Option<Command<'_>>,
        (holds, waits): &(Holds, Waits),
        effects: &[Effect],
    ) {
        let acquired = match command {
            Some(Command::Acquire(a)) => Some(a.name.to_vec()),
            _ => None,
        };
        let mut add = |name: &[u8], what: usize| {
            self.usage.entry(name.to_vec()).or_default()[what] += 1;
        };
        if let Some(name) = &acquired {
            add(name, 0);
        }
        let after = holds_of(&self.model);
        for (name, _) in after.difference(holds) {
            add(name, 1);
        }
        for (name, _) in holds.difference(&after) {
            add(name, 4);
        }
        for effect in effects {
            if let Effect::Reply {
                session,
                request_id,
                outcome: outcome @ (Outcome::Busy | Outcome::TimedOut),
                ..
            } = effect
            {
                let name = match outcome {
                    Outcome::Busy => acquired.clone().expect("busy answers an acquire"),
                    _ => waits[&(*session, *request_id)].clone(),
                };
                add(&name, if *outcome == Outcome::Busy { 2 } else { 3 });
            }
        }
    }

    fn compare(&self) -> Result<(), TestCaseError> {
        self.table.check_invariants();
        for name in NAMES {
            let want = self.usage.get(name).copied().unwrap_or_default();
            let got = self.table.usage(name).map_or([0; 5], |u| {
                assert_eq!(u.wait.count(), u.grants, "a wait time per grant");
                [u.acquires, u.grants, u.busy, u.timeouts, u.hold.count()]
            });
            prop_assert_eq!(got, want, "usage of {}", String::from_utf8_lossy(name));
        }
        for name in NAMES {
            prop_assert_eq!(
                normalize_info(self.table.inspect(name)),
                normalize_info(self.model.inspect(name)),
                "inspect {}",
                String::from_utf8_lossy(name)
            );
        }
        prop_assert_eq!(self.table.lock_count(), self.model.locks().count());
        prop_assert_eq!(
            self.table.waiter_count(),
            self.model.locks().map(|l| l.waiters.len()).sum::<usize>()
        );
        prop_assert_eq!(self.table.last_token(), self.model.last_token);
        for session in 0..5 {
            prop_assert_eq!(
                self.table.client_name(session),
                self.model.client_name(session)
            );
        }
        prop_assert_eq!(self.table.next_deadline(), self.model.next_deadline());
        prop_assert_eq!(
            self.table.oldest_hold_ms(),
            self.model
                .locks()
                .flat_map(|l| l.holders.iter())
                .map(|h| h.since_ms)
                .min()
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn table_matches_the_reference_model(ops in prop::collection::vec(op(), 1..160)) {
        let mut run = Run {
            table: LockTable::new(0, 1),
            model: Model::default(),
            now_ms: 100,
            fresh_id: FRESH_ID_BASE,
            usage: std::collections::HashMap::new(),
        };
        for op in &ops {
            run.step(op)?;
        }
        // Everyone leaves: the table forgets everything.
        for session in 0..5 {
            run.step(&Op::EndSession { session })?;
        }
        prop_assert_eq!(run.table.lock_count(), 0);
        prop_assert_eq!(run.table.waiter_count(), 0);
        prop_assert_eq!(run.table.next_deadline(), None);
    }
}
