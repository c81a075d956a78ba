"""Every Python example of README.md runs, as written, against a real server
reached through LIVELOCK_HOST (as a user's configuration would); the TLS
examples against a server that requires TLS and client certificates, from
the directory of the test certificates (ca.pem, client.pem, client.key)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
from conftest import Certs, Server, TlsServers

README = Path(__file__).resolve().parents[1] / "README.md"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_examples() -> None:
    assert len(examples()) >= 5


@pytest.mark.parametrize("index", range(len(examples())))
def test_readme_example_runs(index: int, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if "tls" in examples()[index]:
        servers: TlsServers = request.getfixturevalue("tls_servers")
        certs: Certs = request.getfixturevalue("certs")
        monkeypatch.chdir(certs.dir)
        monkeypatch.setenv("LIVELOCK_HOST", servers.mutual.address)
    else:
        server: Server = request.getfixturevalue("server")
        monkeypatch.setenv("LIVELOCK_HOST", server.address)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(examples()[index], f"README.md example {index + 1}", "exec"), {"__name__": "__main__"})
    assert out.getvalue(), "every example prints something"
