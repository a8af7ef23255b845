"""Bad input against a real server: the right status, nothing stored lost, still serving.

Every test stores a known value first (`known`), sends something malformed, checks the gRPC
status code and that the message names what was wrong, and ends with `known.check()`: the
server process is alive, the known value reads back byte-exact and a normal put/get works.

Malformed requests that `KVClient` would refuse to build go through the raw generated stub
(`kvstore_pb2_grpc.KVStoreStub`), or through a channel method that sends raw bytes.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import xxhash

from kvstore.client import KVClient
from kvstore.errors import InvalidArgument
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc

from .conftest import NAMESPACE, ServerProcess
from .helpers import key, random_tensor

pytestmark = pytest.mark.timeout(120)

RPC_TIMEOUT = 10.0
KNOWN_KEY = bytes(range(32))
PROBE_KEY = b"\xee" * 32


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def same_bytes(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return (
        a is not None and a.dtype == b.dtype and a.shape == b.shape and as_bytes(a) == as_bytes(b)
    )


def xxh(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Known:
    """A value stored before the bad input; `check()` proves nothing was lost."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.tensor = random_tensor((4, 2, 16, 2, 8), torch.float16, seed=7)
        with server.client(timeout=RPC_TIMEOUT) as c:
            assert c.put(KNOWN_KEY, self.tensor) == "cpu"

    def cpu_used_bytes(self) -> int:
        with self.server.client(timeout=RPC_TIMEOUT) as c:
            return c.stats().tiers["cpu"].used_bytes

    def check(self) -> None:
        assert self.server.alive(), f"server died:\n{self.server.log()[-4000:]}"
        with self.server.client(timeout=RPC_TIMEOUT) as c:
            assert same_bytes(c.get(KNOWN_KEY), self.tensor), "the stored value was lost"
            probe = random_tensor((3, 5), torch.bfloat16, seed=11)
            c.put(PROBE_KEY, probe)
            assert same_bytes(c.get(PROBE_KEY), probe), "a normal put/get no longer works"
            assert c.delete([PROBE_KEY]) == 1


@pytest.fixture
def server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """Four 64 MiB pages of cpu tier: a reservation of another size class never has to
    evict the known value to ssd, so cpu used bytes measure exactly what a put leaves."""
    return start_server("--cpu-bytes", "256MiB", "--ssd-bytes", "256MiB")


@pytest.fixture
def known(server: ServerProcess) -> Known:
    return Known(server)


@pytest.fixture
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> kvstore_pb2_grpc.KVStoreStub:
    return kvstore_pb2_grpc.KVStoreStub(channel)


def expect_status(
    call: Callable[[], Any], code: grpc.StatusCode, *words: str, what: str = ""
) -> grpc.RpcError:
    """Run `call`, which must fail with `code` and a message containing every word."""
    try:
        result = call()
    except grpc.RpcError as exc:
        details = exc.details() or ""
        assert exc.code() == code, f"{what}: expected {code.name}, got {exc.code().name}: {details}"
        for w in words:
            assert w.lower() in details.lower(), f"{what}: {w!r} not in message {details!r}"
        return exc
    raise AssertionError(f"{what}: expected {code.name}, but the call succeeded: {result!r}")


def header(
    k: bytes,
    data: bytes,
    dtype: str = "uint8",
    shape: Sequence[int] | None = None,
    nbytes: int | None = None,
    checksum: int | None = None,
) -> pb.ValueHeader:
    return pb.ValueHeader(
        key=k,
        dtype=dtype,
        shape=[len(data)] if shape is None else list(shape),
        nbytes=len(data) if nbytes is None else nbytes,
        checksum=xxh(data) if checksum is None else checksum,
    )


def put_call(stub: kvstore_pb2_grpc.KVStoreStub, pieces: Sequence[pb.PutPiece]) -> Callable:
    return lambda: stub.Put(iter(pieces), timeout=RPC_TIMEOUT)


def visible(server: ServerProcess, k: bytes) -> bool:
    """Whether `k` is readable, by Exists and by Get (which must agree)."""
    with server.client(timeout=RPC_TIMEOUT) as c:
        present = c.exists([k])[0]
        got = c.get(k)
    assert present == (got is not None), f"Exists says {present} but Get returned {got!r}"
    return present


# ------------------------------------------------------------------ keys


def _key_calls(stub: kvstore_pb2_grpc.KVStoreStub, bad: bytes) -> dict[str, Callable]:
    data = b"\x01" * 64
    piece = pb.PutPiece(namespace=NAMESPACE, header=header(bad, data), data=data)
    keys = pb.KeysRequest(namespace=NAMESPACE, keys=[KNOWN_KEY, bad])
    return {
        "Put": put_call(stub, [piece]),
        "BatchPut": lambda: stub.BatchPut(iter([piece]), timeout=RPC_TIMEOUT),
        "Get": lambda: list(
            stub.Get(pb.GetRequest(namespace=NAMESPACE, key=bad), timeout=RPC_TIMEOUT)
        ),
        "BatchGet": lambda: list(stub.BatchGet(keys, timeout=RPC_TIMEOUT)),
        "Lookup": lambda: stub.Lookup(keys, timeout=RPC_TIMEOUT),
        "Exists": lambda: stub.Exists(keys, timeout=RPC_TIMEOUT),
        "Delete": lambda: stub.Delete(keys, timeout=RPC_TIMEOUT),
        "Pin": lambda: stub.Pin(keys, timeout=RPC_TIMEOUT),
        "Unpin": lambda: stub.Unpin(keys, timeout=RPC_TIMEOUT),
    }


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_key_of_wrong_length_is_invalid_argument(
    server: ServerProcess, known: Known, stub: kvstore_pb2_grpc.KVStoreStub, length: int
) -> None:
    bad = KNOWN_KEY[:length] if length <= 32 else KNOWN_KEY + b"\x00" * (length - 32)
    for method, call in _key_calls(stub, bad).items():
        expect_status(call, grpc.StatusCode.INVALID_ARGUMENT, "32 bytes", str(length), what=method)
    # Delete named the known key next to the bad one: the whole request was refused.
    known.check()


def test_key_of_wrong_length_from_the_client_is_invalid_argument(
    client: KVClient, known: Known
) -> None:
    for bad in (b"k" * 31, b"k" * 33):
        with pytest.raises(InvalidArgument, match="32 bytes"):
            client.put(bad, torch.zeros(4))
        with pytest.raises(InvalidArgument, match="32 bytes"):
            client.get(bad)
        with pytest.raises(InvalidArgument, match="32 bytes"):
            client.lookup([KNOWN_KEY, bad])
        with pytest.raises(InvalidArgument, match="32 bytes"):
            client.delete([KNOWN_KEY, bad])
    known.check()


# ------------------------------------------------------------------ namespaces

BAD_NAMESPACES = {
    "empty": "",
    "spaces": "my model/fp16",
    "300-chars": "m" * 300,
    "non-ascii": "modèle/ünïcode",
    "leading-dot": ".hidden",
    "nul": "model\x00a",
}


def _namespace_calls(stub: kvstore_pb2_grpc.KVStoreStub, ns: str) -> dict[str, Callable]:
    data = b"\x02" * 64
    keys = pb.KeysRequest(namespace=ns, keys=[KNOWN_KEY])
    return {
        "Put": put_call(stub, [pb.PutPiece(namespace=ns, header=header(key(1), data), data=data)]),
        "Get": lambda: list(stub.Get(pb.GetRequest(namespace=ns, key=KNOWN_KEY), timeout=10)),
        "BatchGet": lambda: list(stub.BatchGet(keys, timeout=RPC_TIMEOUT)),
        "Lookup": lambda: stub.Lookup(keys, timeout=RPC_TIMEOUT),
        "Exists": lambda: stub.Exists(keys, timeout=RPC_TIMEOUT),
        "Delete": lambda: stub.Delete(keys, timeout=RPC_TIMEOUT),
        "Pin": lambda: stub.Pin(keys, timeout=RPC_TIMEOUT),
    }


@pytest.mark.parametrize("ns", list(BAD_NAMESPACES.values()), ids=list(BAD_NAMESPACES))
def test_bad_namespace_is_invalid_argument(
    server: ServerProcess, known: Known, stub: kvstore_pb2_grpc.KVStoreStub, ns: str
) -> None:
    for method, call in _namespace_calls(stub, ns).items():
        expect_status(call, grpc.StatusCode.INVALID_ARGUMENT, "namespace", what=method)
    if ns:  # List with an empty namespace means "every namespace"
        expect_status(
            lambda: list(stub.List(pb.ListRequest(namespace=ns), timeout=RPC_TIMEOUT)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "namespace",
            what="List",
        )
    assert not visible(server, key(1))
    known.check()


@pytest.mark.parametrize("ns", ["model\n", "m" * 255 + "\n"], ids=["newline", "256-chars"])
def test_namespace_with_trailing_newline_is_invalid_argument(
    server: ServerProcess, known: Known, stub: kvstore_pb2_grpc.KVStoreStub, ns: str
) -> None:
    try:
        for method, call in _namespace_calls(stub, ns).items():
            expect_status(call, grpc.StatusCode.INVALID_ARGUMENT, "namespace", what=method)
    finally:
        known.check()


# ------------------------------------------------------------------ headers

BAD_HEADERS = {
    # name: (dtype, shape, nbytes, data sent, word the message must contain)
    "nbytes-too-small": ("float16", [4, 4], 31, b"\0" * 31, "32 bytes"),
    "nbytes-too-large": ("float16", [4, 4], 33, b"\0" * 33, "32 bytes"),
    "dtype-disagrees": ("float32", [4, 4], 32, b"\0" * 32, "64 bytes"),
    "shape-disagrees": ("float16", [4, 3], 32, b"\0" * 32, "24 bytes"),
    "unknown-dtype": ("complex64", [4], 32, b"\0" * 32, "dtype"),
    "empty-dtype": ("", [4], 4, b"\0" * 4, "dtype"),
    "negative-dimension": ("float16", [-4, 4], 32, b"\0" * 32, "negative"),
    "negative-dims-product-positive": ("uint8", [-2, -2], 4, b"\0" * 4, "negative"),
    "too-many-dimensions": ("uint8", [1] * 9, 1, b"\0", "dimensions"),
    "huge-shape": ("float64", [1 << 62, 1 << 62], 0, b"", "bytes"),
    "huge-but-consistent": ("uint8", [1 << 31, 1 << 31], 1 << 62, b"", "max-value-bytes"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS.values()), ids=list(BAD_HEADERS))
def test_header_that_does_not_describe_the_value_is_invalid_argument(
    server: ServerProcess, known: Known, stub: kvstore_pb2_grpc.KVStoreStub, case: tuple
) -> None:
    dtype, shape, nbytes, data, word = case
    for k in (key(2), KNOWN_KEY):  # a new key, and one whose old value must survive
        h = pb.ValueHeader(key=k, dtype=dtype, shape=shape, nbytes=nbytes, checksum=xxh(data))
        expect_status(
            put_call(stub, [pb.PutPiece(namespace=NAMESPACE, header=h, data=data)]),
            grpc.StatusCode.INVALID_ARGUMENT,
            word,
            what=f"Put {k.hex()[:8]}",
        )
    assert not visible(server, key(2))
    known.check()


def test_client_refuses_unstorable_values_locally(tmp_path: Path) -> None:
    # An address nobody listens on: anything but a local TypeError/ValueError would show up
    # as Unavailable.
    with KVClient(f"unix://{tmp_path}/nobody.sock", NAMESPACE, timeout=2) as c:
        with pytest.raises(TypeError, match=r"torch\.Tensor"):
            c.put(b"x" * 32, [1, 2, 3])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="complex64"):
            c.put(b"x" * 32, torch.zeros(4, dtype=torch.complex64))
        with pytest.raises(ValueError, match="bool"):
            c.put(b"x" * 32, torch.zeros(4, dtype=torch.bool))
        with pytest.raises(TypeError, match="bytes"):
            c.put("x" * 32, torch.zeros(4))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="bytes"):
            c.get("x" * 32)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="bytes"):
            c.lookup([b"x" * 32, 5])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="2 keys but 1 tensors"):
            c.batch_put([b"x" * 32, b"y" * 32], [torch.zeros(4)])


def test_client_type_errors_leave_the_server_untouched(
    server: ServerProcess, client: KVClient, known: Known
) -> None:
    with pytest.raises(TypeError):
        client.put(KNOWN_KEY, [1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="complex64"):
        client.put(KNOWN_KEY, torch.ones(4, dtype=torch.complex64))
    known.check()


# ------------------------------------------------------------------ size limit


def test_value_over_max_value_bytes_is_invalid_argument(start_server: Callable) -> None:
    srv = start_server("--cpu-bytes", "64MiB", "--ssd-bytes", "256MiB", "--max-value-bytes", "1MiB")
    known = Known(srv)
    big = random_tensor((2 << 20,), torch.uint8, seed=1)  # 2 MiB
    with srv.client(timeout=RPC_TIMEOUT) as c:
        assert c.stats().max_value_bytes == 1 << 20
        with pytest.raises(InvalidArgument, match="max-value-bytes") as ei:
            c.put(key(3), big)
        assert "1048576" in str(ei.value)
        # The limit itself is allowed.
        at_limit = random_tensor((1 << 20,), torch.uint8, seed=2)
        c.put(key(4), at_limit)
        assert same_bytes(c.get(key(4)), at_limit)
        # One byte over, announced by a header alone, is refused before any data is sent.
        with grpc.insecure_channel(srv.address) as ch:
            stub = kvstore_pb2_grpc.KVStoreStub(ch)
            h = pb.ValueHeader(key=KNOWN_KEY, dtype="uint8", shape=[(1 << 20) + 1],
                               nbytes=(1 << 20) + 1, checksum=0)  # fmt: skip
            expect_status(
                put_call(stub, [pb.PutPiece(namespace=NAMESPACE, header=h)]),
                grpc.StatusCode.INVALID_ARGUMENT,
                "max-value-bytes",
                "1048576",
            )
    assert not visible(srv, key(3))
    known.check()


def test_message_over_the_piece_limit_is_refused(
    server: ServerProcess, known: Known, stub: kvstore_pb2_grpc.KVStoreStub
) -> None:
    # Pieces carry at most 4 MiB; a client that ignores that gets a size error, not a crash.
    data = b"\x05" * (6 << 20)
    expect_status(
        put_call(stub, [pb.PutPiece(namespace=NAMESPACE, header=header(key(5), data), data=data)]),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "larger than max",
    )
    assert not visible(server, key(5))
    known.check()


# ------------------------------------------------------------------ truncated streams


def test_stream_ended_before_the_announced_bytes_stores_nothing(
    server: ServerProcess, known: Known, stub: kvstore_pb2_grpc.KVStoreStub
) -> None:
    used_before = known.cpu_used_bytes()
    data = bytes(random.Random(1).randbytes(6 << 20))  # two pieces' worth, send 1.5
    for k in (key(6), KNOWN_KEY):
        pieces = [
            pb.PutPiece(namespace=NAMESPACE, header=header(k, data), data=data[: 4 << 20]),
            pb.PutPiece(data=data[4 << 20 : 5 << 20]),
        ]
        expect_status(
            put_call(stub, pieces),
            grpc.StatusCode.INVALID_ARGUMENT,
            "ended after",
            str(5 << 20),
            str(6 << 20),
            what=f"Put {k.hex()[:8]}",
        )
    # Header alone, no data at all.
    expect_status(
        put_call(stub, [pb.PutPiece(namespace=NAMESPACE, header=header(key(6), data))]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ended after 0",
    )
    assert not visible(server, key(6))
    assert known.cpu_used_bytes() == used_before, "the reservation of a cut-off put leaked"
    known.check()


KILLED_CLIENT = """
import sys, threading
import grpc
from kvstore.v1 import kvstore_pb2 as pb, kvstore_pb2_grpc

address, namespace, key, n = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3]), int(sys.argv[4])

def pieces():
    h = pb.ValueHeader(key=key, dtype="uint8", shape=[n], nbytes=n, checksum=0)
    yield pb.PutPiece(namespace=namespace, header=h, data=b"\\x07" * (n // 4))
    yield pb.PutPiece(data=b"\\x07" * (n // 4))
    print("sent half", flush=True)
    threading.Event().wait()  # never finish: the test kills this process here

with grpc.insecure_channel(address) as ch:
    kvstore_pb2_grpc.KVStoreStub(ch).Put(pieces())
"""


def test_client_killed_mid_stream_leaves_nothing_behind(
    server: ServerProcess, known: Known, tmp_path: Path
) -> None:
    script = tmp_path / "killed_client.py"
    script.write_text(textwrap.dedent(KILLED_CLIENT))
    used_before = known.cpu_used_bytes()
    poll = server.client(timeout=RPC_TIMEOUT)

    def used() -> int:
        return poll.stats().tiers["cpu"].used_bytes

    for k in (key(7), KNOWN_KEY):
        proc = subprocess.Popen(
            [sys.executable, str(script), server.address, NAMESPACE, k.hex(), str(4 << 20)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
        )
        try:
            # The server reserves room for the value when the header arrives.
            wait_until(
                lambda p=proc: used() > used_before or p.poll() is not None,
                15,
                "the server to reserve room for the half-sent value",
            )
            assert proc.poll() is None, proc.communicate(timeout=5)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        wait_until(
            lambda: used() == used_before,
            10,
            "the cpu tier's used bytes to return to their value before the put",
        )
    poll.close()
    assert not visible(server, key(7))
    known.check()


def test_more_data_than_announced_is_invalid_argument(
    server: ServerProcess, known: Known, stub: kvstore_pb2_grpc.KVStoreStub
) -> None:
    used_before = known.cpu_used_bytes()
    data = b"\x08" * 1000
    for k in (key(8), KNOWN_KEY):
        # The excess in the header's own piece, and in a later piece.
        for pieces in (
            [pb.PutPiece(namespace=NAMESPACE, header=header(k, data), data=data + b"!")],
            [
                pb.PutPiece(namespace=NAMESPACE, header=header(k, data), data=data),
                pb.PutPiece(data=b"!"),
            ],
        ):
            expect_status(
                put_call(stub, pieces),
                grpc.StatusCode.INVALID_ARGUMENT,
                "more than",
                "1000 bytes",
                what=f"Put {k.hex()[:8]} in {len(pieces)} pieces",
            )
    assert not visible(server, key(8))
    assert known.cpu_used_bytes() == used_before
    known.check()


def test_checksum_mismatch_is_data_loss_and_stores_nothing(
    server: ServerProcess, known: Known, stub: kvstore_pb2_grpc.KVStoreStub
) -> None:
    data = bytes(random.Random(9).randbytes(5000))
    for k in (key(9), KNOWN_KEY):
        h = header(k, data, checksum=xxh(data) ^ 1)
        expect_status(
            put_call(stub, [pb.PutPiece(namespace=NAMESPACE, header=h, data=data)]),
            grpc.StatusCode.DATA_LOSS,
            "checksum",
            "nothing was stored",
            what=f"Put {k.hex()[:8]}",
        )
    assert not visible(server, key(9))
    known.check()


# ------------------------------------------------------------------ stream structure


def _two_header_pieces(first: bytes, second: bytes) -> list[pb.PutPiece]:
    a, b = b"\x0a" * 100, b"\x0b" * 200
    return [
        pb.PutPiece(namespace=NAMESPACE, header=header(first, a), data=a),
        pb.PutPiece(header=header(second, b), data=b),
    ]


def test_put_with_two_headers_is_invalid_argument(
    server: ServerProcess, known: Known, stub: kvstore_pb2_grpc.KVStoreStub
) -> None:
    expect_status(
        put_call(stub, _two_header_pieces(key(10), key(11))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BatchPut",
    )
    assert not visible(server, key(11))
    known.check()


def test_put_with_two_headers_stores_nothing(
    server: ServerProcess, known: Known, stub: kvstore_pb2_grpc.KVStoreStub
) -> None:
    try:
        expect_status(
            put_call(stub, _two_header_pieces(key(12), key(13))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "BatchPut",
        )
        # The first value of a refused Put must not be visible...
        assert not visible(server, key(12)), "a refused Put stored its first value"
        # ...nor replace what was stored under its key.
        expect_status(
            put_call(stub, _two_header_pieces(KNOWN_KEY, key(14))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "BatchPut",
        )
    finally:
        known.check()


def test_data_before_any_header_is_invalid_argument(
    server: ServerProcess, known: Known, stub: kvstore_pb2_grpc.KVStoreStub
) -> None:
    expect_status(
        put_call(stub, [pb.PutPiece(namespace=NAMESPACE, data=b"orphan")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "header",
    )
    expect_status(
        lambda: stub.BatchPut(
            iter([pb.PutPiece(namespace=NAMESPACE, data=b"orphan")]), timeout=RPC_TIMEOUT
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "header",
    )
    # An empty stream, and a header whose stream never named a namespace.
    expect_status(put_call(stub, []), grpc.StatusCode.INVALID_ARGUMENT, "no value")
    data = b"\x0c" * 10
    expect_status(
        put_call(stub, [pb.PutPiece(header=header(key(15), data), data=data)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "namespace",
    )
    assert not visible(server, key(15))
    known.check()


# ------------------------------------------------------------------ too many keys


def test_too_many_keys_is_invalid_argument_and_quick(
    server: ServerProcess, known: Known, stub: kvstore_pb2_grpc.KVStoreStub
) -> None:
    req = pb.KeysRequest(namespace=NAMESPACE, keys=[key(i) for i in range(100_000)])
    calls = {
        "Lookup": lambda: stub.Lookup(req, timeout=RPC_TIMEOUT),
        "Exists": lambda: stub.Exists(req, timeout=RPC_TIMEOUT),
        "BatchGet": lambda: list(stub.BatchGet(req, timeout=RPC_TIMEOUT)),
        "Delete": lambda: stub.Delete(req, timeout=RPC_TIMEOUT),
        "Pin": lambda: stub.Pin(req, timeout=RPC_TIMEOUT),
    }
    for method, call in calls.items():
        started = time.monotonic()
        expect_status(
            call,
            grpc.StatusCode.INVALID_ARGUMENT,
            "100000 keys",
            "16384",
            "max-keys-per-request",
            what=method,
        )
        elapsed = time.monotonic() - started
        assert elapsed < 3.0, f"{method} took {elapsed:.2f}s to refuse 100,000 keys"
    known.check()


# ------------------------------------------------------------------ garbage on the socket

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _send_raw(path: Path, payload: bytes, wait_for_close: bool = True) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            return  # the server hung up first: fine
        if not wait_for_close:
            return
        # The server must hang up on garbage rather than wait for more of it.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if not s.recv(65536):
                    return
            except ConnectionResetError:
                return
            except TimeoutError:
                break
        raise AssertionError(f"server kept a connection open after {payload[:40]!r}...")


GARBAGE = {
    "random-bytes": random.Random(42).randbytes(8192),
    "http1-request": b"GET / HTTP/1.1\r\nHost: kvstore\r\n\r\n",
    "bad-preface": b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + random.Random(1).randbytes(512),
    "preface-then-garbage": H2_PREFACE + random.Random(2).randbytes(8192),
    # A SETTINGS frame whose length (5) is not a multiple of 6: a connection error.
    "preface-then-bad-frame": H2_PREFACE + b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + b"\xff" * 5,
    "zeros": bytes(4096),
}


@pytest.mark.parametrize("payload", list(GARBAGE.values()), ids=list(GARBAGE))
def test_garbage_on_the_socket_leaves_the_server_serving(
    server: ServerProcess, known: Known, payload: bytes
) -> None:
    _send_raw(server.socket, payload)
    known.check()


def test_idle_and_half_open_connections_do_not_block_others(
    server: ServerProcess, known: Known
) -> None:
    socks = []
    try:
        for payload in (b"", H2_PREFACE[:10], H2_PREFACE):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(s)
            s.settimeout(5)
            s.connect(str(server.socket))
            if payload:
                s.sendall(payload)
        for _ in range(20):  # open and close at once
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(server.socket))
        known.check()
    finally:
        for s in socks:
            s.close()
    known.check()


# ------------------------------------------------------------------ not protobuf

JUNK = {
    "truncated-varint": b"\xff\xff\xff",
    "overlong-varint": b"\x08" + b"\xff" * 11,
    "length-past-end": b"\x0a\xff\x01abc",
    "data-length-past-end": b"\x1a\x10abc",
    "group-wire-type": b"\x0b\x0c",
    "wire-type-7": b"\x0f",
    "field-zero": b"\x00\x01",
    "bad-utf8-namespace": b"\x0a\x02\xff\xfe",
    "bad-nested-header": b"\x12\x03\x0a\xff\x00",
    "random": random.Random(3).randbytes(1000),
}


RAW_METHODS = {
    "Put": "stream_unary",
    "BatchPut": "stream_unary",
    "Get": "unary_stream",
    "BatchGet": "unary_stream",
    "Lookup": "unary_unary",
    "Exists": "unary_unary",
}


def raw_call(channel: grpc.Channel, method: str, junk: bytes) -> Callable[[], object]:
    """A call of `method` whose request is `junk`, sent as is."""
    kind = RAW_METHODS[method]
    call = getattr(channel, kind)(
        f"/kvstore.v1.KVStore/{method}",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    if kind == "stream_unary":
        return lambda: call(iter([junk]), timeout=RPC_TIMEOUT)
    if kind == "unary_stream":
        return lambda: list(call(junk, timeout=RPC_TIMEOUT))
    return lambda: call(junk, timeout=RPC_TIMEOUT)


@pytest.mark.parametrize("junk", list(JUNK.values()), ids=list(JUNK))
def test_message_that_is_not_protobuf_gets_an_error_status(
    server: ServerProcess, known: Known, channel: grpc.Channel, junk: bytes
) -> None:
    for method in RAW_METHODS:
        try:
            result = raw_call(channel, method, junk)()
        except grpc.RpcError as exc:
            # The call is refused with a status; a server that died would be UNAVAILABLE.
            assert exc.code() not in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), (
                f"{method}: {exc.code().name}: {exc.details()}"
            )
        else:
            raise AssertionError(f"{method} accepted junk {junk[:20]!r}: {result!r}")
        assert server.alive(), f"{method} with junk killed the server:\n{server.log()[-4000:]}"
    known.check()


@pytest.mark.parametrize("junk", ["truncated-varint", "bad-utf8-namespace"])
@pytest.mark.parametrize("method", ["Put", "Get", "Lookup"])
def test_message_that_is_not_protobuf_is_invalid_argument(
    server: ServerProcess, known: Known, channel: grpc.Channel, method: str, junk: str
) -> None:
    try:
        expect_status(raw_call(channel, method, JUNK[junk]), grpc.StatusCode.INVALID_ARGUMENT)
    finally:
        known.check()


# ------------------------------------------------------------------ explicit bounds (issue 9)


@pytest.fixture
def bounded(start_server: Callable[..., ServerProcess]) -> tuple[ServerProcess, Known]:
    """A server with small bounds on keys per request and leases held, and a quota."""
    srv = start_server(
        "--cpu-bytes", "256MiB", "--ssd-bytes", "256MiB", "--max-keys-per-request", "4",
        "--max-leases", "8", "--quota", "cpu[test/*]=32MiB", "--quota", "ssd[test/*]=2MiB",
        name="bounded",
    )  # fmt: skip
    return srv, Known(srv)


def test_batch_put_of_more_values_than_the_key_bound(bounded: tuple[ServerProcess, Known]) -> None:
    srv, known = bounded
    data = b"\x05" * 16
    pieces = [
        pb.PutPiece(
            namespace=NAMESPACE if i == 0 else "", header=header(key(40 + i), data), data=data
        )
        for i in range(5)
    ]
    with grpc.insecure_channel(srv.address) as ch:
        stub = kvstore_pb2_grpc.KVStoreStub(ch)
        expect_status(
            lambda: stub.BatchPut(iter(pieces), timeout=RPC_TIMEOUT),
            grpc.StatusCode.INVALID_ARGUMENT,
            "5 values",
            "at most 4",
            "max-keys-per-request",
        )
    # The values before the bound were stored (a stream is committed value by value); the
    # one past it was not.
    assert visible(srv, key(43)) and not visible(srv, key(44))
    known.check()


def test_value_in_too_many_pieces(server: ServerProcess, known: Known, stub: Any) -> None:
    n = (1 << 16) + 1
    data = bytes(range(256)) * (n // 256 + 1)
    data = data[:n]

    def pieces() -> Iterator[pb.PutPiece]:
        yield pb.PutPiece(namespace=NAMESPACE, header=header(key(50), data))
        for i in range(n):
            yield pb.PutPiece(data=data[i : i + 1])

    expect_status(
        lambda: stub.Put(pieces(), timeout=60),
        grpc.StatusCode.INVALID_ARGUMENT,
        "more than 65536 pieces",
    )
    assert not visible(server, key(50))
    known.check()


def test_read_requests_with_too_long_id_lists(
    server: ServerProcess, known: Known, stub: Any
) -> None:
    many = list(range(1, 66))
    calls = {
        "Get pools": lambda: list(
            stub.Get(
                pb.GetRequest(namespace=NAMESPACE, key=KNOWN_KEY, gpu_pools=many),
                timeout=RPC_TIMEOUT,
            )
        ),
        "Get codecs": lambda: list(
            stub.Get(
                pb.GetRequest(namespace=NAMESPACE, key=KNOWN_KEY, codecs=many), timeout=RPC_TIMEOUT
            )
        ),
        "BatchGet pools": lambda: list(
            stub.BatchGet(
                pb.KeysRequest(namespace=NAMESPACE, keys=[KNOWN_KEY], gpu_pools=many),
                timeout=RPC_TIMEOUT,
            )
        ),
    }
    for what, call in calls.items():
        word = "gpu pools" if "pools" in what else "codecs"
        expect_status(call, grpc.StatusCode.INVALID_ARGUMENT, f"65 {word}", "at most 64", what=what)
    known.check()


def test_lease_id_lists_longer_than_max_leases(bounded: tuple[ServerProcess, Known]) -> None:
    srv, known = bounded
    ids = list(range(1, 10))
    with grpc.insecure_channel(srv.address) as ch:
        stub = kvstore_pb2_grpc.KVStoreStub(ch)
        calls = {
            "Commit ids": lambda: stub.Commit(pb.CommitRequest(ids=ids), timeout=RPC_TIMEOUT),
            "Commit abort": lambda: stub.Commit(
                pb.CommitRequest(abort_calls=ids), timeout=RPC_TIMEOUT
            ),
            "Release": lambda: stub.Release(pb.ReleaseRequest(leases=ids), timeout=RPC_TIMEOUT),
            "Release calls": lambda: stub.Release(
                pb.ReleaseRequest(calls=ids), timeout=RPC_TIMEOUT
            ),
            "Renew": lambda: stub.Renew(pb.RenewRequest(calls=ids), timeout=RPC_TIMEOUT),
        }
        for what, call in calls.items():
            expect_status(
                call, grpc.StatusCode.INVALID_ARGUMENT, "9 ", "at most 8", "max-leases", what=what
            )
    known.check()


def test_value_larger_than_its_quota_is_resource_exhausted_never_retried(
    bounded: tuple[ServerProcess, Known],
) -> None:
    srv, known = bounded
    data = b"\x09" * (3 << 20)  # over the ssd quota, and forced past the cpu one below
    with grpc.insecure_channel(srv.address) as ch:
        stub = kvstore_pb2_grpc.KVStoreStub(ch)
        fill = b"\x0a" * (31 << 20)  # the group's cpu quota is 32 MiB: this leaves 1 MiB
        first = [pb.PutPiece(namespace="test/fill", header=header(key(60), fill))]
        rest = [pb.PutPiece(data=fill[o : o + (4 << 20)]) for o in range(0, len(fill), 4 << 20)]
        stub.Put(iter(first + rest), timeout=RPC_TIMEOUT)
        assert (
            stub.Pin(
                pb.KeysRequest(namespace="test/fill", keys=[key(60)]), timeout=RPC_TIMEOUT
            ).count
            == 1
        )
        exc = expect_status(
            put_call(
                stub, [pb.PutPiece(namespace=NAMESPACE, header=header(key(61), data), data=data)]
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "larger than the quota ssd[test/*]=2097152",
        )
        meta = dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
        assert meta.get("grpc-retry-pushback-ms") == "-1"  # a retry cannot help
    assert not visible(srv, key(61))
    with srv.client(timeout=RPC_TIMEOUT) as c:
        used = c.stats().quotas
    assert used["cpu[test/*]"] == (31 << 20, 32 << 20)  # the pinned fill; the known value
    assert used["ssd[test/*]"][0] <= 2 << 20  # may have been demoted to make room for it
    known.check()


def test_long_strings_get_short_messages(server: ServerProcess, known: Known, stub: Any) -> None:
    data = b"\x01" * 8
    long_dtype = "x" * (1 << 20)
    exc = expect_status(
        put_call(
            stub,
            [
                pb.PutPiece(
                    namespace=NAMESPACE, header=header(key(70), data, dtype=long_dtype), data=data
                )
            ],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown dtype",
    )
    assert len(exc.details() or "") < 1024
    exc = expect_status(
        lambda: stub.Lookup(
            pb.KeysRequest(namespace="n" * (1 << 20), keys=[KNOWN_KEY]), timeout=RPC_TIMEOUT
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "namespace",
    )
    assert len(exc.details() or "") < 1024
    known.check()


def test_position_past_the_bound_is_invalid_argument(
    server: ServerProcess, known: Known, stub: kvstore_pb2_grpc.KVStoreStub
) -> None:
    """A value's position (`ValueHeader.position`) beyond 2^40 is refused by Put, BatchPut
    and Reserve alike; nothing stored is lost and the server keeps serving."""
    data = b"x" * 64
    h = header(key(7), data)
    h.position = 1 << 41
    piece = pb.PutPiece(namespace=NAMESPACE, header=h, data=data)
    calls = {
        "Put": put_call(stub, [piece]),
        "BatchPut": lambda: stub.BatchPut(iter([piece]), timeout=RPC_TIMEOUT),
        "Reserve": lambda: stub.Reserve(
            pb.ReserveRequest(namespace=NAMESPACE, values=[h], call=1), timeout=RPC_TIMEOUT
        ),
    }
    for method, call in calls.items():
        expect_status(call, grpc.StatusCode.INVALID_ARGUMENT, "position", "2^40", what=method)
    assert not visible(server, key(7))
    known.check()
