"""The blocking client: a socket, one reader thread, and waiters.

This module owns only the blocking I/O: dialling, the handshake, the reader
thread that hands every frame to the shared state machine
(``livelock_client.core``) and applies what it says (replies to the threads
waiting for them, pushes to the events queue and callbacks, frames to send),
and the waits, each bounded by a timeout. Any number of threads may use one
``Client``; requests are pipelined and matched by request id.
"""

from __future__ import annotations

import builtins
import contextlib
import socket
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Callable, Generic, TypeVar, cast

from . import config
from . import core as c
from .core import Event, HoldState, Op, Resumed
from .protocol import (
    BytesLike,
    ConnectionLost,
    Frame,
    FrameDecoder,
    Inspection,
    Listing,
    LivelockError,
    LivelockTimeout,
    LockBusy,
    ProtocolError,
    SignalOp,
    Stats,
)

T = TypeVar("T")

_READ_SIZE = 65536


class _Waiter(Generic[T]):
    """A thread waiting for one reply."""

    def __init__(self) -> None:
        self._queued = threading.Event()
        self._done = threading.Event()
        self._value: T | None = None
        self._error: LivelockError | None = None

    def queued(self) -> None:
        self._queued.set()

    def done(self, value: Any) -> None:
        self._value = value
        self._done.set()
        self._queued.set()

    def failed(self, error: LivelockError) -> None:
        self._error = error
        self._done.set()
        self._queued.set()

    def peek(self) -> object:
        return self._value if self._done.is_set() else None

    def wait(self, timeout: float | None) -> bool:
        return self._done.wait(timeout)

    def wait_queued(self, timeout: float | None) -> bool:
        return self._queued.wait(timeout)

    def result(self) -> T:
        if self._error is not None:
            raise self._error
        return cast(T, self._value)


def _handshake(
    servers: list[config.Server], first: bytes, timeout: float
) -> tuple[socket.socket, Frame, FrameDecoder, list[Frame]]:
    """Dials the servers in order, sends HELLO/RESUME on the first that
    answers, and reads its reply (and whatever came with it)."""
    failures = []
    for host, port in servers:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            failures.append(f"{host}:{port}: {e}")
            continue
        try:
            config.configure_socket(sock)
            sock.sendall(first)
            decoder = FrameDecoder()
            frames: list[Frame] = []
            while not frames:
                data = sock.recv(_READ_SIZE)
                if not data:
                    raise ConnectionLost(f"{host}:{port} closed the connection before answering")
                frames = decoder.feed(data)
            sock.settimeout(None)
            return sock, frames[0], decoder, frames[1:]
        except socket.timeout:
            sock.close()
            raise LivelockTimeout(f"{host}:{port} did not answer within {timeout} s") from None
        except OSError as e:
            sock.close()
            raise ConnectionLost(f"{host}:{port}: {e}") from e
        except BaseException:
            sock.close()
            raise
    raise ConnectionLost("could not connect: " + "; ".join(failures))


class Client:
    """A session with a livelock server, over one connection at a time.

    Open one with ``Client.connect()`` or ``Client.resume()``. Every method
    that waits takes ``timeout`` (seconds; None: the client's
    ``request_timeout``) and raises LivelockTimeout past it.
    """

    def __init__(
        self,
        servers: builtins.list[config.Server],
        password: BytesLike,
        connect_timeout: float,
        request_timeout: float | None,
        on_event: Callable[[Event], None] | None,
    ) -> None:
        self._servers = servers
        self._password = password
        self._connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._core = c.Core()
        self._hub = c.EventHub()
        if on_event is not None:
            self._hub.add_listener(on_event)
        self._lock = threading.Lock()  # guards the core
        self._write_lock = threading.Lock()
        self._events_ready = threading.Condition()
        self._listed = threading.Event()
        self._sock: socket.socket | None = None
        self._closing: socket.socket | None = None
        self._reader: threading.Thread | None = None

    @classmethod
    def connect(
        cls,
        address: str | None = None,
        *,
        password: BytesLike | None = None,
        grace: float = 0.0,
        client_name: BytesLike | None = None,
        connect_timeout: float = 10.0,
        request_timeout: float | None = 30.0,
        on_event: Callable[[Event], None] | None = None,
    ) -> Client:
        """Connects and opens a new session (HELLO). ``grace`` (seconds, at most
        an hour): how long the session and its holds outlive a lost
        connection, waiting for ``reconnect()``/``resume()``."""
        secret_word = config.password(password)
        first = c.Core.hello_frame(grace, secret_word, client_name or config.default_client_name())
        client = cls(config.servers(address), secret_word, connect_timeout, request_timeout, on_event)
        client._open(first, resuming=False)
        return client

    @classmethod
    def resume(
        cls,
        session_id: int,
        secret: bytes,
        address: str | None = None,
        *,
        password: BytesLike | None = None,
        connect_timeout: float = 10.0,
        request_timeout: float | None = 30.0,
        on_event: Callable[[Event], None] | None = None,
    ) -> Client:
        """Connects and takes back a session within its grace period (RESUME).
        ``resumed`` then lists its holds; requests of the earlier client
        still in flight are cancelled."""
        client = cls(config.servers(address), config.password(password), connect_timeout, request_timeout, on_event)
        client._open(client._core.resume_frame(client._password, session_id, secret), resuming=True)
        return client

    # -- The session.

    @property
    def session_id(self) -> int:
        assert self._core.session is not None
        return self._core.session.session_id

    @property
    def secret(self) -> bytes:
        """What ``resume()`` needs with ``session_id``; keep it private."""
        assert self._core.session is not None
        return self._core.session.secret

    @property
    def grace(self) -> float:
        assert self._core.session is not None
        return self._core.session.grace_ms / 1000

    @property
    def connected(self) -> bool:
        return self._core.connected

    @property
    def resumed(self) -> Resumed[Held] | None:
        """After a RESUME: the ids it listed in flight and every hold."""
        with self._lock:
            if self._core.listed is None:
                return None
            holds = tuple(Held(self, state) for state in self._core.listed)
            return Resumed(self._core.in_flight, holds)

    def reconnect(self) -> None:
        """Takes this client's session back on a new connection (within its
        grace). ``Held`` objects keep working; holds lost meanwhile get a
        LockLost event; requests that were waiting have failed with
        ConnectionLost (an ACQUIRE still queued is cancelled)."""
        self.close()
        with self._lock:
            first = self._core.resume_frame(self._password)
        self._open(first, resuming=True)

    def _open(self, first: bytes, resuming: bool) -> None:
        sock, frame, decoder, rest = _handshake(self._servers, first, self._connect_timeout)
        try:
            with self._lock:
                outcomes = [self._core.on_session(frame)]
                self._listed.clear()
                self._sock = sock
                outcomes += [self._core.on_frame(f) for f in rest]
        except BaseException:
            sock.close()
            raise
        for outcome in outcomes:
            self._apply(outcome)
        self._reader = threading.Thread(
            target=self._read_loop, args=(sock, decoder), name="livelock-client", daemon=True
        )
        self._reader.start()
        if resuming:
            if not self._listed.wait(self._connect_timeout):
                self.close()
                raise LivelockTimeout("the RESUME listing of holds did not end in time")
            if self._core.listed is None or not self._core.connected:
                raise ConnectionLost("the connection dropped during the RESUME listing")

    def close(self) -> None:
        """Closes the connection without ending the session: with a grace
        period it keeps its holds for that long; without one it ends now."""
        with self._lock:
            sock, reader = self._sock, self._reader
            self._closing = sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if reader is not None and reader is not threading.current_thread():
            reader.join(self._connect_timeout)

    def bye(self, timeout: float | None = None) -> None:
        """Ends the session at once (every hold released, whatever the
        grace) and closes the connection."""
        try:
            self._call(c.bye_op(), timeout)
        finally:
            self.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self.connected:
                self.bye()
        except LivelockError:
            pass
        finally:
            self.close()

    # -- Locks.

    def acquire(
        self,
        name: BytesLike,
        *,
        wait: float | None = None,
        shared: bool = False,
        lease: float | None = None,
        timeout: float | None = None,
    ) -> Held:
        """Takes the lock (ACQUIRE). ``wait``: None waits forever (FIFO), 0
        tries once (LockBusy), else at most that many seconds
        (AcquireTimedOut). ``lease``: the hold ends unless extended in time.
        ``timeout``: how long this call waits for the answer (default: forever
        with ``wait=None``, else ``wait`` plus the request timeout); past it
        the acquire is cancelled and LivelockTimeout raised."""
        op = c.acquire_op(name, wait=wait, shared=shared, lease=lease, notify_queued=False)
        state = self._call(op, c.acquire_timeout(wait, timeout, self.request_timeout))
        return Held(self, state)

    def try_acquire(
        self, name: BytesLike, *, shared: bool = False, lease: float | None = None, timeout: float | None = None
    ) -> Held | None:
        """One attempt: the hold, or None when someone else holds the lock."""
        try:
            return self.acquire(name, wait=0, shared=shared, lease=lease, timeout=timeout)
        except LockBusy:
            return None

    @contextlib.contextmanager
    def lock(
        self,
        name: BytesLike,
        *,
        wait: float | None = None,
        shared: bool = False,
        lease: float | None = None,
        timeout: float | None = None,
    ) -> Iterator[Held]:
        """``with client.lock(name) as held:`` acquires as ``acquire`` does and
        releases this hold (by its token) at the end of the block."""
        with self.acquire(name, wait=wait, shared=shared, lease=lease, timeout=timeout) as held:
            yield held

    def start_acquire(
        self,
        name: BytesLike,
        *,
        wait: float | None = None,
        shared: bool = False,
        lease: float | None = None,
    ) -> PendingAcquire:
        """Sends an ACQUIRE (asking to be told when it queues) and returns at
        once; wait for it or cancel it with the returned PendingAcquire."""
        op = c.acquire_op(name, wait=wait, shared=shared, lease=lease, notify_queued=True)
        waiter: _Waiter[HoldState] = _Waiter()
        request_id = self._send(op, waiter)
        return PendingAcquire(self, request_id, waiter)

    def release(self, name: BytesLike, *, token: int | None = None, timeout: float | None = None) -> None:
        """Releases this session's hold of ``name`` (RELEASE): only the hold
        with ``token`` if given (WrongTokenError otherwise), else whatever
        hold it has. NotHeldError if it holds none."""
        self._call(c.release_op(name, token), timeout)

    def extend(self, name: BytesLike, lease: float, *, token: int | None = None, timeout: float | None = None) -> None:
        """Renews the lease of this session's hold of ``name`` (EXTEND): it now
        ends ``lease`` seconds from now unless extended again."""
        self._call(c.extend_op(name, lease, token), timeout)

    # -- Signals.

    def signal(self, name: BytesLike, signal: BytesLike, *, timeout: float | None = None) -> bool:
        """Raises ``signal`` on a held lock (any session may): its holders get
        a Signal event if it was not raised yet. NotHeldError if nobody
        holds the lock."""
        return self._call(c.signal_op(name, signal, SignalOp.RAISE), timeout)

    def signal_exists(self, name: BytesLike, signal: BytesLike, *, timeout: float | None = None) -> bool:
        return self._call(c.signal_op(name, signal, SignalOp.EXISTS), timeout)

    def clear_signal(self, name: BytesLike, signal: BytesLike, *, timeout: float | None = None) -> bool:
        """Clears ``signal``; whether it was raised."""
        return self._call(c.signal_op(name, signal, SignalOp.CLEAR), timeout)

    # -- Queries and operator requests.

    def inspect(self, name: BytesLike, *, timeout: float | None = None) -> Inspection | None:
        """Who holds ``name`` and who waits for it; None when nobody holds it."""
        return self._call(c.inspect_op(name), timeout)

    def list(self, pattern: BytesLike = "", *, limit: int = 1000, timeout: float | None = None) -> Listing:
        """Held locks whose name matches the glob ``pattern`` (``*``, ``?``,
        ``[...]``; empty: all), sorted by name, at most ``limit``."""
        return self._call(c.list_op(pattern, limit), timeout)

    def stats(self, *, timeout: float | None = None) -> Stats:
        return self._call(c.stats_op(), timeout)

    def ping(self, *, timeout: float | None = None) -> None:
        self._call(c.ping_op(), timeout)

    def force_release(self, name: BytesLike, *, token: int | None = None, timeout: float | None = None) -> None:
        """Operator: ends every hold of ``name`` (or the one with ``token``);
        each holder gets LockLost."""
        self._call(c.force_release_op(name, token), timeout)

    def kill_session(self, session_id: int, *, timeout: float | None = None) -> None:
        """Operator: ends a session (its holds released, its client told)."""
        self._call(c.kill_session_op(session_id), timeout)

    # -- Events.

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """Calls ``listener(event)`` for every event, on the reader thread: it
        must return quickly and must not wait for this client's replies."""
        self._hub.add_listener(listener)

    def remove_listener(self, listener: Callable[[Event], None]) -> None:
        self._hub.remove_listener(listener)

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The oldest unread event, waiting at most ``timeout`` (None:
        forever); None if none came."""
        with self._events_ready:
            self._events_ready.wait_for(lambda: len(self._hub) > 0, timeout)
            return self._hub.pop()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events as they come; ends after ``timeout`` seconds without one,
        or after Disconnected."""
        while True:
            event = self.next_event(timeout)
            if event is None:
                return
            yield event
            if isinstance(event, c.Disconnected):
                return

    @property
    def signals_dropped(self) -> int:
        """Signals dropped because EVENTS_MAX events were unread."""
        return self._hub.signals_dropped

    # -- Plumbing.

    def _send(self, op: Op[T], waiter: _Waiter[T]) -> int:
        with self._lock:
            request_id, frame = self._core.request(op, waiter)
        try:
            self._write(frame)
        except ConnectionLost:
            with self._lock:
                self._core.abandon(request_id, waiter, keep_result=False)
            raise
        return request_id

    def _not_on_reader(self) -> None:
        """Waiting on the reader thread (in a listener) could never end."""
        if threading.current_thread() is self._reader:
            raise RuntimeError("an event listener runs on the reader thread: it must not wait for replies")

    def _call(self, op: Op[T], timeout: float | None) -> T:
        self._not_on_reader()
        waiter: _Waiter[T] = _Waiter()
        request_id = self._send(op, waiter)
        self._wait(request_id, waiter, timeout)
        return waiter.result()

    def _wait(self, request_id: int, waiter: _Waiter[Any], timeout: float | None) -> None:
        """Waits for the final reply; past ``timeout``, or interrupted, the
        request is given up (an ACQUIRE cancelled, a late grant released)."""
        try:
            if waiter.wait(timeout):
                return
        except BaseException:
            with self._lock:
                frames = self._core.abandon(request_id, waiter, keep_result=False)
            self._write_quietly(frames or [])
            raise
        with self._lock:
            frames = self._core.abandon(request_id, waiter, keep_result=True)
        if frames is None:
            return  # answered just in time
        self._write_quietly(frames)
        raise LivelockTimeout(f"no answer from the server within {timeout} s")

    def _forget(self, hold: HoldState) -> None:
        """A hold whose release could not be sent: released when possible."""
        with self._lock:
            frames = self._core.drop_hold(hold)
        self._write_quietly(frames)

    def _write(self, frame: bytes) -> None:
        with self._write_lock:
            sock = self._sock
            if sock is None:
                raise ConnectionLost("not connected")
            try:
                sock.sendall(frame)
            except OSError as e:
                raise ConnectionLost(str(e)) from e

    def _write_quietly(self, frames: builtins.list[bytes]) -> None:
        """Sends frames nobody waits on; a dead connection is the reader's news."""
        for frame in frames:
            try:
                self._write(frame)
            except ConnectionLost:
                return

    def _apply(self, outcome: c.Outcome) -> None:
        self._write_quietly(outcome.send)
        for event in outcome.events:
            with self._events_ready:
                self._hub.queue(event)
                self._events_ready.notify_all()
            self._hub.notify(event)
        if outcome.listed:
            self._listed.set()

    def _read_loop(self, sock: socket.socket, decoder: FrameDecoder) -> None:
        reason = "the server closed the connection"
        try:
            while True:
                data = sock.recv(_READ_SIZE)
                if not data:
                    break
                for frame in decoder.feed(data):
                    with self._lock:
                        outcome = self._core.on_frame(frame)
                    self._apply(outcome)
        except ProtocolError as e:
            reason = f"protocol error: {e}"
        except OSError as e:
            reason = f"connection error: {e}"
        finally:
            if self._closing is sock:
                reason = "closed by this client"
            with self._write_lock:
                sock.close()
                with self._lock:
                    current = self._sock is sock
                    if current:
                        self._sock = None
                        outcome = self._core.on_disconnect(reason)
            if current:
                self._apply(outcome)
            self._listed.set()


class Held(c.HeldBase):
    """A hold, with its fencing token. Used as a context manager, it releases
    this hold at the end of the block (unless it was lost meanwhile)."""

    def __init__(self, client: Client, state: HoldState) -> None:
        super().__init__(state)
        self._client = client

    def release(self, *, timeout: float | None = None) -> None:
        """Releases this hold, by its token; nothing if already released."""
        if not self._state.released:
            self._client._call(c.release_op(self.name, self.token), timeout)

    def extend(self, lease: float, *, timeout: float | None = None) -> None:
        """Renews this hold's lease (WrongTokenError if it was lost and the
        session holds the lock again under a newer grant)."""
        self._client._call(c.extend_op(self.name, lease, self.token), timeout)

    def __enter__(self) -> Held:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.active:
            return
        try:
            self.release()
        except ConnectionLost:
            self._client._forget(self._state)
        except LivelockError as error:
            if self._raise_on_exit(exc_type is not None, error):
                raise


class PendingAcquire:
    """An ACQUIRE sent by ``start_acquire``, not answered yet."""

    def __init__(self, client: Client, request_id: int, waiter: _Waiter[HoldState]) -> None:
        self._client = client
        self.request_id = request_id
        self._waiter = waiter

    def wait_queued(self, timeout: float | None = None) -> bool:
        """Whether, within ``timeout``, the server said the acquire queues
        (or it completed)."""
        return self._waiter.wait_queued(timeout)

    def wait(self, timeout: float | None = None) -> Held:
        """The hold once granted; the acquire's error (LockBusy,
        AcquireTimedOut, AcquireCancelled, ...) otherwise. Past ``timeout``
        LivelockTimeout, and the acquire stays pending (``cancel`` it)."""
        self._client._not_on_reader()
        if not self._waiter.wait(timeout):
            raise LivelockTimeout(f"acquire {self.request_id} not answered within {timeout} s")
        return Held(self._client, self._waiter.result())

    def cancel(self, *, timeout: float | None = None) -> bool:
        """Withdraws the acquire (CANCEL): True if it was still pending (``wait``
        then raises AcquireCancelled), False if it had completed (``wait``
        returns the hold, to be released)."""
        return self._client._call(c.cancel_op(self.request_id), timeout)
