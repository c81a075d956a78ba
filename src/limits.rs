//! Every limit of the server in one place: sizes, counts and times, with the
//! relations between them checked at compile time. The README's "Limits"
//! table documents each one; change both together.

/// Size of a session secret (returned by HELLO, presented by RESUME).
pub const SECRET_LEN: usize = 16;

/// Longest lock name in bytes (names are 1..=NAME_LEN_MAX bytes).
pub const NAME_LEN_MAX: usize = 1024;
/// Longest password in a HELLO/RESUME.
pub const PASSWORD_LEN_MAX: usize = 256;
/// Longest client name in a HELLO.
pub const CLIENT_NAME_LEN_MAX: usize = 256;
/// Largest native frame body a client may send; a larger one closes the connection.
pub const FRAME_BODY_MAX: usize = 4096;

/// Open connections over all loops; further accepts are closed at once.
pub const CONNECTIONS_MAX: usize = 100_000;
/// Locks one session may hold, or wait for, at once.
pub const HOLDS_PER_SESSION_MAX: usize = 100_000;
/// Sessions queued behind one lock.
pub const WAITERS_PER_LOCK_MAX: usize = 10_000;
/// Requests of one session in flight (sent, no final reply yet).
pub const IN_FLIGHT_PER_SESSION_MAX: usize = 1024;
/// Time a new connection has to send HELLO (or RESUME) before it is closed.
pub const HELLO_TIMEOUT_MS: u64 = 10_000;
/// Sessions over all loops, attached or not: a HELLO (or a LiveLock CONN
/// with a new client id) past it gets `ServerBusy` (`-7`). Checked against
/// the other loops' counts as of their last turn.
pub const SESSIONS_MAX: usize = 200_000;
/// Detached sessions (kept for their grace) over all loops: a HELLO asking
/// for a grace period past it gets `ServerBusy`; a session that has one
/// already keeps it (all of them are bounded by SESSIONS_MAX).
pub const DETACHED_SESSIONS_MAX: usize = 100_000;
/// Longest LiveLock client id (CONN), so that it always fits a dump.
pub const CLIENT_ID_LEN_MAX: usize = 1024;
/// Longest grace period a session may ask for.
pub const GRACE_MS_MAX: u32 = 3_600_000;
/// Longest timed wait (longer waits are "forever" by WAIT_FOREVER).
pub const WAIT_MS_MAX: u32 = u32::MAX - 1;

/// Bytes buffered for reading on one connection: one whole frame must fit.
pub const READ_BUFFER_MAX: usize = 64 * 1024;
/// Bytes of replies buffered for one connection. Past `WRITE_BUFFER_PAUSE`
/// the connection stops being read until the peer drains it (backpressure);
/// replies still owed (deferred grants, pushes) may take it up to the hard max,
/// past which the peer is considered stuck and the connection is closed.
pub const WRITE_BUFFER_PAUSE: usize = 256 * 1024;
pub const WRITE_BUFFER_MAX: usize = 8 * 1024 * 1024;
/// Frames decoded from one connection per loop turn before others are served.
pub const FRAMES_PER_TURN_MAX: usize = 256;

/// Event-loop threads (the session/shard bitmask is a u64).
pub const THREADS_MAX: usize = 64;
/// Messages queued in one loop's inbox from the other loops.
pub const INBOX_MAX: usize = 65_536;
/// Messages a loop parks for a full inbox before it stops reading its sockets.
pub const OUTBOX_PARK_MAX: usize = 65_536;
/// How long shutdown waits for goodbye pushes to drain.
pub const SHUTDOWN_FLUSH_MS: u64 = 1_000;

const _: () = assert!(FRAME_BODY_MAX >= NAME_LEN_MAX + 64);
const _: () = assert!(FRAME_BODY_MAX >= 28 + PASSWORD_LEN_MAX);
const _: () = assert!(FRAME_BODY_MAX >= 8 + PASSWORD_LEN_MAX + CLIENT_NAME_LEN_MAX);
const _: () = assert!(READ_BUFFER_MAX >= 16 + FRAME_BODY_MAX);
const _: () = assert!(WRITE_BUFFER_PAUSE < WRITE_BUFFER_MAX);
// Every in-flight request can owe one reply of at most a header + a short message.
const _: () = assert!(WRITE_BUFFER_MAX - WRITE_BUFFER_PAUSE >= IN_FLIGHT_PER_SESSION_MAX * 256);
const _: () = assert!(THREADS_MAX <= 64);
const _: () = assert!(IN_FLIGHT_PER_SESSION_MAX <= HOLDS_PER_SESSION_MAX);

/// Bytes of signal pushes parked for a detached session; later ones are
/// dropped (the signals themselves stay on the lock, queryable).
pub const PARKED_PUSHES_MAX: usize = WRITE_BUFFER_PAUSE;
const _: () = assert!(
    PARKED_PUSHES_MAX + IN_FLIGHT_PER_SESSION_MAX * 256 + 64
        < WRITE_BUFFER_MAX - WRITE_BUFFER_PAUSE
);

/// Signals raised on one lock at once.
pub const SIGNALS_PER_LOCK_MAX: usize = 64;
/// Longest signal in bytes.
pub const SIGNAL_LEN_MAX: usize = 1024;
/// Locks listed by one FIND (LiveLock) or LIST (native).
pub const FIND_RESULTS_MAX: usize = 10_000;
/// Bytes of one native LIST reply; longer lists are cut (flagged truncated).
pub const LIST_REPLY_BYTES_MAX: usize = 1024 * 1024;
const _: () = assert!(LIST_REPLY_BYTES_MAX < WRITE_BUFFER_MAX - WRITE_BUFFER_PAUSE);
/// Largest body of a frame the server sends (LIST and INSPECT replies may be
/// far over FRAME_BODY_MAX, which bounds what a client sends).
pub const REPLY_BODY_MAX: usize = LIST_REPLY_BYTES_MAX;
/// Holders listed in one lock record (INSPECT, LIST), so a record always
/// fits a reply: 1,000 × (30 + client name) bytes (a semaphore's holders
/// carry their weight, and the record its capacity).
pub const HOLDERS_PER_RECORD_MAX: usize = 1000;
const _: () = assert!(
    HOLDERS_PER_RECORD_MAX * (30 + CLIENT_NAME_LEN_MAX)
        + SIGNALS_PER_LOCK_MAX * (2 + SIGNAL_LEN_MAX)
        + 16
        + NAME_LEN_MAX
        < REPLY_BODY_MAX
);
/// Queued acquires listed by one INSPECT, first in line first; a longer
/// queue is cut (flagged): 1,000 × (24 + client name) bytes, which fit a
/// reply beside the largest lock record.
pub const WAITERS_PER_INSPECT_MAX: usize = 1000;
const _: () = assert!(
    HOLDERS_PER_RECORD_MAX * (30 + CLIENT_NAME_LEN_MAX)
        + SIGNALS_PER_LOCK_MAX * (2 + SIGNAL_LEN_MAX)
        + 16
        + NAME_LEN_MAX
        + 16
        + WAITERS_PER_INSPECT_MAX * (24 + CLIENT_NAME_LEN_MAX)
        < REPLY_BODY_MAX
);
/// INSPECT/LIST/STATS of one session being answered at once (each LIST
/// reply may be up to REPLY_BODY_MAX): beyond it, `TooManyInFlight`.
pub const QUERIES_IN_FLIGHT_MAX: usize = 4;
/// What a native connection can be owed once reading has paused: the
/// output that paused it (up to WRITE_BUFFER_PAUSE), the immediate replies
/// of the frames decoded in that last turn, a final reply per request in
/// flight, the pushes parked while it was detached, and a whole reply to
/// each query in flight. It must stay below WRITE_BUFFER_MAX, past which
/// the connection is closed as stuck, with a quarter of it to spare.
const NATIVE_OWED_MAX: usize = WRITE_BUFFER_PAUSE
    + FRAMES_PER_TURN_MAX * 256
    + IN_FLIGHT_PER_SESSION_MAX * 256
    + PARKED_PUSHES_MAX
    + QUERIES_IN_FLIGHT_MAX * (16 + REPLY_BODY_MAX);
const _: () = assert!(NATIVE_OWED_MAX <= WRITE_BUFFER_MAX / 4 * 3);
/// Bytes of one LiveLock FIND reply; further names are left out (as past
/// FIND_RESULTS_MAX). A LiveLock connection has one command in flight, so
/// the reply always fits the write buffer, with room to spare.
pub const FIND_REPLY_BYTES_MAX: usize = 4 * 1024 * 1024;
const _: () = assert!(
    WRITE_BUFFER_PAUSE + FRAMES_PER_TURN_MAX * 256 + FIND_REPLY_BYTES_MAX
        <= WRITE_BUFFER_MAX / 4 * 3
);

/// Work a loop spends on FIND/LIST scans of its shard per turn (units of
/// about one glob step; a lock examined costs `lock_table::SCAN_SLOT_WORK`),
/// before timers and other clients get their turn. A scan goes on over as
/// many turns as it needs, from a cursor; a slice overruns the budget by at
/// most one name's match (about pattern length × name length steps).
pub const SCAN_WORK_PER_TURN: usize = 16_384;

/// Fencing tokens one shard may hand out per millisecond, on average. Only
/// seeds token counters from the wall clock: `now_unix_ms * TOKENS_PER_MS_MAX`
/// starts a data directory's durable mark the first time (above anything an
/// earlier version handed out), and the counters of a server without a mark
/// (an embedder's in-memory server, which then relies on the clock not
/// stepping back). 65,536/ms is 50× the fastest shard measured
/// (BENCHMARKS.md); u64 holds such tokens for thousands of years.
pub const TOKENS_PER_MS_MAX: u64 = 1 << 16;

/// Deadlock detection: the pause between two rounds of reading every
/// shard's wait edges. A cycle is failed after two rounds saw it, so within
/// about two pauses (and two rounds' messages) of closing.
pub const DEADLOCK_ROUND_MS: u64 = 20;
/// Wait edges one shard reports per round; a round with a shard over it
/// decides nothing (a bound on memory and time per round).
pub const WAIT_EDGES_PER_SHARD_MAX: usize = 100_000;

/// Most names one ACQUIRE_ALL takes (each is one step of its home's work).
pub const MULTI_NAMES_MAX: usize = 32;
const _: () = assert!(MULTI_NAMES_MAX <= u16::MAX as usize);

/// Most requirements of one ACQUIRE_POOL.
pub const POOL_REQUIREMENTS_MAX: usize = 16;
/// Most candidate resources of one ACQUIRE_POOL, all requirements (each
/// is at most one step of its home's work).
pub const POOL_CANDIDATES_MAX: usize = 64;
/// Longest tag list of a pool candidate, or tag filter, in bytes.
pub const TAGS_LEN_MAX: usize = 255;

/// Lock names whose usage one shard keeps for reports (the least active
/// eighth goes when a new name finds it full; see `state::usage`).
pub const USAGE_NAMES_PER_SHARD: usize = 1024;
/// Most rows of one REPORT: 500 × (66 + a 1024-byte name) fit a reply.
pub const REPORT_TOP_MAX: usize = 500;
const _: () = assert!(REPORT_TOP_MAX * (66 + NAME_LEN_MAX) + 16 <= LIST_REPLY_BYTES_MAX);
