"""Fast encoding of the two messages that carry value bytes: `PutPiece` and `GetPiece`.

Building a protobuf message with a 4 MiB `bytes` field and serializing it copies the bytes
twice, and parsing one copies them again; at KV-cache sizes those copies, not the socket,
bound throughput. Here the small fields go through protobuf as usual and the `data` field
is appended (encode) or sliced out as a memoryview (decode) by hand. The bytes on the wire
are ordinary protobuf: any gRPC client that uses the generated classes interoperates.

`Piece` pairs a message whose `data` is empty with the bytes that go in it.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple, TypeVar

from google.protobuf.message import DecodeError, Message

from kvstore.v1 import kvstore_pb2 as pb

M = TypeVar("M", bound=Message)

SERVICE = "kvstore.v1.KVStore"
PIECE_BYTES = 4 << 20
"""Most value bytes one message carries."""
MAX_MESSAGE_BYTES = PIECE_BYTES + (1 << 20)
"""A data piece plus its header, or a request naming many keys."""
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

READ_METHODS = ("Get", "BatchGet", "Lookup", "Exists")
"""Calls a client answers with a miss while the server is unreachable (never retried)."""

_RETRY = {
    # A restarting server refuses connections for a second or two; calls other than reads
    # try again over about 0.75 s (attempts jittered), always within the call's deadline.
    # Only a call the server never answered is retried, and a put of the same value twice
    # stores it once. Reads are not retried: a miss at once lets the engine recompute
    # rather than wait.
    "maxAttempts": 5,
    "initialBackoff": "0.05s",
    "maxBackoff": "0.4s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# RESOURCE_EXHAUSTED is not in the policy: the server's refusals carry gRPC's
# grpc-retry-pushback-ms, which gRPC's retry honours for any client that lists the code
# (tests/e2e/test_backpressure.py shows it), but our clients retry refused writes
# themselves (`Call.retry_delay`, after the same hint): gRPC replays a stream only while its
# messages fit its 256 KiB retry buffer (grpc 1.85 was seen to replay a refused put stream
# empty, then hang), and retries inside gRPC would end a call at its deadline as
# DEADLINE_EXCEEDED rather than as the typed `Overloaded`.

CLIENT_OPTIONS = [
    *GRPC_OPTIONS,
    # gRPC waits 1 s after a lost connection and up to 120 s between later tries; a store
    # back after a restart should be found within a second, so cap the wait at 1 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 1),
    (
        "grpc.service_config",
        json.dumps(
            {
                "methodConfig": [
                    {"name": [{"service": SERVICE}], "retryPolicy": _RETRY},
                    {"name": [{"service": SERVICE, "method": m} for m in READ_METHODS]},
                ]
            }
        ),
    ),
]
"""Channel options of the clients: message sizes, quick reconnection, retries."""

_DATA_FIELD = {pb.PutPiece: 3, pb.GetPiece: 5}


class Piece(NamedTuple):
    message: Any  # pb.PutPiece or pb.GetPiece, `data` left empty
    data: bytes | memoryview


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise DecodeError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def encode(piece: Piece) -> bytes:
    """Serialize `piece.message` with `piece.data` as its data field, copying data once."""
    head = piece.message.SerializeToString()
    size = memoryview(piece.data).nbytes
    if not size:
        return bytes(head)
    tag = (_DATA_FIELD[type(piece.message)] << 3) | 2
    return b"".join((head, _varint(tag), _varint(size), piece.data))


def decoder(cls: type[M]) -> Any:
    """A deserializer for `cls` returning `Piece(message_without_data, data_view)`."""
    field = _DATA_FIELD[cls]

    def decode(raw: bytes) -> Piece:
        buf = memoryview(raw)
        pos, n = 0, len(buf)
        data: memoryview = buf[0:0]
        cuts: list[tuple[int, int]] = []  # byte ranges of data fields, left out of the parse
        while pos < n:
            start = pos
            tag, pos = _read_varint(buf, pos)
            wire_type = tag & 7
            if wire_type == 0:
                _, pos = _read_varint(buf, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 2:
                length, pos = _read_varint(buf, pos)
                if tag >> 3 == field:  # repeated: the last one wins, as in protobuf
                    data = buf[pos : pos + length]
                    cuts.append((start, pos + length))
                pos += length
            elif wire_type == 5:
                pos += 4
            else:
                raise DecodeError(f"unsupported wire type {wire_type}")
            if pos > n:
                raise DecodeError("truncated message")
        if cuts:
            bounds = [0, *(i for cut in cuts for i in cut), n]
            raw = b"".join(buf[bounds[i] : bounds[i + 1]] for i in range(0, len(bounds), 2))
        return Piece(cls.FromString(raw), data)

    return decode


# The service's methods: (cardinality, request class, response class). Both the server's
# handler table and the clients' stubs are built from this one list.
METHODS: dict[str, tuple[str, type[Message], type[Message]]] = {
    "Put": ("stream_unary", pb.PutPiece, pb.PutResponse),
    "BatchPut": ("stream_unary", pb.PutPiece, pb.PutResponse),
    "Get": ("unary_stream", pb.GetRequest, pb.GetPiece),
    "BatchGet": ("unary_stream", pb.KeysRequest, pb.GetPiece),
    "Lookup": ("unary_unary", pb.KeysRequest, pb.LookupResponse),
    "Exists": ("unary_unary", pb.KeysRequest, pb.ExistsResponse),
    "Delete": ("unary_unary", pb.KeysRequest, pb.CountResponse),
    "Pin": ("unary_unary", pb.KeysRequest, pb.CountResponse),
    "Unpin": ("unary_unary", pb.KeysRequest, pb.CountResponse),
    "Reserve": ("unary_unary", pb.ReserveRequest, pb.ReserveResponse),
    "Commit": ("unary_unary", pb.CommitRequest, pb.PutResponse),
    "Release": ("unary_unary", pb.ReleaseRequest, pb.CountResponse),
    "Renew": ("unary_unary", pb.RenewRequest, pb.RenewResponse),
    "Stats": ("unary_unary", pb.StatsRequest, pb.StatsResponse),
    "List": ("unary_stream", pb.ListRequest, pb.ListResponse),
    "Watch": ("unary_stream", pb.WatchRequest, pb.WatchResponse),
    "Maps": ("unary_stream", pb.MapsRequest, pb.MapsPiece),
}


def _serializer(cls: type[Message]) -> Any:
    return encode if cls in _DATA_FIELD else cls.SerializeToString


def _deserializer(cls: type[Message]) -> Any:
    return decoder(cls) if cls in _DATA_FIELD else cls.FromString


def client_stubs(channel: Any) -> dict[str, Any]:
    """Multi-callables for every method on a `grpc` or `grpc.aio` channel."""
    return {
        name: getattr(channel, kind)(
            f"/{SERVICE}/{name}",
            request_serializer=_serializer(req),
            response_deserializer=_deserializer(resp),
        )
        for name, (kind, req, resp) in METHODS.items()
    }


def server_handler(servicer: Any, observe: Any = None) -> Any:
    """A generic handler routing every method to `servicer.<Method>` (grpc.aio coroutines),
    each wrapped by `observe(name, kind, handler)` when given (metrics, request ids).

    Requests of unary calls are parsed here rather than by gRPC, so a malformed message gets
    INVALID_ARGUMENT instead of gRPC's UNKNOWN.
    """
    import grpc

    handlers = {}
    for name, (kind, req, resp) in METHODS.items():
        behavior = getattr(servicer, name)
        if req in _DATA_FIELD:
            deserialize = _deserializer(req)  # the servicer maps its DecodeError itself
        else:
            behavior = (_parse_unary if kind == "unary_unary" else _parse_stream)(behavior, req)
            deserialize = None  # raw bytes reach the wrapper
        if observe is not None:
            behavior = observe(name, kind, behavior)
        handlers[name] = getattr(grpc, f"{kind}_rpc_method_handler")(
            behavior, request_deserializer=deserialize, response_serializer=_serializer(resp)
        )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


async def _parse_or_abort(cls: type[Message], raw: bytes, context: Any) -> Any:
    import grpc

    try:
        return cls.FromString(raw)
    except DecodeError as exc:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"malformed {cls.__name__} message: {exc}"
        )


def _parse_unary(behavior: Any, cls: type[Message]) -> Any:
    async def unary(raw: bytes, context: Any) -> Any:
        return await behavior(await _parse_or_abort(cls, raw, context), context)

    return unary


def _parse_stream(behavior: Any, cls: type[Message]) -> Any:
    async def stream(raw: bytes, context: Any) -> Any:
        async for item in behavior(await _parse_or_abort(cls, raw, context), context):
            yield item

    return stream
