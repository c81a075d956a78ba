"""Client ids as sessions: losing the socket, the release grace, several
connections sharing one client id, fork."""

import os
import select
import signal
import socket
import time

import pytest
from livelock.client import LiveLock

from conftest import WAIT_MAX, stats, wait_until


def detached_sessions(observer):
    return stats(observer)["sessions_detached"]


def break_socket(connection, how):
    """Loses the client's connection under it; its next command reconnects."""
    if how == "close":
        connection._sock.close()
    else:
        connection._sock.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("how", ["close", "shutdown"])
def test_lost_socket_is_restored_within_the_grace(make_server, how):
    grace = 1.5
    server = make_server(release_all_timeout=grace)
    a, observer = server.connection(), server.connection()
    lock = LiveLock("restored", live_lock_connection=a)
    assert lock.acquire(blocking=False)
    client_id, first_socket = a.client_id, a._sock
    assert detached_sessions(observer) == 0

    break_socket(a, how)
    wait_until(lambda: detached_sessions(observer) == 1, "the server to see the connection go")
    # In its grace: still held.
    assert observer.send_command("AQ", "restored") == "0"
    # The client reconnects on its next command, with the same client id (CONN <id>).
    assert lock.locked() is True
    assert a._sock is not first_socket
    assert a.client_id == client_id
    assert detached_sessions(observer) == 0
    assert a.send_command("AQR", "restored") == "1"  # still a's
    # The grace is cancelled: well past it, the lock is still held.
    time.sleep(grace + 0.5)
    assert observer.send_command("AQ", "restored") == "0"
    assert lock.release() is True
    assert observer.send_command("AQ", "restored") == "1"


def test_another_client_takes_the_lock_after_the_grace(make_server):
    grace = 1.0
    server = make_server(release_all_timeout=grace)
    a, b = server.connection(), server.connection()
    assert a.send_command("AQ", "lost") == "1"
    assert a.send_command("AQ", "lost-too") == "1"
    client_id = a.client_id
    lost_at = time.monotonic()
    a._sock.close()
    assert b.send_command("AQ", "lost") == "0"  # in the grace
    wait_until(lambda: b.send_command("AQ", "lost") == "1", "the grace to run out")
    assert time.monotonic() - lost_at >= grace * 0.9
    # All of a's locks go (each lock's shard learns it on its own).
    wait_until(lambda: b.send_command("LOCKED", "lost-too") == "0", "a's other lock to go")
    # a comes back too late: same client id, but the locks are gone.
    assert a.send_command("AQ", "lost") == "0"
    assert a.client_id == client_id
    assert a.send_command("AQ", "lost-too") == "1"


def test_two_connections_share_a_client_id(make_server):
    grace = 0.5
    server = make_server(release_all_timeout=grace)
    observer = server.connection()
    first = server.connection()
    assert first.send_command("AQ", "shared-1") == "1"
    client_id = first.client_id
    latest = server.connection(client_id=client_id)
    assert latest.send_command("PING") == "PONG"
    assert latest.client_id == client_id
    # Both connections act for the same client.
    assert latest.send_command("AQR", "shared-1") == "1"
    assert latest.send_command("AQ", "shared-2") == "1"
    assert first.send_command("LOCKED", "shared-2") == "1"
    connections = stats(observer)["connections"]

    # Closing the older connection keeps the locks, with no grace started.
    first._sock.close()
    wait_until(lambda: stats(observer)["connections"] == connections - 1,
               "the server to see the older connection go")
    assert stats(observer)["sessions_detached"] == 0
    time.sleep(grace * 2)  # the subject: no grace was started
    assert observer.send_command("AQ", "shared-1") == "0"
    assert observer.send_command("AQ", "shared-2") == "0"
    assert latest.send_command("RELEASE", "shared-2") == "1"

    # Closing the latest one starts the grace; after it the locks are free.
    latest._sock.close()
    wait_until(lambda: stats(observer)["sessions_detached"] == 1, "the grace to start")
    wait_until(lambda: observer.send_command("AQ", "shared-1") == "1", "the grace to run out")


def _wait_child(pid):
    deadline = time.monotonic() + WAIT_MAX
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not exit in time")
        time.sleep(0.01)


def _read_to_eof(fd):
    """Reads a pipe until EOF, bounded by WAIT_MAX; closes it."""
    deadline = time.monotonic() + WAIT_MAX
    data = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail("the forked child did not report in time")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    return data
                data += chunk
    finally:
        os.close(fd)


def test_forked_child_gets_its_own_client_id(server):
    parent = server.connection()
    parent_lock = LiveLock("parent-lock", live_lock_connection=parent)
    assert parent_lock.acquire(blocking=False)
    parent_id, parent_socket = parent.client_id, parent._sock
    id_read, id_write = os.pipe()  # child -> parent: its client id
    go_read, go_write = os.pipe()  # parent -> child: exit now
    pid = os.fork()
    if pid == 0:  # the child: reports through its exit status
        status = 99
        try:
            os.close(id_read)
            os.close(go_write)
            # Same connection object: the client sees the pid change, opens a
            # new socket and CONNs without an id.
            child_lock = LiveLock("child-lock", live_lock_connection=parent)
            if parent.send_command("AQ", "parent-lock") != "0":
                status = 10
            elif parent.client_id in (None, parent_id):
                status = 11
            elif not child_lock.acquire(blocking=False):
                status = 12
            elif parent.send_command("AQR", "parent-lock") != "0":
                status = 13
            else:
                os.write(id_write, parent.client_id.encode())
                os.close(id_write)
                os.read(go_read, 1)  # the parent looks at the locks meanwhile
                status = 0  # exits holding child-lock
        finally:
            os._exit(status)
    os.close(id_write)
    os.close(go_read)
    status = None
    try:
        child_id = _read_to_eof(id_read).decode()
        observer = server.connection()
        if child_id:  # else the child failed: its status says how
            assert observer.send_command("LOCKED", "child-lock") == "1"
            assert observer.send_command("AQ", "child-lock") == "0"
    finally:
        os.close(go_write)
        status = _wait_child(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status:#x}"
    assert child_id and child_id != parent_id
    # The parent's connection is untouched: same id, same socket, lock still its own.
    assert parent.client_id == parent_id
    assert parent.send_command("AQR", "parent-lock") == "1"
    assert parent._sock is parent_socket
    assert observer.send_command("AQ", "parent-lock") == "0"
    # The child's lock was its own; the child is gone, so after the grace it is free.
    wait_until(lambda: observer.send_command("AQ", "child-lock") == "1", "the child's grace to end")
    assert observer.send_command("AQ", "parent-lock") == "0"
    assert parent_lock.release() is True
