"""The client's protocol logic, shared by `KVClient` and `AsyncKVClient`.

Each operation is a generator (`Op`) that yields the gRPC calls it needs as `Call` objects
and receives their results; it never does I/O itself. The sync client drives it with
blocking stubs, the async client with `grpc.aio` stubs, so request building, streaming in
pieces, checksums and tensor reassembly exist once.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import grpc
import numpy as np
import torch

from kvstore.client._shared import ArenaMap, PoolMap, Region, open_pools
from kvstore.client._transfer import (
    LEASE_MARGIN,
    BlockRefs,
    Containers,
    GetLanding,
    Hashing,
    Header,
    PutLanding,
    Slice,
    gpu_hashing,
    gpu_memory_errors,
    hash_pool,
    private_buffer,
    raise_unrecoverable,
    reserve_parts,
    tensors_of,
    torch_stream,
)
from kvstore.codecs.base import codec_ids, gpu_decodable_codecs
from kvstore.codecs.container import checksum
from kvstore.dtypes import BY_NAME, dtype_name, expected_nbytes
from kvstore.errors import (
    DataLoss,
    InvalidArgument,
    KVStoreError,
    NotFound,
    Overloaded,
    Unavailable,
)
from kvstore.kernels import checksum as checksum_kernels
from kvstore.kernels.blocks import DeviceBuffer
from kvstore.keys import MAX_POSITION, chunk_keys
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire import PIECE_BYTES, READ_METHODS, Piece

T = TypeVar("T")
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
log = logging.getLogger("kvstore.client")
BACKGROUND_TIMEOUT_S = 30.0
_PARALLEL_HASH = 1 << 20  # values from this size are hashed beside their copy


@dataclass
class Call:
    """One RPC an operation needs: unary or client-streaming unless `sink` is set.

    A call with `wait=False` is started and not waited for; the operation gets None. It
    runs under `BACKGROUND_TIMEOUT_S`, not the client's timeout: releasing leases must not
    fail because the call that took them ran out of time.
    """

    method: str
    request: Any
    sink: Callable[[Any], None] | None = None
    wait: bool = True
    refused: Overloaded | None = field(default=None, repr=False)  # the last refusal retried

    def fresh_request(self) -> Any:
        """The request to send on this attempt: a stream of pieces is made anew each time."""
        return iter(self.request) if isinstance(self.request, PutPieces) else self.request

    def retry_delay(self, exc: BaseException, deadline: float | None) -> float | None:
        """Seconds to wait before sending this call again after `exc`, or None to let `exc`
        stand. Only a write the server refused by back-pressure (`Overloaded`: nothing was
        done) is tried again, after the server's hint, while that leaves time before the
        call's `deadline` (time.monotonic()). Reads are not: they report a miss instead."""
        if not isinstance(exc, Overloaded) or self.method in READ_METHODS or not self.wait:
            return None
        delay = exc.retry_after_s
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        log.debug("kvstore server busy; %s again in %.0f ms", self.method, delay * 1000)
        self.refused = exc
        return delay

    def give_up(self, exc: KVStoreError) -> NoReturn:
        """Raise the error that ends this call's attempts, `exc`; but when an attempt sent
        again after a refusal runs out of the call's deadline (on a loaded machine its own
        round trip can outlast what was left), the refusal that kept the write from being
        done, not DEADLINE_EXCEEDED: `Overloaded` says why, and that nothing was stored."""
        if self.refused is not None and getattr(exc, "code", None) == DEADLINE:
            raise self.refused from exc
        raise exc


# How long an engine's best-effort save (StoreCache, the vLLM connector) keeps sending writes
# the server refuses by back-pressure: a few of its hints (50 ms and up), not the client's
# whole timeout. The engine waits for its saves (before its next load, at the end of a
# step), and a save given up is only a future miss.
SAVE_RETRY_S = 0.25


def earliest(deadline: float | None, other: float | None) -> float | None:
    """The earlier of two optional time.monotonic() deadlines (None: no deadline)."""
    if deadline is None:
        return other
    return deadline if other is None else min(deadline, other)


def retry_deadline(retry_for: float | None) -> float | None:
    """The time.monotonic() after which a refused write is no longer sent again, for a
    `retry_for` budget in seconds (None: none of its own)."""
    if retry_for is None:
        return None
    if not retry_for >= 0:
        raise InvalidArgument(f"retry_for must be a number of seconds >= 0, got {retry_for}")
    return time.monotonic() + retry_for


@dataclass
class Block:
    """Local blocking work an operation needs done between calls (waiting for a GPU copy,
    checksums of large values): the async client runs it on a worker thread."""

    fn: Callable[[], Any]


Op = Generator[Call | Block, Any, T]


@dataclass
class TierStats:
    name: str
    entries: int
    used_bytes: int
    capacity_bytes: int
    hits: int
    misses: int
    evictions: int
    promotions: int
    demotions: int


@dataclass(frozen=True)
class PrefixTiers:
    """What `lookup_tiers` found: the tier holding each chunk of the longest cached
    prefix, in order ("gpu", "cpu" or "ssd" on the server's node, "remote" in the shared
    remote tier past the node's own prefix)."""

    tiers: tuple[str, ...] = ()

    @property
    def length(self) -> int:
        """Chunks in the prefix: what `lookup` returns."""
        return len(self.tiers)

    @property
    def local(self) -> int:
        """Chunks of the prefix the node holds itself (the rest must come over the network
        from the remote tier: the engine may prefer to recompute them)."""
        return sum(t != "remote" for t in self.tiers)


@dataclass
class ServerStats:
    version: str
    chunk_tokens: int
    max_value_bytes: int
    max_keys_per_request: int
    entries: int
    pinned: int
    leases: int
    uptime_seconds: float
    host_arena_path: str
    host_arena_dev: int
    host_arena_ino: int
    lease_seconds: float
    tiers: dict[str, TierStats] = field(default_factory=dict)
    # The gpu tier's pools (kvstore.v1.GpuPool), for same-host clients to map.
    gpu_pools: list[pb.GpuPool] = field(default_factory=list)
    # By codec name ("raw": stored as is): (bytes before, bytes after) the ssd tier's writes.
    codecs: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Per --quota rule ("cpu[tenant-a/*]"): (bytes its namespaces hold there, its quota).
    quotas: dict[str, tuple[int, int]] = field(default_factory=dict)
    max_inflight_requests: int = 0
    max_inflight_bytes: int = 0
    # The remote tier's counters (kvstore.v1.RemoteStats); None: the server has none.
    remote: pb.RemoteStats | None = None

    @classmethod
    def from_proto(cls, m: pb.StatsResponse) -> ServerStats:
        tiers = {
            t.name: TierStats(
                t.name,
                t.entries,
                t.used_bytes,
                t.capacity_bytes,
                t.hits,
                t.misses,
                t.evictions,
                t.promotions,
                t.demotions,
            )
            for t in m.tiers
        }
        return cls(
            m.version,
            m.chunk_tokens,
            m.max_value_bytes,
            m.max_keys_per_request,
            m.entries,
            m.pinned,
            m.leases,
            m.uptime_seconds,
            m.host_arena_path,
            m.host_arena_dev,
            m.host_arena_ino,
            m.lease_seconds,
            tiers,
            list(m.gpu_pools),
            {c.name: (c.raw_bytes, c.encoded_bytes) for c in m.codecs},
            {f"{q.tier}[{q.namespaces}]": (q.used_bytes, q.quota_bytes) for q in m.quotas},
            m.max_inflight_requests,
            m.max_inflight_bytes,
            m.remote if m.HasField("remote") else None,
        )


def _check_outgoing(key: bytes, tensor: torch.Tensor) -> str:
    """Validate one value before any byte is sent; returns its wire dtype name."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if not isinstance(key, bytes | bytearray | memoryview):
        raise TypeError(f"keys are bytes, got {type(key).__name__}")
    name = dtype_name(tensor)
    if name not in BY_NAME:
        raise InvalidArgument(
            f"dtype {name} cannot be stored; use one of {', '.join(sorted(BY_NAME))}"
        )
    return name


def _host_value(
    key: bytes,
    tensor: torch.Tensor,
    name: str,
    cost: float = 0.0,
    newest: bool = False,
    position: int | None = None,
) -> tuple[pb.ValueHeader, memoryview]:
    """A checked value's header and its bytes, contiguous in host memory (the memoryview
    keeps the host copy alive)."""
    t = tensor.detach().to("cpu").contiguous()
    flat = t.reshape(-1).view(torch.uint8)
    data = flat.numpy().data if flat.numel() else memoryview(b"")
    header = pb.ValueHeader(
        key=bytes(key),
        dtype=name,
        shape=t.shape,
        nbytes=len(data),
        checksum=checksum(data),
        cost=cost,
        newest=newest,
        position=position,
    )
    return header, data


def _newest_keys(newest: Sequence[bytes], keys: Sequence[bytes]) -> frozenset[bytes]:
    """`newest` (keys of a put's values marked as the newest chunks of their sequences) as a
    set, each checked to be one of the put's `keys`."""
    marked = frozenset(bytes(k) for k in newest)
    stray = marked - {bytes(k) for k in keys}
    if stray:
        raise InvalidArgument(f"newest names a key this put does not store: {min(stray).hex()}")
    return marked


def _positions(positions: Mapping[bytes, int] | None, keys: Sequence[bytes]) -> dict[bytes, int]:
    """`positions` (a put's values' first-token positions in their sequences, by key), each
    checked to name one of the put's `keys` and to be a position."""
    out: dict[bytes, int] = {}
    for k, p in (positions or {}).items():
        if isinstance(p, bool) or not isinstance(p, int | np.integer) or not 0 <= p < MAX_POSITION:
            raise InvalidArgument(
                f"position of {bytes(k).hex()} must be an int in [0, 2^40), got {p!r}"
            )
        out[bytes(k)] = int(p)
    stray = set(out) - {bytes(k) for k in keys} if out else set()
    if stray:
        raise InvalidArgument(f"positions names a key this put does not store: {min(stray).hex()}")
    return out


def first_newest_chunk(n_tokens: int, chunk_tokens: int) -> int:
    """Of the chunks of a prefix of `n_tokens` tokens (a partial one last), the index of the
    first of its newest: the last whole chunk, which a longer prompt's new tokens follow and
    attend to most, and the partial one after it (for the same prompt again)."""
    return max(n_tokens // chunk_tokens - 1, 0)


HEADER_ALONE_BYTES = 64 << 10
"""Values larger than this are streamed with their header in a piece of its own."""


@dataclass
class PutPieces:
    """The pieces of a (Batch)Put of checked (key, tensor, dtype name) triples, made anew
    by each iteration (a call the server refused is sent again). Each tensor is made
    contiguous on the host only when its turn comes, so a batch never holds more than one
    extra copy."""

    namespace: str
    values: Sequence[tuple[bytes, torch.Tensor, str]]
    cost: float = 0.0
    newest: frozenset[bytes] = frozenset()  # keys of the newest chunks of their sequences
    positions: Mapping[bytes, int] = field(default_factory=dict)  # first tokens' positions

    def __iter__(self) -> Iterator[Piece]:
        for i, (key, tensor, name) in enumerate(self.values):
            k = bytes(key)
            header, data = _host_value(
                key, tensor, name, self.cost, k in self.newest, self.positions.get(k)
            )
            n = len(data)
            # A large value's header goes alone: a server at its bytes bound refuses the
            # value before any of its data is in flight (gRPC has buffered none of it).
            first = 0 if n > HEADER_ALONE_BYTES else n
            head = pb.PutPiece(namespace=self.namespace if i == 0 else "", header=header)
            yield Piece(head, data[:first])
            for off in range(first, n, PIECE_BYTES):
                yield Piece(pb.PutPiece(), data[off : off + PIECE_BYTES])


class _Assembler:
    """Collects a `BatchGet` stream into tensors, verifying sizes and checksums.

    Values sent as SharedSlices are copied out of `arena` and checked here, since the server
    leaves that check to the reader; their leases are collected in `leases` for the caller
    to release, and those whose bytes failed the check in `corrupt`. A slice of an arena
    other than `arena` (the server restarted) sets `stale`.
    """

    def __init__(
        self,
        count: int,
        arena: ArenaMap | None = None,
        keep_shared: bool = False,
        pools: dict[int, Region] | None = None,
        decoders: frozenset[int] = frozenset(),
    ) -> None:
        self.arena = arena
        # Codec ids asked to come as containers (GetRequest.codecs): kept in `containers`
        # (position -> header, container bytes) for the caller to decode.
        self.decoders = decoders
        self.containers: Containers = {}
        self._encoded = False
        self.pools = pools or {}  # gpu pools mapped here (slices kept, never copied)
        # With keep_shared, shared slices are recorded in `shared` (position -> slice), not
        # copied or checked: the caller reads them in place.
        self.keep_shared = keep_shared
        self.shared: dict[int, Slice] = {}
        self.headers: list[Header | None] = [None] * count
        self.leases: list[int] = []
        self.corrupt: list[int] = []
        self.corrupt_keys: list[int] = []  # request positions of those
        self.stale = False
        self.values: list[torch.Tensor | None] = [None] * count
        self.tiers: list[str | None] = [None] * count
        self._index = -1
        self._buf: np.ndarray | None = None
        self._filled = 0
        self._verified = False  # a shared copy is checked as soon as it is made
        self._header: pb.ValueHeader | None = None

    def __call__(self, received: Piece) -> None:
        piece, data = received
        if piece.batch:
            for entry in piece.batch:
                self(Piece(entry, b""))
            return
        if piece.HasField("slices"):
            self._finish()
            self._index = -1
            self._take_table(piece.slices)
            return
        if piece.index != self._index:
            self._finish()
            if not 0 <= piece.index < len(self.values):
                raise DataLoss(f"server sent a value for key #{piece.index} it was not asked for")
            self._index = piece.index
            if not piece.found:
                return
            h = piece.header
            want = expected_nbytes(h.dtype, h.shape)
            if want != h.nbytes:
                raise DataLoss(f"server header for key #{piece.index} is inconsistent")
            self._header = h
            header = self.headers[piece.index] = Header.of(h)
            self.tiers[piece.index] = piece.tier
            if piece.HasField("shared"):
                ref = piece.shared
                self.leases.append(ref.lease)
                region = self.pools.get(ref.gpu_pool) if ref.gpu_pool else self.arena
                if region is None or not region.holds(
                    ref.arena_dev, ref.arena_ino, ref.offset, h.nbytes
                ):
                    self.stale = True  # mapped before the server restarted
                    self._header = None
                    return
                if self.keep_shared:
                    self.shared[piece.index] = Slice(header, ref.offset, ref.lease, ref.gpu_pool)
                    self._header = None
                    return
                arena = self.arena
                if ref.gpu_pool or arena is None:
                    raise DataLoss("server sent a gpu pool slice to a read that maps none")
                # A large value is hashed in place on another core while this one copies it.
                src = arena.array()[ref.offset : ref.offset + h.nbytes].data
                digest = hash_pool().submit(checksum, src) if h.nbytes >= _PARALLEL_HASH else None
                buf = arena.copy(ref.offset, h.nbytes)
                if (digest.result() if digest else checksum(buf.data)) != h.checksum:
                    self.corrupt.append(ref.lease)
                    self.corrupt_keys.append(piece.index)
                    self._header = None
                    return
                self._buf, self._filled, self._verified = buf, h.nbytes, True
                return
            if piece.encoded_nbytes:
                if not self.decoders:
                    raise DataLoss(f"server sent key #{piece.index} encoded, unasked")
                if piece.encoded_nbytes > max(2 * h.nbytes, 1 << 20):
                    raise DataLoss(f"server sent an oversized container for key #{piece.index}")
                # Checked when decoded: a container carries its own checksums.
                self._buf = np.empty(piece.encoded_nbytes, dtype=np.uint8)
                self._filled, self._verified, self._encoded = 0, True, True
            else:
                self._buf = np.empty(h.nbytes, dtype=np.uint8)
                self._filled, self._verified, self._encoded = 0, False, False
        if self._buf is None:
            raise DataLoss(f"server sent data for missing key #{piece.index}")
        n = len(data)
        if self._filled + n > len(self._buf):
            raise DataLoss(f"server sent too many bytes for key #{piece.index}")
        self._buf[self._filled : self._filled + n] = np.frombuffer(data, dtype=np.uint8)
        self._filled += n

    def _take_table(self, t: pb.SliceTable) -> None:
        """Record the shared slices of a packed answer (KeysRequest.packed), every column
        checked as a per-key answer's fields would be."""
        if not self.keep_shared:
            raise DataLoss("server sent a slice table to a read that asked for none")
        n = len(t.index)
        columns = (t.lease, t.offset, t.gpu_pool, t.nbytes, t.checksum, t.dtype, t.rank, t.tier)
        if any(len(c) != n for c in columns) or sum(t.rank) != len(t.dims):
            raise DataLoss("server sent a slice table whose columns disagree")
        named: dict[int, tuple[Region | None, int, int]] = {}
        for r in t.regions:
            region = self.pools.get(r.gpu_pool) if r.gpu_pool else self.arena
            named[r.gpu_pool] = (region, r.arena_dev, r.arena_ino)
        dtypes, tiers, dims = list(t.dtypes), list(t.tiers), list(t.dims)
        sizes: dict[tuple[int, tuple[int, ...]], int] = {}
        at = 0
        for i, lease, offset, pool, nbytes, digest, kind, rank, tier in zip(
            t.index,
            t.lease,
            t.offset,
            t.gpu_pool,
            t.nbytes,
            t.checksum,
            t.dtype,
            t.rank,
            t.tier,
            strict=True,
        ):
            shape = tuple(dims[at : at + rank])
            at += rank
            if not 0 <= i < len(self.values) or kind >= len(dtypes) or tier >= len(tiers):
                raise DataLoss(f"server sent a slice table entry for key #{i} out of range")
            size = sizes.get((kind, shape))
            if size is None:
                size = sizes[kind, shape] = expected_nbytes(dtypes[kind], shape)
            if size != nbytes:
                raise DataLoss(f"server header for key #{i} is inconsistent")
            if pool not in named:
                raise DataLoss(f"server sent key #{i} in a region it did not identify")
            self.leases.append(lease)
            region, dev, ino = named[pool]
            if region is None or not region.holds(dev, ino, offset, nbytes):
                self.stale = True  # mapped before the server restarted
                continue
            self.tiers[i] = tiers[tier]
            header = self.headers[i] = Header(dtypes[kind], shape, nbytes, digest)
            self.shared[i] = Slice(header, offset, lease, pool)

    def _finish(self) -> None:
        if self._buf is None or self._header is None:
            return
        h, buf = self._header, self._buf
        self._buf, self._header = None, None
        if self._filled != len(buf):
            raise DataLoss(f"value for key #{self._index} ended after {self._filled} bytes")
        if self._encoded:
            self.containers[self._index] = (h, buf)
            return
        if not self._verified and checksum(buf.data) != h.checksum:
            raise DataLoss(f"value for key #{self._index} failed its checksum in transit")
        dtype = getattr(torch, h.dtype)
        shape = tuple(h.shape)
        self.values[self._index] = (
            torch.from_numpy(buf).view(dtype).reshape(shape)
            if len(buf)
            else torch.empty(shape, dtype=dtype)
        )

    def result(self) -> list[torch.Tensor | None]:
        self._finish()
        return self.values

    def missing_maps(self) -> dict[str, set[int]]:
        """The cross-layer maps that containers received name and this process has not
        loaded (`MissingContext`): digest -> the codec ids of those containers."""
        from kvstore.codecs.base import codec_by_id
        from kvstore.codecs.container import ContainerError, MissingContext, decode_header

        out: dict[str, set[int]] = {}
        for _, buf in self.containers.values():
            try:
                header, _ = decode_header(buf.data)
                codec_by_id(header.codec, header.param_dict())
            except MissingContext as exc:
                out.setdefault(exc.maps, set()).add(header.codec)
            except ContainerError:
                pass  # reported when it is decoded
        return out


def _failed_checksums(regions: dict[int, Region], slices: dict[int, Slice]) -> list[int]:
    """Leases of the slices whose bytes fail their checksum: hashed in parallel on host
    threads, or on their GPU for slices of a gpu pool."""
    hashing = Hashing()
    on_gpu: dict[int, list[Slice]] = {}
    for i, s in slices.items():
        view = regions[s.pool].array()
        if view is not None:
            hashing.add(i, view[s.span].data)
        else:
            on_gpu.setdefault(s.pool, []).append(s)
    hashing.submit()
    bad = []
    for pool, group in on_gpu.items():
        m = regions[pool]
        assert isinstance(m, PoolMap)
        small = [s for s in group if checksum_kernels.needs_cpu(s.header.nbytes)]
        large = [s for s in group if not checksum_kernels.needs_cpu(s.header.nbytes)]
        for s in small:
            if checksum(m.copy(s.offset, s.header.nbytes).data) != s.header.checksum:
                bad.append(s.lease)
        if large:
            ordinal = m.device.index
            buffers = [DeviceBuffer(m.address + s.offset, s.header.nbytes, ordinal) for s in large]
            got = checksum_kernels.xxh3_64_gpu(buffers, ordinal).result()
            bad += [s.lease for s, d in zip(large, got, strict=True) if d != s.header.checksum]
    return bad + [slices[i].lease for i, d in hashing.results() if d != slices[i].header.checksum]


def _shifted(sink: Callable[[Piece], None], base: int) -> Callable[[Piece], None]:
    """`sink` for a request that covers keys from position `base` of a larger list."""
    if not base:
        return sink

    def shifted(received: Piece) -> None:
        piece = received[0]
        if piece.HasField("slices"):
            index = piece.slices.index
            index[:] = [i + base for i in index]
        for entry in piece.batch or (piece,):
            entry.index += base
        sink(received)

    return shifted


def _stream_of(srcs: list[torch.Tensor], stream: Any) -> Any:
    """The stream a put's GPU values are produced on, to wait for before reading them."""
    cuda = [t for t in srcs if t.is_cuda]
    return torch_stream(stream, cuda[0].device) if cuda else None


def _keys(keys: Sequence[bytes]) -> list[bytes]:
    out = []
    for k in keys:
        if not isinstance(k, bytes | bytearray | memoryview):
            raise TypeError(f"keys are bytes, got {type(k).__name__}")
        out.append(bytes(k))
    return out


def _miss_when_down(
    miss: Callable[[Any], Any],
) -> Callable[[Callable[[ClientCore, Any], Op[T]]], Callable[[ClientCore, Any], Op[T]]]:
    """Make a read operation answer `miss(its argument)` instead of raising `Unavailable`
    while the server cannot be reached (down, restarting), or `Overloaded` when it refuses
    the read by back-pressure: a serving engine then recomputes, as for any other miss,
    rather than fail or stall the request."""

    def wrap(read: Callable[[ClientCore, Any], Op[T]]) -> Callable[[ClientCore, Any], Op[T]]:
        @functools.wraps(read)
        def op(self: ClientCore, arg: Any) -> Op[T]:
            try:
                result = yield from read(self, arg)
            except Overloaded as exc:  # back-pressure: a miss, the engine recomputes
                log.debug("kvstore server busy, a read reports a miss: %s", exc)
                return miss(arg)  # type: ignore[no-any-return]
            except Unavailable as exc:
                if not self.server_down:
                    log.warning("kvstore server unreachable, reads report misses: %s", exc)
                self.server_down = True
                return miss(arg)  # type: ignore[no-any-return]
            if self.server_down:
                log.warning("kvstore server reachable again")
            self.server_down = False
            return result

        return op

    return wrap


class ClientCore:
    """Builds every operation of the client for one namespace.

    Reads (`get`, `batch_get`, `lookup`, `exists`, `get_prefix`) report misses while the
    server is unreachable or refuses them by back-pressure; other operations raise
    `Unavailable` once the channel's retries (`kvstore.wire.CLIENT_OPTIONS`) run out, and
    writes refused by back-pressure are sent again after the server's hint until the
    call's deadline (`Call.retry_delay`), then raise `Overloaded`.

    With `same_host`, gets read values in place from the server's host arena when they are
    there (see `kvstore.client._shared`), falling back to streamed bytes otherwise.
    """

    def __init__(
        self,
        namespace: str,
        same_host: bool = False,
        decode_codecs: Sequence[str] | None = None,
        recompute_cost: float | None = None,
    ) -> None:
        self.namespace = namespace
        self.server_down = False  # the last read found the server unreachable
        self.chunk_tokens: int | None = None
        self.max_keys: int | None = None
        # BlockRefs handed to the caller and not yet collected: their leases are renewed.
        self.held: weakref.WeakSet[BlockRefs] = weakref.WeakSet()
        self._held_lock = threading.Lock()
        self.same_host = same_host
        self._arena: ArenaMap | None = None
        self._pools: dict[int, Region] = {}  # gpu pools mapped here, by pool number
        self._arena_checked = False
        self.lease_seconds = 30.0  # the server's, read with its arena
        # Codec ids get_into decodes here (None: those with a GPU decoder, for GPU outs).
        self.decode_codecs = None if decode_codecs is None else codec_ids(decode_codecs)
        # Sent with every put (ValueHeader.cost): recompute cost per byte; 0 = the default.
        self.recompute_cost = 0.0
        if recompute_cost is not None:
            if not (math.isfinite(recompute_cost) and recompute_cost > 0):
                raise InvalidArgument(
                    f"recompute_cost must be finite and positive, got {recompute_cost}"
                )
            self.recompute_cost = float(recompute_cost)

    def decoders_for(self, dests: Sequence[torch.Tensor]) -> frozenset[int]:
        """Codec ids a `get_into` into `dests` asks to receive encoded: `decode_codecs` as
        configured, or by default the codecs with a GPU decoder when a destination is on a
        GPU and CuPy is here (values then cross PCIe compressed and decode on the GPU)."""
        if self.decode_codecs is not None:
            return self.decode_codecs
        if not any(d.is_cuda for d in dests) or not gpu_hashing():
            return frozenset()
        return gpu_decodable_codecs()

    def _req(self, keys: Sequence[bytes]) -> pb.KeysRequest:
        return pb.KeysRequest(namespace=self.namespace, keys=_keys(keys))

    def put(
        self, key: bytes, tensor: torch.Tensor, newest: bool = False, position: int | None = None
    ) -> Op[str]:
        value = (key, tensor, _check_outgoing(key, tensor))
        newest_keys = frozenset([bytes(key)] if newest else [])
        where = _positions({bytes(key): position} if position is not None else None, [key])
        tiers = yield from self._write([value], newest_keys, where)
        return tiers[0]

    def batch_put(
        self,
        keys: Sequence[bytes],
        tensors: Sequence[torch.Tensor],
        newest: Sequence[bytes] = (),
        positions: Mapping[bytes, int] | None = None,
    ) -> Op[list[str]]:
        if len(keys) != len(tensors):
            raise ValueError(f"{len(keys)} keys but {len(tensors)} tensors")
        if not keys:
            return []
        values = [(k, t, _check_outgoing(k, t)) for k, t in zip(keys, tensors, strict=True)]
        marked = _newest_keys(newest, keys)
        return (yield from self._write(values, marked, _positions(positions, keys)))

    def _write(
        self,
        values: list[tuple[bytes, torch.Tensor, str]],
        newest: frozenset[bytes] = frozenset(),
        positions: Mapping[bytes, int] | None = None,
    ) -> Op[list[str]]:
        """Put values: written in place into reserved arena slots when this client maps
        the arena, streamed (Put/BatchPut) otherwise and for those that get no slot.
        `newest`: keys of values that are the newest chunks of their sequences; `positions`:
        values' first-token positions in their sequences, by key.

        A batch naming a key twice is streamed whole, so the later value wins as in BatchPut.
        """
        arena = yield from self._mapped_arena()
        tiers: list[str] = [""] * len(values)
        rest = list(range(len(values)))
        distinct = len({bytes(k) for k, _, _ in values}) == len(values)
        if arena is not None and arena.writable and distinct:
            rest = yield from self._write_in_place(arena, values, tiers, newest, positions or {})
        if rest:
            method = "Put" if len(values) == 1 else "BatchPut"
            chosen = [values[i] for i in rest]
            pieces = PutPieces(self.namespace, chosen, self.recompute_cost, newest, positions or {})
            streamed = yield Call(method, pieces)
            for i, tier in zip(rest, streamed.tiers, strict=True):
                tiers[i] = tier
        return tiers

    def _write_in_place(
        self,
        arena: ArenaMap,
        values: list[tuple[bytes, torch.Tensor, str]],
        tiers: list[str],
        newest: frozenset[bytes],
        positions: Mapping[bytes, int],
    ) -> Op[list[int]]:
        """Reserve, write and commit; fills `tiers` and returns the positions left to stream."""
        cost = self.recompute_cost
        prepared = [
            _host_value(k, t, name, cost, bytes(k) in newest, positions.get(bytes(k)))
            for k, t, name in values
        ]
        call = secrets.randbits(63) or 1
        started = time.monotonic()
        try:
            reservations = yield from self._reserve([h for h, _ in prepared], call)
        except BaseException:  # the answer may have been lost: give back all it reserved
            yield Call("Commit", pb.CommitRequest(abort_calls=[call]), wait=False)
            raise
        # Write only well inside the lease: a slot whose reservation expired may be handed
        # to another put, and a late write would corrupt that value.
        deadline = started + self.lease_seconds / 2
        ids: list[int] = []
        placed: list[int] = []
        unused: list[int] = []
        rest: list[int] = []
        try:
            for i, ((h, data), r) in enumerate(zip(prepared, reservations, strict=True)):
                fits = r.id and arena.holds(r.arena_dev, r.arena_ino, r.offset, h.nbytes)
                if fits and time.monotonic() < deadline:
                    arena.write(r.offset, data)
                    ids.append(r.id)
                    placed.append(i)
                else:
                    unused.extend([r.id] if r.id else [])
                    rest.append(i)
        except BaseException:
            yield Call("Commit", pb.CommitRequest(abort_calls=[call]), wait=False)
            raise
        if any(r.id and not arena.holds(r.arena_dev, r.arena_ino, r.offset, 0)
               for r in reservations):  # fmt: skip
            self._forget_arena(arena)  # slices of another arena: the server restarted
        if ids or unused:
            try:
                done = yield Call("Commit", pb.CommitRequest(ids=ids, abort=unused))
            except BaseException:
                # Whatever did not commit (the call may never have reached the server) is
                # given back now rather than at the lease timeout.
                yield Call("Commit", pb.CommitRequest(abort_calls=[call]), wait=False)
                raise
            for i, tier in zip(placed, done.tiers, strict=True):
                tiers[i] = tier
        return rest

    @_miss_when_down(lambda key: None)
    def get(self, key: bytes) -> Op[torch.Tensor | None]:
        values = yield from self._read("Get", _keys([key]))
        return values[0]

    @_miss_when_down(lambda keys: [None] * len(keys))
    def batch_get(self, keys: Sequence[bytes]) -> Op[list[torch.Tensor | None]]:
        if not keys:
            return []
        return (yield from self._read("BatchGet", _keys(keys)))

    def _read(
        self, method: str, keys: list[bytes], shared: bool = True
    ) -> Op[list[torch.Tensor | None]]:
        arena = (yield from self._mapped_arena()) if shared else None
        sink = _Assembler(len(keys), arena)
        yield from self._fetch(method, keys, sink)
        if sink.leases:
            # In the background, unless a corrupt copy must be dropped before re-reading.
            release = pb.ReleaseRequest(leases=sink.leases, corrupt=sink.corrupt)
            yield Call("Release", release, wait=bool(sink.corrupt))
        if sink.stale:  # the server restarted since we mapped its arena: map the new one
            self._forget_arena(sink.arena)
            return (yield from self._read(method, keys))
        values = sink.result()
        if sink.corrupt_keys:  # the server has checked and dropped the bad copies: read again
            again = [keys[i] for i in sink.corrupt_keys]
            fresh = yield from self._read("BatchGet", again, shared=False)
            missing = [i for i, v in zip(sink.corrupt_keys, fresh, strict=True) if v is None]
            if missing:
                raise_unrecoverable(missing)
            for i, v in zip(sink.corrupt_keys, fresh, strict=True):
                values[i] = v
        return values

    def _fetch(self, method: str, keys: list[bytes], sink: _Assembler) -> Op[int]:
        """Get or BatchGet `keys` into `sink`, asking for shared slices when it has an arena;
        a long key list goes in several requests under one call number, so that one lease
        group covers them. Returns the call number (0 without slices). A call cut off ends
        every lease of that number, seen by the sink or not."""
        shared = sink.arena is not None
        call = (secrets.randbits(63) or 1) if shared else 0
        pools = sorted(sink.pools)
        try:
            if method == "Get":
                get = pb.GetRequest(
                    namespace=self.namespace,
                    key=keys[0],
                    shared=shared,
                    call=call,
                    gpu_pools=pools,
                    codecs=sorted(sink.decoders),
                )
                yield Call(method, get, sink)
            else:
                limit = yield from self._max_keys()
                for base in range(0, len(keys), limit):
                    part = keys[base : base + limit]
                    request = pb.KeysRequest(
                        namespace=self.namespace,
                        keys=part,
                        shared=shared,
                        call=call,
                        gpu_pools=pools,
                        codecs=sorted(sink.decoders),
                        packed=shared and sink.keep_shared,
                    )
                    yield Call(method, request, _shifted(sink, base))
        except GeneratorExit:  # the driver gave up on this operation: nothing more to yield
            raise
        except BaseException:
            if shared:
                yield Call("Release", pb.ReleaseRequest(calls=[call]), wait=False)
            raise
        return call

    # ------------------------------------------------------------------ tensors in place

    def acquire(
        self,
        keys: Sequence[bytes],
        verify: bool = True,
        shared: bool = True,
        decoders: frozenset[int] = frozenset(),
    ) -> Op[BlockRefs]:
        """Hold `keys` readable in place (see `BlockRefs`); absent keys are marked not found.

        Same-host values stay in the arena under leases; anything streamed (another host, a
        value the arena had no room for) is packed into one private host buffer, and then
        so is everything else, so that one buffer holds all blocks a gather may select.
        With `verify`, arena bytes are checked now (once, not at every gather). Values only
        on the server's ssd, stored through a codec in `decoders`, come as containers
        (`BlockRefs.containers`) for `get_into` to decode; they cannot be gathered.
        """
        keys = _keys(keys)
        arena = (yield from self._mapped_arena()) if shared else None
        in_place = arena is not None
        pools = self._pools if in_place else {}
        sink = _Assembler(len(keys), arena, keep_shared=True, pools=pools, decoders=decoders)
        started = time.monotonic()
        call = yield from self._fetch("BatchGet", keys, sink)
        try:
            values = sink.result()
            if sink.stale:  # the server restarted since we mapped its arena
                yield Call("Release", pb.ReleaseRequest(leases=sink.leases), wait=False)
                self._forget_arena(sink.arena)
                return (yield from self.acquire(keys, verify, decoders=decoders))
            missing = sink.missing_maps()
            if missing:
                failed = yield from self.load_maps(missing)
                if failed:  # the server decodes those values itself
                    yield Call("Release", pb.ReleaseRequest(leases=sink.leases), wait=False)
                    drop = set().union(*(missing[d] for d in failed))
                    return (yield from self.acquire(keys, verify, decoders=decoders - drop))
            return (yield from self._hold(keys, sink, values, arena, verify, call, started))
        except GeneratorExit:
            raise
        except BaseException:  # whatever failed after the leases were taken ends them
            if in_place:
                yield Call("Release", pb.ReleaseRequest(calls=[call]), wait=False)
            raise

    def load_maps(self, digests: Iterable[str]) -> Op[set[str]]:
        """Fetch the cross-layer maps of `digests` from the server (the Maps RPC) and load
        them in this process, so that cachegen-x containers naming them decode here; the
        digests the server does not hold, or sent damaged."""
        from kvstore.codecs.cachegen_profile import maps_from_document, register_cross

        failed = set()
        for digest in digests:
            pieces: list[pb.MapsPiece] = []
            try:
                yield Call("Maps", pb.MapsRequest(digest=digest), pieces.append)
            except NotFound:
                failed.add(digest)
                continue
            data = b"".join(m.data for m in pieces)
            if not pieces or len(data) != pieces[0].total:
                total = pieces[0].total if pieces else "?"
                log.warning(
                    "kvstore server sent %d of %s bytes of cross-layer maps %s",
                    len(data), total, digest,
                )  # fmt: skip
                failed.add(digest)
                continue
            try:
                cross = yield Block(functools.partial(maps_from_document, data, digest))
            except InvalidArgument as exc:
                log.warning("kvstore server sent damaged cross-layer maps %s: %s", digest, exc)
                failed.add(digest)
                continue
            register_cross(cross)
            log.info("loaded cross-layer maps %s from the server (%d bytes)", digest, len(data))
        return failed

    def _hold(
        self,
        keys: list[bytes],
        sink: _Assembler,
        values: list[torch.Tensor | None],
        arena: ArenaMap | None,
        verify: bool,
        call: int,
        started: float,
    ) -> Op[BlockRefs]:
        """The `BlockRefs` of an acquire whose answers `sink` collected."""
        mixed = bool(sink.shared) and any(v is not None for v in values)
        regions: dict[int, Region] = {**sink.pools, **({0: arena} if arena is not None else {})}
        if verify and sink.shared and not mixed:
            bad = yield Block(lambda: _failed_checksums(regions, sink.shared))
            if bad:  # reported, checked and dropped by the server; read everything again
                release = pb.ReleaseRequest(leases=sink.leases, corrupt=bad)
                yield Call("Release", release, wait=True)
                return (yield from self.acquire(keys, verify, False, sink.decoders))
        slices: list[Slice | None] = [None] * len(keys)
        if sink.shared and not mixed:
            for i, sl in sink.shared.items():
                slices[i] = sl
            expires = started + self.lease_seconds * LEASE_MARGIN
            refs = BlockRefs(keys, slices, arena, None, expires, call, sink.pools, sink.containers)
            with self._held_lock:
                self.held.add(refs)
            return refs
        if mixed:  # the in-place ones are copied out too, checked, and their leases ended
            for i, sl in sink.shared.items():
                buf = regions[sl.pool].copy(sl.offset, sl.header.nbytes)
                if checksum(buf.data) != sl.header.checksum:
                    yield Call("Release", pb.ReleaseRequest(leases=sink.leases), wait=False)
                    return (yield from self.acquire(keys, verify, False, sink.decoders))
                values[i] = torch.from_numpy(buf)
            yield Call("Release", pb.ReleaseRequest(leases=sink.leases), wait=False)
        private, offsets = private_buffer(values, pin=torch.cuda.is_available())
        for i, v in enumerate(values):
            h = sink.headers[i]
            if v is not None and h is not None:
                slices[i] = Slice(h, offsets[i])
        return BlockRefs(keys, slices, None, private, float("inf"), containers=sink.containers)

    def renew_held(self) -> Op[int]:
        """Renew the leases of every `BlockRefs` still held; returns how many sets. A set
        whose leases the server no longer holds all of is marked expired."""
        with self._held_lock:  # callers add refs from other threads meanwhile
            live = [r for r in list(self.held) if not r.released and r.call]
        if not live:
            return 0
        sent = time.monotonic()
        resp = yield Call("Renew", pb.RenewRequest(calls=[r.call for r in live]))
        for refs, count in zip(live, resp.counts, strict=True):
            if count == len(refs.leases):
                refs.expires = sent + self.lease_seconds * LEASE_MARGIN
            else:
                refs.expires = 0.0  # some expired before this renewal: gathers must stop
        return len(live)

    def release(self, refs: BlockRefs, corrupt: Sequence[int] = (), wait: bool = False) -> Op[None]:
        """End the leases of `refs` (every selection of them too), once the gathers already
        launched from them are done."""
        leases = refs.leases
        already = refs._root.released
        refs.mark_released()
        pending = refs._root.last_gather
        if pending is not None and not already:
            yield Block(pending.synchronize)
        if leases and not already:
            yield Call("Release", pb.ReleaseRequest(leases=leases, corrupt=corrupt), wait=wait)

    def get_into(
        self,
        keys: Sequence[bytes],
        out: torch.Tensor | Sequence[torch.Tensor],
        stream: Any,
        marks: Sequence[int] = (),
    ) -> Op[GetLanding]:
        """Start copying the values of `keys` into `out` (one tensor per key, or one tensor
        with a first dimension per key); `settle_get` finishes. Every destination is checked
        against its value (dtype, size) before anything is copied. At each of `marks`
        (ascending key positions) an event is recorded (`GetLanding.mark_events`)."""
        dests = tensors_of(out, len(keys), "out")
        marks = list(marks)
        if any(not 0 <= m <= len(keys) for m in marks) or marks != sorted(marks):
            raise InvalidArgument(f"marks must be ascending positions in 0..{len(keys)}")
        refs = yield from self.acquire(keys, verify=False, decoders=self.decoders_for(dests))
        landing = GetLanding(refs, dests, marks)
        try:
            with gpu_memory_errors("get_into"):
                landing.launch(stream)
        except GeneratorExit:
            raise
        except BaseException:
            if landing.stream is not None:  # no lease ends under a copy still reading it
                yield Block(landing.stream.synchronize)
            yield from self.release(refs)
            raise
        return landing

    def settle_get(self, landing: GetLanding) -> Op[list[bool]]:
        """Wait for a `get_into`'s copies and checksums, end its leases, and re-read any
        value whose arena bytes were corrupt. Returns which keys were found."""
        refs = landing.refs
        try:
            bad = yield Block(landing.wait)
        except GeneratorExit:
            raise
        except BaseException:
            yield from self.release(refs)
            raise
        corrupt = [refs.slices[i].lease for i in bad]  # type: ignore[union-attr]
        yield from self.release(refs, corrupt, wait=bool(bad))
        on_gpu = [i for i in bad if landing.dests[i].is_cuda]
        if on_gpu:
            # Work on the caller's stream may already have read or overwritten those
            # tensors: writing them again behind its back would be worse than saying so.
            raise DataLoss(
                f"values for keys {on_gpu} failed their checksum in the host arena; their "
                "copies were dropped and the tensors hold bad bytes: get them again"
            )
        if bad:
            fresh = yield from self._read("BatchGet", [refs.keys[i] for i in bad], shared=False)
            missing = [i for i, v in zip(bad, fresh, strict=True) if v is None]
            if missing:
                raise_unrecoverable(missing)
            for i, v in zip(bad, fresh, strict=True):
                assert v is not None
                landing.refill(i, v)
        return refs.found

    def put_from(
        self,
        keys: Sequence[bytes],
        values: torch.Tensor | Sequence[torch.Tensor],
        stream: Any,
        newest: Sequence[bytes] = (),
        positions: Mapping[bytes, int] | None = None,
    ) -> Op[PutLanding]:
        """Start copying `values` (GPU or CPU tensors) into reserved arena slots; the copies
        run on `stream` and `settle_put` commits them. Values that get no slot, or a client
        that cannot write the arena, stream their bytes when the put settles. `newest`:
        keys of values that are the newest chunks of their sequences; `positions`: values'
        first-token positions in their sequences, by key."""
        keys = _keys(keys)
        srcs = tensors_of(values, len(keys), "values")
        checked = [(k, t, _check_outgoing(k, t)) for k, t in zip(keys, srcs, strict=True)]
        landing = PutLanding(
            checked, newest=_newest_keys(newest, keys), positions=_positions(positions, keys)
        )
        arena = yield from self._mapped_arena()
        if arena is None or not arena.writable or len(set(keys)) != len(keys):
            landing.rest = list(range(len(keys)))
            landing.stream = _stream_of(srcs, stream)
            return landing
        pool = self._pool_for(srcs)
        headers = [
            pb.ValueHeader(
                key=k,
                dtype=name,
                shape=t.shape,
                nbytes=t.numel() * t.element_size(),
                cost=self.recompute_cost,
                newest=k in landing.newest,
                position=landing.positions.get(k),
            )
            for k, t, name in checked
        ]
        landing.call = secrets.randbits(63) or 1
        landing.started = time.monotonic()
        try:
            with gpu_memory_errors("put_from"):
                landing.begin({**self._pools, 0: arena}, stream)
            for a, b in reserve_parts([h.nbytes for h in headers]):
                # The first part is small: its copies start after one short Reserve and run
                # while the next, larger parts are reserved.
                reservations = yield from self._reserve(headers[a:b], landing.call, pool)
                with gpu_memory_errors("put_from"):
                    landing.place(a, reservations)
            landing.finish()
        except GeneratorExit:
            raise
        except BaseException:
            landing.finish()
            if landing.stream is not None:  # copies already enqueued must land first
                yield Block(landing.stream.synchronize)
            yield Call("Commit", pb.CommitRequest(abort_calls=[landing.call]), wait=False)
            raise
        return landing

    def settle_put(self, landing: PutLanding) -> Op[list[str]]:
        """Commit a `put_from`'s slots group by group as their copies land, then stream what
        got no slot. Returns the tiers."""
        tiers = [""] * len(landing.values)
        rest = list(landing.rest)
        unused = list(landing.unused)
        # A copy that lands late may have missed its reservation: those values stream too.
        deadline = landing.started + self.lease_seconds * LEASE_MARGIN / 2
        try:
            for group in landing.groups:
                commit = pb.CommitRequest(ids=group.ids, abort=unused)
                if landing.gpu:  # waits for the copies and the GPU's checksums
                    commit.checksums.extend(
                        (yield Block(functools.partial(landing.checksums, group)))
                    )
                else:  # the server hashes the slots
                    if group.event is not None:
                        yield Block(group.event.synchronize)
                    commit.compute_checksums = True
                if time.monotonic() > deadline:
                    unused.extend(group.ids)
                    rest.extend(group.positions)
                    continue
                unused = []
                done = yield Call("Commit", commit)
                for p, tier in zip(group.positions, done.tiers, strict=True):
                    tiers[p] = tier
            if unused:
                yield Call("Commit", pb.CommitRequest(abort=unused), wait=False)
        except GeneratorExit:
            raise
        except BaseException:
            if landing.call:
                if landing.stream is not None:  # no slot is given back under a running copy
                    yield Block(landing.stream.synchronize)
                yield Call("Commit", pb.CommitRequest(abort_calls=[landing.call]), wait=False)
            raise
        if rest:
            if landing.stream is not None:  # the values may still be in the making
                yield Block(landing.stream.synchronize)
            rest.sort()
            method = "Put" if len(landing.values) == 1 else "BatchPut"
            chosen = [landing.values[i] for i in rest]
            pieces = PutPieces(
                self.namespace, chosen, self.recompute_cost, landing.newest, landing.positions
            )
            streamed = yield Call(method, pieces)
            for i, tier in zip(rest, streamed.tiers, strict=True):
                tiers[i] = tier
        return tiers

    def _mapped_arena(self) -> Op[ArenaMap | None]:
        if self.same_host and not self._arena_checked:
            stats = yield from self.stats()
            self._arena_checked = True
            self.lease_seconds = stats.lease_seconds
            if stats.host_arena_path:
                try:
                    self._arena = ArenaMap(
                        stats.host_arena_path, stats.host_arena_dev, stats.host_arena_ino
                    )
                except OSError:
                    self._arena = None  # another host or mount namespace: stream bytes
            # Pools only beside the arena: a client that cannot map one cannot the other.
            self._pools = open_pools(stats.gpu_pools) if self._arena is not None else {}
        return self._arena

    def _pool_for(self, srcs: list[torch.Tensor]) -> int:
        """The gpu pool to put `srcs` in: that of their GPU (the host twin's for CPU
        tensors), or 0 (the host arena) when this client maps none for them."""
        devices = {t.device for t in srcs}
        if len(devices) != 1 or not self._pools:
            return 0
        device = next(iter(devices))
        for n, m in self._pools.items():
            if isinstance(m, PoolMap):
                if m.device == device:
                    return n
            elif device.type == "cpu":  # the host twin takes host tensors
                return n
        return 0

    def _forget_arena(self, stale: ArenaMap | None) -> None:
        # Only the mapping this read used: another operation may already have mapped the
        # new arena, or be copying from it. A forgotten map closes when its last user is done.
        if self._arena is stale:
            self._arena, self._arena_checked, self._pools = None, False, {}

    def close(self) -> None:
        self._forget_arena(self._arena)

    def _split(self, keys: Sequence[bytes]) -> Op[list[pb.KeysRequest]]:
        """Requests of at most the server's key limit each, covering `keys` in order."""
        keys = _keys(keys)
        step = yield from self._max_keys()  # asked once per client
        return [
            pb.KeysRequest(namespace=self.namespace, keys=keys[i : i + step])
            for i in range(0, max(len(keys), 1), step)
        ]

    def lookup(self, keys: Sequence[bytes]) -> Op[int]:
        return (yield from self.lookup_tiers(keys)).length

    @_miss_when_down(lambda keys: PrefixTiers())
    def lookup_tiers(self, keys: Sequence[bytes]) -> Op[PrefixTiers]:
        tiers: list[str] = []
        for request in (yield from self._split(keys)):
            resp = yield Call("Lookup", request)
            # A server older than the tiers field says only the length.
            tiers += list(resp.tiers) or ["unknown"] * resp.length
            if resp.length < len(request.keys):  # the prefix ends in this part
                break
        return PrefixTiers(tuple(tiers))

    @_miss_when_down(lambda keys: [False] * len(keys))
    def exists(self, keys: Sequence[bytes]) -> Op[list[bool]]:
        present: list[bool] = []
        for request in (yield from self._split(keys)):
            present += (yield Call("Exists", request)).present
        return present

    def _count(self, method: str, keys: Sequence[bytes]) -> Op[int]:
        n = 0
        for request in (yield from self._split(keys)):
            n += int((yield Call(method, request)).count)
        return n

    def delete(self, keys: Sequence[bytes]) -> Op[int]:
        return (yield from self._count("Delete", keys))

    def pin(self, keys: Sequence[bytes]) -> Op[int]:
        return (yield from self._count("Pin", keys))

    def unpin(self, keys: Sequence[bytes]) -> Op[int]:
        return (yield from self._count("Unpin", keys))

    def stats(self) -> Op[ServerStats]:
        resp = yield Call("Stats", pb.StatsRequest())
        stats = ServerStats.from_proto(resp)
        self.chunk_tokens = stats.chunk_tokens
        self.max_keys = stats.max_keys_per_request
        return stats

    def entries(self, namespace: str | None, limit: int) -> Op[list[pb.ListResponse]]:
        out: list[pb.ListResponse] = []
        yield Call("List", pb.ListRequest(namespace=namespace or "", limit=limit), out.append)
        return out

    def _reserve(
        self, headers: list[pb.ValueHeader], call: int, pool: int = 0
    ) -> Op[list[pb.Reservation]]:
        """Slots for `headers` (in gpu pool `pool` while it has room, else the arena), in
        requests of at most the server's key limit."""
        limit = yield from self._max_keys()
        out: list[pb.Reservation] = []
        for base in range(0, len(headers), limit):
            part = headers[base : base + limit]
            reserve = pb.ReserveRequest(
                namespace=self.namespace, values=part, call=call, gpu_pool=pool
            )
            out.extend((yield Call("Reserve", reserve)).reservations)
        return out

    def _max_keys(self) -> Op[int]:
        """The server's limit on keys in one request."""
        if self.max_keys is None:
            yield from self.stats()
        assert self.max_keys is not None
        return self.max_keys

    def chunking(self) -> Op[int]:
        if self.chunk_tokens is None:
            yield from self.stats()
        assert self.chunk_tokens is not None
        return self.chunk_tokens

    def prefix_keys(self, token_ids: Sequence[int] | np.ndarray) -> Op[list[bytes]]:
        ct = yield from self.chunking()
        return chunk_keys(token_ids, ct, self.namespace, include_partial=True)

    def put_prefix(self, token_ids: Sequence[int] | np.ndarray, kv: torch.Tensor) -> Op[int]:
        """Store `kv` ([layers, 2, tokens, heads, head_dim]) chunk by chunk.

        Chunks of a prefix the store already holds are not sent again. Returns the number of
        chunks the prompt spans, all of them now stored.
        """
        n_tokens = len(token_ids)
        if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[1] != 2:
            shape = tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__
            raise InvalidArgument(
                f"kv must be a [layers, 2, tokens, kv_heads, head_dim] tensor, got {shape}"
            )
        if kv.shape[2] != n_tokens:
            raise InvalidArgument(f"kv holds {kv.shape[2]} tokens but {n_tokens} token ids given")
        keys = yield from self.prefix_keys(token_ids)
        ct = self.chunk_tokens
        assert ct is not None
        held = yield from self.lookup(keys)
        chunks = [kv[:, :, i * ct : (i + 1) * ct] for i in range(held, len(keys))]
        newest = keys[max(first_newest_chunk(n_tokens, ct), held) :]
        positions = {keys[i]: i * ct for i in range(held, len(keys))}
        yield from self.batch_put(keys[held:], chunks, newest, positions)
        return len(keys)

    @_miss_when_down(lambda token_ids: None)
    def get_prefix(self, token_ids: Sequence[int] | np.ndarray) -> Op[torch.Tensor | None]:
        """KV of the longest stored prefix of `token_ids`, or None when nothing matches."""
        keys = yield from self.prefix_keys(token_ids)
        n = yield from self.lookup(keys)
        if n == 0:
            return None
        values = yield from self.batch_get(keys[:n])
        present: list[torch.Tensor] = []
        for v in values:  # a chunk evicted between lookup and get ends the prefix
            if v is None:
                break
            present.append(v)
        if not present:
            return None
        return torch.cat(present, dim=2) if len(present) > 1 else present[0]
