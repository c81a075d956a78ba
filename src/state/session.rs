//! Sessions of one home loop: who is connected, what each has in flight, and
//! the grace deadlines of detached sessions.
//!
//! A session lives on exactly one loop, its home: the low bits of its id
//! modulo the loop count (`home_of`). A loop makes ids whose low bits are
//! its own index; an id restored on a server with fewer loops still has a
//! home, so a session id names no particular thread. Every reply and push for a session is routed to
//! its home, which writes it to the session's connection, or parks it while
//! the session is detached so that a RESUME gets it. The home remembers which
//! shards a session touched, so ending it tells only those.

use std::collections::{BTreeMap, BTreeSet};

use hashbrown::HashMap;
use mio::Token;

use crate::connection::ConnRef;
use crate::limits::SECRET_LEN;
use crate::lock_table::{Effect, Mode, Outcome, RequestId, SessionId};
use crate::multi::{self, Failure, Multi, Step};
use crate::order::Order;

/// A lock name kept by the home (pending requests, holds): inline up to 32
/// bytes, so the common short name costs no allocation per request.
pub type LockName = smallvec::SmallVec<[u8; 32]>;

/// Bits of a session id that name its home loop.
const HOME_BITS: u32 = 8;
const _: () = assert!(crate::limits::THREADS_MAX <= 1 << HOME_BITS);

/// The loop that owns `session` on a server with `loops` loops.
pub fn home_of(session: SessionId, loops: usize) -> usize {
    (session & ((1 << HOME_BITS) - 1)) as usize % loops
}

/// What a pending request was, to shape its reply and keep `holds` right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingOp {
    /// A native request with this opcode.
    Native(u8),
    /// A LiveLock-protocol command.
    Resp(RespOp),
}

/// LiveLock-protocol commands that go to a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RespOp {
    Aq,
    Aqr,
    Release,
    Locked,
    SigSet,
    SigExists,
    SigDel,
}

impl PendingOp {
    /// An acquire (either protocol): its name is held or waited for.
    pub fn is_acquire(self) -> bool {
        match self {
            PendingOp::Native(op) => crate::protocol::is_acquire(op),
            PendingOp::Resp(op) => matches!(op, RespOp::Aq | RespOp::Aqr),
        }
    }

    pub fn is_release(self) -> bool {
        matches!(
            self,
            PendingOp::Native(crate::protocol::opcode::RELEASE) | PendingOp::Resp(RespOp::Release)
        )
    }
}

/// A request of the session that awaits its final reply from a shard.
#[derive(Debug, Clone)]
pub struct Pending {
    pub shard: u8,
    pub op: PendingOp,
    /// ACQUIRE and RELEASE (both protocols): the lock, so that the home
    /// keeps `Session::holds` from the outcome; empty for other requests.
    pub name: LockName,
    /// ACQUIRE: the mode asked for.
    pub mode: Mode,
    /// ACQUIRE: the client asked for an interim QUEUED reply. (The shard
    /// always says when an acquire queues; the home forwards it only then.)
    pub notify_queued: bool,
    /// ACQUIRE: it waits in a queue, so its reply may take forever; a
    /// half-closed connection does not wait for it.
    pub queued: bool,
    /// The connection that sent it (LiveLock replies go back on it, in
    /// order, if it is still the same connection).
    pub conn: ConnRef,
    /// When it was accepted: µs since server start, as of the loop turn
    /// (latency metrics).
    pub started_us: u64,
    /// ACQUIRE_ALL: its progress (`shard` and `name` are then those of
    /// the acquire in flight).
    pub multi: Option<Box<Multi>>,
}

#[derive(Debug)]
pub struct Session {
    pub id: SessionId,
    pub secret: [u8; SECRET_LEN],
    /// How long the session survives without a connection.
    pub grace_ms: u32,
    pub client_name: Box<[u8]>,
    /// LiveLock client id (CONN): the session speaks that protocol, and
    /// `conn` is the id's latest connection (others may share the id).
    pub client_id: Option<Box<[u8]>>,
    /// The connection it is attached to, if any.
    pub conn: Option<Token>,
    /// When a detached session ends (valid while `conn` is None).
    pub detached_until_ms: u64,
    /// Requests sent to shards and not yet answered, by request id.
    pub pending: HashMap<RequestId, Pending>,
    /// Bit i: the session sent something to shard i.
    pub touched: u64,
    /// The locks the session holds, as the home learns them from the
    /// grants, releases and losses it delivers (the shards have the
    /// authoritative copy): what a RESUME lists.
    pub holds: HashMap<LockName, Held>,
    /// Counts the session's attachments (HELLO, each RESUME); a hold
    /// records the one it was granted under.
    pub attach_gen: u64,
    /// A RESUME's listing of the holds, while it is being written.
    pub replay: Option<Replay>,
    /// Replies and signal pushes produced while detached, delivered on
    /// RESUME. Bounded: at most one final reply per request in flight,
    /// plus PARKED_PUSHES_MAX bytes of signals. (A lock lost meanwhile is
    /// not parked: the RESUME's listing of holds no longer has it.)
    pub parked: Vec<u8>,
    /// The order its acquires must keep (SET_ORDER), if it declared one.
    pub order: Option<Order>,
    /// With an order: the names it holds by rank (the last is the one a
    /// new acquire must rank after).
    ranked: BTreeSet<(u32, LockName)>,
    /// The names of its ACQUIRE_ALLs in flight, and which request takes
    /// each (admission looks names up here, not through every request).
    multi_names: HashMap<LockName, RequestId>,
    /// How many ACQUIRE_ALLs are in flight.
    multis: usize,
}

/// What an effect means for its session once the home has recorded it
/// (`Session::record`): what, if anything, the client is to be told.
#[derive(Debug)]
pub enum Delivery {
    /// An acquire waits; the client is told (QUEUED, with the acquire's
    /// opcode `notify`) if it asked.
    Queued { notify: Option<u8> },
    /// The final reply to this request (no longer pending; its name went
    /// into the holds if it was granted).
    Final(Answered),
    /// A hold was lost; pushed (LOCK_LOST) only if `push`: not while
    /// detached (the RESUME's listing no longer has it), nor while a
    /// listing is being written that has not reached it (it never will).
    Lost { push: bool },
    /// A signal raised on a lock the session holds; not pushed (`push`
    /// false) for a part of an ACQUIRE_ALL in flight (not the client's).
    Signal { push: bool },
    /// An ACQUIRE_ALL (this request) goes on: the home does this step next.
    MultiStep(RequestId, Step),
    /// The final reply to an ACQUIRE_ALL or ACQUIRE_POOL: granted (the
    /// reply's body; what it took went into the holds), or its failure
    /// (nothing of it is held).
    MultiFinal(Answered, Result<Vec<u8>, Failure>),
}

/// Why a session cannot take a request now (`Session::refusal`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The request id is still in flight.
    DuplicateRequestId,
    /// IN_FLIGHT_PER_SESSION_MAX requests are in flight.
    TooManyInFlight,
    /// QUERIES_IN_FLIGHT_MAX INSPECT/LIST/STATS are being answered.
    TooManyQueries,
    /// An acquire past HOLDS_PER_SESSION_MAX holds and pending requests.
    TooManyHolds,
    /// An acquire that does not rank after every name the session holds
    /// or waits for, in the order it declared: that name.
    OrderViolation(LockName),
    /// An ACQUIRE_ALL of a name the session holds or waits for, or an
    /// acquire of a name an ACQUIRE_ALL of the session is taking: that name.
    AlreadyHeld(LockName),
    /// A RELEASE or EXTEND of a name an ACQUIRE_ALL of the session is
    /// taking: not the client's to touch until it is granted.
    NotHeld,
}

/// What a request asks of its session, for admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask<'a> {
    /// An acquire of this name.
    Acquire(&'a [u8]),
    /// An ACQUIRE_ALL or ACQUIRE_POOL.
    AcquireAll(multi::Request<'a>),
    /// A RELEASE or EXTEND of the session's hold of this name.
    Held(&'a [u8]),
    /// INSPECT, LIST, STATS: answered by a gather, not a shard.
    Query,
    Other,
}

impl<'a> Ask<'a> {
    /// How many names it takes.
    fn takes(self) -> usize {
        match self {
            Ask::Acquire(_) => 1,
            Ask::AcquireAll(asked) => asked.names().count(),
            Ask::Held(_) | Ask::Query | Ask::Other => 0,
        }
    }

    /// The name it takes first (an ACQUIRE_ALL: in byte order; a pool:
    /// its first candidate in byte order), if it takes any.
    fn first(self) -> Option<&'a [u8]> {
        match self {
            Ask::Acquire(name) => Some(name),
            Ask::AcquireAll(asked) => asked.names().min(),
            Ask::Held(_) | Ask::Query | Ask::Other => None,
        }
    }
}

impl Session {
    /// The next step of the RESUME's listing of holds, if one is under way.
    pub fn next_listed(&mut self) -> Option<Listed> {
        let replay = self.replay.as_mut()?;
        let Some(name) = replay.names.get(replay.next) else {
            self.replay = None;
            return Some(Listed::End);
        };
        replay.next += 1;
        Some(match self.holds.get(&**name) {
            Some(held) if held.gen < replay.before_gen => Listed::Held(name.clone(), *held),
            _ => Listed::Gone,
        })
    }

    /// The admission rule of a session's requests, in one place: why
    /// `request_id` (asking `ask`) cannot be taken now, if it cannot.
    /// `queries` is how many INSPECT/LIST/STATS of the session are being
    /// answered and whether one of them uses `request_id` (the loop keeps
    /// those; a request id is in flight until its final reply either way).
    pub fn refusal(
        &self,
        request_id: RequestId,
        ask: Ask<'_>,
        queries: (usize, bool),
    ) -> Option<Refusal> {
        use crate::limits::{
            HOLDS_PER_SESSION_MAX, IN_FLIGHT_PER_SESSION_MAX, QUERIES_IN_FLIGHT_MAX,
        };
        let (queries_in_flight, query_uses_id) = queries;
        if query_uses_id || self.pending.contains_key(&request_id) {
            Some(Refusal::DuplicateRequestId)
        } else if self.pending.len() >= IN_FLIGHT_PER_SESSION_MAX {
            Some(Refusal::TooManyInFlight)
        } else if ask == Ask::Query && queries_in_flight >= QUERIES_IN_FLIGHT_MAX {
            Some(Refusal::TooManyQueries)
        } else if ask.takes() > 0
            && self.holds.len() + self.pending.len() - self.multis
                + self.multi_names.len()
                + ask.takes()
                > HOLDS_PER_SESSION_MAX
        {
            Some(Refusal::TooManyHolds)
        } else if let Some(name) = self.taken_twice(ask) {
            match ask {
                Ask::Held(_) => Some(Refusal::NotHeld),
                _ => Some(Refusal::AlreadyHeld(name)),
            }
        } else if let (Some(order), Some(first)) = (&self.order, ask.first()) {
            // A multi-lock takes its names in byte order: that must be its
            // order's (then its first name is also its lowest-ranked).
            match ask {
                Ask::AcquireAll(multi::Request::All(names)) => {
                    if let Some(against) = Multi::out_of_order(names, order) {
                        return Some(Refusal::OrderViolation(LockName::from_slice(against)));
                    }
                }
                // Which candidates a pool takes is not known in advance:
                // an ordered session takes no pool.
                Ask::AcquireAll(multi::Request::Pool(_)) => {
                    return Some(Refusal::OrderViolation(LockName::from_slice(first)));
                }
                _ => {}
            }
            // One acquire at a time: one still in flight could be granted
            // after this one, and the session would then wait downward.
            if let Some(pending) = self.pending.values().find(|p| p.op.is_acquire()) {
                return Some(Refusal::OrderViolation(pending.name.clone()));
            }
            // Everything held must rank before the name (the name itself
            // is left to the shard: AlreadyHeld).
            let top = self.ranked.last()?;
            (order.rank(&top.1) > order.rank(first)).then(|| Refusal::OrderViolation(top.1.clone()))
        } else {
            None
        }
    }

    /// A name `ask` would take that the session may not take twice: for an
    /// ACQUIRE_ALL, one it holds or has an acquire in flight for; for any
    /// acquire, one an ACQUIRE_ALL in flight is taking (its holds of its
    /// names are its own: a failure gives back exactly those).
    fn taken_twice(&self, ask: Ask<'_>) -> Option<LockName> {
        let taken_by_multi = |name: &[u8]| self.multis > 0 && self.multi_names.contains_key(name);
        match ask {
            Ask::Acquire(name) | Ask::Held(name) => {
                taken_by_multi(name).then(|| LockName::from_slice(name))
            }
            Ask::AcquireAll(asked) => {
                if let Some(name) = asked
                    .names()
                    .find(|n| self.holds.contains_key(*n) || taken_by_multi(n))
                {
                    return Some(LockName::from_slice(name));
                }
                // A pool whose queue's permits the session holds still (an
                // earlier grant of the same set, its resources released).
                if let Some(queue) = asked
                    .queues()
                    .into_iter()
                    .find(|q| self.holds.contains_key(&**q) || taken_by_multi(q))
                {
                    return Some(queue);
                }
                // One pass over the acquires in flight (at most
                // IN_FLIGHT_PER_SESSION_MAX), each looked up among its names.
                let asked: hashbrown::HashSet<&[u8]> = asked.names().collect();
                self.pending
                    .values()
                    .find(|p| p.op.is_acquire() && p.multi.is_none() && asked.contains(&*p.name))
                    .map(|p| p.name.clone())
            }
            Ask::Query | Ask::Other => None,
        }
    }

    /// Declares the order the session's acquires keep from now on (`None`:
    /// none). Refused (false) while it holds or waits for anything: an
    /// order is declared before the locks it orders are taken.
    pub fn set_order(&mut self, order: Option<Order>) -> bool {
        if !self.holds.is_empty() || self.pending.values().any(|p| p.op.is_acquire()) {
            return false;
        }
        self.order = order;
        true
    }

    /// The session now holds `name` (a grant, or a hold restored).
    pub fn hold_granted(&mut self, name: LockName, held: Held) {
        if let Some(order) = &self.order {
            self.ranked.insert((order.rank(&name).0, name.clone()));
        }
        self.holds.insert(name, held);
    }

    /// The session no longer holds `name`.
    fn hold_ended(&mut self, name: &[u8]) -> Option<Held> {
        if let Some(order) = &self.order {
            self.ranked
                .remove(&(order.rank(name).0, LockName::from_slice(name)));
        }
        self.holds.remove(name)
    }

    /// Records `effect`: answers a pending request, keeps the holds from
    /// grants, releases and losses. The home's whole bookkeeping of an
    /// effect, with no I/O; the event loop writes what it returns, and the
    /// simulation drives it directly.
    ///
    /// # Panics
    /// On a reply to a request that is not pending (two final replies, or
    /// one nobody asked for): a broken invariant of the shards.
    pub fn record(&mut self, effect: &Effect) -> Delivery {
        if let Some(delivery) = self.record_multi(effect) {
            return delivery;
        }
        match *effect {
            Effect::Reply {
                request_id,
                outcome: Outcome::Queued,
                ..
            } => {
                let pending = self
                    .pending
                    .get_mut(&request_id)
                    .expect("an interim reply answers a pending request");
                pending.queued = true;
                let notify = match pending.op {
                    PendingOp::Native(op) if pending.notify_queued => Some(op),
                    _ => None,
                };
                // An ACQUIRE_ALL says QUEUED once, when it first waits.
                if pending.multi.is_some() {
                    pending.notify_queued = false;
                }
                Delivery::Queued { notify }
            }
            Effect::Reply {
                request_id,
                outcome,
                ..
            } => self.answer(request_id, outcome),
            // A failed wait: a final reply that changes no hold.
            Effect::Deadlock { request_id, .. } => self.answer(request_id, Outcome::Cancelled),
            Effect::LockLost {
                token, ref name, ..
            } => {
                // A part of a multi-lock in flight: the request fails, and
                // the client, never told of the part, is not told of this.
                let part = (self.multis > 0)
                    .then(|| {
                        self.pending.iter_mut().find_map(|(&id, p)| {
                            let multi = p.multi.as_deref_mut()?;
                            multi.on_lost(name, token).then_some(id)
                        })
                    })
                    .flatten();
                if let Some(request_id) = part {
                    return Delivery::MultiStep(request_id, Step::Abort);
                }
                let lost = match self.holds.get(&**name) {
                    Some(held) if held.token == token => self.hold_ended(name),
                    _ => None,
                };
                // Silent only for a hold the listing would have listed (granted
                // before the RESUME) and has not reached yet; a hold granted
                // since was announced by its reply, so its loss is pushed.
                let unlisted = self.replay.as_ref().is_some_and(|r| {
                    r.unlisted(name) && lost.is_some_and(|h| h.gen < r.before_gen)
                });
                Delivery::Lost {
                    push: self.conn.is_some() && !unlisted,
                }
            }
            Effect::Signal { ref name, .. } => Delivery::Signal {
                push: !self.multi_names.contains_key(&**name),
            },
        }
    }

    /// Takes in an admitted ACQUIRE_ALL (`pending.multi` is its progress).
    pub fn begin_multi(&mut self, request_id: RequestId, pending: Pending) {
        let multi = pending.multi.as_deref().expect("an ACQUIRE_ALL");
        for name in multi.names() {
            self.multi_names.insert(name.clone(), request_id);
        }
        self.multis += 1;
        let previous = self.pending.insert(request_id, pending);
        assert!(previous.is_none(), "request {request_id} admitted twice");
    }

    /// A CANCEL of `request_id`: `None` if it is not an ACQUIRE_ALL in
    /// flight; else whether the acquire in flight is to be ended
    /// (`Step::Abort`; false: it is already giving back).
    pub fn cancel_multi(&mut self, request_id: RequestId) -> Option<bool> {
        let multi = self.pending.get_mut(&request_id)?.multi.as_deref_mut()?;
        Some(multi.cancel())
    }

    /// An effect answering a step of an ACQUIRE_ALL (`None`: it does not),
    /// and what comes of it.
    fn record_multi(&mut self, effect: &Effect) -> Option<Delivery> {
        if self.multis == 0 {
            return None; // the usual case: no lookup on the reply's path
        }
        let (request_id, step) = match effect {
            Effect::Reply {
                request_id,
                outcome,
                ..
            } => {
                let multi = self.pending.get_mut(request_id)?.multi.as_mut()?;
                match outcome {
                    Outcome::Queued => return None,
                    outcome => (*request_id, multi.on_outcome(*outcome)),
                }
            }
            Effect::Deadlock {
                request_id, cycle, ..
            } => {
                let multi = self.pending.get_mut(request_id)?.multi.as_mut()?;
                (*request_id, multi.on_deadlock(cycle.to_vec()))
            }
            Effect::LockLost { .. } | Effect::Signal { .. } => return None,
        };
        let result = match step {
            Step::Granted(body) => Ok(body),
            Step::Failed(failure) => Err(failure),
            step => return Some(Delivery::MultiStep(request_id, step)),
        };
        let pending = self.pending.remove(&request_id).expect("found above");
        let multi = pending.multi.as_ref().expect("found above");
        for name in multi.names() {
            self.multi_names.remove(name);
        }
        self.multis -= 1;
        if result.is_ok() {
            let taken: Vec<(LockName, Held)> = multi
                .taken()
                .map(|(name, mode, token)| {
                    let held = Held {
                        mode,
                        token,
                        gen: self.attach_gen,
                    };
                    (name.clone(), held)
                })
                .collect();
            for (name, held) in taken {
                self.hold_granted(name, held);
            }
        }
        let answered = Answered {
            op: pending.op,
            conn: pending.conn,
            started_us: pending.started_us,
            queued: pending.queued,
        };
        Some(Delivery::MultiFinal(answered, result))
    }

    /// The final reply `outcome` to `request_id`: no longer pending; a
    /// grant goes into the holds, a release takes its hold out.
    fn answer(&mut self, request_id: RequestId, outcome: Outcome) -> Delivery {
        let pending = self
            .pending
            .remove(&request_id)
            .expect("a final reply answers a pending request");
        let answered = Answered {
            op: pending.op,
            conn: pending.conn,
            started_us: pending.started_us,
            queued: pending.queued,
        };
        match outcome {
            Outcome::Granted { token } => {
                let held = Held {
                    mode: pending.mode,
                    token,
                    gen: self.attach_gen,
                };
                self.hold_granted(pending.name, held);
            }
            Outcome::Ok if pending.op.is_release() => {
                self.hold_ended(&pending.name);
            }
            _ => {}
        }
        Delivery::Final(answered)
    }
}

/// What the home still needs of a request once it is answered.
#[derive(Debug, Clone, Copy)]
pub struct Answered {
    pub op: PendingOp,
    pub conn: ConnRef,
    pub started_us: u64,
    /// It waited in a queue before this answer (metrics: waiting, not service).
    pub queued: bool,
}

/// A lock the session holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub mode: Mode,
    pub token: u64,
    /// `Session::attach_gen` when it was granted.
    pub gen: u64,
}

/// The listing of a session's holds after a RESUME, written a piece at a
/// time as the connection drains (HELD pushes, then HELD_END), so that a
/// session with many holds cannot overflow the write buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// Holds granted under an earlier attachment are listed; later grants
    /// were answered on this connection already.
    pub before_gen: u64,
    /// The names the session held at the RESUME, in order (a copy: the
    /// holds change while the listing is written).
    pub names: Vec<LockName>,
    /// How many of `names` are listed (or skipped: released meanwhile).
    pub next: usize,
}

/// The next step of a RESUME's listing (`Session::next_listed`).
#[derive(Debug, PartialEq, Eq)]
pub enum Listed {
    /// A lock the session holds: one HELD push.
    Held(LockName, Held),
    /// A name of the listing no longer held (or re-granted since the
    /// RESUME, whose reply the client got): nothing to write.
    Gone,
    /// The listing is complete: HELD_END.
    End,
}

/// What a RESUME gives the new connection (`Sessions::resume`); the
/// listing of holds is left in `Session::replay`.
#[derive(Debug)]
pub struct Resumption {
    /// The connection the session was attached to (taken over), if any.
    pub previous: Option<Token>,
    pub grace_ms: u32,
    /// Ids of the requests still in flight, in order.
    pub in_flight: Vec<RequestId>,
    /// Replies and signals parked while detached.
    pub parked: Vec<u8>,
}

impl Replay {
    /// The listing of `session`'s holds as of now (just attached).
    pub fn of(session: &Session) -> Replay {
        let mut names: Vec<LockName> = session.holds.keys().cloned().collect();
        names.sort_unstable();
        Replay {
            before_gen: session.attach_gen,
            names,
            next: 0,
        }
    }

    /// Whether `name` is a hold the listing has yet to reach (then, if it
    /// is lost, it is simply not listed, and nothing is pushed).
    pub fn unlisted(&self, name: &[u8]) -> bool {
        match self.names.binary_search_by(|n| (**n).cmp(name)) {
            Ok(at) => at >= self.next,
            Err(_) => false, // granted since the RESUME: its reply was sent
        }
    }
}

/// The sessions whose home is this loop.
pub struct Sessions {
    home: usize,
    loops: usize,
    next_seq: u64,
    map: HashMap<SessionId, Session>,
    /// LiveLock client id → session.
    by_client: HashMap<Box<[u8]>, SessionId>,
    /// (deadline, id) of every detached session.
    grace_timers: BTreeMap<(u64, SessionId), ()>,
}

impl Sessions {
    pub fn new(home: usize, loops: usize) -> Sessions {
        assert!(home < loops);
        Sessions {
            home,
            loops,
            next_seq: 0,
            map: HashMap::new(),
            by_client: HashMap::new(),
            grace_timers: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Opens a session attached to `conn`.
    pub fn create(
        &mut self,
        secret: [u8; SECRET_LEN],
        grace_ms: u32,
        client_name: &[u8],
        conn: Token,
    ) -> &mut Session {
        let id = self.fresh_id();
        self.insert(id, secret, grace_ms, client_name, None, Some(conn))
    }

    /// A new session id homed here (for a new session, or one restored from
    /// a dump whose old id named another loop).
    pub fn fresh_id(&mut self) -> SessionId {
        // A restored id may have pushed next_seq to the top of its range:
        // wrap within the range and skip ids still in use, never reuse one.
        const SEQ_MASK: u64 = u64::MAX >> HOME_BITS;
        loop {
            self.next_seq = self.next_seq.wrapping_add(1) & SEQ_MASK;
            let id = (self.next_seq << HOME_BITS) | self.home as u64;
            if self.next_seq != 0 && !self.map.contains_key(&id) {
                return id;
            }
        }
    }

    /// Opens a LiveLock-protocol session for `client_id`, attached to `conn`.
    pub fn create_client(&mut self, client_id: &[u8], grace_ms: u32, conn: Token) -> &mut Session {
        let id = self.fresh_id();
        self.by_client.insert(client_id.into(), id);
        self.insert(
            id,
            random_secret(),
            grace_ms,
            b"",
            Some(client_id),
            Some(conn),
        )
    }

    /// Puts back a session from a dump, detached until `until_ms`.
    pub fn restore(
        &mut self,
        id: SessionId,
        secret: [u8; SECRET_LEN],
        grace_ms: u32,
        client_name: &[u8],
        client_id: Option<&[u8]>,
        until_ms: u64,
    ) -> &mut Session {
        assert_eq!(home_of(id, self.loops), self.home);
        self.next_seq = self.next_seq.max(id >> HOME_BITS);
        if let Some(client_id) = client_id {
            self.by_client.insert(client_id.into(), id);
        }
        self.grace_timers.insert((until_ms, id), ());
        let session = self.insert(id, secret, grace_ms, client_name, client_id, None);
        session.detached_until_ms = until_ms;
        session
    }

    fn insert(
        &mut self,
        id: SessionId,
        secret: [u8; SECRET_LEN],
        grace_ms: u32,
        client_name: &[u8],
        client_id: Option<&[u8]>,
        conn: Option<Token>,
    ) -> &mut Session {
        assert_eq!(home_of(id, self.loops), self.home);
        let session = Session {
            id,
            secret,
            grace_ms,
            client_name: client_name.into(),
            client_id: client_id.map(Into::into),
            conn,
            detached_until_ms: 0,
            pending: HashMap::new(),
            touched: 0,
            holds: HashMap::new(),
            attach_gen: 1,
            replay: None,
            parked: Vec::new(),
            order: None,
            ranked: BTreeSet::new(),
            multi_names: HashMap::new(),
            multis: 0,
        };
        let previous = self.map.insert(id, session);
        assert!(previous.is_none(), "session id {id:#x} reused");
        self.map.get_mut(&id).expect("just inserted")
    }

    /// The session of a LiveLock client id.
    pub fn by_client(&self, client_id: &[u8]) -> Option<SessionId> {
        self.by_client.get(client_id).copied()
    }

    fn forget(&mut self, session: &Session) {
        if let Some(client_id) = &session.client_id {
            // Only if the id still names this session.
            if self.by_client.get(client_id) == Some(&session.id) {
                self.by_client.remove(client_id);
            }
        }
    }

    pub fn get(&self, id: SessionId) -> Option<&Session> {
        self.map.get(&id)
    }

    pub fn get_mut(&mut self, id: SessionId) -> Option<&mut Session> {
        self.map.get_mut(&id)
    }

    /// The connection of `id` is gone. Returns the session if it must end now
    /// (no grace); otherwise it waits, detached, until its grace runs out.
    pub fn detach(&mut self, id: SessionId, now_ms: u64) -> Option<Session> {
        let session = self.map.get_mut(&id)?;
        session.conn = None;
        if session.grace_ms == 0 {
            let session = self.map.remove(&id)?;
            self.forget(&session);
            return Some(session);
        }
        session.detached_until_ms = now_ms + u64::from(session.grace_ms);
        self.grace_timers
            .insert((session.detached_until_ms, id), ());
        None
    }

    /// RESUME(id, secret) on `conn`: attaches the session (taking it over
    /// from another connection if need be) and starts the listing of its
    /// holds. None if there is no such native session (ended, or a wrong
    /// secret; LiveLock sessions are reached by CONN only).
    pub fn resume(
        &mut self,
        id: SessionId,
        secret: &[u8; SECRET_LEN],
        conn: Token,
    ) -> Option<Resumption> {
        let known = self
            .get(id)
            .is_some_and(|s| s.client_id.is_none() && secure_eq(&s.secret, secret));
        if !known {
            return None;
        }
        let previous = self.attach(id, conn);
        let session = self.get_mut(id).expect("attached above");
        let mut in_flight: Vec<RequestId> = session.pending.keys().copied().collect();
        in_flight.sort_unstable();
        session.replay = Some(Replay::of(session));
        Some(Resumption {
            previous,
            grace_ms: session.grace_ms,
            in_flight,
            parked: std::mem::take(&mut session.parked),
        })
    }

    /// Attaches a detached (or attached elsewhere) session to `conn`; returns
    /// the connection it was attached to before, if any.
    pub fn attach(&mut self, id: SessionId, conn: Token) -> Option<Token> {
        let session = self.map.get_mut(&id)?;
        if session.conn.is_none() {
            self.grace_timers.remove(&(session.detached_until_ms, id));
        }
        session.attach_gen += 1;
        session.conn.replace(conn)
    }

    pub fn remove(&mut self, id: SessionId) -> Option<Session> {
        let session = self.map.remove(&id)?;
        if session.conn.is_none() {
            self.grace_timers.remove(&(session.detached_until_ms, id));
        }
        self.forget(&session);
        Some(session)
    }

    /// Removes and returns every detached session whose grace is over.
    pub fn expire(&mut self, now_ms: u64, ended: &mut Vec<Session>) {
        while let Some((&(deadline, id), _)) = self.grace_timers.first_key_value() {
            if deadline > now_ms {
                break;
            }
            self.grace_timers.remove(&(deadline, id));
            let session = self.map.remove(&id).expect("grace timer of a live session");
            assert!(session.conn.is_none());
            self.forget(&session);
            ended.push(session);
        }
    }

    pub fn next_deadline(&self) -> Option<u64> {
        self.grace_timers.keys().next().map(|k| k.0)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Session> {
        self.map.values()
    }

    /// Sessions attached to a connection, and detached ones.
    pub fn counts(&self) -> (usize, usize) {
        let detached = self.grace_timers.len();
        (self.map.len() - detached, detached)
    }
}

/// A fresh random session secret (RESUME must present it).
pub fn random_secret() -> [u8; SECRET_LEN] {
    let mut secret = [0u8; SECRET_LEN];
    getrandom::getrandom(&mut secret).expect("the OS random source works");
    secret
}

/// Constant-time equality, so a wrong password or secret reveals nothing
/// about how much of it was right.
pub fn secure_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_home() {
        let mut sessions = Sessions::new(5, 8);
        let a = sessions.create([1; SECRET_LEN], 0, b"a", Token(1)).id;
        let b = sessions.create([2; SECRET_LEN], 0, b"b", Token(2)).id;
        assert_ne!(a, b);
        assert_eq!(home_of(a, 8), 5);
        assert_eq!(home_of(b, 8), 5);
        // With fewer loops the same id still has a home.
        assert_eq!(home_of(a, 3), 2);
    }

    #[test]
    fn detach_without_grace_ends_at_once() {
        let mut sessions = Sessions::new(0, 1);
        let id = sessions.create([0; SECRET_LEN], 0, b"", Token(1)).id;
        assert_eq!(sessions.detach(id, 100).map(|s| s.id), Some(id));
        assert!(sessions.is_empty());
    }

    #[test]
    fn grace_expires_unless_attached() {
        let mut sessions = Sessions::new(0, 1);
        let kept = sessions.create([0; SECRET_LEN], 1000, b"", Token(1)).id;
        let lost = sessions.create([0; SECRET_LEN], 1000, b"", Token(2)).id;
        assert!(sessions.detach(kept, 100).is_none());
        assert!(sessions.detach(lost, 100).is_none());
        assert_eq!(sessions.next_deadline(), Some(1100));
        assert_eq!(sessions.attach(kept, Token(3)), None);
        let mut ended = Vec::new();
        sessions.expire(1099, &mut ended);
        assert!(ended.is_empty());
        sessions.expire(1100, &mut ended);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].id, lost);
        assert_eq!(sessions.get(kept).unwrap().conn, Some(Token(3)));
        assert_eq!(sessions.next_deadline(), None);
    }

    fn pending(op: u8, name: &[u8]) -> Pending {
        Pending {
            shard: 0,
            op: PendingOp::Native(op),
            name: LockName::from_slice(name),
            mode: Mode::Exclusive,
            notify_queued: false,
            queued: false,
            conn: ConnRef::NONE,
            started_us: 0,
            multi: None,
        }
    }

    /// A lock released and taken again on the resumed connection before
    /// the listing reaches its name, then lost (lease): the client was told
    /// of the new grant, so it must be told of the loss (found in review).
    #[test]
    fn a_hold_granted_during_the_listing_and_lost_is_pushed() {
        use crate::protocol::opcode;
        let mut sessions = Sessions::new(0, 1);
        let id = sessions.create([7; 16], 5_000, b"c", Token(1)).id;
        let held = Held {
            mode: Mode::Exclusive,
            token: 5,
            gen: 1,
        };
        let s = sessions.get_mut(id).unwrap();
        s.holds.insert(LockName::from_slice(b"L"), held);
        s.holds
            .insert(LockName::from_slice(b"M"), Held { token: 6, ..held });
        assert!(sessions.detach(id, 0).is_none());
        assert!(
            sessions.resume(id, &[8; 16], Token(2)).is_none(),
            "wrong secret"
        );
        let resumed = sessions.resume(id, &[7; 16], Token(2)).unwrap();
        assert!(resumed.in_flight.is_empty());
        let s = sessions.get_mut(id).unwrap();
        let reply = |request_id, outcome| Effect::Reply {
            session: id,
            request_id,
            outcome,
            deferred: false,
        };
        s.pending.insert(10, pending(opcode::RELEASE, b"L"));
        assert!(matches!(
            s.record(&reply(10, Outcome::Ok)),
            Delivery::Final(_)
        ));
        s.pending.insert(11, pending(opcode::ACQUIRE, b"L"));
        let granted = reply(11, Outcome::Granted { token: 9 });
        assert!(matches!(s.record(&granted), Delivery::Final(_)));
        let lost = |token, name: &[u8]| Effect::LockLost {
            session: id,
            token,
            name: name.into(),
        };
        // The new grant's loss is pushed; an old hold not listed yet is not.
        assert!(matches!(
            s.record(&lost(9, b"L")),
            Delivery::Lost { push: true }
        ));
        assert!(matches!(
            s.record(&lost(6, b"M")),
            Delivery::Lost { push: false }
        ));
        let mut listed = Vec::new();
        while let Some(step) = s.next_listed() {
            match step {
                Listed::Held(name, _) => listed.push(name.to_vec()),
                Listed::Gone => {}
                Listed::End => break,
            }
        }
        assert!(listed.is_empty(), "{listed:?}");
    }

    #[test]
    fn secure_eq_is_equality() {
        assert!(secure_eq(b"", b""));
        assert!(secure_eq(b"secret", b"secret"));
        assert!(!secure_eq(b"secret", b"secreT"));
        assert!(!secure_eq(b"secret", b"secret2"));
        assert!(!secure_eq(b"", b"x"));
        assert!(!secure_eq(&[0; 256], &[]));
    }

    /// An ordered session takes names only upward, one at a time: a name
    /// ranking before one it holds is refused, naming that one, and so is
    /// any acquire while another is in flight; an order is declared before
    /// anything is taken.
    #[test]
    fn an_ordered_session_takes_names_only_upward() {
        use crate::protocol::opcode;
        let mut sessions = Sessions::new(0, 1);
        let id = sessions.create([7; 16], 0, b"c", Token(1)).id;
        let s = sessions.get_mut(id).unwrap();
        let held = Held {
            mode: Mode::Exclusive,
            token: 5,
            gen: 1,
        };
        let name = LockName::from_slice;
        let ask = |name| Ask::Acquire(name);
        assert!(s.set_order(Some(Order::Ascending)));
        s.hold_granted(name(b"b"), held);
        s.hold_granted(name(b"d"), held);
        assert_eq!(
            s.refusal(1, ask(b"c"), (0, false)),
            Some(Refusal::OrderViolation(name(b"d")))
        );
        assert_eq!(s.refusal(1, ask(b"e"), (0, false)), None);
        // The same name is the shard's to answer (AlreadyHeld).
        assert_eq!(s.refusal(1, ask(b"d"), (0, false)), None);
        // A release in flight orders nothing; an acquire in flight does.
        s.pending.insert(4, pending(opcode::RELEASE, b"y"));
        assert_eq!(s.refusal(1, ask(b"e"), (0, false)), None);
        s.pending.insert(3, pending(opcode::ACQUIRE_PERMITS, b"z"));
        assert_eq!(
            s.refusal(1, ask(b"e"), (0, false)),
            Some(Refusal::OrderViolation(name(b"z")))
        );
        assert!(!s.set_order(None), "declared while holding");
        // Released, the top goes: what is below it is fine again.
        s.pending.clear();
        assert!(s.hold_ended(b"d").is_some());
        assert_eq!(s.refusal(1, ask(b"c"), (0, false)), None);
        // Priorities: z (1) before a (2) before every unlisted name.
        assert!(s.hold_ended(b"b").is_some());
        assert!(s.set_order(Order::priorities([(&b"z"[..], 1), (b"a", 2)])));
        s.hold_granted(name(b"a"), held);
        assert!(s.refusal(1, ask(b"z"), (0, false)).is_some());
        assert_eq!(s.refusal(1, ask(b"b"), (0, false)), None);
        // Without an order anything goes.
        assert!(s.hold_ended(b"a").is_some());
        assert!(s.set_order(None));
        s.hold_granted(name(b"z"), held);
        assert_eq!(s.refusal(1, ask(b"a"), (0, false)), None);
    }
}
