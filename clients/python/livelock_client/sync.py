"""The blocking client: a socket (with TLS or not), one reader thread, and
waiters.

This module owns only the blocking I/O: dialling (and the TLS handshake),
the reader thread that hands every frame to the shared state machine
(``livelock_client.core``) and applies what it says, sending, and the waits,
each bounded by a timeout.
Every public method, its arguments and what it means, is
``livelock_client.api``'s, shared with the asyncio client. Any number of
threads may use one ``Client``; requests are pipelined and matched by
request id.
"""

from __future__ import annotations

import builtins
import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar, cast

from . import api, config
from . import core as c
from .core import Event, HoldState, Op
from .protocol import ConnectionLost, FrameDecoder, LivelockError, LivelockTimeout, ProtocolError

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


class _Stream(Protocol):
    """What the client uses of a connection: a socket, or TLS over one."""

    def sendall(self, data: bytes, /) -> None: ...

    def recv(self, size: int, /) -> bytes: ...

    def settimeout(self, timeout: float | None, /) -> None: ...

    def shutdown(self, how: int, /) -> None: ...

    def close(self) -> None: ...


class _TlsSocket:
    """TLS over a connected socket, through memory buffers. An OpenSSL
    connection must never be used by two threads at once, and the reader
    thread reads while callers write: so every TLS step takes ``_tls_lock``,
    and the socket is read and written outside it (an ``SSLSocket`` read by
    one thread while another writes it can corrupt its state or crash).
    ``_send_lock`` keeps the records in the order they were made."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_name: str | None) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=server_name)
        self._tls_lock = threading.Lock()
        self._send_lock = threading.Lock()

    def handshake(self) -> None:
        """The TLS handshake, each read bounded by the socket's timeout."""
        while True:
            try:
                with self._tls_lock:
                    self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ConnectionResetError("the server closed the connection during the TLS handshake") from None
            except ssl.SSLError:
                with contextlib.suppress(OSError):
                    self._flush()  # the alert saying why, for the server's log
                raise
        self._flush()

    def sendall(self, data: bytes) -> None:
        with self._send_lock:
            with self._tls_lock:
                self._tls.write(data)  # all of it: a memory buffer is never full
                records = self._outgoing.read()
            self._sock.sendall(records)

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes of plaintext; b"" once the server closed."""
        while True:
            with self._tls_lock:
                try:
                    data: bytes | None = self._tls.read(size)
                except ssl.SSLWantReadError:
                    data = None  # a whole record is needed
                except ssl.SSLZeroReturnError:
                    data = b""  # the server's close_notify
                replies = self._outgoing.pending  # e.g. to a key update
            if replies:
                self._flush()
            if data is not None:
                return data
            if not self._fill():
                return b""

    def _fill(self) -> bool:
        """Reads records from the socket; False at its end."""
        data = self._sock.recv(_READ_SIZE)
        if data:
            with self._tls_lock:
                self._incoming.write(data)
        return bool(data)

    def _flush(self) -> None:
        """Sends the records made but not sent (handshake, replies)."""
        with self._send_lock:
            with self._tls_lock:
                records = self._outgoing.read()
            if records:
                self._sock.sendall(records)

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        self._sock.close()


def _connect(dial: api.Dial, host: str, port: int) -> _Stream:
    """A connection to ``host``, through its TLS handshake if the client
    speaks TLS; each step bounded by the dial's timeout."""
    sock = socket.create_connection((host, port), timeout=dial.timeout)
    try:
        config.configure_socket(sock)
        context, server_name = dial.tls_for(host)
        if context is None:
            return sock
        stream = _TlsSocket(sock, context, server_name)
        stream.handshake()
        return stream
    except BaseException:
        sock.close()
        raise


def _dial(dial: api.Dial, first: bytes) -> _Stream:
    """Sends ``first`` on the first server that accepts the connection and
    reads its reply into ``dial``."""
    for host, port in dial:
        try:
            sock = _connect(dial, host, port)
        except OSError as e:
            dial.refused(e)
            continue
        with dial.answering(sock.close, socket.timeout):
            sock.sendall(first)
            while not dial.feed(sock.recv(_READ_SIZE)):
                continue
            sock.settimeout(None)
            return sock
    raise dial.failure()


class Client(
    api.ClientBase["Held", "PendingAcquire", "PendingAcquireAll", "Semaphore", "PoolGrant", "PendingAcquirePool"],
    api.Blocking,
):
    """A session with a livelock server, over one connection at a time.

    Open one with ``Client.connect()`` or ``Client.resume()``. Every method
    that waits takes ``timeout`` (seconds; None: the client's
    ``request_timeout``) and raises LivelockTimeout past it.
    """

    _listed: threading.Event

    def __init__(self, opening: api.Opening) -> None:
        super().__init__(
            opening,
            Held,
            PendingAcquire,
            PendingAcquireAll,
            Semaphore,
            PoolGrant,
            PendingAcquirePool,
            threading.Lock(),
            threading.Event(),
        )
        self._sock: _Stream | None = None
        self._reader: threading.Thread | None = None
        self._write_lock = threading.Lock()
        self._events_ready = threading.Condition()

    # -- The connection.

    @classmethod
    def _opened(cls, opening: api.Opening) -> Client:
        client = cls(opening)
        client._open(opening.first, opening.resuming)
        return client

    def reconnect(self) -> None:
        """Takes this client's session back on a new connection (within its
        grace). ``Held`` objects keep working; holds lost meanwhile get a
        LockLost event; requests that were waiting have failed with
        ConnectionLost (an ACQUIRE still queued is cancelled)."""
        self.close()
        self._open(self._reconnect_frame(), resuming=True)

    def _open(self, first: bytes, resuming: bool) -> None:
        dial = self._dial()
        sock = _dial(dial, first)
        try:
            with self._core_lock:
                outcomes = self._core.on_connected(dial.frames)
                self._listed.clear()
                self._sock = sock
        except BaseException:
            sock.close()
            raise
        for outcome in outcomes:
            self._apply(outcome)
        self._reader = threading.Thread(
            target=self._read_loop, args=(sock, dial.decoder), name="livelock-client", daemon=True
        )
        self._reader.start()
        if not resuming:
            return
        if not self._listed.wait(self._connect_timeout):
            self.close()
            raise LivelockTimeout(api.LISTING_LATE)
        self._check_resumed()

    def close(self) -> None:
        """Closes the connection without ending the session: with a grace
        period it keeps its holds for that long; without one it ends now."""
        with self._core_lock:
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
            self._run(self._ask(c.bye_op(), timeout))
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

    # -- Events.

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The oldest unread event, waiting at most ``timeout`` (None:
        forever); None if none came."""
        with self._events_ready:
            self._events_ready.wait_for(lambda: len(self._hub) > 0, timeout)
            return self._hub.pop()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events as they come; ends after ``timeout`` seconds without one,
        or after Disconnected."""
        while (event := self.next_event(timeout)) is not None:
            yield event
            if isinstance(event, c.Disconnected):
                return

    def _queue(self, event: Event) -> None:
        with self._events_ready:
            self._hub.queue(event)
            self._events_ready.notify_all()

    # -- Requests.

    def _run(self, call: api.Call[T]) -> T:
        """Sends the call's request and waits for the reply (not on the
        reader thread), or returns at once with the request detached."""
        if call.op is None:
            return call.result(None)
        waiter: _Waiter[Any] = _Waiter()
        if call.detached:
            return call.result(api.Started(self._send(call.op, waiter), waiter, call.timeout))
        self._not_on_reader()
        request_id = self._send(call.op, waiter)
        self._wait(request_id, waiter, call.timeout)
        return call.result(waiter.result())

    @contextlib.contextmanager
    def _enter(
        self, call: api.Call[Held | builtins.list[Held] | PoolGrant]
    ) -> Iterator[Held | builtins.list[Held] | PoolGrant]:
        """The block around a hold, a list of holds (each released at its
        end, the last first), or a pool grant."""
        taken = self._run(call)
        with contextlib.ExitStack() as stack:
            for held in taken if isinstance(taken, builtins.list) else [taken]:
                stack.enter_context(held)
            yield taken

    def _send(self, op: Op[Any], waiter: _Waiter[Any]) -> int:
        with self._core_lock:
            request_id, frame = self._core.request(op, waiter)
        try:
            self._write(frame)
        except ConnectionLost:
            with self._core_lock:
                self._core.abandon(request_id, waiter, keep_result=False)
            raise
        return request_id

    def _not_on_reader(self) -> None:
        """Waiting on the reader thread (in a listener) could never end."""
        if threading.current_thread() is self._reader:
            raise RuntimeError("an event listener runs on the reader thread: it must not wait for replies")

    def _wait(self, request_id: int, waiter: _Waiter[Any], timeout: float | None) -> None:
        """Waits for the final reply; past ``timeout``, or interrupted, the
        request is given up (an ACQUIRE cancelled, a late grant released)."""
        try:
            if waiter.wait(timeout):
                return
        except BaseException:
            with self._core_lock:
                frames = self._core.abandon(request_id, waiter, keep_result=False)
            self._write_quietly(frames or [])
            raise
        with self._core_lock:
            frames = self._core.abandon(request_id, waiter, keep_result=True)
        if frames is None:
            return  # answered just in time
        self._write_quietly(frames)
        raise api.no_answer(timeout)

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
        for frame in frames:
            try:
                self._write(frame)
            except ConnectionLost:
                return

    def _read_loop(self, sock: _Stream, decoder: FrameDecoder) -> None:
        error: Exception | None = None
        try:
            while data := sock.recv(_READ_SIZE):
                for frame in decoder.feed(data):
                    with self._core_lock:
                        outcome = self._core.on_frame(frame)
                    self._apply(outcome)
        except (ProtocolError, OSError) as e:
            error = e
        finally:
            reason = api.disconnect_reason(error, self._closing is sock)
            with self._write_lock:
                sock.close()
                with self._core_lock:
                    current = self._sock is sock
                    if current:
                        self._sock = None
                        outcome = self._core.on_disconnect(reason)
            if current:
                self._apply(outcome)
            self._listed.set()


class Held(api.HeldBase[Client], api.Blocking):
    """A hold, with its fencing token. Used as a context manager, it releases
    this hold at the end of the block (unless it was lost meanwhile)."""

    def __enter__(self) -> Held:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.active:
            try:
                self.release()
            except LivelockError as error:
                if self._release_failed(error, exc_type is not None):
                    raise


class _Pending(api.PendingBase[Client, _Waiter[T]], api.Blocking):
    """An acquire sent by a ``start_acquire``, whose reply is a ``T``."""

    def wait_queued(self, timeout: float | None = None) -> bool:
        """Whether, within ``timeout`` (None: the client's request timeout),
        the server said the acquire queues (or it completed)."""
        return self._waiter.wait_queued(self._queued_timeout(timeout))

    def _result(self, timeout: float | None) -> T:
        self._client._not_on_reader()
        timeout = self._wait_timeout(timeout)
        if not self._waiter.wait(timeout):
            raise self._late(timeout)
        return self._waiter.result()


class PendingAcquire(_Pending[HoldState]):
    """An ACQUIRE sent by ``start_acquire``, not answered yet."""

    def wait(self, timeout: float | None = None) -> Held:
        """The hold once granted; the acquire's error (LockBusy,
        AcquireTimedOut, AcquireCancelled, ...) otherwise. Past ``timeout``
        (None: as ``acquire`` waits, forever with ``wait=None``)
        LivelockTimeout, and the acquire stays pending (``cancel`` it)."""
        return self._client._held(self._result(timeout))


class PendingAcquireAll(_Pending[builtins.list[HoldState]]):
    """An ACQUIRE_ALL sent by ``start_acquire_all``, not answered yet."""

    def wait(self, timeout: float | None = None) -> builtins.list[Held]:
        """Every hold (in the order the names were given) once all are
        granted; the request's error (LockBusy, AcquireTimedOut,
        AcquireCancelled, ...) otherwise. Past ``timeout`` (None: as
        ``acquire_all`` waits) LivelockTimeout, and the request stays
        pending (``cancel`` it)."""
        return self._client._held_all(self._result(timeout))


class PendingAcquirePool(_Pending[c.PoolGrantState]):
    """An ACQUIRE_POOL sent by ``start_acquire_pool``, not answered yet."""

    def wait(self, timeout: float | None = None) -> PoolGrant:
        """The PoolGrant once every requirement is granted; the request's
        error (LockBusy, AcquireTimedOut, AcquireCancelled, ...) otherwise.
        Past ``timeout`` (None: as ``acquire_pool`` waits) LivelockTimeout,
        and the request stays pending (``cancel`` it)."""
        return self._client._pool(self._result(timeout))


class PoolGrant(api.PoolGrantBase[Held]):
    """A granted ACQUIRE_POOL (``client.acquire_pool``): ``grant[r]`` the
    holds requirement ``r`` got, ``grant.names(r)`` their names. Used as a
    context manager, it releases every hold at the end of the block."""

    def release(self, *, timeout: float | None = None) -> None:
        """Releases every hold still held: the resources, then the pool
        queues' permits; the first error, if any, raised once all were
        tried."""
        first: LivelockError | None = None
        for held in self.holds:
            if not held.active:
                continue
            try:
                held.release(timeout=timeout)
            except LivelockError as error:
                first = first or error
        if first is not None:
            raise first

    def __enter__(self) -> PoolGrant:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Releases as each ``Held``'s block does (the resources, then the
        permits): an error is raised once all were tried, and never over the
        block's own."""
        first: LivelockError | None = None
        for held in self.holds:
            try:
                held.__exit__(exc_type, exc, tb)
            except LivelockError as error:
                first = first or error
        if first is not None:
            raise first


class Semaphore(api.SemaphoreBase[Held, PendingAcquire], api.Blocking):
    """A counting semaphore (``client.semaphore(name, capacity)``): its
    ``acquire(weight)`` returns a ``Held`` (a context manager), and ``with
    semaphore.permits(weight) as held:`` releases it at the end of the
    block."""
