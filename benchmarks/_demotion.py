"""A codec's CPU speed where the server spends it: demotion to ssd and decoding on one core.

Used by bench_codecs on the model's chunks (`--codecs`) and on a GPU machine's host
(`--gpu-decode`, from saved containers), where a server's many cores are:

- **demotion**: a real `Store` (cpu and ssd tiers, the codec on ssd, in a temporary
  directory) holding every chunk in its cpu tier; its ssd writer (`Store.write_ahead`,
  what `--ssd-write-ahead` runs in the background) then encodes them on the host pool, a
  value per thread, and writes each to LMDB as it is encoded, flushed at the end. GB/s of
  fp16 taken in; the chunks repeated to ~256 MB of fp16 (at most 8 times), or, encoding on
  a GPU, to twice what the writer has in flight there (~1 GiB, at most 32 times). On a
  GPU also with each copy's chunks shorter than the longest cut to a token count of their
  own (`own_token_counts`), as a serving engine's prefixes end: a GPU batch holds values
  of one shape, so each such chunk is a batch (and a CUDA graph) of its own there.
- **encode on the host pool**: the encoding alone, the same values at once, a value per
  thread (`kvstore.threads.HOST_THREADS` of them).
- **LMDB write**: the ssd tier writing as many records as demotion does, of the codec's
  output size, flushed, in fp16 bytes per second (its stored rate times the codec's
  ratio): what demotion feeds, with the same fixed costs (and the tier's background
  flushes, `kvstore.tiers.ssd.WRITEBACK_BYTES`, in both); the best of as many runs as
  demotion's.
- **decode on one core**: every chunk decoded one after another, kernels on one core, as
  each of the server's host threads decodes fetched values.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numba
import torch

from kvstore.codecs import Codec, ValueHeader, checksum, decode_value
from kvstore.codecs.values import tensor_bytes
from kvstore.config import ServerConfig
from kvstore.dtypes import dtype_name
from kvstore.memtune import keep_freed_buffers
from kvstore.store import WRITE_AHEAD_GPU_AHEAD_BYTES, Store
from kvstore.threads import HOST_THREADS, host_pool, one_core_kernels
from kvstore.tiers.ssd import LmdbTier

# Demotion is measured over about this many fp16 bytes (the chunks repeated, at most 8
# times): several of the ssd writer's rounds, as a server runs them.
DEMOTED_FP16_BYTES = 256 << 20
# Encoding on a GPU, the writer has WRITE_AHEAD_GPU_AHEAD_BYTES in flight: demotion is
# measured over twice that, so that it includes the writer's steady state (values chosen
# again as each job's are written), not only its first choice. On an H200 host the steady
# state was what had gone wrong: batches of a value or two once the first 512 MiB were
# chosen, 1.5 GB/s over 1.9 GB against 5.6 over 293 MB.
DEMOTED_GPU_FP16_BYTES = 2 * WRITE_AHEAD_GPU_AHEAD_BYTES


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The shortest of `repeats` runs of `fn`, and what the last run returned."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def lmdb_write_bps(chunk_bytes: int, records: int) -> float:
    """Bytes per second the ssd tier (LMDB, as the server opens it) writes `records`
    records of `chunk_bytes`, flushed to disk at the end, in a temporary directory here."""
    with tempfile.TemporaryDirectory(prefix="kvbench-lmdb-") as tmp:
        tier = LmdbTier(Path(tmp), 2 * records * (chunk_bytes + 8192))  # a record: pages
        payload = os.urandom(chunk_bytes)
        header = ValueHeader("uint8", (chunk_bytes,), chunk_bytes, checksum(payload))
        start = time.perf_counter()
        for i in range(records):
            tier.put("bench", i.to_bytes(32, "big"), header, payload)
        tier.sync()
        seconds = time.perf_counter() - start
        tier.close()
    return records * chunk_bytes / seconds


def _on_one_core(fn: Callable[[], Any]) -> Any:
    """`fn()` with this thread's numba kernels and torch ops on one core, as a host pool
    thread runs them (the settings are restored after). In this thread rather than a
    fresh one: a thread started after parallel work competes with that work's OpenMP
    threads while they spin down, which measures the spinning."""
    numba_threads, torch_threads = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        numba.set_num_threads(numba_threads)
        torch.set_num_threads(torch_threads)


def _demote_once(
    spec: str,
    chunks: Sequence[torch.Tensor],
    encode_gpu: str = "off",
    positions: Sequence[int] | None = None,
) -> tuple[float, float]:
    """Seconds for a store's ssd writer to copy `chunks` (held in its cpu tier, put at
    `positions` if given) to ssd through `spec`, flushed; encoding where `encode_gpu` (the
    server's --encode-gpu) says. And the share of the writer's time it waited for values
    being encoded rather than writing them (`WriterCounters`): what keeps demotion from
    the LMDB write's rate is encoding when it is large, the first batch when it is small."""
    total = sum(c.nbytes for c in chunks)
    with tempfile.TemporaryDirectory(prefix="kvbench-demote-") as tmp:
        config = ServerConfig(
            tiers="cpu,ssd",
            data_dir=Path(tmp),
            cpu_bytes=2 * total + (64 << 20),  # room for every chunk, whatever its size class
            ssd_bytes=2 * total + (64 << 20),
            codec=(f"ssd={spec}",),
            ssd_write_ahead=0,  # no background writer: the timed rounds below do it all
            encode_gpu=encode_gpu,
        )
        store = Store(config)
        try:
            for i, c in enumerate(chunks):
                data = tensor_bytes(c.contiguous())
                res = store.begin_put(
                    "bench", i.to_bytes(32, "big"), dtype_name(c), list(c.shape), len(data),
                    checksum(data), position=positions[i] if positions is not None else -1,
                )  # fmt: skip
                res.write(data)
                res.commit()
            store.config.ssd_write_ahead = 1.0
            start = time.perf_counter()
            while store.write_ahead():
                pass
            store.sync()
            seconds = time.perf_counter() - start
            stats = store.stats()
            if sum(t.counters.demotions for t in stats.tiers if t.name == "cpu") != len(chunks):
                raise RuntimeError(f"{spec}: the ssd writer did not copy every chunk")
            busy = stats.writer.wait_seconds + stats.writer.write_seconds
            waiting = stats.writer.wait_seconds / busy if busy > 0 else 0.0
            # A server that keeps demoting keeps its GPU scratch between the writer's calls
            # (kvstore.store.GPU_SCRATCH_IDLE_S): the next store here starts with it cached,
            # as such a server's next call does, not with what closing gives back.
            store._gpu_scratch_held = False
        finally:
            store.close()
    return seconds, waiting


def own_token_counts(chunks: Sequence[torch.Tensor], copies: int) -> list[torch.Tensor]:
    """`chunks` (KV, `[layers, 2, tokens, heads, head_dim]`) repeated `copies` times, with
    each chunk shorter than the longest cut by one token more in each copy (at least one
    left): the prefixes of a serving engine end in chunks of any length, which the
    repeated set would give a few shapes only."""
    whole = max(c.shape[2] for c in chunks)
    return [
        c if c.shape[2] == whole else c[:, :, : max(1, c.shape[2] - k)].contiguous()
        for k in range(copies)
        for c in chunks
    ]


def rates(
    spec: str,
    codec: Codec,
    chunks: Sequence[torch.Tensor],
    repeats: int,
    gpu: int | None = None,
    positions: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Every rate above for `codec` (`spec`) on `chunks` (each at its position in
    `positions`, as a prefix put gives them, if given: `Codec.for_position`), in fp16 GB/s
    (decoding the containers its timed encodes made); `demotion_over_lmdb` says whether
    encoding keeps up. With `gpu`, also the demotion with the ssd writer encoding on that
    CUDA GPU (`--encode-gpu`): `gpu_demotion_GBps` and `gpu_demotion_over_lmdb`."""
    keep_freed_buffers()  # as the server does at start
    fp16 = sum(2 * c.numel() for c in chunks)
    pool = host_pool()

    where = list(positions) if positions is not None else [-1] * len(chunks)

    def encode_one(i: int) -> bytes:
        one_core_kernels()
        c = chunks[i]
        return (codec.for_position(where[i], c.shape) if where[i] >= 0 else codec).encode(c)

    list(pool.map(encode_one, range(min(HOST_THREADS, len(chunks)))))  # compiles, starts them
    enc_s, encoded = best_time(lambda: list(pool.map(encode_one, range(len(chunks)))), repeats)
    outs = [torch.empty_like(c) for c in chunks]
    pairs = list(zip(encoded, outs, strict=True))
    dec_s = _on_one_core(
        lambda: best_time(lambda: [decode_value(b, out=o) for b, o in pairs], repeats)[0]
    )
    # Demotion and the LMDB write it is held against move the same records (the chunks
    # repeated over a few of the writer's rounds) and flush once: the same fixed costs.
    volume, most = (DEMOTED_FP16_BYTES, 8) if gpu is None else (DEMOTED_GPU_FP16_BYTES, 32)
    copies = max(1, min(math.ceil(volume / max(fp16, 1)), most))
    demoted = list(chunks) * copies
    at = where * copies if positions is not None else None
    runs = max(1, (repeats + 1) // 2)  # each a fresh store: the first pays its warm-up

    def demote(values: list[torch.Tensor], where: str) -> tuple[float, float]:
        """The best of `runs` demotions of `values`, encoding where `where` says: GB/s of
        fp16, and the share of its time the writer waited for encodes."""
        seconds, waiting = min(_demote_once(spec, values, where, at) for _ in range(runs))
        return sum(2 * c.numel() for c in values) / seconds / 1e9, waiting

    host = demote(demoted, "off")
    stored = sum(map(len, encoded))
    # The best of as many runs as demotion gets: one run of the same write varied by a
    # third between runs on an H200 host (6.5-8.7 GB/s of fp16), which alone moved the ratio.
    lmdb = max(lmdb_write_bps(max(1, stored // len(encoded)), len(demoted)) for _ in range(runs))
    out: dict[str, Any] = {
        "threads": HOST_THREADS,
        "encode_pool_GBps": fp16 / enc_s / 1e9,
        "decode_one_core_GBps": fp16 / dec_s / 1e9,
        "lmdb_write_stored_GBps": lmdb / 1e9,
        "lmdb_write_fp16_GBps": lmdb * fp16 / stored / 1e9,
    }

    def record(name: str, rate: tuple[float, float]) -> None:
        out[f"{name}_GBps"], out[f"{name}_waiting"] = rate
        out[f"{name}_over_lmdb"] = out[f"{name}_GBps"] / out["lmdb_write_fp16_GBps"]

    record("demotion", host)
    if gpu is not None:
        record("gpu_demotion", demote(demoted, str(gpu)))
        record("gpu_demotion_own_counts", demote(own_token_counts(chunks, copies), str(gpu)))
    return out


def lines(rows: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """The printed section: one line per (label, `rates`)."""
    if not rows:
        return []
    threads = rows[0][1]["threads"]
    omp = os.environ.get("OMP_WAIT_POLICY", "unset; the server runs with PASSIVE")
    out = [
        "",
        f"CPU where the server spends it (GB/s of fp16; {threads} host threads; "
        f"OMP_WAIT_POLICY {omp}): demotion = the store's ssd writer encoding a value per "
        "thread and writing LMDB; encode = that encoding alone; LMDB = writing records of the "
        "codec's output; decode = one core",
    ]
    for label, r in rows:
        verdict = "keeps up with" if r["demotion_over_lmdb"] >= 1 else "is slower than"
        out.append(
            f"  {label:<26} demotion {r['demotion_GBps']:6.2f}  encode {r['encode_pool_GBps']:6.2f}"
            f"  LMDB {r['lmdb_write_fp16_GBps']:6.2f}  decode/core {r['decode_one_core_GBps']:5.2f}"
            f"  (demotion {verdict} the LMDB write: {r['demotion_over_lmdb']:.2f}x;"
            f" the writer waited for encodes {r['demotion_waiting']:.0%} of its time)"
        )
        if "gpu_demotion_GBps" in r:
            verdict = "keeps up with" if r["gpu_demotion_over_lmdb"] >= 1 else "is slower than"
            out.append(
                f"  {'':<26} on the GPU (--encode-gpu): demotion {r['gpu_demotion_GBps']:6.2f}"
                f"  encode {r['gpu_encode_GBps']:6.2f} in batches from pinned memory"
                f" ({r['gpu_encode_GBps'] / r['encode_pool_GBps']:.2f}x the host threads'),"
                f" {r['gpu_encode_one_GBps']:5.2f} a value at a time"
                f"  (demotion {verdict} the LMDB write: {r['gpu_demotion_over_lmdb']:.2f}x;"
                f" the writer waited for encodes {r['gpu_demotion_waiting']:.0%} of its time)"
            )
            out.append(
                f"  {'':<26} on the GPU, the shorter chunks cut to a token count of their own in"
                f" each copy (as prefixes end): demotion {r['gpu_demotion_own_counts_GBps']:6.2f}"
                f" ({r['gpu_demotion_own_counts_over_lmdb']:.2f}x the LMDB write; the writer"
                f" waited {r['gpu_demotion_own_counts_waiting']:.0%} of its time)"
            )
    return out
