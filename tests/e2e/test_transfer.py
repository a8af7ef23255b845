"""get_into / put_from / acquire + gather against a real server, on CPU tensors.

The same code moves GPU tensors (tests/e2e/test_transfer_gpu.py runs it on a GPU); here
the arena path and the streamed-bytes fallback are both checked byte for byte, with the
leases, the refusals before anything is copied, and a client killed holding leases.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from kvstore.client import AsyncKVClient, KVClient
from kvstore.errors import InvalidArgument
from tests.e2e.test_shared import corrupt_in_arena, wait_for

NS = "test/transfer"
KiB, MiB = 1 << 10, 1 << 20


def key(i: int) -> bytes:
    return b"T" + i.to_bytes(4, "little") + bytes(27)


def chunk(i: int, shape: tuple[int, ...] = (4, 2, 16, 8, 64)) -> torch.Tensor:
    g = torch.Generator().manual_seed(900 + i)
    return torch.randn(shape, generator=g).to(torch.bfloat16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def both(start_server):  # type: ignore[no-untyped-def]
    """A same-host client (arena) and a TCP client (streamed bytes) of one server."""
    port = free_port()
    srv = start_server("--cpu-bytes", "64MiB", "--listen", f"127.0.0.1:{port}")
    with srv.client(NS) as local, KVClient(f"127.0.0.1:{port}", NS) as remote:
        yield srv, local, remote


@pytest.mark.parametrize("path", ["arena", "bytes"])
def test_put_from_then_get_into_round_trips(both, path: str) -> None:  # type: ignore[no-untyped-def]
    _srv, local, remote = both
    c = local if path == "arena" else remote
    values = torch.stack([chunk(i) for i in range(6)])
    keys = [key(i) for i in range(6)]
    tiers = c.put_from(keys, values).wait(timeout=30)
    assert tiers == ["cpu"] * 6
    out = torch.full((7, *values.shape[1:]), float("nan"), dtype=torch.bfloat16)
    handle = c.get_into([*keys, key(99)], out)
    assert handle.wait(timeout=30) == [True] * 6 + [False]
    assert handle.is_done()
    assert torch.equal(out[:6], values)
    assert out[6].isnan().all()  # an absent key leaves its slot alone
    assert (local._core._arena is not None) == (path == "arena")
    assert wait_for(lambda: local.stats().leases == 0)
    assert torch.equal(local.get(key(3)), values[3])  # the other path reads them too


def test_put_from_reserves_in_growing_parts(both, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A put_from reserves a first small part, copies it, then reserves the rest: every
    part lands and commits, and the values read back whole."""
    from kvstore.client import _transfer

    _srv, local, _ = both
    monkeypatch.setattr(_transfer, "FIRST_RESERVE_BYTES", 64 * KiB)  # one chunk
    reserved: list[int] = []
    reserve = local._core._reserve

    def spy(headers, call, pool=0):  # type: ignore[no-untyped-def]
        reserved.append(len(headers))
        return (yield from reserve(headers, call, pool))

    monkeypatch.setattr(local._core, "_reserve", spy)
    values = torch.stack([chunk(i) for i in range(16)])
    keys = [key(i) for i in range(16)]
    assert local.put_from(keys, values).wait(timeout=30) == ["cpu"] * 16
    assert reserved == [1, 3, 12]
    out = torch.zeros_like(values)
    assert local.get_into(keys, out).wait(timeout=30) == [True] * 16
    assert torch.equal(out, values)
    assert wait_for(lambda: local.stats().leases == 0)


def test_get_into_marks(both) -> None:  # type: ignore[no-untyped-def]
    _srv, local, _ = both
    values = torch.stack([chunk(i) for i in range(4)])
    keys = [key(i) for i in range(4)]
    local.put_from(keys, values).wait(timeout=30)
    out = torch.zeros_like(values)
    handle = local.get_into(keys, out, marks=[2, 4])
    assert handle.marks == [None, None]  # CPU destinations: filled before it returned
    assert handle.wait(timeout=30) == [True] * 4 and torch.equal(out, values)
    for bad in ([3, 1], [5], [-1]):
        with pytest.raises(InvalidArgument, match="marks"):
            local.get_into(keys, out, marks=bad)
    assert wait_for(lambda: local.stats().leases == 0)


def test_put_from_commits_with_the_server_computing_checksums(both) -> None:  # type: ignore[no-untyped-def]
    _srv, local, _ = both
    values = [chunk(i, (3, 1000)) for i in range(3)]
    local.put_from([key(i) for i in range(3)], values).wait(timeout=30)
    # The server's checksum is of the bytes written: a plain get verifies against it.
    for i in range(3):
        assert torch.equal(local.get(key(i)), values[i])
    assert local.stats().entries == 3


def test_get_into_refuses_wrong_destinations_before_copying(both) -> None:  # type: ignore[no-untyped-def]
    _srv, local, _ = both
    local.put_from([key(1), key(2)], torch.stack([chunk(1), chunk(2)])).wait(timeout=30)
    shape = chunk(1).shape
    cases = {
        "dtype": torch.zeros((2, *shape), dtype=torch.float16),
        "size": torch.zeros((2, 4, 2, 16, 8, 32), dtype=torch.bfloat16),
        "count": torch.zeros((3, *shape), dtype=torch.bfloat16),
    }
    for name, out in cases.items():
        with pytest.raises(InvalidArgument) as err:
            local.get_into([key(1), key(2)], out)
        assert ("float16" in str(err.value)) == (name == "dtype"), err.value
        assert not out.any(), name  # nothing copied
    assert wait_for(lambda: local.stats().leases == 0)  # and no lease left behind


@pytest.mark.parametrize(("count", "elements"), [(3, MiB // 2), (40, 2048)])
def test_get_into_repairs_a_corrupt_arena_copy_from_ssd(start_server, count, elements) -> None:  # type: ignore[no-untyped-def]
    # 1 MiB values are hashed a task each; 4 KiB ones share tasks, the bad one among them.
    srv = start_server("--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB")
    values = [chunk(i, (elements,)) for i in range(count)]
    bad = count // 2
    with srv.client(NS) as c:
        c.put_from([key(i) for i in range(count)], values).wait(timeout=30)
        for i in range(12):  # push them down to ssd
            c.put(key(100 + i), chunk(100 + i, (MiB // 2,)))
        assert torch.equal(c.get(key(bad)), values[bad])  # promoted: on cpu and on ssd
        for i in range(count):
            c.get(key(i))  # and so are the others
        corrupt_in_arena(srv, key(bad), NS)
        out = torch.empty((count, elements), dtype=torch.bfloat16)
        assert c.get_into([key(i) for i in range(count)], out).wait(timeout=30) == [True] * count
        assert torch.equal(out, torch.stack(values))  # the bad copy dropped, ssd's served
        assert wait_for(lambda: c.stats().leases == 0)


def test_acquire_and_gather_top_k_blocks(both) -> None:  # type: ignore[no-untyped-def]
    _srv, local, remote = both
    blocks = [chunk(i, (16, 64)) for i in range(40)]  # 2 KiB blocks
    keys = [key(i) for i in range(40)]
    local.batch_put(keys, blocks)
    rng = np.random.default_rng(0)
    for c in (local, remote):
        refs = c.acquire([*keys, key(999)])
        assert refs.found == [True] * 40 + [False]
        for _ in range(3):
            top = rng.choice(40, 12, replace=False)  # unsorted
            top = np.concatenate([top, top[:2]])  # and a repeat
            out = torch.zeros((top.size, 16, 64), dtype=torch.bfloat16)
            c.gather(refs[top], out).wait()
            assert torch.equal(out, torch.stack([blocks[i] for i in top]))
        with pytest.raises(InvalidArgument, match="not stored"):
            c.gather(refs[[40]], torch.zeros((1, 16, 64), dtype=torch.bfloat16))
        with pytest.raises(InvalidArgument, match="float32"):
            c.gather(refs[[0]], torch.zeros((1, 16, 64), dtype=torch.float32))
        with pytest.raises(Exception, match="need"):
            c.gather(refs[[0, 1]], torch.zeros((1, 16, 64), dtype=torch.bfloat16))
        c.release(refs)
        with pytest.raises(InvalidArgument, match="released"):
            c.gather(refs[[0]], torch.zeros((1, 16, 64), dtype=torch.bfloat16))
    assert wait_for(lambda: local.stats().leases == 0)


def test_gather_refuses_blocks_of_different_sizes(both) -> None:  # type: ignore[no-untyped-def]
    _srv, local, _ = both
    local.batch_put([key(1), key(2)], [chunk(1, (16, 64)), chunk(2, (16, 32))])
    refs = local.acquire([key(1), key(2)])
    out = torch.full((2, 16, 64), 7, dtype=torch.bfloat16)
    with pytest.raises(InvalidArgument, match="share size"):
        local.gather(refs, out)
    assert (out == 7).all()
    local.release(refs)


def test_held_refs_are_renewed_past_the_lease_time(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--cpu-bytes", "16MiB", "--lease-seconds", "1")
    with srv.client(NS) as c:
        c.put(key(1), chunk(1, (16, 64)))
        refs = c.acquire([key(1)])
        time.sleep(3.2)  # three lease times: renewed in the background meanwhile
        out = torch.empty((1, 16, 64), dtype=torch.bfloat16)
        c.gather(refs, out).wait()
        assert torch.equal(out[0], chunk(1, (16, 64)))
        assert c.stats().leases == 1
        c.release(refs)
        assert wait_for(lambda: c.stats().leases == 0, timeout=5)


def test_refs_lost_by_the_server_are_refused(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--cpu-bytes", "16MiB", "--lease-seconds", "0.5")
    with srv.client(NS) as c:
        c.put(key(1), chunk(1, (16, 64)))
        refs = c.acquire([key(1)])
        srv.restart()  # the new server holds none of these leases: renewal reports that
        out = torch.full((1, 16, 64), 7, dtype=torch.bfloat16)
        assert wait_for(lambda: refs.expires == 0.0, timeout=5)
        with pytest.raises(InvalidArgument, match="expired"):
            c.gather(refs, out)
        assert (out == 7).all()


def test_leases_of_a_killed_client_are_reclaimed(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB", "--lease-seconds", "1")
    with srv.client(NS) as c:
        c.batch_put([key(i) for i in range(4)], [chunk(i, (MiB // 2,)) for i in range(4)])
    script = textwrap.dedent(
        f"""
        from kvstore.client import KVClient
        c = KVClient({srv.address!r}, {NS!r})
        refs = c.acquire([{", ".join(repr(key(i)) for i in range(4))}])
        print(len(refs.leases), flush=True)
        import time; time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"4"
        with srv.client(NS) as c:
            assert c.stats().leases == 4
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
            # The leased values cannot be evicted meanwhile; after the lease time they can.
            assert wait_for(lambda: c.stats().leases == 0, timeout=10)
            for i in range(4, 20):
                c.put(key(i), chunk(i, (MiB // 2,)))
            assert c.stats().tiers["cpu"].evictions > 0
            assert torch.equal(c.get(key(0)), chunk(0, (MiB // 2,)))
    finally:
        child.kill()
        child.wait()


def test_async_client_transfers(both) -> None:  # type: ignore[no-untyped-def]
    srv, _, _ = both

    async def main() -> None:
        async with AsyncKVClient(srv.address, NS) as c:
            values = torch.stack([chunk(i) for i in range(3)])
            keys = [key(i) for i in range(3)]
            assert await (await c.put_from(keys, values)).wait() == ["cpu"] * 3
            out = torch.empty_like(values)
            handle = await c.get_into(keys, out)
            assert await handle.wait() == [True] * 3
            assert handle.is_done() and torch.equal(out, values)
            refs = await c.acquire(keys)
            dense = torch.empty((2, *values.shape[1:]), dtype=values.dtype)
            c.gather(refs[[2, 0]], dense).wait()
            assert torch.equal(dense, values[[2, 0]])
            await c.release(refs)

    asyncio.run(main())


def test_more_keys_than_one_request_takes(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--cpu-bytes", "16MiB", "--max-keys-per-request", "4")
    values = torch.stack([chunk(i, (16, 64)) for i in range(10)])
    keys = [key(i) for i in range(10)]
    with srv.client(NS) as c:
        assert c.put_from(keys, values).wait(timeout=30) == ["cpu"] * 10
        out = torch.empty_like(values)
        assert c.get_into(keys, out).wait(timeout=30) == [True] * 10
        assert torch.equal(out, values)
        refs = c.acquire(keys)
        dense = torch.empty_like(values[:5])
        c.gather(refs[[9, 0, 5, 4, 3]], dense).wait()
        assert torch.equal(dense, values[[9, 0, 5, 4, 3]])
        c.release(refs)
        assert wait_for(lambda: c.stats().leases == 0)


def test_key_queries_split_by_the_server_limit(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--cpu-bytes", "16MiB", "--max-keys-per-request", "3")
    keys = [key(i) for i in range(10)]
    with srv.client(NS) as c:
        c.batch_put(keys[:7], [chunk(i, (4,)) for i in range(7)])
        assert c.lookup(keys) == 7
        assert c.exists(keys) == [True] * 7 + [False] * 3
        assert c.pin(keys) == 7 and c.unpin(keys) == 7
        assert c.delete(keys) == 7
        assert c.lookup(keys) == 0 and c.exists([]) == []


def test_a_closed_client_refuses_transfers_before_touching_the_server(server) -> None:  # type: ignore[no-untyped-def]
    c = server.client(NS)
    c.close()
    with pytest.raises(RuntimeError, match="closed"):
        c.put_from([key(1)], [chunk(1)])
    with pytest.raises(RuntimeError, match="closed"):
        c.get_into([key(1)], [torch.empty_like(chunk(1))])
