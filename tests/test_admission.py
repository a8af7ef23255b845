"""`kvstore.admission`: the in-flight bounds, their refusals and retry hints."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from kvstore.admission import MID_CALL_WAIT_S, Admission, check_count
from kvstore.errors import InvalidArgument, Overloaded


class Aborted(Exception):
    pass


class Context:
    """What `Admission.wrap` uses of a grpc.aio servicer context."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str, Any] | None = None

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> None:
        self.aborted = (code, details, dict(trailing_metadata))
        raise Aborted


def test_request_bound_refuses_with_a_hint_and_exempts_what_gives_back() -> None:
    adm = Admission(max_requests=1, max_bytes=1 << 20)
    gate = asyncio.Event()

    async def slow(request: Any, context: Any) -> str:
        await gate.wait()
        return "done"

    async def run() -> None:
        first = asyncio.ensure_future(adm.wrap("Delete", "unary_unary", slow)(b"", Context()))
        await asyncio.sleep(0)
        assert adm.requests == 1
        ctx = Context()
        with pytest.raises(Aborted):
            await adm.wrap("Pin", "unary_unary", slow)(b"", ctx)
        assert ctx.aborted is not None
        code, details, meta = ctx.aborted
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max-inflight-requests 1" in details and "retry in" in details
        assert 0 < int(meta["grpc-retry-pushback-ms"]) <= 2000
        assert meta["kvstore-overloaded"] == "1"
        # Release is exempt: it runs although the bound is reached.
        assert adm.wrap("Release", "unary_unary", slow) is slow
        gate.set()
        assert await first == "done"
        assert adm.requests == 0
        assert dict(adm.refused) == {("Pin", "requests"): 1}

    asyncio.run(run())


def test_bytes_bound_refuses_new_calls_and_lets_started_ones_wait() -> None:
    adm = Admission(max_requests=10, max_bytes=10)

    async def run() -> None:
        await adm.charge(8, "Put", False, None)
        with pytest.raises(Overloaded, match="max-inflight-bytes 10") as err:
            await adm.charge(5, "Put", False, None)
        assert err.value.retry_after_s > 0
        # A call that already stored values waits for room...
        asyncio.get_running_loop().call_later(0.1, adm.release, 8)
        started = time.monotonic()
        await adm.charge(5, "BatchPut", True, None)
        assert 0.05 < time.monotonic() - started < MID_CALL_WAIT_S
        assert adm.bytes == 5
        # ...but not past its deadline, nor past MID_CALL_WAIT_S.
        with pytest.raises(Overloaded):
            await adm.charge(6, "BatchPut", True, 0.05)
        adm.release(5)
        # A lone value always fits, whatever its size: nothing else is in flight.
        await adm.charge(50, "Put", False, None)
        adm.release(50)
        assert adm.bytes == 0

    asyncio.run(run())


def test_hint_grows_with_recent_refusals() -> None:
    adm = Admission(max_requests=4, max_bytes=10)
    calm = max(adm.retry_after() for _ in range(50))
    for _ in range(40):
        adm.refusal("Put", "requests", "busy")
    busy = min(adm.retry_after() for _ in range(50))
    assert calm <= 0.075 and busy > 0.2


def test_check_count() -> None:
    check_count("keys", 4, 4, "max-keys-per-request")
    with pytest.raises(InvalidArgument, match="5 keys in one request; the server allows at most 4"):
        check_count("keys", 5, 4, "max-keys-per-request")
