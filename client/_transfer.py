"""Moving values between the store and tensors the caller owns, GPU tensors above all.

- `BlockRefs`: values held readable in place under leases (`acquire`), each known by its
  offset in a region: the server's host arena or one of its gpu pools, mapped here, or for
  a client that cannot map them a private buffer holding streamed copies. `gather` pulls a
  selection of them into one contiguous tensor with one kernel per region
  (`kvstore.kernels.gather_blocks`).
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
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from kvstore.client._shared import ArenaMap, Region
from kvstore.codecs.container import checksum
from kvstore.dtypes import dtype_name
from kvstore.errors import DataLoss, InvalidArgument, ResourceExhausted
from kvstore.kernels import checksum as checksum_kernels
from kvstore.kernels.blocks import (
    VECTOR_BYTES,
    DeviceBuffer,
    as_cupy_stream,
    gather_blocks_cpu,
    launch_blocks,
    recorded_event,
)
from kvstore.threads import host_pool
from kvstore.v1 import kvstore_pb2 as pb

# Margin kept before a lease's expiry: a block read closer to it might already be reused.
LEASE_MARGIN = 0.8


def hash_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Checksums of arena bytes run on these threads while the copy engine moves the same
    bytes (xxhash releases the GIL): one core hashes well below PCIe speed."""
    return host_pool()


# Checksums are handed to the pool in tasks of at least this many bytes: a task costs a few
# microseconds to submit and collect, more than hashing a small value.
HASH_TASK_BYTES = 1 << 20


def _checksums(buffers: list[memoryview]) -> list[int]:
    return [checksum(b) for b in buffers]


class Hashing:
    """Checksums of many buffers computed on the hash pool, several small ones to a task."""

    def __init__(self) -> None:
        self.tasks: list[tuple[list[int], concurrent.futures.Future[list[int]]]] = []
        self._positions: list[int] = []
        self._buffers: list[memoryview] = []
        self._bytes = 0

    def add(self, position: int, data: memoryview) -> None:
        self._positions.append(position)
        self._buffers.append(data)
        self._bytes += data.nbytes
        if self._bytes >= HASH_TASK_BYTES:
            self.submit()

    def submit(self) -> None:
        """Start hashing what was added since the last task."""
        if self._buffers:
            future = hash_pool().submit(_checksums, self._buffers)
            self.tasks.append((self._positions, future))
            self._positions, self._buffers, self._bytes = [], [], 0

    def results(self) -> Iterator[tuple[int, int]]:
        """(position, checksum) of everything added, waiting for the tasks."""
        self.submit()
        for positions, future in self.tasks:
            yield from zip(positions, future.result(), strict=True)


def _out_of_gpu_memory(exc: BaseException) -> bool:
    """Whether `exc` is CUDA refusing an allocation (torch's, CuPy's, or a raw call's)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    name, module = type(exc).__name__, type(exc).__module__
    if module.startswith(("cupy", "cupy_backends")):
        text = str(exc)
        return name == "OutOfMemoryError" or any(
            words in text for words in ("cudaErrorMemoryAllocation", "CUDA_ERROR_OUT_OF_MEMORY")
        )
    return False


@contextlib.contextmanager
def gpu_memory_errors(what: str) -> Iterator[None]:
    """Report the caller's GPU running out of memory during `what` as ResourceExhausted:
    the caller's device is full, not the store, and nothing stored was touched."""
    try:
        yield
    except Exception as exc:
        if not _out_of_gpu_memory(exc):
            raise
        raise ResourceExhausted(
            f"{what}: the GPU ran out of memory for its scratch buffers ({exc}); free some "
            "GPU memory or move fewer values per call"
        ) from None


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


def copy_bytes(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> None:
    """dst <- src, byte tensors of one size. Host to host goes through numpy (one memcpy):
    torch's CPU copy splits the work over its thread pool, which stalls on a busy host (1
    MiB: 8 ms with two threads against 0.3 ms with one, on the loaded 2-core VM)."""
    if dst.is_cuda or src.is_cuda:
        dst.copy_(src, non_blocking=non_blocking)
    else:
        np.copyto(dst.detach().numpy(), src.detach().numpy())


class CopyRuns:
    """Byte copies enqueued in order, merged where one continues the last: a value whose
    source and destination both start where the previous value's ended (neighbouring
    arena slots into neighbouring rows of one tensor, as a prefix saved in one go and
    loaded in one go has them) extends that copy instead of adding a call. Each copy call
    costs the host 10-20 us, and a long prefix is hundreds of values: on the GPU path the
    host, not PCIe, decides how soon the first token comes. So does `add` itself, once per
    value: it compares addresses only, and makes no tensor view until a run is copied.
    `flush()` before anything that must follow the copies on the stream (an event, a hash)."""

    def __init__(self) -> None:
        self._run: _Run | None = None
        self.calls = 0  # copy calls made

    def add(
        self,
        dst: torch.Tensor,
        dst_at: int,
        src: torch.Tensor,
        src_at: int,
        nbytes: int,
        non_blocking: bool,
    ) -> None:
        """Copy `nbytes` from byte `src_at` of contiguous `src` to byte `dst_at` of
        contiguous `dst`."""
        dst_ptr, src_ptr = dst.data_ptr() + dst_at, src.data_ptr() + src_at
        run = self._run
        if (
            run is not None
            and dst_ptr == run.dst_end
            and src_ptr == run.src_end
            and run.non_blocking == non_blocking
            and _same_allocation(dst, run.dst, run.dst_start)  # neighbours in memory may
            and _same_allocation(src, run.src, run.src_start)  # be two allocations
        ):
            run.nbytes += nbytes
            run.dst_end += nbytes
            run.src_end += nbytes
            return
        self.flush()
        self._run = _Run(
            dst, dst_at, src, src_at, nbytes, dst_ptr + nbytes, src_ptr + nbytes,
            _storage_start(dst), _storage_start(src), non_blocking,
        )  # fmt: skip

    def flush(self) -> None:
        run, self._run = self._run, None
        if run is None or not run.nbytes:
            return
        dst = _byte_span(run.dst, run.dst_at, run.nbytes)
        copy_bytes(dst, _byte_span(run.src, run.src_at, run.nbytes), run.non_blocking)
        self.calls += 1


@dataclass(slots=True)
class _Run:
    """A pending copy: its first destination and source (contiguous tensors) and the byte
    of each it starts at, its bytes so far, the addresses where each side ends, where the
    storage of each side starts (its identity, with the device), and whether it may be
    asynchronous."""

    dst: torch.Tensor
    dst_at: int
    src: torch.Tensor
    src_at: int
    nbytes: int
    dst_end: int
    src_end: int
    dst_start: tuple[int, int]
    src_start: tuple[int, int]
    non_blocking: bool


def _storage_start(t: torch.Tensor) -> tuple[int, int]:
    """(device index or -1, address where `t`'s storage starts): which allocation `t` is
    in, without making a storage object (which costs several times more)."""
    return t.get_device(), t.data_ptr() - int(t.storage_offset()) * t.element_size()


def _same_allocation(t: torch.Tensor, first: torch.Tensor, start: tuple[int, int]) -> bool:
    """Whether `t` lies in the allocation of `first`, which starts at `start`: at once when
    `t` is `first` or a view of the same tensor (rows of one batch), else by address."""
    if t is first:
        return True
    base = t._base
    if base is not None and base is first._base:
        return True
    return _storage_start(t) == start


def _byte_span(t: torch.Tensor, at: int, nbytes: int) -> torch.Tensor:
    """`nbytes` bytes of `t`'s storage from byte `at` of contiguous `t`, as uint8."""
    flat = flat_bytes(t)
    if at == 0 and nbytes == flat.numel():
        return flat
    return flat.as_strided((nbytes,), (1,), flat.storage_offset() + at)


class Header(NamedTuple):
    """What a reader needs of a found value's header."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    checksum: int

    @classmethod
    def of(cls, h: pb.ValueHeader) -> Header:
        return cls(h.dtype, tuple(h.shape), h.nbytes, h.checksum)


@dataclass
class Slice:
    """One found value: its header, and where its bytes are in the host buffer."""

    header: Header
    offset: int
    lease: int = 0  # 0: a private copy, no lease
    pool: int = 0  # the region: 0 the host arena (or private buffer), n gpu pool n

    @property
    def span(self) -> slice:
        """Where the bytes are, as an index into the host buffer."""
        return slice(self.offset, self.offset + self.header.nbytes)


# Values that came as containers: position -> the header the server sent, container bytes.
Containers = dict[int, tuple[pb.ValueHeader, np.ndarray]]


class BlockRefs:
    """Values held readable in place until released (the client renews their leases in the
    background while they are held).

    Index with a list or array of positions (the top-k of a retrieval) to select blocks for
    `KVClient.gather`; a selection shares the leases of the whole set. `found[i]` says
    whether key i was stored; an absent key cannot be selected. Selecting and checking are
    array operations, so a gather of thousands of blocks costs no Python loop.
    """

    def __init__(
        self,
        keys: list[bytes],
        slices: list[Slice | None],
        arena: ArenaMap | None,
        private: torch.Tensor | None,
        expires: float,
        call: int = 0,
        pools: dict[int, Region] | None = None,
        containers: Containers | None = None,
    ) -> None:
        self.keys = keys
        self.call = call  # the call number the leases were taken under, for renewal
        self.slices = slices
        # Values that came as containers (KVClient's decode_codecs): position -> header,
        # container bytes. `get_into` decodes them; a gather cannot select them.
        self.containers = containers or {}
        self.found = [s is not None or i in self.containers for i, s in enumerate(slices)]
        self.arena = arena
        self.pools = pools or {}  # the gpu pools slices may lie in
        self.private = private  # streamed copies, for a client without the arena
        self.expires = expires
        self.released = False
        self.last_gather: Any = None  # event of the latest gather launched from these refs
        self.dtypes = sorted({s.header.dtype for s in slices if s is not None})
        code = {name: i for i, name in enumerate(self.dtypes)}
        n = len(slices)
        self.offsets = np.fromiter((s.offset if s else -1 for s in slices), np.int64, n)
        self.nbytes = np.fromiter((s.header.nbytes if s else 0 for s in slices), np.int64, n)
        self.kinds = np.fromiter((code[s.header.dtype] if s else -1 for s in slices), np.int16, n)
        self.regions = np.fromiter((s.pool if s else 0 for s in slices), np.int32, n)
        self._positions: np.ndarray | None = None  # set on a selection
        self._root: BlockRefs = self

    @property
    def leases(self) -> list[int]:
        return [s.lease for s in self._root.slices if s is not None and s.lease]

    def __len__(self) -> int:
        return len(self.keys) if self._positions is None else int(self._positions.size)

    def __getitem__(self, positions: Sequence[int] | np.ndarray | slice) -> BlockRefs:
        root = self._root
        base = np.arange(len(root.keys)) if self._positions is None else self._positions
        if isinstance(positions, slice):
            picked = base[positions]
        else:
            pos = np.asarray(positions)
            if pos.ndim != 1 or (pos.size and not np.issubdtype(pos.dtype, np.integer)):
                raise InvalidArgument("select blocks with a 1-D list or array of integer positions")
            if pos.size and (pos.min() < -base.size or pos.max() >= base.size):
                raise InvalidArgument(f"block positions must lie within the {base.size} refs")
            picked = base[pos]
        view = BlockRefs.__new__(BlockRefs)
        view.__dict__.update(root.__dict__)
        view._positions = np.ascontiguousarray(picked, np.int64)
        view._root = root
        return view

    def host(self) -> tuple[torch.Tensor, np.ndarray]:
        """The host buffer of region 0, as a tensor and as an array."""
        root = self._root
        if root.arena is not None:
            return root.arena.tensor(), root.arena.array()
        assert root.private is not None
        return root.private, root.private.numpy()

    def region(self, pool: int) -> tuple[torch.Tensor, np.ndarray | None, Region | None]:
        """Region `pool`'s buffer as a tensor, as a host array (None for GPU memory), and
        its mapping (None for a private buffer)."""
        if pool == 0:
            tensor, array = self.host()
            return tensor, array, self._root.arena
        m = self._root.pools[pool]
        return m.tensor(), m.array(), m

    def check_usable(self) -> None:
        root = self._root
        if root.released:
            raise InvalidArgument("these block refs were released; acquire the keys again")
        if time.monotonic() > root.expires:
            raise InvalidArgument(
                "the leases of these block refs have expired (not renewed within the "
                "server's --lease-seconds); acquire the keys again"
            )

    def selection(self) -> tuple[np.ndarray, np.ndarray, int, str]:
        """(offsets, regions, block bytes, dtype) of the selected blocks, checked to be
        gatherable."""
        self.check_usable()
        root = self._root
        pos = slice(None) if self._positions is None else self._positions
        offsets, nbytes, kinds = root.offsets[pos], root.nbytes[pos], root.kinds[pos]
        regions = root.regions[pos]
        if not offsets.size:
            return offsets, regions, VECTOR_BYTES, ""
        if (kinds < 0).any():
            p = int(np.flatnonzero(kinds < 0)[0])
            raise InvalidArgument(f"key #{p} of the selection is not stored; it cannot be gathered")
        if (nbytes != nbytes[0]).any() or (kinds != kinds[0]).any():
            raise InvalidArgument("blocks of one gather must share size and dtype")
        block = int(nbytes[0])
        if block % VECTOR_BYTES or block == 0:
            raise InvalidArgument(
                f"blocks of {block} bytes cannot be gathered: the size must be a positive "
                f"multiple of {VECTOR_BYTES}"
            )
        return offsets, regions, block, root.dtypes[int(kinds[0])]

    def mark_released(self) -> None:
        self._root.released = True


def gather(refs: BlockRefs, out: torch.Tensor, stream: Any = None) -> Any:
    """Launch the gather of `refs` (a selection) into `out`; returns a CUDA event, or None
    when `out` is a CPU tensor (copied by the time this returns).

    Everything is checked before the launch; the offsets come from the server's slices, so
    the kernel is launched without checking them again (this is a per-decode-step call).
    Blocks that all lie in one region take one kernel; a selection spread over the host
    arena and gpu pools takes one per region, each into scratch on `out`'s device, then
    one placement.
    """
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    offsets, regions, block, dtype = refs.selection()
    if not out.is_contiguous():
        raise InvalidArgument("out must be contiguous")
    if dtype and dtype_name(out) != dtype:
        raise InvalidArgument(f"out is {dtype_name(out)} but the blocks hold {dtype}")
    nbytes, k = out.numel() * out.element_size(), offsets.size
    if nbytes < k * block:
        raise InvalidArgument(f"out holds {nbytes} bytes; {k} blocks of {block} need {k * block}")
    dense = flat_bytes(out)
    if out.is_cuda and dense.data_ptr() % VECTOR_BYTES:
        raise InvalidArgument(f"out must be {VECTOR_BYTES}-byte aligned")
    stream = torch_stream(stream, out.device) if out.is_cuda else None  # torch's, not CuPy's
    with gpu_memory_errors("gather"):
        return _gather_regions(refs, offsets, regions, block, dense, stream)


def _gather_regions(
    refs: BlockRefs,
    offsets: np.ndarray,
    regions: np.ndarray,
    block: int,
    dense: torch.Tensor,
    stream: Any,
) -> Any:
    k = offsets.size
    used = np.unique(regions) if k else np.zeros(1, np.int32)
    if used.size == 1:
        event = _gather_region(refs, int(used[0]), offsets, block, dense, stream)
    else:
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            rows = dense[: k * block].view(k, block)
            for r in used:
                picked = np.flatnonzero(regions == r)
                scratch = torch.empty(picked.size * block, dtype=torch.uint8, device=dense.device)
                _gather_region(refs, int(r), offsets[picked], block, scratch, stream)
                where = torch.from_numpy(picked).to(dense.device, non_blocking=True)
                rows.index_copy_(0, where, scratch.view(-1, block))
        event = _recorded(stream)
    if event is not None:
        refs._root.last_gather = event  # release() waits for it before the leases end
    return event


def _recorded(stream: Any) -> Any:
    """A CuPy event recorded on torch `stream` (None without one), like a kernel's."""
    if stream is None:
        return None
    import cupy

    with cupy.cuda.Device(stream.device.index):
        return recorded_event(as_cupy_stream(stream))


def _gather_region(
    refs: BlockRefs, pool: int, offsets: np.ndarray, block: int, dense: torch.Tensor, stream: Any
) -> Any:
    """Gather blocks at `offsets` of one region into the flat byte tensor `dense`: the
    numba twin for a host region into host memory, else one kernel; through scratch on the
    pool's GPU when the region is a pool of another device than `dense`'s."""
    src, host_array, mapping = refs.region(pool)
    ids = offsets // VECTOR_BYTES
    if not dense.is_cuda and host_array is not None:
        gather_blocks_cpu(host_array, ids, dense.numpy(), block, slot_bytes=VECTOR_BYTES)
        return None
    if src.is_cuda and src.device != dense.device:
        scratch = torch.empty(offsets.size * block, dtype=torch.uint8, device=src.device)
        side = torch.cuda.current_stream(src.device)
        if stream is not None:
            side.wait_stream(stream)
        _gather_region(refs, pool, offsets, block, scratch, side)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if stream is not None:
                stream.wait_stream(side)
            dense[: scratch.numel()].copy_(scratch, non_blocking=dense.is_cuda)
        return _recorded(stream)
    if mapping is not None:
        mapping.register_cuda()
    device = src.device.index if src.is_cuda else None
    buffer = DeviceBuffer(src.data_ptr(), src.numel(), device)
    return launch_blocks(
        "gather_blocks", buffer, _device_buffer(dense), ids, block, VECTOR_BYTES, stream
    )


def check_destination(i: int, h: Header | pb.ValueHeader, dst: torch.Tensor) -> None:
    name = dtype_name(dst)
    if name != h.dtype:
        raise InvalidArgument(f"out[{i}] is {name} but the stored value is {h.dtype}")
    if dst.numel() * dst.element_size() != h.nbytes:
        raise InvalidArgument(
            f"out[{i}] holds {dst.numel() * dst.element_size()} bytes but the stored value "
            f"has {h.nbytes} (shape {tuple(h.shape)})"
        )


# Copies are checked (gets) or committed (puts) in groups of about this many bytes, so one
# group is hashed or committed while the copy engine still moves the next.
COMMIT_GROUP_BYTES = 256 << 20
# A copy within a GPU runs ~30x faster than one over PCIe: device-to-device bytes count
# this much less towards a group, or the calls between groups would cost more than the
# copies they overlap.
DEVICE_COPY_DISCOUNT = 32


# A put_from reserves its slots in parts: the first of at most this many bytes (one value
# at least), each later one up to RESERVE_GROWTH times all before it. The copies start after
# one short Reserve, and each later Reserve runs while the copies of the earlier parts do
# (64 values of 32 MiB: Reserves of 4, 12 and 48 values). A Reserve costs ~1.3 ms however
# small (H100 host): the first part's copies (2.4 ms at 55 GB/s) outlast the next one.
FIRST_RESERVE_BYTES = 128 << 20
RESERVE_GROWTH = 3


def reserve_parts(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """[a, b) ranges of values reserved together, in order, covering all of `sizes`."""
    parts: list[tuple[int, int]] = []
    a = done = 0
    limit = FIRST_RESERVE_BYTES
    while a < len(sizes):
        b, part = a + 1, sizes[a]
        while b < len(sizes) and part + sizes[b] <= limit:
            part += sizes[b]
            b += 1
        parts.append((a, b))
        done += part
        a, limit = b, max(FIRST_RESERVE_BYTES, RESERVE_GROWTH * done)
    return parts


def group_weight(nbytes: int, src: torch.Tensor, dst: torch.Tensor) -> int:
    """What a copy of `nbytes` from `src` to `dst` counts towards COMMIT_GROUP_BYTES."""
    return nbytes // DEVICE_COPY_DISCOUNT if src.is_cuda and dst.is_cuda else nbytes


_checksum_streams: dict[int, Any] = {}


def digest_on_side(tensors: list[torch.Tensor], after: Any) -> tuple[Any, Any]:
    """XXH3-64 of GPU `tensors` on a per-device side stream that first waits for `after`
    (the caller's stream, or an event recorded on it); returns the digests and the side
    stream. The caller's stream is
    not held back: the caller makes it wait for the side stream (`wait_stream`) once it has
    enqueued what may run beside the hash. The tensors are marked in use by the side stream,
    so torch's allocator keeps them until it is done."""
    device = tensors[0].device
    side = _checksum_streams.get(device.index)
    if side is None:
        side = _checksum_streams[device.index] = torch.cuda.Stream(device)
    if isinstance(after, torch.cuda.Event):
        side.wait_event(after)
    else:
        side.wait_stream(after)
    marked = set()  # once per allocation: rows of one tensor share it
    for t in tensors:
        start = _storage_start(t)
        if start not in marked:
            marked.add(start)
            t.record_stream(side)
    n = len(tensors)
    ptrs = np.fromiter((t.data_ptr() for t in tensors), np.uint64, n)
    lens = np.fromiter((t.numel() * t.element_size() for t in tensors), np.int64, n)
    return checksum_kernels.xxh3_64_gpu_spans(ptrs, lens, device.index, side), side


@dataclass
class GetLanding:
    """A `get_into` whose copies are enqueued: `wait` finishes them and the checksums."""

    refs: BlockRefs
    dests: list[torch.Tensor]
    marks: Sequence[int] = ()  # positions to record an event at (see `mark_events`)
    event: Any = None  # torch.cuda.Event after the last GPU copy
    # Per mark m, a torch.cuda.Event recorded once the copies of values [0, m) are
    # enqueued (None without a GPU destination): work that needs only those waits for it.
    mark_events: list[Any] = field(default_factory=list)
    hashes: Hashing = field(default_factory=Hashing)
    # Digests of GPU destinations, a batch per ~256 MiB of copies, with their positions.
    digests: list[tuple[list[int], Any]] = field(default_factory=list)
    decoding: Any = None  # kvstore.codecs.values.Decoding of the values sent as containers
    stream: Any = None  # the torch stream the copies are enqueued on, once there is one

    def launch(self, stream: Any) -> None:
        """Check every destination, then enqueue every copy (nothing is copied if any
        destination is wrong).

        Arena bytes are checked as they are copied: on the GPU, from the destination after
        its copy, for GPU tensors (the CPU could not hash them at PCIe speed); on a thread
        pool, from the arena, for the rest. A private copy was checked on arrival.
        """
        slices = self.refs.slices
        containers = self.refs.containers
        for i, (s, dst) in enumerate(zip(slices, self.dests, strict=True)):
            if s is not None:
                check_destination(i, s.header, dst)
            elif i in containers:
                check_destination(i, containers[i][0], dst)
        found = [i for i, s in enumerate(slices) if s is not None]
        cuda = [self.dests[i] for i in [*found, *containers] if self.dests[i].is_cuda]
        devices = {d.device for d in cuda}
        if len(devices) > 1:
            raise InvalidArgument(f"out spans several GPUs ({sorted(map(str, devices))})")
        regions = {s.pool: self.refs.region(s.pool) for s in slices if s is not None}
        if cuda:
            for _, _, mapping in regions.values():
                if mapping is not None:
                    mapping.register_cuda()
        digested: set[int] = set()
        late: list[int] = []  # CPU destinations filled from GPU memory: hashed once copied
        if self.refs.arena is not None or self.refs.pools:  # a private copy was checked
            on_gpu = gpu_hashing() and bool(cuda)
            digested = {i for i in found if on_gpu and _gpu_hashable(self.dests[i])}
            for i in found:
                s = slices[i]
                assert s is not None
                host_array = regions[s.pool][1]
                if i in digested:
                    continue
                if host_array is None:
                    late.append(i)
                else:
                    self.hashes.add(i, host_array[s.span].data)
            self.hashes.submit()  # hashed while this thread copies
        s_ = self.stream = torch_stream(stream, next(iter(devices))) if cuda else None
        batch: list[int] = []  # GPU destinations copied and not yet hashed
        pending = 0
        side = None
        copies = CopyRuns()
        # Decodes run after every copy: with containers, each mark waits for them all.
        marks = [] if containers else list(reversed(self.marks))
        with torch.cuda.stream(s_) if s_ is not None else contextlib.nullcontext():
            for i, (s, dst) in enumerate(zip(slices, self.dests, strict=True)):
                while marks and marks[-1] <= i:
                    marks.pop()
                    copies.flush()
                    self._mark(s_)
                if not s or not s.header.nbytes:
                    continue
                src, host_array, _ = regions[s.pool]
                if dst.is_cuda:
                    copies.add(dst, 0, src, s.offset, s.header.nbytes, non_blocking=True)
                elif host_array is not None:  # one thread: the checksum threads have the rest
                    np.copyto(flat_bytes(dst).numpy(), host_array[s.span])
                else:  # from a gpu pool into host memory
                    flat_bytes(dst).copy_(src[s.span])
                if i in digested:
                    batch.append(i)
                    pending += group_weight(s.header.nbytes, src, dst)
                if pending >= COMMIT_GROUP_BYTES:  # hashed while later copies run
                    copies.flush()
                    side = self._digest(batch, s_)
                    batch, pending = [], 0
            copies.flush()
        if batch:
            side = self._digest(batch, s_)
        for i in late:
            data = flat_bytes(self.dests[i]).numpy().data
            self.hashes.add(i, data)
        if containers:
            self._decode(containers, s_)
        while len(self.mark_events) < len(self.marks):
            self._mark(s_)
        if s_ is not None:
            self.event = torch.cuda.Event()
            self.event.record(s_)
            if side is not None:
                s_.wait_stream(side)  # what the caller does next to them waits for the hash

    def _mark(self, stream: Any) -> None:
        event = None
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
        self.mark_events.append(event)

    def _digest(self, positions: list[int], stream: Any) -> Any:
        """Hash these destinations, once their copies (enqueued on `stream`) are done."""
        digests, side = digest_on_side([self.dests[i] for i in positions], stream)
        self.digests.append((positions, digests))
        return side

    def _decode(
        self, containers: dict[int, tuple[pb.ValueHeader, np.ndarray]], stream: Any
    ) -> None:
        """Start decoding the values that came as containers into their destinations: on
        the GPU (`stream`) for a codec with a GPU decoder and a CUDA destination, on the
        CPU otherwise. Each is checked against the header the server sent first."""
        from kvstore.codecs import ContainerError, decode_header, decode_values

        items = []
        for i, (h, buf) in containers.items():
            try:
                header, _ = decode_header(buf.data)
            except ContainerError as exc:
                raise DataLoss(f"the container for key #{i} is damaged: {exc}") from None
            if (header.dtype, header.shape, header.value_checksum) != (
                h.dtype, tuple(h.shape), h.checksum
            ):  # fmt: skip
                raise DataLoss(f"the container for key #{i} is not the value the server named")
            items.append((buf.data, self.dests[i]))
        try:
            self.decoding = decode_values(items, stream)
        except ContainerError as exc:
            raise DataLoss(f"a container the server sent does not decode: {exc}") from None

    def wait(self) -> list[int]:
        """Block until the copies, decodes and checksums are done; returns the positions
        whose bytes failed their checksum."""
        if self.decoding is not None:
            from kvstore.codecs import ContainerError

            try:
                self.decoding.wait()
            except ContainerError as exc:
                raise DataLoss(f"a container the server sent does not decode: {exc}") from None
        want = [s.header.checksum if s is not None else 0 for s in self.refs.slices]
        bad = [i for i, d in self.hashes.results() if d != want[i]]
        for positions, digests in self.digests:
            got = digests.result()
            bad += [i for i, d in zip(positions, got, strict=True) if d != want[i]]
        if self.event is not None:
            self.event.synchronize()
        return sorted(bad)

    def refill(self, i: int, value: torch.Tensor) -> None:
        """Copy a value read again (after a checksum failure) into its destination."""
        copy_bytes(flat_bytes(self.dests[i]), flat_bytes(value))


def gpu_hashing() -> bool:
    """Whether checksums of GPU tensors can be computed on their GPU (needs CuPy)."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def _gpu_hashable(t: torch.Tensor) -> bool:
    n = t.numel() * t.element_size()
    return bool(t.is_cuda and not checksum_kernels.needs_cpu(n) and t.data_ptr() % 8 == 0)


def _device_buffer(t: torch.Tensor) -> DeviceBuffer:
    return DeviceBuffer(t.data_ptr(), t.numel() * t.element_size(), t.device.index)


@dataclass
class PutGroup:
    """Values of a `put_from` committed together once their copies are done."""

    positions: list[int]
    ids: list[int]
    slices: list[tuple[int, int, int]]  # (region, offset, bytes) of each
    event: Any = None


@dataclass
class PutLanding:
    """A `put_from` whose copies into reserved arena slots are enqueued.

    `groups` commit in order as they land; `rest` are the positions that got no slot and
    are streamed when the put settles. With `gpu`, the writer supplies every checksum
    (`checksums`): GPU values are hashed on their GPU from the source tensors while the
    copy engine moves them; otherwise the server computes checksums from the slots.
    """

    values: list[tuple[bytes, torch.Tensor, str]]
    newest: frozenset[bytes] = frozenset()  # keys of the newest chunks of their sequences
    positions: dict[bytes, int] = field(default_factory=dict)  # first tokens' positions, by key
    call: int = 0
    started: float = 0.0
    stream: Any = None
    regions: dict[int, Region] = field(default_factory=dict)
    gpu: bool = False
    groups: list[PutGroup] = field(default_factory=list)
    rest: list[int] = field(default_factory=list)
    unused: list[int] = field(default_factory=list)  # reservations given back at commit
    digests: Any = None  # kvstore.kernels.checksum.Digests of the positions in `digested`
    digested: dict[int, int] = field(default_factory=dict)  # position -> index in digests
    _digest_values: list[int] | None = None

    _sources_ready: Any = None  # event after which the sources may be hashed
    _side: Any = None  # the stream hashing the sources, joined by `finish`

    def begin(self, regions: dict[int, Region], stream: Any) -> None:
        """Get ready to copy into slots of `regions` (0 the host arena, n gpu pool n, each
        mapped here): pick the stream and start hashing every GPU source on its GPU, beside
        the copies `place` enqueues as reservations come in."""
        srcs = [t for _, t, _ in self.values]
        cuda = {t.device for t in srcs if t.is_cuda}
        if len(cuda) > 1:
            raise InvalidArgument(f"values span several GPUs ({sorted(map(str, cuda))})")
        self.regions = regions
        if not cuda:
            return
        for mapping in regions.values():
            mapping.register_cuda()
        self.stream = torch_stream(stream, next(iter(cuda)))
        self.gpu = gpu_hashing()
        if self.gpu:
            self._sources_ready = torch.cuda.Event()
            self._sources_ready.record(self.stream)

    def _hash_sources(self) -> None:
        """Start hashing the GPU sources (once): after the first copies are enqueued, so
        that the copy engine does not wait for the hash kernels' launch."""
        ready, self._sources_ready = self._sources_ready, None
        srcs = [t for _, t, _ in self.values]
        hashed = [i for i, t in enumerate(srcs) if _gpu_hashable(t)]
        if hashed:
            self.digested = {p: j for j, p in enumerate(hashed)}
            self.digests, self._side = digest_on_side([srcs[i] for i in hashed], ready)

    def place(self, first: int, reservations: Sequence[pb.Reservation]) -> None:
        """Enqueue the copies of values `first`, `first + 1`, ... into their reserved slots;
        a value without a usable slot is streamed when the put settles. Commit groups of
        about COMMIT_GROUP_BYTES end with each call."""
        group = PutGroup([], [], [])
        pending = 0
        copies = CopyRuns()
        with (
            torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        ):
            for i, r in enumerate(reservations, first):
                t = self.values[i][1]
                n = t.numel() * t.element_size()
                m = self.regions.get(r.gpu_pool)
                if not (r.id and m is not None and m.holds(r.arena_dev, r.arena_ino, r.offset, n)):
                    self.unused.extend([r.id] if r.id else [])
                    self.rest.append(i)
                    continue
                dst = m.tensor()
                if n:
                    copies.add(dst, r.offset, t, 0, n, non_blocking=t.is_cuda or dst.is_cuda)
                group.positions.append(i)
                group.ids.append(r.id)
                group.slices.append((r.gpu_pool, r.offset, n))
                pending += group_weight(n, t, dst)
                if pending >= COMMIT_GROUP_BYTES:
                    copies.flush()
                    self._close(group)
                    group, pending = PutGroup([], [], []), 0
            copies.flush()
            if group.positions:
                self._close(group)
        if self._sources_ready is not None:
            self._hash_sources()

    def finish(self) -> None:
        """Every copy is enqueued: the caller's stream waits for the hash of the sources
        (the caller may overwrite them after it)."""
        if self._side is not None:
            self.stream.wait_stream(self._side)
            self._side = None

    def _close(self, group: PutGroup) -> None:
        if self.stream is not None:
            group.event = torch.cuda.Event()
            group.event.record(self.stream)
        self.groups.append(group)

    def checksums(self, group: PutGroup) -> list[int]:
        """Wait for `group`'s copies; every value's checksum, from the GPU's digests or
        hashed from its slot."""
        if group.event is not None:
            group.event.synchronize()
        if self.digests is not None and self._digest_values is None:
            self._digest_values = self.digests.result()
        sums = []
        for p, (pool, offset, n) in zip(group.positions, group.slices, strict=True):
            j = self.digested.get(p)
            if j is not None and self._digest_values is not None:
                sums.append(self._digest_values[j])
                continue
            mapping = self.regions[pool]
            view = mapping.array()
            data = view[offset : offset + n] if view is not None else mapping.copy(offset, n)
            sums.append(checksum(data.data))
        return sums


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
            copy_bytes(buf[off : off + v.numel() * v.element_size()], flat_bytes(v))
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

    def __init__(
        self,
        future: concurrent.futures.Future[Any] | None = None,
        event: Any = None,
        keep: Any = None,
        marks: Sequence[Any] = (),
    ):
        self._future = future
        self._event = event
        self._keep = keep  # what the copy reads from (a gather's refs) lives as long
        self.marks = list(marks)
        """For a `get_into(..., marks=...)`: per mark, a torch.cuda.Event recorded on the
        stream once the copies before that position are enqueued (None for CPU
        destinations, filled before the call returns). A stream may wait for one
        (`wait_event`) to use those values while later ones still copy; their checksums
        are checked by `wait()`, so the result of such work stands only once it passes."""

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
