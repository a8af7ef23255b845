"""The tier manager: one index over the gpu, cpu and ssd tiers, and the rules that move values.

Primitives:
- `begin_put` reserves room for a value and returns a `PutReservation`; the caller fills it
  piece by piece and `commit()`s. Nothing is visible before commit, and a commit whose bytes
  do not match the announced length and checksum is refused.
- `get` returns a `ReadLease`: a view of the value that stays valid (its slot is neither
  evicted nor reused) until `release()`.
- `lookup`, `exists`, `delete`, `pin`, `unpin`, `stats`, `entries`.

Placement: a put lands in the fastest tier with room. A full memory tier evicts by its
policy (`--eviction`: LRU, or GDSF for reuse counts with aging), demoting each victim to
the next tier unless a copy is already there; the last tier drops its victims. Reading a
value that is only on ssd promotes it to cpu and keeps the ssd copy, so evicting it again
costs nothing. Pinned and leased values are never evicted.
When nothing can make room, the caller gets `ResourceExhausted`.

The gpu tier (one pool per GPU) holds values that same-host clients write from their GPU
into the pool of that GPU (`reserve_in_arena(..., pool=n)`); values that arrive as bytes
start in cpu. A full pool makes puts land in cpu instead of waiting: a demoter thread keeps
every pool below `GPU_HIGH_WATER` by copying its least recently used values to cpu on the
pool's own stream, checking each copy against its checksum, and only then swapping the
entry over. Reads are not promoted into a pool: a GPU reader already holds its own copy.
A `--quota gpu[GLOB]=SIZE` group is held the same way across all pools: a put that would
pass the group's quota lands in cpu, and the demoter keeps the group below
`GPU_HIGH_WATER` of its quota by moving that group's own least recent values to cpu.

An entry has at most one memory copy: at `place` 0 (the cpu arena) or n (gpu pool n).

Every value carries its xxh3-64 checksum from the client; it is verified when the value
arrives, on every read from the cpu tier and on every read from the ssd tier. A mismatch
drops the entry and raises `DataLoss`.

Thread safety: one lock guards the index, the allocator and the tiers. Bytes move outside
it: a reservation's slot and a lease's slot belong to their holder until commit/release.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import fnmatch
import itertools
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kvstore.codecs.container import (
    CODEC_RAW,
    ContainerError,
    MissingContext,
    ValueHeader,
    checksum,
    decode_stored,
    encode_header,
)
from kvstore.config import QuotaRule, ServerConfig, codec_rule, quota_rule
from kvstore.dtypes import expected_nbytes
from kvstore.errors import (
    DataLoss,
    InvalidArgument,
    KVStoreError,
    Overloaded,
    ResourceExhausted,
    Undecodable,
)
from kvstore.events import EventHub, EventKind, Watcher
from kvstore.gpu import cuda_device_count
from kvstore.keys import KEY_BYTES, MAX_POSITION
from kvstore.policy import POLICIES, EvictionPolicy
from kvstore.threads import (
    GPU_ENCODE_THREADS,
    gpu_encode_pool,
    host_pool,
    one_core_kernels,
    short_gil_turns,
)
from kvstore.tiers.base import Buffer, MemoryTier, Tier, TierError, TierFull
from kvstore.tiers.gpu import (
    CudaPool,
    GpuPool,
    TwinPool,
    register_host_memory,
    unregister_host_memory,
)
from kvstore.tiers.host import HostArena, default_arena_path
from kvstore.tiers.slab import Slot
from kvstore.tiers.ssd import LmdbTier

if TYPE_CHECKING:
    from kvstore.codecs.base import Codec
    from kvstore.remote_writes import PendingWrite, WriteQueue
    from kvstore.tiers.remote import RemoteCounters, RemoteTier, RemoteValue

log = logging.getLogger(__name__)

NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@=+-]{0,254}$")

EntryId = tuple[str, bytes]


def check_namespace(namespace: str) -> None:
    if not NAMESPACE_RE.fullmatch(namespace):
        raise InvalidArgument(
            f"namespace {namespace[:80]!r} is not valid: 1-255 characters from letters, digits "
            "and . _ : / @ = + -, starting with a letter or digit "
            "(e.g. 'llama-3-8b/bf16/tp0of1')"
        )


def check_key(key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise InvalidArgument(f"key must be {KEY_BYTES} bytes, got {len(key)}")


def tier_of(slot: Slot | None, place: int) -> str:
    """The tier a value is in: its memory slot's (place 0 the cpu arena, n gpu pool n), else
    ssd."""
    if slot is None:
        return "ssd"
    return "gpu" if place else "cpu"


@dataclass(eq=False, slots=True)
class Entry:
    namespace: str
    key: bytes
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    checksum: int
    created_ns: int
    slot: Slot | None = None  # the memory copy, if any, in `place`
    place: int = 0  # 0: the cpu arena; n: gpu pool n
    on_ssd: bool = False  # whether the ssd tier holds a copy
    pins: int = 0
    readers: int = 0  # leases on the memory copy (and the demoter while it copies)
    hits: int = 0
    # Memory copies dropped while leased, as (place, slot): freed when the last lease ends.
    retired: list[tuple[int, Slot]] | None = None
    # Checksum of the value the ssd copy decodes to: `checksum` unless a lossy codec wrote
    # it; the entry takes it when the ssd copy becomes its only one (`_only_on_ssd`).
    ssd_sum: int = 0
    ssd_codec: int = 0  # the codec the ssd copy was stored through
    cost: float = 1.0  # recompute cost per byte, for cost-aware eviction (not persisted)
    # The newest chunk of its sequence when put (`Codec.for_newest` codes it for ssd and
    # remote), and its first token's position in that sequence, -1 if not given
    # (`Codec.for_position`); not persisted: they only matter until it is encoded.
    newest: bool = False
    position: int = -1
    # The remote tier holds it (fetched from there, or written there by this node): never
    # written to remote again.
    on_remote: bool = False

    @property
    def eid(self) -> EntryId:
        return (self.namespace, self.key)

    @property
    def tier(self) -> str:
        return tier_of(self.slot, self.place)

    @property
    def tiers(self) -> tuple[str, ...]:
        """Every tier holding a copy, fastest first."""
        if self.slot is None:
            return ("ssd",) if self.on_ssd else ()
        return (self.tier, "ssd") if self.on_ssd else (self.tier,)

    def header(self) -> ValueHeader:
        return ValueHeader(
            self.dtype, self.shape, self.nbytes, self.checksum, created_ns=self.created_ns
        )


@dataclass
class TierCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    promotions: int = 0
    demotions: int = 0


@dataclass
class WriterCounters:
    """How values went from the cpu tier to ssd: copied ahead of eviction by the ssd writer
    (`--ssd-write-ahead`), or written by the eviction that needed their room because the
    writer had not reached them (under the lock, while the put that needed it waited); and
    where the writer encoded the values it copied (`--encode-gpu`); and the seconds it
    spent writing encoded values to ssd, and waiting for values being encoded (much
    waiting while it has values to copy: the encoders, not ssd, bound demotion)."""

    ahead: int = 0
    at_eviction: int = 0
    encoded_gpu: int = 0
    encoded_host: int = 0
    write_seconds: float = 0.0
    wait_seconds: float = 0.0


@dataclass
class TierStats:
    name: str
    entries: int
    used_bytes: int
    capacity_bytes: int
    counters: TierCounters


@dataclass
class CodecBytes:
    """What the ssd tier's writes through one codec took in and put out."""

    raw_bytes: int = 0
    encoded_bytes: int = 0


@dataclass
class QuotaUsage:
    """One `--quota` rule: what its namespaces hold in its tier, and may hold."""

    tier: str
    namespaces: str  # the rule's glob
    used_bytes: int
    quota_bytes: int


@dataclass
class RemoteStats:
    """The remote tier since the server started."""

    connected: bool
    counters: RemoteCounters
    queued_writes: int  # values waiting to be written
    queued_bytes: int
    dropped_writes: int  # pending writes dropped because the queue was full


@dataclass
class StoreStats:
    tiers: list[TierStats]
    entries: int
    pinned: int
    leases: int
    codecs: dict[str, CodecBytes] = field(default_factory=dict)
    """By codec name ("raw" for values stored as they are), since the server started."""
    quotas: list[QuotaUsage] = field(default_factory=list)
    remote: RemoteStats | None = None
    writer: WriterCounters = field(default_factory=WriterCounters)


class PutReservation:
    """Room for one value; fill `buffer` (or call `write`) and then `commit` or `abort`.

    A slot in a gpu pool (`pool` set) has no host `buffer`: a same-host client fills it
    through its own mapping of the pool.
    """

    def __init__(
        self,
        store: Store,
        entry: Entry,
        slot: Slot | None,
        buffer: memoryview | None,
        staged: int,
        place: int = 0,
    ) -> None:
        self._store = store
        self.entry = entry
        self.slot = slot
        self.place = place  # of the slot: 0 the cpu arena, n gpu pool n
        self.buffer = buffer
        self.filled = 0
        self._staged = staged
        self._state = "open"  # open -> committing -> done, or open -> done (abort)
        self._checked = False

    @property
    def tier(self) -> str:
        return tier_of(self.slot, self.place)

    def write(self, data: bytes | memoryview) -> None:
        if self.buffer is None:
            raise InvalidArgument("a gpu pool slot is written by the client, not sent")
        end = self.filled + len(data)
        if end > len(self.buffer):
            raise InvalidArgument(
                f"value {self.entry.key.hex()[:16]}... sent more than the {len(self.buffer)} "
                "bytes its header announced"
            )
        self.buffer[self.filled : end] = data
        self.filled = end

    def written(self) -> None:
        """Mark the slot as filled by someone else (a same-host client through its mapping)."""
        self.filled = self.entry.nbytes

    def _bytes(self) -> memoryview:
        if self.buffer is not None:
            return self.buffer
        assert self.slot is not None
        return memoryview(self._store.pool(self.place).read(self.slot, self.entry.nbytes))

    def check(self, *, compute: bool = False) -> None:
        """Checksum the filled buffer ahead of `commit`, which then does not hash it again;
        safe to run for many reservations in parallel. With `compute`, the value takes the
        checksum of its bytes, for a writer that could not hash them (a GPU copy);
        otherwise a mismatch with the announced checksum raises `DataLoss`."""
        digest = checksum(self._bytes())
        if compute:
            self.entry.checksum = digest
        elif digest != self.entry.checksum:
            raise DataLoss(
                f"value {self.entry.key.hex()[:16]}... arrived with a different checksum "
                "than its header announced; nothing was stored"
            )
        self._checked = True

    def declare(self, digest: int) -> None:
        """Take `digest` as the value's checksum, as computed by the writer where its bytes
        were (a GPU); readers check it, so a wrong one costs the value, not correctness."""
        self.entry.checksum = digest
        self._checked = True

    def commit(self) -> str:
        """Make the value visible; returns the tier it landed in.

        On any failure the reserved room is freed and nothing becomes visible.
        """
        with self._store._lock:
            if self._state != "open":
                raise RuntimeError(f"reservation already {self._state}")
            self._state = "committing"  # abort() from another thread now leaves it alone
        try:
            if self.filled != self.entry.nbytes:
                raise InvalidArgument(
                    f"value {self.entry.key.hex()[:16]}... ended after {self.filled} of "
                    f"{self.entry.nbytes} bytes; nothing was stored"
                )
            if not self._checked:
                self.check()
            return self._store._commit(self)
        except BaseException:
            self._store._abort(self)
            raise
        finally:
            self._state = "done"
            self._release_staging()

    def abort(self) -> None:
        """Give the room back; a no-op once committed, committing or aborted."""
        with self._store._lock:
            if self._state != "open":
                return
            self._state = "done"
        self._store._abort(self)
        self._release_staging()

    def _release_staging(self) -> None:
        if self._staged:
            self._store._unstage(self._staged)
            self._staged = 0


@dataclass
class _Promotion:
    """An ssd read under way outside the lock (`Store._begin_ssd_read`): the cpu slot it
    decodes into, or None for a private copy (staged)."""

    slot: Slot | None


class ReadLease:
    """A stored value held readable until `release()`.

    `view` is its bytes in host memory: its cpu slot or a staged copy. A lease on a gpu pool
    slot has no `view`; `offset` and `pool` say where the value lies for a client that maps
    the pool.
    """

    def __init__(
        self,
        store: Store,
        entry: Entry | None,
        view: memoryview | None,
        header: ValueHeader,
        tier: str,
        encoded: bool = False,
    ) -> None:
        self._store = store
        self._entry = entry  # set when the lease holds the entry's memory slot
        self.view = view
        # `view` is the value's container, for a reader that decodes it (Store.get).
        self.encoded = encoded
        # Where the value lies in the host arena (pool 0) or a gpu pool; None for a copy.
        self._slot = entry.slot if entry is not None else None
        self.offset = self._slot.offset if self._slot is not None else None
        self.pool = entry.place if entry is not None else 0
        self.header = header
        self.tier = tier
        self._staged = 0 if entry is not None or view is None else len(view)
        self._released = False
        with store._lock:
            store._leases += 1

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._store._release(self._entry, self._staged)

    def release_reported_corrupt(self) -> bool:
        """Release a lease whose reader found the bytes corrupt: check them, and drop the
        copy if they are. Returns whether they were corrupt."""
        if self._released:
            return False
        data: memoryview | bytearray | None = self.view
        if data is None:
            assert self._slot is not None
            data = self._store.pool(self.pool).read(self._slot, self.header.value_len)
        corrupt = checksum(data) != self.header.value_checksum
        self._released = True
        self._store._release(self._entry, self._staged, corrupt=corrupt)
        return corrupt

    def __enter__(self) -> ReadLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(eq=False)
class _Slots:
    """One memory tier's (or gpu pool's) bookkeeping: its memory, its entries' recency, and
    which entries live on each page (a page is freed whole when all of them are evictable)."""

    mem: MemoryTier
    policy: EvictionPolicy[EntryId]
    pages: dict[int, set[Entry]] = field(default_factory=dict)


# A cpu allocation evicts an entry of its own size class only from among this many least
# recently used entries; past them it frees the page of the oldest one.
EXACT_FIT_WINDOW = 64
# The tiers an index entry lives on, fastest first (hits and misses are counted down them).
_INDEX_TIERS = ("gpu", "cpu", "ssd")
# The remote writer sends pending writes in batches of about this many bytes.
REMOTE_WRITE_BATCH_BYTES = 64 << 20
# The demoter keeps each gpu pool at most this full, so puts from GPU clients find room
# without waiting for a copy, and copies in batches of about DEMOTE_BATCH_BYTES.
GPU_HIGH_WATER = 0.85
GPU_LOW_WATER = 0.70
DEMOTE_BATCH_BYTES = 256 << 20
# The ssd writer (`--ssd-write-ahead`) has at most this many values, about this many
# bytes, encoding or waiting to be written at a time, and chooses more as each job's are
# written: a value for each host thread several times over. Measured on an H200 host
# (SmolLM2 chunks, cachegen level 1, rounds that waited for their last write before
# choosing more, against this): host threads 1.2 -> 1.4 GB/s, --encode-gpu 2.2 -> 2.35.
WRITE_AHEAD_VALUES = 64
WRITE_AHEAD_BYTES = 128 << 20
# Encoding on a GPU (`--encode-gpu`), it has up to this many values, this many bytes, in
# flight: several of its batches (`gpu_batch_bytes`), so that as one is written the
# values chosen next fill whole batches of one shape; at 128 MiB, after the first ones,
# a batch was what one job's writing had freed, split by shape: mostly single values.
# H200, 88 SmolLM2 chunks of four shapes (cachegen-x, 64 MiB batches): 1.9 -> 4.5-5.2 GB/s
# (two machines); 256-token chunks only, 6.0 and 5.6-6.8: no loss where batches were full.
# Only GPU_ENCODE_THREADS batches hold GPU memory at a time.
WRITE_AHEAD_GPU_VALUES = 256
WRITE_AHEAD_GPU_AHEAD_BYTES = 512 << 20
# On a GPU (`--encode-gpu`) it encodes them in batches of about this many bytes (unless the
# codec says, `gpu_batch_bytes`), `kvstore.threads.GPU_ENCODE_THREADS` batches at a time:
# the batches after them wait, so that the first ones finish, and their LMDB writes run,
# while the rest encode. Measured on an H200 host (SmolLM2 chunks of 5.4 MB): 32 MiB two
# at a time 2.1 GB/s; 16 MiB two / four at a time 1.75 / 1.7; one at a time 1.5.
WRITE_AHEAD_GPU_BYTES = 32 << 20
# A GPU batch that is not full goes anyway once this many bytes of values for the GPU
# were chosen after its first (`_GpuBatches.overdue`): a shape of its own (a prefix's last
# chunk, a rare token count) would otherwise wait for the writer's whole window, at the
# front of the eviction order, where a put's eviction would encode it under the lock. (A
# window smaller than this bounds the wait already: its last partial batches go once the
# writer has chosen all of it. A quarter of the window as the bound instead split even
# full batches of the common shape in small arenas.)
WRITE_AHEAD_GPU_GATHER_BYTES = 512 << 20
# CuPy keeps the batches' device and pinned scratch cached between them (a 32 MiB batch
# takes about six times its input on the GPU); the writer gives it back once it has not
# encoded on the GPU for this long, not after every call: allocating it all again for each
# call cost ~20% of a GPU demotion (H100 host, 950 MB of SmolLM2 chunks in one call: 3.1-3.6
# GB/s releasing at its end, 4.1-4.2 with the pools kept from the call before).
GPU_SCRATCH_IDLE_S = 2.0
# The retry hint of a call refused because the staging buffers are full: they empty as
# values in flight reach ssd or their readers, within milliseconds.
STAGING_RETRY_S = 0.05


def gpu_batch_bytes(codec: Codec) -> int:
    """The bytes of values the ssd writer hands `codec`'s GPU encoder at most in a batch:
    the codec's `GPU_BATCH_BYTES`, else WRITE_AHEAD_GPU_BYTES."""
    return codec.GPU_BATCH_BYTES or WRITE_AHEAD_GPU_BYTES


@dataclass
class _AheadQueue:
    """One `write_ahead` call's values to encode: those found in the window and not taken
    yet (in eviction order), and every value found so far (each is tried once a call)."""

    queue: collections.deque[EntryId] = field(default_factory=collections.deque)
    tried: set[EntryId] = field(default_factory=set)


_Part = list[tuple[Entry, Slot]]  # values the ssd writer encodes in one job


@dataclass
class _GpuBatches:
    """The ssd writer's values for the `--encode-gpu` GPU, gathered into batches the GPU
    encoder takes in one call: values whose codecs encode there together
    (`Codec.gpu_batch`) of one shape and dtype, up to `gpu_batch_bytes`. A batch that is
    full goes at once; one that is not waits for more values of its shape while the GPU
    has work, and goes when it has less (`write_ahead`) or once it is `overdue`: otherwise
    what one job's writing frees, chosen again and split by shape, went as batches of a
    value or two (on an H200 host, 1.9 GB of SmolLM2 chunks of four shapes: after the
    first 512 MiB, single values of 7 ms each, 1.5 GB/s in all)."""

    batches: dict[Hashable, tuple[_Part, list[Codec]]] = field(default_factory=dict)
    chosen: int = 0  # bytes of every value added
    since: dict[Hashable, int] = field(default_factory=dict)  # `chosen` at a batch's first

    def add(
        self, key: Hashable, e: Entry, slot: Slot, codec: Codec
    ) -> tuple[_Part, list[Codec]] | None:
        """Add `e` to its batch (`key`); the batch, taken out, once it holds as many
        values as fit (of one shape: all of one size, at least one)."""
        self.since.setdefault(key, self.chosen)
        self.chosen += e.nbytes
        part, codecs = self.batches.setdefault(key, ([], []))
        part.append((e, slot))
        codecs.append(codec)
        if len(part) < max(1, gpu_batch_bytes(codec) // max(e.nbytes, 1)):
            return None
        return self._take(key)

    def overdue(self) -> list[tuple[_Part, list[Codec]]]:
        """The batches, taken out oldest first, whose first value has had
        WRITE_AHEAD_GPU_GATHER_BYTES of values added after it."""
        late = [
            k for k, at in self.since.items() if self.chosen - at >= WRITE_AHEAD_GPU_GATHER_BYTES
        ]
        return [self._take(k) for k in late]

    def take_largest(self) -> tuple[_Part, list[Codec]]:
        """The batch holding the most bytes, taken out (there is one)."""
        key = max(self.batches, key=lambda k: sum(e.nbytes for e, _ in self.batches[k][0]))
        return self._take(key)

    def _take(self, key: Hashable) -> tuple[_Part, list[Codec]]:
        del self.since[key]
        return self.batches.pop(key)

    def parts(self) -> list[_Part]:
        """The values of every batch still gathering."""
        return [part for part, _ in self.batches.values()]


class _FetchSink:
    """Room for values read from the remote tier (`kvstore.tiers.remote.PayloadSink`): a
    put reservation each, which a raw value is read into directly; an encoded one is read
    into a buffer of its own and decoded into the reservation afterwards."""

    def __init__(self, store: Store, namespace: str, keys: Sequence[bytes]) -> None:
        self._store, self._namespace, self._keys = store, namespace, keys
        self.reservations: dict[int, PutReservation] = {}
        self.encoded: set[int] = set()

    def buffer(self, index: int, header: ValueHeader) -> memoryview | None:
        h, key = header, self._keys[index]
        try:
            res = self._store._begin(
                self._namespace, key, h.dtype, h.shape, h.value_len, h.value_checksum, False
            )
        except (InvalidArgument, ResourceExhausted) as exc:
            log.warning("remote value %s/%s not taken: %s", self._namespace, key.hex()[:16], exc)
            return None
        assert res is not None and res.buffer is not None
        self.reservations[index] = res
        raw = h.codec == CODEC_RAW and h.payload_len == h.value_len
        if raw and h.payload_checksum == h.value_checksum:
            return res.buffer
        self.encoded.add(index)
        # Not a bytearray: that zero-fills on this (the calling) thread, one value after
        # another; untouched pages are filled by the reads, on their threads.
        return np.empty(h.payload_len, np.uint8).data

    def discard(self, index: int) -> None:
        res = self.reservations.pop(index, None)
        if res is not None:
            res.abort()


class Store:
    """Index plus tiers; see the module docstring for the rules."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._lock = threading.RLock()
        self._index: dict[EntryId, Entry] = {}
        self.cpu: HostArena | None = None
        self.ssd: LmdbTier | None = None
        self.remote: RemoteTier | None = None
        self._remote_queue: WriteQueue | None = None
        self._remote_writer: threading.Thread | None = None
        self.pools: dict[int, GpuPool] = {}
        self._policy: dict[str, EvictionPolicy[EntryId]] = {}
        self._counters: dict[str, TierCounters] = {}
        self._codec_bytes: dict[str, CodecBytes] = {}
        # Copies found corrupt (checksum, unreadable header, lost record) and dropped, by
        # the tier they were in; what a restart after a crash found counts under ssd.
        self.corrupt: dict[str, int] = {t: 0 for t in config.tiers}
        # Why remote values were kept undecoded (a maps digest this process lacks): each
        # reason is logged as a warning once, then at debug level (a server without the
        # maps would otherwise log one warning per value it fetches).
        self._kept_reasons: set[str] = set()
        self._mem: dict[int, _Slots] = {}  # by place: 0 the cpu arena, n gpu pool n
        self._staging_used = 0
        self._leases = 0
        self._dirty = False
        self._registered: list[int] = []  # host memory pinned for copies from gpu pools
        self._encode_device: int | None = None  # where the ssd writer encodes (--encode-gpu)
        self._gpu_scratch_held = False  # the ssd writer encoded on the GPU since its last release
        self._gpu_used_at = 0.0  # when it last did (time.monotonic())
        self._writer = WriterCounters()
        self._demoter: threading.Thread | None = None
        self._wake = threading.Event()
        self._ssd_writer: threading.Thread | None = None
        self._write_wake = threading.Event()
        self._write_ahead_refused = False  # the ssd writer's last write was refused
        self._closing = False
        # KV events (Watch): published under the lock, so in the order changes happen.
        self.events = EventHub(config.max_watchers)
        # By tier (ssd, remote): (namespace glob or None for every namespace, codec), globs
        # first.
        rules = [codec_rule(r) for r in config.codec]
        if rules:
            from kvstore.codecs.base import codec_from_spec  # torch: only with codec rules
        self._codecs: dict[str, list[tuple[str | None, Codec]]] = {
            tier: [
                (glob, codec_from_spec(spec))
                for t, glob, spec in sorted(rules, key=lambda r: r[1] is None)
                if t == tier
            ]
            for tier in ("ssd", "remote")
        }
        # (tier, namespace) a codec could not take (logged once).
        self._codec_refused: set[tuple[str, str]] = set()
        # --quota rules, in order (the first of a tier matching a namespace is its group),
        # and the bytes of values each group holds in the rule's tier.
        self._quotas: list[QuotaRule] = [quota_rule(r) for r in config.quota]
        self._quota_used = [0] * len(self._quotas)
        if "ssd" in config.tiers:  # counted from zero, so a dashboard's rate() has a series
            for name in ["raw", *(codec.name for _, codec in self._codecs["ssd"])]:
                self._codec_bytes.setdefault(name, CodecBytes())
        config.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            if "gpu" in config.tiers:
                self._open_gpu_pools()
            if "cpu" in config.tiers:
                self.cpu = HostArena(default_arena_path(config.data_dir), config.cpu_bytes)
                self._add_tier("cpu")
                self._mem[0] = _Slots(self.cpu, self._policy["cpu"])
            if "ssd" in config.tiers:
                self.ssd = LmdbTier(config.ssd_path, config.ssd_bytes, config.durability)
                self._add_tier("ssd")
                self._rebuild_from_ssd()
            if "remote" in config.tiers:
                self._open_remote()
            self._encode_device = self._pick_encode_device()
            if self._encode_device is not None:
                short_gil_turns()  # its batches encode side by side (GPU_ENCODE_THREADS)
            if self.cpu is not None and self.ssd is not None and config.ssd_write_ahead > 0:
                self._ssd_writer = threading.Thread(
                    target=self._write_ahead_forever, name="kvstore-ssd-writer", daemon=True
                )
                self._ssd_writer.start()
            if self.pools:
                assert self.cpu is not None  # the config requires cpu below gpu
                cuda = [p for p in self.pools.values() if isinstance(p, CudaPool)]
                if cuda:  # demotions copy into the arena asynchronously only if it is pinned
                    self._registered.append(register_host_memory(self.cpu.whole(), cuda[0].ordinal))
                self._demoter = threading.Thread(
                    target=self._demote_forever, name="kvstore-demoter", daemon=True
                )
                self._demoter.start()
            if self._encode_device is not None and self.cpu is not None and not self._registered:
                # The ssd writer's copies to the GPU run at full speed only from pinned memory.
                self._registered.append(register_host_memory(self.cpu.whole(), self._encode_device))
        except BaseException:
            self.close()  # never leave an arena behind in /dev/shm
            raise
        self.max_value_bytes = config.max_value_bytes
        if self.ssd is None and self.cpu is not None:
            # Without a disk tier nothing larger than one cpu slot can ever be stored.
            self.max_value_bytes = min(self.max_value_bytes, self.cpu.max_value_bytes)

    def _open_remote(self) -> None:
        from kvstore.remote_writes import WriteQueue
        from kvstore.tiers.remote import RemoteTier

        cfg = self.config
        self.remote = RemoteTier(
            cfg.remote,
            piece_bytes=cfg.remote_piece_bytes,
            timeout_s=cfg.remote_timeout,
            ttl_s=cfg.remote_ttl or None,
            backoff_s=cfg.remote_backoff,
            password=cfg.remote_password,
            workers=cfg.remote_workers,
        )
        if cfg.remote_write != "off":
            self._remote_queue = WriteQueue(cfg.remote_queue_bytes)
            self._remote_writer = threading.Thread(
                target=self._write_remote_forever, name="kvstore-remote-writer", daemon=True
            )
            self._remote_writer.start()

    def _open_gpu_pools(self) -> None:
        cfg = self.config
        self._add_tier("gpu")
        if cfg.gpu_twin:
            twin = Path(f"{default_arena_path(cfg.data_dir)}-gpu1")
            self.pools[1] = TwinPool(1, twin, cfg.gpu_bytes)
        else:
            count, why = cuda_device_count()
            if count == 0:
                raise RuntimeError(f"--tiers gpu needs a CUDA GPU, but {why}")
            for ordinal in range(count):  # each kept at once: close() frees it if a later fails
                self.pools[ordinal + 1] = CudaPool(ordinal + 1, ordinal, cfg.gpu_bytes)
        for n, p in self.pools.items():
            # One recency order per pool: each pool is demoted on its own.
            self._mem[n] = _Slots(p, POLICIES[self.config.eviction]())

    def _pick_encode_device(self) -> int | None:
        """The CUDA GPU the ssd writer encodes on (`--encode-gpu`), or None for host threads."""
        choice = self.config.encode_gpu
        if choice == "off" or self.ssd is None or self.cpu is None:
            return None
        if choice == "auto":
            cuda = [p for p in self.pools.values() if isinstance(p, CudaPool)]
            return cuda[0].ordinal if cuda else None
        count, why = cuda_device_count()
        if int(choice) >= count:
            raise RuntimeError(
                f"--encode-gpu {choice} names CUDA GPU {choice}, but "
                + (f"there are {count}" if count else why)
            )
        return int(choice)

    def pool(self, place: int) -> GpuPool:
        """Gpu pool number `place`; InvalidArgument if there is none."""
        p = self.pools.get(place)
        if p is None:
            raise InvalidArgument(
                f"gpu pool {place} does not exist; this server has "
                + (f"pools {sorted(self.pools)}" if self.pools else "no gpu tier")
            )
        return p

    def _add_tier(self, name: str) -> None:
        self._policy[name] = POLICIES[self.config.eviction]()
        self._counters[name] = TierCounters()

    def _rebuild_from_ssd(self) -> None:
        assert self.ssd is not None
        started = time.monotonic()
        found: list[Entry] = []
        last_report = started
        for namespace, key, header in self.ssd.scan():
            found.append(
                Entry(
                    namespace,
                    key,
                    header.dtype,
                    header.shape,
                    header.value_len,
                    header.value_checksum,
                    header.created_ns,
                    on_ssd=True,
                    ssd_sum=header.value_checksum,
                    ssd_codec=header.codec,
                )
            )
            if time.monotonic() - last_report > 2.0:
                last_report = time.monotonic()
                log.info("rebuilding index from ssd tier: %d entries so far", len(found))
        found.sort(key=lambda e: e.created_ns)  # oldest first: the LRU end
        for e in found:
            self._index[e.eid] = e
            self._policy["ssd"].insert(e.eid)
            self._account(e, "ssd", 1)
        self.corrupt["ssd"] += self.ssd.dropped
        if found:
            log.info(
                "index rebuilt from ssd tier: %d entries in %.2fs",
                len(found),
                time.monotonic() - started,
            )

    # ----------------------------------------------------------------- validation

    def validate_value(self, dtype: str, shape: Sequence[int], nbytes: int) -> None:
        want = expected_nbytes(dtype, shape)
        if want != nbytes:
            raise InvalidArgument(
                f"shape {list(shape)} of {dtype} is {want} bytes but the value says {nbytes}"
            )
        if nbytes > self.max_value_bytes:
            raise InvalidArgument(
                f"value of {nbytes} bytes exceeds the server's limit of {self.max_value_bytes} "
                "bytes (max-value-bytes, or the largest cpu slot when there is no ssd tier); "
                "split it into smaller chunks"
            )

    def check_keys(self, namespace: str, keys: Sequence[bytes]) -> None:
        check_namespace(namespace)
        if len(keys) > self.config.max_keys_per_request:
            raise InvalidArgument(
                f"{len(keys)} keys in one request; the server allows at most "
                f"{self.config.max_keys_per_request} (max-keys-per-request), so split it"
            )
        for k in keys:
            check_key(k)

    # ----------------------------------------------------------------- put

    def begin_put(
        self,
        namespace: str,
        key: bytes,
        dtype: str,
        shape: Sequence[int],
        nbytes: int,
        value_checksum: int,
        cost: float = 1.0,
        newest: bool = False,
        position: int = -1,
    ) -> PutReservation:
        """Room for a value: a cpu slot, else a staging buffer bound for ssd. `cost`: what
        recomputing it costs per byte, for `--eviction gdsf`; `newest`: the value is the
        newest chunk of its sequence, which the codecs below memory may code finer
        (`Codec.for_newest`); `position`: its first token's position in that sequence, -1
        if unknown (`Codec.for_position`)."""
        res = self._begin(
            namespace, key, dtype, shape, nbytes, value_checksum, False,
            cost=cost, newest=newest, position=position,
        )  # fmt: skip
        assert res is not None
        return res

    def reserve_in_arena(
        self,
        namespace: str,
        key: bytes,
        dtype: str,
        shape: Sequence[int],
        nbytes: int,
        value_checksum: int,
        pool: int = 0,
        cost: float = 1.0,
        newest: bool = False,
        position: int = -1,
    ) -> PutReservation | None:
        """A slot for a value a same-host client writes itself: in gpu pool `pool` (when
        given) if it has room now, else in the cpu arena; None when there is none to be
        had (the client then streams it). Never stages, never waits for a demotion.
        `cost`, `newest` and `position` as for `begin_put`."""
        return self._begin(
            namespace, key, dtype, shape, nbytes, value_checksum, True, pool, cost, newest,
            position,
        )  # fmt: skip

    def _begin(
        self,
        namespace: str,
        key: bytes,
        dtype: str,
        shape: Sequence[int],
        nbytes: int,
        value_checksum: int,
        arena_only: bool,
        pool: int = 0,
        cost: float = 1.0,
        newest: bool = False,
        position: int = -1,
    ) -> PutReservation | None:
        check_namespace(namespace)
        check_key(key)
        self.validate_value(dtype, shape, nbytes)
        if not (math.isfinite(cost) and cost > 0):
            raise InvalidArgument(f"a value's recompute cost must be finite and positive: {cost}")
        if not -1 <= position < MAX_POSITION:
            raise InvalidArgument(f"a value's position must be below 2^40, got {position}")
        gpu = self.pool(pool) if pool else None
        entry = Entry(
            namespace, bytes(key), dtype, tuple(shape), nbytes, value_checksum, time.time_ns()
        )
        entry.cost = float(cost)
        entry.newest = bool(newest)
        entry.position = int(position)
        with self._lock:
            if gpu is not None and self._gpu_quota_admits(namespace, nbytes):
                slot = gpu.alloc(nbytes)
                if slot is not None and gpu.used_bytes > GPU_HIGH_WATER * gpu.capacity_bytes:
                    self._wake.set()
                if slot is not None:
                    self._account(entry, "gpu", 1)  # counted from the reservation on
                    return PutReservation(self, entry, slot, None, 0, place=pool)
                if nbytes <= gpu.max_value_bytes:
                    self._wake.set()  # full: make room for the next ones
            slot = self._alloc_cpu(nbytes, namespace) if self.cpu is not None else None
            if slot is not None:
                assert self.cpu is not None
                return PutReservation(self, entry, slot, self.cpu.view(slot, nbytes), 0)
            if arena_only:
                return None
            if self.ssd is None:
                raise ResourceExhausted(self._why_no_room(nbytes, namespace, "cpu"))
            self._check_quota_fits(namespace, "ssd", nbytes)  # before any byte is received
            self._stage(nbytes)
        return PutReservation(self, entry, None, memoryview(bytearray(nbytes)), nbytes)

    def _commit(self, res: PutReservation) -> str:
        e = res.entry
        with self._lock:
            old = self._index.get(e.eid)
            if old is not None:
                e.pins = old.pins  # a pinned key stays pinned when its value is replaced
            if res.slot is not None:
                if old is not None:
                    self._remove(old)
                self._index[e.eid] = e
                self._settle(e, res.place, res.slot)
                self._emit(EventKind.STORED, e, res.tier)
                self._write_through(e)
                return res.tier
            # Written before the old value is retired, so a failure leaves the old one intact.
            # The new LMDB record replaces the old one's in place, under the same key.
            self._write_ssd(e, res._bytes())
            self._only_on_ssd(e)
            if old is not None:
                if old.on_ssd:
                    self._account(old, "ssd", -1)
                old.on_ssd = False
                self._remove(old)
            self._index[e.eid] = e
            self._emit(EventKind.STORED, e, "ssd")
            self._write_through(e)
            return "ssd"

    def _abort(self, res: PutReservation) -> None:
        if res.slot is not None:
            with self._lock:
                self._mem[res.place].mem.free(res.slot)
                if res.place:
                    self._account(res.entry, "gpu", -1)

    def _settle(self, e: Entry, place: int, slot: Slot) -> None:
        """Make `slot` in `place` the memory copy of `e` (which has none)."""
        e.slot, e.place = slot, place
        slots = self._mem[place]
        slots.pages.setdefault(slot.page, set()).add(e)
        slots.policy.insert(e.eid, e.cost)
        if place == 0:
            self._account(e, "cpu", 1)
            # Reservations made side by side may together pass the group's quota: trim it.
            group = self._quota_group(e.namespace, "cpu")
            if group is not None:
                self._make_quota_room(group, 0, keep=e.eid)

    # ----------------------------------------------------------------- get

    def get(
        self,
        namespace: str,
        key: bytes,
        verify: bool = True,
        pools: Collection[int] = (),
        decoders: Collection[int] = (),
    ) -> ReadLease | None:
        """A lease on the value, or None if absent. Raises `DataLoss` on a bad checksum.

        `verify=False` skips checking a cpu-tier value's checksum, for a reader that checks
        the bytes itself and reports failures (`ReadLease.release_reported_corrupt`).
        Values read from ssd are always checked. A value in a gpu pool listed in `pools`
        (pools the reader maps) is leased in place, without a `view`; one in another pool
        is copied to host memory and checked. A value only on ssd, stored through a codec
        listed in `decoders` (ids the reader decodes itself), comes as its container
        (`ReadLease.encoded`), staged and not promoted.
        """
        check_namespace(namespace)
        check_key(key)
        return self._get(namespace, bytes(key), verify, pools, decoders)

    def _get(
        self,
        namespace: str,
        key: bytes,
        verify: bool,
        pools: Collection[int],
        decoders: Collection[int],
        counted: str = "",
    ) -> ReadLease | None:
        """`get`; `counted`: for a read started again (the entry changed under it, or a
        damaged copy was dropped), the tier whose hit the first try counted (it counts no
        other; one that finds the entry gone makes that hit a miss)."""
        count = not counted
        with self._lock:
            e = self._index.get((namespace, key))
            if e is None:
                if count:
                    for c in self._counters.values():
                        c.misses += 1
                elif counted:
                    self._hit_was_a_miss(counted)
                return None
            if count:
                self._count_misses_above(e.tier)
                counted = e.tier
            if e.slot is None and e.ssd_codec in decoders:
                return self._read_encoded(e, count)
            promotion = self._begin_ssd_read(e, count) if e.slot is None else None
            if promotion is None:
                tier = e.tier
                if count:
                    self._count_hit(e)
                if tier == "gpu":
                    if e.place in pools:
                        e.readers += 1
                        return ReadLease(self, e, None, e.header(), tier)
                    self._stage(e.nbytes)
                    e.readers += 1
                    pool, slot = self.pools[e.place], e.slot
                else:
                    e.readers += 1
                    view = self._cpu_view(e)
        if promotion is not None:  # decoded outside the lock: a codec takes milliseconds
            return self._finish_ssd_read(
                e,
                promotion,
                lambda: self._get(namespace, key, verify, pools, decoders, counted),
            )
        if tier == "gpu":
            assert slot is not None
            return self._read_from_pool(
                e,
                pool,
                slot,
                lambda: self._get(namespace, key, verify, pools, decoders, counted),
            )
        if verify and tier == "cpu" and checksum(view) != e.checksum:
            with self._lock:
                retry = self._unlease_corrupt(e)
            if retry:
                return self._get(namespace, key, verify, pools, decoders, counted)
            raise DataLoss(
                f"cpu tier: checksum mismatch for {e.key.hex()[:16]}...; the value was dropped"
            )
        return ReadLease(self, e, view, e.header(), tier)

    def _read_from_pool(
        self, e: Entry, pool: GpuPool, slot: Slot, again: Callable[[], ReadLease | None]
    ) -> ReadLease | None:
        """A checked host copy of `e`'s slot in `pool` (leased and staged by the caller); if
        the copy is damaged and another copy remains below, the read starts `again`."""
        try:
            data = pool.read(slot, e.nbytes)
            good = checksum(data) == e.checksum
        except BaseException:
            with self._lock:
                self._unlease(e)
                self._unstage(e.nbytes)
            raise
        with self._lock:
            retry = False if good else self._unlease_corrupt(e)
            if good:
                self._unlease(e)
        if good:
            return ReadLease(self, None, memoryview(data), e.header(), "gpu")
        self._unstage(e.nbytes)
        if retry:
            return again()
        raise DataLoss(
            f"gpu tier: checksum mismatch for {e.key.hex()[:16]}...; the value was dropped"
        )

    def lease_resident(
        self, namespace: str, key: bytes, pools: Collection[int] = ()
    ) -> ReadLease | None:
        """A lease on a value resident in cpu (or in one of the gpu `pools` the reader maps),
        taken without waiting and without checking the bytes (for a reader that checks what
        it copies), or None when that is not possible right now: the value is absent or
        elsewhere, or another thread holds the lock.

        Cheap enough for the event loop, which must never wait behind an LMDB write.
        """
        leases, _ = self.lease_resident_many(namespace, [key], pools)
        return leases[0]

    def lease_resident_many(
        self, namespace: str, keys: Sequence[bytes], pools: Collection[int] = ()
    ) -> tuple[list[ReadLease | None], list[int]]:
        """`lease_resident` for each of `keys` under one hold of the lock: the leases (None
        where there is none), and the positions of keys the index does not hold at all,
        which the caller may answer as misses at once. With the lock busy, no key is
        leased and none is called absent."""
        check_namespace(namespace)
        for key in keys:
            check_key(key)
        leases: list[ReadLease | None] = [None] * len(keys)
        absent: list[int] = []
        if not self._lock.acquire(blocking=False):
            return leases, absent
        try:
            index = self._index
            for i, key in enumerate(keys):
                e = index.get((namespace, bytes(key)))
                if e is None:
                    absent.append(i)
                    continue
                if e.slot is None or (e.place and e.place not in pools):
                    continue
                self._count_misses_above(e.tier)
                self._count_hit(e)
                e.readers += 1
                view = None if e.place else self._cpu_view(e)
                leases[i] = ReadLease(self, e, view, e.header(), e.tier)
        finally:
            self._lock.release()
        return leases, absent

    def _count_hit(self, e: Entry) -> None:
        e.hits += 1
        self._counters[e.tier].hits += 1
        self._mem[e.place].policy.access(e.eid)

    def _hit_was_a_miss(self, tier: str) -> None:
        """A read whose hit on `tier` was counted found the entry gone when it started
        again (deleted while it was promoted, say): a miss there and below, as a read that
        finds nothing counts one on every tier (the first try counted those above)."""
        self._counters[tier].hits -= 1
        for name in _INDEX_TIERS[_INDEX_TIERS.index(tier) :]:
            if name in self._counters:
                self._counters[name].misses += 1

    def _count_misses_above(self, tier: str) -> None:
        """A hit on `tier`: a miss on each tier above it."""
        for name in _INDEX_TIERS:
            if name == tier:
                return
            if name in self._counters:
                self._counters[name].misses += 1

    def _count_ssd_hit(self, e: Entry) -> None:
        self._counters["ssd"].hits += 1
        e.hits += 1
        self._policy["ssd"].access(e.eid)

    @contextlib.contextmanager
    def _ssd_record(self, e: Entry) -> Iterator[tuple[ValueHeader, memoryview]]:
        """`e`'s ssd record, checked; a lost or damaged one drops `e` and raises DataLoss."""
        assert self.ssd is not None
        try:
            with self.ssd.read(e.namespace, e.key) as record:
                yield record
        except KeyError:
            self._drop(e, "ssd")
            raise DataLoss(f"ssd tier lost {e.key.hex()[:16]}...; entry dropped") from None
        except Undecodable:
            raise
        except DataLoss:
            self._drop(e, "ssd")
            raise

    def _read_encoded(self, e: Entry, count: bool) -> ReadLease:
        """The ssd copy of `e` as a whole container, staged for a reader that decodes it
        itself (on its GPU): what promotion would have spent decoding on this host's CPU is
        not spent, and the bytes that cross the wire and PCIe are the compressed ones.
        `count`: count the hit (not for a read started again)."""
        if count:
            self._count_ssd_hit(e)
        with self._ssd_record(e) as (header, data):
            container = b"".join((encode_header(header), data))  # one copy of the payload
        self._stage(len(container))
        return ReadLease(self, None, memoryview(container), e.header(), "ssd", encoded=True)

    def _begin_ssd_read(self, e: Entry, count: bool) -> _Promotion:
        """Under the lock: count the hit on `e` (on ssd only; unless not `count`), hold its
        ssd copy as read, and take a cpu slot to promote it into (or staging for a private
        copy when cpu has no room). `_finish_ssd_read` reads and decodes it without the
        lock."""
        if count:
            self._count_ssd_hit(e)
        # Held as read while room is made and while it decodes, so demotions cannot evict
        # its own ssd copy.
        e.readers += 1
        try:
            slot = self._alloc_cpu(e.nbytes, e.namespace) if self.cpu is not None else None
            if slot is None:
                self._stage(e.nbytes)
        except BaseException:
            e.readers -= 1
            raise
        return _Promotion(slot)

    def _finish_ssd_read(
        self, e: Entry, p: _Promotion, again: Callable[[], ReadLease | None]
    ) -> ReadLease | None:
        """Read and decode `e`'s ssd record into the promotion's slot (or a private copy),
        without the lock, then under it make that the entry's cpu copy and lease it. Should
        the entry have changed meanwhile (deleted, replaced, or promoted by another reader),
        the work is dropped and the read starts `again`."""
        assert self.ssd is not None
        if p.slot is not None:
            assert self.cpu is not None
            dst = self.cpu.view(p.slot, e.nbytes)
        else:
            copy = bytearray(e.nbytes)
            dst = memoryview(copy)
        failure: KVStoreError | None = None
        damaged = False  # the record is lost or damaged: the entry goes
        try:
            with self.ssd.read(e.namespace, e.key) as (header, data):
                decode_stored(header, data, dst)
        except KeyError:
            failure, damaged = DataLoss(f"ssd tier lost {e.key.hex()[:16]}...; entry dropped"), True
        except MissingContext as exc:  # intact: kept for a server that can read it
            failure = Undecodable(f"ssd tier: {e.key.hex()[:16]}... kept: {exc}")
        except ContainerError as exc:
            failure = DataLoss(f"ssd tier: {e.key.hex()[:16]}... does not decode: {exc}")
            damaged = True
        except DataLoss as exc:  # the record's header, size or checksum
            failure, damaged = exc, True
        except BaseException:
            with self._lock:
                e.readers -= 1
                self._end_promotion(p, e.nbytes)
            raise
        with self._lock:
            e.readers -= 1
            current = self._index.get(e.eid) is e
            if failure is not None or not current or e.slot is not None:
                self._end_promotion(p, e.nbytes)
                if failure is not None and damaged and current:
                    self._drop(e, "ssd")
            elif p.slot is not None:
                self._settle(e, 0, p.slot)
                self._counters["cpu"].promotions += 1
                self._emit(EventKind.PROMOTED, e, "cpu")
                e.readers += 1
                return ReadLease(self, e, self._cpu_view(e), e.header(), "ssd")
            else:
                return ReadLease(self, None, memoryview(copy), e.header(), "ssd")
        if failure is not None and current:
            raise failure
        return again()  # the entry changed while it was read: read what is there now

    def _end_promotion(self, p: _Promotion, nbytes: int) -> None:
        """Give back what `_begin_ssd_read` took for a promotion not made (under the lock)."""
        if p.slot is not None:
            assert self.cpu is not None
            self.cpu.free(p.slot)
        else:
            self._unstage(nbytes)

    def _release(self, e: Entry | None, staged: int, corrupt: bool = False) -> None:
        with self._lock:
            self._leases -= 1
            if e is not None:
                if corrupt:
                    self._unlease_corrupt(e)
                else:
                    self._unlease(e)
            if staged:
                self._unstage(staged)

    def _unlease_corrupt(self, e: Entry) -> bool:
        """End a lease on `e` whose memory copy failed its checksum, dropping the bad copy.

        Returns True when an intact-looking ssd copy remains to be read instead.
        """
        self._unlease(e)
        if self._index.get(e.eid) is not e or e.slot is None:
            return False  # already replaced, deleted or moved
        if e.on_ssd:
            if e.readers:
                return False  # other readers hold the slot; a later verified read drops it
            log.error("%s copy of %s failed its checksum; the ssd copy stays", e.tier, e.key.hex())
            self.corrupt[e.tier] += 1
            tier = e.tier
            self._free_copy(e)
            self._only_on_ssd(e)
            self._emit(EventKind.EVICTED, e, tier)
            return True
        self._drop(e, e.tier)
        return False

    def _unlease(self, e: Entry) -> None:
        e.readers -= 1
        if e.readers == 0 and e.retired:
            for place, slot in e.retired:
                self._mem[place].mem.free(slot)
            e.retired = None

    # ----------------------------------------------------------------- queries

    # lookup and exists take no lock: each membership test is atomic under the GIL, and they
    # must not wait behind a thread that holds the lock for an LMDB write.
    # With a remote tier (and `remote` left true) they ask it, in one batch, about the keys
    # the node lacks: the server does that part in a worker thread.
    def lookup(self, namespace: str, keys: Sequence[bytes]) -> int:
        return len(self.lookup_tiers(namespace, keys))

    def lacks_any(self, namespace: str, keys: Iterable[bytes]) -> bool:
        """Whether any of `keys` is in no local tier (no lock: see lookup)."""
        index = self._index
        return any((namespace, bytes(k)) not in index for k in keys)

    def lookup_tiers(
        self, namespace: str, keys: Sequence[bytes], *, remote: bool = True
    ) -> list[str]:
        """The tier holding each key of the longest present prefix of `keys`: its fastest
        local copy's, then "remote" for the keys past the local prefix that the remote
        tier holds (with `remote`)."""
        self.check_keys(namespace, keys)
        tiers: list[str] = []
        index = self._index
        for k in keys:
            e = index.get((namespace, k))
            if e is None:
                break
            tiers.append(e.tier)
        if remote and len(tiers) < len(keys):
            tiers += ["remote"] * self.remote_prefix(namespace, keys[len(tiers) :])
        return tiers

    def remote_prefix(self, namespace: str, keys: Sequence[bytes]) -> int:
        """How many leading `keys` the remote tier holds (0 without one)."""
        if self.remote is None:
            return 0
        n = 0
        for present in self.remote.exists_many(namespace, keys):
            if not present:
                break
            n += 1
        return n

    def exists(self, namespace: str, keys: Sequence[bytes], *, remote: bool = True) -> list[bool]:
        self.check_keys(namespace, keys)
        present = [(namespace, k) in self._index for k in keys]
        return self.remote_exists(namespace, keys, present) if remote else present

    def remote_exists(
        self, namespace: str, keys: Sequence[bytes], present: list[bool]
    ) -> list[bool]:
        """`present` (each key local or not) with the remote tier asked, in one batch,
        about the keys it marks absent."""
        rest = [i for i, p in enumerate(present) if not p]
        if self.remote is not None and rest:
            there = self.remote.exists_many(namespace, [keys[i] for i in rest])
            for i, p in zip(rest, there, strict=True):
                present[i] = p
        return present

    def delete(self, namespace: str, keys: Sequence[bytes]) -> int:
        """Delete `keys` here and on the remote tier; how many either held."""
        self.check_keys(namespace, keys)
        found = [False] * len(keys)
        with self._lock:
            for i, k in enumerate(keys):
                e = self._index.get((namespace, k))
                if e is not None:
                    self._remove(e)
                    self._emit(EventKind.DELETED, e, "")
                    found[i] = True
        if self.remote is not None:
            if self._remote_queue is not None:
                self._remote_queue.discard(namespace, set(keys))
            there = self.remote.delete_many(namespace, keys)
            found = [a or b for a, b in zip(found, there, strict=True)]
        return sum(found)

    # ----------------------------------------------------------------- remote tier

    def fetch_remote(self, namespace: str, keys: Sequence[bytes]) -> int:
        """Bring the `keys` no local tier holds from the remote tier (one batch), verified,
        into cpu (or ssd when cpu has no room) as ordinary entries; how many came. Keys
        the remote lacks, or holds damaged, stay absent."""
        remote = self.remote
        if remote is None:
            return 0
        self.check_keys(namespace, keys)
        index = self._index
        want = list(dict.fromkeys(bytes(k) for k in keys if (namespace, k) not in index))
        if not want:
            return 0
        sink = _FetchSink(self, namespace, want)
        values = remote.get_many(namespace, want, sink)
        # Encoded values decode into their reservations in parallel (the decoders release
        # the GIL): one after another, one core's decode speed bounded the whole fetch.
        encoded = [i for i, v in enumerate(values) if v is not None and i in sink.encoded]
        errors = host_pool().map(self._decode_fetched(sink, values), encoded)
        bad = dict(zip(encoded, errors, strict=True))
        placed = 0
        for i, value in enumerate(values):
            if value is not None and self._place_fetched(sink, i, value, bad.get(i)):
                placed += 1
        return placed

    @staticmethod
    def _decode_fetched(
        sink: _FetchSink, values: Sequence[RemoteValue | None]
    ) -> Callable[[int], ContainerError | None]:
        """Decoder of fetched value `i` into its reservation: the error, or None."""

        def decode(i: int) -> ContainerError | None:
            value, res = values[i], sink.reservations[i]
            assert value is not None and res.buffer is not None
            one_core_kernels()
            try:
                decode_stored(value.header, value.payload, res.buffer)
            except ContainerError as exc:
                return exc
            return None

        return decode

    def _place_fetched(
        self, sink: _FetchSink, i: int, value: RemoteValue, bad: ContainerError | None
    ) -> bool:
        """Commit the reservation `value` was read (and decoded) into; False if it did not
        decode (`bad`: then dropped from remote too, unless intact: MissingContext)."""
        res, h = sink.reservations.pop(i), value.header
        assert res.buffer is not None
        if bad is not None:
            res.abort()
            namespace, key = res.entry.namespace, res.entry.key
            if isinstance(bad, MissingContext):  # intact, for a server that can decode it
                reason = str(bad)
                with self._lock:
                    first = reason not in self._kept_reasons
                    if first and len(self._kept_reasons) < 1024:
                        self._kept_reasons.add(reason)
                log.log(
                    logging.WARNING if first else logging.DEBUG,
                    "remote value %s/%s kept: %s%s", namespace, key.hex(), bad,
                    " (values kept for this reason are logged at debug level from now)"
                    if first else "",
                )  # fmt: skip
                return False
            log.error("remote value %s/%s does not decode: %s", namespace, key.hex(), bad)
            assert self.remote is not None
            self.remote.delete_many(namespace, [key])
            with self._lock:
                self.corrupt["remote"] += 1
            return False
        res.written()
        res.declare(h.value_checksum)  # raw: every piece was checked; else decode checked
        res.entry.on_remote = True
        tier = res.commit()
        with self._lock:
            self._counters[tier].promotions += 1
        return True

    def _write_through(self, e: Entry) -> None:
        """Queue a copy of a value just stored, in --remote-write through mode."""
        queue = self._remote_queue
        if queue is not None and not e.on_remote and self.config.remote_write == "through":
            from kvstore.remote_writes import PendingWrite

            queue.push(PendingWrite(e.namespace, e.key, e.nbytes, entry=e))

    def _leaving(self, e: Entry) -> None:
        """`e`'s last local copy is about to go: queue it for the remote tier (in either
        writing mode) with its bytes, unless the remote already has it."""
        queue = self._remote_queue
        if queue is None or e.on_remote:
            return
        from kvstore.remote_writes import PendingWrite

        if e.slot is not None and e.place == 0:
            # A writable copy: a codec's encoder reads it as a tensor, which torch warns
            # about over read-only memory.
            copy = memoryview(bytearray(self._cpu_view(e)))
            header = e.header()
            queue.push(
                PendingWrite(
                    e.namespace, e.key, e.nbytes, header=header, payload=copy, newest=e.newest,
                    position=e.position,
                )
            )  # fmt: skip
        elif e.slot is None and e.on_ssd and self.ssd is not None:
            try:
                with self.ssd.read(e.namespace, e.key) as (header, stored):
                    data = bytes(stored)
            except (KeyError, DataLoss):
                return
            item = PendingWrite(e.namespace, e.key, len(data), header=header, payload=data)
            item.encoded = True
            queue.push(item)

    def _write_remote_forever(self) -> None:
        queue = self._remote_queue
        assert queue is not None
        while not queue.closed:
            items = queue.take(REMOTE_WRITE_BATCH_BYTES, 0.5)
            if not items:
                continue
            try:
                self._write_remote(items)
            except Exception:
                log.exception("writing %d values to the remote tier failed", len(items))

    def _write_remote(self, items: list[PendingWrite]) -> None:
        remote = self.remote
        assert remote is not None
        batch: list[tuple[PendingWrite, ValueHeader, Buffer, Entry | None]] = []
        try:
            for item in items:
                got = self._remote_source(item)
                if got is not None:
                    batch.append((item, *got))
            done = remote.put_many([(i.namespace, i.key, h, p) for i, h, p, _ in batch])
        finally:
            with self._lock:
                for *_, leased in batch:
                    if leased is not None:
                        self._unlease(leased)
        deleted: dict[str, list[bytes]] = {}
        with self._lock:
            for (item, _, _, _), ok in zip(batch, done, strict=True):
                e = self._index.get((item.namespace, item.key))
                if item.entry is not None and e is None and ok:
                    deleted.setdefault(item.namespace, []).append(item.key)  # meanwhile
                elif e is not None and ok:
                    e.on_remote = True
                    self._emit(EventKind.STORED, e, "remote")
        for namespace, keys in deleted.items():
            remote.delete_many(namespace, keys)

    def _remote_source(self, item: PendingWrite) -> tuple[ValueHeader, Buffer, Entry | None] | None:
        """What to write for `item`: (container header, payload, the entry leased for it
        or None), or None when there is nothing to write any more."""
        if item.payload is not None:
            assert item.header is not None
            if item.encoded:
                return item.header, item.payload, None
            header, payload = self._encode_for(
                "remote", item.namespace, item.header, item.payload, item.newest, item.position
            )
            return header, payload, None
        e: Entry = item.entry
        with self._lock:
            if self._index.get(e.eid) is not e or e.on_remote:
                return None  # replaced, deleted, or already there
            if e.slot is None:
                if not e.on_ssd:
                    return None
                try:
                    with self._ssd_record(e) as (header, stored):
                        return header, bytes(stored), None
                except DataLoss:
                    return None
            e.readers += 1  # the copy stays put while it is written
            place, slot = e.place, e.slot
            view = self._cpu_view(e) if place == 0 else None
        try:
            data = view if view is not None else memoryview(self.pools[place].read(slot, e.nbytes))
            header, payload = self._encoded(e, data, "remote")
        except BaseException:
            with self._lock:
                self._unlease(e)
            raise
        return header, payload, e

    def pin(self, namespace: str, keys: Sequence[bytes], delta: int) -> int:
        self.check_keys(namespace, keys)
        n = 0
        with self._lock:
            for k in keys:
                e = self._index.get((namespace, k))
                if e is None or (delta < 0 and e.pins == 0):
                    continue
                e.pins += delta
                n += 1
        return n

    def watch(self, watcher: Watcher, snapshot: bool) -> None:
        """Start `watcher`'s live events (restart them, after a gap), with a snapshot of
        what the index holds if asked, streamed by `watch_step`."""
        with self._lock:
            self.events.subscribe(watcher, list(self._index) if snapshot else None)

    def watch_step(self, watcher: Watcher, most: int) -> None:
        """Queue the next `most` keys of `watcher`'s snapshot (see `kvstore.events`)."""
        with self._lock:
            watcher.snapshot_step(self._index, most, self.events.seq)

    def _emit(self, kind: EventKind, e: Entry, tier: str) -> None:
        if self.events.watchers:  # the only cost to a put while nobody watches
            self.events.publish(kind, e, tier)

    def entries(self, namespace: str | None = None, limit: int = 0) -> list[Entry]:
        with self._lock:
            out = [e for e in self._index.values() if namespace in (None, "", e.namespace)]
        out.sort(key=lambda e: (e.namespace, e.key))
        return out[:limit] if limit else out

    def stats(self) -> StoreStats:
        with self._lock:
            tiers = []
            for name in self._policy:
                if name == "ssd":
                    assert self.ssd is not None
                    members: list[Tier] = [self.ssd]
                    count = sum(1 for e in self._index.values() if e.on_ssd)
                else:
                    members = [s.mem for s in self._mem.values() if s.mem.name == name]
                    count = sum(1 for e in self._index.values() if e.slot and e.tier == name)
                tiers.append(
                    TierStats(
                        name,
                        count,
                        sum(t.used_bytes for t in members),
                        sum(t.capacity_bytes for t in members),
                        TierCounters(**vars(self._counters[name])),
                    )
                )
            return StoreStats(
                tiers,
                len(self._index),
                sum(1 for e in self._index.values() if e.pins),
                self._leases,
                {name: CodecBytes(**vars(c)) for name, c in self._codec_bytes.items()},
                [
                    QuotaUsage(q.tier, q.glob, used, q.quota_bytes)
                    for q, used in zip(self._quotas, self._quota_used, strict=True)
                ],
                self._remote_stats(),
                WriterCounters(**vars(self._writer)),
            )

    def _remote_stats(self) -> RemoteStats | None:
        remote, queue = self.remote, self._remote_queue
        if remote is None:
            return None
        return RemoteStats(
            remote.connected,
            remote.snapshot(),
            queue.depth if queue is not None else 0,
            queue.queued_bytes if queue is not None else 0,
            queue.dropped if queue is not None else 0,
        )

    # ----------------------------------------------------------------- lifecycle

    def sync(self) -> None:
        """Flush the ssd tier if anything was written since the last flush."""
        with self._lock:
            ssd, dirty, self._dirty = self.ssd, self._dirty, False
        if ssd is not None and dirty:
            ssd.sync()  # outside the lock: an fsync must not stall every other call

    def durable(self) -> None:
        """Return once the ssd tier's writes so far are on disk (`--durability sync`; at once
        in other modes). Called before a put that landed on ssd is acknowledged, outside the
        lock: concurrent callers share one flush."""
        ssd = self.ssd
        if ssd is not None:
            ssd.durable()

    def persist(self, expired: Callable[[], bool]) -> int:
        """Copy memory-only values (gpu pools, then cpu) to ssd, newest first, while ssd has
        free room and time is left.

        Called at shutdown so a restart serves what the memory tiers held. Never evicts.
        """
        if self.ssd is None:
            return 0
        n = 0
        with self._lock:
            order = [e for s in self._mem.values() for e in reversed(list(s.policy.candidates()))]
            for eid in order:
                if expired():
                    log.warning("shutdown: stopped copying memory tiers to ssd (out of time)")
                    break
                e = self._index.get(eid)
                if e is None or e.on_ssd or e.slot is None:
                    continue
                data = self.pools[e.place].read(e.slot, e.nbytes) if e.place else self._cpu_view(e)
                if checksum(data) != e.checksum:
                    continue  # a corrupt copy is not worth keeping
                header, payload = self._encoded(e, memoryview(data))
                try:
                    self.ssd.put(e.namespace, e.key, header, payload)
                except (TierFull, TierError) as exc:
                    log.warning("shutdown: ssd tier takes no more values: %s", exc)
                    break
                self._on_ssd(e, header)
                n += 1
            self.ssd.sync()
        return n

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._write_wake.set()
        if self._ssd_writer is not None:  # it reads the arena: gone before the arena is
            self._ssd_writer.join()
            self._ssd_writer = None
        if self._gpu_scratch_held:
            self._release_gpu_scratch()
        if self._remote_queue is not None:
            self._remote_queue.close()
        if self._remote_writer is not None:
            self._remote_writer.join()
            self._remote_writer = None
        if self.remote is not None:
            self.remote.close()
            self.remote = None
        if self._demoter is not None:
            self._demoter.join()
            self._demoter = None
        with self._lock:
            if self.ssd is not None:
                self.ssd.close()
                self.ssd = None
            for ptr in self._registered:
                unregister_host_memory(ptr)
            self._registered.clear()
            for p in self.pools.values():
                p.close()
            if self.cpu is not None:
                self.cpu.close()
                self.cpu = None

    # ----------------------------------------------------------------- gpu demotion

    def _demote_forever(self) -> None:
        while not self._closing:
            self._wake.wait(0.5)
            self._wake.clear()
            for place in list(self.pools):
                try:
                    while not self._closing and self.demote(place):
                        pass
                except Exception:
                    # A failed copy leaves every entry where it was (see demote); puts
                    # keep landing in cpu meanwhile. Try again on the next round.
                    log.exception("demoting gpu pool %d failed; retrying shortly", place)
                    self._wake.wait(1.0)

    def demote(self, place: int, *, force: bool = False) -> int:
        """Move one batch of gpu pool `place`'s least recently used values to cpu if the pool
        is fuller than `GPU_HIGH_WATER` (or, with `force`, regardless), copying on the pool's
        stream outside the lock; returns how many moved. The demoter thread calls this."""
        pool = self.pools[place]
        slots = self._mem[place]
        with self._lock:
            cpu = self.cpu
            assert cpu is not None
            used = pool.used_bytes
            # Bytes each --quota group past its gpu quota must shed; None: the pool is full,
            # any entry may go.
            need: dict[int, float] | None = None
            if force:
                target = float(DEMOTE_BATCH_BYTES)
            elif used > GPU_HIGH_WATER * pool.capacity_bytes:
                target = min(DEMOTE_BATCH_BYTES, used - GPU_LOW_WATER * pool.capacity_bytes)
            else:
                need = self._gpu_quota_excess()
                if not need:
                    return 0
                target = min(DEMOTE_BATCH_BYTES, sum(need.values()))
            batch: list[tuple[Entry, Slot, Slot]] = []  # (entry, pool slot, cpu slot)
            moved = 0
            for eid in slots.policy.candidates():
                e = self._index[eid]
                if not self._evictable(e) or e.slot is None:
                    continue
                if need is not None:
                    group = self._quota_group(e.namespace, "gpu")
                    if group is None or need.get(group, 0) <= 0:
                        continue
                    need[group] -= e.nbytes
                dst = self._alloc_cpu(e.nbytes, e.namespace)
                if dst is None:
                    log.warning("no room in cpu for values demoted from gpu pool %d", place)
                    break
                e.readers += 1  # the slot stays put while it is copied
                batch.append((e, e.slot, dst))
                moved += e.nbytes
                if moved >= target:
                    break
            if not batch:
                return 0
            pool.copy_out([(src, e.nbytes, cpu.view(dst, e.nbytes)) for e, src, dst in batch])
        try:
            pool.wait()
            good = [checksum(cpu.view(dst, e.nbytes)) == e.checksum for e, _, dst in batch]
        except BaseException:
            with self._lock:
                for e, _, dst in batch:
                    cpu.free(dst)
                    self._unlease(e)
            raise
        done = 0
        with self._lock:
            for (e, src, dst), ok in zip(batch, good, strict=True):
                self._unlease(e)
                if self._index.get(e.eid) is not e or e.slot is not src or not ok:
                    cpu.free(dst)  # replaced or deleted meanwhile, or a corrupt copy
                    if not ok and e.slot is src and self._index.get(e.eid) is e:
                        self._drop(e, "gpu")
                    continue
                self._free_copy(e)
                self._settle(e, 0, dst)
                self._emit(EventKind.DEMOTED, e, "cpu")
                self._counters["gpu"].evictions += 1
                self._counters["gpu"].demotions += 1
                done += 1
        return done

    # ----------------------------------------------------------------- ssd write-ahead

    def _write_ahead_window(self) -> float:
        """Bytes at the head of the cpu tier's eviction order that the ssd writer copies to
        ssd: its `--ssd-write-ahead` share, once the tier has less than that free; else 0."""
        cpu = self.cpu
        assert cpu is not None
        window = self.config.ssd_write_ahead * cpu.capacity_bytes
        return window if cpu.capacity_bytes - cpu.used_bytes < window else 0.0

    def _write_ahead_forever(self) -> None:
        while not self._closing:
            self._write_wake.wait(0.5)
            self._write_wake.clear()
            try:
                while not self._closing and self.write_ahead():
                    pass
                self._release_idle_gpu_scratch()
            except Exception:
                # Nothing is lost: values not yet copied are written when evicted.
                log.exception("copying cpu values to ssd ahead of eviction failed; retrying")
                self._write_wake.wait(1.0)

    def write_ahead(self) -> int:
        """Copy to ssd the cpu tier's values that eviction takes next and that have no ssd
        copy yet, once the tier has less free room than its `--ssd-write-ahead` share:
        among the values that eviction takes first, as many as make up that share (pinned
        ones skipped), each tried once per call. Returns how many were written. The values
        are encoded (through the namespace's ssd codec) outside the lock, on the host pool
        (or in batches on the `--encode-gpu` GPU, from threads of their own,
        `kvstore.threads.gpu_encode_pool`), and only the LMDB writes take it, so a
        put that needs room finds values it can drop at once instead of encoding and
        writing them itself, under the lock. Encoding and writing overlap: about
        WRITE_AHEAD_BYTES (at most WRITE_AHEAD_VALUES values; on a GPU, the _GPU_ limits)
        are being encoded or wait to be written, and each job's values are written as soon
        as it has encoded them, while the values after them are chosen and start encoding.
        The ssd-writer thread calls this."""
        assert self.cpu is not None and self.ssd is not None
        pool = host_pool()
        # Unleased: a value evicted meanwhile (its slot then reused) is written by the
        # eviction itself, and what was encoded from its slot is dropped (_write_job).
        jobs: dict[concurrent.futures.Future[Any], _Part] = {}
        # Values to encode on host threads wait here while WRITE_AHEAD_VALUES of them are
        # in the pool (the GPU's limits let more be chosen): the pool's other work (reads
        # decoding fetched values) queues behind no more of them than without a GPU.
        waiting: collections.deque[_Part] = collections.deque()
        on_host: set[concurrent.futures.Future[Any]] = set()
        # Values for the GPU gather into batches of one shape; a batch goes when full, or
        # when the GPU would otherwise run out of work (see _GpuBatches).
        gathering = _GpuBatches()
        on_gpu: set[concurrent.futures.Future[Any]] = set()
        ahead = _AheadQueue()
        written = 0
        if self._encode_device is None:
            most, most_bytes = WRITE_AHEAD_VALUES, WRITE_AHEAD_BYTES
        else:
            most, most_bytes = WRITE_AHEAD_GPU_VALUES, WRITE_AHEAD_GPU_AHEAD_BYTES
        try:
            while True:
                held = [x for part in [*jobs.values(), *waiting, *gathering.parts()] for x in part]
                more = self._ahead_batch(
                    ahead,
                    most - len(held),
                    most_bytes - sum(e.nbytes for e, _ in held),
                    walk=not jobs,
                )
                for e, slot in more:
                    full = self._ahead_job(e, slot, gathering, waiting)
                    for job in [*gathering.overdue(), *([full] if full else [])]:
                        on_gpu.add(self._submit_gpu(job, jobs))
                # A partial batch goes while fewer than one batch waits behind those encoding.
                while gathering.batches and len(on_gpu) <= GPU_ENCODE_THREADS:
                    on_gpu.add(self._submit_gpu(gathering.take_largest(), jobs))
                while waiting and len(on_host) < WRITE_AHEAD_VALUES:
                    part = waiting.popleft()
                    future = pool.submit(self._encode_ahead, part, None)
                    jobs[future] = part
                    on_host.add(future)
                if not jobs:
                    return written
                began = time.perf_counter()
                done, _ = concurrent.futures.wait(
                    jobs, return_when=concurrent.futures.FIRST_COMPLETED
                )
                self._writer.wait_seconds += time.perf_counter() - began
                for future in done:
                    on_host.discard(future)
                    on_gpu.discard(future)
                    began = time.perf_counter()
                    n, refused = self._write_job(jobs.pop(future), future.result())
                    self._writer.write_seconds += time.perf_counter() - began
                    written += n
                    if refused:
                        return written
        finally:  # none still reads the arena once this returns (close unmaps it next)
            for future in jobs:
                future.cancel()
            concurrent.futures.wait(jobs)

    def _release_idle_gpu_scratch(self) -> None:
        """`_release_gpu_scratch` once the writer has not encoded on the GPU for
        GPU_SCRATCH_IDLE_S (its thread calls this between calls of `write_ahead`)."""
        if self._gpu_scratch_held and time.monotonic() - self._gpu_used_at >= GPU_SCRATCH_IDLE_S:
            self._release_gpu_scratch()

    def _release_gpu_scratch(self) -> None:
        """Return the `--encode-gpu` GPU's scratch memory (kept cached by CuPy between
        batches while the writer is busy): it is not the gpu tier's to keep."""
        self._gpu_scratch_held = False
        assert self._encode_device is not None
        from kvstore.kernels._cuda import release_memory

        try:
            release_memory(self._encode_device)
        except Exception as exc:  # the next burst allocates what it needs anyway
            log.warning("releasing GPU %s's encoding memory failed: %s", self._encode_device, exc)

    def _ahead_batch(
        self, ahead: _AheadQueue, values: int, nbytes: int, walk: bool
    ) -> list[tuple[Entry, Slot]]:
        """The next values `write_ahead` encodes, up to `values` of them and about `nbytes`:
        those in the cpu tier's `--ssd-write-ahead` window, in eviction order, with no ssd
        copy, not pinned and not tried yet in this call. The window is walked (all of its
        values) only when `ahead` has none left and `walk` says nothing is in flight, not
        for each batch: a window of many small values is walked a few times per call."""
        batch: list[tuple[Entry, Slot]] = []
        if values <= 0 or nbytes <= 0:
            return batch
        with self._lock:
            window = self._write_ahead_window()
            if self._closing or not window:
                return batch
            if not ahead.queue and walk:
                seen = 0  # bytes of older values
                for eid in self._mem[0].policy.candidates():
                    if seen >= window:
                        break
                    e = self._index[eid]
                    seen += e.nbytes
                    if not (e.on_ssd or e.pins or e.slot is None or eid in ahead.tried):
                        ahead.queue.append(eid)
                        ahead.tried.add(eid)
            taken = 0
            while ahead.queue and len(batch) < values and taken < nbytes:
                found = self._index.get(ahead.queue.popleft())
                if found is None or found.on_ssd or found.pins or found.slot is None:
                    continue  # deleted, written, pinned or evicted since the walk
                batch.append((found, found.slot))
                taken += found.nbytes
        return batch

    def _submit_gpu(
        self, job: tuple[_Part, list[Codec]], jobs: dict[concurrent.futures.Future[Any], _Part]
    ) -> concurrent.futures.Future[Any]:
        """Start encoding `write_ahead`'s GPU batch `job` (on `gpu_encode_pool`), in `jobs`."""
        future = gpu_encode_pool().submit(self._encode_ahead, *job)
        jobs[future] = job[0]
        return future

    def _ahead_job(
        self, e: Entry, slot: Slot, gathering: _GpuBatches, waiting: collections.deque[_Part]
    ) -> tuple[_Part, list[Codec]] | None:
        """Put one of `write_ahead`'s values where it waits to be encoded: on the host (a
        job of its own in `waiting`) or in its GPU batch in `gathering`; the batch it
        fills, if it does."""
        codec = self._gpu_codec(e)
        if codec is None:
            waiting.append([(e, slot)])
            return None
        return gathering.add((codec.gpu_batch(), e.shape, e.dtype), e, slot, codec)

    def _gpu_codec(self, e: Entry) -> Codec | None:
        """The codec `e` is stored on ssd through (`_codec_for`) if the ssd writer encodes
        it on the `--encode-gpu` GPU (a lossy codec that encodes there), else None."""
        if self._encode_device is None:
            return None
        from kvstore.codecs.values import gpu_encoder_of

        codec = self._codec_for(e.namespace, "ssd", e.newest, e.position, e.shape)
        return codec if codec is not None and gpu_encoder_of(codec) is not None else None

    def _codec_for(
        self,
        namespace: str,
        tier: str = "ssd",
        newest: bool = False,
        position: int = -1,
        shape: Sequence[int] | None = None,
    ) -> Codec | None:
        """The codec a value of `namespace` (and `shape`) is stored on `tier` (ssd or remote)
        through: the namespace's, its choice for a value at `position` (when known), and
        for the newest chunk of a sequence that codec's choice for it."""
        codec = self._codec(namespace, tier)
        if codec is not None and position >= 0:
            codec = codec.for_position(position, shape)
        return codec.for_newest() if codec is not None and newest else codec

    def _write_job(
        self, part: list[tuple[Entry, Slot]], coded: list[tuple[ValueHeader, Buffer] | None]
    ) -> tuple[int, bool]:
        """Write one `write_ahead` job's encoded values to ssd: how many were written, and
        whether ssd refused one (then the rest of the job is not tried)."""
        written = 0
        for (e, slot), value in zip(part, coded, strict=True):
            with self._lock:
                if value is None or self._closing or self.ssd is None:
                    continue
                if self._index.get(e.eid) is not e or e.slot is not slot or e.on_ssd:
                    continue  # deleted, replaced or evicted while it was encoded
                try:
                    self._put_ssd(e, *value)
                except ResourceExhausted as exc:
                    if not self._write_ahead_refused:  # once, not every call while it lasts
                        self._write_ahead_refused = True
                        log.warning("ssd takes no values ahead of eviction: %s", exc)
                    return written, True
                self._write_ahead_refused = False
                self._counters["cpu"].demotions += 1
                self._writer.ahead += 1
                self._emit(EventKind.DEMOTED, e, "ssd")
                written += 1
        return written, False

    def _encode_ahead(
        self, part: list[tuple[Entry, Slot]], codecs: list[Codec] | None
    ) -> list[tuple[ValueHeader, Buffer] | None]:
        """Each of `part`'s values as the ssd tier stores it, from its cpu slot (a host or
        GPU-encode thread): as one batch on the `--encode-gpu` GPU through `codecs` (a
        value's each, `_ahead_job`'s choice), else (None) one by one here. None for a value
        that could not be encoded (the eviction writes it)."""
        cpu = self.cpu
        assert cpu is not None
        # Raw: a view of the slot, still the value's if the slot is still its own below.
        views = [cpu.view(slot, e.nbytes) for e, slot in part]
        coded: list[tuple[ValueHeader, Buffer] | None] = [None] * len(part)
        host = list(range(len(part)))  # the values left to encode here
        if codecs is not None:
            from kvstore.codecs.base import ValuesRefused
            from kvstore.codecs.values import encode_stored_many, one_or_each

            gpu, host = host, []
            self._gpu_scratch_held = True
            while gpu:
                items = [(part[i][0].header(), memoryview(views[i])) for i in gpu]
                try:
                    done = encode_stored_many(
                        one_or_each([codecs[i] for i in gpu]), items, self._encode_device
                    )
                except Exception as exc:
                    refused = exc.indexes if isinstance(exc, ValuesRefused) else []
                    drop = set(refused) & set(range(len(gpu)))
                    if drop:  # those on the host (stored raw there), the rest here again
                        host += [x for i, x in enumerate(gpu) if i in drop]
                        gpu = [x for i, x in enumerate(gpu) if i not in drop]
                        continue
                    # The GPU's memory, no GPU: all on the host.
                    log.info(
                        "encoding %d values on GPU %s failed (%s); encoding each on the host",
                        len(gpu),
                        self._encode_device,
                        exc,
                    )
                    host += gpu
                    break
                for i, c in zip(gpu, done, strict=True):
                    coded[i] = c
                with self._lock:
                    self._writer.encoded_gpu += len(gpu)
                self._gpu_used_at = time.monotonic()
                break
        if host:
            one_core_kernels()
            for i in sorted(host):
                (e, slot), view = part[i], views[i]
                try:
                    coded[i] = self._encoded(e, view)
                except Exception as exc:
                    if e.slot is slot:  # not the bytes of a slot reused meanwhile
                        log.warning("encoding %s for ssd failed: %s", e.key.hex(), exc)
                    # None: the eviction writes the value
            with self._lock:
                self._writer.encoded_host += sum(coded[i] is not None for i in host)
        return coded

    # ----------------------------------------------------------------- internals

    def _stage(self, nbytes: int) -> None:
        if self._staging_used + nbytes > self.config.staging_bytes:
            raise Overloaded(
                f"server staging buffers are full ({self._staging_used} of "
                f"{self.config.staging_bytes} bytes in flight, staging-bytes); retry shortly",
                STAGING_RETRY_S,
            )
        self._staging_used += nbytes

    def _unstage(self, nbytes: int) -> None:
        with self._lock:
            self._staging_used -= nbytes

    def _why_no_room(self, nbytes: int, namespace: str = "", tier: str = "") -> str:
        group = self._quota_group(namespace, tier) if tier else None
        q = self._quotas[group] if group is not None else None
        if group is not None and q is not None and self._quota_used[group] + nbytes > q.quota_bytes:
            return (
                f"no room for {nbytes} bytes of {namespace} within the quota {q.text}="
                f"{q.quota_bytes} (values of its namespaces are pinned or being read, or "
                "the value is larger than the quota)"
            )
        if self.cpu is not None and nbytes > self.cpu.max_value_bytes and self.ssd is None:
            return (
                f"value of {nbytes} bytes is larger than the cpu tier's largest slot "
                f"({self.cpu.max_value_bytes} bytes) and there is no ssd tier"
            )
        return (
            f"no room for {nbytes} bytes: every tier is full and nothing can be evicted "
            "(values are pinned or being read)"
        )

    def _evictable(self, e: Entry) -> bool:
        return e.pins == 0 and e.readers == 0

    def _alloc_cpu(self, nbytes: int, namespace: str) -> Slot | None:
        """A cpu slot for `nbytes` of `namespace`, evicting LRU entries as needed (first the
        group's own, to keep it within its quota); None if impossible."""
        cpu = self.cpu
        assert cpu is not None
        if (
            self._ssd_writer is not None
            and not self._write_wake.is_set()
            and self._write_ahead_window()
        ):
            self._write_wake.set()  # keep the values to be evicted next copied to ssd
        group = self._quota_group(namespace, "cpu")
        if group is not None and not self._make_quota_room(group, nbytes):
            return None
        slot = cpu.alloc(nbytes)
        if slot is not None or nbytes > cpu.max_value_bytes:
            return slot
        size_class = cpu.allocator.class_of(nbytes)
        # First choice: an entry of the same size class among the least recently used few
        # frees a slot that fits exactly. Only a few: searching the whole order cost O(n)
        # per value once older entries of another size sat at its head (~0.3 ms a 1 MiB
        # put behind 2,000 smaller entries on a 2-core VM), and kept those entries forever.
        slots = self._mem[0]
        for eid in itertools.islice(slots.policy.candidates(), EXACT_FIT_WINDOW):
            e = self._index[eid]
            if self._evictable(e) and e.slot and e.slot.size_class == size_class:
                self._evict_cpu([e])
                return cpu.alloc(nbytes)
        # Otherwise free a whole page: the one holding the least recently used entry whose
        # every slot is evictable (older entries of other sizes age out this way).
        seen: set[int] = set()
        for eid in slots.policy.candidates():
            e = self._index[eid]
            assert e.slot is not None
            page = e.slot.page
            if page in seen:
                continue
            seen.add(page)
            members = list(slots.pages.get(page, ()))
            if len(members) != cpu.allocator.page_live(page):
                continue  # a reservation or a retired-but-leased slot lives there
            if all(self._evictable(m) for m in members):
                self._evict_cpu(members)
                return cpu.alloc(nbytes)
        return None

    def _evict_cpu(self, victims: Iterable[Entry]) -> None:
        for e in victims:
            counters = self._counters["cpu"]
            counters.evictions += 1
            event = EventKind.EVICTED
            if self.ssd is not None and not e.on_ssd:
                try:
                    self._write_ssd(e, self._cpu_view(e))
                    counters.demotions += 1
                    self._writer.at_eviction += 1
                    event = EventKind.DEMOTED
                except ResourceExhausted as exc:
                    log.warning("evicting %s from cpu with no room on ssd: %s", e.key.hex(), exc)
            if not e.on_ssd:
                self._leaving(e)
            self._free_copy(e)
            self._only_on_ssd(e)
            if not e.on_ssd and self._index.get(e.eid) is e:
                del self._index[e.eid]
            self._emit(event, e, "ssd" if event == EventKind.DEMOTED else "cpu")

    def _cpu_view(self, e: Entry) -> memoryview:
        assert self.cpu is not None and e.slot is not None and e.place == 0
        return self.cpu.view(e.slot, e.nbytes)

    def _free_copy(self, e: Entry) -> None:
        """Drop `e`'s memory copy; a leased slot is freed when its last lease ends."""
        assert e.slot is not None
        slots = self._mem[e.place]
        slots.policy.remove(e.eid)
        members = slots.pages.get(e.slot.page)
        if members is not None:
            members.discard(e)
        if e.readers:
            e.retired = (e.retired or []) + [(e.place, e.slot)]
        else:
            slots.mem.free(e.slot)
        self._account(e, e.tier, -1)
        e.slot = None

    def _codec(self, namespace: str, tier: str = "ssd") -> Codec | None:
        """The codec `tier` (ssd or remote) stores `namespace`'s values with (None: raw)."""
        for glob, codec in self._codecs[tier]:
            if glob is None or fnmatch.fnmatchcase(namespace, glob):
                return codec
        return None

    def _encoded(self, e: Entry, value: Buffer, tier: str = "ssd") -> tuple[ValueHeader, Buffer]:
        """`e`'s value as `tier` (ssd or remote) stores it: through its namespace's codec,
        or raw when there is none or the codec does not take this value (its shape or
        dtype)."""
        return self._encode_for(tier, e.namespace, e.header(), value, e.newest, e.position)

    def _encode_for(
        self,
        tier: str,
        namespace: str,
        header: ValueHeader,
        value: Buffer,
        newest: bool = False,
        position: int = -1,
    ) -> tuple[ValueHeader, Buffer]:
        codec = self._codec_for(namespace, tier, newest, position, header.shape)
        if codec is not None:
            from kvstore.codecs.values import encode_stored

            try:
                return encode_stored(codec, header, memoryview(value))
            except InvalidArgument as exc:
                if (tier, namespace) not in self._codec_refused:
                    self._codec_refused.add((tier, namespace))
                    log.warning("%s stores %s raw: %s", tier, namespace, exc)
        return header, value

    def _only_on_ssd(self, e: Entry) -> None:
        """`e` has just lost its memory copy: readers now get what the ssd copy decodes to."""
        if e.on_ssd and e.slot is None:
            e.checksum = e.ssd_sum

    def _write_ssd(self, e: Entry, value: memoryview) -> None:
        """Put `e` on ssd, evicting ssd LRU entries for room; ResourceExhausted if none."""
        self._put_ssd(e, *self._encoded(e, value))

    def _put_ssd(self, e: Entry, header: ValueHeader, payload: Buffer) -> None:
        """`_write_ssd` of `e` already encoded for the ssd tier."""
        ssd = self.ssd
        assert ssd is not None
        if ssd.record_bytes(header) > ssd.capacity_bytes:
            raise ResourceExhausted(
                f"value of {e.nbytes} bytes does not fit the ssd tier ({ssd.capacity_bytes} bytes)"
            )
        group = self._quota_group(e.namespace, "ssd")
        if group is not None:
            old = self._index.get(e.eid)
            replaced = old.nbytes if old is not None and old is not e and old.on_ssd else 0
            if not self._make_quota_room(group, e.nbytes - replaced, keep=e.eid):
                raise ResourceExhausted(self._why_no_room(e.nbytes, e.namespace, "ssd"))
        while True:
            try:
                ssd.put(e.namespace, e.key, header, payload)
                break
            except TierError as exc:
                raise ResourceExhausted(f"the ssd tier cannot take writes: {exc}") from None
            except TierFull:
                victim = next(
                    (
                        self._index[eid]
                        for eid in self._policy["ssd"].candidates()
                        if eid != e.eid and self._evictable(self._index[eid])
                    ),
                    None,
                )
                if victim is None:
                    raise ResourceExhausted(self._why_no_room(e.nbytes)) from None
                self._evict_ssd(victim)
        self._on_ssd(e, header)
        codec = self._codec(e.namespace) if header.codec != CODEC_RAW else None
        name = codec.name if codec is not None else "raw"
        written = self._codec_bytes[name]  # every name the ssd tier can use, from start
        written.raw_bytes += header.value_len
        written.encoded_bytes += header.payload_len

    def _on_ssd(self, e: Entry, header: ValueHeader) -> None:
        """Record that the ssd tier now holds `e`, as `header` describes it."""
        if not e.on_ssd:
            self._account(e, "ssd", 1)
        e.on_ssd, e.ssd_sum, e.ssd_codec = True, header.value_checksum, header.codec
        self._dirty = True
        self._policy["ssd"].insert(e.eid, e.cost)

    def _evict_ssd(self, victim: Entry) -> None:
        """Evict `victim`'s ssd copy (under the lock), first queueing it for the remote tier
        when it is the value's last local copy."""
        self._counters["ssd"].evictions += 1
        if victim.slot is None:
            self._leaving(victim)
        self._drop_ssd_copy(victim)
        self._emit(EventKind.EVICTED, victim, "ssd")

    def _drop_ssd_copy(self, e: Entry) -> None:
        assert self.ssd is not None
        self.ssd.delete(e.namespace, e.key)
        self._account(e, "ssd", -1)
        e.on_ssd = False
        self._dirty = True
        self._policy["ssd"].remove(e.eid)
        if e.slot is None and self._index.get(e.eid) is e:
            del self._index[e.eid]

    def _remove(self, e: Entry) -> None:
        """Take `e` out of the index and every tier (delete or replace)."""
        if self._index.get(e.eid) is e:
            del self._index[e.eid]
        if e.slot is not None:
            self._free_copy(e)
        if e.on_ssd:
            self._drop_ssd_copy(e)

    def _drop(self, e: Entry, tier: str) -> None:
        """Remove an entry whose bytes in `tier` proved corrupt."""
        log.error("dropping %s/%s after a checksum failure in %s", e.namespace, e.key.hex(), tier)
        self.corrupt[tier] += 1
        self._remove(e)
        self._emit(EventKind.DELETED, e, tier)

    # ----------------------------------------------------------------- quotas

    def _quota_group(self, namespace: str, tier: str) -> int | None:
        """The `--quota` rule `namespace` falls under on `tier`: the first that matches."""
        for i, q in enumerate(self._quotas):
            if q.tier == tier and fnmatch.fnmatchcase(namespace, q.glob):
                return i
        return None

    def _account(self, e: Entry, tier: str, sign: int) -> None:
        """`e`'s copy on `tier` came (+1) or went (-1): its group's usage follows."""
        if self._quotas:
            group = self._quota_group(e.namespace, tier)
            if group is not None:
                self._quota_used[group] += sign * e.nbytes

    def _gpu_quota_admits(self, namespace: str, nbytes: int) -> bool:
        """Whether `namespace`'s gpu quota group (if any) has room for `nbytes` more now; a
        group filling up wakes the demoter, which moves its oldest entries to cpu."""
        group = self._quota_group(namespace, "gpu")
        if group is None:
            return True
        used, quota = self._quota_used[group], self._quotas[group].quota_bytes
        if used + nbytes > GPU_HIGH_WATER * quota:
            self._wake.set()
        return used + nbytes <= quota

    def _gpu_quota_excess(self) -> dict[int, float]:
        """The gpu quota groups past `GPU_HIGH_WATER` of their quota, and how many bytes each
        must shed to be back at `GPU_LOW_WATER` (as a full pool is)."""
        return {
            group: used - GPU_LOW_WATER * q.quota_bytes
            for group, (q, used) in enumerate(zip(self._quotas, self._quota_used, strict=True))
            if q.tier == "gpu" and used > GPU_HIGH_WATER * q.quota_bytes
        }

    def _check_quota_fits(self, namespace: str, tier: str, nbytes: int) -> None:
        """ResourceExhausted when a value of `nbytes` is larger than its group's quota on
        `tier`: no eviction could ever make room for it."""
        group = self._quota_group(namespace, tier)
        if group is not None and nbytes > self._quotas[group].quota_bytes:
            q = self._quotas[group]
            raise ResourceExhausted(
                f"value of {nbytes} bytes is larger than the quota {q.text}={q.quota_bytes} "
                f"of namespace {namespace}"
            )

    def _make_quota_room(self, group: int, nbytes: int, keep: EntryId | None = None) -> bool:
        """Evict the group's own least valuable entries on its tier (by that tier's policy;
        never `keep`, pinned or leased ones) until `nbytes` more fit its quota. False when
        they cannot: nothing evictable is left, or `nbytes` alone is more than the quota."""
        q = self._quotas[group]
        if nbytes > q.quota_bytes:
            return False
        policy = self._mem[0].policy if q.tier == "cpu" else self._policy["ssd"]
        while self._quota_used[group] + nbytes > q.quota_bytes:
            victim = next(
                (
                    e
                    for eid in policy.candidates()
                    if eid != keep
                    and self._evictable(e := self._index[eid])
                    and self._quota_group(e.namespace, q.tier) == group
                ),
                None,
            )
            if victim is None:
                return False
            if q.tier == "cpu":
                self._evict_cpu([victim])
            else:
                self._evict_ssd(victim)
        return True
