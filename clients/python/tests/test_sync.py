"""The blocking client against a real server: grants and tokens, try and
timeout, shared holds, FIFO hand-over, leases and LockLost, extend, cancel,
signals, INSPECT/LIST/STATS, resume within and after the grace, passwords,
bad input and server errors; and, on a server that never answers, every
call that waits for it ends after the request timeout."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Callable

import pytest
from conftest import WAIT_MAX, WAITING_CALLS, Server, SilentServer, wait_until

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


def test_every_call_ends_after_the_request_timeout(silent_server: SilentServer) -> None:
    short = 0.1
    client = Client.connect(silent_server.address, request_timeout=short, connect_timeout=WAIT_MAX)
    pending = client.start_acquire("lock", wait=short)
    timed: list[tuple[str, Callable[[], object]]] = [
        *((method, lambda method=method, args=args: getattr(client, method)(*args)) for method, args in WAITING_CALLS),
        ("acquire(wait)", lambda: client.acquire("lock", wait=short)),  # the wait, then the request timeout
        ("PendingAcquire.cancel", pending.cancel),
        ("PendingAcquire.wait", pending.wait),
        ("bye", client.bye),  # last: it closes the connection
    ]
    assert pending.wait_queued() is False  # not told within the request timeout
    for what, call in timed:
        started = time.monotonic()
        with pytest.raises(ll.LivelockTimeout):
            call()
        assert short <= time.monotonic() - started < short * 2 + 1, what
