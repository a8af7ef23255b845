"""The gpu tier's protocol against a real server, on the host twin (`--gpu-twin`).

A same-host client maps the server's pools beside its arena, puts into the pool of its
device (for CPU tensors, the twin's), gets and gathers from pool slices in place, and
gathers a selection spread over the pool and the arena. The server demotes a full pool to
cpu on its own; TCP clients and plain gets read pool values as checked bytes. The CUDA
pool runs the same protocol over IPC handles (tests/e2e/test_transfer_gpu.py).
"""

from __future__ import annotations

import pytest
import torch

from kvstore.client import KVClient
from kvstore.client._shared import ArenaMap
from kvstore.errors import DataLoss
from tests.e2e.test_shared import wait_for
from tests.e2e.test_transfer import free_port

NS = "test/gpu-tier"
KiB, MiB = 1 << 10, 1 << 20


def key(i: int) -> bytes:
    return b"G" + i.to_bytes(4, "little") + bytes(27)


def block(i: int, numel: int = 8 * KiB) -> torch.Tensor:
    g = torch.Generator().manual_seed(500 + i)
    return torch.randn(numel, generator=g).to(torch.bfloat16)


@pytest.fixture
def twin(start_server):  # type: ignore[no-untyped-def]
    """A gpu,cpu,ssd server whose gpu tier is the host twin, a same-host client and a TCP
    client of it."""
    port = free_port()
    srv = start_server(
        "--tiers",
        "gpu,cpu,ssd",
        "--gpu-twin",
        "--gpu-bytes",
        "8MiB",
        "--cpu-bytes",
        "64MiB",
        "--listen",
        f"127.0.0.1:{port}",
    )
    with srv.client(NS) as local, KVClient(f"127.0.0.1:{port}", NS) as remote:
        yield srv, local, remote


def test_stats_announce_the_pool(twin) -> None:  # type: ignore[no-untyped-def]
    _srv, local, _ = twin
    st = local.stats()
    [pool] = st.gpu_pools
    assert (pool.pool, pool.device_uuid, pool.capacity_bytes) == (1, "host-twin", 8 * MiB)
    assert pool.twin_path and not pool.ipc_handle
    assert st.tiers["gpu"].capacity_bytes == 8 * MiB


def test_put_from_lands_in_the_pool_and_reads_back_every_way(twin) -> None:  # type: ignore[no-untyped-def]
    _srv, local, remote = twin
    values = torch.stack([block(i) for i in range(8)])  # 16 KiB each
    keys = [key(i) for i in range(8)]
    assert local.put_from(keys, values).wait(timeout=30) == ["gpu"] * 8
    assert local.stats().tiers["gpu"].entries == 8
    out = torch.zeros_like(values)
    assert local.get_into(keys, out).wait(timeout=30) == [True] * 8
    assert torch.equal(out, values)
    # Plain gets and TCP clients do not map the pool: the server sends checked bytes.
    assert torch.equal(local.get(keys[3]), values[3])
    assert torch.equal(remote.get(keys[5]), values[5])
    got = torch.zeros_like(values)
    assert remote.get_into(keys, got).wait(timeout=30) == [True] * 8
    assert torch.equal(got, values)
    assert wait_for(lambda: local.stats().leases == 0)


def test_gather_from_the_pool_and_across_pool_and_arena(twin) -> None:  # type: ignore[no-untyped-def]
    _srv, local, _ = twin
    in_pool = [key(i) for i in range(16)]
    in_arena = [key(100 + i) for i in range(16)]
    pool_values = torch.stack([block(i) for i in range(16)])
    arena_values = torch.stack([block(100 + i) for i in range(16)])
    assert local.put_from(in_pool, pool_values).wait(timeout=30) == ["gpu"] * 16
    assert local.batch_put(in_arena, list(arena_values)) == ["cpu"] * 16
    refs = local.acquire(in_pool + in_arena)
    try:
        assert set(refs.regions.tolist()) == {0, 1}
        top = [3, 17, 0, 31, 3, 20, 15]  # both regions, unsorted, one repeated
        out = torch.empty((len(top), 8 * KiB), dtype=torch.bfloat16)
        local.gather(refs[top], out).wait(timeout=30)
        everything = torch.cat([pool_values, arena_values])
        assert torch.equal(out, everything[top])
        only_pool = torch.empty((4, 8 * KiB), dtype=torch.bfloat16)
        local.gather(refs[[9, 2, 2, 14]], only_pool).wait(timeout=30)
        assert torch.equal(only_pool, pool_values[[9, 2, 2, 14]])
    finally:
        local.release(refs)
    assert wait_for(lambda: local.stats().leases == 0)


def test_full_pool_is_demoted_to_cpu_and_nothing_is_lost(twin) -> None:  # type: ignore[no-untyped-def]
    _srv, local, _ = twin
    # 48 values of 512 KiB: three times the 8 MiB pool.
    values = [block(i, 256 * KiB) for i in range(48)]
    keys = [key(i) for i in range(48)]
    for base in range(0, 48, 8):  # in rounds, so the demoter makes room between them
        local.put_from(keys[base : base + 8], values[base : base + 8]).wait(timeout=30)
    gpu = local.stats().tiers["gpu"]
    assert wait_for(lambda: local.stats().tiers["gpu"].used_bytes <= 0.85 * gpu.capacity_bytes)
    st = local.stats()
    assert st.tiers["gpu"].demotions > 0
    assert st.tiers["gpu"].entries + st.tiers["cpu"].entries == 48
    out = torch.empty((48, 256 * KiB), dtype=torch.bfloat16)
    assert local.get_into(keys, out).wait(timeout=60) == [True] * 48
    assert torch.equal(out, torch.stack(values))


def test_corrupt_pool_copy_is_caught_and_dropped(twin) -> None:  # type: ignore[no-untyped-def]
    srv, local, _ = twin
    v = block(7)
    assert local.put_from([key(7)], [v]).wait(timeout=30) == ["gpu"]
    refs = local.acquire([key(7)], verify=False)
    [s] = [sl for sl in refs.slices if sl is not None]
    pool = local._core._pools[1]
    assert isinstance(pool, ArenaMap)
    pool.array()[s.offset + 100] ^= 0xFF  # bit rot in the pool
    local.release(refs)
    with pytest.raises(DataLoss):
        local.get_into([key(7)], torch.empty_like(v)[None]).wait(timeout=30)
    assert wait_for(lambda: local.exists([key(7)]) == [False])
    assert srv.alive()


def check_gpu_quota(start_server, pool: tuple[str, ...], device: str) -> None:  # type: ignore[no-untyped-def]
    """`--quota gpu[...]` against a real server whose pools `pool` (flags) hold `device`
    tensors: one group is held to its quota, demoted to cpu, and loses nothing; the other
    stays in the pool."""
    srv = start_server(
        "--tiers", "gpu,cpu,ssd", *pool, "--cpu-bytes", "64MiB",
        "--quota", "gpu[test/tenant-a*]=1MiB",
    )  # fmt: skip
    rule = "gpu[test/tenant-a*]"
    a_values = [block(i, 64 * KiB).to(device) for i in range(16)]  # 2 MiB: twice the quota
    b_values = [block(100 + i, 64 * KiB).to(device) for i in range(16)]
    keys = [key(i) for i in range(16)]
    with srv.client("test/tenant-a") as a, srv.client("test/tenant-b") as b:
        placed = a.put_from(keys, a_values).wait(timeout=30)
        assert placed.count("gpu") <= 8 and placed.count("cpu") >= 8  # 8 x 128 KiB = 1 MiB
        assert b.put_from(keys, b_values).wait(timeout=30) == ["gpu"] * 16  # no quota for B
        used, quota = a.stats().quotas[rule]
        assert quota == MiB and used <= MiB
        assert wait_for(lambda: a.stats().quotas[rule][0] <= 0.85 * MiB)  # the demoter
        st = b.stats()  # B's values all stayed in the pool
        assert st.tiers["gpu"].used_bytes - st.quotas[rule][0] == 16 * 128 * KiB
        for client, values in ((a, a_values), (b, b_values)):
            out = torch.empty((16, 64 * KiB), dtype=torch.bfloat16, device=device)
            assert client.get_into(keys, out).wait(timeout=30) == [True] * 16
            assert torch.equal(out, torch.stack(values))


def test_a_gpu_quota_holds_one_group_and_leaves_the_other_in_the_pool(start_server) -> None:  # type: ignore[no-untyped-def]
    check_gpu_quota(start_server, ("--gpu-twin", "--gpu-bytes", "8MiB"), "cpu")
