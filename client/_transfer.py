"""Moving values between the store and tensors the caller owns, GPU tensors above all.

- `BlockRefs`: values held readable in place under leases (`acquire`), each known by its
  offset in a host buffer: the server's arena, mapped here, or for a client that cannot
  map it a private buffer holding streamed copies. `gather` pulls a selection of them into
  one contiguous tensor with one kernel (`kvstore.kernels.gather_blocks`).
- `GetLanding` / `PutLanding`: a `get_into` or `put_from` whose copies are enqueued and
  not yet finished; the client settles them (checksums, Commit, Release) in the background
  and hands the caller a handle.

Copies between the arena and a GPU are one `copy_` per value on the caller's stream: the
copy engine moves them at PCIe speed with no SM time, so they overlap compute. The arena is
registered with CUDA (`ArenaMap.register_cuda`) before the first such copy.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvstore.client._shared import ArenaMap
from kvstore.codecs.container import checksum
from kvstore.errors import DataLoss, InvalidArgument
from kvstore.kernels.blocks import VECTOR_BYTES, DeviceBuffer, gather_blocks, gather_blocks_cpu
from kvstore.v1 import kvstore_pb2 as pb

# Checksums of arena bytes run on these threads while the copy engine moves the same bytes
# (xxhash releases the GIL): one core hashes well below PCIe speed.
_HASH_THREADS = max(2, min(12, (os.cpu_count() or 2) - 2))
_hash_pool: concurrent.futures.ThreadPoolExecutor | None = None
# Margin kept before a lease's expiry: a block read closer to it might already be reused.
LEASE_MARGIN = 0.8


def hash_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _hash_pool
    if _hash_pool is None:
        _hash_pool = concurrent.futures.ThreadPoolExecutor(
            _HASH_THREADS, thread_name_prefix="kvstore-checksum"
        )
    return _hash_pool


def tensors_of(
    values: torch.Tensor | Sequence[torch.Tensor], n: int, what: str
) -> list[torch.Tensor]:
    """One contiguous tensor per key: a sequence of n tensors, or a tensor whose first
    dimension has n entries."""
    if isinstance(values, torch.Tensor):
        if values.dim() == 0 or values.shape[0] != n:
            raise InvalidArgument(
                f"{what} must have one entry per key along its first dimension "
                f"({n}), got shape {tuple(values.shape)}"
            )
        out = list(values.unbind(0))
    else:
        out = list(values)
        if len(out) != n:
            raise InvalidArgument(f"{len(out)} {what} tensors for {n} keys")
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}] is a {type(t).__name__}, not a torch.Tensor")
        if not t.is_contiguous():
            raise InvalidArgument(f"{what}[{i}] must be contiguous")
    return out


def torch_stream(stream: Any, device: torch.device) -> Any:
    """The torch stream to enqueue on: `stream` (torch, or anything with a CUDA stream
    handle such as a CuPy stream), or the device's current stream."""
    if stream is None:
        return torch.cuda.current_stream(device)
    if isinstance(stream, torch.cuda.Stream):
        return stream
    handle = getattr(stream, "ptr", None) or getattr(stream, "cuda_stream", None)
    if handle is None:
        raise TypeError(f"not a CUDA stream: {type(stream).__name__}")
    return torch.cuda.ExternalStream(handle, device=device)


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)


@dataclass
class Slice:
    """One found value: its header, and where its bytes are in the host buffer."""

    header: pb.ValueHeader
    offset: int
    lease: int = 0  # 0: a private copy, no lease


class BlockRefs:
    """Values held readable in place until `release()` or the lease expiry.

    Index with a list or array of positions (the top-k of a retrieval) to select blocks for
    `KVClient.gather`; a selection shares the leases of the whole set. `found[i]` says
    whether key i was stored; an absent key cannot be selected.
    """

    def __init__(
        self,
        keys: list[bytes],
        slices: list[Slice | None],
        arena: ArenaMap | None,
        private: torch.Tensor | None,
        expires: float,
    ) -> None:
        self.keys = keys
        self.slices = slices
        self.found = [s is not None for s in slices]
        self.arena = arena
        self.private = private  # streamed copies, for a client without the arena
        self.expires = expires
        self.released = False
        self._positions: np.ndarray | None = None  # set on a selection
        self._root: BlockRefs = self

    @property
    def leases(self) -> list[int]:
        return [s.lease for s in self._root.slices if s is not None and s.lease]

    def __len__(self) -> int:
        return len(self.keys) if self._positions is None else int(self._positions.size)

    def __getitem__(self, positions: Sequence[int] | np.ndarray | slice) -> BlockRefs:
        all_ = np.arange(len(self._root.keys))
        base = all_ if self._positions is None else self._positions
        picked = np.asarray(
            base[positions]
            if isinstance(positions, slice)
            else base[np.asarray(positions, np.int64)]
        )
        view = BlockRefs.__new__(BlockRefs)
        view.__dict__.update(self._root.__dict__)
        view._positions = np.atleast_1d(picked).astype(np.int64)
        view._root = self._root
        return view

    def host(self) -> tuple[torch.Tensor, np.ndarray]:
        """The host buffer the blocks live in, as a tensor and as an array."""
        root = self._root
        if root.arena is not None:
            return root.arena.tensor(), root.arena.array()
        assert root.private is not None
        return root.private, root.private.numpy()

    def selected(self) -> list[Slice]:
        """The slices of the selection, checked to be usable now."""
        root = self._root
        if root.released:
            raise InvalidArgument("these block refs were released; acquire the keys again")
        if time.monotonic() > root.expires:
            raise InvalidArgument(
                "the leases of these block refs have expired (the server's --lease-seconds); "
                "acquire the keys again"
            )
        positions = range(len(root.keys)) if self._positions is None else self._positions
        out = []
        for p in positions:
            if not 0 <= p < len(root.slices):
                raise InvalidArgument(f"block position {p} is outside the {len(root.slices)} refs")
            s = root.slices[p]
            if s is None:
                raise InvalidArgument(f"key #{p} is not stored; it cannot be gathered")
            out.append(s)
        return out

    def mark_released(self) -> None:
        self._root.released = True


def gather(refs: BlockRefs, out: torch.Tensor, stream: Any = None) -> Any:
    """Launch the gather of `refs` (a selection) into `out`; returns a CUDA event, or None
    when `out` is a CPU tensor (copied by the time this returns)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    blocks = refs.selected()
    if not out.is_contiguous():
        raise InvalidArgument("out must be contiguous")
    if blocks:
        h = blocks[0].header
        for b in blocks:
            if b.header.nbytes != h.nbytes or b.header.dtype != h.dtype:
                raise InvalidArgument(
                    "blocks of one gather must share size and dtype: "
                    f"{h.nbytes} bytes of {h.dtype} and {b.header.nbytes} bytes of {b.header.dtype}"
                )
        want = str(out.dtype).removeprefix("torch.")
        if want != h.dtype:
            raise InvalidArgument(f"out is {want} but the blocks hold {h.dtype}")
        if h.nbytes % VECTOR_BYTES or h.nbytes == 0:
            raise InvalidArgument(
                f"blocks of {h.nbytes} bytes cannot be gathered: the size must be a positive "
                f"multiple of {VECTOR_BYTES}"
            )
        block = int(h.nbytes)
    else:
        block = VECTOR_BYTES
    ids = np.fromiter((b.offset for b in blocks), np.int64, len(blocks)) // VECTOR_BYTES
    host_tensor, host_array = refs.host()
    dense = flat_bytes(out)
    if not out.is_cuda:
        gather_blocks_cpu(host_array, ids, dense.numpy(), block, slot_bytes=VECTOR_BYTES)
        return None
    root = refs._root
    if root.arena is not None:
        root.arena.register_cuda()
    src = DeviceBuffer(host_tensor.data_ptr(), host_tensor.numel(), None)
    return gather_blocks(src, ids, dense, block, stream, slot_bytes=VECTOR_BYTES)


def check_destination(i: int, h: pb.ValueHeader, dst: torch.Tensor) -> None:
    name = str(dst.dtype).removeprefix("torch.")
    if name != h.dtype:
        raise InvalidArgument(f"out[{i}] is {name} but the stored value is {h.dtype}")
    if dst.numel() * dst.element_size() != h.nbytes:
        raise InvalidArgument(
            f"out[{i}] holds {dst.numel() * dst.element_size()} bytes but the stored value "
            f"has {h.nbytes} (shape {tuple(h.shape)})"
        )


@dataclass
class GetLanding:
    """A `get_into` whose copies are enqueued: `wait` finishes them and the checksums."""

    refs: BlockRefs
    dests: list[torch.Tensor]
    event: Any = None  # torch.cuda.Event after the last GPU copy
    hashes: list[tuple[int, concurrent.futures.Future[int]]] = field(default_factory=list)

    def launch(self, stream: Any) -> None:
        """Check every destination, then enqueue every copy (nothing is copied if any
        destination is wrong)."""
        slices = self.refs.slices
        for i, (s, dst) in enumerate(zip(slices, self.dests, strict=True)):
            if s is not None:
                check_destination(i, s.header, dst)
        host_tensor, host_array = self.refs.host()
        cuda = [d for d, s in zip(self.dests, slices, strict=True) if s is not None and d.is_cuda]
        devices = {d.device for d in cuda}
        if len(devices) > 1:
            raise InvalidArgument(f"out spans several GPUs ({sorted(map(str, devices))})")
        arena = self.refs.arena
        if cuda and arena is not None:
            arena.register_cuda()
        pool = hash_pool()
        if arena is not None:  # checked while they copy; a private copy was checked on arrival
            self.hashes = [
                (i, pool.submit(checksum, host_array[s.offset : s.offset + s.header.nbytes].data))
                for i, s in enumerate(slices)
                if s is not None
            ]
        s_ = torch_stream(stream, next(iter(devices))) if cuda else None
        with torch.cuda.stream(s_) if s_ is not None else contextlib.nullcontext():
            for s, dst in zip(slices, self.dests, strict=True):
                if s is not None and s.header.nbytes:
                    src = host_tensor[s.offset : s.offset + s.header.nbytes]
                    flat_bytes(dst).copy_(src, non_blocking=dst.is_cuda)
        if s_ is not None:
            self.event = torch.cuda.Event()
            self.event.record(s_)

    def wait(self) -> list[int]:
        """Block until the copies and checksums are done; returns the positions whose
        bytes failed their checksum."""
        slices = self.refs.slices
        bad = [i for i, f in self.hashes if f.result() != slices[i].header.checksum]  # type: ignore[union-attr]
        if self.event is not None:
            self.event.synchronize()
        return bad

    def refill(self, i: int, value: torch.Tensor) -> None:
        """Copy a value read again (after a checksum failure) into its destination."""
        flat_bytes(self.dests[i]).copy_(flat_bytes(value))


# A put's copies are committed in groups of about this many bytes, so the server checksums
# one group while the copy engine still moves the next.
COMMIT_GROUP_BYTES = 256 << 20


@dataclass
class PutLanding:
    """A `put_from` whose copies into reserved arena slots are enqueued.

    `groups` are (positions, reservation ids, event after their copies); `rest` are the
    positions that got no slot and are streamed when the put settles.
    """

    values: list[tuple[bytes, torch.Tensor, str]]
    call: int = 0
    started: float = 0.0
    stream: Any = None
    groups: list[tuple[list[int], list[int], Any]] = field(default_factory=list)
    rest: list[int] = field(default_factory=list)
    unused: list[int] = field(default_factory=list)  # reservations given back at commit

    def launch(self, arena: ArenaMap, reservations: Sequence[pb.Reservation], stream: Any) -> None:
        srcs = [t for _, t, _ in self.values]
        cuda = {t.device for t in srcs if t.is_cuda}
        if len(cuda) > 1:
            raise InvalidArgument(f"values span several GPUs ({sorted(map(str, cuda))})")
        if cuda:
            arena.register_cuda()
            self.stream = torch_stream(stream, next(iter(cuda)))
        host = arena.tensor()
        positions: list[int] = []
        ids: list[int] = []
        pending = 0
        with (
            torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        ):
            for i, (t, r) in enumerate(zip(srcs, reservations, strict=True)):
                n = t.numel() * t.element_size()
                if not r.id or not arena.holds(r.arena_dev, r.arena_ino, r.offset, n):
                    if r.id:
                        self.unused.append(r.id)
                    self.rest.append(i)
                    continue
                if n:
                    host[r.offset : r.offset + n].copy_(flat_bytes(t), non_blocking=t.is_cuda)
                positions.append(i)
                ids.append(r.id)
                pending += n
                if pending >= COMMIT_GROUP_BYTES:
                    self._close_group(positions, ids)
                    positions, ids, pending = [], [], 0
            if positions:
                self._close_group(positions, ids)

    def _close_group(self, positions: list[int], ids: list[int]) -> None:
        event = None
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(self.stream)
        self.groups.append((positions, ids, event))


def private_buffer(values: list[torch.Tensor | None], pin: bool) -> tuple[torch.Tensor, list[int]]:
    """Streamed values packed into one host buffer at aligned offsets (for `BlockRefs`)."""
    offsets, total = [], 0
    for v in values:
        offsets.append(total)
        if v is not None:
            total += -(-(v.numel() * v.element_size()) // 64) * 64
    buf = torch.empty(max(total, VECTOR_BYTES), dtype=torch.uint8, pin_memory=pin)
    for v, off in zip(values, offsets, strict=True):
        if v is not None and v.numel():
            buf[off : off + v.numel() * v.element_size()].copy_(flat_bytes(v))
    return buf, offsets


def raise_unrecoverable(keys: list[int]) -> None:
    raise DataLoss(
        f"values for keys {keys} failed their checksum in the host arena and could not be "
        "read again (no other copy, or evicted since)"
    )


class Transfer:
    """A `get_into`, `put_from` or `gather` in flight (blocking client).

    `wait()` returns its result once the copies are done and settled: for `get_into`
    which keys were found, for `put_from` the tier of each value, for `gather` None. A
    failure (a checksum that could not be repaired, a refused commit) is raised by `wait`.
    Work enqueued on the same stream after the call sees the copied bytes without waiting.
    """

    def __init__(self, future: concurrent.futures.Future[Any] | None = None, event: Any = None):
        self._future = future
        self._event = event

    def wait(self, timeout: float | None = None) -> Any:
        if self._future is not None:
            return self._future.result(timeout)
        if self._event is not None:
            self._event.synchronize()
        return None

    def is_done(self) -> bool:
        if self._future is not None:
            return self._future.done()
        return self._event is None or bool(self._event.done)
