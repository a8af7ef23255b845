"""Crash safety against a real server: `kill -9` at random moments, restart, verify.

The cycles live in `benchmarks/_crash.py`, shared with `benchmarks/soak_crash.py` (hundreds
of cycles); see its docstring for what each cycle checks.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from kvstore.client import AsyncKVClient
from kvstore.errors import Unavailable

from .conftest import NAMESPACE, ServerProcess
from .helpers import key, random_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _crash

pytestmark = pytest.mark.timeout(240)

CI_CYCLES = 20


def test_kill_9_cycles_never_serve_a_wrong_byte_nor_lose_a_sync_ssd_put(tmp_path: Path) -> None:
    lines: list[str] = []
    harness = _crash.run_cycles(
        tmp_path, CI_CYCLES, durability="sync", seed=9, max_run_s=0.8, progress=lines.append
    )
    print("\n".join(lines))
    assert harness.cycles == CI_CYCLES
    t = harness.totals
    # The cycles did what they are for: writes reached ssd, values came back and were
    # checked, and at least one kill landed in the middle of a put.
    assert t.puts > CI_CYCLES and t.ssd_acked > 0 and t.hits_after > 0
    assert harness.kills_mid_put > 0


def test_check_value_catches_one_wrong_byte() -> None:
    good = _crash.value_of(3, 5)
    assert _crash.check_value(3, good, {4, 5}, "now") == 5
    bad = good.clone()
    bad[len(bad) // 2] ^= 1
    with pytest.raises(_crash.CrashFailure, match="wrong byte"):
        _crash.check_value(3, bad, {4, 5}, "now")


def test_reads_miss_and_writes_fail_typed_while_down_then_reconnect(
    server: ServerProcess,
) -> None:
    v = random_tensor((1 << 20,), torch.uint8, seed=1)
    with server.client() as c:
        c.put(key(1), v)
        c.chunk_tokens  # noqa: B018 - asked once, before the server goes away
        server.stop(signal.SIGKILL)
        started = time.monotonic()
        assert c.get(key(1)) is None
        assert c.batch_get([key(1), key(2)]) == [None, None]
        assert c.lookup([key(1)]) == 0
        assert c.exists([key(1)]) == [False]
        assert c.get_prefix(list(range(600))) is None
        assert time.monotonic() - started < 2.0  # misses at once: reads are not retried
        started = time.monotonic()
        with pytest.raises(Unavailable):
            c.put(key(2), v)
        assert time.monotonic() - started < 5.0  # a few quick retries, then a typed error
        server.start()
        # The same client finds the new server by itself, within about a second.
        deadline = time.monotonic() + 10
        while True:
            try:
                c.put(key(2), v)
                break
            except Unavailable:
                assert time.monotonic() < deadline, "the client did not reconnect"
                time.sleep(0.1)
        got = c.get(key(2))
        assert got is not None and torch.equal(got, v)


def test_async_client_reads_miss_while_down(server: ServerProcess) -> None:
    async def run() -> None:
        async with AsyncKVClient(server.address, NAMESPACE) as c:
            await c.put(key(1), random_tensor((4096,), torch.uint8))
            server.stop(signal.SIGKILL)
            assert await c.get(key(1)) is None
            assert await c.lookup([key(1)]) == 0
            with pytest.raises(Unavailable):
                await c.put(key(2), random_tensor((4096,), torch.uint8))

    asyncio.run(run())
