//! Seeded simulation of the state machine behind `--durability log`:
//! several loops change their shards and sessions with random commands,
//! write each turn's changes to a journal, hand the batches to a log in
//! groups (one entry per group commit) and now and then take a snapshot,
//! as the server does. After every group commit the live state is
//! recorded; a crash at any entry boundary, replayed from any earlier
//! snapshot plus the log after it, must give exactly that state (the same
//! bytes), and the restart must restore it without breaking an invariant.

mod common;

use common::server_sim::ServerSim;
use common::Rng;
use livelock::journal::{state_bytes, Replay};
use livelock::lock_table::LockTable;
use livelock::session::Sessions;
use livelock::snapshot;

const LOOPS: usize = 3;

/// One simulated server (`ServerSim`), its log (entries of batches), the
/// snapshots taken and the state after each entry.
struct Sim {
    rng: Rng,
    server: ServerSim,
    /// Committed log entries (index = position + 1).
    log: Vec<Vec<u8>>,
    /// (log index covered, snapshot dump).
    snapshots: Vec<(u64, livelock::dump::Dump)>,
    /// State bytes after each entry (index = position + 1; 0 = the base).
    states: Vec<Vec<u8>>,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut sim = Sim {
            rng: Rng(seed),
            server: ServerSim::new(LOOPS, 1_000_000),
            log: Vec::new(),
            snapshots: Vec::new(),
            states: Vec::new(),
        };
        let base = sim.snapshot_now();
        sim.states.push(sim.server.fingerprint());
        sim.snapshots.push((0, base));
        sim
    }

    fn step(&mut self) {
        self.server.step(&mut self.rng);
    }

    /// Every loop hands in its batch; the group becomes one log entry.
    fn group_commit(&mut self) {
        if let Some(entry) = self.server.take_entry() {
            self.log.push(entry);
            self.states.push(self.server.fingerprint());
        }
    }

    /// Each loop's part of a snapshot, as `EventLoop::export_snapshot_part`
    /// makes it (due deadlines fired and logged first).
    /// (Here the loops' batches go into the log before the export, so the
    /// snapshot covers the whole log; the server's may cover less, and
    /// replay skips by batch number.)
    fn snapshot_now(&mut self) -> livelock::dump::Dump {
        self.server.fire_timers();
        self.group_commit();
        snapshot::log_snapshot(self.server.parts(), self.log.len() as u64, 1)
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
                sim.server.now,
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
            // Every hold, but those of a multi-lock in flight: given back.
            assert_eq!(
                report.holds + report.given_back.0,
                state.holds.len(),
                "seed {seed}: every hold"
            );
            for table in &tables {
                table.check_invariants();
            }
        }
    }
}
