"""The livelock native protocol, version 1, without any I/O.

This module owns the wire format (docs/PROTOCOL.md): constants and limits,
the opcode and status enums, the typed exceptions, request body encoders
that refuse bad input with ValueError before anything is sent, an
incremental decoder of server frames that never trusts a length beyond the
documented bounds, and parsers of every reply and push body. The blocking
and asyncio clients share it through ``livelock_client.core`` and
``livelock_client.api``.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, NoReturn, Union

MAGIC = b"\xf1\x4c"
VERSION = 1
HEADER_LEN = 16
SECRET_LEN = 16
WAIT_FOREVER = 0xFFFFFFFF
NAME_LEN_MAX = 1024
SIGNAL_LEN_MAX = 1024
PATTERN_LEN_MAX = 1024
PASSWORD_LEN_MAX = 256
CLIENT_NAME_LEN_MAX = 256
GRACE_MS_MAX = 3_600_000
FRAME_BODY_MAX = 4096
REPLY_BODY_MAX = 1 << 20
IN_FLIGHT_MAX = 1024
RESUME_REPLY_BODY_MAX = 32 + 4 + 4 * IN_FLIGHT_MAX
LIST_LIMIT_MAX = 10_000
#: SET_ORDER: at most this many names with a priority.
ORDER_NAMES_MAX = 256
#: ACQUIRE_ALL: at most this many names in one request.
MULTI_NAMES_MAX = 32
#: ACQUIRE_POOL: at most this many requirements in one request,
POOL_REQUIREMENTS_MAX = 16
#: at most this many candidates in all (their names distinct),
POOL_CANDIDATES_MAX = 64
#: and at most this many bytes of a candidate's tags or a filter.
TAGS_LEN_MAX = 255
U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF

# Header flags.
FLAG_REPLY = 0x0001
FLAG_PUSH = 0x0002
FLAG_INTERIM = 0x0004
FLAG_HOLD_TOKEN = 0x0008

# ACQUIRE/ACQUIRE_PERMITS/ACQUIRE_ALL/ACQUIRE_POOL acq_flags bit: an INTERIM
# Queued reply when the acquire has to wait (ACQUIRE_ALL, ACQUIRE_POOL: once,
# when it first waits).
ACQ_NOTIFY_QUEUED = 0x01

# SET_ORDER kinds.
ORDER_NONE = 0
ORDER_ASCENDING = 1
ORDER_PRIORITIES = 2

_HEADER = struct.Struct("<2sBBHHII")

#: What a lock name, signal or password may be given as (str is UTF-8 encoded).
BytesLike = Union[str, bytes, bytearray, memoryview]

#: An order for SET_ORDER (``set_order``): None, no order (the default);
#: "ascending", names in ascending byte order; or a mapping of names (str is
#: UTF-8) to priorities (u32): lower first, equal ones by name, names not
#: listed after every listed one, by name.
#: (Mapping's keys are invariant: each key type is spelled out.)
Order = Union[None, Literal["ascending"], Mapping[Union[str, bytes], int], Mapping[str, int], Mapping[bytes, int]]


class Opcode(enum.IntEnum):
    HELLO = 0x01
    RESUME = 0x02
    ACQUIRE = 0x03
    RELEASE = 0x04
    EXTEND = 0x05
    CANCEL = 0x06
    PING = 0x07
    BYE = 0x08
    SIGNAL = 0x09
    INSPECT = 0x0A
    LIST = 0x0B
    STATS = 0x0C
    FORCE_RELEASE = 0x0D
    KILL_SESSION = 0x0E
    ACQUIRE_PERMITS = 0x11
    SET_CAPACITY = 0x12
    SET_ORDER = 0x13
    ACQUIRE_ALL = 0x15
    ACQUIRE_POOL = 0x16
    LOCK_LOST = 0x40
    SHUTDOWN = 0x41
    SESSION_TAKEN = 0x42
    SIGNALLED = 0x43
    HELD = 0x44
    HELD_END = 0x45


class Status(enum.IntEnum):
    """Every status code a server sends; below 32 outcomes, 32 and above errors."""

    OK = 0
    BUSY = 1
    TIMED_OUT = 2
    CANCELLED = 3
    QUEUED = 4
    NOT_HELD = 5
    ALREADY_HELD = 6
    NO_SUCH_REQUEST = 7
    WRONG_TOKEN = 8
    WRONG_KIND = 9
    CAPACITY_CONFLICT = 10
    OVER_CAPACITY = 11
    ORDER_VIOLATION = 12
    DEADLOCK = 13
    BAD_VERSION = 32
    UNKNOWN_OPCODE = 33
    BAD_BODY = 34
    BAD_NAME = 35
    NO_SESSION = 36
    AUTH = 37
    SESSION_EXISTS = 38
    UNKNOWN_SESSION = 39
    TOO_MANY_HOLDS = 40
    TOO_MANY_WAITERS = 41
    TOO_MANY_IN_FLIGHT = 42
    DUPLICATE_REQUEST_ID = 43
    SHUTTING_DOWN = 44
    FRAME_TOO_LARGE = 45
    HELLO_TIMEOUT = 46
    SERVER_BUSY = 47
    STORAGE_FAILED = 48

    @property
    def is_error(self) -> bool:
        return self >= 32

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Status.OK: "ok",
    Status.BUSY: "lock is held by someone else",
    Status.TIMED_OUT: "wait timed out",
    Status.CANCELLED: "acquire was cancelled",
    Status.QUEUED: "queued behind the current holder",
    Status.NOT_HELD: "lock is not held by this session",
    Status.ALREADY_HELD: "lock is already held or awaited by this session",
    Status.NO_SUCH_REQUEST: "no such pending request",
    Status.WRONG_TOKEN: "the session holds the lock under another fencing token",
    Status.WRONG_KIND: "the name is in use as the other kind (a lock, or a semaphore)",
    Status.CAPACITY_CONFLICT: "the semaphore is in use with another capacity",
    Status.OVER_CAPACITY: (
        "the semaphore's capacity was lowered below this acquire's weight,"
        " or a pool requirement's filter leaves fewer candidates than it needs"
    ),
    Status.ORDER_VIOLATION: "the name ranks before one this session holds or waits for, in its declared order",
    Status.DEADLOCK: "the wait closed a cycle of waits and was failed to break it",
    Status.BAD_VERSION: "unsupported protocol version",
    Status.UNKNOWN_OPCODE: "unknown opcode",
    Status.BAD_BODY: "malformed request body",
    Status.BAD_NAME: "lock name must be 1 to 1024 bytes",
    Status.NO_SESSION: "no session: send HELLO or RESUME first",
    Status.AUTH: "authentication failed",
    Status.SESSION_EXISTS: "connection already has a session",
    Status.UNKNOWN_SESSION: "unknown or expired session",
    Status.TOO_MANY_HOLDS: "too many locks held or awaited by this session",
    Status.TOO_MANY_WAITERS: "too many waiters (or signals) on this lock",
    Status.TOO_MANY_IN_FLIGHT: "too many requests in flight",
    Status.DUPLICATE_REQUEST_ID: "request id already in flight",
    Status.SHUTTING_DOWN: "server is shutting down",
    Status.FRAME_TOO_LARGE: "frame body too large",
    Status.HELLO_TIMEOUT: "no HELLO in time",
    Status.SERVER_BUSY: "server is at capacity",
    Status.STORAGE_FAILED: "the server's log cannot be written",
}


class Mode(enum.IntEnum):
    """How a name is held: a lock exclusive or shared, or a semaphore's permits."""

    EXCLUSIVE = 0
    SHARED = 1
    PERMITS = 2


#: How ``acquire_all`` takes one of its names: "exclusive" or "shared", or
#: the ``Mode`` (EXCLUSIVE or SHARED; PERMITS is refused with ValueError).
LockMode = Union[Literal["exclusive", "shared"], Mode]

#: One name of ``acquire_all``: a name (taken exclusive, or shared with
#: ``shared=True``), or a ``(name, mode)`` pair.
LockSpec = Union[BytesLike, tuple[BytesLike, LockMode]]

#: The tags of a pool candidate, or a requirement's filter: text of
#: ``key=value`` pairs joined by "," (``"model=T1000,site=lab2"``; empty:
#: none, or for a filter every candidate), or a mapping of keys to values
#: (``{"model": "T1000"}``). A key is not empty and has neither "=" nor ",",
#: a value has no ","; at most 255 bytes in all.
Tags = Union[BytesLike, Mapping[str, str]]

#: The candidates of a ``Requirement``: names (untagged), ``(name, tags)``
#: pairs, or a mapping of names to their tags.
#: (Mapping's keys are invariant: each key type is spelled out.)
Candidates = Union[
    Mapping[str, Tags],
    Mapping[bytes, Tags],
    Mapping[Union[str, bytes], Tags],
    Iterable[Union[BytesLike, tuple[BytesLike, Tags]]],
]


class SignalOp(enum.IntEnum):
    RAISE = 0
    EXISTS = 1
    CLEAR = 2


# ---- Exceptions --------------------------------------------------------


class LivelockError(Exception):
    """Everything this package raises about the server or the connection
    (bad arguments are ValueError/TypeError, raised before sending)."""


class ConnectionLost(LivelockError):
    """The connection is gone (or was never made); the request's outcome is
    unknown. A session with a grace period can be resumed."""


class LivelockTimeout(LivelockError, TimeoutError):
    """The client stopped waiting for the server after its ``timeout``."""


class ProtocolError(ConnectionLost):
    """The server sent something this client does not understand; the
    connection is closed."""


class ServerError(LivelockError):
    """The server answered with a status other than Ok."""

    def __init__(self, status: Status, message: str = "") -> None:
        self.status = status
        self.message = message
        text = status.description if not message else f"{status.description}: {message}"
        super().__init__(f"{status.name} ({int(status)}): {text}")


class NotAcquired(ServerError):
    """An ACQUIRE (or ACQUIRE_PERMITS, ACQUIRE_ALL, ACQUIRE_POOL) was not
    granted: Busy, TimedOut, Cancelled, OverCapacity or Deadlock."""


class LockBusy(NotAcquired):
    """Status BUSY: a try (wait=0) found the lock held."""


class AcquireTimedOut(NotAcquired):
    """Status TIMED_OUT: the server-side wait ran out."""


class AcquireCancelled(NotAcquired):
    """Status CANCELLED: withdrawn by CANCEL (or by BYE); for ACQUIRE_ALL and
    ACQUIRE_POOL also when an operator force-released a name it had already
    taken."""


class OverCapacityError(NotAcquired):
    """Status OVER_CAPACITY: a semaphore's capacity was lowered (SET_CAPACITY)
    below the weight of this acquire while it waited; or, for ACQUIRE_POOL, a
    requirement's filter leaves fewer candidates than it needs (``message``
    says which requirement), so it can never be granted."""


class DeadlockError(NotAcquired):
    """Status DEADLOCK: this acquire waited, closed a cycle of waits and, as
    the youngest wait of the cycle, was failed to break it. ``cycle`` is the
    server's description of the cycle (``deadlock: session 0x101 waits for
    "x" held by session 0x100; ...``). Release what this session holds (or
    some of it) before trying again."""

    @property
    def cycle(self) -> str:
        return self.message


class NotHeldError(ServerError):
    """Status NOT_HELD: this session does not hold the lock (or, for
    SIGNAL, nobody does)."""


class AlreadyHeldError(ServerError):
    """Status ALREADY_HELD: this session already holds or awaits the lock."""


class WrongTokenError(ServerError):
    """Status WRONG_TOKEN: the session holds the lock under another token."""


class WrongKindError(ServerError):
    """Status WRONG_KIND: the name is in use as a lock and was used as a
    semaphore, or the reverse (SET_CAPACITY of a lock too); nothing changed."""


class CapacityConflictError(ServerError):
    """Status CAPACITY_CONFLICT: the semaphore is in use with another
    capacity than the one this acquire named; nothing changed."""


class OrderViolationError(ServerError):
    """Status ORDER_VIOLATION: in the order this session declared
    (SET_ORDER), the name ranks before one it holds or waits for; or a
    SET_ORDER while it holds or waits for something. Nothing changed."""


class NoSuchRequestError(ServerError):
    """Status NO_SUCH_REQUEST."""


class AuthError(ServerError):
    """Status AUTH: wrong or missing password; the server closes the connection."""


class UnknownSessionError(ServerError):
    """Status UNKNOWN_SESSION: no such session, wrong secret or grace over."""


class ShuttingDownError(ServerError):
    """Status SHUTTING_DOWN."""


class LimitError(ServerError):
    """A server limit: TOO_MANY_HOLDS, TOO_MANY_WAITERS, TOO_MANY_IN_FLIGHT,
    SERVER_BUSY."""


class StorageFailedError(ServerError):
    """Status STORAGE_FAILED: the server cannot write its log; nothing changed."""


class BadRequestError(ServerError):
    """The server refused the frame itself (BAD_BODY, BAD_NAME, ...): a client
    bug or a server of another version."""


_ERROR_CLASSES = {
    Status.BUSY: LockBusy,
    Status.TIMED_OUT: AcquireTimedOut,
    Status.CANCELLED: AcquireCancelled,
    Status.NOT_HELD: NotHeldError,
    Status.ALREADY_HELD: AlreadyHeldError,
    Status.WRONG_TOKEN: WrongTokenError,
    Status.WRONG_KIND: WrongKindError,
    Status.CAPACITY_CONFLICT: CapacityConflictError,
    Status.OVER_CAPACITY: OverCapacityError,
    Status.ORDER_VIOLATION: OrderViolationError,
    Status.DEADLOCK: DeadlockError,
    Status.NO_SUCH_REQUEST: NoSuchRequestError,
    Status.AUTH: AuthError,
    Status.UNKNOWN_SESSION: UnknownSessionError,
    Status.SHUTTING_DOWN: ShuttingDownError,
    Status.TOO_MANY_HOLDS: LimitError,
    Status.TOO_MANY_WAITERS: LimitError,
    Status.TOO_MANY_IN_FLIGHT: LimitError,
    Status.SERVER_BUSY: LimitError,
    Status.STORAGE_FAILED: StorageFailedError,
}


def error_for(frame: Frame) -> ServerError:
    """The exception for a reply whose status is not Ok."""
    cls = _ERROR_CLASSES.get(frame.status, BadRequestError)
    # Errors say why in their body, and so do some outcomes (Deadlock: the cycle).
    message = frame.body.decode("utf-8", "replace")
    return cls(frame.status, message)


def raise_for(frame: Frame) -> None:
    """Raises the status's exception unless the reply is Ok."""
    if frame.status != Status.OK:
        raise error_for(frame)


# ---- Argument checks and conversions ----------------------------------


def to_bytes(value: BytesLike, what: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be str or bytes, not {type(value).__name__}")


def _bounded(value: BytesLike, what: str, low: int, high: int) -> bytes:
    data = to_bytes(value, what)
    if not low <= len(data) <= high:
        raise ValueError(f"{what} must be {low} to {high} bytes, got {len(data)}")
    return data


def lock_name(name: BytesLike) -> bytes:
    """A lock name as sent: 1..=1024 bytes (str is UTF-8), else ValueError."""
    return _bounded(name, "lock name", 1, NAME_LEN_MAX)


def _milliseconds(seconds: float, what: str, high: int) -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"{what} must be a number of seconds")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{what} must be a finite number of seconds >= 0, got {seconds!r}")
    ms = math.ceil(seconds * 1000)
    if ms > high:
        raise ValueError(f"{what} must be at most {high / 1000:g} s, got {seconds!r}")
    return ms


def wait_ms(wait: float | None) -> int:
    """ACQUIRE wait_ms: None waits forever, 0 tries once, else seconds."""
    if wait is None:
        return WAIT_FOREVER
    return _milliseconds(wait, "wait", WAIT_FOREVER - 1)


def lease_ms(lease: float | None) -> int:
    """ACQUIRE lease_ms: None or 0 is no lease, else seconds (at least 1 ms)."""
    if lease is None:
        return 0
    return _milliseconds(lease, "lease", U32_MAX)


def extend_ms(lease: float) -> int:
    """EXTEND lease_ms: more than 0."""
    ms = _milliseconds(lease, "lease", U32_MAX)
    if ms == 0:
        raise ValueError("an extended lease must be more than 0 s")
    return ms


def grace_ms(grace: float) -> int:
    """HELLO grace_ms: 0 to one hour."""
    return _milliseconds(grace, "grace", GRACE_MS_MAX)


def _token(token: int) -> int:
    if isinstance(token, bool) or not isinstance(token, int) or not 0 < token <= U64_MAX:
        raise ValueError(f"a fencing token is a u64 above 0, got {token!r}")
    return token


def _u32(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U32_MAX:
        raise ValueError(f"{what} must be an integer 0..{U32_MAX}, got {value!r}")
    return value


def semaphore_capacity(value: int) -> int:
    """A semaphore's capacity: 1..2**32-1 permits, else ValueError."""
    if _u32(value, "capacity") == 0:
        raise ValueError("capacity must be at least 1")
    return value


def permit_weight(value: int, capacity: int) -> int:
    """The permits an acquire takes: 1..=capacity, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= capacity:
        raise ValueError(f"weight must be an integer 1..{capacity} (the capacity), got {value!r}")
    return value


# ---- Requests ------------------------------------------------------------


def encode_frame(opcode: Opcode, request_id: int, body: bytes = b"", flags: int = 0) -> bytes:
    """A whole request frame: header (status 0) and body."""
    if not 0 < request_id <= U32_MAX:
        raise ValueError(f"request id must be 1..{U32_MAX}")
    if len(body) > FRAME_BODY_MAX:
        raise ValueError(f"request body of {len(body)} bytes exceeds {FRAME_BODY_MAX}")
    return _HEADER.pack(MAGIC, VERSION, opcode, flags, 0, request_id, len(body)) + body


def hello_body(grace: int, password: BytesLike, client_name: BytesLike) -> bytes:
    """HELLO: grace_ms (already checked by ``grace_ms``), password, client name."""
    pw = _bounded(password, "password", 0, PASSWORD_LEN_MAX)
    cn = _bounded(client_name, "client name", 0, CLIENT_NAME_LEN_MAX)
    if not 0 <= grace <= GRACE_MS_MAX:
        raise ValueError(f"grace must be at most {GRACE_MS_MAX} ms")
    return struct.pack("<IHH", grace, len(pw), len(cn)) + pw + cn


def resume_body(session_id: int, secret: bytes, password: BytesLike) -> bytes:
    if isinstance(session_id, bool) or not isinstance(session_id, int):
        raise TypeError("session id must be an int")
    if not 0 <= session_id <= U64_MAX:
        raise ValueError("session id must be a u64")
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_LEN:
        raise ValueError(f"secret must be {SECRET_LEN} bytes")
    pw = _bounded(password, "password", 0, PASSWORD_LEN_MAX)
    return struct.pack("<Q16sHH", session_id, bytes(secret), len(pw), 0) + pw


def acquire_body(name: bytes, mode: Mode, wait: int, lease: int, notify_queued: bool) -> bytes:
    acq_flags = ACQ_NOTIFY_QUEUED if notify_queued else 0
    return struct.pack("<BBHII", mode, acq_flags, 0, _u32(wait, "wait_ms"), _u32(lease, "lease_ms")) + name


def acquire_permits_body(name: bytes, wait: int, lease: int, weight: int, capacity: int, notify_queued: bool) -> bytes:
    """ACQUIRE_PERMITS: mode 2, acq_flags, reserved, wait_ms, lease_ms,
    weight, capacity, name."""
    acq_flags = ACQ_NOTIFY_QUEUED if notify_queued else 0
    capacity = semaphore_capacity(capacity)
    fields = (_u32(wait, "wait_ms"), _u32(lease, "lease_ms"), permit_weight(weight, capacity), capacity)
    return struct.pack("<BBHIIII", Mode.PERMITS, acq_flags, 0, *fields) + name


def lock_mode(mode: LockMode) -> Mode:
    """The mode of one name of an ACQUIRE_ALL: "exclusive"/"shared" or
    Mode.EXCLUSIVE/Mode.SHARED, else ValueError (TypeError for a non-mode)."""
    if isinstance(mode, Mode):
        if mode == Mode.PERMITS:
            raise ValueError("acquire_all takes locks (exclusive or shared), not permits")
        return mode
    if mode == "exclusive":
        return Mode.EXCLUSIVE
    if mode == "shared":
        return Mode.SHARED
    if isinstance(mode, str):
        raise ValueError(f'a lock mode is "exclusive" or "shared", not {mode!r}')
    raise TypeError(f'a lock mode is "exclusive", "shared" or a Mode, not {type(mode).__name__}')


def lock_specs(names: Iterable[LockSpec], shared: bool) -> tuple[tuple[bytes, Mode], ...]:
    """The names of an ACQUIRE_ALL as sent, in the given order: each a name
    (``shared`` says its mode) or a (name, mode) pair. A single name
    instead of a list is a TypeError; the count, distinctness and size are
    checked by ``acquire_all_body``."""
    if isinstance(names, (str, bytes, bytearray, memoryview)):
        raise TypeError("acquire_all takes a list of names (or of (name, mode) pairs), not one name")
    default = Mode.SHARED if shared else Mode.EXCLUSIVE
    specs = []
    for spec in names:
        if isinstance(spec, tuple):
            if len(spec) != 2:
                raise ValueError(f"a name with its mode is a (name, mode) pair, not {spec!r}")
            name, mode = spec
            specs.append((lock_name(name), lock_mode(mode)))
        else:
            specs.append((lock_name(spec), default))
    return tuple(specs)


def acquire_all_body(names: tuple[tuple[bytes, Mode], ...], wait: int, notify_queued: bool) -> bytes:
    """ACQUIRE_ALL: acq_flags, reserved, count, wait_ms, then per name its
    mode, reserved, name_len and name; ValueError for what the server would
    refuse: not 1 to 32 names, a name twice, a mode other than exclusive or
    shared, more than one request's 4096 bytes."""
    if not 1 <= len(names) <= MULTI_NAMES_MAX:
        raise ValueError(f"acquire_all takes 1 to {MULTI_NAMES_MAX} names, got {len(names)}")
    seen: set[bytes] = set()
    entries = []
    for name, mode in names:
        name = lock_name(name)
        if name in seen:
            raise ValueError(f"acquire_all names {name!r} twice")
        seen.add(name)
        if mode not in (Mode.EXCLUSIVE, Mode.SHARED):
            raise ValueError(f"acquire_all takes locks (exclusive or shared), not {mode!r}")
        entries.append(struct.pack("<BBH", mode, 0, len(name)) + name)
    acq_flags = ACQ_NOTIFY_QUEUED if notify_queued else 0
    body = struct.pack("<BBHI", acq_flags, 0, len(names), _u32(wait, "wait_ms")) + b"".join(entries)
    if len(body) > FRAME_BODY_MAX:
        raise ValueError(f"the names take {len(body)} bytes; a request holds at most {FRAME_BODY_MAX}")
    return body


def tags_text(tags: Tags, what: str = "tags") -> bytes:
    """Tags or a filter as sent: ``key=value`` pairs joined by ","; ValueError
    for text the server would refuse (an empty key, a pair without "=", an
    empty pair, more than 255 bytes), TypeError for what is not text nor a
    mapping."""
    if isinstance(tags, Mapping):
        pairs = []
        for key, value in tags.items():
            k, v = to_bytes(key, f"a {what} key"), to_bytes(value, f"a {what} value")
            if not k or b"=" in k or b"," in k:
                raise ValueError(f'a {what} key is not empty and has neither "=" nor ",", got {k!r}')
            if b"," in v:
                raise ValueError(f'a {what} value has no ",", got {v!r}')
            pairs.append(k + b"=" + v)
        text = b",".join(pairs)
    else:
        text = to_bytes(tags, what)
    if len(text) > TAGS_LEN_MAX:
        raise ValueError(f"{what} must be at most {TAGS_LEN_MAX} bytes, got {len(text)}")
    for pair in text.split(b",") if text else ():
        pair_key, eq, _ = pair.partition(b"=")
        if not pair_key or not eq:
            raise ValueError(f'{what} are key=value pairs (the key not empty) joined by ",", got {text!r}')
    return text


def tag_pairs(text: bytes) -> set[bytes]:
    """The ``key=value`` pairs of tags or a filter (as sent)."""
    return {pair for pair in text.split(b",") if pair}


def tags_match(tags: bytes, filter: bytes) -> bool:
    """Whether a candidate's ``tags`` have every pair of ``filter`` (the
    empty filter matches every candidate): the server's rule."""
    return tag_pairs(filter) <= tag_pairs(tags)


def _candidate(candidate: BytesLike | tuple[BytesLike, Tags]) -> tuple[bytes, bytes]:
    if isinstance(candidate, tuple):
        if len(candidate) != 2:
            raise ValueError(f"a tagged candidate is a (name, tags) pair, not {candidate!r}")
        name, tags = candidate
        return lock_name(name), tags_text(tags)
    return lock_name(candidate), b""


@dataclass(frozen=True, init=False)
class Requirement:
    """One requirement of an ACQUIRE_POOL (``acquire_pool``): ``need`` (K) of
    the ``candidates`` (N) whose tags have every ``key=value`` pair of
    ``filter``. ``candidates``: names (untagged), ``(name, tags)`` pairs, or
    a mapping of names to tags, e.g. ``Requirement(2, {"gpu1":
    "model=T1", "gpu2": "model=T2"}, filter="model=T1")``; tags and filter
    are text (``"model=T1,site=lab2"``) or a mapping (``{"model": "T1"}``).
    Checked when made: ValueError (TypeError for a single name instead of
    candidates) for what the server would refuse: ``need`` not 1 to the
    number of candidates, a candidate twice, a bad name, bad tags. Kept as
    sent: ``candidates`` are (name, tags) pairs of bytes, ``filter`` bytes."""

    need: int
    candidates: tuple[tuple[bytes, bytes], ...]
    filter: bytes

    def __init__(self, need: int, candidates: Candidates, *, filter: Tags = b"") -> None:
        if isinstance(candidates, (str, bytes, bytearray, memoryview)):
            raise TypeError("a requirement takes a list of candidates (or a mapping of names to tags), not one name")
        if isinstance(candidates, Mapping):
            items = tuple((lock_name(name), tags_text(tags)) for name, tags in candidates.items())
        else:
            items = tuple(_candidate(candidate) for candidate in candidates)
        if not 1 <= len(items) <= POOL_CANDIDATES_MAX:
            raise ValueError(f"a requirement has 1 to {POOL_CANDIDATES_MAX} candidates, got {len(items)}")
        seen: set[bytes] = set()
        for name, _ in items:
            if name in seen:
                raise ValueError(f"a requirement names the candidate {name!r} twice")
            seen.add(name)
        if isinstance(need, bool) or not isinstance(need, int):
            raise TypeError(f"need must be an int, not {type(need).__name__}")
        if not 1 <= need <= len(items):
            raise ValueError(f"need must be 1 to the {len(items)} candidates, got {need}")
        object.__setattr__(self, "need", need)
        object.__setattr__(self, "candidates", items)
        object.__setattr__(self, "filter", tags_text(filter, "filter"))

    @classmethod
    def name(cls, name: BytesLike) -> Requirement:
        """A plain lock among the requirements: 1 of the one candidate ``name``."""
        return cls(1, [name])

    @property
    def names(self) -> tuple[bytes, ...]:
        """The candidates' names, in the order sent."""
        return tuple(name for name, _ in self.candidates)

    def matching(self) -> tuple[int, ...]:
        """The indices of the candidates the filter admits."""
        return tuple(i for i, (_, tags) in enumerate(self.candidates) if tags_match(tags, self.filter))

    def queue(self) -> bytes | None:
        """The name of this requirement's pool queue, as the server names it
        (a counting semaphore of the matching candidates, of which a grant
        holds ``need`` permits); None when the filter leaves no more
        candidates than it needs (no queue)."""
        matching = self.matching()
        if len(matching) <= self.need:
            return None
        return pool_queue_name(self.candidates[i][0] for i in matching)


def pool_queue_name(names: Iterable[bytes]) -> bytes:
    """The server's name of the pool queue of candidates ``names`` (any
    order): ``pool:`` and 16 hex digits of the FNV-1a 64 hash of the sorted
    names, each after its length (u16 LE)."""
    digest = 0xCBF29CE484222325
    for name in sorted(names):
        for byte in struct.pack("<H", len(name)) + name:
            digest = ((digest ^ byte) * 0x100000001B3) & U64_MAX
    return f"pool:{digest:016x}".encode()


#: One requirement of ``acquire_pool``: a ``Requirement``, or a plain name
#: (``Requirement.name(name)``: a lock among the requirements).
RequirementSpec = Union[Requirement, BytesLike]


def pool_requirements(requirements: Iterable[RequirementSpec]) -> tuple[Requirement, ...]:
    """The requirements of an ACQUIRE_POOL, in the given order; TypeError for
    one requirement (or name) instead of a list; the count, distinctness and
    size are checked by ``acquire_pool_body``."""
    if isinstance(requirements, (Requirement, str, bytes, bytearray, memoryview)):
        raise TypeError("acquire_pool takes a list of requirements, not one")
    return tuple(r if isinstance(r, Requirement) else Requirement.name(r) for r in requirements)


def acquire_pool_body(requirements: tuple[Requirement, ...], wait: int, notify_queued: bool) -> bytes:
    """ACQUIRE_POOL: acq_flags, reserved, count, wait_ms, then per
    requirement need, its number of candidates, filter_len and filter, and
    per candidate name_len, tags_len, name and tags; ValueError for what the
    server would refuse: not 1 to 16 requirements, more than 64 candidates
    in all, a candidate name twice (in any requirements), more than one
    request's 4096 bytes."""
    if not 1 <= len(requirements) <= POOL_REQUIREMENTS_MAX:
        raise ValueError(f"acquire_pool takes 1 to {POOL_REQUIREMENTS_MAX} requirements, got {len(requirements)}")
    seen: set[bytes] = set()
    parts = []
    for requirement in requirements:
        if not isinstance(requirement, Requirement):
            raise TypeError(f"a requirement is a Requirement, not {type(requirement).__name__}")
        parts.append(struct.pack("<HHH", requirement.need, len(requirement.candidates), len(requirement.filter)))
        parts.append(requirement.filter)
        for name, tags in requirement.candidates:
            if name in seen:
                raise ValueError(f"acquire_pool names the candidate {name!r} twice")
            seen.add(name)
            parts.append(struct.pack("<HH", len(name), len(tags)) + name + tags)
    if len(seen) > POOL_CANDIDATES_MAX:
        raise ValueError(f"acquire_pool takes at most {POOL_CANDIDATES_MAX} candidates in all, got {len(seen)}")
    acq_flags = ACQ_NOTIFY_QUEUED if notify_queued else 0
    body = struct.pack("<BBHI", acq_flags, 0, len(requirements), _u32(wait, "wait_ms")) + b"".join(parts)
    if len(body) > FRAME_BODY_MAX:
        raise ValueError(f"the requirements take {len(body)} bytes; a request holds at most {FRAME_BODY_MAX}")
    return body


def set_capacity_body(capacity: int, name: bytes) -> bytes:
    return struct.pack("<I", semaphore_capacity(capacity)) + name


def set_order_body(order: Order) -> bytes:
    """SET_ORDER: kind, reserved, count, then (priorities) each entry's
    priority, name length and name; ValueError for an order the server
    would refuse or one that does not fit a request."""
    if order is None:
        return struct.pack("<BBH", ORDER_NONE, 0, 0)
    if isinstance(order, str):
        if order != "ascending":
            raise ValueError(f'an order is None, "ascending" or a mapping of names to priorities, not {order!r}')
        return struct.pack("<BBH", ORDER_ASCENDING, 0, 0)
    if not isinstance(order, Mapping):
        raise TypeError(f'an order is None, "ascending" or a mapping, not {type(order).__name__}')
    if not 1 <= len(order) <= ORDER_NAMES_MAX:
        raise ValueError(f"an order by priorities names 1 to {ORDER_NAMES_MAX} names, got {len(order)}")
    entries = {}
    for name, priority in order.items():
        key = lock_name(name)
        if key in entries:
            raise ValueError(f"the order names {key!r} twice")
        entries[key] = _u32(priority, "priority")
    body = struct.pack("<BBH", ORDER_PRIORITIES, 0, len(entries))
    body += b"".join(struct.pack("<IH", priority, len(key)) + key for key, priority in entries.items())
    if len(body) > FRAME_BODY_MAX:
        raise ValueError(f"the order takes {len(body)} bytes; a request holds at most {FRAME_BODY_MAX}")
    return body


def token_prefix(token: int | None) -> tuple[bytes, int]:
    """The token field and header flags of RELEASE/EXTEND/FORCE_RELEASE:
    empty and 0 for "whatever hold", else the token and HOLD_TOKEN."""
    if token is None:
        return b"", 0
    return struct.pack("<Q", _token(token)), FLAG_HOLD_TOKEN


def extend_body(lease: int, token_field: bytes, name: bytes) -> bytes:
    return struct.pack("<I", _u32(lease, "lease_ms")) + token_field + name


def cancel_body(target_request_id: int) -> bytes:
    return struct.pack("<I", _u32(target_request_id, "request id"))


def signal_body(op: SignalOp, name: bytes, signal: BytesLike) -> bytes:
    sig = _bounded(signal, "signal", 1, SIGNAL_LEN_MAX)
    body = struct.pack("<BBH", op, 0, len(name)) + name + sig
    if len(body) > FRAME_BODY_MAX:
        raise ValueError("lock name and signal together must fit a 4096-byte request")
    return body


def list_body(limit: int, pattern: BytesLike) -> bytes:
    if _u32(limit, "limit") == 0:
        raise ValueError("limit must be at least 1")
    return struct.pack("<I", limit) + _bounded(pattern, "pattern", 0, PATTERN_LEN_MAX)


def kill_session_body(session_id: int) -> bytes:
    if isinstance(session_id, bool) or not isinstance(session_id, int) or not 0 <= session_id <= U64_MAX:
        raise ValueError("session id must be a u64")
    return struct.pack("<Q", session_id)


# ---- Server frames ---------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One server frame (REPLY is always set in ``flags``)."""

    opcode: int
    flags: int
    status: Status
    request_id: int
    body: bytes

    @property
    def interim(self) -> bool:
        return bool(self.flags & FLAG_INTERIM)

    @property
    def is_push(self) -> bool:
        """A push not tied to a request (LOCK_LOST, SIGNALLED, ...)."""
        return self.request_id == 0 and self.opcode >= 0x40


def body_max(opcode: int) -> int:
    """The largest body a server frame of this opcode may have."""
    if opcode in (Opcode.LIST, Opcode.INSPECT):
        return REPLY_BODY_MAX
    if opcode == Opcode.RESUME:
        return RESUME_REPLY_BODY_MAX
    return FRAME_BODY_MAX


class FrameDecoder:
    """Turns the server's byte stream into frames. ``feed`` returns every
    whole frame received so far; a partial one waits for more bytes. A stream
    that cannot be trusted (bad magic, checked byte by byte; version other
    than 1; unknown status; no REPLY flag; a body over its documented bound)
    raises ProtocolError, and so does every later call."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._broken: str | None = None

    def feed(self, data: bytes) -> list[Frame]:
        if self._broken is not None:
            raise ProtocolError(self._broken)
        self._buf += data
        frames: list[Frame] = []
        while True:
            head = bytes(self._buf[:2])
            if head != MAGIC[: len(head)]:
                self._fail(f"bad magic {head.hex()}: not a livelock v1 frame")
            if len(self._buf) < HEADER_LEN:
                return frames
            _, version, opcode, flags, status, request_id, body_len = _HEADER.unpack_from(self._buf)
            if version != VERSION:
                self._fail(f"server frame has protocol version {version}")
            if status not in _STATUS_CODES:
                self._fail(f"server frame has unknown status {status}")
            if not flags & FLAG_REPLY:
                self._fail("server frame without the REPLY flag")
            if body_len > body_max(opcode):
                self._fail(f"frame body of {body_len} bytes for opcode {opcode:#04x} exceeds its bound")
            end = HEADER_LEN + body_len
            if len(self._buf) < end:
                return frames
            body = bytes(self._buf[HEADER_LEN:end])
            del self._buf[:end]
            frames.append(Frame(opcode, flags, Status(status), request_id, body))

    def _fail(self, why: str) -> NoReturn:
        self._broken = why
        raise ProtocolError(why)


_STATUS_CODES = frozenset(int(s) for s in Status)
_MODE_CODES = frozenset(int(m) for m in Mode)


# ---- Reply and push bodies -------------------------------------------------


class _Reader:
    """A cursor over a body; running short is a ProtocolError."""

    def __init__(self, body: bytes, what: str) -> None:
        self._body = body
        self._at = 0
        self._what = what

    def take(self, n: int) -> bytes:
        if self._at + n > len(self._body):
            raise ProtocolError(f"short {self._what}")
        data = self._body[self._at : self._at + n]
        self._at += n
        return data

    def unpack(self, fmt: str) -> tuple[int, ...]:
        s = struct.Struct("<" + fmt)
        return tuple(s.unpack(self.take(s.size)))

    def u16(self) -> int:
        return self.unpack("H")[0]

    def u32(self) -> int:
        return self.unpack("I")[0]

    def u64(self) -> int:
        return self.unpack("Q")[0]

    def bytes16(self) -> bytes:
        return self.take(self.u16())

    def mode(self) -> Mode:
        code = self.take(1)[0]
        if code not in _MODE_CODES:
            raise ProtocolError(f"bad mode {code} in {self._what}")
        return Mode(code)

    def count(self, min_record: int) -> int:
        """A record count, refused when the rest of the body cannot hold it."""
        n = self.u32()
        if n * min_record > self.remaining:
            raise ProtocolError(f"{self._what} claims {n} records in {self.remaining} bytes")
        return n

    @property
    def remaining(self) -> int:
        return len(self._body) - self._at

    def end(self) -> None:
        if self.remaining:
            raise ProtocolError(f"{self.remaining} stray bytes after {self._what}")


@dataclass(frozen=True)
class SessionInfo:
    """A HELLO or RESUME reply: the session and its grace."""

    session_id: int
    secret: bytes
    grace_ms: int
    version: int


def parse_session(body: bytes, resumed: bool) -> tuple[SessionInfo, tuple[int, ...]]:
    """A HELLO reply (exactly 32 bytes) or a RESUME reply (32 bytes, then the
    ids still in flight)."""
    r = _Reader(body, "session reply")
    session_id = r.u64()
    secret = r.take(SECRET_LEN)
    grace, version = r.unpack("IB")
    r.take(3)
    in_flight: tuple[int, ...] = ()
    if resumed:
        n = r.count(4)
        if n > IN_FLIGHT_MAX:
            raise ProtocolError(f"RESUME reply lists {n} requests in flight")
        in_flight = tuple(r.u32() for _ in range(n))
    r.end()
    return SessionInfo(session_id, secret, grace, version), in_flight


def parse_token(body: bytes) -> int:
    r = _Reader(body, "grant")
    token = r.u64()
    r.end()
    return token


def parse_tokens(body: bytes, count: int) -> tuple[int, ...]:
    """A granted ACQUIRE_ALL: exactly ``count`` tokens (u64), in the
    request's order."""
    if len(body) != 8 * count:
        raise ProtocolError(f"ACQUIRE_ALL grant of {len(body)} bytes for {count} names")
    return struct.unpack(f"<{count}Q", body)


@dataclass(frozen=True)
class PoolPart:
    """One requirement's part of a granted ACQUIRE_POOL: the permits of its
    pool queue (``permits_token`` 0 and ``queue`` empty: it had none) and
    what it took: (candidate index, fencing token) pairs, ``need`` of them."""

    permits_token: int
    queue: bytes
    taken: tuple[tuple[int, int], ...]


def parse_pool_grant(body: bytes, requirements: tuple[Requirement, ...]) -> tuple[PoolPart, ...]:
    """A granted ACQUIRE_POOL: per requirement, in the request's order, the
    queue's permits token (u64) and name (u16 length, bytes), then exactly
    ``need`` (candidate index u16, token u64). An index out of range or
    twice, a queue name without a token (or the reverse), a body of another
    length is a ProtocolError."""
    r = _Reader(body, "ACQUIRE_POOL grant")
    parts = []
    for requirement in requirements:
        permits_token = r.u64()
        queue_len = r.u16()
        queue = _name(r, queue_len) if queue_len else b""
        if (permits_token == 0) != (queue_len == 0):
            raise ProtocolError("ACQUIRE_POOL grant with a pool queue's name but no token, or the reverse")
        taken = tuple((index, token) for index, token in (r.unpack("HQ") for _ in range(requirement.need)))
        indices = {index for index, _ in taken}
        if len(indices) != len(taken) or any(index >= len(requirement.candidates) for index in indices):
            raise ProtocolError(f"ACQUIRE_POOL grant of candidates {[i for i, _ in taken]} out of range or twice")
        parts.append(PoolPart(permits_token, queue, taken))
    r.end()
    return tuple(parts)


def parse_flag(body: bytes) -> bool:
    """SIGNAL's one-byte answer."""
    if len(body) != 1 or body[0] > 1:
        raise ProtocolError("SIGNAL reply is not one byte 0 or 1")
    return body[0] == 1


def _name(r: _Reader, n: int) -> bytes:
    if not 1 <= n <= NAME_LEN_MAX:
        raise ProtocolError(f"lock name of {n} bytes")
    return r.take(n)


def parse_lock_lost(body: bytes) -> tuple[bytes, int]:
    """LOCK_LOST: (name, token)."""
    r = _Reader(body, "LOCK_LOST")
    token = r.u64()
    return _name(r, r.remaining), token


def parse_held(body: bytes) -> tuple[bytes, int, Mode]:
    """HELD: (name, token, mode); mode PERMITS for a semaphore's permits."""
    r = _Reader(body, "HELD")
    token = r.u64()
    mode = r.mode()
    return _name(r, r.remaining), token, mode


def parse_signalled(body: bytes) -> tuple[bytes, bytes]:
    """SIGNALLED: (name, signal)."""
    r = _Reader(body, "SIGNALLED")
    name = _name(r, r.u16())
    return name, r.take(r.remaining)


@dataclass(frozen=True)
class Holder:
    """One hold in a lock record; ``weight``: the permits it holds of a
    semaphore (None for a lock)."""

    session: int
    token: int
    since_unix_ms: int
    client_name: bytes
    weight: int | None = None


@dataclass(frozen=True)
class LockRecord:
    """A held name: a lock (mode EXCLUSIVE or SHARED), or a semaphore (mode
    PERMITS, with its ``capacity``; None for a lock)."""

    name: bytes
    mode: Mode
    waiters: int
    holders: tuple[Holder, ...]
    signals: tuple[bytes, ...]
    capacity: int | None = None


@dataclass(frozen=True)
class Waiter:
    """One queued ACQUIRE in an INSPECT reply; ``weight``: the permits an
    ACQUIRE_PERMITS waits for (None for a lock)."""

    session: int
    since_unix_ms: int
    mode: Mode
    client_name: bytes
    weight: int | None = None


@dataclass(frozen=True)
class Inspection:
    """An INSPECT reply: the lock record, the server's clock and the queue
    (first in line first)."""

    record: LockRecord
    server_unix_ms: int
    queue: tuple[Waiter, ...]
    queue_cut: bool


@dataclass(frozen=True)
class Listing:
    """A LIST reply: records sorted by name; ``truncated`` if cut short."""

    records: tuple[LockRecord, ...]
    truncated: bool
    server_unix_ms: int


@dataclass(frozen=True)
class Stats:
    locks: int
    waiters: int
    sessions_attached: int
    sessions_detached: int
    connections: int
    uptime_ms: int
    server_unix_ms: int
    acquisitions_total: int
    grants_total: int
    releases_total: int
    timeouts_total: int
    busy_total: int
    locks_lost_total: int
    connections_total: int
    version: str


def _of_semaphore(r: _Reader, mode: Mode) -> int | None:
    """The u32 that follows a semaphore's name (its capacity), holder or
    waiter (the weight); None for a lock's."""
    return r.u32() if mode == Mode.PERMITS else None


def _holder(r: _Reader, mode: Mode) -> Holder:
    session, token, since = r.unpack("QQQ")
    client_name = r.bytes16()
    return Holder(session, token, since, client_name, _of_semaphore(r, mode))


def _record(r: _Reader) -> LockRecord:
    name_len, mode_code, _, waiters, n_holders, n_signals = r.unpack("HBBIHH")
    if mode_code not in _MODE_CODES:
        raise ProtocolError(f"bad mode {mode_code} in a lock record")
    mode = Mode(mode_code)
    name = _name(r, name_len)
    capacity = _of_semaphore(r, mode)
    holders = tuple(_holder(r, mode) for _ in range(n_holders))
    signals = tuple(r.bytes16() for _ in range(n_signals))
    return LockRecord(name, mode, waiters, holders, signals, capacity)


def parse_inspect(body: bytes) -> Inspection:
    r = _Reader(body, "INSPECT reply")
    record = _record(r)
    server_unix_ms = r.u64()
    n = r.count(20)
    cut = bool(r.u32() & 1)
    queue = []
    for _ in range(n):
        session, since = r.unpack("QQ")
        mode = r.mode()
        r.take(1)
        client_name = r.bytes16()
        queue.append(Waiter(session, since, mode, client_name, _of_semaphore(r, mode)))
    r.end()
    return Inspection(record, server_unix_ms, tuple(queue), cut)


def parse_list(body: bytes) -> Listing:
    r = _Reader(body, "LIST reply")
    n = r.count(12)
    truncated = bool(r.u32() & 1)
    server_unix_ms = r.u64()
    records = tuple(_record(r) for _ in range(n))
    r.end()
    return Listing(records, truncated, server_unix_ms)


def parse_stats(body: bytes) -> Stats:
    r = _Reader(body, "STATS reply")
    n = r.unpack("14Q")
    try:
        version = r.bytes16().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError("STATS version is not UTF-8") from e
    r.end()
    return Stats(n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7], n[8], n[9], n[10], n[11], n[12], n[13], version)


def expect_empty(frame: Frame) -> None:
    """Ok with an empty body, else the status's exception."""
    raise_for(frame)
    if frame.body:
        raise ProtocolError(f"unexpected body in the reply to opcode {frame.opcode:#04x}")
