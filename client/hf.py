"""Hugging Face transformers on the store: prefix KV saved and restored by token prefix.

- `model_namespace(model, tp_rank=0, tp_size=1)`: the namespace (the key salt) of a model's
  KV: its identity (hub name, or a hash of its weights when it was loaded from a local
  path), a hash of its config, its dtype and its tensor-parallel place. Two models never
  read each other's KV.
- `kv_of(cache)` / `cache_of(model, kv)`: a batch-1 transformers cache (`DynamicCache`, or
  any cache whose `layers` have `keys`/`values`) to and from the store's layout
  `[layers, 2, tokens, kv_heads, head_dim]`.
- `StoreCache(model, client, layer_groups=4)`: `load(token_ids)` builds a cache from the
  longest stored prefix of whole chunks; `save(token_ids, cache)` stores the chunks the
  store does not hold yet, in the background (`put_from`: on a CUDA model the copies run
  on a stream and the commits on the client's worker); `generate(input_ids, **kwargs)`
  wraps `model.generate`: load, prefill only the rest, generate, save what was computed;
  `prefill(token_ids)` is the forward pass of that (for time-to-first-token).

Each chunk is stored as up to `layer_groups` values, one per contiguous group of layers
(groups of equal size, so the values share one slab size class in the server), so that
on a GPU `generate` and `prefill` overlap the load with the forward pass: group g's copy
runs on a side stream while the layers before it compute, and the first layer of group g
waits (on the GPU, not the host) for its copy's event. The copies' checksums are checked
once the pass is done; a failure discards the result and the pass runs again without the
store, so no token ever comes from unverified KV. With `layer_groups=1` a chunk is one
value under its prefix key, the layout `KVClient.put_prefix`/`get_prefix` use.

Only whole chunks (`chunk_tokens`, the server's setting) are saved: a partial last chunk's
key covers exactly its tokens, so the next turn of a conversation, which extends it, would
never match it. A load never covers the last prompt token, whose logits start generation.
Batch size 1: each sequence is its own prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvstore.client._core import SAVE_RETRY_S
from kvstore.client._transfer import Transfer
from kvstore.client.sync import KVClient
from kvstore.errors import DataLoss, InvalidArgument, KVStoreError
from kvstore.keys import derived_key

log = logging.getLogger("kvstore.client.hf")

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
        looks_local = (
            not name
            or name.startswith(("/", ".", "~"))
            or not _HUB_ID.match(name)
            or os.path.exists(name)  # a relative path ("out/checkpoint-500") looks like an id
        )
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


def kv_of(cache: Cache, layers: slice = slice(None), tokens: slice = slice(None)) -> torch.Tensor:
    """`[layers, 2, tokens, kv_heads, head_dim]` of a batch-1 cache (a new tensor), or of
    the `layers` and `tokens` slices of it: only those are copied."""
    held = _checked_layers(cache)
    kv = torch.stack(
        [torch.stack((ly.keys[0, :, tokens], ly.values[0, :, tokens])) for ly in held[layers]]
    )
    return kv.transpose(2, 3)


def _checked_layers(cache: Cache) -> list[Any]:
    """The layers of a cache the store can hold: batch 1, full attention; else a clear
    InvalidArgument."""
    from transformers.cache_utils import DynamicLayer

    layers = list(getattr(cache, "layers", None) or [])
    if not layers:
        raise InvalidArgument("the cache holds no layers")
    if any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        raise InvalidArgument(f"only full-attention caches (DynamicLayer) can be stored: {kinds}")
    keys = layers[0].keys
    if keys is None or keys.dim() != 4 or keys.shape[0] != 1:
        shape = None if keys is None else tuple(keys.shape)
        raise InvalidArgument(f"expected a batch-1 cache of [1, heads, tokens, dim], got {shape}")
    return layers


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
    # tolist() gives Python ints in one pass: int() per NumPy scalar took 3.6 ms at 16k
    # tokens, on the path to the first token.
    arr = np.asarray(ids).reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgument(f"token ids must be integers, got {arr.dtype}")
    return arr.astype(np.int64, copy=False).tolist()  # type: ignore[no-any-return]


@dataclass
class TurnStats:
    """What the last `generate` did with the store."""

    prompt_tokens: int = 0
    loaded_tokens: int = 0
    """Prompt tokens whose KV came from the store (not prefilled)."""
    saved_chunks: int = 0
    """Chunks handed to the store after generating (stored in the background)."""


def group_key(chunk_key: bytes, group: int, groups: int) -> bytes:
    """The key of layer group `group` (of `groups`) of the chunk under `chunk_key`."""
    if groups == 1:
        return chunk_key
    tag = b"layers" + group.to_bytes(2, "little") + groups.to_bytes(2, "little")
    return derived_key(chunk_key, tag)


def _set_layer(cache: Cache, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Make `k`/`v` ([1, heads, tokens, dim], contiguous) the whole content of cache layer
    `layer`: taken as they are by a plain DynamicLayer, copied in by `update` otherwise."""
    from transformers.cache_utils import DynamicLayer

    target = cache.layers[layer]
    if type(target) is DynamicLayer and not target.is_initialized:
        target.lazy_initialization(k, v)
        target.keys, target.values = k, v
    else:
        cache.update(k, v, layer)


class _Loading:
    """A prefix being copied in, layer group by layer group (see the module docstring)."""

    def __init__(self, model: Model, bounds: list[int], outs: list[torch.Tensor]) -> None:
        from transformers import DynamicCache

        self.model = model
        self.bounds = bounds
        self.outs = outs
        self.cache = DynamicCache(config=model.config)
        self.events: list[Any] = []
        self.transfers: list[Transfer] = []
        self.filled = [False] * len(outs)
        self.hooks: list[Any] = []
        self.tokens = 0
        self.ok = True

    def fill(self, group: int) -> None:
        """Lay group `group`'s copied chunks into the cache (on the current stream, after
        its copy: a GPU-side wait)."""
        if self.filled[group]:
            return
        self.filled[group] = True
        if self.events:
            torch.cuda.current_stream(self.model.device).wait_event(self.events[group])
        out = self.outs[group]  # [chunks, layers of the group, 2, ct, heads, dim]
        n, lg, _, ct, heads, dim = out.shape
        for j in range(lg):
            kv = out[:, j].permute(1, 3, 0, 2, 4).reshape(2, 1, heads, n * ct, dim)
            _set_layer(self.cache, self.bounds[group] + j, kv[0], kv[1])

    def hook_layers(self) -> bool:
        """Fill each later group just before its first decoder layer runs; False when the
        model's decoder layers cannot be found (then everything is filled now)."""
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        if layers is None or len(layers) != self.bounds[-1]:
            return False
        for g in range(1, len(self.outs)):

            def before(module: Any, args: Any, g: int = g) -> None:
                self.fill(g)

            self.hooks.append(layers[self.bounds[g]].register_forward_pre_hook(before))
        return True

    def finish(self) -> bool:
        """Unhook, fill what no forward pass reached, and check the copies: True when every
        chunk arrived and passed its checksum."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for g in range(len(self.outs)):
            self.fill(g)
        try:
            return all(all(t.wait()) for t in self.transfers)
        except DataLoss as exc:
            log.warning("a stored chunk failed its checksum; computing without it: %s", exc)
            return False
        except KVStoreError as exc:
            log.warning("loading the prefix failed; computing without it: %s", exc)
            return False


class StoreCache:
    """Prefix KV of `model` in the store behind `client` (whose namespace should be
    `model_namespace(model)`), each chunk in `layer_groups` values."""

    def __init__(
        self,
        model: Model,
        client: KVClient,
        layer_groups: int = 4,
        save_retry_s: float = SAVE_RETRY_S,
    ) -> None:
        layers, _, _ = _kv_dims(model)
        devices = {p.device for p in model.parameters()}
        if len(devices) > 1:
            raise InvalidArgument(
                f"the model is spread over {len(devices)} devices; StoreCache needs one"
            )
        if layer_groups < 1:
            raise InvalidArgument(f"layer_groups must be at least 1, got {layer_groups}")
        self.model = model
        self.client = client
        self.save_retry_s = save_retry_s  # see SAVE_RETRY_S
        # Groups of equal size: values of one size share the server's slab size class.
        self.groups = max(d for d in range(1, min(layer_groups, layers) + 1) if layers % d == 0)
        self.bounds = [g * layers // self.groups for g in range(self.groups + 1)]
        self.last = TurnStats()
        self._pending: list[Transfer] = []
        self._lock = threading.Lock()

    def _stored_chunks(self, ids: list[int]) -> tuple[list[list[bytes]], int]:
        """(keys of each layer group of each whole chunk of `ids`, how many leading chunks
        the store holds every group of)."""
        ct = self.client.chunk_tokens
        chunks = self.client.prefix_keys(ids)[: len(ids) // ct]
        keys = [[group_key(k, g, self.groups) for k in chunks] for g in range(self.groups)]
        if not chunks:
            return keys, 0
        present = np.array(self.client.exists([k for row in keys for k in row]))
        whole = present.reshape(self.groups, len(chunks)).all(axis=0)
        held = int(np.argmin(whole)) if not whole.all() else len(chunks)
        return keys, held

    @contextlib.contextmanager
    def _loading(self, ids: list[int]) -> Iterator[_Loading | None]:
        """The longest stored prefix of `ids` being copied in (None when none is stored):
        on a GPU the groups after the first are laid in as the forward pass reaches them.
        On leaving, the copies are checked; `loading.ok` says whether they all passed."""
        self.wait_saved(raise_errors=False)
        try:
            keys, n = self._stored_chunks(ids)
        except KVStoreError as exc:
            log.warning("looking up the prefix failed; computing it: %s", exc)
            n = 0
        if n == 0:
            yield None
            return
        _, kv_heads, head_dim = _kv_dims(self.model)
        ct = self.client.chunk_tokens
        dev, dtype = self.model.device, self.model.dtype
        outs = [
            torch.empty((n, hi - lo, 2, ct, kv_heads, head_dim), dtype=dtype, device=dev)
            for lo, hi in zip(self.bounds, self.bounds[1:], strict=False)
        ]
        loading = _Loading(self.model, self.bounds, outs)
        side = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        try:
            if side is not None:
                side.wait_stream(torch.cuda.current_stream(dev))  # `outs` exist first
            # Two calls: the first group alone, so its copy starts after one small lease
            # call, then the rest in one call with an event at each group's end. The host
            # time of each call delays the pass (it is bound by the host launching it); a
            # call per group cost 4-6 ms apiece at 16k tokens on the H100's host.
            loading.transfers.append(self.client.get_into(keys[0][:n], outs[0], side))
            if side is not None:
                loading.events.append(side.record_event())
            if self.groups > 1:
                rest = [k for g in range(1, self.groups) for k in keys[g][:n]]
                into = [row for g in range(1, self.groups) for row in outs[g].unbind(0)]
                marks = [n * g for g in range(1, self.groups)]
                later = self.client.get_into(rest, into, side, marks=marks)
                loading.transfers.append(later)
                if side is not None:
                    loading.events.extend(later.marks)
        except KVStoreError as exc:
            log.warning("loading the prefix failed; computing it: %s", exc)
            loading.events = []
            loading.finish()  # what did start is waited for, and its leases end
            yield None
            return
        if side is not None:
            loading.fill(0)  # layer 0 says how long the cache is: it must hold the prefix
            if not loading.hook_layers():
                loading.finish()
        else:
            loading.ok = loading.finish()
        loading.tokens = n * ct
        try:
            yield loading
        finally:
            loading.ok = loading.finish()

    def load(self, token_ids: Sequence[int] | torch.Tensor) -> tuple[Cache | None, int]:
        """(a cache of the longest stored prefix of `token_ids`, its length in tokens);
        (None, 0) when no chunk of it is stored or a chunk failed its checksum. Waits for
        earlier saves first."""
        with self._loading(_token_list(token_ids)) as loading:
            pass
        if loading is None or not loading.ok:
            return None, 0
        return loading.cache, loading.tokens

    def save(self, token_ids: Sequence[int] | torch.Tensor, cache: Cache) -> int:
        """Store the whole chunks of `cache` (the KV of `token_ids`, and possibly more) the
        store does not hold yet; returns how many were handed over. They are copied and
        committed in the background: `wait_saved()` waits for them."""
        ids = _token_list(token_ids)
        held_tokens = _checked_layers(cache)[0].keys.shape[2]
        if held_tokens < len(ids):
            raise InvalidArgument(f"the cache holds {held_tokens} tokens, not {len(ids)}")
        ct = self.client.chunk_tokens
        keys, held = self._stored_chunks(ids)
        whole = len(keys[0])
        if held == whole:
            return 0
        # Only the new chunks are copied out of the cache, one value per layer group; group
        # by group, so that a group's chunks tend to get neighbouring arena slots, which a
        # load then copies in one piece.
        todo = [(g, c) for g in range(self.groups) for c in range(held, whole)]
        values = [
            kv_of(
                cache, slice(self.bounds[g], self.bounds[g + 1]), slice(c * ct, (c + 1) * ct)
            ).contiguous()
            for g, c in todo
        ]
        # The last whole chunk is the newest of the sequence: a later, longer prompt's new
        # tokens follow it, and a lossy codec on the server may code it finer.
        newest = [keys[g][whole - 1] for g in range(self.groups)]
        transfer = self.client.put_from(
            [keys[g][c] for g, c in todo],
            values,
            retry_for=self.save_retry_s,
            newest=newest,
            positions={keys[g][c]: c * ct for g, c in todo},
        )
        with self._lock:
            self._pending.append(transfer)
        return whole - held

    def wait_saved(self, raise_errors: bool = True) -> None:
        """Wait for every save handed over so far; raises the first failure (or, with
        `raise_errors=False`, logs each: a lost save is only a future miss)."""
        with self._lock:
            pending, self._pending = self._pending, []
        failed: KVStoreError | None = None
        for transfer in pending:
            try:
                transfer.wait()
            except KVStoreError as exc:
                log.warning("saving a chunk failed (a future miss): %s", exc)
                failed = failed or exc
        if failed is not None and raise_errors:
            raise failed

    def _new_cache(self) -> Cache:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def prefill(
        self, token_ids: Sequence[int] | torch.Tensor, **kwargs: Any
    ) -> tuple[Any, Cache, int]:
        """`model(token_ids)` with the longest stored prefix (short of the last token)
        loaded instead of computed: (the model's output, the cache, tokens loaded). Pass
        `logits_to_keep=1` for only the last position's logits."""
        ids = _token_list(token_ids)
        if not ids:
            raise InvalidArgument("token_ids is empty")
        device = self.model.device
        with self._loading(ids[:-1]) as loading:
            cache = loading.cache if loading is not None else self._new_cache()
            loaded = loading.tokens if loading is not None else 0
            rest = torch.tensor([ids[loaded:]], dtype=torch.long, device=device)
            out = self.model(input_ids=rest, past_key_values=cache, use_cache=True, **kwargs)
        if loading is not None and not loading.ok:  # never answer from unverified KV
            cache, loaded = self._new_cache(), 0
            every = torch.tensor([ids], dtype=torch.long, device=device)
            out = self.model(input_ids=every, past_key_values=cache, use_cache=True, **kwargs)
        return out, cache, loaded

    def generate(self, input_ids: Any, **kwargs: Any) -> Any:
        """`model.generate(input_ids, **kwargs)` that skips prefilling the longest stored
        prefix and saves the KV it computed. Returns what `model.generate` returns."""
        ids = _token_list(input_ids)
        if not ids:
            raise InvalidArgument("input_ids is empty")
        if "past_key_values" in kwargs:
            raise InvalidArgument("StoreCache.generate builds the cache itself")
        tensor = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        # Tokens handed out while generating (a streamer, stopping criteria looking at
        # them) must not come from KV not yet verified: then the load finishes first.
        early = kwargs.get("streamer") is not None or bool(kwargs.get("stopping_criteria"))
        with self._loading(ids[:-1]) as loading:
            if loading is not None and early:
                loading.ok = loading.finish()
            usable = loading is not None and loading.ok
            cache = loading.cache if usable and loading is not None else self._new_cache()
            loaded = loading.tokens if usable and loading is not None else 0
            out = self.model.generate(input_ids=tensor, past_key_values=cache, **kwargs)
        if loaded and loading is not None and not loading.ok:  # never from unverified KV
            cache, loaded = self._new_cache(), 0
            out = self.model.generate(input_ids=tensor, past_key_values=cache, **kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        computed = cache.get_seq_length()
        try:
            saved = self.save(_token_list(sequences[0])[:computed], cache)
        except (InvalidArgument, KVStoreError) as exc:  # the output stands; only no save
            log.warning("not saving this generation's KV: %s", exc)
            saved = 0
        self.last = TurnStats(prompt_tokens=len(ids), loaded_tokens=loaded, saved_chunks=saved)
        return out
