"""The asyncio client: asyncio streams (with TLS or not), one reader task,
and futures.

This module owns only the asyncio I/O: dialling, the reader task that hands
every frame to the shared state machine (``livelock_client.core``) and
applies what it says, sending, and the awaits, each bounded by a timeout.
Every public method, its arguments and what it means, is
``livelock_client.api``'s, shared with the blocking client and awaited here:
``await AsyncClient.connect()``, ``async with client.lock(name) as held``,
``async for event in client.events()``. Use a client from the event loop
that opened it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Generic, TypeVar

from . import api, config
from . import core as c
from .core import Event, HoldState, Op
from .protocol import ConnectionLost, FrameDecoder, LivelockError, LivelockTimeout, ProtocolError

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


async def _dial(dial: api.Dial, first: bytes) -> _Streams:
    """Sends ``first`` on the first server that accepts the connection and
    reads its reply into ``dial``."""
    for host, port in dial:
        context, server_name = dial.tls_for(host)
        connecting = asyncio.open_connection(host, port, ssl=context, server_hostname=server_name)
        try:
            reader, writer = await asyncio.wait_for(connecting, dial.timeout)  # the TLS handshake included
        except (OSError, asyncio.TimeoutError) as e:
            dial.refused(e)
            continue
        with dial.answering(writer.close, asyncio.TimeoutError):
            sock = writer.get_extra_info("socket")
            if sock is not None:  # None: the server already closed it (e.g. TLS refused the client), read below
                config.configure_socket(sock)
            writer.write(first)
            while not dial.feed(await asyncio.wait_for(reader.read(_READ_SIZE), dial.timeout)):
                continue
            return reader, writer
    raise dial.failure()


class AsyncClient(
    api.ClientBase[
        "AsyncHeld",
        "AsyncPendingAcquire",
        "AsyncPendingAcquireAll",
        "AsyncSemaphore",
        "AsyncPoolGrant",
        "AsyncPendingAcquirePool",
    ],
    api.Awaiting,
):
    """A session with a livelock server, for asyncio. Open one with
    ``await AsyncClient.connect()`` or ``await AsyncClient.resume()``. Every
    method that waits takes ``timeout`` (seconds; None: the client's
    ``request_timeout``) and raises LivelockTimeout past it."""

    _listed: asyncio.Event

    def __init__(self, opening: api.Opening) -> None:
        # One event loop runs the core's callers: no lock needed.
        super().__init__(
            opening,
            AsyncHeld,
            AsyncPendingAcquire,
            AsyncPendingAcquireAll,
            AsyncSemaphore,
            AsyncPoolGrant,
            AsyncPendingAcquirePool,
            contextlib.nullcontext(),
            asyncio.Event(),
        )
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._events_ready = asyncio.Event()
        self._drain_lock = asyncio.Lock()

    # -- The connection.

    @classmethod
    async def _opened(cls, opening: api.Opening) -> AsyncClient:
        client = cls(opening)
        await client._open(opening.first, opening.resuming)
        return client

    async def reconnect(self) -> None:
        """Takes this client's session back on a new connection; see
        ``Client.reconnect``."""
        await self.close()
        await self._open(self._reconnect_frame(), resuming=True)

    async def _open(self, first: bytes, resuming: bool) -> None:
        dial = self._dial()
        reader, writer = await _dial(dial, first)
        try:
            outcomes = self._core.on_connected(dial.frames)
        except BaseException:
            writer.close()
            raise
        self._listed.clear()
        self._writer = writer
        for outcome in outcomes:
            self._apply(outcome)
        self._reader_task = asyncio.create_task(self._read_loop(reader, writer, dial.decoder))
        if not resuming:
            return
        try:
            await asyncio.wait_for(self._listed.wait(), self._connect_timeout)
        except asyncio.TimeoutError:
            await self.close()
            raise LivelockTimeout(api.LISTING_LATE) from None
        self._check_resumed()

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
            await self._run(self._ask(c.bye_op(), timeout))
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

    # -- Events.

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
        while (event := await self.next_event(timeout)) is not None:
            yield event
            if isinstance(event, c.Disconnected):
                return

    def _queue(self, event: Event) -> None:
        self._hub.queue(event)
        self._events_ready.set()

    # -- Requests.

    async def _run(self, call: api.Call[T]) -> T:
        """Sends the call's request and awaits the reply (a cancelled caller
        gives the request up), or returns once it is sent if detached."""
        if call.op is None:
            return call.result(None)
        waiter: _Waiter[Any] = _Waiter()
        request_id = await self._send(call.op, waiter)
        if call.detached:
            return call.result(api.Started(request_id, waiter, call.timeout))
        try:
            value = await asyncio.wait_for(asyncio.shield(waiter.future), call.timeout)
        except asyncio.TimeoutError:
            frames = self._core.abandon(request_id, waiter, keep_result=True)
            if frames is not None:
                self._write_quietly(frames)
                raise api.no_answer(call.timeout) from None
            value = waiter.future.result()  # answered just in time
        except asyncio.CancelledError:
            self._write_quietly(self._core.abandon(request_id, waiter, keep_result=False) or [])
            raise
        return call.result(value)

    @contextlib.asynccontextmanager
    async def _enter(
        self, call: api.Call[AsyncHeld | builtins.list[AsyncHeld] | AsyncPoolGrant]
    ) -> AsyncIterator[AsyncHeld | builtins.list[AsyncHeld] | AsyncPoolGrant]:
        """The block around a hold, a list of holds (each released at its
        end, the last first), or a pool grant."""
        taken = await self._run(call)
        async with contextlib.AsyncExitStack() as stack:
            for held in taken if isinstance(taken, builtins.list) else [taken]:
                await stack.enter_async_context(held)
            yield taken

    async def _send(self, op: Op[Any], waiter: _Waiter[Any]) -> int:
        request_id, frame = self._core.request(op, waiter)
        try:
            await self._write(frame)
        except ConnectionLost:
            self._core.abandon(request_id, waiter, keep_result=False)
            raise
        return request_id

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
        writer = self._writer
        if writer is not None and not writer.is_closing():
            for frame in frames:
                writer.write(frame)

    async def _read_loop(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decoder: FrameDecoder
    ) -> None:
        error: Exception | None = None
        try:
            while data := await reader.read(_READ_SIZE):
                for frame in decoder.feed(data):
                    self._apply(self._core.on_frame(frame))
        except (ProtocolError, OSError) as e:
            error = e
        finally:
            reason = api.disconnect_reason(error, self._closing is writer)
            writer.close()
            if self._writer is writer:
                self._writer = None
                self._apply(self._core.on_disconnect(reason))
            self._listed.set()


class AsyncHeld(api.HeldBase[AsyncClient], api.Awaiting):
    """A hold, with its fencing token; ``async with`` releases it at the end
    of the block (unless it was lost meanwhile)."""

    async def __aenter__(self) -> AsyncHeld:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.active:
            try:
                await self.release()
            except LivelockError as error:
                if self._release_failed(error, exc_type is not None):
                    raise


class _Pending(api.PendingBase[AsyncClient, _Waiter[T]], api.Awaiting):
    """An acquire sent by a ``start_acquire``, whose reply is a ``T``."""

    async def wait_queued(self, timeout: float | None = None) -> bool:
        """Whether, within ``timeout`` (None: the client's request timeout),
        the server said the acquire queues (or it completed)."""
        try:
            await asyncio.wait_for(self._waiter.is_queued.wait(), self._queued_timeout(timeout))
        except asyncio.TimeoutError:
            return False
        return True

    async def _result(self, timeout: float | None) -> T:
        timeout = self._wait_timeout(timeout)
        try:
            return await asyncio.wait_for(asyncio.shield(self._waiter.future), timeout)
        except asyncio.TimeoutError:
            raise self._late(timeout) from None


class AsyncPendingAcquire(_Pending[HoldState]):
    """An ACQUIRE sent by ``start_acquire``, not answered yet."""

    async def wait(self, timeout: float | None = None) -> AsyncHeld:
        """The hold once granted, else the acquire's error; past ``timeout``
        (None: as ``acquire`` waits, forever with ``wait=None``)
        LivelockTimeout, and the acquire stays pending (``cancel`` it)."""
        return self._client._held(await self._result(timeout))


class AsyncPendingAcquireAll(_Pending[builtins.list[HoldState]]):
    """An ACQUIRE_ALL sent by ``start_acquire_all``, not answered yet."""

    async def wait(self, timeout: float | None = None) -> builtins.list[AsyncHeld]:
        """Every hold (in the order the names were given) once all are
        granted, else the request's error; past ``timeout`` (None: as
        ``acquire_all`` waits) LivelockTimeout, and the request stays
        pending (``cancel`` it)."""
        return self._client._held_all(await self._result(timeout))


class AsyncPendingAcquirePool(_Pending[c.PoolGrantState]):
    """An ACQUIRE_POOL sent by ``start_acquire_pool``, not answered yet."""

    async def wait(self, timeout: float | None = None) -> AsyncPoolGrant:
        """The AsyncPoolGrant once every requirement is granted, else the
        request's error; past ``timeout`` (None: as ``acquire_pool`` waits)
        LivelockTimeout, and the request stays pending (``cancel`` it)."""
        return self._client._pool(await self._result(timeout))


class AsyncPoolGrant(api.PoolGrantBase[AsyncHeld]):
    """A granted ACQUIRE_POOL (``await client.acquire_pool``): ``grant[r]``
    the holds requirement ``r`` got, ``grant.names(r)`` their names; ``async
    with`` releases every hold at the end of the block."""

    async def release(self, *, timeout: float | None = None) -> None:
        """Releases every hold still held: the resources, then the pool
        queues' permits; the first error, if any, raised once all were
        tried."""
        first: LivelockError | None = None
        for held in self.holds:
            if not held.active:
                continue
            try:
                await held.release(timeout=timeout)
            except LivelockError as error:
                first = first or error
        if first is not None:
            raise first

    async def __aenter__(self) -> AsyncPoolGrant:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Releases as each ``AsyncHeld``'s block does (the resources, then
        the permits): an error is raised once all were tried, and never over
        the block's own."""
        first: LivelockError | None = None
        for held in self.holds:
            try:
                await held.__aexit__(exc_type, exc, tb)
            except LivelockError as error:
                first = first or error
        if first is not None:
            raise first


class AsyncSemaphore(api.SemaphoreBase[AsyncHeld, AsyncPendingAcquire], api.Awaiting):
    """A counting semaphore (``client.semaphore(name, capacity)``): ``await
    semaphore.acquire(weight)`` returns an ``AsyncHeld``, and ``async with
    semaphore.permits(weight) as held:`` releases it at the end of the
    block."""
