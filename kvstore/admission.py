"""Back-pressure and request bounds: what the daemon admits, and what it refuses early.

Primitives:
- `Admission.wrap(rpc, kind, handler)` bounds the calls in flight (`--max-inflight-requests`).
  Calls that give resources back or cost nothing (`EXEMPT`: Commit, Release, Renew, Stats)
  are never refused: refusing them would hold leases and reservations longer, not shorter.
  Nor is Watch, a stream that lasts as long as its watcher: `--max-watchers` bounds it.
- `Admission.charge(nbytes, ...)` / `release(nbytes)` bound the bytes of values in flight
  through gRPC (`--max-inflight-bytes`): a streamed put's value from its header until it is
  stored, a get's streamed answer until its last piece is sent. A call at its start is
  refused at once; one that has already done work (values stored or sent) waits up to
  `MID_CALL_WAIT_S` for room first, since refusing it would waste that work.
- `check_count(what, n, limit, option)`: the bound on a repeated field of a request.

A refusal raises `Overloaded` (RESOURCE_EXHAUSTED) carrying a retry hint, which the server
sends as gRPC's `grpc-retry-pushback-ms` trailing metadata (`kvstore.errors.retry_metadata`)
and in the message. The hint grows with the refusals of the last second, so a crowd of
retrying clients spreads out instead of coming back together.

Used from the event loop only: the counters need no lock.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from kvstore.errors import InvalidArgument, Overloaded, retry_metadata
from kvstore.wire import PIECE_BYTES

EXEMPT = frozenset({"Commit", "Release", "Renew", "Stats", "Watch"})
"""RPCs never refused by the in-flight bounds."""
PUT_METHODS = frozenset({"Put", "BatchPut"})

BUSY = "server busy"
"""How every back-pressure refusal's message begins."""

MID_CALL_WAIT_S = 1.0
"""How long a call that has stored or sent values already waits for room for its next."""

BASE_RETRY_S = 0.05
MAX_RETRY_S = 2.0

MAX_PIECES_PER_VALUE = 1 << 16
"""Pieces one streamed value may arrive in (a 256 MiB value in pieces of 4 KiB or more)."""

MAX_LIST_FIELD = 64
"""Entries of the small id lists of a read request (gpu_pools, codecs)."""


def check_count(what: str, n: int, limit: int, option: str = "") -> None:
    """InvalidArgument when a request's repeated field `what` has more than `limit` items."""
    if n > limit:
        where = f" ({option})" if option else ""
        raise InvalidArgument(
            f"{n} {what} in one request; the server allows at most {limit}{where}, so split it"
        )


class Admission:
    """The server's in-flight counters and their bounds."""

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0
        self.refused: Counter[tuple[str, str]] = Counter()  # (rpc, bound) -> calls refused
        self._window = (0.0, 0)  # (start of the current second, refusals in it)
        self._freed: asyncio.Event | None = None  # set when bytes are released

    # ------------------------------------------------------------ hints and refusals

    def retry_after(self) -> float:
        """Seconds a refused caller should wait: 50 ms, scaled up by how many calls were
        refused in the last second relative to the request bound, jittered by +-50%."""
        start, count = self._window
        load = count / self.max_requests if time.monotonic() - start < 1.0 else 0.0
        base = min(MAX_RETRY_S, BASE_RETRY_S * (1.0 + load))
        return base * random.uniform(0.5, 1.5)

    def refusal(self, rpc: str, bound: str, message: str) -> Overloaded:
        """Count a refusal of `rpc` by `bound` ("requests", "bytes", "leases") and build its
        error, the retry hint named in the message too."""
        self.refused[(rpc, bound)] += 1
        now = time.monotonic()
        start, count = self._window
        self._window = (start, count + 1) if now - start < 1.0 else (now, 1)
        after = self.retry_after()
        return Overloaded(f"{message}; retry in {after * 1000:.0f} ms", after)

    # ------------------------------------------------------------ requests

    def wrap(self, rpc: str, kind: str, behavior: Any) -> Any:
        """`behavior` (a grpc.aio handler of cardinality `kind`) counted against the request
        bound; refused with RESOURCE_EXHAUSTED before its request is read when at it."""
        if rpc in EXEMPT:
            return behavior

        async def admit(context: Any) -> None:
            exc = None
            if self.requests >= self.max_requests:
                exc = self.refusal(
                    rpc,
                    "requests",
                    f"{BUSY}: {self.requests} calls in flight, the bound "
                    f"(max-inflight-requests {self.max_requests})",
                )
            elif rpc in PUT_METHODS and self.bytes > self.max_bytes - PIECE_BYTES:
                # A put refused once its first piece (and header) is read has cost that
                # piece's memory; when the bound is all but reached, refuse before reading.
                exc = self._bytes_refusal(rpc, PIECE_BYTES)
            if exc is not None:
                await context.abort(exc.code, str(exc), trailing_metadata=retry_metadata(exc))

        if kind.endswith("_stream"):

            async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
                await admit(context)
                self.requests += 1
                try:
                    async for item in behavior(request, context):
                        yield item
                finally:
                    self.requests -= 1

            return streaming

        async def unary(request: Any, context: Any) -> Any:
            await admit(context)
            self.requests += 1
            try:
                return await behavior(request, context)
            finally:
                self.requests -= 1

        return unary

    # ------------------------------------------------------------ bytes

    def try_charge(self, nbytes: int) -> bool:
        if self.bytes + nbytes > self.max_bytes and self.bytes > 0:
            return False
        self.bytes += nbytes
        return True

    async def charge(self, nbytes: int, rpc: str, started: bool, time_left: float | None) -> None:
        """Count `nbytes` in flight, or raise `Overloaded`. A call that has `started` (stored
        or sent values already) first waits for room, up to `MID_CALL_WAIT_S` and
        `time_left` (its deadline). A lone value always fits: nothing else is in flight."""
        if self.try_charge(nbytes):
            return
        if started:
            wait = MID_CALL_WAIT_S if time_left is None else min(MID_CALL_WAIT_S, time_left)
            if await self._wait_for_room(nbytes, wait):
                return
        raise self._bytes_refusal(rpc, nbytes)

    def _bytes_refusal(self, rpc: str, nbytes: int) -> Overloaded:
        return self.refusal(
            rpc,
            "bytes",
            f"{BUSY}: {self.bytes} bytes of values in flight, {nbytes} more would pass "
            f"the bound (max-inflight-bytes {self.max_bytes})",
        )

    async def _wait_for_room(self, nbytes: int, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not self.try_charge(nbytes):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._freed is None:
                self._freed = asyncio.Event()
            try:
                await asyncio.wait_for(self._freed.wait(), left)
            except TimeoutError:
                return False
        return True

    def release(self, nbytes: int) -> None:
        self.bytes -= nbytes
        if self._freed is not None:  # wake every waiter; each tries again
            self._freed.set()
            self._freed = None

    def gauges(self) -> dict[str, tuple[int, int]]:
        """In flight and bound, by what is counted: for the metrics."""
        return {
            "requests": (self.requests, self.max_requests),
            "bytes": (self.bytes, self.max_bytes),
        }


def time_left(context: Any) -> float | None:
    """Seconds before the call's deadline, None if it has none."""
    remaining: Callable[[], float | None] | None = getattr(context, "time_remaining", None)
    return remaining() if remaining is not None else None
