"""livelock_client: a pure-Python client of the livelock lock server's native
protocol, blocking (``Client``) and asyncio (``AsyncClient``).

This module only gathers the public names; see README.md for the guide.
"""

from .aio import AsyncClient, AsyncHeld, AsyncPendingAcquire
from .config import DEFAULT_PORT, parse_addresses
from .core import (
    EVENTS_MAX,
    Disconnected,
    Event,
    LockLost,
    Resumed,
    SessionTaken,
    Shutdown,
    Signal,
)
from .protocol import (
    AcquireCancelled,
    AcquireTimedOut,
    AlreadyHeldError,
    AuthError,
    BadRequestError,
    ConnectionLost,
    Holder,
    Inspection,
    LimitError,
    Listing,
    LivelockError,
    LivelockTimeout,
    LockBusy,
    LockRecord,
    Mode,
    NoSuchRequestError,
    NotAcquired,
    NotHeldError,
    ProtocolError,
    ServerError,
    ShuttingDownError,
    Stats,
    Status,
    StorageFailedError,
    UnknownSessionError,
    Waiter,
    WrongTokenError,
)
from .sync import Client, Held, PendingAcquire

__version__ = "0.1.0"

connect = Client.connect

__all__ = [
    "DEFAULT_PORT",
    "EVENTS_MAX",
    "AcquireCancelled",
    "AcquireTimedOut",
    "AlreadyHeldError",
    "AsyncClient",
    "AsyncHeld",
    "AsyncPendingAcquire",
    "AuthError",
    "BadRequestError",
    "Client",
    "ConnectionLost",
    "Disconnected",
    "Event",
    "Held",
    "Holder",
    "Inspection",
    "LimitError",
    "Listing",
    "LivelockError",
    "LivelockTimeout",
    "LockBusy",
    "LockLost",
    "LockRecord",
    "Mode",
    "NoSuchRequestError",
    "NotAcquired",
    "NotHeldError",
    "PendingAcquire",
    "ProtocolError",
    "Resumed",
    "ServerError",
    "SessionTaken",
    "ShuttingDownError",
    "Shutdown",
    "Signal",
    "Stats",
    "Status",
    "StorageFailedError",
    "UnknownSessionError",
    "Waiter",
    "WrongTokenError",
    "connect",
    "parse_addresses",
]
