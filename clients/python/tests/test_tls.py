"""TLS against real servers started with --tls-cert/--tls-key (conftest's
``certs`` and ``tls_servers``): a lock, and a reconnect, over TLS; plaintext
still works where TLS is not required; a server that requires TLS refuses
plaintext; a client that does not trust the server's CA fails with
ConnectionLost saying why; mutual TLS takes a client with a certificate and
refuses one without; the settings come from the environment too. Every
server test runs for both clients: a scenario is written once, as a
generator that yields each call's outcome (the blocking client's result, the
asyncio client's awaitable) and is sent back its result."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Generator
from typing import Any, Callable

import pytest
from conftest import WAIT_MAX, Certs, Server, TlsServers, tls_args

import livelock_client as ll
from livelock_client import AsyncClient, Client, config

KINDS = ["sync", "async"]

Scenario = Callable[[Any], Generator[Any, Any, Any]]


def run(kind: str, address: str, scenario: Scenario, **options: Any) -> Any:
    """Connects the ``kind`` of client to ``address`` with ``options``, plays
    ``scenario`` on it and ends the session; what the scenario returns."""
    options = {"connect_timeout": WAIT_MAX, "request_timeout": WAIT_MAX, **options}

    async def main() -> Any:
        if kind == "sync":
            with Client.connect(address, **options) as client:
                return await _play(scenario(client), awaits=False)
        async with await AsyncClient.connect(address, **options) as client:
            return await _play(scenario(client), awaits=True)

    return asyncio.run(asyncio.wait_for(main(), WAIT_MAX * 2))


async def _play(steps: Generator[Any, Any, Any], awaits: bool) -> Any:
    """Sends each outcome ``steps`` yields back as its result (awaited if
    ``awaits``); what ``steps`` returns."""
    try:
        outcome = next(steps)
        while True:
            outcome = steps.send(await outcome if awaits else outcome)
    except StopIteration as done:
        return done.value


def ping(client: Any) -> Generator[Any, Any, str]:
    yield client.ping()
    return "pong"


def lock_and_reconnect(name: str) -> Scenario:
    """Takes ``name``, drops the connection, takes the session back on a new
    one (with the same TLS options) and releases: the hold's token, and the
    tokens the RESUME listed."""

    def scenario(client: Any) -> Generator[Any, Any, tuple[int, list[int]]]:
        held = yield client.acquire(name)
        yield client.close()
        yield client.reconnect()
        listed = [hold.token for hold in client.resumed.holds]
        yield held.release()
        return held.token, listed

    return scenario


@pytest.mark.parametrize("kind", KINDS)
def test_a_lock_and_a_reconnect_over_tls(kind: str, tls_servers: TlsServers, certs: Certs, name: str) -> None:
    # The server refuses plaintext: everything here went over TLS.
    scenario = lock_and_reconnect(name)
    token, listed = run(kind, tls_servers.required.address, scenario, grace=WAIT_MAX, tls_ca=certs.ca)
    assert listed == [token]


@pytest.mark.parametrize("kind", KINDS)
def test_plaintext_still_works_where_tls_is_optional(kind: str, tls_servers: TlsServers, certs: Certs) -> None:
    assert run(kind, tls_servers.optional.address, ping) == "pong"
    assert run(kind, tls_servers.optional.address, ping, tls_ca=certs.ca) == "pong"


@pytest.mark.parametrize("kind", KINDS)
def test_a_server_requiring_tls_refuses_plaintext(kind: str, tls_servers: TlsServers) -> None:
    with pytest.raises(ll.ConnectionLost, match="require TLS|reset by peer"):
        run(kind, tls_servers.required.address, ping)


@pytest.mark.parametrize("kind", KINDS)
def test_a_client_that_does_not_trust_the_ca_fails(kind: str, tls_servers: TlsServers, certs: Certs) -> None:
    for options in ({"tls_ca": certs.client_ca}, {"tls": True}):  # another CA; the system's CAs
        with pytest.raises(ll.ConnectionLost, match="CERTIFICATE_VERIFY_FAILED") as error:
            run(kind, tls_servers.optional.address, ping, **options)
        assert isinstance(error.value.__cause__, ssl.SSLCertVerificationError)
    with pytest.raises(ll.ConnectionLost, match="Hostname mismatch"):
        run(kind, tls_servers.optional.address, ping, tls_ca=certs.ca, tls_server_name="locks.example")


@pytest.mark.parametrize("kind", KINDS)
def test_mutual_tls(kind: str, tls_servers: TlsServers, certs: Certs) -> None:
    address = tls_servers.mutual.address
    assert run(kind, address, ping, tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key) == "pong"
    # Refused after the handshake (TLS 1.3): the alert ends the first read.
    with pytest.raises(ll.ConnectionLost, match="certificate required|reset by peer"):
        run(kind, address, ping, tls_ca=certs.ca)
    context = ssl.create_default_context(cafile=certs.ca)
    context.load_cert_chain(certs.client_cert, certs.client_key)
    assert run(kind, address, ping, tls=context) == "pong"


@pytest.mark.parametrize("kind", KINDS)
def test_tls_settings_from_the_environment(
    kind: str, tls_servers: TlsServers, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIVELOCK_TLS_CA", certs.ca)
    monkeypatch.setenv("LIVELOCK_TLS_CLIENT_CERT", certs.client_cert)
    monkeypatch.setenv("LIVELOCK_TLS_CLIENT_KEY", certs.client_key)
    assert run(kind, tls_servers.mutual.address, ping) == "pong"
    with pytest.raises(ll.ConnectionLost, match="require TLS|reset by peer"):
        run(kind, tls_servers.mutual.address, ping, tls=False)  # plaintext, whatever the settings


@pytest.mark.parametrize("kind", KINDS)
def test_a_reconnect_over_tls_to_another_event_loop(
    kind: str, make_server: Callable[..., Server], certs: Certs, name: str
) -> None:
    # Connections are dealt to the loops in turn: the HELLO's lands on one,
    # the reconnect's on the other, which hands it to the session's loop.
    srv = make_server(*tls_args(certs, "--threads", "2"))
    run(kind, srv.address, lock_and_reconnect(name), grace=WAIT_MAX, tls_ca=certs.ca)


def test_tls_options_are_checked_before_dialling(certs: Certs, monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.tls() is None and config.tls(False) is None
    with pytest.raises(TypeError, match="SSLContext"):
        config.tls("ca.pem")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tls_key without tls_cert"):
        config.tls(key=certs.client_key)
    with pytest.raises(ValueError, match="tls_ca with an SSLContext"):
        config.tls(ssl.create_default_context(), ca=certs.ca)
    with pytest.raises(ValueError, match="tls=False"):
        config.tls(False, ca=certs.ca)
    with pytest.raises(ValueError, match="TLS CA /nowhere/ca.pem"):
        Client.connect("127.0.0.1:1", tls_ca="/nowhere/ca.pem")
    with pytest.raises(ValueError, match="TLS client certificate"):
        config.tls(cert=certs.ca)  # a certificate without its key
    monkeypatch.setenv("LIVELOCK_TLS_CLIENT_KEY", certs.client_key)
    with pytest.raises(ValueError, match="LIVELOCK_TLS_CLIENT_KEY without LIVELOCK_TLS_CLIENT_CERT"):
        config.tls()
    monkeypatch.delenv("LIVELOCK_TLS_CLIENT_KEY")
    monkeypatch.setenv("LIVELOCK_TLS_CA", certs.ca)  # turns TLS on
    secure = config.tls()
    assert secure is not None and secure.name_for("10.0.0.1") == "10.0.0.1"
    named = config.tls(True, server_name="locks.internal")
    assert named is not None and named.name_for("10.0.0.1") == "locks.internal"
