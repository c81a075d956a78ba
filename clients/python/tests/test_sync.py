"""The blocking client against a real server: grants and tokens, try and
timeout, shared holds, FIFO hand-over, leases and LockLost, extend, cancel,
signals, INSPECT/LIST/STATS, resume within and after the grace, passwords,
bad input and server errors; counting semaphores (FIFO by weight, capacity
conflicts, kinds, SET_CAPACITY, permits freed by a closed connection),
ordered locking and deadlock detection; several locks at once
(ACQUIRE_ALL: tokens in order, try and timeout giving everything back,
cancel, a part force-released, RESUME, names refused before sending);
resource pools (ACQUIRE_POOL: K of N with their tokens and pool queue, tries
and timeouts, tag filters, OverCapacity for a filter too narrow, everything
freed with the session, cancel, RESUME, requirements refused before
sending); and, on a server that never answers, every call that waits for it
ends after the request timeout."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Callable

import pytest
from conftest import WAIT_MAX, WAITING_CALLS, WAITING_SEMAPHORE_CALLS, Server, SilentServer, wait_until

import livelock_client as ll
from livelock_client import Client


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client.connect(server.address, client_name="tester", request_timeout=WAIT_MAX) as c:
        yield c


@pytest.fixture
def other(server: Server) -> Iterator[Client]:
    with Client.connect(server.address, client_name="other", request_timeout=WAIT_MAX) as c:
        yield c


def queue_is_empty(client: Client, name: str) -> bool:
    inspection = client.inspect(name)
    assert inspection is not None, f"{name} is not held"
    return inspection.queue == ()


def test_grant_release_and_increasing_tokens(client: Client, name: str) -> None:
    with client.lock(name) as first:
        assert first.name == name.encode() and first.mode == ll.Mode.EXCLUSIVE and first.active
    assert not first.active
    held = client.acquire(name)
    assert held.token > first.token
    held.release()
    held.release()  # a second release does nothing
    assert client.inspect(name) is None


def test_try_and_timeout(client: Client, other: Client, name: str) -> None:
    with other.lock(name):
        assert client.try_acquire(name) is None
        with pytest.raises(ll.LockBusy) as busy:
            client.acquire(name, wait=0)
        assert busy.value.status == ll.Status.BUSY
        with pytest.raises(ll.AcquireTimedOut):
            client.acquire(name, wait=0.2)
    assert client.try_acquire(name) is not None


def test_shared_holders(client: Client, other: Client, server: Server, name: str) -> None:
    with Client.connect(server.address, request_timeout=WAIT_MAX) as third:
        a = client.acquire(name, shared=True)
        b = other.acquire(name, shared=True)
        assert b.token > a.token and b.mode == ll.Mode.SHARED
        assert third.try_acquire(name) is None
        inspection = client.inspect(name)
        assert inspection is not None
        assert inspection.record.mode == ll.Mode.SHARED
        assert {h.token for h in inspection.record.holders} == {a.token, b.token}


def test_fifo_hand_over(client: Client, other: Client, server: Server, name: str) -> None:
    with Client.connect(server.address, request_timeout=WAIT_MAX) as third:
        first = client.acquire(name)
        second = other.start_acquire(name)
        assert second.wait_queued(WAIT_MAX)
        last = third.start_acquire(name)
        assert last.wait_queued(WAIT_MAX)
        inspection = client.inspect(name)
        assert inspection is not None
        assert [w.session for w in inspection.queue] == [other.session_id, third.session_id]
        first.release()
        granted = second.wait(WAIT_MAX)
        assert granted.token > first.token
        with pytest.raises(ll.LivelockTimeout):
            last.wait(0.05)  # still queued behind `second`
        granted.release()
        assert last.wait(WAIT_MAX).token > granted.token


def test_lease_ends_in_lock_lost(server: Server, name: str) -> None:
    seen: list[ll.Event] = []
    called = threading.Event()

    def listener(event: ll.Event) -> None:
        seen.append(event)
        called.set()

    with Client.connect(server.address, on_event=listener, request_timeout=WAIT_MAX) as client:
        with client.lock(name, lease=0.1) as held:
            event = client.next_event(WAIT_MAX)
            assert event == ll.LockLost(name.encode(), held.token)
            assert held.lost and not held.active
        # The block ended without error: the hold was already gone.
        assert called.wait(WAIT_MAX) and seen[0] == event
        with pytest.raises(ll.WrongTokenError):
            client.acquire(name)  # the session holds the lock again, under a new token
            held.extend(10)


def test_extend_keeps_the_hold(client: Client, name: str) -> None:
    held = client.acquire(name, lease=0.3)
    held.extend(WAIT_MAX * 3)
    canary = client.acquire(name + "-canary", lease=0.6)
    # The canary's lease (0.6 s) outlives the first lease (0.3 s): once it is
    # lost, the first hold would have been too, had it not been extended.
    assert client.next_event(WAIT_MAX) == ll.LockLost(canary.name, canary.token)
    assert held.active
    inspection = client.inspect(name)
    assert inspection is not None and inspection.record.holders[0].token == held.token
    client.extend(name, 1.0)  # by name, whatever the token
    held.release()


def test_cancel_a_waiting_acquire(client: Client, other: Client, name: str) -> None:
    with client.lock(name):
        pending = other.start_acquire(name)
        assert pending.wait_queued(WAIT_MAX)
        assert pending.cancel() is True
        with pytest.raises(ll.AcquireCancelled):
            pending.wait(WAIT_MAX)
        assert pending.cancel() is False  # nothing pending any more
        inspection = client.inspect(name)
        assert inspection is not None and inspection.queue == ()


def test_a_client_timeout_cancels_the_acquire(client: Client, other: Client, name: str) -> None:
    with client.lock(name):
        with pytest.raises(ll.LivelockTimeout):
            other.acquire(name, timeout=0.2)  # waits forever on the server
        wait_until(lambda: queue_is_empty(client, name), "the abandoned acquire to leave the queue")
    # Nothing was left behind: the lock is free.
    assert client.try_acquire(name) is not None


def test_signals_are_pushed_to_holders(client: Client, other: Client, name: str) -> None:
    with client.lock(name):
        assert other.signal(name, "reload") is True
        assert other.signal(name, "reload") is True  # already raised: no new push
        events = list(client.events(timeout=0.5))
        assert events == [ll.Signal(name.encode(), b"reload")]
        assert other.signal_exists(name, "reload") is True
        assert other.clear_signal(name, "reload") is True
        assert other.signal_exists(name, "reload") is False
    with pytest.raises(ll.NotHeldError):
        other.signal(name, "reload")


def test_inspect_list_and_stats(client: Client, other: Client, name: str) -> None:
    assert client.inspect(name) is None
    with client.lock(name + "/a"), client.lock(name + "/b"):
        pending = other.start_acquire(name + "/a")
        assert pending.wait_queued(WAIT_MAX)
        inspection = client.inspect(name + "/a")
        assert inspection is not None
        holder = inspection.record.holders[0]
        assert (holder.session, holder.client_name) == (client.session_id, b"tester")
        assert inspection.record.waiters == 1
        assert [(w.session, w.client_name) for w in inspection.queue] == [(other.session_id, b"other")]
        assert inspection.server_unix_ms >= holder.since_unix_ms
        listing = client.list(name + "/*")
        assert [r.name for r in listing.records] == [(name + "/a").encode(), (name + "/b").encode()]
        assert not listing.truncated
        assert client.list(name + "/*", limit=1).truncated
        stats = client.stats()
        assert stats.locks >= 2 and stats.waiters >= 1 and stats.version
        assert pending.cancel()
    client.ping()


def test_resume_after_dropping_the_connection(server: Server, name: str) -> None:
    client = Client.connect(server.address, grace=WAIT_MAX, request_timeout=WAIT_MAX)
    held = client.acquire(name)
    client.close()
    assert client.next_event(WAIT_MAX) == ll.Disconnected("closed by this client")
    with pytest.raises(ll.ConnectionLost):
        held.release()
    with Client.connect(server.address, request_timeout=WAIT_MAX) as other:
        assert other.try_acquire(name) is None  # still held by the detached session
        with Client.resume(client.session_id, client.secret, server.address, request_timeout=WAIT_MAX) as again:
            assert again.resumed is not None
            (listed,) = again.resumed.holds
            assert (listed.name, listed.token) == (held.name, held.token)
            listed.release()
        assert other.try_acquire(name) is not None


def test_reconnect_keeps_holds_and_cancels_what_nobody_waits_for(client: Client, server: Server, name: str) -> None:
    me = Client.connect(server.address, grace=WAIT_MAX, request_timeout=WAIT_MAX)
    held = me.acquire(name)
    with client.lock(name + "-busy"):
        waiting = me.start_acquire(name + "-busy")
        assert waiting.wait_queued(WAIT_MAX)
        me.close()
        with pytest.raises(ll.ConnectionLost):
            waiting.wait(WAIT_MAX)
        me.reconnect()
        assert me.resumed is not None and [h.token for h in me.resumed.holds] == [held.token]
        # The queued acquire was listed in flight and cancelled: nobody waits for it.
        wait_until(lambda: queue_is_empty(client, name + "-busy"), "the cancel")
    assert held.active
    held.release()  # the Held of the first connection still works
    me.bye()
    assert not me.connected


def test_no_resume_after_the_grace(make_server: Callable[..., Server], name: str) -> None:
    srv = make_server()
    client = Client.connect(srv.address, grace=0.2, request_timeout=WAIT_MAX)
    client.acquire(name)
    client.close()
    with Client.connect(srv.address, request_timeout=WAIT_MAX) as other:
        other.acquire(name, wait=WAIT_MAX)  # granted once the grace ran out
        with pytest.raises(ll.UnknownSessionError) as error:
            Client.resume(client.session_id, client.secret, srv.address)
        assert error.value.status == ll.Status.UNKNOWN_SESSION


def test_passwords(make_server: Callable[..., Server], monkeypatch: pytest.MonkeyPatch) -> None:
    srv = make_server("--password", "s3cret")
    with pytest.raises(ll.AuthError) as error:
        Client.connect(srv.address, password="wrong")
    assert error.value.status == ll.Status.AUTH
    with pytest.raises(ll.AuthError):
        Client.connect(srv.address)
    with Client.connect(srv.address, password="s3cret") as client:
        client.ping()
    monkeypatch.setenv("LIVELOCK_PASSWORD", "s3cret")
    monkeypatch.setenv("LIVELOCK_HOST", srv.address)
    with Client.connect() as client:
        client.ping()


def test_bad_input_raises_before_sending(client: Client) -> None:
    for bad in ["", "x" * 1025]:
        with pytest.raises(ValueError):
            client.acquire(bad)
        with pytest.raises(ValueError):
            client.release(bad)
        with pytest.raises(ValueError):
            client.signal(bad, "s")
    with pytest.raises(ValueError, match="grace"):
        Client.connect("127.0.0.1:1", grace=3601)  # refused before dialling
    with pytest.raises(ValueError):
        Client.connect("nonsense://x")
    client.ping()  # the connection is untouched


def test_server_errors_surface_as_exceptions(client: Client, name: str) -> None:
    held = client.acquire(name)
    with pytest.raises(ll.AlreadyHeldError) as already:
        client.acquire(name)
    assert already.value.status == ll.Status.ALREADY_HELD
    with pytest.raises(ll.WrongTokenError):
        client.release(name, token=held.token + 1)
    held.release()
    with pytest.raises(ll.NotHeldError):
        client.release(name)
    with pytest.raises(ll.UnknownSessionError) as unknown:
        client.kill_session(2**63)
    assert unknown.value.status == ll.Status.UNKNOWN_SESSION and unknown.value.status.is_error


def test_operator_force_release_and_kill(client: Client, other: Client, server: Server, name: str) -> None:
    held = client.acquire(name)
    other.force_release(name)
    assert client.next_event(WAIT_MAX) == ll.LockLost(held.name, held.token)
    assert held.lost
    victim = Client.connect(server.address, request_timeout=WAIT_MAX)
    victim_hold = victim.acquire(name)
    other.kill_session(victim.session_id)
    events = list(victim.events(timeout=WAIT_MAX))
    assert events == [ll.LockLost(victim_hold.name, victim_hold.token), events[-1]]
    assert isinstance(events[-1], ll.Disconnected)
    with pytest.raises(ll.ConnectionLost):
        victim.ping()
    victim.close()


def test_resume_cancels_the_earlier_clients_queued_acquire(client: Client, server: Server, name: str) -> None:
    with client.lock(name):
        gone = Client.connect(server.address, grace=WAIT_MAX, request_timeout=WAIT_MAX)
        waiting = gone.start_acquire(name)
        assert waiting.wait_queued(WAIT_MAX)
        gone.close()
        with Client.resume(gone.session_id, gone.secret, server.address) as again:
            assert again.resumed is not None
            assert again.resumed.in_flight == (waiting.request_id,) and again.resumed.holds == ()
            wait_until(lambda: queue_is_empty(client, name), "the cancel of the listed acquire")


def test_session_taken_by_another_connection(client: Client, server: Server, name: str) -> None:
    first = Client.connect(server.address, grace=WAIT_MAX, request_timeout=WAIT_MAX)
    held = first.acquire(name)
    with Client.resume(first.session_id, first.secret, server.address) as taker:
        assert taker.resumed is not None and [h.token for h in taker.resumed.holds] == [held.token]
        events = list(first.events(timeout=WAIT_MAX))
        assert events[0] == ll.SessionTaken() and isinstance(events[-1], ll.Disconnected)
    first.close()


def test_server_shutdown_is_an_event(make_server: Callable[..., Server]) -> None:
    srv = make_server()
    with Client.connect(srv.address, request_timeout=WAIT_MAX) as client:
        srv.process.terminate()
        events = list(client.events(timeout=WAIT_MAX))
        assert events[0] == ll.Shutdown() and isinstance(events[-1], ll.Disconnected)
        with pytest.raises(ll.ConnectionLost):
            client.ping()


def test_a_block_left_while_disconnected_releases_on_reconnect(other: Client, server: Server, name: str) -> None:
    client = Client.connect(server.address, grace=WAIT_MAX, request_timeout=WAIT_MAX)
    with client.lock(name) as held:
        client.close()
    assert not held.active  # the block ended quietly; the release is owed
    assert other.try_acquire(name) is None  # the detached session still holds it
    client.reconnect()
    assert client.resumed is not None and client.resumed.holds == ()
    assert other.acquire(name, wait=WAIT_MAX).token > held.token
    client.bye()


def test_a_listener_cannot_wait_for_replies(client: Client, name: str) -> None:
    errors: list[BaseException] = []
    done = threading.Event()

    def listener(event: ll.Event) -> None:
        try:
            client.ping()
        except RuntimeError as e:
            errors.append(e)
        done.set()

    client.add_listener(listener)
    with client.lock(name):
        client.signal(name, "wake")
        assert done.wait(WAIT_MAX)
    assert len(errors) == 1 and "reader thread" in str(errors[0])


def test_an_address_list_is_tried_in_order(server: Server) -> None:
    # Port 1 on loopback refuses the connection; the next address answers.
    with Client.connect(f"127.0.0.1:1, livelock://{server.address}", request_timeout=WAIT_MAX) as client:
        client.ping()
    with pytest.raises(ll.ConnectionLost, match="could not connect"):
        Client.connect("127.0.0.1:1", connect_timeout=WAIT_MAX)


def test_a_server_that_never_answers_is_passed_over(server: Server, black_hole: str) -> None:
    # Connections to the black hole are accepted (in the backlog) and never
    # answered: after connect_timeout the next address is tried.
    servers = f"{black_hole}, livelock://{server.address}"
    client = Client.connect(servers, connect_timeout=1.0, grace=WAIT_MAX, request_timeout=WAIT_MAX)
    client.ping()
    client.close()  # dropped, not ended: the session waits for a RESUME
    with Client.resume(client.session_id, client.secret, servers, connect_timeout=1.0) as again:
        again.ping()
    with pytest.raises(ll.LivelockTimeout, match=f"could not connect: {black_hole} did not answer"):
        Client.connect(black_hole, connect_timeout=1.0)


def test_every_call_ends_after_the_request_timeout(silent_server: SilentServer) -> None:
    short = 0.1
    client = Client.connect(silent_server.address, request_timeout=short, connect_timeout=WAIT_MAX)
    pending = client.start_acquire("lock", wait=short)
    pending_all = client.start_acquire_all(["lock-a", "lock-b"], wait=short)
    pending_pool = client.start_acquire_pool([ll.Requirement(1, ["lock-c", "lock-d"])], wait=short)
    semaphore = client.semaphore("semaphore", 2)
    timed: list[tuple[str, Callable[[], object]]] = [
        *((method, lambda method=method, args=args: getattr(client, method)(*args)) for method, args in WAITING_CALLS),
        *(
            (f"Semaphore.{method}", lambda method=method, args=args: getattr(semaphore, method)(*args))
            for method, args in WAITING_SEMAPHORE_CALLS
        ),
        ("acquire(wait)", lambda: client.acquire("lock", wait=short)),  # the wait, then the request timeout
        ("Semaphore.acquire(wait)", lambda: semaphore.acquire(1, wait=short)),
        ("acquire_all(wait)", lambda: client.acquire_all(["lock", "lock-2"], wait=short)),
        ("PendingAcquire.cancel", pending.cancel),
        ("PendingAcquire.wait", pending.wait),
        ("PendingAcquireAll.cancel", pending_all.cancel),
        ("PendingAcquireAll.wait", pending_all.wait),
        ("acquire_pool(wait)", lambda: client.acquire_pool([ll.Requirement(2, ["lock", "lock-2"])], wait=short)),
        ("PendingAcquirePool.cancel", pending_pool.cancel),
        ("PendingAcquirePool.wait", pending_pool.wait),
        ("bye", client.bye),  # last: it closes the connection
    ]
    assert pending.wait_queued() is False  # not told within the request timeout
    for what, call in timed:
        started = time.monotonic()
        with pytest.raises(ll.LivelockTimeout):
            call()
        assert short <= time.monotonic() - started < short * 2 + 1, what


# ---- Counting semaphores ------------------------------------------------------


def test_permits_are_shared_out_by_weight_in_fifo_order(
    client: Client, other: Client, server: Server, name: str
) -> None:
    connect = Client.connect
    with connect(server.address, request_timeout=WAIT_MAX) as third, connect(server.address) as fourth:
        semaphore = client.semaphore(name, capacity=4)
        with semaphore.permits(3) as held:
            assert (held.mode, held.weight, held.name) == (ll.Mode.PERMITS, 3, name.encode())
            big = other.semaphore(name, 4).start_acquire(2)
            assert big.wait_queued(WAIT_MAX)  # 3 + 2 > 4: it waits
            small = third.semaphore(name, 4).start_acquire(1)
            assert small.wait_queued(WAIT_MAX)  # 3 + 1 fits, but it may not pass the request for 2
            with pytest.raises(ll.LivelockTimeout):
                small.wait(0.05)
            assert fourth.semaphore(name, 4).try_acquire(1) is None  # nor may a try
            inspection = semaphore.inspect()
            assert inspection is not None
            assert (inspection.record.mode, inspection.record.capacity) == (ll.Mode.PERMITS, 4)
            assert [(h.session, h.weight, h.token) for h in inspection.record.holders] == [
                (client.session_id, 3, held.token)
            ]
            assert [(w.session, w.mode, w.weight) for w in inspection.queue] == [
                (other.session_id, ll.Mode.PERMITS, 2),
                (third.session_id, ll.Mode.PERMITS, 1),
            ]
        # Released at the end of the block: 2 + 1 fit together.
        got_big, got_small = big.wait(WAIT_MAX), small.wait(WAIT_MAX)
        assert held.token < got_big.token < got_small.token
        assert (got_big.weight, got_small.weight) == (2, 1)
        listing = client.list(name)
        (record,) = listing.records
        assert sorted((h.session, h.weight) for h in record.holders) == sorted(
            [(other.session_id, 2), (third.session_id, 1)]
        )
        assert record.capacity == 4
        # 3 permits out of 4: one more fits, two do not.
        last = semaphore.try_acquire(1)
        assert last is not None and last.weight == 1
        last.release()
        with pytest.raises(ll.LockBusy):
            semaphore.acquire(2, wait=0)
        with pytest.raises(ll.AcquireTimedOut):
            semaphore.acquire(2, wait=0.1)
        with pytest.raises(ll.LivelockTimeout):
            semaphore.acquire(2, timeout=0.2)  # given up: cancelled on the server
        wait_until(lambda: queue_is_empty(client, name), "the abandoned acquire to leave the queue")
        other.release(name)  # by name, as a lock's
        got_small.release()
    assert client.inspect(name) is None


def test_capacity_conflicts_and_wrong_kinds(client: Client, other: Client, name: str) -> None:
    with client.semaphore(name, 4).permits(1):
        with pytest.raises(ll.CapacityConflictError) as conflict:
            other.semaphore(name, 8).acquire(1, wait=0)
        assert conflict.value.status == ll.Status.CAPACITY_CONFLICT
        with pytest.raises(ll.WrongKindError) as wrong:
            other.acquire(name, wait=0)  # a semaphore's name as a lock
        assert wrong.value.status == ll.Status.WRONG_KIND
        with pytest.raises(ll.AlreadyHeldError):
            client.semaphore(name, 4).acquire(1)  # one hold per name and session
        assert other.semaphore(name, 4).acquire(3, wait=0).weight == 3
    with client.lock(name + "-lock"):
        with pytest.raises(ll.WrongKindError):
            other.semaphore(name + "-lock", 2).acquire(1, wait=0)  # a lock's name as a semaphore
        with pytest.raises(ll.WrongKindError):
            other.semaphore(name + "-lock", 2).set_capacity(3)
    with pytest.raises(ValueError, match="weight"):
        client.semaphore(name, 4).acquire(5)  # refused before sending
    with pytest.raises(ValueError, match="capacity"):
        client.semaphore(name, 0)


def test_set_capacity(client: Client, other: Client, server: Server, name: str) -> None:
    semaphore = client.semaphore(name, 4)
    assert semaphore.set_capacity(5) is False  # not in use: nothing to change on the server
    assert semaphore.capacity == 5
    with Client.connect(server.address, request_timeout=WAIT_MAX) as third:
        held = semaphore.acquire(2)
        wants_4 = other.semaphore(name, 5).start_acquire(4)
        assert wants_4.wait_queued(WAIT_MAX)
        assert semaphore.set_capacity(6) is True  # 2 + 4 fit now
        granted = wants_4.wait(WAIT_MAX)
        assert semaphore.capacity == 6
        with pytest.raises(ll.CapacityConflictError):
            third.semaphore(name, 5).acquire(1, wait=0)  # the old capacity
        wants_6 = third.semaphore(name, 6).start_acquire(6)
        assert wants_6.wait_queued(WAIT_MAX)
        assert other.semaphore(name, 1).set_capacity(3) is True  # any session may
        with pytest.raises(ll.OverCapacityError) as over:
            wants_6.wait(WAIT_MAX)
        assert over.value.status == ll.Status.OVER_CAPACITY and isinstance(over.value, ll.NotAcquired)
        # Holders keep their permits: 6 out of 3 until they release them.
        inspection = semaphore.inspect()
        assert inspection is not None and inspection.record.capacity == 3
        assert sum(h.weight or 0 for h in inspection.record.holders) == 6
        with pytest.raises(ll.CapacityConflictError):
            third.semaphore(name, 6).acquire(1, wait=0)  # that object still names 6
        granted.release()
        held.release()
        assert third.inspect(name) is None


def test_closing_a_connection_frees_its_permits(other: Client, server: Server, name: str) -> None:
    holder = Client.connect(server.address, request_timeout=WAIT_MAX)  # no grace: the session ends with it
    held = holder.semaphore(name, 3).acquire(3)
    waiting = other.semaphore(name, 3).start_acquire(2)
    assert waiting.wait_queued(WAIT_MAX)
    holder.close()
    granted = waiting.wait(WAIT_MAX)
    assert granted.token > held.token and held.lost
    inspection = other.inspect(name)
    assert inspection is not None
    assert [(h.session, h.weight) for h in inspection.record.holders] == [(other.session_id, 2)]
    granted.release()


def test_resume_lists_permits(other: Client, server: Server, name: str) -> None:
    client = Client.connect(server.address, grace=WAIT_MAX, request_timeout=WAIT_MAX)
    held = client.semaphore(name, 2).acquire(2)
    client.close()
    with Client.resume(client.session_id, client.secret, server.address, request_timeout=WAIT_MAX) as again:
        assert again.resumed is not None
        (listed,) = again.resumed.holds
        assert (listed.name, listed.token, listed.mode) == (held.name, held.token, ll.Mode.PERMITS)
        assert other.semaphore(name, 2).try_acquire(1) is None
        listed.release()
    assert other.semaphore(name, 2).try_acquire(2) is not None


# ---- Ordered locking and deadlocks ---------------------------------------------


def test_ordered_locking_refuses_acquires_out_of_order(client: Client, other: Client, name: str) -> None:
    a, b, c = (f"{name}/{x}" for x in "abc")
    client.set_order("ascending")
    with client.lock(b):
        with pytest.raises(ll.OrderViolationError) as refused:
            client.acquire(a)
        assert refused.value.status == ll.Status.ORDER_VIOLATION
        with pytest.raises(ll.OrderViolationError):
            client.semaphore(a, 2).acquire(1)  # semaphores are ordered too
        with client.lock(c):
            pass
        with pytest.raises(ll.OrderViolationError):
            client.set_order(None)  # not while holding anything
    # A wait counts as a hold: the queued acquire of c forbids b.
    with other.lock(c):
        waiting = client.start_acquire(c)
        assert waiting.wait_queued(WAIT_MAX)
        with pytest.raises(ll.OrderViolationError):
            client.acquire(b, wait=0)
        with pytest.raises(ll.OrderViolationError):
            client.set_order(None)
        assert waiting.cancel()
        with pytest.raises(ll.AcquireCancelled):
            waiting.wait(WAIT_MAX)
    # By priorities: c first, then a; b (not listed) after both.
    client.set_order({c: 1, a: 2})
    with client.lock(c), client.lock(a), client.lock(b):
        pass
    with client.lock(a):
        with pytest.raises(ll.OrderViolationError):
            client.acquire(c)
    client.set_order(None)
    with client.lock(b), client.lock(a):
        pass  # any order again


def test_a_deadlock_fails_the_youngest_wait(client: Client, other: Client, name: str) -> None:
    x, y = f"{name}-x", f"{name}-y"
    held_x = client.acquire(x)
    held_y = other.acquire(y)
    waits_for_y = client.start_acquire(y, wait=WAIT_MAX)
    assert waits_for_y.wait_queued(WAIT_MAX)
    time.sleep(0.002)  # the server orders waits by the millisecond: this one is strictly younger
    started = time.monotonic()
    with pytest.raises(ll.DeadlockError) as deadlock:
        other.acquire(x, wait=WAIT_MAX)
    assert time.monotonic() - started < WAIT_MAX / 2  # not the wait running out
    error = deadlock.value
    assert error.status == ll.Status.DEADLOCK and isinstance(error, ll.NotAcquired)
    assert f'"{x}"' in error.cycle and f'"{y}"' in error.cycle and error.cycle.startswith("deadlock")
    assert error.cycle in str(error)
    # The other wait goes on: once y is released, it is granted.
    held_y.release()
    granted = waits_for_y.wait(WAIT_MAX)
    assert granted.name == y.encode() and granted.active
    granted.release()
    held_x.release()


# ---- Several locks at once (ACQUIRE_ALL) ------------------------------------------


def holder_tokens(client: Client, name: str | bytes) -> list[tuple[int, int]]:
    """(session, token) of every holder of ``name``, as the server has them."""
    inspection = client.inspect(name)
    return [] if inspection is None else [(h.session, h.token) for h in inspection.record.holders]


def test_acquire_all_grants_every_name_with_its_token_in_order(client: Client, other: Client, name: str) -> None:
    a, b, c = (f"{name}/{x}" for x in "abc")
    # Not in byte order: the holds come back in the order given.
    held = client.acquire_all([c, (a, "shared"), b])
    assert [(h.name, h.mode) for h in held] == [
        (c.encode(), ll.Mode.EXCLUSIVE),
        (a.encode(), ll.Mode.SHARED),
        (b.encode(), ll.Mode.EXCLUSIVE),
    ]
    for hold in held:
        assert hold.active and holder_tokens(other, hold.name) == [(client.session_id, hold.token)]
    assert other.try_acquire(c) is None
    shared = other.acquire(a, shared=True, wait=0)  # a is shared
    shared.release()
    with pytest.raises(ll.AlreadyHeldError):
        client.acquire(b)  # each part is an ordinary hold of the session
    for hold in held:
        hold.release()
    assert all(other.inspect(n) is None for n in (a, b, c))
    # The block form releases every hold at its end; tokens only grow.
    with client.lock_all([a, b, c], shared=True, wait=WAIT_MAX) as again:
        assert [h.mode for h in again] == [ll.Mode.SHARED] * 3
        assert all(new.token > old.token for new, old in zip(again, sorted(held, key=lambda h: h.name)))
        assert other.try_acquire(b, shared=True) is not None
        assert other.try_acquire_all([a, (c, "exclusive")]) is None
    assert not any(h.active for h in again)
    got = other.try_acquire_all([c, a])
    assert got is not None and [h.name for h in got] == [c.encode(), a.encode()]


def test_a_try_that_finds_a_name_taken_gives_the_others_back(
    client: Client, other: Client, server: Server, name: str
) -> None:
    a, b, c = (f"{name}/{x}" for x in "abc")
    with Client.connect(server.address, request_timeout=WAIT_MAX) as third:
        with other.lock(b):  # the server takes a first, then finds b taken
            assert client.try_acquire_all([a, b, c]) is None
            with pytest.raises(ll.LockBusy) as busy:
                client.acquire_all([c, b, a], wait=0)
            assert busy.value.status == ll.Status.BUSY
            # What the tries took was given back before they were answered.
            got = third.try_acquire_all([a, c])
            assert got is not None
            for hold in got:
                hold.release()
        assert client.try_acquire_all([a, b, c]) is not None


def test_acquire_all_times_out_and_gives_everything_back(
    client: Client, other: Client, server: Server, name: str
) -> None:
    a, b = f"{name}/a", f"{name}/b"
    with Client.connect(server.address, request_timeout=WAIT_MAX) as third:
        with other.lock(b):
            with pytest.raises(ll.AcquireTimedOut):
                client.acquire_all([a, b], wait=0.2)
            assert third.try_acquire(a) is not None  # given back
            third.release(a)
            # Given up by the caller: cancelled on the server, a given back too.
            with pytest.raises(ll.LivelockTimeout):
                client.acquire_all([a, b], timeout=0.2)
            wait_until(lambda: queue_is_empty(other, b), "the abandoned ACQUIRE_ALL to leave the queue")
            wait_until(lambda: third.inspect(a) is None, "a given back")
        assert client.acquire_all([a, b], wait=WAIT_MAX)[1].name == b.encode()


def test_a_pending_acquire_all_is_cancelled_or_granted(
    client: Client, other: Client, server: Server, name: str
) -> None:
    a, b = f"{name}/a", f"{name}/b"
    with Client.connect(server.address, request_timeout=WAIT_MAX) as third:
        blocker = other.acquire(b)
        pending = client.start_acquire_all([a, b])
        assert pending.wait_queued(WAIT_MAX)  # a taken, waiting for b
        assert [session for session, _ in holder_tokens(third, a)] == [client.session_id]
        # The part taken is not the client's yet.
        with pytest.raises(ll.NotHeldError):
            client.release(a)
        with pytest.raises(ll.AlreadyHeldError):
            client.acquire(a, wait=0)
        assert pending.cancel() is True
        with pytest.raises(ll.AcquireCancelled):
            pending.wait(WAIT_MAX)
        assert pending.cancel() is False
        assert third.try_acquire(a) is not None  # given back
        third.release(a)
        # Another one waits, and is granted once b is released.
        waiting = client.start_acquire_all([(b, "shared"), a], wait=WAIT_MAX)
        assert waiting.wait_queued(WAIT_MAX)
        with pytest.raises(ll.LivelockTimeout):
            waiting.wait(0.05)
        blocker.release()
        held = waiting.wait(WAIT_MAX)
        assert [(h.name, h.mode) for h in held] == [(b.encode(), ll.Mode.SHARED), (a.encode(), ll.Mode.EXCLUSIVE)]
        assert held[0].token > blocker.token
        assert holder_tokens(third, b) == [(client.session_id, held[0].token)]


def test_a_part_force_released_cancels_the_acquire_all(client: Client, other: Client, name: str) -> None:
    a, b = f"{name}/a", f"{name}/b"
    with other.lock(b):
        pending = client.start_acquire_all([a, b])
        assert pending.wait_queued(WAIT_MAX)
        other.force_release(a)  # the part already taken
        # It fails at once, while b is still held: it does not wait for b.
        with pytest.raises(ll.AcquireCancelled):
            pending.wait(WAIT_MAX)
    assert client.next_event(0.05) is None  # never the client's: no LockLost
    assert client.try_acquire_all([a, b]) is not None


def test_acquire_all_holds_are_listed_on_resume(other: Client, server: Server, name: str) -> None:
    client = Client.connect(server.address, grace=WAIT_MAX, request_timeout=WAIT_MAX)
    held = client.acquire_all([f"{name}/b", f"{name}/a"])
    client.close()
    client.reconnect()
    assert client.resumed is not None
    assert sorted((h.name, h.token) for h in client.resumed.holds) == sorted((h.name, h.token) for h in held)
    assert all(h.active for h in held)
    for hold in held:
        hold.release()
    assert other.try_acquire_all([f"{name}/a", f"{name}/b"]) is not None
    client.bye()


def test_bad_acquire_all_names_are_refused_before_sending(client: Client, name: str) -> None:
    bad_lists: list[list[ll.LockSpec]] = [
        [],
        [name, name],
        [name, (name, "shared")],
        [name, name.encode()],
        [f"{name}/{i}" for i in range(33)],
        [name, ""],
        [name, "x" * 1025],
        [(name, "permits")],  # type: ignore[list-item]
    ]
    for names in bad_lists:
        with pytest.raises(ValueError):
            client.acquire_all(names)
        with pytest.raises(ValueError):
            client.try_acquire_all(names)
        with pytest.raises(ValueError):
            client.start_acquire_all(names)
        with pytest.raises(ValueError):
            with client.lock_all(names):
                pass
    with pytest.raises(TypeError):
        client.acquire_all(name)  # one name, not a list of them
    assert client.inspect(name) is None  # nothing was sent
    client.ping()


# ---- Resource pools (ACQUIRE_POOL) --------------------------------------------------


def test_a_pool_grants_k_of_n_and_gives_them_back(client: Client, other: Client, server: Server, name: str) -> None:
    candidates = [f"{name}/{x}" for x in "abcd"]
    pool = ll.Requirement(2, candidates)
    with Client.connect(server.address, request_timeout=WAIT_MAX) as third:
        grant = client.acquire_pool([pool], wait=WAIT_MAX)
        assert len(grant) == 1 and len(grant[0]) == 2 and grant.active
        mine = grant.names(0)
        assert len(set(mine)) == 2 and set(mine) <= {n.encode() for n in candidates}
        assert [candidates[i].encode() for i in grant.indices(0)] == mine
        for hold in grant[0]:  # ordinary exclusive holds of the session, with their tokens
            assert hold.mode == ll.Mode.EXCLUSIVE and hold.active
            assert holder_tokens(other, hold.name) == [(client.session_id, hold.token)]
        assert grant.tokens(0) == [hold.token for hold in grant[0]]
        # The pool queue's permits: 2 of the 4, held by the session too.
        queue = grant.permits[0]
        assert queue is not None and queue.mode == ll.Mode.PERMITS and queue.weight == 2
        assert queue.name == pool.queue()
        inspection = other.inspect(queue.name)
        assert inspection is not None and inspection.record.capacity == 4
        assert [(h.session, h.token, h.weight) for h in inspection.record.holders] == [
            (client.session_id, queue.token, 2)
        ]
        assert [h.name for h in grant.holds] == [*mine, queue.name]
        # Another client's try gets the other two; a third's finds none.
        theirs = other.try_acquire_pool([pool])
        assert theirs is not None
        assert sorted(mine + theirs.names(0)) == sorted(n.encode() for n in candidates)
        assert third.try_acquire_pool([pool]) is None
        with pytest.raises(ll.LockBusy):
            third.acquire_pool([pool], wait=0)
        with pytest.raises(ll.AcquireTimedOut):
            third.acquire_pool([pool], wait=0.2)
        # Released (the resources, then the permits), they are free again.
        grant.release()
        assert not grant.active and not any(hold.active for hold in grant.holds)
        assert all(other.inspect(n) is None for n in mine)
        with third.lock_pool([pool], wait=WAIT_MAX) as again:
            assert sorted(again.names(0)) == sorted(mine)
            before = {hold.name: hold.token for hold in grant[0]}
            assert all(hold.token > before[hold.name] for hold in again[0])  # tokens only grow
        assert not again.active and all(other.inspect(n) is None for n in mine)
        theirs.release()
        grant.release()  # nothing left to release


def test_a_filter_picks_only_matching_candidates(client: Client, other: Client, name: str) -> None:
    gpus = {f"{name}/gpu{i}": tags for i, tags in enumerate(["model=T1,site=x", "model=T2", "model=T1", "model=T2"])}
    db = f"{name}/db"
    t1 = ll.Requirement(2, gpus, filter="model=T1")
    grant = client.acquire_pool([t1, db], wait=WAIT_MAX)
    assert grant.names(0) == [f"{name}/gpu0".encode(), f"{name}/gpu2".encode()] and grant.indices(0) == [0, 2]
    assert grant.names(1) == [db.encode()]  # a plain name among the requirements
    assert grant.permits == [None, None]  # no spare candidates: no pool queue
    # One T2 of two: with a queue of the two T2 (the filter is a mapping here).
    t2 = ll.Requirement(1, gpus, filter={"model": "T2"})
    assert t2.queue() is not None and t2.queue() != ll.Requirement(1, gpus).queue()
    with other.lock_pool([t2], wait=WAIT_MAX) as theirs:
        assert theirs.names(0)[0] in (f"{name}/gpu1".encode(), f"{name}/gpu3".encode())
        queue = theirs.permits[0]
        assert queue is not None and queue.name == t2.queue() and queue.weight == 1
        with pytest.raises(ll.AlreadyHeldError):
            client.try_acquire_pool([ll.Requirement(1, gpus, filter="site=x")])  # gpu0 is its own
    assert other.try_acquire_pool([ll.Requirement(1, gpus, filter="model=T1,site=x")]) is None  # gpu0 is taken
    grant.release()
    assert other.try_acquire_pool([ll.Requirement(1, gpus, filter="model=T1,site=x")]) is not None


def test_a_filter_that_leaves_too_few_candidates_is_over_capacity(client: Client, name: str) -> None:
    gpus = {f"{name}/a": "model=T1", f"{name}/b": "model=T2", f"{name}/c": "model=T2"}
    requirements: list[ll.RequirementSpec] = [f"{name}/d", ll.Requirement(2, gpus, filter="model=T1")]
    calls: list[Callable[[], object]] = [
        lambda: client.acquire_pool(requirements, timeout=WAIT_MAX),  # refused at once: it would never be granted
        lambda: client.acquire_pool(requirements, wait=0),
        lambda: client.try_acquire_pool(requirements),  # not a None: no waiting would help
    ]
    for call in calls:
        with pytest.raises(ll.OverCapacityError) as over:
            call()
        assert over.value.status == ll.Status.OVER_CAPACITY and isinstance(over.value, ll.NotAcquired)
        assert "requirement 1" in over.value.message
    assert client.list(f"{name}*").records == ()  # nothing taken
    assert client.acquire_pool([ll.Requirement(2, gpus, filter="model=T2")], wait=0).names(0) == [
        f"{name}/b".encode(),
        f"{name}/c".encode(),
    ]


def test_closing_the_session_frees_the_whole_pool_grant(other: Client, server: Server, name: str) -> None:
    candidates = [f"{name}/{i}" for i in range(4)]
    client = Client.connect(server.address, request_timeout=WAIT_MAX)  # no grace: the session ends with it
    grant = client.acquire_pool([ll.Requirement(2, candidates), ll.Requirement.name(f"{name}/x")])
    queue = grant.permits[0]
    assert queue is not None and other.inspect(queue.name) is not None
    client.close()
    everything: list[ll.RequirementSpec] = [ll.Requirement(4, candidates), f"{name}/x"]
    taken = other.acquire_pool(everything, wait=WAIT_MAX)
    assert sorted(taken.names(0)) == sorted(n.encode() for n in candidates) and taken.permits == [None, None]
    assert other.inspect(queue.name) is None and all(h.lost for h in grant.holds)
    taken.release()


def holder_sessions(client: Client, name: str | bytes) -> list[int]:
    """The sessions that hold ``name`` (a lock, or a semaphore's permits)."""
    return [session for session, _ in holder_tokens(client, name)]


def test_a_pending_acquire_pool_is_cancelled_or_granted(
    client: Client, other: Client, server: Server, name: str
) -> None:
    a, b = f"{name}/a", f"{name}/b"
    pool = ll.Requirement(1, [a, b])
    queue = pool.queue()
    assert queue is not None
    blockers = other.acquire_all([a, b])
    pending = client.start_acquire_pool([pool])
    assert pending.wait_queued(WAIT_MAX)  # its queue's permits taken, a passed over, waiting for b
    assert pending.cancel() is True
    with pytest.raises(ll.AcquireCancelled):
        pending.wait(WAIT_MAX)
    assert pending.cancel() is False
    wait_until(lambda: other.inspect(queue) is None, "the queue's permits given back")
    waiting = client.start_acquire_pool([pool], wait=WAIT_MAX)
    assert waiting.wait_queued(WAIT_MAX)
    with pytest.raises(ll.LivelockTimeout):
        waiting.wait(0.05)
    blockers[1].release()
    grant = waiting.wait(WAIT_MAX)
    assert grant.names(0) == [b.encode()] and grant[0][0].token > blockers[1].token
    # A caller that gives up has the request cancelled, its permits given back.
    with Client.connect(server.address, request_timeout=WAIT_MAX) as third:
        with pytest.raises(ll.LivelockTimeout):
            third.acquire_pool([pool], timeout=0.2)
        wait_until(lambda: queue_is_empty(client, b), "the abandoned ACQUIRE_POOL to leave the queue")
        wait_until(
            lambda: holder_sessions(other, queue) == [client.session_id], "the abandoned request's permits given back"
        )
    grant.release()
    blockers[0].release()


def test_pool_holds_are_listed_on_resume(other: Client, server: Server, name: str) -> None:
    client = Client.connect(server.address, grace=WAIT_MAX, request_timeout=WAIT_MAX)
    grant = client.acquire_pool([ll.Requirement(1, [f"{name}/a", f"{name}/b"])])
    client.close()
    client.reconnect()
    assert client.resumed is not None
    assert sorted((h.name, h.token) for h in client.resumed.holds) == sorted((h.name, h.token) for h in grant.holds)
    grant.release()
    assert all(not h.active for h in grant.holds)
    assert other.try_acquire_pool([ll.Requirement(2, [f"{name}/a", f"{name}/b"])]) is not None
    client.bye()


def test_bad_requirements_are_refused_before_sending(client: Client, name: str) -> None:
    bad_lists: list[list[ll.RequirementSpec]] = [
        [],
        [name, name],
        [ll.Requirement(1, [name, f"{name}/2"]), f"{name}/2"],
        [f"{name}/{i}" for i in range(17)],
        [ll.Requirement(1, [f"{name}/{r}/{i}" for i in range(13)]) for r in range(5)],
        [name, ""],
    ]
    for requirements in bad_lists:
        with pytest.raises(ValueError):
            client.acquire_pool(requirements)
        with pytest.raises(ValueError):
            client.try_acquire_pool(requirements)
        with pytest.raises(ValueError):
            client.start_acquire_pool(requirements)
        with pytest.raises(ValueError):
            with client.lock_pool(requirements):
                pass
    with pytest.raises(ValueError):
        ll.Requirement(3, [name, f"{name}/2"])
    with pytest.raises(TypeError):
        client.acquire_pool(ll.Requirement.name(name))  # type: ignore[arg-type]
    assert client.list(f"{name}*").records == ()  # nothing was sent
    client.ping()
