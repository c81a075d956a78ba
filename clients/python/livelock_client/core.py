"""The client's state machine, shared by the blocking and asyncio clients.

It does no I/O: the I/O shells (``sync``, ``aio``) hand it frames and ask it
for request frames, and it tells them what to send and which events to
publish. It owns the request ids (a session's, not a connection's), the
table of requests in flight with their waiters, the session's holds (so a
LOCK_LOST or a RESUME listing marks the right ``Held`` lost), the RESUME
reconciliation, and what happens to a request whose caller gave up: a
waiting ACQUIRE (or ACQUIRE_PERMITS, ACQUIRE_ALL, ACQUIRE_POOL) is cancelled
and a grant that comes anyway is released by its fencing token, so no hold
is ever left behind unknown. It also defines the requests (``Op``: the
frame to send and what its reply means) and the events. The public methods
built on them are ``livelock_client.api``'s.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Protocol, TypeVar, Union

from . import protocol as p
from .protocol import (
    BytesLike,
    ConnectionLost,
    Frame,
    LivelockError,
    Mode,
    Opcode,
    ProtocolError,
    SessionInfo,
    SignalOp,
    Status,
)

log = logging.getLogger("livelock_client")

T = TypeVar("T")
H = TypeVar("H")

#: Signals kept unread in the events queue; later ones are dropped (and
#: counted) until the application reads some. Other events are never dropped.
EVENTS_MAX = 4096

#: The request id of HELLO and RESUME; a session's own requests never use it.
FIRST_REQUEST_ID = 1

#: The requests that take a hold, and may wait for it (cancelled when their
#: caller gives up, their late grants released).
ACQUIRES = frozenset({Opcode.ACQUIRE, Opcode.ACQUIRE_PERMITS, Opcode.ACQUIRE_ALL, Opcode.ACQUIRE_POOL})


# ---- Events ---------------------------------------------------------------


@dataclass(frozen=True)
class LockLost:
    """A hold of this session ended without a release: its lease ran out, an
    operator broke it, or it was gone when the session was resumed."""

    name: bytes
    token: int


@dataclass(frozen=True)
class Signal:
    """Someone raised ``signal`` on ``name``, a lock this session holds."""

    name: bytes
    signal: bytes


@dataclass(frozen=True)
class Shutdown:
    """The server is shutting down; requests now get ShuttingDown."""


@dataclass(frozen=True)
class SessionTaken:
    """Another connection resumed this session; this one will be closed."""


@dataclass(frozen=True)
class Disconnected:
    """The connection is gone. A session with a grace period keeps its holds
    until the grace runs out: ``reconnect()`` takes it back."""

    reason: str


Event = Union[LockLost, Signal, Shutdown, SessionTaken, Disconnected]


class EventHub:
    """The events queue (bounded for signals only) and the callbacks."""

    def __init__(self) -> None:
        self._queue: deque[Event] = deque()
        self._listeners: list[Callable[[Event], None]] = []
        self.signals_dropped = 0

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[Event], None]) -> None:
        self._listeners.remove(listener)

    def queue(self, event: Event) -> None:
        if isinstance(event, Signal) and len(self._queue) >= EVENTS_MAX:
            self.signals_dropped += 1
            return
        self._queue.append(event)

    def pop(self) -> Event | None:
        return self._queue.popleft() if self._queue else None

    def __len__(self) -> int:
        return len(self._queue)

    def notify(self, event: Event) -> None:
        """Calls every listener; one that raises is logged and skipped."""
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("livelock_client event listener %r failed on %r", listener, event)


# ---- Requests -------------------------------------------------------------


@dataclass(frozen=True)
class Op(Generic[T]):
    """One request: its frame (less the request id) and what turns its final
    reply into a result (raising the status's exception). ``name``: the
    name it is about; ``names``: an ACQUIRE_ALL's, or every name an
    ACQUIRE_POOL may take (its candidates and its pool queues)."""

    opcode: Opcode
    body: bytes
    finish: Callable[[Frame], T]
    flags: int = 0
    name: bytes = b""
    token: int = 0
    names: tuple[bytes, ...] = ()

    @property
    def takes(self) -> tuple[bytes, ...]:
        """The names an acquire takes."""
        return self.names or (self.name,)

    def frame(self, request_id: int) -> bytes:
        return p.encode_frame(self.opcode, request_id, self.body, self.flags)


@dataclass(eq=False)
class HoldState:
    """One hold of the session, shared by the ``Held`` objects that show it.
    ``weight``: the permits of a semaphore it holds, when known (not for a
    hold a RESUME listed: HELD does not say); None for a lock."""

    name: bytes
    token: int
    mode: Mode
    lost: bool = False
    released: bool = False
    weight: int | None = None

    @property
    def active(self) -> bool:
        return not (self.lost or self.released)


def _granted(name: bytes, mode: Mode, weight: int | None = None) -> Callable[[Frame], HoldState]:
    def finish(frame: Frame) -> HoldState:
        p.raise_for(frame)
        return HoldState(name, p.parse_token(frame.body), mode, weight=weight)

    return finish


def acquire_op(
    name: BytesLike, *, wait: float | None, shared: bool, lease: float | None, notify_queued: bool
) -> Op[HoldState]:
    key = p.lock_name(name)
    mode = Mode.SHARED if shared else Mode.EXCLUSIVE
    body = p.acquire_body(key, mode, p.wait_ms(wait), p.lease_ms(lease), notify_queued)
    return Op(Opcode.ACQUIRE, body, _granted(key, mode), name=key)


def _trying(acquire: Op[T]) -> Op[T | None]:
    """An acquire sent with wait 0, answering None for Busy."""

    def finish(frame: Frame) -> T | None:
        return None if frame.status == Status.BUSY else acquire.finish(frame)

    return Op(acquire.opcode, acquire.body, finish, name=acquire.name, names=acquire.names)


def try_acquire_op(name: BytesLike, *, shared: bool, lease: float | None) -> Op[HoldState | None]:
    """An ACQUIRE that tries once: None when someone else holds the lock."""
    return _trying(acquire_op(name, wait=0, shared=shared, lease=lease, notify_queued=False))


def acquire_permits_op(
    name: BytesLike, weight: int, capacity: int, *, wait: float | None, lease: float | None, notify_queued: bool
) -> Op[HoldState]:
    """ACQUIRE_PERMITS: ``weight`` permits of the semaphore ``name`` of
    ``capacity``."""
    key = p.lock_name(name)
    body = p.acquire_permits_body(key, p.wait_ms(wait), p.lease_ms(lease), weight, capacity, notify_queued)
    return Op(Opcode.ACQUIRE_PERMITS, body, _granted(key, Mode.PERMITS, weight), name=key)


def try_acquire_permits_op(name: BytesLike, weight: int, capacity: int, *, lease: float | None) -> Op[HoldState | None]:
    """An ACQUIRE_PERMITS that tries once: None when the permits are not free
    (or others queue for them)."""
    return _trying(acquire_permits_op(name, weight, capacity, wait=0, lease=lease, notify_queued=False))


def _granted_all(specs: tuple[tuple[bytes, Mode], ...]) -> Callable[[Frame], list[HoldState]]:
    def finish(frame: Frame) -> list[HoldState]:
        p.raise_for(frame)
        tokens = p.parse_tokens(frame.body, len(specs))
        return [HoldState(name, token, mode) for (name, mode), token in zip(specs, tokens)]

    return finish


def acquire_all_op(
    names: Iterable[p.LockSpec], *, wait: float | None, shared: bool, notify_queued: bool
) -> Op[list[HoldState]]:
    """ACQUIRE_ALL: every name (each a name, exclusive unless ``shared``, or
    a (name, mode) pair) or none; the holds in the given order."""
    specs = p.lock_specs(names, shared)
    body = p.acquire_all_body(specs, p.wait_ms(wait), notify_queued)
    return Op(Opcode.ACQUIRE_ALL, body, _granted_all(specs), names=tuple(name for name, _ in specs))


def try_acquire_all_op(names: Iterable[p.LockSpec], *, shared: bool) -> Op[list[HoldState] | None]:
    """An ACQUIRE_ALL that tries once: None when a name is taken (what it
    took of the others is given back first)."""
    return _trying(acquire_all_op(names, wait=0, shared=shared, notify_queued=False))


@dataclass(frozen=True)
class PoolGrantState:
    """A granted ACQUIRE_POOL: per requirement (in the request's order) the
    holds of the candidates it took (as the server lists them), their
    indices among its candidates, and the hold of its pool queue's permits
    (None if it had no queue)."""

    resources: tuple[tuple[HoldState, ...], ...]
    indices: tuple[tuple[int, ...], ...]
    permits: tuple[HoldState | None, ...]

    @property
    def holds(self) -> list[HoldState]:
        """Every hold: the resources (requirement by requirement), then the
        queues' permits, the order they are released in."""
        resources = [hold for part in self.resources for hold in part]
        return resources + [hold for hold in self.permits if hold is not None]


def _granted_pool(requirements: tuple[p.Requirement, ...]) -> Callable[[Frame], PoolGrantState]:
    def finish(frame: Frame) -> PoolGrantState:
        p.raise_for(frame)
        parts = p.parse_pool_grant(frame.body, requirements)
        resources = tuple(
            tuple(HoldState(requirement.candidates[index][0], token, Mode.EXCLUSIVE) for index, token in part.taken)
            for requirement, part in zip(requirements, parts)
        )
        indices = tuple(tuple(index for index, _ in part.taken) for part in parts)
        permits = tuple(
            HoldState(part.queue, part.permits_token, Mode.PERMITS, weight=requirement.need)
            if part.permits_token
            else None
            for requirement, part in zip(requirements, parts)
        )
        return PoolGrantState(resources, indices, permits)

    return finish


def acquire_pool_op(
    requirements: Iterable[p.RequirementSpec], *, wait: float | None, notify_queued: bool
) -> Op[PoolGrantState]:
    """ACQUIRE_POOL: for every requirement (a Requirement, or a plain name),
    ``need`` of its candidates that match its filter, all at once or none.
    ``names``: every candidate, then the pool queues the server will use
    (a reply lost with its connection is then released on RESUME)."""
    reqs = p.pool_requirements(requirements)
    body = p.acquire_pool_body(reqs, p.wait_ms(wait), notify_queued)
    queues = tuple(queue for queue in (r.queue() for r in reqs) if queue is not None)
    names = tuple(name for r in reqs for name in r.names) + queues
    return Op(Opcode.ACQUIRE_POOL, body, _granted_pool(reqs), names=names)


def try_acquire_pool_op(requirements: Iterable[p.RequirementSpec]) -> Op[PoolGrantState | None]:
    """An ACQUIRE_POOL that tries once: None when a requirement cannot be
    met now (what it took of the others is given back first)."""
    return _trying(acquire_pool_op(requirements, wait=0, notify_queued=False))


def taken(value: object) -> list[HoldState]:
    """The holds an acquire's result carries: one, an ACQUIRE_ALL's list,
    an ACQUIRE_POOL's (resources, then permits), or none (a try that found
    the lock taken, or another request's)."""
    if isinstance(value, HoldState):
        return [value]
    if isinstance(value, PoolGrantState):
        return value.holds
    if isinstance(value, list):
        return [hold for hold in value if isinstance(hold, HoldState)]
    return []


def _in_use(frame: Frame) -> bool:
    if frame.status == Status.NOT_HELD:
        return False
    p.expect_empty(frame)
    return True


def set_capacity_op(name: BytesLike, capacity: int) -> Op[bool]:
    """True: the semaphore's capacity changed; False: the name is not in use
    (nothing to change)."""
    return Op(Opcode.SET_CAPACITY, p.set_capacity_body(capacity, p.lock_name(name)), _in_use)


def set_order_op(order: p.Order) -> Op[None]:
    return Op(Opcode.SET_ORDER, p.set_order_body(order), p.expect_empty)


def release_op(name: BytesLike, token: int | None = None) -> Op[None]:
    key = p.lock_name(name)
    field_, flags = p.token_prefix(token)
    return Op(Opcode.RELEASE, field_ + key, p.expect_empty, flags, key, token or 0)


def extend_op(name: BytesLike, lease: float, token: int | None = None) -> Op[None]:
    key = p.lock_name(name)
    field_, flags = p.token_prefix(token)
    body = p.extend_body(p.extend_ms(lease), field_, key)
    return Op(Opcode.EXTEND, body, p.expect_empty, flags, key, token or 0)


def _cancelled(frame: Frame) -> bool:
    if frame.status == Status.NO_SUCH_REQUEST:
        return False
    p.expect_empty(frame)
    return True


def cancel_op(request_id: int) -> Op[bool]:
    """True: the ACQUIRE will complete with Cancelled; False: nothing was
    pending under that id (it completed first)."""
    return Op(Opcode.CANCEL, p.cancel_body(request_id), _cancelled)


def ping_op() -> Op[None]:
    return Op(Opcode.PING, b"", p.expect_empty)


def bye_op() -> Op[None]:
    return Op(Opcode.BYE, b"", p.expect_empty)


def _flag(frame: Frame) -> bool:
    p.raise_for(frame)
    return p.parse_flag(frame.body)


def signal_op(name: BytesLike, signal: BytesLike, op: SignalOp) -> Op[bool]:
    return Op(Opcode.SIGNAL, p.signal_body(op, p.lock_name(name), signal), _flag)


def _inspection(frame: Frame) -> p.Inspection | None:
    if frame.status == Status.NOT_HELD:
        return None
    p.raise_for(frame)
    return p.parse_inspect(frame.body)


def inspect_op(name: BytesLike) -> Op[p.Inspection | None]:
    return Op(Opcode.INSPECT, p.lock_name(name), _inspection)


def _parsed(parse: Callable[[bytes], T]) -> Callable[[Frame], T]:
    def finish(frame: Frame) -> T:
        p.raise_for(frame)
        return parse(frame.body)

    return finish


def list_op(pattern: BytesLike, limit: int) -> Op[p.Listing]:
    return Op(Opcode.LIST, p.list_body(limit, pattern), _parsed(p.parse_list))


def stats_op() -> Op[p.Stats]:
    return Op(Opcode.STATS, b"", _parsed(p.parse_stats))


def force_release_op(name: BytesLike, token: int | None) -> Op[None]:
    key = p.lock_name(name)
    field_, flags = p.token_prefix(token)
    return Op(Opcode.FORCE_RELEASE, field_ + key, p.expect_empty, flags, key, token or 0)


def kill_session_op(session_id: int) -> Op[None]:
    return Op(Opcode.KILL_SESSION, p.kill_session_body(session_id), p.expect_empty)


def acquire_timeout(wait: float | None, timeout: float | None, request_timeout: float | None) -> float | None:
    """How long a blocking acquire waits for its answer: ``timeout`` if given,
    else the server-side wait plus the request timeout (forever when the
    acquire waits forever)."""
    if timeout is not None:
        return timeout
    if wait is None or request_timeout is None:
        return None
    return wait + request_timeout


# ---- The state machine ------------------------------------------------------


class Waiter(Protocol):
    """How the core reaches a caller waiting for a reply."""

    def queued(self) -> None: ...

    def done(self, value: Any) -> None: ...

    def failed(self, error: LivelockError) -> None: ...

    def peek(self) -> object:
        """The result if one was delivered, else None."""


@dataclass
class _Entry:
    op: Op[Any] | None  # None: a request of an earlier client of the session
    waiter: Waiter | None  # None: nobody waits any more
    generation: int


@dataclass
class Outcome:
    """What a shell must do after the core took a frame: send these frames,
    publish these events, and whether a RESUME's listing just completed."""

    send: list[bytes] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    listed: bool = False


@dataclass(frozen=True)
class Resumed(Generic[H]):
    """What a RESUME found: the ids of the session's requests still in flight
    (those this client does not know, or gave up on, are cancelled) and every
    lock the session holds."""

    in_flight: tuple[int, ...]
    holds: tuple[H, ...]


class Core:
    """One client's session state, across its connections. Not thread-safe:
    the blocking client serialises calls with a lock."""

    def __init__(self) -> None:
        self.session: SessionInfo | None = None
        self.connected = False
        self.ended = False
        self.holds: dict[bytes, HoldState] = {}
        self.in_flight: tuple[int, ...] = ()
        self.listed: list[HoldState] | None = None
        self._listing: list[HoldState] | None = None
        self._pending: dict[int, _Entry] = {}
        self._unwanted: set[tuple[bytes, int]] = set()  # dropped while disconnected
        self._generation = 0
        self._next_id = FIRST_REQUEST_ID + 1

    # -- Opening a connection.

    @staticmethod
    def hello_frame(grace: float, password: BytesLike, client_name: BytesLike) -> bytes:
        return p.encode_frame(Opcode.HELLO, FIRST_REQUEST_ID, p.hello_body(p.grace_ms(grace), password, client_name))

    @staticmethod
    def resume_frame(session_id: int, secret: bytes, password: BytesLike) -> bytes:
        """RESUME of a session, by its id and secret."""
        return p.encode_frame(Opcode.RESUME, FIRST_REQUEST_ID, p.resume_body(session_id, secret, password))

    def reconnect_frame(self, password: BytesLike) -> bytes:
        """RESUME of this client's own session."""
        if self.session is None:
            raise ConnectionLost("no session to resume")
        if self.ended:
            raise ConnectionLost("the session has ended (BYE, or its connection closed without a grace period)")
        return self.resume_frame(self.session.session_id, self.session.secret, password)

    def on_connected(self, frames: list[Frame]) -> list[Outcome]:
        """The first frames of a connection: the HELLO/RESUME reply, then
        whatever came with it."""
        return [self.on_session(frames[0])] + [self.on_frame(frame) for frame in frames[1:]]

    def on_session(self, frame: Frame) -> Outcome:
        """The reply to HELLO or RESUME, the first frame of a connection."""
        if frame.request_id != FIRST_REQUEST_ID or frame.opcode not in (Opcode.HELLO, Opcode.RESUME) or frame.interim:
            if frame.status.is_error:
                raise p.error_for(frame)
            raise ProtocolError(f"expected the HELLO/RESUME reply, got opcode {frame.opcode:#04x}")
        p.raise_for(frame)
        resumed = frame.opcode == Opcode.RESUME
        info, in_flight = p.parse_session(frame.body, resumed)
        if resumed and self.session is not None and info.session_id != self.session.session_id:
            raise ProtocolError("RESUME answered for another session")
        self.session = info
        self.connected = True
        out = Outcome()
        if not resumed:
            return out
        # Ids are the session's: those of earlier connections may still be in
        # flight, so start far from them.
        self._generation += 1
        self._next_id = max(secrets.randbits(32), FIRST_REQUEST_ID + 1)
        self.in_flight = in_flight
        self._listing = []
        for request_id in in_flight:
            entry = self._pending.setdefault(request_id, _Entry(None, None, self._generation - 1))
            if entry.waiter is None and (entry.op is None or entry.op.opcode in ACQUIRES):
                out.send.append(self._register(cancel_op(request_id), None)[1])
        return out

    # -- Requests.

    def request(self, op: Op[Any], waiter: Waiter | None) -> tuple[int, bytes]:
        """Registers a request; returns its id and its frame, to be sent."""
        if not self.connected:
            raise ConnectionLost("not connected" if not self.ended else "the session has ended")
        return self._register(op, waiter)

    def _register(self, op: Op[Any], waiter: Waiter | None) -> tuple[int, bytes]:
        request_id = self._next_id
        while request_id in self._pending or request_id <= FIRST_REQUEST_ID:
            request_id = (request_id + 1) & p.U32_MAX
        self._next_id = (request_id + 1) & p.U32_MAX
        self._pending[request_id] = _Entry(op, waiter, self._generation)
        return request_id, op.frame(request_id)

    def abandon(self, request_id: int, waiter: Waiter, keep_result: bool) -> list[bytes] | None:
        """The caller of ``request_id`` stops waiting. While it is in flight, an
        ACQUIRE is cancelled (and a grant that comes anyway released): returns
        the frames to send. Once answered: None if ``keep_result`` (the
        caller takes the result after all), else a grant is released."""
        entry = self._pending.get(request_id)
        if entry is not None and entry.waiter is waiter:
            entry.waiter = None
            if entry.op is not None and entry.op.opcode in ACQUIRES and self.connected:
                return [self._register(cancel_op(request_id), None)[1]]
            return []
        if keep_result:
            return None
        frames: list[bytes] = []
        for hold in taken(waiter.peek()):
            if self.holds.get(hold.name) is hold:
                frames += self.drop_hold(hold)
        return frames

    def drop_hold(self, hold: HoldState) -> list[bytes]:
        """Forgets a hold nobody will use and releases it by its token: now,
        or, while disconnected, as soon as a RESUME lists it."""
        if self.holds.get(hold.name) is hold:
            del self.holds[hold.name]
        hold.released = True
        if not self.connected:
            self._unwanted.add((hold.name, hold.token))
            return []
        return [self._register(release_op(hold.name, hold.token), None)[1]]

    # -- Frames from the server.

    def on_frame(self, frame: Frame) -> Outcome:
        out = Outcome()
        if frame.is_push:
            self._on_push(frame, out)
            return out
        entry = self._pending.get(frame.request_id)
        if entry is None:
            return out  # not a request of this client (e.g. HelloTimeout, id 0)
        if frame.interim:
            if entry.waiter is not None:
                entry.waiter.queued()
            return out
        del self._pending[frame.request_id]
        if entry.op is None:
            return out  # an earlier client's request, cancelled on RESUME
        try:
            value = entry.op.finish(frame)
        except LivelockError as error:
            if entry.waiter is not None:
                entry.waiter.failed(error)
            return out
        self._track(entry.op, value, entry.waiter is not None, out)
        if entry.waiter is not None:
            entry.waiter.done(value)
        return out

    def _track(self, op: Op[Any], value: object, wanted: bool, out: Outcome) -> None:
        """Keeps ``holds`` as the server has them after a successful reply."""
        if op.opcode in ACQUIRES:
            for grant in taken(value):
                if wanted:
                    self.holds[grant.name] = grant
                elif self.connected:
                    out.send.append(self._register(release_op(grant.name, grant.token), None)[1])
        elif op.opcode == Opcode.RELEASE:
            hold = self.holds.get(op.name)
            if hold is not None and op.token in (0, hold.token):
                del self.holds[op.name]
                hold.released = True
        elif op.opcode == Opcode.BYE:
            self.ended = True
            for hold in self.holds.values():
                hold.released = True
            self.holds.clear()

    def _on_push(self, frame: Frame, out: Outcome) -> None:
        if frame.opcode == Opcode.LOCK_LOST:
            name, token = p.parse_lock_lost(frame.body)
            hold = self.holds.get(name)
            if hold is not None and hold.token == token:
                hold.lost = True
                del self.holds[name]
            out.events.append(LockLost(name, token))
        elif frame.opcode == Opcode.SIGNALLED:
            out.events.append(Signal(*p.parse_signalled(frame.body)))
        elif frame.opcode == Opcode.SHUTDOWN:
            out.events.append(Shutdown())
        elif frame.opcode == Opcode.SESSION_TAKEN:
            out.events.append(SessionTaken())
        elif frame.opcode == Opcode.HELD:
            if self._listing is None:
                raise ProtocolError("HELD push outside a RESUME listing")
            name, token, mode = p.parse_held(frame.body)
            self._listing.append(HoldState(name, token, mode))
        elif frame.opcode == Opcode.HELD_END:
            if self._listing is None:
                raise ProtocolError("HELD_END push outside a RESUME listing")
            self._reconcile(self._listing, out)
        # Pushes of a later protocol version are ignored.

    def _reconcile(self, listing: list[HoldState], out: Outcome) -> None:
        """After a RESUME's listing: holds it lacks were lost while detached;
        requests of earlier connections neither listed in flight nor answered
        by now were answered on the old connection, their replies lost, and a
        hold such an ACQUIRE got is released; every other hold is kept (the
        ``Held`` objects of this client keep working) or adopted."""
        listed = {hold.name: hold for hold in listing}
        for name, hold in list(self.holds.items()):
            if name not in listed or listed[name].token != hold.token:
                hold.lost = True
                del self.holds[name]
                out.events.append(LockLost(name, hold.token))
        still: set[int] = set(self.in_flight)
        orphans: set[bytes] = set()
        for request_id, entry in list(self._pending.items()):
            if entry.generation < self._generation and request_id not in still:
                del self._pending[request_id]
                if entry.op is not None and entry.op.opcode in ACQUIRES:
                    orphans.update(entry.op.takes)
        kept = []
        for hold in listing:
            known = self.holds.get(hold.name)
            if known is not None:
                kept.append(known)
            elif hold.name in orphans or (hold.name, hold.token) in self._unwanted:
                out.send.append(self._register(release_op(hold.name, hold.token), None)[1])
            else:
                self.holds[hold.name] = hold
                kept.append(hold)
        self.listed = kept
        self._listing = None
        self._unwanted.clear()
        out.listed = True

    def on_disconnect(self, reason: str) -> Outcome:
        """The connection is gone: every waiter fails with ConnectionLost (its
        request stays known, for a RESUME to settle). Without a grace period
        the session, and with it every hold, is gone."""
        out = Outcome()
        if not self.connected:
            return out
        self.connected = False
        self._listing = None
        for entry in self._pending.values():
            if entry.waiter is not None:
                entry.waiter.failed(ConnectionLost(reason))
                entry.waiter = None
        if self.session is None or self.session.grace_ms == 0 or self.ended:
            self.ended = True
            for hold in self.holds.values():
                hold.lost = True
            self.holds.clear()
        out.events.append(Disconnected(reason))
        return out
