"""Fixtures: real livelock servers for the client's tests, TLS certificates
for them, and a fake server that never answers.

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

TLS: ``certs`` makes a throwaway CA, a server certificate for 127.0.0.1 and,
for mutual TLS, a client CA and a client certificate, with the openssl
command line in a temporary directory; ``tls_servers`` starts servers with
them (TLS optional, required, and required with client certificates).

``silent_server`` is a fake server that answers HELLO with a valid session
and then nothing: calls on it must end with LivelockTimeout.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import pytest

from livelock_client import core
from livelock_client import protocol as p

for _name in list(os.environ):
    if (_name.startswith("LIVELOCK_") and _name != "LIVELOCK_BIN") or _name == "DJANGO_SETTINGS_MODULE":
        del os.environ[_name]

SERVER_BIN = os.environ.get(
    "LIVELOCK_BIN",
    str(Path(__file__).resolve().parents[3] / "target" / "release" / "livelock"),
)
SERVER_START_MAX = 15.0
#: Upper bound of one openssl command.
OPENSSL_MAX = 30.0
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


# ---- TLS --------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    """PEM files in ``dir``: the CA that signed the server's certificate (for
    IP 127.0.0.1), and the client CA that signed the client's certificate."""

    dir: Path
    ca: str
    server_cert: str
    server_key: str
    client_ca: str
    client_cert: str
    client_key: str


def _openssl(where: Path, *args: str) -> None:
    done = subprocess.run(["openssl", *args], cwd=where, capture_output=True, timeout=OPENSSL_MAX)
    if done.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)}:\n{done.stderr.decode(errors='replace')}", pytrace=False)


_NEW_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"]


def _make_ca(where: Path, name: str) -> None:
    """``name``.pem and its key ``name``.key: a self-signed CA."""
    files = ["-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}"]
    ca = ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]
    _openssl(where, "req", "-x509", *_NEW_KEY, *files, *ca)


def _make_leaf(where: Path, name: str, ca: str, usage: str, san: str = "") -> None:
    """``name``.pem and ``name``.key, signed by the CA ``ca``, for ``usage``
    (serverAuth, clientAuth)."""
    _openssl(where, "req", *_NEW_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    extensions = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature",
        f"extendedKeyUsage={usage}",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid",
        *([f"subjectAltName={san}"] if san else []),
    ]
    (where / f"{name}.ext").write_text("\n".join(extensions) + "\n")
    signer = ["-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-set_serial", f"0x{uuid.uuid4().hex[:16]}", "-days", "1"]
    _openssl(where, "x509", "-req", "-in", f"{name}.csr", *signer, "-extfile", f"{name}.ext", "-out", f"{name}.pem")


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make test certificates")
    where = tmp_path_factory.mktemp("tls")
    _make_ca(where, "ca")
    _make_leaf(where, "server", "ca", "serverAuth", san="IP:127.0.0.1")
    _make_ca(where, "client-ca")
    _make_leaf(where, "client", "client-ca", "clientAuth")
    files = ["ca.pem", "server.pem", "server.key", "client-ca.pem", "client.pem", "client.key"]
    return Certs(where, *(str(where / file) for file in files))


def tls_args(certs: Certs, *more: str) -> list[str]:
    """The server's TLS flags, and ``more``."""
    return ["--tls-cert", certs.server_cert, "--tls-key", certs.server_key, *more]


@dataclass(frozen=True)
class TlsServers:
    """Servers with TLS: ``optional`` also takes plaintext, ``required``
    refuses it, ``mutual`` also requires client certificates."""

    optional: Server
    required: Server
    mutual: Server


@pytest.fixture(scope="session")
def tls_servers(certs: Certs) -> Iterator[TlsServers]:
    servers = TlsServers(
        Server(*tls_args(certs)),
        Server(*tls_args(certs, "--tls-required")),
        Server(*tls_args(certs, "--tls-required", "--tls-client-ca", certs.client_ca)),
    )
    yield servers
    for srv in (servers.optional, servers.required, servers.mutual):
        srv.stop()


# ---- A server that does not answer -----------------------------------------


class SilentServer:
    """A fake server on a loopback port: it answers each connection's HELLO
    with a valid session reply, then reads whatever comes and answers nothing."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # stopped
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            data = b""
            while len(data) < p.HEADER_LEN or len(data) < p.HEADER_LEN + int.from_bytes(data[12:16], "little"):
                more = conn.recv(4096)
                if not more:
                    return
                data += more
            # session id, secret, grace_ms, protocol version, 3 bytes of padding
            session = struct.pack("<Q16sIB3x", 7, bytes(range(16)), 0, p.VERSION)
            conn.sendall(p.encode_frame(p.Opcode.HELLO, core.FIRST_REQUEST_ID, session, p.FLAG_REPLY))
            while conn.recv(65536):
                pass

    def stop(self) -> None:
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


@pytest.fixture
def black_hole() -> Iterator[str]:
    """The address of a listening socket that never accepts: the kernel
    completes connections into its backlog, nothing ever answers (a
    cluster member frozen by SIGSTOP)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    host, port = sock.getsockname()
    yield f"{host}:{port}"
    sock.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    srv = SilentServer()
    yield srv
    srv.stop()


#: Calls that wait for the server (method, arguments), each of which must end
#: with LivelockTimeout after the request timeout on a silent server.
WAITING_CALLS: list[tuple[str, tuple[object, ...]]] = [
    ("ping", ()),
    ("stats", ()),
    ("inspect", ("lock",)),
    ("list", ("*",)),
    ("try_acquire", ("lock",)),
    ("try_acquire_all", (["lock", ("lock-2", "shared")],)),
    ("release", ("lock",)),
    ("extend", ("lock", 5.0)),
    ("signal", ("lock", "s")),
    ("signal_exists", ("lock", "s")),
    ("clear_signal", ("lock", "s")),
    ("force_release", ("lock",)),
    ("kill_session", (99,)),
    ("set_order", ("ascending",)),
    ("try_acquire_pool", ([p.Requirement(1, ["lock-p", "lock-q"]), "lock-r"],)),
]
#: Calls of a semaphore (of capacity 2) that wait for the server, likewise.
WAITING_SEMAPHORE_CALLS: list[tuple[str, tuple[object, ...]]] = [
    ("try_acquire", (2,)),
    ("set_capacity", (3,)),
    ("inspect", ()),
]
