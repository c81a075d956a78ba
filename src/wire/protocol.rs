//! The native binary protocol, version 1: turning bytes into requests and
//! replies into bytes. This module owns the wire format and nothing else — no
//! I/O, no sessions, no locks. `docs/PROTOCOL.md` documents it byte by byte and
//! `include/livelock.h` mirrors it for C clients.
//!
//! Every frame is a 16-byte little-endian [`Header`] followed by `body_len`
//! bytes of body. A body is a fixed part (one of the `*Body` structs below)
//! followed by variable bytes (a lock name, a password, ...).
//!
//! Invariants kept here:
//! - Decoding borrows from the read buffer and never allocates; encoding only
//!   appends to the caller's `Vec<u8>` (the caller bounds that buffer).
//! - A frame is checked to be complete before it is parsed: an incomplete frame
//!   is [`Decoded::Incomplete`], not an error.
//! - Two kinds of bad input. If the frame can still be delimited (the header is
//!   sane), the problem is a per-frame [`Status`] and the connection goes on.
//!   If it cannot (bad magic, body longer than `FRAME_BODY_MAX`), it is a
//!   [`Fatal`] and the connection must be closed.
//! - The wire structs are `#[repr(C)]` with byte-array (unaligned) fields, so
//!   they have no padding; their sizes and field offsets are asserted at compile
//!   time here and in `include/livelock.h` (and compared by `tests/c_header.rs`).

use core::mem::{offset_of, size_of};
use std::fmt;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::limits::{
    CLIENT_NAME_LEN_MAX, FRAME_BODY_MAX, IN_FLIGHT_PER_SESSION_MAX, NAME_LEN_MAX, PASSWORD_LEN_MAX,
    REPLY_BODY_MAX,
};
use crate::order::Order;

/// First two bytes of every frame (as a little-endian u16; `F1 4C` on the wire).
pub const MAGIC: u16 = 0x4CF1;
/// The first byte of every native connection; the server sniffs it to tell the
/// native protocol from the text (RESP/inline) protocol.
pub const MAGIC_BYTE0: u8 = 0xF1;
/// The protocol version this module speaks.
pub const VERSION: u8 = 1;
/// Size of [`Header`] on the wire.
pub const HEADER_LEN: usize = 16;
/// `wait_ms` value of an ACQUIRE that waits until granted or cancelled.
pub const WAIT_FOREVER: u32 = u32::MAX;
pub use crate::limits::SECRET_LEN;

/// Longest message carried by an error reply, so that header + message stays
/// within the 256 bytes per owed reply that `limits::WRITE_BUFFER_MAX` assumes.
/// Longer messages are truncated (at a UTF-8 character boundary).
const MESSAGE_LEN_MAX: usize = 256 - HEADER_LEN;

const _: () = assert!(MAGIC.to_le_bytes()[0] == MAGIC_BYTE0);
const _: () = assert!(FRAME_BODY_MAX <= u32::MAX as usize);
const _: () = assert!(PASSWORD_LEN_MAX <= u16::MAX as usize);
const _: () = assert!(CLIENT_NAME_LEN_MAX <= u16::MAX as usize);
const _: () = assert!(MESSAGE_LEN_MAX <= FRAME_BODY_MAX);

/// Operation codes (header byte 3). Requests are below 0x40; server pushes are
/// 0x40 and above, and are never valid from a client.
pub mod opcode {
    /// Open a session: `HelloBody` + password + client name.
    pub const HELLO: u8 = 1;
    /// Reattach to a session within its grace period: `ResumeBody` + password.
    pub const RESUME: u8 = 2;
    /// Take a lock (or wait for it): `AcquireBody` + name.
    pub const ACQUIRE: u8 = 3;
    /// Give a lock back: body = name; with [`super::flags::HOLD_TOKEN`], the hold's
    /// fencing token (u64) first.
    pub const RELEASE: u8 = 4;
    /// Push a held lock's lease further: `ExtendBody` + name; with
    /// [`super::flags::HOLD_TOKEN`], `ExtendBody` + token (u64) + name.
    pub const EXTEND: u8 = 5;
    /// Cancel a pending ACQUIRE of this connection: `CancelBody`.
    pub const CANCEL: u8 = 6;
    /// Liveness check, empty body.
    pub const PING: u8 = 7;
    /// Close the session (no grace), empty body.
    pub const BYE: u8 = 8;
    /// Raise, query or clear a signal on a held lock: op u8 (0 raise and
    /// push to holders, 1 exists, 2 clear), reserved u8, name_len u16, then
    /// the name and the signal. Reply body: one byte, 1 or 0.
    pub const SIGNAL: u8 = 9;
    /// Who holds a lock and who waits: body = name. Reply body: one lock
    /// record, server_unix_ms u64, then the queue (see `put_queue`).
    pub const INSPECT: u8 = 10;
    /// Locks matching a glob: limit u32, then the pattern (empty = all).
    /// Reply body: count u32, flags u32 (bit 0: truncated), server_unix_ms
    /// u64, then records.
    pub const LIST: u8 = 11;
    /// Server counts: empty body. Reply body: see [`super::StatsReply`].
    pub const STATS: u8 = 12;
    /// Operator: end other sessions' holds of a lock (they get LOCK_LOST):
    /// body = name; with [`super::flags::HOLD_TOKEN`], the token of the one hold
    /// meant first.
    pub const FORCE_RELEASE: u8 = 13;
    /// Operator: end a session (its holds go, its connection closes after
    /// one LOCK_LOST per hold): body = session id u64.
    pub const KILL_SESSION: u8 = 14;
    /// A cluster's state as its leader sees it: empty body. Reply body: see
    /// [`super::ClusterReply`].
    pub const CLUSTER_STATUS: u8 = 15;
    /// Operator: change a cluster's members, or hand leadership over.
    /// Body: see [`super::ClusterChange`]. Reply: `Ok` once the leader has
    /// proposed it (CLUSTER_STATUS shows when it is done).
    pub const CLUSTER_CHANGE: u8 = 16;
    /// Take permits of a counting semaphore (or wait for them):
    /// `PermitsBody` + name. Replies as ACQUIRE.
    pub const ACQUIRE_PERMITS: u8 = 17;
    /// Change a semaphore's capacity: capacity u32 + name. Reply `Ok`,
    /// `NotHeld` (not in use) or `WrongKind` (a lock).
    pub const SET_CAPACITY: u8 = 18;
    /// Declare the order this session's acquires keep: an order
    /// (`crate::order::Order`'s encoding). Reply `Ok`, or `OrderViolation`
    /// while the session holds or waits for anything.
    pub const SET_ORDER: u8 = 19;
    /// Usage report: top u32 (>= 1; at most `REPORT_TOP_MAX` are listed),
    /// then an optional tag filter (tags text, `crate::pool`): the names
    /// whose tags match, after a first row, named by the filter, with
    /// their total.
    /// Reply body: see [`super::Report`].
    pub const REPORT: u8 = 20;
    /// Take several locks at once, all or none: `AllBody` + the names
    /// ([`super::AllNames`]). Reply `Ok` with one token u64 per name (in the
    /// request's order), or as ACQUIRE's failures.
    pub const ACQUIRE_ALL: u8 = 21;
    /// Take K of N resources per requirement, all requirements or none:
    /// `AllBody` (whose count is the number of requirements) + the
    /// requirements ([`crate::pool::PoolSpec`]). Reply `Ok` with the grant
    /// (`crate::pool::parse_grant`), `OverCapacity` if a requirement's
    /// filter leaves fewer candidates than it needs, or as ACQUIRE's
    /// failures.
    pub const ACQUIRE_POOL: u8 = 22;
    /// Push: a held lock was taken away (lease expired); body token + name.
    pub const LOCK_LOST: u8 = 0x40;
    /// Push: the server is shutting down; empty body.
    pub const SHUTDOWN: u8 = 0x41;
    /// Push: another connection resumed this session; empty body.
    pub const SESSION_TAKEN: u8 = 0x42;
    /// Push: a signal was raised on a lock this session holds; body
    /// name_len u16, name, signal.
    pub const SIGNALLED: u8 = 0x43;
    /// Push, after a RESUME reply: one lock the session holds; body token
    /// u64, mode u8, name. As many as it holds, then HELD_END.
    pub const HELD: u8 = 0x44;
    /// Push: the RESUME's listing of holds is complete; empty body.
    pub const HELD_END: u8 = 0x45;
}

/// Header flag bits (header bytes 4..6). Requests carry none but
/// `HOLD_TOKEN`, on RELEASE and EXTEND only.
pub mod flags {
    /// A server -> client frame (every frame the server sends has it).
    pub const REPLY: u16 = 1;
    /// Server-initiated, or the deferred completion of an earlier request.
    pub const PUSH: u16 = 2;
    /// Not the final reply to its request (e.g. QUEUED); another follows.
    pub const INTERIM: u16 = 4;
    /// Request flag, RELEASE and EXTEND: the body carries the fencing token
    /// of the hold meant, so a stale request (its hold was lost, the lock
    /// taken again) gets `WrongToken` instead of touching the new hold.
    pub const HOLD_TOKEN: u16 = 8;
}

/// `acq_flags` bit: send an INTERIM reply with status `Queued` when the
/// acquire has to wait.
pub const ACQ_NOTIFY_QUEUED: u8 = 1;
/// Every `acq_flags` bit this version knows; others are rejected (BadBody) so
/// that a future flag is never silently ignored.
const ACQ_FLAGS_KNOWN: u8 = ACQ_NOTIFY_QUEUED;

/// The frame header, exactly as on the wire.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct Header {
    /// Always [`MAGIC`].
    pub magic: U16,
    /// Always [`VERSION`] for this module.
    pub version: u8,
    /// One of [`opcode`].
    pub opcode: u8,
    /// Bits of [`flags`]; 0 in requests.
    pub flags: U16,
    /// A [`Status`] code; 0 in requests.
    pub status: U16,
    /// Chosen by the client; replies echo it; pushes not tied to a request use 0.
    pub request_id: U32,
    /// Bytes of body that follow the header.
    pub body_len: U32,
}

const _: () = assert!(size_of::<Header>() == HEADER_LEN);
const _: () = assert!(offset_of!(Header, magic) == 0);
const _: () = assert!(offset_of!(Header, version) == 2);
const _: () = assert!(offset_of!(Header, opcode) == 3);
const _: () = assert!(offset_of!(Header, flags) == 4);
const _: () = assert!(offset_of!(Header, status) == 6);
const _: () = assert!(offset_of!(Header, request_id) == 8);
const _: () = assert!(offset_of!(Header, body_len) == 12);

/// Fixed part of a HELLO body; then `password_len` bytes of password, then
/// `client_name_len` bytes of client name, and nothing else.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct HelloBody {
    /// How long the session outlives its connection (0: it ends with it).
    pub grace_ms: U32,
    pub password_len: U16,
    pub client_name_len: U16,
}

const _: () = assert!(size_of::<HelloBody>() == 8);
const _: () = assert!(offset_of!(HelloBody, grace_ms) == 0);
const _: () = assert!(offset_of!(HelloBody, password_len) == 4);
const _: () = assert!(offset_of!(HelloBody, client_name_len) == 6);

/// Fixed part of a RESUME body; then `password_len` bytes of password.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct ResumeBody {
    /// The session to reattach to (from the HELLO reply).
    pub session_id: U64,
    /// The session's secret (from the HELLO reply).
    pub secret: [u8; SECRET_LEN],
    pub password_len: U16,
    /// Must be 0.
    pub reserved: U16,
}

const _: () = assert!(size_of::<ResumeBody>() == 28);
const _: () = assert!(offset_of!(ResumeBody, session_id) == 0);
const _: () = assert!(offset_of!(ResumeBody, secret) == 8);
const _: () = assert!(offset_of!(ResumeBody, password_len) == 24);
const _: () = assert!(offset_of!(ResumeBody, reserved) == 26);

/// Fixed part of an ACQUIRE_ALL body (the names, [`AllNames`], are the
/// rest) and of an ACQUIRE_POOL body (`count`: the requirements,
/// [`crate::pool::PoolSpec`], the rest).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct AllBody {
    /// Bits such as [`ACQ_NOTIFY_QUEUED`].
    pub acq_flags: u8,
    /// Must be 0.
    pub reserved: u8,
    /// How many names follow: 1..=`MULTI_NAMES_MAX`.
    pub count: U16,
    /// 0: try once; [`WAIT_FOREVER`]; else the longest wait in ms, for all.
    pub wait_ms: U32,
}

impl AllBody {
    fn new(count: u16, wait_ms: u32, notify_queued: bool) -> AllBody {
        AllBody {
            acq_flags: if notify_queued { ACQ_NOTIFY_QUEUED } else { 0 },
            reserved: 0,
            count: U16::new(count),
            wait_ms: U32::new(wait_ms),
        }
    }
}

/// The names of an ACQUIRE_ALL, as sent: per name `mode u8` (0 exclusive,
/// 1 shared), `reserved u8`, `name_len u16`, the name. Checked when made
/// (`parse`): 1..=`MULTI_NAMES_MAX` distinct valid names, nothing after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllNames<'a> {
    count: u16,
    bytes: &'a [u8],
}

impl<'a> AllNames<'a> {
    /// `count` names in `bytes`, checked; `None` if they are not.
    pub fn parse(count: u16, bytes: &'a [u8]) -> Option<AllNames<'a>> {
        let names = AllNames { count, bytes };
        if !(1..=crate::limits::MULTI_NAMES_MAX).contains(&usize::from(count)) {
            return None;
        }
        let mut rest = bytes;
        let mut seen: Vec<&[u8]> = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let (head, after) = rest.split_first_chunk::<4>()?;
            let len = usize::from(u16::from_le_bytes([head[2], head[3]]));
            let mode = Mode::from_u8(head[0]);
            if !matches!(mode, Some(Mode::Exclusive | Mode::Shared))
                || head[1] != 0
                || !(1..=NAME_LEN_MAX).contains(&len)
                || after.len() < len
            {
                return None;
            }
            let (name, after) = after.split_at(len);
            if seen.contains(&name) {
                return None;
            }
            seen.push(name);
            rest = after;
        }
        rest.is_empty().then_some(names)
    }

    /// Appends the encoding of `names` (mode and name each).
    pub fn encode(names: &[(Mode, &[u8])], out: &mut Vec<u8>) {
        for (mode, name) in names {
            out.extend_from_slice(&[*mode as u8, 0]);
            out.extend_from_slice(&len_u16(name.len()).get().to_le_bytes());
            out.extend_from_slice(name);
        }
    }

    pub fn count(&self) -> u16 {
        self.count
    }

    /// The encoded names (what `encode` wrote).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The names with their modes, in the request's order.
    pub fn iter(&self) -> impl Iterator<Item = (Mode, &'a [u8])> {
        let mut rest = self.bytes;
        (0..self.count).map(move |_| {
            let (head, after) = rest.split_first_chunk::<4>().expect("checked by parse");
            let len = usize::from(u16::from_le_bytes([head[2], head[3]]));
            let (name, after) = after.split_at(len);
            rest = after;
            let mode = Mode::from_u8(head[0]).expect("checked by parse");
            (mode, name)
        })
    }
}

/// Fixed part of an ACQUIRE body; the lock name is the rest of the body.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct AcquireBody {
    /// A [`Mode`]: 0 exclusive, 1 shared.
    pub mode: u8,
    /// Bits such as [`ACQ_NOTIFY_QUEUED`].
    pub acq_flags: u8,
    /// Must be 0.
    pub reserved: U16,
    /// 0: try once; [`WAIT_FOREVER`]; else the longest wait in ms.
    pub wait_ms: U32,
    /// 0: no lease (held until released or the session ends); else ms.
    pub lease_ms: U32,
}

const _: () = assert!(size_of::<AcquireBody>() == 12);
const _: () = assert!(offset_of!(AcquireBody, mode) == 0);
const _: () = assert!(offset_of!(AcquireBody, acq_flags) == 1);
const _: () = assert!(offset_of!(AcquireBody, reserved) == 2);
const _: () = assert!(offset_of!(AcquireBody, wait_ms) == 4);
const _: () = assert!(offset_of!(AcquireBody, lease_ms) == 8);

/// Fixed part of an ACQUIRE_PERMITS body: an ACQUIRE's, with mode 2
/// ([`Mode::Permits`]), then the weight and the capacity; the name is the
/// rest of the body.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct PermitsBody {
    /// As for ACQUIRE; `mode` must be 2.
    pub acquire: AcquireBody,
    /// Permits to take: 1..=capacity.
    pub weight: U32,
    /// The semaphore's capacity, ≥ 1: set by the acquire that puts the name
    /// in use; later acquires must name the same (`CapacityConflict`).
    pub capacity: U32,
}

const _: () = assert!(size_of::<PermitsBody>() == 20);
const _: () = assert!(offset_of!(PermitsBody, weight) == 12);
const _: () = assert!(offset_of!(PermitsBody, capacity) == 16);

/// Fixed part of an EXTEND body; the lock name is the rest of the body.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct ExtendBody {
    /// New lease, counted from when the server accepts the request; > 0.
    pub lease_ms: U32,
}

const _: () = assert!(size_of::<ExtendBody>() == 4);

/// The whole CANCEL body.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct CancelBody {
    /// `request_id` of the pending ACQUIRE to cancel.
    pub target_request_id: U32,
}

const _: () = assert!(size_of::<CancelBody>() == 4);

/// The whole body of a successful HELLO or RESUME reply.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct SessionBody {
    pub session_id: U64,
    pub secret: [u8; SECRET_LEN],
    /// The grace period the server granted (may be less than asked).
    pub grace_ms: U32,
    /// The protocol version the server speaks.
    pub version: u8,
    /// Zero.
    pub reserved: [u8; 3],
}

const _: () = assert!(size_of::<SessionBody>() == 32);
const _: () = assert!(offset_of!(SessionBody, session_id) == 0);
const _: () = assert!(offset_of!(SessionBody, secret) == 8);
const _: () = assert!(offset_of!(SessionBody, grace_ms) == 24);
const _: () = assert!(offset_of!(SessionBody, version) == 28);
const _: () = assert!(offset_of!(SessionBody, reserved) == 29);

/// Largest RESUME reply body: the session body, `in_flight_count`, and an
/// id for each request the session may have in flight. Over
/// FRAME_BODY_MAX once more than 1015 are in flight (a client that bounds
/// replies by FRAME_BODY_MAX would take such a RESUME reply for a broken
/// stream).
pub const RESUME_REPLY_BODY_MAX: usize =
    size_of::<SessionBody>() + 4 + 4 * IN_FLIGHT_PER_SESSION_MAX;
const _: () = assert!(RESUME_REPLY_BODY_MAX <= REPLY_BODY_MAX);

/// Size of a fencing token in a granted reply or a LOCK_LOST push.
const TOKEN_LEN: usize = size_of::<u64>();

/// Reply status (header bytes 6..8). Codes below 32 are outcomes; 32 and above
/// are errors.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    Busy = 1,
    TimedOut = 2,
    Cancelled = 3,
    Queued = 4,
    NotHeld = 5,
    AlreadyHeld = 6,
    NoSuchRequest = 7,
    WrongToken = 8,
    /// ACQUIRE of a semaphore's name, ACQUIRE_PERMITS of a lock's, or
    /// SET_CAPACITY of a lock: nothing changed.
    WrongKind = 9,
    /// ACQUIRE_PERMITS naming another capacity than the semaphore's.
    CapacityConflict = 10,
    /// A queued ACQUIRE_PERMITS heavier than the capacity was lowered to.
    OverCapacity = 11,
    /// An acquire out of the order the session declared (SET_ORDER), or a
    /// SET_ORDER while the session holds or waits for something.
    OrderViolation = 12,
    /// A queued acquire failed to break a deadlock (a cycle of waits); the
    /// body names the cycle.
    Deadlock = 13,
    BadVersion = 32,
    UnknownOpcode = 33,
    BadBody = 34,
    BadName = 35,
    NoSession = 36,
    Auth = 37,
    SessionExists = 38,
    UnknownSession = 39,
    TooManyHolds = 40,
    TooManyWaiters = 41,
    TooManyInFlight = 42,
    DuplicateRequestId = 43,
    ShuttingDown = 44,
    FrameTooLarge = 45,
    HelloTimeout = 46,
    ServerBusy = 47,
    /// `--durability log`: the log cannot be written (disk full, failing);
    /// changes are refused until it can, reads are answered.
    StorageFailed = 48,
}

impl Status {
    /// Every status, in code order.
    pub const ALL: [Status; 31] = [
        Status::Ok,
        Status::Busy,
        Status::TimedOut,
        Status::Cancelled,
        Status::Queued,
        Status::NotHeld,
        Status::AlreadyHeld,
        Status::NoSuchRequest,
        Status::WrongToken,
        Status::WrongKind,
        Status::CapacityConflict,
        Status::OverCapacity,
        Status::OrderViolation,
        Status::Deadlock,
        Status::BadVersion,
        Status::UnknownOpcode,
        Status::BadBody,
        Status::BadName,
        Status::NoSession,
        Status::Auth,
        Status::SessionExists,
        Status::UnknownSession,
        Status::TooManyHolds,
        Status::TooManyWaiters,
        Status::TooManyInFlight,
        Status::DuplicateRequestId,
        Status::ShuttingDown,
        Status::FrameTooLarge,
        Status::HelloTimeout,
        Status::ServerBusy,
        Status::StorageFailed,
    ];

    pub fn from_u16(code: u16) -> Option<Status> {
        Some(match code {
            0 => Status::Ok,
            1 => Status::Busy,
            2 => Status::TimedOut,
            3 => Status::Cancelled,
            4 => Status::Queued,
            5 => Status::NotHeld,
            6 => Status::AlreadyHeld,
            7 => Status::NoSuchRequest,
            8 => Status::WrongToken,
            9 => Status::WrongKind,
            10 => Status::CapacityConflict,
            11 => Status::OverCapacity,
            12 => Status::OrderViolation,
            13 => Status::Deadlock,
            32 => Status::BadVersion,
            33 => Status::UnknownOpcode,
            34 => Status::BadBody,
            35 => Status::BadName,
            36 => Status::NoSession,
            37 => Status::Auth,
            38 => Status::SessionExists,
            39 => Status::UnknownSession,
            40 => Status::TooManyHolds,
            41 => Status::TooManyWaiters,
            42 => Status::TooManyInFlight,
            43 => Status::DuplicateRequestId,
            44 => Status::ShuttingDown,
            45 => Status::FrameTooLarge,
            46 => Status::HelloTimeout,
            47 => Status::ServerBusy,
            48 => Status::StorageFailed,
            _ => return None,
        })
    }

    /// The code on the wire.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// Errors are codes 32 and above; below are outcomes of a valid request.
    pub fn is_error(self) -> bool {
        self.code() >= 32
    }

    /// A short human description.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Busy => "lock is held by someone else",
            Status::TimedOut => "wait timed out",
            Status::Cancelled => "acquire was cancelled",
            Status::Queued => "queued behind the current holder",
            Status::NotHeld => "lock is not held by this session",
            Status::AlreadyHeld => "lock is already held by this session",
            Status::NoSuchRequest => "no such pending request",
            Status::WrongToken => "the session holds the lock under another fencing token",
            Status::WrongKind => "the name is in use as the other kind (lock or semaphore)",
            Status::CapacityConflict => "the semaphore has another capacity",
            Status::OverCapacity => "the semaphore's capacity was lowered below this weight",
            Status::OrderViolation => "out of the lock order this session declared",
            Status::Deadlock => "this wait closed a cycle of waits (deadlock) and was failed",
            Status::BadVersion => "unsupported protocol version",
            Status::UnknownOpcode => "unknown opcode",
            Status::BadBody => "malformed request body",
            Status::BadName => "lock name must be 1 to 1024 bytes",
            Status::NoSession => "no session: send HELLO or RESUME first",
            Status::Auth => "authentication failed",
            Status::SessionExists => "connection already has a session",
            Status::UnknownSession => "unknown or expired session",
            Status::TooManyHolds => "too many locks held or awaited by this session",
            Status::TooManyWaiters => "too many waiters on this lock",
            Status::TooManyInFlight => "too many requests in flight",
            Status::DuplicateRequestId => "request id already in flight",
            Status::ShuttingDown => "server is shutting down",
            Status::FrameTooLarge => "frame body too large",
            Status::HelloTimeout => "no HELLO in time",
            Status::ServerBusy => "server is at capacity",
            Status::StorageFailed => "the log cannot be written",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub use crate::mode::Mode;

/// A decoded client request. Byte fields borrow from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    Hello {
        grace_ms: u32,
        password: &'a [u8],
        client_name: &'a [u8],
    },
    Resume {
        session_id: u64,
        secret: [u8; SECRET_LEN],
        password: &'a [u8],
    },
    /// ACQUIRE, or ACQUIRE_PERMITS (`mode` `Permits`).
    Acquire {
        name: &'a [u8],
        mode: Mode,
        /// Permits (`Mode::Permits`); 1 for a lock.
        weight: u32,
        /// The semaphore's capacity (`Mode::Permits`); 0 for a lock.
        capacity: u32,
        wait_ms: u32,
        lease_ms: u32,
        notify_queued: bool,
    },
    SetCapacity {
        name: &'a [u8],
        capacity: u32,
    },
    /// A well-formed order (`Order::decode` it), the whole body.
    SetOrder(&'a [u8]),
    /// Several locks at once, all or none.
    AcquireAll {
        names: AllNames<'a>,
        wait_ms: u32,
        notify_queued: bool,
    },
    /// K of N resources per requirement, all requirements or none.
    AcquirePool {
        spec: crate::pool::PoolSpec<'a>,
        wait_ms: u32,
        notify_queued: bool,
    },
    /// The `top` busiest names (capped at `REPORT_TOP_MAX`); with a `tag`
    /// filter (tags text, `crate::pool`), of the names whose tags match,
    /// after a first row with their total.
    Report {
        top: u32,
        tag: &'a [u8],
    },
    /// `token`: the hold's fencing token, 0 = whatever hold the session has.
    Release {
        name: &'a [u8],
        token: u64,
    },
    Extend {
        name: &'a [u8],
        lease_ms: u32,
        token: u64,
    },
    Cancel {
        target: u32,
    },
    Ping,
    Bye,
    Signal {
        name: &'a [u8],
        signal: &'a [u8],
        op: SignalKind,
    },
    Inspect {
        name: &'a [u8],
    },
    List {
        pattern: &'a [u8],
        limit: u32,
    },
    Stats,
    ClusterStatus,
    /// A well-formed [`ClusterChange`] body (`ClusterChange::parse` it).
    ClusterChange(&'a [u8]),
    /// `token` 0: every hold of the lock.
    ForceRelease {
        name: &'a [u8],
        token: u64,
    },
    KillSession {
        session_id: u64,
    },
}

/// What a SIGNAL request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SignalKind {
    /// Raise it and push it to every holder.
    Raise = 0,
    Exists = 1,
    Clear = 2,
}

impl Request<'_> {
    /// Whether the request changes the state (refused while the log
    /// cannot write). HELLO is checked where the session is made; BYE is
    /// always taken (the connection ends anyway).
    pub fn changes_state(&self) -> bool {
        match self {
            Request::Acquire { .. }
            | Request::AcquireAll { .. }
            | Request::AcquirePool { .. }
            | Request::Release { .. }
            | Request::Extend { .. }
            | Request::Cancel { .. }
            | Request::ForceRelease { .. }
            | Request::SetCapacity { .. }
            | Request::SetOrder(_)
            | Request::KillSession { .. } => true,
            Request::Signal { op, .. } => *op != SignalKind::Exists,
            _ => false,
        }
    }

    /// The opcode this request is sent with.
    pub fn opcode(&self) -> u8 {
        match self {
            Request::Hello { .. } => opcode::HELLO,
            Request::Resume { .. } => opcode::RESUME,
            Request::Acquire {
                mode: Mode::Permits,
                ..
            } => opcode::ACQUIRE_PERMITS,
            Request::Acquire { .. } => opcode::ACQUIRE,
            Request::AcquireAll { .. } => opcode::ACQUIRE_ALL,
            Request::AcquirePool { .. } => opcode::ACQUIRE_POOL,
            Request::SetCapacity { .. } => opcode::SET_CAPACITY,
            Request::SetOrder(_) => opcode::SET_ORDER,
            Request::Report { .. } => opcode::REPORT,
            Request::Release { .. } => opcode::RELEASE,
            Request::Extend { .. } => opcode::EXTEND,
            Request::Cancel { .. } => opcode::CANCEL,
            Request::Ping => opcode::PING,
            Request::Bye => opcode::BYE,
            Request::Signal { .. } => opcode::SIGNAL,
            Request::Inspect { .. } => opcode::INSPECT,
            Request::List { .. } => opcode::LIST,
            Request::Stats => opcode::STATS,
            Request::ClusterStatus => opcode::CLUSTER_STATUS,
            Request::ClusterChange(_) => opcode::CLUSTER_CHANGE,
            Request::ForceRelease { .. } => opcode::FORCE_RELEASE,
            Request::KillSession { .. } => opcode::KILL_SESSION,
        }
    }
}

/// Outcome of looking at the front of a read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// Not a whole frame yet; read more. Not an error.
    Incomplete,
    /// One whole frame of `consumed` bytes. `result` is the request, or the status to reply
    /// with (the frame was delimited, so the connection can go on).
    Frame {
        consumed: usize,
        opcode: u8,
        request_id: u32,
        result: Result<Request<'a>, Status>,
    },
}

/// The stream cannot be delimited any more: the connection must be closed
/// (the server may first send one error frame with the given status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fatal {
    /// The frame does not start with [`MAGIC`] (reply with no status; close).
    BadMagic,
    /// `body_len` exceeds `FRAME_BODY_MAX` (reply `Status::FrameTooLarge`; close).
    FrameTooLarge { body_len: u32 },
}

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fatal::BadMagic => write!(f, "bad magic: not a livelock v{VERSION} frame"),
            Fatal::FrameTooLarge { body_len } => {
                write!(f, "frame body of {body_len} bytes exceeds {FRAME_BODY_MAX}")
            }
        }
    }
}

impl std::error::Error for Fatal {}

/// What the front of `buf` says about the magic: only the bytes present are
/// checked, so a wrong first byte is caught before the second arrives.
fn magic_ok(buf: &[u8]) -> bool {
    let magic = MAGIC.to_le_bytes();
    buf.iter().zip(magic.iter()).all(|(got, want)| got == want)
}

/// The header at the front of `buf`, once it is complete and its magic checked.
fn header_of(buf: &[u8]) -> Option<Header> {
    let (header, _) = Header::read_from_prefix(buf).ok()?;
    assert_eq!(
        header.magic.get(),
        MAGIC,
        "magic is checked before the header is read"
    );
    Some(header)
}

/// Decodes the frame at the front of `buf`, a server's read buffer.
pub fn decode_request(buf: &[u8]) -> Result<Decoded<'_>, Fatal> {
    if !magic_ok(buf) {
        return Err(Fatal::BadMagic);
    }
    let Some(header) = header_of(buf) else {
        return Ok(Decoded::Incomplete);
    };
    let body_len = header.body_len.get();
    if body_len as usize > FRAME_BODY_MAX {
        return Err(Fatal::FrameTooLarge { body_len });
    }
    let consumed = HEADER_LEN + body_len as usize;
    let Some(body) = buf.get(HEADER_LEN..consumed) else {
        return Ok(Decoded::Incomplete);
    };
    let result = if header.version != VERSION {
        Err(Status::BadVersion)
    } else if header.status.get() != 0 {
        Err(Status::BadBody)
    } else {
        match header.flags.get() {
            0 => decode_body(header.opcode, body, false),
            flags::HOLD_TOKEN
                if matches!(
                    header.opcode,
                    opcode::RELEASE | opcode::EXTEND | opcode::FORCE_RELEASE
                ) =>
            {
                decode_body(header.opcode, body, true)
            }
            _ => Err(Status::BadBody),
        }
    };
    Ok(Decoded::Frame {
        consumed,
        opcode: header.opcode,
        request_id: header.request_id.get(),
        result,
    })
}

/// Splits `body` into its fixed part `T` and the rest; BadBody if too short.
fn split_fixed<T: FromBytes + KnownLayout + Immutable + Unaligned>(
    body: &[u8],
) -> Result<(&T, &[u8]), Status> {
    T::ref_from_prefix(body).map_err(|_| Status::BadBody)
}

fn check_name(name: &[u8]) -> Result<&[u8], Status> {
    if (1..=NAME_LEN_MAX).contains(&name.len()) {
        Ok(name)
    } else {
        Err(Status::BadName)
    }
}

/// Takes the fencing token off the front of `rest` when the request says it
/// has one (`HOLD_TOKEN`); a token of 0 is refused (it would mean "any").
fn split_token(rest: &[u8], with_token: bool) -> Result<(u64, &[u8]), Status> {
    if !with_token {
        return Ok((0, rest));
    }
    let (token, rest) = rest
        .split_first_chunk::<TOKEN_LEN>()
        .ok_or(Status::BadBody)?;
    match u64::from_le_bytes(*token) {
        0 => Err(Status::BadBody),
        token => Ok((token, rest)),
    }
}

/// An ACQUIRE or ACQUIRE_PERMITS from its checked parts.
fn acquire<'a>(
    fixed: &AcquireBody,
    mode: Mode,
    (weight, capacity): (u32, u32),
    name: &'a [u8],
) -> Result<Request<'a>, Status> {
    if fixed.acq_flags & !ACQ_FLAGS_KNOWN != 0 || fixed.reserved.get() != 0 {
        return Err(Status::BadBody);
    }
    Ok(Request::Acquire {
        name: check_name(name)?,
        mode,
        weight,
        capacity,
        wait_ms: fixed.wait_ms.get(),
        lease_ms: fixed.lease_ms.get(),
        notify_queued: fixed.acq_flags & ACQ_NOTIFY_QUEUED != 0,
    })
}

fn decode_body(op: u8, body: &[u8], with_token: bool) -> Result<Request<'_>, Status> {
    match op {
        opcode::HELLO => {
            let (fixed, rest) = split_fixed::<HelloBody>(body)?;
            let password_len = usize::from(fixed.password_len.get());
            let client_name_len = usize::from(fixed.client_name_len.get());
            if password_len > PASSWORD_LEN_MAX
                || client_name_len > CLIENT_NAME_LEN_MAX
                || rest.len() != password_len + client_name_len
            {
                return Err(Status::BadBody);
            }
            let (password, client_name) = rest.split_at(password_len);
            Ok(Request::Hello {
                grace_ms: fixed.grace_ms.get(),
                password,
                client_name,
            })
        }
        opcode::RESUME => {
            let (fixed, password) = split_fixed::<ResumeBody>(body)?;
            let password_len = usize::from(fixed.password_len.get());
            if fixed.reserved.get() != 0
                || password_len > PASSWORD_LEN_MAX
                || password.len() != password_len
            {
                return Err(Status::BadBody);
            }
            Ok(Request::Resume {
                session_id: fixed.session_id.get(),
                secret: fixed.secret,
                password,
            })
        }
        opcode::ACQUIRE => {
            let (fixed, name) = split_fixed::<AcquireBody>(body)?;
            match Mode::from_u8(fixed.mode) {
                Some(mode @ (Mode::Exclusive | Mode::Shared)) => acquire(fixed, mode, (1, 0), name),
                _ => Err(Status::BadBody),
            }
        }
        opcode::ACQUIRE_PERMITS => {
            let (fixed, name) = split_fixed::<PermitsBody>(body)?;
            let (weight, capacity) = (fixed.weight.get(), fixed.capacity.get());
            if fixed.acquire.mode != Mode::Permits as u8 || !(1..=capacity).contains(&weight) {
                return Err(Status::BadBody);
            }
            acquire(&fixed.acquire, Mode::Permits, (weight, capacity), name)
        }
        opcode::ACQUIRE_ALL => {
            let (fixed, rest) = split_fixed::<AllBody>(body)?;
            if fixed.acq_flags & !ACQ_FLAGS_KNOWN != 0 || fixed.reserved != 0 {
                return Err(Status::BadBody);
            }
            let names = AllNames::parse(fixed.count.get(), rest).ok_or(Status::BadBody)?;
            Ok(Request::AcquireAll {
                names,
                wait_ms: fixed.wait_ms.get(),
                notify_queued: fixed.acq_flags & ACQ_NOTIFY_QUEUED != 0,
            })
        }
        opcode::ACQUIRE_POOL => {
            let (fixed, rest) = split_fixed::<AllBody>(body)?;
            if fixed.acq_flags & !ACQ_FLAGS_KNOWN != 0 || fixed.reserved != 0 {
                return Err(Status::BadBody);
            }
            let spec =
                crate::pool::PoolSpec::parse(fixed.count.get(), rest).ok_or(Status::BadBody)?;
            Ok(Request::AcquirePool {
                spec,
                wait_ms: fixed.wait_ms.get(),
                notify_queued: fixed.acq_flags & ACQ_NOTIFY_QUEUED != 0,
            })
        }
        opcode::REPORT => match body.split_first_chunk::<4>() {
            Some((top, tag)) if u32::from_le_bytes(*top) > 0 && crate::pool::tags_valid(tag) => {
                let top = u32::from_le_bytes(*top);
                Ok(Request::Report { top, tag })
            }
            _ => Err(Status::BadBody),
        },
        opcode::SET_ORDER => match Order::decode(body) {
            Ok((_, [])) => Ok(Request::SetOrder(body)),
            _ => Err(Status::BadBody),
        },
        opcode::SET_CAPACITY => {
            let (capacity, name) = body.split_first_chunk::<4>().ok_or(Status::BadBody)?;
            match u32::from_le_bytes(*capacity) {
                0 => Err(Status::BadBody),
                capacity => Ok(Request::SetCapacity {
                    name: check_name(name)?,
                    capacity,
                }),
            }
        }
        opcode::RELEASE => {
            let (token, name) = split_token(body, with_token)?;
            Ok(Request::Release {
                name: check_name(name)?,
                token,
            })
        }
        opcode::FORCE_RELEASE => {
            let (token, name) = split_token(body, with_token)?;
            Ok(Request::ForceRelease {
                name: check_name(name)?,
                token,
            })
        }
        opcode::KILL_SESSION => {
            let id: [u8; 8] = body.try_into().map_err(|_| Status::BadBody)?;
            Ok(Request::KillSession {
                session_id: u64::from_le_bytes(id),
            })
        }
        opcode::EXTEND => {
            let (fixed, rest) = split_fixed::<ExtendBody>(body)?;
            let lease_ms = fixed.lease_ms.get();
            if lease_ms == 0 {
                return Err(Status::BadBody);
            }
            let (token, name) = split_token(rest, with_token)?;
            Ok(Request::Extend {
                name: check_name(name)?,
                lease_ms,
                token,
            })
        }
        opcode::CANCEL => {
            let fixed = CancelBody::ref_from_bytes(body).map_err(|_| Status::BadBody)?;
            Ok(Request::Cancel {
                target: fixed.target_request_id.get(),
            })
        }
        opcode::PING | opcode::BYE | opcode::STATS | opcode::CLUSTER_STATUS if !body.is_empty() => {
            Err(Status::BadBody)
        }
        opcode::PING => Ok(Request::Ping),
        opcode::BYE => Ok(Request::Bye),
        opcode::STATS => Ok(Request::Stats),
        opcode::CLUSTER_STATUS => Ok(Request::ClusterStatus),
        opcode::CLUSTER_CHANGE => match ClusterChange::parse(body) {
            Some(_) => Ok(Request::ClusterChange(body)),
            None => Err(Status::BadBody),
        },
        opcode::SIGNAL => {
            let (fixed, rest) = body.split_first_chunk::<4>().ok_or(Status::BadBody)?;
            let op = match fixed[0] {
                0 => SignalKind::Raise,
                1 => SignalKind::Exists,
                2 => SignalKind::Clear,
                _ => return Err(Status::BadBody),
            };
            let name_len = usize::from(u16::from_le_bytes([fixed[2], fixed[3]]));
            if fixed[1] != 0 || rest.len() < name_len {
                return Err(Status::BadBody);
            }
            let (name, signal) = rest.split_at(name_len);
            if signal.is_empty() || signal.len() > crate::limits::SIGNAL_LEN_MAX {
                return Err(Status::BadBody);
            }
            Ok(Request::Signal {
                name: check_name(name)?,
                signal,
                op,
            })
        }
        opcode::INSPECT => Ok(Request::Inspect {
            name: check_name(body)?,
        }),
        opcode::LIST => {
            let (limit, pattern) = body.split_first_chunk::<4>().ok_or(Status::BadBody)?;
            if pattern.len() > NAME_LEN_MAX {
                return Err(Status::BadName);
            }
            // A limit of 0 would list nothing: a client bug, not a request
            // for "no limit" (that is 0xFFFFFFFF, capped by the server).
            if u32::from_le_bytes(*limit) == 0 {
                return Err(Status::BadBody);
            }
            Ok(Request::List {
                pattern,
                limit: u32::from_le_bytes(*limit),
            })
        }
        _ => Err(Status::UnknownOpcode),
    }
}

/// A body length as it goes in the header. Callers keep bodies far below
/// `u32::MAX`; a longer one is a programmer error.
fn body_len_u32(len: usize) -> u32 {
    u32::try_from(len).expect("frame body length fits in u32")
}

/// Appends a header.
pub fn encode_header(
    out: &mut Vec<u8>,
    opcode: u8,
    flags: u16,
    status: Status,
    request_id: u32,
    body_len: u32,
) {
    let header = Header {
        magic: U16::new(MAGIC),
        version: VERSION,
        opcode,
        flags: U16::new(flags),
        status: U16::new(status.code()),
        request_id: U32::new(request_id),
        body_len: U32::new(body_len),
    };
    out.extend_from_slice(header.as_bytes());
}

/// The longest prefix of `message` of at most `max` bytes that ends on a
/// character boundary.
fn truncate_utf8(message: &str, max: usize) -> &str {
    if message.len() <= max {
        return message;
    }
    let mut end = max;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// Reply with status only; error statuses carry a short UTF-8 message as the body (may be empty).
///
/// The message of a non-error status is dropped (such replies have an empty
/// body); a message longer than 240 bytes is truncated.
pub fn encode_status(
    out: &mut Vec<u8>,
    opcode: u8,
    request_id: u32,
    status: Status,
    message: &str,
) {
    let message = if status.is_error() {
        truncate_utf8(message, MESSAGE_LEN_MAX)
    } else {
        ""
    };
    encode_header(
        out,
        opcode,
        flags::REPLY,
        status,
        request_id,
        body_len_u32(message.len()),
    );
    out.extend_from_slice(message.as_bytes());
}

/// HELLO/RESUME success body: `session_id u64, secret [u8; 16], grace_ms u32, version u8,
/// reserved [u8; 3]` (32 bytes, [`SessionBody`]).
pub fn encode_session(
    out: &mut Vec<u8>,
    opcode: u8,
    request_id: u32,
    session_id: u64,
    secret: &[u8; SECRET_LEN],
    grace_ms: u32,
) {
    assert!(
        opcode == opcode::HELLO || opcode == opcode::RESUME,
        "session reply to opcode {opcode}"
    );
    let body = SessionBody {
        session_id: U64::new(session_id),
        secret: *secret,
        grace_ms: U32::new(grace_ms),
        version: VERSION,
        reserved: [0; 3],
    };
    encode_header(
        out,
        opcode,
        flags::REPLY,
        Status::Ok,
        request_id,
        body_len_u32(size_of::<SessionBody>()),
    );
    out.extend_from_slice(body.as_bytes());
}

/// The RESUME reply: the session body, then in_flight_count u32 and the
/// ids of the session's requests still in flight (each u32). The locks
/// the session holds follow as HELD pushes, then HELD_END.
pub fn encode_resumed(
    out: &mut Vec<u8>,
    request_id: u32,
    session_id: u64,
    secret: &[u8; SECRET_LEN],
    grace_ms: u32,
    in_flight: &[u32],
) {
    let start = out.len();
    encode_session(
        out,
        opcode::RESUME,
        request_id,
        session_id,
        secret,
        grace_ms,
    );
    out.extend_from_slice(&body_len_u32(in_flight.len()).to_le_bytes());
    for id in in_flight {
        out.extend_from_slice(&id.to_le_bytes());
    }
    let body_len = body_len_u32(out.len() - start - HEADER_LEN);
    out[start + 12..start + 16].copy_from_slice(&body_len.to_le_bytes());
}

fn deferred_flags(deferred: bool) -> u16 {
    if deferred {
        flags::REPLY | flags::PUSH
    } else {
        flags::REPLY
    }
}

/// Whether `op` takes something (ACQUIRE, ACQUIRE_PERMITS, ACQUIRE_ALL,
/// ACQUIRE_POOL):
/// its replies may be queued, deferred and granted with tokens.
pub fn is_acquire(op: u8) -> bool {
    matches!(
        op,
        opcode::ACQUIRE | opcode::ACQUIRE_PERMITS | opcode::ACQUIRE_ALL | opcode::ACQUIRE_POOL
    )
}

/// ACQUIRE_ALL or ACQUIRE_POOL (`op`) granted with `body` (ACQUIRE_ALL:
/// one token u64 per name, in the request's order; ACQUIRE_POOL: see
/// `crate::pool`). `deferred` sets the PUSH flag (the grant came after
/// waiting).
pub fn encode_granted_body(
    out: &mut Vec<u8>,
    op: u8,
    request_id: u32,
    body: &[u8],
    deferred: bool,
) {
    debug_assert!(op == opcode::ACQUIRE_ALL || op == opcode::ACQUIRE_POOL);
    encode_header(
        out,
        op,
        deferred_flags(deferred),
        Status::Ok,
        request_id,
        body_len_u32(body.len()),
    );
    out.extend_from_slice(body);
}

/// ACQUIRE (`op`: or ACQUIRE_PERMITS) granted: body token u64. `deferred`
/// sets the PUSH flag (the grant came after waiting).
pub fn encode_granted(out: &mut Vec<u8>, op: u8, request_id: u32, token: u64, deferred: bool) {
    debug_assert!(is_acquire(op));
    encode_header(
        out,
        op,
        deferred_flags(deferred),
        Status::Ok,
        request_id,
        body_len_u32(TOKEN_LEN),
    );
    out.extend_from_slice(&token.to_le_bytes());
}

/// Final non-granted outcome of an ACQUIRE (Busy, TimedOut, Cancelled, errors) — `deferred` sets PUSH.
/// The body is empty.
pub fn encode_acquire_outcome(
    out: &mut Vec<u8>,
    op: u8,
    request_id: u32,
    status: Status,
    deferred: bool,
) {
    assert!(
        status != Status::Ok && status != Status::Queued,
        "{status:?} is not a final non-granted acquire outcome"
    );
    debug_assert!(is_acquire(op));
    encode_header(out, op, deferred_flags(deferred), status, request_id, 0);
}

/// A final reply with a body: `OrderViolation` (the name it conflicts
/// with), or `Deadlock` (`deferred`: the cycle, UTF-8).
pub fn encode_reply(
    out: &mut Vec<u8>,
    op: u8,
    deferred: bool,
    status: Status,
    request_id: u32,
    body: &[u8],
) {
    let body_len = body_len_u32(body.len());
    encode_header(
        out,
        op,
        deferred_flags(deferred),
        status,
        request_id,
        body_len,
    );
    out.extend_from_slice(body);
}

/// INTERIM QUEUED for an acquire (`op`) with ACQ_NOTIFY_QUEUED.
pub fn encode_queued(out: &mut Vec<u8>, op: u8, request_id: u32) {
    debug_assert!(is_acquire(op));
    encode_header(
        out,
        op,
        flags::REPLY | flags::INTERIM,
        Status::Queued,
        request_id,
        0,
    );
}

/// Push LOCK_LOST (request_id 0, flags REPLY|PUSH): body token u64 then name.
pub fn encode_lock_lost(out: &mut Vec<u8>, token: u64, name: &[u8]) {
    assert!(
        (1..=NAME_LEN_MAX).contains(&name.len()),
        "lock name of {} bytes",
        name.len()
    );
    let body_len = body_len_u32(TOKEN_LEN + name.len());
    encode_header(
        out,
        opcode::LOCK_LOST,
        flags::REPLY | flags::PUSH,
        Status::Ok,
        0,
        body_len,
    );
    out.extend_from_slice(&token.to_le_bytes());
    out.extend_from_slice(name);
}

/// Push HELD: a lock the resumed session holds.
pub fn encode_held(out: &mut Vec<u8>, token: u64, mode: Mode, name: &[u8]) {
    assert!((1..=NAME_LEN_MAX).contains(&name.len()));
    let body_len = body_len_u32(TOKEN_LEN + 1 + name.len());
    encode_header(
        out,
        opcode::HELD,
        flags::REPLY | flags::PUSH,
        Status::Ok,
        0,
        body_len,
    );
    out.extend_from_slice(&token.to_le_bytes());
    out.push(mode as u8);
    out.extend_from_slice(name);
}

/// (token, mode, name) of a HELD push.
pub fn parse_held_body(body: &[u8]) -> Option<(u64, Mode, &[u8])> {
    let (token, rest) = body.split_first_chunk::<TOKEN_LEN>()?;
    let (&mode, name) = rest.split_first()?;
    if !(1..=NAME_LEN_MAX).contains(&name.len()) {
        return None;
    }
    Some((u64::from_le_bytes(*token), Mode::from_u8(mode)?, name))
}

/// Push SHUTDOWN / SESSION_TAKEN / HELD_END (empty body).
pub fn encode_push(out: &mut Vec<u8>, opcode: u8) {
    assert!(
        matches!(
            opcode,
            opcode::SHUTDOWN | opcode::SESSION_TAKEN | opcode::HELD_END
        ),
        "push opcode {opcode}"
    );
    encode_header(out, opcode, flags::REPLY | flags::PUSH, Status::Ok, 0, 0);
}

/// Push SIGNALLED (request_id 0, flags REPLY|PUSH): body name_len u16, then
/// the name, then the signal.
pub fn encode_signal(out: &mut Vec<u8>, name: &[u8], signal: &[u8]) {
    assert!(
        (1..=NAME_LEN_MAX).contains(&name.len()),
        "name length {}",
        name.len()
    );
    let body_len = 2 + name.len() + signal.len();
    let body_len = u32::try_from(body_len).expect("signal push fits a frame");
    encode_header(
        out,
        opcode::SIGNALLED,
        flags::REPLY | flags::PUSH,
        Status::Ok,
        0,
        body_len,
    );
    out.extend_from_slice(&len_u16(name.len()).get().to_le_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(signal);
}

/// Client side: (name, signal) of a SIGNALLED push body.
pub fn parse_signal_body(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = body.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_le_bytes(*len));
    if !(1..=NAME_LEN_MAX).contains(&len) || rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

/// A length that goes in a u16 field of a request body; longer is a programmer
/// error (the server would reject it anyway, but it must not be truncated).
fn len_u16(len: usize) -> U16 {
    U16::new(u16::try_from(len).expect("length fits in a u16 field"))
}

/// Client side: encode a request (flags 0, status 0).
///
/// Lengths are not checked against the server's limits (the server answers
/// BadName/BadBody); lengths that do not fit their wire field panic.
pub fn encode_request(out: &mut Vec<u8>, request_id: u32, req: &Request<'_>) {
    let request_flags = match *req {
        Request::Release { token, .. }
        | Request::Extend { token, .. }
        | Request::ForceRelease { token, .. }
            if token != 0 =>
        {
            flags::HOLD_TOKEN
        }
        _ => 0,
    };
    let header = |out: &mut Vec<u8>, body_len: usize| {
        encode_header(
            out,
            req.opcode(),
            request_flags,
            Status::Ok,
            request_id,
            body_len_u32(body_len),
        );
    };
    // The token field, present when not 0 (HOLD_TOKEN).
    let token_bytes = |token: u64| match token {
        0 => Vec::new(),
        token => token.to_le_bytes().to_vec(),
    };
    match *req {
        Request::Hello {
            grace_ms,
            password,
            client_name,
        } => {
            let fixed = HelloBody {
                grace_ms: U32::new(grace_ms),
                password_len: len_u16(password.len()),
                client_name_len: len_u16(client_name.len()),
            };
            header(
                out,
                size_of::<HelloBody>() + password.len() + client_name.len(),
            );
            out.extend_from_slice(fixed.as_bytes());
            out.extend_from_slice(password);
            out.extend_from_slice(client_name);
        }
        Request::Resume {
            session_id,
            secret,
            password,
        } => {
            let fixed = ResumeBody {
                session_id: U64::new(session_id),
                secret,
                password_len: len_u16(password.len()),
                reserved: U16::ZERO,
            };
            header(out, size_of::<ResumeBody>() + password.len());
            out.extend_from_slice(fixed.as_bytes());
            out.extend_from_slice(password);
        }
        Request::Acquire {
            name,
            mode,
            weight,
            capacity,
            wait_ms,
            lease_ms,
            notify_queued,
        } => {
            let fixed = AcquireBody {
                mode: mode as u8,
                acq_flags: if notify_queued { ACQ_NOTIFY_QUEUED } else { 0 },
                reserved: U16::ZERO,
                wait_ms: U32::new(wait_ms),
                lease_ms: U32::new(lease_ms),
            };
            if mode == Mode::Permits {
                let fixed = PermitsBody {
                    acquire: fixed,
                    weight: U32::new(weight),
                    capacity: U32::new(capacity),
                };
                header(out, size_of::<PermitsBody>() + name.len());
                out.extend_from_slice(fixed.as_bytes());
            } else {
                header(out, size_of::<AcquireBody>() + name.len());
                out.extend_from_slice(fixed.as_bytes());
            }
            out.extend_from_slice(name);
        }
        Request::AcquireAll {
            names,
            wait_ms,
            notify_queued,
        } => {
            let (count, bytes) = (names.count(), names.bytes());
            let fixed = AllBody::new(count, wait_ms, notify_queued);
            header(out, size_of::<AllBody>() + bytes.len());
            out.extend_from_slice(fixed.as_bytes());
            out.extend_from_slice(bytes);
        }
        Request::AcquirePool {
            spec,
            wait_ms,
            notify_queued,
        } => {
            let (count, bytes) = (spec.count(), spec.bytes());
            let fixed = AllBody::new(count, wait_ms, notify_queued);
            header(out, size_of::<AllBody>() + bytes.len());
            out.extend_from_slice(fixed.as_bytes());
            out.extend_from_slice(bytes);
        }
        Request::SetOrder(body) => {
            header(out, body.len());
            out.extend_from_slice(body);
        }
        Request::Report { top, tag } => {
            header(out, 4 + tag.len());
            out.extend_from_slice(&top.to_le_bytes());
            out.extend_from_slice(tag);
        }
        Request::SetCapacity { name, capacity } => {
            header(out, 4 + name.len());
            out.extend_from_slice(&capacity.to_le_bytes());
            out.extend_from_slice(name);
        }
        Request::Release { name, token } | Request::ForceRelease { name, token } => {
            let token = token_bytes(token);
            header(out, token.len() + name.len());
            out.extend_from_slice(&token);
            out.extend_from_slice(name);
        }
        Request::Extend {
            name,
            lease_ms,
            token,
        } => {
            let fixed = ExtendBody {
                lease_ms: U32::new(lease_ms),
            };
            let token = token_bytes(token);
            header(out, size_of::<ExtendBody>() + token.len() + name.len());
            out.extend_from_slice(fixed.as_bytes());
            out.extend_from_slice(&token);
            out.extend_from_slice(name);
        }
        Request::Cancel { target } => {
            let fixed = CancelBody {
                target_request_id: U32::new(target),
            };
            header(out, size_of::<CancelBody>());
            out.extend_from_slice(fixed.as_bytes());
        }
        Request::Ping | Request::Bye | Request::Stats | Request::ClusterStatus => header(out, 0),
        Request::ClusterChange(body) => {
            header(out, body.len());
            out.extend_from_slice(body);
        }
        Request::Signal { name, signal, op } => {
            header(out, 4 + name.len() + signal.len());
            out.extend_from_slice(&[op as u8, 0]);
            out.extend_from_slice(&len_u16(name.len()).get().to_le_bytes());
            out.extend_from_slice(name);
            out.extend_from_slice(signal);
        }
        Request::Inspect { name } => {
            header(out, name.len());
            out.extend_from_slice(name);
        }
        Request::List { pattern, limit } => {
            header(out, 4 + pattern.len());
            out.extend_from_slice(&limit.to_le_bytes());
            out.extend_from_slice(pattern);
        }
        Request::KillSession { session_id } => {
            header(out, 8);
            out.extend_from_slice(&session_id.to_le_bytes());
        }
    }
}

/// Starts an OK reply whose body is appended next; returns where the
/// frame starts, for [`end_reply`].
pub fn begin_reply(out: &mut Vec<u8>, opcode: u8, request_id: u32) -> usize {
    let start = out.len();
    encode_header(out, opcode, flags::REPLY, Status::Ok, request_id, 0);
    start
}

/// Writes the body length of the frame begun at `start`.
pub fn end_reply(out: &mut [u8], start: usize) {
    let body_len = body_len_u32(out.len() - start - HEADER_LEN);
    out[start + 12..start + 16].copy_from_slice(&body_len.to_le_bytes());
}

/// One holder in a lock record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderRecord<'a> {
    pub session: u64,
    pub token: u64,
    /// Permits held (a semaphore's record only).
    pub weight: u32,
    /// Grant time, ms since the Unix epoch.
    pub since_unix_ms: u64,
    pub client_name: &'a [u8],
}

/// Appends a lock record (INSPECT, LIST): name_len u16, mode u8, reserved
/// u8, waiters u32, holders u16, signals u16; the name; (a semaphore, mode
/// 2: capacity u32); per holder session u64, token u64, since_unix_ms u64,
/// client_name_len u16, client name (mode 2: weight u32); per signal len
/// u16, signal.
pub fn put_lock_record<'a>(
    out: &mut Vec<u8>,
    name: &[u8],
    (mode, capacity): (Mode, u32),
    waiters: u32,
    holders: &[HolderRecord<'a>],
    signals: &[&[u8]],
) {
    let permits = mode == Mode::Permits;
    out.extend_from_slice(&len_u16(name.len()).get().to_le_bytes());
    out.extend_from_slice(&[mode as u8, 0]);
    out.extend_from_slice(&waiters.to_le_bytes());
    out.extend_from_slice(&len_u16(holders.len()).get().to_le_bytes());
    out.extend_from_slice(&len_u16(signals.len()).get().to_le_bytes());
    out.extend_from_slice(name);
    if permits {
        out.extend_from_slice(&capacity.to_le_bytes());
    }
    for holder in holders {
        out.extend_from_slice(&holder.session.to_le_bytes());
        out.extend_from_slice(&holder.token.to_le_bytes());
        out.extend_from_slice(&holder.since_unix_ms.to_le_bytes());
        out.extend_from_slice(&len_u16(holder.client_name.len()).get().to_le_bytes());
        out.extend_from_slice(holder.client_name);
        if permits {
            out.extend_from_slice(&holder.weight.to_le_bytes());
        }
    }
    for signal in signals {
        out.extend_from_slice(&len_u16(signal.len()).get().to_le_bytes());
        out.extend_from_slice(signal);
    }
}

/// Client side: a lock record, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockRecord {
    pub name: Vec<u8>,
    pub mode: Mode,
    /// A semaphore's capacity; 0 for a lock.
    pub capacity: u32,
    pub waiters: u32,
    pub holders: Vec<Holder>,
    pub signals: Vec<Vec<u8>>,
}

/// Client side: one holder of a lock record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub session: u64,
    pub token: u64,
    /// Grant time, ms since the Unix epoch.
    pub since_unix_ms: u64,
    pub client_name: Vec<u8>,
    /// Permits held (a semaphore); 1 for a lock.
    pub weight: u32,
}

/// A cursor over a reply body.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn bytes16(&mut self) -> Option<Vec<u8>> {
        let len = usize::from(self.u16()?);
        self.take(len).map(<[u8]>::to_vec)
    }
}

fn parse_record(cursor: &mut Cursor<'_>) -> Option<LockRecord> {
    let name_len = usize::from(cursor.u16()?);
    let mode_and_reserved = cursor.take(2)?;
    let mode = Mode::from_u8(mode_and_reserved[0])?;
    let waiters = cursor.u32()?;
    let holders = cursor.u16()?;
    let signals = cursor.u16()?;
    let name = cursor.take(name_len)?.to_vec();
    let permits = mode == Mode::Permits;
    let capacity = if permits { cursor.u32()? } else { 0 };
    let holders = (0..holders)
        .map(|_| {
            Some(Holder {
                session: cursor.u64()?,
                token: cursor.u64()?,
                since_unix_ms: cursor.u64()?,
                client_name: cursor.bytes16()?,
                weight: if permits { cursor.u32()? } else { 1 },
            })
        })
        .collect::<Option<Vec<_>>>()?;
    let signals = (0..signals)
        .map(|_| cursor.bytes16())
        .collect::<Option<Vec<_>>>()?;
    Some(LockRecord {
        name,
        mode,
        capacity,
        waiters,
        holders,
        signals,
    })
}

/// One queued acquire in an INSPECT reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedRecord<'a> {
    pub session: u64,
    /// When it was queued, ms since the Unix epoch.
    pub since_unix_ms: u64,
    pub mode: Mode,
    /// Permits asked for (written for mode 2 only).
    pub weight: u32,
    pub client_name: &'a [u8],
}

/// Appends what follows the lock record in an INSPECT reply: the server's
/// clock (server_unix_ms u64, so ages are the server's), queue_count u32,
/// queue_flags u32 (bit 0: cut at `WAITERS_PER_INSPECT_MAX`), then per
/// waiter, first in line first: session u64, since_unix_ms u64, mode u8,
/// reserved u8, client_name_len u16, client name (mode 2: weight u32).
pub fn put_queue(out: &mut Vec<u8>, server_unix_ms: u64, queue: &[QueuedRecord<'_>], cut: bool) {
    out.extend_from_slice(&server_unix_ms.to_le_bytes());
    let count = u32::try_from(queue.len()).expect("queue listing is bounded");
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&u32::from(cut).to_le_bytes());
    for waiter in queue {
        out.extend_from_slice(&waiter.session.to_le_bytes());
        out.extend_from_slice(&waiter.since_unix_ms.to_le_bytes());
        out.extend_from_slice(&[waiter.mode as u8, 0]);
        out.extend_from_slice(&len_u16(waiter.client_name.len()).get().to_le_bytes());
        out.extend_from_slice(waiter.client_name);
        if waiter.mode == Mode::Permits {
            out.extend_from_slice(&waiter.weight.to_le_bytes());
        }
    }
}

/// Client side: one queued acquire of an INSPECT reply, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub session: u64,
    pub since_unix_ms: u64,
    pub mode: Mode,
    pub client_name: Vec<u8>,
    /// Permits asked for (a semaphore); 1 for a lock.
    pub weight: u32,
}

/// Client side: an INSPECT reply. Reads as its lock record (`Deref`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    pub record: LockRecord,
    /// The server's clock when it answered (ages are against it).
    pub server_unix_ms: u64,
    /// Who waits, first in line first.
    pub queue: Vec<Waiting>,
    /// The queue was longer than listed.
    pub queue_cut: bool,
}

impl std::ops::Deref for Inspection {
    type Target = LockRecord;
    fn deref(&self) -> &LockRecord {
        &self.record
    }
}

/// Client side: the body of an INSPECT reply.
pub fn parse_inspect_body(body: &[u8]) -> Option<Inspection> {
    let mut cursor = Cursor(body);
    let record = parse_record(&mut cursor)?;
    let server_unix_ms = cursor.u64()?;
    let count = cursor.u32()?;
    let queue_cut = cursor.u32()? & 1 != 0;
    let queue = (0..count)
        .map(|_| {
            let session = cursor.u64()?;
            let since_unix_ms = cursor.u64()?;
            let mode = Mode::from_u8(cursor.take(2)?[0])?;
            let client_name = cursor.bytes16()?;
            let weight = match mode {
                Mode::Permits => cursor.u32()?,
                Mode::Exclusive | Mode::Shared => 1,
            };
            Some(Waiting {
                session,
                since_unix_ms,
                mode,
                client_name,
                weight,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    cursor.0.is_empty().then_some(Inspection {
        record,
        server_unix_ms,
        queue,
        queue_cut,
    })
}

/// Client side: a LIST reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub records: Vec<LockRecord>,
    /// The list was cut short (limit, 10,000 records or 1 MiB).
    pub truncated: bool,
    /// The server's clock when it answered.
    pub server_unix_ms: u64,
}

/// Client side: the body of a LIST reply.
pub fn parse_list_body(body: &[u8]) -> Option<Listing> {
    let mut cursor = Cursor(body);
    let count = cursor.u32()?;
    let truncated = cursor.u32()? & 1 != 0;
    let server_unix_ms = cursor.u64()?;
    let records = (0..count)
        .map(|_| parse_record(&mut cursor))
        .collect::<Option<Vec<_>>>()?;
    cursor.0.is_empty().then_some(Listing {
        records,
        truncated,
        server_unix_ms,
    })
}

/// The STATS reply body: these u64 in this order, then version_len u16 and
/// the server's version (UTF-8).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatsReply {
    pub locks: u64,
    pub waiters: u64,
    pub sessions_attached: u64,
    pub sessions_detached: u64,
    pub connections: u64,
    /// Since this process started.
    pub uptime_ms: u64,
    pub server_unix_ms: u64,
    /// Totals since this process started:
    pub acquisitions_total: u64,
    pub grants_total: u64,
    pub releases_total: u64,
    pub timeouts_total: u64,
    pub busy_total: u64,
    pub locks_lost_total: u64,
    pub connections_total: u64,
    pub version: String,
}

impl StatsReply {
    fn numbers(&self) -> [u64; 14] {
        [
            self.locks,
            self.waiters,
            self.sessions_attached,
            self.sessions_detached,
            self.connections,
            self.uptime_ms,
            self.server_unix_ms,
            self.acquisitions_total,
            self.grants_total,
            self.releases_total,
            self.timeouts_total,
            self.busy_total,
            self.locks_lost_total,
            self.connections_total,
        ]
    }

    /// Appends the body.
    pub fn put(&self, out: &mut Vec<u8>) {
        for value in self.numbers() {
            out.extend_from_slice(&value.to_le_bytes());
        }
        out.extend_from_slice(&len_u16(self.version.len()).get().to_le_bytes());
        out.extend_from_slice(self.version.as_bytes());
    }
}

/// One name of a REPORT reply: name_len u16, name, held u32, waiting u32,
/// acquires u64, grants u64, busy u64, timeouts u64, then the wait and the
/// hold times in ms, p50, p99 and max, u32 each (bucket upper bounds:
/// within a factor of two; 0 = under 1 ms). Counts decay by half every
/// minute; `held` and `waiting` are as of the answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReportRow {
    pub name: Vec<u8>,
    pub held: u32,
    pub waiting: u32,
    pub acquires: u64,
    pub grants: u64,
    pub busy: u64,
    pub timeouts: u64,
    /// p50, p99, max.
    pub wait_ms: [u32; 3],
    pub hold_ms: [u32; 3],
}

/// Fixed bytes of a report row besides its name.
pub const REPORT_ROW_FIXED_LEN: usize = 2 + 4 + 4 + 4 * 8 + 6 * 4;

impl ReportRow {
    /// Appends the row.
    pub fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&len_u16(self.name.len()).get().to_le_bytes());
        out.extend_from_slice(&self.name);
        out.extend_from_slice(&self.held.to_le_bytes());
        out.extend_from_slice(&self.waiting.to_le_bytes());
        for count in [self.acquires, self.grants, self.busy, self.timeouts] {
            out.extend_from_slice(&count.to_le_bytes());
        }
        for ms in self.wait_ms.iter().chain(&self.hold_ms) {
            out.extend_from_slice(&ms.to_le_bytes());
        }
    }
}

/// Client side: a REPORT reply — count u32, reserved u32, server_unix_ms
/// u64, then `count` rows, busiest first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    pub server_unix_ms: u64,
    pub rows: Vec<ReportRow>,
}

/// Client side: the body of a REPORT reply.
pub fn parse_report_body(body: &[u8]) -> Option<Report> {
    let mut cursor = Cursor(body);
    let count = cursor.u32()?;
    cursor.u32()?;
    let server_unix_ms = cursor.u64()?;
    let rows = (0..count)
        .map(|_| {
            let name = cursor.bytes16()?;
            let held = cursor.u32()?;
            let waiting = cursor.u32()?;
            let (acquires, grants) = (cursor.u64()?, cursor.u64()?);
            let (busy, timeouts) = (cursor.u64()?, cursor.u64()?);
            let mut times = [0u32; 6];
            for time in &mut times {
                *time = cursor.u32()?;
            }
            Some(ReportRow {
                name,
                held,
                waiting,
                acquires,
                grants,
                busy,
                timeouts,
                wait_ms: [times[0], times[1], times[2]],
                hold_ms: [times[3], times[4], times[5]],
            })
        })
        .collect::<Option<Vec<_>>>()?;
    cursor.0.is_empty().then_some(Report {
        server_unix_ms,
        rows,
    })
}

/// The CLUSTER_STATUS reply body: node u64 (the answering leader's id; 0
/// on a single server), term u64, commit u64, applied u64, members u16,
/// then per member: id u64, matched u64 (log index known stored there),
/// state u8 (0 probe, 1 replicate, 2 snapshot; the leader's own: 1),
/// active u8 (heard from within an election timeout), client_addr_len u16,
/// client address (UTF-8, empty if unknown).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterReply {
    pub node: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub members: Vec<ClusterMember>,
}

/// One member in a [`ClusterReply`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterMember {
    pub id: u64,
    pub matched: u64,
    pub state: u8,
    pub active: bool,
    pub client_addr: String,
}

impl ClusterReply {
    /// Appends the body.
    pub fn put(&self, out: &mut Vec<u8>) {
        for value in [self.node, self.term, self.commit, self.applied] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        out.extend_from_slice(&len_u16(self.members.len()).get().to_le_bytes());
        for member in &self.members {
            out.extend_from_slice(&member.id.to_le_bytes());
            out.extend_from_slice(&member.matched.to_le_bytes());
            out.push(member.state);
            out.push(u8::from(member.active));
            out.extend_from_slice(&len_u16(member.client_addr.len()).get().to_le_bytes());
            out.extend_from_slice(member.client_addr.as_bytes());
        }
    }
}

/// Most member changes in one CLUSTER_CHANGE.
pub const MEMBER_CHANGES_MAX: usize = 8;

/// A CLUSTER_CHANGE body: kind u8 — 0: member changes, then count u16 and
/// per change op u8 (0 add a voter, 1 remove), id u64, addr_len u16 and
/// the new member's peer address (UTF-8 `HOST:PORT`; empty for a removal);
/// several changes go through raft's joint consensus — 1: hand leadership
/// to member id u64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterChange {
    Members(Vec<MemberChange>),
    Transfer(u64),
}

/// One change of a [`ClusterChange::Members`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberChange {
    Add { id: u64, peer_addr: String },
    Remove { id: u64 },
}

impl ClusterChange {
    pub fn put(&self, out: &mut Vec<u8>) {
        match self {
            ClusterChange::Members(changes) => {
                out.push(0);
                out.extend_from_slice(&len_u16(changes.len()).get().to_le_bytes());
                for change in changes {
                    let (op, id, addr) = match change {
                        MemberChange::Add { id, peer_addr } => (0, id, peer_addr.as_str()),
                        MemberChange::Remove { id } => (1, id, ""),
                    };
                    out.push(op);
                    out.extend_from_slice(&id.to_le_bytes());
                    out.extend_from_slice(&len_u16(addr.len()).get().to_le_bytes());
                    out.extend_from_slice(addr.as_bytes());
                }
            }
            ClusterChange::Transfer(id) => {
                out.push(1);
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
    }

    /// The body, if it is well formed (ids ≥ 1, 1..=MEMBER_CHANGES_MAX
    /// changes, an address of at most 255 bytes for each addition).
    pub fn parse(body: &[u8]) -> Option<ClusterChange> {
        let mut cursor = Cursor(body);
        let change = match cursor.take(1)?[0] {
            0 => {
                let count = cursor.u16()? as usize;
                if count == 0 || count > MEMBER_CHANGES_MAX {
                    return None;
                }
                let mut changes = Vec::with_capacity(count);
                for _ in 0..count {
                    let op = cursor.take(1)?[0];
                    let id = cursor.u64()?;
                    let addr = cursor.bytes16()?;
                    if id == 0 || addr.len() > 255 {
                        return None;
                    }
                    changes.push(match op {
                        0 if !addr.is_empty() => MemberChange::Add {
                            id,
                            peer_addr: String::from_utf8(addr).ok()?,
                        },
                        1 if addr.is_empty() => MemberChange::Remove { id },
                        _ => return None,
                    });
                }
                ClusterChange::Members(changes)
            }
            1 => ClusterChange::Transfer(cursor.u64().filter(|&id| id != 0)?),
            _ => return None,
        };
        cursor.0.is_empty().then_some(change)
    }
}

/// Client side: the body of a CLUSTER_STATUS reply.
pub fn parse_cluster_body(body: &[u8]) -> Option<ClusterReply> {
    let mut cursor = Cursor(body);
    let mut reply = ClusterReply {
        node: cursor.u64()?,
        term: cursor.u64()?,
        commit: cursor.u64()?,
        applied: cursor.u64()?,
        members: Vec::new(),
    };
    for _ in 0..cursor.u16()? {
        let id = cursor.u64()?;
        let matched = cursor.u64()?;
        let state = cursor.take(1)?[0];
        let active = cursor.take(1)?[0] != 0;
        let client_addr = String::from_utf8(cursor.bytes16()?).ok()?;
        reply.members.push(ClusterMember {
            id,
            matched,
            state,
            active,
            client_addr,
        });
    }
    cursor.0.is_empty().then_some(reply)
}

/// Client side: the body of a STATS reply.
pub fn parse_stats_body(body: &[u8]) -> Option<StatsReply> {
    let mut cursor = Cursor(body);
    let mut n = [0u64; 14];
    for value in &mut n {
        *value = cursor.u64()?;
    }
    let version = String::from_utf8(cursor.bytes16()?).ok()?;
    let [locks, waiters, sessions_attached, sessions_detached, connections, uptime_ms, server_unix_ms, acquisitions_total, grants_total, releases_total, timeouts_total, busy_total, locks_lost_total, connections_total] =
        n;
    cursor.0.is_empty().then_some(StatsReply {
        locks,
        waiters,
        sessions_attached,
        sessions_detached,
        connections,
        uptime_ms,
        server_unix_ms,
        acquisitions_total,
        grants_total,
        releases_total,
        timeouts_total,
        busy_total,
        locks_lost_total,
        connections_total,
        version,
    })
}

/// Client side: a decoded server frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply<'a> {
    pub opcode: u8,
    /// Bits of [`flags`]; REPLY is always set.
    pub flags: u16,
    pub status: Status,
    /// The request this answers; 0 for pushes not tied to a request.
    pub request_id: u32,
    /// Parse with [`parse_session_body`], [`parse_token_body`],
    /// [`parse_lock_lost_body`]; error replies carry a UTF-8 message.
    pub body: &'a [u8],
}

/// Outcome of looking at the front of a client's read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodedReply<'a> {
    /// Not a whole frame yet; read more. Not an error.
    Incomplete,
    /// One whole frame of `consumed` bytes.
    Frame { consumed: usize, reply: Reply<'a> },
}

/// The server's stream cannot be understood: the client must close the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyError {
    BadMagic,
    BadVersion(u8),
    BadStatus(u16),
    FrameTooLarge { body_len: u32 },
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::BadMagic => write!(f, "bad magic: not a livelock v{VERSION} frame"),
            ReplyError::BadVersion(version) => {
                write!(f, "server frame has protocol version {version}")
            }
            ReplyError::BadStatus(code) => write!(f, "server frame has unknown status {code}"),
            ReplyError::FrameTooLarge { body_len } => {
                write!(f, "frame body of {body_len} bytes exceeds {FRAME_BODY_MAX}")
            }
        }
    }
}

impl std::error::Error for ReplyError {}

/// Decodes the frame at the front of `buf`, a client's read buffer. The header
/// is checked as soon as it is complete, before the body arrives.
pub fn decode_reply(buf: &[u8]) -> Result<DecodedReply<'_>, ReplyError> {
    if !magic_ok(buf) {
        return Err(ReplyError::BadMagic);
    }
    let Some(header) = header_of(buf) else {
        return Ok(DecodedReply::Incomplete);
    };
    if header.version != VERSION {
        return Err(ReplyError::BadVersion(header.version));
    }
    let status =
        Status::from_u16(header.status.get()).ok_or(ReplyError::BadStatus(header.status.get()))?;
    let body_len = header.body_len.get();
    // Requests are bounded by FRAME_BODY_MAX, but LIST/INSPECT replies
    // carry up to REPLY_BODY_MAX bytes of lock records, and a RESUME reply
    // an id for each of up to 1024 requests in flight.
    let body_max = match header.opcode {
        opcode::LIST | opcode::INSPECT => REPLY_BODY_MAX,
        opcode::RESUME => RESUME_REPLY_BODY_MAX,
        _ => FRAME_BODY_MAX,
    };
    if body_len as usize > body_max {
        return Err(ReplyError::FrameTooLarge { body_len });
    }
    let consumed = HEADER_LEN + body_len as usize;
    let Some(body) = buf.get(HEADER_LEN..consumed) else {
        return Ok(DecodedReply::Incomplete);
    };
    let reply = Reply {
        opcode: header.opcode,
        flags: header.flags.get(),
        status,
        request_id: header.request_id.get(),
        body,
    };
    Ok(DecodedReply::Frame { consumed, reply })
}

/// Body of a successful HELLO/RESUME reply: `(session_id, secret, grace_ms)`.
pub fn parse_session_body(body: &[u8]) -> Option<(u64, [u8; SECRET_LEN], u32)> {
    let (body, _) = SessionBody::ref_from_prefix(body).ok()?;
    Some((body.session_id.get(), body.secret, body.grace_ms.get()))
}

/// The ids of the requests still in flight, from a RESUME reply's body.
pub fn parse_resumed_in_flight(body: &[u8]) -> Option<Vec<u32>> {
    let rest = body.get(size_of::<SessionBody>()..)?;
    let (count, ids) = rest.split_first_chunk::<4>()?;
    let count = u32::from_le_bytes(*count) as usize;
    if ids.len() != count.checked_mul(4)? {
        return None;
    }
    Some(
        ids.chunks_exact(4)
            .map(|id| u32::from_le_bytes(id.try_into().expect("4 bytes")))
            .collect(),
    )
}

/// Body of an ACQUIRE granted reply: the fencing token.
pub fn parse_token_body(body: &[u8]) -> Option<u64> {
    let token: [u8; TOKEN_LEN] = body.try_into().ok()?;
    Some(u64::from_le_bytes(token))
}

/// Body of a granted ACQUIRE_ALL: `count` tokens.
pub fn parse_tokens_body(body: &[u8], count: usize) -> Option<Vec<u64>> {
    if body.len() != count * TOKEN_LEN {
        return None;
    }
    let tokens = body.chunks_exact(TOKEN_LEN);
    Some(
        tokens
            .map(|t| u64::from_le_bytes(t.try_into().expect("exact chunks")))
            .collect(),
    )
}

/// Body of a LOCK_LOST push: `(token, name)`.
pub fn parse_lock_lost_body(body: &[u8]) -> Option<(u64, &[u8])> {
    let (token, name) = body.split_first_chunk::<TOKEN_LEN>()?;
    if !(1..=NAME_LEN_MAX).contains(&name.len()) {
        return None;
    }
    Some((u64::from_le_bytes(*token), name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn encoded(request_id: u32, req: &Request<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        encode_request(&mut out, request_id, req);
        out
    }

    /// Decodes `buf`, expecting exactly one whole frame.
    fn frame(buf: &[u8]) -> (u8, u32, Result<Request<'_>, Status>) {
        match decode_request(buf) {
            Ok(Decoded::Frame {
                consumed,
                opcode,
                request_id,
                result,
            }) => {
                assert_eq!(consumed, buf.len());
                (opcode, request_id, result)
            }
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    fn result_of(buf: &[u8]) -> Result<Request<'_>, Status> {
        frame(buf).2
    }

    /// A raw frame with the given header fields and body.
    fn raw(version: u8, op: u8, flags: u16, status: u16, request_id: u32, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.push(version);
        out.push(op);
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&status.to_le_bytes());
        out.extend_from_slice(&request_id.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    fn request(op: u8, body: &[u8]) -> Vec<u8> {
        raw(VERSION, op, 0, 0, 9, body)
    }

    fn acquire_body(mode: u8, acq_flags: u8, reserved: u16, name: &[u8]) -> Vec<u8> {
        let mut body = vec![mode, acq_flags];
        body.extend_from_slice(&reserved.to_le_bytes());
        body.extend_from_slice(&100u32.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(name);
        body
    }

    fn all_requests() -> Vec<Request<'static>> {
        vec![
            Request::Hello {
                grace_ms: 5000,
                password: b"hunter2",
                client_name: b"worker-1",
            },
            Request::Hello {
                grace_ms: 0,
                password: b"",
                client_name: b"",
            },
            Request::Resume {
                session_id: 0x0102_0304_0506_0708,
                secret: [0xAB; SECRET_LEN],
                password: b"pw",
            },
            Request::Resume {
                session_id: u64::MAX,
                secret: [0; SECRET_LEN],
                password: b"",
            },
            Request::Acquire {
                name: b"report-42",
                mode: Mode::Exclusive,
                weight: 1,
                capacity: 0,
                wait_ms: 5000,
                lease_ms: 0,
                notify_queued: true,
            },
            Request::Acquire {
                name: b"x",
                mode: Mode::Shared,
                weight: 1,
                capacity: 0,
                wait_ms: WAIT_FOREVER,
                lease_ms: 30_000,
                notify_queued: false,
            },
            Request::Acquire {
                name: b"gpus",
                mode: Mode::Permits,
                weight: 3,
                capacity: 8,
                wait_ms: 0,
                lease_ms: 10,
                notify_queued: true,
            },
            Request::SetCapacity {
                name: b"gpus",
                capacity: u32::MAX,
            },
            Request::SetOrder(&[1, 0, 0, 0]),
            Request::SetOrder(&[2, 0, 1, 0, 7, 0, 0, 0, 1, 0, b'x']),
            Request::Report { top: 20, tag: b"" },
            Request::Release {
                name: b"report-42",
                token: 0,
            },
            Request::Release {
                name: b"report-42",
                token: 77,
            },
            Request::Extend {
                name: b"report-42",
                lease_ms: 1,
                token: 0,
            },
            Request::Extend {
                name: b"report-42",
                lease_ms: 1,
                token: u64::MAX,
            },
            Request::Cancel {
                target: 0xDEAD_BEEF,
            },
            Request::Ping,
            Request::Bye,
            Request::ForceRelease {
                name: b"stuck",
                token: 0,
            },
            Request::ForceRelease {
                name: b"stuck",
                token: 9,
            },
            Request::KillSession {
                session_id: u64::MAX,
            },
        ]
    }

    /// Operator requests: a KILL_SESSION body is exactly a session id; a
    /// FORCE_RELEASE names a lock and, with HOLD_TOKEN, a non-zero token.
    #[test]
    fn operator_requests_refuse_bad_bodies() {
        let mut buf = Vec::new();
        encode_header(&mut buf, opcode::KILL_SESSION, 0, Status::Ok, 1, 7);
        buf.extend_from_slice(&[0; 7]);
        assert_eq!(frame(&buf).2, Err(Status::BadBody));
        let mut buf = Vec::new();
        encode_header(&mut buf, opcode::FORCE_RELEASE, 0, Status::Ok, 1, 0);
        assert_eq!(frame(&buf).2, Err(Status::BadName));
        let mut buf = Vec::new();
        encode_header(
            &mut buf,
            opcode::FORCE_RELEASE,
            flags::HOLD_TOKEN,
            Status::Ok,
            1,
            9,
        );
        buf.extend_from_slice(&[0; 8]);
        buf.push(b'x');
        assert_eq!(
            frame(&buf).2,
            Err(Status::BadBody),
            "token 0 with HOLD_TOKEN"
        );
    }

    /// The INSPECT example in docs/PROTOCOL.md is what the server writes.
    #[test]
    fn the_documented_inspect_example_is_exact() {
        let doc = include_str!("../../docs/PROTOCOL.md");
        let at = doc.find("Example: a lock `q`").expect("the example");
        let block = &doc[at..];
        let block = &block[block.find("```text").expect("its bytes") + 7..];
        let block = &block[..block.find("```").expect("its end")];
        let documented: Vec<u8> = block
            .lines()
            .flat_map(|line| line.split("  ").next().unwrap_or("").split_whitespace())
            .map(|byte| u8::from_str_radix(byte, 16).expect("a hex byte"))
            .collect();
        let holder = HolderRecord {
            session: 5,
            token: 6,
            weight: 1,
            since_unix_ms: 7,
            client_name: b"h",
        };
        let waiter = QueuedRecord {
            session: 8,
            since_unix_ms: 9,
            mode: Mode::Exclusive,
            weight: 1,
            client_name: b"w",
        };
        let mut body = Vec::new();
        put_lock_record(&mut body, b"q", (Mode::Exclusive, 0), 1, &[holder], &[]);
        put_queue(&mut body, 10, &[waiter], false);
        assert_eq!(documented, body);
    }

    /// The replies that carry the server's clock and the queue parse back.
    #[test]
    fn inspect_list_and_stats_bodies_parse_back() {
        let holder = HolderRecord {
            session: 5,
            token: 6,
            weight: 1,
            since_unix_ms: 7,
            client_name: b"holder",
        };
        let mut body = Vec::new();
        put_lock_record(&mut body, b"lock", (Mode::Exclusive, 0), 1, &[holder], &[]);
        let waiter = QueuedRecord {
            session: 8,
            since_unix_ms: 9,
            mode: Mode::Shared,
            weight: 1,
            client_name: b"waiter",
        };
        put_queue(&mut body, 10, &[waiter], true);
        let found = parse_inspect_body(&body).expect("an INSPECT body");
        assert_eq!(found.name, b"lock");
        assert_eq!(found.server_unix_ms, 10);
        assert!(found.queue_cut);
        assert_eq!(
            found.queue,
            vec![Waiting {
                session: 8,
                since_unix_ms: 9,
                mode: Mode::Shared,
                weight: 1,
                client_name: b"waiter".to_vec(),
            }]
        );
        assert!(parse_inspect_body(&body[..body.len() - 1]).is_none());
        let stats = StatsReply {
            locks: 1,
            uptime_ms: 2,
            connections_total: 3,
            version: "9.9.9".into(),
            ..StatsReply::default()
        };
        let mut body = Vec::new();
        stats.put(&mut body);
        assert_eq!(parse_stats_body(&body), Some(stats));
        assert!(parse_stats_body(&body[..body.len() - 1]).is_none());
    }

    #[test]
    fn every_request_round_trips() {
        for (i, req) in all_requests().iter().enumerate() {
            let request_id = 1000 + i as u32;
            let buf = encoded(request_id, req);
            let (op, id, result) = frame(&buf);
            assert_eq!(op, req.opcode());
            assert_eq!(id, request_id);
            assert_eq!(result, Ok(*req), "{req:?}");
        }
    }

    #[test]
    fn truncated_frames_are_incomplete_at_every_length() {
        for req in all_requests() {
            let buf = encoded(7, &req);
            for len in 0..buf.len() {
                assert_eq!(
                    decode_request(&buf[..len]),
                    Ok(Decoded::Incomplete),
                    "{req:?} cut at {len}"
                );
            }
        }
    }

    #[test]
    fn two_frames_back_to_back() {
        let mut buf = encoded(
            1,
            &Request::Acquire {
                name: b"a",
                mode: Mode::Shared,
                weight: 1,
                capacity: 0,
                wait_ms: 0,
                lease_ms: 0,
                notify_queued: false,
            },
        );
        let first_len = buf.len();
        encode_request(
            &mut buf,
            2,
            &Request::Release {
                name: b"a",
                token: 0,
            },
        );
        // And the start of a third.
        buf.extend_from_slice(&encoded(3, &Request::Ping)[..5]);

        let Ok(Decoded::Frame {
            consumed,
            request_id: 1,
            result: Ok(Request::Acquire { .. }),
            ..
        }) = decode_request(&buf)
        else {
            panic!("first frame")
        };
        assert_eq!(consumed, first_len);
        let rest = &buf[consumed..];
        let Ok(Decoded::Frame {
            consumed,
            request_id: 2,
            result:
                Ok(Request::Release {
                    name: b"a",
                    token: 0,
                }),
            ..
        }) = decode_request(rest)
        else {
            panic!("second frame")
        };
        assert_eq!(decode_request(&rest[consumed..]), Ok(Decoded::Incomplete));
    }

    #[test]
    fn bad_magic_is_fatal_from_the_first_wrong_byte() {
        assert_eq!(decode_request(&[0x00]), Err(Fatal::BadMagic));
        assert_eq!(
            decode_request(b"*1\r\n$4\r\nPING\r\n"),
            Err(Fatal::BadMagic)
        );
        assert_eq!(decode_request(&[MAGIC_BYTE0]), Ok(Decoded::Incomplete));
        assert_eq!(decode_request(&[MAGIC_BYTE0, 0x00]), Err(Fatal::BadMagic));
        // Byte-swapped magic.
        assert_eq!(decode_request(&[0x4C, 0xF1]), Err(Fatal::BadMagic));
        let mut buf = encoded(1, &Request::Ping);
        buf[1] ^= 1;
        assert_eq!(decode_request(&buf), Err(Fatal::BadMagic));
        assert_eq!(decode_reply(&buf), Err(ReplyError::BadMagic));
        assert_eq!(decode_reply(&[0x00]), Err(ReplyError::BadMagic));
    }

    #[test]
    fn frame_too_large_is_fatal_once_the_header_is_complete() {
        let mut header = Vec::new();
        encode_header(
            &mut header,
            opcode::RELEASE,
            0,
            Status::Ok,
            1,
            FRAME_BODY_MAX as u32 + 1,
        );
        assert_eq!(
            decode_request(&header[..HEADER_LEN - 1]),
            Ok(Decoded::Incomplete)
        );
        assert_eq!(
            decode_request(&header),
            Err(Fatal::FrameTooLarge {
                body_len: FRAME_BODY_MAX as u32 + 1
            })
        );

        // The largest allowed body is delimited (and then rejected per frame).
        let buf = request(opcode::RELEASE, &vec![b'n'; FRAME_BODY_MAX]);
        assert_eq!(result_of(&buf), Err(Status::BadName));
    }

    #[test]
    fn bad_version_is_a_delimited_error() {
        let buf = raw(2, opcode::PING, 0, 0, 5, b"abc");
        assert_eq!(
            decode_request(&buf),
            Ok(Decoded::Frame {
                consumed: buf.len(),
                opcode: opcode::PING,
                request_id: 5,
                result: Err(Status::BadVersion)
            })
        );
    }

    #[test]
    fn signal_push_bytes() {
        let mut out = Vec::new();
        encode_signal(&mut out, b"x", b"go");
        assert_eq!(
            out,
            [
                0xF1, 0x4C, 0x01, 0x43, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x05, 0x00,
                0x00, 0x00, 0x01, 0x00, b'x', b'g', b'o'
            ]
        );
        let DecodedReply::Frame { reply, .. } = decode_reply(&out).unwrap() else {
            panic!("whole frame")
        };
        assert_eq!(reply.opcode, opcode::SIGNALLED);
        assert_eq!(parse_signal_body(reply.body), Some((&b"x"[..], &b"go"[..])));
    }

    /// ACQUIRE_ALL bodies: a good one round-trips; anything malformed is
    /// BadBody (never a panic), whatever part is wrong.
    #[test]
    fn acquire_all_bodies_are_checked() {
        let body = |flags: u8, reserved: u8, count: u16, entries: &[u8]| {
            let mut b = vec![flags, reserved];
            b.extend_from_slice(&count.to_le_bytes());
            b.extend_from_slice(&250u32.to_le_bytes());
            b.extend_from_slice(entries);
            b
        };
        let entry = |mode: u8, reserved: u8, name: &[u8]| {
            let mut e = vec![mode, reserved];
            e.extend_from_slice(&(name.len() as u16).to_le_bytes());
            e.extend_from_slice(name);
            e
        };
        let two = [entry(0, 0, b"a"), entry(1, 0, b"b")].concat();
        match result_of(&request(opcode::ACQUIRE_ALL, &body(1, 0, 2, &two))) {
            Ok(Request::AcquireAll {
                names,
                wait_ms: 250,
                notify_queued: true,
            }) => {
                let got: Vec<(Mode, &[u8])> = names.iter().collect();
                assert_eq!(got, [(Mode::Exclusive, &b"a"[..]), (Mode::Shared, b"b")]);
            }
            other => panic!("{other:?}"),
        }
        let many: Vec<u8> = (0..=crate::limits::MULTI_NAMES_MAX as u8)
            .flat_map(|i| entry(0, 0, &[b'n', i]))
            .collect();
        for (what, bad) in [
            ("no names", body(0, 0, 0, &[])),
            ("too many", body(0, 0, 33, &many)),
            ("count too high", body(0, 0, 3, &two)),
            ("count too low", body(0, 0, 1, &two)),
            (
                "a name twice",
                body(0, 0, 2, &[entry(0, 0, b"a"), entry(1, 0, b"a")].concat()),
            ),
            ("bad mode", body(0, 0, 1, &entry(2, 0, b"a"))),
            ("entry reserved", body(0, 0, 1, &entry(0, 1, b"a"))),
            ("empty name", body(0, 0, 1, &entry(0, 0, b""))),
            ("unknown flag", body(2, 0, 2, &two)),
            ("reserved", body(0, 1, 2, &two)),
            ("short header", vec![0, 0, 1]),
            ("cut name", body(0, 0, 1, &entry(0, 0, b"abc")[..5])),
        ] {
            assert_eq!(
                result_of(&request(opcode::ACQUIRE_ALL, &bad)),
                Err(Status::BadBody),
                "{what}"
            );
        }
    }

    #[test]
    fn unknown_and_push_opcodes_are_rejected() {
        for op in [
            0,
            23,
            0x3F,
            opcode::LOCK_LOST,
            opcode::SHUTDOWN,
            opcode::SESSION_TAKEN,
            opcode::SIGNALLED,
            0xFF,
        ] {
            assert_eq!(
                frame(&request(op, b"")),
                (op, 9, Err(Status::UnknownOpcode)),
                "opcode {op}"
            );
        }
    }

    #[test]
    fn requests_carry_no_flags_or_status() {
        for f in [flags::REPLY, flags::PUSH, flags::INTERIM, 0x8000] {
            assert_eq!(
                result_of(&raw(VERSION, opcode::PING, f, 0, 1, b"")),
                Err(Status::BadBody)
            );
        }
        assert_eq!(
            result_of(&raw(VERSION, opcode::PING, 0, 1, 1, b"")),
            Err(Status::BadBody)
        );
    }

    #[test]
    fn names_are_one_to_name_len_max_bytes() {
        let max = vec![b'n'; NAME_LEN_MAX];
        let over = vec![b'n'; NAME_LEN_MAX + 1];
        for (name, want_ok) in [
            (&b""[..], false),
            (&b"\x00\xff"[..], true),
            (&max[..], true),
            (&over[..], false),
        ] {
            let frames = [
                request(opcode::ACQUIRE, &acquire_body(0, 0, 0, name)),
                request(opcode::RELEASE, name),
                request(opcode::EXTEND, &[&10u32.to_le_bytes()[..], name].concat()),
            ];
            for result in frames.iter().map(|buf| result_of(buf)) {
                match result {
                    Ok(
                        Request::Acquire { name: got, .. }
                        | Request::Release { name: got, .. }
                        | Request::Extend { name: got, .. },
                    ) => {
                        assert!(want_ok, "{}-byte name accepted", name.len());
                        assert_eq!(got, name);
                    }
                    other => {
                        assert!(!want_ok, "{}-byte name: {other:?}", name.len());
                        assert_eq!(other, Err(Status::BadName));
                    }
                }
            }
        }
    }

    #[test]
    fn hello_lengths_must_add_up() {
        let hello = |password_len: u16, client_name_len: u16, rest: &[u8]| {
            let mut body = 0u32.to_le_bytes().to_vec();
            body.extend_from_slice(&password_len.to_le_bytes());
            body.extend_from_slice(&client_name_len.to_le_bytes());
            body.extend_from_slice(rest);
            result_of(&request(opcode::HELLO, &body)).map(|_| ())
        };
        assert!(hello(2, 3, b"pwabc").is_ok());
        assert_eq!(hello(2, 3, b"pwab"), Err(Status::BadBody));
        assert_eq!(hello(2, 3, b"pwabcd"), Err(Status::BadBody));
        assert_eq!(hello(0, 0, b"x"), Err(Status::BadBody));
        assert_eq!(hello(u16::MAX, 0, b""), Err(Status::BadBody));
        let long = vec![b'p'; PASSWORD_LEN_MAX + 1];
        assert_eq!(hello(long.len() as u16, 0, &long), Err(Status::BadBody));
        assert_eq!(hello(0, long.len() as u16, &long), Err(Status::BadBody));
        let max = vec![b'p'; PASSWORD_LEN_MAX + CLIENT_NAME_LEN_MAX];
        assert!(hello(PASSWORD_LEN_MAX as u16, CLIENT_NAME_LEN_MAX as u16, &max).is_ok());
        // Shorter than the fixed part.
        assert_eq!(
            result_of(&request(opcode::HELLO, &[0; 7])),
            Err(Status::BadBody)
        );
    }

    #[test]
    fn resume_lengths_and_reserved() {
        let good = encoded(
            1,
            &Request::Resume {
                session_id: 1,
                secret: [1; SECRET_LEN],
                password: b"pw",
            },
        );
        assert!(result_of(&good).is_ok());
        let body = &good[HEADER_LEN..];
        // Extra byte, missing byte, non-zero reserved.
        assert_eq!(
            result_of(&request(opcode::RESUME, &[body, b"x"].concat())),
            Err(Status::BadBody)
        );
        assert_eq!(
            result_of(&request(opcode::RESUME, &body[..body.len() - 1])),
            Err(Status::BadBody)
        );
        let mut reserved = body.to_vec();
        reserved[26] = 1;
        assert_eq!(
            result_of(&request(opcode::RESUME, &reserved)),
            Err(Status::BadBody)
        );
        assert_eq!(
            result_of(&request(opcode::RESUME, &[0; 27])),
            Err(Status::BadBody)
        );
    }

    #[test]
    fn permits_bodies_are_checked() {
        let permits = |mode: u8, weight: u32, capacity: u32, name: &[u8]| {
            let mut body = acquire_body(mode, 0, 0, b"");
            body.extend_from_slice(&weight.to_le_bytes());
            body.extend_from_slice(&capacity.to_le_bytes());
            body.extend_from_slice(name);
            match result_of(&request(opcode::ACQUIRE_PERMITS, &body)) {
                Ok(Request::Acquire {
                    mode,
                    weight,
                    capacity,
                    wait_ms: 100,
                    ..
                }) => Ok((mode, weight, capacity)),
                Ok(other) => panic!("decoded as {other:?}"),
                Err(status) => Err(status),
            }
        };
        assert_eq!(permits(2, 3, 3, b"n"), Ok((Mode::Permits, 3, 3)));
        for (mode, weight, capacity) in [
            (0, 1, 1),
            (1, 1, 1),
            (3, 1, 1),
            (2, 0, 1),
            (2, 2, 1),
            (2, 0, 0),
        ] {
            assert_eq!(
                permits(mode, weight, capacity, b"n"),
                Err(Status::BadBody),
                "mode {mode} weight {weight} capacity {capacity}"
            );
        }
        assert_eq!(permits(2, 1, 1, b""), Err(Status::BadName));
        // Too short for the fixed part: the weight and capacity are missing.
        assert_eq!(
            result_of(&request(
                opcode::ACQUIRE_PERMITS,
                &acquire_body(2, 0, 0, b"abc")
            )),
            Err(Status::BadBody)
        );
        let set = |capacity: u32, name: &[u8]| {
            let mut body = capacity.to_le_bytes().to_vec();
            body.extend_from_slice(name);
            match result_of(&request(opcode::SET_CAPACITY, &body)) {
                Ok(Request::SetCapacity { capacity, .. }) => Ok(capacity),
                Ok(other) => panic!("decoded as {other:?}"),
                Err(status) => Err(status),
            }
        };
        assert_eq!(set(5, b"n"), Ok(5));
        assert_eq!(set(0, b"n"), Err(Status::BadBody));
        // SET_ORDER: exactly one order, nothing after it.
        for bad in [&[][..], &[3, 0, 0, 0], &[1, 0, 0, 0, 0], &[2, 0, 0, 0]] {
            assert_eq!(
                result_of(&request(opcode::SET_ORDER, bad)),
                Err(Status::BadBody),
                "{bad:?}"
            );
        }
        assert_eq!(set(5, b""), Err(Status::BadName));
        assert_eq!(
            result_of(&request(opcode::SET_CAPACITY, &[1, 0, 0])),
            Err(Status::BadBody)
        );
    }

    #[test]
    fn acquire_fixed_part_is_checked() {
        assert_eq!(
            result_of(&request(opcode::ACQUIRE, &acquire_body(2, 0, 0, b"n"))),
            Err(Status::BadBody)
        );
        assert_eq!(
            result_of(&request(opcode::ACQUIRE, &acquire_body(0, 0x80, 0, b"n"))),
            Err(Status::BadBody)
        );
        assert_eq!(
            result_of(&request(opcode::ACQUIRE, &acquire_body(0, 0, 1, b"n"))),
            Err(Status::BadBody)
        );
        assert_eq!(
            result_of(&request(opcode::ACQUIRE, &[0; 11])),
            Err(Status::BadBody)
        );
        // The fixed part is checked before the name.
        assert_eq!(
            result_of(&request(opcode::ACQUIRE, &acquire_body(2, 0, 0, b""))),
            Err(Status::BadBody)
        );
    }

    #[test]
    fn extend_cancel_ping_bye_bodies() {
        let extend0 = [&0u32.to_le_bytes()[..], b"n"].concat();
        assert_eq!(
            result_of(&request(opcode::EXTEND, &extend0)),
            Err(Status::BadBody)
        );
        assert_eq!(
            result_of(&request(opcode::EXTEND, &[1, 0, 0])),
            Err(Status::BadBody)
        );
        for len in [0, 3, 5, 8] {
            assert_eq!(
                result_of(&request(opcode::CANCEL, &vec![0; len])),
                Err(Status::BadBody),
                "{len}"
            );
        }
        assert_eq!(
            result_of(&request(opcode::CANCEL, &7u32.to_le_bytes())),
            Ok(Request::Cancel { target: 7 })
        );
        assert_eq!(
            result_of(&request(opcode::PING, b"x")),
            Err(Status::BadBody)
        );
        assert_eq!(result_of(&request(opcode::BYE, b"x")), Err(Status::BadBody));
    }

    #[test]
    fn status_codes() {
        for (i, status) in Status::ALL.iter().enumerate() {
            assert_eq!(Status::from_u16(status.code()), Some(*status));
            assert_eq!(status.is_error(), status.code() >= 32);
            assert!(!status.as_str().is_empty());
            assert!(Status::ALL[..i].iter().all(|s| s.code() < status.code()));
        }
        let known = (0..=u16::MAX)
            .filter(|&c| Status::from_u16(c).is_some())
            .count();
        assert_eq!(known, Status::ALL.len());
        assert_eq!(Status::from_u16(14), None);
        assert_eq!(Status::from_u16(49), None);
    }

    /// Decodes `buf`, expecting exactly one whole server frame.
    fn reply(buf: &[u8]) -> Reply<'_> {
        match decode_reply(buf) {
            Ok(DecodedReply::Frame { consumed, reply }) => {
                assert_eq!(consumed, buf.len());
                reply
            }
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn replies_round_trip() {
        let secret = [0x5A; SECRET_LEN];
        let mut buf = Vec::new();
        encode_session(&mut buf, opcode::RESUME, 4, 77, &secret, 2500);
        let r = reply(&buf);
        assert_eq!(
            (r.opcode, r.flags, r.status, r.request_id),
            (opcode::RESUME, flags::REPLY, Status::Ok, 4)
        );
        assert_eq!(parse_session_body(r.body), Some((77, secret, 2500)));
        assert_eq!(r.body[28], VERSION);

        for deferred in [false, true] {
            buf.clear();
            encode_granted(&mut buf, opcode::ACQUIRE, 5, u64::MAX - 1, deferred);
            let r = reply(&buf);
            let want_flags = if deferred {
                flags::REPLY | flags::PUSH
            } else {
                flags::REPLY
            };
            assert_eq!(
                (r.opcode, r.flags, r.status, r.request_id),
                (opcode::ACQUIRE, want_flags, Status::Ok, 5)
            );
            assert_eq!(parse_token_body(r.body), Some(u64::MAX - 1));

            buf.clear();
            encode_acquire_outcome(&mut buf, opcode::ACQUIRE, 6, Status::TimedOut, deferred);
            let r = reply(&buf);
            assert_eq!(
                (r.opcode, r.flags, r.status, r.request_id),
                (opcode::ACQUIRE, want_flags, Status::TimedOut, 6)
            );
            assert!(r.body.is_empty());
        }

        buf.clear();
        encode_queued(&mut buf, opcode::ACQUIRE, 8);
        let r = reply(&buf);
        assert_eq!(
            (r.opcode, r.flags, r.status, r.request_id, r.body),
            (
                opcode::ACQUIRE,
                flags::REPLY | flags::INTERIM,
                Status::Queued,
                8,
                &b""[..]
            )
        );

        buf.clear();
        encode_lock_lost(&mut buf, 12, b"report-42");
        let r = reply(&buf);
        assert_eq!(
            (r.opcode, r.flags, r.status, r.request_id),
            (opcode::LOCK_LOST, flags::REPLY | flags::PUSH, Status::Ok, 0)
        );
        assert_eq!(parse_lock_lost_body(r.body), Some((12, &b"report-42"[..])));

        for op in [opcode::SHUTDOWN, opcode::SESSION_TAKEN] {
            buf.clear();
            encode_push(&mut buf, op);
            let r = reply(&buf);
            assert_eq!(
                (r.opcode, r.flags, r.status, r.request_id, r.body),
                (op, flags::REPLY | flags::PUSH, Status::Ok, 0, &b""[..])
            );
        }

        buf.clear();
        encode_status(&mut buf, opcode::RELEASE, 9, Status::Ok, "ignored");
        let r = reply(&buf);
        assert_eq!(
            (r.opcode, r.status, r.request_id, r.body),
            (opcode::RELEASE, Status::Ok, 9, &b""[..])
        );
        buf.clear();
        encode_status(&mut buf, opcode::HELLO, 10, Status::Auth, "bad password");
        assert_eq!(reply(&buf).body, b"bad password");
    }

    #[test]
    fn error_messages_are_truncated_on_a_char_boundary() {
        let mut buf = Vec::new();
        let long = "é".repeat(MESSAGE_LEN_MAX); // 2 bytes each
        encode_status(&mut buf, opcode::PING, 1, Status::BadBody, &long);
        let body = reply(&buf).body;
        assert!(body.len() <= MESSAGE_LEN_MAX && body.len() > MESSAGE_LEN_MAX - 2);
        assert!(std::str::from_utf8(body).is_ok());
        assert!(buf.len() <= 256);
    }

    #[test]
    fn reply_errors() {
        let mut buf = Vec::new();
        encode_granted(&mut buf, opcode::ACQUIRE, 1, 1, false);
        for len in 0..buf.len() {
            assert_eq!(
                decode_reply(&buf[..len]),
                Ok(DecodedReply::Incomplete),
                "cut at {len}"
            );
        }
        let mut bad = buf.clone();
        bad[2] = 2;
        assert_eq!(
            decode_reply(&bad[..HEADER_LEN]),
            Err(ReplyError::BadVersion(2))
        );
        let mut bad = buf.clone();
        bad[6] = 14;
        assert_eq!(
            decode_reply(&bad[..HEADER_LEN]),
            Err(ReplyError::BadStatus(14))
        );
        let mut big = Vec::new();
        encode_header(
            &mut big,
            opcode::ACQUIRE,
            flags::REPLY,
            Status::Ok,
            1,
            u32::MAX,
        );
        assert_eq!(
            decode_reply(&big),
            Err(ReplyError::FrameTooLarge { body_len: u32::MAX })
        );

        assert_eq!(parse_token_body(&[0; 7]), None);
        assert_eq!(parse_token_body(&[0; 9]), None);
        assert_eq!(parse_session_body(&[0; 31]), None);
        assert_eq!(parse_lock_lost_body(&[0; 8]), None);
        assert_eq!(parse_lock_lost_body(&[0; 9]), Some((0, &[0][..])));
    }

    // The hex strings below are also in docs/PROTOCOL.md; change both together.

    /// The ACQUIRE of the hex examples (and of tests/c_header.rs).
    const ACQUIRE_EXAMPLE: Request<'static> = Request::Acquire {
        name: b"report-42",
        mode: Mode::Exclusive,
        weight: 1,
        capacity: 0,
        wait_ms: 5000,
        lease_ms: 30_000,
        notify_queued: true,
    };

    #[test]
    fn hex_hello_request() {
        let buf = encoded(
            1,
            &Request::Hello {
                grace_ms: 5000,
                password: b"",
                client_name: b"demo",
            },
        );
        assert_eq!(
            hex(&buf),
            "f1 4c 01 01 00 00 00 00 01 00 00 00 0c 00 00 00 88 13 00 00 00 00 04 00 64 65 6d 6f"
        );
    }

    #[test]
    fn hex_session_reply() {
        let mut buf = Vec::new();
        let secret: [u8; SECRET_LEN] = core::array::from_fn(|i| i as u8);
        encode_session(&mut buf, opcode::HELLO, 1, 42, &secret, 5000);
        assert_eq!(
            hex(&buf),
            "f1 4c 01 01 01 00 00 00 01 00 00 00 20 00 00 00 \
             2a 00 00 00 00 00 00 00 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f 88 13 00 00 01 00 00 00"
        );
    }

    #[test]
    fn hex_acquire_request() {
        let buf = encoded(2, &ACQUIRE_EXAMPLE);
        assert_eq!(
            hex(&buf),
            "f1 4c 01 03 00 00 00 00 02 00 00 00 15 00 00 00 00 01 00 00 88 13 00 00 30 75 00 00 \
             72 65 70 6f 72 74 2d 34 32"
        );
    }

    #[test]
    fn hex_granted_reply() {
        let mut buf = Vec::new();
        encode_granted(&mut buf, opcode::ACQUIRE, 2, 7, false);
        assert_eq!(
            hex(&buf),
            "f1 4c 01 03 01 00 00 00 02 00 00 00 08 00 00 00 07 00 00 00 00 00 00 00"
        );
        buf.clear();
        encode_granted(&mut buf, opcode::ACQUIRE, 2, 7, true);
        assert_eq!(
            hex(&buf),
            "f1 4c 01 03 03 00 00 00 02 00 00 00 08 00 00 00 07 00 00 00 00 00 00 00"
        );
    }

    #[test]
    fn hex_busy_and_queued_replies() {
        let mut buf = Vec::new();
        encode_acquire_outcome(&mut buf, opcode::ACQUIRE, 3, Status::Busy, false);
        assert_eq!(hex(&buf), "f1 4c 01 03 01 00 01 00 03 00 00 00 00 00 00 00");
        buf.clear();
        encode_queued(&mut buf, opcode::ACQUIRE, 2);
        assert_eq!(hex(&buf), "f1 4c 01 03 05 00 04 00 02 00 00 00 00 00 00 00");
    }

    #[test]
    fn hex_lock_lost_push() {
        let mut buf = Vec::new();
        encode_lock_lost(&mut buf, 7, b"report-42");
        assert_eq!(
            hex(&buf),
            "f1 4c 01 40 03 00 00 00 00 00 00 00 11 00 00 00 07 00 00 00 00 00 00 00 72 65 70 6f 72 74 2d 34 32"
        );
    }

    #[test]
    fn hex_error_reply() {
        let mut buf = Vec::new();
        encode_status(&mut buf, opcode::RELEASE, 5, Status::BadName, "bad name");
        assert_eq!(
            hex(&buf),
            "f1 4c 01 04 01 00 23 00 05 00 00 00 08 00 00 00 62 61 64 20 6e 61 6d 65"
        );
    }

    /// The frames of docs/PROTOCOL.md section 11, in order.
    fn doc_examples() -> Vec<Vec<u8>> {
        let secret: [u8; SECRET_LEN] = core::array::from_fn(|i| i as u8);
        let hello = Request::Hello {
            grace_ms: 5000,
            password: b"",
            client_name: b"demo",
        };
        let mut frames = vec![encoded(1, &hello)];
        let mut out = Vec::new();
        encode_session(&mut out, opcode::HELLO, 1, 42, &secret, 5000);
        frames.push(std::mem::take(&mut out));
        frames.push(encoded(2, &ACQUIRE_EXAMPLE));
        encode_granted(&mut out, opcode::ACQUIRE, 2, 7, false);
        frames.push(std::mem::take(&mut out));
        encode_queued(&mut out, opcode::ACQUIRE, 2);
        frames.push(std::mem::take(&mut out));
        encode_acquire_outcome(&mut out, opcode::ACQUIRE, 3, Status::Busy, false);
        frames.push(std::mem::take(&mut out));
        encode_status(&mut out, opcode::RELEASE, 5, Status::BadName, "bad name");
        frames.push(std::mem::take(&mut out));
        encode_lock_lost(&mut out, 7, b"report-42");
        frames.push(std::mem::take(&mut out));
        let release = Request::Release {
            name: b"report-42",
            token: 7,
        };
        frames.push(encoded(6, &release));
        encode_status(&mut out, opcode::RELEASE, 6, Status::WrongToken, "");
        frames.push(std::mem::take(&mut out));
        encode_resumed(&mut out, 1, 42, &secret, 5000, &[2]);
        frames.push(std::mem::take(&mut out));
        encode_held(&mut out, 7, Mode::Exclusive, b"report-42");
        frames.push(std::mem::take(&mut out));
        encode_push(&mut out, opcode::HELD_END);
        frames.push(std::mem::take(&mut out));
        let permits = Request::Acquire {
            name: b"gpus",
            mode: Mode::Permits,
            weight: 2,
            capacity: 4,
            wait_ms: WAIT_FOREVER,
            lease_ms: 0,
            notify_queued: false,
        };
        frames.push(encoded(9, &permits));
        let status = Status::CapacityConflict;
        encode_acquire_outcome(&mut out, opcode::ACQUIRE_PERMITS, 10, status, false);
        frames.push(std::mem::take(&mut out));
        let set = Request::SetCapacity {
            name: b"gpus",
            capacity: 6,
        };
        frames.push(encoded(11, &set));
        let order = [2, 0, 1, 0, 7, 0, 0, 0, 1, 0, b'x'];
        frames.push(encoded(12, &Request::SetOrder(&order)));
        frames.push(encoded(13, &Request::Report { top: 20, tag: b"" }));
        let mut names = Vec::new();
        AllNames::encode(&[(Mode::Exclusive, b"a"), (Mode::Shared, b"b")], &mut names);
        let all = Request::AcquireAll {
            names: AllNames::parse(2, &names).expect("well-formed"),
            wait_ms: 5000,
            notify_queued: false,
        };
        frames.push(encoded(14, &all));
        let tokens: Vec<u8> = [8u64, 9].iter().flat_map(|t| t.to_le_bytes()).collect();
        encode_granted_body(&mut out, opcode::ACQUIRE_ALL, 14, &tokens, false);
        frames.push(std::mem::take(&mut out));
        let mut spec = Vec::new();
        let candidates: [(&[u8], &[u8]); 2] = [(b"g1", b"m=1"), (b"g2", b"m=2")];
        crate::pool::PoolSpec::encode(1, b"m=1", &candidates, &mut spec);
        let pool = Request::AcquirePool {
            spec: crate::pool::PoolSpec::parse(1, &spec).expect("well-formed"),
            wait_ms: 0,
            notify_queued: false,
        };
        frames.push(encoded(15, &pool));
        let mut grant = Vec::new();
        let taken = crate::pool::RequirementGrant {
            permits: None,
            taken: vec![(0, 10)],
        };
        crate::pool::encode_grant(&taken, &mut grant);
        encode_granted_body(&mut out, opcode::ACQUIRE_POOL, 15, &grant, false);
        frames.push(std::mem::take(&mut out));
        frames
    }

    /// The leading hex bytes of a doc line (`|` separators skipped, stops at
    /// the first other word, which starts the comment).
    fn hex_prefix(line: &str) -> Vec<u8> {
        line.split_whitespace()
            .filter(|word| *word != "|")
            .map_while(|word| {
                (word.len() == 2)
                    .then(|| u8::from_str_radix(word, 16).ok())
                    .flatten()
            })
            .collect()
    }

    #[test]
    fn protocol_md_examples_match_the_encoder() {
        let doc = include_str!("../../docs/PROTOCOL.md");
        let examples = &doc[doc.find("## 11. Examples in hex").expect("section 11")..];
        let examples = &examples[..examples.find("\n## 12.").expect("section 12")];
        let blocks: Vec<Vec<u8>> = examples
            .split("```")
            .skip(1)
            .step_by(2)
            .map(|block| block.lines().flat_map(hex_prefix).collect())
            .collect();
        assert_eq!(
            blocks,
            doc_examples(),
            "docs/PROTOCOL.md section 11 is stale"
        );

        // One-line forms in backticks.
        let mut one_liners = 0;
        for span in examples.split('`').skip(1).step_by(2) {
            if span.starts_with("f1 4c ") {
                let bytes = hex_prefix(span);
                assert_eq!(hex(&bytes), span, "not all hex: {span}");
                let mut deferred = Vec::new();
                encode_granted(&mut deferred, opcode::ACQUIRE, 2, 7, true);
                assert!(
                    doc_examples().contains(&bytes) || bytes == deferred,
                    "{span}"
                );
                one_liners += 1;
            }
        }
        assert_eq!(one_liners, 2);
    }

    #[test]
    fn cluster_replies_round_trip_and_refuse_junk() {
        let reply = ClusterReply {
            node: 2,
            term: 7,
            commit: 100,
            applied: 99,
            members: vec![
                ClusterMember {
                    id: 1,
                    matched: 98,
                    state: 0,
                    active: false,
                    client_addr: String::new(),
                },
                ClusterMember {
                    id: 2,
                    matched: 100,
                    state: 1,
                    active: true,
                    client_addr: "127.0.0.12:7873".into(),
                },
            ],
        };
        let mut body = Vec::new();
        reply.put(&mut body);
        assert_eq!(body.len(), 32 + 2 + 2 * 20 + 15);
        assert_eq!(parse_cluster_body(&body), Some(reply));
        assert_eq!(parse_cluster_body(&body[..body.len() - 1]), None);
        body.push(0);
        assert_eq!(parse_cluster_body(&body), None);
        assert_eq!(
            decode_body(opcode::CLUSTER_STATUS, b"x", false),
            Err(Status::BadBody)
        );
        assert_eq!(
            decode_body(opcode::CLUSTER_STATUS, b"", false),
            Ok(Request::ClusterStatus)
        );
    }

    #[test]
    fn cluster_changes_round_trip_and_refuse_junk() {
        for change in [
            ClusterChange::Members(vec![
                MemberChange::Add {
                    id: 4,
                    peer_addr: "10.0.0.4:7874".into(),
                },
                MemberChange::Remove { id: 1 },
            ]),
            ClusterChange::Transfer(2),
        ] {
            let mut body = Vec::new();
            change.put(&mut body);
            assert_eq!(ClusterChange::parse(&body), Some(change.clone()));
            assert_eq!(
                decode_body(opcode::CLUSTER_CHANGE, &body, false),
                Ok(Request::ClusterChange(&body))
            );
            assert_eq!(ClusterChange::parse(&body[..body.len() - 1]), None);
        }
        let junk: [&[u8]; 6] = [
            b"",
            &[2],
            &[1, 0, 0, 0, 0, 0, 0, 0, 0],                // transfer to 0
            &[0, 0, 0],                                  // no change
            &[0, 1, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0], // an addition without an address
            &[0, 1, 0, 1, 5, 0, 0, 0, 0, 0, 0, 0, 1, 0, b'x'], // remove with an address
        ];
        for body in junk {
            assert_eq!(
                decode_body(opcode::CLUSTER_CHANGE, body, false),
                Err(Status::BadBody),
                "{body:?}"
            );
        }
    }
}
