"""Fixtures: real livelock servers for the client's tests.

A server is the binary at LIVELOCK_BIN (default target/release/livelock of
this repository, as `cargo build --release` leaves it), started
with ``--listen 127.0.0.1:0 --durability memory`` in a temporary data
directory; the port it bound is read from its stderr line ``listening on
127.0.0.1:PORT``, waited for by a thread that keeps draining stderr (bounded
by SERVER_START_MAX). It is stopped with SIGTERM, then SIGKILL. LIVELOCK_*
variables (but LIVELOCK_BIN) and DJANGO_SETTINGS_MODULE are removed from
this process and the servers' environment so that neither reads a
developer's settings. Every test is bounded by TEST_MAX: past it the run
dumps every thread's stack and exits.
"""

from __future__ import annotations

import faulthandler
import os
from pathlib import Path
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Callable, TypeVar

import pytest

for _name in list(os.environ):
    if (_name.startswith("LIVELOCK_") and _name != "LIVELOCK_BIN") or _name == "DJANGO_SETTINGS_MODULE":
        del os.environ[_name]

SERVER_BIN = os.environ.get(
    "LIVELOCK_BIN",
    str(Path(__file__).resolve().parents[3] / "target" / "release" / "livelock"),
)
SERVER_START_MAX = 15.0
TEST_MAX = 45.0
#: Upper bound of a client call or an event wait in the tests.
WAIT_MAX = 10.0

_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")

T = TypeVar("T")


class Server:
    """One livelock server process on a loopback port of its own."""

    def __init__(self, *args: str) -> None:
        if not os.access(SERVER_BIN, os.X_OK):
            pytest.fail(f"no server binary at {SERVER_BIN} (set LIVELOCK_BIN)", pytrace=False)
        self._dir = tempfile.TemporaryDirectory(prefix="livelock-client-test-")
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIVELOCK_")}
        command = [SERVER_BIN, "server", "--listen", "127.0.0.1:0", "--durability", "memory"]
        command += ["--data-dir", self._dir.name, *args]
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        self.log: list[str] = []
        self.port = 0
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(SERVER_START_MAX) or not self.port:
            self.stop()
            pytest.fail("the server did not start:\n" + "".join(self.log), pytrace=False)

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode("utf-8", "replace")
            self.log.append(line)
            found = _LISTENING.search(line)
            if found and not self._ready.is_set():
                self.port = int(found.group(1))
                self._ready.set()
        self._ready.set()  # exited before listening

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._dir.cleanup()


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """A server shared by the tests that only need one (names are unique)."""
    srv = Server()
    yield srv
    srv.stop()


@pytest.fixture
def make_server() -> Iterator[Callable[..., Server]]:
    """Starts servers of the test's own (extra command-line arguments)."""
    started: list[Server] = []

    def make(*args: str) -> Server:
        srv = Server(*args)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def name() -> str:
    """A lock name no other test uses."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
def bounded() -> Iterator[None]:
    faulthandler.dump_traceback_later(TEST_MAX, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


def wait_until(condition: Callable[[], T | None], what: str, timeout: float = WAIT_MAX) -> T:
    """Polls ``condition`` (a query of the server) until it is truthy; fails
    the test past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
