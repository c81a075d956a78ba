"""The asyncio client against a real server: the core cases of test_sync.py
(grants, try/timeout, FIFO hand-over and cancel, leases, signals, queries,
resume, passwords, bad input, server errors), counting semaphores, ordered
locking and deadlock detection, several locks at once (ACQUIRE_ALL), resource
pools (ACQUIRE_POOL), task cancellation, and the request timeout of every call on a server that never
answers. Each test runs its own event
loop with asyncio.run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, Callable

import pytest
from conftest import WAIT_MAX, WAITING_CALLS, WAITING_SEMAPHORE_CALLS, Server, SilentServer

import livelock_client as ll
from livelock_client import AsyncClient


def run(test: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(test(), WAIT_MAX * 2))


async def connect(server: Server, **options: Any) -> AsyncClient:
    return await AsyncClient.connect(server.address, request_timeout=WAIT_MAX, **options)


def test_grant_release_try_and_timeout(server: Server, name: str) -> None:
    async def test() -> None:
        async with await connect(server) as client, await connect(server) as other:
            async with client.lock(name) as first:
                assert first.active and first.name == name.encode()
                assert await other.try_acquire(name) is None
                with pytest.raises(ll.AcquireTimedOut):
                    await other.acquire(name, wait=0.2)
            assert not first.active
            second = await other.acquire(name, wait=0)
            assert second.token > first.token
            await second.release()
            assert await client.inspect(name) is None

    run(test)


def test_fifo_hand_over_and_cancel(server: Server, name: str) -> None:
    async def test() -> None:
        async with await connect(server) as a, await connect(server) as b, await connect(server) as c:
            first = await a.acquire(name)
            second = await b.start_acquire(name)
            assert await second.wait_queued(WAIT_MAX)  # before the next one is sent: FIFO is arrival order
            third = await c.start_acquire(name)
            assert await third.wait_queued(WAIT_MAX)
            inspection = await a.inspect(name)
            assert inspection is not None
            assert [w.session for w in inspection.queue] == [b.session_id, c.session_id]
            assert await third.cancel() is True
            with pytest.raises(ll.AcquireCancelled):
                await third.wait(WAIT_MAX)
            await first.release()
            granted = await second.wait(WAIT_MAX)
            assert granted.token > first.token
            assert await second.cancel() is False

    run(test)


async def queue_length(client: AsyncClient, name: str) -> int:
    inspection = await client.inspect(name)
    assert inspection is not None, f"{name} is not held"
    return len(inspection.queue)


def test_cancelling_the_task_cancels_the_acquire(server: Server, name: str) -> None:
    async def test() -> None:
        async with await connect(server) as holder, await connect(server) as waiter:
            async with holder.lock(name):
                task = asyncio.create_task(waiter.acquire(name))
                while await queue_length(holder, name) == 0:  # bounded by run()
                    await asyncio.sleep(0.01)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                while await queue_length(holder, name) == 1:
                    await asyncio.sleep(0.01)
            assert await waiter.try_acquire(name) is not None

    run(test)


def test_lease_lock_lost_extend_and_signals(server: Server, name: str) -> None:
    async def test() -> None:
        seen: list[ll.Event] = []
        async with await connect(server, on_event=seen.append) as client, await connect(server) as other:
            kept = await client.acquire(name, lease=0.3)
            await kept.extend(WAIT_MAX * 3)
            async with client.lock(name + "-short", lease=0.6) as short:
                event = await client.next_event(WAIT_MAX)
                assert event == ll.LockLost(short.name, short.token) and short.lost
            assert kept.active
            assert await other.signal(name, "stop") is True
            events = [e async for e in client.events(timeout=0.5)]
            assert events == [ll.Signal(name.encode(), b"stop")]
            assert seen == [event, events[0]]
            assert await other.signal_exists(name, "stop") and await other.clear_signal(name, "stop")
            listing = await other.list(name + "*")
            assert [r.name for r in listing.records] == [name.encode()]
            stats = await other.stats()
            assert stats.locks >= 1 and stats.version
            await other.ping()

    run(test)


def test_resume_and_reconnect(server: Server, name: str) -> None:
    async def test() -> None:
        client = await connect(server, grace=WAIT_MAX)
        held = await client.acquire(name)
        await client.close()
        assert await client.next_event(WAIT_MAX) == ll.Disconnected("closed by this client")
        await client.reconnect()
        assert client.resumed is not None and [h.token for h in client.resumed.holds] == [held.token]
        await client.close()
        again = await AsyncClient.resume(client.session_id, client.secret, server.address)
        assert again.resumed is not None
        (listed,) = again.resumed.holds
        assert listed.token == held.token
        await listed.release()
        await again.bye()
        with pytest.raises(ll.UnknownSessionError):
            await AsyncClient.resume(client.session_id, client.secret, server.address)

    run(test)


def test_errors(make_server: Callable[..., Server], server: Server, name: str) -> None:
    secured = make_server("--password", "pw")

    async def test() -> None:
        with pytest.raises(ll.AuthError):
            await AsyncClient.connect(secured.address, password="nope")
        async with await AsyncClient.connect(secured.address, password="pw") as ok:
            await ok.ping()
        with pytest.raises(ValueError, match="grace"):
            await AsyncClient.connect(server.address, grace=7200)
        async with await connect(server) as client:
            bads: list[str | bytes] = ["", b"x" * 1025]
            for bad in bads:
                with pytest.raises(ValueError):
                    await client.acquire(bad)
            held = await client.acquire(name)
            with pytest.raises(ll.AlreadyHeldError):
                await client.acquire(name)
            with pytest.raises(ll.WrongTokenError):
                await client.extend(name, 1, token=held.token + 1)
            await held.release()
            with pytest.raises(ll.NotHeldError) as error:
                await client.release(name)
            assert error.value.status == ll.Status.NOT_HELD

    run(test)


def test_semaphores(server: Server, name: str) -> None:
    async def test() -> None:
        async with await connect(server) as a, await connect(server) as b, await connect(server) as c:
            semaphore = a.semaphore(name, 4)
            async with semaphore.permits(3) as held:
                assert (held.mode, held.weight) == (ll.Mode.PERMITS, 3)
                big = await b.semaphore(name, 4).start_acquire(2)
                assert await big.wait_queued(WAIT_MAX)
                small = await c.semaphore(name, 4).start_acquire(1)
                assert await small.wait_queued(WAIT_MAX)  # 1 would fit, but waits behind 2 (FIFO)
                with pytest.raises(ll.LivelockTimeout):
                    await small.wait(0.05)
                inspection = await semaphore.inspect()
                assert inspection is not None and inspection.record.capacity == 4
                assert [w.weight for w in inspection.queue] == [2, 1]
                with pytest.raises(ValueError, match="capacity"):
                    await semaphore.set_capacity(0)  # refused before sending
            got_big, got_small = await big.wait(WAIT_MAX), await small.wait(WAIT_MAX)
            assert held.token < got_big.token < got_small.token
            with pytest.raises(ll.CapacityConflictError):
                await a.semaphore(name, 5).acquire(1, wait=0)
            with pytest.raises(ll.WrongKindError):
                await a.acquire(name, wait=0)
            # Lowered to 3 (4 - 1): a waiter for 4 no longer fits.
            waiter = await a.semaphore(name, 4).start_acquire(4)
            assert await waiter.wait_queued(WAIT_MAX)
            assert await semaphore.set_capacity(3) is True and semaphore.capacity == 3
            with pytest.raises(ll.OverCapacityError):
                await waiter.wait(WAIT_MAX)
            await got_big.release()
            await got_small.release()
            assert await semaphore.set_capacity(4) is False  # nobody holds or waits any more
            # A holder's connection that ends frees its permits.
            holder = await connect(server)
            await holder.semaphore(name, 4).acquire(4)
            pending = await b.semaphore(name, 4).start_acquire(1)
            assert await pending.wait_queued(WAIT_MAX)
            await holder.close()
            await (await pending.wait(WAIT_MAX)).release()

    run(test)


def test_ordered_locking_and_deadlocks(server: Server, name: str) -> None:
    async def test() -> None:
        async with await connect(server) as a, await connect(server) as b:
            x, y = f"{name}-x", f"{name}-y"
            await a.set_order({y: 0})  # y before x
            async with a.lock(x):
                with pytest.raises(ll.OrderViolationError):
                    await a.acquire(y)
                with pytest.raises(ll.OrderViolationError):
                    await a.set_order(None)
            await a.set_order(None)
            held_x, held_y = await a.acquire(x), await b.acquire(y)
            waits = await a.start_acquire(y, wait=WAIT_MAX)
            assert await waits.wait_queued(WAIT_MAX)
            await asyncio.sleep(0.002)  # strictly younger, to the millisecond
            with pytest.raises(ll.DeadlockError) as deadlock:
                await b.acquire(x, wait=WAIT_MAX)
            assert f'"{x}"' in deadlock.value.cycle and f'"{y}"' in deadlock.value.cycle
            await held_y.release()
            granted = await waits.wait(WAIT_MAX)
            assert granted.name == y.encode()
            await granted.release()
            await held_x.release()

    run(test)


async def holders(client: AsyncClient, name: str | bytes) -> list[tuple[int, int]]:
    inspection = await client.inspect(name)
    return [] if inspection is None else [(h.session, h.token) for h in inspection.record.holders]


def test_acquire_all_grants_every_name_in_order(server: Server, name: str) -> None:
    async def test() -> None:
        a, b, c = (f"{name}/{x}" for x in "abc")
        async with await connect(server) as client, await connect(server) as other:
            held = await client.acquire_all([b, (c, ll.Mode.SHARED), a])
            assert [(h.name, h.mode) for h in held] == [
                (b.encode(), ll.Mode.EXCLUSIVE),
                (c.encode(), ll.Mode.SHARED),
                (a.encode(), ll.Mode.EXCLUSIVE),
            ]
            for hold in held:
                assert hold.active and await holders(other, hold.name) == [(client.session_id, hold.token)]
            assert await other.try_acquire(a) is None
            for hold in held:
                await hold.release()
            async with client.lock_all([c, a], shared=True) as again:
                assert [h.name for h in again] == [c.encode(), a.encode()]
                assert all(h.mode == ll.Mode.SHARED for h in again)
                await (await other.acquire(a, shared=True, wait=0)).release()
                assert await other.try_acquire_all([b, (c, "exclusive")]) is None  # c is held shared
            assert not any(h.active for h in again)
            got = await other.try_acquire_all([c, b])
            assert got is not None and [h.name for h in got] == [c.encode(), b.encode()]

    run(test)


def test_acquire_all_try_timeout_and_cancel_give_everything_back(server: Server, name: str) -> None:
    async def test() -> None:
        a, b = f"{name}/a", f"{name}/b"
        async with await connect(server) as client, await connect(server) as other, await connect(server) as third:
            blocker = await other.acquire(b)
            assert await client.try_acquire_all([a, b]) is None
            with pytest.raises(ll.LockBusy):
                await client.acquire_all([a, b], wait=0)
            with pytest.raises(ll.AcquireTimedOut):
                await client.acquire_all([b, a], wait=0.2)
            assert (await third.acquire(a, wait=0)).active  # given back each time
            await third.release(a)
            pending = await client.start_acquire_all([a, b])
            assert await pending.wait_queued(WAIT_MAX)
            assert [s for s, _ in await holders(third, a)] == [client.session_id]
            with pytest.raises(ll.NotHeldError):
                await client.release(a)  # not the client's yet
            with pytest.raises(ll.AlreadyHeldError):
                await client.acquire(a, wait=0)
            assert await pending.cancel() is True
            with pytest.raises(ll.AcquireCancelled):
                await pending.wait(WAIT_MAX)
            assert await third.try_acquire(a) is not None
            await third.release(a)
            # Granted once b is free.
            waiting = await client.start_acquire_all([b, a], wait=WAIT_MAX)
            assert await waiting.wait_queued(WAIT_MAX)
            await blocker.release()
            held = await waiting.wait(WAIT_MAX)
            assert [h.name for h in held] == [b.encode(), a.encode()] and held[0].token > blocker.token

    run(test)


def test_cancelling_the_task_cancels_the_acquire_all(server: Server, name: str) -> None:
    async def test() -> None:
        a, b = f"{name}/a", f"{name}/b"
        async with await connect(server) as holder, await connect(server) as waiter:
            async with holder.lock(b):
                task = asyncio.create_task(waiter.acquire_all([a, b]))
                while await queue_length(holder, b) == 0:  # bounded by run()
                    await asyncio.sleep(0.01)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                while await queue_length(holder, b) == 1 or await holder.inspect(a) is not None:
                    await asyncio.sleep(0.01)
            got = await waiter.try_acquire_all([a, b])
            assert got is not None

    run(test)


def test_bad_acquire_all_names_are_refused_before_sending(server: Server, name: str) -> None:
    async def test() -> None:
        async with await connect(server) as client:
            bad_lists: list[list[ll.LockSpec]] = [[], [name, name], [name, (name, "shared")], [name, ""]]
            bad_lists.append([f"{name}/{i}" for i in range(33)])
            for names in bad_lists:
                with pytest.raises(ValueError):
                    await client.acquire_all(names)
                with pytest.raises(ValueError):
                    await client.start_acquire_all(names)
                with pytest.raises(ValueError):
                    async with client.lock_all(names):
                        pass
            with pytest.raises(TypeError):
                await client.try_acquire_all(name)
            assert await client.inspect(name) is None
            await client.ping()

    run(test)


def test_acquire_pool_grants_k_of_n_and_filters(server: Server, name: str) -> None:
    async def test() -> None:
        candidates = [f"{name}/{x}" for x in "abcd"]
        pool = ll.Requirement(2, candidates)
        async with await connect(server) as client, await connect(server) as other, await connect(server) as third:
            grant = await client.acquire_pool([pool, f"{name}/x"], wait=WAIT_MAX)
            assert isinstance(grant, ll.AsyncPoolGrant) and len(grant) == 2
            mine = grant.names(0)
            assert len(set(mine)) == 2 and grant.names(1) == [f"{name}/x".encode()]
            for hold in grant[0]:
                assert await holders(other, hold.name) == [(client.session_id, hold.token)]
            queue = grant.permits[0]
            assert queue is not None and queue.name == pool.queue() and queue.weight == 2
            assert grant.permits[1] is None
            theirs = await other.try_acquire_pool([pool])
            assert theirs is not None and sorted(mine + theirs.names(0)) == sorted(n.encode() for n in candidates)
            assert await third.try_acquire_pool([pool]) is None
            await grant.release()
            assert not grant.active and [await client.inspect(n) for n in mine] == [None, None]
            async with third.lock_pool([pool], wait=WAIT_MAX) as again:
                assert sorted(again.names(0)) == sorted(mine)
            assert not again.active and await client.inspect(queue.name) is not None  # other's permits
            await theirs.release()
            assert await client.inspect(queue.name) is None
            # A filter picks only matching candidates; one too narrow is OverCapacity.
            gpus = {f"{name}/gpu{i}": f"model=T{i % 2}" for i in range(4)}
            async with client.lock_pool([ll.Requirement(2, gpus, filter="model=T1")]) as ones:
                assert ones.names(0) == [f"{name}/gpu1".encode(), f"{name}/gpu3".encode()]
            with pytest.raises(ll.OverCapacityError, match="requirement 0"):
                await client.acquire_pool([ll.Requirement(1, gpus, filter="model=T2")], timeout=WAIT_MAX)

    run(test)


def test_acquire_pool_try_timeout_and_cancel_give_everything_back(server: Server, name: str) -> None:
    async def test() -> None:
        a, b = f"{name}/a", f"{name}/b"
        pool = ll.Requirement(1, [a, b])
        queue = pool.queue()
        assert queue is not None
        async with await connect(server) as client, await connect(server) as other, await connect(server) as third:
            blockers = await other.acquire_all([a, b])
            assert await client.try_acquire_pool([pool]) is None
            with pytest.raises(ll.LockBusy):
                await client.acquire_pool([pool], wait=0)
            with pytest.raises(ll.AcquireTimedOut):
                await client.acquire_pool([pool], wait=0.2)
            assert await third.inspect(queue) is None  # its permits given back each time
            pending = await client.start_acquire_pool([pool])
            assert await pending.wait_queued(WAIT_MAX)
            assert [s for s, _ in await holders(third, queue)] == [client.session_id]
            assert await pending.cancel() is True
            with pytest.raises(ll.AcquireCancelled):
                await pending.wait(WAIT_MAX)
            assert await third.inspect(queue) is None
            # Granted once b is free.
            waiting = await client.start_acquire_pool([pool], wait=WAIT_MAX)
            assert await waiting.wait_queued(WAIT_MAX)
            await blockers[1].release()
            grant = await waiting.wait(WAIT_MAX)
            assert grant.names(0) == [b.encode()] and grant[0][0].token > blockers[1].token
            await grant.release()
            await blockers[0].release()

    run(test)


def test_cancelling_the_task_cancels_the_acquire_pool(server: Server, name: str) -> None:
    async def test() -> None:
        a, b = f"{name}/a", f"{name}/b"
        pool = ll.Requirement(1, [a, b])
        queue = pool.queue()
        assert queue is not None
        async with await connect(server) as holder, await connect(server) as waiter:
            async with holder.lock_all([a, b]):
                task = asyncio.create_task(waiter.acquire_pool([pool]))
                while await queue_length(holder, b) == 0:  # bounded by run()
                    await asyncio.sleep(0.01)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                while await queue_length(holder, b) == 1 or await holder.inspect(queue) is not None:
                    await asyncio.sleep(0.01)
                # A caller's timeout gives the request up the same way.
                with pytest.raises(ll.LivelockTimeout):
                    await waiter.acquire_pool([pool], timeout=0.2)
                while await queue_length(holder, b) == 1 or await holder.inspect(queue) is not None:
                    await asyncio.sleep(0.01)
            got = await waiter.try_acquire_pool([ll.Requirement(2, [a, b])])
            assert got is not None

    run(test)


def test_bad_requirements_are_refused_before_sending(server: Server, name: str) -> None:
    async def test() -> None:
        async with await connect(server) as client:
            bad_lists: list[list[ll.RequirementSpec]] = [[], [name, name], [name, ""]]
            bad_lists.append([ll.Requirement(1, [name, f"{name}/2"]), f"{name}/2"])
            bad_lists.append([f"{name}/{i}" for i in range(17)])
            for requirements in bad_lists:
                with pytest.raises(ValueError):
                    await client.acquire_pool(requirements)
                with pytest.raises(ValueError):
                    await client.start_acquire_pool(requirements)
                with pytest.raises(ValueError):
                    async with client.lock_pool(requirements):
                        pass
            with pytest.raises(TypeError):
                await client.try_acquire_pool(name)
            assert await client.inspect(name) is None
            await client.ping()

    run(test)


def test_every_call_ends_after_the_request_timeout(silent_server: SilentServer) -> None:
    short = 0.1

    async def timed(call: Awaitable[Any]) -> float:
        started = time.monotonic()
        with pytest.raises(ll.LivelockTimeout):
            await call
        return time.monotonic() - started

    async def test() -> None:
        client = await AsyncClient.connect(silent_server.address, request_timeout=short)
        pending = await client.start_acquire("lock", wait=short)
        pending_all = await client.start_acquire_all(["lock-a", "lock-b"], wait=short)
        pending_pool = await client.start_acquire_pool([ll.Requirement(1, ["lock-c", "lock-d"])], wait=short)
        calls = [getattr(client, method)(*args) for method, args in WAITING_CALLS]
        semaphore = client.semaphore("semaphore", 2)
        calls += [getattr(semaphore, method)(*args) for method, args in WAITING_SEMAPHORE_CALLS]
        calls += [client.acquire("lock-2", wait=short), pending.cancel(), pending.wait()]
        calls += [pending_all.cancel(), pending_all.wait()]
        calls += [pending_pool.cancel(), pending_pool.wait()]
        calls += [client.acquire_pool([ll.Requirement(2, ["lock-5", "lock-6"])], wait=short)]
        calls += [semaphore.acquire(1, wait=short), client.acquire_all(["lock-3", "lock-4"], wait=short)]
        # All at once: each one's wait is its own.
        waited = await asyncio.gather(*(timed(call) for call in calls))
        assert all(short <= seconds < short * 2 + 1 for seconds in waited), waited
        assert await pending.wait_queued() is False
        assert short <= await timed(client.bye()) < short + 1

    run(test)


def test_a_server_that_never_answers_is_passed_over(server: Server, black_hole: str) -> None:
    async def test() -> None:
        servers = f"{black_hole}, livelock://{server.address}"
        async with await AsyncClient.connect(servers, connect_timeout=1.0) as client:
            await client.ping()
        with pytest.raises(ll.LivelockTimeout, match=f"could not connect: {black_hole} did not answer"):
            await AsyncClient.connect(black_hole, connect_timeout=1.0)

    run(test)
