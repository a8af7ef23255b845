"""`KVClient`: the blocking client. It drives `ClientCore` operations with blocking stubs."""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Sequence
from typing import Any, TypeVar

import grpc
import grpc.experimental
import numpy as np
import torch

from kvstore.client._core import (
    BACKGROUND_TIMEOUT_S,
    Block,
    Call,
    ClientCore,
    Op,
    ServerStats,
    is_unix_address,
    target_of,
)
from kvstore.client._transfer import BlockRefs, Transfer, gather
from kvstore.errors import error_for_status
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire import GRPC_OPTIONS, client_stubs

T = TypeVar("T")


class KVClient:
    """Blocking client for one namespace of a kvstore server.

    `address` is `unix:///path/to/kvstore.sock` (same host) or `host:port`; `namespace`
    names the model and layout the values belong to and salts the prefix keys.
    """

    def __init__(self, address: str, namespace: str, *, timeout: float | None = 60.0) -> None:
        self.address = address
        self.timeout = timeout
        self._core = ClientCore(namespace, same_host=is_unix_address(address))
        # Server-streaming calls (gets) on their own thread-free path: by default grpc starts
        # a thread for each such call when none is running, about 1 ms per get here.
        options = [*GRPC_OPTIONS, (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
        self._channel = grpc.insecure_channel(target_of(address), options=options)
        self._background: set[Any] = set()  # calls started with wait=False
        self._stubs = client_stubs(self._channel)
        # Settles get_into/put_from transfers (wait for copies, commit, release) whether or
        # not the caller waits for them.
        self._settler = concurrent.futures.ThreadPoolExecutor(
            4, thread_name_prefix="kvstore-settle"
        )

    @property
    def namespace(self) -> str:
        return self._core.namespace

    def _run(self, op: Op[T]) -> T:
        try:
            call = next(op)
            while True:
                try:
                    result = self._invoke(call)
                except BaseException as exc:  # cancelled too: the op releases its leases
                    call = op.throw(exc)
                    continue
                call = op.send(result)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def _invoke(self, call: Call | Block) -> Any:
        if isinstance(call, Block):
            return call.fn()
        method = self._stubs[call.method]
        try:
            if not call.wait:
                future = method.future(call.request, timeout=BACKGROUND_TIMEOUT_S)
                self._background.add(future)
                future.add_done_callback(self._background.discard)
                return None
            if call.sink is None:
                return method(call.request, timeout=self.timeout)
            stream = method(call.request, timeout=self.timeout)
            try:
                for message in stream:
                    call.sink(message)
            except BaseException:
                stream.cancel()
                raise
            return None
        except grpc.RpcError as exc:
            raise error_for_status(exc.code(), exc.details()) from None

    def put(self, key: bytes, tensor: torch.Tensor) -> str:
        """Store `tensor` under `key`; returns the tier it landed in."""
        return self._run(self._core.put(key, tensor))

    def get(self, key: bytes) -> torch.Tensor | None:
        """The tensor stored under `key`, or None."""
        return self._run(self._core.get(key))

    def batch_put(self, keys: Sequence[bytes], tensors: Sequence[torch.Tensor]) -> list[str]:
        return self._run(self._core.batch_put(keys, tensors))

    def batch_get(self, keys: Sequence[bytes]) -> list[torch.Tensor | None]:
        return self._run(self._core.batch_get(keys))

    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are stored: the longest cached prefix, in chunks."""
        return self._run(self._core.lookup(keys))

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
        return self._run(self._core.acquire(keys, verify))

    def release(self, refs: BlockRefs) -> None:
        """End the leases of `refs` (in the background)."""
        self._run(self._core.release(refs))

    def gather(self, refs: BlockRefs, out: torch.Tensor, stream: Any = None) -> Transfer:
        """Copy the selected blocks (`refs[top_k]`, each of the same size and dtype) into
        `out`, back to back: one kernel on `stream` for a GPU tensor, reading the arena over
        PCIe; a CPU tensor is filled before this returns."""
        return Transfer(event=gather(refs, out, stream))

    def get_into(
        self, keys: Sequence[bytes], out: torch.Tensor | Sequence[torch.Tensor], stream: Any = None
    ) -> Transfer:
        """Copy the values of `keys` into `out` (one tensor per key, or a tensor with one entry
        per key along dim 0; GPU or CPU), enqueued on `stream` (default: the current one).

        `wait()` returns which keys were found (absent ones leave their `out` untouched) once
        the checksums, computed while the bytes copy, have passed.
        """
        landing = self._run(self._core.get_into(keys, out, stream))
        return Transfer(self._settler.submit(self._run, self._core.settle_get(landing)))

    def put_from(
        self,
        keys: Sequence[bytes],
        values: torch.Tensor | Sequence[torch.Tensor],
        stream: Any = None,
    ) -> Transfer:
        """Store `values` (GPU or CPU tensors, as for `get_into`) under `keys`: copied into
        the arena on `stream` and committed as the copies land. `wait()` returns the tiers.
        The tensors must not change until then."""
        landing = self._run(self._core.put_from(keys, values, stream))
        return Transfer(self._settler.submit(self._run, self._core.settle_put(landing)))

    def close(self) -> None:
        self._settler.shutdown(wait=True)
        for future in list(self._background):
            with contextlib.suppress(grpc.RpcError, grpc.FutureTimeoutError):
                future.result(timeout=5)
        self._core.close()
        self._channel.close()

    def __enter__(self) -> KVClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
