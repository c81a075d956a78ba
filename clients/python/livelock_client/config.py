"""Where and how to connect: the address syntax of every livelock tool, the
settings (LIVELOCK_HOST, LIVELOCK_PORT, LIVELOCK_PASSWORD from the
environment, else from Django's settings as the legacy ``livelock`` client
reads them), the default client name, and the socket options.

Addresses: ``HOST``, ``HOST:PORT``, ``livelock://HOST[:PORT]``, IPv6 as
``::1`` or ``[::1]:PORT``, or a comma-separated list of those (the servers
to try, in order); the port defaults to LIVELOCK_PORT, else 7873.
"""

from __future__ import annotations

import importlib
import os
import re
import socket

from .protocol import BytesLike

DEFAULT_PORT = 7873

#: (host, port); an IPv6 host without brackets.
Server = tuple[str, int]


def _port(text: str, where: str) -> int:
    if re.fullmatch(r"[0-9]{1,5}", text) and 0 < int(text) <= 65535:
        return int(text)
    raise ValueError(f"{where}: {text!r} is not a port")


def _parse_one(text: str, default_port: int) -> Server:
    def bad(why: str) -> ValueError:
        return ValueError(
            f"{text!r} is not a server address ({why}; e.g. HOST, HOST:PORT, livelock://HOST:PORT, [::1]:7873)"
        )

    rest = text
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if scheme.lower() != "livelock":
            raise bad(f"unknown scheme {scheme!r}")
    if rest.endswith("/"):
        rest = rest[:-1]
    if not rest:
        raise bad("no host")
    if any(c in rest for c in "/@?# "):
        raise bad("no path, user or query")
    if rest.startswith("["):
        host, sep, after = rest[1:].partition("]")
        if not sep:
            raise bad("a [ never closed")
        if after and not after.startswith(":"):
            raise bad("junk after ]")
        port = _port(after[1:], text) if after else default_port
    elif rest.count(":") > 1:
        host, port = rest, default_port  # a bare IPv6 address: no port
    elif ":" in rest:
        host, port_text = rest.split(":", 1)
        port = _port(port_text, text)
    else:
        host, port = rest, default_port
    if not host:
        raise bad("no host")
    return host, port


def parse_addresses(text: str, default_port: int = DEFAULT_PORT) -> list[Server]:
    """``text`` (one address or a comma-separated list) as (host, port) pairs."""
    return [_parse_one(one.strip(), default_port) for one in text.split(",")]


def setting(key: str) -> str | None:
    """A setting: the environment variable ``key``, else the Django setting of
    that name when Django is installed and configured, else None."""
    value = os.environ.get(key)
    if value is not None:
        return value
    try:
        conf = importlib.import_module("django.conf")
        exceptions = importlib.import_module("django.core.exceptions")
    except ImportError:
        return None
    try:
        found = getattr(conf.settings, key, None)
    except exceptions.ImproperlyConfigured:
        return None
    return None if found is None else str(found)


def servers(address: str | None = None) -> list[Server]:
    """The servers to try: ``address`` if given, else LIVELOCK_HOST (same
    syntax), else 127.0.0.1; LIVELOCK_PORT is the default port."""
    port_text = setting("LIVELOCK_PORT")
    default_port = DEFAULT_PORT if port_text is None else _port(port_text.strip(), "LIVELOCK_PORT")
    if address is not None:
        return parse_addresses(address, default_port)
    host = setting("LIVELOCK_HOST")
    if host is not None:
        try:
            return parse_addresses(host, default_port)
        except ValueError as e:
            raise ValueError(f"LIVELOCK_HOST: {e}") from None
    return [("127.0.0.1", default_port)]


def password(explicit: BytesLike | None = None) -> BytesLike:
    """``explicit``, else LIVELOCK_PASSWORD, else none (empty)."""
    if explicit is not None:
        return explicit
    return setting("LIVELOCK_PASSWORD") or ""


def default_client_name() -> str:
    """host:pid, as the Rust client names itself (within the 256-byte limit)."""
    return f"{socket.gethostname()[:200]}:{os.getpid()}"


def configure_socket(sock: socket.socket) -> None:
    """No Nagle delay; keepalive and TCP_USER_TIMEOUT as the server uses by
    default (2 s idle, 3 probes 1 s apart; unacknowledged data dropped after
    5 s), so a dead server is noticed even by a client that sends nothing."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", 5000)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
