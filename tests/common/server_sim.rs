//! A simulated server for the seeded simulations: each loop's lock table
//! and journal and the durable part of the sessions, changed by random
//! commands as the event loops change them, each change journaled; the
//! turn's batches taken as one log entry (group commit). No I/O, no clock:
//! the time is `now`.

use std::collections::BTreeMap;

use livelock::dump::{DumpMulti, DumpSession, LoopPosition};
use livelock::journal::{fingerprint, Journal};
use livelock::lock_table::{
    shard_for, Acquire, Command, Effect, LockTable, Mode, Outcome, SignalOp, Wait,
};
use livelock::multi::{self, Multi};
use livelock::order::Order;
use livelock::protocol::AllNames;
use livelock::session::Sessions;
use livelock::snapshot;

use super::Rng;

pub const NAMES: [&[u8]; 6] = [b"a", b"b", b"c", b"jobs/1", b"jobs/2", b"z"];

pub struct ServerSim {
    pub loops: usize,
    pub now: u64,
    pub tables: Vec<LockTable>,
    pub journals: Vec<Journal>,
    /// The durable part of each home's sessions.
    pub sessions: Vec<BTreeMap<u64, DumpSession>>,
    next_session: u64,
    next_request: u32,
    /// Acquires in flight: (session, request id) → lock name.
    acquiring: BTreeMap<(u64, u32), &'static [u8]>,
    /// Grants made since `take_grants`: (lock name, token).
    grants: Vec<(&'static [u8], u64)>,
}

impl ServerSim {
    pub fn new(loops: usize, now: u64) -> ServerSim {
        ServerSim {
            loops,
            now,
            tables: (0..loops).map(|i| LockTable::new(i, loops)).collect(),
            journals: (0..loops).map(|_| Journal::default()).collect(),
            sessions: (0..loops).map(|_| BTreeMap::new()).collect(),
            next_session: 1,
            next_request: 1,
            acquiring: BTreeMap::new(),
            grants: Vec::new(),
        }
    }

    /// A server that starts from restored tables and sessions (journals
    /// at batch 0); new session ids from `next_session` on, request ids
    /// from `next_request` (above those of the restored sessions).
    pub fn restored(
        tables: Vec<LockTable>,
        homes: &[Sessions],
        now: u64,
        (next_session, next_request): (u64, u32),
    ) -> ServerSim {
        let loops = tables.len();
        ServerSim {
            loops,
            now,
            tables,
            journals: (0..loops).map(|_| Journal::default()).collect(),
            sessions: homes
                .iter()
                .map(|home| {
                    snapshot::durable_sessions(home, now)
                        .into_iter()
                        .map(|s| (s.id, s))
                        .collect()
                })
                .collect(),
            next_session,
            next_request,
            acquiring: BTreeMap::new(),
            grants: Vec::new(),
        }
    }

    pub fn session_ids(&self) -> Vec<u64> {
        self.sessions
            .iter()
            .flat_map(|m| m.keys().copied())
            .collect()
    }

    fn apply(&mut self, shard: usize, command: Command<'_>) {
        self.journals[shard].shard(self.now, &command);
        if !livelock::journal::changes_state(&command)
            && self.tables[shard]
                .next_deadline()
                .is_some_and(|d| d <= self.now)
        {
            self.journals[shard].tick(self.now);
        }
        let mut sink = Vec::new();
        self.tables[shard].apply(self.now, command, &mut sink);
        self.note(&sink);
    }

    /// Notes the grants among `effects`.
    fn note(&mut self, effects: &[Effect]) {
        for effect in effects {
            if let Effect::Reply {
                session,
                request_id,
                outcome: Outcome::Granted { token },
                ..
            } = effect
            {
                if let Some(name) = self.acquiring.remove(&(*session, *request_id)) {
                    self.grants.push((name, *token));
                }
            }
        }
    }

    /// The grants made since the last call: (lock name, token).
    pub fn take_grants(&mut self) -> Vec<(&'static [u8], u64)> {
        std::mem::take(&mut self.grants)
    }

    /// One random change.
    pub fn step(&mut self, rng: &mut Rng) {
        self.now += rng.range(0, 40);
        let sessions = self.session_ids();
        if sessions.is_empty() || rng.chance(8) {
            let home = rng.index(self.loops);
            let id = (self.next_session << 8) | home as u64;
            self.next_session += 1;
            let mut session = DumpSession {
                id,
                secret: [id as u8; 16],
                client_name: format!("client-{id}").into_bytes(),
                client_id: None,
                grace_ms: rng.pick(&[0, 5_000]),
                order: None,
                multis: Vec::new(),
            };
            self.journals[home].session_open(&session);
            // Some declare an order before taking anything (SET_ORDER).
            session.order = match rng.below(4) {
                0 => Some(Order::Ascending),
                1 => Order::priorities([(&b"z"[..], 1), (b"a", 2)]),
                _ => None,
            };
            if session.order.is_some() {
                self.journals[home].session_order(id, session.order.as_ref());
            }
            self.sessions[home].insert(id, session);
            return;
        }
        let session = rng.pick(&sessions);
        let name = rng.pick(&NAMES);
        let shard = shard_for(name, self.loops);
        let request_id = self.next_request;
        self.next_request += 1;
        match rng.below(100) {
            0..=34 => {
                let wait = match rng.below(3) {
                    0 => Wait::Try,
                    1 => Wait::Until(self.now + rng.range(1, 200)),
                    _ => Wait::Forever,
                };
                // Locks and semaphores of two capacities on the same
                // names: kinds and capacities clash, weights queue.
                let mode = rng.pick(&[Mode::Exclusive, Mode::Shared, Mode::Permits]);
                let (weight, capacity) = match mode {
                    Mode::Permits => (rng.range(1, 3) as u32, 3),
                    Mode::Exclusive | Mode::Shared => (1, 0),
                };
                let acquire = Acquire {
                    session,
                    request_id,
                    name,
                    mode,
                    weight,
                    capacity,
                    wait,
                    lease_ms: rng.pick(&[0, 0, 50, 300]),
                    reentrant: rng.chance(10),
                    notify_queued: true,
                };
                self.acquiring.insert((session, request_id), name);
                self.apply(shard, Command::Acquire(acquire));
            }
            35..=56 => self.apply(
                shard,
                Command::Release {
                    session,
                    request_id,
                    name,
                    token: 0,
                },
            ),
            // An operator breaks the lock (logged as its own record).
            57..=59 => self.apply(
                shard,
                Command::ForceRelease {
                    session,
                    request_id,
                    name,
                    token: 0,
                },
            ),
            60..=67 => self.apply(
                shard,
                Command::Extend {
                    session,
                    request_id,
                    name,
                    lease_ms: 200,
                    token: 0,
                },
            ),
            71..=72 => {
                // Deadlock detection fails a wait (logged with its cycle).
                let target = request_id.saturating_sub(rng.range(1, 5) as u32);
                let shard = rng.index(self.loops);
                let fail = Command::FailWaiter {
                    session,
                    request_id: target,
                    cycle: b"deadlock: a cycle",
                };
                self.apply(shard, fail);
            }
            68..=70 => {
                let target = request_id.saturating_sub(rng.range(1, 5) as u32);
                let shard = rng.index(self.loops);
                let cancel = Command::Cancel {
                    session,
                    request_id,
                    target,
                };
                self.apply(shard, cancel);
            }
            73..=82 => {
                let op = rng.pick(&[
                    SignalOp::Set { notify: true },
                    SignalOp::Set { notify: false },
                    SignalOp::Delete,
                    SignalOp::Exists,
                ]);
                let signal = Command::Signal {
                    session,
                    request_id,
                    name,
                    signal: b"sig",
                    op,
                };
                self.apply(shard, signal);
            }
            83..=85 => self.apply(
                shard,
                Command::Locked {
                    session,
                    request_id,
                    name,
                },
            ),
            86..=87 => self.apply(
                shard,
                Command::SetCapacity {
                    session,
                    request_id,
                    name,
                    capacity: rng.range(1, 5) as u32,
                },
            ),
            88..=92 => {
                // Timers fire on one loop.
                let idx = rng.index(self.loops);
                self.fire_timers_of(idx);
            }
            93..=94 => {
                // A multi-lock of the session begins or ends (its steps are
                // ordinary acquires, above); its home logs that.
                let home = (0..self.loops)
                    .find(|&h| self.sessions[h].contains_key(&session))
                    .expect("a live session has a home");
                let now = self.now;
                let durable = self.sessions[home].get_mut(&session).expect("live");
                if let Some(ended) = durable.multis.pop() {
                    let journal = &mut self.journals[home];
                    journal.session_multi(now, session, ended.request_id, None);
                    return;
                }
                let first = rng.pick(&NAMES);
                let second = NAMES
                    .iter()
                    .copied()
                    .find(|&n| n != first)
                    .expect("6 names");
                let list = [
                    (Mode::Exclusive, first),
                    (rng.pick(&[Mode::Exclusive, Mode::Shared]), second),
                ];
                let mut names = Vec::new();
                AllNames::encode(&list, &mut names);
                let wait = rng.pick(&[Wait::Try, Wait::Until(now + 100), Wait::Forever]);
                let multi = Multi::new(
                    multi::Request::All(AllNames::parse(2, &names).expect("well-formed")),
                    wait,
                );
                self.journals[home].session_multi(now, session, request_id, Some(&multi));
                durable.multis.push(DumpMulti {
                    request_id,
                    wait_left_ms: 0,
                    count: 2,
                    names,
                });
            }
            _ => {
                // The session ends: its home logs that, then each shard
                // ends it (in the server, a message to each).
                let home = (0..self.loops)
                    .find(|&h| self.sessions[h].contains_key(&session))
                    .expect("a live session has a home");
                self.journals[home].session_end(session);
                self.sessions[home].remove(&session);
                for shard in 0..self.loops {
                    if rng.chance(80) {
                        self.apply(shard, Command::EndSession { session });
                    }
                }
            }
        }
    }

    /// Every loop hands in its batch: the group as one log entry, if any.
    pub fn take_entry(&mut self) -> Option<Vec<u8>> {
        let mut entry = Vec::new();
        for (idx, journal) in self.journals.iter_mut().enumerate() {
            journal.take_batch(idx, &mut entry);
        }
        (!entry.is_empty()).then_some(entry)
    }

    pub fn fingerprint(&self) -> Vec<u8> {
        let batches: Vec<u64> = self.journals.iter().map(Journal::batches).collect();
        let sessions = self.sessions.iter().flat_map(|m| m.values().cloned());
        fingerprint(&self.tables, sessions, &batches)
    }

    /// Fires due deadlines on every loop (logged).
    pub fn fire_timers(&mut self) {
        for idx in 0..self.loops {
            self.fire_timers_of(idx);
        }
    }

    /// Fires loop `idx`'s due deadlines, if any (logged).
    fn fire_timers_of(&mut self, idx: usize) {
        if self.tables[idx]
            .next_deadline()
            .is_some_and(|d| d <= self.now)
        {
            self.journals[idx].tick(self.now);
            let mut sink = Vec::new();
            self.tables[idx].tick(self.now, &mut sink);
            self.note(&sink);
        }
    }

    /// Each loop's part of a snapshot at its current batch, as
    /// `EventLoop::export_snapshot_part` makes it.
    pub fn parts(&self) -> Vec<(livelock::snapshot::LoopState, LoopPosition)> {
        (0..self.loops)
            .map(|idx| {
                let mut state = snapshot::export_shard(&self.tables[idx], self.now);
                state.sessions = self.sessions[idx].values().cloned().collect();
                let position = LoopPosition {
                    stamp_ms: self.now,
                    batch: self.journals[idx].batches(),
                    last_token: self.tables[idx].last_token(),
                };
                (state, position)
            })
            .collect()
    }
}
