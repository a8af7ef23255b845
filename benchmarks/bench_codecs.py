"""Codec benchmark on real KV: size against quality, down to the model's predictions.

For each codec spec and each prompt (`_realkv.prompts`: prose, code, a licence, JSON, a
chat; SmolLM2-135M-Instruct, 30 layers, 3 KV heads, head dim 64), all in one run:

* The prompt is split into a prefix (all but the last `--continuation` tokens, 128) and a
  continuation. The prefix's KV (`[layers, 2, tokens, kv_heads, head_dim]` float16, K after
  RoPE) is cut into 256-token chunks, as the store cuts it (the last chunk partial), each
  chunk encoded with `codec.encode` and decoded with `kvstore.codecs.decode`.
* **ratio** -- fp16 bytes of the prefix's KV over the bytes of its containers (headers
  included), summed over chunks and prompts.
* **K err / V err** -- ||decoded - original||_F / ||original||_F of all K (or V) of the prefix.
* **ppl** -- perplexity of the continuation, teacher-forced, with attention reading the
  decoded prefix KV, beside the same with the exact (float16) KV; **d ppl** is the increase
  in %. **top-1** is the share of continuation positions whose most likely next token is
  the one the exact KV gives; **KL** the mean KL divergence (nats per position) of the
  next-token distribution from the exact one: never negative, so less noisy than d ppl,
  which over 128 tokens moves a percent or two either way for the lighter codecs.
* **enc / dec GB/s** -- fp16 bytes of the prefix's KV per second of `encode` (for a lossy
  codec this includes the decode that checksums the value a reader gets) and `decode` of all
  its chunks, best of `--repeats`, on this machine's CPU.

Checks that fail the run (exit 1): the exact KV substituted must reproduce the exact run
(`_realkv.self_check`), and a lossless codec must give back the KV bit for bit, hence the
same perplexity and predictions.

    python benchmarks/bench_codecs.py                          # every registered codec
    python benchmarks/bench_codecs.py --codecs int8,fp8,kivi:bits=2,group=64 --detail
    python benchmarks/bench_codecs.py --json codecs.json --plot codecs.png
    python benchmarks/bench_codecs.py --fit-profile p.json --codecs cachegen:profile=p.json
    python benchmarks/bench_codecs.py --prompt-set fit --codecs ...   # encoder experiments
    python benchmarks/bench_codecs.py --codecs cachegen:level=3,newest=0
    python benchmarks/bench_codecs.py --codecs cachegen --save-containers kvc/  # CPU
    python benchmarks/bench_codecs.py --gpu-decode kvc/                         # GPU machine

A cachegen profile (`kvstore.codecs.cachegen_profile`) is fitted on other prompts than the
scored ones (`_realkv.fit_prompts`); the run names what each profile was fitted on and
refuses one fitted on a scored prompt, so its figures are held out. `--prompt-set fit`
scores the fitting prompts instead, in sample for a profile: where encoder variants are
compared before one is scored, once, on the usual prompts.

The last chunk of each prefix, the one its continuation follows, is coded as a store codes
the newest chunk of a sequence (`Codec.for_newest`: `cachegen:level=3,newest=0` codes it at
level 0), the others as the spec says.

Under the table: each codec's demotion through a real store's ssd writer against LMDB
writing its output, its encode rate on the host threads and its decode rate on one core
(`_demotion.py`).

The GPU decode figures (`_gpu_decode.py`) come from a GPU machine without the model, on
the containers a CPU run saved; so do the CPU figures of a GPU server's host, for every
saved codec.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _demotion as demotion
import torch
from _demotion import best_time
from _procs import progress, save_plot, write_outputs
from _realkv import (
    Continuation,
    MissingModelDependency,
    continuation_metrics,
    extra_prompts,
    fit_prompts,
    load_smollm2,
    prompt_kv,
    prompts,
    self_check,
    smollm2_gguf,
)

import kvstore
from kvstore.codecs import Codec, codec_from_spec, codec_names, decode
from kvstore.config import parse_size
from kvstore.errors import InvalidArgument

CHUNK_TOKENS = 256  # the store's chunk size
CONTINUATION = 128
MIN_PREFIX = 1000
# Modules of codecs that `kvstore.codecs` may not import yet; imported when present.
CODEC_MODULES = ("kvstore.codecs.quant", "kvstore.codecs.kivi")
# The levels benchmarked when --codecs is not given; a registered codec not named here
# runs with its defaults.
DEFAULT_LEVELS: dict[str, tuple[str, ...]] = {
    "raw": ("raw",),
    "zstd": ("zstd:level=1", "zstd:level=3"),
    "int8": ("int8",),
    "fp8": ("fp8",),
    "kivi": ("kivi:bits=4", "kivi:bits=2"),
    "cachegen": tuple(f"cachegen:level={n}" for n in range(4)),
    # Need a profile of the model with its maps: --fit-profile p.json --codecs
    # cachegen:profile=p.json (chunks with a position go through cachegen-x; with
    # cachegen-zstd:profile=p.json through cachegen-x-zstd).
    "cachegen-x": (),
    "cachegen-x-zstd": (),
}


# --------------------------------------------------------------------------- results


@dataclass
class PromptCase:
    """One prompt, its prefix's exact KV and the exact run the codecs are compared to."""

    name: str
    ids: list[int]
    prefix_len: int
    kv: torch.Tensor
    exact: Continuation

    @property
    def fp16_bytes(self) -> int:
        return self.kv.numel() * 2


@dataclass
class Cell:
    """One codec on one prompt."""

    prompt: str
    prefix_tokens: int
    chunks: int
    fp16_bytes: int
    stored_bytes: int
    k_rel_err: float
    v_rel_err: float
    ppl_exact: float
    ppl: float
    top1_agreement: float
    kl: float
    encode_s: float
    decode_s: float

    @property
    def ratio(self) -> float:
        return self.fp16_bytes / self.stored_bytes

    @property
    def ppl_increase(self) -> float:
        return self.ppl / self.ppl_exact - 1

    @property
    def encode_gbps(self) -> float:
        return self.fp16_bytes / self.encode_s / 1e9

    @property
    def decode_gbps(self) -> float:
        return self.fp16_bytes / self.decode_s / 1e9

    def to_json(self) -> dict[str, Any]:
        out = dict(vars(self))
        out.update(ratio=self.ratio, ppl_increase=self.ppl_increase)
        out.update(encode_gbps=self.encode_gbps, decode_gbps=self.decode_gbps)
        return out


@dataclass
class CodecRow:
    """One codec spec over every prompt."""

    label: str
    """The spec as given (`kivi:bits=2`)."""
    spec: str
    """Every parameter spelled out (`kivi:bits=2,group=32,residual=32`)."""
    lossless: bool
    cells: list[Cell] = field(default_factory=list)

    def _mean(self, value: Callable[[Cell], float]) -> float:
        return statistics.fmean(value(c) for c in self.cells)

    @property
    def ratio(self) -> float:
        return sum(c.fp16_bytes for c in self.cells) / sum(c.stored_bytes for c in self.cells)

    @property
    def k_rel_err(self) -> float:
        return self._mean(lambda c: c.k_rel_err)

    @property
    def v_rel_err(self) -> float:
        return self._mean(lambda c: c.v_rel_err)

    @property
    def ppl_exact(self) -> float:
        return self._mean(lambda c: c.ppl_exact)

    @property
    def ppl(self) -> float:
        return self._mean(lambda c: c.ppl)

    @property
    def ppl_increase(self) -> float:
        return self._mean(lambda c: c.ppl_increase)

    @property
    def top1_agreement(self) -> float:
        return self._mean(lambda c: c.top1_agreement)

    @property
    def kl(self) -> float:
        return self._mean(lambda c: c.kl)

    @property
    def encode_gbps(self) -> float:
        return sum(c.fp16_bytes for c in self.cells) / sum(c.encode_s for c in self.cells) / 1e9

    @property
    def decode_gbps(self) -> float:
        return sum(c.fp16_bytes for c in self.cells) / sum(c.decode_s for c in self.cells) / 1e9

    def to_json(self) -> dict[str, Any]:
        return {
            "codec": self.label,
            "spec": self.spec,
            "lossless": self.lossless,
            "ratio": self.ratio,
            "k_rel_err": self.k_rel_err,
            "v_rel_err": self.v_rel_err,
            "ppl_exact": self.ppl_exact,
            "ppl": self.ppl,
            "ppl_increase": self.ppl_increase,
            "top1_agreement": self.top1_agreement,
            "kl": self.kl,
            "encode_gbps": self.encode_gbps,
            "decode_gbps": self.decode_gbps,
            "prompts": [c.to_json() for c in self.cells],
        }


@dataclass
class Report:
    meta: dict[str, Any]
    check: dict[str, float] = field(default_factory=dict)
    rows: list[CodecRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    notes_after: list[str] = field(default_factory=list)  # printed under the table

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "self_check": self.check,
            "codecs": [r.to_json() for r in self.rows],
            "notes": self.notes,
        }


# --------------------------------------------------------------------------- codecs


def import_codec_modules() -> list[str]:
    """Import the codec modules that may exist by now; a note for each one skipped."""
    notes = []
    for module in CODEC_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            notes.append(f"{module} not present: its codecs skipped")
        except Exception as exc:  # a module being written may not import yet
            notes.append(f"{module} failed to import ({type(exc).__name__}: {exc}): skipped")
    return notes


def split_specs(text: str) -> list[str]:
    """'int8,kivi:bits=2,group=64,zstd' -> ['int8', 'kivi:bits=2,group=64', 'zstd']: an
    item with '=' but no ':' is one more parameter of the spec before it."""
    specs: list[str] = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        if "=" in item and ":" not in item and specs:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def select_codecs(texts: Sequence[str] | None) -> tuple[list[tuple[str, Codec]], list[str]]:
    """(spec as given, codec) to run (InvalidArgument for a bad spec), and notes on those
    skipped because their codec is not registered."""
    notes = import_codec_modules()
    registered = codec_names()
    if texts:
        specs = [s for t in texts for s in split_specs(t)]
    else:
        order = list(DEFAULT_LEVELS)
        known = sorted(registered, key=lambda n: (order.index(n) if n in order else len(order), n))
        specs = [s for name in known for s in DEFAULT_LEVELS.get(name, (name,))]
        notes += [
            f"{name} needs a profile of the model: --fit-profile p.json --codecs "
            "cachegen:profile=p.json runs it"
            for name in known
            if DEFAULT_LEVELS.get(name) == ()
        ]
    codecs: list[tuple[str, Codec]] = []
    seen: set[str] = set()
    for spec in specs:
        name = spec.partition(":")[0].strip()
        if name not in registered:
            notes.append(f"codec {name!r} is not registered: {spec} skipped")
            continue
        codec = codec_from_spec(spec)
        if codec.spec() not in seen:
            seen.add(codec.spec())
            codecs.append((spec.replace(" ", ""), codec))
    return codecs, notes


# --------------------------------------------------------------------------- measurements


def chunked(kv: torch.Tensor, chunk_tokens: int) -> list[torch.Tensor]:
    """The KV cut along tokens into chunks of `chunk_tokens` (the last one partial)."""
    return [
        kv[:, :, s : s + chunk_tokens].contiguous() for s in range(0, kv.shape[2], chunk_tokens)
    ]


def rel_err(decoded: torch.Tensor, original: torch.Tensor) -> float:
    """||decoded - original||_F / ||original||_F, in float64."""
    d, o = decoded.double(), original.double()
    return float(torch.linalg.vector_norm(d - o) / torch.linalg.vector_norm(o))


def chunk_codecs(
    codec: Codec, chunks: int, chunk_tokens: int, shape: Sequence[int] | None = None
) -> list[Codec]:
    """The codec of each of a prefix's `chunks` chunks of `chunk_tokens`: `codec`, but its
    choice for the newest chunk of a sequence for the last one, the tokens the continuation
    follows (as a client's `put_prefix` marks it), and for each chunk's position in the
    prefix (`Codec.for_position`; `shape`: a whole chunk's)."""
    coders = [codec.for_position(i * chunk_tokens, shape) for i in range(chunks)]
    return [*coders[:-1], coders[-1].for_newest()] if chunks else []


def measure(
    model: Any,
    label: str,
    codec: Codec,
    case: PromptCase,
    chunk_tokens: int,
    repeats: int,
) -> Cell:
    chunks = chunked(case.kv, chunk_tokens)
    coders = chunk_codecs(codec, len(chunks), chunk_tokens, chunks[0].shape)
    for c in {id(c): c for c in coders}.values():  # untimed: compiles kernels on first use
        decode(c.encode(chunks[0]))
    encode_s, blobs = best_time(
        lambda: [c.encode(x) for c, x in zip(coders, chunks, strict=True)], repeats
    )
    decode_s, parts = best_time(lambda: [decode(b) for b in blobs], repeats)
    decoded = torch.cat(parts, dim=2)
    if decoded.dtype != case.kv.dtype or decoded.shape != case.kv.shape:
        raise RuntimeError(
            f"{codec.spec()} decoded {decoded.dtype} {tuple(decoded.shape)}, "
            f"not {case.kv.dtype} {tuple(case.kv.shape)}"
        )
    run = continuation_metrics(model, case.ids, case.prefix_len, decoded)
    cell = Cell(
        prompt=case.name,
        prefix_tokens=case.prefix_len,
        chunks=len(chunks),
        fp16_bytes=case.fp16_bytes,
        stored_bytes=sum(len(b) for b in blobs),
        k_rel_err=rel_err(decoded[:, 0], case.kv[:, 0]),
        v_rel_err=rel_err(decoded[:, 1], case.kv[:, 1]),
        ppl_exact=case.exact.perplexity,
        ppl=run.perplexity,
        top1_agreement=run.agreement(case.exact),
        kl=run.kl_from(case.exact),
        encode_s=encode_s,
        decode_s=decode_s,
    )
    if all(c.lossless for c in coders):
        same = (
            torch.equal(decoded, case.kv)
            and run.perplexity == case.exact.perplexity
            and torch.equal(run.log_probs, case.exact.log_probs)
        )
        if not same:
            raise RuntimeError(
                f"lossless codec {codec.spec()} changed the KV of prompt {case.name}: "
                f"K err {cell.k_rel_err:.3g}, V err {cell.v_rel_err:.3g}, perplexity "
                f"{run.perplexity!r} vs {case.exact.perplexity!r}"
            )
    progress(
        f"{label:<14} {case.name:<8} ratio {cell.ratio:5.2f}x  K err "
        f"{cell.k_rel_err:.4f}  V err {cell.v_rel_err:.4f}  ppl {cell.ppl:.3f} "
        f"({cell.ppl_increase:+.2%})  top-1 {cell.top1_agreement:.1%}  KL {cell.kl:.2e}  enc "
        f"{cell.encode_gbps:.2f} dec {cell.decode_gbps:.2f} GB/s"
    )
    return cell


# --prompt-set: which prompts are scored (`_realkv`).
PROMPT_SETS: dict[str, Callable[[Any, int], list[tuple[str, list[int]]]]] = {
    "scored": prompts,
    "fit": fit_prompts,
    "extra": extra_prompts,
    "all": lambda tokenizer, n: prompts(tokenizer, n) + extra_prompts(tokenizer, n),
}


def prepare(
    model: Any,
    tokenizer: Any,
    min_prefix: int,
    continuation: int,
    names: Sequence[str] | None,
    prompt_set: str = "scored",
) -> list[PromptCase]:
    cases = []
    for name, ids in PROMPT_SETS[prompt_set](tokenizer, min_prefix + continuation):
        if names and name not in names:
            continue
        start = time.perf_counter()
        prefix_len = len(ids) - continuation
        kv = prompt_kv(model, ids[:prefix_len])
        exact = continuation_metrics(model, ids, prefix_len, kv)
        progress(
            f"prompt {name}: {len(ids)} tokens ({prefix_len} prefix + {continuation}), "
            f"KV {tuple(kv.shape)}, exact ppl {exact.perplexity:.3f} "
            f"({time.perf_counter() - start:.1f}s)"
        )
        cases.append(PromptCase(name, ids, prefix_len, kv, exact))
    return cases


# --------------------------------------------------------------------------- output


COLUMNS = (
    ("ratio", 7), ("K err", 8), ("V err", 8), ("ppl exact", 10), ("ppl", 9), ("d ppl", 8),
    ("top-1", 7), ("KL", 8), ("enc GB/s", 9), ("dec GB/s", 9),
)  # fmt: skip


def _header(width: int) -> str:
    return f"{'codec':<{width}}" + "".join(f" {name:>{w}}" for name, w in COLUMNS)


def _line(label: str, width: int, r: CodecRow | Cell) -> str:
    cells = (
        f"{r.ratio:.2f}x",
        f"{r.k_rel_err:.4f}",
        f"{r.v_rel_err:.4f}",
        f"{r.ppl_exact:.3f}",
        f"{r.ppl:.3f}",
        f"{r.ppl_increase:+.2%}",
        f"{r.top1_agreement:.1%}",
        f"{r.kl:.2e}",
        f"{r.encode_gbps:.2f}",
        f"{r.decode_gbps:.2f}",
    )
    return f"{label:<{width}}" + "".join(
        f" {c:>{w}}" for c, (_, w) in zip(cells, COLUMNS, strict=True)
    )


def render(report: Report, detail: bool) -> str:
    m = report.meta
    prompt_list = ", ".join(
        f"{p['name']} {p['prefix_tokens']}+{p['continuation']}" for p in m["prompts"]
    )
    width = max([5, *(len(r.label) for r in report.rows)])
    lines = [
        f"kvstore codecs on real KV: {m['model']} ({m['gguf']}), torch {m['torch_version']}, "
        f"transformers {m['transformers_version']}, {m['torch_threads']} threads",
        f"{m['platform']}; prompts (prefix + continuation tokens): {prompt_list}",
        f"KV in chunks of {m['chunk_tokens']} tokens; ratio vs fp16 bytes; err = relative "
        "Frobenius error; ppl of the continuation (exact = fp16 KV), top-1 agreement and KL "
        f"(nats/token) vs exact, mean over prompts; GB/s of fp16 KV, best of {m['repeats']}",
        "",
        _header(width),
    ]
    lines += [_line(r.label, width, r) for r in report.rows]
    if detail:
        width = max(width, *(len(f"{r.label} {c.prompt}") for r in report.rows for c in r.cells))
        lines += ["", "per prompt:", _header(width)]
        for r in report.rows:
            lines += [_line(f"{r.label} {c.prompt}", width, c) for c in r.cells]
    lines += report.notes_after
    lines += ["", "checks: " + report.meta["check_line"]]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def plot_label(spec: str) -> str:
    """A spec as a plot names it: a file parameter by the file's name alone."""
    return re.sub(r"(profile=)([^,]*/)", r"\1", spec)


def write_plot(report: Report, path: Path) -> bool:
    """Quality against size: the perplexity increase (left) and the KL divergence from the
    exact predictions (right) against the ratio, one large point per codec spec (prompt
    means) and a faint one per prompt; False when matplotlib is not installed."""

    def draw(fig: Any, axes: Any) -> None:
        left, right = axes
        panels: tuple[tuple[Any, Callable[[Any], float], str], ...] = (
            (left, lambda r: 100 * r.ppl_increase, "continuation perplexity increase, %"),
            (right, lambda r: r.kl, "KL from the exact next-token distribution, nats"),
        )
        for ax, value, ylabel in panels:
            for r in report.rows:
                label = plot_label(r.label)
                (point,) = ax.plot(r.ratio, value(r), "o", markersize=8, label=label)
                ax.plot(
                    [c.ratio for c in r.cells],
                    [value(c) for c in r.cells],
                    ".",
                    color=point.get_color(),
                    alpha=0.35,
                )
                ax.annotate(label, (r.ratio, value(r)), textcoords="offset points",
                            xytext=(6, 4), fontsize=8)  # fmt: skip
            ax.set_xlabel("compression ratio vs fp16 (higher is smaller)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        left.set_yscale("symlog", linthresh=0.1)
        left.axhline(0, color="grey", linewidth=0.8)
        right.set_yscale("symlog", linthresh=1e-4)
        right.set_ylim(bottom=0)
        left.legend(loc="upper left", fontsize=8)
        fig.suptitle(f"KV codecs on {report.meta['model']}: size vs quality (mean of prompts)")

    return save_plot(path, draw, nrows=1, ncols=2, figsize=(12, 4.8))


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="KV codecs on SmolLM2's real KV: ratio, K/V error, perplexity, top-1.",
    )
    p.add_argument(
        "--codecs",
        action="append",
        metavar="SPECS",
        help="comma-separated codec specs, e.g. int8,fp8,kivi:bits=4 (repeatable; default: "
        "every registered codec at its default levels)",
    )
    p.add_argument("--prompts", help="comma-separated prompt names (default: all)")
    p.add_argument(
        "--prompt-set",
        choices=tuple(PROMPT_SETS),
        default="scored",
        help="score the usual prompts (`_realkv.prompts`, default), the fitting ones "
        "(`_realkv.fit_prompts`: to try encoder variants without looking at the scored "
        "prompts; a profile fitted on them is then scored in sample), five more held out "
        "from both (`extra`: `_realkv.extra_prompts`), or the usual and those (`all`: twice "
        "the scored positions, for top-1 agreement)",
    )
    p.add_argument("--min-prefix", type=int, default=MIN_PREFIX, help="prefix tokens, at least")
    p.add_argument("--continuation", type=int, default=CONTINUATION, help="scored tokens")
    p.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS, help="tokens per chunk")
    p.add_argument("--repeats", type=int, default=3, help="timed encode/decode runs, best kept")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.add_argument("--detail", action="store_true", help="also print one row per prompt")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every number as JSON")
    p.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG (needs matplotlib)")
    p.add_argument(
        "--save-containers",
        type=Path,
        metavar="DIR",
        help="also write every codec's chunk containers to DIR, for --gpu-decode on a GPU "
        "machine (GPU decode where the codec has a GPU decoder, CPU rates on that host for all)",
    )
    p.add_argument(
        "--gpu-decode",
        type=Path,
        metavar="DIR",
        help="instead of the model run: GPU decode throughput of the containers saved in DIR "
        "(needs CUDA and CuPy, not the model)",
    )
    p.add_argument("--gpu-batch", default="1GiB", help="decoded bytes per GPU batch (default 1GiB)")
    p.add_argument(
        "--fit-profile",
        type=Path,
        metavar="FILE",
        help="first fit a cachegen profile on the fitting prompts (`_realkv.fit_prompts`, "
        "none of them scored) and write it to FILE, for specs with profile=FILE",
    )
    p.add_argument(
        "--fit-kv-maps",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --fit-profile: maps that also predict each layer's V from its own K (the "
        "default; `--kv-maps` of kvstore.codecs.cachegen_profile)",
    )
    return p


def profile_notes(
    codecs: Sequence[Codec], scored: Sequence[str], in_sample: bool = False
) -> list[str]:
    """A note per cachegen profile the codecs use, naming what it was fitted on; RuntimeError
    if that includes a scored prompt (the figures would not be held out), unless
    `in_sample` (the fitting prompts scored on purpose), which the note then says."""
    from kvstore.codecs.cachegen_profile import CacheGenProfile

    notes = []
    for path in sorted({str(c.params.get("profile", "")) for c in codecs} - {""}):
        profile = CacheGenProfile.load(path)
        overlap = sorted(set(profile.fitted_on) & set(scored))
        if overlap and in_sample:
            notes.append(f"profile {path} fitted on the prompts scored: figures in sample")
            continue
        if overlap:
            raise RuntimeError(f"profile {path} was fitted on scored prompts {overlap}")
        notes.append(
            f"profile {path} fitted on {', '.join(profile.fitted_on) or 'unnamed texts'}; "
            f"the scored prompts ({', '.join(scored)}) are held out"
        )
    return notes


def chosen_codecs(texts: Sequence[str] | None) -> tuple[list[tuple[str, Codec]], list[str]] | None:
    """`select_codecs`, its notes and the codecs printed; None (the reason printed) when a
    spec is bad or nothing is left to run."""
    try:
        codecs, notes = select_codecs(texts)
    except InvalidArgument as exc:
        print(f"bench_codecs: {exc}", file=sys.stderr)
        return None
    for note in notes:
        progress(note)
    if not codecs:
        print(f"bench_codecs: no codec to run (registered: {codec_names()})", file=sys.stderr)
        return None
    progress(f"codecs: {', '.join(c.spec() for _, c in codecs)}")
    return codecs, notes


def gpu_main(args: argparse.Namespace) -> int:
    from _gpu_decode import run

    if not torch.cuda.is_available():
        print("bench_codecs: --gpu-decode needs a CUDA GPU", file=sys.stderr)
        return 2
    if not args.gpu_decode.is_dir():
        print(f"bench_codecs: no directory {args.gpu_decode}", file=sys.stderr)
        return 2
    try:
        figures, table = run(args.gpu_decode, parse_size(args.gpu_batch), max(args.repeats, 5))
    except RuntimeError as exc:
        print(f"bench_codecs: check failed: {exc}", file=sys.stderr)
        return 1
    print(table)
    write_outputs(figures, args.json, None, lambda path: False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.min_prefix, args.continuation, args.chunk_tokens, args.repeats) < 1 or (
        args.threads is not None and args.threads < 1
    ):
        print("bench_codecs: sizes, --repeats and --threads must be >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu_decode:
        return gpu_main(args)
    # Specs are checked before the model loads, but a spec's profile is read when it is
    # parsed: with --fit-profile, after the fit has written it.
    chosen = None if args.fit_profile else chosen_codecs(args.codecs)
    if chosen is None and not args.fit_profile:
        return 2
    if "OMP_WAIT_POLICY" not in os.environ:
        progress(
            "hint: OMP_WAIT_POLICY is unset; on a machine shared with other work, "
            "OMP_WAIT_POLICY=PASSIVE runs the model several times faster"
        )

    start = time.perf_counter()
    try:
        model, tokenizer = load_smollm2()
    except (MissingModelDependency, FileNotFoundError) as exc:
        print(f"bench_codecs: {exc}", file=sys.stderr)
        return 2
    progress(f"loaded {smollm2_gguf().name} in {time.perf_counter() - start:.1f}s")
    if args.fit_profile:
        from kvstore.codecs.cachegen_profile import fit

        t = time.perf_counter()
        fitting = fit_prompts(tokenizer, args.min_prefix + args.continuation)
        profile = fit(
            model,
            [ids for _, ids in fitting],
            smollm2_gguf().name,
            [n for n, _ in fitting],
            kv=args.fit_kv_maps,
        )
        profile.save(args.fit_profile)
        progress(f"fitted {args.fit_profile} in {time.perf_counter() - t:.1f}s")
        chosen = chosen_codecs(args.codecs)
    if chosen is None:
        return 2
    codecs, notes = chosen
    names = [n.strip() for n in args.prompts.split(",")] if args.prompts else None
    cases = prepare(model, tokenizer, args.min_prefix, args.continuation, names, args.prompt_set)
    if not cases:
        print(f"bench_codecs: no prompt named {args.prompts}", file=sys.stderr)
        return 2

    import transformers

    try:
        used = [c for _, c in codecs]
        notes += profile_notes(used, [c.name for c in cases], args.prompt_set == "fit")
    except (InvalidArgument, RuntimeError) as exc:
        print(f"bench_codecs: {exc}", file=sys.stderr)
        return 2
    report = Report(
        meta={
            "model": "SmolLM2-135M-Instruct",
            "gguf": smollm2_gguf().name,
            "prompts": [
                {"name": c.name, "prefix_tokens": c.prefix_len, "continuation": args.continuation}
                for c in cases
            ],
            "prompt_set": args.prompt_set,
            "chunk_tokens": args.chunk_tokens,
            "repeats": args.repeats,
            "kvstore_version": kvstore.__version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "gb": "10**9 bytes",
        },
        notes=notes,
    )
    try:
        t = time.perf_counter()
        first = cases[0]
        report.check = self_check(model, first.ids, first.prefix_len)
        progress(f"self-check on {first.name} passed ({time.perf_counter() - t:.1f}s)")
        for given, codec in codecs:
            row = CodecRow(given, codec.spec(), codec.lossless)
            for case in cases:
                cell = measure(model, given, codec, case, args.chunk_tokens, args.repeats)
                row.cells.append(cell)
            report.rows.append(row)
    except (AssertionError, RuntimeError) as exc:
        print(f"bench_codecs: check failed: {exc}", file=sys.stderr)
        return 1
    if args.save_containers:
        from _gpu_decode import save_containers

        for _, codec in codecs:
            for case in cases:
                chunks = chunked(case.kv, args.chunk_tokens)
                coders = chunk_codecs(codec, len(chunks), args.chunk_tokens, chunks[0].shape)
                blobs = [c.encode(x) for c, x in zip(coders, chunks, strict=True)]
                save_containers(args.save_containers, codec, case.name, blobs, args.chunk_tokens)
        progress(f"saved the codecs' containers under {args.save_containers}")
    speeds = []
    for label, codec in codecs:
        progress(f"{label}: demotion through a store's ssd writer, LMDB, decode on one core")
        parts = [chunked(case.kv, args.chunk_tokens) for case in cases]
        chunks = [x for p in parts for x in p]
        at = [i * args.chunk_tokens for p in parts for i in range(len(p))]
        rates = demotion.rates(codec.spec(), codec, chunks, args.repeats, positions=at)
        speeds.append((label, rates))
    report.meta["cpu_rates"] = dict(speeds)
    report.notes_after = demotion.lines(speeds)
    lossless = [r.label for r in report.rows if r.lossless]
    report.meta["check_line"] = (
        f"exact KV substituted reproduces the exact run; plain forward pass ppl "
        f"{report.check['plain_forward_perplexity']:.3f} vs cached {report.check['perplexity']:.3f}"
        f"; lossless codecs bit-exact with identical ppl: {', '.join(lossless) or 'none run'}"
    )
    report.meta["seconds"] = time.perf_counter() - start
    print(render(report, args.detail))
    write_outputs(report.to_json(), args.json, args.plot, lambda path: write_plot(report, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
