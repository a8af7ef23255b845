"""The gpu tier with real CUDA pools, shared with the client by CUDA IPC (needs a GPU).

The same protocol runs on the host twin in tests/e2e/test_gpu_tier.py on any machine.
With two GPUs, each keeps its own pool and a client puts into the pool of its tensors'
device; reads and gathers across devices still return the right bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.client import KVClient
from kvstore.client._shared import PoolMap
from kvstore.errors import DataLoss
from tests.e2e.test_gpu_tier import check_gpu_quota
from tests.e2e.test_shared import wait_for
from tests.e2e.test_transfer import free_port
from tests.e2e.test_transfer_gpu import _gpu_ready

NS = "test/gpu-tier-cuda"
KiB, MiB = 1 << 10, 1 << 20

pytestmark = pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA GPU, torch and CuPy")


def key(i: int) -> bytes:
    return b"C" + i.to_bytes(4, "little") + bytes(27)


def blocks(n: int, numel: int, device: str = "cuda", seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn((n, numel), generator=g, device=device).to(torch.bfloat16)


@pytest.fixture
def gpu_server(start_server):  # type: ignore[no-untyped-def]
    port = free_port()
    srv = start_server(
        "--tiers",
        "gpu,cpu,ssd",
        "--gpu-bytes",
        "64MiB",
        "--cpu-bytes",
        "512MiB",
        "--listen",
        f"127.0.0.1:{port}",
    )
    with srv.client(NS) as local, KVClient(f"127.0.0.1:{port}", NS) as remote:
        yield srv, local, remote


def test_cuda_pool_round_trips_in_place_and_as_bytes(gpu_server) -> None:  # type: ignore[no-untyped-def]
    _srv, local, remote = gpu_server
    values = blocks(16, 64 * KiB)  # 128 KiB each
    keys = [key(i) for i in range(16)]
    assert local.put_from(keys, values).wait(timeout=60) == ["gpu"] * 16
    pool = local._core._pools[1]
    assert isinstance(pool, PoolMap) and pool.device == values.device
    st = local.stats()
    assert st.tiers["gpu"].entries == 16 and st.gpu_pools[0].device_uuid.startswith("GPU-")
    out = torch.full_like(values, float("nan"))
    assert local.get_into(keys, out).wait(timeout=60) == [True] * 16
    assert torch.equal(out, values)
    host = torch.empty(values.shape, dtype=values.dtype)
    assert local.get_into(keys, host).wait(timeout=60) == [True] * 16
    assert torch.equal(host, values.cpu())
    assert torch.equal(local.get(keys[4]), values[4].cpu())  # checked bytes from the pool
    assert torch.equal(remote.get(keys[9]), values[9].cpu())
    assert wait_for(lambda: local.stats().leases == 0)


def test_cuda_pool_gather_alone_and_mixed_with_the_arena(gpu_server) -> None:  # type: ignore[no-untyped-def]
    _srv, local, _ = gpu_server
    in_pool = blocks(200, 8 * KiB, seed=1)  # 16 KiB blocks
    in_arena = blocks(200, 8 * KiB, seed=2)
    pool_keys = [key(i) for i in range(200)]
    arena_keys = [key(1000 + i) for i in range(200)]
    assert local.put_from(pool_keys, in_pool).wait(timeout=60) == ["gpu"] * 200
    assert local.batch_put(arena_keys, list(in_arena.cpu())) == ["cpu"] * 200
    refs = local.acquire(pool_keys + arena_keys)
    everything = torch.cat([in_pool, in_arena])
    rng = np.random.default_rng(5)
    try:
        assert set(refs.regions.tolist()) == {0, 1}
        stream = torch.cuda.Stream()
        for top in (rng.integers(0, 200, 64), rng.integers(0, 400, 300)):
            out = torch.empty((top.size, 8 * KiB), dtype=torch.bfloat16, device="cuda")
            local.gather(refs[top], out, stream=stream).wait(timeout=60)
            assert torch.equal(out, everything[torch.from_numpy(top).cuda()])
            host = torch.empty((top.size, 8 * KiB), dtype=torch.bfloat16)
            local.gather(refs[top], host).wait(timeout=60)
            assert torch.equal(host, everything[torch.from_numpy(top).cuda()].cpu())
    finally:
        local.release(refs)


def test_cuda_pool_demotes_to_cpu_and_loses_nothing(gpu_server) -> None:  # type: ignore[no-untyped-def]
    _srv, local, _ = gpu_server
    values = blocks(96, 1 * MiB // 2, seed=3)  # 1 MiB each: 96 MiB through a 64 MiB pool
    keys = [key(i) for i in range(96)]
    for base in range(0, 96, 16):
        local.put_from(keys[base : base + 16], values[base : base + 16]).wait(timeout=60)
    assert wait_for(lambda: local.stats().tiers["gpu"].demotions > 0)
    st = local.stats()
    assert st.tiers["gpu"].entries + st.tiers["cpu"].entries == 96
    out = torch.empty_like(values)
    assert local.get_into(keys, out).wait(timeout=60) == [True] * 96
    assert torch.equal(out, values)


def test_cuda_pool_corruption_is_caught(gpu_server) -> None:  # type: ignore[no-untyped-def]
    srv, local, _ = gpu_server
    values = blocks(2, 64 * KiB, seed=4)
    keys = [key(7), key(8)]
    assert local.put_from(keys, values).wait(timeout=60) == ["gpu"] * 2
    refs = local.acquire(keys, verify=False)
    s = refs.slices[0]
    assert s is not None and s.pool == 1
    local._core._pools[1].tensor()[s.offset + 100] ^= 0xFF  # bit rot in the pool
    torch.cuda.synchronize()
    local.release(refs)
    with pytest.raises(DataLoss):
        local.get_into(keys, torch.empty_like(values)).wait(timeout=60)
    assert wait_for(lambda: local.exists(keys) == [False, True])
    assert srv.alive()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_each_gpu_has_its_pool_and_reads_cross_devices(gpu_server) -> None:  # type: ignore[no-untyped-def]
    _srv, local, _ = gpu_server
    st = local.stats()
    assert len(st.gpu_pools) == torch.cuda.device_count()
    assert len({p.device_uuid for p in st.gpu_pools}) == len(st.gpu_pools)
    on0 = blocks(8, 8 * KiB, "cuda:0", seed=6)
    on1 = blocks(8, 8 * KiB, "cuda:1", seed=7)
    k0 = [key(i) for i in range(8)]
    k1 = [key(100 + i) for i in range(8)]
    assert local.put_from(k0, on0).wait(timeout=60) == ["gpu"] * 8
    assert local.put_from(k1, on1).wait(timeout=60) == ["gpu"] * 8
    refs = local.acquire(k0 + k1)
    try:
        pools = {local._core._pools[p].device.index for p in set(refs.regions.tolist())}
        assert pools == {0, 1}  # each value sits in the pool of the GPU it came from
        both = torch.cat([on0, on1.to("cuda:0")])
        top = np.array([15, 0, 9, 3, 8, 8])
        out = torch.empty((6, 8 * KiB), dtype=torch.bfloat16, device="cuda:0")
        local.gather(refs[top], out).wait(timeout=60)
        assert torch.equal(out, both[torch.from_numpy(top).cuda()])
    finally:
        local.release(refs)
    out1 = torch.empty((8, 8 * KiB), dtype=torch.bfloat16, device="cuda:1")
    assert local.get_into(k0, out1).wait(timeout=60) == [True] * 8  # pool of GPU 0 -> GPU 1
    assert torch.equal(out1.cpu(), on0.cpu())


def test_a_gpu_quota_holds_one_group_in_a_cuda_pool(start_server) -> None:  # type: ignore[no-untyped-def]
    check_gpu_quota(start_server, ("--gpu-bytes", "64MiB"), "cuda")
