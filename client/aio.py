"""`AsyncKVClient`: the asyncio client. It drives `ClientCore` operations with `grpc.aio`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, TypeVar, Unpack

import grpc
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
from kvstore.client._watch import events_of, rpc_error, watch_request
from kvstore.errors import KVStoreError, error_for_status
from kvstore.events import KVEvent
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire import CLIENT_OPTIONS, client_stubs

T = TypeVar("T")
log = logging.getLogger(__name__)


def _forget(task: asyncio.Future[Any]) -> None:
    """Retrieve a background call's outcome: a failed release is reclaimed by the server."""
    if not task.cancelled():
        task.exception()


class AsyncTransfer:
    """A `get_into` or `put_from` of the asyncio client in flight; see `Transfer`."""

    def __init__(self, task: asyncio.Future[Any], marks: Sequence[Any] = ()) -> None:
        self._task = task
        self.marks = list(marks)  # see Transfer.marks

    async def wait(self) -> Any:
        return await asyncio.shield(self._task)

    def is_done(self) -> bool:
        return self._task.done()


class AsyncKVClient:
    """asyncio client for one namespace; the same methods and options as `KVClient`,
    awaitable."""

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
        self._channel = self._conn.open(grpc.aio, CLIENT_OPTIONS)
        self._background: set[asyncio.Future[Any]] = set()  # calls started with wait=False
        self._renewer: asyncio.Future[None] | None = None  # renews held BlockRefs' leases
        self._stubs = client_stubs(self._channel)

    @property
    def namespace(self) -> str:
        return self._core.namespace

    async def _run(self, op: Op[T], retry_until: float | None = None) -> T:
        try:
            call = next(op)
            while True:
                try:
                    result = await self._invoke(call, retry_until)
                except BaseException as exc:  # cancelled too: the op releases its leases
                    call = op.throw(exc)
                    continue
                call = op.send(result)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def _invoke(self, call: Call | Block, retry_until: float | None = None) -> Any:
        if isinstance(call, Block):
            return await asyncio.to_thread(call.fn)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                return await self._invoke_once(call, deadline)
            except KVStoreError as exc:
                delay = call.retry_delay(exc, earliest(deadline, retry_until))
                if delay is None:
                    call.give_up(exc)
                await asyncio.sleep(delay)

    async def _invoke_once(self, call: Call, deadline: float | None) -> Any:
        method = self._stubs[call.method]
        metadata = self._conn.metadata or None
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            if not call.wait:
                task = asyncio.ensure_future(
                    method(call.request, timeout=BACKGROUND_TIMEOUT_S, metadata=metadata)
                )
                self._background.add(task)
                task.add_done_callback(_forget)
                task.add_done_callback(self._background.discard)
                return None
            if call.sink is None:
                return await method(call.fresh_request(), timeout=timeout, metadata=metadata)
            stream = method(call.request, timeout=timeout, metadata=metadata)
            try:
                async for message in stream:
                    call.sink(message)
            except BaseException:
                stream.cancel()
                raise
            return None
        except grpc.aio.AioRpcError as exc:
            trailing = exc.trailing_metadata()
            raise self._conn.explain(
                error_for_status(exc.code(), exc.details() or "", trailing)
            ) from None
        except grpc.RpcError as exc:
            raise self._conn.explain(error_for_status(exc.code(), exc.details() or "")) from None

    async def put(
        self,
        key: bytes,
        tensor: torch.Tensor,
        *,
        newest: bool = False,
        position: int | None = None,
    ) -> str:
        """As `KVClient.put`."""
        return await self._run(self._core.put(key, tensor, newest, position))

    async def get(self, key: bytes) -> torch.Tensor | None:
        return await self._run(self._core.get(key))

    async def batch_put(
        self,
        keys: Sequence[bytes],
        tensors: Sequence[torch.Tensor],
        *,
        newest: Sequence[bytes] = (),
        positions: Mapping[bytes, int] | None = None,
    ) -> list[str]:
        """As `KVClient.batch_put`."""
        return await self._run(self._core.batch_put(keys, tensors, newest, positions))

    async def batch_get(self, keys: Sequence[bytes]) -> list[torch.Tensor | None]:
        return await self._run(self._core.batch_get(keys))

    async def lookup(self, keys: Sequence[bytes]) -> int:
        return await self._run(self._core.lookup(keys))

    async def lookup_tiers(self, keys: Sequence[bytes]) -> PrefixTiers:
        """`lookup`, saying which tier holds each chunk of the prefix."""
        return await self._run(self._core.lookup_tiers(keys))

    async def exists(self, keys: Sequence[bytes]) -> list[bool]:
        return await self._run(self._core.exists(keys))

    async def delete(self, keys: Sequence[bytes]) -> int:
        return await self._run(self._core.delete(keys))

    async def pin(self, keys: Sequence[bytes]) -> int:
        return await self._run(self._core.pin(keys))

    async def unpin(self, keys: Sequence[bytes]) -> int:
        return await self._run(self._core.unpin(keys))

    async def stats(self) -> ServerStats:
        return await self._run(self._core.stats())

    async def entries(self, namespace: str | None = None, limit: int = 0) -> list[pb.ListResponse]:
        return await self._run(self._core.entries(namespace, limit))

    async def watch(
        self, namespaces: str | None = None, *, snapshot: bool = True
    ) -> AsyncIterator[KVEvent]:
        """KV events, as `KVClient.watch` describes. The stream ends when the iterator is
        closed: `async with contextlib.aclosing(kv.watch()) as events: async for e in
        events: ...` (a loop left by `break` alone keeps it open until garbage collection)."""
        ns = self.namespace if namespaces is None else namespaces
        metadata = self._conn.metadata or None
        call = self._stubs["Watch"](watch_request(ns, snapshot), metadata=metadata)
        try:
            async for response in call:
                for event in events_of(response):
                    yield event
        except grpc.RpcError as exc:
            raise rpc_error(self._conn, exc) from None
        finally:
            call.cancel()

    async def prefix_keys(self, token_ids: Sequence[int] | np.ndarray) -> list[bytes]:
        return await self._run(self._core.prefix_keys(token_ids))

    async def put_prefix(self, token_ids: Sequence[int] | np.ndarray, kv: torch.Tensor) -> int:
        return await self._run(self._core.put_prefix(token_ids, kv))

    async def get_prefix(self, token_ids: Sequence[int] | np.ndarray) -> torch.Tensor | None:
        return await self._run(self._core.get_prefix(token_ids))

    async def acquire(self, keys: Sequence[bytes], *, verify: bool = True) -> BlockRefs:
        refs = await self._run(self._core.acquire(keys, verify))
        if refs.call and self._renewer is None:
            self._renewer = asyncio.ensure_future(self._renew_loop())
        return refs

    async def _renew_loop(self) -> None:
        while True:  # four renewals per lease time, until the client closes
            await asyncio.sleep(self._core.lease_seconds / 4)
            try:
                await self._run(self._core.renew_held())
            except Exception:  # the server is away: the refs expire and gathers refuse them
                log.warning("renewing block leases failed", exc_info=True)

    async def release(self, refs: BlockRefs) -> None:
        await self._run(self._core.release(refs))

    def gather(self, refs: BlockRefs, out: torch.Tensor, stream: Any = None) -> Transfer:
        """As `KVClient.gather`: a local kernel launch, nothing to await."""
        return Transfer(event=gather(refs, out, stream), keep=refs)

    async def get_into(
        self,
        keys: Sequence[bytes],
        out: torch.Tensor | Sequence[torch.Tensor],
        stream: Any = None,
        *,
        marks: Sequence[int] = (),
    ) -> AsyncTransfer:
        landing = await self._run(self._core.get_into(keys, out, stream, marks))
        if self._renewer is None:  # the leases outlive a copy stuck behind a long queue
            self._renewer = asyncio.ensure_future(self._renew_loop())
        return self._settle(self._core.settle_get(landing), landing.mark_events)

    async def put_from(
        self,
        keys: Sequence[bytes],
        values: torch.Tensor | Sequence[torch.Tensor],
        stream: Any = None,
        *,
        retry_for: float | None = None,
        newest: Sequence[bytes] = (),
        positions: Mapping[bytes, int] | None = None,
    ) -> AsyncTransfer:
        until = retry_deadline(retry_for)
        landing = await self._run(
            self._core.put_from(keys, values, stream, newest, positions), until
        )
        return self._settle(self._core.settle_put(landing), retry_until=until)

    def _settle(
        self, op: Op[T], marks: Sequence[Any] = (), retry_until: float | None = None
    ) -> AsyncTransfer:
        task = asyncio.ensure_future(self._run(op, retry_until))
        self._background.add(task)
        task.add_done_callback(_forget)  # a failure not waited for is not logged as lost
        task.add_done_callback(self._background.discard)
        return AsyncTransfer(task, marks)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if self._background:
            await asyncio.wait(list(self._background), timeout=5)
        self._core.close()
        await self._channel.close()

    async def __aenter__(self) -> AsyncKVClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
