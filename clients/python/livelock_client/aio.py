"""The asyncio client: asyncio streams, one reader task, and futures.

This module owns only the asyncio I/O: dialling, the handshake, the reader
task that hands every frame to the shared state machine
(``livelock_client.core``) and applies what it says, and the awaits, each
bounded by a timeout. Its API mirrors ``livelock_client.sync`` with
``await``: ``await AsyncClient.connect()``, ``async with client.lock(name)
as held``, ``async for event in client.events()``. Use a client from the
event loop that opened it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Callable, Generic, TypeVar

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

_Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Waiter(Generic[T]):
    """A coroutine waiting for one reply."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.future: asyncio.Future[T] = loop.create_future()
        self.is_queued = asyncio.Event()
        # A failure nobody awaits is not worth a "never retrieved" warning.
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())

    def queued(self) -> None:
        self.is_queued.set()

    def done(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(value)
        self.is_queued.set()

    def failed(self, error: LivelockError) -> None:
        if not self.future.done():
            self.future.set_exception(error)
        self.is_queued.set()

    def peek(self) -> object:
        if self.future.done() and not self.future.cancelled() and self.future.exception() is None:
            return self.future.result()
        return None


async def _handshake(
    servers: list[config.Server], first: bytes, timeout: float
) -> tuple[_Streams, Frame, FrameDecoder, list[Frame]]:
    """Dials the servers in order, sends HELLO/RESUME on the first that
    answers, and reads its reply (and whatever came with it)."""
    failures = []
    for host, port in servers:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            failures.append(f"{host}:{port}: {e or 'timed out'}")
            continue
        try:
            config.configure_socket(writer.get_extra_info("socket"))
            writer.write(first)
            decoder = FrameDecoder()
            frames: list[Frame] = []
            while not frames:
                data = await asyncio.wait_for(reader.read(_READ_SIZE), timeout)
                if not data:
                    raise ConnectionLost(f"{host}:{port} closed the connection before answering")
                frames = decoder.feed(data)
            return (reader, writer), frames[0], decoder, frames[1:]
        except asyncio.TimeoutError:
            writer.close()
            raise LivelockTimeout(f"{host}:{port} did not answer within {timeout} s") from None
        except OSError as e:
            writer.close()
            raise ConnectionLost(f"{host}:{port}: {e}") from e
        except BaseException:
            writer.close()
            raise
    raise ConnectionLost("could not connect: " + "; ".join(failures))


class AsyncClient:
    """A session with a livelock server, for asyncio. Open one with
    ``await AsyncClient.connect()`` or ``await AsyncClient.resume()``. Every
    method that waits takes ``timeout`` (seconds; None: the client's
    ``request_timeout``) and raises LivelockTimeout past it."""

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
        self._events_ready = asyncio.Event()
        self._listed = asyncio.Event()
        self._drain_lock = asyncio.Lock()
        self._writer: asyncio.StreamWriter | None = None
        self._closing: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        address: str | None = None,
        *,
        password: BytesLike | None = None,
        grace: float = 0.0,
        client_name: BytesLike | None = None,
        connect_timeout: float = 10.0,
        request_timeout: float | None = 30.0,
        on_event: Callable[[Event], None] | None = None,
    ) -> AsyncClient:
        """Connects and opens a new session (HELLO); see ``Client.connect``."""
        secret_word = config.password(password)
        first = c.Core.hello_frame(grace, secret_word, client_name or config.default_client_name())
        client = cls(config.servers(address), secret_word, connect_timeout, request_timeout, on_event)
        await client._open(first, resuming=False)
        return client

    @classmethod
    async def resume(
        cls,
        session_id: int,
        secret: bytes,
        address: str | None = None,
        *,
        password: BytesLike | None = None,
        connect_timeout: float = 10.0,
        request_timeout: float | None = 30.0,
        on_event: Callable[[Event], None] | None = None,
    ) -> AsyncClient:
        """Takes back a session within its grace period; see ``Client.resume``."""
        client = cls(config.servers(address), config.password(password), connect_timeout, request_timeout, on_event)
        await client._open(client._core.resume_frame(client._password, session_id, secret), resuming=True)
        return client

    # -- The session.

    @property
    def session_id(self) -> int:
        assert self._core.session is not None
        return self._core.session.session_id

    @property
    def secret(self) -> bytes:
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
    def resumed(self) -> Resumed[AsyncHeld] | None:
        if self._core.listed is None:
            return None
        holds = tuple(AsyncHeld(self, state) for state in self._core.listed)
        return Resumed(self._core.in_flight, holds)

    async def reconnect(self) -> None:
        """Takes this client's session back on a new connection; see
        ``Client.reconnect``."""
        await self.close()
        await self._open(self._core.resume_frame(self._password), resuming=True)

    async def _open(self, first: bytes, resuming: bool) -> None:
        (reader, writer), frame, decoder, rest = await _handshake(self._servers, first, self._connect_timeout)
        try:
            outcomes = [self._core.on_session(frame)]
        except BaseException:
            writer.close()
            raise
        self._listed.clear()
        self._writer = writer
        outcomes += [self._core.on_frame(f) for f in rest]
        for outcome in outcomes:
            self._apply(outcome)
        self._reader_task = asyncio.create_task(self._read_loop(reader, writer, decoder))
        if resuming:
            try:
                await asyncio.wait_for(self._listed.wait(), self._connect_timeout)
            except asyncio.TimeoutError:
                await self.close()
                raise LivelockTimeout("the RESUME listing of holds did not end in time") from None
            if self._core.listed is None or not self._core.connected:
                raise ConnectionLost("the connection dropped during the RESUME listing")

    async def close(self) -> None:
        """Closes the connection without ending the session; see ``Client.close``."""
        writer, task = self._writer, self._reader_task
        self._closing = writer
        if writer is not None:
            writer.close()
        if task is not None and task is not asyncio.current_task():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), self._connect_timeout)

    async def bye(self, timeout: float | None = None) -> None:
        """Ends the session at once (every hold released) and closes."""
        try:
            await self._call(c.bye_op(), timeout)
        finally:
            await self.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self.connected:
                await self.bye()
        except LivelockError:
            pass
        finally:
            await self.close()

    # -- Locks.

    async def acquire(
        self,
        name: BytesLike,
        *,
        wait: float | None = None,
        shared: bool = False,
        lease: float | None = None,
        timeout: float | None = None,
    ) -> AsyncHeld:
        """Takes the lock; see ``Client.acquire``. Cancelling the awaiting task
        cancels the acquire (and releases a grant that comes anyway)."""
        op = c.acquire_op(name, wait=wait, shared=shared, lease=lease, notify_queued=False)
        state = await self._call(op, c.acquire_timeout(wait, timeout, self.request_timeout))
        return AsyncHeld(self, state)

    async def try_acquire(
        self, name: BytesLike, *, shared: bool = False, lease: float | None = None, timeout: float | None = None
    ) -> AsyncHeld | None:
        """One attempt: the hold, or None when someone else holds the lock."""
        try:
            return await self.acquire(name, wait=0, shared=shared, lease=lease, timeout=timeout)
        except LockBusy:
            return None

    @contextlib.asynccontextmanager
    async def lock(
        self,
        name: BytesLike,
        *,
        wait: float | None = None,
        shared: bool = False,
        lease: float | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[AsyncHeld]:
        """``async with client.lock(name) as held:``; see ``Client.lock``."""
        async with await self.acquire(name, wait=wait, shared=shared, lease=lease, timeout=timeout) as held:
            yield held

    async def start_acquire(
        self,
        name: BytesLike,
        *,
        wait: float | None = None,
        shared: bool = False,
        lease: float | None = None,
    ) -> AsyncPendingAcquire:
        """Sends an ACQUIRE and returns once it is sent; see ``Client.start_acquire``."""
        op = c.acquire_op(name, wait=wait, shared=shared, lease=lease, notify_queued=True)
        waiter: _Waiter[HoldState] = _Waiter()
        request_id = await self._send(op, waiter)
        return AsyncPendingAcquire(self, request_id, waiter)

    async def release(self, name: BytesLike, *, token: int | None = None, timeout: float | None = None) -> None:
        """See ``Client.release``."""
        await self._call(c.release_op(name, token), timeout)

    async def extend(
        self, name: BytesLike, lease: float, *, token: int | None = None, timeout: float | None = None
    ) -> None:
        """See ``Client.extend``."""
        await self._call(c.extend_op(name, lease, token), timeout)

    # -- Signals.

    async def signal(self, name: BytesLike, signal: BytesLike, *, timeout: float | None = None) -> bool:
        """See ``Client.signal``."""
        return await self._call(c.signal_op(name, signal, SignalOp.RAISE), timeout)

    async def signal_exists(self, name: BytesLike, signal: BytesLike, *, timeout: float | None = None) -> bool:
        return await self._call(c.signal_op(name, signal, SignalOp.EXISTS), timeout)

    async def clear_signal(self, name: BytesLike, signal: BytesLike, *, timeout: float | None = None) -> bool:
        return await self._call(c.signal_op(name, signal, SignalOp.CLEAR), timeout)

    # -- Queries and operator requests.

    async def inspect(self, name: BytesLike, *, timeout: float | None = None) -> Inspection | None:
        """See ``Client.inspect``."""
        return await self._call(c.inspect_op(name), timeout)

    async def list(self, pattern: BytesLike = "", *, limit: int = 1000, timeout: float | None = None) -> Listing:
        """See ``Client.list``."""
        return await self._call(c.list_op(pattern, limit), timeout)

    async def stats(self, *, timeout: float | None = None) -> Stats:
        return await self._call(c.stats_op(), timeout)

    async def ping(self, *, timeout: float | None = None) -> None:
        await self._call(c.ping_op(), timeout)

    async def force_release(self, name: BytesLike, *, token: int | None = None, timeout: float | None = None) -> None:
        """See ``Client.force_release``."""
        await self._call(c.force_release_op(name, token), timeout)

    async def kill_session(self, session_id: int, *, timeout: float | None = None) -> None:
        """See ``Client.kill_session``."""
        await self._call(c.kill_session_op(session_id), timeout)

    # -- Events.

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """Calls ``listener(event)`` for every event, in the reader task: a
        plain function that returns quickly."""
        self._hub.add_listener(listener)

    def remove_listener(self, listener: Callable[[Event], None]) -> None:
        self._hub.remove_listener(listener)

    async def next_event(self, timeout: float | None = None) -> Event | None:
        """The oldest unread event, waiting at most ``timeout``; None if none came."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not len(self._hub):
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return None
            self._events_ready.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._events_ready.wait(), remaining)
        return self._hub.pop()

    async def events(self, timeout: float | None = None) -> AsyncIterator[Event]:
        """Events as they come; ends after ``timeout`` seconds without one, or
        after Disconnected."""
        while True:
            event = await self.next_event(timeout)
            if event is None:
                return
            yield event
            if isinstance(event, c.Disconnected):
                return

    @property
    def signals_dropped(self) -> int:
        return self._hub.signals_dropped

    # -- Plumbing.

    async def _send(self, op: Op[T], waiter: _Waiter[T]) -> int:
        request_id, frame = self._core.request(op, waiter)
        try:
            await self._write(frame)
        except ConnectionLost:
            self._core.abandon(request_id, waiter, keep_result=False)
            raise
        return request_id

    async def _call(self, op: Op[T], timeout: float | None) -> T:
        waiter: _Waiter[T] = _Waiter()
        request_id = await self._send(op, waiter)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except asyncio.TimeoutError:
            frames = self._core.abandon(request_id, waiter, keep_result=True)
            if frames is None:
                return waiter.future.result()  # answered just in time
            self._write_quietly(frames)
            raise LivelockTimeout(f"no answer from the server within {timeout} s") from None
        except asyncio.CancelledError:
            self._write_quietly(self._core.abandon(request_id, waiter, keep_result=False) or [])
            raise

    def _forget(self, hold: HoldState) -> None:
        """A hold whose release could not be sent: released when possible."""
        self._write_quietly(self._core.drop_hold(hold))

    async def _write(self, frame: bytes) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise ConnectionLost("not connected")
        writer.write(frame)
        try:
            async with self._drain_lock:  # drain() is not for concurrent callers before 3.10
                await writer.drain()
        except OSError as e:
            raise ConnectionLost(str(e)) from e

    def _write_quietly(self, frames: builtins.list[bytes]) -> None:
        """Sends frames nobody waits on; a dead connection is the reader's news."""
        writer = self._writer
        if writer is not None and not writer.is_closing():
            for frame in frames:
                writer.write(frame)

    def _apply(self, outcome: c.Outcome) -> None:
        self._write_quietly(outcome.send)
        for event in outcome.events:
            self._hub.queue(event)
            self._events_ready.set()
            self._hub.notify(event)
        if outcome.listed:
            self._listed.set()

    async def _read_loop(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decoder: FrameDecoder
    ) -> None:
        reason = "the server closed the connection"
        try:
            while True:
                data = await reader.read(_READ_SIZE)
                if not data:
                    break
                for frame in decoder.feed(data):
                    self._apply(self._core.on_frame(frame))
        except ProtocolError as e:
            reason = f"protocol error: {e}"
        except OSError as e:
            reason = f"connection error: {e}"
        finally:
            if self._closing is writer:
                reason = "closed by this client"
            writer.close()
            if self._writer is writer:
                self._writer = None
                self._apply(self._core.on_disconnect(reason))
            self._listed.set()


class AsyncHeld(c.HeldBase):
    """A hold, with its fencing token; ``async with`` releases it at the end
    of the block (unless it was lost meanwhile)."""

    def __init__(self, client: AsyncClient, state: HoldState) -> None:
        super().__init__(state)
        self._client = client

    async def release(self, *, timeout: float | None = None) -> None:
        """Releases this hold, by its token; nothing if already released."""
        if not self._state.released:
            await self._client._call(c.release_op(self.name, self.token), timeout)

    async def extend(self, lease: float, *, timeout: float | None = None) -> None:
        """Renews this hold's lease; see ``Held.extend``."""
        await self._client._call(c.extend_op(self.name, lease, self.token), timeout)

    async def __aenter__(self) -> AsyncHeld:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.active:
            return
        try:
            await self.release()
        except ConnectionLost:
            self._client._forget(self._state)
        except LivelockError as error:
            if self._raise_on_exit(exc_type is not None, error):
                raise


class AsyncPendingAcquire:
    """An ACQUIRE sent by ``start_acquire``, not answered yet."""

    def __init__(self, client: AsyncClient, request_id: int, waiter: _Waiter[HoldState]) -> None:
        self._client = client
        self.request_id = request_id
        self._waiter = waiter

    async def wait_queued(self, timeout: float | None = None) -> bool:
        """Whether, within ``timeout``, the server said the acquire queues (or
        it completed)."""
        try:
            await asyncio.wait_for(self._waiter.is_queued.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def wait(self, timeout: float | None = None) -> AsyncHeld:
        """The hold once granted, else the acquire's error; past ``timeout``
        LivelockTimeout, and the acquire stays pending (``cancel`` it)."""
        try:
            state = await asyncio.wait_for(asyncio.shield(self._waiter.future), timeout)
        except asyncio.TimeoutError:
            raise LivelockTimeout(f"acquire {self.request_id} not answered within {timeout} s") from None
        return AsyncHeld(self._client, state)

    async def cancel(self, *, timeout: float | None = None) -> bool:
        """Withdraws the acquire; see ``PendingAcquire.cancel``."""
        return await self._client._call(c.cancel_op(self.request_id), timeout)
