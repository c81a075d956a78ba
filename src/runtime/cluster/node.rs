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
//! majority stores them. A leader that loses office restarts the process as
//! a follower (`restart_as_follower`: its held output never leaves; its
//! clients reconnect to the new leader).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use raft::eraftpb::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState, Entry,
    EntryType, Message, MessageType, Snapshot,
};
use raft::{Config as RaftConfig, ProgressState, RawNode, SnapshotStatus, StateRole};
use std::net::SocketAddr;

use super::storage::ClusterStorage;
use super::transport::Links;
use crate::dump::{self, Dump};
use crate::journal::Replay;
use crate::protocol::{ClusterChange, ClusterMember, ClusterReply, MemberChange};
use crate::raft_log::{self, LogShared, SnapshotJob, SnapshotPart, Store, Uncommitted};
use crate::snapshot;

/// One raft tick.
pub const TICK: Duration = Duration::from_millis(50);
/// A leader's heartbeat, in ticks.
const HEARTBEAT_TICKS: usize = 2;
/// How long a leader asked to stop tries to hand over before it just goes.
const TRANSFER_MAX: Duration = Duration::from_secs(3);
/// The longest a stopping node waits for its last messages to be sent.
const FLUSH_MAX: Duration = Duration::from_millis(400);
/// Operators' changes waiting for the raft thread.
const CHANGES_MAX: usize = 16;
/// A snapshot sent that no follower acknowledged within this is sent again.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(10);

/// What a deposed leader logs as it restarts as a follower.
pub const RESTARTING: &str = "no longer the leader; restarting as a follower";

/// What the server learns from the node.
pub enum Event {
    /// This node leads and holds every committed change: the state to
    /// serve from (settled: sessions that had ended are gone).
    Promoted { state: Dump },
}

/// What the node shows (the proxy, status, metrics), and the operators'
/// changes on their way to it.
#[derive(Debug)]
pub struct NodeStatus {
    pub id: u64,
    pub leader: AtomicU64,
    pub term: AtomicU64,
    pub commit: AtomicU64,
    pub applied: AtomicU64,
    /// This node leads and serves (its base entry is proposed).
    pub serving: AtomicBool,
    /// As the leader sees them, once a tick.
    members: Mutex<Members>,
    /// Members' client addresses.
    pub directory: Arc<super::transport::Directory>,
    changes: (Sender<ClusterChange>, Receiver<ClusterChange>),
}

impl NodeStatus {
    fn new(id: u64, directory: Arc<super::transport::Directory>) -> NodeStatus {
        NodeStatus {
            id,
            leader: AtomicU64::new(0),
            term: AtomicU64::new(0),
            commit: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            serving: AtomicBool::new(false),
            members: Mutex::new(Members::default()),
            directory,
            changes: crossbeam_channel::bounded(CHANGES_MAX),
        }
    }

    /// Hands an operator's change to the raft thread; false if too many
    /// wait already.
    pub fn ask(&self, change: ClusterChange) -> bool {
        self.changes.0.try_send(change).is_ok()
    }

    /// The CLUSTER_STATUS reply: one view of the leader's (its commit and
    /// applied index as of the members' progress, so a member's lag is
    /// never against a commit index newer than what it is compared with).
    pub fn reply(&self) -> ClusterReply {
        let view = self.members.lock().expect("status lock");
        let (commit, applied) = match view.rows.is_empty() {
            true => (
                self.commit.load(Ordering::Relaxed),
                self.applied.load(Ordering::Relaxed),
            ),
            false => (view.commit, view.applied),
        };
        let members = view
            .rows
            .iter()
            .map(|&(id, matched, state, active)| ClusterMember {
                id,
                matched,
                state,
                active,
                client_addr: self
                    .directory
                    .client_addr(id)
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            })
            .collect();
        ClusterReply {
            node: self.id,
            term: self.term.load(Ordering::Relaxed),
            commit,
            applied,
            members,
        }
    }
}

/// The members' progress as the leader saw it, with its commit and
/// applied index at that moment.
#[derive(Debug, Default)]
struct Members {
    commit: u64,
    applied: u64,
    /// (id, matched, state, active).
    rows: Vec<(u64, u64, u8, bool)>,
}

/// What the server hands back at promotion: the base entry to propose
/// first, how to wake the loops when `durable` moves, and how to ask them
/// for their parts of a snapshot (`loops` of them).
pub struct Base {
    pub entry: Vec<u8>,
    pub wake_loops: Box<dyn Fn() + Send>,
    pub ask_loops: Box<dyn Fn() + Send>,
    pub loops: usize,
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
    /// The voters (from the stored membership, else `--peers`; none for a
    /// node that joins) and every member's peer address.
    pub conf_state: ConfState,
    pub members: BTreeMap<u64, SocketAddr>,
    pub store: Store,
    pub hard_state: raft::eraftpb::HardState,
    /// The node's last snapshot (its dump file, with a log position).
    pub snapshot: Option<Dump>,
    pub data_dir: PathBuf,
    pub snapshot_log_bytes: u64,
    pub election_timeout: Duration,
    pub log: Arc<LogShared>,
    /// The loops' parts of a snapshot, once this node leads.
    pub parts: Receiver<SnapshotPart>,
    pub links: Links,
    pub inbox: Receiver<Message>,
    pub directory: Arc<super::transport::Directory>,
}

/// Loads the stored log into raft's memory and starts the thread.
pub fn start(start: NodeStart) -> Result<NodeHandle, String> {
    let NodeStart {
        id,
        conf_state,
        members,
        store,
        hard_state,
        snapshot,
        data_dir,
        snapshot_log_bytes,
        election_timeout,
        log,
        parts,
        links,
        inbox,
        directory,
    } = start;
    remove_pending(&data_dir);
    // The node's own snapshot, then the stored entries after it.
    let (replay, raft_snapshot) = match &snapshot {
        Some(state) => {
            let position = state.log.as_ref().expect("checked by the caller");
            let replay = Replay::from_snapshot(state).map_err(|e| e.to_string())?;
            let mut raft_snapshot = Snapshot {
                data: dump::encode(state).into(),
                ..Snapshot::default()
            };
            let meta = raft_snapshot.mut_metadata();
            meta.index = position.index;
            meta.term = position.term;
            meta.set_conf_state(conf_state.clone());
            (replay, raft_snapshot)
        }
        None => (Replay::empty(), Snapshot::default()),
    };
    let applied = raft_snapshot.get_metadata().index;
    let entries = raft_log::read_entries(&store.engine, applied + 1)?;
    if let Some(first) = entries.first() {
        if first.index > applied + 1 {
            return Err(format!(
                "the log starts at entry {} but the snapshot covers only up to {applied}",
                first.index
            ));
        }
    }
    let storage = ClusterStorage::new(raft_snapshot, entries, hard_state, conf_state);
    let config = RaftConfig {
        id,
        // Ticks without a leader's word before a follower stands for
        // election (randomised up to twice this), and without a quorum's
        // before a leader steps down (check-quorum).
        election_tick: (election_timeout.as_millis() / TICK.as_millis()).max(3) as usize,
        heartbeat_tick: HEARTBEAT_TICKS,
        check_quorum: true,
        pre_vote: true,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        applied,
        ..RaftConfig::default()
    };
    config.validate().map_err(|e| format!("raft: {e}"))?;
    let logger = slog::Logger::root(RaftLog, slog::o!("node" => id));
    let raw = RawNode::new(&config, storage.clone(), &logger).map_err(|e| format!("raft: {e}"))?;
    let status = Arc::new(NodeStatus::new(id, directory));
    let (events_tx, events) = crossbeam_channel::bounded(1);
    let (base_tx, base_rx) = crossbeam_channel::bounded(1);
    let stop = Arc::new(AtomicBool::new(false));
    let mut node = Node {
        members,
        raw,
        storage,
        store,
        log: log.clone(),
        links,
        inbox,
        replay: Some(replay),
        dump_path: data_dir.join(dump::FILE_NAME),
        snapshot_log_bytes,
        since_snapshot: 0,
        written: Arc::new(Mutex::new(None)),
        parts: Some(parts),
        jobs: None,
        follower_jobs: None,
        snapshots_sent: HashMap::new(),
        status: status.clone(),
        events: events_tx,
        base_rx,
        wake_loops: None,
        promoted: false,
        uncommitted: Uncommitted::default(),
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

/// The last snapshot written, until compacted to, and whether it is a
/// leader's waiting in its pending file (it becomes the dump file once every
/// batch it holds is committed; a follower's, replayed from committed
/// entries, is written as the dump file at once).
type Written = Arc<Mutex<Option<(raft_log::Written, bool)>>>;

/// Where a leader's snapshot at `index` waits until every batch in it is
/// committed.
fn pending_path(data_dir: &std::path::Path, index: u64) -> PathBuf {
    data_dir.join(format!("{PENDING_PREFIX}{index}"))
}

const PENDING_PREFIX: &str = "livelock.dump.pending.";

/// Snapshots a leader wrote that never became its dump file (it lost
/// office, or stopped, first) are deleted at start.
fn remove_pending(data_dir: &std::path::Path) {
    let Ok(dir) = std::fs::read_dir(data_dir) else {
        return;
    };
    for entry in dir.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(PENDING_PREFIX)
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The leader's snapshot thread's jobs, and what asks the loops for parts.
type LeaderSnapshots = (Sender<SnapshotJob>, Box<dyn Fn() + Send>);

struct Node {
    /// Every member's peer address (stored with the membership).
    members: BTreeMap<u64, SocketAddr>,
    raw: RawNode<ClusterStorage>,
    /// What raft reads (the node writes it after each persisted Ready).
    storage: ClusterStorage,
    store: Store,
    log: Arc<LogShared>,
    links: Links,
    inbox: Receiver<Message>,
    /// The state of the committed log (until this node serves).
    replay: Option<Replay>,
    dump_path: PathBuf,
    snapshot_log_bytes: u64,
    /// Bytes logged (leader) or applied (follower) since the last snapshot.
    since_snapshot: u64,
    /// The last snapshot written (index, term, bytes), not yet compacted to.
    written: Written,
    /// The loops' parts, until the leader's snapshot thread takes them.
    parts: Option<Receiver<SnapshotPart>>,
    /// The leader's snapshot thread, and how to ask the loops for parts.
    jobs: Option<LeaderSnapshots>,
    /// A follower's snapshot writer.
    follower_jobs: Option<Sender<(u64, u64, Dump)>>,
    /// Snapshots sent, by follower, to send again if never acknowledged.
    snapshots_sent: HashMap<u64, Instant>,
    status: Arc<NodeStatus>,
    events: Sender<Event>,
    base_rx: Receiver<Base>,
    wake_loops: Option<Box<dyn Fn() + Send>>,
    /// The state went to the server (`Event::Promoted`).
    promoted: bool,
    /// (log index, batch sequence number) of proposals not yet committed.
    uncommitted: Uncommitted,
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
            // Acknowledgements just stepped may commit entries: their
            // output leaves now, not after the next proposal's fsync.
            self.release_durable();
            if Instant::now() >= next_tick {
                self.raw.tick();
                next_tick = Instant::now() + TICK;
                // (Once a tick: it locks and allocates.)
                self.publish_members();
            }
            if self.stop.load(Ordering::SeqCst) {
                self.hand_over();
            }
            let leader = self.raw.raft.state == StateRole::Leader;
            if self.promoted && !leader {
                self.deposed();
            }
            while let Ok(change) = self.status.changes.1.try_recv() {
                self.ask(change);
            }
            if leader && self.wake_loops.is_none() {
                if let Ok(base) = self.base_rx.try_recv() {
                    if let Err(e) = self.raw.propose(Vec::new(), base.entry) {
                        tracing::error!("raft refused the base entry: {e}");
                        self.deposed();
                    }
                    self.wake_loops = Some(base.wake_loops);
                    self.start_leader_snapshots(base.loops, base.ask_loops);
                    self.status.serving.store(true, Ordering::SeqCst);
                    tracing::info!(
                        term = self.raw.raft.term,
                        "serving as the leader (base entry {} proposed)",
                        self.raw.raft.raft_log.last_index()
                    );
                }
            }
            let mut proposed = false;
            // While leadership is being handed over raft takes no proposal:
            // the batches wait in the queue (and their output with them).
            let transferring = self.raw.raft.lead_transferee.is_some();
            if leader && self.wake_loops.is_some() && !transferring {
                let (data, seq) = self.log.take_queued(std::mem::take(&mut spare));
                if seq <= self.taken {
                    spare = data;
                } else {
                    // (Empty: read barriers only; an empty entry still
                    // takes a quorum round.)
                    self.taken = seq;
                    let len = data.len() as u64;
                    if let Err(e) = self.raw.propose(Vec::new(), data) {
                        tracing::error!("raft refused a proposal: {e}");
                        self.deposed();
                    }
                    self.uncommitted
                        .push(self.raw.raft.raft_log.last_index(), seq);
                    proposed = true;
                    self.maybe_snapshot_as_leader(len);
                }
            }
            let busy = self.raw.has_ready();
            if busy && !self.handle_ready() {
                // The log cannot be written: this node cannot take part.
                tracing::error!("the log failed; this node stops");
                std::process::exit(1);
            }
            self.release_durable();
            self.compact();
            self.retry_snapshots();
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
            self.send(message);
        }
        if !ready.snapshot().is_empty() && !self.install(ready.snapshot().clone()) {
            return false;
        }
        let committed = ready.take_committed_entries();
        self.apply(&committed);
        if (!ready.entries().is_empty() || ready.hs().is_some())
            && !self.store.persist(&self.log, ready.entries(), ready.hs())
        {
            return false;
        }
        {
            let mut core = self.storage.wl();
            core.append(ready.entries());
            if let Some(hs) = ready.hs() {
                core.set_hard_state(hs.clone());
            }
        }
        for message in ready.take_persisted_messages() {
            self.send(message);
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.storage.wl().set_commit(commit);
        }
        for message in light.take_messages() {
            self.send(message);
        }
        let committed = light.take_committed_entries();
        self.apply(&committed);
        self.raw.advance_apply();
        true
    }

    /// Committed entries go into the replayed state, until this node
    /// serves (then its loops have the state).
    fn apply(&mut self, entries: &[Entry]) {
        for entry in entries {
            if entry.get_entry_type() != raft::eraftpb::EntryType::EntryNormal {
                self.apply_conf_change(entry);
                continue;
            }
            let Some(replay) = &mut self.replay else {
                continue;
            };
            if let Err(e) = replay.apply_committed(entry.index, &entry.data) {
                // Every node applies the same entries: this is a bug or a
                // damaged log, and serving on would be wrong.
                tracing::error!("committed entry {}: {e}; stopping", entry.index);
                std::process::exit(1);
            }
            self.since_snapshot += entry.data.len() as u64;
        }
        let (Some(last), Some(replay)) = (entries.last(), &self.replay) else {
            return;
        };
        // A follower snapshots its replayed state as the leader does its
        // loops', so its log stays bounded too.
        if self.since_snapshot >= self.snapshot_log_bytes
            && !self.log.snapshot_pending.swap(true, Ordering::SeqCst)
        {
            self.since_snapshot = 0;
            let state = replay.snapshot(last.index, last.term);
            let writer = self.follower_jobs.get_or_insert_with(|| {
                let (tx, rx) = crossbeam_channel::bounded::<(u64, u64, Dump)>(1);
                let (log, path, written) = (
                    self.log.clone(),
                    self.dump_path.clone(),
                    self.written.clone(),
                );
                thread::Builder::new()
                    .name("livelock-snapshot".into())
                    .spawn(move || {
                        for (index, term, state) in rx {
                            write_follower_snapshot(&log, &path, &written, index, term, &state);
                        }
                    })
                    .expect("start the snapshot thread");
                tx
            });
            let _ = writer.try_send((last.index, last.term, state));
        }
    }

    /// A committed membership change: raft's configuration, the peer
    /// links and the stored membership follow it; a node removed leaves.
    fn apply_conf_change(&mut self, entry: &Entry) {
        use protobuf::Message as _;
        // (This node proposes only version 2 changes.)
        let change = match entry.get_entry_type() {
            EntryType::EntryConfChangeV2 => {
                ConfChangeV2::parse_from_bytes(&entry.data).map_err(|e| e.to_string())
            }
            _ => Err("a version 1 change".to_string()),
        };
        let change = match change {
            Ok(change) => change,
            Err(e) => {
                tracing::error!(
                    "committed entry {}: a bad membership change ({e}); stopping",
                    entry.index
                );
                std::process::exit(1);
            }
        };
        let conf_state = match self.raw.apply_conf_change(&change) {
            Ok(conf_state) => conf_state,
            Err(e) => {
                tracing::error!(
                    "committed entry {}: membership change refused: {e}; stopping",
                    entry.index
                );
                std::process::exit(1);
            }
        };
        // The addresses of the members added ride in the context.
        for (id, addr) in parse_members(&String::from_utf8_lossy(&entry.context)) {
            self.members.insert(id, addr);
            self.links.set(id, addr);
        }
        let current: Vec<u64> = conf_state
            .voters
            .iter()
            .chain(&conf_state.voters_outgoing)
            .copied()
            .collect();
        self.members.retain(|id, _| current.contains(id));
        for id in self.links.peers().into_keys() {
            if !current.contains(&id) {
                self.links.remove(id);
            }
        }
        self.storage.wl().set_conf_state(conf_state.clone());
        if let Err(e) = self.store.put_membership(&conf_state, &self.members) {
            tracing::error!("cannot store the membership: {e}; stopping");
            std::process::exit(1);
        }
        tracing::info!(
            "membership now: voters {:?}{}",
            conf_state.voters,
            match conf_state.voters_outgoing.is_empty() {
                true => String::new(),
                false => format!(" (joint with {:?})", conf_state.voters_outgoing),
            }
        );
        if !current.contains(&self.raw.raft.id) {
            tracing::warn!("this node was removed from the cluster; exiting");
            std::process::exit(0);
        }
        // A member just added is sent a snapshot that knows it: take one.
        if self.jobs.is_some() {
            self.since_snapshot = self.snapshot_log_bytes;
            self.maybe_snapshot_as_leader(0);
        }
    }

    /// An operator's change, on the leader: proposed (added members get a
    /// link at once, so they are caught up as soon as they count).
    fn ask(&mut self, change: ClusterChange) {
        if self.raw.raft.state != StateRole::Leader {
            tracing::warn!("a cluster change arrived after this node stopped leading; dropped");
            return;
        }
        match change {
            ClusterChange::Transfer(id) => {
                tracing::info!("handing leadership to node {id}, as asked");
                self.raw.transfer_leader(id);
            }
            ClusterChange::Members(changes) => {
                let mut cc = ConfChangeV2::default();
                let mut context = Vec::new();
                for change in &changes {
                    let single = match change {
                        MemberChange::Add { id, peer_addr } => {
                            match peer_addr.parse::<SocketAddr>() {
                                Ok(addr) => {
                                    self.links.set(*id, addr);
                                    context.push(format!("{id}={addr}"));
                                }
                                Err(_) => {
                                    tracing::warn!("member {id}: {peer_addr:?} is not HOST:PORT; change dropped");
                                    return;
                                }
                            }
                            single(*id, ConfChangeType::AddNode)
                        }
                        MemberChange::Remove { id } => single(*id, ConfChangeType::RemoveNode),
                    };
                    cc.mut_changes().push(single);
                }
                // Several changes at once go through joint consensus, left
                // automatically once the joint configuration is committed.
                cc.set_transition(ConfChangeTransition::Auto);
                match self
                    .raw
                    .propose_conf_change(context.join(",").into_bytes(), cc)
                {
                    Ok(()) => tracing::info!(?changes, "membership change proposed"),
                    Err(e) => tracing::warn!(?changes, "membership change refused: {e}"),
                }
            }
        }
    }

    /// Sends a message; a snapshot sent is noted (to send again if lost).
    fn send(&mut self, message: Message) {
        if message.get_msg_type() == MessageType::MsgSnapshot {
            tracing::info!(
                "sending node {} a snapshot at entry {} ({} bytes)",
                message.to,
                message.get_snapshot().get_metadata().index,
                message.get_snapshot().data.len()
            );
            self.snapshots_sent.insert(message.to, Instant::now());
        }
        self.links.send(message);
    }

    /// A snapshot whose follower never caught up with it is reported
    /// failed, so raft sends it again (the link may have dropped it).
    fn retry_snapshots(&mut self) {
        if self.snapshots_sent.is_empty() {
            return;
        }
        let mut failed = Vec::new();
        for (&id, sent) in &self.snapshots_sent {
            let still = self
                .raw
                .raft
                .prs()
                .get(id)
                .is_some_and(|p| p.state == ProgressState::Snapshot);
            if !still {
                failed.push((id, false));
            } else if sent.elapsed() > SNAPSHOT_RETRY {
                failed.push((id, true));
            }
        }
        for (id, resend) in failed {
            self.snapshots_sent.remove(&id);
            if resend {
                self.raw.report_snapshot(id, SnapshotStatus::Failure);
            }
        }
    }

    /// Installs a snapshot from the leader: the replayed state becomes it,
    /// it is this node's snapshot file, and the stored log is replaced.
    fn install(&mut self, snapshot: Snapshot) -> bool {
        let meta = snapshot.get_metadata();
        let mut state = match dump::decode(&snapshot.data) {
            Ok(state) => state,
            Err(e) => {
                tracing::error!("a snapshot from the leader does not decode: {e}; stopping");
                std::process::exit(1);
            }
        };
        match &mut state.log {
            Some(log) => log.index = meta.index,
            None => {
                tracing::error!("a snapshot from the leader has no log position; stopping");
                std::process::exit(1);
            }
        }
        match Replay::from_snapshot(&state) {
            Ok(replay) => self.replay = Some(replay),
            Err(e) => {
                tracing::error!("a snapshot from the leader: {e}; stopping");
                std::process::exit(1);
            }
        }
        // The file first: a crash after it restarts from the snapshot.
        if let Err(e) = crate::data_dir::write_atomic(&self.dump_path, &snapshot.data) {
            tracing::error!("cannot write {}: {e}", self.dump_path.display());
            return false;
        }
        if !self
            .store
            .replace_all(&self.log, &self.raw.raft.hard_state())
        {
            return false;
        }
        tracing::info!(
            "installed the leader's snapshot at entry {} ({} bytes): {} session(s), {} hold(s)",
            meta.index,
            snapshot.data.len(),
            state.sessions.len(),
            state.holds.len()
        );
        self.since_snapshot = 0;
        self.storage.wl().install(snapshot);
        true
    }

    /// The leader's snapshots: the loops export their parts, a thread
    /// writes the file (as with one node) and hands the bytes back.
    fn start_leader_snapshots(&mut self, loops: usize, ask_loops: Box<dyn Fn() + Send>) {
        let Some(parts) = self.parts.take() else {
            return;
        };
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded();
        // Written aside: it may hold batches of entries not yet committed
        // (a leader cut off goes on taking changes until it learns), and a
        // restart must not start from them.
        let data_dir = crate::data_dir::parent_dir(&self.dump_path).to_path_buf();
        let (log, written, dir) = (self.log.clone(), self.written.clone(), data_dir.clone());
        let on_written: raft_log::OnSnapshot = Box::new(move |snapshot| {
            let replaced = written
                .lock()
                .expect("snapshot slot")
                .replace((snapshot, true));
            // A newer one replaces a snapshot still waiting.
            if let Some((older, true)) = replaced {
                let _ = std::fs::remove_file(pending_path(&dir, older.index));
            }
        });
        let spawned = thread::Builder::new()
            .name("livelock-snapshot".into())
            .spawn(move || {
                raft_log::write_snapshots(
                    &log,
                    &|index| pending_path(&data_dir, index),
                    loops,
                    jobs_rx,
                    parts,
                    on_written,
                )
            });
        match spawned {
            Ok(_) => self.jobs = Some((jobs_tx, ask_loops)),
            Err(e) => tracing::warn!("no snapshots: cannot start their thread ({e})"),
        }
    }

    /// Once `snapshot_log_bytes` were proposed since the last snapshot,
    /// asks the loops for one at the last index.
    fn maybe_snapshot_as_leader(&mut self, len: u64) {
        self.since_snapshot += len;
        let Some((jobs, ask_loops)) = &self.jobs else {
            return;
        };
        if self.since_snapshot < self.snapshot_log_bytes
            || self.log.snapshot_pending.swap(true, Ordering::SeqCst)
        {
            return;
        }
        self.since_snapshot = 0;
        let index = self.raw.raft.raft_log.last_index();
        let term = self.raw.raft.raft_log.term(index).unwrap_or(0);
        let _ = jobs.send(SnapshotJob { index, term });
        ask_loops();
    }

    /// A snapshot written and committed — its index, and for a leader's
    /// every batch in it — replaces the entries it covers, in raft's
    /// storage and on disk (a leader's becomes the dump file only now); it
    /// is what lagging followers are sent.
    fn compact(&mut self) {
        let committed = self.raw.raft.raft_log.committed;
        let durable = self.log.durable();
        let ready = {
            let mut slot = self.written.lock().expect("snapshot slot");
            match &*slot {
                Some((written, pending))
                    if written.index <= committed && (!pending || written.covers <= durable) =>
                {
                    slot.take()
                }
                _ => None,
            }
        };
        let Some((
            raft_log::Written {
                index, term, bytes, ..
            },
            pending,
        )) = ready
        else {
            return;
        };
        if pending {
            let dir = crate::data_dir::parent_dir(&self.dump_path);
            if let Err(e) =
                crate::data_dir::rename_durably(&pending_path(dir, index), &self.dump_path)
            {
                tracing::warn!(
                    "the snapshot at log index {index} cannot become the dump file ({e}); \
                     the log keeps growing until one does"
                );
                return;
            }
        }
        let mut snapshot = Snapshot {
            data: bytes.into(),
            ..Snapshot::default()
        };
        snapshot.mut_metadata().index = index;
        snapshot.mut_metadata().term = term;
        self.storage.wl().compact(snapshot);
        self.store.engine.compact_to(raft_log::GROUP, index + 1);
        let _ = self.store.engine.purge_expired_files();
    }

    /// Moves `durable` past the batches whose entries are committed.
    fn release_durable(&mut self) {
        // Only a leader's entries are its batches: one that just learned
        // of a newer term may hold a commit index that covers entries the
        // new leader wrote over its own (it is deposed before its turn).
        if self.raw.raft.state != StateRole::Leader {
            return;
        }
        let committed = self.raw.raft.raft_log.committed;
        if self.uncommitted.release(committed, &self.log) {
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

    /// A leader that lost office comes back as a follower; one asked to
    /// stop ends the process. Either way nothing it did not get committed
    /// was acknowledged, and its clients see their connections end.
    fn deposed(&mut self) -> ! {
        // What raft owes its peers (a vote, an answer) goes first.
        self.flush_before_exit();
        // (Read after the flush: a SIGTERM meanwhile must not be lost in
        // an exec — the signal thread has done its part already.)
        if self.stop.load(Ordering::SeqCst) {
            tracing::warn!(term = self.raw.raft.term, "no longer the leader; exiting");
            std::process::exit(0);
        }
        tracing::warn!(
            term = self.raw.raft.term,
            leader = self.raw.raft.leader_id,
            "{RESTARTING} (clients reconnect to the new leader)"
        );
        let error = restart_as_follower();
        tracing::error!("cannot restart as a follower ({error}); exiting");
        std::process::exit(3);
    }

    /// Before a stopping node goes: what raft owes its peers is persisted
    /// and sent — above all the vote a leader handing over gives the
    /// target as it steps down (going without it could leave the target a
    /// vote short of a majority) — and the links are given a moment to
    /// write it (bounded by FLUSH_MAX).
    fn flush_before_exit(&mut self) {
        if self.raw.has_ready() && !self.handle_ready() {
            return;
        }
        let until = Instant::now() + FLUSH_MAX;
        while !self.links.drained() && Instant::now() < until {
            thread::sleep(Duration::from_millis(5));
        }
        // Taken off a queue is not yet written: a little longer.
        thread::sleep(FLUSH_MAX.min(until.saturating_duration_since(Instant::now())) / 4);
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
            self.flush_before_exit();
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

    /// The members' progress as the leader sees it, for CLUSTER_STATUS.
    fn publish_members(&self) {
        let raft = &self.raw.raft;
        if raft.state == StateRole::Leader {
            let mut rows: Vec<(u64, u64, u8, bool)> = raft
                .prs()
                .iter()
                .map(|(&id, progress)| {
                    let state = match progress.state {
                        ProgressState::Probe => 0,
                        ProgressState::Replicate => 1,
                        ProgressState::Snapshot => 2,
                    };
                    let matched = match id == raft.id {
                        true => raft.raft_log.last_index(),
                        false => progress.matched,
                    };
                    (id, matched, state, id == raft.id || progress.recent_active)
                })
                .collect();
            rows.sort_unstable();
            *self.status.members.lock().expect("status lock") = Members {
                commit: raft.raft_log.committed,
                applied: raft.raft_log.applied,
                rows,
            };
        }
    }

    /// Leader, term, commit and applied index (the relay reads the leader).
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

/// Writes a follower's snapshot as its dump file and hands the bytes to the
/// node (which compacts its log to it).
fn write_follower_snapshot(
    log: &LogShared,
    path: &std::path::Path,
    written: &Written,
    index: u64,
    term: u64,
    state: &Dump,
) {
    let bytes = dump::encode(state);
    match crate::data_dir::write_atomic(path, &bytes) {
        Ok(()) => {
            tracing::info!(
                "snapshot of {} hold(s) at log index {index} written ({} bytes)",
                state.holds.len(),
                bytes.len()
            );
            log.snapshots.fetch_add(1, Ordering::Relaxed);
            let snapshot = raft_log::Written {
                index,
                term,
                bytes,
                covers: 0,
            };
            *written.lock().expect("snapshot slot") = Some((snapshot, false));
            log.wake();
        }
        Err(e) => tracing::warn!(
            "writing a snapshot to {} failed ({e}); the log keeps growing until one succeeds",
            path.display()
        ),
    }
    log.snapshot_pending.store(false, Ordering::SeqCst);
}

/// `ID=HOST:PORT,...` as a membership change's context carries it.
fn parse_members(text: &str) -> Vec<(u64, SocketAddr)> {
    text.split(',')
        .filter_map(|one| {
            let (id, addr) = one.split_once('=')?;
            Some((id.parse().ok()?, addr.parse().ok()?))
        })
        .collect()
}

fn single(node_id: u64, change_type: ConfChangeType) -> ConfChangeSingle {
    let mut single = ConfChangeSingle {
        node_id,
        ..ConfChangeSingle::default()
    };
    single.set_change_type(change_type);
    single
}

/// raft-rs's own log (slog) into ours (tracing): each record at DEBUG
/// under target `raft`, its key-values after the message (elections,
/// votes given and refused, and why).
struct RaftLog;

impl slog::Drain for RaftLog {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        values: &slog::OwnedKVList,
    ) -> Result<(), slog::Never> {
        if !tracing::enabled!(target: "raft", tracing::Level::DEBUG) {
            return Ok(());
        }
        let mut text = record.msg().to_string();
        let mut kv = KeyValues(&mut text);
        let _ = slog::KV::serialize(&record.kv(), record, &mut kv);
        let _ = slog::KV::serialize(values, record, &mut kv);
        tracing::debug!(target: "raft", "{text}");
        Ok(())
    }
}

/// Appends ` key=value` for each pair of a raft-rs log record.
struct KeyValues<'a>(&'a mut String);

impl slog::Serializer for KeyValues<'_> {
    fn emit_arguments(&mut self, key: slog::Key, value: &std::fmt::Arguments<'_>) -> slog::Result {
        use std::fmt::Write as _;
        let _ = write!(self.0, " {key}={value}");
        Ok(())
    }
}

/// Executes this program again, with the same arguments and environment
/// (same process id: a supervisor sees nothing): it starts as any restarted
/// node does, a follower replaying its own log. Every descriptor is closed
/// on the way — the data directory's lock, the ports (its clients see their
/// connections end) and the log's files — whoever opened it. Returns only
/// if that fails.
fn restart_as_follower() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        let fds: Vec<i32> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&fd| fd > 2)
            .collect();
        for fd in fds {
            // SAFETY: fcntl on a descriptor number only sets a flag (one
            // closed meanwhile, e.g. the directory's own, gives EBADF).
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 {
                    libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                }
            }
        }
    }
    let mut args = std::env::args_os();
    let name = args.next().unwrap_or_else(|| "livelock".into());
    // /proc/self/exe: the very program running, even if its file was
    // replaced or removed since (an upgrade in progress).
    std::process::Command::new("/proc/self/exe")
        .arg0(name)
        .args(args)
        .exec()
}
