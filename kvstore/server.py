"""The gRPC daemon: `KVStoreServicer` over a `Store`, and `serve()` to run it.

`serve(config)` runs a `grpc.aio` server on uvloop, listening on a Unix socket (mode 0600) and
optionally on TCP, with the standard health and reflection services. SIGTERM or SIGINT stops
it: health turns NOT_SERVING, new calls are refused, in-flight calls get `grace_seconds` to
finish, the cpu tier's values are copied to ssd while time remains, LMDB is flushed, and the
socket and the shared-memory arena are removed.

Store calls that can block (eviction to ssd, LMDB reads, checksums of large values) run on
worker threads so the event loop keeps streaming other calls' bytes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import functools
import logging
import os
import secrets
import signal
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvstore import __version__, auth
from kvstore.admission import (
    BUSY,
    MAX_LIST_FIELD,
    MAX_PIECES_PER_VALUE,
    Admission,
    check_count,
    time_left,
)
from kvstore.auth import READ, WRITE, ServerSecurity, require, share_files
from kvstore.config import ServerConfig, format_size
from kvstore.errors import (
    InvalidArgument,
    KVStoreError,
    NotFound,
    Overloaded,
    Unauthenticated,
    Unavailable,
    retry_metadata,
)
from kvstore.events import EventKind, KVEvent, Watcher
from kvstore.metrics import ServerMetrics
from kvstore.store import PutReservation, ReadLease, RemoteStats, Store, check_namespace
from kvstore.threads import forbid_unsafe_layer
from kvstore.tiers.gpu import PoolExport
from kvstore.tiers.host import HostArena
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire import GRPC_OPTIONS, PIECE_BYTES, SERVICE, Piece, server_handler

log = logging.getLogger("kvstore.server")

SYNC_INTERVAL_S = 1.0

T = TypeVar("T")


async def _fail(context: grpc.aio.ServicerContext, exc: Exception) -> Any:
    if isinstance(exc, KVStoreError):
        # The traceback holds the handler's frame, whose locals hold `exc` (and the request's
        # pieces, megabytes each): a reference cycle only the cyclic collector frees, long
        # after the call.
        exc.__traceback__ = None
        await context.abort(exc.code, str(exc), trailing_metadata=retry_metadata(exc))
    log.exception("internal error in %s", type(exc).__name__, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def _unary(
    fn: Callable[[KVStoreServicer, Any, grpc.aio.ServicerContext], Awaitable[T]],
) -> Callable[[KVStoreServicer, Any, grpc.aio.ServicerContext], Awaitable[T]]:
    """Turn store errors raised by a unary handler into gRPC statuses."""

    async def wrapper(self: KVStoreServicer, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await fn(self, request, context)
        except Exception as exc:  # aborting raises too; _fail re-raises it
            if isinstance(exc, grpc.aio.AbortError):
                raise
            return await _fail(context, exc)  # type: ignore[no-any-return]

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


_READ_AHEAD = 4  # leases a read keeps under way past the value it sends


class _ReadAhead:
    """The leases of `keys`, in order, each taken by `lease_of` (a coroutine): while the
    caller sends one value, the next `_READ_AHEAD` are under way. A lease taken ahead and
    refused by back-pressure (Overloaded) is taken again in its turn, as it would have
    been without reading ahead; `close()` gives back what was taken and not asked for."""

    def __init__(self, lease_of: Callable[[bytes], Awaitable[ReadLease | None]],
                 keys: Sequence[bytes]) -> None:  # fmt: skip
        self._lease_of, self._keys = lease_of, list(keys)
        self._next = 0
        self._pending: collections.deque[asyncio.Future[ReadLease | None]] = collections.deque()

    def _fill(self) -> None:
        while len(self._pending) < 1 + _READ_AHEAD and self._next < len(self._keys):
            key = self._keys[self._next]
            self._pending.append(asyncio.ensure_future(self._lease_of(key)))
            self._next += 1

    async def next(self) -> ReadLease | None:
        """The next key's lease (None: absent); its error, if taking it failed."""
        self._fill()
        key = self._keys[self._next - len(self._pending)]
        future = self._pending.popleft()
        self._fill()
        try:
            # Shielded: a call cancelled just as the lease came would otherwise drop it.
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(_release_lease)
            raise
        except Overloaded:
            return await self._lease_of(key)

    def close(self) -> None:
        """Give back every lease taken ahead, now or when its worker is done."""
        for future in self._pending:
            future.add_done_callback(_release_lease)
        self._pending.clear()


def _release_lease(future: asyncio.Future[ReadLease | None]) -> None:
    if not future.cancelled() and future.exception() is None:
        lease = future.result()
        if lease is not None:
            lease.release()


async def _in_thread_owned(fn: Callable[..., T], *args: Any, release: Callable[[Any], object]) -> T:
    """`fn(*args)` on a worker thread; if the call is cancelled meanwhile (client deadline,
    disconnect), what `fn` returns once it finishes is handed to `release`, never leaked."""
    future = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:

        def orphaned(f: asyncio.Future[T]) -> None:
            if not f.cancelled() and f.exception() is None and f.result() is not None:
                release(f.result())

        future.add_done_callback(orphaned)
        raise


H = TypeVar("H")


_IDS_AHEAD = 1024
_Group = tuple[str, int]  # (tenant name, the client's call number; 0: none)


class HandOuts(Generic[H]):
    """Things handed to same-host clients by id until they return them or time runs out:
    read leases (SharedSlices) and put reservations.

    Used from the event loop only. Ids are random, so one client cannot end another's by
    counting, and each id and call group belongs to the tenant (`kvstore.auth`) that was
    handed it: another tenant's ids and call numbers are unknown to it, whatever it guesses.
    What a client that died still holds is ended after `seconds` by `end`.
    """

    def __init__(
        self,
        seconds: float,
        end: Callable[[H], object],
        what: str,
        hold_expired: bool = False,
        limit: int = 1 << 62,
    ) -> None:
        self.seconds = seconds
        self.limit = limit  # most held at once (--max-leases); see `full`
        self._end = end
        self._what = what
        # With `hold_expired`, what times out is kept one more period before it is ended: a
        # put reservation's slot must not be reused while a stalled client may still write
        # into it through its mapping.
        self._hold_expired = hold_expired
        self._expired: list[tuple[H, float]] = []
        self._held: dict[int, tuple[H, float, _Group]] = {}
        self._groups: dict[_Group, set[int]] = {}  # (tenant, the client's call number) -> ids
        self._fresh: list[int] = []  # random ids drawn ahead

    def _new_id(self) -> int:
        """A random 63-bit id not in use. The system's random source is read 8 KiB at a
        time: a read per id was 70% of the server's time in a 256-key get."""
        while True:
            if not self._fresh:
                raw = secrets.token_bytes(8 * _IDS_AHEAD)
                self._fresh = [v >> 1 for v in struct.unpack(f"<{_IDS_AHEAD}Q", raw)]
            ident = self._fresh.pop()
            if ident and ident not in self._held:  # 0 means "none" on the wire
                return ident

    def full(self) -> bool:
        """Whether the table holds `limit` things (those held past their time included)."""
        return len(self) >= self.limit

    def hand_out(self, thing: H, group: int = 0) -> int:
        """Hold `thing` under a new id for the calling tenant, as part of its call `group`
        if not 0."""
        ident = self._new_id()
        owned = (auth.caller().name, group)
        self._held[ident] = (thing, time.monotonic() + self.seconds, owned)
        if group:
            self._groups.setdefault(owned, set()).add(ident)
        return ident

    def take(self, ids: Sequence[int], anyone: bool = False) -> list[tuple[int, H]]:
        """Remove `ids` the calling tenant holds (any, with `anyone`) from the table and
        return what they held; other ids are skipped, as unknown ones."""
        tenant = auth.caller().name
        taken = []
        for i in ids:
            item = self._held.get(i)
            if item is None or (item[2][0] != tenant and not anyone):
                continue
            del self._held[i]
            thing, _, owned = item
            if owned[1]:
                members = self._groups[owned]
                members.discard(i)
                if not members:
                    del self._groups[owned]
            taken.append((i, thing))
        return taken

    def renew_groups(self, groups: Sequence[int]) -> list[int]:
        """Restart the time of everything the calling tenant holds under each group;
        returns counts per group."""
        until = time.monotonic() + self.seconds
        tenant = auth.caller().name
        counts = []
        for g in groups:
            ids = self._groups.get((tenant, g), ()) if g else ()
            for i in ids:
                thing, _, owned = self._held[i]
                self._held[i] = (thing, until, owned)
            counts.append(len(ids))
        return counts

    def release_groups(self, groups: Sequence[int]) -> int:
        tenant = auth.caller().name
        return self.release([i for g in groups for i in self._groups.get((tenant, g), ())])

    def release(self, ids: Sequence[int], anyone: bool = False) -> int:
        taken = self.take(ids, anyone)
        for _, thing in taken:
            self._end(thing)
        return len(taken)

    def reclaim_expired(self) -> int:
        now = time.monotonic()
        due = [thing for thing, until in self._expired if until < now]
        self._expired = [(thing, until) for thing, until in self._expired if until >= now]
        for thing in due:
            self._end(thing)
        expired = [i for i, (_, deadline, _) in self._held.items() if deadline < now]
        if expired:
            log.warning("reclaimed %d %s their clients did not return", len(expired), self._what)
        if not self._hold_expired:
            return self.release(expired, anyone=True)
        self._expired.extend(
            (thing, now + self.seconds) for _, thing in self.take(expired, anyone=True)
        )
        return len(expired)

    def __len__(self) -> int:
        return len(self._held) + len(self._expired)

    def release_all(self) -> int:
        for thing, _ in self._expired:
            self._end(thing)
        self._expired = []
        return self.release(list(self._held), anyone=True)


_BATCH_PIECES = 1024  # answers without bytes sent in one GetPiece


def _check_read_lists(request: pb.GetRequest | pb.KeysRequest) -> None:
    check_count("gpu pools", len(request.gpu_pools), MAX_LIST_FIELD)
    check_count("codecs", len(request.codecs), MAX_LIST_FIELD)


def _value_args(h: pb.ValueHeader) -> tuple[bytes, str, list[int], int, int]:
    """What `Store.begin_put` / `reserve_in_arena` take after the namespace, from a header."""
    return h.key, h.dtype, list(h.shape), h.nbytes, h.checksum


def _cost(h: pb.ValueHeader) -> float:
    """A header's recompute cost per byte: 1.0 when unset (0)."""
    return h.cost if h.cost != 0 else 1.0


def _position(h: pb.ValueHeader) -> int:
    """A header's first-token position, -1 when unset."""
    return h.position if h.HasField("position") else -1


def _abort_all(reservations: Sequence[PutReservation | None]) -> None:
    for res in reservations:
        if res is not None:
            res.abort()


_CHECK_WORKERS = max(1, min(8, os.cpu_count() or 1))  # workers hashing one Commit


def _check_all(reservations: Sequence[PutReservation], compute: bool) -> None:
    for res in reservations:
        res.check(compute=compute)


def _commit_in_order(reservations: Sequence[PutReservation], tiers: list[str]) -> None:
    """Commit each; stops at the first failure (the caller aborts the rest)."""
    for res in reservations:
        tiers.append(res.commit())


def _release_checking(taken: list[tuple[int, ReadLease]], corrupt: set[int]) -> None:
    for lease_id, lease in taken:
        if lease_id not in corrupt:
            lease.release()
        elif lease.release_reported_corrupt():
            log.error("a client found a corrupt cpu copy; it was dropped")


class KVStoreServicer:
    """Implements `kvstore.v1.KVStore` over a `Store`."""

    def __init__(
        self, store: Store, config: ServerConfig, admission: Admission | None = None
    ) -> None:
        self.store = store
        self.config = config
        self.admission = admission or Admission(
            config.max_inflight_requests, config.max_inflight_bytes
        )
        self.started = time.monotonic()
        self.exports = {n: p.export() for n, p in store.pools.items()}
        self.shared: HandOuts[ReadLease] = HandOuts(
            config.lease_seconds, ReadLease.release, "shared read leases", limit=config.max_leases
        )
        self.reserved: HandOuts[PutReservation] = HandOuts(
            config.lease_seconds,
            PutReservation.abort,
            "put reservations",
            hold_expired=True,
            limit=config.max_leases,
        )

    def _check_ids(self, **lists: Sequence[int]) -> None:
        """Bound the id lists of Commit, Release and Renew by max-leases: no more can be
        held, and a client's request may end every one it holds at once."""
        for what, ids in lists.items():
            check_count(what.replace("_", " "), len(ids), self.config.max_leases, "max-leases")

    # --------------------------------------------------------------- puts

    async def Put(self, request_iterator: AsyncIterator[Piece], context: Any) -> Any:
        return await self._put(request_iterator, context, max_values=1)

    async def BatchPut(self, request_iterator: AsyncIterator[Piece], context: Any) -> Any:
        return await self._put(request_iterator, context, max_values=None)

    async def _put(
        self,
        pieces: AsyncIterator[Piece],
        context: grpc.aio.ServicerContext,
        max_values: int | None,
    ) -> pb.PutResponse:
        tiers: list[str] = []
        res: PutReservation | None = None
        namespace: str | None = None
        charged = 0  # bytes of the pending value counted in flight
        pieces_left = 0
        limit = max_values or self.config.max_keys_per_request
        try:
            async for piece, data in pieces:
                if namespace is None:
                    namespace = piece.namespace
                    check_namespace(namespace)
                    require(namespace, WRITE)
                if piece.HasField("header"):
                    # Checked before committing the pending value: a refused Put stores nothing.
                    if max_values is not None and len(tiers) + (res is not None) >= max_values:
                        raise InvalidArgument("Put carries one value; use BatchPut for several")
                    if res is not None:
                        tiers.append(await asyncio.to_thread(res.commit))
                        res = None
                        self.admission.release(charged)
                        charged = 0
                    # BatchPut: the values before the bound are stored, as for any failure.
                    check_count("values", len(tiers) + 1, limit, "max-keys-per-request")
                    h = piece.header
                    self.store.validate_value(h.dtype, h.shape, h.nbytes)  # before counting it
                    await self.admission.charge(
                        h.nbytes, "BatchPut" if max_values is None else "Put", bool(tiers),
                        time_left(context),
                    )  # fmt: skip
                    charged = h.nbytes
                    pieces_left = MAX_PIECES_PER_VALUE
                    # On a worker; a reservation the stream is gone for is aborted.
                    res = await _in_thread_owned(
                        self.store.begin_put,
                        namespace,
                        *_value_args(piece.header),
                        _cost(piece.header),
                        piece.header.newest,
                        _position(piece.header),
                        release=PutReservation.abort,
                    )
                elif res is None:
                    raise InvalidArgument(
                        "the first piece of a value must carry its header"
                        if not tiers
                        else "data after a complete value without a new header"
                    )
                pieces_left -= 1
                if pieces_left < 0:
                    raise InvalidArgument(
                        f"a value arrived in more than {MAX_PIECES_PER_VALUE} pieces; send "
                        "pieces of up to 4 MiB"
                    )
                if len(data):
                    res.write(data)
            if res is not None:
                tiers.append(await asyncio.to_thread(res.commit))
                res = None
            if not tiers:
                raise InvalidArgument("put stream carried no value")
            if "ssd" in tiers:  # acknowledged as on ssd: on disk first (--durability sync)
                await asyncio.to_thread(self.store.durable)
            return pb.PutResponse(stored=len(tiers), tiers=tiers)
        except grpc.aio.AbortError:
            raise
        except DecodeError as exc:
            error: Exception = InvalidArgument(f"malformed PutPiece: {exc}")
        except Exception as exc:
            error = exc
        finally:
            # A stream that ended early, failed or was cancelled leaves nothing behind.
            if res is not None:
                res.abort()
            self.admission.release(charged)
        # Failed. The last piece's bytes (up to 4 MiB) must not outlive the call, though
        # this frame may linger in the error's traceback until the cyclic collector runs.
        data = b""
        return await _fail(context, error)  # type: ignore[no-any-return]

    # --------------------------------------------------------------- gets

    async def Get(self, request: pb.GetRequest, context: Any) -> AsyncIterator[Piece]:
        keys = [request.key]
        try:
            _check_read_lists(request)
        except KVStoreError as exc:
            await _fail(context, exc)
        async for piece in self._get(
            request.namespace,
            keys,
            request.shared,
            request.call,
            request.gpu_pools,
            request.codecs,
            False,
            context,
        ):
            yield piece

    async def BatchGet(self, request: pb.KeysRequest, context: Any) -> AsyncIterator[Piece]:
        try:
            self.store.check_keys(request.namespace, request.keys)
            _check_read_lists(request)
        except KVStoreError as exc:
            await _fail(context, exc)
        async for piece in self._get(
            request.namespace,
            request.keys,
            request.shared,
            request.call,
            request.gpu_pools,
            request.codecs,
            request.packed,
            context,
        ):
            yield piece

    async def _get(
        self,
        namespace: str,
        keys: Sequence[bytes],
        shared: bool,
        call: int,
        gpu_pools: Sequence[int],
        codecs: Sequence[int],
        packed: bool,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[Piece]:
        try:
            require(namespace, READ)
        except KVStoreError as exc:
            await _fail(context, exc)
        arena = self._arena_for(context)
        pools = frozenset(gpu_pools) if shared and arena is not None else frozenset()
        handed: list[int] = []
        if self.store.remote is not None and self.store.lacks_any(namespace, keys):
            # Keys no local tier holds come from the remote tier first, in one batch, and
            # are then served like any other value (same-host slices included).
            try:
                await asyncio.to_thread(self.store.fetch_remote, namespace, keys)
            except KVStoreError as exc:
                await _fail(context, exc)
        positions: Sequence[int] = range(len(keys))
        try:
            if packed and shared and arena is not None:
                try:
                    table, absent, positions = self._lease_table(
                        namespace, keys, call, pools, handed
                    )
                except KVStoreError as exc:
                    await _fail(context, exc)
                if table.index:
                    yield Piece(pb.GetPiece(slices=table), b"")
                for at in range(0, len(absent), _BATCH_PIECES):
                    misses = [pb.GetPiece(index=i) for i in absent[at : at + _BATCH_PIECES]]
                    yield Piece(pb.GetPiece(batch=misses), b"")
            async for piece in self._get_pieces(
                namespace,
                keys,
                positions,
                shared,
                call,
                arena,
                pools,
                frozenset(codecs),
                handed,
                context,
            ):
                yield piece
        except BaseException:
            # Cut off (cancelled, client gone) or failed: the client may never have seen
            # these slices. One it is still copying is caught by its checksum. They are this
            # call's own: no tenant check (a generator closed later may run in another
            # context).
            self.shared.release(handed, anyone=True)
            raise

    def _lease_refusal(self, rpc: str, needed: int) -> Overloaded | None:
        """The refusal of a read that would hand out `needed` more read leases than
        --max-leases allows, or None when they fit."""
        if not needed or len(self.shared) + needed <= self.shared.limit:
            return None
        return self.admission.refusal(
            rpc,
            "leases",
            f"{BUSY}: {len(self.shared)} read leases held, {needed} more would pass the bound "
            f"(max-leases {self.shared.limit})",
        )

    def _lease_table(
        self,
        namespace: str,
        keys: Sequence[bytes],
        call: int,
        pools: frozenset[int],
        handed: list[int],
    ) -> tuple[pb.SliceTable, list[int], list[int]]:
        """Lease every key resident where the client maps it, under one hold of the store's
        lock, and describe them in one SliceTable; absent keys are answered as misses in the
        per-key pieces. Returns the table, the positions of absent keys, and those left for
        `_get_pieces` (values elsewhere, or all of them when the lock was busy)."""
        leases, absent = self.store.lease_resident_many(namespace, keys, pools)
        refusal = self._lease_refusal("BatchGet", sum(lease is not None for lease in leases))
        if refusal is not None:
            for lease in leases:
                if lease is not None:
                    lease.release()
            raise refusal
        table = pb.SliceTable()
        dtypes: dict[str, int] = {}
        tiers: dict[str, int] = {}
        regions: set[int] = set()
        index: list[int] = []
        lease_ids: list[int] = []
        offsets: list[int] = []
        places: list[int] = []
        nbytes: list[int] = []
        sums: list[int] = []
        kinds: list[int] = []
        ranks: list[int] = []
        dims: list[int] = []
        tier_of: list[int] = []
        rest = []
        missing = set(absent)
        for i, lease in enumerate(leases):
            if lease is None:
                if i not in missing:
                    rest.append(i)
                continue
            h = lease.header
            assert lease.offset is not None  # a resident value is leased where it lies
            lease_id = self.shared.hand_out(lease, call)
            handed.append(lease_id)
            index.append(i)
            lease_ids.append(lease_id)
            offsets.append(lease.offset)
            places.append(lease.pool)
            regions.add(lease.pool)
            nbytes.append(h.value_len)
            sums.append(h.value_checksum)
            kinds.append(dtypes.setdefault(h.dtype, len(dtypes)))
            ranks.append(len(h.shape))
            dims.extend(h.shape)
            tier_of.append(tiers.setdefault(lease.tier, len(tiers)))
        table.index.extend(index)
        table.lease.extend(lease_ids)
        table.offset.extend(offsets)
        table.gpu_pool.extend(places)
        table.nbytes.extend(nbytes)
        table.checksum.extend(sums)
        table.dtype.extend(kinds)
        table.dtypes.extend(dtypes)
        table.rank.extend(ranks)
        table.dims.extend(dims)
        table.tier.extend(tier_of)
        table.tiers.extend(tiers)
        for pool in sorted(regions):
            dev, ino = self._identity(pool)
            table.regions.add(gpu_pool=pool, arena_dev=dev, arena_ino=ino)
        return table, absent, rest

    async def _get_pieces(
        self,
        namespace: str,
        keys: Sequence[bytes],
        positions: Sequence[int],
        shared: bool,
        call: int,
        arena: HostArena | None,
        pools: frozenset[int],
        decoders: frozenset[int],
        handed: list[int],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[Piece]:
        # Answers without bytes (shared slices, misses) go out many to a message: one gRPC
        # message per key would cost more than the rest of the work of a large request.
        batch: list[pb.GetPiece] = []
        rpc = "Get" if len(keys) == 1 else "BatchGet"
        sent = False  # whether any value's bytes went out: a refusal then wastes work
        # A same-host reader checks the bytes it copies itself (and reports failures), so a
        # cpu-resident value is leased right here; anything else goes to a worker. The next
        # `_READ_AHEAD` keys' leases are under way while this one is sent, so values read
        # from ssd decode on several host threads (a codec takes milliseconds a value).
        in_place = shared and arena is not None

        async def lease_of(key: bytes) -> ReadLease | None:
            lease = self.store.lease_resident(namespace, key, pools) if in_place else None
            if lease is None:
                lease = await _in_thread_owned(
                    self.store.get,
                    namespace,
                    key,
                    not in_place,
                    pools,
                    decoders,
                    release=ReadLease.release,
                )
            return lease

        ahead = _ReadAhead(lease_of, [keys[i] for i in positions])
        try:
            for index in positions:
                key = keys[index]
                if len(batch) >= _BATCH_PIECES:
                    yield Piece(pb.GetPiece(batch=batch), b"")
                    batch = []
                try:
                    lease = await ahead.next()
                except Exception as exc:
                    await _fail(context, exc)
                if lease is None:
                    batch.append(pb.GetPiece(index=index, found=False))
                    continue
                handed_out = False
                charged = 0
                try:
                    h, view = lease.header, lease.view
                    first_piece = pb.GetPiece(
                        index=index,
                        found=True,
                        header=pb.ValueHeader(
                            key=key,
                            dtype=h.dtype,
                            shape=h.shape,
                            nbytes=h.value_len,
                            checksum=h.value_checksum,
                        ),
                        tier=lease.tier,
                        encoded_nbytes=len(view) if lease.encoded and view is not None else 0,
                    )
                    if shared and arena is not None and lease.offset is not None:
                        refusal = self._lease_refusal(rpc, 1)
                        if refusal is not None:
                            await _fail(context, refusal)
                        # The client reads the value in place; the lease now belongs to it.
                        lease_id = self.shared.hand_out(lease, call)
                        handed_out = True
                        handed.append(lease_id)
                        dev, ino = self._identity(lease.pool)
                        first_piece.shared.CopyFrom(
                            pb.SharedSlice(
                                lease=lease_id,
                                offset=lease.offset,
                                arena_dev=dev,
                                arena_ino=ino,
                                gpu_pool=lease.pool,
                            )
                        )
                        batch.append(first_piece)
                        continue
                    assert view is not None  # only leases handed out in place have no view
                    try:
                        await self.admission.charge(len(view), rpc, sent, time_left(context))
                    except Overloaded as exc:
                        await _fail(context, exc)
                    charged = len(view)
                    if batch:  # in order: the batch holds earlier keys
                        yield Piece(pb.GetPiece(batch=batch), b"")
                        batch = []
                    first = min(len(view), PIECE_BYTES)
                    yield Piece(first_piece, view[:first])
                    for off in range(first, len(view), PIECE_BYTES):
                        yield Piece(pb.GetPiece(index=index), view[off : off + PIECE_BYTES])
                    sent = True
                finally:
                    self.admission.release(charged)
                    if not handed_out:
                        lease.release()
        finally:
            ahead.close()
        if batch:
            yield Piece(pb.GetPiece(batch=batch), b"")

    # --------------------------------------------------------------- key queries

    def _arena_for(self, context: grpc.aio.ServicerContext) -> HostArena | None:
        """The host arena if this caller may be handed places in shared memory: over the
        Unix socket (a TCP peer cannot map it), and a tenant that may use every namespace."""
        if not str(context.peer()).startswith("unix:") or not auth.caller().maps_memory:
            return None
        return self.store.cpu

    @_unary
    async def Lookup(self, request: pb.KeysRequest, context: Any) -> pb.LookupResponse:
        # Index reads take no worker thread: they are dict lookups, and the lowest latency
        # call an engine makes on its critical path.
        require(request.namespace, READ)
        ns, keys = request.namespace, request.keys
        tiers = self.store.lookup_tiers(ns, keys, remote=False)
        if self.store.remote is not None and len(tiers) < len(keys):
            # Past the local prefix: ask the remote tier, never on the event loop.
            rest = keys[len(tiers) :]
            tiers += ["remote"] * await asyncio.to_thread(self.store.remote_prefix, ns, rest)
        return pb.LookupResponse(length=len(tiers), tiers=tiers)

    @_unary
    async def Exists(self, request: pb.KeysRequest, context: Any) -> pb.ExistsResponse:
        require(request.namespace, READ)
        ns, keys = request.namespace, request.keys
        present = self.store.exists(ns, keys, remote=False)
        if self.store.remote is not None and not all(present):  # in a worker: asks the cluster
            present = await asyncio.to_thread(self.store.remote_exists, ns, keys, present)
        return pb.ExistsResponse(present=present)

    @_unary
    async def Delete(self, request: pb.KeysRequest, context: Any) -> pb.CountResponse:
        require(request.namespace, WRITE)
        n = await asyncio.to_thread(self.store.delete, request.namespace, list(request.keys))
        return pb.CountResponse(count=n)

    @_unary
    async def Pin(self, request: pb.KeysRequest, context: Any) -> pb.CountResponse:
        require(request.namespace, WRITE)
        n = await asyncio.to_thread(self.store.pin, request.namespace, list(request.keys), 1)
        return pb.CountResponse(count=n)

    @_unary
    async def Unpin(self, request: pb.KeysRequest, context: Any) -> pb.CountResponse:
        require(request.namespace, WRITE)
        n = await asyncio.to_thread(self.store.pin, request.namespace, list(request.keys), -1)
        return pb.CountResponse(count=n)

    def _identity(self, pool: int) -> tuple[int, int]:
        """What slices of the host arena (0) or gpu pool `pool` carry as arena_dev/ino."""
        if pool:
            x = self.exports[pool]
            return x.arena_dev, x.arena_ino
        assert self.store.cpu is not None
        return self.store.cpu.dev, self.store.cpu.ino

    @_unary
    async def Reserve(self, request: pb.ReserveRequest, context: Any) -> pb.ReserveResponse:
        require(request.namespace, WRITE)
        arena = self._arena_for(context)
        self.store.check_keys(request.namespace, [h.key for h in request.values])
        if request.gpu_pool:
            self.store.pool(request.gpu_pool)  # a clear error for a pool that does not exist
        if arena is None or self.reserved.full():  # id 0: the client streams them instead
            return pb.ReserveResponse(reservations=[pb.Reservation() for _ in request.values])
        # All slots in one worker call: a thread hop per value would cost more than the
        # allocation for a request of thousands of small blocks.
        reservations = await _in_thread_owned(
            self._reserve_all,
            request.namespace,
            request.values,
            request.gpu_pool,
            release=_abort_all,
        )
        out = []
        for res in reservations:
            if res is not None and self.reserved.full():  # --max-leases: stream it instead
                res.abort()
                res = None
            if res is None or res.slot is None:  # no room in the arena: the client streams it
                out.append(pb.Reservation())
                continue
            dev, ino = self._identity(res.place)
            out.append(
                pb.Reservation(
                    id=self.reserved.hand_out(res, request.call),
                    offset=res.slot.offset,
                    arena_dev=dev,
                    arena_ino=ino,
                    gpu_pool=res.place,
                )
            )
        return pb.ReserveResponse(reservations=out)

    def _reserve_all(
        self, namespace: str, headers: Sequence[pb.ValueHeader], pool: int
    ) -> list[PutReservation | None]:
        """Slots for `headers` (None where there is no room); all or nothing on error."""
        out: list[PutReservation | None] = []
        try:
            for h in headers:
                args = _value_args(h)
                out.append(
                    self.store.reserve_in_arena(
                        namespace, *args, pool, _cost(h), h.newest, _position(h)
                    )
                )
        except BaseException:
            _abort_all(out)
            raise
        return out

    @_unary
    async def Commit(self, request: pb.CommitRequest, context: Any) -> pb.PutResponse:
        self._check_ids(
            ids=request.ids,
            aborted_ids=request.abort,
            abort_calls=request.abort_calls,
            checksums=request.checksums,
        )
        self.reserved.release(request.abort)
        self.reserved.release_groups(request.abort_calls)
        taken = self.reserved.take(request.ids)
        if len(taken) != len(request.ids):
            for _, res in taken:
                res.abort()
            raise NotFound(
                "a reservation is unknown, committed already or expired "
                f"(--lease-seconds {self.config.lease_seconds:g}); nothing was stored"
            )
        tiers: list[str] = []
        reservations = [res for _, res in taken]
        try:
            for res in reservations:
                res.written()  # the client wrote every byte through its mapping
            if request.checksums:
                if len(request.checksums) != len(reservations):
                    raise InvalidArgument(
                        f"{len(request.checksums)} checksums for {len(reservations)} reservations"
                    )
                for res, digest in zip(reservations, request.checksums, strict=True):
                    res.declare(digest)
            else:  # hashed here: a large batch on several workers, a share each
                compute = request.compute_checksums
                shares = min(len(reservations), _CHECK_WORKERS)
                await asyncio.gather(
                    *(
                        asyncio.to_thread(_check_all, reservations[i::shares], compute)
                        for i in range(shares)
                    )
                )
            # In order, in one worker call; `tiers` grows as they commit.
            await asyncio.to_thread(_commit_in_order, reservations, tiers)
        finally:
            for res in reservations[len(tiers) :]:
                res.abort()  # a failed commit leaves the rest unstored, as BatchPut does
        return pb.PutResponse(stored=len(tiers), tiers=tiers)

    @_unary
    async def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.CountResponse:
        self._check_ids(leases=request.leases, corrupt_leases=request.corrupt, calls=request.calls)
        ended = self.shared.release_groups(request.calls)
        if not request.corrupt:
            return pb.CountResponse(count=ended + self.shared.release(request.leases))
        # Reported corruption is checked again here before anything is dropped, on a worker
        # thread: a checksum of large values must not stall the event loop.
        taken = self.shared.take(request.leases)
        await asyncio.to_thread(_release_checking, taken, set(request.corrupt))
        return pb.CountResponse(count=ended + len(taken))

    @_unary
    async def Renew(self, request: pb.RenewRequest, context: Any) -> pb.RenewResponse:
        self._check_ids(calls=request.calls)
        return pb.RenewResponse(counts=self.shared.renew_groups(request.calls))

    @_unary
    async def Stats(self, request: pb.StatsRequest, context: Any) -> pb.StatsResponse:
        s = await asyncio.to_thread(self.store.stats)
        cfg = self.config
        # A tenant never handed places in shared memory is not told where it is either.
        arena = self.store.cpu if auth.caller().maps_memory else None
        pools = self.exports.values() if arena is not None else ()
        return pb.StatsResponse(
            version=__version__,
            chunk_tokens=cfg.chunk_tokens,
            max_value_bytes=cfg.max_value_bytes,
            max_keys_per_request=cfg.max_keys_per_request,
            max_piece_bytes=PIECE_BYTES,
            tiers=[
                pb.TierStats(
                    name=t.name,
                    entries=t.entries,
                    used_bytes=t.used_bytes,
                    capacity_bytes=t.capacity_bytes,
                    **vars(t.counters),
                )
                for t in s.tiers
            ],
            entries=s.entries,
            uptime_seconds=time.monotonic() - self.started,
            host_arena_path=str(arena.path) if arena else "",
            host_arena_dev=arena.dev if arena else 0,
            host_arena_ino=arena.ino if arena else 0,
            lease_seconds=cfg.lease_seconds,
            pinned=s.pinned,
            leases=s.leases,
            gpu_pools=[pb.GpuPool(**vars(x)) for x in pools],
            codecs=[pb.CodecStats(name=n, **vars(c)) for n, c in sorted(s.codecs.items())],
            quotas=[pb.QuotaStats(**vars(q)) for q in s.quotas],
            max_inflight_requests=cfg.max_inflight_requests,
            max_inflight_bytes=cfg.max_inflight_bytes,
            remote=_remote_stats(s.remote),
        )

    async def List(self, request: pb.ListRequest, context: Any) -> AsyncIterator[pb.ListResponse]:
        tenant = auth.caller()
        if request.namespace:
            try:
                check_namespace(request.namespace)
                require(request.namespace, READ)
            except KVStoreError as exc:
                await _fail(context, exc)
        entries = await asyncio.to_thread(self.store.entries, request.namespace)
        if not request.namespace:  # every namespace the caller may read
            entries = [e for e in entries if tenant.may(e.namespace, READ)]
        for e in entries[: request.limit or None]:
            yield pb.ListResponse(
                namespace=e.namespace,
                header=pb.ValueHeader(
                    key=e.key, dtype=e.dtype, shape=e.shape, nbytes=e.nbytes, checksum=e.checksum
                ),
                tier=e.tier,
                pins=e.pins,
                hits=e.hits,
            )

    async def Maps(self, request: pb.MapsRequest, context: Any) -> AsyncIterator[pb.MapsPiece]:
        """The cross-layer maps of that digest, for clients decoding cachegen-x containers:
        model statistics from the operator's profile, no tenant's data (any caller)."""
        from kvstore.codecs.cachegen_profile import MAPS_DIGEST, maps_document, registered_cross

        try:
            if not MAPS_DIGEST.fullmatch(request.digest):
                raise InvalidArgument(f"maps digest must be 16 hex digits, got {request.digest!r}")
            cross = registered_cross(request.digest)
            if cross is None:
                raise NotFound(f"this server holds no cross-layer maps {request.digest}")
        except KVStoreError as exc:
            await _fail(context, exc)
            return
        doc = await asyncio.to_thread(maps_document, cross)
        for at in range(0, len(doc), PIECE_BYTES):
            yield pb.MapsPiece(data=doc[at : at + PIECE_BYTES], total=len(doc))

    async def Watch(
        self, request: pb.WatchRequest, context: Any
    ) -> AsyncIterator[pb.WatchResponse]:
        # The rights of the caller's token as they stand: a tokens-file reload (SIGHUP) may
        # narrow or widen them, or revoke the token, while the stream lasts.
        rights = auth.session()
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        wake = functools.partial(_wake, loop, ready)
        seen = rights.changes
        watcher = Watcher(
            request.namespaces,
            lambda namespace: rights.may(namespace, READ),
            self.config.watch_queue_events,
            wake,
        )

        def rights_changed() -> None:
            watcher.rights_changed()
            wake()

        rights.on_change = rights_changed
        events = self.store.events
        try:
            # On worker threads: they wait for the store's lock.
            await asyncio.to_thread(self.store.watch, watcher, request.snapshot)
            if not request.snapshot:  # the watcher knows at once that it is registered
                yield pb.WatchResponse(instance=events.instance)
            while True:
                if watcher.snapshotting:
                    await asyncio.to_thread(self.store.watch_step, watcher, WATCH_BATCH)
                queued, lost = watcher.take()
                if rights.changes != seen:
                    seen = rights.changes
                    if rights.tenant is None:
                        raise Unauthenticated("the token was revoked (the tokens file changed)")
                    # Events queued under the old rights are checked again; namespaces the
                    # new rights add were not followed: the reader resyncs as after a loss.
                    queued = [e for e in queued if not e.namespace or watcher.admits(e.namespace)]
                    lost = lost or events.seq + 1
                if lost:
                    queued.append(KVEvent(EventKind.GAP, lost))
                    if request.snapshot:
                        await asyncio.to_thread(self.store.watch, watcher, True)
                for response in _responses(events.instance, queued):
                    yield response
                if events.closed:
                    raise Unavailable("the server is shutting down")
                if not queued and not watcher.snapshotting:
                    await ready.wait()
                    ready.clear()
        except KVStoreError as exc:
            await _fail(context, exc)
        finally:
            # Closed first: a subscription still running on a worker thread (the call was
            # cancelled meanwhile) then registers nothing.
            watcher.close()
            events.unsubscribe(watcher)


def _remote_stats(r: RemoteStats | None) -> pb.RemoteStats | None:
    if r is None:
        return None
    return pb.RemoteStats(
        connected=r.connected,
        queued_writes=r.queued_writes,
        queued_bytes=r.queued_bytes,
        dropped_writes=r.dropped_writes,
        **vars(r.counters),
    )


def _wake(loop: asyncio.AbstractEventLoop, ready: asyncio.Event) -> None:
    """Set `ready` from whichever thread published an event; a put never fails for it."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
        loop.call_soon_threadsafe(ready.set)


WATCH_BATCH = 1024
"""Events per WatchResponse: about 100 KiB."""


def _responses(instance: str, events: list[KVEvent]) -> Iterator[pb.WatchResponse]:
    for start in range(0, len(events), WATCH_BATCH):
        response = pb.WatchResponse(instance=instance)
        add = response.events.add  # half the cost of building each KVEvent and listing them
        for e in events[start : start + WATCH_BATCH]:
            add(
                kind=pb.KVEvent.Kind.ValueType(e.kind),
                seq=e.seq,
                namespace=e.namespace,
                key=e.key,
                tier=e.tier,
                tiers=e.tiers,
                nbytes=e.nbytes,
            )
        yield response


class DataDirLock:
    """An exclusive lock on the data directory: one server per directory."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "kvstore.lock"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            os.close(self._fd)
            raise RuntimeError(
                f"another kvstore-server (pid {other or '?'}) is using data directory {data_dir}"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        os.close(self._fd)


def _prepare_socket(path: Path) -> None:
    """Remove a stale socket file, refusing if a live server still answers on it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise RuntimeError(f"{path} exists and is not a socket; choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise RuntimeError(f"another server is already listening on {path}")


async def serve(config: ServerConfig, ready: Callable[[str], None] | None = None) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    forbid_unsafe_layer()  # a value coded on a machine without one fails, the server stays
    lock = DataDirLock(config.data_dir)
    try:
        await _serve_locked(config, ready)
    finally:
        lock.release()


class _ShutdownSignals:
    """SIGTERM/SIGINT handlers that set `stop`; a second signal cuts shutdown short."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.stop = asyncio.Event()
        self.count = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self.count += 1
        if self.count == 2:
            log.warning("%s again: skipping what is left of the graceful shutdown", sig.name)
        self.stop.set()

    def remove(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.remove_signal_handler(sig)


async def _serve_locked(config: ServerConfig, ready: Callable[[str], None] | None) -> None:
    # Signals are handled before anything is built, so one that arrives during a long
    # start-up (populating the arena, rebuilding the index) still ends in a clean shutdown.
    signals = _ShutdownSignals(asyncio.get_running_loop())
    try:
        sock = config.socket_path
        _prepare_socket(sock)
        security = ServerSecurity.load(config)  # bad certificates or tokens: refuse before building
        store = await asyncio.to_thread(Store, config)
        try:
            if not signals.stop.is_set():
                await _run(config, store, sock, signals, ready, security)
        finally:
            await asyncio.to_thread(store.close)
            sock.unlink(missing_ok=True)
            log.info("kvstore-server stopped")
    finally:
        signals.remove()


async def _run(
    config: ServerConfig,
    store: Store,
    sock: Path,
    signals: _ShutdownSignals,
    ready: Callable[[str], None] | None,
    security: ServerSecurity,
) -> None:
    server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=security.interceptors)
    admission = Admission(config.max_inflight_requests, config.max_inflight_bytes)
    servicer = KVStoreServicer(store, config, admission)
    metrics = ServerMetrics(
        store,
        lambda: {"read": len(servicer.shared), "put": len(servicer.reserved)},
        admission,
        config.max_leases,
    )

    def observe(rpc: str, kind: str, behavior: Any) -> Any:  # counted, then admitted
        return metrics.observe(rpc, kind, admission.wrap(rpc, kind, behavior))

    server.add_generic_rpc_handlers((server_handler(servicer, observe),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    old_umask = os.umask(0o177)  # the socket is created 0600: only this user may connect
    try:
        server.add_insecure_port(f"unix://{sock}")
    finally:
        os.umask(old_umask)
    addresses = [f"unix://{sock}"]
    if config.listen:
        _add_port(server, config.listen, "listen", security.tls)
        addresses.append(config.listen + (" (TLS)" if security.tls else ""))
    # Probes get a server of their own: the pod's address can be opened to the kubelet
    # without opening the data service to the network.
    probes = None
    if config.health_listen:
        probes = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probes)
        _add_port(probes, config.health_listen, "health-listen")
    await server.start()
    share_files(security.group, [sock, *_shared_memory_files(store, servicer.exports.values())])
    if probes is not None:
        await probes.start()
    if config.metrics_listen:
        try:
            where = metrics.serve_http(config.metrics_listen)
        except OSError as exc:
            raise RuntimeError(f"metrics-listen {config.metrics_listen}: {exc}") from None
        addresses.append(f"metrics http://{where}/metrics")
    if config.health_listen:
        addresses.append(f"health {config.health_listen}")
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "kvstore-server %s serving on %s; %s; %d entries restored",
        __version__,
        ", ".join(addresses),
        _describe_tiers(store),
        len(store.entries()),
    )
    if ready is not None:
        ready(addresses[0])
    security.reload_on_sighup(asyncio.get_running_loop())
    background = [
        asyncio.create_task(_sync_forever(store)),
        asyncio.create_task(_reclaim_forever(servicer.shared, servicer.reserved)),
    ]
    await signals.stop.wait()
    security.stop_reloading(asyncio.get_running_loop())
    store.events.close()  # Watch streams end now rather than hold up the drain

    log.info("shutting down: draining in-flight calls (grace %.1fs)", config.grace_seconds)
    deadline = time.monotonic() + config.grace_seconds
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(config.grace_seconds if signals.count < 2 else 0)
    if probes is not None:
        await probes.stop(0)
    metrics.close()
    for task in background:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    servicer.shared.release_all()
    servicer.reserved.release_all()
    persist_until = max(deadline, time.monotonic() + 1)
    persisted = await asyncio.to_thread(
        store.persist, lambda: time.monotonic() > persist_until or signals.count > 1
    )
    if persisted:
        log.info("shutdown: copied %d cpu-tier values to the ssd tier", persisted)


def _add_port(
    server: grpc.aio.Server,
    address: str,
    what: str,
    tls: grpc.ServerCredentials | None = None,
) -> None:
    try:
        if tls is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, tls)
    except RuntimeError as exc:  # gRPC's words for a port in use: "Failed to bind"
        raise RuntimeError(f"{what} {address}: cannot listen there ({exc})") from None


async def _sync_forever(store: Store) -> None:
    while True:
        await asyncio.sleep(SYNC_INTERVAL_S)
        try:
            await asyncio.to_thread(store.sync)
        except Exception:
            log.exception("periodic ssd flush failed")


async def _reclaim_forever(*tables: HandOuts[Any]) -> None:
    while True:
        await asyncio.sleep(min(1.0, tables[0].seconds / 2))
        for table in tables:
            table.reclaim_expired()


def _shared_memory_files(store: Store, exports: Iterable[PoolExport]) -> list[Path]:
    """The files same-host clients map: the host arena and the gpu twin's pools."""
    files = [store.cpu.path] if store.cpu is not None else []
    return files + [Path(x.twin_path) for x in exports if x.twin_path]


def _describe_tiers(store: Store) -> str:
    parts = []
    for p in store.pools.values():
        where = "host twin" if p.uuid == "host-twin" else p.uuid
        parts.append(f"gpu pool {p.pool} {format_size(p.capacity_bytes)} on {where}")
    if store.cpu is not None:
        parts.append(f"cpu {format_size(store.cpu.capacity_bytes)} at {store.cpu.path}")
    if store.ssd is not None:
        parts.append(f"ssd {format_size(store.ssd.capacity_bytes)} in {store.ssd.path}")
    if store.remote is not None:
        state = "connected" if store.remote.connected else "not reachable yet"
        parts.append(
            f"remote {','.join(store.remote.seeds)} ({state}, write {store.config.remote_write})"
        )
    return ", ".join(parts)
