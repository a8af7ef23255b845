"""GPU data path against the hardware, measured in one run on one GPU.

Every figure is printed beside its limit, measured here, and as a ratio:

- **limits**: pinned H2D and D2H of 1 GiB with one `cudaMemcpyAsync`, and a device-to-device
  copy (bytes copied once);
- **offload / load**: `KVClient.put_from` / `get_into` of `--kv` bytes (default 2 GiB) of
  KV in 256-token chunks (Llama-3-8B shaped: 32 layers, 8 KV heads of 128, bf16: 32 MiB a
  chunk) between GPU tensors and a real `kvstore-server`'s host arena, timed from the call
  until `wait()` returns (checksums, commit and lease release included), vs D2H / H2D;
- **top-k gather**: `KVClient.gather` of k blocks of 16 KiB and 64 KiB picked at random
  from a full 4 GiB arena, vs H2D, vs one `cudaMemcpyAsync` of the same number of
  contiguous bytes (what PCIe gives a transfer that small: 4 MiB does not reach the 1 GiB
  rate), and vs a loop of one `cudaMemcpyAsync` per block (how an engine without a gather
  kernel does it; timed as the caller waits for it);
- **pool gather**: `gather_blocks` from a 4 GiB device buffer, vs the device copy;
- **gpu tier**: the same offload / load against a server running `--tiers gpu,cpu`, whose
  pool on this GPU the client maps by CUDA IPC, and `KVClient.gather` of k = 4096 blocks of
  16 KiB from that pool: each vs the device copy (no target: the issue sets none);
- **ssd through cachegen**: `get_into` of 256-token chunks held only by the ssd tier,
  stored through cachegen: decoded by the server's CPU (`decode_codecs=[]`) vs sent
  compressed and decoded on this GPU (the default), wall time; with `--cross DIR`, the same
  for the real chunks `bench_codecs.py --save-containers DIR` wrote, through their codec
  (with a cross-layer profile: cachegen-x, whose maps the client fetches from the server);
- **launch to event**: wall time of `KVClient.gather` of k = 64 small blocks, from the
  call until its event has completed;
- **overlap**: a bf16 matmul on the compute stream, alone and while a gather (kernel) and
  a get_into (copy engine) run on a copy stream: the matmul's time with them over alone.

GPU times of single operations come from CUDA events with the stream held by a short
spin kernel while the operation is enqueued, so that Python's launch time is not counted
as GPU time (it is measured separately, above). Each figure is a median after a warm-up.

    python benchmarks/bench_gpu.py [--kv 2GiB] [--arena 4GiB] [--cross DIR] [--json out.json]
        [--plot out.png]

Needs a CUDA GPU, CuPy, and room for the arena in /dev/shm. Prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cupy
import numpy as np
import torch
from _procs import progress, running_kvstore, save_plot, write_outputs

from kvstore.client import KVClient
from kvstore.config import parse_size
from kvstore.kernels import DeviceBuffer, gather_blocks, xxh3_64_gpu

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
NAMESPACE = "bench/gpu"
CHUNK_SHAPE = (32, 2, 256, 8, 128)  # Llama-3-8B, one 256-token chunk: 32 MiB of bf16
TARGETS = {"offload": 0.85, "load": 0.85, "gather_h2d": 0.90, "gather_loop": 5.0}
POOL_TARGET, LAUNCH_TARGET_US, OVERLAP_TARGET = 0.60, 30.0, 1.2

_HOLD = cupy.RawKernel(
    r"""
extern "C" __global__ void hold(unsigned long long ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        __nanosleep(1000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
""",
    "hold",
)


def cupy_stream(stream: Any) -> Any:
    """A CuPy view of a torch stream."""
    if hasattr(cupy.cuda.Stream, "from_external"):  # CuPy 14
        return cupy.cuda.Stream.from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream)


def gpu_seconds(fn: Callable[[], object], stream: Any, runs: int = 15, hold_us: int = 300) -> float:
    """Median GPU time of what `fn` enqueues on `stream` (a torch stream)."""
    cs = cupy_stream(stream)
    for _ in range(2):
        fn()
    stream.synchronize()
    times = []
    for _ in range(runs):
        _HOLD((1,), (1,), (np.uint64(hold_us * 1000),), stream=cs)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def wall_seconds(fn: Callable[[], object], runs: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn`, which must return only when its work is done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def keys_for(tag: str, n: int) -> list[bytes]:
    return [hashlib.blake2b(f"{tag}/{i}".encode(), digest_size=32).digest() for i in range(n)]


@contextlib.contextmanager
def server(arena: int, kv: int) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="kvbench-gpu-") as tmp:
        progress(f"starting kvstore-server with a {arena / GiB:.1f} GiB arena")
        with running_kvstore(
            Path(tmp),
            "--tiers", "cpu",
            "--cpu-bytes", str(arena),
            "--max-keys-per-request", str(1 << 17),
            "--max-value-bytes", str(max(256 * MiB, kv // 8)),
            "--staging-bytes", str(max(256 * MiB, kv // 8)),
        ) as address:  # fmt: skip
            yield address


def limits(stream: Any) -> dict[str, float]:
    n = GiB
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host.random_(0, 255)
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    with torch.cuda.stream(stream):
        h2d = n / gpu_seconds(lambda: a.copy_(host, non_blocking=True), stream)
        d2h = n / gpu_seconds(lambda: host.copy_(a, non_blocking=True), stream)
        d2d = n / gpu_seconds(lambda: b.copy_(a), stream)
    return {"h2d_GBps": h2d / 1e9, "d2h_GBps": d2h / 1e9, "d2d_GBps": d2d / 1e9}


def offload_load(c: KVClient, kv_bytes: int, stream: Any, tier: str = "cpu") -> dict[str, float]:
    chunk = int(np.prod(CHUNK_SHAPE)) * 2
    n = max(1, kv_bytes // chunk)
    kv = torch.randn((n, *CHUNK_SHAPE), device="cuda", dtype=torch.bfloat16)
    keys = keys_for("chunk", n)
    progress(f"offload/load: {n} chunks of {chunk // MiB} MiB")

    def offload() -> None:
        c.delete(keys)
        t0 = time.perf_counter()
        tiers = c.put_from(keys, kv, stream=stream).wait()
        offload.seconds.append(time.perf_counter() - t0)  # type: ignore[attr-defined]
        if set(tiers) != {tier}:
            raise RuntimeError(f"chunks landed in {set(tiers)}, not all in {tier}")

    offload.seconds = []  # type: ignore[attr-defined]
    for _ in range(5):
        offload()
    out = torch.empty_like(kv)
    load = wall_seconds(lambda: c.get_into(keys, out, stream=stream).wait(), runs=5)
    if not torch.equal(out, kv):
        raise RuntimeError("get_into did not return the KV put_from stored")
    c.delete(keys)
    nbytes = n * chunk
    buffers = [DeviceBuffer(t.data_ptr(), chunk, t.device.index) for t in kv.unbind(0)]
    with torch.cuda.stream(stream):
        t_hash = gpu_seconds(lambda: xxh3_64_gpu(buffers, kv.device.index, stream), stream)
    return {
        "checksum_GBps": nbytes / t_hash / 1e9,
        "kv_bytes": nbytes,
        "offload_GBps": nbytes / statistics.median(offload.seconds[1:]) / 1e9,  # type: ignore[attr-defined]
        "load_GBps": nbytes / load / 1e9,
    }


def memcpy_per_block(
    host: torch.Tensor, offsets: list[int], flat: torch.Tensor, block: int, stream: Any
) -> None:
    """The gather as one cudaMemcpyAsync per block, until the copies are done."""
    with torch.cuda.stream(stream):
        for i, o in enumerate(offsets):
            flat[i * block : (i + 1) * block].copy_(host[o : o + block], non_blocking=True)
    stream.synchronize()


def fill_blocks(
    c: KVClient, block: int, arena: int, stream: Any, tier: str = "cpu"
) -> tuple[list[bytes], Any]:
    """Fill `arena` bytes of `tier` with blocks of `block` bytes; returns keys and refs."""
    n = int(arena * 0.9) // block  # what the slab pages hold, with room to spare
    keys = keys_for(f"block{block}", n)
    batch = max(1, (512 * MiB) // block)
    src = torch.randint(-8, 8, (batch, block // 2), device="cuda", dtype=torch.bfloat16)
    progress(f"filling the arena with {n} blocks of {block // KiB} KiB")
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        part = keys[i : i + batch]
        tiers = c.put_from(part, src[: len(part)], stream=stream).wait()
        if set(tiers) != {tier}:
            raise RuntimeError(f"blocks landed in {set(tiers)}, not all in {tier}")
    t1 = time.perf_counter()
    refs = c.acquire(keys)
    progress(f"filled in {t1 - t0:.1f} s, acquired in {time.perf_counter() - t1:.1f} s")
    return keys, refs


def gather_rows(
    c: KVClient, arena: int, limit: dict[str, float], stream: Any
) -> list[dict[str, Any]]:
    rows = []
    rng = np.random.default_rng(0)
    pool = torch.empty(4 * GiB, dtype=torch.uint8, device="cuda")
    for block in (16 * KiB, 64 * KiB):
        keys, refs = fill_blocks(c, block, arena, stream)
        host, _ = refs.host()
        for k in (64, 256, 4096):
            top = rng.choice(len(keys), k, replace=False)
            sel = refs[top]
            out = torch.empty((k, block // 2), dtype=torch.bfloat16, device="cuda")
            with torch.cuda.stream(stream):
                t_kernel = gpu_seconds(lambda sel=sel, out=out: c.gather(sel, out, stream), stream)
            want = torch.stack(
                [host[o : o + block].view(torch.bfloat16) for o in refs.offsets[top]]
            )
            if not torch.equal(out.cpu(), want):
                raise RuntimeError(f"gather of {k} blocks of {block} bytes returned wrong bytes")
            offsets = refs.offsets[top].tolist()
            flat = out.view(torch.uint8).view(-1)
            t_loop = wall_seconds(
                lambda o=offsets, f=flat, h=host, b=block: memcpy_per_block(h, o, f, b, stream),
                runs=5,
            )
            # The same bytes in one contiguous copy: what PCIe gives a transfer of this size.
            flat_host = host[: k * block].view(torch.uint8)
            with torch.cuda.stream(stream):
                t_memcpy = gpu_seconds(
                    lambda f=flat, h=flat_host: f.copy_(h, non_blocking=True), stream
                )
            pids = rng.integers(0, pool.numel() // block, k)
            with torch.cuda.stream(stream):
                t_pool = gpu_seconds(
                    lambda p=pids, o=out, b=block: gather_blocks(pool, p, o, b, stream), stream
                )
            moved = k * block
            rows.append(
                {
                    "block": block,
                    "k": k,
                    "gather_GBps": moved / t_kernel / 1e9,
                    "loop_GBps": moved / t_loop / 1e9,
                    "pool_GBps": moved / t_pool / 1e9,
                    "gather_over_h2d": moved / t_kernel / 1e9 / limit["h2d_GBps"],
                    "memcpy_same_bytes_GBps": moved / t_memcpy / 1e9,
                    "gather_over_memcpy_same_bytes": t_memcpy / t_kernel,
                    "gather_over_loop": t_loop / t_kernel,
                    "pool_over_d2d": moved / t_pool / 1e9 / limit["d2d_GBps"],
                }
            )
            progress(
                f"{block // KiB} KiB k={k}: gather {rows[-1]['gather_GBps']:.1f} GB/s, "
                f"loop {rows[-1]['loop_GBps']:.1f}, pool {rows[-1]['pool_GBps']:.0f}"
            )
        if block == 16 * KiB:
            overlap = measure_overlap(c, refs, len(keys), block, rng)
            progress(f"overlap: {overlap}")
            rows.append(overlap)
        c.release(refs)
        c.delete(keys)
    return rows


def launch_latency(c: KVClient, stream: Any) -> dict[str, float]:
    """Wall time from the call to its completed event, gathering k = 64 blocks of 4 KiB
    from the arena: through `KVClient.gather` (selection and checks included) and through
    the kernel's own entry point (`gather_blocks`, ids given)."""
    n, block = 4096, 4 * KiB
    keys = keys_for("small", n)
    c.put_from(
        keys, torch.randint(-8, 8, (n, block // 2), device="cuda", dtype=torch.bfloat16)
    ).wait()
    refs = c.acquire(keys)
    rng = np.random.default_rng(1)
    out = torch.empty((64, block // 2), dtype=torch.bfloat16, device="cuda")
    picks = [rng.choice(n, 64, replace=False) for _ in range(400)]
    sels = [refs[p] for p in picks]
    host, _ = refs.host()
    src = DeviceBuffer(host.data_ptr(), host.numel(), None)
    ids = [refs.offsets[p] // 16 for p in picks]

    def median_us(fn: Callable[[int], Any]) -> float:
        lat = []
        for i in range(len(picks)):
            stream.synchronize()
            t0 = time.perf_counter()
            fn(i).synchronize()
            lat.append(time.perf_counter() - t0)
        return statistics.median(lat[100:]) * 1e6

    client_us = median_us(lambda i: c.gather(sels[i], out, stream)._event)
    kernel_us = median_us(lambda i: gather_blocks(src, ids[i], out, block, stream, slot_bytes=16))
    c.release(refs)
    c.delete(keys)
    return {"launch_to_event_us": kernel_us, "client_gather_to_event_us": client_us}


def measure_overlap(
    c: KVClient, refs: Any, n: int, block: int, rng: np.random.Generator
) -> dict[str, float]:
    """A matmul alone, then beside a gather and beside a get_into on a copy stream."""
    compute, copy = torch.cuda.Stream(), torch.cuda.Stream()
    a = torch.randn((8192, 8192), device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    sel = refs[rng.choice(n, 4096, replace=False)]  # 64 MiB from the arena per gather
    dense = torch.empty((4096, block // 2), dtype=torch.bfloat16, device="cuda")
    chunks = torch.randn((8, *CHUNK_SHAPE), device="cuda", dtype=torch.bfloat16)  # 256 MiB
    chunk_keys = keys_for("overlap", 8)
    c.put_from(chunk_keys, chunks).wait()
    into = torch.empty_like(chunks)

    def matmuls() -> tuple[Any, Any]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(compute):
            start.record(compute)
            for _ in range(10):
                torch.mm(a, b)
            end.record(compute)
        return start, end

    def run(side: Callable[[], object] | None) -> float:
        torch.cuda.synchronize()
        cs = cupy_stream(compute)
        _HOLD((1,), (1,), (np.uint64(2_000_000),), stream=cs)  # both start together
        if side is not None:
            copy.wait_stream(compute)
            side()
        start, end = matmuls()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    def gathers() -> None:
        for _ in range(4):
            c.gather(sel, dense, copy)

    def get_into() -> None:
        c.get_into(chunk_keys, into, stream=copy)

    for _ in range(2):
        run(None)
    alone = statistics.median(run(None) for _ in range(5))
    with_gather = statistics.median(run(gathers) for _ in range(5))
    with_get = statistics.median(run(get_into) for _ in range(5))
    torch.cuda.synchronize()
    c.delete(chunk_keys)
    return {
        "matmul_ms": alone * 1e3,
        "matmul_with_gather_ratio": with_gather / alone,
        "matmul_with_get_into_ratio": with_get / alone,
    }


def gpu_tier(kv_bytes: int, limit: dict[str, float], stream: Any) -> dict[str, float]:
    """Offload, load and gather against a server's gpu pool on this GPU."""
    pool = kv_bytes + 2 * GiB
    with (
        tempfile.TemporaryDirectory(prefix="kvbench-gpu-tier-") as tmp,
        running_kvstore(
            Path(tmp),
            "--tiers",
            "gpu,cpu",
            "--gpu-bytes",
            str(pool),
            "--cpu-bytes",
            str(GiB),
            "--max-keys-per-request",
            str(1 << 17),
            "--max-value-bytes",
            str(max(256 * MiB, kv_bytes // 8)),
            "--staging-bytes",
            str(max(256 * MiB, kv_bytes // 8)),
        ) as address,  # fmt: skip
        KVClient(address, NAMESPACE) as c,
    ):
        progress(f"gpu tier: a {pool / GiB:.0f} GiB pool on this GPU")
        out = offload_load(c, kv_bytes, stream, tier="gpu")
        block, k = 16 * KiB, 4096
        keys, refs = fill_blocks(c, block, GiB, stream, tier="gpu")
        top = np.random.default_rng(1).choice(len(keys), k, replace=False)
        sel = refs[top]
        dense = torch.empty((k, block // 2), dtype=torch.bfloat16, device="cuda")
        with torch.cuda.stream(stream):
            t = gpu_seconds(lambda: c.gather(sel, dense, stream), stream)
        want = torch.empty_like(dense)
        c.get_into([keys[i] for i in top], want, stream=stream).wait()
        if not torch.equal(dense, want):
            raise RuntimeError("gather from the gpu tier returned wrong bytes")
        c.release(refs)
        out["gather_GBps"] = k * block / t / 1e9
    for name in ("offload", "load", "gather"):
        out[f"{name}_over_d2d"] = out[f"{name}_GBps"] / limit["d2d_GBps"]
    return out


def smooth_kv(n: int) -> torch.Tensor:
    """n chunks of KV-like bf16 on the GPU: channels with their own offsets, drifting slowly
    along the tokens (random values would make a codec's work meaningless)."""
    layers, _, _, heads, dim = CHUNK_SHAPE
    g = torch.Generator(device="cuda").manual_seed(7)
    base = torch.randn((n, layers, 2, 1, heads, dim), device="cuda", generator=g) * 2
    step = torch.randn((n, *CHUNK_SHAPE), device="cuda", generator=g) * 0.05
    return (base + torch.cumsum(step, dim=3)).to(torch.bfloat16)


def ssd_codec_load(
    spec: str, values: list[torch.Tensor], positions: list[int], stream: Any
) -> dict[str, float]:
    """`get_into` of `values` (CUDA tensors, put at `positions`) held only by the ssd tier
    of a server storing through codec `spec`: decoded by the server (its CPU, then promoted
    to cpu and copied over PCIe) vs sent compressed and decoded on this GPU into the
    destination (the client's default with CuPy; a client without a cachegen-x container's
    maps fetches them first, which tests/e2e/test_client_maps.py covers: this process has
    them loaded for the bit check)."""
    widest, total = max(v.nbytes for v in values), sum(v.nbytes for v in values)
    with tempfile.TemporaryDirectory(prefix="kvbench-ssd-codec-") as tmp, running_kvstore(
        Path(tmp),
        "--tiers", "cpu,ssd",
        "--cpu-bytes", str(4 * widest),
        "--ssd-bytes", str(2 * total + GiB),
        "--codec", f"ssd={spec}",
        "--max-value-bytes", str(2 * widest),
        "--staging-bytes", str(max(GiB, 2 * total)),
    ) as address:  # fmt: skip
        keys = keys_for(f"ssd-codec/{spec}", len(values))
        progress(f"ssd codec load: {len(values)} values ({total / GiB:.2f} GiB) through {spec}")
        with (
            KVClient(address, NAMESPACE, decode_codecs=[]) as by_server,
            KVClient(address, NAMESPACE) as on_gpu,
        ):
            for k, v, at in zip(keys, values, positions, strict=True):
                by_server.put_from([k], [v], stream=stream, positions={k: at}).wait()
            where = {e.header.key: e.tier for e in by_server.entries(NAMESPACE)}
            cold = [i for i, k in enumerate(keys) if where.get(k) == "ssd"]

            def load(client: KVClient, picks: list[int]) -> tuple[list[torch.Tensor], float]:
                outs = [torch.empty_like(values[i]) for i in picks]
                t0 = time.perf_counter()
                client.get_into([keys[i] for i in picks], outs, stream=stream).wait()
                return outs, time.perf_counter() - t0

            # One value through each path first, untimed: the GPU decoder's kernels compile,
            # the numba parsers load, and the client fetches what it needs (maps).
            load(on_gpu, cold[:1])
            load(by_server, cold[1:2])
            cold = cold[2:]
            half = len(cold) // 2
            if half < 2:
                raise RuntimeError("too few values reached the ssd tier")
            server_picks, gpu_picks = cold[:half], cold[half : 2 * half]
            _, server_s = load(by_server, server_picks)
            outs, gpu_s = load(on_gpu, gpu_picks)
            # The GPU decoded what the server decodes: the same key through both paths.
            again, _ = load(by_server, gpu_picks[:1])
            if not torch.equal(again[0], outs[0]):
                raise RuntimeError("the GPU decoded other bits than the server")
            want = values[gpu_picks[0]].float()
            err = float((outs[0].float() - want).norm() / want.norm())
    return {
        "spec": spec,  # type: ignore[dict-item]
        "chunks": half,
        "server_decode_GBps": sum(values[i].nbytes for i in server_picks) / server_s / 1e9,
        "gpu_decode_GBps": sum(values[i].nbytes for i in gpu_picks) / gpu_s / 1e9,
        "rel_err": err,
    }


def saved_chunks(directory: Path, target: int) -> tuple[str, list[torch.Tensor], list[int]]:
    """The server codec spec, the values (on the GPU) and positions of the chunk containers
    `bench_codecs.py --save-containers` wrote under `directory` (the first codec's: real KV
    and its profile), repeated up to `target` bytes."""
    from _gpu_decode import SUFFIX, _saved

    from kvstore.codecs import codec_from_spec, decode

    sub = next(p for p in sorted(directory.iterdir()) if (p / "spec.txt").exists())
    spec, positions = _saved(sub)
    codec_from_spec(spec)  # loads its profile's maps, if any: the containers need them here
    values = [decode(f.read_bytes()).cuda() for f in sorted(sub.glob(f"*{SUFFIX}"))]
    reps = max(1, -(-target // sum(v.nbytes for v in values)))
    return spec, values * reps, positions * reps


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def render(fig: dict[str, Any]) -> str:
    lim = fig["limits"]
    lines = [
        f"{fig['device']}: pinned H2D {lim['h2d_GBps']:.1f} GB/s, D2H {lim['d2h_GBps']:.1f} GB/s,"
        f" device copy {lim['d2d_GBps']:.0f} GB/s",
        "",
        "measure                               figure        limit        ratio   target",
    ]
    o = fig["offload_load"]
    for name, lim_key in (("offload", "d2h_GBps"), ("load", "h2d_GBps")):
        r = o[f"{name}_GBps"] / lim[lim_key]
        lines.append(
            f"{name + ' (' + str(o['kv_bytes'] // MiB) + ' MiB, 32 MiB chunks)':<36} "
            f"{o[name + '_GBps']:>7.1f} GB/s {lim[lim_key]:>7.1f} GB/s {r:>8.0%}   "
            f">= {TARGETS[name]:.0%} {verdict(r >= TARGETS[name])}"
        )
    lines.append(
        f"{'GPU XXH3-64 of the same KV':<36} {o['checksum_GBps']:>7.0f} GB/s "
        f"{lim['d2d_GBps']:>7.0f} GB/s {o['checksum_GBps'] / lim['d2d_GBps']:>8.0%}   (reads once)"
    )
    for row in fig["gather"]:
        if "k" not in row:
            continue
        label = f"gather {row['block'] // KiB} KiB k={row['k']}"
        ok = row["gather_over_h2d"] >= TARGETS["gather_h2d"] if row["k"] >= 256 else None
        lines.append(
            f"{label:<36} {row['gather_GBps']:>7.1f} GB/s {lim['h2d_GBps']:>7.1f} GB/s "
            f"{row['gather_over_h2d']:>8.0%}   "
            + (f">= 90% {verdict(bool(ok))}" if ok is not None else "(k < 256: no target)")
        )
        r = row["gather_over_memcpy_same_bytes"]
        lines.append(
            f"{'  vs one cudaMemcpyAsync, same bytes':<36} {row['gather_GBps']:>7.1f} GB/s "
            f"{row['memcpy_same_bytes_GBps']:>7.1f} GB/s {r:>8.0%}   (contiguous: no target)"
        )
        r = row["gather_over_loop"]
        lines.append(
            f"{'  vs cudaMemcpyAsync per block':<36} {row['gather_GBps']:>7.1f} GB/s "
            f"{row['loop_GBps']:>7.1f} GB/s {r:>7.1f}x   >= 5x {verdict(r >= 5)}"
        )
        r = row["pool_over_d2d"]
        lines.append(
            f"{'  from a GPU pool':<36} {row['pool_GBps']:>7.0f} GB/s {lim['d2d_GBps']:>7.0f} GB/s "
            f"{r:>8.0%}   "
            + (
                f">= 60% {verdict(r >= POOL_TARGET)}"
                if row["k"] == max(x.get("k", 0) for x in fig["gather"])
                else "(a few us of work: launch-bound)"
            )
        )
    g = fig.get("gpu_tier")
    for name, what in (
        ("offload", "gpu tier offload (put_from)"),
        ("load", "gpu tier load (get_into)"),
        ("gather", "gpu tier gather 16 KiB k=4096"),
    ):
        if g is not None:
            lines.append(
                f"{what:<36} {g[name + '_GBps']:>7.0f} GB/s {lim['d2d_GBps']:>7.0f} GB/s "
                f"{g[name + '_over_d2d']:>8.0%}   (no target)"
            )
    for name in ("ssd_codec", "ssd_cross"):
        sc = fig.get(name)
        if sc is None:
            continue
        r = sc["gpu_decode_GBps"] / sc["server_decode_GBps"]
        what = "cachegen" if name == "ssd_codec" else "cachegen-x (real KV)"
        lines.append(
            f"{'load from ssd via ' + what + ', GPU decode':<36} "
            f"{sc['gpu_decode_GBps']:>7.1f} GB/s {sc['server_decode_GBps']:>7.1f} GB/s "
            f"{r:>7.1f}x   (vs server decode; no target)"
        )
    for row in fig["gather"]:
        if "launch_to_event_us" in row:
            us = row["launch_to_event_us"]
            lines.append(
                f"{'launch to event, k=64 x 4 KiB':<36} {us:>8.1f} us {'':>12} {'':>8}   "
                f"< {LAUNCH_TARGET_US:g} us {verdict(us < LAUNCH_TARGET_US)}"
            )
            us = row["client_gather_to_event_us"]
            lines.append(f"{'  through KVClient.gather':<36} {us:>8.1f} us")
        if "matmul_ms" in row:
            for side in ("gather", "get_into"):
                r = row[f"matmul_with_{side}_ratio"]
                lines.append(
                    f"{'matmul beside ' + side + ' (copy stream)':<36} "
                    f"{r * row['matmul_ms']:>8.2f} ms "
                    f"{row['matmul_ms']:>8.2f} ms {r:>8.2f}x   < {OVERLAP_TARGET}x "
                    f"{verdict(r < OVERLAP_TARGET)}"
                )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--kv", default="2GiB", help="KV moved by offload/load (default 2GiB)")
    p.add_argument("--arena", default="4GiB", help="arena the top-k blocks fill (default 4GiB)")
    p.add_argument(
        "--cross",
        type=Path,
        help="also load from ssd the chunk containers bench_codecs.py --save-containers wrote "
        "here (real KV; with a cross-layer profile: cachegen-x, whose maps the client fetches)",
    )
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--plot", type=Path, help="write a PNG of the gather figures (matplotlib)")
    args = p.parse_args()
    kv_bytes, arena = parse_size(args.kv, "--kv"), parse_size(args.arena, "--arena")
    if not torch.cuda.is_available():
        print("bench_gpu: needs a CUDA GPU", file=sys.stderr)
        return 2
    stream = torch.cuda.Stream()
    fig: dict[str, Any] = {"device": torch.cuda.get_device_name()}
    fig["limits"] = limits(stream)
    progress(f"limits: {fig['limits']}")
    with server(max(arena, kv_bytes) + GiB, kv_bytes) as address, KVClient(address, NAMESPACE) as c:
        fig["offload_load"] = offload_load(c, kv_bytes, stream)
        progress(f"offload/load: {fig['offload_load']}")
        torch.cuda.empty_cache()
        fig["gather"] = gather_rows(c, arena, fig["limits"], stream)
        fig["gather"].append(launch_latency(c, stream))
        progress(f"launch to event: {fig['gather'][-1]}")
    torch.cuda.empty_cache()
    fig["gpu_tier"] = gpu_tier(kv_bytes, fig["limits"], stream)
    progress(f"gpu tier: {fig['gpu_tier']}")
    torch.cuda.empty_cache()
    chunk = int(np.prod(CHUNK_SHAPE)) * 2
    n = max(4, min(kv_bytes, GiB) // chunk) // 2 * 2
    kv = list(smooth_kv(n))
    fig["ssd_codec"] = ssd_codec_load("cachegen", kv, [0] * n, stream)
    progress(f"ssd codec load: {fig['ssd_codec']}")
    del kv
    if args.cross is not None:
        spec, values, positions = saved_chunks(args.cross, min(kv_bytes, GiB) // 2)
        fig["ssd_cross"] = ssd_codec_load(spec, values, positions, stream)
        progress(f"ssd codec load, saved chunks: {fig['ssd_cross']}")
        del values
    torch.cuda.empty_cache()
    print(render(fig))
    write_outputs(fig, args.json, args.plot, lambda path: write_plot(fig, path))
    return 0


def write_plot(fig: dict[str, Any], path: Path) -> bool:
    """The gather figures against k; False when matplotlib is not installed."""
    rows = [r for r in fig["gather"] if "k" in r]

    def draw(f: Any, ax: Any) -> None:
        for block in sorted({r["block"] for r in rows}):
            sel = [r for r in rows if r["block"] == block]
            ks = [r["k"] for r in sel]
            ax.plot(ks, [r["gather_GBps"] for r in sel], "o-", label=f"gather {block // KiB} KiB")
            ax.plot(
                ks, [r["loop_GBps"] for r in sel], "x--", label=f"memcpy/block {block // KiB} KiB"
            )
        ax.axhline(fig["limits"]["h2d_GBps"], color="gray", ls=":", label="pinned H2D")
        ax.set_xscale("log")
        ax.set_xlabel("k (blocks gathered)")
        ax.set_ylabel("GB/s")
        ax.set_title(f"top-k gather from the host arena, {fig['device']}")
        ax.legend(fontsize=8)

    return save_plot(path, draw, figsize=(7, 4))


if __name__ == "__main__":
    sys.exit(main())
