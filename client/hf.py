"""Hugging Face transformers on the store: prefix KV saved and restored by token prefix.

- `model_namespace(model, tp_rank=0, tp_size=1)`: the namespace (the key salt) of a model's
  KV: its identity (hub name, or a hash of its weights when it was loaded from a local
  path), a hash of its config, its dtype and its tensor-parallel place. Two models never
  read each other's KV.
- `kv_of(cache)` / `cache_of(model, kv)`: a batch-1 transformers cache (`DynamicCache`, or
  any cache whose `layers` have `keys`/`values`) to and from the store's layout
  `[layers, 2, tokens, kv_heads, head_dim]`.
- `StoreCache(model, client)`: `load(token_ids)` builds a cache from the longest stored
  prefix of whole chunks; `save(token_ids, cache)` stores the chunks the store does not
  hold yet, in the background (`put_from`: on a CUDA model the copies run on a stream
  and the commits on the client's worker); `generate(input_ids, **kwargs)` wraps
  `model.generate`: load, prefill only the rest, generate, save what was computed.

Only whole chunks (`chunk_tokens`, the server's setting) are saved: a partial last chunk's
key covers exactly its tokens, so the next turn of a conversation, which extends it, would
never match it. A load never covers the last prompt token, whose logits start generation.
Batch size 1: each sequence is its own prefix.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvstore.client._transfer import Transfer
from kvstore.client.sync import KVClient
from kvstore.errors import InvalidArgument

Model = Any  # a transformers PreTrainedModel; transformers is imported only where needed
Cache = Any  # a transformers Cache

_UNSAFE = re.compile(r"[^A-Za-z0-9._:/@=+-]")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _short_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def weights_hash(model: Model) -> str:
    """A hash of every parameter and buffer, in name order (reads all the weights once)."""
    h = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_namespace(
    model: Model, tp_rank: int = 0, tp_size: int = 1, identity: str | None = None
) -> str:
    """`IDENTITY/cfg-HASH/DTYPE/tpRANKofSIZE` for `model`'s KV.

    `identity` defaults to the model's hub name (`config._name_or_path`) when it is one, and
    to `w-` + `weights_hash(model)` when the model was loaded from a local path or built
    in memory: a path says nothing about what is in it. The config hash covers what shapes
    the KV (layers, heads, RoPE settings...), so a config change is a new namespace too.
    """
    if not 0 <= tp_rank < tp_size:
        raise InvalidArgument(f"tensor-parallel rank {tp_rank} is not in 0..{tp_size - 1}")
    config = model.config
    if identity is None:
        name = str(getattr(config, "_name_or_path", "") or "")
        looks_local = not name or name.startswith(("/", ".", "~")) or not _HUB_ID.match(name)
        identity = f"w-{weights_hash(model)}" if looks_local else name
    settings = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        settings.pop(volatile, None)
    cfg = _short_hash(json.dumps(settings, sort_keys=True, default=str).encode())
    dtype = str(model.dtype).removeprefix("torch.")
    ident = _UNSAFE.sub("_", identity).strip("/") or "model"
    if not ident[0].isalnum():
        ident = "m" + ident
    tail = f"/cfg-{cfg}/{dtype}/tp{tp_rank}of{tp_size}"
    return ident[: 255 - len(tail)] + tail


def kv_of(cache: Cache) -> torch.Tensor:
    """`[layers, 2, tokens, kv_heads, head_dim]` of a batch-1 cache (a new tensor)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        raise InvalidArgument("the cache holds no layers")
    keys = layers[0].keys
    if keys is None or keys.dim() != 4 or keys.shape[0] != 1:
        shape = None if keys is None else tuple(keys.shape)
        raise InvalidArgument(f"expected a batch-1 cache of [1, heads, tokens, dim], got {shape}")
    kv = torch.stack([torch.stack((ly.keys[0], ly.values[0])) for ly in layers])
    return kv.transpose(2, 3)


def cache_of(model: Model, kv: torch.Tensor) -> Cache:
    """A `DynamicCache` for `model` holding `kv` (`[layers, 2, tokens, heads, dim]`)."""
    from transformers import DynamicCache

    layers, kv_heads, head_dim = _kv_dims(model)
    if kv.dim() != 5 or (kv.shape[0], kv.shape[1], kv.shape[3], kv.shape[4]) != (
        layers,
        2,
        kv_heads,
        head_dim,
    ):
        raise InvalidArgument(
            f"kv of shape {tuple(kv.shape)} does not fit the model "
            f"([{layers}, 2, tokens, {kv_heads}, {head_dim}])"
        )
    cache = DynamicCache(config=model.config)
    kv = kv.to(model.device, model.dtype).transpose(2, 3)  # [layers, 2, heads, tokens, dim]
    for i in range(layers):
        cache.update(kv[i, 0][None].contiguous(), kv[i, 1][None].contiguous(), i)
    return cache


def _kv_dims(model: Model) -> tuple[int, int, int]:
    cfg = model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return int(cfg.num_hidden_layers), int(kv_heads), int(head_dim)


def _token_list(ids: Any) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise InvalidArgument(f"batch size 1 only, got input_ids of {tuple(ids.shape)}")
            ids = ids[0]
        return [int(t) for t in ids.tolist()]
    return [int(t) for t in np.asarray(ids).reshape(-1)]


@dataclass
class TurnStats:
    """What the last `generate` did with the store."""

    prompt_tokens: int = 0
    loaded_tokens: int = 0
    """Prompt tokens whose KV came from the store (not prefilled)."""
    saved_chunks: int = 0
    """Chunks handed to the store after generating (stored in the background)."""


class StoreCache:
    """Prefix KV of `model` in the store behind `client` (whose namespace should be
    `model_namespace(model)`)."""

    def __init__(self, model: Model, client: KVClient) -> None:
        self.model = model
        self.client = client
        self.last = TurnStats()
        self._pending: list[Transfer] = []
        self._lock = threading.Lock()

    def load(self, token_ids: Sequence[int] | torch.Tensor) -> tuple[Cache | None, int]:
        """(a cache of the longest stored prefix of `token_ids`, its length in tokens);
        (None, 0) when no chunk of it is stored. Waits for earlier saves first."""
        self.wait_saved()
        ids = _token_list(token_ids)
        keys = self.client.prefix_keys(ids)
        ct = self.client.chunk_tokens
        keys = keys[: len(ids) // ct]  # whole chunks: only those are ever saved
        n = self.client.lookup(keys) if keys else 0
        if n == 0:
            return None, 0
        layers, kv_heads, head_dim = _kv_dims(self.model)
        out = torch.empty(
            (n, layers, 2, ct, kv_heads, head_dim), dtype=self.model.dtype, device=self.model.device
        )
        found = self.client.get_into(keys[:n], out).wait()
        n = next((i for i, hit in enumerate(found) if not hit), n)  # evicted in between
        if n == 0:
            return None, 0
        # [chunks, layers, 2, ct, heads, dim] -> [layers, 2, chunks * ct, heads, dim]
        kv = out[:n].permute(1, 2, 0, 3, 4, 5).reshape(layers, 2, n * ct, kv_heads, head_dim)
        return cache_of(self.model, kv), n * ct

    def save(self, token_ids: Sequence[int] | torch.Tensor, cache: Cache) -> int:
        """Store the whole chunks of `cache` (the KV of `token_ids`, and possibly more) the
        store does not hold yet; returns how many were handed over. They are copied and
        committed in the background: `wait_saved()` waits for them."""
        ids = _token_list(token_ids)
        kv = kv_of(cache)
        if kv.shape[2] < len(ids):
            raise InvalidArgument(f"the cache holds {kv.shape[2]} tokens, not {len(ids)}")
        ct = self.client.chunk_tokens
        whole = len(ids) // ct
        if whole == 0:
            return 0
        keys = self.client.prefix_keys(ids[: whole * ct])
        held = self.client.lookup(keys)
        if held == len(keys):
            return 0
        values = [kv[:, :, i * ct : (i + 1) * ct].contiguous() for i in range(held, whole)]
        transfer = self.client.put_from(keys[held:], values)
        with self._lock:
            self._pending.append(transfer)
        return len(values)

    def wait_saved(self) -> None:
        """Wait for every save handed over so far; raises the first failure."""
        with self._lock:
            pending, self._pending = self._pending, []
        for transfer in pending:
            transfer.wait()

    def generate(self, input_ids: Any, **kwargs: Any) -> Any:
        """`model.generate(input_ids, **kwargs)` that skips prefilling the longest stored
        prefix and saves the KV it computed. Returns what `model.generate` returns."""
        ids = _token_list(input_ids)
        if not ids:
            raise InvalidArgument("input_ids is empty")
        if "past_key_values" in kwargs:
            raise InvalidArgument("StoreCache.generate builds the cache itself")
        cache, loaded = self.load(ids[:-1])
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
        tensor = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        out = self.model.generate(input_ids=tensor, past_key_values=cache, **kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        computed = cache.get_seq_length()
        saved = self.save(_token_list(sequences[0])[:computed], cache)
        self.last = TurnStats(prompt_tokens=len(ids), loaded_tokens=loaded, saved_chunks=saved)
        return out
