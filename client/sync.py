"""`KVClient`: the blocking client. It drives `ClientCore` operations with blocking stubs."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, Unpack

import grpc
import grpc.experimental
import numpy as np
import torch

from kvstore.client._channel import Connection, ConnectOptions, is_unix_address
from kvstore.client._core import (
    BACKGROUND_TIMEOUT_S,
    Block,
    Call,
    ClientCore,
    Op,
    PrefixTiers,
    ServerStats,
    earliest,
    retry_deadline,
)
from kvstore.client._transfer import BlockRefs, Transfer, gather
from kvstore.client._watch import WatchStream, watch_request
from kvstore.errors import KVStoreError, error_for_status
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire import CLIENT_OPTIONS, client_stubs

T = TypeVar("T")
log = logging.getLogger(__name__)


class _BackgroundCalls:
    """Calls nobody waits for (lease releases, aborts), made in order by one long-lived
    thread. A grpc future per call would wake a polling thread each time: about 1 ms here,
    more than the get whose leases it releases. A failed call is left to the server's
    lease expiry."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata or None
        self._queue: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, method: Any, request: Any) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="kvstore-background", daemon=True
                )
                self._thread.start()
        self._queue.put((method, request))

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            method, request = item
            # ValueError: the channel was closed with calls still queued (close() waits
            # only so long for a server that does not answer): left to lease expiry too.
            with contextlib.suppress(grpc.RpcError, ValueError):
                method(request, timeout=BACKGROUND_TIMEOUT_S, metadata=self._metadata)

    def close(self, timeout: float) -> None:
        """Finish the calls queued so far (waiting up to `timeout`), then stop."""
        with self._lock:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join(timeout)


class KVClient:
    """Blocking client for one namespace of a kvstore server.

    `address` is `unix:///path/to/kvstore.sock` (same host) or `host:port`; `namespace`
    names the model and layout the values belong to and salts the prefix keys.

    `decode_codecs` names the codecs whose stored containers `get_into` fetches as they
    are and decodes here, when the server holds a value only on ssd: KV then crosses the
    wire and PCIe compressed and the server spends no CPU decoding it. By default, the
    codecs that decode on the GPU (cachegen), when a destination is a CUDA tensor and CuPy
    is installed; `[]` turns it off.

    `recompute_cost` is sent with every value this client puts: what recomputing it costs
    per byte, relative to other clients' values (a larger model's KV costs more per byte).
    A server run with `--eviction gdsf` keeps costlier values longer. Default 1.

    `token` (default `$KVSTORE_TOKEN`) is sent as `authorization: Bearer <token>` to a
    server run with `--auth-tokens`. For a TCP address, `tls_ca` (PEM CA bundle; `tls=True`
    alone: the system's), and for mTLS `tls_cert` and `tls_key`, make the channel TLS
    (defaults `$KVSTORE_TLS_CA`, `$KVSTORE_TLS_CERT`, `$KVSTORE_TLS_KEY`, `$KVSTORE_TLS`);
    `tls_server_name` checks the server's certificate for that name instead of the host.
    """

    def __init__(
        self,
        address: str,
        namespace: str,
        *,
        timeout: float | None = 60.0,
        decode_codecs: Sequence[str] | None = None,
        recompute_cost: float | None = None,
        **connect: Unpack[ConnectOptions],
    ) -> None:
        self.address = address
        self._conn = Connection.resolve(address, **connect)

        self.timeout = timeout
        self._core = ClientCore(
            namespace,
            same_host=is_unix_address(address),
            decode_codecs=decode_codecs,
            recompute_cost=recompute_cost,
        )
        # Server-streaming calls (gets) on their own thread-free path: by default grpc starts
        # a thread for each such call when none is running, about 1 ms per get here.
        options = [*CLIENT_OPTIONS, (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
        self._channel = self._conn.open(grpc, options)
        self._background = _BackgroundCalls(self._conn.metadata)  # calls made with wait=False
        self._stubs = client_stubs(self._channel)
        # Settles get_into/put_from transfers (wait for copies, commit, release) whether or
        # not the caller waits for them.
        self._settler = concurrent.futures.ThreadPoolExecutor(
            4, thread_name_prefix="kvstore-settle"
        )
        self._renewer: threading.Thread | None = None  # renews the leases of held BlockRefs
        self._renew_lock = threading.Lock()
        self._closing = threading.Event()

    @property
    def namespace(self) -> str:
        return self._core.namespace

    @property
    def chunk_tokens(self) -> int:
        """Tokens per prefix chunk, the server's setting (asked once)."""
        return self._run(self._core.chunking())

    def _run(self, op: Op[T], retry_until: float | None = None) -> T:
        """Run `op`'s calls; a write refused by back-pressure is sent again until its
        deadline, or `retry_until` (time.monotonic()) when that comes first."""
        try:
            call = next(op)
            while True:
                try:
                    result = self._invoke(call, retry_until)
                except BaseException as exc:  # cancelled too: the op releases its leases
                    call = op.throw(exc)
                    continue
                call = op.send(result)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def _invoke(self, call: Call | Block, retry_until: float | None = None) -> Any:
        if isinstance(call, Block):
            return call.fn()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                return self._invoke_once(call, deadline)
            except KVStoreError as exc:
                delay = call.retry_delay(exc, earliest(deadline, retry_until))
                if delay is None:
                    call.give_up(exc)
                time.sleep(delay)

    def _invoke_once(self, call: Call, deadline: float | None) -> Any:
        method = self._stubs[call.method]
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            if not call.wait:
                self._background.submit(method, call.request)
                return None
            metadata = self._conn.metadata or None
            if call.sink is None:
                return method(call.fresh_request(), timeout=timeout, metadata=metadata)
            stream = method(call.request, timeout=timeout, metadata=metadata)
            try:
                for message in stream:
                    call.sink(message)
            except BaseException:
                stream.cancel()
                raise
            return None
        except grpc.RpcError as exc:
            trailing = exc.trailing_metadata() if isinstance(exc, grpc.Call) else ()
            raise self._conn.explain(
                error_for_status(exc.code(), exc.details(), trailing)
            ) from None

    def put(
        self,
        key: bytes,
        tensor: torch.Tensor,
        *,
        newest: bool = False,
        position: int | None = None,
    ) -> str:
        """Store `tensor` under `key`; returns the tier it landed in. `newest`: it is the
        newest chunk of its sequence (the one the next request's new tokens follow), which a
        server's lossy codec below memory may code finer; `position`: the position of its
        first token in that sequence, which a codec taking RoPE out of K needs (cachegen
        with a cross-layer profile; `put_prefix` gives both for its own chunks)."""
        return self._run(self._core.put(key, tensor, newest, position))

    def get(self, key: bytes) -> torch.Tensor | None:
        """The tensor stored under `key`, or None."""
        return self._run(self._core.get(key))

    def batch_put(
        self,
        keys: Sequence[bytes],
        tensors: Sequence[torch.Tensor],
        *,
        newest: Sequence[bytes] = (),
        positions: Mapping[bytes, int] | None = None,
    ) -> list[str]:
        """Store each tensor under its key; the tiers. `newest`: those of `keys` that are the
        newest chunks of their sequences; `positions`: first-token positions by key (both as
        for `put`)."""
        return self._run(self._core.batch_put(keys, tensors, newest, positions))

    def batch_get(self, keys: Sequence[bytes]) -> list[torch.Tensor | None]:
        return self._run(self._core.batch_get(keys))

    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are stored: the longest cached prefix, in chunks."""
        return self._run(self._core.lookup(keys))

    def lookup_tiers(self, keys: Sequence[bytes]) -> PrefixTiers:
        """`lookup`, saying which tier holds each chunk of the prefix: local ones ("gpu",
        "cpu", "ssd") first, then "remote" for chunks only the shared remote tier holds."""
        return self._run(self._core.lookup_tiers(keys))

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        return self._run(self._core.exists(keys))

    def delete(self, keys: Sequence[bytes]) -> int:
        return self._run(self._core.delete(keys))

    def pin(self, keys: Sequence[bytes]) -> int:
        return self._run(self._core.pin(keys))

    def unpin(self, keys: Sequence[bytes]) -> int:
        return self._run(self._core.unpin(keys))

    def stats(self) -> ServerStats:
        return self._run(self._core.stats())

    def entries(self, namespace: str | None = None, limit: int = 0) -> list[pb.ListResponse]:
        """Stored entries of `namespace` (all namespaces when None), at most `limit` if set."""
        return self._run(self._core.entries(namespace, limit))

    def watch(self, namespaces: str | None = None, *, snapshot: bool = True) -> WatchStream:
        """KV events (`kvstore.events.KVEvent`) of the namespaces matching the shell glob
        `namespaces` (default: this client's namespace; "*": every namespace the token may
        read): with `snapshot`, first what the server holds (SNAPSHOT events, then
        SNAPSHOT_END), then each change as it happens, in `seq` order. A GAP event means
        events were lost (the reader fell behind); a fresh snapshot follows it when
        `snapshot` is set. Iterate the returned stream; `close()` it to stop.
        `kvstore.client.router.KVRouter` keeps the state of several servers from these."""
        ns = self.namespace if namespaces is None else namespaces
        return WatchStream(self._conn, watch_request(ns, snapshot))

    def prefix_keys(self, token_ids: Sequence[int] | np.ndarray) -> list[bytes]:
        return self._run(self._core.prefix_keys(token_ids))

    def put_prefix(self, token_ids: Sequence[int] | np.ndarray, kv: torch.Tensor) -> int:
        """Store the KV of `token_ids` chunk by chunk; returns the number of chunks."""
        return self._run(self._core.put_prefix(token_ids, kv))

    def get_prefix(self, token_ids: Sequence[int] | np.ndarray) -> torch.Tensor | None:
        """KV of the longest stored prefix of `token_ids` (its token dim says how long)."""
        return self._run(self._core.get_prefix(token_ids))

    def acquire(self, keys: Sequence[bytes], *, verify: bool = True) -> BlockRefs:
        """Hold the values of `keys` readable in place for `gather`, until `release(refs)`
        or the server's lease time (`--lease-seconds`) runs out; checks them once, now."""
        refs = self._run(self._core.acquire(keys, verify))
        if refs.call:
            self._start_renewing()
        return refs

    def _start_renewing(self) -> None:
        with self._renew_lock:
            if self._renewer is None and not self._closing.is_set():
                self._renewer = threading.Thread(
                    target=self._renew_loop, name="kvstore-renew", daemon=True
                )
                self._renewer.start()

    def _renew_loop(self) -> None:
        # Four renewals per lease time: one lost call still leaves the leases alive.
        while not self._closing.wait(self._core.lease_seconds / 4):
            try:
                self._run(self._core.renew_held())
            except Exception:  # the server is away: the refs expire and gathers refuse them
                log.warning("renewing block leases failed", exc_info=True)

    def release(self, refs: BlockRefs) -> None:
        """End the leases of `refs` (in the background)."""
        self._run(self._core.release(refs))

    def gather(self, refs: BlockRefs, out: torch.Tensor, stream: Any = None) -> Transfer:
        """Copy the selected blocks (`refs[top_k]`, each of the same size and dtype) into
        `out`, back to back: one kernel on `stream` for a GPU tensor, reading the arena over
        PCIe; a CPU tensor is filled before this returns."""
        return Transfer(event=gather(refs, out, stream), keep=refs)

    def get_into(
        self,
        keys: Sequence[bytes],
        out: torch.Tensor | Sequence[torch.Tensor],
        stream: Any = None,
        *,
        marks: Sequence[int] = (),
    ) -> Transfer:
        """Copy the values of `keys` into `out` (one tensor per key, or a tensor with one entry
        per key along dim 0; GPU or CPU), enqueued on `stream` (default: the current one).

        `wait()` returns which keys were found (absent ones leave their `out` untouched) once
        the checksums, computed while the bytes copy, have passed. `marks` (ascending key
        positions) give `Transfer.marks`: per mark, an event after the copies before it, so
        that one call can feed work that starts on its first values (layer groups).
        """
        self._check_open()
        landing = self._run(self._core.get_into(keys, out, stream, marks))
        self._start_renewing()  # the leases outlive a copy stuck behind a long queue
        settled = self._settler.submit(self._run, self._core.settle_get(landing))
        return Transfer(settled, marks=landing.mark_events)

    def put_from(
        self,
        keys: Sequence[bytes],
        values: torch.Tensor | Sequence[torch.Tensor],
        stream: Any = None,
        *,
        retry_for: float | None = None,
        newest: Sequence[bytes] = (),
        positions: Mapping[bytes, int] | None = None,
    ) -> Transfer:
        """Store `values` (GPU or CPU tensors, as for `get_into`) under `keys`: copied into
        the arena on `stream` and committed as the copies land. `wait()` returns the tiers.
        The tensors must not change until then.

        `retry_for` bounds, in seconds from now, how long writes the server refuses by
        back-pressure are sent again (default: each call's deadline, the client's
        `timeout`); past it the transfer fails with `Overloaded`. A best-effort save (an
        engine's, whose memory waits on it) passes a short one. `newest` and `positions`: as
        for `batch_put`."""
        self._check_open()
        until = retry_deadline(retry_for)
        landing = self._run(self._core.put_from(keys, values, stream, newest, positions), until)
        return Transfer(self._settler.submit(self._run, self._core.settle_put(landing), until))

    def _check_open(self) -> None:
        if self._closing.is_set():
            raise RuntimeError("this KVClient is closed")

    def close(self) -> None:
        self._closing.set()
        if self._renewer is not None:
            self._renewer.join()
        self._settler.shutdown(wait=True)
        self._background.close(timeout=5)
        self._core.close()
        self._channel.close()

    def __enter__(self) -> KVClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
