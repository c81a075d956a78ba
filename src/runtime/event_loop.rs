//! One event-loop thread: a hand-rolled `mio::Poll` loop that owns its
//! connections, the sessions whose home it is, its shard of the lock table
//! and their timers. Nothing here is shared behind a mutex.
//!
//! A turn of the loop: poll (with the earliest deadline as timeout), accept,
//! read and decode ready connections (a bounded number of frames each),
//! drain the inbox of messages from other loops, fire due timers, advance
//! the FIND/LIST scans of the shard by one bounded slice, send the messages
//! this turn produced to other loops (one wake-up per destination per turn),
//! and flush every connection that got output (one write pass per
//! connection per turn).
//!
//! Routing (see docs/ARCHITECTURE.md): a request for lock `name` goes to
//! shard `shard_for(name)`, applied directly when that is this loop, else
//! sent over the owner's bounded channel. Every effect for a session goes to
//! `home_of(session)`. Both ends assert the routing.
//!
//! With `--durability log` every change to the shard or to the durable
//! part of a session is also written to the loop's `Journal` as it is
//! made; at the end of the turn the journal goes to the log as one batch,
//! and the turn's output is held until the log says that batch (and every
//! batch handed in before it, by any loop) is durable (`commit_turn`,
//! `release_held`).
//!
//! The two protocols live in submodules: `native` (binary frames) and
//! `compat` (the LiveLock RESP/inline protocol). Both turn requests into the
//! same lock-table commands. `deadlock` runs the deadlock detection rounds.

mod compat;
mod deadlock;
mod multi;
mod native;

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use hashbrown::HashMap;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::config::ServerConfig;
use crate::connection::{Codec, ConnRef, Connection, ReadState};
use crate::data_dir::TokenCeiling;
use crate::journal::{self, Journal};
use crate::limits::{
    CONNECTIONS_MAX, FRAMES_PER_TURN_MAX, OUTBOX_PARK_MAX, PARKED_PUSHES_MAX, SHUTDOWN_FLUSH_MS,
    WRITE_BUFFER_MAX, WRITE_BUFFER_PAUSE,
};
use crate::lock_table::{shard_for, Command, Effect, ListOrder, LockTable, Outcome, SessionId};
use crate::metrics::LoopMetrics;
use crate::protocol::{self, opcode, Status};
use crate::raft_log::{LogShared, SnapshotPart};
use crate::session::{home_of, Delivery, Listed, PendingOp, Session, Sessions};
use crate::snapshot::{self, LoopState};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
/// Inbox messages handled per turn before sockets get their turn again.
const INBOX_PER_TURN_MAX: usize = 4096;

/// The server's one clock, shared by all loops so deadlines stamped on one
/// loop mean the same on another: Unix milliseconds at start, advanced by
/// the monotonic clock (so it never jumps, and a hold's grant time reads as
/// wall-clock time in listings and dumps).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
    start_unix_ms: u64,
}

impl Clock {
    pub fn new() -> Clock {
        let start_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Clock::starting_at(start_unix_ms)
    }

    /// A clock that reads `start_unix_ms` now (tests set it wrong on purpose).
    pub fn starting_at(start_unix_ms: u64) -> Clock {
        Clock {
            start: Instant::now(),
            start_unix_ms,
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.now().0
    }

    /// Milliseconds since the clock started (the process's uptime).
    pub fn uptime_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// (now in ms, as `now_ms`; µs since start) from one clock reading.
    pub fn now(&self) -> (u64, u64) {
        let elapsed = self.start.elapsed();
        (
            self.start_unix_ms + elapsed.as_millis() as u64,
            elapsed.as_micros() as u64,
        )
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// How to reach another loop.
pub struct Peer {
    pub tx: Sender<Msg>,
    pub waker: Arc<Waker>,
    /// The loop is (about to be) blocked in poll: a sender must wake it.
    /// While it is awake it drains its inbox every turn unasked, so the
    /// wake-up (a syscall, and a context switch) is skipped.
    pub sleeping: AtomicBool,
}

/// What every loop shares: read-only settings, the clock, the way to reach
/// each loop, the connection count, each loop's metrics (written only by
/// that loop), and the state each loop leaves at shutdown.
pub struct Shared {
    pub config: ServerConfig,
    pub clock: Clock,
    pub peers: Vec<Peer>,
    pub connections: AtomicUsize,
    pub metrics: Vec<Arc<LoopMetrics>>,
    /// The durable ceiling of fencing tokens, extended by the loops.
    pub tokens: TokenCeiling,
    /// Each loop sends its final state here once the shutdown barrier has
    /// passed (see `EventLoop::advance_shutdown`); the server writes the dump.
    pub final_tx: Sender<LoopState>,
    /// The durable log (`--durability log`).
    pub log: Option<Arc<LogShared>>,
    /// A loop froze: the server is shutting down (readiness says so).
    pub stopping: AtomicBool,
    /// TLS on the client port (`--tls-cert`, `--tls-key`).
    pub tls: Option<crate::tls::Tls>,
    /// This node's view of its cluster (None: a single server).
    pub cluster: Option<Arc<crate::cluster::NodeStatus>>,
}

impl Shared {
    /// Why the server does not take changes now, if it does not: the
    /// readiness an orchestrator asks for (`/health/ready`).
    /// The CLUSTER_STATUS reply (a single server: node 0, no members).
    pub fn cluster_status(&self) -> crate::protocol::ClusterReply {
        self.cluster
            .as_ref()
            .map_or_else(Default::default, |status| status.reply())
    }

    /// Hands an operator's CLUSTER_CHANGE to the raft thread: the reply's
    /// status and message.
    pub fn cluster_change(&self, change: crate::protocol::ClusterChange) -> (Status, &'static str) {
        match &self.cluster {
            None => (Status::BadBody, "not a cluster: a single server"),
            Some(status) => match status.ask(change) {
                true => (Status::Ok, ""),
                false => (Status::ServerBusy, "too many cluster changes waiting"),
            },
        }
    }

    pub fn not_ready(&self) -> Option<&'static str> {
        if self.stopping.load(Ordering::SeqCst) {
            Some("shutting down")
        } else if self.log.as_ref().is_some_and(|log| log.failing()) {
            Some("the log cannot be written: changes are refused")
        } else {
            None
        }
    }

    /// Asks every loop to freeze (the first step of shutdown). From a
    /// thread that is not a loop: a loop uses its outgoing queues instead.
    pub fn request_shutdown(&self) {
        self.send_to_all(|| Msg::Freeze);
    }

    /// Tells every loop the dump is written: close the connections, exit.
    pub fn request_close(&self) {
        self.send_to_all(|| Msg::Close);
    }

    /// Wakes every loop that sleeps (the log made output releasable).
    pub fn wake_sleepers(&self) {
        for peer in &self.peers {
            if peer.sleeping.load(Ordering::SeqCst) {
                let _ = peer.waker.wake();
            }
        }
    }

    pub(crate) fn send_to_all(&self, msg: impl Fn() -> Msg) {
        for peer in &self.peers {
            // A full inbox still gets it: block briefly rather than lose it.
            let _ = peer.tx.send(msg());
            let _ = peer.waker.wake();
        }
    }
}

/// A lock-table command travelling to the loop that owns its shard: the
/// command, with the bytes it borrows (name, signal) moved into one buffer.
#[derive(Debug)]
pub struct ShardMsg {
    /// The command with empty byte strings; `bytes` holds name ++ signal.
    command: Command<'static>,
    bytes: Box<[u8]>,
    name_len: usize,
}

impl ShardMsg {
    fn from_command(command: Command<'_>) -> ShardMsg {
        let (name, signal) = command.bytes();
        let mut bytes = Vec::with_capacity(name.len() + signal.len());
        bytes.extend_from_slice(name);
        bytes.extend_from_slice(signal);
        ShardMsg {
            command: command.with_bytes(b"", b""),
            bytes: bytes.into(),
            name_len: name.len(),
        }
    }

    fn as_command(&self) -> Command<'_> {
        let (name, signal) = self.bytes.split_at(self.name_len);
        self.command.with_bytes(name, signal)
    }
}

/// A connection handed to another loop (the home of the session it
/// resumes or the LiveLock client id it names), with the bytes it sent
/// that are not decoded yet (starting at the RESUME/CONN).
pub struct Adoption {
    stream: TcpStream,
    /// Plain or TLS (its session goes along: the bytes in flight are in it).
    transport: crate::connection::Transport,
    codec: Codec,
    authed: bool,
    unread: Vec<u8>,
    unwritten: Vec<u8>,
    hello_deadline_ms: u64,
}

/// A read-only question to every shard, gathered by the asking loop.
#[derive(Debug, Clone)]
pub enum Query {
    /// LiveLock FIND: locks whose name matches a glob, at most `limit`.
    Find {
        pattern: Box<[u8]>,
        limit: usize,
    },
    /// Native LIST: lock records of matching locks, at most `limit`.
    List {
        pattern: Box<[u8]>,
        limit: usize,
    },
    /// Native INSPECT: one lock's record and queue (asked of its shard only).
    Inspect {
        name: Box<[u8]>,
    },
    Stats,
    /// REPORT: each shard's `top` busiest names (whose tags match `tag`,
    /// with their total, if it is not empty).
    Report {
        top: usize,
        tag: Box<[u8]>,
    },
    /// Operator KILL_SESSION: end the session (asked of its home only).
    /// The one query that changes the state: the home logs the end.
    Kill {
        session: SessionId,
    },
}

/// One shard's answer to a `Query`.
#[derive(Debug)]
pub enum QueryPart {
    /// (name, grant time in server-clock ms) of matching locks.
    Find(Vec<(Box<[u8]>, u64)>),
    /// Encoded lock records (`protocol::put_lock_record`), with their
    /// names, and whether the shard had more matches than the limit.
    Records(Vec<(Box<[u8]>, Vec<u8>)>, bool),
    Stats(ShardStats),
    /// (acquires, name, encoded `protocol::ReportRow`) of a shard's
    /// busiest names; with a tag filter, the shard's total of the names
    /// that match (usage, held, waiting).
    Report(
        Vec<(u64, Box<[u8]>, Vec<u8>)>,
        Option<Box<crate::usage::UsageTotal>>,
    ),
    /// What the home did with a `Kill`: `Ok`, `UnknownSession`, or
    /// `ShuttingDown` (frozen: nothing changes any more).
    Killed(Status),
}

/// The encoded `protocol::ReportRow` of `total`, named `name`.
pub(super) fn report_row(name: &[u8], total: &crate::usage::UsageTotal) -> Vec<u8> {
    let times = |t: &crate::usage::Times| {
        [0.5, 0.99, 1.0].map(|q| u32::try_from(t.quantile(q)).unwrap_or(u32::MAX))
    };
    let usage = &total.usage;
    let row = protocol::ReportRow {
        name: name.to_vec(),
        held: u32::try_from(total.held).unwrap_or(u32::MAX),
        waiting: u32::try_from(total.waiting).unwrap_or(u32::MAX),
        acquires: usage.acquires,
        grants: usage.grants,
        busy: usage.busy,
        timeouts: usage.timeouts,
        wait_ms: times(&usage.wait),
        hold_ms: times(&usage.hold),
    };
    let mut bytes = Vec::new();
    row.put(&mut bytes);
    bytes
}

/// Counts of one loop (summed over loops for STATS).
#[derive(Debug, Default, Clone, Copy)]
pub struct ShardStats {
    pub locks: u64,
    pub waiters: u64,
    pub sessions_attached: u64,
    pub sessions_detached: u64,
}

/// Messages between loops.
pub enum Msg {
    /// To the owner of the lock's shard.
    Shard(ShardMsg),
    /// To the session's home loop.
    Effect(Effect),
    /// A connection moving to its session's home loop.
    Adopt(Box<Adoption>),
    /// To every loop, from the loop `origin` that gathers the answers.
    Query {
        origin: usize,
        query_id: u64,
        query: Query,
    },
    QueryReply {
        query_id: u64,
        part: QueryPart,
    },
    /// Shutdown, step 1: originate no more state changes (no new requests,
    /// no timers), then take part in the export barrier.
    Freeze,
    /// From a frozen loop to every other: every message it sent before this
    /// one has arrived. `Shards`: no more commands for your shard from me;
    /// `Sessions`: no more effects for your sessions from my shard.
    Marker(Barrier),
    /// Shutdown, last step (the dump is written): close every connection,
    /// release the port, exit.
    Close,
    /// From the log: send your part of a snapshot.
    Snapshot,
    /// Deadlock detection, from loop 0 to every loop: report your shard's
    /// wait edges for this round.
    WaitEdges {
        round: u64,
    },
    /// To loop 0: a shard's wait edges (`complete`: not cut short).
    WaitEdgesReply {
        round: u64,
        shard: usize,
        edges: Vec<crate::lock_table::WaitEdge>,
        complete: bool,
    },
    /// From loop 0 to a wait's shard: fail it with `Deadlock` if it is
    /// still the wait numbered `seq`.
    FailWaiter {
        session: SessionId,
        request_id: crate::lock_table::RequestId,
        seq: u64,
        cycle: Box<[u8]>,
    },
}

/// The two rounds of the shutdown barrier (`Msg::Marker`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Barrier {
    Shards = 0,
    Sessions = 1,
}

/// What decoding one frame asks of the connection.
enum Flow {
    Continue,
    /// Stop decoding: the connection is closing (its output still flushes),
    /// or waits for a reply before its next command (LiveLock, in order).
    Stop,
    /// Stop decoding: hand the connection to loop N, from this frame on.
    Migrate(usize),
}

/// How a gathered answer is written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GatherReply {
    /// The LiveLock connection waiting for FIND/STATS.
    Resp,
    /// A native reply to `request_id` with opcode `op`.
    Native { op: u8, request_id: u32 },
}

/// A query being answered by the loops, for one connection.
struct Gather {
    /// When the query was accepted (µs since start, as of the loop turn).
    started_us: u64,
    conn: ConnRef,
    session: SessionId,
    reply: GatherReply,
    remaining: usize,
    query: Query,
    found: Vec<(Box<[u8]>, u64)>,
    records: Vec<(Box<[u8]>, Vec<u8>)>,
    /// Some matches were left out (LIST limit).
    truncated: bool,
    stats: ShardStats,
    /// REPORT rows: (acquires, name, row).
    report: Vec<(u64, Box<[u8]>, Vec<u8>)>,
    /// REPORT with a tag filter: the total of every shard's names that match.
    report_total: crate::usage::UsageTotal,
    /// The home's answer to a `Kill`.
    killed: Status,
}

/// A FIND or LIST this loop's shard is answering, a slice per turn
/// (`advance_scans`), for the loop `origin` that gathers the answers.
struct ScanJob {
    origin: usize,
    query_id: u64,
    glob: crate::glob::Glob,
    scan: crate::lock_table::Scan,
    /// FIND (names and grant times) rather than LIST (lock records).
    find: bool,
}

pub struct EventLoop {
    idx: usize,
    shared: Arc<Shared>,
    metrics: Arc<LoopMetrics>,
    poll: Poll,
    listener: Option<TcpListener>,
    inbox: Receiver<Msg>,
    conns: slab::Slab<Connection>,
    sessions: Sessions,
    table: LockTable,
    /// Effects of the last lock-table call, routed by `route_effects`.
    effects: Vec<Effect>,
    /// Multi-lock steps the delivered effects call for: sent once the
    /// effects at hand are delivered (`run_multi_steps`), so that replies
    /// go out in the order the shard made them.
    multi_steps: VecDeque<(SessionId, u32, crate::multi::Step)>,
    /// Messages for each loop, sent at the end of the turn.
    outgoing: Vec<VecDeque<Msg>>,
    /// Connections with input to look at (read not drained or frames left).
    ready: VecDeque<Token>,
    /// Connections with output to flush this turn.
    dirty: Vec<Token>,
    /// (deadline, connection) for connections that have not said HELLO.
    hello_timers: BTreeMap<(u64, usize), ()>,
    /// Queries this loop is gathering answers for.
    gathers: HashMap<u64, Gather>,
    /// FIND/LIST scans of this shard in progress, taken in turn.
    scans: VecDeque<ScanJob>,
    next_query_id: u64,
    /// Messages parked in `outgoing` because a peer's inbox was full.
    parked_total: usize,
    /// Connections not read because of that backlog.
    stalled: Vec<Token>,
    /// Shutdown step 1 happened: nothing here originates a state change
    /// any more (requests are refused, timers do not fire, closed
    /// connections do not end their sessions).
    frozen: bool,
    /// Markers received from the other loops, per barrier round.
    markers: [usize; 2],
    /// This shard's final part of the dump, once the first round passed.
    shard_export: Option<LoopState>,
    /// The final state was handed to the server.
    exported: bool,
    /// Set when closing (the last step): the instant to give up flushing.
    shutdown_deadline_ms: Option<u64>,
    /// The clock, read once per turn: server ms, and µs since start
    /// (latency metrics, at turn granularity).
    now_ms: u64,
    now_us: u64,
    /// Next time to scan the shard for the oldest hold and the busiest
    /// names (metrics).
    next_scan_ms: u64,
    /// What the metrics' busiest names last showed: the table's usage
    /// version, lock and waiter counts (held and waiting change without a
    /// usage record: a cancel, a failed wait, a session's end), and when
    /// (counts decay with time alone).
    published_usage: (u64, usize, usize, u64),
    /// The loop the next accepted connection goes to (loop 0 accepts).
    next_target: usize,
    /// The generation of the last connection added (`ConnRef`).
    next_gen: u64,
    /// This turn's changes, for the log (`--durability log`).
    journal: Journal,
    /// Connections with output added this turn (log only).
    written: Vec<Token>,
    /// (log sequence number, [(connection, generation, output end)]):
    /// output that leaves once that sequence number is durable.
    held: VecDeque<(u64, Vec<HeldOutput>)>,
    /// This turn's output may depend on changes of other loops (an effect
    /// or a connection came from one).
    tainted: bool,
    /// This turn handed changes to the log.
    handed_in: bool,
    /// Loop 0: deadlock detection rounds.
    deadlock: Option<deadlock::Rounds>,
}

/// Output of a connection held for the log: (connection, its generation,
/// the end of the output that waits), see `EventLoop::commit_turn`.
type HeldOutput = (Token, u64, u64);

/// What a loop starts with: its inbox, the listener (loop 0 only), and
/// what the dump gave back to it.
pub struct LoopStart {
    pub poll: Poll,
    pub listener: Option<TcpListener>,
    pub inbox: Receiver<Msg>,
    pub table: LockTable,
    pub sessions: Sessions,
    /// Effects of restoring the dump's queued acquires (grants of waits
    /// whose lock came back free), delivered before the first turn.
    pub effects: Vec<Effect>,
}

impl EventLoop {
    pub fn new(idx: usize, shared: Arc<Shared>, start: LoopStart) -> io::Result<EventLoop> {
        let LoopStart {
            poll,
            mut listener,
            inbox,
            table,
            sessions,
            effects,
        } = start;
        if let Some(listener) = listener.as_mut() {
            poll.registry()
                .register(listener, LISTENER, Interest::READABLE)?;
        }
        let loops = shared.peers.len();
        assert_eq!(table.shard(), idx);
        Ok(EventLoop {
            idx,
            metrics: shared.metrics[idx].clone(),
            poll,
            listener,
            inbox,
            conns: slab::Slab::new(),
            sessions,
            table,
            effects,
            multi_steps: VecDeque::new(),
            outgoing: (0..loops).map(|_| VecDeque::new()).collect(),
            ready: VecDeque::new(),
            dirty: Vec::new(),
            hello_timers: BTreeMap::new(),
            gathers: HashMap::new(),
            scans: VecDeque::new(),
            next_query_id: 0,
            parked_total: 0,
            stalled: Vec::new(),
            frozen: false,
            markers: [0; 2],
            shard_export: None,
            exported: false,
            shutdown_deadline_ms: None,
            now_ms: shared.clock.now_ms(),
            now_us: 0,
            next_scan_ms: 0,
            published_usage: (0, 0, 0, 0),
            next_target: 0,
            next_gen: 0,
            journal: Journal::default(),
            written: Vec::new(),
            held: VecDeque::new(),
            tainted: false,
            handed_in: false,
            deadlock: (idx == 0).then(deadlock::Rounds::default),
            shared,
        })
    }

    /// Runs until shutdown has said goodbye to every client.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        self.route_effects();
        loop {
            if self.shared.config.fault_panic_loop == Some(self.idx) && !self.conns.is_empty() {
                panic!("fault injection: loop {} panics", self.idx);
            }
            let ceiling = self.shared.tokens.ensure(self.table.last_token());
            self.table.set_token_ceiling(ceiling);
            let mut timeout = self.poll_timeout();
            let sleeping = &self.shared.peers[self.idx].sleeping;
            if timeout != Some(Duration::ZERO) {
                // Announce the sleep, then look at the inbox once more: a
                // sender either sees the flag and wakes us, or its message
                // is seen here (both sides use SeqCst).
                sleeping.store(true, Ordering::SeqCst);
                if !self.inbox.is_empty() || self.releasable() {
                    timeout = Some(Duration::ZERO);
                }
            }
            let polled = self.poll.poll(&mut events, timeout);
            sleeping.store(false, Ordering::SeqCst);
            match polled {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            (self.now_ms, self.now_us) = self.shared.clock.now();
            self.release_held();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    WAKER => {}
                    token => {
                        if event.is_writable() {
                            self.flush(token);
                        }
                        if event.is_read_closed() || event.is_error() {
                            if let Some(conn) = self.conns.get_mut(token.0) {
                                conn.peer_closed = true;
                            }
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.mark_ready(token);
                        }
                    }
                }
            }
            self.drain_inbox();
            self.service_ready();
            self.fire_timers();
            self.start_deadlock_round();
            self.advance_scans();
            self.send_outgoing();
            self.flush_dirty();
            // Connections closed while flushing ended their sessions: tell
            // the other shards now, not at the next wake-up.
            self.send_outgoing();
            if self.commit_turn() {
                self.flush_dirty();
                self.send_outgoing();
            }
            self.update_gauges();
            if let Some(deadline) = self.shutdown_deadline_ms {
                if self.conns.is_empty() || self.now_ms >= deadline {
                    return Ok(());
                }
            }
        }
    }

    /// Gauges for the metrics endpoint: cheap counts every turn; the age of
    /// the oldest hold (a scan of the shard) at most once a second, and only
    /// when metrics are served.
    fn update_gauges(&mut self) {
        let metrics = &self.metrics;
        metrics.set_locks_held(self.table.lock_count() as u64);
        metrics.set_waiters(self.table.waiter_count() as u64);
        let (attached, detached) = self.sessions.counts();
        metrics.set_sessions(attached as u64, detached as u64);
        metrics.set_connections(self.conns.len() as u64);
        if self.shared.config.metrics_listen.is_some() && self.now_ms >= self.next_scan_ms {
            self.next_scan_ms = self.now_ms + 1000;
            metrics.set_oldest_hold_ms(self.table.oldest_hold_ms());
            self.published_usage = self.usage_shape();
            let hot = self
                .table
                .usage_top(self.now_ms, crate::metrics::HOT_LOCKS_MAX);
            let hot = hot
                .into_iter()
                .map(|(name, total)| crate::metrics::HotLock::of(name.into(), &total));
            metrics.set_hot(hot.collect());
            metrics.set_tags(self.tag_totals());
        }
    }

    /// This shard's usage totals per tag pair (`key=value`) of its names.
    fn tag_totals(&self) -> Vec<crate::metrics::TagTotal> {
        let names = self.table.usage_tagged(self.now_ms, usize::MAX, b"");
        let mut totals: HashMap<&[u8], crate::usage::UsageTotal> = HashMap::new();
        for (_, name) in &names {
            for pair in crate::pool::pairs(&name.usage.tags) {
                totals.entry(pair).or_default().add(name);
            }
        }
        totals
            .into_iter()
            .map(|(tag, total)| crate::metrics::TagTotal {
                tag: tag.into(),
                total,
            })
            .collect()
    }

    /// The usage report's shape now (`published_usage`).
    fn usage_shape(&self) -> (u64, usize, usize, u64) {
        let table = &self.table;
        (
            table.usage_version(),
            table.lock_count(),
            table.waiter_count(),
            self.now_ms,
        )
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.ready.is_empty()
            || !self.inbox.is_empty()
            || !self.scans.is_empty()
            || !self.journal.is_empty()
            || !self.written.is_empty()
        {
            return Some(Duration::ZERO);
        }
        if self.parked_total > 0 {
            // Retry the full inbox soon, without spinning on it.
            return Some(Duration::from_millis(1));
        }
        // Frozen, timers do not fire: their deadlines wake nobody.
        let live = |deadline: Option<u64>| deadline.filter(|_| !self.frozen);
        let deadlines = [
            live(self.table.next_deadline()),
            live(self.sessions.next_deadline()),
            self.hello_timers.keys().next().map(|k| k.0),
            self.shutdown_deadline_ms,
            live(self.deadlock.as_ref().and_then(deadlock::Rounds::next_ms)),
            // The metrics show a stale usage report: wake to publish it.
            (self.shared.config.metrics_listen.is_some()).then(|| {
                let (version, locks, waiters, published_at) = self.published_usage;
                let (now_version, now_locks, now_waiters, _) = self.usage_shape();
                match (now_version, now_locks, now_waiters) == (version, locks, waiters) {
                    false => self.next_scan_ms,
                    // Unchanged: only decay makes it stale, once a period.
                    true => published_at + crate::usage::DECAY_MS,
                }
            }),
        ];
        let next = deadlines.into_iter().flatten().min()?;
        let now = self.shared.clock.now_ms();
        // +1: wake when the millisecond has passed, not just before it.
        Some(Duration::from_millis(next.saturating_sub(now) + 1))
    }

    // ---- connections -------------------------------------------------

    fn accept_all(&mut self) {
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors and the like: drop this one, keep serving.
                    tracing::error!("accept failed: {e}");
                    return;
                }
            };
            if self.shared.connections.fetch_add(1, Ordering::Relaxed) >= CONNECTIONS_MAX {
                self.shared.connections.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(
                    peer = ?stream.peer_addr().ok(),
                    "connection refused: {CONNECTIONS_MAX} connections already open"
                );
                drop(stream);
                continue;
            }
            if let Err(e) = self.shared.config.tcp.apply(&stream) {
                tracing::warn!("tuning an accepted socket failed: {e}");
            }
            self.metrics.inc_connections_accepted();
            tracing::debug!(peer = ?stream.peer_addr().ok(), "connection accepted");
            let deadline = self.now_ms + self.shared.config.hello_timeout.as_millis() as u64;
            // Round robin over the loops: the connection's loop is the home
            // of the sessions it opens.
            let target = self.next_target;
            self.next_target = (self.next_target + 1) % self.shared.peers.len();
            if target == self.idx {
                self.add_connection(Connection::new(stream, deadline));
            } else {
                let adoption = Adoption {
                    stream,
                    transport: crate::connection::Transport::Undecided,
                    codec: Codec::Sniffing,
                    authed: false,
                    unread: Vec::new(),
                    unwritten: Vec::new(),
                    hello_deadline_ms: deadline,
                };
                self.outgoing[target].push_back(Msg::Adopt(Box::new(adoption)));
            }
        }
    }

    /// Why a new session cannot be opened now, if it cannot: the sessions
    /// limit, or (for one that asks for a grace period) the detached one.
    /// Other loops' counts are as of their last turn; ours are exact.
    /// The log cannot write: changes are refused (reads still answered).
    fn storage_failing(&self) -> bool {
        self.shared.log.as_ref().is_some_and(|log| log.failing())
    }

    fn session_refusal(&self, graceful: bool) -> Option<&'static str> {
        let (mut all, mut detached) = (0, 0);
        for (idx, metrics) in self.shared.metrics.iter().enumerate() {
            let (a, d) = match idx == self.idx {
                true => self.sessions.counts(),
                false => {
                    let (a, d) = metrics.sessions();
                    (a as usize, d as usize)
                }
            };
            all += a + d;
            detached += d;
        }
        let config = &self.shared.config;
        if all >= config.sessions_max {
            Some("too many sessions")
        } else if graceful && detached >= config.detached_sessions_max {
            Some("too many detached sessions")
        } else {
            None
        }
    }

    /// The connection's peer address, for the log.
    fn peer_of(&self, token: Token) -> Option<std::net::SocketAddr> {
        self.conns.get(token.0)?.stream.peer_addr().ok()
    }

    /// The slot and generation of the connection at `token`.
    fn conn_ref(&self, token: Token) -> ConnRef {
        ConnRef {
            token,
            gen: self.conns[token.0].gen,
        }
    }

    /// The connection `conn` names, if it is still there (not a newer one
    /// in its slot).
    fn live(&self, conn: ConnRef) -> Option<Token> {
        let live = self.conns.get(conn.token.0)?;
        (live.gen == conn.gen).then_some(conn.token)
    }

    fn add_connection(&mut self, mut conn: Connection) -> Option<Token> {
        self.next_gen += 1;
        conn.gen = self.next_gen;
        if self.shared.log.is_some() {
            conn.hold_output();
        }
        let entry = self.conns.vacant_entry();
        let token = Token(entry.key());
        let conn = entry.insert(conn);
        if let Err(e) = self.poll.registry().register(
            &mut conn.stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::error!("registering a connection failed: {e}");
            self.conns.remove(token.0);
            self.shared.connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        if conn.hello_deadline_ms != 0 {
            self.hello_timers
                .insert((conn.hello_deadline_ms, token.0), ());
        }
        Some(token)
    }

    fn mark_ready(&mut self, token: Token) {
        if let Some(conn) = self.conns.get_mut(token.0) {
            if !conn.ready {
                conn.ready = true;
                self.ready.push_back(token);
            }
        }
    }

    /// The connection got output: flush it this turn (and, with the log,
    /// hold it until the turn's changes are durable).
    fn mark_dirty(&mut self, token: Token) {
        if let Some(conn) = self.conns.get_mut(token.0) {
            note_output(conn, token, &mut self.dirty, &mut self.written);
        }
    }

    /// The connection has output to flush (none added).
    fn mark_flush(&mut self, token: Token) {
        if let Some(conn) = self.conns.get_mut(token.0) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(token);
            }
        }
    }

    fn service_ready(&mut self) {
        for _ in 0..self.ready.len() {
            let Some(token) = self.ready.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(token.0) else {
                continue;
            };
            conn.ready = false;
            if conn.closing {
                continue;
            }
            if conn.unwritten() > WRITE_BUFFER_PAUSE {
                // Backpressure: the peer does not read its replies. `flush`
                // resumes reading once it does.
                conn.paused = true;
                continue;
            }
            if self.parked_total > OUTBOX_PARK_MAX {
                // Another loop's inbox is full: read nothing more until
                // `send_outgoing` has delivered the backlog.
                self.stalled.push(token);
                continue;
            }
            let state = if conn.eof {
                ReadState::Eof
            } else {
                match conn.fill(self.shared.tls.as_ref()) {
                    Ok(state) => state,
                    Err(_) => {
                        self.close(token);
                        continue;
                    }
                }
            };
            if state == ReadState::Eof {
                conn.eof = true;
            }
            let more_frames = self.decode_frames(token);
            let Some(conn) = self.conns.get_mut(token.0) else {
                continue;
            };
            if conn.closing {
                self.mark_dirty(token);
                continue;
            }
            // A LiveLock connection waiting for its answer is resumed by it
            // (`mark_ready` on delivery), not polled in a busy loop.
            if (more_frames || state == ReadState::Full) && !conn.awaiting {
                self.mark_ready(token);
            } else if conn.eof {
                // Half-closed: the peer may still read. Answer what was
                // decoded (a LiveLock command at a shard, a query being
                // gathered), then flush and close.
                let this = ConnRef {
                    token,
                    gen: conn.gen,
                };
                // Native: replies to requests in flight, the rest of a
                // RESUME's listing.
                let session = conn.session.and_then(|id| self.sessions.get(id));
                let owed_native = session.is_some_and(|s| {
                    s.conn == Some(token)
                        && s.client_id.is_none()
                        && (s.pending.values().any(|p| !p.queued) || s.replay.is_some())
                });
                let owed =
                    conn.awaiting || owed_native || self.gathers.values().any(|g| g.conn == this);
                if !owed {
                    self.start_closing(token);
                }
            }
        }
    }

    /// Decodes and handles up to FRAMES_PER_TURN_MAX frames of `token`.
    /// Returns whether whole frames may be left.
    fn decode_frames(&mut self, token: Token) -> bool {
        let conn = &mut self.conns[token.0];
        if conn.codec == Codec::Sniffing {
            match conn.rbuf.get(conn.rpos) {
                None => return false,
                Some(&protocol::MAGIC_BYTE0) => conn.codec = Codec::Native,
                Some(_) => {
                    conn.codec = Codec::Resp;
                    conn.authed = self.shared.config.password.is_none();
                }
            }
        }
        let codec = conn.codec;
        let rbuf = std::mem::take(&mut conn.rbuf);
        let mut pos = conn.rpos;
        let mut flow = Flow::Continue;
        let mut frames = 0;
        while frames < FRAMES_PER_TURN_MAX {
            let step = match codec {
                Codec::Native => self.decode_native(token, &rbuf[pos..]),
                Codec::Resp => self.decode_resp(token, &rbuf[pos..]),
                Codec::Sniffing => unreachable!("sniffed above"),
            };
            let Some((consumed, step_flow)) = step else {
                break;
            };
            flow = step_flow;
            if let Flow::Migrate(_) = flow {
                break; // the migrating frame goes along, undecoded
            }
            pos += consumed;
            frames += 1;
            if let Flow::Stop = flow {
                break;
            }
        }
        match flow {
            Flow::Migrate(home) => {
                self.migrate(token, rbuf, pos, home);
                false
            }
            _ => {
                if let Some(conn) = self.conns.get_mut(token.0) {
                    conn.rbuf = rbuf;
                    let consumed = pos - conn.rpos;
                    conn.consume(consumed);
                }
                frames == FRAMES_PER_TURN_MAX && matches!(flow, Flow::Continue)
            }
        }
    }

    fn start_closing(&mut self, token: Token) {
        if let Some(conn) = self.conns.get_mut(token.0) {
            conn.closing = true;
        }
        self.mark_dirty(token);
    }

    fn flush(&mut self, token: Token) {
        let Some(conn) = self.conns.get_mut(token.0) else {
            return;
        };
        match conn.flush() {
            Err(_) => self.close(token),
            Ok(true) if conn.closing => self.close(token),
            Ok(_) => {
                if conn.unwritten() <= WRITE_BUFFER_PAUSE {
                    if conn.paused {
                        conn.paused = false;
                        self.mark_ready(token);
                    }
                    self.continue_replay(token);
                }
            }
        }
    }

    fn flush_dirty(&mut self) {
        // A close below can end a session whose locks go to waiters of this
        // loop, which makes more connections dirty: flush those too.
        while !self.dirty.is_empty() {
            let dirty = std::mem::take(&mut self.dirty);
            for &token in &dirty {
                if let Some(conn) = self.conns.get_mut(token.0) {
                    conn.dirty = false;
                    if conn.unwritten() > WRITE_BUFFER_MAX {
                        // Owed replies piled up past the hard bound: the peer is stuck.
                        self.close(token);
                        continue;
                    }
                    self.flush(token);
                }
            }
        }
    }

    /// Drops the connection; its session detaches (and ends without grace).
    fn close(&mut self, token: Token) {
        let Some(mut conn) = self.conns.try_remove(token.0) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(peer = ?conn.stream.peer_addr().ok(), session = conn.session, "connection closed");
        if let Some(id) = conn.session {
            if self.sessions.get(id).is_some_and(|s| s.conn == Some(token)) {
                let session = self.sessions.get_mut(id).expect("checked");
                if session.client_id.is_none() && session.grace_ms > 0 {
                    // What it was owed and never got waits for a RESUME.
                    let (_, kept) = unsent_frames(&conn);
                    session.parked.extend_from_slice(&kept);
                }
                session.replay = None;
                if let Some(session) = self.sessions.detach(id, self.now_ms) {
                    // Frozen: the state is being exported as it is; a
                    // session without grace is simply not in the dump.
                    if !self.frozen {
                        self.end_session(session);
                    }
                }
            }
        }
    }

    /// Hands the connection to loop `home`, undecoded input from `pos` on.
    fn migrate(&mut self, token: Token, rbuf: Vec<u8>, pos: usize, home: usize) {
        let mut conn = self.conns.remove(token.0);
        let _ = self.poll.registry().deregister(&mut conn.stream);
        assert!(
            conn.session.is_none(),
            "only a session-less connection moves"
        );
        let adoption = Adoption {
            transport: conn.transport,
            codec: conn.codec,
            authed: conn.authed,
            unread: rbuf[pos..].to_vec(),
            unwritten: conn.wbuf[conn.wpos..].to_vec(),
            hello_deadline_ms: conn.hello_deadline_ms,
            stream: conn.stream,
        };
        self.outgoing[home].push_back(Msg::Adopt(Box::new(adoption)));
    }

    fn adopt(&mut self, adoption: Adoption) {
        let mut conn = Connection::new(adoption.stream, adoption.hello_deadline_ms);
        conn.transport = adoption.transport;
        conn.codec = adoption.codec;
        conn.authed = adoption.authed;
        conn.rbuf = adoption.unread;
        conn.wbuf = adoption.unwritten;
        if let Some(token) = self.add_connection(conn) {
            self.mark_ready(token);
            self.mark_dirty(token);
        }
    }

    fn wbuf(&mut self, token: Token) -> &mut Vec<u8> {
        self.mark_dirty(token);
        &mut self.conns[token.0].wbuf
    }

    fn shard_of(&self, name: &[u8]) -> usize {
        shard_for(name, self.shared.peers.len())
    }

    /// Applies `command` here if this loop owns `shard`, else sends it there.
    fn route_to_shard(&mut self, shard: usize, command: Command<'_>) {
        if shard == self.idx {
            self.apply_to_shard(command);
        } else {
            // Checked here where the route is chosen, and again by the
            // owner's table where it is relied on.
            if let Some(name) = command.lock_name() {
                assert_eq!(self.shard_of(name), shard, "lock routed to the wrong shard");
            }
            self.outgoing[shard].push_back(Msg::Shard(ShardMsg::from_command(command)));
        }
    }

    /// Applies a command to this loop's shard (writing it to the journal
    /// first, with the log) and routes its effects.
    fn apply_to_shard(&mut self, command: Command<'_>) {
        if self.shared.log.is_some() {
            if journal::changes_state(&command) {
                self.journal.shard(self.now_ms, &command);
            } else if self.table.next_deadline().is_some_and(|d| d <= self.now_ms) {
                // A read fires the due deadlines first: that is a change.
                self.journal.tick(self.now_ms);
            }
        }
        self.table.apply(self.now_ms, command, &mut self.effects);
        self.route_effects();
    }

    /// Writes a new session's durable part to the journal (with the log).
    fn journal_session_open(&mut self, id: SessionId) {
        if self.shared.log.is_some() {
            if let Some(session) = self.sessions.get(id) {
                self.journal
                    .session_open(&snapshot::durable_session(session));
            }
        }
    }

    /// Tells every shard the session touched that it is over.
    fn end_session(&mut self, session: Session) {
        if self.shared.log.is_some() {
            self.journal.session_end(session.id);
        }
        // LiveLock connections still waiting for an answer get one now
        // (the session is gone, so its replies would be dropped).
        for pending in session.pending.values() {
            if let PendingOp::Resp(op) = pending.op {
                self.resp_session_ended(pending.conn, session.id, op);
            }
        }
        let mut touched = session.touched;
        while touched != 0 {
            let shard = touched.trailing_zeros() as usize;
            touched &= touched - 1;
            self.route_to_shard(
                shard,
                Command::EndSession {
                    session: session.id,
                },
            );
        }
    }

    // ---- effects -----------------------------------------------------

    fn route_effects(&mut self) {
        let mut effects = std::mem::take(&mut self.effects);
        for effect in effects.drain(..) {
            let home = home_of(effect.session(), self.shared.peers.len());
            if home == self.idx {
                self.deliver(effect);
            } else {
                self.outgoing[home].push_back(Msg::Effect(effect));
            }
        }
        self.effects = effects;
        self.run_multi_steps();
    }

    /// Writes an effect for one of this loop's sessions to its connection,
    /// or parks it while the session is detached.
    fn deliver(&mut self, effect: Effect) {
        let session_id = effect.session();
        assert_eq!(
            home_of(session_id, self.shared.peers.len()),
            self.idx,
            "effect routed to the wrong home"
        );
        // An ended session's late replies are dropped here.
        let Some(session) = self.sessions.get_mut(session_id) else {
            return;
        };
        let resp_session = session.client_id.is_some();
        let detached = session.conn.is_none();
        // Output not yet taken by the peer, and whether it half-closed.
        let (backlog, eof) = session.conn.map_or((0, false), |t| {
            (self.conns[t.0].unwritten(), self.conns[t.0].eof)
        });
        let delivery = session.record(&effect);
        if let Delivery::MultiStep(request_id, step) = delivery {
            if let Effect::LockLost { .. } = effect {
                // A part of it was taken away (an operator's FORCE_RELEASE).
                self.metrics.inc_lock_lost();
            }
            self.multi_steps.push_back((session_id, request_id, step));
            return;
        }
        // Native output goes to the session's connection, or is parked for
        // RESUME while it is detached.
        let native_out: &mut Vec<u8> = match session.conn {
            Some(token) if !resp_session => {
                let conn = &mut self.conns[token.0];
                note_output(conn, token, &mut self.dirty, &mut self.written);
                &mut conn.wbuf
            }
            _ => &mut session.parked,
        };
        match (delivery, effect) {
            (Delivery::Queued { notify }, Effect::Reply { request_id, .. }) => {
                if let Some(op) = notify {
                    protocol::encode_queued(native_out, op, request_id);
                }
                // A half-closed connection does not wait for a queued acquire.
                if let (true, Some(token)) = (eof, session.conn) {
                    self.mark_ready(token);
                }
            }
            (
                Delivery::Final(pending),
                Effect::Reply {
                    request_id,
                    outcome,
                    deferred,
                    ..
                },
            ) => {
                let micros = self.now_us.saturating_sub(pending.started_us);
                // An acquire that waited in a queue: waiting, not service.
                if pending.queued {
                    self.metrics.observe_wait(micros);
                } else {
                    self.metrics.observe(op_metric(pending.op), micros);
                }
                match outcome {
                    Outcome::Granted { .. } => self.metrics.inc_grants(),
                    Outcome::Ok if pending.op.is_release() => self.metrics.inc_releases(),
                    Outcome::TimedOut => self.metrics.inc_timeouts(),
                    Outcome::Busy => self.metrics.inc_busy(),
                    _ => {}
                }
                match pending.op {
                    PendingOp::Native(op) => {
                        native::encode_outcome(native_out, op, request_id, outcome, deferred);
                        // A half-closed connection closes once it is owed nothing.
                        if let (true, Some(token)) = (eof, session.conn) {
                            self.mark_ready(token);
                        }
                    }
                    PendingOp::Resp(op) => self.resp_reply(pending.conn, session_id, op, outcome),
                }
            }
            (Delivery::MultiFinal(pending, result), effect) => {
                let request_id = effect.request_id().expect("a reply answers a request");
                let micros = self.now_us.saturating_sub(pending.started_us);
                match pending.queued {
                    true => self.metrics.observe_wait(micros),
                    false => self.metrics.observe(op_metric(pending.op), micros),
                }
                if let Err(crate::multi::Failure::Deadlock(cycle)) = &result {
                    self.metrics.inc_deadlocks();
                    tracing::warn!(
                        session = session_id,
                        request_id,
                        "deadlock broken, this multi-lock failed: {}",
                        shown(cycle)
                    );
                }
                match &result {
                    Ok(_) => self.metrics.inc_grants(),
                    Err(crate::multi::Failure::Outcome(Outcome::TimedOut)) => {
                        self.metrics.inc_timeouts()
                    }
                    Err(crate::multi::Failure::Outcome(Outcome::Busy)) => self.metrics.inc_busy(),
                    Err(_) => {}
                }
                if !resp_session {
                    let op = match pending.op {
                        crate::session::PendingOp::Native(op) => op,
                        crate::session::PendingOp::Resp(_) => opcode::ACQUIRE_ALL,
                    };
                    multi::encode_final(native_out, (op, request_id), &result, pending.queued);
                }
                if let (true, Some(token)) = (eof, session.conn) {
                    self.mark_ready(token);
                }
                self.end_multi(session_id, request_id);
            }
            (Delivery::Lost { push }, Effect::LockLost { token, name, .. }) => {
                self.metrics.inc_lock_lost();
                tracing::info!(
                    session = session_id,
                    token,
                    lock = %shown(&name),
                    "lock lost"
                );
                if push && !resp_session {
                    protocol::encode_lock_lost(native_out, token, &name);
                }
            }
            (Delivery::Signal { push }, Effect::Signal { name, signal, .. }) => {
                // Signals stay queryable; a push never makes a connection
                // owe more than WRITE_BUFFER_PAUSE (a holder that does not
                // read is not closed for what others raise), and parked
                // output stays bounded while detached.
                let full = match detached {
                    true => native_out.len() >= PARKED_PUSHES_MAX,
                    false => backlog > WRITE_BUFFER_PAUSE,
                };
                if resp_session || !push {
                } else if full {
                    self.metrics.inc_pushes_dropped();
                } else {
                    protocol::encode_signal(native_out, &name, &signal);
                }
            }
            (
                Delivery::Final(pending),
                Effect::Deadlock {
                    request_id, cycle, ..
                },
            ) => {
                self.metrics
                    .observe_wait(self.now_us.saturating_sub(pending.started_us));
                self.metrics.inc_deadlocks();
                tracing::warn!(
                    session = session_id,
                    request_id,
                    "deadlock broken, this wait failed: {}",
                    shown(&cycle)
                );
                if let PendingOp::Native(op) = pending.op {
                    let status = Status::Deadlock;
                    protocol::encode_reply(native_out, op, true, status, request_id, &cycle);
                    if let (true, Some(token)) = (eof, session.conn) {
                        self.mark_ready(token);
                    }
                }
            }
            (delivery, effect) => unreachable!("{delivery:?} for {effect:?}"),
        }
    }

    /// Writes more of a RESUME's listing of holds (HELD pushes, then
    /// HELD_END) while the connection owes less than WRITE_BUFFER_PAUSE.
    fn continue_replay(&mut self, token: Token) {
        let Some(conn) = self.conns.get_mut(token.0) else {
            return;
        };
        let Some(session) = conn.session.and_then(|id| self.sessions.get_mut(id)) else {
            return;
        };
        let mut wrote = false;
        let mut done = false;
        while !done && conn.unwritten() <= WRITE_BUFFER_PAUSE {
            match session.next_listed() {
                None => break, // no listing under way
                Some(Listed::Held(name, held)) => {
                    protocol::encode_held(&mut conn.wbuf, held.token, held.mode, &name);
                }
                Some(Listed::Gone) => {}
                Some(Listed::End) => {
                    protocol::encode_push(&mut conn.wbuf, opcode::HELD_END);
                    done = true;
                }
            }
            wrote = true;
        }
        let eof = conn.eof;
        if wrote {
            self.mark_dirty(token);
        }
        if done && eof {
            // A half-closed connection waited for the listing.
            self.mark_ready(token);
        }
    }

    // ---- inbox, timers, outgoing --------------------------------------

    fn drain_inbox(&mut self) {
        for _ in 0..INBOX_PER_TURN_MAX {
            let Ok(msg) = self.inbox.try_recv() else {
                break;
            };
            match msg {
                Msg::Shard(shard_msg) => self.apply_to_shard(shard_msg.as_command()),
                Msg::Effect(effect) => {
                    self.tainted = true;
                    self.deliver(effect);
                    self.run_multi_steps();
                }
                Msg::Adopt(adoption) => {
                    self.tainted = true;
                    self.adopt(*adoption);
                }
                Msg::Snapshot => self.export_snapshot_part(),
                Msg::Query {
                    origin,
                    query_id,
                    query,
                } => self.take_query(origin, query_id, query),
                Msg::QueryReply { query_id, part } => {
                    // A kill's answer reports a change of another loop:
                    // it waits for the log like an effect does.
                    self.tainted |= matches!(part, QueryPart::Killed(_));
                    self.gather_part(query_id, part)
                }
                Msg::Freeze => self.freeze(),
                Msg::Marker(round) => {
                    self.markers[round as usize] += 1;
                    self.advance_shutdown();
                }
                Msg::Close => self.begin_close(),
                Msg::WaitEdges { round } => self.report_wait_edges(round),
                Msg::WaitEdgesReply {
                    round,
                    shard,
                    edges,
                    complete,
                } => self.wait_edges_reply(round, shard, edges, complete),
                Msg::FailWaiter {
                    session,
                    request_id,
                    seq,
                    cycle,
                } => self.fail_waiter(session, request_id, seq, &cycle),
            }
        }
    }

    fn fire_timers(&mut self) {
        let now_ms = self.now_ms;
        // Frozen (shutting down): no timer changes the state being exported.
        if !self.frozen && self.table.next_deadline().is_some_and(|d| d <= now_ms) {
            if self.shared.log.is_some() {
                self.journal.tick(now_ms);
            }
            self.table.tick(now_ms, &mut self.effects);
            self.route_effects();
        }
        if !self.frozen && self.sessions.next_deadline().is_some_and(|d| d <= now_ms) {
            let mut ended = Vec::new();
            self.sessions.expire(now_ms, &mut ended);
            for session in ended {
                tracing::info!(
                    session = session.id,
                    client = %shown(&session.client_name),
                    holds = session.holds.len(),
                    "session expired: no RESUME within its grace of {} ms; its locks are released",
                    session.grace_ms
                );
                self.end_session(session);
            }
        }
        while let Some((&(deadline, key), _)) = self.hello_timers.first_key_value() {
            if deadline > now_ms {
                break;
            }
            self.hello_timers.remove(&(deadline, key));
            let token = Token(key);
            let late = self.conns.get(key).is_some_and(|c| {
                c.session.is_none() && c.hello_deadline_ms == deadline && !c.closing
            });
            if late {
                if self.conns[key].codec == Codec::Native {
                    self.reply_status(
                        token,
                        opcode::HELLO,
                        0,
                        Status::HelloTimeout,
                        "no HELLO in time",
                    );
                }
                self.start_closing(token);
            }
        }
    }

    // ---- the log ------------------------------------------------------

    /// End of a turn, with the log: hands the rest of the turn's journal to
    /// the log and holds the turn's output until everything handed in so
    /// far is durable — by any loop: a change of another loop this turn's
    /// output depends on was handed in before the message that reported it
    /// was sent (`hand_in` in `send_outgoing`).
    /// While the log is failing, a turn that changed nothing and heard
    /// from no other loop answers at once (reads, PING). Returns whether
    /// output was released now (to flush).
    fn commit_turn(&mut self) -> bool {
        if self.shared.log.is_none() {
            return false;
        }
        self.hand_in();
        let changed = std::mem::take(&mut self.handed_in);
        let log = self.shared.log.as_deref().expect("checked above");
        let mut tail = log.submitted();
        let durable = log.durable();
        // A cluster leader's answers to reads wait for a quorum round begun
        // after the read: this turn's own batch, or an empty one
        // (linearizable: a deposed leader answers none).
        if !changed && !self.written.is_empty() && log.read_barriers.load(Ordering::Relaxed) {
            tail = log.barrier();
        }
        let answer_now = log.failing() && !changed && !self.tainted;
        self.tainted = false;
        let mut ends = Vec::new();
        let mut released = false;
        // (The list keeps its allocation from turn to turn.)
        let mut written = std::mem::take(&mut self.written);
        for token in written.drain(..) {
            let Some(conn) = self.conns.get_mut(token.0) else {
                continue;
            };
            conn.written = false;
            let end = conn.wbase + conn.wbuf.len() as u64;
            if tail <= durable || (answer_now && conn.held_until <= durable) {
                conn.released = conn.released.max(end);
                released = true;
                if !conn.dirty {
                    conn.dirty = true;
                    self.dirty.push(token);
                }
            } else {
                conn.held_until = tail;
                ends.push((token, conn.gen, end));
            }
        }
        self.written = written;
        if !ends.is_empty() {
            self.held.push_back((tail, ends));
        }
        released
    }

    /// Writes `frame`, a native reply that reports no change (a refusal
    /// because the log cannot write), so that it leaves at once: ahead of
    /// the connection's output that waits for the log, at the frame
    /// boundary where that output starts (native replies are matched by
    /// request id, so their order is free). While the log fails, held
    /// output may wait until the disk recovers; a refusal must not — nor
    /// be held with the other output of a turn that applied a change.
    fn reply_now(&mut self, token: Token, frame: &[u8]) {
        let conn = &mut self.conns[token.0];
        let end = conn.wbase + conn.wbuf.len() as u64;
        let at = conn.released.min(end);
        let offset = usize::try_from(at - conn.wbase).expect("within the buffer");
        conn.wbuf.splice(offset..offset, frame.iter().copied());
        let len = frame.len() as u64;
        if conn.released != u64::MAX {
            conn.released = at + len;
        }
        // The connection's held output moved back by the frame's length.
        let gen = conn.gen;
        for (_, ends) in self.held.iter_mut() {
            for (_, _, held_end) in ends.iter_mut().filter(|(t, g, _)| *t == token && *g == gen) {
                *held_end += len;
            }
        }
        self.mark_flush(token);
    }

    /// Whether held output can leave (the log has caught up with it).
    fn releasable(&self) -> bool {
        let (Some(log), Some((seq, _))) = (&self.shared.log, self.held.front()) else {
            return false;
        };
        *seq <= log.durable()
    }

    /// Lets out the output whose changes are now durable.
    fn release_held(&mut self) {
        while self.releasable() {
            let (_, ends) = self.held.pop_front().expect("releasable");
            for (token, gen, end) in ends {
                if let Some(conn) = self.conns.get_mut(token.0).filter(|c| c.gen == gen) {
                    conn.released = conn.released.max(end);
                    self.mark_flush(token);
                }
            }
        }
    }

    /// The log asked for a snapshot: this loop's part, at this instant,
    /// after its due deadlines fired and its journal was handed in (so the
    /// part is exactly the state after batch `journal.batches()`).
    fn export_snapshot_part(&mut self) {
        let Some(log) = self.shared.log.clone() else {
            return;
        };
        let now_ms = self.now_ms;
        if self.table.next_deadline().is_some_and(|d| d <= now_ms) {
            self.journal.tick(now_ms);
            self.table.tick(now_ms, &mut self.effects);
            self.route_effects();
        }
        self.hand_in();
        let idx = self.idx;
        let started = Instant::now();
        let mut state = snapshot::export_shard(&self.table, now_ms);
        state.sessions = snapshot::durable_sessions(&self.sessions, self.now_ms);
        log.send_part(SnapshotPart {
            idx,
            export: started.elapsed(),
            position: crate::dump::LoopPosition {
                stamp_ms: now_ms,
                batch: self.journal.batches(),
                last_token: state.last_token,
            },
            state,
        });
    }

    /// Hands the journal's records to the log (with the log; nothing
    /// otherwise). Called before any message of this turn leaves: a loop
    /// that receives one and reads the log's tail afterwards then waits for
    /// the change the message reports (`commit_turn`).
    fn hand_in(&mut self) {
        let Some(log) = &self.shared.log else {
            return;
        };
        let idx = self.idx;
        let journal = &mut self.journal;
        if log.submit(|buf| journal.take_batch(idx, buf)).is_some() {
            self.handed_in = true;
        }
    }

    fn send_outgoing(&mut self) {
        self.hand_in();
        for (dest, queue) in self.outgoing.iter_mut().enumerate() {
            if queue.is_empty() {
                continue;
            }
            let peer = &self.shared.peers[dest];
            let mut sent = 0;
            while let Some(msg) = queue.pop_front() {
                match peer.tx.try_send(msg) {
                    Ok(()) => sent += 1,
                    Err(TrySendError::Full(msg)) => {
                        // Parked until the owner drains its inbox; reading
                        // sockets pauses while too much is parked.
                        queue.push_front(msg);
                        break;
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        // That loop has exited (shutdown): nothing to tell it.
                        queue.clear();
                        break;
                    }
                }
            }
            if sent > 0 {
                self.metrics.inc_cross_shard(sent);
                if peer.sleeping.load(Ordering::SeqCst) {
                    let _ = peer.waker.wake();
                }
            }
        }
        self.parked_total = self.outgoing.iter().map(VecDeque::len).sum();
        if self.parked_total <= OUTBOX_PARK_MAX / 2 {
            for token in std::mem::take(&mut self.stalled) {
                self.mark_ready(token);
            }
        }
    }

    /// Shutdown step 1: stop originating state changes, tell the clients,
    /// and start the export barrier. The listener stays open (the port
    /// stays ours until the dump is written) but is no longer accepted from.
    pub(super) fn freeze(&mut self) {
        if self.frozen {
            return;
        }
        self.frozen = true;
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(listener) = self.listener.as_mut() {
            let _ = self.poll.registry().deregister(listener);
        }
        let tokens: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in tokens {
            if self.conns[key].codec == Codec::Native {
                protocol::encode_push(self.wbuf(Token(key)), opcode::SHUTDOWN);
            }
        }
        self.send_markers(Barrier::Shards);
        self.advance_shutdown();
    }

    fn send_markers(&mut self, round: Barrier) {
        for peer in 0..self.shared.peers.len() {
            if peer != self.idx {
                // Behind everything queued for that loop: FIFO per channel.
                self.outgoing[peer].push_back(Msg::Marker(round));
            }
        }
    }

    /// The export barrier. Frozen loops originate no commands, so once a
    /// frozen loop has every other loop's `Shards` marker, no command for
    /// its shard is in flight: the shard is final and is exported. Effects
    /// come only from shards, so once it also has every `Sessions` marker
    /// (sent by each loop after exporting its shard), no effect for its
    /// sessions is in flight: they are final too. Then the whole state goes
    /// to the server, which writes the dump and sends `Close`.
    fn advance_shutdown(&mut self) {
        let others = self.shared.peers.len() - 1;
        if !self.frozen || self.exported {
            return;
        }
        if self.shard_export.is_none() && self.markers[Barrier::Shards as usize] == others {
            self.shard_export = Some(snapshot::export_shard(&self.table, self.now_ms));
            self.send_markers(Barrier::Sessions);
        }
        if self.shard_export.is_some() && self.markers[Barrier::Sessions as usize] == others {
            let mut state = self.shard_export.take().expect("checked");
            state.sessions = snapshot::export_sessions(&self.sessions, self.now_ms);
            self.exported = true;
            // The server holds the receiver until every loop has sent.
            let _ = self.shared.final_tx.send(state);
        }
    }

    /// Shutdown, last step: the dump is written; close every connection
    /// (flushing what it is owed, for at most SHUTDOWN_FLUSH_MS) and exit.
    fn begin_close(&mut self) {
        if self.shutdown_deadline_ms.is_some() {
            return;
        }
        self.shutdown_deadline_ms = Some(self.now_ms + SHUTDOWN_FLUSH_MS);
        // Every asker's connection closes now: no scan is worth finishing.
        self.scans.clear();
        let tokens: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in tokens {
            self.start_closing(Token(key));
        }
    }

    // ---- queries over every shard -------------------------------------

    /// Asks `query` of every loop (or only of `only_shard`); the answer is
    /// written to `conn` when all have replied (`finish_gather`).
    fn start_query(
        &mut self,
        conn: Token,
        session: SessionId,
        reply: GatherReply,
        query: Query,
        only_shard: Option<usize>,
    ) {
        self.next_query_id += 1;
        let query_id = self.next_query_id;
        let loops = self.shared.peers.len();
        let targets: Vec<usize> = match only_shard {
            Some(shard) => vec![shard],
            None => (0..loops).collect(),
        };
        self.gathers.insert(
            query_id,
            Gather {
                started_us: self.now_us,
                conn: self.conn_ref(conn),
                session,
                reply,
                remaining: targets.len(),
                query: query.clone(),
                found: Vec::new(),
                records: Vec::new(),
                truncated: false,
                stats: ShardStats::default(),
                report: Vec::new(),
                report_total: Default::default(),
                killed: Status::UnknownSession,
            },
        );
        for &peer in &targets {
            if peer != self.idx {
                self.outgoing[peer].push_back(Msg::Query {
                    origin: self.idx,
                    query_id,
                    query: query.clone(),
                });
            }
        }
        if targets.contains(&self.idx) {
            self.take_query(self.idx, query_id, query);
        }
    }

    /// This shard's part of query `query_id` of loop `origin`: INSPECT and
    /// STATS are answered at once; FIND and LIST start a scan of the shard
    /// that goes on a slice per turn (`advance_scans`), so timers and other
    /// clients are served between slices however large the shard.
    fn take_query(&mut self, origin: usize, query_id: u64, query: Query) {
        let (pattern, limit, find) = match query {
            Query::Find { pattern, limit } => (pattern, limit, true),
            Query::List { pattern, limit } => (pattern, limit, false),
            Query::Inspect { .. } | Query::Stats | Query::Report { .. } => {
                let part = self.answer_query(&query);
                self.send_part(origin, query_id, part);
                return;
            }
            Query::Kill { session } => {
                let status = if self.frozen {
                    Status::ShuttingDown
                } else if self.storage_failing() {
                    // The end could not be made durable: nothing changes.
                    Status::StorageFailed
                } else {
                    self.kill_session(session)
                };
                self.send_part(origin, query_id, QueryPart::Killed(status));
                return;
            }
        };
        let order = match find {
            true => ListOrder::OldestGrant,
            false => ListOrder::Name,
        };
        self.scans.push_back(ScanJob {
            origin,
            query_id,
            glob: crate::glob::Glob::new(&pattern),
            scan: self.table.start_scan(order, limit),
            find,
        });
    }

    fn send_part(&mut self, origin: usize, query_id: u64, part: QueryPart) {
        if origin == self.idx {
            self.gather_part(query_id, part);
        } else {
            self.outgoing[origin].push_back(Msg::QueryReply { query_id, part });
        }
    }

    /// Runs the scans in progress for at most SCAN_WORK_PER_TURN units of
    /// work in all, round robin: the scan that used up the budget goes to
    /// the back, so concurrent scans share the turns. A finished scan's
    /// part goes to its asker.
    fn advance_scans(&mut self) {
        let mut budget = crate::limits::SCAN_WORK_PER_TURN;
        while budget > 0 {
            let Some(mut job) = self.scans.pop_front() else {
                return;
            };
            let glob = &job.glob;
            let slice =
                self.table
                    .scan_slice(&mut job.scan, |name| glob.matches_counting(name), budget);
            let Some(spent) = slice else {
                self.scans.push_back(job);
                return;
            };
            budget = budget.saturating_sub(spent);
            let part = self.finish_scan(job.scan, job.find);
            self.send_part(job.origin, job.query_id, part);
        }
    }

    /// A finished scan's part of the answer. Each shard sends at most a
    /// whole reply's worth of bytes (LIST_REPLY_BYTES_MAX of records,
    /// FIND_REPLY_BYTES_MAX of names), in reply order: what it leaves out
    /// could not be in the merged reply, which is cut at the same size.
    fn finish_scan(&self, scan: crate::lock_table::Scan, find: bool) -> QueryPart {
        let (infos, mut cut) = self.table.finish_scan(scan);
        if find {
            let mut bytes = 0;
            let mut found: Vec<(Box<[u8]>, u64)> = infos
                .into_iter()
                .map(|info| {
                    let since = info.holders.iter().map(|h| h.since_ms).min().unwrap_or(0);
                    (info.name, since)
                })
                .collect();
            // Reply order, by the grant times as they are now.
            found.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
            found.retain(|(name, _)| {
                bytes += name.len();
                bytes <= crate::limits::FIND_REPLY_BYTES_MAX
            });
            return QueryPart::Find(found);
        }
        let mut bytes = 0;
        let mut records = Vec::with_capacity(infos.len());
        for info in infos {
            let record = self.record(info);
            bytes += record.1.len();
            if bytes > crate::limits::LIST_REPLY_BYTES_MAX {
                cut = true;
                break;
            }
            records.push(record);
        }
        QueryPart::Records(records, cut)
    }

    fn answer_query(&self, query: &Query) -> QueryPart {
        match query {
            Query::Find { .. } | Query::List { .. } => {
                unreachable!("FIND and LIST are scans (take_query)")
            }
            Query::Inspect { name } => {
                let info = self.table.inspect(name);
                let records = info.into_iter().map(|info| {
                    let (name, mut bytes) = self.record(info);
                    self.put_queue(&mut bytes, &name);
                    (name, bytes)
                });
                QueryPart::Records(records.collect(), false)
            }
            Query::Kill { .. } => unreachable!("a kill changes the state (take_query)"),
            Query::Report { top, tag } => {
                // With a filter, every matching name counts in the total.
                let limit = if tag.is_empty() { *top } else { usize::MAX };
                let matching = self.table.usage_tagged(self.now_ms, limit, tag);
                let total = (!tag.is_empty()).then(|| {
                    let mut total = crate::usage::UsageTotal::default();
                    matching.iter().for_each(|(_, name)| total.add(name));
                    Box::new(total)
                });
                let rows = matching.iter().take(*top).map(|(name, total)| {
                    let bytes = report_row(name, total);
                    (total.usage.acquires, Box::from(*name), bytes)
                });
                QueryPart::Report(rows.collect(), total)
            }
            Query::Stats => {
                let (attached, detached) = self.sessions.counts();
                QueryPart::Stats(ShardStats {
                    locks: self.table.lock_count() as u64,
                    waiters: self.table.waiter_count() as u64,
                    sessions_attached: attached as u64,
                    sessions_detached: detached as u64,
                })
            }
        }
    }

    /// What follows the lock record in an INSPECT reply: this loop's clock
    /// and the lock's queue, with the waiters' client names.
    fn put_queue(&self, out: &mut Vec<u8>, name: &[u8]) {
        let queue = self.table.queue_of(name);
        let cut = queue.len() > crate::limits::WAITERS_PER_INSPECT_MAX;
        let listed: Vec<protocol::QueuedRecord<'_>> = queue
            .iter()
            .take(crate::limits::WAITERS_PER_INSPECT_MAX)
            .map(|w| protocol::QueuedRecord {
                session: w.session,
                since_unix_ms: w.since_ms,
                mode: w.mode,
                weight: w.weight,
                client_name: self.table.client_name(w.session).unwrap_or(b""),
            })
            .collect();
        protocol::put_queue(out, self.now_ms, &listed, cut);
    }

    /// Operator KILL_SESSION, at the session's home: the session ends as
    /// if its grace ran out (logged; its holds and waits go), its holder
    /// is told LOCK_LOST per hold and its connection closes.
    fn kill_session(&mut self, id: SessionId) -> Status {
        let Some(session) = self.sessions.remove(id) else {
            return Status::UnknownSession;
        };
        tracing::warn!(
            session = id,
            client = %shown(&session.client_name),
            holds = session.holds.len(),
            "session ended by an operator (kill-session)"
        );
        if let Some(token) = session.conn {
            if session.client_id.is_none() {
                let mut holds: Vec<_> = session.holds.iter().collect();
                holds.sort_unstable_by(|a, b| a.0.cmp(b.0));
                let out = self.wbuf(token);
                for (name, held) in holds {
                    protocol::encode_lock_lost(out, held.token, name);
                }
            }
            self.conns[token.0].session = None;
            self.start_closing(token);
        }
        self.end_session(session);
        Status::Ok
    }

    /// A lock's wire record, with its holders' client names from this shard.
    fn record(&self, info: crate::lock_table::LockInfo) -> (Box<[u8]>, Vec<u8>) {
        let holders: Vec<protocol::HolderRecord<'_>> = info
            .holders
            .iter()
            .take(crate::limits::HOLDERS_PER_RECORD_MAX)
            .map(|hold| protocol::HolderRecord {
                session: hold.session,
                token: hold.token,
                weight: hold.weight,
                since_unix_ms: hold.since_ms,
                client_name: self.table.client_name(hold.session).unwrap_or(b""),
            })
            .collect();
        let signals: Vec<&[u8]> = info.signals.iter().map(|s| &**s).collect();
        let mut out = Vec::new();
        let waiters = u32::try_from(info.waiters).unwrap_or(u32::MAX);
        let kind = (info.mode, info.capacity);
        protocol::put_lock_record(&mut out, &info.name, kind, waiters, &holders, &signals);
        (info.name, out)
    }

    fn gather_part(&mut self, query_id: u64, part: QueryPart) {
        let Some(gather) = self.gathers.get_mut(&query_id) else {
            return;
        };
        match part {
            QueryPart::Find(found) => gather.found.extend(found),
            QueryPart::Records(records, cut) => {
                gather.records.extend(records);
                gather.truncated |= cut;
            }
            QueryPart::Killed(status) => gather.killed = status,
            QueryPart::Report(rows, total) => {
                gather.report.extend(rows);
                if let Some(total) = total {
                    gather.report_total.add(&total);
                }
            }
            QueryPart::Stats(stats) => {
                gather.stats.locks += stats.locks;
                gather.stats.waiters += stats.waiters;
                gather.stats.sessions_attached += stats.sessions_attached;
                gather.stats.sessions_detached += stats.sessions_detached;
            }
        }
        gather.remaining -= 1;
        if gather.remaining > 0 {
            return;
        }
        let mut gather = self.gathers.remove(&query_id).expect("present");
        match &gather.query {
            Query::Find { limit, .. } => {
                // Oldest grant first, as LiveLock lists them.
                gather.found.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
                gather.found.truncate(*limit);
            }
            Query::List { limit, .. } => {
                gather.records.sort_by(|a, b| a.0.cmp(&b.0));
                gather.truncated |= gather.records.len() > *limit;
                gather.records.truncate(*limit);
            }
            Query::Report { top, .. } => {
                // Busiest first, then by name; names are one shard's each.
                gather
                    .report
                    .sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
                gather.report.truncate(*top);
            }
            Query::Inspect { .. } | Query::Stats | Query::Kill { .. } => {}
        }
        let Some(token) = self.live(gather.conn) else {
            return;
        };
        let conn = &self.conns[token.0];
        if conn.session != Some(gather.session) {
            return;
        }
        // A half-closed connection waiting for this answer closes after it.
        if conn.eof {
            self.mark_ready(token);
        }
        match gather.reply {
            GatherReply::Resp => self.finish_resp_gather(gather),
            GatherReply::Native { op, request_id } => {
                self.finish_native_gather(gather, op, request_id)
            }
        }
    }

    /// Sets the session's bit for `shard`; the first time, the shard is
    /// told the session's client name (for listings) before anything else.
    fn touch(&mut self, session_id: SessionId, shard: usize) {
        let Some(session) = self.sessions.get_mut(session_id) else {
            return;
        };
        if session.touched & (1 << shard) != 0 {
            return;
        }
        session.touched |= 1 << shard;
        let name = session.client_name.clone();
        let introduce = Command::Introduce {
            session: session_id,
            client_name: &name,
        };
        self.route_to_shard(shard, introduce);
    }
}

/// The complete frames of a native connection's output that the peer has
/// not started to receive: (offset of the first, the ones worth keeping
/// for its session). Kept: the answers to its requests (not to HELLO,
/// RESUME or PING, which belong to that connection), then SIGNALLED pushes,
/// at most PARKED_PUSHES_MAX bytes in all, answers first. The buffer starts
/// at a frame boundary (it is cleared only when all of it is written); if
/// it does not look like one (a connection that moved between loops
/// mid-frame), nothing is kept.
/// The metrics label of a pending request's operation.
/// Client-chosen bytes (a lock or client name) as a log field: control
/// characters escaped, so a name cannot forge a log line.
pub(super) fn shown(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).escape_debug().to_string()
}

fn op_metric(op: PendingOp) -> crate::metrics::Op {
    match op {
        PendingOp::Native(opcode) => native_op(opcode),
        PendingOp::Resp(_) => crate::metrics::Op::Resp,
    }
}

/// The metrics label of a native opcode.
fn native_op(code: u8) -> crate::metrics::Op {
    use crate::metrics::Op;
    match code {
        opcode::HELLO => Op::Hello,
        opcode::RESUME => Op::Resume,
        opcode::ACQUIRE | opcode::ACQUIRE_PERMITS | opcode::ACQUIRE_ALL | opcode::ACQUIRE_POOL => {
            Op::Acquire
        }
        opcode::SET_CAPACITY | opcode::SET_ORDER => Op::Settings,
        opcode::REPORT => Op::Report,
        opcode::RELEASE => Op::Release,
        opcode::EXTEND => Op::Extend,
        opcode::CANCEL => Op::Cancel,
        opcode::BYE => Op::Bye,
        opcode::SIGNAL => Op::Signal,
        opcode::LIST => Op::List,
        opcode::INSPECT => Op::Inspect,
        opcode::STATS => Op::Stats,
        opcode::FORCE_RELEASE => Op::ForceRelease,
        opcode::KILL_SESSION => Op::KillSession,
        opcode::CLUSTER_STATUS | opcode::CLUSTER_CHANGE => Op::Cluster,
        _ => Op::Ping,
    }
}

/// Lists a connection that got output: to flush, and (with the log) to
/// hold until the turn's changes are durable.
fn note_output(
    conn: &mut Connection,
    token: Token,
    dirty: &mut Vec<Token>,
    written: &mut Vec<Token>,
) {
    if !conn.dirty {
        conn.dirty = true;
        dirty.push(token);
    }
    if !conn.written {
        conn.written = true;
        written.push(token);
    }
}

fn unsent_frames(conn: &Connection) -> (usize, Vec<u8>) {
    // (bytes, opcode) of the whole frame at the front of `buf`, if any.
    let frame = |buf: &[u8]| match protocol::decode_reply(buf) {
        Ok(protocol::DecodedReply::Frame { consumed, reply }) => Some((consumed, reply.opcode)),
        _ => None,
    };
    let wbuf = &conn.wbuf;
    let mut at = 0;
    while at < conn.wpos {
        match frame(&wbuf[at..]) {
            Some((len, _)) => at += len,
            None => return (wbuf.len(), Vec::new()),
        }
    }
    let first = at;
    let mut answers = Vec::new();
    let mut signals = Vec::new();
    while let Some((len, op)) = frame(&wbuf[at..]) {
        let bytes = &wbuf[at..at + len];
        match op {
            opcode::HELLO | opcode::RESUME | opcode::PING => {}
            op if op < opcode::LOCK_LOST => answers.push(bytes),
            opcode::SIGNALLED => signals.push(bytes),
            _ => {} // pushes the RESUME's listing makes up for
        }
        at += len;
    }
    let mut kept = Vec::new();
    for bytes in answers.into_iter().chain(signals) {
        if kept.len() + bytes.len() <= PARKED_PUSHES_MAX {
            kept.extend_from_slice(bytes);
        }
    }
    (first, kept)
}

/// Opcode and request id of a frame whose header is complete.
fn header_ids(frame: &[u8]) -> (u8, u32) {
    use zerocopy::FromBytes;
    match protocol::Header::ref_from_prefix(frame) {
        Ok((header, _)) => (header.opcode, header.request_id.get()),
        Err(_) => (0, 0),
    }
}
