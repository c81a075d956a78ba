//! Seeded, deterministic simulation of whole clusters: three raft-rs nodes
//! over our raft storage (`ClusterStorage`) on an in-memory network that
//! loses, delays and reorders messages and is partitioned; nodes crash and
//! restart (keeping what they persisted). The leader runs a simulated
//! server (`ServerSim`: random sessions, acquires, releases, timers, each
//! journaled) and proposes its turns' batches; a new leader takes office as
//! `cluster::node` does: replay of every committed entry, restore with the
//! failover grace, the state proposed as its base entry. A leader that
//! loses office leaves and restarts as a follower (as the process executes
//! itself again), keeping only what it persisted.
//!
//! Invariants, for many seeds:
//! - every node's replay of entry (index, term) is the state its leader had
//!   when it proposed it, byte for byte (state machine safety);
//! - no two different entries are ever committed at one index, and every
//!   leader holds every entry committed before its term (nothing
//!   acknowledged is lost by a failover);
//! - fencing tokens of acknowledged grants increase per lock, across
//!   leaders;
//! - the leader's lock tables keep their invariants, and the cluster makes
//!   progress once healed.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use common::server_sim::ServerSim;
use common::Rng;
use livelock::cluster::storage::ClusterStorage;
use livelock::journal::{self, Replay};
use livelock::lock_table::LockTable;
use livelock::session::Sessions;
use livelock::snapshot;
use raft::eraftpb::{ConfState, Entry, HardState, Message, Snapshot};
use raft::{Config, RawNode, StateRole};

const NODES: u64 = 3;
const LOOPS: usize = 2;
/// Simulated milliseconds per step; a raft tick every 5 steps (50 ms).
const STEP_MS: u64 = 10;
const FAILOVER_GRACE_MS: u64 = 5_000;

/// An entry a leader proposed: index, term, the grants it carries (lock
/// name, token).
type Proposed = (u64, u64, Vec<(&'static [u8], u64)>);

struct Node {
    id: u64,
    /// What the node persisted: survives a crash.
    storage: ClusterStorage,
    raw: Option<RawNode<ClusterStorage>>,
    /// The replayed committed log (until it serves).
    replay: Option<Replay>,
    /// The server, while it leads.
    server: Option<ServerSim>,
    /// Entries this leader proposed and has not seen committed yet, with
    /// the grants they carry.
    proposed: Vec<Proposed>,
    /// Steps until a crashed node restarts.
    down_for: u64,
}

struct World {
    rng: Rng,
    now: u64,
    step: u64,
    nodes: Vec<Node>,
    /// Messages in flight.
    net: Vec<Message>,
    /// Directed links that drop everything.
    cut: BTreeSet<(u64, u64)>,
    /// The state after entry (index, term), as its leader had it.
    expected: HashMap<(u64, u64), Vec<u8>>,
    /// Every entry anyone saw committed: index → term.
    committed: BTreeMap<u64, u64>,
    /// The last acknowledged grant's token, per lock.
    acked: BTreeMap<&'static [u8], u64>,
    grants_acked: u64,
    leaders: u64,
}

fn raw_node(id: u64, storage: &ClusterStorage) -> RawNode<ClusterStorage> {
    let config = Config {
        id,
        election_tick: 10,
        heartbeat_tick: 2,
        check_quorum: true,
        pre_vote: true,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 64,
        applied: 0,
        ..Config::default()
    };
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    RawNode::new(&config, storage.clone(), &logger).expect("a raft node")
}

impl World {
    fn new(seed: u64) -> World {
        let voters: Vec<u64> = (1..=NODES).collect();
        let nodes = (1..=NODES)
            .map(|id| {
                let storage = ClusterStorage::new(
                    Snapshot::default(),
                    Vec::new(),
                    HardState::default(),
                    ConfState::from((voters.clone(), vec![])),
                );
                Node {
                    id,
                    raw: Some(raw_node(id, &storage)),
                    storage,
                    replay: Some(Replay::empty()),
                    server: None,
                    proposed: Vec::new(),
                    down_for: 0,
                }
            })
            .collect();
        World {
            rng: Rng(seed),
            now: 1_000_000,
            step: 0,
            nodes,
            net: Vec::new(),
            cut: BTreeSet::new(),
            expected: HashMap::new(),
            committed: BTreeMap::new(),
            acked: BTreeMap::new(),
            grants_acked: 0,
            leaders: 0,
        }
    }

    /// A node crashes (or, deposed, restarts itself): what it did not persist is gone.
    fn crash(&mut self, i: usize, down_for: u64) {
        let node = &mut self.nodes[i];
        node.raw = None;
        node.replay = None;
        node.server = None;
        node.proposed.clear();
        node.down_for = down_for;
    }

    fn restart(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.raw = Some(raw_node(node.id, &node.storage));
        node.replay = Some(Replay::empty());
    }

    fn run(&mut self, steps: u64, faults: bool) {
        for _ in 0..steps {
            self.step += 1;
            self.now += STEP_MS;
            if faults {
                self.faults();
            }
            for i in 0..self.nodes.len() {
                if self.nodes[i].raw.is_none() {
                    if self.nodes[i].down_for > 0 {
                        self.nodes[i].down_for -= 1;
                    } else {
                        self.restart(i);
                    }
                    continue;
                }
                if self.step % 5 == (i as u64) % 5 {
                    self.nodes[i].raw.as_mut().unwrap().tick();
                }
                // A leader that lost office restarts before anything else
                // (as `Node::run` checks before it proposes).
                let deposed = self.nodes[i].server.is_some()
                    && self.nodes[i].raw.as_ref().unwrap().raft.state != StateRole::Leader;
                if deposed {
                    let down = self.rng.range(1, 20);
                    self.crash(i, down);
                    continue;
                }
                self.serve(i);
                if self.nodes[i].raw.is_none() {
                    continue;
                }
                self.handle_ready(i);
                self.promote(i);
            }
            self.deliver();
        }
    }

    fn faults(&mut self) {
        let roll = self.rng.below(1000);
        let down = self.nodes.iter().filter(|n| n.raw.is_none()).count();
        if roll < 4 && down == 0 {
            // kill -9 of any node (the leader as likely as any).
            let i = self.rng.index(self.nodes.len());
            let steps = self.rng.range(10, 300);
            self.crash(i, steps);
        } else if roll < 8 && self.cut.is_empty() {
            // Isolate one node, or cut one direction only.
            let id = self.rng.range(1, NODES);
            let one_way = self.rng.chance(30);
            for other in (1..=NODES).filter(|&o| o != id) {
                self.cut.insert((id, other));
                if !one_way {
                    self.cut.insert((other, id));
                }
            }
        } else if roll < 14 {
            self.cut.clear();
        }
    }

    /// Messages: most arrive this step, some later (reordered), some lost.
    fn deliver(&mut self) {
        let messages = std::mem::take(&mut self.net);
        for message in messages {
            if self.cut.contains(&(message.from, message.to)) || self.rng.chance(3) {
                continue;
            }
            if self.rng.chance(20) {
                self.net.push(message);
                continue;
            }
            let to = message.to as usize - 1;
            if let Some(raw) = self.nodes[to].raw.as_mut() {
                let _ = raw.step(message);
            }
        }
    }

    /// The leader's server makes random changes and proposes its turns.
    fn serve(&mut self, i: usize) {
        let now = self.now;
        let Some(server) = self.nodes[i].server.as_mut() else {
            return;
        };
        server.now = server.now.max(now);
        for _ in 0..self.rng.below(3) {
            server.step(&mut self.rng);
        }
        if self.rng.chance(10) {
            server.fire_timers();
        }
        for table in &server.tables {
            table.check_invariants();
        }
        if !self.rng.chance(40) {
            return;
        }
        let Some(entry) = server.take_entry() else {
            return;
        };
        let fingerprint = server.fingerprint();
        let grants = server.take_grants();
        let raw = self.nodes[i].raw.as_mut().unwrap();
        if raw.propose(Vec::new(), entry).is_err() {
            // Its state has a change the log will not have: as the node
            // does, it leaves.
            self.crash(i, 5);
            return;
        }
        let index = raw.raft.raft_log.last_index();
        let term = raw.raft.term;
        let old = self.expected.insert((index, term), fingerprint);
        assert!(
            old.is_none(),
            "node {} proposed a second entry at ({index}, {term}) [batch]",
            i + 1
        );
        self.nodes[i].proposed.push((index, term, grants));
    }

    fn handle_ready(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let raw = node.raw.as_mut().unwrap();
        if !raw.has_ready() {
            return;
        }
        let mut ready = raw.ready();
        self.net.extend(ready.take_messages());
        assert!(ready.snapshot().is_empty(), "nothing is compacted here");
        let committed = ready.take_committed_entries();
        {
            let mut core = node.storage.wl();
            core.append(ready.entries());
            if let Some(hs) = ready.hs() {
                core.set_hard_state(hs.clone());
            }
        }
        self.net.extend(ready.take_persisted_messages());
        let mut light = raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            node.storage.wl().set_commit(commit);
        }
        self.net.extend(light.take_messages());
        let later = light.take_committed_entries();
        raw.advance_apply();
        self.apply(i, &committed);
        self.apply(i, &later);
    }

    fn apply(&mut self, i: usize, entries: &[Entry]) {
        for entry in entries {
            if let Some(term) = self.committed.insert(entry.index, entry.term) {
                assert_eq!(
                    term, entry.term,
                    "two entries committed at index {}",
                    entry.index
                );
            }
            let node = &mut self.nodes[i];
            if let Some(replay) = &mut node.replay {
                replay
                    .apply_committed(entry.index, &entry.data)
                    .expect("the committed log replays");
                if let Some(expected) = self.expected.get(&(entry.index, entry.term)) {
                    assert!(
                        replay.fingerprint() == *expected,
                        "node {}: entry {} (term {}, {} bytes, base: {}) replays to another state \
                         than its leader's",
                        node.id,
                        entry.index,
                        entry.term,
                        entry.data.len(),
                        entry.data.starts_with(&[0xFF, 0xFF])
                    );
                }
            }
            // The leader acknowledges the grants of its entries committed.
            while let Some(&(index, term, _)) = node.proposed.first() {
                if index > entry.index {
                    break;
                }
                let (_, _, grants) = node.proposed.remove(0);
                if index < entry.index || term != entry.term {
                    continue;
                }
                for (name, token) in grants {
                    let last = self.acked.entry(name).or_insert(0);
                    assert!(
                        token > *last,
                        "lock {:?}: token {token} acknowledged after {last}",
                        String::from_utf8_lossy(name)
                    );
                    *last = token;
                    self.grants_acked += 1;
                }
            }
        }
    }

    /// A leader holding every committed entry takes office: the replayed
    /// state restored with the failover grace, proposed as its base entry.
    fn promote(&mut self, i: usize) {
        let now = self.now;
        let node = &mut self.nodes[i];
        let raw = node.raw.as_mut().unwrap();
        if node.server.is_some() || raw.raft.state != StateRole::Leader {
            return;
        }
        let committed = raw.raft.raft_log.committed;
        let term = raw.raft.term;
        if raw.raft.raft_log.term(committed).unwrap_or(0) != term
            || raw.raft.raft_log.applied < committed
        {
            return;
        }
        // Leader completeness: it holds every entry committed so far.
        for (&index, &entry_term) in &self.committed {
            assert_eq!(
                raw.raft.raft_log.term(index).ok(),
                Some(entry_term),
                "leader {} (term {term}) lacks committed entry {index}",
                node.id
            );
        }
        let replay = node.replay.take().expect("a follower replays");
        let state = snapshot::settle(replay.finish(committed, term));
        let mut tables: Vec<LockTable> = (0..LOOPS).map(|l| LockTable::new(l, LOOPS)).collect();
        for table in &mut tables {
            table.raise_token_floor(state.last_token);
        }
        let mut homes: Vec<Sessions> = (0..LOOPS).map(|h| Sessions::new(h, LOOPS)).collect();
        let mut effects = vec![Vec::new(); LOOPS];
        snapshot::restore(
            &state,
            now,
            FAILOVER_GRACE_MS,
            &mut tables,
            &mut homes,
            &mut effects,
        );
        // New sessions and requests of this term get ids no earlier term used.
        let ids = (term << 20, (term as u32) << 20);
        let server = ServerSim::restored(tables, &homes, now, ids);
        let base = journal::base_entry(&snapshot::log_snapshot(server.parts(), 0, 0));
        raw.propose(Vec::new(), base).expect("a leader proposes");
        let index = raw.raft.raft_log.last_index();
        let old = self.expected.insert((index, term), server.fingerprint());
        assert!(
            old.is_none(),
            "node {} proposed a second entry at ({index}, {term}) [base]",
            node.id
        );
        node.server = Some(server);
        self.leaders += 1;
    }

    /// Whether every node runs and has applied the same last index.
    fn settled(&self) -> bool {
        let applied: BTreeSet<u64> = self
            .nodes
            .iter()
            .filter_map(|n| n.raw.as_ref().map(|r| r.raft.raft_log.applied))
            .collect();
        self.nodes.iter().all(|n| n.raw.is_some()) && applied.len() == 1
    }
}

#[test]
fn clusters_keep_their_invariants_under_faults() {
    let mut totals = (0, 0, 0);
    for seed in 0..24u64 {
        let mut world = World::new(seed);
        world.run(3_000, true);
        // Healed and left alone, the cluster settles and makes progress.
        world.cut.clear();
        let before = world.committed.len();
        let mut steps = 0;
        while !(world.settled() && world.committed.len() > before + 3) {
            world.run(10, false);
            steps += 10;
            assert!(steps < 5_000, "seed {seed}: no progress once healed");
        }
        assert!(world.leaders >= 1, "seed {seed}: a leader took office");
        totals.0 += world.committed.len();
        totals.1 += world.grants_acked;
        totals.2 += world.leaders;
    }
    // The simulation exercised what it checks.
    assert!(
        totals.0 > 1_000 && totals.1 > 200 && totals.2 > 48,
        "{totals:?}"
    );
    eprintln!(
        "cluster simulation: {} entries committed, {} grants acknowledged, {} leaders",
        totals.0, totals.1, totals.2
    );
}
