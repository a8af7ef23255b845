"""Fuzzing a real server on the protobuf level: every request gets a status, nothing stored
changes, the server keeps serving.

Requests for each of the service's 15 methods are generated from the message descriptors
(every field, of its type or not quite: oversized strings and byte strings, negative and
2**64-1 integers, long repeated fields, NaN costs), then sent as they are, or serialized and
damaged (truncated, bit-flipped, padded with random bytes, or wholly random). Client streams
(Put, BatchPut) are sent whole, or cut off part-way. Random bytes also go straight onto the
Unix socket, before and after an HTTP/2 preface.

Before the fuzzing, values are stored and pinned in a namespace the generator never names,
on the cpu and ssd tiers; afterwards each reads back with the same XXH3 digest and the
server answers a normal put and get. A request ending in UNKNOWN or INTERNAL (an exception
the server did not turn into a status), DEADLINE_EXCEEDED (a hang) or UNAVAILABLE (a dead
server) fails the test. `KVSTORE_FUZZ_EXAMPLES` sets the requests per method (default 700,
over 10,000 in all); the examples are derandomized so that CI is repeatable.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
import xxhash
from google.protobuf import descriptor as pbd
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.v1 import kvstore_pb2 as pb

from .conftest import ServerProcess
from .helpers import random_tensor

pytestmark = pytest.mark.timeout(600)

EXAMPLES = int(os.environ.get("KVSTORE_FUZZ_EXAMPLES", "700"))
RPC_TIMEOUT = 10.0
KNOWN_NS = "fuzz/known-values"
SERVICE = pb.DESCRIPTOR.services_by_name["KVStore"]
# Codes that mean the server failed to handle a request rather than refused it.
# Streams that last until the client ends them; their first message comes at once.
ENDLESS = {"Watch"}
BROKEN = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
}

# ------------------------------------------------------------------ requests

NAMESPACES = ["fuzz/other", "fuzz/ns:1", "a", "", " ", "fuzz/known-values\n", "x" * 256]
DTYPES = ["uint8", "float16", "bfloat16", "float32", "int64", "float8_e4m3fn", "bool", "", "q"]
U64 = st.one_of(
    st.integers(0, 16),
    st.sampled_from([2**31, 2**32 - 1, 2**63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)
I64 = st.one_of(
    st.integers(-2, 4096),
    st.sampled_from([-(2**63), 2**62, 2**63 - 1]),
    st.integers(-(2**63), 2**63 - 1),
)
U32 = st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1))
# Past every name and message limit, built once: generating megabytes per example is slow.
LONG_TEXT = ["n" * 300, "n" * 70_000]
LONG_BYTES = [b"\xa5" * (1 << 16), b"\xa5" * (5 << 20)]
STRINGS = st.one_of(
    st.sampled_from(NAMESPACES + DTYPES), st.text(max_size=64), st.sampled_from(LONG_TEXT)
)
BYTES = st.one_of(
    st.binary(min_size=32, max_size=32),  # the right length for a key
    st.binary(max_size=80),
    st.sampled_from(LONG_BYTES),
)
SCALARS: dict[int, st.SearchStrategy[Any]] = {
    pbd.FieldDescriptor.TYPE_STRING: STRINGS,
    pbd.FieldDescriptor.TYPE_BYTES: BYTES,
    pbd.FieldDescriptor.TYPE_UINT64: U64,
    pbd.FieldDescriptor.TYPE_FIXED64: U64,
    pbd.FieldDescriptor.TYPE_INT64: I64,
    pbd.FieldDescriptor.TYPE_UINT32: U32,
    pbd.FieldDescriptor.TYPE_BOOL: st.booleans(),
    pbd.FieldDescriptor.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
}


# Fields the server checks first get well-formed values most of the time, so that requests
# also get past those checks to the work behind them.
VALID_NS = st.sampled_from(["fuzz/other", "fuzz/ns:1", "a"])
KEY = st.binary(min_size=32, max_size=32)
BY_NAME: dict[str, st.SearchStrategy[Any]] = {
    "namespace": st.one_of(VALID_NS, VALID_NS, VALID_NS, STRINGS),
    "key": st.one_of(KEY, KEY, KEY, BYTES),
    "keys": st.one_of(KEY, KEY, KEY, BYTES),
    "dtype": st.one_of(st.sampled_from(DTYPES[:6]), st.sampled_from(DTYPES[:6]), STRINGS),
    "shape": st.one_of(st.integers(0, 64), st.integers(0, 64), I64),
    "data": st.one_of(st.binary(max_size=4096), st.binary(max_size=4096), BYTES),
}
SHORT: dict[int, st.SearchStrategy[Any]] = {  # items of long or well-formed lists
    pbd.FieldDescriptor.TYPE_STRING: st.sampled_from(NAMESPACES[:4]),
    pbd.FieldDescriptor.TYPE_BYTES: KEY,
    pbd.FieldDescriptor.TYPE_INT64: st.integers(0, 64),
}


def _repeated(field: pbd.FieldDescriptor) -> bool:
    return bool(field.is_repeated)


@st.composite
def messages(draw: st.DrawFn, desc: pbd.Descriptor, depth: int = 0) -> Message:
    """A message of type `desc` with any subset of its fields set to anything of their
    type, repeated fields from empty to long."""
    msg = getattr(pb, desc.name)()
    for field in desc.fields:
        usual = field.name in BY_NAME  # set four times in five, the rest half the time
        if not draw(st.integers(0, 4) if usual else st.booleans()):
            continue
        if field.type == pbd.FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2:
                continue
            sub = messages(field.message_type, depth + 1)
            if _repeated(field):
                getattr(msg, field.name).extend(draw(st.lists(sub, max_size=8)))
            else:
                getattr(msg, field.name).CopyFrom(draw(sub))
            continue
        values = BY_NAME.get(field.name, SCALARS[field.type])
        if _repeated(field):
            size = draw(st.one_of(st.integers(0, 8), st.sampled_from([1000, 5000, 70_000])))
            if size > 8:  # a long list: one small value repeated
                item = draw(SHORT.get(field.type, values))
                getattr(msg, field.name).extend([item] * size)
            else:
                same = SHORT.get(field.type, values)  # often all well-formed, or any mix
                mix = st.one_of(st.lists(same, max_size=size), st.lists(values, max_size=size))
                getattr(msg, field.name).extend(draw(mix))
        else:
            setattr(msg, field.name, draw(values))
    return msg


@st.composite
def wire_bytes(draw: st.DrawFn, desc: pbd.Descriptor) -> bytes:
    """One request as sent: a generated message, serialized as is or damaged."""
    data = draw(messages(desc)).SerializeToString()
    how = draw(st.sampled_from(["as is"] * 4 + ["truncated", "flipped", "padded", "random"]))
    if how == "truncated" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "flipped" and data:
        flips = draw(st.lists(st.integers(0, 8 * len(data) - 1), min_size=1, max_size=8))
        out = bytearray(data)
        for bit in flips:
            out[bit // 8] ^= 1 << (bit % 8)
        return bytes(out)
    if how == "padded":
        return data + draw(st.binary(min_size=1, max_size=64))
    if how == "random":
        return draw(st.binary(max_size=512))
    return data


class CutOff(Exception):
    """Raised by a request iterator to end a client stream part-way."""


def send(
    channel: grpc.Channel, method: pbd.MethodDescriptor, requests: list[bytes], cut: bool
) -> str:
    """Send `requests` (one for a unary request) to `method`; the status code's name."""
    path = f"/{SERVICE.full_name}/{method.name}"
    kind = ("stream" if method.client_streaming else "unary") + "_"
    kind += "stream" if method.server_streaming else "unary"
    call = getattr(channel, kind)(
        path, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )

    def stream() -> Iterator[bytes]:
        yield from requests
        if cut:
            raise CutOff

    try:
        if method.client_streaming:
            call(stream(), timeout=RPC_TIMEOUT)
        elif method.server_streaming:
            responses = call(requests[0], timeout=RPC_TIMEOUT)
            for _ in responses:
                if method.name in ENDLESS:  # its first message: the stream is up
                    responses.cancel()
                    break
        else:
            call(requests[0], timeout=RPC_TIMEOUT)
    except grpc.RpcError as exc:
        code = exc.code()
        if code in BROKEN and not (cut and code == grpc.StatusCode.UNKNOWN):
            raise AssertionError(
                f"{method.name} got {code.name}: {exc.details()} for {[r[:60] for r in requests]}"
            ) from None
        return str(code.name)
    return "OK"


# ------------------------------------------------------------------ the server


class Stored:
    """Pinned values in a namespace no fuzz request names, and their digests."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.keys = [bytes([i]) * 32 for i in range(1, 13)]
        # 12 values of 8 MiB: more than the 64 MiB cpu tier holds, so some live on ssd.
        tensors = [random_tensor((4096, 1024), torch.float16, seed=i) for i in range(12)]
        with server.client(KNOWN_NS, timeout=60) as c:
            for k, t in zip(self.keys, tensors, strict=True):
                c.put(k, t)
            assert c.pin(self.keys) == len(self.keys)
            tiers = {t.name for t in c.stats().tiers.values() if t.entries}
        assert {"cpu", "ssd"} <= tiers, tiers
        self.digests = self.read()

    def read(self) -> list[int]:
        with self.server.client(KNOWN_NS, timeout=60) as c:
            values = c.batch_get(self.keys)
        assert all(v is not None for v in values), "a stored value is gone"
        return [xxhash.xxh3_64_intdigest(v.numpy().tobytes()) for v in values if v is not None]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Stored]]:
    data = tmp_path_factory.mktemp("fuzz") / "srv"
    data.mkdir()
    # Small bounds on list lengths and leases, so the long repeated fields cross them.
    server = ServerProcess(
        data, "--cpu-bytes", "64MiB", "--ssd-bytes", "512MiB", "--max-value-bytes", "16MiB",
        "--max-keys-per-request", "256", "--max-leases", "1024",
    ).start()  # fmt: skip
    try:
        stored = Stored(server)
        yield server, stored
        assert server.alive(), f"the server died:\n{server.log()[-4000:]}"
        assert stored.read() == stored.digests, "stored data changed under the fuzzing"
        probe = random_tensor((64, 64), torch.bfloat16, seed=99)
        with server.client("fuzz/after", timeout=30) as c:
            c.put(b"\x7f" * 32, probe)
            got = c.get(b"\x7f" * 32)
            assert got is not None and torch.equal(got.view(torch.int16), probe.view(torch.int16))
    finally:
        server.stop()


@pytest.mark.parametrize("name", [m.name for m in SERVICE.methods])
def test_every_malformed_request_gets_a_status(
    fuzzed: tuple[ServerProcess, Stored], name: str
) -> None:
    server, _ = fuzzed
    method = SERVICE.methods_by_name[name]
    codes: dict[str, int] = {}

    with grpc.insecure_channel(server.address) as channel:

        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(
            requests=st.lists(wire_bytes(method.input_type), min_size=1, max_size=4)
            if method.client_streaming
            else wire_bytes(method.input_type).map(lambda b: [b]),
            cut=st.booleans() if method.client_streaming else st.just(False),
        )
        def fuzz(requests: list[bytes], cut: bool) -> None:
            code = send(channel, method, requests, cut)
            codes[code] = codes.get(code, 0) + 1

        fuzz()
    print(name, codes)  # shown with -s: what the requests exercised
    # Hypothesis ran (nearly) every example: 15 methods x 700 is over 10,000 requests.
    assert sum(codes.values()) >= EXAMPLES * 0.9, codes
    assert set(codes) != {"OK"} or name in ("Stats", "Renew", "Release"), codes
    assert server.alive(), f"{name} killed the server:\n{server.log()[-4000:]}"


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def test_random_bytes_on_the_socket(fuzzed: tuple[ServerProcess, Stored]) -> None:
    server, _ = fuzzed

    @settings(max_examples=200, derandomize=True, deadline=None, database=None)
    @given(junk=st.binary(min_size=1, max_size=4096), preface=st.booleans())
    def garbage(junk: bytes, preface: bool) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(server.socket))
            try:
                s.sendall((H2_PREFACE if preface else b"") + junk)
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):  # the server answers, then hangs up
                    pass
            except (BrokenPipeError, ConnectionResetError):
                pass  # it hung up first

    garbage()
    assert server.alive(), f"garbage on the socket killed the server:\n{server.log()[-4000:]}"
