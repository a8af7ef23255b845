"""The GPU half of bench_codecs: decode throughput of containers of real KV on the GPU.

The model runs on the CPU (the GPU machine has no transformers or model files), so the CPU
run saves its containers (`bench_codecs.py --save-containers DIR`: one directory per codec
spec, one file per 256-token chunk of each prompt) and the GPU run decodes them
(`bench_codecs.py --gpu-decode DIR`); a codec without a GPU decoder (`cachegen-zstd`) gets
the CPU figures alone:

- every container decodes on the GPU to exactly the CPU decoder's bits (checked first);
- **GPU decode**: batches of the chunks (repeated up to `--gpu-batch` bytes of output)
  through `kvstore.codecs.decode_values` into CUDA tensors: GPU time of everything the batch
  enqueues (the copy of the payloads to the GPU, the three decode kernels, the checksums of
  the values), with the stream held by a spin kernel while the host prepares the batch, so
  the host's time is not counted; and wall time from the call to `wait()` returning (host
  parsing and staging included). Each in GB/s of decoded output, beside the 50 GB/s target,
  pinned H2D bandwidth (what copying the decoded KV from host memory would give) and the
  device copy, all measured in this run.
- **CPU on this host** (`_demotion`): the same chunks, encoded again from what they decode
  to, through a store's ssd writer on this host's threads against LMDB writing records of
  the containers' size here, and decoded on one core: the CPU run's figures on a server;
  and, for a codec that encodes on GPUs (checked first: one batch of all the chunks gives
  the CPU encoder's payloads), encoding from pinned host memory a value at a time and in
  the ssd writer's batches, and the store's demotion with `--encode-gpu` against the same
  LMDB write.
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import _demotion as demotion
import torch
from _procs import progress

from kvstore.codecs import Codec, codec_from_spec, decode, decode_values
from kvstore.codecs.values import one_or_each
from kvstore.store import gpu_batch_bytes

SUFFIX = ".kvc"
PROFILE = "profile.json"
HERE = "@DIR@"  # in a saved spec: the directory it was saved in, wherever that is now
TARGET_GBPS = 50.0


def save_containers(
    directory: Path, codec: Codec, name: str, blobs: list[bytes], chunk_tokens: int
) -> None:
    """Write a prompt's chunk containers for `codec` under `directory`, with the codec's
    spec, its profile (cachegen-x's containers decode only where their maps are loaded) and
    the chunk size (chunk i of a prompt is at position i * chunk_tokens)."""
    spec = codec.spec()
    sub = directory / spec.replace(":", "_").replace(",", "_").replace("=", "-").replace("/", "_")
    sub.mkdir(parents=True, exist_ok=True)
    profile = str(codec.params.get("profile", ""))
    if profile:
        shutil.copyfile(profile, sub / PROFILE)
        spec = spec.replace(f"profile={profile}", f"profile={HERE}/{PROFILE}")
    (sub / "spec.txt").write_text(spec + "\n")
    (sub / "chunk_tokens.txt").write_text(f"{chunk_tokens}\n")
    for i, blob in enumerate(blobs):
        (sub / f"{name}-{i:03d}{SUFFIX}").write_bytes(blob)


def _saved(sub: Path) -> tuple[str, list[int]]:
    """A saved directory's spec (its profile where it lies now) and each of its chunk
    files' position."""
    spec = (sub / "spec.txt").read_text().strip().replace(HERE, str(sub))
    at = sub / "chunk_tokens.txt"
    tokens = int(at.read_text()) if at.exists() else 256
    files = sorted(sub.glob(f"*{SUFFIX}"))
    return spec, [int(f.stem.rsplit("-", 1)[1]) * tokens for f in files]


def _batch(blobs: list[bytes], wants: list[torch.Tensor], target: int) -> list[Any]:
    once = sum(w.nbytes for w in wants)
    reps = max(1, math.ceil(target / once))
    return [
        (b, torch.empty(w.shape, dtype=w.dtype, device="cuda"))
        for _ in range(reps)
        for b, w in zip(blobs, wants, strict=True)
    ]


def _batches(sizes: list[int], limit: int) -> list[list[int]]:
    """The indexes of values of `sizes` bytes in runs of at most `limit` bytes (at least
    one each), as the ssd writer hands them to a GPU."""
    out: list[list[int]] = [[]]
    for i in range(len(sizes)):
        if out[-1] and sum(sizes[j] for j in out[-1]) + sizes[i] > limit:
            out.append([])
        out[-1].append(i)
    return out


def run(directory: Path, batch_bytes: int, repeats: int) -> tuple[dict[str, Any], str]:
    """Measure every spec saved under `directory`; the figures and the printed table."""
    from bench_gpu import gpu_seconds, limits

    stream = torch.cuda.Stream()
    limit = limits(stream)
    progress(f"limits: {limit}")
    rows = []
    for sub in sorted(p for p in directory.iterdir() if (p / "spec.txt").exists()):
        spec, positions = _saved(sub)
        files = sorted(sub.glob(f"*{SUFFIX}"))
        blobs = [f.read_bytes() for f in files]
        codec = codec_from_spec(spec)  # first: it loads a profile's maps, if it names one
        wants = [decode(b) for b in blobs]
        if codec.gpu_decoder() is None:  # a host codec: its CPU figures on this host
            ratio = sum(w.nbytes for w in wants) / sum(map(len, blobs))
            row = {"spec": spec, "chunks": len(files), "ratio": ratio}
            row["cpu"] = demotion.rates(spec, codec, wants, repeats, positions=positions)
            rows.append(row)
            progress(f"{spec}: {row}")
            continue
        items = _batch(blobs, wants, 0)
        decode_values(items, stream).wait()
        for (_, out), want, f in zip(items, wants, files, strict=True):
            if not torch.equal(out.cpu(), want):
                raise RuntimeError(f"{f.name}: the GPU decoded other bits than the CPU")
        progress(f"{spec}: {len(files)} chunks decode on the GPU bit for bit as on the CPU")
        items = _batch(blobs, wants, batch_bytes)
        out_bytes = sum(o.nbytes for _, o in items)
        stored = sum(len(b) for b, _ in items)

        def once(items: list[Any] = items) -> None:
            decode_values(items, stream).wait()

        t0 = time.perf_counter()
        once()
        host_s = time.perf_counter() - t0
        walls = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            once()
            walls.append(time.perf_counter() - t0)
        wall = statistics.median(walls)
        handles: list[Any] = []
        gpu = gpu_seconds(
            lambda items=items, handles=handles: handles.append(decode_values(items, stream)),
            stream,
            runs=repeats,
            hold_us=int(2e6 * max(host_s, wall)) + 1000,
        )
        for h in handles:
            h.wait()
        row = {
            "spec": spec,
            "chunks": len(items),
            "output_bytes": out_bytes,
            "ratio": out_bytes / stored,
            "gpu_GBps": out_bytes / gpu / 1e9,
            "wall_GBps": out_bytes / wall / 1e9,
        }
        row["gpu_over_target"] = row["gpu_GBps"] / TARGET_GBPS
        row["gpu_over_h2d"] = row["gpu_GBps"] / limit["h2d_GBps"]
        row["gpu_over_d2d"] = row["gpu_GBps"] / limit["d2d_GBps"]
        # The chunks are encoded again from what they decode to (the model is not here):
        # the same shapes and statistics, the speed of the real work.
        # What encodes these chunks in a store (cachegen-x for a profile with maps).
        # Each chunk's codec as a store has it: at its position (cachegen-x's encoders
        # take a codec per value, the others one for all).
        codecs = [codec.for_position(p, w.shape) for p, w in zip(positions, wants, strict=True)]
        encoder = codecs[0].gpu_encoder()
        device = torch.cuda.current_device() if encoder is not None else None
        row["cpu"] = demotion.rates(spec, codec, wants, repeats, device, positions)
        if encoder is not None:
            coded = encoder(one_or_each(codecs), [w.cuda() for w in wants])  # one batch
            for (payload, _), c, want, f in zip(coded, codecs, wants, files, strict=True):
                if payload != c.encode_payload(want):
                    raise RuntimeError(f"{f.name}: the GPU encoded another payload than the CPU")
            progress(f"{spec}: {len(files)} chunks encode on the GPU byte for byte as on the CPU")
            pinned = [w.pin_memory() for w in wants]
            fp16 = sum(w.nbytes for w in wants)
            one_s, _ = demotion.best_time(
                lambda f=encoder, cs=codecs, ps=pinned, d=device: [
                    f(c, [p], d) for c, p in zip(cs, ps, strict=True)
                ],
                repeats,
            )
            batches = _batches([p.nbytes for p in pinned], gpu_batch_bytes(codec))
            batch_s, _ = demotion.best_time(
                lambda f=encoder, cs=codecs, ps=pinned, bs=batches, d=device: [
                    f(one_or_each([cs[i] for i in b]), [ps[i] for i in b], d) for b in bs
                ],
                repeats,
            )
            row["cpu"]["gpu_encode_one_GBps"] = fp16 / one_s / 1e9
            row["cpu"]["gpu_encode_GBps"] = fp16 / batch_s / 1e9
        rows.append(row)
        progress(f"{spec}: {row}")
    lines = [
        f"GPU decode of real KV containers ({torch.cuda.get_device_name()}); limits in this "
        f"run: pinned H2D {limit['h2d_GBps']:.1f} GB/s, device copy {limit['d2d_GBps']:.0f} GB/s",
        f"{'spec':<28} {'chunks':>6} {'out GB':>7} {'ratio':>6} {'GPU GB/s':>9} "
        f"{'/target':>8} {'/H2D':>6} {'/D2D':>6} {'wall GB/s':>10}",
    ]
    for r in (r for r in rows if "gpu_GBps" in r):
        verdict = "PASS" if r["gpu_GBps"] >= TARGET_GBPS else "MISS"
        lines.append(
            f"{r['spec']:<28} {r['chunks']:>6} {r['output_bytes'] / 1e9:>7.2f} {r['ratio']:>5.2f}x "
            f"{r['gpu_GBps']:>9.1f} {r['gpu_over_target']:>7.2f}x {r['gpu_over_h2d']:>5.2f}x "
            f"{r['gpu_over_d2d']:>6.3f} {r['wall_GBps']:>10.1f}  {verdict}"
        )
    lines.append(
        f"GPU GB/s: decoded bytes per GPU second (payload copy, kernels, checksums); target "
        f"{TARGET_GBPS:.0f} GB/s. wall: the call to wait() returning, host parsing included."
    )
    lines += demotion.lines([(r["spec"], r["cpu"]) for r in rows])
    return {"limits": limit, "gpu_decode": rows}, "\n".join(lines)
