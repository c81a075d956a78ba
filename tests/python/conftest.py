"""Fixtures for driving our `livelock` server with the unchanged PyPI client.

The fixtures build nothing: they find a server binary that is already built
(`LIVELOCK_BIN`, else the newest of `target/debug/livelock` and
`target/release/livelock` under the repository root; `scripts/test` builds
both before running pytest), start it on 127.0.0.1 with `--port 0` and a
fresh data directory, read the bound address from its stderr line
`livelock: listening on 127.0.0.1:PORT with N loop(s)`, and stop it with
SIGTERM (then SIGKILL) at the end of the test.

The client (`livelock==0.7.11`) reads LIVELOCK_* variables itself, some of
them at import time (LIVELOCK_STUB, LIVELOCK_DEFAULT_ACQUIRE_TIMEOUT), so
every LIVELOCK_* variable except LIVELOCK_BIN is removed from this process
before it is imported, and servers get a scrubbed environment too.

Every wait is bounded (`wait_until`, `WAIT_MAX`); nothing sleeps to
synchronise.
"""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

# Must happen before `livelock.client` is imported anywhere.
for _name in list(os.environ):
    if _name.startswith("LIVELOCK_") and _name != "LIVELOCK_BIN":
        del os.environ[_name]

from livelock import client as ll_client  # noqa: E402
from livelock.client import LiveLockConnection  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Upper bound of every wait in these tests (seconds).
WAIT_MAX = 20.0

LISTENING = re.compile(rb"livelock: listening on (127\.0\.0\.1):(\d+) with (\d+) loop\(s\)")


def wait_until(condition, what, timeout=WAIT_MAX, interval=0.01):
    """Polls `condition()` until it returns a truthy value, which is returned;
    fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def find_server_binary():
    """The server binary to test; fails the test run with a clear message if
    there is none (this suite never builds it)."""
    explicit = os.environ.get("LIVELOCK_BIN")
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            pytest.fail(f"LIVELOCK_BIN={explicit!r} is not an executable file", pytrace=False)
        return path
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO_ROOT / "target")
    if not target.is_absolute():
        target = REPO_ROOT / target
    candidates = [target / "debug" / "livelock", target / "release" / "livelock"]
    found = [p for p in candidates if p.is_file() and os.access(p, os.X_OK)]
    if not found:
        pytest.fail(
            "no livelock server binary: looked for "
            + " and ".join(str(p) for p in candidates)
            + ". Build it first (`cargo build` or `cargo build --release`; scripts/test does both) "
            "or point LIVELOCK_BIN at one.",
            pytrace=False,
        )
    # The most recently built one, so a stale build is not tested by mistake.
    return max(found, key=lambda p: p.stat().st_mtime)


def _server_env(password):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVELOCK_")}
    if password is not None:
        env["LIVELOCK_PASSWORD"] = password
    return env


class LiveLockServer:
    """One `livelock server` process (restartable on the same port and data dir)."""

    def __init__(self, binary, data_dir, log_dir, release_all_timeout=0.5, password=None,
                 shutdown_support=False, threads=2, extra_args=()):
        self.binary = binary
        self.data_dir = Path(data_dir)
        self.log_dir = Path(log_dir)
        self.release_all_timeout = release_all_timeout
        self.password = password
        self.shutdown_support = shutdown_support
        self.threads = threads
        self.extra_args = list(extra_args)
        self.host = "127.0.0.1"
        self.port = 0
        self.loops = None
        self.proc = None
        self.log_path = None
        self.starts = 0
        self.started_at = None

    @property
    def dump_path(self):
        return self.data_dir / "livelock.dump"

    def start(self, port=None):
        """Starts the process (on `port`, default: a new one if never started,
        else the same port as before) and waits until it listens."""
        assert self.proc is None, "already running"
        if port is None:
            port = self.port
        self.starts += 1
        self.log_path = self.log_dir / f"server-{self.starts}.log"
        args = [
            str(self.binary), "server",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--data-dir", str(self.data_dir),
            "--release-all-timeout", str(self.release_all_timeout),
            "--threads", str(self.threads),
        ]
        if self.shutdown_support:
            args.append("--shutdown-support")
        args += self.extra_args
        # stderr goes to a file, not a pipe: no reader thread (tests fork) and
        # no risk of the server blocking on a full pipe.
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                env=_server_env(self.password), cwd=self.data_dir,
            )
        self.started_at = time.monotonic()

        def listening():
            match = LISTENING.search(self.log_path.read_bytes())
            if match:
                return match
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with status {self.proc.returncode} before "
                            f"listening:\n{self.log_path.read_text(errors='replace')}")
            return None

        match = wait_until(listening, "the server's 'listening on' line")
        self.port = int(match.group(2))
        self.loops = int(match.group(3))
        return self

    def stderr(self):
        """Everything the current (or last) process wrote to stderr."""
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def wait_exit(self, timeout=WAIT_MAX):
        """Waits for the process to exit on its own; returns its status."""
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not exit within {timeout} s:\n{self.stderr()}")
        self.proc = None
        return status

    def stop(self):
        """SIGTERM, a bounded wait, then SIGKILL. Returns the exit status."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait(timeout=10)

    def connection(self, **kwargs):
        """A new client connection (lazy: it connects on its first command)."""
        kwargs.setdefault("host", self.host)
        kwargs.setdefault("port", self.port)
        kwargs.setdefault("password", self.password)
        return LiveLockConnection(**kwargs)


@pytest.fixture(scope="session")
def server_binary():
    return find_server_binary()


@pytest.fixture
def make_server(server_binary, tmp_path):
    """Factory: `make_server(release_all_timeout=..., password=..., shutdown_support=...)`
    starts a server with its own data dir; every one is stopped after the test."""
    servers = []

    def make(start=True, data_dir=None, **options):
        index = len(servers)
        log_dir = tmp_path / f"logs-{index}"
        log_dir.mkdir()
        if data_dir is None:
            data_dir = tmp_path / f"data-{index}"
            data_dir.mkdir()
        server = LiveLockServer(server_binary, data_dir, log_dir, **options)
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server):
    """A running server: no password, 0.5 s release-all timeout, 2 loops."""
    return make_server()


def reset_default_connection():
    """Closes and forgets the client's thread-local default connection (the
    one `configure()` sets and `LiveLock(...)` without a connection uses)."""
    existing = getattr(ll_client.threadLocal, "live_lock_connection", None)
    if existing is not None:
        try:
            existing._close()
        except OSError:
            pass
        del ll_client.threadLocal.live_lock_connection


@pytest.fixture(autouse=True)
def clean_client_state(monkeypatch):
    for name in ("LIVELOCK_HOST", "LIVELOCK_PORT", "LIVELOCK_PASSWORD", "LIVELOCK_MAX_PAYLOAD"):
        monkeypatch.delenv(name, raising=False)
    reset_default_connection()
    yield
    reset_default_connection()


def stats(connection):
    return connection.send_command("STATS")
