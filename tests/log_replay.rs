//! Seeded simulation of the state machine behind `--durability log`:
//! several loops change their shards and sessions with random commands,
//! write each turn's changes to a journal, hand the batches to a log in
//! groups (one entry per group commit) and now and then take a snapshot,
//! as the server does. After every group commit the live state is
//! recorded; a crash at any entry boundary, replayed from any earlier
//! snapshot plus the log after it, must give exactly that state (the same
//! bytes), and the restart must restore it without breaking an invariant.

mod common;

use std::collections::BTreeMap;

use common::Rng;
use livelock::dump::{DumpSession, LoopPosition};
use livelock::journal::{fingerprint, state_bytes, Journal, Replay};
use livelock::lock_table::{shard_for, Acquire, Command, LockTable, Mode, SignalOp, Wait};
use livelock::session::Sessions;
use livelock::snapshot;

const LOOPS: usize = 3;
const NAMES: [&[u8]; 6] = [b"a", b"b", b"c", b"jobs/1", b"jobs/2", b"z"];

/// One simulated server: each loop's table and journal, the sessions by
/// home, the log (entries of batches) and the snapshots taken.
struct Sim {
    rng: Rng,
    now: u64,
    tables: Vec<LockTable>,
    journals: Vec<Journal>,
    sessions: Vec<BTreeMap<u64, DumpSession>>,
    next_session: u64,
    next_request: u32,
    /// Committed log entries (index = position + 1).
    log: Vec<Vec<u8>>,
    /// (log index covered, snapshot dump).
    snapshots: Vec<(u64, livelock::dump::Dump)>,
    /// State bytes after each entry (index = position + 1; 0 = the base).
    states: Vec<Vec<u8>>,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let now = 1_000_000;
        let mut sim = Sim {
            rng: Rng(seed),
            now,
            tables: (0..LOOPS).map(|i| LockTable::new(i, LOOPS)).collect(),
            journals: (0..LOOPS).map(|_| Journal::default()).collect(),
            sessions: (0..LOOPS).map(|_| BTreeMap::new()).collect(),
            next_session: 1,
            next_request: 1,
            log: Vec::new(),
            snapshots: Vec::new(),
            states: Vec::new(),
        };
        let base = sim.snapshot_now();
        sim.states.push(sim.fingerprint());
        sim.snapshots.push((0, base));
        sim
    }

    fn session_ids(&self) -> Vec<u64> {
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
    }

    /// One random change.
    fn step(&mut self) {
        self.now += self.rng.range(0, 40);
        let sessions = self.session_ids();
        if sessions.is_empty() || self.rng.chance(8) {
            let home = self.rng.index(LOOPS);
            let id = (self.next_session << 8) | home as u64;
            self.next_session += 1;
            let session = DumpSession {
                id,
                secret: [id as u8; 16],
                client_name: format!("client-{id}").into_bytes(),
                client_id: None,
                grace_ms: self.rng.pick(&[0, 5_000]),
            };
            self.journals[home].session_open(&session);
            self.sessions[home].insert(id, session);
            return;
        }
        let session = self.rng.pick(&sessions);
        let name = self.rng.pick(&NAMES);
        let shard = shard_for(name, LOOPS);
        let request_id = self.next_request;
        self.next_request += 1;
        match self.rng.below(100) {
            0..=34 => {
                let wait = match self.rng.below(3) {
                    0 => Wait::Try,
                    1 => Wait::Until(self.now + self.rng.range(1, 200)),
                    _ => Wait::Forever,
                };
                let acquire = Acquire {
                    session,
                    request_id,
                    name,
                    mode: self.rng.pick(&[Mode::Exclusive, Mode::Shared]),
                    wait,
                    lease_ms: self.rng.pick(&[0, 0, 50, 300]),
                    reentrant: self.rng.chance(10),
                    notify_queued: true,
                };
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
            68..=72 => {
                let target = request_id.saturating_sub(self.rng.range(1, 5) as u32);
                let shard = self.rng.index(LOOPS);
                let cancel = Command::Cancel {
                    session,
                    request_id,
                    target,
                };
                self.apply(shard, cancel);
            }
            73..=82 => {
                let op = self.rng.pick(&[
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
            83..=87 => self.apply(
                shard,
                Command::Locked {
                    session,
                    request_id,
                    name,
                },
            ),
            88..=92 => {
                // Timers fire on one loop.
                let idx = self.rng.index(LOOPS);
                if self.tables[idx]
                    .next_deadline()
                    .is_some_and(|d| d <= self.now)
                {
                    self.journals[idx].tick(self.now);
                    self.tables[idx].tick(self.now, &mut Vec::new());
                }
            }
            _ => {
                // The session ends: its home logs that, then each shard
                // ends it (in the server, a message to each).
                let home = (0..LOOPS)
                    .find(|&h| self.sessions[h].contains_key(&session))
                    .expect("a live session has a home");
                self.journals[home].session_end(session);
                self.sessions[home].remove(&session);
                for shard in 0..LOOPS {
                    if self.rng.chance(80) {
                        self.apply(shard, Command::EndSession { session });
                    }
                }
            }
        }
    }

    /// Every loop hands in its batch; the group becomes one log entry.
    fn group_commit(&mut self) {
        let mut entry = Vec::new();
        for (idx, journal) in self.journals.iter_mut().enumerate() {
            journal.take_batch(idx, &mut entry);
        }
        if entry.is_empty() {
            return;
        }
        self.log.push(entry);
        let live = self.fingerprint();
        self.states.push(live);
    }

    fn fingerprint(&self) -> Vec<u8> {
        let batches: Vec<u64> = self.journals.iter().map(Journal::batches).collect();
        let sessions = self.sessions.iter().flat_map(|m| m.values().cloned());
        fingerprint(&self.tables, sessions, &batches)
    }

    /// Each loop's part of a snapshot, as `EventLoop::export_snapshot_part`
    /// makes it (due deadlines fired and logged first).
    /// (Here the loops' batches go into the log before the export, so the
    /// snapshot covers the whole log; the server's may cover less, and
    /// replay skips by batch number.)
    fn snapshot_now(&mut self) -> livelock::dump::Dump {
        for idx in 0..LOOPS {
            if self.tables[idx]
                .next_deadline()
                .is_some_and(|d| d <= self.now)
            {
                self.journals[idx].tick(self.now);
                self.tables[idx].tick(self.now, &mut Vec::new());
            }
        }
        self.group_commit();
        let parts = (0..LOOPS)
            .map(|idx| {
                let at = self.now;
                let mut state = snapshot::export_shard(&self.tables[idx], at);
                state.sessions = self.sessions[idx].values().cloned().collect();
                let position = LoopPosition {
                    stamp_ms: at,
                    batch: self.journals[idx].batches(),
                    last_token: self.tables[idx].last_token(),
                };
                (state, position)
            })
            .collect();
        snapshot::log_snapshot(parts, self.log.len() as u64, 1)
    }
}

fn replay(snapshot: &livelock::dump::Dump, entries: &[Vec<u8>]) -> Vec<u8> {
    let mut replay = Replay::from_snapshot(snapshot).expect("a snapshot of the log");
    for entry in entries {
        replay.apply_entry(entry).expect("the log replays");
    }
    let fingerprint = replay.fingerprint();
    // What a restart gets is a dump that reads back (its invariants hold).
    let finished = replay.finish(entries.len() as u64, 1);
    livelock::dump::decode(&state_bytes(&finished)).expect("a valid dump");
    fingerprint
}

#[test]
fn a_crash_at_any_entry_replays_to_the_acknowledged_state() {
    for seed in 0..40u64 {
        let mut sim = Sim::new(seed);
        for _ in 0..400 {
            sim.step();
            if sim.rng.chance(30) {
                sim.group_commit();
            }
            if sim.rng.chance(3) {
                let snapshot = sim.snapshot_now();
                let index = snapshot.log.as_ref().unwrap().index;
                sim.snapshots.push((index, snapshot));
            }
        }
        sim.group_commit();
        // A crash after entry `crash`: any snapshot at or before it, plus
        // the entries after the snapshot up to the crash.
        for crash in 0..=sim.log.len() {
            for (covered, snapshot) in sim.snapshots.iter().filter(|(i, _)| *i as usize <= crash) {
                let entries = &sim.log[*covered as usize..crash];
                let got = replay(snapshot, entries);
                assert!(
                    got == sim.states[crash],
                    "seed {seed}: crash after entry {crash}, replayed from the snapshot at \
                     {covered}: the state differs"
                );
            }
        }
    }
}

#[test]
fn entries_already_in_the_snapshot_are_skipped_and_gaps_refused() {
    let mut sim = Sim::new(7);
    for _ in 0..200 {
        sim.step();
        if sim.rng.chance(40) {
            sim.group_commit();
        }
    }
    sim.group_commit();
    let snapshot = sim.snapshot_now();
    sim.group_commit();
    let covered = sim.log.len();
    for _ in 0..100 {
        sim.step();
        sim.group_commit();
    }
    // Replaying the whole log over the later snapshot skips what it has.
    let whole = replay(&snapshot, &sim.log);
    assert!(whole == *sim.states.last().unwrap());
    // Leaving out an entry after the snapshot is a gap, not a silent loss.
    if sim.log.len() > covered + 2 {
        let mut replay = Replay::from_snapshot(&snapshot).unwrap();
        let mut refused = false;
        for (i, entry) in sim.log[covered..].iter().enumerate() {
            if i == 0 {
                continue;
            }
            if replay.apply_entry(entry).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused, "a missing entry must be detected");
    }
}

#[test]
fn a_replayed_state_restores_whole_on_any_loop_count() {
    for seed in 100..120u64 {
        let mut sim = Sim::new(seed);
        for _ in 0..300 {
            sim.step();
            if sim.rng.chance(25) {
                sim.group_commit();
            }
        }
        sim.group_commit();
        let (_, base) = &sim.snapshots[0];
        let mut replay = Replay::from_snapshot(base).unwrap();
        for entry in &sim.log {
            replay.apply_entry(entry).unwrap();
        }
        let state = snapshot::settle(replay.finish(sim.log.len() as u64, 1));
        for loops in [1, 2, 5] {
            let mut tables: Vec<LockTable> = (0..loops).map(|i| LockTable::new(i, loops)).collect();
            let mut homes: Vec<Sessions> = (0..loops).map(|h| Sessions::new(h, loops)).collect();
            let mut effects = vec![Vec::new(); loops];
            let report = snapshot::restore(
                &state,
                sim.now,
                6_000,
                &mut tables,
                &mut homes,
                &mut effects,
            );
            assert_eq!(
                report.sessions,
                state.sessions.len(),
                "seed {seed}: every session"
            );
            assert_eq!(report.holds, state.holds.len(), "seed {seed}: every hold");
            for table in &tables {
                table.check_invariants();
            }
        }
    }
}
