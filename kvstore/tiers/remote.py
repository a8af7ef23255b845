"""The remote tier: values in a Redis Cluster or Valkey Cluster (or one plain Redis) that
many nodes share, through redis-py.

Primitives (all batched): `get_many`, `put_many`, `exists_many`, `delete_many`. Keys are
grouped by the master that owns their slot and each master's share goes out as pipelines
on a small thread pool, so masters are asked in parallel and one dead or slow master only
fails its own keys.

Records. A value is stored as the container the store hands over (`ValueHeader` plus
payload, already encoded by its namespace's codec), split into pieces of at most
`piece_bytes`, plus one header record. Every record of a value carries the same hash tag
`{<prefix><namespace>/<key hex>}`, so a value lives on one master: losing a master loses
whole values, never halves. The header record holds the container header, the piece size
and count, an xxh3-64 of every piece, a random write generation and its own xxh3-64.
Pieces are named by generation, so a reader never mixes pieces of two writes of one key;
they are written before the header, so a reader that finds a header finds its pieces
(unless Redis dropped them since: TTL, `maxmemory` eviction, a restart).

Reads check everything: an unparsable header, a missing piece, a piece of the wrong size
or checksum deletes the value from Redis (only if its header is still the one read, so a
concurrent rewrite survives), counts it in `counters.corrupt` and reports a miss.

Failures. Every call has a deadline (`timeout_s`: socket connect and read timeouts, and a
wall-clock bound on each batch). A master that fails or misses the deadline is skipped for
`backoff_s` (its keys are misses at once) and retried after; the cluster's slot map is
read again in the background. With the cluster unreachable at start, the tier starts
anyway and keeps trying: until it answers, reads miss and writes are dropped.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import redis
import xxhash
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.crc import key_slot
from redis.retry import Retry

from kvstore.codecs.container import ContainerError, ValueHeader, decode_header, encode_header
from kvstore.tiers.base import Buffer

log = logging.getLogger(__name__)

SLOTS = 16384
DEFAULT_PREFIX = "kvs:"
DEFAULT_PIECE_BYTES = 1 << 20
HEADER_MAGIC = b"KVSR"
HEADER_VERSION = 1
_HEAD = struct.Struct("<4sBQIIH")  # magic, version, generation, piece bytes, pieces, hlen
_U64 = struct.Struct("<Q")
# Keys of one master's share of a batch per pipeline: a large batch becomes several
# pipelines on several connections, read in parallel.
KEYS_PER_PIPELINE = 8
# A read first asks each master for all its header records (small), in pipelines of at
# most this many keys, then reads the pieces on READ_LANES_PER_MASTER connections to each
# master, one pipeline of about PIECE_BYTES_PER_PIPELINE after another on each. Two lanes
# kept a loopback master busy; more threads only fought over the GIL (bench_remote notes).
HEADERS_PER_PIPELINE = 256
READ_LANES_PER_MASTER = 2
PIECE_BYTES_PER_PIPELINE = 8 << 20
# The slowest rate a batch of writes is allowed, on top of the deadline (100 MB/s).
WRITE_FLOOR_BYTES_S = 100e6
# Deletes a value's records only if its header is still the one a reader found bad: a
# writer that replaced it meanwhile keeps its value; the stale pieces go either way.
_DROP_IF_SAME = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', unpack(KEYS))
end
if #KEYS > 1 then redis.call('DEL', unpack(KEYS, 2)) end
return 0
"""

T = TypeVar("T")


class RemoteRecordError(ValueError):
    """A header record that does not parse, or that contradicts itself."""


@dataclass(frozen=True)
class RecordHeader:
    """What a value's header record says."""

    header: ValueHeader
    generation: int
    piece_bytes: int
    sums: tuple[int, ...]  # xxh3-64 of each piece

    def piece_lens(self) -> list[int]:
        n, size, total = len(self.sums), self.piece_bytes, self.header.payload_len
        return [size] * (n - 1) + [total - size * (n - 1)] if n else []


def piece_count(payload_len: int, piece_bytes: int) -> int:
    return max(1, -(-payload_len // piece_bytes))


def encode_record(rec: RecordHeader) -> bytes:
    container = encode_header(rec.header)
    body = (
        _HEAD.pack(
            HEADER_MAGIC,
            HEADER_VERSION,
            rec.generation,
            rec.piece_bytes,
            len(rec.sums),
            len(container),
        )
        + container
        + struct.pack(f"<{len(rec.sums)}Q", *rec.sums)
    )
    return body + _U64.pack(xxhash.xxh3_64_intdigest(body))


def decode_record(raw: bytes) -> RecordHeader:
    if len(raw) < _HEAD.size + _U64.size:
        raise RemoteRecordError(f"header record of {len(raw)} bytes is truncated")
    body = memoryview(raw)[: -_U64.size]
    if _U64.unpack_from(raw, len(body))[0] != xxhash.xxh3_64_intdigest(body):
        raise RemoteRecordError("header record fails its checksum")
    magic, version, generation, piece_bytes, n, hlen = _HEAD.unpack_from(raw)
    if magic != HEADER_MAGIC or version != HEADER_VERSION:
        raise RemoteRecordError(f"not a kvstore remote header (magic {magic!r} v{version})")
    if len(body) != _HEAD.size + hlen + 8 * n:
        raise RemoteRecordError("header record's length contradicts its piece count")
    try:
        header, used = decode_header(body[_HEAD.size : _HEAD.size + hlen])
    except ContainerError as exc:
        raise RemoteRecordError(f"container header: {exc}") from None
    if used != hlen or piece_bytes == 0 or n != piece_count(header.payload_len, piece_bytes):
        raise RemoteRecordError("header record's pieces do not add up to its payload")
    sums = struct.unpack_from(f"<{n}Q", body, _HEAD.size + hlen)
    return RecordHeader(header, generation, piece_bytes, sums)


@dataclass
class RemoteValue:
    """A value read back whole and verified: its container header and its payload, read
    from the socket straight into one buffer."""

    header: ValueHeader
    payload: memoryview


@dataclass
class RemoteCounters:
    hits: int = 0
    misses: int = 0
    errors: int = 0  # batches (per master) that failed or missed their deadline
    corrupt: int = 0  # values found damaged and deleted
    bytes_read: int = 0
    bytes_written: int = 0
    values_written: int = 0
    batches: int = 0
    batch_seconds: float = 0.0


@dataclass(eq=False)
class _Master:
    address: tuple[str, int]
    client: redis.Redis
    down_until: float = 0.0


def _tag(prefix: str, namespace: str, key: bytes) -> bytes:
    return b"{" + f"{prefix}{namespace}/{key.hex()}".encode() + b"}"


def header_key(prefix: str, namespace: str, key: bytes) -> bytes:
    """The Redis key of a value's header record."""
    return _tag(prefix, namespace, key) + b"h"


def piece_key(prefix: str, namespace: str, key: bytes, generation: int, index: int) -> bytes:
    """The Redis key of piece `index` of write `generation` of a value."""
    return _piece_name(_tag(prefix, namespace, key), generation, index)


def _piece_keys(hkey: bytes, rec: RecordHeader) -> list[bytes]:
    """The Redis keys of every piece `rec` names, beside header record `hkey`."""
    tag = hkey[:-1]
    return [_piece_name(tag, rec.generation, i) for i in range(len(rec.sums))]


def _piece_name(tag: bytes, generation: int, index: int) -> bytes:
    return tag + f"p{generation:016x}.{index}".encode()


@dataclass
class _Job:
    """One master's share of a batch: positions in the caller's key list.

    A job that misses the deadline is `abandoned` by the caller and may still be running:
    whatever it holds (a sink's buffers) it then gives back itself."""

    master: _Master
    positions: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: bool = False
    finished: bool = False
    abandoned: bool = False

    def start(self) -> bool:
        """Called by a job that owns buffers as it begins: False when its caller gave up
        on it before (the caller then gives the buffers back)."""
        with self.lock:
            self.started = not self.abandoned
            return self.started

    def give_up(self) -> bool:
        """Called by the caller of a job that brought no result: True when the job never
        began, so that whatever was meant for it is the caller's to give back (a job that
        began gives back its own)."""
        with self.lock:
            self.abandoned = self.abandoned or not self.finished
            return not self.started and not self.finished

    def finish(self) -> bool:
        """Called by the job as it ends: False when its caller gave up on it."""
        with self.lock:
            self.finished = not self.abandoned
            return self.finished

    def abandon(self) -> bool:
        """Called by the caller past the deadline: False when the job finished after all."""
        with self.lock:
            self.abandoned = not self.finished
            return self.abandoned


class PayloadSink(Protocol):
    """Where `RemoteTier.get_many` reads payloads: `buffer` gives room for the payload
    `header` describes of key number `index` (None: do not read it, a miss), and every
    buffer it gave is either returned in a `RemoteValue` or handed back to `discard`
    (perhaps later, from another thread, for a read that missed its deadline)."""

    def buffer(self, index: int, header: ValueHeader) -> memoryview | None: ...

    def discard(self, index: int) -> None: ...


class _NewBuffers:
    def buffer(self, index: int, header: ValueHeader) -> memoryview | None:
        return memoryview(bytearray(header.payload_len))

    def discard(self, index: int) -> None:
        pass


def seed(url: str) -> tuple[tuple[str, int], dict[str, Any]]:
    """(host, port) and the connection options of one cluster seed URL. ValueError, saying
    why, for a URL that is not a usable redis:// or rediss:// one; checked without
    connecting (a connection object is built, which rejects options redis-py lacks)."""
    try:
        args = parse_url(url)
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a Redis URL: {exc}") from None
    if not args.get("host"):
        raise ValueError(f"{url!r} names no host (redis://HOST:PORT)")
    try:
        redis.ConnectionPool(**args).make_connection()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{url!r} has an option redis-py rejects: {exc}") from None
    address = (str(args.pop("host")), int(args.pop("port", 6379)))
    args.pop("db", None)  # a cluster has one database
    return address, args


def _take_turns(per_master: Iterable[list[_Job]]) -> list[_Job]:
    """Every master's jobs in one list, the masters taking turns: the first jobs a pool
    runs then keep every master busy."""
    turns = itertools.zip_longest(*per_master)
    return [job for turn in turns for job in turn if job is not None]


class RemoteTier:
    """A Redis/Valkey Cluster as a shared tier; see the module docstring."""

    name = "remote"

    def __init__(
        self,
        urls: Sequence[str],
        *,
        piece_bytes: int = DEFAULT_PIECE_BYTES,
        timeout_s: float = 1.0,
        ttl_s: float | None = None,
        backoff_s: float = 2.0,
        prefix: str = DEFAULT_PREFIX,
        password: str | None = None,
        workers: int = 16,
    ) -> None:
        if not urls:
            raise ValueError("remote tier: give at least one redis:// or rediss:// URL")
        self.piece_bytes = piece_bytes
        self.timeout_s = timeout_s
        self.ttl_ms = int(ttl_s * 1000) if ttl_s else None
        self.backoff_s = backoff_s
        self.prefix = prefix
        self.counters = RemoteCounters()
        self._seeds: list[tuple[str, int]] = []
        self._conn_args: dict[str, Any] = {}
        for url in urls:
            try:
                address, args = seed(url)
            except ValueError as exc:
                raise ValueError(f"remote tier: {exc}") from None
            if password and not args.get("password"):
                args["password"] = password
            self._seeds.append(address)
            self._conn_args = self._conn_args or args
        self._lock = threading.Lock()
        self._masters: dict[tuple[str, int], _Master] = {}
        self._slots: list[_Master] | None = None
        self._workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kvstore-remote")
        self._refresh_wanted = threading.Event()
        self._closing = False
        self._warned = False
        if not self.refresh():
            self._warn_unreachable()
            self._refresh_wanted.set()
        self._refresher = threading.Thread(
            target=self._refresh_forever, name="kvstore-remote-topology", daemon=True
        )
        self._refresher.start()

    # ------------------------------------------------------------------ topology

    @property
    def seeds(self) -> list[str]:
        return [f"{host}:{port}" for host, port in self._seeds]

    @property
    def connected(self) -> bool:
        """Whether the slot map is known (the cluster answered at least once)."""
        return self._slots is not None

    def _master(self, address: tuple[str, int]) -> _Master:
        with self._lock:
            m = self._masters.get(address)
            if m is None:
                pool = redis.ConnectionPool(**self._pool_args(address))
                m = _Master(address, redis.Redis(connection_pool=pool))
                self._masters[address] = m
            return m

    def _pool_args(self, address: tuple[str, int]) -> dict[str, Any]:
        """Connection settings for one node: the URL's, with our deadlines (which the URL
        may not loosen) and no retries (a failing master is skipped instead)."""
        return {
            **self._conn_args,
            "host": address[0],
            "port": address[1],
            "socket_timeout": self.timeout_s,
            "socket_connect_timeout": self.timeout_s,
            "retry": Retry(NoBackoff(), 0),
        }

    def refresh(self) -> bool:
        """Read the slot map from the first seed or known master that answers; whether
        one did."""
        with self._lock:
            known = [a for a in self._masters if a not in self._seeds]
        for address in [*self._seeds, *known]:
            try:
                slots = self._slot_map(self._master(address))
            except (redis.RedisError, OSError, ValueError) as exc:
                log.debug("remote tier: %s:%d gave no slot map: %s", *address, exc)
                continue
            self._slots = slots
            if self._warned:
                log.warning("remote tier: the cluster answers again (%s:%d)", *address)
                self._warned = False
            return True
        return False

    def _slot_map(self, seed: _Master) -> list[_Master]:
        info = seed.client.info("cluster")
        if not info.get("cluster_enabled"):
            if len(self._seeds) > 1:
                host, port = seed.address
                raise ValueError(f"several URLs given but {host}:{port} is not in cluster mode")
            return [seed] * SLOTS
        ranges = seed.client.execute_command("CLUSTER", "SLOTS")
        slots: list[_Master | None] = [None] * SLOTS
        for entry in ranges:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            owner = self._master((host or seed.address[0], int(master[1])))
            slots[start : end + 1] = [owner] * (end + 1 - start)
        if any(s is None for s in slots):
            missing = sum(s is None for s in slots)
            log.warning(
                "remote tier: %d of %d slots have no master; their keys miss", missing, SLOTS
            )
            slots = [s if s is not None else _UNSERVED for s in slots]
        return slots  # type: ignore[return-value]

    def _refresh_forever(self) -> None:
        while not self._closing:
            asked = self._refresh_wanted.wait(30.0)
            if self._closing:
                return
            self._refresh_wanted.clear()
            if not self.refresh():
                if not self._warned:
                    self._warn_unreachable()
                self._refresh_wanted.set()
                time.sleep(self.backoff_s)
            elif asked:
                time.sleep(min(self.backoff_s, 1.0))  # at most about one refresh a second

    def _warn_unreachable(self) -> None:
        self._warned = True
        seeds = ", ".join(f"{h}:{p}" for h, p in self._seeds)
        log.warning(
            "remote tier: no cluster node answers (%s); serving from local tiers only and "
            "retrying every %gs",
            seeds,
            self.backoff_s,
        )

    def _fail(self, master: _Master, what: str, exc: BaseException | None) -> None:
        master.down_until = time.monotonic() + self.backoff_s
        with self._lock:
            self.counters.errors += 1
        log.warning(
            "remote tier: %s on %s:%d failed (%s); skipping it for %gs",
            what,
            *master.address,
            exc or f"no answer within {self.timeout_s:g}s",
            self.backoff_s,
        )
        self._refresh_wanted.set()

    # ------------------------------------------------------------------ batching

    def _shares(
        self, hkeys: Sequence[bytes], positions: Sequence[int] | None = None
    ) -> dict[_Master, list[int]]:
        """Each live master's positions among `hkeys` (only `positions` when given); keys
        of masters that are down (or of an unknown slot map) are in no share."""
        slots = self._slots
        if slots is None:
            return {}
        now = time.monotonic()
        shares: dict[_Master, list[int]] = {}
        for i in range(len(hkeys)) if positions is None else positions:
            m = slots[key_slot(hkeys[i])]
            if m is not _UNSERVED and m.down_until <= now:
                shares.setdefault(m, []).append(i)
        return shares

    def _group(self, hkeys: Sequence[bytes], budget: int = KEYS_PER_PIPELINE) -> list[_Job]:
        """Jobs of at most `budget` keys per live master."""
        return _take_turns(
            [_Job(m, share[at : at + budget]) for at in range(0, len(share), budget)]
            for m, share in self._shares(hkeys).items()
        )

    def _lanes(
        self, hkeys: Sequence[bytes], positions: Sequence[int], nbytes: Callable[[int], int]
    ) -> list[_Job]:
        """READ_LANES_PER_MASTER jobs per live master (fewer for fewer keys), of about
        equal bytes."""
        per_master = []
        for m, share in self._shares(hkeys, positions).items():
            lanes = [_Job(m) for _ in range(min(READ_LANES_PER_MASTER, len(share)))]
            loads = [0] * len(lanes)
            for i in share:
                k = loads.index(min(loads))
                lanes[k].positions.append(i)
                loads[k] += nbytes(i)
            per_master.append(lanes)
        return _take_turns(per_master)

    def _run(
        self, what: str, jobs: list[_Job], work: Callable[[_Job], T], extra_s: float = 0.0
    ) -> list[T | None]:
        """`work(job)` for every job in parallel, within the deadline (plus `extra_s`);
        None for jobs whose master failed or did not answer in time (it is then skipped
        for a while)."""
        if not jobs:
            return []
        started = time.monotonic()
        futures: list[Future[T]] = [self._pool.submit(work, job) for job in jobs]
        waves = -(-len(jobs) // self._workers)  # the pool runs this many rounds of jobs
        wait_futures(futures, timeout=self.timeout_s * waves + extra_s)
        out: list[T | None] = []
        failed: set[_Master] = set()
        for job, fut in zip(jobs, futures, strict=True):
            exc: BaseException | None = None
            if fut.done() or not job.abandon():
                exc = fut.exception()
                if exc is None:
                    out.append(fut.result())
                    continue
            else:
                fut.cancel()
            out.append(None)
            if job.master not in failed:
                failed.add(job.master)
                self._fail(job.master, what, exc)
        with self._lock:
            self.counters.batches += 1
            self.counters.batch_seconds += time.monotonic() - started
        return out

    def _scatter(
        self,
        what: str,
        hkeys: Sequence[bytes],
        work: Callable[[_Job], Sequence[T]],
        missing: T,
        extra_s: float = 0.0,
        budget: int = KEYS_PER_PIPELINE,
    ) -> list[T]:
        """Run `work` on every master's share of `hkeys` (in jobs of `budget` keys) in
        parallel; one result per key, in order, `missing` where the master failed or is
        skipped."""
        out = [missing] * len(hkeys)
        try:
            jobs = self._group(hkeys, budget)
            done = self._run(what, jobs, work, extra_s)
        except Exception:  # closed meanwhile, or a bug: still a miss, never a failed call
            log.exception("remote tier: %s of %d keys failed", what, len(hkeys))
            return out
        for job, results in zip(jobs, done, strict=True):
            if results is not None:
                for i, result in zip(job.positions, results, strict=True):
                    out[i] = result
        return out

    def _hkeys(self, namespace: str, keys: Sequence[bytes]) -> list[bytes]:
        return [header_key(self.prefix, namespace, k) for k in keys]

    # ------------------------------------------------------------------ reads

    def get_many(
        self, namespace: str, keys: Sequence[bytes], sink: PayloadSink | None = None
    ) -> list[RemoteValue | None]:
        """Each value, verified, or None: absent, damaged (then deleted), or on a master
        that failed. Payloads are read into buffers from `sink` (default: new ones).

        Two rounds: every master's header records at once (small replies, pipelines of
        up to HEADERS_PER_PIPELINE), then the pieces on READ_LANES_PER_MASTER lanes per
        master, pipelines back to back. Reading a few keys' headers and then their pieces
        on one connection left it, and often its master, idle for a round trip each
        time; more threads than lanes only fought over the GIL."""
        hkeys = self._hkeys(namespace, keys)
        to = sink if sink is not None else _NewBuffers()
        records = self._scatter(
            "read", hkeys, lambda job: self._header_job(job, hkeys), None,
            budget=HEADERS_PER_PIPELINE,
        )  # fmt: skip
        reads: dict[int, tuple[bytes, RecordHeader, memoryview]] = {}
        for i, found in enumerate(records):
            if found is not None:
                dst = to.buffer(i, found[1].header)
                if dst is not None:
                    reads[i] = (*found, dst)
        out: list[RemoteValue | None] = [None] * len(keys)
        if reads:
            self._read_values(hkeys, reads, to, out)
        hits = sum(v is not None for v in out)
        with self._lock:
            self.counters.hits += hits
            self.counters.misses += len(keys) - hits
        return out

    def _header_job(
        self, job: _Job, hkeys: Sequence[bytes]
    ) -> list[tuple[bytes, RecordHeader] | None]:
        """The header records of a job's keys, raw and parsed (None: absent or damaged,
        then dropped)."""
        pipe = job.master.client.pipeline(transaction=False)
        for i in job.positions:
            pipe.get(hkeys[i])
        out: list[tuple[bytes, RecordHeader] | None] = []
        bad: list[tuple[bytes, bytes, list[bytes]]] = []  # header key, header, piece keys
        for i, raw in zip(job.positions, pipe.execute(), strict=True):
            rec = None
            if raw is not None:
                try:
                    rec = decode_record(raw)
                except RemoteRecordError as exc:
                    log.error("remote tier: dropping %r: %s", hkeys[i], exc)
                    bad.append((hkeys[i], raw, []))
            out.append(None if rec is None else (raw, rec))
        if bad:
            self._drop(job.master.client, bad)
        return out

    def _read_values(
        self,
        hkeys: Sequence[bytes],
        reads: dict[int, tuple[bytes, RecordHeader, memoryview]],
        sink: PayloadSink,
        out: list[RemoteValue | None],
    ) -> None:
        """Read the pieces of `reads` (position: raw header, its record, destination) into
        their destinations and set `out` for those that arrive whole and check out; every
        other destination goes back to `sink`."""
        jobs: list[_Job] = []
        try:
            jobs = self._lanes(hkeys, list(reads), lambda i: reads[i][1].header.payload_len)
            jobs_of = {i for job in jobs for i in job.positions}
            for i in reads.keys() - jobs_of:  # its master went down since its header came
                sink.discard(i)
            # Each lane has the deadline for each of its pipelines.
            pipelines = max(len(_pipelines(job.positions, reads)) for job in jobs) if jobs else 1
            done = self._run(
                "read",
                jobs,
                lambda job: self._pieces_job(job, hkeys, reads, sink),
                extra_s=self.timeout_s * (pipelines - 1),
            )
        except Exception:  # closed meanwhile, or a bug: misses, never a failed call
            log.exception("remote tier: reading %d values failed", len(reads))
            done = [None] * len(jobs)
        for job, found in zip(jobs, done, strict=True):
            if found is not None:
                for i, value in zip(job.positions, found, strict=True):
                    out[i] = value
            elif job.give_up():
                for i in job.positions:
                    sink.discard(i)

    def _pieces_job(
        self,
        job: _Job,
        hkeys: Sequence[bytes],
        reads: dict[int, tuple[bytes, RecordHeader, memoryview]],
        sink: PayloadSink,
    ) -> list[RemoteValue | None]:
        """Read one job's values; from its start it owns their destinations: each is
        returned in a RemoteValue or given back to `sink`."""
        if not job.start():
            return []
        mine = [(i, *reads[i]) for i in job.positions]
        faults: list[str] = []
        try:
            for part in _pipelines(job.positions, reads):
                faults += _read_pieces(
                    job.master.client,
                    [(_piece_keys(hkeys[i], reads[i][1]), *reads[i][1:]) for i in part],
                )
        except BaseException:
            for i in job.positions:
                sink.discard(i)
            raise
        if not job.finish():  # the caller gave up waiting: nobody will take these
            for i in job.positions:
                sink.discard(i)
            return []
        found: list[RemoteValue | None] = []
        bad: list[tuple[bytes, bytes, list[bytes]]] = []
        nbytes = 0
        for (i, raw, rec, dst), why in zip(mine, faults, strict=True):
            if why:
                log.error("remote tier: dropping %r: %s", hkeys[i], why)
                bad.append((hkeys[i], raw, _piece_keys(hkeys[i], rec)))
                sink.discard(i)
                found.append(None)
            else:
                found.append(RemoteValue(rec.header, dst))
                nbytes += len(dst)
        with self._lock:
            self.counters.bytes_read += nbytes
        if bad:
            try:  # the values read are returned whatever happens to the drop
                self._drop(job.master.client, bad)
            except (redis.RedisError, OSError) as exc:
                log.warning("remote tier: could not drop %d damaged values: %s", len(bad), exc)
        return found

    def _drop(self, client: redis.Redis, bad: list[tuple[bytes, bytes, list[bytes]]]) -> None:
        pipe = client.pipeline(transaction=False)
        for hkey, raw, pkeys in bad:
            pipe.eval(_DROP_IF_SAME, 1 + len(pkeys), hkey, *pkeys, raw)
        pipe.execute()
        with self._lock:
            self.counters.corrupt += len(bad)

    def exists_many(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        """Whether each value's header record exists (its pieces are checked on read)."""
        hkeys = self._hkeys(namespace, keys)

        def work(job: _Job) -> list[bool]:
            pipe = job.master.client.pipeline(transaction=False)
            for i in job.positions:
                pipe.exists(hkeys[i])
            return [int(n) > 0 for n in pipe.execute()]

        return self._scatter("exists", hkeys, work, False)

    # ------------------------------------------------------------------ writes

    def put_many(self, items: Sequence[tuple[str, bytes, ValueHeader, Buffer]]) -> list[bool]:
        """Store each (namespace, key, header, payload), replacing any older copy; whether
        each was written (False: its master failed or is skipped)."""
        hkeys = [header_key(self.prefix, ns, k) for ns, k, _, _ in items]
        # A large write may take longer than a read's deadline: allow for sending its bytes
        # at WRITE_FLOOR_BYTES_S.
        extra = sum(h.payload_len for _, _, h, _ in items) / WRITE_FLOOR_BYTES_S
        return self._scatter(
            "write", hkeys, lambda job: self._put_job(job, hkeys, items), False, extra
        )

    def _put_job(
        self,
        job: _Job,
        hkeys: Sequence[bytes],
        items: Sequence[tuple[str, bytes, ValueHeader, Buffer]],
    ) -> list[bool]:
        pipe = job.master.client.pipeline(transaction=False)
        size = self.piece_bytes
        nbytes = 0
        generations: dict[int, int] = {}
        for i in job.positions:
            _, _, header, payload = items[i]
            view = memoryview(payload).cast("B")
            if len(view) != header.payload_len:
                raise ValueError(f"payload of {len(view)} bytes, header says {header.payload_len}")
            n = piece_count(len(view), size)
            pieces = [view[p * size : (p + 1) * size] for p in range(n)]
            generations[i] = int.from_bytes(os.urandom(8), "little")
            rec = RecordHeader(
                header,
                generations[i],
                size,
                tuple(xxhash.xxh3_64_intdigest(p) for p in pieces),
            )
            for pkey, piece in zip(_piece_keys(hkeys[i], rec), pieces, strict=True):
                pipe.set(pkey, piece, px=self.ttl_ms)
            pipe.set(hkeys[i], encode_record(rec), px=self.ttl_ms, get=True)
            nbytes += len(view)
        replies = pipe.execute(raise_on_error=False)
        # Each value's last reply is its header's SET ... GET: the header it replaced.
        stale: list[list[bytes]] = []  # per replaced value: one DEL each, as one slot
        done: list[bool] = []
        at = 0
        for i in job.positions:
            n = piece_count(items[i][2].payload_len, size)
            mine = replies[at : at + n + 1]
            at += n + 1
            done.append(not any(isinstance(r, Exception) for r in mine))
            old = mine[-1]
            if isinstance(old, bytes):
                try:
                    rec = decode_record(old)
                    if rec.generation != generations[i]:
                        stale.append(_piece_keys(hkeys[i], rec))
                except RemoteRecordError:
                    pass
        if stale:
            pipe = job.master.client.pipeline(transaction=False)
            for pkeys in stale:
                pipe.delete(*pkeys)
            pipe.execute(raise_on_error=False)
        with self._lock:
            self.counters.bytes_written += nbytes
            self.counters.values_written += sum(done)
        return done

    def delete_many(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        """Delete each value; whether each was there."""
        hkeys = self._hkeys(namespace, keys)

        def work(job: _Job) -> list[bool]:
            client = job.master.client
            pipe = client.pipeline(transaction=False)
            for i in job.positions:
                pipe.get(hkeys[i])
            raws = pipe.execute()
            pipe = client.pipeline(transaction=False)
            for i, raw in zip(job.positions, raws, strict=True):
                pkeys: list[bytes] = []
                if raw is not None:
                    with contextlib.suppress(RemoteRecordError):
                        pkeys = _piece_keys(hkeys[i], decode_record(raw))
                pipe.delete(hkeys[i], *pkeys)
            pipe.execute()
            return [raw is not None for raw in raws]

        return self._scatter("delete", hkeys, work, False)

    def snapshot(self) -> RemoteCounters:
        """A consistent copy of the counters, the remote tier's corrupt drops included."""
        with self._lock:
            return RemoteCounters(**vars(self.counters))

    def close(self) -> None:
        self._closing = True
        self._refresh_wanted.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            masters = list(self._masters.values())
        for m in masters:
            m.client.connection_pool.disconnect()


def _pipelines(
    positions: Sequence[int], reads: dict[int, tuple[bytes, RecordHeader, memoryview]]
) -> list[list[int]]:
    """`positions` cut into runs of about PIECE_BYTES_PER_PIPELINE of payload (one value at
    least), each read as one pipeline."""
    runs: list[list[int]] = []
    room = 0
    for i in positions:
        size = reads[i][1].header.payload_len
        if not runs or (room < size and runs[-1]):
            runs.append([])
            room = PIECE_BYTES_PER_PIPELINE
        runs[-1].append(i)
        room -= size
    return runs


def _read_pieces(
    client: redis.Redis, values: Sequence[tuple[list[bytes], RecordHeader, memoryview]]
) -> list[str]:
    """GET every piece of `values` in one pipeline, each straight from the socket into its
    place in the value's buffer, and check it; per value, why its pieces are bad ("" when
    they are good).

    redis-py would hand each piece back as a bytes object, copied twice on the way (its
    read buffer, the parser's); this reads the replies (bulk strings) itself on one of
    the client's connections, which is closed instead of reused after any failure.
    """
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command(
            conn.pack_commands([("GET", pkey) for pkeys, _, _ in values for pkey in pkeys])
        )
        reader = _BulkReader(conn._sock)  # type: ignore[attr-defined]
        faults: list[str] = []
        for pkeys, rec, dst in values:
            why = ""
            at = 0
            for p, (want, size) in enumerate(zip(rec.sums, rec.piece_lens(), strict=True)):
                got = reader.bulk(dst[at : at + size] if not why else None)
                if why:
                    continue  # the rest of this value's replies are read and dropped
                if got is None:
                    why = f"piece {p} of {len(pkeys)} is missing"
                elif got != size:
                    why = f"piece {p} is {got} bytes, its header says {size}"
                elif xxhash.xxh3_64_intdigest(dst[at : at + size]) != want:
                    why = f"piece {p} fails its checksum"
                at += size
            faults.append(why)
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)
    return faults


class _BulkReader:
    """Reads replies to GET (RESP2 or RESP3) from a socket: bulk strings go straight into
    the caller's buffer; only the line before each, and what arrives with it, passes
    through a small buffer."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = bytearray(1 << 16)
        self._view = memoryview(self._buf)
        self._start = self._end = 0  # unread bytes of _buf

    def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):  # only a partial line is left: move it down
            n = self._end - self._start
            self._buf[:n] = self._view[self._start : self._end]
            self._start, self._end = 0, n
        got = self._sock.recv_into(self._view[self._end :])
        if not got:
            raise redis.ConnectionError("connection closed while reading a reply")
        self._end += got

    def _line(self) -> bytes:
        while (end := self._buf.find(b"\r\n", self._start, self._end)) < 0:
            self._fill()
        line = bytes(self._view[self._start : end])
        self._start = end + 2
        return line

    def bulk(self, dst: memoryview | None) -> int | None:
        """The next reply's length (None for a nil), its bytes in `dst` when it is exactly
        `len(dst)` long; a reply of another length is read and dropped. An error reply
        (MOVED, a failing master) raises ResponseError."""
        line = self._line()
        if line == b"_":  # RESP3's null
            return None
        if line[:1] == b"-":
            raise redis.ResponseError(line[1:].decode(errors="replace"))
        if line[:1] != b"$":
            raise redis.ResponseError(f"unexpected reply to GET: {line[:40]!r}")
        n = int(line[1:])
        if n < 0:
            return None
        if dst is None or n != len(dst):
            dst = memoryview(bytearray(n))
        have = min(self._end - self._start, n)
        dst[:have] = self._view[self._start : self._start + have]
        self._start += have
        while have < n:
            got = self._sock.recv_into(dst[have:], n - have)
            if not got:
                raise redis.ConnectionError("connection closed while reading a reply")
            have += got
        while self._end - self._start < 2:
            self._fill()
        self._start += 2  # the CRLF after the bytes
        return n


# Stands for "no master owns this slot" in the slot map.
_UNSERVED = _Master(("", 0), redis.Redis())
