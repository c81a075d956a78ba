//! A seeded simulation of sessions, shards, shutdowns and crashes (safety
//! issue, "Tests and simulation"): many sessions (the production `Sessions`
//! of one home) on 1 to 4 shards (`LockTable`s) over simulated time, with
//! detaches, resumes, grace expiry, lease and wait timers, and two kinds of
//! restart:
//! - shutdown + reload: every shard and the home are exported
//!   (`snapshot::export_shard`, `export_sessions`), merged
//!   (`snapshot::merge`), encoded and decoded (`dump`), and restored
//!   (`snapshot::restore`) into fresh tables and sessions — with another
//!   shard count — exactly as the server does at its shutdown barrier and
//!   start;
//! - crash + reload: nothing is kept; tokens start above the durable
//!   ceiling (modelled as what `TokenCeiling` keeps: above every token
//!   handed out).
//!
//! Effects are recorded by the production home bookkeeping
//! (`Session::record`: pending requests answered, the session's holds kept
//! from grants, releases and losses), as the event loop does. Checked after
//! every step:
//! - `check_invariants` of every table (never two exclusive holders, never
//!   exclusive with shared, FIFO queues, ...);
//! - fencing: every grant of a lock has a greater token than every earlier
//!   grant of that lock, across restarts and crashes;
//! - no hold and no queued acquire that no live or graced session owns;
//! - every final reply answers a pending request (never twice); every
//!   interim QUEUED a pending acquire;
//! - the home's view of each session's holds equals the tables'.
//!
//! Single acquires are exclusive, shared, or a semaphore's permits (1 or
//! 2 of 3). Sessions also take 2 or 3 names at once (ACQUIRE_ALL: the production
//! `state::multi` steps, driven as `event_loop::multi` drives them): every
//! step's grant is fenced; a granted one holds every name with the tokens
//! it answered; a failed one holds none of them; while one is in flight,
//! the tables may show its parts, and nothing else beyond the home's holds;
//! across a shutdown it comes back in flight (started over). One in three
//! of them is a pool request instead (K of 2 to 4 candidates, sometimes
//! with a plain name): granted, it holds K candidates per requirement and
//! its queue's permits with the tokens it answered.
//!
//! Checked at each RESUME (`Sessions::resume`): a wrong secret is refused;
//! the requests in flight are the pending ones; the listing of holds
//! (`Session::next_listed`) is exactly the session's holds.
//!
//! Checked at each shutdown + reload: every session with a grace period
//! comes back with the same id, the same holds (names, modes, tokens) and
//! the same requests in flight; a session without grace comes back nowhere.
//! At the end every live session cancels what it waits for: each such
//! request gets exactly one final reply.
//!
//! `SIM_SEED=n` runs one seed; `SIM_SEEDS=n` runs seeds 0..n (default 100).

use std::collections::BTreeMap;

use livelock::dump;
use livelock::lock_table::{
    shard_for, Acquire, Command, Effect, LockTable, Mode, Outcome, RequestId, SessionId, Wait,
};
use livelock::multi::{self, Multi, Step};
use livelock::pool::PoolSpec;
use livelock::protocol::{opcode, AllNames};
use livelock::session::{Ask, Delivery, Listed, PendingOp, Sessions};
use livelock::snapshot;
use mio::Token;

mod common;
use common::Rng;

const NAMES: [&[u8]; 6] = [b"a", b"b", b"c", b"d", b"e", b"f"];

/// A pool request's K per requirement and candidates, as sent.
type PoolAsked = (Vec<u16>, Vec<Vec<Vec<u8>>>);
const STEPS: usize = 1500;
const SESSIONS_LIVE: usize = 12;

/// What a pending request was, as the simulation's client knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Acquire,
    AcquireAll,
    Release,
    Extend,
    Cancel,
}

struct World {
    rng: Rng,
    now_ms: u64,
    tables: Vec<LockTable>,
    /// Index 0 is the only home (session ids are homed there); the others
    /// exist because `restore` takes one per loop.
    homes: Vec<Sessions>,
    /// What each pending request of each session was, by the client.
    kinds: BTreeMap<(SessionId, RequestId), Kind>,
    /// The names of each ACQUIRE_ALL in flight, in the request's order (a
    /// pool request: its candidates).
    multi_names: BTreeMap<(SessionId, RequestId), Vec<Vec<u8>>>,
    /// Each pool request's K per requirement and candidates, as sent.
    pools: BTreeMap<(SessionId, RequestId), PoolAsked>,
    /// Multi-lock steps the delivered effects called for, not yet sent.
    steps: std::collections::VecDeque<(SessionId, RequestId, Step)>,
    next_request: u32,
    /// Greatest token granted per lock over the whole run.
    last_token: BTreeMap<Vec<u8>, u64>,
    /// Greatest token granted anywhere: the durable ceiling stays above it.
    max_token: u64,
    restarts: usize,
    crashes: usize,
    /// Multi-locks answered granted, failed; and in flight at a shutdown.
    multis: [usize; 3],
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = Rng(seed);
        let shards = 1 + rng.below(4) as usize;
        World {
            rng,
            now_ms: 1_000_000,
            tables: (0..shards).map(|i| LockTable::new(i, shards)).collect(),
            homes: (0..shards)
                .map(|home| Sessions::new(home, shards))
                .collect(),
            kinds: BTreeMap::new(),
            multi_names: BTreeMap::new(),
            pools: BTreeMap::new(),
            steps: std::collections::VecDeque::new(),
            next_request: 1,
            last_token: BTreeMap::new(),
            max_token: 0,
            restarts: 0,
            crashes: 0,
            multis: [0; 3],
        }
    }

    fn home(&mut self) -> &mut Sessions {
        &mut self.homes[0]
    }

    fn shard(&self, name: &[u8]) -> usize {
        shard_for(name, self.tables.len())
    }

    /// Applies `command` on `shard` and delivers its effects to the home.
    fn apply(&mut self, shard: usize, command: Command<'_>) {
        let mut out = Vec::new();
        self.tables[shard].apply(self.now_ms, command, &mut out);
        self.deliver_all(out);
    }

    /// Delivers `effects`, then sends the multi-lock steps they called for
    /// (after, as the event loop does: replies in the order made).
    fn deliver_all(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            self.deliver(effect);
        }
        while let Some((id, request_id, step)) = self.steps.pop_front() {
            self.multi_step(id, request_id, step);
        }
    }

    /// The home's bookkeeping of one effect (`Session::record`, as the
    /// event loop does), checking fencing on every grant.
    fn deliver(&mut self, effect: Effect) {
        let Some(session) = self.homes[0].get_mut(effect.session()) else {
            return; // an ended session's late effect
        };
        // The lock a reply is about, before `record` takes the request (a
        // multi-lock's: the name of its step in flight).
        let name = match effect {
            Effect::Reply { request_id, .. } => {
                session.pending.get(&request_id).map(|p| p.name.clone())
            }
            _ => None,
        };
        let delivery = session.record(&effect);
        // Every grant is fenced: a single acquire's, or a multi-lock's step's.
        if let (
            Some(name),
            Effect::Reply {
                outcome: Outcome::Granted { token },
                ..
            },
        ) = (&name, &effect)
        {
            self.max_token = self.max_token.max(*token);
            let last = self.last_token.entry(name.to_vec()).or_insert(0);
            assert!(token > last, "token {token} after {last}");
            *last = *token;
        }
        let request_id = effect.request_id();
        match &delivery {
            Delivery::MultiStep(request_id, step) => {
                self.steps
                    .push_back((effect.session(), *request_id, step.clone()));
                return;
            }
            Delivery::MultiFinal(_, result) => {
                let (id, request_id) = (effect.session(), request_id.expect("a final reply"));
                assert_eq!(self.kinds.remove(&(id, request_id)), Some(Kind::AcquireAll));
                let session = self.homes[0].get(id).expect("live");
                let (names, tokens) = self
                    .multi_names
                    .remove(&(id, request_id))
                    .map(|n| (n, result.clone()))
                    .expect("asked");
                self.multis[usize::from(tokens.is_err())] += 1;
                let pool = self.pools.remove(&(id, request_id));
                match tokens {
                    Ok(body) if pool.is_some() => {
                        // K of each requirement's candidates, with their tokens.
                        let (needs, candidates) = pool.expect("checked");
                        let grant = livelock::pool::parse_grant(&body, &needs).expect("a grant");
                        for (r, g) in grant.iter().enumerate() {
                            assert_eq!(g.taken.len(), usize::from(needs[r]));
                            for &(i, token) in &g.taken {
                                let name = &candidates[r][usize::from(i)];
                                assert_eq!(session.holds[&name[..]].token, token, "pool grant");
                            }
                            if let Some((queue, token)) = &g.permits {
                                assert_eq!(session.holds[&queue[..]].token, *token, "permits");
                            }
                        }
                    }
                    Ok(body) => {
                        let tokens = body
                            .chunks_exact(8)
                            .map(|c| u64::from_le_bytes(c.try_into().unwrap()));
                        assert_eq!(body.len(), 8 * names.len());
                        for (name, token) in names.iter().zip(tokens) {
                            assert_eq!(
                                session.holds[&name[..]].token,
                                token,
                                "all granted, with its tokens"
                            );
                        }
                    }
                    Err(_) => {
                        for name in &names {
                            assert!(
                                !session.holds.contains_key(&name[..]),
                                "a failed multi-lock holds nothing"
                            );
                        }
                    }
                }
                return;
            }
            _ => {}
        }
        if let (
            Delivery::Final(_),
            Effect::Reply {
                session,
                request_id,
                outcome,
                ..
            },
        ) = (&delivery, &effect)
        {
            self.kinds.remove(&(*session, *request_id));
            if let Outcome::Granted { .. } = *outcome {
                assert!(name.is_some(), "a grant answers a pending acquire");
            }
        }
        if let (
            Delivery::Queued { .. },
            Effect::Reply {
                session,
                request_id,
                ..
            },
        ) = (&delivery, &effect)
        {
            let kind = self.kinds[&(*session, *request_id)];
            assert!(matches!(kind, Kind::Acquire | Kind::AcquireAll), "{kind:?}");
        }
    }

    /// The step of the ACQUIRE_ALL `request_id`, as `event_loop::multi`
    /// sends it.
    fn multi_step(&mut self, id: SessionId, request_id: u32, step: Step) {
        match step {
            Step::Acquire(take) => {
                let shard = self.shard(&take.name);
                let session = self.homes[0].get_mut(id).expect("live");
                session.touched |= 1 << shard;
                let pending = session.pending.get_mut(&request_id).expect("in flight");
                pending.shard = shard as u8;
                pending.name = take.name.clone();
                self.apply(shard, multi::acquire(id, request_id, &take));
            }
            Step::Release(holds) => {
                for (name, token) in holds {
                    let shard = self.shard(&name);
                    let release = Command::Release {
                        session: id,
                        request_id,
                        name: &name,
                        token,
                    };
                    self.apply(shard, release);
                }
            }
            Step::Abort => {
                let session = self.homes[0].get(id).expect("live");
                let shard = session.pending[&request_id].shard as usize;
                let fail = Command::FailWaiter {
                    session: id,
                    request_id,
                    cycle: b"",
                };
                self.apply(shard, fail);
            }
            Step::Wait => {}
            Step::Granted(_) | Step::Failed(_) => unreachable!("answered by record"),
        }
    }

    /// An ACQUIRE_ALL of 2 or 3 names by `id` (or, one time in three, a
    /// pool request), if the home admits it.
    fn acquire_all(&mut self, id: SessionId, wait: Wait) {
        if self.rng.below(3) == 0 {
            return self.acquire_pool(id, wait);
        }
        let count = 2 + self.rng.below(2) as usize;
        let mut names: Vec<&[u8]> = Vec::new();
        while names.len() < count {
            let name = self.rng.pick(&NAMES);
            if !names.contains(&name) {
                names.push(name);
            }
        }
        let list: Vec<(Mode, &[u8])> = names
            .iter()
            .map(|&n| {
                (
                    self.rng
                        .pick(&[Mode::Exclusive, Mode::Exclusive, Mode::Shared]),
                    n,
                )
            })
            .collect();
        let mut bytes = Vec::new();
        AllNames::encode(&list, &mut bytes);
        let all = AllNames::parse(count as u16, &bytes).expect("well-formed");
        self.start_multi(id, multi::Request::All(all), wait);
    }

    /// A pool request by `id`, if the home admits it: K of 2 to 4
    /// candidates, sometimes with a plain name (a requirement of 1 of 1).
    fn acquire_pool(&mut self, id: SessionId, wait: Wait) {
        let n = 2 + self.rng.below(3) as usize;
        let mut names: Vec<&[u8]> = Vec::new();
        while names.len() < n + 1 {
            let name = self.rng.pick(&NAMES);
            if !names.contains(&name) {
                names.push(name);
            }
        }
        let need = 1 + self.rng.below(2) as u16;
        let candidates: Vec<(&[u8], &[u8])> = names[..n].iter().map(|&c| (c, &b""[..])).collect();
        let mut bytes = Vec::new();
        PoolSpec::encode(need, b"", &candidates, &mut bytes);
        let mut needs = vec![need];
        if self.rng.below(2) == 0 {
            PoolSpec::encode(1, b"", &[(names[n], b"")], &mut bytes);
            needs.push(1);
        }
        let spec = PoolSpec::parse(needs.len() as u16, &bytes).expect("well-formed");
        let candidates = spec
            .requirements()
            .map(|r| r.candidates.iter().map(|(c, _)| c.to_vec()).collect())
            .collect();
        // Known before it starts: it may be answered at once.
        let key = (id, self.next_request);
        self.pools.insert(key, (needs, candidates));
        if self.start_multi(id, multi::Request::Pool(spec), wait) != Some(key.1) {
            self.pools.remove(&key);
        }
    }

    /// Starts `asked` by `id` as the home does, if it admits it.
    fn start_multi(&mut self, id: SessionId, asked: multi::Request<'_>, wait: Wait) -> Option<u32> {
        let session = self.homes[0].get(id).unwrap();
        if session
            .refusal(self.next_request, Ask::AcquireAll(asked), (0, false))
            .is_some()
        {
            return None;
        }
        let mut multi = Multi::new(asked, wait);
        let step = multi.start();
        let request_id = self.pending(id, Kind::AcquireAll, 0, b"", Mode::Exclusive);
        let session = self.homes[0].get_mut(id).unwrap();
        let mut pending = session.pending.remove(&request_id).unwrap();
        pending.op = PendingOp::Native(multi.opcode());
        pending.multi = Some(Box::new(multi));
        session.begin_multi(request_id, pending);
        let names = asked.names().map(|n| n.to_vec()).collect();
        self.multi_names.insert((id, request_id), names);
        self.multi_step(id, request_id, step);
        Some(request_id)
    }

    fn pending(&mut self, id: SessionId, kind: Kind, shard: usize, name: &[u8], mode: Mode) -> u32 {
        let request_id = self.next_request;
        self.next_request += 1;
        let session = self.homes[0].get_mut(id).expect("live");
        session.touched |= 1 << shard;
        session.pending.insert(
            request_id,
            livelock::session::Pending {
                shard: shard as u8,
                op: match kind {
                    Kind::Release => PendingOp::Native(opcode::RELEASE),
                    Kind::Acquire => PendingOp::Native(opcode::ACQUIRE),
                    Kind::AcquireAll => PendingOp::Native(opcode::ACQUIRE_ALL),
                    Kind::Extend => PendingOp::Native(opcode::EXTEND),
                    Kind::Cancel => PendingOp::Native(opcode::CANCEL),
                },
                name: name.into(),
                mode,
                notify_queued: true,
                queued: false,
                conn: livelock::connection::ConnRef::NONE,
                started_us: 0,
                multi: None,
            },
        );
        self.kinds.insert((id, request_id), kind);
        request_id
    }

    fn live_sessions(&self) -> Vec<SessionId> {
        self.homes[0].iter().map(|s| s.id).collect()
    }

    fn attached(&self) -> Vec<SessionId> {
        self.homes[0]
            .iter()
            .filter(|s| s.conn.is_some())
            .map(|s| s.id)
            .collect()
    }

    fn step(&mut self) {
        let attached = self.attached();
        match self.rng.below(100) {
            0..=5 if self.live_sessions().len() < SESSIONS_LIVE => {
                let grace = self.rng.pick(&[0, 0, 500, 3000, 20_000]);
                self.home().create([7; 16], grace, b"sim", Token(1));
            }
            35..=39 if !attached.is_empty() => {
                let id = self.rng.pick(&attached);
                let wait = match self.rng.below(4) {
                    0 => Wait::Try,
                    1 => Wait::Until(self.now_ms + 1 + self.rng.below(3000)),
                    _ => Wait::Forever,
                };
                self.acquire_all(id, wait);
            }
            0..=39 if !attached.is_empty() => {
                let id = self.rng.pick(&attached);
                let name = self.rng.pick(&NAMES);
                // Sometimes a semaphore's permits (1 or 2 of 3): a name in
                // use as a lock refuses it, WrongKind, and the other way round.
                let mode = self.rng.pick(&[
                    Mode::Exclusive,
                    Mode::Exclusive,
                    Mode::Shared,
                    Mode::Permits,
                ]);
                let (weight, capacity) = match mode {
                    Mode::Permits => (1 + self.rng.below(2) as u32, 3),
                    _ => (1, 0),
                };
                let wait = match self.rng.below(4) {
                    0 => Wait::Try,
                    1 => Wait::Until(self.now_ms + 1 + self.rng.below(3000)),
                    _ => Wait::Forever,
                };
                let lease_ms = self.rng.pick(&[0, 0, 300, 4000]);
                let shard = self.shard(name);
                // The home's admission rule, as the loop applies it.
                let session = self.homes[0].get(id).unwrap();
                if session
                    .refusal(self.next_request, Ask::Acquire(name), (0, false))
                    .is_some()
                {
                    return;
                }
                let request_id = self.pending(id, Kind::Acquire, shard, name, mode);
                let acquire = Acquire {
                    session: id,
                    request_id,
                    name,
                    mode,
                    weight,
                    capacity,
                    wait,
                    lease_ms,
                    reentrant: false,
                    notify_queued: true,
                };
                self.apply(shard, Command::Acquire(acquire));
            }
            40..=59 if !attached.is_empty() => {
                let id = self.rng.pick(&attached);
                let name = self.rng.pick(&NAMES);
                let held = self.homes[0].get(id).unwrap().holds.get(name).copied();
                let token = match (self.rng.below(3), held) {
                    (0, _) => 0,
                    (1, Some(h)) => h.token,
                    _ => 1 + self.rng.below(5), // mostly a stale token
                };
                // The home's admission rule (a multi-lock's parts are not
                // the client's to release), as the loop applies it.
                let session = self.homes[0].get(id).unwrap();
                if session
                    .refusal(self.next_request, Ask::Held(name), (0, false))
                    .is_some()
                {
                    return;
                }
                let shard = self.shard(name);
                let extend = self.rng.below(3) == 0;
                let kind = match extend {
                    true => Kind::Extend,
                    false => Kind::Release,
                };
                let request_id = self.pending(id, kind, shard, name, Mode::Exclusive);
                let command = match extend {
                    true => Command::Extend {
                        session: id,
                        request_id,
                        name,
                        lease_ms: 1000,
                        token,
                    },
                    false => Command::Release {
                        session: id,
                        request_id,
                        name,
                        token,
                    },
                };
                self.apply(shard, command);
            }
            60..=64 if !attached.is_empty() => {
                let id = self.rng.pick(&attached);
                if let Some(&(target, shard)) = self.waits(id).first() {
                    self.cancel(id, target, shard);
                }
            }
            65..=72 if !attached.is_empty() => {
                // The connection drops.
                let id = self.rng.pick(&attached);
                let now_ms = self.now_ms;
                if let Some(ended) = self.home().detach(id, now_ms) {
                    self.end(ended.id, ended.touched);
                }
            }
            73..=79 => {
                // A detached session resumes.
                let detached: Vec<SessionId> = self.homes[0]
                    .iter()
                    .filter(|s| s.conn.is_none())
                    .map(|s| s.id)
                    .collect();
                if !detached.is_empty() {
                    let id = self.rng.pick(&detached);
                    self.resume(id);
                }
            }
            80..=94 => {
                let ms = 1 + self.rng.below(2000);
                self.advance(ms);
            }
            95..=97 => self.shutdown_and_reload(),
            _ => self.crash_and_reload(),
        }
        self.check();
    }

    /// RESUME (`Sessions::resume`, as the loop does): the requests still
    /// in flight are the pending ones, and the listing (`next_listed`) is
    /// exactly the session's holds.
    fn resume(&mut self, id: SessionId) {
        assert!(
            self.home().resume(id, &[9; 16], Token(2)).is_none(),
            "a wrong secret"
        );
        let resumed = self
            .home()
            .resume(id, &[7; 16], Token(2))
            .expect("within its grace");
        let session = self.homes[0].get_mut(id).unwrap();
        let mut pending: Vec<u32> = session.pending.keys().copied().collect();
        pending.sort_unstable();
        assert_eq!(resumed.in_flight, pending);
        let mut listed = BTreeMap::new();
        loop {
            match session.next_listed().expect("a listing under way") {
                Listed::Held(name, held) => {
                    listed.insert(name.to_vec(), (held.mode, held.token));
                }
                Listed::Gone => {}
                Listed::End => break,
            }
        }
        let holds: BTreeMap<Vec<u8>, (Mode, u64)> = session
            .holds
            .iter()
            .map(|(n, h)| (n.to_vec(), (h.mode, h.token)))
            .collect();
        assert_eq!(listed, holds, "session {id:#x}: the listing is its holds");
    }

    /// The session's acquires in flight: (request id, shard).
    fn waits(&self, id: SessionId) -> Vec<(u32, usize)> {
        self.homes[0]
            .get(id)
            .unwrap()
            .pending
            .iter()
            .filter(|(rid, _)| matches!(self.kinds[&(id, **rid)], Kind::Acquire | Kind::AcquireAll))
            .map(|(rid, p)| (*rid, p.shard as usize))
            .collect()
    }

    /// CANCEL of the session's acquire `target`, queued on `shard`.
    fn cancel(&mut self, id: SessionId, target: u32, shard: usize) {
        // An ACQUIRE_ALL is cancelled at its home, as the loop does.
        let session = self.homes[0].get_mut(id).expect("live");
        if let Some(abort) = session.cancel_multi(target) {
            if abort {
                self.multi_step(id, target, Step::Abort);
            }
            return;
        }
        let request_id = self.pending(id, Kind::Cancel, shard, b"", Mode::Exclusive);
        let cancel = Command::Cancel {
            session: id,
            request_id,
            target,
        };
        self.apply(shard, cancel);
    }

    /// The session is over: every shard it touched is told.
    fn end(&mut self, id: SessionId, touched: u64) {
        self.kinds.retain(|(session, _), _| *session != id);
        self.multi_names.retain(|(session, _), _| *session != id);
        for shard in 0..self.tables.len() {
            if touched & (1 << shard) != 0 {
                self.apply(shard, Command::EndSession { session: id });
            }
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
        for shard in 0..self.tables.len() {
            let mut out = Vec::new();
            self.tables[shard].tick(self.now_ms, &mut out);
            self.deliver_all(out);
        }
        let mut ended = Vec::new();
        let now_ms = self.now_ms;
        self.home().expire(now_ms, &mut ended);
        for session in ended {
            self.end(session.id, session.touched);
        }
    }

    fn shards_next(&mut self) -> usize {
        1 + self.rng.below(4) as usize
    }

    fn shutdown_and_reload(&mut self) {
        self.restarts += 1;
        // What the clients were last told, for the sessions that are kept.
        let kept = told(&self.homes[0], |s| s.grace_ms > 0);
        let mut parts: Vec<_> = self
            .tables
            .iter()
            .map(|t| snapshot::export_shard(t, self.now_ms))
            .collect();
        parts[0].sessions = snapshot::export_sessions(&self.homes[0], self.now_ms);
        let (state, dropped) = snapshot::merge(parts, self.now_ms);
        assert_eq!(dropped, 0, "the simulation's state always fits a dump");
        let state = dump::decode(&dump::encode(&state)).expect("a dump reads back");
        // Restart with another shard count, some time later.
        self.now_ms += self.rng.below(500);
        let shards = self.shards_next();
        self.tables = (0..shards).map(|i| LockTable::new(i, shards)).collect();
        for table in &mut self.tables {
            table.raise_token_floor(state.last_token);
        }
        self.homes = (0..shards)
            .map(|home| Sessions::new(home, shards))
            .collect();
        let mut effects: Vec<Vec<Effect>> = (0..shards).map(|_| Vec::new()).collect();
        snapshot::restore(
            &state,
            self.now_ms,
            1000,
            &mut self.tables,
            &mut self.homes,
            &mut effects,
        );
        // Sessions without grace are gone, with whatever they asked.
        let kinds = std::mem::take(&mut self.kinds);
        self.kinds = kinds
            .into_iter()
            .filter(|((id, _), _)| kept.contains_key(id))
            .collect();
        self.multi_names.retain(|(id, _), _| kept.contains_key(id));
        self.multis[2] += self.multi_names.len();
        let restored = told(&self.homes[0], |_| true);
        // Queued acquires are all that is in flight at a barrier (a
        // single-threaded home has no request in transit), so the restored
        // sessions must be exactly the kept ones.
        let kept_requests: BTreeMap<_, _> = kept.iter().map(|(id, (_, p))| (*id, p)).collect();
        assert_eq!(
            restored.keys().collect::<Vec<_>>(),
            kept.keys().collect::<Vec<_>>(),
            "the sessions with a grace period come back"
        );
        for (id, (holds, pending)) in &restored {
            assert_eq!(holds, &kept[id].0, "session {id:#x}: the same holds");
            assert_eq!(
                pending, kept_requests[id],
                "session {id:#x}: the same requests"
            );
        }
        for list in effects {
            self.deliver_all(list);
        }
    }

    fn crash_and_reload(&mut self) {
        self.crashes += 1;
        let shards = self.shards_next();
        self.tables = (0..shards).map(|i| LockTable::new(i, shards)).collect();
        // The durable ceiling (`data_dir::TokenCeiling`) is above every
        // token handed out; a start begins there.
        let floor = self.max_token + 1 + self.rng.below(1000);
        for table in &mut self.tables {
            table.raise_token_floor(floor);
        }
        self.homes = (0..shards)
            .map(|home| Sessions::new(home, shards))
            .collect();
        self.kinds.clear();
        self.multi_names.clear();
        self.now_ms += self.rng.below(500);
    }

    fn check(&self) {
        let live: BTreeMap<SessionId, &livelock::session::Session> =
            self.homes[0].iter().map(|s| (s.id, s)).collect();
        let mut in_tables: BTreeMap<SessionId, BTreeMap<Vec<u8>, (Mode, u64)>> = BTreeMap::new();
        for table in &self.tables {
            table.check_invariants();
            for (name, mode, hold) in table.holds() {
                assert!(
                    live.contains_key(&hold.session),
                    "a hold of {name:?} by session {:#x}, which is gone",
                    hold.session
                );
                in_tables
                    .entry(hold.session)
                    .or_default()
                    .insert(name.to_vec(), (mode.mode, hold.token));
            }
            for (name, _, queued) in table.waiters() {
                let session = queued.session;
                let owner = live.get(&session).unwrap_or_else(|| {
                    panic!("a wait for {name:?} by session {session:#x}, which is gone")
                });
                assert!(owner.pending.contains_key(&queued.request_id));
            }
        }
        for (id, session) in live {
            let home: BTreeMap<Vec<u8>, (Mode, u64)> = session
                .holds
                .iter()
                .map(|(n, h)| (n.to_vec(), (h.mode, h.token)))
                .collect();
            let mut tables = in_tables.remove(&id).unwrap_or_default();
            // Beyond its holds, the tables may show parts of its
            // multi-locks in flight, and nothing else.
            let multis: Vec<&Multi> = session
                .pending
                .values()
                .filter_map(|p| p.multi.as_deref())
                .collect();
            tables.retain(|name, _| {
                !multis.iter().any(|m| m.names().any(|n| **n == **name)) || home.contains_key(name)
            });
            assert_eq!(
                home, tables,
                "session {id:#x}: the home's holds are the tables'"
            );
        }
    }

    /// Every live session cancels what it still waits for: each such
    /// request gets exactly one final reply.
    fn finish(&mut self) {
        for id in self.live_sessions() {
            for (target, shard) in self.waits(id) {
                self.cancel(id, target, shard);
            }
            let left = &self.homes[0].get(id).unwrap().pending;
            assert!(left.is_empty(), "unanswered: {left:?}");
        }
        self.check();
    }
}

/// Per session (those `keep` selects): its holds (name, mode, token) and
/// its requests in flight, in order.
type Told = BTreeMap<SessionId, (Vec<(Vec<u8>, Mode, u64)>, Vec<u32>)>;

fn told(home: &Sessions, keep: impl Fn(&livelock::session::Session) -> bool) -> Told {
    home.iter()
        .filter(|s| keep(s))
        .map(|s| {
            let mut holds: Vec<_> = s
                .holds
                .iter()
                .map(|(n, h)| (n.to_vec(), h.mode, h.token))
                .collect();
            holds.sort_by(|a, b| a.0.cmp(&b.0));
            let mut pending: Vec<u32> = s.pending.keys().copied().collect();
            pending.sort_unstable();
            (s.id, (holds, pending))
        })
        .collect()
}

fn run(seed: u64) -> (usize, usize, [usize; 3]) {
    let mut world = World::new(seed);
    for _ in 0..STEPS {
        world.step();
    }
    world.finish();
    (world.restarts, world.crashes, world.multis)
}

#[test]
fn sessions_shards_restarts_and_crashes() {
    let seeds: Vec<u64> = match std::env::var("SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("SIM_SEED is a number")],
        Err(_) => {
            let count = std::env::var("SIM_SEEDS").map_or(100, |n| n.parse().unwrap());
            (0..count).collect()
        }
    };
    let (mut restarts, mut crashes, mut multis) = (0, 0, [0; 3]);
    for seed in seeds {
        let outcome = std::panic::catch_unwind(|| run(seed));
        match outcome {
            Ok((r, c, m)) => {
                restarts += r;
                crashes += c;
                for (total, n) in multis.iter_mut().zip(m) {
                    *total += n;
                }
            }
            Err(e) => {
                eprintln!("failing seed: SIM_SEED={seed}");
                std::panic::resume_unwind(e);
            }
        }
    }
    assert!(restarts > 0 && crashes > 0, "both kinds of restart ran");
    eprintln!(
        "multi-locks: {} granted, {} failed, {} in flight at a shutdown",
        multis[0], multis[1], multis[2]
    );
    assert!(
        multis.iter().all(|&n| n > 0),
        "multi-locks granted, failed and restarted: {multis:?}"
    );
}
