"""Per-head sensitivity profiles for `cachegen`: where a model's predictions tolerate error.

How much quantizing one (layer, K/V, head) moves a model's next-token distribution spans a
factor of ~1000 across SmolLM2's 180 heads (`benchmarks/NOTES-codecs.md`), and the effects
add up. A profile gives each head a resolution weight (residual spread over step, relative
to the level's), so that the bits go where the model is sensitive. It is read by the
encoder only: the steps it leads to are stored per channel in every container, so a decoder
never needs the profile and the format does not change.

- `CacheGenProfile`: the weights `[layers, 2, heads]` (K then V), the model they were
  measured on and the texts they were fitted on; `load(path)` / `save(path)` as JSON (no
  pickle), `load` failing with InvalidArgument and a clear message for any bad file.
- `measure(model, texts)`: the per-head diagonal Fisher information of a transformers
  causal LM's continuation log-likelihood with respect to its prefix KV, and the spread of
  the residuals cachegen codes, over token-id sequences; `fit(...)` turns them into a
  profile. With a step Delta_h per head, quantizing costs KL ~ F_h Delta_h^2 / 24 (F_h:
  the head's Fisher information summed over its values) and about N_h log2(spread_h /
  Delta_h) bits; for a fixed KL the fewest bits take Delta_h^2 proportional to N_h / F_h,
  that is a resolution proportional to spread_h * sqrt(F_h / N_h). The weights are those,
  over their geometric mean.

    python -m kvstore.codecs.cachegen_profile --model DIR --text a.txt --text b.txt \\
        --out smollm2.cgprofile.json
    kvstore-server ... --codec ssd=cachegen:profile=smollm2.cgprofile.json

Fit on text like what the store will hold, and never on the text a benchmark then scores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvstore.errors import InvalidArgument

FORMAT = "kvstore-cachegen-profile"
VERSION = 1
# Weights are clipped to this factor either side of their geometric mean: a head measured
# as insensitive still gets a step within reach of its values, and one measured as very
# sensitive does not take the whole budget on the strength of a few fitting prompts.
WEIGHT_RANGE = 8.0
CONTINUATION = 128  # scored tokens after each fitting prefix
# Labels drawn from the model per position (Fisher estimate). On SmolLM2, 12 instead of 4
# moved the log2 weights by 0.17 RMS (correlation 0.99): 4 is enough.
SAMPLES = 4


@dataclass(frozen=True)
class CacheGenProfile:
    """Resolution weights per (layer, K/V, head) for one model."""

    weights: np.ndarray
    """float32 `[layers, 2, heads]`: multiplies the level's resolution (spread over step)."""
    model: str = ""
    """The model measured (a name or path; informational)."""
    fitted_on: tuple[str, ...] = field(default_factory=tuple)
    """The texts the weights were fitted on (names; informational)."""

    def __post_init__(self) -> None:
        w = np.asarray(self.weights)
        if w.ndim != 3 or w.shape[1] != 2 or 0 in w.shape:
            raise InvalidArgument(
                f"cachegen profile weights must be [layers, 2, heads], got shape {w.shape}"
            )
        if not (np.isfinite(w).all() and (w > 0).all()):
            raise InvalidArgument("cachegen profile weights must be finite and positive")
        object.__setattr__(self, "weights", w.astype(np.float32))

    @property
    def layers(self) -> int:
        return int(self.weights.shape[0])

    @property
    def heads(self) -> int:
        return int(self.weights.shape[2])

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "model": self.model,
                "fitted_on": list(self.fitted_on),
                "layers": self.layers,
                "heads": self.heads,
                "weights": np.round(self.weights.astype(np.float64), 5).tolist(),
            },
            indent=1,
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CacheGenProfile:
        """The profile in the JSON file `path`; InvalidArgument naming the file and the
        problem for a missing, unreadable or malformed one."""
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgument(f"cannot read cachegen profile {path}: {exc}") from None
        try:
            return cls._from_doc(doc)
        except InvalidArgument as exc:
            raise InvalidArgument(f"bad cachegen profile {path}: {exc}") from None

    @classmethod
    def _from_doc(cls, doc: Any) -> CacheGenProfile:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise InvalidArgument(f"not a {FORMAT} file")
        if doc.get("version") != VERSION:
            raise InvalidArgument(f"version {doc.get('version')!r}; this build reads {VERSION}")
        try:
            weights = np.array(doc["weights"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise InvalidArgument(
                "weights missing or not a [layers][2][heads] number array"
            ) from None
        if weights.shape != (doc.get("layers"), 2, doc.get("heads")):
            raise InvalidArgument(
                f"weights of shape {weights.shape} for layers={doc.get('layers')!r}, "
                f"heads={doc.get('heads')!r}"
            )
        fitted = doc.get("fitted_on", [])
        if not isinstance(fitted, list) or not all(isinstance(s, str) for s in fitted):
            raise InvalidArgument("fitted_on must be a list of names")
        return cls(weights, str(doc.get("model", "")), tuple(fitted))

    def check_shape(self, layers: int, heads: int) -> None:
        """InvalidArgument unless the profile is for KV of `layers` layers, `heads` heads."""
        if (layers, heads) != (self.layers, self.heads):
            raise InvalidArgument(
                f"cachegen profile for {self.layers} layers x {self.heads} KV heads "
                f"({self.model or 'unnamed model'}) cannot code KV of {layers} x {heads}"
            )


def weights_from(fisher: np.ndarray, spread: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Resolution weights `[layers, 2, heads]` from each head's summed Fisher information,
    its residuals' spread (RMS) and its value count: spread * sqrt(fisher / values), over
    their geometric mean, clipped to `WEIGHT_RANGE` either side of it."""
    raw = spread * np.sqrt(np.maximum(fisher, 0) / np.maximum(values, 1))
    floor = raw[raw > 0].min() if (raw > 0).any() else 1.0
    raw = np.maximum(raw, floor)
    w = raw / math.exp(float(np.log(raw).mean()))
    return np.clip(w, 1 / WEIGHT_RANGE, WEIGHT_RANGE).astype(np.float32)


def residual_spread(kv: np.ndarray) -> np.ndarray:
    """`[layers, 2, heads]` RMS over each head's channels of the residuals cachegen codes
    (K: differences along the tokens; V: around the channel mean) of kv
    `[layers, 2, tokens, heads, dim]`."""
    x = kv.astype(np.float64)
    k = np.diff(x[:, 0], axis=1)
    v = x[:, 1] - x[:, 1].mean(axis=1, keepdims=True)
    return np.stack([np.sqrt((k**2).mean(axis=(1, 3))), np.sqrt((v**2).mean(axis=(1, 3)))], 1)


def measure(
    model: Any,
    sequences: Sequence[Sequence[int]],
    continuation: int = CONTINUATION,
    samples: int = SAMPLES,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fisher, spread, values), each `[layers, 2, heads]`, summed (spread: RMS-averaged)
    over `sequences` of token ids: each is split into a prefix and its last `continuation`
    tokens, and the diagonal Fisher information of the continuation's next-token
    distributions with respect to the prefix KV (K after RoPE) is estimated from the
    gradients of labels drawn from the model itself (`samples` per position; their cross
    terms vanish in expectation, so the squared gradient of the summed log-likelihood is
    unbiased)."""
    import torch
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed)
    fisher: np.ndarray | None = None
    sq = values = None
    for ids in sequences:
        if len(ids) <= continuation + 1:
            raise InvalidArgument(f"a fitting text of {len(ids)} tokens is too short")
        prefix = len(ids) - continuation
        with torch.no_grad():
            out = model(input_ids=torch.tensor([list(ids[: prefix - 1])]), use_cache=True)
        layers = [
            torch.stack((layer.keys[0], layer.values[0])) for layer in out.past_key_values.layers
        ]  # [2, heads, tokens, dim] each
        kv = torch.stack(layers).to(torch.float16).float()  # as a store holds it
        kv.requires_grad_(True)
        grads = torch.zeros_like(kv)
        inputs = torch.tensor([list(ids[prefix - 1 : -1])])
        for _ in range(samples):
            cache = DynamicCache(config=model.config)
            for i in range(kv.shape[0]):
                cache.update(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0), i)
            logits = model(input_ids=inputs, past_key_values=cache, use_cache=True).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            labels = torch.multinomial(logp.detach().exp(), 1, generator=gen)
            (g,) = torch.autograd.grad(logp.gather(1, labels).sum(), kv)
            grads += g.detach() ** 2
        # Not the first token (the attention sink): cachegen stores it exactly, and its
        # gradients, the largest, would otherwise decide the weights.
        f = (grads[:, :, :, 1:] / samples).sum(dim=(3, 4)).numpy()  # [layers, 2, heads]
        x = kv.detach().transpose(2, 3).numpy()  # [layers, 2, tokens, heads, dim]
        s = residual_spread(x)
        n = np.full(f.shape, x.shape[2] * x.shape[4], np.float64)
        fisher = f if fisher is None else fisher + f
        sq = s**2 * n if sq is None else sq + s**2 * n
        values = n if values is None else values + n
    if fisher is None or sq is None or values is None:
        raise InvalidArgument("no fitting text given")
    return fisher, np.sqrt(sq / values), values


def fit(
    model: Any,
    sequences: Sequence[Sequence[int]],
    name: str = "",
    fitted_on: Sequence[str] = (),
    samples: int = SAMPLES,
) -> CacheGenProfile:
    """A profile for `model` fitted on `sequences` of token ids (see `measure`)."""
    if samples < 1:
        raise InvalidArgument(f"samples must be >= 1, got {samples}")
    fisher, spread, values = measure(model, sequences, samples=samples)
    return CacheGenProfile(weights_from(fisher, spread, values), name, tuple(fitted_on))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kvstore.codecs.cachegen_profile",
        description="Measure a model's per-head sensitivity and write a cachegen profile.",
    )
    p.add_argument("--model", required=True, help="a transformers model directory, or a GGUF file")
    p.add_argument("--text", action="append", required=True, type=Path, help="a fitting text")
    p.add_argument("--out", required=True, type=Path, help="the profile file to write (JSON)")
    p.add_argument("--max-tokens", type=int, default=1152, help="tokens used of each text")
    p.add_argument("--samples", type=int, default=SAMPLES, help="labels drawn per position")
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(args.model)
    kwargs: dict[str, Any] = {"local_files_only": True}
    where = path
    if path.is_file():  # a GGUF file
        kwargs["gguf_file"] = path.name
        where = path.parent
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, **kwargs).float().eval()
    sequences = []
    for text in args.text:
        ids = tokenizer(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        sequences.append(list(ids)[: args.max_tokens])
    try:
        profile = fit(model, sequences, path.name, [t.name for t in args.text], args.samples)
    except InvalidArgument as exc:
        print(f"cachegen_profile: {exc}", file=sys.stderr)
        return 2
    profile.save(args.out)
    print(f"wrote {args.out}: {profile.layers} layers x 2 x {profile.heads} heads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
