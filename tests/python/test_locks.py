"""The client's lock classes: LiveLock, LiveRLock, LiveNBLock, blocking acquire."""

import threading
import time

import pytest
from livelock.client import (
    LiveLock,
    LiveLockClientTimeoutException,
    LiveNBLock,
    LiveRLock,
)

from conftest import WAIT_MAX, wait_until


def test_context_manager_acquires_and_releases(server):
    a, b = server.connection(), server.connection()
    with LiveLock("cm", live_lock_connection=a) as lock:
        assert lock.acquired
        assert lock.locked() is True
        assert LiveNBLock("cm", live_lock_connection=b).acquire() is False
    assert not lock.acquired
    assert b.send_command("LOCKED", "cm") == "0"
    assert LiveNBLock("cm", live_lock_connection=b).acquire() is True


def test_non_blocking_lock(server):
    a, b = server.connection(), server.connection()
    first = LiveNBLock("nb", live_lock_connection=a)
    second = LiveNBLock("nb", live_lock_connection=b)
    assert first.acquire() is True
    started = time.monotonic()
    assert second.acquire() is False
    assert not second
    assert time.monotonic() - started < 5  # no polling
    assert first.release() is True
    assert second.acquire() is True
    assert first.release() is False  # no longer a's


def test_reentrant_lock(server):
    a, b = server.connection(), server.connection()
    outer = LiveRLock("rl", live_lock_connection=a)
    assert outer.acquire(blocking=False) is True
    inner = LiveRLock("rl", live_lock_connection=a)
    assert inner.acquire(blocking=False) is True  # same client: AQR succeeds
    # A plain LiveLock of the same client is not reentrant.
    assert LiveLock("rl", live_lock_connection=a).acquire(blocking=False) is False
    assert LiveRLock("rl", live_lock_connection=b).acquire(blocking=False) is False
    # As in server.py there is no count: the first release frees the lock.
    assert inner.release() is True
    assert a.send_command("LOCKED", "rl") == "0"
    assert outer.release() is False

    with LiveRLock("rl2", live_lock_connection=a) as first:
        with LiveRLock("rl2", live_lock_connection=a) as second:
            assert first.acquired and second.acquired
            assert LiveRLock("rl2", live_lock_connection=b).acquire(blocking=False) is False
    assert b.send_command("LOCKED", "rl2") == "0"


def test_blocking_acquire_times_out(server):
    a, b = server.connection(), server.connection()
    holder = LiveLock("bt", live_lock_connection=a)  # keep it: __del__ releases
    assert holder.acquire(blocking=False)
    waiter = LiveLock("bt", live_lock_connection=b, timeout=0.6)
    started = time.monotonic()
    with pytest.raises(LiveLockClientTimeoutException):
        waiter.acquire()
    assert time.monotonic() - started >= 0.6
    assert not waiter.acquired
    assert a.send_command("LOCKED", "bt") == "1"


def test_blocking_acquire_polls_until_released(server):
    a, b = server.connection(), server.connection()
    holder = LiveLock("bp", live_lock_connection=a)
    assert holder.acquire(blocking=False)

    waiter = LiveLock("bp", live_lock_connection=b, timeout=WAIT_MAX)
    waiter.retry_interval = 0.05
    attempts = []
    refused_once = threading.Event()
    real_acquire = waiter._acquire

    def counting_acquire():
        result = real_acquire()
        attempts.append(result)
        if not result:
            refused_once.set()
        return result

    waiter._acquire = counting_acquire
    outcome = {}

    def run():
        try:
            outcome["result"] = waiter.acquire()
        except Exception as e:  # reported below
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert refused_once.wait(WAIT_MAX), "the waiter never tried"
        assert holder.release() is True
    finally:
        thread.join(WAIT_MAX)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome
    assert outcome["result"] is True and waiter.acquired
    assert attempts[0] is False and attempts[-1] is True
    assert a.send_command("AQ", "bp") == "0"
    waiter.release()
    wait_until(lambda: a.send_command("AQ", "bp") == "1", "the lock to be free")


def test_dropping_an_acquired_lock_releases_it(server):
    a, b = server.connection(), server.connection()
    lock = LiveLock("dropped", live_lock_connection=a)
    assert lock.acquire(blocking=False)
    assert b.send_command("LOCKED", "dropped") == "1"
    del lock  # LiveLock.__del__ sends RELEASE (CPython frees it at once)
    assert b.send_command("LOCKED", "dropped") == "0"


def test_zero_timeout_blocking_acquire_tries_once(server):
    a, b = server.connection(), server.connection()
    assert a.send_command("AQ", "z") == "1"
    # timeout 0: the client tries once, then (deadline passed) raises.
    with pytest.raises(LiveLockClientTimeoutException):
        LiveLock("z", live_lock_connection=b, timeout=0.0001).acquire()
    assert a.send_command("RELEASE", "z") == "1"
    assert LiveLock("z", live_lock_connection=b, timeout=0.0001).acquire() is True
