//! Focused unit tests of `LockTable`, one rule each, with the exact effects
//! every step must produce. The table is a pure state machine, so each test
//! is a short script of `apply`/`tick` calls at given instants;
//! `check_invariants` runs after every step.

use livelock::limits::{SIGNALS_PER_LOCK_MAX, WAITERS_PER_LOCK_MAX};
use livelock::lock_table::{
    shard_for, Acquire, Command, Effect, Hold, Kind, ListOrder, LockInfo, LockTable, Mode, Outcome,
    RequestId, Scan, SessionId, SignalOp, Wait, SCAN_SLOT_WORK,
};

const X: Mode = Mode::Exclusive;
const S: Mode = Mode::Shared;

/// A table of one shard (any name routes to it) and a scratch outbox.
struct Harness {
    table: LockTable,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            table: LockTable::new(0, 1),
        }
    }

    fn apply(&mut self, now_ms: u64, command: Command<'_>) -> Vec<Effect> {
        let mut out = Vec::new();
        self.table.apply(now_ms, command, &mut out);
        self.table.check_invariants();
        out
    }

    fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut out = Vec::new();
        self.table.tick(now_ms, &mut out);
        self.table.check_invariants();
        out
    }

    fn acquire(&mut self, now_ms: u64, acquire: Acquire<'_>) -> Vec<Effect> {
        self.apply(now_ms, Command::Acquire(acquire))
    }

    fn release(
        &mut self,
        now_ms: u64,
        session: SessionId,
        request_id: RequestId,
        name: &[u8],
    ) -> Vec<Effect> {
        self.apply(
            now_ms,
            Command::Release {
                session,
                request_id,
                name,
                token: 0,
            },
        )
    }

    fn extend(
        &mut self,
        now_ms: u64,
        session: SessionId,
        request_id: RequestId,
        name: &[u8],
        lease_ms: u32,
    ) -> Vec<Effect> {
        self.apply(
            now_ms,
            Command::Extend {
                session,
                request_id,
                name,
                lease_ms,
                token: 0,
            },
        )
    }

    fn cancel(
        &mut self,
        now_ms: u64,
        session: SessionId,
        request_id: RequestId,
        target: RequestId,
    ) -> Vec<Effect> {
        self.apply(
            now_ms,
            Command::Cancel {
                session,
                request_id,
                target,
            },
        )
    }

    fn end(&mut self, now_ms: u64, session: SessionId) -> Vec<Effect> {
        self.apply(now_ms, Command::EndSession { session })
    }

    fn locked(&mut self, session: SessionId, request_id: RequestId, name: &[u8]) -> Vec<Effect> {
        self.apply(
            0,
            Command::Locked {
                session,
                request_id,
                name,
            },
        )
    }

    fn signal(
        &mut self,
        session: SessionId,
        request_id: RequestId,
        name: &[u8],
        signal: &[u8],
        op: SignalOp,
    ) -> Vec<Effect> {
        self.apply(
            0,
            Command::Signal {
                session,
                request_id,
                name,
                signal,
                op,
            },
        )
    }

    fn signals(&self, name: &[u8]) -> Vec<Box<[u8]>> {
        let mut signals = self
            .table
            .inspect(name)
            .map(|info| info.signals)
            .unwrap_or_default();
        signals.sort();
        signals
    }

    fn holders(&self, name: &[u8]) -> Vec<SessionId> {
        self.table
            .inspect(name)
            .map(|info| info.holders.iter().map(|h| h.session).collect())
            .unwrap_or_default()
    }

    fn waiters(&self, name: &[u8]) -> usize {
        self.table.inspect(name).map_or(0, |info| info.waiters)
    }
}

/// An acquire of `name` by `session` (request `request_id`), without lease,
/// not reentrant, without the `Queued` interim reply.
fn acq(
    session: SessionId,
    request_id: RequestId,
    name: &[u8],
    mode: Mode,
    wait: Wait,
) -> Acquire<'_> {
    Acquire {
        session,
        request_id,
        name,
        mode,
        weight: 1,
        capacity: 0,
        wait,
        lease_ms: 0,
        reentrant: false,
        notify_queued: false,
    }
}

fn leased(acquire: Acquire<'_>, lease_ms: u32) -> Acquire<'_> {
    Acquire {
        lease_ms,
        ..acquire
    }
}

fn reply(session: SessionId, request_id: RequestId, outcome: Outcome) -> Effect {
    Effect::Reply {
        session,
        request_id,
        outcome,
        deferred: false,
    }
}

fn pushed(session: SessionId, request_id: RequestId, outcome: Outcome) -> Effect {
    Effect::Reply {
        session,
        request_id,
        outcome,
        deferred: true,
    }
}

fn granted(session: SessionId, request_id: RequestId, token: u64) -> Effect {
    reply(session, request_id, Outcome::Granted { token })
}

fn pushed_grant(session: SessionId, request_id: RequestId, token: u64) -> Effect {
    pushed(session, request_id, Outcome::Granted { token })
}

fn signalled(session: SessionId, name: &[u8], signal: &[u8]) -> Effect {
    Effect::Signal {
        session,
        name: name.into(),
        signal: signal.into(),
    }
}

const SET: SignalOp = SignalOp::Set { notify: false };
const NOTIFY: SignalOp = SignalOp::Set { notify: true };

fn lost(session: SessionId, token: u64, name: &[u8]) -> Effect {
    Effect::LockLost {
        session,
        token,
        name: name.into(),
    }
}

// ---- acquire and release ------------------------------------------------

#[test]
fn exclusive_acquire_of_a_free_lock_is_granted_at_once() {
    let mut h = Harness::new();
    assert_eq!(h.table.lock_count(), 0);
    assert_eq!(
        h.acquire(5, acq(1, 10, b"a", X, Wait::Try)),
        [granted(1, 10, 1)]
    );
    assert_eq!(h.table.lock_count(), 1);
    assert_eq!(h.table.last_token(), 1);
    assert_eq!(
        h.table.inspect(b"a"),
        Some(LockInfo {
            name: (*b"a").into(),
            mode: X,
            capacity: 0,
            holders: vec![Hold {
                session: 1,
                token: 1,
                weight: 1,
                since_ms: 5,
                lease_deadline_ms: 0,
            }],
            waiters: 0,
            signals: vec![],
        })
    );
}

#[test]
fn try_on_a_held_lock_is_busy_and_changes_nothing() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", X, Wait::Forever));
    assert_eq!(
        h.acquire(0, acq(2, 1, b"a", X, Wait::Try)),
        [reply(2, 1, Outcome::Busy)]
    );
    assert_eq!(
        h.acquire(0, acq(2, 2, b"a", S, Wait::Try)),
        [reply(2, 2, Outcome::Busy)]
    );
    assert_eq!(h.table.waiter_count(), 0);
    assert_eq!(h.table.last_token(), 1, "a busy try takes no token");

    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", S, Wait::Forever));
    assert_eq!(
        h.acquire(0, acq(2, 1, b"a", X, Wait::Try)),
        [reply(2, 1, Outcome::Busy)]
    );
    assert_eq!(h.holders(b"a"), [1]);
}

#[test]
fn shared_holders_share_the_lock() {
    let mut h = Harness::new();
    assert_eq!(
        h.acquire(0, acq(1, 1, b"a", S, Wait::Try)),
        [granted(1, 1, 1)]
    );
    assert_eq!(
        h.acquire(1, acq(2, 1, b"a", S, Wait::Try)),
        [granted(2, 1, 2)]
    );
    assert_eq!(
        h.acquire(2, acq(3, 1, b"a", S, Wait::Forever)),
        [granted(3, 1, 3)]
    );
    let info = h.table.inspect(b"a").unwrap();
    assert_eq!(info.mode, S);
    let mut sessions: Vec<_> = info
        .holders
        .iter()
        .map(|h| (h.session, h.token, h.since_ms))
        .collect();
    sessions.sort_unstable();
    assert_eq!(sessions, [(1, 1, 0), (2, 2, 1), (3, 3, 2)]);
    assert_eq!(h.table.lock_count(), 1);
}

#[test]
fn release_of_a_lock_not_held_is_not_held() {
    let mut h = Harness::new();
    assert_eq!(h.release(0, 1, 1, b"a"), [reply(1, 1, Outcome::NotHeld)]);
    h.acquire(0, acq(1, 2, b"a", X, Wait::Try));
    h.acquire(0, acq(2, 1, b"a", X, Wait::Forever));
    // Neither another session's hold nor one's own queued acquire counts.
    assert_eq!(h.release(0, 3, 1, b"a"), [reply(3, 1, Outcome::NotHeld)]);
    assert_eq!(h.release(0, 2, 2, b"a"), [reply(2, 2, Outcome::NotHeld)]);
    assert_eq!(h.holders(b"a"), [1]);
    assert_eq!(h.waiters(b"a"), 1);
}

#[test]
fn release_hands_the_lock_to_the_next_waiter_in_the_same_step() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", X, Wait::Try));
    assert_eq!(h.acquire(1, acq(2, 7, b"a", X, Wait::Forever)), []);
    assert_eq!(h.acquire(2, acq(3, 8, b"a", X, Wait::Until(1_000))), []);
    assert_eq!(h.table.waiter_count(), 2);
    assert_eq!(
        h.release(10, 1, 2, b"a"),
        [pushed_grant(2, 7, 2), reply(1, 2, Outcome::Ok)]
    );
    assert_eq!(h.table.inspect(b"a").unwrap().holders[0].since_ms, 10);
    assert_eq!(
        h.release(20, 2, 9, b"a"),
        [pushed_grant(3, 8, 3), reply(2, 9, Outcome::Ok)]
    );
    // The granted timed wait no longer has a deadline.
    assert_eq!(h.table.next_deadline(), None);
    assert_eq!(h.tick(5_000), []);
    assert_eq!(h.release(30, 3, 1, b"a"), [reply(3, 1, Outcome::Ok)]);
    assert_eq!(h.table.lock_count(), 0);
    assert_eq!(h.table.waiter_count(), 0);
}

#[test]
fn release_grants_exactly_the_shared_waiters_at_the_head_in_fifo_order() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", X, Wait::Try));
    h.acquire(0, acq(2, 1, b"a", S, Wait::Forever));
    h.acquire(0, acq(3, 1, b"a", S, Wait::Until(100)));
    h.acquire(0, acq(4, 1, b"a", S, Wait::Forever));
    h.acquire(0, acq(5, 1, b"a", X, Wait::Forever));
    h.acquire(0, acq(6, 1, b"a", S, Wait::Forever));
    assert_eq!(h.waiters(b"a"), 5);
    assert_eq!(
        h.release(1, 1, 2, b"a"),
        [
            pushed_grant(2, 1, 2),
            pushed_grant(3, 1, 3),
            pushed_grant(4, 1, 4),
            reply(1, 2, Outcome::Ok),
        ]
    );
    let info = h.table.inspect(b"a").unwrap();
    assert_eq!(info.mode, S);
    assert_eq!(info.waiters, 2);
    // Shared waiter 6 stays behind exclusive waiter 5.
    assert_eq!(h.release(2, 3, 2, b"a"), [reply(3, 2, Outcome::Ok)]);
    assert_eq!(h.release(2, 2, 2, b"a"), [reply(2, 2, Outcome::Ok)]);
    assert_eq!(
        h.release(3, 4, 2, b"a"),
        [pushed_grant(5, 1, 5), reply(4, 2, Outcome::Ok)]
    );
    assert_eq!(h.table.inspect(b"a").unwrap().mode, X);
    assert_eq!(
        h.release(4, 5, 2, b"a"),
        [pushed_grant(6, 1, 6), reply(5, 2, Outcome::Ok)]
    );
    assert_eq!(h.table.inspect(b"a").unwrap().mode, S);
}

#[test]
fn a_writer_is_not_starved_by_later_readers() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", S, Wait::Try));
    assert_eq!(h.acquire(0, acq(2, 1, b"a", X, Wait::Forever)), []);
    // The lock is shared and free for readers, but a writer waits: no barging.
    assert_eq!(
        h.acquire(0, acq(3, 1, b"a", S, Wait::Try)),
        [reply(3, 1, Outcome::Busy)]
    );
    assert_eq!(h.acquire(0, acq(3, 2, b"a", S, Wait::Forever)), []);
    assert_eq!(h.holders(b"a"), [1]);
    assert_eq!(h.waiters(b"a"), 2);
    assert_eq!(
        h.release(1, 1, 2, b"a"),
        [pushed_grant(2, 1, 2), reply(1, 2, Outcome::Ok)]
    );
    assert_eq!(
        h.release(2, 2, 2, b"a"),
        [pushed_grant(3, 2, 3), reply(2, 2, Outcome::Ok)]
    );
}

#[test]
fn releasing_one_of_several_shared_holders_keeps_the_writer_waiting() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", S, Wait::Try));
    h.acquire(0, acq(2, 1, b"a", S, Wait::Try));
    h.acquire(0, acq(3, 1, b"a", S, Wait::Try));
    h.acquire(0, acq(4, 1, b"a", X, Wait::Forever));
    assert_eq!(h.release(1, 1, 2, b"a"), [reply(1, 2, Outcome::Ok)]);
    assert_eq!(h.release(1, 3, 2, b"a"), [reply(3, 2, Outcome::Ok)]);
    assert_eq!(h.holders(b"a"), [2]);
    assert_eq!(
        h.release(1, 2, 2, b"a"),
        [pushed_grant(4, 1, 4), reply(2, 2, Outcome::Ok)]
    );
}

#[test]
fn notify_queued_sends_an_interim_reply_only_when_the_acquire_waits() {
    let mut h = Harness::new();
    let notify = |a: Acquire<'static>| Acquire {
        notify_queued: true,
        ..a
    };
    assert_eq!(
        h.acquire(0, notify(acq(1, 1, b"a", X, Wait::Forever))),
        [granted(1, 1, 1)]
    );
    assert_eq!(
        h.acquire(0, notify(acq(2, 1, b"a", X, Wait::Forever))),
        [reply(2, 1, Outcome::Queued)]
    );
    assert_eq!(
        h.acquire(0, notify(acq(3, 1, b"a", X, Wait::Until(50)))),
        [reply(3, 1, Outcome::Queued)]
    );
    assert_eq!(
        h.acquire(0, notify(acq(4, 1, b"a", X, Wait::Try))),
        [reply(4, 1, Outcome::Busy)]
    );
}

// ---- timed waits ----------------------------------------------------------

#[test]
fn a_timed_wait_times_out_at_its_deadline_and_not_before() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", X, Wait::Try));
    h.acquire(0, acq(2, 5, b"a", X, Wait::Until(100)));
    assert_eq!(h.table.next_deadline(), Some(100));
    assert_eq!(h.tick(0), []);
    assert_eq!(h.tick(99), []);
    assert_eq!(h.table.waiter_count(), 1);
    assert_eq!(h.tick(100), [pushed(2, 5, Outcome::TimedOut)]);
    assert_eq!(h.table.waiter_count(), 0);
    assert_eq!(h.waiters(b"a"), 0);
    assert_eq!(h.table.next_deadline(), None);
    assert_eq!(h.tick(1_000), []);
    // The timed-out request is no longer cancellable; the holder is untouched.
    assert_eq!(
        h.cancel(101, 2, 6, 5),
        [reply(2, 6, Outcome::NoSuchRequest)]
    );
    assert_eq!(h.holders(b"a"), [1]);
}

#[test]
fn a_tick_fires_every_due_deadline_in_deadline_order() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", X, Wait::Try));
    h.acquire(0, acq(2, 1, b"a", X, Wait::Until(30)));
    h.acquire(0, acq(3, 1, b"a", X, Wait::Until(10)));
    h.acquire(0, acq(4, 1, b"a", X, Wait::Until(20)));
    h.acquire(0, acq(5, 1, b"a", X, Wait::Until(40)));
    assert_eq!(h.table.next_deadline(), Some(10));
    assert_eq!(
        h.tick(30),
        [
            pushed(3, 1, Outcome::TimedOut),
            pushed(4, 1, Outcome::TimedOut),
            pushed(2, 1, Outcome::TimedOut),
        ]
    );
    assert_eq!(h.table.next_deadline(), Some(40));
    assert_eq!(h.waiters(b"a"), 1);
}

#[test]
fn a_timed_out_exclusive_head_lets_the_shared_waiters_behind_it_in() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", S, Wait::Try));
    h.acquire(0, acq(2, 1, b"a", X, Wait::Until(10)));
    h.acquire(0, acq(3, 1, b"a", S, Wait::Forever));
    h.acquire(0, acq(4, 1, b"a", S, Wait::Until(50)));
    h.acquire(0, acq(5, 1, b"a", X, Wait::Forever));
    assert_eq!(
        h.tick(10),
        [
            pushed_grant(3, 1, 2),
            pushed_grant(4, 1, 3),
            pushed(2, 1, Outcome::TimedOut),
        ]
    );
    let mut holders = h.holders(b"a");
    holders.sort_unstable();
    assert_eq!(holders, [1, 3, 4]);
    assert_eq!(h.waiters(b"a"), 1);
    // Waiter 4 was granted, so its deadline is gone.
    assert_eq!(h.table.next_deadline(), None);
}

// ---- cancel ---------------------------------------------------------------

#[test]
fn cancel_withdraws_a_queued_acquire() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", X, Wait::Try));
    h.acquire(0, acq(2, 1, b"a", X, Wait::Until(100)));
    h.acquire(0, acq(3, 1, b"a", X, Wait::Forever));
    assert_eq!(
        h.cancel(1, 2, 2, 1),
        [pushed(2, 1, Outcome::Cancelled), reply(2, 2, Outcome::Ok)]
    );
    assert_eq!(h.table.next_deadline(), None, "the wait timer went with it");
    assert_eq!(h.waiters(b"a"), 1);
    assert_eq!(h.cancel(1, 2, 3, 1), [reply(2, 3, Outcome::NoSuchRequest)]);
    // Request ids belong to a session: session 2 cannot cancel session 3's wait.
    assert_eq!(h.cancel(1, 2, 4, 3), [reply(2, 4, Outcome::NoSuchRequest)]);
    assert_eq!(
        h.release(2, 1, 2, b"a"),
        [pushed_grant(3, 1, 2), reply(1, 2, Outcome::Ok)]
    );
    // A granted acquire is not queued any more.
    assert_eq!(h.cancel(3, 3, 2, 1), [reply(3, 2, Outcome::NoSuchRequest)]);
    assert_eq!(h.holders(b"a"), [3]);
}

#[test]
fn cancel_of_the_exclusive_head_lets_the_shared_waiters_behind_it_in() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", S, Wait::Try));
    h.acquire(0, acq(2, 1, b"a", X, Wait::Forever));
    h.acquire(0, acq(3, 1, b"a", S, Wait::Forever));
    h.acquire(0, acq(4, 1, b"a", S, Wait::Until(9)));
    h.acquire(0, acq(5, 1, b"a", X, Wait::Forever));
    h.acquire(0, acq(6, 1, b"a", S, Wait::Forever));
    assert_eq!(
        h.cancel(3, 2, 2, 1),
        [
            pushed_grant(3, 1, 2),
            pushed_grant(4, 1, 3),
            pushed(2, 1, Outcome::Cancelled),
            reply(2, 2, Outcome::Ok),
        ]
    );
    assert_eq!(h.waiters(b"a"), 2);
    assert_eq!(h.table.next_deadline(), None);
}

#[test]
fn cancel_of_the_only_waiter_keeps_the_holder() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", X, Wait::Try));
    h.acquire(0, acq(2, 1, b"a", S, Wait::Forever));
    assert_eq!(
        h.cancel(0, 2, 2, 1),
        [pushed(2, 1, Outcome::Cancelled), reply(2, 2, Outcome::Ok)]
    );
    assert_eq!(h.holders(b"a"), [1]);
    assert_eq!(h.table.waiter_count(), 0);
    assert_eq!(h.release(0, 1, 2, b"a"), [reply(1, 2, Outcome::Ok)]);
    assert_eq!(h.table.lock_count(), 0);
}

// ---- leases ---------------------------------------------------------------

#[test]
fn lease_expiry_ends_the_hold_grants_the_next_waiter_and_pushes_lock_lost() {
    let mut h = Harness::new();
    assert_eq!(
        h.acquire(100, leased(acq(1, 1, b"a", X, Wait::Try), 50)),
        [granted(1, 1, 1)]
    );
    assert_eq!(
        h.table.inspect(b"a").unwrap().holders[0].lease_deadline_ms,
        150
    );
    h.acquire(110, leased(acq(2, 1, b"a", X, Wait::Forever), 30));
    h.acquire(120, acq(3, 1, b"a", X, Wait::Forever));
    assert_eq!(h.table.next_deadline(), Some(150));
    assert_eq!(h.tick(149), []);
    assert_eq!(h.tick(150), [pushed_grant(2, 1, 2), lost(1, 1, b"a")]);
    // The waiter's lease starts when it is granted.
    let hold = h.table.inspect(b"a").unwrap().holders[0];
    assert_eq!(
        (hold.session, hold.since_ms, hold.lease_deadline_ms),
        (2, 150, 180)
    );
    assert_eq!(h.table.next_deadline(), Some(180));
    assert_eq!(h.tick(180), [pushed_grant(3, 1, 3), lost(2, 2, b"a")]);
    assert_eq!(
        h.table.inspect(b"a").unwrap().holders[0].lease_deadline_ms,
        0
    );
    assert_eq!(h.table.next_deadline(), None);
    // The lost hold can no longer be released or extended.
    assert_eq!(h.release(181, 1, 2, b"a"), [reply(1, 2, Outcome::NotHeld)]);
    assert_eq!(
        h.extend(181, 2, 2, b"a", 10),
        [reply(2, 2, Outcome::NotHeld)]
    );
}

#[test]
fn lease_expiry_of_a_free_lock_forgets_it() {
    let mut h = Harness::new();
    h.acquire(0, leased(acq(1, 1, b"a", X, Wait::Try), 10));
    assert_eq!(h.tick(25), [lost(1, 1, b"a")]);
    assert_eq!(h.table.lock_count(), 0);
    assert_eq!(h.table.next_deadline(), None);
}

#[test]
fn lease_expiry_of_one_shared_holder_keeps_the_others() {
    let mut h = Harness::new();
    h.acquire(0, leased(acq(1, 1, b"a", S, Wait::Try), 10));
    h.acquire(0, acq(2, 1, b"a", S, Wait::Try));
    h.acquire(0, leased(acq(3, 1, b"a", S, Wait::Try), 20));
    h.acquire(0, acq(4, 1, b"a", X, Wait::Forever));
    assert_eq!(h.tick(10), [lost(1, 1, b"a")]);
    assert_eq!(h.tick(20), [lost(3, 3, b"a")]);
    assert_eq!(h.holders(b"a"), [2]);
    assert_eq!(
        h.release(21, 2, 2, b"a"),
        [pushed_grant(4, 1, 4), reply(2, 2, Outcome::Ok)]
    );
}

#[test]
fn extend_pushes_the_lease_deadline() {
    let mut h = Harness::new();
    h.acquire(0, leased(acq(1, 1, b"a", X, Wait::Try), 100));
    h.acquire(0, acq(2, 1, b"a", X, Wait::Forever));
    assert_eq!(h.extend(60, 1, 2, b"a", 100), [reply(1, 2, Outcome::Ok)]);
    assert_eq!(
        h.table.inspect(b"a").unwrap().holders[0].lease_deadline_ms,
        160
    );
    assert_eq!(h.table.next_deadline(), Some(160));
    assert_eq!(h.tick(100), [], "the old deadline no longer fires");
    assert_eq!(h.tick(159), []);
    // A shorter extend moves the deadline earlier: it is "lease from now".
    assert_eq!(h.extend(150, 1, 3, b"a", 5), [reply(1, 3, Outcome::Ok)]);
    assert_eq!(h.table.next_deadline(), Some(155));
    assert_eq!(h.tick(155), [pushed_grant(2, 1, 2), lost(1, 1, b"a")]);
}

#[test]
fn extend_of_a_hold_without_lease_gives_it_one() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", S, Wait::Try));
    h.acquire(0, acq(2, 1, b"a", S, Wait::Try));
    assert_eq!(h.table.next_deadline(), None);
    assert_eq!(h.extend(10, 2, 2, b"a", 40), [reply(2, 2, Outcome::Ok)]);
    assert_eq!(h.table.next_deadline(), Some(50));
    assert_eq!(h.tick(50), [lost(2, 2, b"a")]);
    assert_eq!(h.holders(b"a"), [1]);
}

#[test]
fn extend_by_a_non_holder_is_not_held() {
    let mut h = Harness::new();
    assert_eq!(h.extend(0, 1, 1, b"a", 10), [reply(1, 1, Outcome::NotHeld)]);
    h.acquire(0, leased(acq(1, 2, b"a", X, Wait::Try), 10));
    h.acquire(0, acq(2, 1, b"a", X, Wait::Forever));
    assert_eq!(
        h.extend(5, 2, 2, b"a", 10),
        [reply(2, 2, Outcome::NotHeld)],
        "a waiter holds nothing"
    );
    assert_eq!(h.extend(5, 3, 1, b"a", 10), [reply(3, 1, Outcome::NotHeld)]);
    assert_eq!(h.table.next_deadline(), Some(10));
}

/// A hold's lease runs out before a waiter's deadline, and the next tick
/// comes after both (the loop wakes at least 1 ms after a deadline, or later
/// when busy). The lock was free from instant 10 on, while the waiter still
/// wanted it until 11: the waiter must be granted, as it would have been had
/// the tick come at 10.
#[test]
fn a_late_tick_fires_deadlines_in_time_order_across_leases_and_waits() {
    let mut h = Harness::new();
    h.acquire(0, leased(acq(1, 1, b"a", X, Wait::Try), 10));
    h.acquire(0, acq(2, 1, b"a", X, Wait::Until(11)));
    let mut on_time = Harness::new();
    on_time.acquire(0, leased(acq(1, 1, b"a", X, Wait::Try), 10));
    on_time.acquire(0, acq(2, 1, b"a", X, Wait::Until(11)));
    assert_eq!(on_time.tick(10), [pushed_grant(2, 1, 2), lost(1, 1, b"a")]);
    assert_eq!(on_time.tick(11), []);
    assert_eq!(on_time.holders(b"a"), [2]);

    assert_eq!(h.tick(11), [pushed_grant(2, 1, 2), lost(1, 1, b"a")]);
    assert_eq!(h.holders(b"a"), [2]);
}

// ---- next_deadline --------------------------------------------------------

#[test]
fn next_deadline_is_the_earliest_lease_or_wait_deadline() {
    let mut h = Harness::new();
    assert_eq!(h.table.next_deadline(), None);
    h.acquire(0, leased(acq(1, 1, b"a", X, Wait::Try), 500));
    assert_eq!(h.table.next_deadline(), Some(500));
    h.acquire(0, acq(2, 1, b"a", X, Wait::Until(300)));
    assert_eq!(h.table.next_deadline(), Some(300));
    h.acquire(0, leased(acq(3, 1, b"b", S, Wait::Try), 200));
    assert_eq!(h.table.next_deadline(), Some(200));
    h.acquire(0, acq(4, 1, b"a", X, Wait::Until(400)));
    h.acquire(0, acq(5, 1, b"a", X, Wait::Forever));
    assert_eq!(h.table.next_deadline(), Some(200));
    assert_eq!(h.release(1, 3, 2, b"b"), [reply(3, 2, Outcome::Ok)]);
    assert_eq!(h.table.next_deadline(), Some(300));
    assert_eq!(
        h.cancel(1, 2, 2, 1),
        [pushed(2, 1, Outcome::Cancelled), reply(2, 2, Outcome::Ok)]
    );
    assert_eq!(h.table.next_deadline(), Some(400));
    assert_eq!(h.tick(400), [pushed(4, 1, Outcome::TimedOut)]);
    assert_eq!(h.table.next_deadline(), Some(500));
    assert_eq!(h.tick(500), [pushed_grant(5, 1, 3), lost(1, 1, b"a")]);
    assert_eq!(h.table.next_deadline(), None);
}

// ---- end of a session -----------------------------------------------------

#[test]
fn end_session_of_a_waiter_in_the_middle_keeps_the_order() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", X, Wait::Try));
    h.acquire(0, acq(2, 1, b"a", X, Wait::Forever));
    h.acquire(0, acq(3, 1, b"a", X, Wait::Until(100)));
    h.acquire(0, acq(4, 1, b"a", X, Wait::Forever));
    assert_eq!(h.end(1, 3), [], "ending a session sends it nothing");
    assert_eq!(h.table.next_deadline(), None);
    assert_eq!(h.waiters(b"a"), 2);
    assert_eq!(
        h.release(2, 1, 2, b"a"),
        [pushed_grant(2, 1, 2), reply(1, 2, Outcome::Ok)]
    );
    assert_eq!(
        h.release(3, 2, 2, b"a"),
        [pushed_grant(4, 1, 3), reply(2, 2, Outcome::Ok)]
    );
}

#[test]
fn end_session_of_a_holder_grants_the_next_waiters() {
    let mut h = Harness::new();
    h.acquire(0, leased(acq(1, 1, b"a", X, Wait::Try), 100));
    h.acquire(0, acq(2, 1, b"a", S, Wait::Forever));
    h.acquire(0, acq(3, 1, b"a", S, Wait::Forever));
    h.acquire(0, acq(4, 1, b"a", X, Wait::Forever));
    assert_eq!(h.end(5, 1), [pushed_grant(2, 1, 2), pushed_grant(3, 1, 3)]);
    assert_eq!(
        h.table.next_deadline(),
        None,
        "the lease went with the hold"
    );
    assert_eq!(h.end(6, 2), []);
    assert_eq!(h.end(6, 3), [pushed_grant(4, 1, 4)]);
    assert_eq!(h.end(7, 4), []);
    assert_eq!(h.table.lock_count(), 0);
}

#[test]
fn end_session_drops_every_hold_and_wait_of_the_session_and_only_those() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", X, Wait::Try));
    h.acquire(0, acq(1, 2, b"b", S, Wait::Try));
    h.acquire(0, acq(2, 1, b"c", X, Wait::Try));
    h.acquire(0, acq(1, 3, b"c", X, Wait::Until(50)));
    h.acquire(0, acq(2, 2, b"a", X, Wait::Forever));
    h.acquire(0, acq(3, 1, b"b", S, Wait::Try));
    assert_eq!(h.end(1, 1), [pushed_grant(2, 2, 5)]);
    assert_eq!(h.holders(b"a"), [2]);
    assert_eq!(h.holders(b"b"), [3]);
    assert_eq!(h.holders(b"c"), [2]);
    assert_eq!(h.table.waiter_count(), 0);
    assert_eq!(h.table.next_deadline(), None);
    // Unknown or already ended sessions: nothing to do.
    assert_eq!(h.end(2, 1), []);
    assert_eq!(h.end(2, 99), []);
}

// ---- one session, one lock ------------------------------------------------

#[test]
fn a_second_acquire_by_a_holder_or_waiter_is_already_held() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", S, Wait::Try));
    assert_eq!(
        h.acquire(0, acq(1, 2, b"a", S, Wait::Try)),
        [reply(1, 2, Outcome::AlreadyHeld)]
    );
    assert_eq!(
        h.acquire(0, acq(1, 3, b"a", X, Wait::Forever)),
        [reply(1, 3, Outcome::AlreadyHeld)]
    );
    h.acquire(0, acq(2, 1, b"a", X, Wait::Forever));
    assert_eq!(
        h.acquire(0, acq(2, 2, b"a", X, Wait::Forever)),
        [reply(2, 2, Outcome::AlreadyHeld)]
    );
    // Even a reentrant acquire: a waiter holds nothing to reenter.
    let reentrant = Acquire {
        reentrant: true,
        ..acq(2, 3, b"a", X, Wait::Try)
    };
    assert_eq!(h.acquire(0, reentrant), [reply(2, 3, Outcome::AlreadyHeld)]);
    assert_eq!(h.waiters(b"a"), 1);
    assert_eq!(h.table.last_token(), 1);
}

#[test]
fn a_reentrant_acquire_by_the_holder_is_reentered_with_the_same_token() {
    let mut h = Harness::new();
    h.acquire(0, acq(9, 1, b"z", X, Wait::Try)); // another lock takes token 1
    h.acquire(0, acq(1, 1, b"a", X, Wait::Try));
    h.acquire(0, acq(2, 1, b"a", X, Wait::Forever));
    let again = Acquire {
        reentrant: true,
        ..acq(1, 2, b"a", X, Wait::Forever)
    };
    assert_eq!(
        h.acquire(5, again),
        [reply(1, 2, Outcome::Reentered { token: 2 })]
    );
    assert_eq!(h.table.last_token(), 2, "no new token");
    assert_eq!(h.table.inspect(b"a").unwrap().holders[0].since_ms, 0);
    assert_eq!(h.holders(b"a"), [1], "no second hold");
    // One release ends the hold, however many times it was entered.
    assert_eq!(
        h.release(6, 1, 3, b"a"),
        [pushed_grant(2, 1, 3), reply(1, 3, Outcome::Ok)]
    );
    assert_eq!(h.release(6, 1, 4, b"a"), [reply(1, 4, Outcome::NotHeld)]);
}

#[test]
fn a_reentrant_acquire_of_a_shared_hold_is_reentered_even_with_waiters() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", S, Wait::Try));
    h.acquire(0, acq(2, 1, b"a", X, Wait::Forever));
    let again = Acquire {
        reentrant: true,
        ..acq(1, 2, b"a", S, Wait::Try)
    };
    assert_eq!(
        h.acquire(1, again),
        [reply(1, 2, Outcome::Reentered { token: 1 })]
    );
    assert_eq!(h.waiters(b"a"), 1);
}

#[test]
fn a_reentrant_acquire_in_another_mode_is_already_held() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", X, Wait::Try));
    h.acquire(0, acq(2, 1, b"b", S, Wait::Try));
    let shared_of_exclusive = Acquire {
        reentrant: true,
        ..acq(1, 2, b"a", S, Wait::Forever)
    };
    assert_eq!(
        h.acquire(1, shared_of_exclusive),
        [reply(1, 2, Outcome::AlreadyHeld)]
    );
    let exclusive_of_shared = Acquire {
        reentrant: true,
        ..acq(2, 2, b"b", X, Wait::Until(50))
    };
    assert_eq!(
        h.acquire(1, exclusive_of_shared),
        [reply(2, 2, Outcome::AlreadyHeld)]
    );
    assert_eq!(h.table.waiter_count(), 0, "no upgrade is queued");
    assert_eq!(h.table.inspect(b"a").unwrap().mode, X);
    assert_eq!(h.table.inspect(b"b").unwrap().mode, S);
    assert_eq!(h.table.last_token(), 2);
}

#[test]
fn too_many_waiters_is_refused_and_a_try_is_still_busy() {
    let mut h = Harness::new();
    h.acquire(0, acq(0, 1, b"a", X, Wait::Try));
    let mut out = Vec::new();
    for session in 1..=WAITERS_PER_LOCK_MAX as SessionId {
        h.table.apply(
            0,
            Command::Acquire(acq(session, 1, b"a", S, Wait::Forever)),
            &mut out,
        );
    }
    assert_eq!(out, []);
    h.table.check_invariants();
    assert_eq!(h.table.waiter_count(), WAITERS_PER_LOCK_MAX);
    let next = WAITERS_PER_LOCK_MAX as SessionId + 1;
    assert_eq!(
        h.acquire(0, acq(next, 1, b"a", X, Wait::Forever)),
        [reply(next, 1, Outcome::TooManyWaiters)]
    );
    assert_eq!(
        h.acquire(0, acq(next, 2, b"a", X, Wait::Until(9))),
        [reply(next, 2, Outcome::TooManyWaiters)]
    );
    assert_eq!(
        h.acquire(0, acq(next, 3, b"a", X, Wait::Try)),
        [reply(next, 3, Outcome::Busy)]
    );
    // Another lock is not affected.
    assert_eq!(
        h.acquire(0, acq(next, 4, b"b", X, Wait::Try)),
        [granted(next, 4, 2)]
    );
    // The release grants all the (shared) waiters at once.
    let effects = h.release(1, 0, 2, b"a");
    assert_eq!(effects.len(), WAITERS_PER_LOCK_MAX + 1);
    assert_eq!(h.table.waiter_count(), 0);
}

#[test]
#[should_panic(expected = "duplicate request id")]
fn a_duplicate_queued_request_id_is_a_programmer_error() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", X, Wait::Try));
    h.acquire(0, acq(1, 1, b"b", X, Wait::Try));
    h.acquire(0, acq(2, 7, b"a", X, Wait::Forever));
    h.acquire(0, acq(2, 7, b"b", X, Wait::Forever));
}

/// Ending a session visits its locks in name order (not the order they
/// were created in, which a table rebuilt from a snapshot does not keep),
/// so the effects and tokens are reproducible.
#[test]
fn end_session_visits_its_locks_in_name_order() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"c", X, Wait::Try)); // slot 0
    h.acquire(0, acq(1, 2, b"a", X, Wait::Try)); // slot 1
    h.acquire(0, acq(1, 3, b"b", X, Wait::Try)); // slot 2
    h.acquire(0, acq(2, 1, b"b", X, Wait::Forever));
    h.acquire(0, acq(3, 1, b"a", X, Wait::Forever));
    h.acquire(0, acq(4, 1, b"c", X, Wait::Forever));
    assert_eq!(
        h.end(1, 1),
        [
            pushed_grant(3, 1, 4),
            pushed_grant(2, 1, 5),
            pushed_grant(4, 1, 6)
        ]
    );
}

/// A wait and a lease with the same deadline: the wait fires first, so the
/// waiter times out rather than taking the lock freed at that instant.
#[test]
fn a_tick_fires_a_wait_before_a_lease_with_the_same_deadline() {
    let mut h = Harness::new();
    h.acquire(0, leased(acq(1, 1, b"a", X, Wait::Try), 10));
    h.acquire(0, acq(2, 1, b"a", X, Wait::Until(10)));
    h.acquire(0, acq(3, 1, b"a", X, Wait::Forever));
    assert_eq!(h.tick(9), []);
    assert_eq!(
        h.tick(10),
        [
            pushed(2, 1, Outcome::TimedOut),
            pushed_grant(3, 1, 2),
            lost(1, 1, b"a")
        ]
    );
    assert_eq!(h.holders(b"a"), [3]);
}

/// Equal deadlines of one kind fire in the order they were made: waits in
/// the order queued, leases in token order.
#[test]
fn equal_deadlines_fire_in_queue_and_token_order() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", X, Wait::Try));
    h.acquire(0, acq(2, 1, b"a", X, Wait::Until(10)));
    h.acquire(0, acq(3, 1, b"a", X, Wait::Until(10)));
    h.acquire(0, leased(acq(4, 1, b"b", S, Wait::Try), 20));
    h.acquire(0, leased(acq(5, 1, b"b", S, Wait::Try), 20));
    assert_eq!(
        h.tick(30),
        [
            pushed(2, 1, Outcome::TimedOut),
            pushed(3, 1, Outcome::TimedOut),
            lost(4, 2, b"b"),
            lost(5, 3, b"b")
        ]
    );
}

/// A lease granted by a late tick runs from the tick, not from the deadline
/// that freed the lock.
#[test]
fn a_lease_granted_by_a_tick_runs_from_that_tick() {
    let mut h = Harness::new();
    h.acquire(0, leased(acq(1, 1, b"a", X, Wait::Try), 10));
    h.acquire(0, leased(acq(2, 1, b"a", X, Wait::Forever), 5));
    assert_eq!(h.tick(18), [pushed_grant(2, 1, 2), lost(1, 1, b"a")]);
    let hold = h.table.inspect(b"a").unwrap().holders[0];
    assert_eq!((hold.since_ms, hold.lease_deadline_ms), (18, 23));
    assert_eq!(h.tick(22), []);
    assert_eq!(h.tick(23), [lost(2, 2, b"a")]);
}

// ---- locked and signals -----------------------------------------------------

#[test]
fn locked_answers_whether_anyone_holds_the_lock() {
    let mut h = Harness::new();
    assert_eq!(h.locked(1, 1, b"a"), [reply(1, 1, Outcome::Bool(false))]);
    h.acquire(0, acq(2, 1, b"a", S, Wait::Try));
    assert_eq!(h.locked(1, 2, b"a"), [reply(1, 2, Outcome::Bool(true))]);
    assert_eq!(h.locked(2, 2, b"a"), [reply(2, 2, Outcome::Bool(true))]);
    assert_eq!(h.locked(1, 3, b"b"), [reply(1, 3, Outcome::Bool(false))]);
    h.release(0, 2, 3, b"a");
    assert_eq!(h.locked(1, 4, b"a"), [reply(1, 4, Outcome::Bool(false))]);
    assert_eq!(h.table.lock_count(), 0, "a query creates nothing");
}

#[test]
fn a_signal_is_set_queried_and_deleted_by_any_session() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", X, Wait::Try));
    assert_eq!(
        h.signal(2, 1, b"a", b"stop", SignalOp::Exists),
        [reply(2, 1, Outcome::Bool(false))]
    );
    assert_eq!(
        h.signal(2, 2, b"a", b"stop", SET),
        [reply(2, 2, Outcome::Bool(true))]
    );
    assert_eq!(
        h.signal(3, 1, b"a", b"stop", SignalOp::Exists),
        [reply(3, 1, Outcome::Bool(true))]
    );
    assert_eq!(
        h.signal(3, 2, b"a", b"stop", SET),
        [reply(3, 2, Outcome::Bool(true))],
        "setting twice is fine"
    );
    assert_eq!(
        h.signals(b"a"),
        [Box::from(&b"stop"[..])],
        "and stored once"
    );
    assert_eq!(
        h.signal(1, 2, b"a", b"go", SET),
        [reply(1, 2, Outcome::Bool(true))]
    );
    assert_eq!(
        h.signals(b"a"),
        [Box::from(&b"go"[..]), Box::from(&b"stop"[..])]
    );
    assert_eq!(
        h.signal(4, 1, b"a", b"stop", SignalOp::Delete),
        [reply(4, 1, Outcome::Bool(true))]
    );
    assert_eq!(
        h.signal(4, 2, b"a", b"stop", SignalOp::Delete),
        [reply(4, 2, Outcome::Bool(false))]
    );
    assert_eq!(
        h.signal(4, 3, b"a", b"stop", SignalOp::Exists),
        [reply(4, 3, Outcome::Bool(false))]
    );
    assert_eq!(
        h.signal(4, 4, b"a", b"go", SignalOp::Exists),
        [reply(4, 4, Outcome::Bool(true))]
    );
    assert_eq!(
        h.signal(4, 5, b"a", b"never", SignalOp::Delete),
        [reply(4, 5, Outcome::Bool(false))]
    );
    assert_eq!(h.table.last_token(), 1, "signals take no token");
    assert_eq!(h.holders(b"a"), [1]);
}

#[test]
fn a_signal_on_a_free_lock_is_no_such_lock_and_creates_nothing() {
    let mut h = Harness::new();
    for (request_id, op) in [
        (1, SET),
        (2, NOTIFY),
        (3, SignalOp::Exists),
        (4, SignalOp::Delete),
    ] {
        assert_eq!(
            h.signal(1, request_id, b"a", b"s", op),
            [reply(1, request_id, Outcome::NoSuchLock)]
        );
    }
    assert_eq!(h.table.lock_count(), 0);
    assert!(!h.table.restore_signal(b"a", b"s"));
    assert_eq!(h.table.lock_count(), 0);
}

#[test]
fn a_notifying_signal_is_pushed_to_every_holder_and_no_waiter() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", S, Wait::Try));
    h.acquire(0, acq(2, 1, b"a", S, Wait::Try));
    h.acquire(0, acq(3, 1, b"a", S, Wait::Try));
    h.acquire(0, acq(4, 1, b"a", X, Wait::Forever));
    let mut effects = h.signal(9, 1, b"a", b"flush", NOTIFY);
    assert_eq!(effects.pop(), Some(reply(9, 1, Outcome::Bool(true))));
    // Holders are in no specified order.
    effects.sort_by_key(Effect::session);
    assert_eq!(
        effects,
        [
            signalled(1, b"a", b"flush"),
            signalled(2, b"a", b"flush"),
            signalled(3, b"a", b"flush")
        ]
    );
    // Raised again while already set: pushed to nobody (safety issue,
    // item 10: re-raising used to flood the holders' write buffers).
    assert_eq!(
        h.signal(9, 2, b"a", b"flush", NOTIFY),
        [reply(9, 2, Outcome::Bool(true))]
    );
    // Cleared and raised again: pushed again.
    h.signal(9, 4, b"a", b"flush", SignalOp::Delete);
    assert_eq!(h.signal(9, 5, b"a", b"flush", NOTIFY).len(), 4);
    // Without notify: stored, pushed to nobody.
    assert_eq!(
        h.signal(9, 3, b"a", b"quiet", SET),
        [reply(9, 3, Outcome::Bool(true))]
    );
    // An exclusive holder is pushed too.
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", X, Wait::Try));
    assert_eq!(
        h.signal(1, 2, b"a", b"x", NOTIFY),
        [signalled(1, b"a", b"x"), reply(1, 2, Outcome::Bool(true))]
    );
}

#[test]
fn signals_stay_while_the_lock_is_held_and_vanish_when_it_is_freed() {
    let mut h = Harness::new();
    // Handed from one holder to the next waiter in one step: still held.
    h.acquire(0, acq(1, 1, b"a", X, Wait::Try));
    h.acquire(0, acq(2, 1, b"a", X, Wait::Forever));
    h.signal(3, 1, b"a", b"s", SET);
    h.release(1, 1, 2, b"a");
    assert_eq!(h.holders(b"a"), [2]);
    assert_eq!(h.signals(b"a"), [Box::from(&b"s"[..])]);
    // Released by the last holder: gone with the lock.
    h.release(2, 2, 2, b"a");
    assert_eq!(h.table.lock_count(), 0);
    h.acquire(3, acq(1, 3, b"a", X, Wait::Try));
    assert_eq!(h.signals(b"a"), Vec::<Box<[u8]>>::new());
    assert_eq!(
        h.signal(3, 2, b"a", b"s", SignalOp::Exists),
        [reply(3, 2, Outcome::Bool(false))]
    );
    // One shared holder of two leaves: still held.
    h.release(4, 1, 4, b"a");
    h.acquire(4, acq(1, 5, b"a", S, Wait::Try));
    h.acquire(4, leased(acq(2, 3, b"a", S, Wait::Try), 10));
    h.signal(3, 3, b"a", b"s", SET);
    h.end(5, 1);
    assert_eq!(h.signals(b"a"), [Box::from(&b"s"[..])]);
    // Lease expiry of the last holder: gone.
    h.tick(14);
    assert_eq!(h.table.lock_count(), 0);
    assert_eq!(h.table.signals().count(), 0);
    // End of the last holder's session: gone.
    h.acquire(20, acq(1, 6, b"a", X, Wait::Try));
    h.signal(3, 4, b"a", b"s", SET);
    h.end(21, 1);
    assert_eq!(
        h.signal(3, 5, b"a", b"s", SignalOp::Exists),
        [reply(3, 5, Outcome::NoSuchLock)]
    );
}

#[test]
fn a_lock_holds_at_most_signals_per_lock_max_signals() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"a", X, Wait::Try));
    h.acquire(0, acq(1, 2, b"b", X, Wait::Try));
    for i in 0..SIGNALS_PER_LOCK_MAX {
        let signal = format!("s{i}");
        assert_eq!(
            h.signal(2, 1, b"a", signal.as_bytes(), SET),
            [reply(2, 1, Outcome::Bool(true))]
        );
    }
    assert_eq!(
        h.signal(2, 2, b"a", b"one-too-many", NOTIFY),
        [reply(2, 2, Outcome::TooManySignals)],
        "refused, and not pushed"
    );
    assert!(!h.table.restore_signal(b"a", b"one-too-many"));
    assert_eq!(
        h.signal(2, 3, b"a", b"one-too-many", SignalOp::Exists),
        [reply(2, 3, Outcome::Bool(false))]
    );
    // Raising one already set is still fine, as are queries and deletes.
    assert_eq!(
        h.signal(2, 4, b"a", b"s0", SET),
        [reply(2, 4, Outcome::Bool(true))]
    );
    assert_eq!(
        h.signal(2, 5, b"a", b"s7", SignalOp::Delete),
        [reply(2, 5, Outcome::Bool(true))]
    );
    assert_eq!(
        h.signal(2, 6, b"a", b"one-too-many", SET),
        [reply(2, 6, Outcome::Bool(true))]
    );
    assert_eq!(h.signals(b"a").len(), SIGNALS_PER_LOCK_MAX);
    // The cap is per lock.
    assert_eq!(
        h.signal(2, 7, b"b", b"s", SET),
        [reply(2, 7, Outcome::Bool(true))]
    );
}

// ---- restore (dump reload) ------------------------------------------------

/// Puts back a lock's hold (weight 1) as a dump would.
fn restore(
    table: &mut LockTable,
    name: &[u8],
    session: SessionId,
    mode: Mode,
    token: u64,
    since_ms: u64,
    lease_deadline_ms: u64,
) -> bool {
    let kind = Kind { mode, capacity: 0 };
    let hold = Hold {
        session,
        token,
        weight: 1,
        since_ms,
        lease_deadline_ms,
    };
    table.restore_hold(name, kind, hold)
}

#[test]
fn restore_hold_puts_back_holds_and_raises_the_token_floor() {
    let mut h = Harness::new();
    assert!(restore(&mut h.table, b"a", 1, X, 40, 7, 0));
    assert!(restore(&mut h.table, b"b", 2, S, 90, 8, 0));
    assert!(restore(&mut h.table, b"b", 3, S, 60, 9, 0));
    h.table.check_invariants();
    assert_eq!(h.table.last_token(), 90);
    assert_eq!(
        h.table.inspect(b"a").unwrap().holders,
        [Hold {
            session: 1,
            token: 40,
            weight: 1,
            since_ms: 7,
            lease_deadline_ms: 0,
        }]
    );
    let mut holds: Vec<_> = h
        .table
        .holds()
        .map(|(name, kind, hold)| (name.to_vec(), kind.mode, hold.session, hold.token))
        .collect();
    holds.sort_by(|a, b| (&a.0, a.2).cmp(&(&b.0, b.2)));
    assert_eq!(
        holds,
        [
            (b"a".to_vec(), X, 1, 40),
            (b"b".to_vec(), S, 2, 90),
            (b"b".to_vec(), S, 3, 60)
        ]
    );
    assert_eq!(h.table.oldest_hold_ms(), Some(7));
    assert_eq!(
        h.table.next_deadline(),
        None,
        "restored holds have no lease"
    );
    // Restored holds behave like any other.
    assert_eq!(h.acquire(10, acq(4, 1, b"a", X, Wait::Forever)), []);
    assert_eq!(
        h.acquire(10, acq(5, 1, b"c", X, Wait::Try)),
        [granted(5, 1, 91)]
    );
    assert_eq!(
        h.release(11, 1, 1, b"a"),
        [pushed_grant(4, 1, 92), reply(1, 1, Outcome::Ok)]
    );
    assert_eq!(h.end(12, 2), []);
    assert_eq!(h.holders(b"b"), [3]);
    assert_eq!(h.end(12, 3), []);
    assert_eq!(h.table.inspect(b"b"), None);
}

#[test]
fn restore_hold_refuses_a_hold_that_conflicts() {
    let mut h = Harness::new();
    assert!(restore(&mut h.table, b"a", 1, X, 5, 0, 0));
    assert!(!restore(&mut h.table, b"a", 2, X, 6, 0, 0), "two exclusive");
    assert!(
        !restore(&mut h.table, b"a", 2, S, 7, 0, 0),
        "shared on exclusive"
    );
    assert!(
        !restore(&mut h.table, b"a", 1, X, 8, 0, 0),
        "same session again"
    );
    assert!(restore(&mut h.table, b"b", 1, S, 1, 0, 0));
    assert!(
        !restore(&mut h.table, b"b", 2, X, 2, 0, 0),
        "exclusive on shared"
    );
    assert!(
        !restore(&mut h.table, b"b", 1, S, 3, 0, 0),
        "same session again"
    );
    assert!(restore(&mut h.table, b"b", 2, S, 4, 0, 0));
    h.table.check_invariants();
    assert_eq!(h.holders(b"a"), [1]);
    assert_eq!(h.table.inspect(b"a").unwrap().holders[0].token, 5);
    let mut b = h.holders(b"b");
    b.sort_unstable();
    assert_eq!(b, [1, 2]);
    // Even a refused hold's token is never handed out again.
    assert_eq!(h.table.last_token(), 8);
    assert_eq!(
        h.acquire(0, acq(3, 1, b"c", X, Wait::Try)),
        [granted(3, 1, 9)]
    );
    // A lower restored token does not lower the floor.
    assert!(restore(&mut h.table, b"d", 4, X, 2, 0, 0));
    assert_eq!(h.table.last_token(), 9);
}

/// Tokens are unique per lock, not per shard: a dump taken with another
/// loop count restores holds from several old shards (each with its own
/// counter) into one. Two such holds with one token, extended to the same
/// deadline (one session extending both in one loop turn), must both expire.
#[test]
fn restored_holds_sharing_a_token_keep_both_leases() {
    let mut h = Harness::new();
    assert!(restore(&mut h.table, b"a", 1, X, 5, 0, 0));
    assert!(restore(&mut h.table, b"b", 2, X, 5, 0, 0));
    assert_eq!(h.extend(0, 1, 1, b"a", 10), [reply(1, 1, Outcome::Ok)]);
    assert_eq!(h.extend(0, 2, 1, b"b", 10), [reply(2, 1, Outcome::Ok)]);
    assert_eq!(h.tick(10), [lost(1, 5, b"a"), lost(2, 5, b"b")]);
    assert_eq!(h.table.lock_count(), 0);
}

#[test]
fn restore_signal_raises_a_signal_on_a_held_lock_without_pushing() {
    let mut h = Harness::new();
    assert!(!h.table.restore_signal(b"a", b"s"), "no such lock");
    assert!(restore(&mut h.table, b"a", 1, S, 3, 0, 0));
    assert!(restore(&mut h.table, b"a", 2, S, 4, 0, 0));
    assert!(h.table.restore_signal(b"a", b"s"));
    assert!(h.table.restore_signal(b"a", b"s"), "twice is fine");
    assert!(h.table.restore_signal(b"a", b"t"));
    h.table.check_invariants();
    assert_eq!(
        h.signals(b"a"),
        [Box::from(&b"s"[..]), Box::from(&b"t"[..])]
    );
    let mut signals: Vec<_> = h
        .table
        .signals()
        .map(|(name, signal)| (name.to_vec(), signal.to_vec()))
        .collect();
    signals.sort();
    assert_eq!(
        signals,
        [
            (b"a".to_vec(), b"s".to_vec()),
            (b"a".to_vec(), b"t".to_vec())
        ]
    );
    assert_eq!(
        h.signal(3, 1, b"a", b"t", SignalOp::Exists),
        [reply(3, 1, Outcome::Bool(true))]
    );
}

#[test]
fn oldest_hold_and_effect_session() {
    let mut h = Harness::new();
    assert_eq!(h.table.oldest_hold_ms(), None);
    h.acquire(30, acq(1, 1, b"a", X, Wait::Try));
    h.acquire(20, acq(2, 1, b"b", X, Wait::Try));
    h.acquire(40, acq(3, 1, b"c", X, Wait::Try));
    assert_eq!(h.table.oldest_hold_ms(), Some(20));
    h.release(50, 2, 2, b"b");
    assert_eq!(h.table.oldest_hold_ms(), Some(30));
    assert_eq!(reply(7, 1, Outcome::Ok).session(), 7);
    assert_eq!(lost(8, 1, b"a").session(), 8);
    assert_eq!(signalled(9, b"a", b"s").session(), 9);
}

// ---- tokens ---------------------------------------------------------------

#[test]
fn tokens_strictly_increase_per_lock_and_come_from_one_counter() {
    let mut h = Harness::new();
    let mut last = 0;
    for round in 0..5 {
        for name in [&b"a"[..], b"b"] {
            let effects = h.acquire(round, acq(1, 1, name, X, Wait::Try));
            let [Effect::Reply {
                outcome: Outcome::Granted { token },
                ..
            }] = effects[..]
            else {
                panic!("not granted: {effects:?}");
            };
            assert!(token > last);
            last = token;
            h.release(round, 1, 2, name);
        }
    }
    assert_eq!(last, 10);
    assert_eq!(h.table.last_token(), 10);
}

#[test]
fn raise_token_floor_makes_every_later_token_greater() {
    let mut h = Harness::new();
    h.table.raise_token_floor(1_000);
    assert_eq!(h.table.last_token(), 1_000);
    assert_eq!(
        h.acquire(0, acq(1, 1, b"a", X, Wait::Try)),
        [granted(1, 1, 1_001)]
    );
    // A lower floor never lowers the counter.
    h.table.raise_token_floor(10);
    assert_eq!(h.table.last_token(), 1_001);
    assert_eq!(
        h.acquire(0, acq(2, 1, b"b", X, Wait::Try)),
        [granted(2, 1, 1_002)]
    );
    h.table.raise_token_floor(5_000);
    h.acquire(0, acq(3, 1, b"a", X, Wait::Forever));
    assert_eq!(
        h.release(0, 1, 2, b"a"),
        [pushed_grant(3, 1, 5_001), reply(1, 2, Outcome::Ok)]
    );
}

// ---- inspection and memory ------------------------------------------------

#[test]
fn inspect_shows_holders_and_the_number_of_waiters() {
    let mut h = Harness::new();
    assert_eq!(h.table.inspect(b"a"), None);
    h.acquire(7, leased(acq(1, 1, b"a", S, Wait::Try), 30));
    h.acquire(8, acq(2, 1, b"a", S, Wait::Try));
    h.acquire(9, acq(3, 1, b"a", X, Wait::Forever));
    h.acquire(9, acq(4, 1, b"a", S, Wait::Until(99)));
    let mut info = h.table.inspect(b"a").unwrap();
    info.holders.sort_by_key(|hold| hold.session);
    assert_eq!(
        info,
        LockInfo {
            name: (*b"a").into(),
            mode: S,
            capacity: 0,
            holders: vec![
                Hold {
                    session: 1,
                    token: 1,
                    weight: 1,
                    since_ms: 7,
                    lease_deadline_ms: 37,
                },
                Hold {
                    session: 2,
                    token: 2,
                    weight: 1,
                    since_ms: 8,
                    lease_deadline_ms: 0,
                },
            ],
            waiters: 2,
            signals: vec![],
        }
    );
    assert_eq!(h.table.waiter_count(), 2);
    assert_eq!(h.table.lock_count(), 1);
}

#[test]
fn list_filters_and_limits() {
    let mut h = Harness::new();
    for (session, name) in [
        (1, &b"job:1"[..]),
        (2, b"job:2"),
        (3, b"other"),
        (4, b"job:3"),
    ] {
        h.acquire(0, acq(session, 1, name, X, Wait::Try));
    }
    h.acquire(0, acq(5, 1, b"job:2", X, Wait::Forever));
    let mut names: Vec<Vec<u8>> = h
        .table
        .list(|name| name.starts_with(b"job:"), usize::MAX)
        .into_iter()
        .map(|info| info.name.into_vec())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [b"job:1".to_vec(), b"job:2".to_vec(), b"job:3".to_vec()]
    );
    let all = h.table.list(|_| true, 10);
    assert_eq!(all.len(), 4);
    for info in &all {
        assert_eq!(Some(info), h.table.inspect(&info.name).as_ref());
    }
    assert_eq!(h.table.list(|name| name.starts_with(b"job:"), 2).len(), 2);
    assert_eq!(h.table.list(|_| true, 0), []);
    assert_eq!(h.table.list(|name| name == b"nope", 10), []);
}

// ---- FIND/LIST scans in slices -------------------------------------------

fn names_of(infos: &[LockInfo]) -> Vec<Vec<u8>> {
    infos.iter().map(|info| info.name.to_vec()).collect()
}

/// Runs `scan` to its end in slices of `budget`, checking each slice stays
/// within its budget (plus one slot and one match) and moves the cursor on.
fn scan_in_slices(
    table: &LockTable,
    scan: &mut Scan,
    filter: &mut dyn FnMut(&[u8]) -> bool,
    budget: usize,
    mut between: impl FnMut(usize),
) -> usize {
    let mut slices = 0;
    loop {
        let before = scan.cursor();
        let mut spent = 0;
        let done = table.scan_slice(
            scan,
            |name| {
                spent += 1;
                (filter(name), 1)
            },
            budget,
        );
        slices += 1;
        assert!(scan.cursor() > before || done.is_some(), "a slice moves on");
        match done {
            Some(work) => {
                assert!(work <= budget + 2 * SCAN_SLOT_WORK + 1);
                return slices;
            }
            None => between(slices),
        }
        assert!(
            spent <= budget,
            "a slice examined more names than its budget"
        );
    }
}

#[test]
fn sliced_scan_resumes_from_its_cursor_and_equals_a_whole_scan() {
    let mut h = Harness::new();
    for i in 0..400u32 {
        let name = format!("lock:{:04}", (i * 7919) % 400);
        h.acquire(
            u64::from(i % 13),
            acq(u64::from(i % 10) + 1, i, name.as_bytes(), X, Wait::Try),
        );
    }
    let table = &h.table;
    for order in [ListOrder::Name, ListOrder::OldestGrant] {
        for limit in [0, 1, 5, 133, 200, 5000] {
            let mut even = |name: &[u8]| name.last().is_some_and(|b| b % 2 == 0);
            let whole = table.list_first(&mut even, limit, order);
            let mut scan = table.start_scan(order, limit);
            let budget = 5 * SCAN_SLOT_WORK;
            let slices = scan_in_slices(table, &mut scan, &mut even, budget, |_| {});
            assert!(
                slices >= 400 / 5,
                "{slices} slices of 5 slots for 400 locks"
            );
            assert_eq!(table.finish_scan(scan), whole, "{order:?} limit {limit}");
            let (infos, cut) = whole;
            assert_eq!(infos.len(), limit.min(200));
            assert_eq!(cut, limit < 200);
            let keys: Vec<(u64, Vec<u8>)> = infos
                .iter()
                .map(|info| match order {
                    ListOrder::Name => (0, info.name.to_vec()),
                    ListOrder::OldestGrant => (info.holders[0].since_ms, info.name.to_vec()),
                })
                .collect();
            let mut sorted = keys.clone();
            sorted.sort();
            assert_eq!(keys, sorted, "{order:?} order");
            if order == ListOrder::Name && limit > 0 && limit <= 200 {
                // The first `limit` even names: lock:0000, lock:0002, ...
                let last = format!("lock:{:04}", 2 * (limit - 1));
                assert_eq!(infos.last().unwrap().name.to_vec(), last.into_bytes());
            }
        }
    }
}

#[test]
fn sliced_scan_lists_every_lock_held_throughout() {
    let mut h = Harness::new();
    // Session 1 holds `keep:*` for the whole scan; session 2's `churn:*`
    // come and go between slices, freeing and reusing slots on both
    // sides of the cursor.
    for i in 0..300u32 {
        h.acquire(
            0,
            acq(1, i, format!("keep:{i:03}").as_bytes(), X, Wait::Try),
        );
        h.acquire(
            0,
            acq(2, i, format!("churn:{i:03}").as_bytes(), X, Wait::Try),
        );
    }
    let mut scan = h.table.start_scan(ListOrder::Name, usize::MAX);
    let mut next_id = 1000u32;
    let mut round = 0u32;
    loop {
        let done = h
            .table
            .scan_slice(&mut scan, |_| (true, 0), 7 * SCAN_SLOT_WORK);
        if done.is_some() {
            break;
        }
        round += 1;
        // Release three churned locks, take three new ones (reusing slots).
        for k in 0..3 {
            let old = format!("churn:{:03}", (round * 3 + k) % 300);
            next_id += 1;
            h.release(u64::from(round), 2, next_id, old.as_bytes());
            let new = format!("new:{round:03}:{k}");
            next_id += 1;
            h.acquire(
                u64::from(round),
                acq(3, next_id, new.as_bytes(), X, Wait::Try),
            );
        }
    }
    assert!(round > 50, "{round} slices");
    let (infos, cut) = h.table.finish_scan(scan);
    assert!(!cut);
    let names = names_of(&infos);
    for i in 0..300 {
        let keep = format!("keep:{i:03}").into_bytes();
        assert!(names.contains(&keep), "{} held throughout, not listed", i);
    }
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(names, sorted, "listed by name, each once");
    // What is listed is held now (a pick released meanwhile is left out).
    for info in &infos {
        assert_eq!(Some(info), h.table.inspect(&info.name).as_ref());
    }
}

#[test]
fn sliced_scan_keeps_only_its_limit_oldest_first() {
    let mut h = Harness::new();
    // Granted at 100 - i: the highest i is the oldest.
    for i in 0..200u32 {
        let name = format!("n{i:03}");
        h.acquire(
            u64::from(100 - i / 2),
            acq(1, i, name.as_bytes(), X, Wait::Try),
        );
    }
    let mut scan = h.table.start_scan(ListOrder::OldestGrant, 10);
    let mut all = |_: &[u8]| true;
    scan_in_slices(&h.table, &mut scan, &mut all, SCAN_SLOT_WORK, |_| {});
    let (infos, cut) = h.table.finish_scan(scan);
    assert!(cut);
    let got: Vec<(u64, Vec<u8>)> = infos
        .iter()
        .map(|info| (info.holders[0].since_ms, info.name.to_vec()))
        .collect();
    let want: Vec<(u64, Vec<u8>)> = [198, 199, 196, 197, 194, 195, 192, 193, 190, 191]
        .iter()
        .map(|&i: &u32| (u64::from(100 - i / 2), format!("n{i:03}").into_bytes()))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn idle_lock_names_are_forgotten() {
    let mut h = Harness::new();
    // Released.
    h.acquire(0, acq(1, 1, b"a", X, Wait::Try));
    h.release(0, 1, 2, b"a");
    assert_eq!((h.table.lock_count(), h.table.inspect(b"a")), (0, None));
    // Released after the only waiter was cancelled.
    h.acquire(0, acq(1, 3, b"a", X, Wait::Try));
    h.acquire(0, acq(2, 1, b"a", X, Wait::Forever));
    h.cancel(0, 2, 2, 1);
    h.release(0, 1, 4, b"a");
    assert_eq!(h.table.lock_count(), 0);
    // Released after the only waiter timed out.
    h.acquire(0, acq(1, 5, b"a", X, Wait::Try));
    h.acquire(0, acq(2, 3, b"a", X, Wait::Until(5)));
    h.tick(5);
    h.release(6, 1, 6, b"a");
    assert_eq!(h.table.lock_count(), 0);
    // Ended sessions, holder and waiter, on several locks.
    h.acquire(10, acq(1, 7, b"a", S, Wait::Try));
    h.acquire(10, acq(2, 4, b"a", S, Wait::Try));
    h.acquire(10, acq(3, 1, b"a", X, Wait::Forever));
    h.acquire(10, acq(3, 2, b"b", X, Wait::Forever));
    h.end(11, 1);
    h.end(11, 2);
    assert_eq!(h.table.lock_count(), 2);
    h.end(11, 3);
    assert_eq!(h.table.lock_count(), 0);
    // Lease expiry.
    h.acquire(20, leased(acq(4, 1, b"c", S, Wait::Try), 5));
    h.acquire(20, leased(acq(5, 1, b"c", S, Wait::Try), 6));
    h.tick(30);
    assert_eq!(h.table.lock_count(), 0);
    assert_eq!(h.table.waiter_count(), 0);
    assert_eq!(h.table.next_deadline(), None);
    assert_eq!(h.table.list(|_| true, usize::MAX), []);
    // A forgotten name starts afresh, with a later token.
    assert!(matches!(
        h.acquire(40, acq(6, 1, b"a", X, Wait::Try))[..],
        [Effect::Reply {
            outcome: Outcome::Granted { token },
            ..
        }] if token == h.table.last_token()
    ));
}

// ---- sharding -------------------------------------------------------------

#[test]
fn shard_for_is_fixed_and_in_range() {
    for shards in 1..=8 {
        for name in [&b"a"[..], b"b", b"job:42", &[0xff; 1024]] {
            let shard = shard_for(name, shards);
            assert!(shard < shards);
            assert_eq!(shard, shard_for(name, shards));
        }
    }
    // FNV-1a, 64 bit: seedless, so every loop and every restart agrees.
    assert_eq!(
        shard_for(b"a", usize::MAX),
        (0xaf63_dc4c_8601_ec8c_u64 % usize::MAX as u64) as usize
    );
    let mut seen = [false; 4];
    for i in 0..64u32 {
        seen[shard_for(format!("lock-{i}").as_bytes(), 4)] = true;
    }
    assert_eq!(seen, [true; 4], "names spread over the shards");
}

#[test]
fn a_lock_on_its_own_shard_is_accepted() {
    let name = (0..)
        .map(|i: u32| format!("n{i}"))
        .find(|n| shard_for(n.as_bytes(), 3) == 2)
        .unwrap();
    let mut table = LockTable::new(2, 3);
    let mut out = Vec::new();
    table.apply(
        0,
        Command::Acquire(acq(1, 1, name.as_bytes(), X, Wait::Try)),
        &mut out,
    );
    table.check_invariants();
    assert_eq!(out, [granted(1, 1, 1)]);
}

#[test]
#[should_panic(expected = "wrong shard")]
fn a_lock_routed_to_the_wrong_shard_is_a_programmer_error() {
    let name = (0..)
        .map(|i: u32| format!("n{i}"))
        .find(|n| shard_for(n.as_bytes(), 3) == 1)
        .unwrap();
    let mut table = LockTable::new(0, 3);
    table.apply(
        0,
        Command::Acquire(acq(1, 1, name.as_bytes(), X, Wait::Try)),
        &mut Vec::new(),
    );
}

#[test]
#[should_panic(expected = "wrong shard")]
fn a_release_routed_to_the_wrong_shard_is_a_programmer_error() {
    let name = (0..)
        .map(|i: u32| format!("n{i}"))
        .find(|n| shard_for(n.as_bytes(), 3) == 1)
        .unwrap();
    let mut table = LockTable::new(0, 3);
    let release = Command::Release {
        session: 1,
        request_id: 1,
        name: name.as_bytes(),
        token: 0,
    };
    table.apply(0, release, &mut Vec::new());
}

// ---- deadlines before commands (safety issue, item 16) -------------------

/// A command that arrives after a lease ran out, before any tick, must not
/// see the expired hold: an EXTEND does not revive it, and a try-acquire by
/// another session gets the lock.
#[test]
fn due_deadlines_are_applied_before_the_command() {
    let mut h = Harness::new();
    h.acquire(100, leased(acq(1, 1, b"a", X, Wait::Try), 50));
    // No tick at 150: the EXTEND at 160 comes first.
    assert_eq!(
        h.extend(160, 1, 2, b"a", 1000),
        [lost(1, 1, b"a"), reply(1, 2, Outcome::NotHeld)]
    );
    assert!(h.holders(b"a").is_empty());
    h.acquire(200, leased(acq(1, 3, b"b", X, Wait::Try), 50));
    assert_eq!(
        h.acquire(251, acq(2, 1, b"b", X, Wait::Try)),
        [lost(1, 2, b"b"), granted(2, 1, 3)]
    );
    // A timed wait that is due times out before a release could grant it.
    h.acquire(300, acq(3, 1, b"b", X, Wait::Until(310)));
    assert_eq!(
        h.release(320, 2, 2, b"b"),
        [pushed(3, 1, Outcome::TimedOut), reply(2, 2, Outcome::Ok)]
    );
}

/// The table never hands out a token past the durable ceiling: reaching it
/// is a broken invariant of the runtime (which extends it long before).
#[test]
#[should_panic(expected = "durable ceiling")]
fn tokens_stop_at_the_ceiling() {
    let mut h = Harness::new();
    h.table.raise_token_floor(10);
    h.table.set_token_ceiling(11);
    assert_eq!(
        h.acquire(1, acq(1, 1, b"a", X, Wait::Try)),
        [granted(1, 1, 11)]
    );
    h.acquire(1, acq(1, 2, b"b", X, Wait::Try));
}

/// A restored hold keeps what was left of its lease.
#[test]
fn a_restored_lease_still_expires() {
    let mut h = Harness::new();
    assert!(restore(&mut h.table, b"a", 1, X, 5, 0, 150));
    assert_eq!(h.table.next_deadline(), Some(150));
    assert_eq!(h.tick(150), [lost(1, 5, b"a")]);
    assert!(h.holders(b"a").is_empty());
}

/// Safety issue, item 9: RELEASE and EXTEND name the hold by its token. A
/// guard whose lease ran out must not release or renew the session's newer
/// hold of the same lock.
#[test]
fn a_stale_token_touches_no_newer_hold() {
    let mut h = Harness::new();
    h.acquire(0, leased(acq(1, 1, b"a", X, Wait::Try), 10));
    h.tick(10); // lease 1 lost
    assert_eq!(
        h.acquire(20, acq(1, 2, b"a", X, Wait::Try)),
        [granted(1, 2, 2)]
    );
    let stale = |request_id, lease_ms| Command::Extend {
        session: 1,
        request_id,
        name: b"a",
        lease_ms,
        token: 1,
    };
    assert_eq!(
        h.apply(21, stale(3, 100)),
        [reply(1, 3, Outcome::WrongToken)]
    );
    let release = |request_id, token| Command::Release {
        session: 1,
        request_id,
        name: b"a",
        token,
    };
    assert_eq!(
        h.apply(22, release(4, 1)),
        [reply(1, 4, Outcome::WrongToken)]
    );
    assert_eq!(h.holders(b"a"), [1], "the newer hold is untouched");
    assert_eq!(h.apply(23, release(5, 2)), [reply(1, 5, Outcome::Ok)]);
    assert!(h.holders(b"a").is_empty());
}

// ---- counting semaphores ----------------------------------------------------

const P: Mode = Mode::Permits;

/// `weight` permits of the semaphore `name` of `capacity`.
fn permits(
    session: SessionId,
    request_id: RequestId,
    name: &[u8],
    (weight, capacity): (u32, u32),
    wait: Wait,
) -> Acquire<'_> {
    Acquire {
        weight,
        capacity,
        ..acq(session, request_id, name, P, wait)
    }
}

fn set_capacity(h: &mut Harness, now_ms: u64, name: &[u8], capacity: u32) -> Vec<Effect> {
    let command = Command::SetCapacity {
        session: 99,
        request_id: 1,
        name,
        capacity,
    };
    h.apply(now_ms, command)
}

#[test]
fn permits_are_granted_while_their_weights_fit_the_capacity() {
    let mut h = Harness::new();
    let gpus = b"gpus";
    assert_eq!(
        h.acquire(0, permits(1, 1, gpus, (2, 4), Wait::Try)),
        [granted(1, 1, 1)]
    );
    assert_eq!(
        h.acquire(0, permits(2, 1, gpus, (1, 4), Wait::Try)),
        [granted(2, 1, 2)]
    );
    // 3 of 4 out: 2 more do not fit, 1 does.
    assert_eq!(
        h.acquire(0, permits(3, 1, gpus, (2, 4), Wait::Try)),
        [reply(3, 1, Outcome::Busy)]
    );
    assert_eq!(
        h.acquire(0, permits(4, 1, gpus, (1, 4), Wait::Try)),
        [granted(4, 1, 3)]
    );
    let info = h.table.inspect(gpus).unwrap();
    assert_eq!((info.mode, info.capacity), (P, 4));
    let weights: Vec<u32> = info.holders.iter().map(|hold| hold.weight).collect();
    assert_eq!(weights, [2, 1, 1]);
    // The last holder out forgets the name, capacity included.
    for session in [1, 2, 4] {
        h.release(1, session, 2, gpus);
    }
    assert_eq!(h.table.lock_count(), 0);
    assert_eq!(
        h.acquire(2, permits(5, 1, gpus, (7, 7), Wait::Try)),
        [granted(5, 1, 4)]
    );
}

#[test]
fn a_heavy_request_at_the_head_is_not_passed_by_lighter_ones() {
    let mut h = Harness::new();
    h.acquire(0, permits(1, 1, b"s", (3, 4), Wait::Try));
    // Session 2 wants 2 (does not fit); session 3 wants 1, which would fit,
    // but queues behind it: strict FIFO.
    assert_eq!(h.acquire(1, permits(2, 1, b"s", (2, 4), Wait::Forever)), []);
    assert_eq!(h.acquire(2, permits(3, 1, b"s", (1, 4), Wait::Forever)), []);
    assert_eq!(
        h.acquire(2, permits(4, 1, b"s", (1, 4), Wait::Try)),
        [reply(4, 1, Outcome::Busy)],
        "a try does not pass the queue either"
    );
    // The release lets both in, in order, in the same step.
    assert_eq!(
        h.release(3, 1, 2, b"s"),
        [
            pushed_grant(2, 1, 2),
            pushed_grant(3, 1, 3),
            reply(1, 2, Outcome::Ok)
        ]
    );
    // The head leaving the queue lets those behind it in (cancel).
    h.acquire(4, permits(5, 1, b"s", (4, 4), Wait::Forever));
    h.acquire(4, permits(6, 1, b"s", (1, 4), Wait::Forever));
    assert_eq!(
        h.cancel(5, 5, 2, 1),
        [
            pushed_grant(6, 1, 4),
            pushed(5, 1, Outcome::Cancelled),
            reply(5, 2, Outcome::Ok)
        ]
    );
}

#[test]
fn a_name_is_a_lock_or_a_semaphore_and_has_one_capacity() {
    let mut h = Harness::new();
    h.acquire(0, acq(1, 1, b"lock", X, Wait::Try));
    assert_eq!(
        h.acquire(0, permits(2, 1, b"lock", (1, 3), Wait::Forever)),
        [reply(2, 1, Outcome::WrongKind)]
    );
    h.acquire(0, permits(1, 2, b"sem", (1, 3), Wait::Try));
    for mode in [X, S] {
        assert_eq!(
            h.acquire(0, acq(2, 2, b"sem", mode, Wait::Forever)),
            [reply(2, 2, Outcome::WrongKind)]
        );
    }
    assert_eq!(
        h.acquire(0, permits(2, 3, b"sem", (1, 4), Wait::Forever)),
        [reply(2, 3, Outcome::CapacityConflict)]
    );
    assert_eq!(
        set_capacity(&mut h, 0, b"lock", 2),
        [reply(99, 1, Outcome::WrongKind)]
    );
    assert_eq!(
        set_capacity(&mut h, 0, b"none", 2),
        [reply(99, 1, Outcome::NoSuchLock)]
    );
    // Nothing of the refused requests stayed.
    assert_eq!(h.table.waiter_count(), 0);
    assert_eq!(h.holders(b"sem"), [1]);
}

#[test]
fn a_capacity_change_grants_what_fits_and_ends_what_never_can() {
    let mut h = Harness::new();
    h.acquire(0, permits(1, 1, b"s", (2, 2), Wait::Try));
    h.acquire(0, permits(2, 1, b"s", (2, 2), Wait::Forever));
    h.acquire(0, permits(3, 1, b"s", (1, 2), Wait::Forever));
    // Raised to 4: session 2's 2 fit beside session 1's 2; 3's does not.
    assert_eq!(
        set_capacity(&mut h, 1, b"s", 4),
        [pushed_grant(2, 1, 2), reply(99, 1, Outcome::Ok)]
    );
    // Acquires now name 4.
    assert_eq!(
        h.acquire(1, permits(4, 1, b"s", (1, 2), Wait::Try)),
        [reply(4, 1, Outcome::CapacityConflict)]
    );
    h.acquire(1, permits(4, 2, b"s", (3, 4), Wait::Forever));
    // Lowered to 2: holders keep their 4 permits; the waiter of 3 can
    // never fit and ends; the one of 1 waits until enough are released.
    assert_eq!(
        set_capacity(&mut h, 2, b"s", 2),
        [
            pushed(4, 2, Outcome::OverCapacity),
            reply(99, 1, Outcome::Ok)
        ]
    );
    assert_eq!(h.release(3, 1, 2, b"s"), [reply(1, 2, Outcome::Ok)]);
    assert_eq!(
        h.release(4, 2, 2, b"s"),
        [pushed_grant(3, 1, 3), reply(2, 2, Outcome::Ok)]
    );
}

#[test]
fn a_session_that_ends_gives_its_permits_back() {
    let mut h = Harness::new();
    h.acquire(0, permits(1, 1, b"s", (3, 3), Wait::Try));
    h.acquire(0, permits(2, 1, b"s", (2, 3), Wait::Forever));
    h.acquire(0, permits(3, 1, b"s", (1, 3), Wait::Forever));
    assert_eq!(h.end(1, 1), [pushed_grant(2, 1, 2), pushed_grant(3, 1, 3)]);
    // A lease runs out the same way.
    h.end(2, 2);
    h.acquire(2, leased(permits(4, 1, b"s", (2, 3), Wait::Try), 10));
    h.acquire(3, permits(5, 1, b"s", (2, 3), Wait::Forever));
    assert_eq!(h.tick(12), [pushed_grant(5, 1, 5), lost(4, 4, b"s")]);
}

// ---- wait edges (deadlock detection) --------------------------------------

/// (waiter, blocker) of every edge, sorted.
fn edges(h: &Harness) -> Vec<(SessionId, SessionId)> {
    let mut out = Vec::new();
    assert!(h.table.wait_edges(&mut out, usize::MAX));
    let mut pairs: Vec<_> = out.iter().map(|e| (e.waiter, e.blocker)).collect();
    pairs.sort_unstable();
    pairs
}

#[test]
fn a_wait_waits_for_what_it_conflicts_with_ahead_of_it() {
    let mut h = Harness::new();
    // Shared holders 1 and 2; exclusive waiter 3; shared waiters 4 and 5
    // (behind 3, FIFO); exclusive waiter 6.
    h.acquire(0, acq(1, 1, b"a", S, Wait::Try));
    h.acquire(0, acq(2, 1, b"a", S, Wait::Try));
    for (session, mode) in [(3, X), (4, S), (5, S), (6, X)] {
        h.acquire(0, acq(session, 1, b"a", mode, Wait::Forever));
    }
    // 3 waits for both holders; 4 and 5 for 3 (the nearest conflicting
    // wait ahead), not for each other; 6 for 5 (right ahead of it).
    assert_eq!(edges(&h), [(3, 1), (3, 2), (4, 3), (5, 3), (6, 5)]);
    // Semaphore waits make no edges; nor does a lock nobody waits for.
    h.acquire(0, permits(7, 1, b"s", (1, 1), Wait::Try));
    h.acquire(0, permits(8, 1, b"s", (1, 1), Wait::Forever));
    h.acquire(0, acq(9, 1, b"free", X, Wait::Try));
    assert_eq!(edges(&h).len(), 5);
    // The bound cuts the edges short and says so.
    let mut out = Vec::new();
    assert!(!h.table.wait_edges(&mut out, 3));
    assert_eq!(out.len(), 3);
    // A wait failed for a deadlock ends with the cycle; the queue moves.
    let fail = Command::FailWaiter {
        session: 3,
        request_id: 1,
        cycle: b"deadlock: 3 -> 1 -> 3",
    };
    let failed = Effect::Deadlock {
        session: 3,
        request_id: 1,
        cycle: b"deadlock: 3 -> 1 -> 3"[..].into(),
    };
    assert_eq!(
        h.apply(1, fail),
        [pushed_grant(4, 1, 5), pushed_grant(5, 1, 6), failed]
    );
    // Gone already: nothing happens.
    assert_eq!(h.apply(2, fail), []);
}
