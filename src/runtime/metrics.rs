//! The server's counters and gauges, and the HTTP endpoint that exposes them
//! in the Prometheus text format (version 0.0.4).
//!
//! Each event loop owns one [`LoopMetrics`] and is its only writer: updates
//! are single `Relaxed` atomic operations on memory no other writer touches,
//! so the hot path takes no lock and allocates nothing. The metrics thread
//! ([`serve`]) reads every loop's metrics on a scrape and [`render`]s their
//! sums. [`ServerMetrics`] holds the few process-wide values no loop owns.
//!
//! Invariants:
//! - a histogram stores per-bucket counts and derives `_count` from them at
//!   render time, so a scrape racing a writer still shows cumulative buckets
//!   that never decrease and a `+Inf` bucket equal to `_count`;
//! - every family is rendered on every scrape, zeros included, with its HELP
//!   and TYPE lines, so series never appear or vanish between scrapes;
//! - the HTTP thread gives one connection at most [`HTTP_CONNECTION_MS`],
//!   reads at most [`HTTP_REQUEST_LEN_MAX`] bytes of it, and notices `stop`
//!   within [`HTTP_STOP_LATENCY_MS`] whatever its peers do.

use hashbrown::HashMap;

use crate::usage::UsageTotal;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Upper bounds (inclusive, µs) of the latency buckets; a last `+Inf`
/// bucket takes the rest.
pub const BUCKET_BOUNDS_US: [u64; 19] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
];
/// Buckets per histogram, `+Inf` included.
const BUCKETS: usize = BUCKET_BOUNDS_US.len() + 1;
/// The `le` label of each bucket: its bound in seconds, as written out.
const BUCKET_LE: [&str; BUCKETS] = [
    "0.00001", "0.000025", "0.00005", "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005",
    "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf",
];
const _: () = {
    let mut i = 1;
    while i < BUCKET_BOUNDS_US.len() {
        assert!(BUCKET_BOUNDS_US[i - 1] < BUCKET_BOUNDS_US[i]);
        i += 1;
    }
};

/// Largest HTTP request head the metrics endpoint reads.
pub const HTTP_REQUEST_LEN_MAX: usize = 8 * 1024;
/// Longest the metrics thread spends on one connection.
pub const HTTP_CONNECTION_MS: u64 = 2_000;
/// Longest one blocking read or write of the metrics thread, and its sleep
/// between accepts: `stop` is checked at least this often.
const HTTP_POLL_MS: u64 = 20;
/// Longest the metrics thread drains a peer after its response (so unread
/// request bytes do not turn the close into a reset that loses the response).
const HTTP_LINGER_MS: u64 = 100;
/// How soon the metrics thread returns once `stop` is set (rendering aside).
pub const HTTP_STOP_LATENCY_MS: u64 = 2 * HTTP_POLL_MS;
const _: () = assert!(HTTP_STOP_LATENCY_MS < 200);
const _: () = assert!(HTTP_LINGER_MS < HTTP_CONNECTION_MS);

/// Operations whose latency is measured, decode to reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Hello,
    Resume,
    Acquire,
    Release,
    Extend,
    Cancel,
    Ping,
    Bye,
    Signal,
    List,
    Inspect,
    Stats,
    ForceRelease,
    KillSession,
    /// CLUSTER_STATUS and CLUSTER_CHANGE.
    Cluster,
    /// Any LiveLock-protocol command.
    Resp,
    /// A session's or a semaphore's settings: SET_ORDER, SET_CAPACITY.
    Settings,
    /// The usage REPORT.
    Report,
}

impl Op {
    pub const COUNT: usize = 18;
    /// Every op, in the order of its index.
    pub const ALL: [Op; Op::COUNT] = [
        Op::Hello,
        Op::Resume,
        Op::Acquire,
        Op::Release,
        Op::Extend,
        Op::Cancel,
        Op::Ping,
        Op::Bye,
        Op::Signal,
        Op::List,
        Op::Inspect,
        Op::Stats,
        Op::ForceRelease,
        Op::KillSession,
        Op::Cluster,
        Op::Resp,
        Op::Settings,
        Op::Report,
    ];

    /// The value of the `op` label.
    pub fn label(self) -> &'static str {
        match self {
            Op::Hello => "hello",
            Op::Resume => "resume",
            Op::Acquire => "acquire",
            Op::Release => "release",
            Op::Extend => "extend",
            Op::Cancel => "cancel",
            Op::Ping => "ping",
            Op::Bye => "bye",
            Op::Signal => "signal",
            Op::List => "list",
            Op::Inspect => "inspect",
            Op::Stats => "stats",
            Op::ForceRelease => "force_release",
            Op::KillSession => "kill_session",
            Op::Cluster => "cluster",
            Op::Resp => "resp",
            Op::Settings => "settings",
            Op::Report => "report",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const _: () = {
    let mut i = 0;
    while i < Op::COUNT {
        assert!(Op::ALL[i] as usize == i);
        i += 1;
    }
};

/// The bucket of a latency: the first whose bound is at least `micros`.
fn bucket_of(micros: u64) -> usize {
    BUCKET_BOUNDS_US.partition_point(|&bound| bound < micros)
}

/// One op's latency histogram.
#[derive(Debug)]
struct Histogram {
    /// Observations per bucket (not cumulative: one increment per observation).
    buckets: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
}

impl Histogram {
    const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BUCKETS],
            sum_us: AtomicU64::new(0),
        }
    }

    fn observe(&self, micros: u64) {
        add(&self.buckets[bucket_of(micros)], 1);
        add(&self.sum_us, micros);
    }
}

/// Adds to a counter that has one writer (its loop): a plain load and
/// store, no locked read-modify-write on the hot path. Readers (scrapes)
/// see each counter's latest stored value.
fn add(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
}

/// `oldest_hold_ms` when the shard holds nothing.
const NO_HOLD: u64 = u64::MAX;

/// Counters since the process started, summed over the loops (STATS).
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub acquisitions: u64,
    pub grants: u64,
    pub releases: u64,
    pub timeouts: u64,
    pub busy: u64,
    pub locks_lost: u64,
    pub connections_accepted: u64,
}

/// One event loop's metrics, written by that loop only. Aligned so that two
/// loops' metrics never share a cache line.
#[derive(Debug)]
#[repr(align(128))]
pub struct LoopMetrics {
    ops: [Histogram; Op::COUNT],
    acquire_wait: Histogram,
    acquisitions: AtomicU64,
    grants: AtomicU64,
    timeouts: AtomicU64,
    busy: AtomicU64,
    releases: AtomicU64,
    locks_lost: AtomicU64,
    deadlocks: AtomicU64,
    pushes_dropped: AtomicU64,
    cross_shard_messages: AtomicU64,
    connections_accepted: AtomicU64,
    locks_held: AtomicU64,
    waiters: AtomicU64,
    sessions_attached: AtomicU64,
    sessions_detached: AtomicU64,
    connections: AtomicU64,
    /// Grant time (server clock, ms) of the shard's oldest hold, or `NO_HOLD`.
    oldest_hold_ms: AtomicU64,
    /// The shard's busiest names lately (usage report), at most
    /// `HOT_LOCKS_MAX`, as of the loop's last publication.
    hot: parking_lot::Mutex<Vec<HotLock>>,
    /// The shard's totals per tag pair (`key=value`) of its names, the
    /// `TAGS_PUBLISHED_MAX` busiest, as of the loop's last publication.
    tags: parking_lot::Mutex<Vec<TagTotal>>,
}

/// Tag pairs shown as `livelock_tag_*{tag="key=value"}` series: the
/// busiest over all shards (a bound on label cardinality).
pub const HOT_TAGS_MAX: usize = 10;
/// Tag pairs one shard publishes: its busiest. A pair's series adds up
/// the shards that publish it (all of them unless a shard has more pairs).
pub const TAGS_PUBLISHED_MAX: usize = 256;

/// One tag pair's total over one shard's names (usage report counts,
/// decayed; distributions merged).
#[derive(Debug, Clone, Default)]
pub struct TagTotal {
    pub tag: Box<[u8]>,
    pub total: UsageTotal,
}

/// Names shown as `livelock_lock_*{lock="..."}` series: the busiest of all
/// shards (a bound on label cardinality).
pub const HOT_LOCKS_MAX: usize = 10;

/// One busy name, as the metrics show it (usage report counts, decayed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HotLock {
    pub name: Box<[u8]>,
    pub acquires: u64,
    pub grants: u64,
    pub busy: u64,
    pub timeouts: u64,
    pub held: u64,
    pub waiting: u64,
    pub wait_p99_ms: u64,
    pub hold_p99_ms: u64,
}

impl HotLock {
    /// The gauges of `total` (a name's usage, or a tag's), named `name`.
    pub fn of(name: Box<[u8]>, total: &UsageTotal) -> HotLock {
        let usage = &total.usage;
        HotLock {
            name,
            acquires: usage.acquires,
            grants: usage.grants,
            busy: usage.busy,
            timeouts: usage.timeouts,
            held: total.held,
            waiting: total.waiting,
            wait_p99_ms: usage.wait.quantile(0.99),
            hold_p99_ms: usage.hold.quantile(0.99),
        }
    }
}

impl Default for LoopMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl LoopMetrics {
    pub fn new() -> LoopMetrics {
        LoopMetrics {
            ops: [const { Histogram::new() }; Op::COUNT],
            acquire_wait: Histogram::new(),
            acquisitions: AtomicU64::new(0),
            grants: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            releases: AtomicU64::new(0),
            locks_lost: AtomicU64::new(0),
            deadlocks: AtomicU64::new(0),
            pushes_dropped: AtomicU64::new(0),
            cross_shard_messages: AtomicU64::new(0),
            connections_accepted: AtomicU64::new(0),
            locks_held: AtomicU64::new(0),
            waiters: AtomicU64::new(0),
            sessions_attached: AtomicU64::new(0),
            sessions_detached: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            oldest_hold_ms: AtomicU64::new(NO_HOLD),
            hot: parking_lot::Mutex::new(Vec::new()),
            tags: parking_lot::Mutex::new(Vec::new()),
        }
    }

    /// The shard's totals per tag pair (the `TAGS_PUBLISHED_MAX` busiest
    /// are kept).
    pub fn set_tags(&self, mut tags: Vec<TagTotal>) {
        tags.sort_by(|a, b| {
            b.total
                .usage
                .acquires
                .cmp(&a.total.usage.acquires)
                .then_with(|| a.tag.cmp(&b.tag))
        });
        tags.truncate(TAGS_PUBLISHED_MAX);
        *self.tags.lock() = tags;
    }

    /// The shard's busiest names (at most `HOT_LOCKS_MAX` are kept).
    pub fn set_hot(&self, mut hot: Vec<HotLock>) {
        hot.truncate(HOT_LOCKS_MAX);
        *self.hot.lock() = hot;
    }

    /// Latency of one operation, from decode to reply (µs).
    pub fn observe(&self, op: Op, micros: u64) {
        self.ops[op.index()].observe(micros);
    }

    /// An acquire that waited in a queue got its final answer after `micros`.
    pub fn observe_wait(&self, micros: u64) {
        self.acquire_wait.observe(micros);
    }

    /// An acquire request was accepted (granted, queued or refused later).
    pub fn inc_acquisitions(&self) {
        add(&self.acquisitions, 1);
    }

    /// A hold was granted, at once or to a waiter.
    pub fn inc_grants(&self) {
        add(&self.grants, 1);
    }

    /// A waiter's deadline passed before it was granted.
    pub fn inc_timeouts(&self) {
        add(&self.timeouts, 1);
    }

    /// An acquire that would not wait found the lock held (Busy).
    pub fn inc_busy(&self) {
        add(&self.busy, 1);
    }

    pub fn inc_releases(&self) {
        add(&self.releases, 1);
    }

    /// A signal push dropped: its connection was not reading (or, while
    /// detached, too much was parked). The signal itself stays queryable.
    pub fn inc_pushes_dropped(&self) {
        add(&self.pushes_dropped, 1);
    }

    /// A hold ended without its holder's release (lease expired, an
    /// operator's forced release).
    pub fn inc_lock_lost(&self) {
        add(&self.locks_lost, 1);
    }

    /// A wait failed to break a deadlock (its session is homed here).
    pub fn inc_deadlocks(&self) {
        add(&self.deadlocks, 1);
    }

    /// Messages this loop sent to other loops.
    pub fn inc_cross_shard(&self, n: u64) {
        add(&self.cross_shard_messages, n);
    }

    pub fn inc_connections_accepted(&self) {
        add(&self.connections_accepted, 1);
    }

    /// Adds this loop's counters to `totals` (STATS sums every loop's).
    pub fn add_totals(&self, totals: &mut Totals) {
        totals.acquisitions += self.acquisitions.load(Relaxed);
        totals.grants += self.grants.load(Relaxed);
        totals.releases += self.releases.load(Relaxed);
        totals.timeouts += self.timeouts.load(Relaxed);
        totals.busy += self.busy.load(Relaxed);
        totals.locks_lost += self.locks_lost.load(Relaxed);
        totals.connections_accepted += self.connections_accepted.load(Relaxed);
    }

    /// Holds in this loop's shard (gauge, set by the owner loop).
    pub fn set_locks_held(&self, n: u64) {
        self.locks_held.store(n, Relaxed);
    }

    /// Queued acquires in this loop's shard.
    pub fn set_waiters(&self, n: u64) {
        self.waiters.store(n, Relaxed);
    }

    /// Queued acquires in this loop's shard, as of its last turn.
    pub fn waiters(&self) -> u64 {
        self.waiters.load(Relaxed)
    }

    /// Sessions homed on this loop, with and without a connection.
    pub fn set_sessions(&self, attached: u64, detached: u64) {
        self.sessions_attached.store(attached, Relaxed);
        self.sessions_detached.store(detached, Relaxed);
    }

    /// (attached, detached) sessions homed here, as of the loop's last turn.
    pub fn sessions(&self) -> (u64, u64) {
        (
            self.sessions_attached.load(Relaxed),
            self.sessions_detached.load(Relaxed),
        )
    }

    /// Open connections of this loop.
    pub fn set_connections(&self, n: u64) {
        self.connections.store(n, Relaxed);
    }

    /// Grant time (ms on the server clock) of the oldest hold of this shard, or None.
    pub fn set_oldest_hold_ms(&self, since_ms: Option<u64>) {
        let since_ms = since_ms.map_or(NO_HOLD, |ms| {
            assert_ne!(ms, NO_HOLD, "a grant time of u64::MAX ms");
            ms
        });
        self.oldest_hold_ms.store(since_ms, Relaxed);
    }
}

/// Process-wide values not owned by a loop.
#[derive(Debug)]
pub struct ServerMetrics {
    /// How long the last dump took to encode and write (µs).
    last_dump_us: AtomicU64,
    dumps: AtomicU64,
    /// Wall-clock start of the process, ms since the Unix epoch.
    start_unix_ms: u64,
    /// The durable log's counters (`--durability log`).
    log: Option<Arc<crate::raft_log::LogShared>>,
    /// A cluster node's view of its cluster.
    cluster: Option<Arc<crate::cluster::NodeStatus>>,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerMetrics {
    /// Stamps the start time from the wall clock: call it once, at startup.
    pub fn new() -> Self {
        let start_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        ServerMetrics {
            last_dump_us: AtomicU64::new(0),
            dumps: AtomicU64::new(0),
            start_unix_ms,
            log: None,
            cluster: None,
        }
    }

    /// Also reports the durable log's counters.
    pub fn with_log(mut self, log: Option<Arc<crate::raft_log::LogShared>>) -> Self {
        self.log = log;
        self
    }

    /// Also reports a cluster node's view of its cluster.
    pub fn with_cluster(mut self, cluster: Option<Arc<crate::cluster::NodeStatus>>) -> Self {
        self.cluster = cluster;
        self
    }

    /// A dump was written; it took `micros`.
    pub fn record_dump(&self, micros: u64) {
        self.last_dump_us.store(micros, Relaxed);
        add(&self.dumps, 1);
    }
}

/// Renders every metric, summed over `loops`, in the Prometheus text format
/// 0.0.4. `now_ms` is the server clock's now (for the oldest hold's age).
pub fn render(loops: &[Arc<LoopMetrics>], server: &ServerMetrics, now_ms: u64) -> String {
    let mut out = String::with_capacity(32 * 1024);
    let sum = |field: Field| sum_of(loops, field);

    family(
        &mut out,
        "livelock_up",
        "gauge",
        "1 while the server is running.",
    );
    sample(&mut out, "livelock_up", "", 1);
    family(
        &mut out,
        "livelock_start_time_seconds",
        "gauge",
        "Start time of the server, seconds since the Unix epoch.",
    );
    sample_f(
        &mut out,
        "livelock_start_time_seconds",
        "",
        server.start_unix_ms,
        1_000,
    );

    let name = "livelock_op_duration_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "Service latency of operations, from decoding the request to queueing the reply; an \
         acquire that waited in a queue is in livelock_acquire_wait_seconds instead.",
    );
    for op in Op::ALL {
        let label = format!("op=\"{}\"", op.label());
        histogram(&mut out, name, &label, loops, |m| &m.ops[op.index()]);
    }
    let name = "livelock_acquire_wait_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "Acquires that waited in a queue: from the request to the grant (or time-out, cancel).",
    );
    histogram(&mut out, name, "", loops, |m| &m.acquire_wait);

    let counters: [(&str, &str, Field); 10] = [
        (
            "livelock_acquisitions_total",
            "Acquire requests accepted.",
            |m| &m.acquisitions,
        ),
        ("livelock_grants_total", "Holds granted.", |m| &m.grants),
        (
            "livelock_timeouts_total",
            "Acquires whose wait timed out.",
            |m| &m.timeouts,
        ),
        (
            "livelock_busy_total",
            "Acquires that would not wait and found the lock held.",
            |m| &m.busy,
        ),
        (
            "livelock_releases_total",
            "Holds released by their holder.",
            |m| &m.releases,
        ),
        (
            "livelock_locks_lost_total",
            "Holds ended without a release (lease expired or session ended).",
            |m| &m.locks_lost,
        ),
        (
            "livelock_deadlocks_total",
            "Waits failed to break a deadlock (a cycle of waits), one per cycle.",
            |m| &m.deadlocks,
        ),
        (
            "livelock_signal_pushes_dropped_total",
            "Signal pushes not sent: the holder's connection was not reading (signals stay queryable).",
            |m| &m.pushes_dropped,
        ),
        (
            "livelock_cross_shard_messages_total",
            "Messages sent between event loops.",
            |m| &m.cross_shard_messages,
        ),
        (
            "livelock_connections_accepted_total",
            "Client connections accepted.",
            |m| &m.connections_accepted,
        ),
    ];
    for (name, help, field) in counters {
        family(&mut out, name, "counter", help);
        sample(&mut out, name, "", sum(field));
    }

    let gauges: [(&str, &str, Field); 3] = [
        ("livelock_locks_held", "Holds in force.", |m| &m.locks_held),
        (
            "livelock_waiters",
            "Acquires queued behind a held lock.",
            |m| &m.waiters,
        ),
        ("livelock_connections", "Open client connections.", |m| {
            &m.connections
        }),
    ];
    for (name, help, field) in gauges {
        family(&mut out, name, "gauge", help);
        sample(&mut out, name, "", sum(field));
    }
    let name = "livelock_sessions";
    family(
        &mut out,
        name,
        "gauge",
        "Sessions, with (attached) and without (detached) a connection.",
    );
    sample(
        &mut out,
        name,
        "state=\"attached\"",
        sum(|m| &m.sessions_attached),
    );
    sample(
        &mut out,
        name,
        "state=\"detached\"",
        sum(|m| &m.sessions_detached),
    );

    let oldest_age_ms = loops
        .iter()
        .map(|m| m.oldest_hold_ms.load(Relaxed))
        .filter(|&since| since != NO_HOLD)
        .map(|since| now_ms.saturating_sub(since))
        .max()
        .unwrap_or(0);
    let name = "livelock_oldest_hold_age_seconds";
    family(
        &mut out,
        name,
        "gauge",
        "Age of the oldest hold in force; 0 when none.",
    );
    sample_f(&mut out, name, "", oldest_age_ms, 1_000);

    hot_locks(&mut out, loops);
    hot_tags(&mut out, loops);

    let name = "livelock_dump_duration_seconds";
    family(
        &mut out,
        name,
        "gauge",
        "Time the last state dump took to write.",
    );
    sample_f(
        &mut out,
        name,
        "",
        server.last_dump_us.load(Relaxed),
        1_000_000,
    );
    let name = "livelock_dumps_total";
    family(&mut out, name, "counter", "State dumps written.");
    sample(&mut out, name, "", server.dumps.load(Relaxed));
    if let Some(log) = &server.log {
        render_log(&mut out, log);
    }
    if let Some(cluster) = &server.cluster {
        render_cluster(&mut out, cluster);
    }
    render_process(&mut out);
    out
}

/// A cluster node's families (leader and followers alike).
fn render_cluster(out: &mut String, status: &crate::cluster::NodeStatus) {
    let leader = status.leader.load(Relaxed);
    let gauges = [
        ("livelock_cluster_node_id", "This node's id.", status.id),
        (
            "livelock_cluster_leader_id",
            "The leader this node knows of (0: none).",
            leader,
        ),
        (
            "livelock_cluster_is_leader",
            "1 on the leader while it serves, else 0.",
            u64::from(status.serving.load(Relaxed)),
        ),
        (
            "livelock_cluster_term",
            "The raft term.",
            status.term.load(Relaxed),
        ),
        (
            "livelock_cluster_commit_index",
            "The highest log index known committed.",
            status.commit.load(Relaxed),
        ),
        (
            "livelock_cluster_applied_index",
            "The highest log index applied.",
            status.applied.load(Relaxed),
        ),
    ];
    for (name, help, value) in gauges {
        family(out, name, "gauge", help);
        sample(out, name, "", value);
    }
}

/// `livelock_build_info` and the process's own figures, from /proc (the
/// `process_*` names every Prometheus client library uses).
fn render_process(out: &mut String) {
    family(
        out,
        "livelock_build_info",
        "gauge",
        "The running build (always 1).",
    );
    let labels = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    sample(out, "livelock_build_info", &labels, 1);
    // SAFETY: sysconf(3) with valid names only reads configuration.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as u64,
            libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
        )
    };
    // /proc/self/stat: fields 14 and 15 (after the command in parentheses)
    // are user and system time in clock ticks.
    let cpu_ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            let after = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = after.split_whitespace().collect();
            let user: u64 = fields.get(11)?.parse().ok()?;
            let system: u64 = fields.get(12)?.parse().ok()?;
            Some(user + system)
        });
    if let Some(ticks_used) = cpu_ticks {
        let name = "process_cpu_seconds_total";
        family(
            out,
            name,
            "counter",
            "User and system CPU time spent, in seconds.",
        );
        sample_f(out, name, "", ticks_used, ticks);
    }
    let resident = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok());
    if let Some(pages) = resident {
        let name = "process_resident_memory_bytes";
        family(out, name, "gauge", "Resident memory size in bytes.");
        sample(out, name, "", pages * page);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let name = "process_open_fds";
        family(out, name, "gauge", "Open file descriptors.");
        sample(out, name, "", fds.count() as u64);
    }
}

/// The durable log's families (`--durability log` only).
fn render_log(out: &mut String, log: &crate::raft_log::LogShared) {
    let gauges = [
        (
            "livelock_log_failing",
            "1 while log writes fail (changes are refused), else 0.",
            u64::from(log.failing()),
        ),
        (
            "livelock_log_batches_waiting",
            "Loop batches handed to the log and not yet durable.",
            log.submitted().saturating_sub(log.durable()),
        ),
    ];
    for (name, help, value) in gauges {
        family(out, name, "gauge", help);
        sample(out, name, "", value);
    }
    let counters = [
        (
            "livelock_log_writes_total",
            "Log writes (one fsync each).",
            &log.writes,
        ),
        (
            "livelock_log_bytes_total",
            "Bytes written to the log.",
            &log.bytes,
        ),
        (
            "livelock_log_write_errors_total",
            "Log writes that failed (and were retried).",
            &log.write_errors,
        ),
        (
            "livelock_snapshots_total",
            "Snapshots of the log written.",
            &log.snapshots,
        ),
    ];
    for (name, help, value) in counters {
        family(out, name, "counter", help);
        sample(out, name, "", value.load(Relaxed));
    }
}

/// The samples of one histogram, summed over the loops.
fn histogram(
    out: &mut String,
    name: &str,
    label: &str,
    loops: &[Arc<LoopMetrics>],
    of: impl Fn(&LoopMetrics) -> &Histogram,
) {
    let joined = |extra: &str| match (label.is_empty(), extra.is_empty()) {
        (true, _) => extra.to_string(),
        (false, true) => label.to_string(),
        (false, false) => format!("{label},{extra}"),
    };
    let mut cumulative = 0u64;
    for (bucket, le) in BUCKET_LE.iter().enumerate() {
        cumulative = loops
            .iter()
            .map(|m| of(m).buckets[bucket].load(Relaxed))
            .fold(cumulative, u64::wrapping_add);
        let labels = joined(&format!("le=\"{le}\""));
        sample(out, &format!("{name}_bucket"), &labels, cumulative);
    }
    let sum_us = sum_of(loops, |m| &of(m).sum_us);
    sample_f(out, &format!("{name}_sum"), &joined(""), sum_us, 1_000_000);
    sample(out, &format!("{name}_count"), &joined(""), cumulative);
}

/// One counter or gauge of a loop's metrics.
type Field = fn(&LoopMetrics) -> &AtomicU64;

fn sum_of(loops: &[Arc<LoopMetrics>], field: impl Fn(&LoopMetrics) -> &AtomicU64) -> u64 {
    loops
        .iter()
        .map(|m| field(m).load(Relaxed))
        .fold(0, u64::wrapping_add)
}

/// The busiest names of all shards, `HOT_LOCKS_MAX` of them, one series
/// each per family (`lock` label: the name, escaped: `label_value`).
fn hot_locks(out: &mut String, loops: &[Arc<LoopMetrics>]) {
    let hot: Vec<HotLock> = loops.iter().flat_map(|m| m.hot.lock().clone()).collect();
    usage_families(
        out,
        ("livelock_lock", "lock", "the name"),
        hot,
        HOT_LOCKS_MAX,
    );
}

/// The busiest tag pairs over all shards (each shard's totals added up),
/// `HOT_TAGS_MAX` of them, one series each per family (`tag` label).
fn hot_tags(out: &mut String, loops: &[Arc<LoopMetrics>]) {
    let mut totals: HashMap<Box<[u8]>, UsageTotal> = HashMap::new();
    for m in loops {
        for part in m.tags.lock().iter() {
            totals.entry(part.tag.clone()).or_default().add(&part.total);
        }
    }
    let hot = totals
        .into_iter()
        .map(|(tag, total)| HotLock::of(tag, &total));
    let what = ("livelock_tag", "tag", "the names with the tag");
    usage_families(out, what, hot.collect(), HOT_TAGS_MAX);
}

/// The usage gauges of the `max` busiest of `hot`, one series each per
/// family: `{prefix}_acquires{{label="..."}}`..., `of` says whose.
fn usage_families(
    out: &mut String,
    (prefix, label, of): (&str, &str, &str),
    mut hot: Vec<HotLock>,
    max: usize,
) {
    hot.sort_by(|a, b| {
        b.acquires
            .cmp(&a.acquires)
            .then_with(|| a.name.cmp(&b.name))
    });
    hot.truncate(max);
    let labels: Vec<String> = hot
        .iter()
        .map(|h| format!("{label}=\"{}\"", label_value(&h.name)))
        .collect();
    type Get = fn(&HotLock) -> u64;
    let counts: [(&str, &str, Get); 6] = [
        (
            "acquires",
            "Acquires asked of {} lately (halved every minute).",
            |h| h.acquires,
        ),
        (
            "grants",
            "Grants of {} lately (halved every minute).",
            |h| h.grants,
        ),
        (
            "busy",
            "Tries of {} refused busy lately (halved every minute).",
            |h| h.busy,
        ),
        (
            "timeouts",
            "Waits for {} that timed out lately (halved every minute).",
            |h| h.timeouts,
        ),
        ("held", "Holds of {} now.", |h| h.held),
        ("waiting", "Acquires of {} queued now.", |h| h.waiting),
    ];
    for (suffix, help, get) in counts {
        let name = format!("{prefix}_{suffix}");
        family(out, &name, "gauge", &help.replace("{}", of));
        for (h, labels) in hot.iter().zip(&labels) {
            sample(out, &name, labels, get(h));
        }
    }
    let times: [(&str, &str, Get); 2] = [
        (
            "wait_p99_seconds",
            "99th percentile of the waits for {} lately (within a factor of 2).",
            |h| h.wait_p99_ms,
        ),
        (
            "hold_p99_seconds",
            "99th percentile of the holds of {} lately (within a factor of 2).",
            |h| h.hold_p99_ms,
        ),
    ];
    for (suffix, help, get) in times {
        let name = format!("{prefix}_{suffix}");
        family(out, &name, "gauge", &help.replace("{}", of));
        for (h, labels) in hot.iter().zip(&labels) {
            sample_f(out, &name, labels, get(h), 1_000);
        }
    }
}

/// A lock name as a label value: `\\`, `\"` and `\n` escaped; a byte
/// that is not UTF-8 written as the text `\\xNN` (so two names that differ
/// in such bytes stay two series, where a lossy decoding would merge them).
fn label_value(name: &[u8]) -> String {
    let mut value = String::new();
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => value.push_str("\\\\"),
                '"' => value.push_str("\\\""),
                '\n' => value.push_str("\\n"),
                c => value.push(c),
            }
        }
        for byte in chunk.invalid() {
            value.push_str(&format!("\\\\x{byte:02x}"));
        }
    }
    value
}

/// The HELP and TYPE lines that open a family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &str, value: u64) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// A sample of `value / per_unit` units, e.g. µs as seconds with `per_unit` 1e6.
fn sample_f(out: &mut String, name: &str, labels: &str, value: u64, per_unit: u64) {
    // f64's Display is exact enough and never uses an exponent.
    let value = value as f64 / per_unit as f64;
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// Why the server is not ready for changes (None: it is).
pub type Readiness = Box<dyn Fn() -> Option<&'static str> + Send>;

/// What the metrics thread needs to answer a request.
struct Endpoint<F> {
    loops: Vec<Arc<LoopMetrics>>,
    server: Arc<ServerMetrics>,
    now_ms: F,
    not_ready: Readiness,
    stop: Arc<AtomicBool>,
}

/// A tiny HTTP/1.1 server on `listener`, on a thread of its own:
/// `GET /metrics` renders the metrics, `GET /` points there,
/// `GET /health/live` answers 200 while the server runs (its loops abort the
/// process if one fails), `GET /health/ready` 200 while it takes changes,
/// else 503 with the reason (`not_ready`: shutting down, log failing); unknown paths
/// get 404, other methods on known paths 405, malformed requests 400 and
/// requests over [`HTTP_REQUEST_LEN_MAX`] 431. One connection at a time,
/// closed after its response. The thread ends soon after `stop` is set.
pub fn serve(
    listener: TcpListener,
    loops: Vec<Arc<LoopMetrics>>,
    server: Arc<ServerMetrics>,
    now_ms: impl Fn() -> u64 + Send + 'static,
    not_ready: Readiness,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    // Non-blocking, so that the thread can check `stop` between accepts.
    listener.set_nonblocking(true)?;
    let endpoint = Endpoint {
        loops,
        server,
        now_ms,
        not_ready,
        stop,
    };
    thread::Builder::new()
        .name("livelock-metrics".into())
        .spawn(move || accept_loop(&listener, &endpoint))
}

fn accept_loop<F: Fn() -> u64>(listener: &TcpListener, endpoint: &Endpoint<F>) {
    let poll = Duration::from_millis(HTTP_POLL_MS);
    while !endpoint.stop.load(Relaxed) {
        match listener.accept() {
            // An error on one connection concerns that connection only.
            Ok((stream, _peer)) => {
                let _ = handle(stream, endpoint);
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            // WouldBlock: nobody waiting. Anything else (out of descriptors,
            // say) may pass: wait rather than spin.
            Err(_) => thread::sleep(poll),
        }
    }
}

/// Answers one connection: reads a request head, writes the response, closes.
fn handle<F: Fn() -> u64>(mut stream: TcpStream, endpoint: &Endpoint<F>) -> io::Result<()> {
    let poll = Duration::from_millis(HTTP_POLL_MS);
    // Some platforms hand out accepted sockets non-blocking like their listener.
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(poll))?;
    stream.set_write_timeout(Some(poll))?;
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + Duration::from_millis(HTTP_CONNECTION_MS);
    let gave_up = || endpoint.stop.load(Relaxed) || Instant::now() >= deadline;

    let mut buffer = [0u8; HTTP_REQUEST_LEN_MAX];
    let mut len = 0;
    let head = loop {
        if let Some(end) = find(&buffer[..len], b"\r\n\r\n") {
            break Some(&buffer[..end + 2]);
        }
        if len == buffer.len() {
            break None;
        }
        if gave_up() {
            return Ok(());
        }
        match stream.read(&mut buffer[len..]) {
            // The peer left before sending a whole request: nobody to answer.
            Ok(0) => return Ok(()),
            Ok(n) => len += n,
            Err(error) if is_retry(&error) => {}
            Err(error) => return Err(error),
        }
    };
    let response = match head {
        Some(head) => respond(head, endpoint),
        None => error_response("431 Request Header Fields Too Large"),
    };
    let to_send = if response.head_only {
        &response.bytes[..response.head_len]
    } else {
        &response.bytes[..]
    };
    let mut sent = 0;
    while sent < to_send.len() {
        if gave_up() {
            return Ok(());
        }
        match stream.write(&to_send[sent..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(error) if is_retry(&error) => {}
            Err(error) => return Err(error),
        }
    }
    // Close politely: FIN, then drain what the peer still sends for a little
    // while, so that unread bytes do not make the kernel reset the connection
    // before the peer has read the response.
    stream.shutdown(Shutdown::Write)?;
    let linger_end = Instant::now() + Duration::from_millis(HTTP_LINGER_MS);
    while Instant::now() < linger_end && !gave_up() {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) if is_retry(&error) => {}
            Err(_) => break,
        }
    }
    Ok(())
}

fn is_retry(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// A whole response, ready to send.
struct Response {
    bytes: Vec<u8>,
    /// Bytes of the status line and headers, blank line included.
    head_len: usize,
    /// Send the head only (the answer to a HEAD request).
    head_only: bool,
}

/// The response to a request `head` (request line and header lines, each
/// ending in CRLF).
fn respond<F: Fn() -> u64>(head: &[u8], endpoint: &Endpoint<F>) -> Response {
    let Some((method, path)) = parse_head(head) else {
        return error_response("400 Bad Request");
    };
    let mut response = match path {
        "/metrics" | "/" | "/health/live" | "/health/ready"
            if method != "GET" && method != "HEAD" =>
        {
            build(
                "405 Method Not Allowed",
                "Allow: GET, HEAD\r\n",
                "text/plain; charset=utf-8",
                b"Method Not Allowed\n",
            )
        }
        "/health/live" => build("200 OK", "", "text/plain; charset=utf-8", b"live\n"),
        "/health/ready" => match (endpoint.not_ready)() {
            None => build("200 OK", "", "text/plain; charset=utf-8", b"ready\n"),
            Some(why) => build(
                "503 Service Unavailable",
                "",
                "text/plain; charset=utf-8",
                format!("not ready: {why}\n").as_bytes(),
            ),
        },
        "/metrics" => {
            let body = render(&endpoint.loops, &endpoint.server, (endpoint.now_ms)());
            let content_type = "text/plain; version=0.0.4; charset=utf-8";
            build("200 OK", "", content_type, body.as_bytes())
        }
        "/" => build(
            "200 OK",
            "",
            "text/html; charset=utf-8",
            b"<html><head><title>livelock</title></head><body>\
              <h1>livelock</h1><p><a href=\"/metrics\">Metrics</a></p></body></html>\n",
        ),
        _ => error_response("404 Not Found"),
    };
    response.head_only = method == "HEAD";
    response
}

/// The method and path (query dropped) of a well-formed HTTP/1.x request
/// head, or None if it is malformed.
fn parse_head(head: &[u8]) -> Option<(&str, &str)> {
    let head = std::str::from_utf8(head).ok()?;
    if !head.is_ascii() {
        return None;
    }
    let mut lines = head.split("\r\n");
    let request_line = lines.next()?;
    let mut parts = request_line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return None;
    }
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if method.is_empty() || !method.chars().all(is_tchar) {
        return None;
    }
    // Origin form ("/metrics?x") or absolute form ("http://host/metrics").
    let path = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("/", |at| &rest[at..]),
        None if target.starts_with('/') => target,
        None => return None,
    };
    if path.chars().any(|c| c.is_ascii_control()) {
        return None;
    }
    let path = path.split('?').next().unwrap_or(path);
    // Header lines: "name: value"; the head ends with an empty line.
    for line in lines.filter(|line| !line.is_empty()) {
        let (name, _value) = line.split_once(':')?;
        if name.is_empty() || !name.chars().all(is_tchar) {
            return None;
        }
    }
    Some((method, path))
}

/// A response: `status` is code and reason, `headers` extra CRLF-ended lines.
fn build(status: &str, headers: &str, content_type: &str, body: &[u8]) -> Response {
    let head = format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut bytes = Vec::with_capacity(head.len() + body.len());
    bytes.extend_from_slice(head.as_bytes());
    bytes.extend_from_slice(body);
    Response {
        bytes,
        head_len: head.len(),
        head_only: false,
    }
}

/// A short plain-text error; `status` is code and reason.
fn error_response(status: &str) -> Response {
    let body = format!("{}\n", &status[4..]);
    build(status, "", "text/plain; charset=utf-8", body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::net::SocketAddr;

    /// One parsed sample line.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    /// Parses an exposition strictly: every line is a HELP, a TYPE or a
    /// sample of the family last TYPEd; returns the samples and each
    /// family's type.
    fn parse(text: &str) -> (Vec<Sample>, BTreeMap<String, String>) {
        assert!(text.ends_with('\n'));
        let is_name = |s: &str| {
            !s.is_empty()
                && !s.starts_with(|c: char| c.is_ascii_digit())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        };
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        let mut helped = std::collections::BTreeSet::new();
        let mut current: Option<(String, String)> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap();
                assert!(is_name(name) && !help.is_empty(), "{line}");
                assert!(helped.insert(name.to_string()), "second HELP: {line}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(helped.contains(name), "TYPE before HELP: {line}");
                assert!(matches!(kind, "counter" | "gauge" | "histogram"), "{line}");
                assert!(types.insert(name.to_string(), kind.to_string()).is_none());
                current = Some((name.to_string(), kind.to_string()));
                continue;
            }
            assert!(!line.starts_with('#'), "{line}");
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value = if value == "+Inf" {
                f64::INFINITY
            } else {
                value
                    .parse::<f64>()
                    .unwrap_or_else(|_| panic!("value: {line}"))
            };
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, labels)) => {
                    let labels = labels.strip_suffix('}').unwrap();
                    let labels = labels
                        .split(',')
                        .map(|pair| {
                            let (key, value) = pair.split_once('=').unwrap();
                            assert!(is_name(key), "{line}");
                            let value = value.strip_prefix('"').unwrap().strip_suffix('"');
                            (key.to_string(), value.unwrap().to_string())
                        })
                        .collect();
                    (name, labels)
                }
            };
            assert!(is_name(name), "{line}");
            let (family, kind) = current.as_ref().expect("sample before any TYPE");
            let base = if kind == "histogram" {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or_else(|| panic!("histogram sample: {line}"))
            } else {
                name
            };
            assert_eq!(base, family, "{line}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{line}");
            }
            samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        (samples, types)
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        let matching: Vec<_> = samples
            .iter()
            .filter(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
            })
            .collect();
        assert_eq!(matching.len(), 1, "{name} {labels:?}");
        matching[0].value
    }

    /// Checks every op's histogram: buckets in `le` order, cumulative,
    /// ending at +Inf == _count.
    fn check_histograms(samples: &[Sample]) {
        for op in Op::ALL {
            let buckets: Vec<_> = samples
                .iter()
                .filter(|s| {
                    s.name == "livelock_op_duration_seconds_bucket" && s.labels["op"] == op.label()
                })
                .collect();
            assert_eq!(buckets.len(), BUCKETS);
            for pair in buckets.windows(2) {
                let le = |s: &Sample| -> f64 {
                    let le = &s.labels["le"];
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    }
                };
                assert!(le(pair[0]) < le(pair[1]));
                assert!(pair[0].value <= pair[1].value, "not cumulative: {pair:?}");
            }
            let last = buckets.last().unwrap();
            assert_eq!(last.labels["le"], "+Inf");
            let labels = [("op", op.label())];
            let count = value(samples, "livelock_op_duration_seconds_count", &labels);
            assert_eq!(last.value, count);
            value(samples, "livelock_op_duration_seconds_sum", &labels);
        }
    }

    #[test]
    fn le_labels_match_the_bounds() {
        for (bound_us, le) in BUCKET_BOUNDS_US.iter().zip(BUCKET_LE) {
            assert_eq!(le.parse::<f64>().unwrap(), *bound_us as f64 / 1e6, "{le}");
        }
        assert_eq!(BUCKET_LE[BUCKETS - 1], "+Inf");
    }

    #[test]
    fn observe_lands_in_the_right_bucket() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(10), 0);
        assert_eq!(bucket_of(11), 1);
        assert_eq!(bucket_of(1_000), 6);
        assert_eq!(bucket_of(1_001), 7);
        assert_eq!(bucket_of(10_000_000), BUCKETS - 2);
        assert_eq!(bucket_of(10_000_001), BUCKETS - 1);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);

        let metrics = Arc::new(LoopMetrics::new());
        metrics.observe(Op::Acquire, 80); // le 0.0001
        metrics.observe(Op::Acquire, 100); // le 0.0001 (bounds are inclusive)
        metrics.observe(Op::Acquire, 20_000_000); // +Inf only
        metrics.observe(Op::Ping, 3);
        let text = render(&[metrics], &ServerMetrics::new(), 0);
        let (samples, _) = parse(&text);
        check_histograms(&samples);
        let bucket = |op: &str, le: &str| {
            value(
                &samples,
                "livelock_op_duration_seconds_bucket",
                &[("op", op), ("le", le)],
            )
        };
        assert_eq!(bucket("acquire", "0.00005"), 0.0);
        assert_eq!(bucket("acquire", "0.0001"), 2.0);
        assert_eq!(bucket("acquire", "10"), 2.0);
        assert_eq!(bucket("acquire", "+Inf"), 3.0);
        assert_eq!(bucket("ping", "0.00001"), 1.0);
        assert_eq!(bucket("release", "+Inf"), 0.0);
        let sum = value(
            &samples,
            "livelock_op_duration_seconds_sum",
            &[("op", "acquire")],
        );
        assert!((sum - 20.00018).abs() < 1e-9, "{sum}");
        assert!(
            text.contains("livelock_op_duration_seconds_bucket{op=\"acquire\",le=\"0.0001\"} 2\n")
        );
    }

    #[test]
    fn render_sums_over_loops() {
        let loops: Vec<_> = (0..3).map(|_| Arc::new(LoopMetrics::new())).collect();
        for (i, m) in loops.iter().enumerate() {
            let i = i as u64 + 1;
            m.observe(Op::Release, 1_000 * i);
            for _ in 0..i {
                m.inc_acquisitions();
                m.inc_grants();
                m.inc_releases();
                m.inc_connections_accepted();
            }
            m.inc_timeouts();
            m.inc_lock_lost();
            m.inc_cross_shard(10 * i);
            m.set_locks_held(i);
            m.set_waiters(2 * i);
            m.set_sessions(i, 100);
            m.set_connections(7);
        }
        loops[0].set_oldest_hold_ms(Some(9_000));
        loops[1].set_oldest_hold_ms(Some(4_500));
        loops[1].set_oldest_hold_ms(None);
        let server = ServerMetrics::new();
        server.record_dump(250_000);
        server.record_dump(1_500);
        let text = render(&loops, &server, 10_250);
        let (samples, types) = parse(&text);
        check_histograms(&samples);
        let get = |name: &str| value(&samples, name, &[]);
        assert_eq!(get("livelock_up"), 1.0);
        assert_eq!(get("livelock_acquisitions_total"), 6.0);
        assert_eq!(get("livelock_grants_total"), 6.0);
        assert_eq!(get("livelock_releases_total"), 6.0);
        assert_eq!(get("livelock_timeouts_total"), 3.0);
        assert_eq!(get("livelock_locks_lost_total"), 3.0);
        assert_eq!(get("livelock_cross_shard_messages_total"), 60.0);
        assert_eq!(get("livelock_connections_accepted_total"), 6.0);
        assert_eq!(get("livelock_locks_held"), 6.0);
        assert_eq!(get("livelock_waiters"), 12.0);
        assert_eq!(get("livelock_connections"), 21.0);
        let sessions = |state| value(&samples, "livelock_sessions", &[("state", state)]);
        assert_eq!(sessions("attached"), 6.0);
        assert_eq!(sessions("detached"), 300.0);
        assert_eq!(get("livelock_oldest_hold_age_seconds"), 1.25);
        assert_eq!(get("livelock_dump_duration_seconds"), 0.0015);
        assert_eq!(get("livelock_dumps_total"), 2.0);
        assert!(get("livelock_start_time_seconds") > 1.5e9);
        let release = [("op", "release")];
        assert_eq!(
            value(&samples, "livelock_op_duration_seconds_count", &release),
            3.0
        );
        assert_eq!(
            value(&samples, "livelock_op_duration_seconds_sum", &release),
            0.006
        );
        assert_eq!(types["livelock_op_duration_seconds"], "histogram");
        assert_eq!(types["livelock_sessions"], "gauge");
        assert_eq!(types["livelock_dumps_total"], "counter");
    }

    #[test]
    fn hot_locks_are_the_busiest_of_all_shards() {
        let hot = |name: &str, acquires| HotLock {
            name: name.as_bytes().into(),
            acquires,
            grants: acquires / 2,
            held: 1,
            wait_p99_ms: 1023,
            ..HotLock::default()
        };
        let (a, b) = (Arc::new(LoopMetrics::new()), Arc::new(LoopMetrics::new()));
        a.set_hot(
            (0..HOT_LOCKS_MAX as u64)
                .map(|i| hot(&format!("a{i}"), i))
                .collect(),
        );
        b.set_hot(vec![hot("job \"7\"", 100), hot("b", 50)]);
        let (samples, types) = parse(&render(&[a, b], &ServerMetrics::new(), 0));
        assert_eq!(types["livelock_lock_acquires"], "gauge");
        let series: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.name == "livelock_lock_acquires")
            .collect();
        // The ten busiest of the twelve, busiest first; the name escaped.
        assert_eq!(series.len(), HOT_LOCKS_MAX);
        assert_eq!(series[0].labels["lock"], "job \\\"7\\\"");
        assert_eq!(series[0].value, 100.0);
        assert_eq!(series[1].labels["lock"], "b");
        assert!(series
            .iter()
            .all(|s| s.labels["lock"] != "a0" && s.labels["lock"] != "a1"));
        let lock = [("lock", "b")];
        assert_eq!(value(&samples, "livelock_lock_grants", &lock), 25.0);
        assert_eq!(
            value(&samples, "livelock_lock_wait_p99_seconds", &lock),
            1.023
        );
    }

    /// Tag pairs: each shard's totals are added up per pair, and only the
    /// busiest `HOT_TAGS_MAX` pairs are shown.
    #[test]
    fn hot_tags_add_up_the_shards() {
        let total = |tag: &str, acquires| {
            let usage = crate::usage::NameUsage {
                acquires,
                grants: acquires,
                ..Default::default()
            };
            TagTotal {
                tag: tag.as_bytes().into(),
                total: UsageTotal {
                    usage,
                    held: 1,
                    waiting: 0,
                },
            }
        };
        let (a, b) = (Arc::new(LoopMetrics::new()), Arc::new(LoopMetrics::new()));
        a.set_tags((0..20).map(|i| total(&format!("k=a{i}"), i)).collect());
        b.set_tags(vec![total("model=T1", 30), total("k=a19", 5)]);
        let (samples, _) = parse(&render(&[a, b], &ServerMetrics::new(), 0));
        let series: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.name == "livelock_tag_grants")
            .collect();
        assert_eq!(series.len(), HOT_TAGS_MAX);
        assert_eq!(series[0].labels["tag"], "model=T1");
        assert_eq!(series[1].labels["tag"], "k=a19");
        assert_eq!(series[1].value, 24.0, "19 + 5: both shards");
        let held = [("tag", "k=a19")];
        assert_eq!(value(&samples, "livelock_tag_held", &held), 2.0);
    }

    /// Bytes that are not UTF-8 are written as `\xNN` text, so names that
    /// differ only in them stay distinct series.
    #[test]
    fn label_values_keep_names_apart() {
        assert_eq!(label_value(b"a\xff"), "a\\\\xff");
        assert_ne!(label_value(b"a\xff"), label_value(b"a\xfe"));
        assert_eq!(
            label_value("q\\\"\n\u{e9}".as_bytes()),
            "q\\\\\\\"\\n\u{e9}"
        );
    }

    #[test]
    fn render_with_nothing_is_well_formed() {
        let text = render(&[], &ServerMetrics::new(), 123);
        let (samples, types) = parse(&text);
        check_histograms(&samples);
        assert_eq!(
            value(&samples, "livelock_oldest_hold_age_seconds", &[]),
            0.0
        );
        assert_eq!(value(&samples, "livelock_locks_held", &[]), 0.0);
        assert_eq!(types.len(), 41, "8 of them livelock_tag_*");
        // A clock behind a grant time (cannot happen, must not underflow).
        let m = Arc::new(LoopMetrics::new());
        m.set_oldest_hold_ms(Some(500));
        let (samples, _) = parse(&render(&[m], &ServerMetrics::new(), 100));
        assert_eq!(
            value(&samples, "livelock_oldest_hold_age_seconds", &[]),
            0.0
        );
    }

    #[test]
    fn parse_head_accepts_http_1_and_refuses_the_rest() {
        fn ok(head: &str) -> Option<(&str, &str)> {
            parse_head(head.as_bytes())
        }
        assert_eq!(
            ok("GET /metrics HTTP/1.1\r\nHost: x\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(
            ok("GET /metrics?a=b HTTP/1.0\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(
            ok("GET http://h:9/metrics HTTP/1.1\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(ok("DELETE / HTTP/1.1\r\n"), Some(("DELETE", "/")));
        for bad in [
            "GARBAGE\r\n",
            "GET /metrics\r\n",
            "GET /metrics HTTP/2.0\r\n",
            "GET  /metrics HTTP/1.1\r\n",
            "GET metrics HTTP/1.1\r\n",
            "G(T /metrics HTTP/1.1\r\n",
            "GET /metrics HTTP/1.1\r\nno colon\r\n",
            "GET /metrics HTTP/1.1\r\n: empty name\r\n",
            "GET /m\u{e9}trics HTTP/1.1\r\n",
            "GET /metrics HTTP/1.1 extra\r\n",
            "\r\n",
        ] {
            assert_eq!(ok(bad), None, "{bad:?}");
        }
        assert_eq!(parse_head(b"GET /\xff HTTP/1.1\r\n"), None);
    }

    /// A metrics endpoint on 127.0.0.1:0 with one loop that saw one acquire.
    fn start() -> (SocketAddr, Arc<AtomicBool>, JoinHandle<()>) {
        start_with(Box::new(|| None))
    }

    fn start_with(not_ready: Readiness) -> (SocketAddr, Arc<AtomicBool>, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(LoopMetrics::new());
        metrics.inc_acquisitions();
        metrics.observe(Op::Acquire, 42);
        let stop = Arc::new(AtomicBool::new(false));
        let handle = serve(
            listener,
            vec![metrics],
            Arc::new(ServerMetrics::new()),
            || 1_000,
            not_ready,
            stop.clone(),
        )
        .unwrap();
        (addr, stop, handle)
    }

    /// Liveness answers while the endpoint runs; readiness follows
    /// `not_ready`, with the reason in the 503 body.
    #[test]
    fn health_endpoints() {
        let ready = Arc::new(AtomicBool::new(true));
        let flag = ready.clone();
        let (addr, stop, handle) = start_with(Box::new(move || {
            (!flag.load(Relaxed)).then_some("the log cannot be written")
        }));
        assert_eq!(exchange(addr, b"GET /health/live HTTP/1.1\r\n\r\n").0, 200);
        assert_eq!(exchange(addr, b"GET /health/ready HTTP/1.1\r\n\r\n").0, 200);
        ready.store(false, Relaxed);
        let (status, _, body) = exchange(addr, b"GET /health/ready HTTP/1.1\r\n\r\n");
        assert_eq!(status, 503);
        assert!(body.contains("the log cannot be written"), "{body}");
        assert_eq!(exchange(addr, b"GET /health/live HTTP/1.1\r\n\r\n").0, 200);
        assert_eq!(
            exchange(addr, b"POST /health/ready HTTP/1.1\r\n\r\n").0,
            405
        );
        stop_and_join(&stop, handle);
    }

    fn stop_and_join(stop: &AtomicBool, handle: JoinHandle<()>) -> Duration {
        let started = Instant::now();
        stop.store(true, Relaxed);
        while !handle.is_finished() {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "metrics thread did not stop"
            );
            thread::sleep(Duration::from_millis(1));
        }
        handle.join().unwrap();
        started.elapsed()
    }

    /// Sends `request` raw and reads the response to the end; bounded in time.
    fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).unwrap();
        let response = String::from_utf8(response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("no end of head");
        assert!(head.starts_with("HTTP/1.1 "), "{head}");
        let status = head[9..12].parse().unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        if !request.starts_with(b"HEAD ") {
            assert_eq!(length, body.len());
        }
        (status, head.to_string(), body.to_string())
    }

    #[test]
    fn http_get_metrics() {
        let (addr, stop, handle) = start();
        let (status, head, body) = exchange(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
        );
        assert_eq!(status, 200);
        assert!(
            head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nConnection: close"));
        let (samples, _) = parse(&body);
        check_histograms(&samples);
        assert_eq!(value(&samples, "livelock_acquisitions_total", &[]), 1.0);
        let labels = [("op", "acquire"), ("le", "0.00005")];
        assert_eq!(
            value(&samples, "livelock_op_duration_seconds_bucket", &labels),
            1.0
        );

        // Twice: one connection does not wedge the next.
        let (status, _, body) = exchange(addr, b"GET /metrics HTTP/1.0\r\n\r\n");
        assert_eq!(status, 200);
        assert!(body.contains("\nlivelock_up 1\n"));
        let (status, head, body) = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert_eq!((status, body.as_str()), (200, ""));
        assert!(head.contains("version=0.0.4"));
        let (status, head, body) = exchange(addr, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(status, 200);
        assert!(head.contains("text/html"));
        assert!(body.contains("/metrics"));
        stop_and_join(&stop, handle);
    }

    #[test]
    fn http_errors() {
        let (addr, stop, handle) = start();
        assert_eq!(exchange(addr, b"GET /nope HTTP/1.1\r\n\r\n").0, 404);
        assert_eq!(exchange(addr, b"POST /nope HTTP/1.1\r\n\r\n").0, 404);
        let (status, head, _) = exchange(
            addr,
            b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        );
        assert_eq!(status, 405);
        assert!(head.contains("\r\nAllow: GET, HEAD"), "{head}");
        assert_eq!(exchange(addr, b"DELETE / HTTP/1.1\r\n\r\n").0, 405);
        assert_eq!(exchange(addr, b"GARBAGE\r\n\r\n").0, 400);
        assert_eq!(exchange(addr, b"GET /metrics HTTP/9\r\n\r\n").0, 400);
        assert_eq!(
            exchange(
                addr,
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"
            )
            .0,
            400
        );
        // A head over the bound, then more: refused, and the response survives
        // the unread bytes.
        let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
        while huge.len() < 3 * HTTP_REQUEST_LEN_MAX {
            huge.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        huge.extend_from_slice(b"\r\n");
        assert_eq!(exchange(addr, &huge).0, 431);
        // A peer that connects and says nothing is dropped after the
        // connection time limit, and the endpoint still answers afterwards.
        let silent = TcpStream::connect(addr).unwrap();
        assert_eq!(exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").0, 200);
        drop(silent);
        stop_and_join(&stop, handle);
    }

    #[test]
    fn stop_is_prompt_even_with_a_silent_peer() {
        let (_, stop, handle) = start();
        let elapsed = stop_and_join(&stop, handle);
        assert!(elapsed < Duration::from_millis(200), "{elapsed:?}");

        let (addr, stop, handle) = start();
        // The thread is stuck on a peer that sends half a request.
        let mut slow = TcpStream::connect(addr).unwrap();
        slow.write_all(b"GET /met").unwrap();
        thread::sleep(Duration::from_millis(50));
        let elapsed = stop_and_join(&stop, handle);
        assert!(elapsed < Duration::from_millis(200), "{elapsed:?}");
    }
}
