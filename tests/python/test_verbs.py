"""Every LiveLock verb, as the unchanged PyPI client sends it, against our server."""

import fnmatch
import os
import re
import time

import pytest
from livelock.client import (
    LiveLock,
    LiveLockClientException,
    LiveNBLock,
    configure,
)
from livelock.shared import KEY_NOT_EXISTS

from conftest import stats

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def error_code(excinfo):
    return excinfo.value.code


def test_conn_gives_a_uuid4_client_id_and_conninfo_is_accepted(server):
    c = server.connection()
    assert c.send_command("PING") == "PONG"  # connects: CONN, then CONNINFO host:pid
    assert UUID4.match(c.client_id), c.client_id
    other = server.connection()
    other.send_command("PING")
    assert other.client_id != c.client_id
    assert c.send_command("CONNINFO", "somewhere:1234") == "1"
    assert c.send_command("CONNINFO", "changed:1") == "1"
    with pytest.raises(LiveLockClientException) as e:
        c.send_command("CONNINFO")
    assert error_code(e) == 2
    with pytest.raises(LiveLockClientException) as e:
        c.send_command("CONNINFO", "a", "b")
    assert error_code(e) == 2


def test_conn_with_a_chosen_client_id(server):
    c = server.connection(client_id="my-client-7")
    assert c.send_command("PING") == "PONG"
    assert c.client_id == "my-client-7"
    # CONN on a connection that already has an id: -3, and the stream stays in step.
    with pytest.raises(LiveLockClientException) as e:
        c.send_command("CONN")
    assert error_code(e) == 3
    assert str(e.value) == "Already has client id"
    with pytest.raises(LiveLockClientException) as e:
        c.send_command("CONN", "someone-else")
    assert error_code(e) == 3
    assert c.send_command("PING") == "PONG"
    assert c.client_id == "my-client-7"


def test_commands_before_conn_are_refused(server):
    c = server.connection()
    # Connect without the client's automatic CONN.
    for command in (("PING",), ("AQ", "x"), ("LOCKED", "x"), ("STATS",), ("NOSUCHVERB",)):
        with pytest.raises(LiveLockClientException) as e:
            c.send_command(*command, do_conn_on_reconnect=False)
        assert error_code(e) == 1, command
        assert str(e.value) == "CONN required first"
    assert c.send_command("CONN", "late-conn", do_conn_on_reconnect=False) == "late-conn"
    assert c.send_command("PING") == "PONG"


def test_aq_release_locked(server):
    a, b = server.connection(), server.connection()
    assert a.send_command("AQ", "job") == "1"
    assert a.send_command("AQ", "job") == "0"  # not reentrant
    assert b.send_command("AQ", "job") == "0"
    assert b.send_command("LOCKED", "job") == "1"
    assert b.send_command("RELEASE", "job") == "0"  # not b's
    assert a.send_command("LOCKED", "job") == "1"
    assert a.send_command("RELEASE", "job") == "1"
    assert a.send_command("RELEASE", "job") == "0"
    assert b.send_command("LOCKED", "job") == "0"
    assert b.send_command("AQ", "job") == "1"
    assert a.send_command("AQ", "job") == "0"
    # Lock names are case sensitive and may hold any UTF-8.
    assert a.send_command("AQ", "JOB") == "1"
    assert a.send_command("AQ", "задача ✓") == "1"
    assert b.send_command("LOCKED", "задача ✓") == "1"


def test_aqr_is_reentrant_for_the_same_client_only(server):
    a, b = server.connection(), server.connection()
    assert a.send_command("AQR", "r") == "1"
    assert a.send_command("AQR", "r") == "1"
    assert a.send_command("AQ", "r") == "0"
    assert b.send_command("AQR", "r") == "0"
    # No count is kept (as in server.py): one RELEASE frees it.
    assert a.send_command("RELEASE", "r") == "1"
    assert b.send_command("LOCKED", "r") == "0"
    assert b.send_command("AQR", "r") == "1"
    assert a.send_command("AQR", "r") == "0"


def test_wrong_number_of_arguments(server):
    c = server.connection()
    for command in (
        ("AQ",), ("AQ", "a", "b"), ("AQ", ""),
        ("AQR",), ("RELEASE",), ("LOCKED", "a", "b"),
        ("SIGSET", "a"), ("SIGEXISTS", "a", "b", "c"), ("SIGDEL",), ("SIGSET", "a", ""),
        ("FIND",), ("FIND", "a", "b"), ("STATS", "x"), ("CONNINFO",),
    ):
        with pytest.raises(LiveLockClientException) as e:
            c.send_command(*command)
        assert error_code(e) == 2, command
        assert str(e.value) == "Wrong number of arguments"
    assert c.send_command("PING") == "PONG"


def test_unknown_commands(server):
    c = server.connection()
    for command in (("FOO",), ("DUMP",), ("PASS", "x"), ("SHUTDOWN",), ("AQ lock",)):
        with pytest.raises(LiveLockClientException) as e:
            c.send_command(*command)
        assert error_code(e) == 4, command
        assert str(e.value) == "Unknown command"
    # Still serving after SHUTDOWN without --shutdown-support.
    assert c.send_command("PING") == "PONG"
    assert server.proc.poll() is None


def test_verbs_are_case_insensitive_and_inline_works(server):
    c = server.connection()
    assert c.send_command("ping") == "PONG"
    assert c.send_command("Aq", "mixed") == "1"
    assert c.send_command("locKED", "mixed") == "1"
    # Inline (space separated) commands, as send_raw_command sends them.
    assert c.send_raw_command("PING") == "PONG"
    assert c.send_raw_command("aq inline") == "1"
    assert c.send_raw_command("LOCKED inline") == "1"
    assert c.send_raw_command("release inline") == "1"
    assert c.send_raw_command("Release Mixed") == "0"  # names are case sensitive
    assert c.send_raw_command("RELEASE mixed") == "1"
    with pytest.raises(LiveLockClientException) as e:
        c.send_raw_command("AQ")
    assert error_code(e) == 2


def test_ping(server):
    c = server.connection()
    assert c.send_command("PING") == "PONG"
    assert c.send_command("PING", "ignored", "args") == "PONG"
    assert LiveLock("p", live_lock_connection=c).ping() is None


def test_signals(server):
    owner, other = server.connection(), server.connection()
    # On a lock nobody holds, every signal verb is -8, raised by the client.
    for verb in ("SIGSET", "SIGEXISTS", "SIGDEL"):
        with pytest.raises(LiveLockClientException) as e:
            owner.send_command(verb, "free-lock", "CANCEL")
        assert error_code(e) == KEY_NOT_EXISTS == 8, verb
        assert str(e.value) == "Key does not exists"
    free = LiveLock("free-lock", live_lock_connection=owner)
    with pytest.raises(LiveLockClientException) as e:
        free.signal("x")
    assert e.value.code == 8
    with pytest.raises(LiveLockClientException) as e:
        free.signal_exists("x")
    assert e.value.code == 8
    with pytest.raises(LiveLockClientException) as e:
        free.remove_signal("x")
    assert e.value.code == 8
    assert free.cancelled() is True  # the client maps -8 to "cancelled"

    lock = LiveLock("sig-lock", live_lock_connection=owner)
    assert lock.acquire(blocking=False)
    assert lock.signal_exists("cancel") is False
    assert lock.cancelled() is False
    watcher = LiveLock("sig-lock", live_lock_connection=other)
    # Anyone may signal a held lock; signal names are case-insensitive.
    assert watcher.cancel() is True
    assert lock.cancelled() is True
    assert lock.signal_exists("CaNcEl") is True
    assert other.send_command("SIGSET", "sig-lock", "Progress") == "1"
    assert owner.send_command("SIGEXISTS", "sig-lock", "progress") == "1"
    assert owner.send_command("SIGEXISTS", "sig-lock", "other") == "0"
    assert lock.remove_signal("PROGRESS") is True
    assert lock.remove_signal("progress") is False
    assert lock.signal_exists("progress") is False
    assert lock.signal_exists("cancel") is True
    # Signals live with the lock: released, they are gone.
    lock.release()
    with pytest.raises(LiveLockClientException) as e:
        watcher.signal_exists("cancel")
    assert e.value.code == 8
    assert lock.acquire(blocking=False)
    assert lock.cancelled() is False
    lock.release()


def test_find_with_glob_patterns(server):
    a, b = server.connection(), server.connection()
    before = time.time()
    names = ["job:1", "job:2", "job:10", "jobs", "other", "x[1]", "Job:3"]
    for i, name in enumerate(names):
        assert (a if i % 2 else b).send_command("AQ", name) == "1"
    after = time.time()

    def find(pattern):
        found = a.send_command("FIND", pattern)
        assert isinstance(found, list)
        for item in found:
            assert isinstance(item, list) and len(item) == 2, item
            name, since = item
            assert isinstance(name, str) and isinstance(since, float), item
            assert before - 1 <= since <= after + 1, (item, before, after)
        return sorted(item[0] for item in found)

    for pattern in ("*", "job:*", "job:?", "job:1?", "job:[12]", "job:[!1]", "job:[0-9]*",
                    "*[sr]", "x[[]1]", "?ob*", "job:1", "nothing*", "J*"):
        expected = sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))
        assert find(pattern) == expected, pattern
    assert find("job:?") == ["job:1", "job:2"]
    assert find("nothing*") == []
    # Released locks are no longer found.
    owner_of_job2 = a if names.index("job:2") % 2 else b
    assert owner_of_job2.send_command("RELEASE", "job:2") == "1"
    assert find("job:?") == ["job:1"]


def test_find_matches_like_fnmatch(server):
    """FIND is server.py's fnmatch.fnmatch on POSIX (case sensitive); odd
    brackets, '!', '-', '^' and backslashes included. Seeded, so repeatable."""
    import random

    c = server.connection()
    names = ["a", "b", "ab", "a]", "a[", "a-", "a\\", "a\\b", "[a]", "]", "!", "a!", "A",
             "é", "aé", "a*", "a?", ".a", "a/b", "a.b", "ab]", "-", "^", "a^", "[", "[]", "x[!]y"]
    for name in names:
        assert c.send_command("AQ", name) == "1", name
    patterns = ["[]]", "[]a]", "[!]]", "a[]]", "a[", "[", "a[!", "[a-]", "a[-]", "[-a]", "a\\*",
                "[\\]", "[^a]", "[!a-z]", "[z-a]", "[*]", "a[*?]", "[!!]", "x[!]y", "[]]]", "?é"]
    rng = random.Random(20240611)
    alphabet = "ab[]!-*?\\^é"
    patterns += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(300)]
    for pattern in patterns:
        found = sorted(item[0] for item in c.send_command("FIND", pattern))
        assert found == sorted(n for n in names if fnmatch.fnmatchcase(n, pattern)), pattern


def test_stats(server):
    c = server.connection()
    result = stats(c)
    assert isinstance(result, dict)
    assert result["lock_count"] == 0
    assert result["dump_file_path"] == os.path.abspath(server.dump_path)
    for i in range(5):
        assert c.send_command("AQ", f"s{i}") == "1"
    assert stats(c)["lock_count"] == 5
    assert c.send_command("RELEASE", "s0") == "1"
    assert stats(server.connection())["lock_count"] == 4


def test_default_connection_from_configure(server):
    configure(host="127.0.0.1", port=server.port)
    with LiveLock("default-conn") as lock:
        assert lock.acquired and bool(lock)
        assert LiveLock.is_locked("default-conn") is True
        assert [item[0] for item in LiveLock.find("default-*")] == ["default-conn"]
        assert LiveNBLock("default-conn").acquire() is False  # same client, not reentrant
    assert LiveLock.is_locked("default-conn") is False
    assert LiveLock.find("default-*") == []


def test_default_connection_from_environment(server, monkeypatch):
    monkeypatch.setenv("LIVELOCK_HOST", "127.0.0.1")
    monkeypatch.setenv("LIVELOCK_PORT", str(server.port))
    lock = LiveLock("env-conn")
    assert lock.acquire(blocking=False) is True
    assert LiveLock.is_locked("env-conn") is True
    other = server.connection()
    assert other.send_command("AQ", "env-conn") == "0"
    lock.release()
    assert other.send_command("AQ", "env-conn") == "1"


def test_max_payload_boundary(server):
    c = server.connection()
    # The client sends up to max_payload + 1 = 1025 bytes; so long a name is accepted.
    # *2\r\n $2\r\nAQ\r\n $1004\r\n<name>\r\n = 4 + 8 + 7 + 1004 + 2 = 1025 bytes.
    name = "n" * 1004
    assert c.send_command("AQ", name) == "1"
    assert server.connection().send_command("AQ", name) == "0"
    with pytest.raises(LiveLockClientException, match="Max command payload size exceeded"):
        c.send_command("AQ", name + "n")
    assert c.send_command("PING") == "PONG"


def test_oversized_command_gets_resp_error_and_the_client_recovers(server):
    # A client configured for bigger payloads than the server (1024) takes.
    c = server.connection(max_payload=8192)
    assert c.send_command("AQ", "kept") == "1"
    first_socket = c._sock
    with pytest.raises((LiveLockClientException, OSError)) as e:
        c.send_command("AQ", "n" * 2000)
    if isinstance(e.value, LiveLockClientException):
        assert e.value.code == 6, e.value
    # The server closed that connection; the client reconnects with the same
    # client id, within the grace, and still holds its lock.
    assert c.send_command("LOCKED", "kept") == "1"
    assert c._sock is not first_socket
    assert c.send_command("AQR", "kept") == "1"
    assert server.connection().send_command("AQ", "kept") == "0"


def test_password(make_server, monkeypatch):
    server = make_server(password="s3cret")
    good = server.connection()
    assert good.send_command("PING") == "PONG"  # PASS, CONN, CONNINFO, PING
    assert good.send_command("AQ", "pw-lock") == "1"
    with pytest.raises(LiveLockClientException) as e:
        good.send_command("PASS", "s3cret")  # already authorised
    assert error_code(e) == 4

    wrong = server.connection(password="nope")
    with pytest.raises(LiveLockClientException) as e:
        wrong.send_command("PING")
    assert error_code(e) == 5
    assert str(e.value) == "Wrong or no password"

    missing = server.connection(password=None)
    with pytest.raises(LiveLockClientException) as e:
        missing.send_command("AQ", "pw-lock")  # its CONN gets -5
    assert error_code(e) == 5

    # The password from the environment, through configure().
    monkeypatch.setenv("LIVELOCK_PASSWORD", "s3cret")
    configure(host="127.0.0.1", port=server.port)
    assert LiveLock.is_locked("pw-lock") is True
    assert LiveNBLock("pw-lock").acquire() is False
    assert good.send_command("RELEASE", "pw-lock") == "1"
    assert LiveNBLock("pw-lock").acquire() is True


def test_no_password_server_and_a_client_with_a_password(server):
    # As with server.py: PASS is not a command before CONN when no password is
    # set, so a client configured with one fails with -1 on connect.
    c = server.connection(password="unneeded")
    with pytest.raises(LiveLockClientException) as e:
        c.send_command("PING")
    assert error_code(e) == 1
    plain = server.connection(password=None)
    assert plain.send_command("PING") == "PONG"


def test_shutdown_with_support(make_server):
    server = make_server(shutdown_support=True)
    c = server.connection()
    assert c.send_command("AQ", "before-shutdown") == "1"
    assert c.send_command("SHUTDOWN") == "1"
    assert server.wait_exit() == 0
    assert server.dump_path.is_file()


def test_shutdown_verb_is_case_insensitive(make_server):
    server = make_server(shutdown_support=True)
    assert server.connection().send_command("shutdown") == "1"
    assert server.wait_exit() == 0


def test_an_integer_lock_id_is_a_wrong_argument_and_keeps_the_connection(server):
    c = server.connection()
    assert c.send_command("AQ", "held") == "1"
    first_socket = c._sock
    with pytest.raises(LiveLockClientException) as e:
        LiveLock(123, live_lock_connection=c).acquire(blocking=False)
    assert e.value.code == 2
    assert c.send_command("PING") == "PONG"
    assert c._sock is first_socket  # not reconnected: the server kept the connection
