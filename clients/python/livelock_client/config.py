"""Where and how to connect: the address syntax of every livelock tool, the
settings (LIVELOCK_HOST, LIVELOCK_PORT, LIVELOCK_PASSWORD, LIVELOCK_TLS_CA,
LIVELOCK_TLS_CLIENT_CERT, LIVELOCK_TLS_CLIENT_KEY from the environment, else
from Django's settings as the legacy ``livelock`` client reads them), the TLS
setup, the default client name, and the socket options.

Addresses: ``HOST``, ``HOST:PORT``, ``livelock://HOST[:PORT]``, IPv6 as
``::1`` or ``[::1]:PORT``, or a comma-separated list of those (the servers
to try, in order); the port defaults to LIVELOCK_PORT, else 7873.
"""

from __future__ import annotations

import importlib
import os
import re
import socket
import ssl
from dataclasses import dataclass
from typing import Callable, TypeVar, Union

from .protocol import BytesLike

DEFAULT_PORT = 7873

T = TypeVar("T")

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


#: What ``tls=`` takes: an ``ssl.SSLContext``, used as it is; True: TLS with
#: the CA and client certificate settings (the system's trusted CAs by
#: default); False: plaintext, whatever the settings; None: TLS when a TLS
#: setting is given.
TlsOption = Union[ssl.SSLContext, bool, None]

#: A file's path.
FilePath = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Tls:
    """TLS for a client's connections: the context, and the name the server's
    certificate must carry (None: the host dialled)."""

    context: ssl.SSLContext
    server_name: str | None = None

    def name_for(self, host: str) -> str:
        return self.server_name or host


def _setting_file(key: str) -> str | None:
    """The file the setting ``key`` names (empty: none)."""
    return setting(key) or None


def _loading(what: str, path: str | None, load: Callable[[], T]) -> T:
    """Runs ``load``; a file it cannot read is a ValueError that names it."""
    try:
        return load()
    except OSError as e:  # ssl.SSLError included
        raise ValueError(f"TLS {what} {path}: {e}") from e


def tls(
    option: TlsOption = None,
    *,
    ca: FilePath | None = None,
    cert: FilePath | None = None,
    key: FilePath | None = None,
    server_name: str | None = None,
) -> Tls | None:
    """The TLS of a client's connections; None: plaintext. An SSLContext
    ``option`` is used as it is. Otherwise the CAs trusted are those of the
    file ``ca``, else of LIVELOCK_TLS_CA, else the system's; the client
    certificate (mutual TLS) is ``cert`` with ``key`` (None: the key is in
    ``cert``), else LIVELOCK_TLS_CLIENT_CERT with LIVELOCK_TLS_CLIENT_KEY.
    TLS is on when ``option`` is True, or, when it is None, when any of these
    (or ``server_name``) is set."""
    if not isinstance(option, (ssl.SSLContext, bool, type(None))):
        raise TypeError(f"tls must be an ssl.SSLContext, True, False or None, not {type(option).__name__}")
    given = [name for name, value in (("tls_ca", ca), ("tls_cert", cert), ("tls_key", key)) if value is not None]
    if isinstance(option, ssl.SSLContext):
        if given:
            raise ValueError(f"{', '.join(given)} with an SSLContext: load them into the context instead")
        return Tls(option, server_name)
    if option is False:
        if given or server_name is not None:
            raise ValueError("TLS options with tls=False")
        return None
    ca_file = os.fspath(ca) if ca is not None else _setting_file("LIVELOCK_TLS_CA")
    cert_file: str | None
    if cert is not None:
        cert_file, key_file = os.fspath(cert), None if key is None else os.fspath(key)
    elif key is not None:
        raise ValueError("tls_key without tls_cert")
    else:
        cert_file, key_file = _setting_file("LIVELOCK_TLS_CLIENT_CERT"), _setting_file("LIVELOCK_TLS_CLIENT_KEY")
        if key_file is not None and cert_file is None:
            raise ValueError("LIVELOCK_TLS_CLIENT_KEY without LIVELOCK_TLS_CLIENT_CERT")
    if option is None and ca_file is None and cert_file is None and server_name is None:
        return None
    # With a CA file, only its CAs are trusted; without, the system's.
    context = _loading("CA", ca_file, lambda: ssl.create_default_context(cafile=ca_file))
    if cert_file is not None:
        _loading("client certificate", cert_file, lambda: context.load_cert_chain(cert_file, key_file))
    return Tls(context, server_name)


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
