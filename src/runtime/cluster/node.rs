//! The raft thread of a cluster node: one raft-rs `RawNode` over the
//! node's raft-engine log, stepping peers' messages, ticking, persisting
//! what `Ready` asks (one fsync'd write) and sending what it says.
//!
//! As a follower it applies every committed entry to a `Replay` of the
//! state (pure: `journal`). When it leads and has applied every entry
//! committed before its term, it hands the replayed state to the server
//! (`Event::Promoted`), which restores it and sends back the base entry to
//! propose first; from then on it proposes the loops' batches
//! (`LogShared`, group commit as with one node) and moves `durable` as a
//! majority stores them. A leader that loses office ends the process (its
//! held output never leaves; its clients reconnect to the new leader).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use raft::eraftpb::{ConfState, Entry, Message};
use raft::storage::MemStorage;
use raft::{Config as RaftConfig, RawNode, StateRole};

use super::transport::Links;
use crate::dump::Dump;
use crate::journal::Replay;
use crate::raft_log::{LogShared, Store};
use crate::snapshot;

/// One raft tick.
pub const TICK: Duration = Duration::from_millis(50);
/// Ticks without a leader's word before a follower stands for election
/// (randomised up to twice this), and a leader without a quorum's steps
/// down (check-quorum): 0.5 to 1 s.
const ELECTION_TICKS: usize = 10;
const HEARTBEAT_TICKS: usize = 2;
/// How long a leader asked to stop tries to hand over before it just goes.
const TRANSFER_MAX: Duration = Duration::from_secs(3);

/// What the server learns from the node.
pub enum Event {
    /// This node leads and holds every committed change: the state to
    /// serve from (settled: sessions that had ended are gone).
    Promoted { state: Dump },
}

/// What the node shows (the proxy, status, metrics).
#[derive(Debug, Default)]
pub struct NodeStatus {
    pub leader: AtomicU64,
    pub term: AtomicU64,
    pub commit: AtomicU64,
    pub applied: AtomicU64,
    /// This node leads and serves (its base entry is proposed).
    pub serving: AtomicBool,
}

/// What the server hands back at promotion: the base entry to propose
/// first, and how to wake the loops when `durable` moves.
pub struct Base {
    pub entry: Vec<u8>,
    pub wake_loops: Box<dyn Fn() + Send>,
}

/// The running node, as the server holds it.
pub struct NodeHandle {
    pub status: Arc<NodeStatus>,
    pub events: Receiver<Event>,
    base_tx: Sender<Base>,
    stop: Arc<AtomicBool>,
}

impl NodeHandle {
    /// What the server calls with its base entry: the node proposes it and
    /// starts taking the loops' batches.
    pub fn server_hook(&self) -> Box<dyn FnOnce(Base)> {
        let tx = self.base_tx.clone();
        Box::new(move |base| {
            let _ = tx.send(base);
        })
    }

    /// SIGTERM: a leader hands office to an up-to-date follower, then the
    /// process exits (a follower exits at once).
    pub fn stopper(&self) -> impl Fn() + Send + Sync + 'static {
        let stop = self.stop.clone();
        move || stop.store(true, Ordering::SeqCst)
    }
}

/// Everything the node starts from.
pub struct NodeStart {
    pub id: u64,
    pub voters: Vec<u64>,
    pub store: Store,
    pub hard_state: raft::eraftpb::HardState,
    pub log: Arc<LogShared>,
    pub links: Links,
    pub inbox: Receiver<Message>,
}

/// Loads the stored log into raft's memory and starts the thread.
pub fn start(start: NodeStart) -> Result<NodeHandle, String> {
    let NodeStart {
        id,
        voters,
        store,
        hard_state,
        log,
        links,
        inbox,
    } = start;
    let storage = MemStorage::new_with_conf_state(ConfState::from((voters, vec![])));
    {
        let entries = crate::raft_log::read_entries(&store.engine, 1)?;
        let mut core = storage.wl();
        if let Some(first) = entries.first() {
            if first.index != 1 {
                return Err(format!(
                    "the log starts at entry {} (a cluster node keeps its whole log)",
                    first.index
                ));
            }
        }
        core.append(&entries).map_err(|e| format!("raft: {e}"))?;
        core.set_hardstate(hard_state);
    }
    let config = RaftConfig {
        id,
        election_tick: ELECTION_TICKS,
        heartbeat_tick: HEARTBEAT_TICKS,
        check_quorum: true,
        pre_vote: true,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        applied: 0,
        ..RaftConfig::default()
    };
    config.validate().map_err(|e| format!("raft: {e}"))?;
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let raw = RawNode::new(&config, storage, &logger).map_err(|e| format!("raft: {e}"))?;
    let status = Arc::new(NodeStatus::default());
    let (events_tx, events) = crossbeam_channel::bounded(1);
    let (base_tx, base_rx) = crossbeam_channel::bounded(1);
    let stop = Arc::new(AtomicBool::new(false));
    let mut node = Node {
        raw,
        store,
        log: log.clone(),
        links,
        inbox,
        replay: Some(Replay::empty()),
        status: status.clone(),
        events: events_tx,
        base_rx,
        wake_loops: None,
        promoted: false,
        uncommitted: VecDeque::new(),
        taken: 0,
        stop: stop.clone(),
        stopping_since: None,
    };
    let thread = thread::Builder::new()
        .name("livelock-raft".into())
        .spawn(move || node.run())
        .map_err(|e| format!("cannot start the raft thread: {e}"))?;
    log.set_thread(thread.thread().clone());
    Ok(NodeHandle {
        status,
        events,
        base_tx,
        stop,
    })
}

struct Node {
    raw: RawNode<MemStorage>,
    store: Store,
    log: Arc<LogShared>,
    links: Links,
    inbox: Receiver<Message>,
    /// The state of the committed log (until this node serves).
    replay: Option<Replay>,
    status: Arc<NodeStatus>,
    events: Sender<Event>,
    base_rx: Receiver<Base>,
    wake_loops: Option<Box<dyn Fn() + Send>>,
    /// The state went to the server (`Event::Promoted`).
    promoted: bool,
    /// (log index, batch sequence number) of proposals not yet committed.
    uncommitted: VecDeque<(u64, u64)>,
    /// The sequence number of the last batch proposed.
    taken: u64,
    stop: Arc<AtomicBool>,
    stopping_since: Option<Instant>,
}

impl Node {
    fn run(&mut self) {
        let mut next_tick = Instant::now() + TICK;
        let mut spare = Vec::new();
        loop {
            while let Ok(message) = self.inbox.try_recv() {
                // A message of an old term or a stranger is refused by raft
                // itself; nothing a peer sends stops the node.
                let _ = self.raw.step(message);
            }
            if Instant::now() >= next_tick {
                self.raw.tick();
                next_tick = Instant::now() + TICK;
            }
            if self.stop.load(Ordering::SeqCst) {
                self.hand_over();
            }
            let leader = self.raw.raft.state == StateRole::Leader;
            if self.promoted && !leader {
                self.deposed();
            }
            if leader && self.wake_loops.is_none() {
                if let Ok(base) = self.base_rx.try_recv() {
                    if let Err(e) = self.raw.propose(Vec::new(), base.entry) {
                        tracing::error!("raft refused the base entry: {e}");
                        self.deposed();
                    }
                    self.wake_loops = Some(base.wake_loops);
                    self.status.serving.store(true, Ordering::SeqCst);
                    tracing::info!(
                        term = self.raw.raft.term,
                        "serving as the leader (base entry {} proposed)",
                        self.raw.raft.raft_log.last_index()
                    );
                }
            }
            let mut proposed = false;
            if leader && self.wake_loops.is_some() {
                let (data, seq) = self.log.take_queued(std::mem::take(&mut spare));
                if seq <= self.taken {
                    spare = data;
                } else {
                    // (Empty: read barriers only; an empty entry still
                    // takes a quorum round.)
                    self.taken = seq;
                    if let Err(e) = self.raw.propose(Vec::new(), data) {
                        tracing::error!("raft refused a proposal: {e}");
                        self.deposed();
                    }
                    self.uncommitted
                        .push_back((self.raw.raft.raft_log.last_index(), seq));
                    proposed = true;
                }
            }
            let busy = self.raw.has_ready();
            if busy && !self.handle_ready() {
                // The log cannot be written: this node cannot take part.
                tracing::error!("the log failed; this node stops");
                std::process::exit(1);
            }
            self.release_durable();
            self.maybe_promote();
            self.publish();
            if !busy && !proposed && self.inbox.is_empty() {
                thread::park_timeout(next_tick.saturating_duration_since(Instant::now()));
            }
        }
    }

    /// Persists and sends what raft asks; applies committed entries.
    fn handle_ready(&mut self) -> bool {
        let mut ready = self.raw.ready();
        for message in ready.take_messages() {
            self.links.send(message);
        }
        if !ready.snapshot().is_empty() {
            // Nodes keep their whole log: no snapshot is ever sent.
            tracing::error!("a raft snapshot arrived, which this version does not take");
            std::process::exit(1);
        }
        let committed = ready.take_committed_entries();
        self.apply(&committed);
        if (!ready.entries().is_empty() || ready.hs().is_some())
            && !self.store.persist(&self.log, ready.entries(), ready.hs())
        {
            return false;
        }
        let storage = self.raw.raft.raft_log.store.clone();
        {
            let mut core = storage.wl();
            if core.append(ready.entries()).is_err() {
                return false;
            }
            if let Some(hs) = ready.hs() {
                core.set_hardstate(hs.clone());
            }
        }
        for message in ready.take_persisted_messages() {
            self.links.send(message);
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            storage.wl().mut_hard_state().set_commit(commit);
        }
        for message in light.take_messages() {
            self.links.send(message);
        }
        let committed = light.take_committed_entries();
        self.apply(&committed);
        self.raw.advance_apply();
        true
    }

    /// Committed entries go into the replayed state, until this node
    /// serves (then its loops have the state).
    fn apply(&mut self, entries: &[Entry]) {
        let Some(replay) = &mut self.replay else {
            return;
        };
        for entry in entries {
            if entry.get_entry_type() != raft::eraftpb::EntryType::EntryNormal {
                continue;
            }
            if let Err(e) = replay.apply_committed(entry.index, &entry.data) {
                // Every node applies the same entries: this is a bug or a
                // damaged log, and serving on would be wrong.
                tracing::error!("committed entry {}: {e}; stopping", entry.index);
                std::process::exit(1);
            }
        }
    }

    /// Moves `durable` past the batches whose entries are committed.
    fn release_durable(&mut self) {
        let committed = self.raw.raft.raft_log.committed;
        let mut durable = None;
        while self
            .uncommitted
            .front()
            .is_some_and(|&(index, _)| index <= committed)
        {
            durable = self.uncommitted.pop_front().map(|(_, seq)| seq);
        }
        if let Some(seq) = durable {
            self.log.set_durable(seq);
            if let Some(wake) = &self.wake_loops {
                wake();
            }
        }
    }

    /// A leader whose own first entry is committed and applied has every
    /// change ever acknowledged: it hands the state over (once).
    fn maybe_promote(&mut self) {
        if self.promoted || self.raw.raft.state != StateRole::Leader {
            return;
        }
        let raft_log = &self.raw.raft.raft_log;
        let committed = raft_log.committed;
        if raft_log.term(committed).unwrap_or(0) != self.raw.raft.term
            || raft_log.applied < committed
        {
            return;
        }
        let term = self.raw.raft.term;
        let Some(replay) = self.replay.take() else {
            return;
        };
        let state = snapshot::settle(replay.finish(committed, term));
        tracing::info!(
            term,
            "elected leader at entry {committed}: {} session(s), {} hold(s), {} queued",
            state.sessions.len(),
            state.holds.len(),
            state.waiters.len()
        );
        self.promoted = true;
        let _ = self.events.send(Event::Promoted { state });
    }

    /// A leader that lost office (or was asked to stop) ends the process:
    /// nothing it did not get committed was acknowledged.
    fn deposed(&mut self) -> ! {
        let asked = self.stop.load(Ordering::SeqCst);
        tracing::warn!(
            term = self.raw.raft.term,
            leader = self.raw.raft.leader_id,
            "no longer the leader; exiting (clients reconnect to the new leader{})",
            match asked {
                true => "",
                false => ", and a supervisor restarts this node as a follower",
            }
        );
        std::process::exit(if asked { 0 } else { 3 });
    }

    /// Stopping: a leader hands over to the follower with the most of the
    /// log (retried each tick), for at most TRANSFER_MAX; a follower just
    /// goes.
    fn hand_over(&mut self) {
        let since = *self.stopping_since.get_or_insert_with(Instant::now);
        if self.raw.raft.state != StateRole::Leader || since.elapsed() > TRANSFER_MAX {
            if self.promoted {
                self.deposed();
            }
            tracing::info!("stopping");
            std::process::exit(0);
        }
        let me = self.raw.raft.id;
        let best = self
            .raw
            .raft
            .prs()
            .iter()
            .filter(|(&id, _)| id != me)
            .max_by_key(|(_, progress)| progress.matched)
            .map(|(&id, _)| id);
        if let Some(id) = best {
            if self.raw.raft.lead_transferee != Some(id) {
                tracing::info!("handing leadership to node {id} before stopping");
                self.raw.transfer_leader(id);
            }
        }
    }

    fn publish(&self) {
        let raft = &self.raw.raft;
        self.status.leader.store(raft.leader_id, Ordering::Relaxed);
        self.status.term.store(raft.term, Ordering::Relaxed);
        self.status
            .commit
            .store(raft.raft_log.committed, Ordering::Relaxed);
        self.status
            .applied
            .store(raft.raft_log.applied, Ordering::Relaxed);
    }
}
