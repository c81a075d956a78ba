//! Seeded simulation of deadlock detection across shards: clients take a
//! few of a handful of names one at a time, in random orders and modes,
//! over three lock tables (so they deadlock, often across shards), release
//! everything and start again; a client that is told `Deadlock` gives up
//! what it holds and starts again. Detection rounds read the shards one
//! after the other with client steps in between (the shards are not read
//! at one instant, as in the server), and the `Detector` decides.
//!
//! Clients 1 and 2 take their names as a multi-lock (ACQUIRE_ALL) does:
//! in ascending byte order (`state::multi`), giving everything back when
//! failed.
//!
//! Checked, for many seeds:
//! - nothing that is not a deadlock is reported: when a wait is failed, its
//!   session is on a cycle of the graph read from every table at once;
//! - every deadlock is found: once the clients that can move have finished,
//!   the clients still waiting are deadlocked, and each pair of rounds
//!   fails at least one wait until none is left waiting;
//! - multi-locks never deadlock each other: no cycle of the graph has only
//!   multi-lock clients on it.

mod common;

use common::Rng;
use livelock::deadlock::{Detector, ShardEdge, Victim};
use livelock::lock_table::{
    shard_for, Acquire, Command, Effect, LockTable, Mode, Outcome, RequestId, SessionId, Wait,
};

const SHARDS: usize = 3;
const NAMES: [&[u8]; 5] = [b"a", b"b", b"c", b"d", b"e"];
const CLIENTS: u64 = 6;
/// Clients 1..=MULTI_CLIENTS take their names in byte order, as ACQUIRE_ALL.
const MULTI_CLIENTS: u64 = 2;

struct Client {
    id: SessionId,
    /// The names to take, in order, and how.
    plan: Vec<(&'static [u8], Mode)>,
    next: usize,
    held: Vec<&'static [u8]>,
    waiting: Option<RequestId>,
    next_request: RequestId,
    /// Takes no new plan (the last phase).
    stopping: bool,
}

struct Sim {
    rng: Rng,
    now: u64,
    tables: Vec<LockTable>,
    clients: Vec<Client>,
    detector: Detector,
    deadlocks: u64,
    grants: u64,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let clients = (1..=CLIENTS)
            .map(|id| {
                let plan = plan(&mut rng, id);
                Client {
                    id,
                    plan,
                    next: 0,
                    held: Vec::new(),
                    waiting: None,
                    next_request: 1,
                    stopping: false,
                }
            })
            .collect();
        Sim {
            rng,
            now: 1_000,
            tables: (0..SHARDS).map(|s| LockTable::new(s, SHARDS)).collect(),
            clients,
            detector: Detector::default(),
            deadlocks: 0,
            grants: 0,
        }
    }

    fn apply(&mut self, shard: usize, command: Command<'_>) {
        let mut effects = Vec::new();
        self.tables[shard].apply(self.now, command, &mut effects);
        for effect in effects {
            self.deliver(effect);
        }
    }

    fn client(&mut self, id: SessionId) -> &mut Client {
        &mut self.clients[id as usize - 1]
    }

    fn deliver(&mut self, effect: Effect) {
        match effect {
            Effect::Reply {
                session,
                request_id,
                outcome: Outcome::Granted { .. },
                ..
            } => {
                self.grants += 1;
                let client = self.client(session);
                if client.waiting == Some(request_id) {
                    client.waiting = None;
                }
                let name = client.plan[client.next].0;
                client.held.push(name);
                client.next += 1;
            }
            Effect::Reply {
                outcome: Outcome::Ok,
                ..
            } => {}
            Effect::Deadlock {
                session,
                request_id,
                ..
            } => {
                self.deadlocks += 1;
                let client = self.client(session);
                assert_eq!(client.waiting, Some(request_id), "a wait failed twice");
                client.waiting = None;
                // It gives up: lets go of everything, and starts again.
                client.next = client.plan.len();
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// One step of a client that is not waiting: its next acquire, or
    /// (its plan done) releasing everything and a new plan.
    fn step(&mut self, id: SessionId) {
        let client = self.client(id);
        if client.waiting.is_some() {
            return;
        }
        if client.next < client.plan.len() {
            let (name, mode) = client.plan[client.next];
            let request_id = client.next_request;
            client.next_request += 1;
            client.waiting = Some(request_id);
            let acquire = Acquire {
                session: id,
                request_id,
                name,
                mode,
                weight: 1,
                capacity: 0,
                wait: Wait::Forever,
                lease_ms: 0,
                reentrant: false,
                notify_queued: false,
            };
            self.apply(shard_for(name, SHARDS), Command::Acquire(acquire));
            return;
        }
        let held = std::mem::take(&mut client.held);
        let stopping = client.stopping;
        for name in held {
            let release = Command::Release {
                session: id,
                request_id: 0,
                name,
                token: 0,
            };
            self.apply(shard_for(name, SHARDS), release);
        }
        let plan = if stopping {
            Vec::new()
        } else {
            plan(&mut self.rng, id)
        };
        let client = self.client(id);
        client.plan = plan;
        client.next = 0;
    }

    fn step_someone(&mut self) {
        let id = 1 + self.rng.below(CLIENTS);
        self.step(id);
        self.now += self.rng.below(3);
    }

    /// Every table's edges at this instant.
    fn exact_edges(&self) -> Vec<ShardEdge> {
        let mut all = Vec::new();
        for (shard, table) in self.tables.iter().enumerate() {
            let mut edges = Vec::new();
            assert!(table.wait_edges(&mut edges, usize::MAX));
            all.extend(edges.into_iter().map(|e| (shard, e)));
        }
        all
    }

    /// A detection round: the shards read one at a time (in a random
    /// order, clients moving in between), then the verdicts, each checked
    /// against the graph as it is and applied.
    fn round(&mut self, interleave: bool) -> usize {
        let mut order: Vec<usize> = (0..SHARDS).collect();
        shuffle(&mut self.rng, &mut order);
        let mut edges = Vec::new();
        for shard in order {
            let mut part = Vec::new();
            assert!(self.tables[shard].wait_edges(&mut part, usize::MAX));
            edges.extend(part.into_iter().map(|e| (shard, e)));
            if interleave {
                for _ in 0..self.rng.below(3) {
                    self.step_someone();
                }
            }
        }
        let victims = self.detector.round(edges);
        for victim in &victims {
            self.check_real(victim);
            let queued = self.tables[victim.shard].queued_seq(victim.session, victim.request_id);
            assert_eq!(queued, Some(victim.seq), "the failed wait is gone");
            let fail = Command::FailWaiter {
                session: victim.session,
                request_id: victim.request_id,
                cycle: &victim.cycle,
            };
            self.apply(victim.shard, fail);
        }
        victims.len()
    }

    /// The victim's session is on a cycle of the graph as it is now, and
    /// no cycle through it has only multi-lock clients on it.
    fn check_real(&self, victim: &Victim) {
        let edges = self.exact_edges();
        let multi = |s: SessionId| s <= MULTI_CLIENTS;
        if multi(victim.session) {
            let mut seen = std::collections::HashSet::new();
            let mut frontier = vec![victim.session];
            while let Some(session) = frontier.pop() {
                for (_, e) in edges.iter().filter(|(_, e)| e.waiter == session) {
                    assert!(
                        !(multi(e.blocker) && e.blocker == victim.session),
                        "multi-locks deadlocked each other"
                    );
                    if multi(e.blocker) && seen.insert(e.blocker) {
                        frontier.push(e.blocker);
                    }
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        let mut frontier: Vec<SessionId> = edges
            .iter()
            .filter(|(_, e)| e.waiter == victim.session)
            .map(|(_, e)| e.blocker)
            .collect();
        while let Some(session) = frontier.pop() {
            if session == victim.session {
                return;
            }
            if seen.insert(session) {
                frontier.extend(
                    edges
                        .iter()
                        .filter(|(_, e)| e.waiter == session)
                        .map(|(_, e)| e.blocker),
                );
            }
        }
        panic!(
            "a wait that closes no cycle was failed: {}",
            String::from_utf8_lossy(&victim.cycle)
        );
    }

    fn run(&mut self, steps: usize) {
        for _ in 0..steps {
            if self.rng.below(8) == 0 {
                self.round(true);
            } else {
                self.step_someone();
            }
        }
        // The last phase: everyone finishes its plan and stops. Whoever
        // still waits then is deadlocked: two rounds find one cycle or
        // more, until nobody waits.
        for client in &mut self.clients {
            client.stopping = true;
        }
        let mut quiet_rounds = 0;
        loop {
            let mut moved = true;
            while moved {
                moved = false;
                for id in 1..=CLIENTS {
                    let before = (self.client(id).next, self.client(id).plan.len());
                    self.step(id);
                    moved |= before != (self.client(id).next, self.client(id).plan.len());
                }
            }
            if self.clients.iter().all(|c| c.waiting.is_none()) {
                break;
            }
            if self.round(false) == 0 {
                quiet_rounds += 1;
                assert!(
                    quiet_rounds <= 2,
                    "deadlocked clients not found: {:?}",
                    self.clients
                        .iter()
                        .map(|c| (c.id, c.waiting))
                        .collect::<Vec<_>>()
                );
            } else {
                quiet_rounds = 0;
            }
        }
        for table in &self.tables {
            table.check_invariants();
            assert_eq!(table.lock_count(), 0);
        }
    }
}

fn shuffle<T>(rng: &mut Rng, items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

/// 2 or 3 distinct names, mostly exclusive: in a random order, or (a
/// multi-lock client's) in byte order.
fn plan(rng: &mut Rng, client: SessionId) -> Vec<(&'static [u8], Mode)> {
    let mut names: Vec<&'static [u8]> = NAMES.to_vec();
    shuffle(rng, &mut names);
    let count = 2 + rng.below(2) as usize;
    names.truncate(count);
    if client <= MULTI_CLIENTS {
        names.sort_unstable();
    }
    names
        .into_iter()
        .map(|name| {
            let mode = if rng.below(4) == 0 {
                Mode::Shared
            } else {
                Mode::Exclusive
            };
            (name, mode)
        })
        .collect()
}

#[test]
fn every_deadlock_is_found_and_nothing_else() {
    let (mut deadlocks, mut grants) = (0, 0);
    for seed in 0..200 {
        let mut sim = Sim::new(seed);
        sim.run(2_000);
        deadlocks += sim.deadlocks;
        grants += sim.grants;
    }
    println!("200 seeds: {grants} grants, {deadlocks} deadlocks broken");
    assert!(
        deadlocks > 100,
        "too few deadlocks to test anything: {deadlocks}"
    );
}
