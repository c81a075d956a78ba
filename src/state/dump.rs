//! The server's state file: written on shutdown, read back on start, so that
//! sessions, their holds, pending signals and the fencing-token floor survive
//! a restart.
//!
//! This module owns the file format and the file operations, nothing else: the
//! server builds a [`Dump`] from its loops and applies the one it loads.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! magic      8 bytes   MAGIC
//! version    u32       VERSION
//! body_len   u64       bytes of body that follow
//! body:
//!   created_unix_ms u64, last_token u64
//!   u32 count, sessions: id u64, secret [16], client_name bytes,
//!                        client_id (u8 0 = none | 1 + bytes), grace_ms u32,
//!                        (version 5) the declared order (`order::Order`),
//!                        (version 6) u16 count, multi-locks in flight:
//!                        request_id u32, wait_left_ms u64 (u64::MAX =
//!                        forever, 0 = one try), name count u16, names
//!                        bytes (`protocol::AllNames`) — or, for an
//!                        ACQUIRE_POOL, requirement count | 0x8000 and
//!                        the requirements (`pool::PoolSpec`)
//!   u32 count, holds:    name bytes, session u64, mode u8 (0 exclusive,
//!                        1 shared; version 5: 2 permits, then weight u32,
//!                        capacity u32), token u64, since_unix_ms u64,
//!                        lease_left_ms u64 (version 2; 0 = no lease)
//!   u32 count, waiters:  (version 2) name bytes, session u64, request_id u32,
//!                        mode u8 (as for holds, with weight and capacity),
//!                        lease_ms u32,
//!                        wait_left_ms u64 (u64::MAX = forever),
//!                        since_unix_ms u64 (version 4; earlier: the
//!                        dump's created_unix_ms); in queue order per lock
//!   u32 count, signals:  name bytes, signal bytes
//!   (version 3) log position: u8 0 = none | 1 + index u64, term u64,
//!                        u32 loops, per loop: stamp_ms u64, batch u64,
//!                        last_token u64
//! checksum   u64       CRC-64/XZ of every byte before it
//! ```
//!
//! where `bytes` is a u32 length followed by that many bytes.
//!
//! Invariants:
//! - `decode` never panics and never allocates much more than the input's
//!   size: every length is checked against its `*_LEN_MAX` and every count
//!   against the bytes left, before anything is allocated;
//! - a file `decode` accepts is whole (its checksum matches, nothing trails)
//!   and consistent: session ids are unique, each hold names a session of the
//!   dump and carries a token no greater than `last_token`, and each lock has
//!   one exclusive holder or only shared ones, each session at most once;
//!   the holds and queued acquires of a semaphore all name its capacity,
//!   and no lock's name is also a semaphore's.
//!   `encode` asserts the same of what it is given (a broken dump is a bug
//!   of the caller), so whatever it writes, `decode` reads back equal;
//! - `sanitize` drops whatever record breaks these rules (with a count),
//!   so the server's writer never panics whatever state it is given;
//! - version 1 files (no leases, no waiters), version 2 files (no log
//!   position), version 3 files (no queueing times) and version 4 files
//!   (no semaphores) and version 5 files (no multi-locks) are still read;
//! - a session's multi-locks in flight have distinct request ids and
//!   well-formed names (`AllNames::parse`) or requirements
//!   (`PoolSpec::parse`, none short of candidates);
//! - a dump with a log position is a snapshot of `--durability log`: each
//!   loop's part is its state after its batch `batch` at its own instant
//!   `stamp_ms` (leases and waits left are counted from there), and the log
//!   entries after `index` replay on top of it (`journal::Replay`).
//! - `data_dir::write_atomic` replaces the file whole or not at all: a crash leaves the
//!   old file or the new one, never a mix.

use std::fmt;
use std::io;

use hashbrown::{HashMap, HashSet};

use crate::limits::{CLIENT_NAME_LEN_MAX, NAME_LEN_MAX, SIGNAL_LEN_MAX};
use crate::limits::{IN_FLIGHT_PER_SESSION_MAX, MULTI_NAMES_MAX, SECRET_LEN};
pub use crate::mode::Mode;
use crate::order::Order;

/// The state file's name inside the server's data directory.
pub const FILE_NAME: &str = "livelock.dump";
/// First bytes of every dump.
pub const MAGIC: [u8; 8] = *b"LLDUMP\0\x01";
/// Format version this build writes and reads.
pub const VERSION: u32 = 6;
/// The oldest format this build still reads.
pub const VERSION_MIN: u32 = 1;
/// `DumpWaiter::wait_left_ms` of a wait without deadline.
pub const WAIT_FOREVER: u64 = u64::MAX;

/// Longest lock name in a dump (hold and signal names are 1..= this).
pub const DUMP_NAME_LEN_MAX: usize = 1024;
/// Longest names of one multi-lock, encoded.
const MULTI_NAMES_LEN_MAX: usize = MULTI_NAMES_MAX * (4 + NAME_LEN_MAX);
/// Longest signal payload in a dump.
pub const DUMP_SIGNAL_LEN_MAX: usize = 1024;
/// Longest client name or LiveLock client id in a dump.
pub const DUMP_CLIENT_LEN_MAX: usize = 1024;

// Whatever the server may hold must fit in a dump.
const _: () = assert!(DUMP_NAME_LEN_MAX >= NAME_LEN_MAX);
const _: () = assert!(DUMP_CLIENT_LEN_MAX >= CLIENT_NAME_LEN_MAX);
const _: () = assert!(DUMP_CLIENT_LEN_MAX >= crate::limits::CLIENT_ID_LEN_MAX);
const _: () = assert!(DUMP_SIGNAL_LEN_MAX >= SIGNAL_LEN_MAX);
const _: () = assert!(SECRET_LEN == 16);

/// Bytes before the body: magic, version, body length.
const HEADER_LEN: usize = 8 + 4 + 8;
/// Bytes of the trailing checksum.
const CHECKSUM_LEN: usize = 8;
/// Smallest encoding of one record of each kind, to bound counts by the bytes left.
const SESSION_LEN_MIN: usize = 8 + SECRET_LEN + 4 + 1 + 4;
const HOLD_LEN_MIN: usize = 4 + 1 + 8 + 1 + 8 + 8;
const WAITER_LEN_MIN: usize = 4 + 1 + 8 + 4 + 1 + 4 + 8; // + 8 from version 4
const SIGNAL_LEN_MIN: usize = 4 + 1 + 4;

/// One session, attached or not when the dump was taken; a reloaded session
/// starts detached and lives for its grace period unless it is resumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpSession {
    pub id: u64,
    /// The secret a RESUME must present.
    pub secret: [u8; SECRET_LEN],
    pub client_name: Vec<u8>,
    /// LiveLock client id (CONN), if the session came from the LiveLock protocol.
    pub client_id: Option<Vec<u8>>,
    /// How long the session outlives its connection.
    pub grace_ms: u32,
    /// The order its acquires keep (SET_ORDER), if it declared one.
    pub order: Option<Order>,
    /// Its ACQUIRE_ALLs and ACQUIRE_POOLs in flight (restarted from their
    /// first step).
    pub multis: Vec<DumpMulti>,
}

/// An ACQUIRE_ALL or ACQUIRE_POOL in flight: what it asked for and how
/// long it may still wait; what it had taken is not kept (a restart gives
/// it back and starts it over).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpMulti {
    pub request_id: u32,
    /// What was left of the wait; [`WAIT_FOREVER`] for none, 0 for a try.
    pub wait_left_ms: u64,
    /// The request, as `multi::Request::decode` reads it (with `names`):
    /// ACQUIRE_ALL's name count, or ACQUIRE_POOL's requirement count with
    /// the top bit set.
    pub count: u16,
    /// The names (`protocol::AllNames`) or requirements (`pool::PoolSpec`).
    pub names: Vec<u8>,
}

impl DumpMulti {
    /// The request, if it is well-formed.
    pub fn request(&self) -> Option<crate::multi::Request<'_>> {
        crate::multi::Request::decode(self.count, &self.names)
    }
}

/// One granted hold of a lock by a session of the dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpHold {
    pub name: Vec<u8>,
    pub session: u64,
    pub mode: Mode,
    /// Permits held (`Mode::Permits`); 1 for a lock.
    pub weight: u32,
    /// The semaphore's capacity (`Mode::Permits`); 0 for a lock.
    pub capacity: u32,
    /// The fencing token the hold was granted with.
    pub token: u64,
    /// Wall-clock grant time, ms since the Unix epoch.
    pub since_unix_ms: u64,
    /// What was left of the hold's lease when the dump was taken; 0 = no
    /// lease. The restored hold gets it again, counted from the restart.
    pub lease_left_ms: u64,
}

/// One queued acquire (a request in flight of a session of the dump).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpWaiter {
    pub name: Vec<u8>,
    pub session: u64,
    pub request_id: u32,
    pub mode: Mode,
    /// Permits asked for (`Mode::Permits`); 1 for a lock.
    pub weight: u32,
    /// The semaphore's capacity (`Mode::Permits`); 0 for a lock.
    pub capacity: u32,
    /// The lease the hold gets when granted (0 = none).
    pub lease_ms: u32,
    /// What was left of the wait; [`WAIT_FOREVER`] for none.
    pub wait_left_ms: u64,
    /// When it was queued, ms since the Unix epoch.
    pub since_unix_ms: u64,
}

/// Everything the server keeps across a restart.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dump {
    /// Wall-clock time the dump was taken, ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// Greatest fencing token ever handed out; the next run starts above it.
    pub last_token: u64,
    pub sessions: Vec<DumpSession>,
    pub holds: Vec<DumpHold>,
    /// Queued acquires, in queue order per lock.
    pub waiters: Vec<DumpWaiter>,
    /// (lock name, signal) pairs.
    pub signals: Vec<(Vec<u8>, Vec<u8>)>,
    /// Where the log continues from, if this is a snapshot of the log.
    pub log: Option<LogPosition>,
}

/// The point of the log a snapshot covers (see the module comment).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogPosition {
    /// Every log entry up to this index is in the snapshot.
    pub index: u64,
    /// The Raft term of that entry.
    pub term: u64,
    /// One per loop of the server that wrote the log, in loop order.
    pub loops: Vec<LoopPosition>,
}

/// One loop's place in the log when its part of a snapshot was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoopPosition {
    /// The loop's clock when it exported its part.
    pub stamp_ms: u64,
    /// The last batch of the loop in the snapshot (batches count from 1).
    pub batch: u64,
    /// The shard's last fencing token.
    pub last_token: u64,
}

/// Most loops a log position may name (the server's own limit).
const LOG_LOOPS_MAX: usize = crate::limits::THREADS_MAX;

/// Why a dump could not be read.
#[derive(Debug)]
pub enum DumpError {
    Io(io::Error),
    /// The file does not start with [`MAGIC`]: it is not a dump at all.
    NotADump,
    /// A dump of a format this build does not know.
    UnsupportedVersion(u32),
    /// The file ends before the length its header promises.
    Truncated,
    /// The file is damaged or inconsistent; the text says how.
    Corrupt(&'static str),
}

impl fmt::Display for DumpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DumpError::Io(error) => write!(f, "dump i/o error: {error}"),
            DumpError::NotADump => f.write_str("not a livelock dump file"),
            DumpError::UnsupportedVersion(version) => {
                write!(
                    f,
                    "unsupported dump version {version} (this build reads {VERSION})"
                )
            }
            DumpError::Truncated => f.write_str("dump file is truncated"),
            DumpError::Corrupt(why) => write!(f, "dump file is corrupt: {why}"),
        }
    }
}

impl std::error::Error for DumpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DumpError::Io(error) => Some(error),
            _ => None,
        }
    }
}

impl From<io::Error> for DumpError {
    fn from(error: io::Error) -> Self {
        DumpError::Io(error)
    }
}

/// The dump as bytes, ready for `data_dir::write_atomic`.
///
/// # Panics
/// If `dump` breaks an invariant `decode` checks (a length over its maximum,
/// a hold of an unknown session, two exclusive holders, ...): writing it
/// would produce a file the next start refuses.
pub fn encode(dump: &Dump) -> Vec<u8> {
    if let Err(why) = check_consistent(dump) {
        panic!("encoding an inconsistent dump: {why}");
    }
    let body_len = encoded_body_len(dump);
    let mut out = Vec::with_capacity(HEADER_LEN + body_len + CHECKSUM_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(body_len as u64).to_le_bytes());
    out.extend_from_slice(&dump.created_unix_ms.to_le_bytes());
    out.extend_from_slice(&dump.last_token.to_le_bytes());
    put_count(&mut out, dump.sessions.len());
    for session in &dump.sessions {
        out.extend_from_slice(&session.id.to_le_bytes());
        out.extend_from_slice(&session.secret);
        put_bytes(&mut out, &session.client_name, 0, DUMP_CLIENT_LEN_MAX);
        match &session.client_id {
            None => out.push(0),
            Some(client_id) => {
                out.push(1);
                put_bytes(&mut out, client_id, 0, DUMP_CLIENT_LEN_MAX);
            }
        }
        out.extend_from_slice(&session.grace_ms.to_le_bytes());
        Order::encode(session.order.as_ref(), &mut out);
        let count = u16::try_from(session.multis.len()).expect("checked by check_consistent");
        out.extend_from_slice(&count.to_le_bytes());
        for multi in &session.multis {
            out.extend_from_slice(&multi.request_id.to_le_bytes());
            out.extend_from_slice(&multi.wait_left_ms.to_le_bytes());
            out.extend_from_slice(&multi.count.to_le_bytes());
            put_bytes(&mut out, &multi.names, 1, MULTI_NAMES_LEN_MAX);
        }
    }
    put_count(&mut out, dump.holds.len());
    for hold in &dump.holds {
        put_bytes(&mut out, &hold.name, 1, DUMP_NAME_LEN_MAX);
        out.extend_from_slice(&hold.session.to_le_bytes());
        put_mode(&mut out, hold.mode, hold.weight, hold.capacity);
        out.extend_from_slice(&hold.token.to_le_bytes());
        out.extend_from_slice(&hold.since_unix_ms.to_le_bytes());
        out.extend_from_slice(&hold.lease_left_ms.to_le_bytes());
    }
    put_count(&mut out, dump.waiters.len());
    for waiter in &dump.waiters {
        put_bytes(&mut out, &waiter.name, 1, DUMP_NAME_LEN_MAX);
        out.extend_from_slice(&waiter.session.to_le_bytes());
        out.extend_from_slice(&waiter.request_id.to_le_bytes());
        put_mode(&mut out, waiter.mode, waiter.weight, waiter.capacity);
        out.extend_from_slice(&waiter.lease_ms.to_le_bytes());
        out.extend_from_slice(&waiter.wait_left_ms.to_le_bytes());
        out.extend_from_slice(&waiter.since_unix_ms.to_le_bytes());
    }
    put_count(&mut out, dump.signals.len());
    for (name, signal) in &dump.signals {
        put_bytes(&mut out, name, 1, DUMP_NAME_LEN_MAX);
        put_bytes(&mut out, signal, 0, DUMP_SIGNAL_LEN_MAX);
    }
    match &dump.log {
        None => out.push(0),
        Some(log) => {
            out.push(1);
            out.extend_from_slice(&log.index.to_le_bytes());
            out.extend_from_slice(&log.term.to_le_bytes());
            put_count(&mut out, log.loops.len());
            for position in &log.loops {
                out.extend_from_slice(&position.stamp_ms.to_le_bytes());
                out.extend_from_slice(&position.batch.to_le_bytes());
                out.extend_from_slice(&position.last_token.to_le_bytes());
            }
        }
    }
    assert_eq!(
        out.len(),
        HEADER_LEN + body_len,
        "encoded_body_len is exact"
    );
    let checksum = crc64(&out);
    out.extend_from_slice(&checksum.to_le_bytes());
    out
}

/// Reads a dump from `bytes`. Never panics: anything but a whole, consistent
/// dump of [`VERSION`] is an error.
pub fn decode(bytes: &[u8]) -> Result<Dump, DumpError> {
    if bytes.len() < MAGIC.len() {
        // A prefix of the magic (the empty file included) was cut short.
        return Err(if MAGIC.starts_with(bytes) {
            DumpError::Truncated
        } else {
            DumpError::NotADump
        });
    }
    if bytes[..MAGIC.len()] != MAGIC {
        return Err(DumpError::NotADump);
    }
    if bytes.len() < HEADER_LEN {
        return Err(DumpError::Truncated);
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if !(VERSION_MIN..=VERSION).contains(&version) {
        return Err(DumpError::UnsupportedVersion(version));
    }
    let body_len = u64::from_le_bytes(bytes[12..HEADER_LEN].try_into().expect("8 bytes"));
    let after_header = (bytes.len() - HEADER_LEN) as u64;
    match body_len.checked_add(CHECKSUM_LEN as u64) {
        Some(whole) if whole == after_header => {}
        Some(whole) if whole > after_header => return Err(DumpError::Truncated),
        Some(_) => return Err(DumpError::Corrupt("trailing bytes after the checksum")),
        None => return Err(DumpError::Corrupt("impossible body length")),
    }
    let (covered, stored) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if crc64(covered) != u64::from_le_bytes(stored.try_into().expect("8 bytes")) {
        return Err(DumpError::Corrupt("checksum mismatch"));
    }

    let mut body = Reader {
        rest: &covered[HEADER_LEN..],
    };
    let created_unix_ms = body.u64()?;
    let last_token = body.u64()?;
    let count = body.count(SESSION_LEN_MIN)?;
    let mut sessions = Vec::with_capacity(count);
    for _ in 0..count {
        let id = body.u64()?;
        let secret = body.array::<SECRET_LEN>()?;
        let client_name = body.bytes(0, DUMP_CLIENT_LEN_MAX)?;
        let client_id = match body.u8()? {
            0 => None,
            1 => Some(body.bytes(0, DUMP_CLIENT_LEN_MAX)?),
            _ => return Err(DumpError::Corrupt("bad client id tag")),
        };
        let grace_ms = body.u32()?;
        let order = if version >= 5 { body.order()? } else { None };
        let mut multis = Vec::new();
        if version >= 6 {
            let count = u16::from_le_bytes(body.array()?);
            for _ in 0..count {
                let request_id = body.u32()?;
                let wait_left_ms = body.u64()?;
                let count = u16::from_le_bytes(body.array()?);
                let names = body.bytes(1, MULTI_NAMES_LEN_MAX)?;
                multis.push(DumpMulti {
                    request_id,
                    wait_left_ms,
                    count,
                    names,
                });
            }
        }
        sessions.push(DumpSession {
            id,
            secret,
            client_name,
            client_id,
            grace_ms,
            order,
            multis,
        });
    }
    let count = body.count(HOLD_LEN_MIN)?;
    let mut holds = Vec::with_capacity(count);
    for _ in 0..count {
        let name = body.bytes(1, DUMP_NAME_LEN_MAX)?;
        let session = body.u64()?;
        let (mode, weight, capacity) = body.mode(version)?;
        let token = body.u64()?;
        let since_unix_ms = body.u64()?;
        let lease_left_ms = if version >= 2 { body.u64()? } else { 0 };
        holds.push(DumpHold {
            name,
            session,
            mode,
            weight,
            capacity,
            token,
            since_unix_ms,
            lease_left_ms,
        });
    }
    let mut waiters = Vec::new();
    if version >= 2 {
        let count = body.count(WAITER_LEN_MIN)?;
        waiters.reserve(count);
        for _ in 0..count {
            let name = body.bytes(1, DUMP_NAME_LEN_MAX)?;
            let session = body.u64()?;
            let request_id = body.u32()?;
            let (mode, weight, capacity) = body.mode(version)?;
            let lease_ms = body.u32()?;
            let wait_left_ms = body.u64()?;
            let since_unix_ms = match version >= 4 {
                true => body.u64()?,
                false => created_unix_ms,
            };
            waiters.push(DumpWaiter {
                name,
                session,
                request_id,
                mode,
                weight,
                capacity,
                lease_ms,
                wait_left_ms,
                since_unix_ms,
            });
        }
    }
    let count = body.count(SIGNAL_LEN_MIN)?;
    let mut signals = Vec::with_capacity(count);
    for _ in 0..count {
        let name = body.bytes(1, DUMP_NAME_LEN_MAX)?;
        let signal = body.bytes(0, DUMP_SIGNAL_LEN_MAX)?;
        signals.push((name, signal));
    }
    let log = if version >= 3 {
        match body.u8()? {
            0 => None,
            1 => {
                let index = body.u64()?;
                let term = body.u64()?;
                let count = body.count(24)?;
                if count == 0 || count > LOG_LOOPS_MAX {
                    return Err(DumpError::Corrupt("log position loop count out of range"));
                }
                let mut loops = Vec::with_capacity(count);
                for _ in 0..count {
                    loops.push(LoopPosition {
                        stamp_ms: body.u64()?,
                        batch: body.u64()?,
                        last_token: body.u64()?,
                    });
                }
                Some(LogPosition { index, term, loops })
            }
            _ => return Err(DumpError::Corrupt("bad log position tag")),
        }
    } else {
        None
    };
    if !body.rest.is_empty() {
        return Err(DumpError::Corrupt("trailing bytes in the body"));
    }
    let dump = Dump {
        created_unix_ms,
        last_token,
        sessions,
        holds,
        waiters,
        signals,
        log,
    };
    check_consistent(&dump).map_err(DumpError::Corrupt)?;
    Ok(dump)
}

/// The invariants a dump keeps beyond its lengths (see the module comment).
fn check_consistent(dump: &Dump) -> Result<(), &'static str> {
    for session in &dump.sessions {
        if session.client_name.len() > DUMP_CLIENT_LEN_MAX
            || session
                .client_id
                .as_ref()
                .is_some_and(|id| id.len() > DUMP_CLIENT_LEN_MAX)
        {
            return Err("client name or id too long");
        }
        if session.multis.len() > IN_FLIGHT_PER_SESSION_MAX {
            return Err("too many multi-locks in a session");
        }
        let mut ids = HashSet::new();
        for multi in &session.multis {
            if multi.request().is_none() || !ids.insert(multi.request_id) {
                return Err("a bad multi-lock");
            }
        }
    }
    for (name, signal) in &dump.signals {
        if name.is_empty() || name.len() > DUMP_NAME_LEN_MAX {
            return Err("signal lock name length out of range");
        }
        if signal.len() > DUMP_SIGNAL_LEN_MAX {
            return Err("signal too long");
        }
    }
    if u32::try_from(dump.sessions.len()).is_err()
        || u32::try_from(dump.holds.len()).is_err()
        || u32::try_from(dump.waiters.len()).is_err()
        || u32::try_from(dump.signals.len()).is_err()
    {
        return Err("too many records");
    }
    if let Some(log) = &dump.log {
        if log.loops.is_empty() || log.loops.len() > LOG_LOOPS_MAX {
            return Err("log position loop count out of range");
        }
        if log.loops.iter().any(|l| l.last_token > dump.last_token) {
            return Err("loop token above last_token");
        }
    }
    let mut session_ids = HashSet::with_capacity(dump.sessions.len());
    for session in &dump.sessions {
        if !session_ids.insert(session.id) {
            return Err("duplicate session id");
        }
    }
    let mut kinds = Kinds::default();
    let mut holders: HashSet<(&[u8], u64)> = HashSet::with_capacity(dump.holds.len());
    for hold in &dump.holds {
        if hold.name.is_empty() || hold.name.len() > DUMP_NAME_LEN_MAX {
            return Err("hold lock name length out of range");
        }
        // A snapshot of the log may hold the holds of a session that just
        // ended (its release still on the way to the shard).
        if !session_ids.contains(&hold.session) && dump.log.is_none() {
            return Err("hold of an unknown session");
        }
        if hold.token > dump.last_token {
            return Err("hold token above last_token");
        }
        if !holders.insert((&hold.name, hold.session)) {
            return Err("session holds one lock twice");
        }
        kinds.admit(&hold.name, true, hold.mode, hold.weight, hold.capacity)?;
    }
    let mut requests: HashSet<(u64, u32)> = HashSet::with_capacity(dump.waiters.len());
    for waiter in &dump.waiters {
        if waiter.name.is_empty() || waiter.name.len() > DUMP_NAME_LEN_MAX {
            return Err("waiter lock name length out of range");
        }
        if !session_ids.contains(&waiter.session) && dump.log.is_none() {
            return Err("waiter of an unknown session");
        }
        if !requests.insert((waiter.session, waiter.request_id)) {
            return Err("request id queued twice");
        }
        if !holders.insert((&waiter.name, waiter.session)) {
            return Err("session holds or waits for one lock twice");
        }
        kinds.admit(
            &waiter.name,
            false,
            waiter.mode,
            waiter.weight,
            waiter.capacity,
        )?;
    }
    Ok(())
}

/// How each name of a dump is held, as its records are admitted: the
/// rules `check_consistent` enforces and `sanitize` keeps.
#[derive(Default)]
struct Kinds {
    /// Name → (mode of its first hold or waiter, capacity, whether it has
    /// an exclusive hold).
    names: HashMap<Vec<u8>, (Mode, u32, bool)>,
}

impl Kinds {
    /// Admits one hold (`hold`) or queued acquire of `name`, or says why
    /// it conflicts with those admitted before (and records nothing).
    fn admit(
        &mut self,
        name: &[u8],
        hold: bool,
        mode: Mode,
        weight: u32,
        capacity: u32,
    ) -> Result<(), &'static str> {
        let valid = match mode {
            Mode::Permits => weight >= 1 && capacity >= 1 && (hold || weight <= capacity),
            Mode::Exclusive | Mode::Shared => weight == 1 && capacity == 0,
        };
        if !valid {
            return Err("bad weight or capacity");
        }
        let exclusive = hold && mode == Mode::Exclusive;
        let permits = mode == Mode::Permits;
        match self.names.get_mut(name) {
            None => {
                self.names
                    .insert(name.to_vec(), (mode, capacity, exclusive));
            }
            Some((first, first_capacity, held_exclusive)) => {
                if (*first == Mode::Permits) != permits {
                    return Err("a name both a lock and a semaphore");
                }
                if *first_capacity != capacity {
                    return Err("a semaphore with two capacities");
                }
                if hold && (*held_exclusive || exclusive) {
                    return Err("exclusive hold of a lock with other holders");
                }
                *held_exclusive |= exclusive;
            }
        }
        Ok(())
    }
}

/// Drops every record `encode` would refuse (a name or signal too long, a
/// hold of an unknown session, a conflicting hold...) and raises
/// `last_token` to the greatest hold token, so that writing a dump never
/// fails on the state it is given. Returns how many records were dropped.
pub fn sanitize(dump: &mut Dump) -> usize {
    let before = dump.sessions.len() + dump.holds.len() + dump.waiters.len() + dump.signals.len();
    let mut ids = HashSet::new();
    dump.sessions.retain(|s| {
        s.client_name.len() <= DUMP_CLIENT_LEN_MAX
            && s.client_id
                .as_ref()
                .map_or(true, |id| id.len() <= DUMP_CLIENT_LEN_MAX)
            && ids.insert(s.id)
    });
    for session in &mut dump.sessions {
        let mut requests = HashSet::new();
        session
            .multis
            .retain(|m| m.request().is_some() && requests.insert(m.request_id));
        session.multis.truncate(IN_FLIGHT_PER_SESSION_MAX);
    }
    let name_ok = |name: &[u8]| !name.is_empty() && name.len() <= DUMP_NAME_LEN_MAX;
    dump.signals
        .retain(|(name, signal)| name_ok(name) && signal.len() <= DUMP_SIGNAL_LEN_MAX);
    let mut kinds = Kinds::default();
    let mut holders: HashSet<(Vec<u8>, u64)> = HashSet::new();
    dump.holds.retain(|h| {
        name_ok(&h.name)
            && ids.contains(&h.session)
            && !holders.contains(&(h.name.clone(), h.session))
            && kinds
                .admit(&h.name, true, h.mode, h.weight, h.capacity)
                .is_ok()
            && holders.insert((h.name.clone(), h.session))
    });
    let mut requests = HashSet::new();
    dump.waiters.retain(|w| {
        name_ok(&w.name)
            && ids.contains(&w.session)
            && !requests.contains(&(w.session, w.request_id))
            && !holders.contains(&(w.name.clone(), w.session))
            && kinds
                .admit(&w.name, false, w.mode, w.weight, w.capacity)
                .is_ok()
            && requests.insert((w.session, w.request_id))
            && holders.insert((w.name.clone(), w.session))
    });
    dump.last_token = dump
        .holds
        .iter()
        .map(|h| h.token)
        .fold(dump.last_token, u64::max);
    before - (dump.sessions.len() + dump.holds.len() + dump.waiters.len() + dump.signals.len())
}

/// Exact body length of `dump` once encoded.
fn encoded_body_len(dump: &Dump) -> usize {
    let sessions: usize = dump
        .sessions
        .iter()
        .map(|s| {
            8 + SECRET_LEN
                + 4
                + s.client_name.len()
                + 1
                + s.client_id.as_ref().map_or(0, |id| 4 + id.len())
                + 4
                + order_len(s.order.as_ref())
                + 2
                + s.multis
                    .iter()
                    .map(|m| 4 + 8 + 2 + 4 + m.names.len())
                    .sum::<usize>()
        })
        .sum();
    let holds: usize = dump
        .holds
        .iter()
        .map(|h| 4 + h.name.len() + 8 + mode_len(h.mode) + 8 + 8 + 8)
        .sum();
    let waiters: usize = dump
        .waiters
        .iter()
        .map(|w| 4 + w.name.len() + 8 + 4 + mode_len(w.mode) + 4 + 8 + 8)
        .sum();
    let signals: usize = dump
        .signals
        .iter()
        .map(|(n, s)| 4 + n.len() + 4 + s.len())
        .sum();
    let log = dump
        .log
        .as_ref()
        .map_or(0, |l| 8 + 8 + 4 + 24 * l.loops.len());
    8 + 8 + 4 + sessions + 4 + holds + 4 + waiters + 4 + signals + 1 + log
}

/// Bytes of an encoded order.
fn order_len(order: Option<&Order>) -> usize {
    let mut bytes = Vec::new();
    Order::encode(order, &mut bytes);
    bytes.len()
}

/// Bytes of an encoded mode: the code, and a semaphore's weight and capacity.
fn mode_len(mode: Mode) -> usize {
    match mode {
        Mode::Permits => 1 + 4 + 4,
        Mode::Exclusive | Mode::Shared => 1,
    }
}

fn put_mode(out: &mut Vec<u8>, mode: Mode, weight: u32, capacity: u32) {
    out.push(mode as u8);
    if mode == Mode::Permits {
        out.extend_from_slice(&weight.to_le_bytes());
        out.extend_from_slice(&capacity.to_le_bytes());
    }
}

fn put_count(out: &mut Vec<u8>, count: usize) {
    let count = u32::try_from(count).expect("checked by check_consistent");
    out.extend_from_slice(&count.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8], len_min: usize, len_max: usize) {
    assert!((len_min..=len_max).contains(&bytes.len()));
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// A cursor over a checksummed body. Running past its end means the body
/// disagrees with itself, not that the file was cut: that is `Corrupt`.
struct Reader<'a> {
    rest: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, len: usize) -> Result<&[u8], DumpError> {
        if len > self.rest.len() {
            return Err(DumpError::Corrupt("record runs past the end of the body"));
        }
        let (taken, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DumpError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u8(&mut self) -> Result<u8, DumpError> {
        Ok(self.array::<1>()?[0])
    }

    /// A session's declared order (`Order::encode`).
    fn order(&mut self) -> Result<Option<Order>, DumpError> {
        let (order, rest) =
            Order::decode(self.rest).map_err(|()| DumpError::Corrupt("bad session order"))?;
        self.rest = rest;
        Ok(order)
    }

    /// A mode (`put_mode`); before version 5 only 0 and 1.
    fn mode(&mut self, version: u32) -> Result<(Mode, u32, u32), DumpError> {
        match (self.u8()?, version >= 5) {
            (0, _) => Ok((Mode::Exclusive, 1, 0)),
            (1, _) => Ok((Mode::Shared, 1, 0)),
            (2, true) => Ok((Mode::Permits, self.u32()?, self.u32()?)),
            _ => Err(DumpError::Corrupt("bad mode")),
        }
    }

    fn u32(&mut self) -> Result<u32, DumpError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DumpError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A record count, bounded by the records of `len_min` bytes that could
    /// still fit, so a forged count cannot make the caller allocate much.
    fn count(&mut self, len_min: usize) -> Result<usize, DumpError> {
        let count = self.u32()? as usize;
        if count > self.rest.len() / len_min {
            return Err(DumpError::Corrupt("record count exceeds the bytes left"));
        }
        Ok(count)
    }

    /// A length-prefixed byte string of `len_min..=len_max` bytes.
    fn bytes(&mut self, len_min: usize, len_max: usize) -> Result<Vec<u8>, DumpError> {
        let len = self.u32()? as usize;
        if !(len_min..=len_max).contains(&len) {
            return Err(DumpError::Corrupt("byte string length out of range"));
        }
        Ok(self.take(len)?.to_vec())
    }
}

/// CRC-64/XZ (reflected ECMA-182 polynomial, init and final xor all ones):
/// detects every error burst up to 64 bits, unlike a plain hash.
pub(crate) fn crc64(bytes: &[u8]) -> u64 {
    let mut crc = !0u64;
    for &byte in bytes {
        crc = CRC64_TABLE[((crc ^ u64::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

const CRC64_TABLE: [u64; 256] = {
    const POLY: u64 = 0xc96c_5795_d787_0f42;
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u64;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::AllNames;

    fn sample() -> Dump {
        Dump {
            created_unix_ms: 1_700_000_000_123,
            last_token: 42,
            sessions: vec![
                DumpSession {
                    id: 0x0100,
                    secret: [7; 16],
                    client_name: b"worker-1".to_vec(),
                    client_id: None,
                    grace_ms: 30_000,
                    order: None,
                    multis: Vec::new(),
                },
                DumpSession {
                    id: 0x0201,
                    secret: *b"0123456789abcdef",
                    client_name: vec![0, 0xff, b'\n', 0x80],
                    client_id: Some(b"conn-\x00\xfe".to_vec()),
                    grace_ms: 0,
                    order: None,
                    multis: Vec::new(),
                },
                DumpSession {
                    id: u64::MAX,
                    secret: [0; 16],
                    client_name: Vec::new(),
                    client_id: Some(Vec::new()),
                    grace_ms: u32::MAX,
                    order: None,
                    multis: Vec::new(),
                },
            ],
            holds: vec![
                DumpHold {
                    name: b"jobs/1".to_vec(),
                    session: 0x0100,
                    mode: Mode::Exclusive,
                    weight: 1,
                    capacity: 0,
                    token: 40,
                    since_unix_ms: 1_699_999_999_000,
                    lease_left_ms: 1500,
                },
                DumpHold {
                    name: vec![0, 1, 2, 0xff],
                    session: 0x0100,
                    mode: Mode::Shared,
                    weight: 1,
                    capacity: 0,
                    token: 41,
                    since_unix_ms: 0,
                    lease_left_ms: 0,
                },
                DumpHold {
                    name: vec![0, 1, 2, 0xff],
                    session: 0x0201,
                    mode: Mode::Shared,
                    weight: 1,
                    capacity: 0,
                    token: 42,
                    since_unix_ms: u64::MAX,
                    lease_left_ms: u64::MAX,
                },
            ],
            waiters: vec![
                DumpWaiter {
                    name: b"jobs/1".to_vec(),
                    session: 0x0201,
                    request_id: 7,
                    mode: Mode::Exclusive,
                    weight: 1,
                    capacity: 0,
                    lease_ms: 0,
                    wait_left_ms: WAIT_FOREVER,
                    since_unix_ms: 1_699_999_999_500,
                },
                DumpWaiter {
                    name: b"jobs/1".to_vec(),
                    session: u64::MAX,
                    request_id: u32::MAX,
                    mode: Mode::Shared,
                    weight: 1,
                    capacity: 0,
                    lease_ms: 5000,
                    wait_left_ms: 12,
                    since_unix_ms: u64::MAX,
                },
            ],
            signals: vec![
                (b"jobs/1".to_vec(), b"wake".to_vec()),
                (vec![0xfe; DUMP_NAME_LEN_MAX], Vec::new()),
                (b"x".to_vec(), vec![0; DUMP_SIGNAL_LEN_MAX]),
            ],
            log: None,
        }
    }

    /// A snapshot of the log keeps its position, and may keep the holds
    /// of a session that just ended (a plain dump may not).
    #[test]
    fn log_positions_round_trip() {
        let mut dump = sample();
        dump.holds[0].session = 999;
        assert!(check_consistent(&dump).is_err());
        dump.log = Some(LogPosition {
            index: 77,
            term: 3,
            loops: vec![
                LoopPosition {
                    stamp_ms: 1_700_000_000_100,
                    batch: 9,
                    last_token: 42,
                },
                LoopPosition::default(),
            ],
        });
        assert_eq!(decode(&encode(&dump)).unwrap(), dump);
        dump.log.as_mut().unwrap().loops[0].last_token = 43;
        assert!(
            check_consistent(&dump).is_err(),
            "a loop token above last_token"
        );
        dump.log.as_mut().unwrap().loops.clear();
        assert!(check_consistent(&dump).is_err(), "no loops");
    }

    /// Re-seals `bytes` after a test edited them: fixes body_len and the checksum.
    fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
        bytes.truncate(bytes.len().saturating_sub(CHECKSUM_LEN));
        let body_len = (bytes.len() - HEADER_LEN) as u64;
        bytes[12..HEADER_LEN].copy_from_slice(&body_len.to_le_bytes());
        let checksum = crc64(&bytes);
        bytes.extend_from_slice(&checksum.to_le_bytes());
        bytes
    }

    /// SplitMix64: a deterministic PRNG for the fuzz loops.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn crc64_matches_the_xz_check_value() {
        assert_eq!(crc64(b"123456789"), 0x995d_c9bb_df19_39fa);
        assert_eq!(crc64(b""), 0);
    }

    #[test]
    fn round_trip() {
        let dump = sample();
        let bytes = encode(&dump);
        assert_eq!(&bytes[..8], &MAGIC);
        assert_eq!(decode(&bytes).unwrap(), dump);
    }

    #[test]
    fn round_trip_empty_dump() {
        let dump = Dump::default();
        let bytes = encode(&dump);
        assert_eq!(bytes.len(), HEADER_LEN + 8 + 8 + 4 * 4 + 1 + CHECKSUM_LEN);
        assert_eq!(decode(&bytes).unwrap(), dump);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = encode(&sample());
        for len in 0..bytes.len() {
            let error = decode(&bytes[..len]).expect_err("truncated dump accepted");
            assert!(matches!(error, DumpError::Truncated), "len {len}: {error}");
        }
    }

    #[test]
    fn every_bit_flip_is_an_error() {
        let bytes = encode(&sample());
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&flipped).is_err(), "bit {bit} flip accepted");
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut bytes = encode(&sample());
        bytes.push(0);
        assert!(matches!(decode(&bytes), Err(DumpError::Corrupt(_))));
    }

    #[test]
    fn foreign_files_are_not_dumps() {
        for foreign in [
            &b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00"[..],
            b"\x80\x04\x95",
            b"{\"sessions\": []}\n",
            b"\x7fELF\x02\x01\x01\x00",
            b"LLDUMP\0\x02\x01\0\0\0",
            b"X",
        ] {
            assert!(
                matches!(decode(foreign), Err(DumpError::NotADump)),
                "{foreign:?}"
            );
        }
        // Too short to tell, but a start of the magic: cut short.
        assert!(matches!(decode(b""), Err(DumpError::Truncated)));
        assert!(matches!(decode(b"LLD"), Err(DumpError::Truncated)));
    }

    #[test]
    fn other_versions_are_unsupported() {
        for version in [0, VERSION + 1] {
            let mut bytes = encode(&Dump::default());
            bytes[8..12].copy_from_slice(&version.to_le_bytes());
            let bytes = reseal(bytes);
            assert!(matches!(
                decode(&bytes),
                Err(DumpError::UnsupportedVersion(v)) if v == version
            ));
        }
    }

    /// A version 1 file (no leases, no waiters) is still read.
    #[test]
    fn version_1_files_are_read() {
        let mut dump = sample();
        dump.waiters.clear();
        let mut v1 = Vec::new();
        for hold in &mut dump.holds {
            hold.lease_left_ms = 0;
        }
        let v2 = without_orders(encode(&dump), &dump);
        // Rebuild the body without the v2 fields: each hold's last 8 bytes,
        // and the (empty) waiters count.
        v1.extend_from_slice(&v2[..HEADER_LEN]);
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let mut at =
            HEADER_LEN + 16 + 4 + dump.sessions.iter().map(encoded_session_len).sum::<usize>();
        v1.extend_from_slice(&v2[HEADER_LEN..at + 4]);
        at += 4;
        for hold in &dump.holds {
            let len = 4 + hold.name.len() + 8 + 1 + 8 + 8;
            v1.extend_from_slice(&v2[at..at + len]);
            at += len + 8;
        }
        at += 4;
        // The signals (not the version 3 log position), and a checksum to redo.
        v1.extend_from_slice(&v2[at..v2.len() - CHECKSUM_LEN - 1]);
        v1.extend_from_slice(&[0; CHECKSUM_LEN]);
        assert_eq!(decode(&reseal(v1)).unwrap(), dump);
    }

    /// A version 3 file (waiters without their queueing time) is read, each
    /// waiter queued since the dump was taken.
    #[test]
    fn version_3_files_are_read() {
        let mut dump = sample();
        let v4 = without_orders(encode(&dump), &dump);
        let mut v3 = v4[..HEADER_LEN].to_vec();
        v3[8..12].copy_from_slice(&3u32.to_le_bytes());
        let mut at = HEADER_LEN
            + 16
            + 4
            + dump.sessions.iter().map(encoded_session_len).sum::<usize>()
            + 4
            + dump
                .holds
                .iter()
                .map(|h| 4 + h.name.len() + 8 + 1 + 8 + 8 + 8)
                .sum::<usize>()
            + 4;
        v3.extend_from_slice(&v4[HEADER_LEN..at]);
        for waiter in &mut dump.waiters {
            let len = 4 + waiter.name.len() + 8 + 4 + 1 + 4 + 8;
            v3.extend_from_slice(&v4[at..at + len]);
            at += len + 8;
            waiter.since_unix_ms = dump.created_unix_ms;
        }
        v3.extend_from_slice(&v4[at..]);
        assert_eq!(decode(&reseal(v3)).unwrap(), dump);
    }

    /// The writer never panics: whatever the server hands it, `sanitize`
    /// drops what a dump cannot hold, and the rest is written (item 12 of
    /// the safety issue: a LiveLock signal that grew when lowercased).
    #[test]
    fn sanitize_drops_what_encode_would_refuse() {
        let mut dump = sample();
        dump.signals
            .push((b"x".to_vec(), vec![b'i'; DUMP_SIGNAL_LEN_MAX + 1]));
        dump.sessions[0].client_name = vec![b'n'; DUMP_CLIENT_LEN_MAX + 1];
        dump.holds.push(DumpHold {
            name: b"jobs/1".to_vec(),
            session: 0x0201,
            mode: Mode::Exclusive,
            weight: 1,
            capacity: 0,
            token: 99,
            since_unix_ms: 0,
            lease_left_ms: 0,
        });
        assert!(check_consistent(&dump).is_err());
        let dropped = sanitize(&mut dump);
        // The long signal, the session with the long name, its two holds,
        // the exclusive hold on a lock held shared.
        assert_eq!(dropped, 5, "{dump:?}");
        check_consistent(&dump).expect("consistent after sanitize");
        assert_eq!(decode(&encode(&dump)).unwrap(), dump);
        let mut clean = sample();
        assert_eq!(sanitize(&mut clean), 0);
        assert_eq!(clean, sample());
    }

    #[test]
    fn huge_counts_and_lengths_are_refused_before_allocating() {
        // Count fields sit at fixed offsets in an empty dump.
        let sessions_at = HEADER_LEN + 16;
        for at in [sessions_at, sessions_at + 4, sessions_at + 8] {
            let mut bytes = encode(&Dump::default());
            bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            let error = decode(&reseal(bytes)).unwrap_err();
            assert!(matches!(error, DumpError::Corrupt(_)), "{error}");
        }
        // A count that fits the file, but records that do not make sense.
        let mut bytes = encode(&Dump::default());
        bytes.truncate(bytes.len() - CHECKSUM_LEN);
        bytes[sessions_at..sessions_at + 4].copy_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&[0; SESSION_LEN_MIN]);
        let at = bytes.len() - SESSION_LEN_MIN + 8 + SECRET_LEN;
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes()); // client name length
        let error = decode(&reseal(bytes)).unwrap_err();
        assert!(matches!(error, DumpError::Corrupt(_)), "{error}");
        // A body length near u64::MAX.
        let mut bytes = encode(&Dump::default());
        bytes[12..HEADER_LEN].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode(&bytes).is_err());
    }

    #[test]
    fn lengths_over_their_maximum_are_refused() {
        let mut dump = Dump::default();
        dump.signals
            .push((b"n".to_vec(), vec![1; DUMP_SIGNAL_LEN_MAX]));
        let mut bytes = encode(&dump);
        // Grow the signal by one byte and its length prefix with it.
        let len_at = bytes.len() - CHECKSUM_LEN - DUMP_SIGNAL_LEN_MAX - 4;
        let len = (DUMP_SIGNAL_LEN_MAX as u32 + 1).to_le_bytes();
        bytes[len_at..len_at + 4].copy_from_slice(&len);
        bytes.insert(bytes.len() - CHECKSUM_LEN, 1);
        let error = decode(&reseal(bytes)).unwrap_err();
        assert!(matches!(error, DumpError::Corrupt(_)), "{error}");
    }

    /// A semaphore's holds and queued acquires.
    fn with_semaphore() -> Dump {
        let mut dump = sample();
        let permits = |session, token, weight| DumpHold {
            name: b"gpus".to_vec(),
            session,
            mode: Mode::Permits,
            weight,
            capacity: 4,
            token,
            since_unix_ms: 5,
            lease_left_ms: 0,
        };
        dump.holds.push(permits(0x0100, 30, 3));
        dump.holds.push(permits(0x0201, 31, 1));
        dump.waiters.push(DumpWaiter {
            name: b"gpus".to_vec(),
            session: u64::MAX,
            request_id: 9,
            mode: Mode::Permits,
            weight: 4,
            capacity: 4,
            lease_ms: 0,
            wait_left_ms: WAIT_FOREVER,
            since_unix_ms: 6,
        });
        dump
    }

    #[test]
    fn semaphores_and_orders_round_trip_and_need_version_5() {
        let dump = with_semaphore();
        let bytes = encode(&dump);
        assert_eq!(decode(&bytes).unwrap(), dump);
        // Version 4 knew no permits: the same bytes marked 4 are corrupt.
        let mut v4 = without_orders(bytes, &dump);
        v4[8..12].copy_from_slice(&4u32.to_le_bytes());
        assert!(matches!(
            decode(&reseal(v4)),
            Err(DumpError::Corrupt("bad mode"))
        ));
        // Without semaphores and orders, a version 5 file is a version 4 one.
        let mut v4 = without_orders(encode(&sample()), &sample());
        v4[8..12].copy_from_slice(&4u32.to_le_bytes());
        assert_eq!(decode(&reseal(v4)).unwrap(), sample());
        // Sessions keep their declared order.
        let mut ordered = sample();
        ordered.sessions[0].order = Some(Order::Ascending);
        ordered.sessions[1].order = Order::priorities([("z", 1), ("a", 2)]);
        assert_eq!(decode(&encode(&ordered)).unwrap(), ordered);
    }

    #[test]
    fn inconsistent_semaphores_are_corrupt() {
        type Breaker = fn(&mut Dump);
        let at = sample().holds.len();
        let cases: [(&str, Breaker); 6] = [
            ("two capacities", |d| {
                d.holds.last_mut().unwrap().capacity = 5
            }),
            ("zero weight", |d| d.holds.last_mut().unwrap().weight = 0),
            ("a waiter heavier than the capacity", |d| {
                d.waiters.last_mut().unwrap().weight = 5
            }),
            ("a lock waiter on a semaphore", |d| {
                let w = d.waiters.len() - 1;
                d.waiters[w].mode = Mode::Shared;
                d.waiters[w].weight = 1;
                d.waiters[w].capacity = 0;
            }),
            ("a semaphore hold of a lock", |d| {
                d.holds[0].mode = Mode::Permits;
                d.holds[0].capacity = 1;
            }),
            ("a lock with a capacity", |d| d.holds[0].capacity = 2),
        ];
        for (what, break_it) in cases {
            let mut dump = with_semaphore();
            break_it(&mut dump);
            assert!(check_consistent(&dump).is_err(), "{what}");
            let mut sanitized = dump.clone();
            assert!(sanitize(&mut sanitized) > 0, "{what}");
            assert!(check_consistent(&sanitized).is_ok(), "{what}");
        }
        // Holders over a lowered capacity are consistent (they keep their
        // permits until they release them).
        let mut dump = with_semaphore();
        dump.holds[at].weight = 4;
        assert!(check_consistent(&dump).is_ok());
    }

    #[test]
    fn inconsistent_dumps_are_corrupt() {
        /// Breaks one invariant of a dump.
        type Breaker = fn(&mut Dump);
        let cases: [(&str, Breaker); 7] = [
            ("unknown session", |d| d.holds[0].session = 999),
            ("token above floor", |d| d.holds[0].token = d.last_token + 1),
            ("duplicate session", |d| d.sessions[1].id = d.sessions[0].id),
            ("two exclusive", |d| {
                let mut second = d.holds[0].clone();
                second.session = d.sessions[1].id;
                d.holds.push(second);
            }),
            ("exclusive among shared", |d| {
                d.holds[2].mode = Mode::Exclusive
            }),
            ("same session twice", |d| {
                d.holds[2].session = d.holds[1].session
            }),
            ("empty name", |d| d.holds[0].name.clear()),
        ];
        for (what, break_it) in cases {
            let mut dump = sample();
            break_it(&mut dump);
            assert!(check_consistent(&dump).is_err(), "{what}");
            // A caller bug: encode refuses to write what decode would refuse.
            let result = std::panic::catch_unwind(|| encode(&dump));
            assert!(result.is_err(), "encode accepted: {what}");
        }
        // The same through bytes: a hold of an unknown session.
        let mut bytes = encode(&sample());
        let hold_session_at = {
            let dump = sample();
            HEADER_LEN
                + 20
                + dump.sessions.iter().map(encoded_session_len).sum::<usize>()
                + (4 + 2) * dump.sessions.len()
                + 4
                + 4
                + dump.holds[0].name.len()
        };
        bytes[hold_session_at..hold_session_at + 8].copy_from_slice(&999u64.to_le_bytes());
        match decode(&reseal(bytes)) {
            Err(DumpError::Corrupt(why)) => assert_eq!(why, "hold of an unknown session"),
            other => panic!("{other:?}"),
        }
    }

    /// A version 5 file's bytes without the sessions' orders (each `None`,
    /// 4 bytes), as versions before 5 have them (the checksum to redo).
    fn without_orders(v6: Vec<u8>, dump: &Dump) -> Vec<u8> {
        without_session_tail(v6, dump, 4 + 2)
    }

    /// A version 6 file's bytes without the sessions' `tail` last bytes:
    /// their orders (4, each `None`) and multi-lock counts (2, each 0).
    fn without_session_tail(v6: Vec<u8>, dump: &Dump, tail: usize) -> Vec<u8> {
        let mut at = HEADER_LEN + 16 + 4;
        let mut out = v6[..at].to_vec();
        for session in &dump.sessions {
            assert!(session.order.is_none() || tail == 2);
            assert!(session.multis.is_empty());
            let len = encoded_session_len(session) + 4 + 2 - tail;
            out.extend_from_slice(&v6[at..at + len]);
            at += len + tail;
        }
        out.extend_from_slice(&v6[at..]);
        out
    }

    /// Multi-locks in flight round-trip; without them a version 6 file is
    /// a version 5 one; a bad one is corrupt.
    #[test]
    fn multi_locks_round_trip_and_need_version_6() {
        let mut dump = sample();
        let mut names = Vec::new();
        AllNames::encode(&[(Mode::Exclusive, b"a"), (Mode::Shared, b"b")], &mut names);
        let multi = DumpMulti {
            request_id: 9,
            wait_left_ms: 1500,
            count: 2,
            names,
        };
        dump.sessions[0].multis.push(multi.clone());
        assert_eq!(decode(&encode(&dump)).unwrap(), dump);
        let mut v5 = without_session_tail(encode(&sample()), &sample(), 2);
        v5[8..12].copy_from_slice(&5u32.to_le_bytes());
        assert_eq!(decode(&reseal(v5)).unwrap(), sample());
        // The same request twice, or names that do not parse.
        dump.sessions[0].multis.push(multi.clone());
        assert!(check_consistent(&dump).is_err());
        dump.sessions[0].multis[1] = DumpMulti { count: 3, ..multi };
        assert!(check_consistent(&dump).is_err());
        assert_eq!(
            sanitize(&mut dump),
            0,
            "a bad multi-lock is dropped, not counted"
        );
        assert_eq!(dump.sessions[0].multis.len(), 1);
    }

    /// Bytes of a session before version 5 (no order).
    fn encoded_session_len(s: &DumpSession) -> usize {
        8 + SECRET_LEN
            + 4
            + s.client_name.len()
            + 1
            + s.client_id.as_ref().map_or(0, |id| 4 + id.len())
            + 4
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x5eed);
        let valid = encode(&sample());
        let mut accepted = 0;
        for case in 0..10_000 {
            let bytes: Vec<u8> = match case % 4 {
                // Pure noise, sometimes behind a valid header.
                0 | 1 => {
                    let len = rng.below(256);
                    let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    if case % 4 == 1 && bytes.len() >= 12 {
                        bytes[..8].copy_from_slice(&MAGIC);
                        bytes[8..12].copy_from_slice(&VERSION.to_le_bytes());
                    }
                    bytes
                }
                // A valid dump with a few bytes changed, resealed so the
                // parser itself (not only the checksum) sees the damage.
                _ => {
                    let mut bytes = valid.clone();
                    for _ in 0..1 + rng.below(4) {
                        let at = HEADER_LEN + rng.below(bytes.len() - HEADER_LEN - CHECKSUM_LEN);
                        bytes[at] = rng.next() as u8;
                    }
                    if case % 4 == 3 {
                        let cut = HEADER_LEN + rng.below(bytes.len() - HEADER_LEN);
                        bytes.truncate(cut);
                        bytes.extend_from_slice(&[0; CHECKSUM_LEN]);
                    }
                    reseal(bytes)
                }
            };
            // Whatever comes back, decoding must return; an accepted dump
            // must be one encode would write.
            if let Ok(dump) = decode(&bytes) {
                assert_eq!(encode(&dump), bytes, "case {case}");
                accepted += 1;
            }
        }
        // Some damage (a timestamp, a secret byte) leaves a valid dump:
        // proof the resealed cases got past the checksum into the parser.
        assert!(accepted > 0);
    }
}
