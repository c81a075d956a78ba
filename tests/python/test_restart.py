"""The dump: SHUTDOWN, restart on the same data dir and port, locks restored
until the grace runs out; a corrupted dump is ignored."""

import time

import pytest
from livelock.client import LiveLock

from conftest import stats, wait_until


def test_shutdown_and_restart_restore_locks_until_the_grace(make_server):
    timeout = 1.0
    server = make_server(release_all_timeout=timeout, shutdown_support=True)
    back = server.connection()  # comes back after the restart
    gone = server.connection()  # never comes back
    back_lock = LiveLock("back-lock", live_lock_connection=back)
    assert back_lock.acquire(blocking=False)
    assert back.send_command("AQ", "back-lock-2") == "1"
    assert back.send_command("SIGSET", "back-lock", "CANCEL") == "1"
    assert gone.send_command("AQ", "gone-lock") == "1"
    back_id = back.client_id

    assert gone.send_command("SHUTDOWN") == "1"
    assert server.wait_exit() == 0
    assert server.dump_path.is_file()

    server.start()  # same port, same data dir
    restarted_at = server.started_at
    observer = server.connection()
    # Restored, and held during the grace (release-all timeout + 1 s after start).
    assert observer.send_command("AQ", "gone-lock") == "0"
    assert observer.send_command("AQ", "back-lock") == "0"
    assert sorted(i[0] for i in observer.send_command("FIND", "*")) == [
        "back-lock", "back-lock-2", "gone-lock"]
    assert stats(observer)["lock_count"] == 3

    # The client whose server went away reconnects on its next command, with
    # its client id, in time: its locks are its own again, signals included.
    assert back_lock.cancelled() is True
    assert back.client_id == back_id
    assert back.send_command("AQR", "back-lock") == "1"
    assert back.send_command("AQR", "back-lock-2") == "1"

    # The other client's lock is free once the grace is over...
    wait_until(lambda: observer.send_command("AQ", "gone-lock") == "1", "the restored grace to end")
    assert time.monotonic() - restarted_at >= timeout  # not released at once
    # ...while the returning client's locks stay held.
    assert observer.send_command("AQ", "back-lock") == "0"
    assert observer.send_command("AQ", "back-lock-2") == "0"
    assert back_lock.release() is True
    assert observer.send_command("AQ", "back-lock") == "1"


def test_sigterm_writes_a_dump_that_a_restart_restores(make_server):
    server = make_server(release_all_timeout=0.5)
    c = server.connection()
    assert c.send_command("AQ", "term-lock") == "1"
    assert server.stop() == 0
    assert server.dump_path.is_file()
    server.start()
    observer = server.connection()
    assert observer.send_command("LOCKED", "term-lock") == "1"
    # Nobody comes back for it: free after the grace.
    wait_until(lambda: observer.send_command("AQ", "term-lock") == "1", "the restored grace to end")


@pytest.mark.parametrize("garbage", [
    b"this is not a livelock dump\n",
    b"",
    bytes(range(256)) * 8,
    b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00}\x94.",  # a pickle, as server.py writes
], ids=["text", "empty", "binary", "pickle"])
def test_corrupted_dump_is_ignored(make_server, garbage):
    server = make_server(start=False)
    server.dump_path.write_bytes(garbage)
    server.start()
    assert " WARN " in server.stderr(), server.stderr()
    c = server.connection()
    assert stats(c)["lock_count"] == 0
    assert c.send_command("FIND", "*") == []
    assert c.send_command("AQ", "fresh") == "1"
    assert server.connection().send_command("AQ", "fresh") == "0"


def test_truncated_dump_is_ignored(make_server):
    server = make_server(release_all_timeout=0.5)
    c = server.connection()
    for i in range(20):
        assert c.send_command("AQ", f"t{i}") == "1"
    assert server.stop() == 0
    data = server.dump_path.read_bytes()
    assert len(data) > 10
    server.dump_path.write_bytes(data[: len(data) // 2])
    server.start()
    assert " WARN " in server.stderr(), server.stderr()
    observer = server.connection()
    assert stats(observer)["lock_count"] == 0
    assert observer.send_command("AQ", "t0") == "1"


def test_restart_with_another_loop_count_restores_every_lock(make_server):
    server = make_server(release_all_timeout=5, shutdown_support=True, threads=2)
    clients = [server.connection(client_id=f"client-{i}") for i in range(8)]
    for i, c in enumerate(clients):
        assert c.send_command("AQ", f"lock-{i}") == "1"
    assert clients[0].send_command("SHUTDOWN") == "1"
    assert server.wait_exit() == 0
    server.threads = 3
    server.start()
    observer = server.connection()
    held = [observer.send_command("LOCKED", f"lock-{i}") for i in range(8)]
    assert held == ["1"] * 8
