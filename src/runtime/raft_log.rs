//! The durable log of `--durability log`: the Raft log of a one-voter group
//! (raft-rs `RawNode`, stored by raft-engine), written by one thread.
//!
//! The loops hand in their turns' batches (`LogShared::submit`), each
//! numbered in one global sequence. The log thread takes everything handed
//! in since its last write as one entry (group commit across loops),
//! proposes it, persists what raft asks to persist with one fsync'd
//! raft-engine write, and publishes the highest sequence number now
//! committed (`durable`). A loop lets a turn's replies and pushes leave
//! only once `durable` has reached what was handed in by the end of that
//! turn (`EventLoop::release_held`).
//!
//! A write that fails (disk full, read-only, vanished directory, an
//! injected fault) is retried until it succeeds; meanwhile `failing` is
//! set, the loops refuse new changes with a specific error, and nothing
//! written since is acknowledged. An fsync error is not retried: raft-engine
//! stops the thread (after a failed fsync the page cache cannot be
//! trusted), `failing` stays set, and the server keeps answering reads
//! until it is restarted.
//!
//! Snapshots bound the log: once `snapshot_log_bytes` have been written
//! since the last one, the thread asks every loop for its part (see
//! `EventLoop::export_snapshot_part`); the snapshot thread merges the parts
//! and writes them as the dump file with their log position, and the log is
//! then compacted up to the index the request was made at.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle, Thread};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{Config as RaftConfig, RawNode};
use raft_engine::{Config as EngineConfig, Engine, LogBatch, MessageExt, ReadableSize};

use crate::dump::{self, Dump, LoopPosition};
use crate::journal::Replay;
use crate::snapshot::LoopState;

/// The one Raft group of a single server.
pub const GROUP: u64 = 1;
/// Where the group's hard state is kept in raft-engine.
const HARD_STATE_KEY: &[u8] = b"hard_state";
/// A cluster's voters (raft's conf state) and members' peer addresses.
const CONF_STATE_KEY: &[u8] = b"conf_state";
const MEMBERS_KEY: &[u8] = b"members";
/// This node's Raft id.
const NODE_ID: u64 = 1;
/// The log writes only while the file system has this much room (raft-engine
/// grows a file 2 MiB at a time and starts a new one every 64 MiB).
const FREE_SPACE_MIN: u64 = 16 << 20;

/// Bytes an unprivileged process may still write in `dir`'s file system.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs fills the struct we own from a NUL-terminated path.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)] // the field types differ by platform
    let (available, block) = (u64::from(stat.f_bavail), u64::from(stat.f_frsize));
    Ok(available.saturating_mul(block))
}

/// How long a failing write waits before it is tried again.
const RETRY_WAIT: Duration = Duration::from_millis(100);

/// raft-engine's view of raft-rs entries.
#[derive(Clone)]
pub struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;

    fn index(entry: &Entry) -> u64 {
        entry.index
    }
}

/// The log's high-water mark, kept beside it: raft-engine cannot tell a
/// damaged record from a torn last write, and cuts the log at either; a
/// log that then ends before the mark lost acknowledged entries.
const MARK_FILE: &str = "livelock.logmark";
/// How often the mark follows the log under load (and when the log is idle).
const MARK_EVERY: Duration = Duration::from_secs(1);

fn read_mark(data_dir: &Path) -> Result<u64, String> {
    let path = data_dir.join(MARK_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| format!("{} is not a log index: {text:?}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// The log's subdirectory of the data directory.
pub fn log_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("log")
}

/// What the loops and the log thread share.
#[derive(Debug)]
pub struct LogShared {
    /// Batches handed in and not yet taken by the log thread, and the
    /// sequence number of the last one.
    queue: Mutex<(Vec<u8>, u64)>,
    /// Sequence number of the last batch handed in.
    submitted: AtomicU64,
    /// Every batch up to this sequence number is durable.
    durable: AtomicU64,
    /// A write failed and has not succeeded since.
    failing: AtomicBool,
    /// Parts of the snapshot asked for, from the loops.
    parts_tx: Sender<SnapshotPart>,
    /// The log thread, to wake it.
    thread: OnceLock<Thread>,
    /// A cluster's leader: a turn that answers reads and changed nothing
    /// hands in an empty batch (`barrier`), and its answers wait until it
    /// is committed — proof that this node still led after it read.
    pub read_barriers: AtomicBool,
    stop: AtomicBool,
    /// Counters for the metrics endpoint.
    pub writes: AtomicU64,
    pub bytes: AtomicU64,
    pub write_errors: AtomicU64,
    pub snapshots: AtomicU64,
    /// A snapshot was asked for and not yet written.
    pub snapshot_pending: AtomicBool,
    /// The snapshot thread wrote the snapshot up to this index: compact.
    compact_to: AtomicU64,
}

/// One loop's part of a snapshot of the log.
#[derive(Debug)]
pub struct SnapshotPart {
    pub idx: usize,
    pub state: LoopState,
    pub position: LoopPosition,
    /// How long the loop paused its clients to export its part.
    pub export: Duration,
}

impl LogShared {
    /// The shared part, before the threads start; also the receiving end
    /// of the loops' snapshot parts, for `Log::start`.
    pub fn new() -> (Arc<LogShared>, Receiver<SnapshotPart>) {
        let (parts_tx, parts_rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(LogShared {
            queue: Mutex::new((Vec::new(), 0)),
            submitted: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            parts_tx,
            thread: OnceLock::new(),
            read_barriers: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            snapshot_pending: AtomicBool::new(false),
            compact_to: AtomicU64::new(0),
        });
        (shared, parts_rx)
    }

    /// Hands in a batch: `fill` appends it to the queue (and says whether
    /// it did). Returns the sequence number it got, if any.
    pub fn submit(&self, fill: impl FnOnce(&mut Vec<u8>) -> bool) -> Option<u64> {
        let seq = {
            let mut queue = self.queue.lock().expect("log queue lock");
            if !fill(&mut queue.0) {
                return None;
            }
            queue.1 += 1;
            self.submitted.store(queue.1, Ordering::SeqCst);
            queue.1
        };
        self.wake();
        Some(seq)
    }

    /// Hands in an empty batch (a read barrier, see `read_barriers`);
    /// returns its sequence number.
    pub fn barrier(&self) -> u64 {
        self.submit(|_| true)
            .expect("an empty batch is always taken")
    }

    /// The last sequence number handed in.
    pub fn submitted(&self) -> u64 {
        self.submitted.load(Ordering::SeqCst)
    }

    /// Every batch up to this sequence number is durable.
    pub fn durable(&self) -> u64 {
        self.durable.load(Ordering::SeqCst)
    }

    /// Writes are failing: changes are refused until one succeeds.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Wakes the log thread (it parks between writes).
    pub fn wake(&self) {
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }

    /// The log thread is `thread` (it is woken by `submit` and `wake`).
    pub fn set_thread(&self, thread: Thread) {
        let _ = self.thread.set(thread);
    }

    /// Takes every batch handed in since the last call, and the sequence
    /// number of the last one.
    pub fn take_queued(&self, spare: Vec<u8>) -> (Vec<u8>, u64) {
        let mut queue = self.queue.lock().expect("log queue lock");
        (std::mem::replace(&mut queue.0, spare), queue.1)
    }

    /// Every batch up to `seq` is durable (committed): the loops may let
    /// the output that waited for it go.
    pub fn set_durable(&self, seq: u64) {
        self.durable.store(seq, Ordering::SeqCst);
    }

    /// Where the loops send their parts of a snapshot.
    pub fn send_part(&self, part: SnapshotPart) {
        let _ = self.parts_tx.send(part);
    }
}

/// Batches proposed and not yet committed: (log index of their entry,
/// sequence number of the last batch in it), in log order.
#[derive(Debug, Default)]
pub struct Uncommitted(std::collections::VecDeque<(u64, u64)>);

impl Uncommitted {
    /// The entry at `index` carries the batches up to `seq`.
    pub fn push(&mut self, index: u64, seq: u64) {
        self.0.push_back((index, seq));
    }

    /// Entries up to `committed` are committed: `durable` moves past their
    /// batches. Whether it moved (the loops are then to be woken).
    pub fn release(&mut self, committed: u64, shared: &LogShared) -> bool {
        let mut durable = None;
        while self.0.front().is_some_and(|&(index, _)| index <= committed) {
            durable = self.0.pop_front().map(|(_, seq)| seq);
        }
        if let Some(seq) = durable {
            shared.set_durable(seq);
        }
        durable.is_some()
    }
}

/// Settings of the log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub data_dir: PathBuf,
    /// Take a snapshot once this many bytes were logged since the last.
    pub snapshot_log_bytes: u64,
    /// Fault injection (debug builds' tests): while this file exists,
    /// every write fails as if the disk were full.
    pub fault_fail_file: Option<PathBuf>,
}

/// The log as it was found at start, replayed.
pub struct Recovered {
    /// The state to restore: the snapshot and the log after it, or the
    /// plain dump.
    pub state: Option<Dump>,
    /// Log batches replayed on top of the snapshot.
    pub batches: u64,
    /// Log entries found that belong to no snapshot (ignored).
    pub ignored_entries: u64,
    engine: Engine,
    hard_state: HardState,
    last_index: u64,
}

/// Opens the log store in `data_dir` and reads its hard state.
pub fn open(data_dir: &Path) -> Result<(Engine, HardState), String> {
    let dir = log_dir(data_dir);
    let engine = Engine::open(EngineConfig {
        dir: dir.to_string_lossy().into_owned(),
        target_file_size: ReadableSize::mb(64),
        purge_threshold: ReadableSize::mb(256),
        // Batches go out as they are: compressing them costs the log
        // thread CPU on the loops' core for little (measured: see
        // BENCHMARKS.md, "Durability").
        batch_compression_threshold: ReadableSize(0),
        ..EngineConfig::default()
    })
    .map_err(|e| format!("cannot open the log in {}: {e}", dir.display()))?;
    let hard_state: HardState = engine
        .get_message(GROUP, HARD_STATE_KEY)
        .map_err(|e| format!("the log's hard state is unreadable: {e}"))?
        .unwrap_or_default();
    Ok((engine, hard_state))
}

/// Reads the stored entries from `from` to the last one.
pub fn read_entries(engine: &Engine, from: u64) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    let Some(last) = engine.last_index(GROUP) else {
        return Ok(entries);
    };
    let mut next = from.max(engine.first_index(GROUP).unwrap_or(from));
    while next <= last {
        let upto = (next + 1024).min(last + 1);
        engine
            .fetch_entries_to::<EntryExt>(GROUP, next, upto, None, &mut entries)
            .map_err(|e| format!("cannot read log entries {next}..{upto}: {e}"))?;
        next = upto;
    }
    Ok(entries)
}

/// Opens the log in `data_dir` and replays it on top of `base` (the dump
/// file as loaded). A log whose entries do not follow the snapshot, or do
/// not parse, is an error: the start stops rather than drop acknowledged
/// history. raft-engine itself truncates a torn tail (with a warning).
pub fn recover(data_dir: &Path, base: Option<Dump>) -> Result<Recovered, String> {
    let (engine, hard_state) = open(data_dir)?;
    let dir = log_dir(data_dir);
    let first = engine.first_index(GROUP);
    let last = engine.last_index(GROUP);
    // The hard state's commit index is written with the entries (one write
    // behind): a log that now ends before it lost entries that were
    // acknowledged — raft-engine cut more than a torn tail. Never go on
    // without them. (With no entries left, the snapshot covers the commit.)
    let covered = base
        .as_ref()
        .and_then(|b| b.log.as_ref())
        .map_or(0, |l| l.index);
    let ends = last.unwrap_or(0).max(covered);
    let committed = hard_state.commit.max(read_mark(data_dir)?);
    if base.as_ref().is_some_and(|b| b.log.is_some()) && ends < committed {
        return Err(format!(
            "the log in {} ends at entry {ends}, but entries up to {committed} were committed: \
             it is damaged before its tail (see the log store's warnings above); refusing to \
             start without acknowledged history",
            dir.display(),
        ));
    }
    let mut recovered = Recovered {
        state: None,
        batches: 0,
        ignored_entries: 0,
        last_index: last.unwrap_or(0).max(hard_state.commit),
        engine,
        hard_state,
    };
    // No snapshot of the log (none at all, or a clean shutdown's dump):
    // entries left beside it have no base to replay on.
    let base = match base {
        Some(base) if base.log.is_some() => base,
        plain => {
            recovered.ignored_entries = count(first, last);
            recovered.state = plain;
            return Ok(recovered);
        }
    };
    let mut replay = Replay::from_snapshot(&base).map_err(|e| e.to_string())?;
    let from = replay.snapshot_index() + 1;
    let mut term = base.log.as_ref().map_or(0, |l| l.term);
    let mut index = replay.snapshot_index();
    if let (Some(first), Some(last)) = (first, last) {
        if first > from && last >= from {
            return Err(format!(
                "the log starts at entry {first} but the snapshot covers only up to {}: \
                 entries are missing",
                from - 1
            ));
        }
        for entry in read_entries(&recovered.engine, from)? {
            replay
                .apply_entry(&entry.data)
                .map_err(|e| format!("log entry {}: {e}", entry.index))?;
            index = entry.index;
            term = entry.term;
        }
    }
    recovered.batches = replay.batches;
    recovered.last_index = recovered.last_index.max(index);
    recovered.state = Some(replay.finish(index, term));
    Ok(recovered)
}

fn count(first: Option<u64>, last: Option<u64>) -> u64 {
    match (first, last) {
        (Some(first), Some(last)) if last >= first => last - first + 1,
        _ => 0,
    }
}

impl Recovered {
    /// The index and term the next snapshot position starts from.
    pub fn position(&self) -> (u64, u64) {
        (self.last_index, self.hard_state.term)
    }
}

/// The running log: its thread, the snapshot thread, and what they share.
pub struct Log {
    pub shared: Arc<LogShared>,
    jobs_tx: Sender<SnapshotJob>,
    thread: Option<JoinHandle<()>>,
    snapshotter: Option<JoinHandle<()>>,
}

impl Log {
    /// Starts the log after the base snapshot (the state the loops start
    /// from, already written at `recovered.position()`) is durable:
    /// everything before it is compacted away.
    pub fn start(
        recovered: Recovered,
        config: LogConfig,
        (shared, parts_rx): (Arc<LogShared>, Receiver<SnapshotPart>),
        loops: usize,
        ask_loops: Box<dyn Fn() + Send>,
        wake_loops: Box<dyn Fn() + Send>,
    ) -> Result<Log, String> {
        let (index, term) = recovered.position();
        let engine = recovered.engine;
        engine.compact_to(GROUP, index + 1);
        let _ = engine.purge_expired_files();
        let voters = || ConfState::from((vec![NODE_ID], vec![]));
        let storage = MemStorage::new_with_conf_state(voters());
        {
            let mut core = storage.wl();
            if index > 0 {
                // Everything up to `index` is in the snapshot just written.
                let mut snapshot = Snapshot::default();
                let meta = snapshot.mut_metadata();
                meta.index = index;
                meta.term = term;
                meta.set_conf_state(voters());
                core.apply_snapshot(snapshot)
                    .map_err(|e| format!("raft: {e}"))?;
            }
            let mut hard_state = recovered.hard_state.clone();
            hard_state.commit = index;
            hard_state.term = hard_state.term.max(term);
            core.set_hardstate(hard_state);
        }
        let raft_config = RaftConfig {
            id: NODE_ID,
            applied: index,
            ..RaftConfig::default()
        };
        raft_config.validate().map_err(|e| format!("raft: {e}"))?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut node =
            RawNode::new(&raft_config, storage, &logger).map_err(|e| format!("raft: {e}"))?;
        node.campaign().map_err(|e| format!("raft: {e}"))?;
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded();
        let mut writer = Writer {
            store: Store::new(engine, &config),
            node,
            shared: shared.clone(),
            config: config.clone(),
            wake_loops,
            ask_loops,
            jobs_tx: jobs_tx.clone(),
            since_snapshot: 0,
            compacted: index,
        };
        let thread = thread::Builder::new()
            .name("livelock-log".into())
            .spawn(move || writer.run())
            .map_err(|e| format!("cannot start the log thread: {e}"))?;
        shared.set_thread(thread.thread().clone());
        let snapshot_shared = shared.clone();
        let dump_path = config.data_dir.join(dump::FILE_NAME);
        let snapshotter = thread::Builder::new()
            .name("livelock-snapshot".into())
            .spawn(move || {
                let written: OnSnapshot = Box::new(|_| {});
                write_snapshots(
                    &snapshot_shared,
                    &|_| dump_path.clone(),
                    loops,
                    jobs_rx,
                    parts_rx,
                    written,
                )
            })
            .map_err(|e| format!("cannot start the snapshot thread: {e}"))?;
        Ok(Log {
            shared,
            jobs_tx,
            thread: Some(thread),
            snapshotter: Some(snapshotter),
        })
    }

    /// Stops the snapshot thread (before the shutdown dump is written, so
    /// that no older snapshot lands on top of it).
    pub fn stop_snapshots(&mut self) {
        // Whether it waits for a job or for parts, it sees one of these.
        let _ = self.jobs_tx.send(SnapshotJob {
            index: u64::MAX,
            term: 0,
        });
        let _ = self.shared.parts_tx.send(SnapshotPart {
            idx: usize::MAX,
            state: LoopState::default(),
            position: LoopPosition::default(),
            export: Duration::ZERO,
        });
        if let Some(handle) = self.snapshotter.take() {
            let _ = handle.join();
        }
    }

    /// Writes what is still queued, then stops; with `compact_all`, the
    /// whole log is compacted away (the shutdown dump has everything).
    pub fn stop(mut self, compact_all: bool) {
        self.stop_snapshots();
        self.shared.stop.store(true, Ordering::SeqCst);
        if compact_all {
            self.shared.compact_to.store(u64::MAX, Ordering::SeqCst);
        }
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// A snapshot asked of the loops: the log index and term it covers.
pub struct SnapshotJob {
    pub index: u64,
    pub term: u64,
}

/// A snapshot the snapshot thread wrote.
pub struct Written {
    pub index: u64,
    pub term: u64,
    pub bytes: Vec<u8>,
    /// The last batch it holds: every loop's part is its state after its
    /// batches handed in so far, which may be proposed in entries after
    /// `index` (a cluster's leader waits for them to be committed before
    /// the snapshot becomes its dump file).
    pub covers: u64,
}

/// Told of each snapshot written.
pub type OnSnapshot = Box<dyn Fn(Written) + Send>;

struct Writer {
    node: RawNode<MemStorage>,
    store: Store,
    shared: Arc<LogShared>,
    config: LogConfig,
    wake_loops: Box<dyn Fn() + Send>,
    ask_loops: Box<dyn Fn() + Send>,
    jobs_tx: Sender<SnapshotJob>,
    since_snapshot: u64,
    compacted: u64,
}

impl Writer {
    fn run(&mut self) {
        let mut spare = Vec::new();
        // (log index, batch sequence number) of entries not yet committed.
        let mut uncommitted = Uncommitted::default();
        let mut mark = (0u64, std::time::Instant::now());
        loop {
            let (data, seq) = self.shared.take_queued(std::mem::take(&mut spare));
            let stopping = self.shared.stop.load(Ordering::SeqCst);
            if data.is_empty() {
                self.follow_mark(&mut mark, true);
                self.compact();
                // The leader's first entry (after the election) is persisted
                // here too.
                if self.node.has_ready() && !self.persist_ready() {
                    return;
                }
                if stopping {
                    self.compact();
                    return;
                }
                spare = data;
                thread::park_timeout(Duration::from_millis(100));
                continue;
            }
            let len = data.len() as u64;
            if let Err(e) = self.node.propose(Vec::new(), data) {
                panic!("raft refused a proposal of the only voter: {e}");
            }
            uncommitted.push(self.node.raft.raft_log.last_index(), seq);
            if !self.persist_ready() {
                // The thread stops (fsync failed): nothing more is durable.
                return;
            }
            // A batch is durable once its entry is committed (at once, for
            // the only voter).
            if uncommitted.release(self.node.raft.raft_log.committed, &self.shared) {
                (self.wake_loops)();
            }
            self.follow_mark(&mut mark, false);
            self.since_snapshot += len;
            self.maybe_snapshot();
            self.compact();
        }
    }

    /// Moves the high-water mark (`MARK_FILE`) up to the committed index,
    /// at most every `MARK_EVERY` under load, at once when idle.
    fn follow_mark(&self, (marked, at): &mut (u64, std::time::Instant), idle: bool) {
        let committed = self.node.raft.raft_log.committed;
        if committed <= *marked || (!idle && at.elapsed() < MARK_EVERY) {
            return;
        }
        let path = self.config.data_dir.join(MARK_FILE);
        match crate::data_dir::write_atomic(&path, format!("{committed}\n").as_bytes()) {
            Ok(()) => *marked = committed,
            // Tried again later; an old mark only checks less.
            Err(e) => tracing::warn!("cannot write {}: {e}", path.display()),
        }
        *at = std::time::Instant::now();
    }

    /// Persists one Ready, retrying a failed write; false if the thread
    /// must stop (a panic inside raft-engine: a failed fsync).
    fn persist_ready(&mut self) -> bool {
        let mut ready = self.node.ready();
        let store = self.node.raft.raft_log.store.clone();
        let _committed = ready.take_committed_entries();
        if !self
            .store
            .persist(&self.shared, ready.entries(), ready.hs())
        {
            return false;
        }
        {
            let mut core = store.wl();
            core.append(ready.entries())
                .expect("entries follow the stored ones");
            if let Some(hs) = ready.hs() {
                core.set_hardstate(hs.clone());
            }
        }
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            store.wl().mut_hard_state().set_commit(commit);
        }
        let _ = light.take_committed_entries();
        self.node.advance_apply();
        true
    }

    fn maybe_snapshot(&mut self) {
        if self.since_snapshot < self.config.snapshot_log_bytes
            || self.shared.snapshot_pending.load(Ordering::SeqCst)
        {
            return;
        }
        self.since_snapshot = 0;
        self.shared.snapshot_pending.store(true, Ordering::SeqCst);
        let index = self.node.raft.raft_log.last_index();
        let term = self.node.raft.raft_log.term(index).unwrap_or(0);
        tracing::debug!("snapshot asked at entry {index}");
        let _ = self.jobs_tx.send(SnapshotJob { index, term });
        (self.ask_loops)();
    }

    /// Drops the entries a written snapshot covers.
    fn compact(&mut self) {
        let to = self.shared.compact_to.load(Ordering::SeqCst);
        let last = self.node.raft.raft_log.last_index();
        let to = to.min(last);
        if to <= self.compacted {
            return;
        }
        self.compacted = to;
        self.store.engine.compact_to(GROUP, to + 1);
        let store = self.node.raft.raft_log.store.clone();
        let applied = self.node.raft.raft_log.applied;
        // The last entry stays in memory: with none left, raft's in-memory
        // log would fall back to the start snapshot's index (0 for a new
        // directory) and place the next proposal before the commit index.
        let _ = store.wl().compact((to + 1).min(applied + 1).min(last));
        let _ = self.store.engine.purge_expired_files();
        tracing::debug!("log compacted up to entry {to}");
    }
}

/// A cluster's members: id → peer address.
pub type Members = std::collections::BTreeMap<u64, std::net::SocketAddr>;

/// The log's store (raft-engine) and how its writes are checked.
pub struct Store {
    pub engine: Engine,
    /// The log's directory (its file system's free space is checked).
    log_dir: PathBuf,
    fault_fail_file: Option<PathBuf>,
}

impl Store {
    pub fn new(engine: Engine, config: &LogConfig) -> Store {
        Store {
            engine,
            log_dir: log_dir(&config.data_dir),
            fault_fail_file: config.fault_fail_file.clone(),
        }
    }

    /// Stores a cluster's membership: the voters (raft's conf state) and
    /// every member's peer address, fsynced.
    pub fn put_membership(&self, conf_state: &ConfState, members: &Members) -> Result<(), String> {
        let text: Vec<String> = members
            .iter()
            .map(|(id, addr)| format!("{id}={addr}"))
            .collect();
        let mut batch = LogBatch::default();
        batch
            .put_message(GROUP, CONF_STATE_KEY.to_vec(), conf_state)
            .map_err(|e| e.to_string())?;
        batch
            .put(GROUP, MEMBERS_KEY.to_vec(), text.join(",").into_bytes())
            .map_err(|e| e.to_string())?;
        self.engine
            .write(&mut batch, true)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The membership stored by `put_membership`, if any.
    pub fn membership(&self) -> Result<Option<(ConfState, Members)>, String> {
        let Some(conf_state) = self
            .engine
            .get_message::<ConfState>(GROUP, CONF_STATE_KEY)
            .map_err(|e| format!("the stored membership is unreadable: {e}"))?
        else {
            return Ok(None);
        };
        let text = self.engine.get(GROUP, MEMBERS_KEY).unwrap_or_default();
        let mut members = std::collections::BTreeMap::new();
        for one in String::from_utf8_lossy(&text)
            .split(',')
            .filter(|s| !s.is_empty())
        {
            let parsed = one
                .split_once('=')
                .and_then(|(id, addr)| Some((id.parse().ok()?, addr.parse().ok()?)));
            let (id, addr) =
                parsed.ok_or_else(|| format!("a stored member is unreadable: {one:?}"))?;
            members.insert(id, addr);
        }
        Ok(Some((conf_state, members)))
    }

    /// Drops every stored entry (a snapshot from the leader replaces the
    /// log), keeping `hard_state` (written again in the same batch: a vote
    /// is never forgotten).
    pub fn replace_all(&self, shared: &LogShared, hard_state: &HardState) -> bool {
        let mut batch = LogBatch::default();
        batch.add_command(GROUP, raft_engine::Command::Clean);
        let written = batch
            .put_message(GROUP, HARD_STATE_KEY.to_vec(), hard_state)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                self.engine
                    .write(&mut batch, true)
                    .map_err(|e| e.to_string())
            });
        match written {
            Ok(_) => true,
            Err(e) => {
                shared.failing.store(true, Ordering::SeqCst);
                tracing::error!("cannot replace the log with a snapshot: {e}");
                false
            }
        }
    }

    /// Writes `entries` and the hard state with one fsync, retrying a
    /// failed write every RETRY_WAIT (with `failing` set meanwhile); false
    /// if the log must stop (a panic inside raft-engine: a failed fsync).
    pub fn persist(&self, shared: &LogShared, entries: &[Entry], hs: Option<&HardState>) -> bool {
        let mut attempt = 0u64;
        loop {
            match self.write(entries, hs) {
                Ok(bytes) => {
                    shared.writes.fetch_add(1, Ordering::Relaxed);
                    shared.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                    if shared.failing.swap(false, Ordering::SeqCst) {
                        tracing::info!("the log is writable again; changes are accepted");
                    }
                    return true;
                }
                Err(WriteError::Fatal(why)) => {
                    shared.failing.store(true, Ordering::SeqCst);
                    tracing::error!(
                        "the log cannot be made durable ({why}); no change is \
                         accepted any more, reads still are: restart the server"
                    );
                    return false;
                }
                Err(WriteError::Retry(why)) => {
                    shared.write_errors.fetch_add(1, Ordering::Relaxed);
                    if !shared.failing.swap(true, Ordering::SeqCst) || attempt % 100 == 0 {
                        tracing::error!(
                            "writing the log failed ({why}); changes are \
                             refused until it succeeds, retrying"
                        );
                    }
                    attempt += 1;
                    thread::sleep(RETRY_WAIT);
                }
            }
        }
    }

    fn write(&self, entries: &[Entry], hs: Option<&HardState>) -> Result<usize, WriteError> {
        if let Some(file) = &self.fault_fail_file {
            if file.exists() {
                return Err(WriteError::Retry(
                    "No space left on device (injected fault)".into(),
                ));
            }
        }
        // raft-engine does not recover well from running out of space in
        // the middle of a write (a half-written record before a new file,
        // a new file without its header): never let it get there.
        let free = free_bytes(&self.log_dir).map_err(|e| WriteError::Retry(e.to_string()))?;
        if free < FREE_SPACE_MIN {
            return Err(WriteError::Retry(format!(
                "No space left on device: {free} bytes free in {}, the log needs {FREE_SPACE_MIN}",
                self.log_dir.display()
            )));
        }
        let mut batch = LogBatch::default();
        batch
            .add_entries::<EntryExt>(GROUP, entries)
            .map_err(|e| WriteError::Retry(e.to_string()))?;
        if let Some(hs) = hs {
            batch
                .put_message(GROUP, HARD_STATE_KEY.to_vec(), hs)
                .map_err(|e| WriteError::Retry(e.to_string()))?;
        }
        let engine = &self.engine;
        // raft-engine panics when fsync fails (it cannot know what reached
        // the disk): the log stops, the server keeps serving reads.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            engine.write(&mut batch, true)
        })) {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(e)) => Err(WriteError::Retry(e.to_string())),
            Err(_) => Err(WriteError::Fatal("fsync failed".into())),
        }
    }
}

enum WriteError {
    Retry(String),
    Fatal(String),
}

/// The snapshot thread: collects every loop's part of each snapshot asked
/// for, writes it where `path_for` its index says (the dump file; a
/// cluster leader's pending file), and lets the log be compacted.
pub fn write_snapshots(
    shared: &LogShared,
    path_for: &dyn Fn(u64) -> PathBuf,
    loops: usize,
    jobs: Receiver<SnapshotJob>,
    parts: Receiver<SnapshotPart>,
    written: OnSnapshot,
) {
    while let Ok(job) = jobs.recv() {
        if job.index == u64::MAX {
            return;
        }
        let mut got: Vec<Option<SnapshotPart>> = (0..loops).map(|_| None).collect();
        let mut missing = loops;
        while missing > 0 {
            let Ok(part) = parts.recv() else { return };
            if part.idx == usize::MAX {
                return;
            }
            if got[part.idx].replace(part).is_none() {
                missing -= 1;
            }
        }
        let paused = got
            .iter()
            .flatten()
            .map(|p| p.export)
            .max()
            .unwrap_or_default();
        let parts = got
            .into_iter()
            .flatten()
            .map(|part| (part.state, part.position))
            .collect();
        // Each part was exported after its loop handed in its batches.
        let covers = shared.submitted();
        let snapshot = crate::snapshot::log_snapshot(parts, job.index, job.term);
        let started = std::time::Instant::now();
        let bytes = dump::encode(&snapshot);
        let path = path_for(job.index);
        match crate::data_dir::write_atomic(&path, &bytes) {
            Ok(()) => {
                tracing::info!(
                    "snapshot of {} hold(s) at log index {} written ({} bytes, {} ms; \
                     the loops paused up to {} ms to export)",
                    snapshot.holds.len(),
                    job.index,
                    bytes.len(),
                    started.elapsed().as_millis(),
                    paused.as_millis()
                );
                shared.snapshots.fetch_add(1, Ordering::Relaxed);
                shared.compact_to.fetch_max(job.index, Ordering::SeqCst);
                written(Written {
                    index: job.index,
                    term: job.term,
                    bytes,
                    covers,
                });
                shared.wake();
            }
            Err(e) => tracing::warn!(
                "writing a snapshot to {} failed ({e}); the log keeps \
                 growing until one succeeds",
                path.display()
            ),
        }
        shared.snapshot_pending.store(false, Ordering::SeqCst);
    }
}
