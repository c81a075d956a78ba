"""The protocol module without a server: the hex examples of docs/PROTOCOL.md
(section 11 and INSPECT) encode and decode exactly, semaphore records,
orders and ACQUIRE_ALL encode and decode as documented, ACQUIRE_POOL (resource
pools) encodes and its grant decodes as its wire format says, the core cancels
an ACQUIRE_ALL or ACQUIRE_POOL given up and releases its late grant (every
name, a pool's queue permits last), the decoder
refuses untrustworthy streams, bad arguments are refused before anything is
sent, and the address syntax reads as the Rust tools read it."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Callable

import pytest

from livelock_client import core
from livelock_client import protocol as p
from livelock_client.config import parse_addresses, servers


def hexbytes(text: str) -> bytes:
    return bytes.fromhex(text.replace("|", " "))


def one_frame(data: bytes) -> p.Frame:
    frames = p.FrameDecoder().feed(data)
    assert len(frames) == 1
    return frames[0]


def test_requests_encode_as_the_documented_examples() -> None:
    hello = core.Core.hello_frame(5.0, "", "demo")
    assert hello == hexbytes("f1 4c 01 01 00 00 00 00 01 00 00 00 0c 00 00 00 88 13 00 00 00 00 04 00 64 65 6d 6f")
    acquire = core.acquire_op("report-42", wait=5, shared=False, lease=30, notify_queued=True).frame(2)
    assert acquire == hexbytes(
        "f1 4c 01 03 00 00 00 00 02 00 00 00 15 00 00 00 00 01 00 00 88 13 00 00 30 75 00 00 72 65 70 6f 72 74 2d 34 32"
    )
    release = core.release_op("report-42", token=7).frame(6)
    assert release == hexbytes(
        "f1 4c 01 04 08 00 00 00 06 00 00 00 11 00 00 00 07 00 00 00 00 00 00 00 72 65 70 6f 72 74 2d 34 32"
    )


def test_replies_decode_as_the_documented_examples() -> None:
    granted = one_frame(hexbytes("f1 4c 01 03 01 00 00 00 02 00 00 00 08 00 00 00 07 00 00 00 00 00 00 00"))
    assert (granted.opcode, granted.request_id, p.parse_token(granted.body)) == (3, 2, 7)
    assert not granted.interim and not granted.is_push
    queued = one_frame(hexbytes("f1 4c 01 03 05 00 04 00 02 00 00 00 00 00 00 00"))
    assert queued.interim and queued.status == p.Status.QUEUED
    busy = one_frame(hexbytes("f1 4c 01 03 01 00 01 00 03 00 00 00 00 00 00 00"))
    assert isinstance(p.error_for(busy), p.LockBusy)
    error = one_frame(hexbytes("f1 4c 01 04 01 00 23 00 05 00 00 00 08 00 00 00 62 61 64 20 6e 61 6d 65"))
    exc = p.error_for(error)
    assert isinstance(exc, p.BadRequestError)
    assert (exc.status, exc.message) == (p.Status.BAD_NAME, "bad name")
    lost = one_frame(
        hexbytes("f1 4c 01 40 03 00 00 00 00 00 00 00 11 00 00 00 07 00 00 00 00 00 00 00 72 65 70 6f 72 74 2d 34 32")
    )
    assert lost.is_push and p.parse_lock_lost(lost.body) == (b"report-42", 7)
    resumed = one_frame(
        hexbytes(
            "f1 4c 01 02 01 00 00 00 01 00 00 00 28 00 00 00 2a 00 00 00 00 00 00 00"
            " 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f 88 13 00 00 01 00 00 00 01 00 00 00 02 00 00 00"
        )
    )
    info, in_flight = p.parse_session(resumed.body, resumed=True)
    assert (info.session_id, info.secret, info.grace_ms, info.version) == (42, bytes(range(16)), 5000, 1)
    assert in_flight == (2,)
    held = one_frame(
        hexbytes(
            "f1 4c 01 44 03 00 00 00 00 00 00 00 12 00 00 00 07 00 00 00 00 00 00 00 00 72 65 70 6f 72 74 2d 34 32"
        )
    )
    assert p.parse_held(held.body) == (b"report-42", 7, p.Mode.EXCLUSIVE)


def test_inspect_body_parses_as_documented() -> None:
    body = hexbytes(
        "01 00 00 00 01 00 00 00 01 00 00 00 71"
        " 05 00 00 00 00 00 00 00 06 00 00 00 00 00 00 00"
        " 07 00 00 00 00 00 00 00 01 00 68"
        " 0a 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00"
        " 08 00 00 00 00 00 00 00 09 00 00 00 00 00 00 00 00 00 01 00 77"
    )
    inspection = p.parse_inspect(body)
    assert inspection.record == p.LockRecord(b"q", p.Mode.EXCLUSIVE, 1, (p.Holder(5, 6, 7, b"h"),), ())
    assert inspection.server_unix_ms == 10
    assert inspection.queue == (p.Waiter(8, 9, p.Mode.EXCLUSIVE, b"w"),)
    with pytest.raises(p.ProtocolError):
        p.parse_inspect(body[:-1])
    with pytest.raises(p.ProtocolError):
        p.parse_inspect(body + b"\x00")


def test_semaphore_requests_encode_as_the_documented_examples() -> None:
    permits = core.acquire_permits_op("gpus", 2, 4, wait=None, lease=None, notify_queued=False).frame(9)
    assert permits == hexbytes(
        "f1 4c 01 11 00 00 00 00 09 00 00 00 18 00 00 00"
        " 02 00 00 00 ff ff ff ff 00 00 00 00 02 00 00 00 04 00 00 00 67 70 75 73"
    )
    notified = core.acquire_permits_op("gpus", 1, 4, wait=0.5, lease=2, notify_queued=True).frame(3)
    assert notified[16:36] == hexbytes("02 01 00 00 f4 01 00 00 d0 07 00 00 01 00 00 00 04 00 00 00")
    capacity = core.set_capacity_op("gpus", 6).frame(11)
    assert capacity == hexbytes("f1 4c 01 12 00 00 00 00 0b 00 00 00 08 00 00 00 06 00 00 00 67 70 75 73")
    conflict = one_frame(hexbytes("f1 4c 01 11 01 00 0a 00 0a 00 00 00 00 00 00 00"))
    assert (conflict.opcode, conflict.request_id) == (p.Opcode.ACQUIRE_PERMITS, 10)
    assert isinstance(p.error_for(conflict), p.CapacityConflictError)
    granted = one_frame(hexbytes("f1 4c 01 11 03 00 00 00 09 00 00 00 08 00 00 00 07 00 00 00 00 00 00 00"))
    hold = core.acquire_permits_op("gpus", 2, 4, wait=None, lease=None, notify_queued=False).finish(granted)
    assert (hold.name, hold.token, hold.mode, hold.weight) == (b"gpus", 7, p.Mode.PERMITS, 2)
    # SET_CAPACITY of a name nobody uses: nothing to change.
    not_held = one_frame(hexbytes("f1 4c 01 12 01 00 05 00 0b 00 00 00 00 00 00 00"))
    assert core.set_capacity_op("gpus", 6).finish(not_held) is False


def test_orders_encode_as_documented() -> None:
    assert core.set_order_op(None).frame(4) == hexbytes("f1 4c 01 13 00 00 00 00 04 00 00 00 04 00 00 00 00 00 00 00")
    assert p.set_order_body("ascending") == hexbytes("01 00 00 00")
    mixed: dict[str | bytes, int] = {"b": 1, b"ab": 0}
    assert p.set_order_body(mixed) == hexbytes("02 00 02 00 | 01 00 00 00 01 00 62 | 00 00 00 00 02 00 61 62")
    assert p.set_order_body({f"{i}": i for i in range(256)})[:4] == hexbytes("02 00 00 01")


@pytest.mark.parametrize(
    "order, why",
    [
        ({}, "1 to 256 names"),
        ({f"{i}": 0 for i in range(257)}, "1 to 256 names"),
        ({"a": 1, b"a": 2}, "twice"),
        ({"": 1}, "lock name"),
        ({"a": -1}, "priority"),
        ({"a": 2**32}, "priority"),
        ({f"{i:04}" + "x" * 1020: 0 for i in range(4)}, "at most 4096"),
        ("descending", "ascending"),
    ],
)
def test_bad_orders_are_refused_before_sending(order: p.Order, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        core.set_order_op(order)


def test_semaphore_records_parse_as_documented() -> None:
    # INSPECT of semaphore "s" of capacity 4: session 5 holds 3 permits (token
    # 6, since 7, client "h"); session 8 waits for 2 since 9 (client "w").
    body = hexbytes(
        "01 00 02 00 01 00 00 00 01 00 00 00 73 | 04 00 00 00"
        " 05 00 00 00 00 00 00 00 06 00 00 00 00 00 00 00 07 00 00 00 00 00 00 00 01 00 68 | 03 00 00 00"
        " 0a 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00"
        " 08 00 00 00 00 00 00 00 09 00 00 00 00 00 00 00 02 00 01 00 77 | 02 00 00 00"
    )
    inspection = p.parse_inspect(body)
    assert inspection.record == p.LockRecord(
        b"s", p.Mode.PERMITS, 1, (p.Holder(5, 6, 7, b"h", weight=3),), (), capacity=4
    )
    assert inspection.queue == (p.Waiter(8, 9, p.Mode.PERMITS, b"w", weight=2),)
    with pytest.raises(p.ProtocolError):
        p.parse_inspect(body[:-1])  # the waiter's weight cut short
    record = body[: 12 + 1 + 4 + 24 + 2 + 1 + 4]  # header, name, capacity, holder with its weight
    listing = p.parse_list(hexbytes("01 00 00 00 00 00 00 00 0a 00 00 00 00 00 00 00") + record)
    assert listing.records == (inspection.record,)
    held = hexbytes("07 00 00 00 00 00 00 00 02 67 70 75 73")
    assert p.parse_held(held) == (b"gpus", 7, p.Mode.PERMITS)
    with pytest.raises(p.ProtocolError, match="bad mode"):
        p.parse_held(held[:8] + b"\x03" + held[9:])


def test_acquire_all_encodes_and_decodes_as_documented() -> None:
    # request_id 14: "a" exclusive and "b" shared, waiting at most 5 s.
    op = core.acquire_all_op(["a", ("b", "shared")], wait=5, shared=False, notify_queued=False)
    assert op.frame(14) == hexbytes(
        "f1 4c | 01 | 15 | 00 00 | 00 00 | 0e 00 00 00 | 12 00 00 00"
        " 00 00 02 00 88 13 00 00 | 00 00 01 00 61 | 01 00 01 00 62"
    )
    assert op.names == (b"a", b"b") and op.opcode == p.Opcode.ACQUIRE_ALL and int(op.opcode) == 0x15
    # The same names spelled otherwise make the same request.
    pairs: list[p.LockSpec] = ["a", ("b", "shared")]
    spellings: list[tuple[Iterable[p.LockSpec], bool]] = [
        ([(b"a", p.Mode.EXCLUSIVE), ("b", p.Mode.SHARED)], False),
        ([("a", "exclusive"), "b"], True),
        (iter(pairs), False),  # any iterable
    ]
    for names, shared in spellings:
        assert core.acquire_all_op(names, wait=5, shared=shared, notify_queued=False).frame(14) == op.frame(14)
    # Granted, with the tokens of a (8) and b (9), in the request's order.
    granted = one_frame(
        hexbytes(
            "f1 4c | 01 | 15 | 01 00 | 00 00 | 0e 00 00 00 | 10 00 00 00"
            " 08 00 00 00 00 00 00 00 | 09 00 00 00 00 00 00 00"
        )
    )
    holds = op.finish(granted)
    assert [(h.name, h.token, h.mode) for h in holds] == [(b"a", 8, p.Mode.EXCLUSIVE), (b"b", 9, p.Mode.SHARED)]
    with pytest.raises(p.ProtocolError, match="ACQUIRE_ALL grant"):
        op.finish(p.Frame(p.Opcode.ACQUIRE_ALL, p.FLAG_REPLY, p.Status.OK, 14, granted.body[:8]))
    # NOTIFY_QUEUED (start_acquire_all), waiting forever; a try answers None for Busy.
    notified = core.acquire_all_op(["a"], wait=None, shared=True, notify_queued=True).frame(3)
    assert notified[16:] == hexbytes("01 00 01 00 ff ff ff ff | 01 00 01 00 61")
    busy = p.Frame(p.Opcode.ACQUIRE_ALL, p.FLAG_REPLY, p.Status.BUSY, 3, b"")
    assert core.try_acquire_all_op(["a", "b"], shared=False).finish(busy) is None
    with pytest.raises(p.LockBusy):
        op.finish(busy)
    # The biggest request that fits: 4096 bytes.
    names = [f"{i}" + "x" * 1019 for i in range(3)] + ["y" * (4096 - 8 - 3 * 1024 - 4)]
    assert len(core.acquire_all_op(names, wait=0, shared=False, notify_queued=False).body) == 4096


@pytest.mark.parametrize(
    "names, why",
    [
        ([], "1 to 32 names"),
        ([f"n{i}" for i in range(33)], "1 to 32 names"),
        (["a", "a"], "twice"),
        (["a", ("a", "shared")], "twice"),
        (["a", b"a"], "twice"),
        (["é", "é".encode()], "twice"),
        (["a", ""], "lock name"),
        (["a", "x" * 1025], "lock name"),
        ([("a", "")], "exclusive"),
        ([("a", "permits")], "exclusive"),
        ([("a", p.Mode.PERMITS)], "not permits"),
        ([("a", "shared", 1)], "pair"),
        ([f"{i}" + "x" * 1023 for i in range(4)], "at most 4096"),
    ],
)
def test_bad_acquire_all_names_are_refused_before_sending(names: list[p.LockSpec], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        core.acquire_all_op(names, wait=None, shared=False, notify_queued=False)


def test_acquire_all_takes_a_list_of_names() -> None:
    for bad in ["ab", b"ab", [42], [("a", 1)]]:
        with pytest.raises(TypeError):
            core.acquire_all_op(bad, wait=None, shared=False, notify_queued=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="wait"):
        core.acquire_all_op(["a"], wait=-1, shared=False, notify_queued=False)


class _Waiter:
    """A caller of the core, recording what it is told."""

    def __init__(self) -> None:
        self.value: object = None
        self.error: p.LivelockError | None = None

    def queued(self) -> None:
        pass

    def done(self, value: object) -> None:
        self.value = value

    def failed(self, error: p.LivelockError) -> None:
        self.error = error

    def peek(self) -> object:
        return self.value


def _connected_core() -> core.Core:
    session = struct.pack("<Q16sIB3x", 7, bytes(16), 0, p.VERSION)
    state = core.Core()
    state.on_session(p.Frame(p.Opcode.HELLO, p.FLAG_REPLY, p.Status.OK, core.FIRST_REQUEST_ID, session))
    return state


def _sent(frames: list[bytes]) -> list[tuple[int, bytes]]:
    """(opcode, body) of request frames."""
    return [(frame[3], frame[16:]) for frame in frames]


def test_an_acquire_all_given_up_is_cancelled_and_its_late_grant_released() -> None:
    state = _connected_core()
    waiter = _Waiter()
    request_id, _ = state.request(core.acquire_all_op(["b", "a"], wait=None, shared=False, notify_queued=False), waiter)
    assert _sent(state.abandon(request_id, waiter, keep_result=False) or []) == [
        (p.Opcode.CANCEL, struct.pack("<I", request_id))
    ]
    tokens = struct.pack("<QQ", 5, 6)
    granted = state.on_frame(p.Frame(p.Opcode.ACQUIRE_ALL, p.FLAG_REPLY | p.FLAG_PUSH, p.Status.OK, request_id, tokens))
    # Every name is released, by its token.
    assert _sent(granted.send) == [
        (p.Opcode.RELEASE, struct.pack("<Q", 5) + b"b"),
        (p.Opcode.RELEASE, struct.pack("<Q", 6) + b"a"),
    ]
    assert state.holds == {} and waiter.value is None
    # A caller that got the grant but stops (Ctrl-C just then) has it released too.
    late = _Waiter()
    request_id, _ = state.request(core.acquire_all_op(["c", "d"], wait=None, shared=True, notify_queued=False), late)
    state.on_frame(p.Frame(p.Opcode.ACQUIRE_ALL, p.FLAG_REPLY, p.Status.OK, request_id, tokens))
    assert sorted(state.holds) == [b"c", b"d"] and [h.mode for h in state.holds.values()] == [p.Mode.SHARED] * 2
    released = state.abandon(request_id, late, keep_result=False)
    assert _sent(released or []) == [
        (p.Opcode.RELEASE, struct.pack("<Q", 5) + b"c"),
        (p.Opcode.RELEASE, struct.pack("<Q", 6) + b"d"),
    ]
    assert state.holds == {}


def test_acquire_pool_encodes_as_the_wire_format_says() -> None:
    # request_id 9, waiting at most 5 s: 1 of a (tags m=1) and b (none)
    # matching the filter m=1, and the plain name c.
    op = core.acquire_pool_op([p.Requirement(1, [("a", "m=1"), "b"], filter="m=1"), "c"], wait=5, notify_queued=False)
    assert op.frame(9) == hexbytes(
        "f1 4c | 01 | 16 | 00 00 | 00 00 | 09 00 00 00 | 29 00 00 00"
        " 00 00 02 00 88 13 00 00"  # acq_flags, reserved, count 2, wait_ms 5000
        " 01 00 02 00 03 00 6d 3d 31"  # need 1, 2 candidates, filter "m=1"
        " 01 00 03 00 61 6d 3d 31 | 01 00 00 00 62"  # a (m=1), b
        " 01 00 01 00 00 00 | 01 00 00 00 63"  # need 1 of c, no filter
    )
    assert op.opcode == p.Opcode.ACQUIRE_POOL and int(op.opcode) == 0x16
    assert op.names == (b"a", b"b", b"c")  # the filter leaves no spare candidate: no pool queue
    # The same requirements spelled otherwise make the same request.
    spellings: list[list[p.RequirementSpec]] = [
        [p.Requirement(1, {"a": {"m": "1"}, "b": ""}, filter={"m": "1"}), p.Requirement.name("c")],
        [p.Requirement(1, [(b"a", b"m=1"), (b"b", b"")], filter=b"m=1"), p.Requirement(1, [b"c"])],
        [p.Requirement(1, {b"a": "m=1", b"b": {}}, filter="m=1"), b"c"],
    ]
    for requirements in spellings:
        assert core.acquire_pool_op(iter(requirements), wait=5, notify_queued=False).frame(9) == op.frame(9)
    # NOTIFY_QUEUED (start_acquire_pool), waiting forever.
    notified = core.acquire_pool_op(["c"], wait=None, notify_queued=True).frame(3)
    assert notified[16:] == hexbytes("01 00 01 00 ff ff ff ff | 01 00 01 00 00 00 | 01 00 00 00 63")
    # A requirement with spare candidates waits in its pool queue, whose
    # name (the server's) the op knows, to release it if a reply is lost.
    spare = p.Requirement(1, ["x", "y"])
    assert spare.queue() == p.pool_queue_name([b"y", b"x"]) and spare.queue() != p.pool_queue_name([b"x"])
    assert core.acquire_pool_op([spare], wait=0, notify_queued=False).names == (b"x", b"y", spare.queue())
    # The biggest request that fits: 4096 bytes.
    names = [f"{i}" + "x" * 1019 for i in range(3)] + ["y" * (4096 - 8 - 6 - 3 * 1024 - 4)]
    assert len(core.acquire_pool_op([p.Requirement(1, names)], wait=0, notify_queued=False).body) == 4096


def test_acquire_pool_encodes_and_decodes_as_documented() -> None:
    # docs/PROTOCOL.md section 11: request_id 15, 1 of g1 (m=1) and g2 (m=2)
    # where m=1, a try; granted g1 with token 10, no pool queue.
    op = core.try_acquire_pool_op([p.Requirement(1, {"g1": "m=1", "g2": "m=2"}, filter="m=1")])
    assert op.frame(15) == hexbytes(
        "f1 4c | 01 | 16 | 00 00 | 00 00 | 0f 00 00 00 | 23 00 00 00"
        " 00 | 00 | 01 00 | 00 00 00 00 | 01 00 | 02 00 | 03 00 6d 3d 31"
        " 02 00 03 00 67 31 6d 3d 31 | 02 00 03 00 67 32 6d 3d 32"
    )
    granted = one_frame(
        hexbytes(
            "f1 4c | 01 | 16 | 01 00 | 00 00 | 0f 00 00 00 | 14 00 00 00"
            " 00 00 00 00 00 00 00 00 | 00 00 | 00 00 | 0a 00 00 00 00 00 00 00"
        )
    )
    grant = op.finish(granted)
    assert grant is not None and grant.permits == (None,) and grant.indices == ((0,),)
    assert [(h.name, h.token, h.mode) for h in core.taken(grant)] == [(b"g1", 10, p.Mode.EXCLUSIVE)]


def test_a_pool_grant_decodes_per_requirement() -> None:
    gpus = p.Requirement(2, {"g1": "model=T1", "g2": "model=T2", "g3": "model=T1", "g4": "model=T1"}, filter="model=T1")
    op = core.acquire_pool_op([gpus, "db"], wait=None, notify_queued=False)
    # Requirement 0: the permits of its queue (token 5, "pool:q"), then g1
    # (index 0, token 8) and g4 (index 3, token 9); requirement 1: no
    # queue, db (index 0, token 10).
    body = hexbytes(
        "05 00 00 00 00 00 00 00 | 06 00 | 70 6f 6f 6c 3a 71"
        " 00 00 | 08 00 00 00 00 00 00 00 | 03 00 | 09 00 00 00 00 00 00 00"
        " 00 00 00 00 00 00 00 00 | 00 00 | 00 00 | 0a 00 00 00 00 00 00 00"
    )
    grant = op.finish(p.Frame(p.Opcode.ACQUIRE_POOL, p.FLAG_REPLY, p.Status.OK, 4, body))
    assert [[(h.name, h.token, h.mode) for h in part] for part in grant.resources] == [
        [(b"g1", 8, p.Mode.EXCLUSIVE), (b"g4", 9, p.Mode.EXCLUSIVE)],
        [(b"db", 10, p.Mode.EXCLUSIVE)],
    ]
    assert grant.indices == ((0, 3), (0,))
    queue = grant.permits[0]
    assert queue is not None
    assert (queue.name, queue.token, queue.mode, queue.weight) == (b"pool:q", 5, p.Mode.PERMITS, 2)
    assert grant.permits[1] is None
    # Released in this order: the resources, then the permits.
    assert [h.name for h in core.taken(grant)] == [b"g1", b"g4", b"db", b"pool:q"]
    bad_bodies = [
        (body[:-1], "short"),
        (body + b"\x00", "stray"),
        (body[:16] + hexbytes("04 00") + body[18:], "out of range"),  # g1's index: 4 of 4 candidates
        (body[:26] + hexbytes("00 00") + body[28:], "twice"),  # g4's index: g1's
        (bytes(8) + body[8:], "no token"),  # a queue name, token 0
        (body[:36] + hexbytes("01 00 00 00 00 00 00 00") + body[44:], "no token"),  # a token, no queue name
    ]
    for bad, why in bad_bodies:
        with pytest.raises(p.ProtocolError, match=why):
            op.finish(p.Frame(p.Opcode.ACQUIRE_POOL, p.FLAG_REPLY, p.Status.OK, 4, bad))
    # Not granted: a try answers None for Busy; the others raise.
    busy = p.Frame(p.Opcode.ACQUIRE_POOL, p.FLAG_REPLY, p.Status.BUSY, 4, b"")
    assert core.try_acquire_pool_op([gpus]).finish(busy) is None
    with pytest.raises(p.LockBusy):
        op.finish(busy)
    short = b"requirement 0: its filter leaves fewer candidates than it needs"
    with pytest.raises(p.OverCapacityError, match="requirement 0") as over:
        core.try_acquire_pool_op([gpus]).finish(
            p.Frame(p.Opcode.ACQUIRE_POOL, p.FLAG_REPLY, p.Status.OVER_CAPACITY, 4, short)
        )
    assert isinstance(over.value, p.NotAcquired) and over.value.message == short.decode()


def test_tags_and_filters_match_whole_pairs() -> None:
    assert p.tags_text({"model": "T1", "site": "lab2"}) == b"model=T1,site=lab2"
    assert p.tags_text("k=") == b"k=" and p.tags_text("") == b"" and p.tags_text({}) == b""
    assert p.tags_text("k=a=b") == b"k=a=b"  # a value may hold "="
    assert p.tags_match(b"model=T1,site=x", b"")
    assert p.tags_match(b"model=T1,site=x", b"site=x,model=T1")
    assert not p.tags_match(b"model=T10", b"model=T1")
    assert not p.tags_match(b"", b"model=T1")
    assert p.Requirement(1, {"a": "m=1", "b": "m=2", "c": "m=1,x=y"}, filter="m=1").matching() == (0, 2)


def _requirement(need: int, candidates: p.Candidates, filter: p.Tags = "") -> Callable[[], object]:
    return lambda: p.Requirement(need, candidates, filter=filter)


@pytest.mark.parametrize(
    "make, why",
    [
        (_requirement(0, ["a"]), "need"),
        (_requirement(3, ["a", "b"]), "need"),
        (_requirement(1, []), "1 to 64 candidates"),
        (_requirement(1, [f"n{i}" for i in range(65)]), "1 to 64 candidates"),
        (_requirement(1, ["a", "a"]), "twice"),
        (_requirement(1, ["é", "é".encode()]), "twice"),
        (_requirement(1, ["a", ("a", "k=v")]), "twice"),
        (_requirement(1, ["a", ""]), "lock name"),
        (_requirement(1, ["x" * 1025]), "lock name"),
        (_requirement(1, [("a", "novalue")]), "key=value"),
        (_requirement(1, [("a", "=v")]), "key=value"),
        (_requirement(1, [("a", "k=v,")]), "key=value"),
        (_requirement(1, [("a", "k=v,,j=w")]), "key=value"),
        (_requirement(1, [("a", "k=" + "v" * 254)]), "255 bytes"),
        (_requirement(1, {"a": {"k=": "v"}}), "key"),
        (_requirement(1, {"a": {"": "v"}}), "key"),
        (_requirement(1, {"a": {"k": "v,w"}}), "value"),
        (_requirement(1, [("a", "k=v", "x")]), "pair"),  # type: ignore[list-item]
        (_requirement(1, ["a"], "model"), "key=value"),
        (_requirement(1, ["a"], {"k,": "v"}), "key"),
        (lambda: core.acquire_pool_op([], wait=None, notify_queued=False), "1 to 16 requirements"),
        (lambda: core.acquire_pool_op([f"n{i}" for i in range(17)], wait=None, notify_queued=False), "1 to 16"),
        (lambda: core.acquire_pool_op(["a", "a"], wait=None, notify_queued=False), "twice"),
        (lambda: core.acquire_pool_op([p.Requirement(1, ["a", "b"]), "b"], wait=None, notify_queued=False), "twice"),
        (
            lambda: core.acquire_pool_op(
                [p.Requirement(1, [f"{r}/{i}" for i in range(13)]) for r in range(5)], wait=None, notify_queued=False
            ),
            "at most 64 candidates",
        ),
        (
            lambda: core.acquire_pool_op([p.Requirement(1, [f"{i}" + "x" * 1023 for i in range(4)])], wait=0,
                                         notify_queued=False),
            "at most 4096",
        ),
        (lambda: core.acquire_pool_op(["a"], wait=-1, notify_queued=False), "wait"),
    ],
)
def test_bad_requirements_are_refused_before_sending(make: Callable[[], object], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        make()


def test_acquire_pool_takes_a_list_of_requirements() -> None:
    for bad in ["ab", b"ab", p.Requirement.name("a"), [42]]:
        with pytest.raises(TypeError):
            core.acquire_pool_op(bad, wait=None, notify_queued=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not one name"):
        p.Requirement(1, "ab")
    with pytest.raises(TypeError, match="need"):
        p.Requirement(True, ["a"])
    with pytest.raises(TypeError):
        p.Requirement(1, [42])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        p.Requirement(1, [("a", 42)])  # type: ignore[list-item]


def test_an_acquire_pool_given_up_is_cancelled_and_its_late_grant_released() -> None:
    state = _connected_core()
    waiter = _Waiter()
    op = core.acquire_pool_op([p.Requirement(1, ["b", "a"]), "c"], wait=None, notify_queued=False)
    request_id, _ = state.request(op, waiter)
    assert _sent(state.abandon(request_id, waiter, keep_result=False) or []) == [
        (p.Opcode.CANCEL, struct.pack("<I", request_id))
    ]
    queue = p.pool_queue_name([b"a", b"b"])
    body = struct.pack("<QH", 5, len(queue)) + queue + struct.pack("<HQ", 1, 6) + struct.pack("<QHHQ", 0, 0, 0, 7)
    granted = state.on_frame(p.Frame(p.Opcode.ACQUIRE_POOL, p.FLAG_REPLY | p.FLAG_PUSH, p.Status.OK, request_id, body))
    # Every resource is released, by its token, then the queue's permits.
    released = [
        (p.Opcode.RELEASE, struct.pack("<Q", 6) + b"a"),
        (p.Opcode.RELEASE, struct.pack("<Q", 7) + b"c"),
        (p.Opcode.RELEASE, struct.pack("<Q", 5) + queue),
    ]
    assert _sent(granted.send) == released
    assert state.holds == {} and waiter.value is None
    # A caller that got the grant but stops (Ctrl-C just then) has it released too.
    late = _Waiter()
    request_id, _ = state.request(op, late)
    state.on_frame(p.Frame(p.Opcode.ACQUIRE_POOL, p.FLAG_REPLY, p.Status.OK, request_id, body))
    assert sorted(state.holds) == sorted([b"a", b"c", queue])
    assert state.holds[queue].mode == p.Mode.PERMITS and state.holds[queue].weight == 1
    assert _sent(state.abandon(request_id, late, keep_result=False) or []) == released
    assert state.holds == {}


def test_a_pool_grant_lost_with_its_connection_is_released_on_resume() -> None:
    # A session with a grace; its ACQUIRE_POOL was answered on a connection
    # that died before the reply came: RESUME lists it neither in flight nor
    # answered, and lists its holds, the pool queue's permits among them.
    session = struct.pack("<Q16sIB3x", 7, bytes(16), 5000, p.VERSION)
    state = core.Core()
    state.on_session(p.Frame(p.Opcode.HELLO, p.FLAG_REPLY, p.Status.OK, core.FIRST_REQUEST_ID, session))
    state.request(core.acquire_pool_op([p.Requirement(1, ["b", "a"]), "c"], wait=None, notify_queued=False), _Waiter())
    state.on_disconnect("cut")
    state.on_session(p.Frame(p.Opcode.RESUME, p.FLAG_REPLY, p.Status.OK, core.FIRST_REQUEST_ID, session + bytes(4)))
    queue = p.pool_queue_name([b"a", b"b"])
    for token, mode, name in [(6, p.Mode.EXCLUSIVE, b"a"), (7, p.Mode.EXCLUSIVE, b"c"), (5, p.Mode.PERMITS, queue)]:
        state.on_frame(p.Frame(p.Opcode.HELD, p.FLAG_REPLY, p.Status.OK, 0, struct.pack("<QB", token, mode) + name))
    listed = state.on_frame(p.Frame(p.Opcode.HELD_END, p.FLAG_REPLY, p.Status.OK, 0, b""))
    assert listed.listed and state.holds == {}
    assert _sent(listed.send) == [
        (p.Opcode.RELEASE, struct.pack("<Q", 6) + b"a"),
        (p.Opcode.RELEASE, struct.pack("<Q", 7) + b"c"),
        (p.Opcode.RELEASE, struct.pack("<Q", 5) + queue),
    ]


def test_a_deadlock_reply_carries_the_cycle() -> None:
    cycle = 'deadlock: session 0x101 waits for "x" held by session 0x100; session 0x100 waits for "y" held by 0x101'
    header = p.encode_frame(p.Opcode.ACQUIRE, 5, cycle.encode())[:16]
    # A deferred final reply: REPLY | PUSH, status 13.
    frame = one_frame(header[:4] + hexbytes("03 00 0d 00") + header[8:] + cycle.encode())
    assert not frame.is_push and not frame.interim
    error = p.error_for(frame)
    assert isinstance(error, p.DeadlockError) and isinstance(error, p.NotAcquired)
    assert error.status == p.Status.DEADLOCK and error.cycle == cycle and cycle in str(error)


def test_the_decoder_takes_frames_byte_by_byte() -> None:
    stream = hexbytes("f1 4c 01 03 05 00 04 00 02 00 00 00 00 00 00 00") + hexbytes(
        "f1 4c 01 03 03 00 00 00 02 00 00 00 08 00 00 00 07 00 00 00 00 00 00 00"
    )
    decoder = p.FrameDecoder()
    frames = []
    for byte in stream:
        frames += decoder.feed(bytes([byte]))
    assert [(f.flags, f.status) for f in frames] == [(5, p.Status.QUEUED), (3, p.Status.OK)]


@pytest.mark.parametrize(
    "data, why",
    [
        (b"\xf2", "bad magic"),
        (b"\xf1\x4d", "bad magic"),
        (hexbytes("f1 4c 02 03 01 00 00 00 01 00 00 00 00 00 00 00"), "version"),
        (hexbytes("f1 4c 01 03 01 00 1f 00 01 00 00 00 00 00 00 00"), "unknown status"),
        (hexbytes("f1 4c 01 03 00 00 00 00 01 00 00 00 00 00 00 00"), "REPLY"),
        (hexbytes("f1 4c 01 03 01 00 00 00 01 00 00 00 01 10 00 00"), "exceeds"),
        (hexbytes("f1 4c 01 02 01 00 00 00 01 00 00 00 25 10 00 00"), "exceeds"),
        (hexbytes("f1 4c 01 0b 01 00 00 00 01 00 00 00 01 00 10 00"), "exceeds"),
    ],
)
def test_the_decoder_refuses_a_broken_stream(data: bytes, why: str) -> None:
    decoder = p.FrameDecoder()
    with pytest.raises(p.ProtocolError, match=why):
        decoder.feed(data)
    with pytest.raises(p.ProtocolError):
        decoder.feed(b"")  # broken for good


def test_large_replies_wait_for_their_body() -> None:
    header = hexbytes("f1 4c 01 0b 01 00 00 00 01 00 00 00 00 00 10 00")  # LIST, 1 MiB
    assert p.FrameDecoder().feed(header) == []


def test_counts_are_not_trusted() -> None:
    # A LIST reply claiming 2**32-1 records in 16 bytes is refused at once.
    with pytest.raises(p.ProtocolError, match="claims"):
        p.parse_list(hexbytes("ff ff ff ff 00 00 00 00 00 00 00 00 00 00 00 00"))
    with pytest.raises(p.ProtocolError):
        p.parse_session(bytes(32) + hexbytes("01 04 00 00"), resumed=True)


@pytest.mark.parametrize("bad", ["", b"", "x" * 1025, "é" * 513])
def test_bad_names_are_refused_before_sending(bad: str) -> None:
    with pytest.raises(ValueError, match="lock name"):
        core.acquire_op(bad, wait=None, shared=False, lease=None, notify_queued=False)
    with pytest.raises(ValueError):
        core.release_op(bad)
    with pytest.raises(ValueError):
        core.inspect_op(bad)


def test_bad_arguments_are_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="grace"):
        core.Core.hello_frame(3600.001, "", "me")
    with pytest.raises(ValueError, match="password"):
        core.Core.hello_frame(0, "p" * 257, "me")
    with pytest.raises(ValueError, match="wait"):
        core.acquire_op("x", wait=-1, shared=False, lease=None, notify_queued=False)
    with pytest.raises(ValueError, match="lease"):
        core.acquire_op("x", wait=None, shared=False, lease=float("inf"), notify_queued=False)
    with pytest.raises(ValueError, match="lease"):
        core.extend_op("x", 0)
    with pytest.raises(ValueError, match="signal"):
        core.signal_op("x", "", p.SignalOp.RAISE)
    with pytest.raises(ValueError, match="limit"):
        core.list_op("*", 0)
    with pytest.raises(ValueError, match="token"):
        core.release_op("x", token=0)
    with pytest.raises(TypeError):
        core.acquire_op(42, wait=None, shared=False, lease=None, notify_queued=False)  # type: ignore[arg-type]
    assert core.Core.hello_frame(3600, "", "me")  # one hour is allowed
    for weight, capacity in [(0, 4), (5, 4), (True, 4), (1, 0), (1, 2**32)]:
        with pytest.raises(ValueError, match="weight|capacity"):
            core.acquire_permits_op("x", weight, capacity, wait=None, lease=None, notify_queued=False)
    with pytest.raises(ValueError, match="capacity"):
        core.set_capacity_op("x", 0)
    with pytest.raises(ValueError, match="lock name"):
        core.acquire_permits_op("", 1, 1, wait=None, lease=None, notify_queued=False)


def test_every_status_has_an_exception_class() -> None:
    for status in p.Status:
        if status in (p.Status.OK, p.Status.QUEUED):
            continue
        frame = p.Frame(p.Opcode.ACQUIRE, p.FLAG_REPLY, status, 1, b"why" if status.is_error else b"")
        error = p.error_for(frame)
        assert isinstance(error, p.ServerError) and error.status == status
        assert status.name in str(error)
    kinds = {
        p.Status.WRONG_KIND: p.WrongKindError,
        p.Status.CAPACITY_CONFLICT: p.CapacityConflictError,
        p.Status.OVER_CAPACITY: p.OverCapacityError,
        p.Status.ORDER_VIOLATION: p.OrderViolationError,
        p.Status.DEADLOCK: p.DeadlockError,
    }
    for status, cls in kinds.items():
        assert type(p.error_for(p.Frame(p.Opcode.ACQUIRE_PERMITS, p.FLAG_REPLY, status, 1, b""))) is cls
        assert not status.is_error  # outcomes, below 32


def test_addresses_read_as_the_rust_tools_read_them() -> None:
    for text in ["127.0.0.1", "127.0.0.1:7873", "livelock://127.0.0.1", "LIVELOCK://127.0.0.1:7873/"]:
        assert parse_addresses(text) == [("127.0.0.1", 7873)], text
    assert parse_addresses("localhost:9000") == [("localhost", 9000)]
    assert parse_addresses("::1") == [("::1", 7873)]
    assert parse_addresses("[::1]") == [("::1", 7873)]
    assert parse_addresses("livelock://[::1]:9") == [("::1", 9)]
    assert parse_addresses("a:1, livelock://b ,c") == [("a", 1), ("b", 7873), ("c", 7873)]
    for text, why in [
        ("", "no host"),
        (":7873", "no host"),
        ("host:0", "not a port"),
        ("host:http", "not a port"),
        ("redis://host", "unknown scheme"),
        ("livelock://host/path", "no path"),
        ("[::1", "never closed"),
        ("a,,b", "no host"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_addresses(text)


def test_the_environment_is_read_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    assert servers() == [("127.0.0.1", 7873)]
    monkeypatch.setenv("LIVELOCK_PORT", "9000")
    assert servers() == [("127.0.0.1", 9000)]
    monkeypatch.setenv("LIVELOCK_HOST", "h1,h2:1")
    assert servers() == [("h1", 9000), ("h2", 1)]
    assert servers("x") == [("x", 9000)]
    monkeypatch.setenv("LIVELOCK_PORT", "abc")
    with pytest.raises(ValueError, match="LIVELOCK_PORT"):
        servers()
    monkeypatch.setenv("LIVELOCK_PORT", "1")
    monkeypatch.setenv("LIVELOCK_HOST", "h:x")
    with pytest.raises(ValueError, match="LIVELOCK_HOST"):
        servers()


def test_django_settings_are_read_when_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = pytest.importorskip("django.conf").settings

    from livelock_client import config

    assert config.setting("LIVELOCK_HOST") is None  # installed but not configured
    if not settings.configured:
        settings.configure()
    monkeypatch.setattr(settings, "LIVELOCK_HOST", "django-host", raising=False)
    monkeypatch.setattr(settings, "LIVELOCK_PORT", 7000, raising=False)
    monkeypatch.setattr(settings, "LIVELOCK_PASSWORD", "from-django", raising=False)
    assert servers() == [("django-host", 7000)]
    assert config.password() == "from-django"
    # The environment comes first, as in the legacy client.
    monkeypatch.setenv("LIVELOCK_HOST", "env-host")
    assert servers() == [("env-host", 7000)]
    monkeypatch.setattr(settings, "LIVELOCK_TLS_CA", "/nowhere/ca.pem", raising=False)
    with pytest.raises(ValueError, match="TLS CA /nowhere/ca.pem"):
        config.tls()  # the setting was read, and turned TLS on
