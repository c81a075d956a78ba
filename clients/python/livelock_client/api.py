"""The public API of both clients, written once.

``Client`` (blocking, ``livelock_client.sync``) and ``AsyncClient``
(asyncio, ``livelock_client.aio``) offer the same methods, with the same
arguments and meanings. This module owns them: each is a function here that
checks its arguments and returns a ``Call`` (the request to send, how long to
wait for the answer, what the caller gets from it), made a ``Method`` that
binds it to the object it is read from. On a ``Blocking`` object (the
blocking client's) a method runs its call to completion; on an ``Awaiting``
one (the asyncio client's) it is a coroutine function. ``connect()`` and
``resume()`` are written once the same way (``Opener``). The I/O shells
supply only the I/O: ``_run`` (send, wait, hand back), ``_enter`` (the
``lock()`` block), ``_open`` (dial and hand the first frames to the core),
the reader, and the waits for events.

It also owns what the shells' clients, holds, pending acquires and
semaphores share (the session's properties, the listeners, applying the
core's ``Outcome``), the I/O-free part of dialling (``Dial``) and why a
connection ended.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import ssl
from collections.abc import Coroutine, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Final, Generic, Protocol, TypeVar, overload

from . import config
from . import core as c
from . import protocol as p
from .core import Event
from .protocol import BytesLike, ConnectionLost, LivelockError, LivelockTimeout

if TYPE_CHECKING:
    from typing_extensions import Concatenate, ParamSpec

    P = ParamSpec("P")
else:
    P = TypeVar("P")  # only annotations, which are not evaluated, need a ParamSpec

T = TypeVar("T")
K = TypeVar("K")
W = TypeVar("W")
#: The shell's Held, PendingAcquire, PendingAcquireAll, Semaphore,
#: PoolGrant, PendingAcquirePool and client classes.
H = TypeVar("H")
PA = TypeVar("PA")
PM = TypeVar("PM")
S = TypeVar("S")
G = TypeVar("G")
PP = TypeVar("PP")
HB = TypeVar("HB", bound="HeldBase[Any]")
HB_co = TypeVar("HB_co", bound="HeldBase[Any]", covariant=True)
C = TypeVar("C", bound="_Runner")
BC = TypeVar("BC", bound="Blocking")
AC = TypeVar("AC", bound="Awaiting")

#: Why a RESUME gave up waiting for the listing of the session's holds.
LISTING_LATE = "the RESUME listing of holds did not end in time"


# ---- Calls ------------------------------------------------------------------


@dataclass(frozen=True)
class Call(Generic[T]):
    """What a method asks of its I/O shell: send ``op`` and wait at most
    ``timeout`` seconds (None: for ever) for its reply; the caller gets
    ``result`` of the reply's value. With ``op`` None nothing is sent and the
    caller gets ``result(None)``. A ``detached`` call is not waited for: the
    caller gets ``result`` of the ``Started`` request."""

    op: c.Op[Any] | None
    timeout: float | None
    result: Callable[[Any], T]
    detached: bool = False


def _as_is(value: T) -> T:
    return value


@dataclass(frozen=True)
class Started(Generic[W]):
    """A request sent by a detached call, the shell's waiter for its reply,
    and how long to wait for it by default (the call's ``timeout``)."""

    request_id: int
    waiter: W
    timeout: float | None


def no_answer(timeout: float | None) -> LivelockTimeout:
    return LivelockTimeout(f"no answer from the server within {timeout} s")


# ---- Methods ----------------------------------------------------------------


class Runs:
    """The kind of method whose caller gets its call's result."""


class Enters:
    """The kind of method that returns a context manager around its call's
    result (a hold, a list of holds, or a pool grant, released at the end
    of the block)."""


class Blocking:
    """An object of the blocking client: its methods run to completion
    (``_run``; a client's ``_enter`` makes the ``with`` block of ``lock``
    and ``lock_all``)."""

    def _run(self, call: Call[T]) -> T:
        raise NotImplementedError


class Awaiting:
    """An object of the asyncio client: its methods are coroutine functions
    (``_run``), but for ``lock`` and ``lock_all``, whose ``async with`` block
    a client's ``_enter`` makes."""

    async def _run(self, call: Call[T]) -> T:
        raise NotImplementedError


def _function(
    run: Callable[..., Any], awaits: bool, owner: type[Any], like: Method[..., Any, Any] | Opener[...]
) -> Any:
    """``run`` as its caller sees it: a coroutine function if ``awaits``,
    named, documented and signed as the method ``like`` of ``owner``."""
    function = run
    if awaits:

        async def awaiting(*args: Any, **kwargs: Any) -> Any:
            return await run(*args, **kwargs)

        function = awaiting
    function.__name__ = like.__name__
    function.__qualname__ = f"{owner.__qualname__}.{like.__name__}"
    function.__doc__ = like.__doc__
    setattr(function, "__signature__", like.signature)  # noqa: B010 (unknown to the type of functions)
    return function


def _signature(build: Callable[..., Any]) -> inspect.Signature:
    """The signature of a method written as ``build``: its own, less what
    ``build`` returns."""
    return inspect.signature(build).replace(return_annotation=inspect.Signature.empty)


class Method(Generic[P, T, K]):
    """A public method: ``build`` (its signature, its docstring and the Call
    it makes, given the object and the arguments) bound by kind to the
    object it is read from. Read from the class, it is a function of the
    object and the arguments."""

    def __init__(self, build: Callable[Concatenate[Any, P], Call[T]], enters: bool, doc: str | None) -> None:
        self._build = build
        self._enters = enters
        self.__signature__ = _signature(build)
        self.signature = self.__signature__.replace(parameters=list(self.__signature__.parameters.values())[1:])
        self.__name__ = build.__name__
        self.__doc__ = doc or build.__doc__

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.__name__ = name

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Method[P, T, K]: ...
    @overload
    def __get__(self: Method[P, T, Runs], obj: Blocking, owner: type[Any]) -> Callable[P, T]: ...
    @overload
    def __get__(self: Method[P, T, Runs], obj: Awaiting, owner: type[Any]) -> Callable[P, Coroutine[Any, Any, T]]: ...
    @overload
    def __get__(
        self: Method[P, T, Enters], obj: Blocking, owner: type[Any]
    ) -> Callable[P, AbstractContextManager[T]]: ...
    @overload
    def __get__(
        self: Method[P, T, Enters], obj: Awaiting, owner: type[Any]
    ) -> Callable[P, AbstractAsyncContextManager[T]]: ...
    def __get__(self, obj: Any, owner: type[Any]) -> Any:
        if obj is None:
            return self
        build = self._build
        shell = obj._enter if self._enters else obj._run

        def run(*args: Any, **kwargs: Any) -> Any:
            return shell(build(obj, *args, **kwargs))

        awaits = isinstance(obj, Awaiting) and not self._enters
        return _function(run, awaits, type(obj), self)

    def __call__(self, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        return self.__get__(obj, type(obj))(*args, **kwargs)


def method(build: Callable[Concatenate[Any, P], Call[T]]) -> Method[P, T, Runs]:
    """Makes ``build`` a public method whose caller gets the call's result."""
    return Method(build, enters=False, doc=None)


def entering(like: Method[P, T, Runs], doc: str) -> Method[P, T, Enters]:
    """The method that makes the call of ``like`` and returns a context
    manager around its result."""
    return Method(like._build, enters=True, doc=doc)


@dataclass(frozen=True)
class Opening:
    """How a client opens its session: its settings and the first frame."""

    servers: list[config.Server]
    password: BytesLike
    connect_timeout: float
    request_timeout: float | None
    on_event: Callable[[Event], None] | None
    tls: config.Tls | None
    first: bytes
    resuming: bool


class Opener(Generic[P]):
    """``connect``/``resume``: ``build`` (the signature, the docstring, and
    the Opening made of the arguments) bound to a client class, which it
    opens (awaited for an asyncio client)."""

    def __init__(self, build: Callable[P, Opening]) -> None:
        self._build = build
        self.signature = _signature(build)
        self.__name__ = build.__name__
        self.__doc__ = build.__doc__

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.__name__ = name

    @overload
    def __get__(self, obj: object, owner: type[BC]) -> Callable[P, BC]: ...
    @overload
    def __get__(self, obj: object, owner: type[AC]) -> Callable[P, Coroutine[Any, Any, AC]]: ...
    def __get__(self, obj: object, owner: type[Any]) -> Any:
        build = self._build

        def run(*args: Any, **kwargs: Any) -> Any:
            return owner._opened(build(*args, **kwargs))

        return _function(run, issubclass(owner, Awaiting), owner, self)


def _hello(
    address: str | None = None,
    *,
    password: BytesLike | None = None,
    grace: float = 0.0,
    client_name: BytesLike | None = None,
    connect_timeout: float = 10.0,
    request_timeout: float | None = 30.0,
    on_event: Callable[[Event], None] | None = None,
    tls: ssl.SSLContext | bool | None = None,
    tls_ca: config.FilePath | None = None,
    tls_cert: config.FilePath | None = None,
    tls_key: config.FilePath | None = None,
    tls_server_name: str | None = None,
) -> Opening:
    """Connects and opens a new session (HELLO). ``grace`` (seconds, at most
    an hour): how long the session and its holds outlive a lost connection,
    waiting for ``reconnect()``/``resume()``. ``tls``: an ``ssl.SSLContext``,
    True (TLS trusting ``tls_ca``, else LIVELOCK_TLS_CA, else the system's
    CAs), False (plaintext), or None (TLS when a TLS option or setting is
    given); ``tls_cert``/``tls_key`` (else LIVELOCK_TLS_CLIENT_CERT/_KEY): a
    client certificate for mutual TLS; ``tls_server_name``: the name the
    server's certificate must carry (default: the host dialled)."""
    secret_word = config.password(password)
    first = c.Core.hello_frame(grace, secret_word, client_name or config.default_client_name())
    secure = config.tls(tls, ca=tls_ca, cert=tls_cert, key=tls_key, server_name=tls_server_name)
    servers = config.servers(address)
    return Opening(servers, secret_word, connect_timeout, request_timeout, on_event, secure, first, False)


def _resumption(
    session_id: int,
    secret: bytes,
    address: str | None = None,
    *,
    password: BytesLike | None = None,
    connect_timeout: float = 10.0,
    request_timeout: float | None = 30.0,
    on_event: Callable[[Event], None] | None = None,
    tls: ssl.SSLContext | bool | None = None,
    tls_ca: config.FilePath | None = None,
    tls_cert: config.FilePath | None = None,
    tls_key: config.FilePath | None = None,
    tls_server_name: str | None = None,
) -> Opening:
    """Connects and takes back a session within its grace period (RESUME).
    ``resumed`` then lists its holds; requests of the earlier client still
    in flight are cancelled. The options are ``connect()``'s."""
    secret_word = config.password(password)
    first = c.Core.resume_frame(session_id, secret, secret_word)
    secure = config.tls(tls, ca=tls_ca, cert=tls_cert, key=tls_key, server_name=tls_server_name)
    servers = config.servers(address)
    return Opening(servers, secret_word, connect_timeout, request_timeout, on_event, secure, first, True)


# ---- The client -------------------------------------------------------------


class _Flag(Protocol):
    """threading.Event or asyncio.Event."""

    def set(self) -> None: ...

    def clear(self) -> None: ...


class ClientBase(Generic[H, PA, PM, S, G, PP]):
    """A session with a livelock server, over one connection at a time.

    Open one with ``connect()`` or ``resume()``. Every method that waits
    takes ``timeout`` (seconds; None: the client's ``request_timeout``) and
    raises LivelockTimeout past it.
    """

    def __init__(
        self,
        opening: Opening,
        held: Callable[[Any, c.HoldState], H],
        pending: Callable[[Any, Started[Any]], PA],
        pending_all: Callable[[Any, Started[Any]], PM],
        semaphore: Callable[[Any, BytesLike, int], S],
        pool: Callable[[Any, c.PoolGrantState], G],
        pending_pool: Callable[[Any, Started[Any]], PP],
        core_lock: AbstractContextManager[Any],
        listed: _Flag,
    ) -> None:
        """What the shell brings: its Held, PendingAcquire, PendingAcquireAll,
        Semaphore, PoolGrant and PendingAcquirePool classes, the lock that
        guards the core (which is not thread-safe), and the flag set when a
        RESUME's listing completed or the connection ended."""
        self._servers = opening.servers
        self._password = opening.password
        self._connect_timeout = opening.connect_timeout
        self._tls = opening.tls
        self.request_timeout = opening.request_timeout
        self._make_held = held
        self._make_pending = pending
        self._make_pending_all = pending_all
        self._make_semaphore = semaphore
        self._make_pool = pool
        self._make_pending_pool = pending_pool
        self._core = c.Core()
        self._core_lock = core_lock
        self._listed = listed
        self._closing: object = None  # the connection this client closed itself
        self._hub = c.EventHub()
        if opening.on_event is not None:
            self._hub.add_listener(opening.on_event)

    connect = Opener(_hello)
    resume = Opener(_resumption)

    def _held(self, state: c.HoldState) -> H:
        return self._make_held(self, state)

    def _pending(self, started: Started[Any]) -> PA:
        return self._make_pending(self, started)

    def _pending_all(self, started: Started[Any]) -> PM:
        return self._make_pending_all(self, started)

    def _pool(self, state: c.PoolGrantState) -> G:
        return self._make_pool(self, state)

    def _pending_pool(self, started: Started[Any]) -> PP:
        return self._make_pending_pool(self, started)

    def _dial(self) -> Dial:
        return Dial(self._servers, self._connect_timeout, self._tls)

    # -- Timeouts.

    def _timeout(self, timeout: float | None) -> float | None:
        """How long a call waits for its answer: ``timeout``, else the
        client's request timeout."""
        return self.request_timeout if timeout is None else timeout

    def _ask(self, op: c.Op[T], timeout: float | None) -> Call[T]:
        """The call whose caller gets the reply's value as it is, waiting
        ``timeout`` (None: the request timeout)."""
        return Call(op, self._timeout(timeout), _as_is)

    # -- What the shell does.

    def _run(self, call: Call[Any]) -> Any:
        """Makes a call (a ``Blocking``'s or an ``Awaiting``'s ``_run``)."""
        raise NotImplementedError

    def _enter(self, call: Call[Any]) -> Any:
        """The context manager around a call's hold (``lock``), list of
        holds (``lock_all``) or pool grant (``lock_pool``), releasing them at
        the end of the block."""
        raise NotImplementedError

    def _write_quietly(self, frames: builtins.list[bytes]) -> None:
        """Sends frames nobody waits on; a dead connection is the reader's news."""
        raise NotImplementedError

    def _queue(self, event: Event) -> None:
        """Queues an event and wakes who waits for one."""
        raise NotImplementedError

    # -- The session.

    def _session(self) -> p.SessionInfo:
        """The session, which a client has once open."""
        assert self._core.session is not None
        return self._core.session

    @property
    def session_id(self) -> int:
        return self._session().session_id

    @property
    def secret(self) -> bytes:
        """What ``resume()`` needs with ``session_id``; keep it private."""
        return self._session().secret

    @property
    def grace(self) -> float:
        return self._session().grace_ms / 1000

    @property
    def connected(self) -> bool:
        return self._core.connected

    @property
    def resumed(self) -> c.Resumed[H] | None:
        """After a RESUME: the ids it listed in flight and every hold."""
        with self._core_lock:
            listed, in_flight = self._core.listed, self._core.in_flight
        if listed is None:
            return None
        return c.Resumed(in_flight, tuple(self._held(state) for state in listed))

    def _reconnect_frame(self) -> bytes:
        with self._core_lock:
            return self._core.reconnect_frame(self._password)

    def _check_resumed(self) -> None:
        if self._core.listed is None or not self._core.connected:
            raise ConnectionLost("the connection dropped during the RESUME listing")

    # -- Locks.

    @method
    def acquire(
        self,
        name: BytesLike,
        *,
        wait: float | None = None,
        shared: bool = False,
        lease: float | None = None,
        timeout: float | None = None,
    ) -> Call[H]:
        """Takes the lock (ACQUIRE). ``wait``: None waits forever (FIFO), 0
        tries once (LockBusy), else at most that many seconds
        (AcquireTimedOut). ``lease``: the hold ends unless extended in time.
        ``timeout``: how long this call waits for the answer (default: forever
        with ``wait=None``, else ``wait`` plus the request timeout); past it
        LivelockTimeout is raised. A caller that stops waiting (its timeout,
        Ctrl-C, a cancelled task) has the acquire cancelled, and a grant that
        comes anyway released."""
        op = c.acquire_op(name, wait=wait, shared=shared, lease=lease, notify_queued=False)
        return Call(op, c.acquire_timeout(wait, timeout, self.request_timeout), self._held)

    lock = entering(
        acquire,
        """``with client.lock(name) as held:`` (``async with`` on an AsyncClient)
        acquires as ``acquire`` does and releases this hold (by its token) at
        the end of the block.""",
    )

    @method
    def try_acquire(
        self, name: BytesLike, *, shared: bool = False, lease: float | None = None, timeout: float | None = None
    ) -> Call[H | None]:
        """One attempt: the hold, or None when someone else holds the lock."""
        op = c.try_acquire_op(name, shared=shared, lease=lease)
        return Call(op, c.acquire_timeout(0, timeout, self.request_timeout), self._held_if_granted)

    def _held_if_granted(self, state: c.HoldState | None) -> H | None:
        return None if state is None else self._held(state)

    @method
    def start_acquire(
        self, name: BytesLike, *, wait: float | None = None, shared: bool = False, lease: float | None = None
    ) -> Call[PA]:
        """Sends an ACQUIRE (asking to be told when it queues) and returns
        once it is sent; wait for it or cancel it with the returned
        PendingAcquire (whose ``wait`` waits as ``acquire`` would by
        default)."""
        op = c.acquire_op(name, wait=wait, shared=shared, lease=lease, notify_queued=True)
        return Call(op, c.acquire_timeout(wait, None, self.request_timeout), self._pending, detached=True)

    # -- Several locks at once.

    @method
    def acquire_all(
        self,
        names: Iterable[p.LockSpec],
        *,
        wait: float | None = None,
        shared: bool = False,
        timeout: float | None = None,
    ) -> Call[builtins.list[H]]:
        """Takes every lock of ``names`` or none (ACQUIRE_ALL): one hold per
        name, in the order given, each with its own fencing token and
        released like any other. ``names``: 1 to 32 distinct names, each a
        name (exclusive, or shared with ``shared=True``) or a ``(name,
        mode)`` pair, mode "exclusive" or "shared" (or a ``Mode``);
        ValueError before sending otherwise. The server takes them in
        ascending byte order, each in its FIFO queue, and gives back what it
        took if one fails, so the session never holds a part of the set and
        no two such requests deadlock each other. ``wait`` and ``timeout``
        are ``acquire``'s, for the whole set: None waits forever, 0 tries
        once (LockBusy), else at most that many seconds (AcquireTimedOut).
        No lease. While it is in flight the session's own acquires of these
        names get AlreadyHeldError, its releases and extends NotHeldError."""
        op = c.acquire_all_op(names, wait=wait, shared=shared, notify_queued=False)
        return Call(op, c.acquire_timeout(wait, timeout, self.request_timeout), self._held_all)

    lock_all = entering(
        acquire_all,
        """``with client.lock_all(names) as held:`` (``async with`` on an
        AsyncClient) takes every name as ``acquire_all`` does (``held``: the
        list of holds, in the order given) and releases each hold (by its
        token) at the end of the block.""",
    )

    @method
    def try_acquire_all(
        self, names: Iterable[p.LockSpec], *, shared: bool = False, timeout: float | None = None
    ) -> Call[builtins.list[H] | None]:
        """One attempt at every name: the holds, or None when one of them is
        taken (what the server took of the others it gave back first)."""
        op = c.try_acquire_all_op(names, shared=shared)
        return Call(op, c.acquire_timeout(0, timeout, self.request_timeout), self._held_all_if_granted)

    def _held_all(self, states: builtins.list[c.HoldState]) -> builtins.list[H]:
        return [self._held(state) for state in states]

    def _held_all_if_granted(self, states: builtins.list[c.HoldState] | None) -> builtins.list[H] | None:
        return None if states is None else self._held_all(states)

    @method
    def start_acquire_all(
        self, names: Iterable[p.LockSpec], *, wait: float | None = None, shared: bool = False
    ) -> Call[PM]:
        """Sends an ACQUIRE_ALL (asking to be told when it first queues) and
        returns once it is sent; wait for it or cancel it with the returned
        PendingAcquireAll (whose ``wait`` returns the list of holds)."""
        op = c.acquire_all_op(names, wait=wait, shared=shared, notify_queued=True)
        return Call(op, c.acquire_timeout(wait, None, self.request_timeout), self._pending_all, detached=True)

    # -- Resource pools.

    @method
    def acquire_pool(
        self,
        requirements: Iterable[p.RequirementSpec],
        *,
        wait: float | None = None,
        timeout: float | None = None,
    ) -> Call[G]:
        """Takes, for every requirement, ``need`` of its candidates whose tags
        match its filter ("K of these N", ACQUIRE_POOL): all requirements at
        once or none. ``requirements``: 1 to 16, each a ``Requirement`` or a
        plain name (a lock among them), with at most 64 candidates in all,
        each named once; ValueError before sending otherwise. The grant
        (a PoolGrant) tells which candidates each requirement got, each an
        ordinary exclusive hold with its own fencing token; its ``release()``
        (or the end of its ``with`` block) releases them, then the pool
        queues' permits. A requirement with more matching candidates than it
        needs waits in the pool's FIFO queue (a counting semaphore of the
        server's, whose permits the grant holds too); then the server takes
        free candidates in byte order, so pool requests and ``acquire_all``
        never deadlock each other. ``wait`` and ``timeout`` are
        ``acquire_all``'s: None waits forever, 0 tries once (LockBusy), else
        at most that many seconds (AcquireTimedOut). No lease. A caller that
        stops waiting has the request cancelled, and a grant that comes
        anyway released. OverCapacityError if a requirement's filter leaves
        fewer candidates than it needs; AlreadyHeldError if the session
        holds or waits for one of the candidates."""
        op = c.acquire_pool_op(requirements, wait=wait, notify_queued=False)
        return Call(op, c.acquire_timeout(wait, timeout, self.request_timeout), self._pool)

    lock_pool = entering(
        acquire_pool,
        """``with client.lock_pool(requirements) as grant:`` (``async with`` on
        an AsyncClient) takes them as ``acquire_pool`` does and releases
        every resource, then the queues' permits, at the end of the
        block.""",
    )

    @method
    def try_acquire_pool(
        self, requirements: Iterable[p.RequirementSpec], *, timeout: float | None = None
    ) -> Call[G | None]:
        """One attempt at every requirement: the PoolGrant, or None when one
        of them cannot be met now (what the server took it gave back
        first)."""
        op = c.try_acquire_pool_op(requirements)
        return Call(op, c.acquire_timeout(0, timeout, self.request_timeout), self._pool_if_granted)

    def _pool_if_granted(self, state: c.PoolGrantState | None) -> G | None:
        return None if state is None else self._pool(state)

    @method
    def start_acquire_pool(
        self, requirements: Iterable[p.RequirementSpec], *, wait: float | None = None
    ) -> Call[PP]:
        """Sends an ACQUIRE_POOL (asking to be told when it first queues) and
        returns once it is sent; wait for it or cancel it with the returned
        PendingAcquirePool (whose ``wait`` returns the PoolGrant)."""
        op = c.acquire_pool_op(requirements, wait=wait, notify_queued=True)
        return Call(op, c.acquire_timeout(wait, None, self.request_timeout), self._pending_pool, detached=True)

    # -- Releases and leases.

    @method
    def release(self, name: BytesLike, *, token: int | None = None, timeout: float | None = None) -> Call[None]:
        """Releases this session's hold of ``name`` (RELEASE): only the hold
        with ``token`` if given (WrongTokenError otherwise), else whatever
        hold it has. NotHeldError if it holds none."""
        return self._ask(c.release_op(name, token), timeout)

    @method
    def extend(
        self, name: BytesLike, lease: float, *, token: int | None = None, timeout: float | None = None
    ) -> Call[None]:
        """Renews the lease of this session's hold of ``name`` (EXTEND): it now
        ends ``lease`` seconds from now unless extended again."""
        return self._ask(c.extend_op(name, lease, token), timeout)

    # -- Semaphores and ordered locking.

    def semaphore(self, name: BytesLike, capacity: int) -> S:
        """The counting semaphore ``name`` of ``capacity`` permits (nothing
        is sent): take permits with its ``acquire(weight)`` (or ``with
        semaphore.permits(weight)``), release them as any hold. The capacity
        belongs to the name while anyone holds or waits for it: an acquire
        naming another one gets CapacityConflictError; ``set_capacity``
        changes it. A name is a lock or a semaphore, never both
        (WrongKindError)."""
        return self._make_semaphore(self, name, capacity)

    @method
    def set_order(self, order: p.Order, *, timeout: float | None = None) -> Call[None]:
        """Declares the order this session takes names in (SET_ORDER): None,
        no order (the default); "ascending", names in ascending byte order;
        or a mapping of names to priorities (u32; lower first, equal ones by
        name, names not listed after every listed one, by name). Afterwards
        an acquire of a name ranking before one the session holds or waits
        for raises OrderViolationError. Sessions that keep one order cannot
        deadlock each other. Declared while the session holds and waits for
        nothing (else OrderViolationError); it lasts as long as the
        session."""
        return self._ask(c.set_order_op(order), timeout)

    # -- Signals.

    @method
    def signal(self, name: BytesLike, signal: BytesLike, *, timeout: float | None = None) -> Call[bool]:
        """Raises ``signal`` on a held lock (any session may): its holders get
        a Signal event if it was not raised yet. NotHeldError if nobody
        holds the lock."""
        return self._ask(c.signal_op(name, signal, p.SignalOp.RAISE), timeout)

    @method
    def signal_exists(self, name: BytesLike, signal: BytesLike, *, timeout: float | None = None) -> Call[bool]:
        """Whether ``signal`` is raised on ``name``."""
        return self._ask(c.signal_op(name, signal, p.SignalOp.EXISTS), timeout)

    @method
    def clear_signal(self, name: BytesLike, signal: BytesLike, *, timeout: float | None = None) -> Call[bool]:
        """Clears ``signal``; whether it was raised."""
        return self._ask(c.signal_op(name, signal, p.SignalOp.CLEAR), timeout)

    # -- Queries and operator requests.

    @method
    def inspect(self, name: BytesLike, *, timeout: float | None = None) -> Call[p.Inspection | None]:
        """Who holds ``name`` and who waits for it; None when nobody holds it."""
        return self._ask(c.inspect_op(name), timeout)

    @method
    def list(self, pattern: BytesLike = "", *, limit: int = 1000, timeout: float | None = None) -> Call[p.Listing]:
        """Held locks whose name matches the glob ``pattern`` (``*``, ``?``,
        ``[...]``; empty: all), sorted by name, at most ``limit``."""
        return self._ask(c.list_op(pattern, limit), timeout)

    @method
    def stats(self, *, timeout: float | None = None) -> Call[p.Stats]:
        """The server's counters and version (STATS)."""
        return self._ask(c.stats_op(), timeout)

    @method
    def ping(self, *, timeout: float | None = None) -> Call[None]:
        """A round trip to the server (PING)."""
        return self._ask(c.ping_op(), timeout)

    @method
    def force_release(self, name: BytesLike, *, token: int | None = None, timeout: float | None = None) -> Call[None]:
        """Operator: ends every hold of ``name`` (or the one with ``token``);
        each holder gets LockLost."""
        return self._ask(c.force_release_op(name, token), timeout)

    @method
    def kill_session(self, session_id: int, *, timeout: float | None = None) -> Call[None]:
        """Operator: ends a session (its holds released, its client told)."""
        return self._ask(c.kill_session_op(session_id), timeout)

    # -- Events.

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """Calls ``listener(event)`` for every event, on the client's reader
        (the blocking client's thread, the asyncio client's task): it must
        return quickly and must not wait for this client's replies."""
        self._hub.add_listener(listener)

    def remove_listener(self, listener: Callable[[Event], None]) -> None:
        self._hub.remove_listener(listener)

    @property
    def signals_dropped(self) -> int:
        """Signals dropped because EVENTS_MAX events were unread."""
        return self._hub.signals_dropped

    # -- What the core says.

    def _apply(self, outcome: c.Outcome) -> None:
        """Does what the core said after taking a frame: send, publish, and
        tell a RESUME its listing is complete."""
        self._write_quietly(outcome.send)
        for event in outcome.events:
            self._queue(event)
            self._hub.notify(event)
        if outcome.listed:
            self._listed.set()

    def _forget(self, hold: c.HoldState) -> None:
        """A hold whose release could not be sent: released when possible."""
        with self._core_lock:
            frames = self._core.drop_hold(hold)
        self._write_quietly(frames)


# ---- Semaphores --------------------------------------------------------------


class SemaphoreBase(Generic[H, PA]):
    """A counting semaphore of ``capacity`` permits named ``name`` (made by
    ``client.semaphore(name, capacity)``; nothing is sent until a call).
    Each hold takes a ``weight`` of the permits, and the permits out never
    exceed the capacity when a grant is made. Grants are strictly FIFO: a
    request at the head of the queue waits until its weight fits, and
    nothing behind it passes it. A hold of permits is a ``Held`` like a
    lock's (fencing token, lease, ``release``, ``extend``, LockLost), with
    its ``weight``; a session holds or waits for a name at most once."""

    def __init__(self, client: ClientBase[H, PA, Any, Any, Any, Any], name: BytesLike, capacity: int) -> None:
        self._client = client
        self.name: Final = p.lock_name(name)
        self.capacity = p.semaphore_capacity(capacity)

    def _run(self, call: Call[Any]) -> Any:
        return self._client._run(call)

    def _enter(self, call: Call[Any]) -> Any:
        return self._client._enter(call)

    def _acquire(self, weight: int, wait: float | None, lease: float | None, notify_queued: bool) -> c.Op[c.HoldState]:
        return c.acquire_permits_op(
            self.name, weight, self.capacity, wait=wait, lease=lease, notify_queued=notify_queued
        )

    @method
    def acquire(
        self, weight: int = 1, *, wait: float | None = None, lease: float | None = None, timeout: float | None = None
    ) -> Call[H]:
        """Takes ``weight`` permits (ACQUIRE_PERMITS; 1 to the capacity).
        ``wait``, ``lease`` and ``timeout`` are ``Client.acquire``'s: None
        waits forever (FIFO), 0 tries once (LockBusy), else at most that many
        seconds (AcquireTimedOut). OverCapacityError if the capacity was
        lowered below ``weight`` while it waited."""
        timeout = c.acquire_timeout(wait, timeout, self._client.request_timeout)
        return Call(self._acquire(weight, wait, lease, False), timeout, self._client._held)

    permits = entering(
        acquire,
        """``with semaphore.permits(weight) as held:`` (``async with`` on an
        AsyncClient's) takes permits as ``acquire`` does and releases this
        hold (by its token) at the end of the block.""",
    )

    @method
    def try_acquire(
        self, weight: int = 1, *, lease: float | None = None, timeout: float | None = None
    ) -> Call[H | None]:
        """One attempt: the hold, or None when the permits are not free (or
        others queue before)."""
        op = c.try_acquire_permits_op(self.name, weight, self.capacity, lease=lease)
        return Call(op, c.acquire_timeout(0, timeout, self._client.request_timeout), self._client._held_if_granted)

    @method
    def start_acquire(self, weight: int = 1, *, wait: float | None = None, lease: float | None = None) -> Call[PA]:
        """Sends an ACQUIRE_PERMITS (asking to be told when it queues) and
        returns its PendingAcquire once it is sent, as
        ``Client.start_acquire``."""
        timeout = c.acquire_timeout(wait, None, self._client.request_timeout)
        return Call(self._acquire(weight, wait, lease, True), timeout, self._client._pending, detached=True)

    @method
    def set_capacity(self, capacity: int, *, timeout: float | None = None) -> Call[bool]:
        """Changes the capacity (SET_CAPACITY; any session may): holders keep
        their permits (more may be out than the new capacity until they
        release them), waiters heavier than it end with OverCapacityError,
        those that now fit are granted. This object names the new capacity
        from now on. True if the semaphore was in use (held or waited for),
        False if not: there was nothing to change on the server (the next
        acquire sets the capacity). WrongKindError if the name is a lock."""
        op = c.set_capacity_op(self.name, capacity)

        def changed(in_use: bool) -> bool:
            self.capacity = capacity
            return in_use

        return Call(op, self._client._timeout(timeout), changed)

    @method
    def inspect(self, *, timeout: float | None = None) -> Call[p.Inspection | None]:
        """Who holds permits (``Holder.weight``) and who waits for how many;
        the capacity in use is ``record.capacity``. None when nobody holds
        any."""
        return self._client._ask(c.inspect_op(self.name), timeout)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} capacity={self.capacity}>"


# ---- Holds and pending acquires ---------------------------------------------


class _Runner(Protocol):
    """What holds and pending acquires need of their client."""

    def _run(self, call: Call[Any]) -> Any: ...

    def _forget(self, hold: c.HoldState) -> None: ...

    def _timeout(self, timeout: float | None) -> float | None: ...

    def _ask(self, op: c.Op[T], timeout: float | None) -> Call[T]: ...


class _OfClient(Generic[C]):
    """An object whose calls its client makes."""

    def __init__(self, client: C) -> None:
        self._client = client

    def _run(self, call: Call[Any]) -> Any:
        return self._client._run(call)

    def _ask(self, op: c.Op[T], timeout: float | None) -> Call[T]:
        return self._client._ask(op, timeout)


class HeldBase(_OfClient[C]):
    """A hold: the lock's ``name``, the ``token`` of this grant (the fencing
    token: larger than every earlier grant's), its ``mode`` (PERMITS for a
    semaphore's, with their ``weight``: None for a lock, or for permits a
    RESUME listed), and whether it is still held as far as this client
    knows."""

    def __init__(self, client: C, state: c.HoldState) -> None:
        super().__init__(client)
        self._state = state
        self.name: Final = state.name
        self.token: Final = state.token
        self.mode: Final = state.mode
        self.weight: Final = state.weight

    @property
    def lost(self) -> bool:
        """True once the server took the hold away (LockLost)."""
        return self._state.lost

    @property
    def active(self) -> bool:
        """Neither released nor lost."""
        return self._state.active

    @method
    def release(self, *, timeout: float | None = None) -> Call[None]:
        """Releases this hold, by its token; nothing if already released."""
        if self._state.released:
            return Call(None, None, _as_is)
        return self._ask(c.release_op(self.name, self.token), timeout)

    @method
    def extend(self, lease: float, *, timeout: float | None = None) -> Call[None]:
        """Renews this hold's lease (WrongTokenError if it was lost and the
        session holds the lock again under a newer grant)."""
        return self._ask(c.extend_op(self.name, lease, self.token), timeout)

    def _release_failed(self, error: LivelockError, body_raised: bool) -> bool:
        """The release at the end of a ``with`` block failed: whether that
        raises. Never over the block's own exception, nor when the hold is
        gone anyway (lost meanwhile). A release that could not be sent (the
        connection is gone) is not an error either: the hold is forgotten,
        and ends with the session or is released when a RESUME lists it."""
        if isinstance(error, ConnectionLost):
            self._client._forget(self._state)
            return False
        return not body_raised and not isinstance(error, (p.NotHeldError, p.WrongTokenError))

    def __repr__(self) -> str:
        state = "lost" if self._state.lost else "released" if self._state.released else "held"
        mode = self.mode.name.lower() if self.weight is None else f"permits weight={self.weight}"
        return f"<{type(self).__name__} {self.name!r} token={self.token} {mode} {state}>"


class PendingBase(_OfClient[C], Generic[C, W]):
    """An ACQUIRE (or ACQUIRE_PERMITS, ACQUIRE_ALL, ACQUIRE_POOL) sent by a
    ``start_acquire``, not answered yet."""

    def __init__(self, client: C, started: Started[W]) -> None:
        super().__init__(client)
        self.request_id = started.request_id
        self._waiter = started.waiter
        self._default_wait = started.timeout

    @method
    def cancel(self, *, timeout: float | None = None) -> Call[bool]:
        """Withdraws the acquire (CANCEL): True if it was still pending (``wait``
        then raises AcquireCancelled), False if it had completed (``wait``
        returns the hold, to be released)."""
        return self._ask(c.cancel_op(self.request_id), timeout)

    def _wait_timeout(self, timeout: float | None) -> float | None:
        """How long ``wait`` waits: ``timeout``, else as ``acquire`` would
        (forever with ``wait=None``, else ``wait`` plus the request timeout)."""
        return self._default_wait if timeout is None else timeout

    def _queued_timeout(self, timeout: float | None) -> float | None:
        """How long ``wait_queued`` waits: ``timeout``, else the request timeout."""
        return self._client._timeout(timeout)

    def _late(self, timeout: float | None) -> LivelockTimeout:
        return LivelockTimeout(f"acquire {self.request_id} not answered within {timeout} s")


class _Holding(Protocol[HB_co]):
    """What a pool grant needs of its client: its holds made."""

    def _held(self, state: c.HoldState) -> HB_co: ...


class PoolGrantBase(Generic[HB]):
    """A granted ACQUIRE_POOL: per requirement (in the order given; ``len``,
    indexing and iteration go by requirement) the holds of the candidates
    it took, in candidate order, each an exclusive hold with its own
    fencing token; ``indices(r)``: which of requirement ``r``'s candidates
    they are; ``permits``: per requirement the hold of its pool queue's
    permits (a semaphore's, ``weight`` = its need), None if it had no
    queue. ``release()`` and the end of a ``with`` block release the
    resources, then the permits."""

    def __init__(self, client: _Holding[HB], state: c.PoolGrantState) -> None:
        self.resources: Final = [[client._held(hold) for hold in part] for part in state.resources]
        self.permits: Final = [None if hold is None else client._held(hold) for hold in state.permits]
        self._indices = state.indices

    def __len__(self) -> int:
        return len(self.resources)

    def __getitem__(self, requirement: int) -> builtins.list[HB]:
        """The holds requirement ``requirement`` got."""
        return self.resources[requirement]

    def __iter__(self) -> Iterator[builtins.list[HB]]:
        return iter(self.resources)

    def names(self, requirement: int) -> builtins.list[bytes]:
        """The names of the candidates requirement ``requirement`` got."""
        return [held.name for held in self.resources[requirement]]

    def tokens(self, requirement: int) -> builtins.list[int]:
        """Their fencing tokens."""
        return [held.token for held in self.resources[requirement]]

    def indices(self, requirement: int) -> builtins.list[int]:
        """Their indices among the requirement's candidates, as given."""
        return builtins.list(self._indices[requirement])

    @property
    def holds(self) -> builtins.list[HB]:
        """Every hold, in the order they are released: the resources
        (requirement by requirement), then the pool queues' permits."""
        resources = [held for part in self.resources for held in part]
        return resources + [held for held in self.permits if held is not None]

    @property
    def active(self) -> bool:
        """Whether any of its holds is still held (neither released nor lost)."""
        return any(held.active for held in self.holds)

    def __repr__(self) -> str:
        parts = ", ".join("[" + ", ".join(repr(name) for name in self.names(r)) + "]" for r in range(len(self)))
        return f"<{type(self).__name__} {parts}{'' if self.active else ' released'}>"


# ---- Connections ------------------------------------------------------------


class Dial:
    """Opening a connection, less the I/O: the servers to try in order, with
    TLS or not, why those tried failed, the reply to the first frame (and
    whatever came with it) read from what the shell receives, and what each
    failure raises."""

    def __init__(self, servers: list[config.Server], timeout: float, tls: config.Tls | None) -> None:
        self._servers = servers
        self.timeout = timeout
        self.tls = tls
        self.where = ""
        self.decoder = p.FrameDecoder()
        self.frames: list[p.Frame] = []
        self._failures: list[str] = []
        self._last: BaseException | None = None

    def __iter__(self) -> Iterator[config.Server]:
        for host, port in self._servers:
            self.where = f"{host}:{port}"
            # What a server passed over had sent is not the next one's.
            self.decoder = p.FrameDecoder()
            self.frames = []
            yield host, port

    def tls_for(self, host: str) -> tuple[ssl.SSLContext | None, str | None]:
        """The TLS context for a connection to ``host`` and the name its
        certificate must carry; (None, None) for plaintext."""
        if self.tls is None:
            return None, None
        return self.tls.context, self.tls.name_for(host)

    def refused(self, error: BaseException) -> None:
        """The server did not accept the connection (or its TLS handshake
        failed): the next one is tried."""
        self._failed(f"{self.where}: {_why(error)}", error)

    def _failed(self, why: str, error: BaseException) -> None:
        self._failures.append(why)
        self._last = error

    def failure(self) -> LivelockError:
        """What to raise when no server answered: LivelockTimeout if the
        last one tried accepted the connection and said nothing in time,
        else ConnectionLost (caused by the last one's error); either lists
        why each server failed."""
        text = "could not connect: " + "; ".join(self._failures)
        error: LivelockError = (
            LivelockTimeout(text) if isinstance(self._last, LivelockTimeout) else ConnectionLost(text)
        )
        error.__cause__ = self._last
        return error

    @contextlib.contextmanager
    def answering(self, close: Callable[[], None], timeout: type[BaseException]) -> Iterator[None]:
        """Around sending the first frame and reading the reply: any failure
        closes the connection. A server that does not answer in time (a
        cluster member that is frozen accepts connections but answers none)
        or drops the connection is passed over like one that refused it: the
        block ends quietly and the next server is tried; when none answers,
        ``failure()`` raises."""
        try:
            yield
        except BaseException as error:
            close()
            if isinstance(error, timeout):
                silent = LivelockTimeout(f"{self.where} did not answer within {self.timeout} s")
                self._failed(str(silent), silent)
            elif isinstance(error, OSError):
                self.refused(error)
            elif isinstance(error, ConnectionLost):  # closed before answering
                self._failed(str(error), error)
            else:
                raise

    def feed(self, data: bytes) -> bool:
        """Takes what the server sent; whether its reply has come."""
        if not data:
            # What a server started with --tls-required does to plaintext.
            hint = "" if self.tls is not None else " (does it require TLS?)"
            raise ConnectionLost(f"{self.where} closed the connection before answering{hint}")
        self.frames += self.decoder.feed(data)
        return bool(self.frames)


def _why(error: BaseException) -> str:
    """An error of dialling, as a failure's text says it."""
    if isinstance(error, ssl.SSLError):
        return f"TLS: {error}"  # e.g. the certificate failed verification, or a client certificate is required
    return str(error) or "timed out"


def disconnect_reason(error: Exception | None, closed_here: bool) -> str:
    """Why a connection ended, as Disconnected says: ``error`` ended the
    reader (None: the server closed the connection), ``closed_here``: this
    client closed it."""
    if closed_here:
        return "closed by this client"
    if isinstance(error, p.ProtocolError):
        return f"protocol error: {error}"
    if error is not None:
        return f"connection error: {error}"
    return "the server closed the connection"
