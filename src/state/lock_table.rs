//! One shard's locks as a pure state machine.
//!
//! `LockTable::apply(now_ms, command, out)` and `LockTable::tick(now_ms, out)`
//! are the only ways to change a shard. They never touch a socket, a clock or
//! a channel: time is passed in, and every consequence (a reply, a deferred
//! grant, a lost lease) is written to the caller's outbox as an [`Effect`].
//! The event loop does the I/O; tests and the simulation drive it directly.
//!
//! FIND and LIST read the table in slices between commands: a [`Scan`]
//! (`start_scan`, `scan_slice`, `finish_scan`) keeps a cursor over the lock
//! slots and the best `limit` matches, so no slice walks the whole shard.
//!
//! Invariants kept here (checked by `check_invariants` in tests):
//! - a lock in the table has at least one holder; idle names use no memory;
//! - holders are one exclusive session, or any number of shared sessions,
//!   or (a semaphore) sessions whose weights fit the name's capacity when
//!   granted; each session at most once per name (holding or waiting, not
//!   both); a name is a lock or a semaphore for as long as it is in use;
//! - waiters are served in strict FIFO order: a new request never passes a
//!   queued one, so a writer is never starved by later readers;
//! - when the holders change, the head of the queue is granted in the same
//!   step (all shared waiters at the head together);
//! - fencing tokens come from one shard-wide counter, so they strictly
//!   increase for every lock; `raise_token_floor` keeps that across restarts.

use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use hashbrown::DefaultHashBuilder;
use hashbrown::{HashMap, HashSet, HashTable};
use std::hash::BuildHasher;
use std::sync::Arc;

use crate::limits::{SIGNALS_PER_LOCK_MAX, WAITERS_PER_LOCK_MAX};
pub use crate::mode::Mode;
use crate::usage::{NameUsage, Seen, Usage, UsageTotal};

/// A session, unique over all loops of the server (its home loop is in the low bits).
pub type SessionId = u64;
/// A client-chosen request id, unique among the session's requests in flight.
pub type RequestId = u32;

/// The shard that owns `name`: a fixed, seedless FNV-1a hash, so every loop
/// (and every restart) agrees without sharing state.
pub fn shard_for(name: &[u8], shards: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in name {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % shards as u64) as usize
}

/// How long an acquire may wait, as an absolute deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Try once: busy if not free now.
    Try,
    /// Queue until this instant (ms on the server's monotonic clock).
    Until(u64),
    /// Queue until granted or cancelled.
    Forever,
}

#[derive(Debug, Clone, Copy)]
pub struct Acquire<'a> {
    pub session: SessionId,
    pub request_id: RequestId,
    pub name: &'a [u8],
    pub mode: Mode,
    /// `Mode::Permits`: how many permits (1..=capacity); else 1.
    pub weight: u32,
    /// `Mode::Permits`: the semaphore's capacity, which must be the name's
    /// (it is set by the acquire that puts the name in use); else 0.
    pub capacity: u32,
    pub wait: Wait,
    /// 0 = no lease; else the hold ends unless extended within this many ms.
    pub lease_ms: u32,
    /// Granting again to a session that already holds the lock (LiveLock AQR).
    pub reentrant: bool,
    /// Reply `Queued` (interim) when the acquire has to wait.
    pub notify_queued: bool,
}

#[derive(Debug, Clone, Copy)]
pub enum Command<'a> {
    Acquire(Acquire<'a>),
    /// `token`: the fencing token of the hold meant (0 = whatever hold
    /// the session has); another hold of the session answers `WrongToken`.
    Release {
        session: SessionId,
        request_id: RequestId,
        name: &'a [u8],
        token: u64,
    },
    Extend {
        session: SessionId,
        request_id: RequestId,
        name: &'a [u8],
        lease_ms: u32,
        token: u64,
    },
    /// An operator ends other sessions' holds of a lock: every hold
    /// (`token` 0) or the one with `token`. Each holder is told LockLost;
    /// the queue moves on as after a release. Answers `Ok`, `NotHeld`
    /// (nobody holds it) or `WrongToken` (no hold has that token).
    ForceRelease {
        session: SessionId,
        request_id: RequestId,
        name: &'a [u8],
        token: u64,
    },
    /// Withdraw the session's queued acquire `target`.
    Cancel {
        session: SessionId,
        request_id: RequestId,
        target: RequestId,
    },
    /// The session is over: release its holds, drop its waits (no replies).
    EndSession {
        session: SessionId,
    },
    /// Tells the shard a session's client name (sent before the session's
    /// first request to the shard), so listings can show who holds a lock.
    Introduce {
        session: SessionId,
        client_name: &'a [u8],
    },
    /// Is the lock held (by anyone)? Answers `Bool`.
    Locked {
        session: SessionId,
        request_id: RequestId,
        name: &'a [u8],
    },
    /// Change a semaphore's capacity; any session may. Holders keep their
    /// permits (more may be out than the new capacity until they are
    /// released); queued acquires heavier than the new capacity end
    /// `OverCapacity`; those that now fit are granted. Answers `Ok`,
    /// `NoSuchLock` (not in use) or `WrongKind` (a lock).
    SetCapacity {
        session: SessionId,
        request_id: RequestId,
        name: &'a [u8],
        capacity: u32,
    },
    /// Deadlock detection chose this queued acquire to break a cycle of
    /// waits: it ends `Effect::Deadlock` with `cycle` (a description), if
    /// it is still queued here; otherwise nothing happens.
    FailWaiter {
        session: SessionId,
        request_id: RequestId,
        cycle: &'a [u8],
    },
    /// An observation for usage reports: `name` has these `tags` (a pool
    /// request's candidate, sent before its acquire). Changes no lock and
    /// answers nothing; not logged.
    Tag {
        name: &'a [u8],
        tags: &'a [u8],
    },
    /// Raise, query or clear a signal on a held lock; any session may.
    /// Answers `Bool` (set: always true; delete: whether it was set), or
    /// `NoSuchLock`. Signals live and die with the lock.
    Signal {
        session: SessionId,
        request_id: RequestId,
        name: &'a [u8],
        signal: &'a [u8],
        op: SignalOp,
    },
}

impl<'a> Command<'a> {
    /// The lock the command is about, if any (it decides the shard).
    pub fn lock_name(&self) -> Option<&'a [u8]> {
        match *self {
            Command::Acquire(a) => Some(a.name),
            Command::Release { name, .. }
            | Command::ForceRelease { name, .. }
            | Command::Extend { name, .. }
            | Command::Locked { name, .. }
            | Command::SetCapacity { name, .. }
            | Command::Tag { name, .. }
            | Command::Signal { name, .. } => Some(name),
            Command::Introduce { .. }
            | Command::Cancel { .. }
            | Command::EndSession { .. }
            | Command::FailWaiter { .. } => None,
        }
    }

    /// The byte strings the command borrows, to carry them owned: (lock
    /// name or client name, signal); empty where the command has none.
    pub fn bytes(&self) -> (&'a [u8], &'a [u8]) {
        match *self {
            Command::Acquire(a) => (a.name, b""),
            Command::Release { name, .. }
            | Command::ForceRelease { name, .. }
            | Command::Extend { name, .. }
            | Command::SetCapacity { name, .. }
            | Command::Locked { name, .. } => (name, b""),
            Command::Signal { name, signal, .. } => (name, signal),
            Command::Tag { name, tags } => (name, tags),
            Command::Introduce { client_name, .. } => (client_name, b""),
            Command::FailWaiter { cycle, .. } => (cycle, b""),
            Command::Cancel { .. } | Command::EndSession { .. } => (b"", b""),
        }
    }

    /// The same command borrowing other bytes (so it can travel owned).
    pub fn with_bytes<'b>(self, name: &'b [u8], signal: &'b [u8]) -> Command<'b> {
        match self {
            Command::Acquire(a) => Command::Acquire(Acquire {
                name,
                ..a_static(a)
            }),
            Command::Release {
                session,
                request_id,
                token,
                ..
            } => Command::Release {
                session,
                request_id,
                name,
                token,
            },
            Command::ForceRelease {
                session,
                request_id,
                token,
                ..
            } => Command::ForceRelease {
                session,
                request_id,
                name,
                token,
            },
            Command::Extend {
                session,
                request_id,
                lease_ms,
                token,
                ..
            } => Command::Extend {
                session,
                request_id,
                name,
                lease_ms,
                token,
            },
            Command::Locked {
                session,
                request_id,
                ..
            } => Command::Locked {
                session,
                request_id,
                name,
            },
            Command::SetCapacity {
                session,
                request_id,
                capacity,
                ..
            } => Command::SetCapacity {
                session,
                request_id,
                name,
                capacity,
            },
            Command::Signal {
                session,
                request_id,
                op,
                ..
            } => Command::Signal {
                session,
                request_id,
                name,
                signal,
                op,
            },
            Command::Cancel {
                session,
                request_id,
                target,
            } => Command::Cancel {
                session,
                request_id,
                target,
            },
            Command::EndSession { session } => Command::EndSession { session },
            Command::Tag { .. } => Command::Tag { name, tags: signal },
            Command::Introduce { session, .. } => Command::Introduce {
                session,
                client_name: name,
            },
            Command::FailWaiter {
                session,
                request_id,
                ..
            } => Command::FailWaiter {
                session,
                request_id,
                cycle: name,
            },
        }
    }
}

/// A timed wait's key: (deadline, session, request).
type WaitKey = (u64, SessionId, RequestId);

/// The acquire with its name detached, so `..` update syntax can re-borrow.
fn a_static(a: Acquire<'_>) -> Acquire<'static> {
    Acquire { name: b"", ..a }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Granted {
        token: u64,
    },
    /// A reentrant acquire by the holder: no new hold, the existing token.
    Reentered {
        token: u64,
    },
    /// Release, extend or cancel done.
    Ok,
    /// Interim: the acquire waits in the queue.
    Queued,
    Busy,
    TimedOut,
    Cancelled,
    NotHeld,
    /// RELEASE/EXTEND named a token the session's hold does not have (an
    /// older hold of the same lock, since lost): nothing changed.
    WrongToken,
    AlreadyHeld,
    NoSuchRequest,
    TooManyWaiters,
    /// Answer of a query (LOCKED, SIGEXISTS, SIGDEL...).
    Bool(bool),
    /// A signal was addressed to a lock that nobody holds.
    NoSuchLock,
    TooManySignals,
    /// A semaphore acquire of a lock's name, or a lock acquire of a
    /// semaphore's, or SetCapacity of a lock: nothing changed.
    WrongKind,
    /// A semaphore acquire whose capacity is not the semaphore's.
    CapacityConflict,
    /// A queued semaphore acquire that can never fit: its capacity was
    /// lowered below its weight.
    OverCapacity,
}

/// What a signal command does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalOp {
    /// Raise the signal; `notify` also pushes it to every holder.
    Set {
        notify: bool,
    },
    Exists,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The answer to `request_id` of `session`. `deferred` when it completes
    /// an acquire that waited (it is pushed, not returned at once).
    Reply {
        session: SessionId,
        request_id: RequestId,
        outcome: Outcome,
        deferred: bool,
    },
    /// The lease of a hold ran out: the hold is gone.
    LockLost {
        session: SessionId,
        token: u64,
        name: Box<[u8]>,
    },
    /// A signal raised on a lock this session holds.
    Signal {
        session: SessionId,
        name: Box<[u8]>,
        signal: Box<[u8]>,
    },
    /// The final (deferred) reply of a queued acquire that deadlock
    /// detection failed to break a cycle of waits; `cycle` says which.
    Deadlock {
        session: SessionId,
        request_id: RequestId,
        cycle: Box<[u8]>,
    },
}

impl Effect {
    /// The session the effect is for.
    pub fn session(&self) -> SessionId {
        match self {
            Effect::Reply { session, .. }
            | Effect::LockLost { session, .. }
            | Effect::Signal { session, .. }
            | Effect::Deadlock { session, .. } => *session,
        }
    }

    /// The request the effect answers, if it answers one.
    pub fn request_id(&self) -> Option<RequestId> {
        match self {
            Effect::Reply { request_id, .. } | Effect::Deadlock { request_id, .. } => {
                Some(*request_id)
            }
            Effect::LockLost { .. } | Effect::Signal { .. } => None,
        }
    }
}

/// One holder of a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    pub session: SessionId,
    pub token: u64,
    /// Permits held (`Mode::Permits`); 1 for a lock.
    pub weight: u32,
    /// When it was granted (ms, server monotonic clock).
    pub since_ms: u64,
    /// 0 = no lease; else the instant the hold ends unless extended.
    pub lease_deadline_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct Waiter {
    session: SessionId,
    request_id: RequestId,
    mode: Mode,
    weight: u32,
    lease_ms: u32,
    /// Key of its entry in `wait_timers`, if it has a deadline.
    timer: Option<WaitKey>,
    /// When it was queued (server-clock ms, which are Unix ms).
    since_ms: u64,
    /// Unique among the shard's waiters ever (not kept across restarts):
    /// names this wait, not a later one that reuses its request id.
    seq: u64,
}

/// One queued acquire, as listings and the dump see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    pub session: SessionId,
    pub request_id: RequestId,
    pub mode: Mode,
    /// Permits asked for (`Mode::Permits`); 1 for a lock.
    pub weight: u32,
    pub lease_ms: u32,
    /// The wait's deadline, if it has one.
    pub deadline_ms: Option<u64>,
    /// When it was queued (server-clock ms).
    pub since_ms: u64,
}

impl From<&Waiter> for Queued {
    fn from(w: &Waiter) -> Queued {
        Queued {
            session: w.session,
            request_id: w.request_id,
            mode: w.mode,
            weight: w.weight,
            lease_ms: w.lease_ms,
            deadline_ms: w.timer.map(|(deadline, _, _)| deadline),
            since_ms: w.since_ms,
        }
    }
}

/// Shared holders beyond the first and the queue: boxed, because most locks
/// have neither and a held lock should cost little memory.
#[derive(Debug, Default)]
struct Extra {
    more: Vec<Hold>,
    waiters: VecDeque<Waiter>,
    /// Raised signals (at most SIGNALS_PER_LOCK_MAX).
    signals: Vec<Box<[u8]>>,
}

#[derive(Debug)]
struct Lock {
    name: Box<[u8]>,
    mode: Mode,
    /// A semaphore's capacity (`Mode::Permits`); 0 for a lock.
    capacity: u32,
    /// A semaphore's permits out: the holders' weights summed.
    used: u64,
    first: Hold,
    extra: Option<Box<Extra>>,
}

impl Lock {
    fn kind(&self) -> Kind {
        Kind {
            mode: self.mode,
            capacity: self.capacity,
        }
    }

    fn holders(&self) -> impl Iterator<Item = &Hold> {
        std::iter::once(&self.first).chain(self.extra.iter().flat_map(|e| e.more.iter()))
    }

    fn waiters(&self) -> impl Iterator<Item = &Waiter> {
        self.extra.iter().flat_map(|e| e.waiters.iter())
    }

    fn waiter_count(&self) -> usize {
        self.extra.as_ref().map_or(0, |e| e.waiters.len())
    }

    fn holder_count(&self) -> usize {
        1 + self.extra.as_ref().map_or(0, |e| e.more.len())
    }

    fn hold_of(&self, session: SessionId) -> Option<&Hold> {
        self.holders().find(|h| h.session == session)
    }

    fn hold_of_mut(&mut self, session: SessionId) -> Option<&mut Hold> {
        if self.first.session == session {
            return Some(&mut self.first);
        }
        self.extra
            .as_mut()
            .and_then(|e| e.more.iter_mut().find(|h| h.session == session))
    }

    /// Removes the hold of `session`; returns it and whether the lock is now
    /// without holders (then `first` is stale and must be replaced or the
    /// lock removed).
    fn remove_hold(&mut self, session: SessionId) -> Option<(Hold, bool)> {
        let removed = if self.first.session == session {
            let removed = self.first;
            match self.extra.as_mut().and_then(|e| e.more.pop()) {
                Some(next) => {
                    self.first = next;
                    (removed, false)
                }
                None => (removed, true),
            }
        } else {
            let extra = self.extra.as_mut()?;
            let at = extra.more.iter().position(|h| h.session == session)?;
            (extra.more.swap_remove(at), false)
        };
        if self.mode == Mode::Permits {
            self.used -= u64::from(removed.0.weight);
        }
        Some(removed)
    }

    /// Adds a granted hold. `empty`: the lock had no holder (`first` is
    /// stale and is replaced).
    fn add_hold(&mut self, hold: Hold, mode: Mode, empty: bool) {
        if empty {
            self.first = hold;
            self.mode = mode;
        } else {
            self.extra_mut().more.push(hold);
        }
        if mode == Mode::Permits {
            self.used += u64::from(hold.weight);
        }
    }

    /// Whether a request of `mode` and `weight` may join the holders now
    /// (the queue aside). `empty`: the lock has no holder.
    fn admits(&self, empty: bool, mode: Mode, weight: u32) -> bool {
        match (self.mode, mode) {
            (Mode::Permits, Mode::Permits) => {
                self.used + u64::from(weight) <= u64::from(self.capacity)
            }
            _ if empty => true,
            (Mode::Shared, Mode::Shared) => true,
            _ => false,
        }
    }

    fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    fn shrink_extra(&mut self) {
        if self
            .extra
            .as_ref()
            .is_some_and(|e| e.more.is_empty() && e.waiters.is_empty() && e.signals.is_empty())
        {
            self.extra = None;
        }
    }
}

/// The order of `LockTable::list_first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListOrder {
    /// By name (native LIST).
    Name,
    /// Oldest grant first, then by name (LiveLock FIND).
    OldestGrant,
}

/// Work charged for examining one slot of the shard, or keeping one match,
/// in a scan (`LockTable::scan_slice`): about as long as this many glob steps
/// (a slot costs a cache miss or two; a glob step a few instructions).
pub const SCAN_SLOT_WORK: usize = 16;

/// A FIND/LIST scan of one shard in progress: a cursor over the lock slots
/// and the best matches so far (bounded by the limit). See
/// `LockTable::start_scan`.
#[derive(Debug)]
pub struct Scan {
    order: ListOrder,
    limit: usize,
    /// The next slot to examine.
    cursor: usize,
    /// The scan ends here (the slot count when it started).
    end: usize,
    /// The `limit` best matches so far, by (oldest grant or 0, name), the
    /// worst on top so it is the one dropped. Names are copies: the locks
    /// may be released between slices.
    best: BinaryHeap<(u64, Box<[u8]>)>,
    /// More than `limit` locks matched.
    cut: bool,
}

impl Scan {
    /// Slots examined so far (tests).
    pub fn cursor(&self) -> usize {
        self.cursor
    }
}

/// A view of one lock for inspection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    pub name: Box<[u8]>,
    pub mode: Mode,
    /// A semaphore's capacity; 0 for a lock.
    pub capacity: u32,
    pub holders: Vec<Hold>,
    pub waiters: usize,
    pub signals: Vec<Box<[u8]>>,
}

/// One edge of the wait-for graph: the queued acquire `request_id` of
/// session `waiter` (on lock `name`) waits for session `blocker`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitEdge {
    pub waiter: SessionId,
    pub request_id: RequestId,
    /// The wait's `seq` (unique in its shard).
    pub seq: u64,
    /// When it was queued.
    pub since_ms: u64,
    pub blocker: SessionId,
    pub by: Blocker,
    pub name: Arc<[u8]>,
}

/// What of the blocker's the waiter waits for: a hold (its token), or a
/// queued acquire ahead (its `seq`). With the waiter's `seq`, it names an
/// edge that stays the same edge for as long as both exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Blocker {
    Hold(u64),
    Waiter(u64),
}

/// How a name in use is held: its mode, and a semaphore's capacity (0
/// for a lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    pub mode: Mode,
    pub capacity: u32,
}

/// The locks of one shard.
pub struct LockTable {
    shard: usize,
    shards: usize,
    locks: slab::Slab<Lock>,
    /// Name → slot in `locks`; the name is stored once, in the lock.
    names: HashTable<u32>,
    hasher: DefaultHashBuilder,
    /// Locks each session holds or waits for here, so ending it touches only those.
    by_session: HashMap<SessionId, HashSet<u32>>,
    /// Client names of the sessions that introduced themselves here.
    client_names: HashMap<SessionId, Box<[u8]>>,
    /// Queued acquires: (session, request) → lock slot.
    waits: HashMap<(SessionId, RequestId), u32>,
    /// (deadline, token, lock slot) → lock slot, for holds with a lease. The
    /// slot is in the key because tokens are unique per lock, not per shard:
    /// holds restored from a dump taken with another loop count can share one.
    lease_timers: BTreeMap<(u64, u64, u32), u32>,
    /// (deadline, session, request) → (lock slot, session, request), for
    /// timed waits. Ties go by session and request, not by arrival or
    /// slot, so the same state fires the same way however it was built
    /// (a snapshot of the log, replayed).
    wait_timers: BTreeMap<WaitKey, (u32, SessionId, RequestId)>,
    /// The last fencing token handed out by this shard.
    last_token: u64,
    /// Tokens stay at or below this: the high-water mark the server has
    /// made durable (`data_dir::TokenCeiling`), so a crash never repeats a token.
    token_ceiling: u64,
    /// The last waiter's `seq`.
    last_seq: u64,
    /// Usage by name (reports): observations, not state.
    usage: Usage,
}

impl LockTable {
    pub fn new(shard: usize, shards: usize) -> LockTable {
        assert!(shard < shards);
        LockTable {
            shard,
            shards,
            locks: slab::Slab::new(),
            names: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            by_session: HashMap::new(),
            client_names: HashMap::new(),
            waits: HashMap::new(),
            lease_timers: BTreeMap::new(),
            wait_timers: BTreeMap::new(),
            last_token: 0,
            token_ceiling: u64::MAX,
            last_seq: 0,
            usage: Usage::new(crate::limits::USAGE_NAMES_PER_SHARD),
        }
    }

    pub fn shard(&self) -> usize {
        self.shard
    }

    /// Number of locks held (with or without waiters).
    pub fn lock_count(&self) -> usize {
        self.locks.len()
    }

    /// Number of queued acquires.
    pub fn waiter_count(&self) -> usize {
        self.waits.len()
    }

    /// The last fencing token handed out here.
    pub fn last_token(&self) -> u64 {
        self.last_token
    }

    /// Makes every later token greater than `floor` (tokens restored from a
    /// dump, or handed out by a previous run).
    pub fn raise_token_floor(&mut self, floor: u64) {
        self.last_token = self.last_token.max(floor);
    }

    /// The earliest instant at which `tick` has work to do.
    pub fn next_deadline(&self) -> Option<u64> {
        let lease = self.lease_timers.keys().next().map(|k| k.0);
        let wait = self.wait_timers.keys().next().map(|k| k.0);
        match (lease, wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn find(&self, name: &[u8]) -> Option<u32> {
        let hash = self.hasher.hash_one(name);
        self.names
            .find(hash, |&idx| &*self.locks[idx as usize].name == name)
            .copied()
    }

    /// Lets tokens go up to `ceiling` (the durable high-water mark).
    pub fn set_token_ceiling(&mut self, ceiling: u64) {
        self.token_ceiling = ceiling;
    }

    fn next_token(&mut self) -> u64 {
        // The runtime extends the ceiling long before it is reached
        // (`data_dir::TokenCeiling`); reaching it would risk repeating a token after a
        // crash, so it stops the process. Also rules out overflow.
        assert!(
            self.last_token < self.token_ceiling,
            "fencing token {} reached the durable ceiling",
            self.last_token
        );
        self.last_token += 1;
        self.last_token
    }

    fn index_session(&mut self, session: SessionId, idx: u32) {
        self.by_session.entry(session).or_default().insert(idx);
    }

    fn unindex_session(&mut self, session: SessionId, idx: u32) {
        if let Some(set) = self.by_session.get_mut(&session) {
            set.remove(&idx);
            // A session that holds nothing here for a moment usually takes
            // a lock again soon: keep its small empty set (no allocation
            // per cycle) until EndSession; give back a big one.
            if set.is_empty() && set.capacity() > 64 {
                self.by_session.remove(&session);
            }
        }
    }

    fn new_hold(
        &mut self,
        session: SessionId,
        now_ms: u64,
        (weight, lease_ms): (u32, u32),
        idx: u32,
    ) -> Hold {
        let token = self.next_token();
        let lease_deadline_ms = if lease_ms == 0 {
            0
        } else {
            let deadline = now_ms + u64::from(lease_ms);
            self.lease_timers.insert((deadline, token, idx), idx);
            deadline
        };
        Hold {
            session,
            token,
            weight,
            since_ms: now_ms,
            lease_deadline_ms,
        }
    }

    /// Applies one command at `now_ms`, writing its effects to `out`.
    pub fn apply(&mut self, now_ms: u64, command: Command<'_>, out: &mut Vec<Effect>) {
        // Paired with the sender's check where the route was chosen.
        if let Some(name) = command.lock_name() {
            self.assert_shard(name);
        }
        // Deadlines that are due come first: a command never sees a hold
        // whose lease ran out, or a wait that timed out, before `now_ms`.
        if self.next_deadline().is_some_and(|due| due <= now_ms) {
            self.tick(now_ms, out);
        }
        match command {
            Command::Acquire(acquire) => self.acquire(now_ms, acquire, out),
            Command::Release {
                session,
                request_id,
                name,
                token,
            } => {
                let outcome = self.release(now_ms, session, name, token, out);
                out.push(reply(session, request_id, outcome, false));
            }
            Command::ForceRelease {
                session,
                request_id,
                name,
                token,
            } => {
                let outcome = self.force_release(now_ms, name, token, out);
                out.push(reply(session, request_id, outcome, false));
            }
            Command::Extend {
                session,
                request_id,
                name,
                lease_ms,
                token,
            } => {
                let outcome = self.extend(now_ms, session, name, lease_ms, token);
                out.push(reply(session, request_id, outcome, false));
            }
            Command::Cancel {
                session,
                request_id,
                target,
            } => {
                let outcome = match self.remove_waiter(now_ms, session, target, out) {
                    true => {
                        out.push(reply(session, target, Outcome::Cancelled, true));
                        Outcome::Ok
                    }
                    false => Outcome::NoSuchRequest,
                };
                out.push(reply(session, request_id, outcome, false));
            }
            Command::EndSession { session } => {
                self.client_names.remove(&session);
                self.end_session(now_ms, session, out)
            }
            Command::Introduce {
                session,
                client_name,
            } => {
                self.client_names.insert(session, client_name.into());
            }
            Command::Tag { name, tags } => self.usage.tag(now_ms, name, tags),
            Command::Locked {
                session,
                request_id,
                name,
            } => {
                let held = self.find(name).is_some();
                out.push(reply(session, request_id, Outcome::Bool(held), false));
            }
            Command::Signal {
                session,
                request_id,
                name,
                signal,
                op,
            } => {
                let outcome = self.signal(name, signal, op, out);
                out.push(reply(session, request_id, outcome, false));
            }
            Command::SetCapacity {
                session,
                request_id,
                name,
                capacity,
            } => {
                let outcome = self.set_capacity(now_ms, name, capacity, out);
                out.push(reply(session, request_id, outcome, false));
            }
            Command::FailWaiter {
                session,
                request_id,
                cycle,
            } => {
                if self.remove_waiter(now_ms, session, request_id, out) {
                    out.push(Effect::Deadlock {
                        session,
                        request_id,
                        cycle: cycle.into(),
                    });
                }
            }
        }
    }

    /// The `seq` of the queued acquire `request_id` of `session`, if it is
    /// queued here.
    pub fn queued_seq(&self, session: SessionId, request_id: RequestId) -> Option<u64> {
        let &idx = self.waits.get(&(session, request_id))?;
        self.locks[idx as usize]
            .waiters()
            .find(|w| w.session == session && w.request_id == request_id)
            .map(|w| w.seq)
    }

    /// The shard's edges of the wait-for graph (`state::deadlock`), at most
    /// `limit`; false if there were more. A queued acquire of a lock waits
    /// for the nearest queued acquire ahead of it that it cannot be granted
    /// with (strict FIFO: it goes only after that one was granted and let
    /// go), or, with none ahead, for every holder it conflicts with. Waits
    /// for a semaphore make no edge: any one of several holders may free
    /// what it needs, which a wait-for edge cannot say.
    pub fn wait_edges(&self, out: &mut Vec<WaitEdge>, limit: usize) -> bool {
        let mut slots: Vec<u32> = self.waits.values().copied().collect();
        slots.sort_unstable();
        slots.dedup();
        for idx in slots {
            let lock = &self.locks[idx as usize];
            if lock.mode == Mode::Permits {
                continue;
            }
            // One pass: the nearest conflicting wait ahead of an exclusive
            // wait is the one just ahead; of a shared wait, the nearest
            // exclusive one ahead. One copy of the name for all its edges.
            let name: Arc<[u8]> = Arc::from(&*lock.name);
            let (mut prev, mut last_exclusive): (Option<&Waiter>, Option<&Waiter>) = (None, None);
            for w in lock.waiters() {
                let edge = |blocker: SessionId, by: Blocker| WaitEdge {
                    waiter: w.session,
                    request_id: w.request_id,
                    seq: w.seq,
                    since_ms: w.since_ms,
                    blocker,
                    by,
                    name: name.clone(),
                };
                let ahead = if w.mode == Mode::Exclusive {
                    prev
                } else {
                    last_exclusive
                };
                match ahead {
                    Some(ahead) => out.push(edge(ahead.session, Blocker::Waiter(ahead.seq))),
                    None if lock.mode == Mode::Exclusive || w.mode == Mode::Exclusive => {
                        out.extend(
                            lock.holders()
                                .map(|h| edge(h.session, Blocker::Hold(h.token))),
                        );
                    }
                    None => {}
                }
                prev = Some(w);
                if w.mode == Mode::Exclusive {
                    last_exclusive = Some(w);
                }
                if out.len() > limit {
                    out.truncate(limit);
                    return false;
                }
            }
        }
        true
    }

    fn set_capacity(
        &mut self,
        now_ms: u64,
        name: &[u8],
        capacity: u32,
        out: &mut Vec<Effect>,
    ) -> Outcome {
        assert!(capacity > 0);
        let Some(idx) = self.find(name) else {
            return Outcome::NoSuchLock;
        };
        let lock = &mut self.locks[idx as usize];
        if lock.mode != Mode::Permits {
            return Outcome::WrongKind;
        }
        lock.capacity = capacity;
        // Waiters that can never fit end now, in queue order, so none
        // blocks the queue forever.
        let too_heavy: Vec<(SessionId, RequestId)> = lock
            .waiters()
            .filter(|w| w.weight > capacity)
            .map(|w| (w.session, w.request_id))
            .collect();
        for (session, request_id) in too_heavy {
            let removed = self.remove_waiter(now_ms, session, request_id, out);
            assert!(removed, "a waiter listed a moment ago");
            out.push(reply(session, request_id, Outcome::OverCapacity, true));
        }
        // A raised capacity lets waiters in (the lock still has holders).
        self.after_change(now_ms, idx, false, out);
        Outcome::Ok
    }

    fn assert_shard(&self, name: &[u8]) {
        assert_eq!(
            shard_for(name, self.shards),
            self.shard,
            "lock routed to the wrong shard"
        );
    }

    fn signal(
        &mut self,
        name: &[u8],
        signal: &[u8],
        op: SignalOp,
        out: &mut Vec<Effect>,
    ) -> Outcome {
        let Some(idx) = self.find(name) else {
            return Outcome::NoSuchLock;
        };
        let lock = &mut self.locks[idx as usize];
        let present = lock
            .extra
            .as_ref()
            .and_then(|e| e.signals.iter().position(|s| &**s == signal));
        // Holders are told only when the signal goes from unset to set: a
        // signal raised again pushes nothing (it is still queryable).
        let mut newly_set = false;
        let outcome = match (op, present) {
            (SignalOp::Exists, at) => Outcome::Bool(at.is_some()),
            (SignalOp::Delete, Some(at)) => {
                lock.extra_mut().signals.swap_remove(at);
                lock.shrink_extra();
                Outcome::Bool(true)
            }
            (SignalOp::Delete, None) => Outcome::Bool(false),
            (SignalOp::Set { .. }, Some(_)) => Outcome::Bool(true),
            (SignalOp::Set { .. }, None) => {
                let extra = lock.extra_mut();
                if extra.signals.len() >= SIGNALS_PER_LOCK_MAX {
                    return Outcome::TooManySignals;
                }
                extra.signals.push(signal.into());
                newly_set = true;
                Outcome::Bool(true)
            }
        };
        if newly_set && op == (SignalOp::Set { notify: true }) {
            let lock = &self.locks[idx as usize];
            for hold in lock.holders() {
                out.push(Effect::Signal {
                    session: hold.session,
                    name: lock.name.clone(),
                    signal: signal.into(),
                });
            }
        }
        outcome
    }

    /// Puts back a hold from a dump: same session, mode (weight, capacity),
    /// token and grant time. Holds of one name must agree on the mode (and
    /// capacity); a conflicting one is refused (returns false) rather than
    /// breaking mutual exclusion.
    pub fn restore_hold(&mut self, name: &[u8], how: Kind, hold: Hold) -> bool {
        self.assert_shard(name);
        let (mode, capacity) = (how.mode, how.capacity);
        let valid = match mode {
            Mode::Permits => hold.weight > 0 && capacity > 0,
            Mode::Exclusive | Mode::Shared => hold.weight == 1,
        };
        if !valid {
            return false;
        }
        self.raise_token_floor(hold.token);
        let Some(idx) = self.find(name) else {
            let idx = self.insert_lock(name, how, hold);
            self.index_session(hold.session, idx);
            self.restore_lease(hold, idx);
            return true;
        };
        let lock = &mut self.locks[idx as usize];
        let joins = match (lock.mode, mode) {
            (Mode::Shared, Mode::Shared) => true,
            (Mode::Permits, Mode::Permits) => lock.capacity == capacity,
            _ => false,
        };
        if !joins
            || lock
                .holders()
                .any(|h| h.session == hold.session || h.token == hold.token)
        {
            return false;
        }
        lock.add_hold(hold, mode, false);
        let session = hold.session;
        self.index_session(session, idx);
        self.restore_lease(hold, idx);
        true
    }

    fn restore_lease(&mut self, hold: Hold, idx: u32) {
        if hold.lease_deadline_ms != 0 {
            self.lease_timers
                .insert((hold.lease_deadline_ms, hold.token, idx), idx);
        }
    }

    /// Raises a signal on a held lock without notifying (dump reload).
    pub fn restore_signal(&mut self, name: &[u8], signal: &[u8]) -> bool {
        self.assert_shard(name);
        let mut sink = Vec::new();
        self.signal(name, signal, SignalOp::Set { notify: false }, &mut sink) == Outcome::Bool(true)
    }

    fn insert_lock(&mut self, name: &[u8], how: Kind, first: Hold) -> u32 {
        let idx = self.locks.vacant_key() as u32;
        let permits = how.mode == Mode::Permits;
        let lock = Lock {
            name: name.into(),
            mode: how.mode,
            capacity: if permits { how.capacity } else { 0 },
            used: if permits { u64::from(first.weight) } else { 0 },
            first,
            extra: None,
        };
        assert_eq!(self.locks.insert(lock) as u32, idx);
        let hash = self.hasher.hash_one(name);
        let (locks, hasher) = (&self.locks, &self.hasher);
        self.names
            .insert_unique(hash, idx, |&i| hasher.hash_one(&*locks[i as usize].name));
        idx
    }

    /// Every hold of the shard, with its name and how the name is held (dump).
    pub fn holds(&self) -> impl Iterator<Item = (&[u8], Kind, &Hold)> {
        self.locks.iter().flat_map(|(_, lock)| {
            lock.holders()
                .map(move |hold| (&*lock.name, lock.kind(), hold))
        })
    }

    /// Every queued acquire, in queue order per lock, with its name and how
    /// the name is held (dump).
    pub fn waiters(&self) -> impl Iterator<Item = (&[u8], Kind, Queued)> {
        self.locks.iter().flat_map(|(_, lock)| {
            lock.waiters()
                .map(move |w| (&*lock.name, lock.kind(), Queued::from(w)))
        })
    }

    /// The queue of `name`, first in line first (INSPECT).
    pub fn queue_of(&self, name: &[u8]) -> Vec<Queued> {
        self.find(name).map_or_else(Vec::new, |idx| {
            self.locks[idx as usize]
                .waiters()
                .map(Queued::from)
                .collect()
        })
    }

    /// Sets when a restored queued acquire was first queued (a dump keeps
    /// it; requeueing it stamps the restore time). Returns whether it is
    /// queued here.
    pub fn restore_waiter_since(
        &mut self,
        session: SessionId,
        request_id: RequestId,
        since_ms: u64,
    ) -> bool {
        let Some(&idx) = self.waits.get(&(session, request_id)) else {
            return false;
        };
        let waiters = &mut self.locks[idx as usize].extra_mut().waiters;
        let waiter = waiters
            .iter_mut()
            .find(|w| w.session == session && w.request_id == request_id)
            .expect("indexed waits are queued");
        waiter.since_ms = since_ms;
        true
    }

    /// Every raised signal, with its lock's name (dump).
    pub fn signals(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.locks.iter().flat_map(|(_, lock)| {
            lock.extra
                .iter()
                .flat_map(move |e| e.signals.iter().map(move |s| (&*lock.name, &**s)))
        })
    }

    /// Grant time of the oldest hold (ms), if any (metrics; a full scan).
    pub fn oldest_hold_ms(&self) -> Option<u64> {
        self.holds().map(|(_, _, hold)| hold.since_ms).min()
    }

    fn acquire(&mut self, now_ms: u64, a: Acquire<'_>, out: &mut Vec<Effect>) {
        assert!(!a.name.is_empty() && a.name.len() <= crate::limits::NAME_LEN_MAX);
        // The decoders refuse anything else.
        assert!(match a.mode {
            Mode::Permits => a.weight >= 1 && a.weight <= a.capacity,
            Mode::Exclusive | Mode::Shared => a.weight == 1,
        });
        self.usage.record(now_ms, a.name, Seen::Acquire);
        let Some(idx) = self.find(a.name) else {
            self.usage.record(now_ms, a.name, Seen::Grant(0));
            let idx = self.locks.vacant_key() as u32;
            let first = self.new_hold(a.session, now_ms, (a.weight, a.lease_ms), idx);
            let how = Kind {
                mode: a.mode,
                capacity: a.capacity,
            };
            assert_eq!(self.insert_lock(a.name, how, first), idx);
            self.index_session(a.session, idx);
            out.push(reply(
                a.session,
                a.request_id,
                Outcome::Granted { token: first.token },
                false,
            ));
            return;
        };
        let lock = &self.locks[idx as usize];
        if let Some(hold) = lock.hold_of(a.session) {
            let outcome = if a.reentrant && lock.mode == a.mode {
                Outcome::Reentered { token: hold.token }
            } else {
                Outcome::AlreadyHeld
            };
            out.push(reply(a.session, a.request_id, outcome, false));
            return;
        }
        let waiting = self
            .by_session
            .get(&a.session)
            .is_some_and(|set| set.contains(&idx));
        if waiting {
            out.push(reply(a.session, a.request_id, Outcome::AlreadyHeld, false));
            return;
        }
        let refusal = match (lock.mode, a.mode) {
            (Mode::Permits, Mode::Permits) if lock.capacity != a.capacity => {
                Some(Outcome::CapacityConflict)
            }
            (Mode::Permits, Mode::Permits) => None,
            (Mode::Permits, _) | (_, Mode::Permits) => Some(Outcome::WrongKind),
            _ => None,
        };
        if let Some(outcome) = refusal {
            out.push(reply(a.session, a.request_id, outcome, false));
            return;
        }
        if lock.waiter_count() == 0 && lock.admits(false, a.mode, a.weight) {
            self.usage.record(now_ms, a.name, Seen::Grant(0));
            let hold = self.new_hold(a.session, now_ms, (a.weight, a.lease_ms), idx);
            self.locks[idx as usize].add_hold(hold, a.mode, false);
            self.index_session(a.session, idx);
            out.push(reply(
                a.session,
                a.request_id,
                Outcome::Granted { token: hold.token },
                false,
            ));
            return;
        }
        let deadline = match a.wait {
            Wait::Try => {
                self.usage.record(now_ms, a.name, Seen::Busy);
                out.push(reply(a.session, a.request_id, Outcome::Busy, false));
                return;
            }
            Wait::Until(deadline) => Some(deadline),
            Wait::Forever => None,
        };
        if lock.waiter_count() >= WAITERS_PER_LOCK_MAX {
            out.push(reply(
                a.session,
                a.request_id,
                Outcome::TooManyWaiters,
                false,
            ));
            return;
        }
        if self.waits.contains_key(&(a.session, a.request_id)) {
            // The home loop refuses duplicate request ids before they get here.
            panic!(
                "duplicate request id {} of session {:#x}",
                a.request_id, a.session
            );
        }
        let timer = deadline.map(|deadline| {
            let key = (deadline, a.session, a.request_id);
            self.wait_timers.insert(key, (idx, a.session, a.request_id));
            key
        });
        self.locks[idx as usize]
            .extra_mut()
            .waiters
            .push_back(Waiter {
                session: a.session,
                request_id: a.request_id,
                mode: a.mode,
                weight: a.weight,
                lease_ms: a.lease_ms,
                timer,
                since_ms: now_ms,
                seq: {
                    self.last_seq += 1;
                    self.last_seq
                },
            });
        self.waits.insert((a.session, a.request_id), idx);
        self.index_session(a.session, idx);
        if a.notify_queued {
            out.push(reply(a.session, a.request_id, Outcome::Queued, false));
        }
    }

    fn release(
        &mut self,
        now_ms: u64,
        session: SessionId,
        name: &[u8],
        token: u64,
        out: &mut Vec<Effect>,
    ) -> Outcome {
        let Some(idx) = self.find(name) else {
            return Outcome::NotHeld;
        };
        match self.locks[idx as usize].hold_of(session) {
            Some(hold) if token != 0 && hold.token != token => return Outcome::WrongToken,
            _ => {}
        }
        match self.remove_hold(now_ms, idx, session, out) {
            true => Outcome::Ok,
            false => Outcome::NotHeld,
        }
    }

    /// Ends the holds of `name` (all, or the one with `token`), in token
    /// order, each holder told LockLost; the queue moves on.
    fn force_release(
        &mut self,
        now_ms: u64,
        name: &[u8],
        token: u64,
        out: &mut Vec<Effect>,
    ) -> Outcome {
        let Some(idx) = self.find(name) else {
            return Outcome::NotHeld;
        };
        let lock = &self.locks[idx as usize];
        let mut ended: Vec<Hold> = lock
            .holders()
            .filter(|h| token == 0 || h.token == token)
            .copied()
            .collect();
        if ended.is_empty() {
            return Outcome::WrongToken;
        }
        ended.sort_unstable_by_key(|h| h.token);
        let name: Box<[u8]> = lock.name.clone();
        for hold in ended {
            // Found again each time: the last removal may free the slot.
            let idx = self.find(&name).expect("held until its last hold ends");
            let removed = self.remove_hold(now_ms, idx, hold.session, out);
            assert!(removed, "a holder listed a moment ago");
            out.push(Effect::LockLost {
                session: hold.session,
                token: hold.token,
                name: name.clone(),
            });
        }
        Outcome::Ok
    }

    /// Removes the hold of `session` on lock `idx` (if any), then grants
    /// whoever can go next. Returns whether there was a hold.
    fn remove_hold(
        &mut self,
        now_ms: u64,
        idx: u32,
        session: SessionId,
        out: &mut Vec<Effect>,
    ) -> bool {
        let lock = &mut self.locks[idx as usize];
        let Some((hold, empty)) = lock.remove_hold(session) else {
            return false;
        };
        let held = Seen::Held(now_ms.saturating_sub(hold.since_ms));
        self.usage.record(now_ms, &lock.name, held);
        if hold.lease_deadline_ms != 0 {
            self.lease_timers
                .remove(&(hold.lease_deadline_ms, hold.token, idx));
        }
        self.unindex_session(session, idx);
        self.after_change(now_ms, idx, empty, out);
        true
    }

    /// Grants queued waiters that can now go, in FIFO order, or forgets the
    /// lock if nobody holds or wants it. `empty`: the lock has no holder.
    fn after_change(&mut self, now_ms: u64, idx: u32, mut empty: bool, out: &mut Vec<Effect>) {
        loop {
            let lock = &mut self.locks[idx as usize];
            let Some(head) = lock.extra.as_ref().and_then(|e| e.waiters.front()).copied() else {
                break;
            };
            if !lock.admits(empty, head.mode, head.weight) {
                break;
            }
            lock.extra_mut().waiters.pop_front();
            if let Some(key) = head.timer {
                self.wait_timers.remove(&key);
            }
            self.waits.remove(&(head.session, head.request_id));
            let hold = self.new_hold(head.session, now_ms, (head.weight, head.lease_ms), idx);
            let waited = Seen::Grant(now_ms.saturating_sub(head.since_ms));
            self.usage
                .record(now_ms, &self.locks[idx as usize].name, waited);
            self.locks[idx as usize].add_hold(hold, head.mode, empty);
            empty = false;
            out.push(reply(
                head.session,
                head.request_id,
                Outcome::Granted { token: hold.token },
                true,
            ));
        }
        if empty {
            let lock = self.locks.remove(idx as usize);
            debug_assert_eq!(lock.waiter_count(), 0);
            let hash = self.hasher.hash_one(&*lock.name);
            match self.names.find_entry(hash, |&i| i == idx) {
                Ok(entry) => {
                    entry.remove();
                }
                Err(_) => panic!("lock slot {idx} missing from the name index"),
            }
        } else {
            self.locks[idx as usize].shrink_extra();
        }
    }

    fn extend(
        &mut self,
        now_ms: u64,
        session: SessionId,
        name: &[u8],
        lease_ms: u32,
        token: u64,
    ) -> Outcome {
        assert!(lease_ms > 0);
        let Some(idx) = self.find(name) else {
            return Outcome::NotHeld;
        };
        let Some(hold) = self.locks[idx as usize].hold_of_mut(session) else {
            return Outcome::NotHeld;
        };
        if token != 0 && hold.token != token {
            return Outcome::WrongToken;
        }
        if hold.lease_deadline_ms != 0 {
            self.lease_timers
                .remove(&(hold.lease_deadline_ms, hold.token, idx));
        }
        hold.lease_deadline_ms = now_ms + u64::from(lease_ms);
        self.lease_timers
            .insert((hold.lease_deadline_ms, hold.token, idx), idx);
        Outcome::Ok
    }

    /// Takes the queued acquire `request_id` of `session` out of its queue.
    /// Returns whether it was queued.
    fn remove_waiter(
        &mut self,
        now_ms: u64,
        session: SessionId,
        request_id: RequestId,
        out: &mut Vec<Effect>,
    ) -> bool {
        let Some(idx) = self.waits.remove(&(session, request_id)) else {
            return false;
        };
        let lock = &mut self.locks[idx as usize];
        let extra = lock.extra.as_mut().expect("a waiter lives in extra");
        let at = extra
            .waiters
            .iter()
            .position(|w| w.session == session && w.request_id == request_id)
            .expect("indexed waiter is queued");
        let waiter = extra.waiters.remove(at).expect("position is in range");
        if let Some(key) = waiter.timer {
            self.wait_timers.remove(&key);
        }
        self.unindex_session(session, idx);
        // The head may have been the one blocking shared waiters behind it.
        self.after_change(now_ms, idx, false, out);
        true
    }

    fn end_session(&mut self, now_ms: u64, session: SessionId, out: &mut Vec<Effect>) {
        let Some(slots) = self.by_session.remove(&session) else {
            return;
        };
        // In name order, so a replay (simulation seed, the log from a
        // snapshot) gives the same effects and tokens whatever the slots.
        let mut slots: Vec<u32> = slots.into_iter().collect();
        slots.sort_unstable_by(|&a, &b| {
            self.locks[a as usize]
                .name
                .cmp(&self.locks[b as usize].name)
        });
        for idx in slots {
            // The index entry is gone already; remove_waiter tolerates that.
            let lock = &self.locks[idx as usize];
            if lock.hold_of(session).is_some() {
                let lock = &mut self.locks[idx as usize];
                let (hold, empty) = lock.remove_hold(session).expect("hold present");
                let held = Seen::Held(now_ms.saturating_sub(hold.since_ms));
                self.usage.record(now_ms, &lock.name, held);
                if hold.lease_deadline_ms != 0 {
                    self.lease_timers
                        .remove(&(hold.lease_deadline_ms, hold.token, idx));
                }
                self.after_change(now_ms, idx, empty, out);
            } else {
                let request_id = lock
                    .waiters()
                    .find(|w| w.session == session)
                    .expect("session indexed on a lock it neither holds nor waits for")
                    .request_id;
                let removed = self.remove_waiter(now_ms, session, request_id, out);
                assert!(removed);
            }
        }
    }

    /// Fires every deadline at or before `now_ms`: timed-out waits get
    /// `TimedOut`, expired leases end their hold with `LockLost`.
    pub fn tick(&mut self, now_ms: u64, out: &mut Vec<Effect>) {
        // One deadline at a time, earliest first over both timer maps (a wait
        // deadline before a lease one on a tie), so a late tick ends up where
        // ticks at every deadline would have.
        loop {
            let wait = self
                .wait_timers
                .first_key_value()
                .map(|(&key, &value)| (key, value));
            let lease = self
                .lease_timers
                .first_key_value()
                .map(|(&key, &idx)| (key, idx));
            match (wait, lease) {
                (Some(((deadline, _, _), (idx, session, request_id))), lease)
                    if deadline <= now_ms && lease.map_or(true, |((l, _, _), _)| deadline <= l) =>
                {
                    let name = &self.locks[idx as usize].name;
                    self.usage.record(now_ms, name, Seen::TimedOut);
                    let removed = self.remove_waiter(now_ms, session, request_id, out);
                    assert!(removed, "a wait timer outlived its waiter");
                    out.push(reply(session, request_id, Outcome::TimedOut, true));
                }
                (_, Some(((deadline, token, _), idx))) if deadline <= now_ms => {
                    let lock = &self.locks[idx as usize];
                    let hold = *lock
                        .holders()
                        .find(|h| h.token == token)
                        .expect("a lease timer outlived its hold");
                    assert_eq!(hold.lease_deadline_ms, deadline);
                    let name = lock.name.clone();
                    let removed = self.remove_hold(now_ms, idx, hold.session, out);
                    assert!(removed);
                    out.push(Effect::LockLost {
                        session: hold.session,
                        token,
                        name,
                    });
                }
                _ => break,
            }
        }
    }

    /// The `top` names of this shard with the most acquires lately, with
    /// their usage and how many hold and wait for them now.
    pub fn usage_top(&self, now_ms: u64, top: usize) -> Vec<(&[u8], UsageTotal)> {
        self.usage_tagged(now_ms, top, b"")
    }

    /// `usage_top` of the names whose tags match `filter` (empty: all).
    pub fn usage_tagged(&self, now_ms: u64, top: usize, filter: &[u8]) -> Vec<(&[u8], UsageTotal)> {
        self.usage
            .top_tagged(now_ms, top, filter)
            .into_iter()
            .map(|(name, usage)| {
                let (held, waiting) = self.find(name).map_or((0, 0), |idx| {
                    let lock = &self.locks[idx as usize];
                    (lock.holder_count() as u64, lock.waiter_count() as u64)
                });
                let total = UsageTotal {
                    usage,
                    held,
                    waiting,
                };
                (name, total)
            })
            .collect()
    }

    /// Moves with every usage record (a published report is stale).
    pub fn usage_version(&self) -> u64 {
        self.usage.version()
    }

    /// The usage of `name` lately, if it is tracked.
    pub fn usage(&self, name: &[u8]) -> Option<&NameUsage> {
        self.usage.get(name)
    }

    /// The client name a session introduced itself with here.
    pub fn client_name(&self, session: SessionId) -> Option<&[u8]> {
        self.client_names.get(&session).map(|n| &**n)
    }

    /// Who holds `name` and how many wait.
    pub fn inspect(&self, name: &[u8]) -> Option<LockInfo> {
        self.find(name).map(|idx| self.info(idx))
    }

    fn info(&self, idx: u32) -> LockInfo {
        let lock = &self.locks[idx as usize];
        LockInfo {
            name: lock.name.clone(),
            mode: lock.mode,
            capacity: lock.capacity,
            holders: lock.holders().copied().collect(),
            waiters: lock.waiter_count(),
            signals: lock
                .extra
                .as_ref()
                .map_or_else(Vec::new, |e| e.signals.clone()),
        }
    }

    /// Every lock whose name passes `filter`, at most `limit` of them.
    pub fn list(&self, mut filter: impl FnMut(&[u8]) -> bool, limit: usize) -> Vec<LockInfo> {
        let mut found = Vec::new();
        for (idx, lock) in self.locks.iter() {
            if found.len() >= limit {
                break;
            }
            if filter(&lock.name) {
                found.push(self.info(idx as u32));
            }
        }
        found
    }

    /// The `limit` first locks passing `filter` in `order`, and whether more
    /// matched: a whole scan at once (tests; the server scans in slices).
    pub fn list_first(
        &self,
        mut filter: impl FnMut(&[u8]) -> bool,
        limit: usize,
        order: ListOrder,
    ) -> (Vec<LockInfo>, bool) {
        let mut scan = self.start_scan(order, limit);
        let done = self.scan_slice(&mut scan, |name| (filter(name), 0), usize::MAX);
        assert!(done.is_some(), "an unbounded slice finishes the scan");
        self.finish_scan(scan)
    }

    /// Starts a scan of this shard for the `limit` first matching locks in
    /// `order` (FIND, LIST), to be advanced by `scan_slice` between other
    /// commands and ended by `finish_scan`.
    pub fn start_scan(&self, order: ListOrder, limit: usize) -> Scan {
        Scan {
            order,
            limit,
            cursor: 0,
            // Slots at or past this were empty when the scan started: a
            // lock there came later, so the scan may stop before it (and
            // always ends, however many locks are added meanwhile).
            end: self.locks.capacity(),
            best: BinaryHeap::new(),
            cut: false,
        }
    }

    /// Examines the locks from the scan's cursor on until about `budget`
    /// units of work are spent: `SCAN_SLOT_WORK` per slot examined (held or
    /// not) and per match kept, plus what `filter` reports for a name (it
    /// returns whether the name matches and its own work, e.g. glob steps).
    /// At least one slot is examined per call. Returns the work spent once
    /// the scan has passed its last slot, `None` while it has not.
    pub fn scan_slice(
        &self,
        scan: &mut Scan,
        mut filter: impl FnMut(&[u8]) -> (bool, usize),
        budget: usize,
    ) -> Option<usize> {
        let mut spent = 0usize;
        while scan.cursor < scan.end {
            if spent >= budget {
                return None;
            }
            let slot = scan.cursor;
            scan.cursor += 1;
            spent = spent.saturating_add(SCAN_SLOT_WORK);
            let Some(lock) = self.locks.get(slot) else {
                continue;
            };
            let (matched, work) = filter(&lock.name);
            spent = spent.saturating_add(work);
            if !matched {
                continue;
            }
            let since = match scan.order {
                ListOrder::Name => 0,
                ListOrder::OldestGrant => lock.holders().map(|h| h.since_ms).min().unwrap_or(0),
            };
            // Keep the `limit` smallest keys; the largest kept is on top.
            let better = match scan.best.peek() {
                _ if scan.best.len() < scan.limit => true,
                Some((top_since, top_name)) => (since, &*lock.name) < (*top_since, &**top_name),
                None => false,
            };
            if scan.best.len() >= scan.limit {
                scan.cut = true;
            }
            if better {
                spent = spent.saturating_add(SCAN_SLOT_WORK);
                if scan.best.len() >= scan.limit {
                    scan.best.pop();
                }
                scan.best.push((since, lock.name.clone()));
            }
        }
        Some(spent)
    }

    /// The locks a finished scan picked, in its order, as they are now (a
    /// pick released since is left out), and whether more matched than its
    /// limit. Every lock that matched and was held from `start_scan` to the
    /// end of the scan is either listed or ranks after `limit` others that
    /// matched (then the answer says more matched); a lock acquired or
    /// released meanwhile may or may not be listed.
    pub fn finish_scan(&self, scan: Scan) -> (Vec<LockInfo>, bool) {
        assert!(scan.cursor >= scan.end, "finish_scan of an unfinished scan");
        let infos = scan
            .best
            .into_sorted_vec()
            .into_iter()
            .filter_map(|(_, name)| self.find(&name))
            .map(|idx| self.info(idx))
            .collect();
        (infos, scan.cut)
    }

    /// Checks every invariant of the table (tests and simulation).
    pub fn check_invariants(&self) {
        let mut indexed = 0;
        for (idx, lock) in self.locks.iter() {
            let idx = idx as u32;
            assert_eq!(self.find(&lock.name), Some(idx));
            assert_eq!(shard_for(&lock.name, self.shards), self.shard);
            if lock.mode == Mode::Exclusive {
                assert_eq!(
                    lock.holder_count(),
                    1,
                    "exclusive lock with several holders"
                );
            }
            let mut sessions: Vec<SessionId> = lock.holders().map(|h| h.session).collect();
            sessions.extend(lock.waiters().map(|w| w.session));
            let len = sessions.len();
            sessions.sort_unstable();
            sessions.dedup();
            assert_eq!(sessions.len(), len, "a session twice on one lock");
            for session in &sessions {
                assert!(self.by_session[session].contains(&idx));
            }
            indexed += len;
            for hold in lock.holders() {
                assert!(hold.token <= self.last_token);
                if hold.lease_deadline_ms != 0 {
                    assert_eq!(
                        self.lease_timers
                            .get(&(hold.lease_deadline_ms, hold.token, idx)),
                        Some(&idx)
                    );
                }
            }
            if let Some(head) = lock.waiters().next() {
                // A waiter at the head must be blocked by the holders.
                assert!(
                    !lock.admits(false, head.mode, head.weight),
                    "a waiter at the head that the holders admit"
                );
            }
            let permits = lock.mode == Mode::Permits;
            assert_eq!(permits, lock.capacity > 0, "capacity of a lock");
            if permits {
                let used: u64 = lock.holders().map(|h| u64::from(h.weight)).sum();
                assert_eq!(lock.used, used, "permits out miscounted");
                assert!(lock.holders().all(|h| h.weight >= 1));
                for waiter in lock.waiters() {
                    assert_eq!(waiter.mode, Mode::Permits, "a lock waits on a semaphore");
                    assert!(waiter.weight >= 1 && waiter.weight <= lock.capacity);
                }
            } else {
                assert!(lock.holders().all(|h| h.weight == 1));
                assert!(lock
                    .waiters()
                    .all(|w| w.mode != Mode::Permits && w.weight == 1));
            }
            for waiter in lock.waiters() {
                assert_eq!(
                    self.waits.get(&(waiter.session, waiter.request_id)),
                    Some(&idx)
                );
                if let Some(key) = waiter.timer {
                    assert_eq!(
                        self.wait_timers[&key],
                        (idx, waiter.session, waiter.request_id)
                    );
                }
            }
        }
        assert_eq!(
            self.by_session.values().map(|s| s.len()).sum::<usize>(),
            indexed
        );
        assert_eq!(self.names.len(), self.locks.len());
        let timed_waits = self
            .locks
            .iter()
            .flat_map(|(_, l)| l.waiters())
            .filter(|w| w.timer.is_some())
            .count();
        assert_eq!(self.wait_timers.len(), timed_waits);
        let leases = self
            .locks
            .iter()
            .flat_map(|(_, l)| l.holders())
            .filter(|h| h.lease_deadline_ms != 0)
            .count();
        assert_eq!(self.lease_timers.len(), leases);
    }
}

fn reply(session: SessionId, request_id: RequestId, outcome: Outcome, deferred: bool) -> Effect {
    Effect::Reply {
        session,
        request_id,
        outcome,
        deferred,
    }
}
