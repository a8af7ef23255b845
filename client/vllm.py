"""vLLM's v1 KV connector over the store: prefix KV saved and loaded by chunk and layer.

Register it as an out-of-tree connector (vLLM's `kv_connector_module_path`):

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "kvstore.client.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"address": "unix:///run/kvstore/kvstore.sock"}}'

`address` defaults to `kvstore.client.default_address()` ($KVSTORE_SOCKET, which the Helm
chart sets). The namespace is derived from the model, its dtype, the KV cache dtype, the
block size and the parallel sizes (`namespace` in the extra config overrides it); every
key also carries the request's LoRA adapter and cache salt, and the tensor-parallel rank,
so no other model, adapter, tenant or rank reads it. Requests with multimodal inputs or
prompt embeddings are left to vLLM (token ids do not show what their KV depends on).

- **Scheduler side.** `get_num_new_matched_tokens` looks up the prompt's whole chunks of
  the server's `chunk_tokens` (a multiple of vLLM's block size) and offers those beyond
  vLLM's own prefix-cache hit, never the last prompt token. `build_connector_meta` tells
  the workers which blocks to fill from which chunks, and which chunks each step has just
  finished computing (chunked prefill included) so they are saved.
- **Worker side.** A value is one chunk of one layer: the layer's blocks for those tokens
  in vLLM's paged layout (`[blocks, kv_heads, block_size, 2 * head_size]` per layer).
  `start_load_kv` starts one `get_into` per layer into staging buffers; each layer's
  `wait_for_layer_load` waits for its copy and scatters it into the request's blocks.
  `save_kv_layer` gathers the finished chunks' blocks of that layer and hands them to
  `put_from`; `wait_for_save` waits for the step's saves. A chunk that could not be read
  (evicted meanwhile, or a failed checksum) is reported through
  `get_block_ids_with_load_errors`, and vLLM recomputes those blocks.

The store is a best-effort cache: a save that fails is logged and becomes a future miss.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvstore.client import KVClient, default_address
from kvstore.client._core import SAVE_RETRY_S
from kvstore.client._transfer import Transfer
from kvstore.errors import KVStoreError
from kvstore.keys import derived_key

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("kvstore.client.vllm")

_UNSAFE = re.compile(r"[^A-Za-z0-9._:/@=+-]")
_LAYER_INDEX = re.compile(r"(\d+)")


def vllm_namespace(vllm_config: VllmConfig) -> str:
    """`vllm/MODEL/DTYPE/kv-CACHE_DTYPE/bBLOCK/tpTP-ppPP`: what a stored value's bytes mean
    besides its tokens (the paged layout depends on the block size and the cache dtype)."""
    model = vllm_config.model_config
    name = str(getattr(model, "model", "") or "model") if model is not None else "model"
    dtype = str(getattr(model, "dtype", "auto")).removeprefix("torch.")
    cache = vllm_config.cache_config
    parallel = vllm_config.parallel_config
    ident = _UNSAFE.sub("_", name).strip("/") or "model"
    tail = (
        f"/{dtype}/kv-{cache.cache_dtype}/b{cache.block_size}"
        f"/tp{parallel.tensor_parallel_size}-pp{parallel.pipeline_parallel_size}"
    )
    return f"vllm/{ident[: 250 - len(tail)]}{tail}"


def request_salt(request: Request) -> bytes | None:
    """What a request's KV depends on besides its tokens and the model: its LoRA adapter
    and cache salt (tenant). None for a request the connector leaves alone: multimodal
    inputs and prompt embeddings change the KV in ways token ids do not show."""
    if getattr(request, "mm_features", None) or getattr(request, "prompt_embeds", None) is not None:
        return None
    lora = getattr(request, "lora_request", None)
    parts = [
        f"lora={lora.lora_name}" if lora is not None else "",
        f"salt={request.cache_salt}" if getattr(request, "cache_salt", None) else "",
    ]
    return "|".join(p for p in parts if p).encode()


def salted(keys: list[bytes], salt: bytes) -> list[bytes]:
    """Prefix keys made particular to a request's salt (unchanged for an empty one)."""
    if not salt:
        return keys
    return [derived_key(k, b"salt" + salt) for k in keys]


def layer_index(name: str) -> int:
    """The model's layer number in a layer name ("model.layers.12.self_attn.attn" -> 12):
    the same on every pipeline stage."""
    found = _LAYER_INDEX.findall(name)
    return int(found[0]) if found else 0


def layer_key(chunk_key: bytes, rank: int, layer: int) -> bytes:
    """The key of one chunk's KV for one layer on one tensor-parallel rank."""
    tag = b"vllm-layer" + rank.to_bytes(4, "little") + layer.to_bytes(4, "little")
    return derived_key(chunk_key, tag)


@dataclass
class ChunkTransfer:
    """Chunks of one request to load or save: their prefix keys, and per chunk the vLLM
    block ids it occupies (a load may skip the blocks vLLM already holds)."""

    req_id: str
    chunk_keys: list[bytes]
    block_ids: list[list[int]]
    first_block: int = 0
    """Blocks of the first chunk before this index are vLLM's own (loads leave them)."""
    newest: bool = False
    """Saves: the last chunk is the prompt's last whole one, the newest of its sequence,
    which a lossy codec on the server may code finer (`KVClient.put_from`'s `newest`)."""


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    loads: list[ChunkTransfer] = field(default_factory=list)
    saves: list[ChunkTransfer] = field(default_factory=list)


@dataclass
class _Tracked:
    """What the scheduler side keeps of a running request."""

    tokens: list[int]
    block_ids: list[int]
    saved_chunks: int  # chunks already in the store or handed to the workers to save
    salt: bytes | None  # None: a request the connector leaves alone


class KVStoreConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """A vLLM v1 KV connector storing prefix KV in a kvstore server."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.block_size = int(vllm_config.cache_config.block_size)
        namespace = str(extra.get("namespace") or vllm_namespace(vllm_config))
        self.client = KVClient(str(extra.get("address") or default_address()), namespace)
        # How long a save refused by back-pressure is tried again (wait_for_save waits).
        self.save_retry_s = float(extra.get("save_retry_seconds", SAVE_RETRY_S))
        # The server's chunk size, asked for until it answers: vLLM starts, and computes
        # everything, while kvstore is not up yet.
        self.chunk_tokens = 0
        self.blocks_per_chunk = 0
        self._unusable = False
        if self._chunking() == 0:
            log.warning("kvstore is not answering yet; requests are computed until it does")
        self.rank = _tp_rank() if role == KVConnectorRole.WORKER else 0
        names = [n for g in kv_cache_config.kv_cache_groups for n in g.layer_names]
        indices = sorted({layer_index(n) for n in names}) or [0]
        # A chunk counts as stored when its first and last layers are: LRU drops the first
        # written (layer 0) first, and the last one is written last.
        self._probe_layers = sorted({indices[0], indices[-1]})
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            log.warning(
                "kv_load_failure_policy is %r: a chunk evicted between lookup and load fails "
                'its request; set it to "recompute" so vLLM recomputes it',
                self._kv_transfer_config.kv_load_failure_policy,
            )
        # scheduler side
        self._matched: dict[str, tuple[int, int, bytes | None]] = {}  # computed, hit, salt
        self._to_load: dict[str, tuple[int, int]] = {}  # req -> (first token, end token)
        self._tracked: dict[str, _Tracked] = {}
        # worker side
        self._layers: dict[str, tuple[int, torch.Tensor]] = {}  # name -> (index, kv cache)
        self._loading: dict[
            str, tuple[Any, list[tuple[ChunkTransfer, torch.Tensor, Transfer]]]
        ] = {}
        self._saving: list[Transfer] = []
        self._load_errors: set[int] = set()
        self._indices: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def _chunking(self) -> int:
        """The server's chunk_tokens, or 0 while it cannot be used (not answering yet, or a
        chunk size vLLM's blocks do not divide, which is logged once)."""
        if self.chunk_tokens or self._unusable:
            return self.chunk_tokens
        try:
            ct = self.client.chunk_tokens
        except KVStoreError:
            return 0
        if ct % self.block_size:
            self._unusable = True
            log.error(
                "the server's chunk_tokens (%d) is not a multiple of vLLM's block size (%d): "
                "the store is not used; start kvstore-server with --chunk-tokens %d",
                ct, self.block_size, max(1, ct // self.block_size) * self.block_size,
            )  # fmt: skip
            return 0
        self.chunk_tokens, self.blocks_per_chunk = ct, ct // self.block_size
        return ct

    # ------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        tokens = list(request.prompt_token_ids or [])
        ct = self._chunking()
        salt = request_salt(request) if ct else None  # no store yet: the request is vLLM's
        self._matched[request.request_id] = (num_computed_tokens, 0, salt)
        whole = (len(tokens) - 1) // ct if ct else 0  # the last token is always computed
        if whole == 0 or salt is None:
            return 0, False
        try:
            keys = self._chunk_keys(tokens, whole, salt)
            probes = [layer_key(k, 0, layer) for layer in self._probe_layers for k in keys]
            present = self.client.exists(probes)
        except KVStoreError as exc:
            log.warning("kvstore lookup failed; computing the prompt: %s", exc)
            return 0, False
        rows = [present[i * whole : (i + 1) * whole] for i in range(len(self._probe_layers))]
        held = next((c for c in range(whole) if not all(r[c] for r in rows)), whole)
        hit = held * self.chunk_tokens
        self._matched[request.request_id] = (num_computed_tokens, hit, salt)
        return max(0, hit - num_computed_tokens), False

    def _chunk_keys(self, tokens: list[int], chunks: int, salt: bytes) -> list[bytes]:
        """The keys of the first `chunks` whole chunks of `tokens` for a request's salt."""
        return salted(self.client.prefix_keys(tokens[: chunks * self.chunk_tokens]), salt)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens > 0:
            computed = self._matched.get(request.request_id, (0, 0, None))[0]
            self._to_load[request.request_id] = (computed, computed + num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVStoreConnectorMetadata()
        if not self.chunk_tokens:  # nothing was matched, and nothing can be saved
            self._to_load.clear()
            return meta
        for new in scheduler_output.scheduled_new_reqs:
            tokens = list(new.prompt_token_ids or [])
            self._start_tracking(meta, new.req_id, tokens, list(new.block_ids[0]))
            self._add_saves(meta, new.req_id, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            running = self._tracked.get(req_id)
            if running is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                # Back from preemption: its old blocks are gone and these are all of its
                # blocks now; a load planned for it happens as for a new request.
                blocks = list(new_blocks[0]) if new_blocks is not None else []
                self._start_tracking(meta, req_id, running.tokens, blocks)
            elif new_blocks is not None:
                running.block_ids.extend(new_blocks[0])
            self._add_saves(meta, req_id, cached.num_computed_tokens[i], scheduler_output)
        for req_id in scheduler_output.finished_req_ids:
            self._tracked.pop(req_id, None)
            self._matched.pop(req_id, None)
        self._to_load.clear()
        return meta

    def _start_tracking(
        self, meta: KVStoreConnectorMetadata, req_id: str, tokens: list[int], blocks: list[int]
    ) -> None:
        """Track a request scheduled with `blocks` (all of its blocks), and plan the load
        `update_state_after_alloc` recorded for it."""
        _, hit, salt = self._matched.get(req_id, (0, 0, None))
        # Chunks the store already holds are not saved again; an unsalted request never.
        stored = hit // self.chunk_tokens if salt is not None else len(tokens)
        tracked = self._tracked[req_id] = _Tracked(tokens, blocks, stored, salt)
        span = self._to_load.pop(req_id, None)
        if span is None or salt is None:
            return
        start, end = span
        first, last = start // self.chunk_tokens, end // self.chunk_tokens
        keys = self._chunk_keys(tokens, last, salt)[first:]
        meta.loads.append(
            ChunkTransfer(
                req_id,
                keys,
                [self._chunk_blocks(blocks, c) for c in range(first, last)],
                first_block=(start % self.chunk_tokens) // self.block_size,
            )
        )
        tracked.saved_chunks = max(tracked.saved_chunks, last)

    def _add_saves(
        self, meta: KVStoreConnectorMetadata, req_id: str, computed: int, out: SchedulerOutput
    ) -> None:
        """Save the prompt chunks this step finishes computing (prefill, chunked or not)."""
        tracked = self._tracked[req_id]
        done = computed + out.num_scheduled_tokens.get(req_id, 0)
        upto = min(done, len(tracked.tokens)) // self.chunk_tokens
        if upto <= tracked.saved_chunks or tracked.salt is None:
            return
        first = tracked.saved_chunks
        keys = self._chunk_keys(tracked.tokens, upto, tracked.salt)[first:]
        blocks = [self._chunk_blocks(tracked.block_ids, c) for c in range(first, upto)]
        newest = upto == len(tracked.tokens) // self.chunk_tokens
        meta.saves.append(ChunkTransfer(req_id, keys, blocks, newest=newest))
        tracked.saved_chunks = upto

    def _chunk_blocks(self, block_ids: list[int], chunk: int) -> list[int]:
        return block_ids[chunk * self.blocks_per_chunk : (chunk + 1) * self.blocks_per_chunk]

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, Any]:
        self._tracked.pop(request.request_id, None)
        self._matched.pop(request.request_id, None)
        return False, None  # saves finish within their step: the blocks can go now

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a save lost to preemption is only a future miss

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # Loads and saves run layer by layer between attention ops: a step replayed as one
        # full CUDA graph would skip them.
        return True

    # --------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        blocks = self._kv_cache_config.num_blocks
        for name, kv in kv_caches.items():
            if kv.shape[0] != blocks:
                raise ValueError(
                    f"KVStoreConnector: layer {name} has {kv.shape[0]} blocks in its KV cache "
                    f"view, vLLM allocated {blocks}: attention kernels that split vLLM's "
                    "blocks are not supported"
                )
        self._layers = {name: (layer_index(name), kv) for name, kv in kv_caches.items()}

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._loading = {}
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVStoreConnectorMetadata) or not meta.loads:
            return
        side = None
        for name, (index, kv) in self._layers.items():
            if kv.is_cuda and side is None:  # copies beside the forward pass, layer by layer
                side = torch.cuda.Stream(kv.device)
                side.wait_stream(torch.cuda.current_stream(kv.device))
            started = []
            for load in meta.loads:
                keys = [layer_key(k, self.rank, index) for k in load.chunk_keys]
                shape = (len(keys), len(load.block_ids[0]), *kv.shape[1:])
                staging = torch.empty(shape, dtype=kv.dtype, device=kv.device)
                try:
                    transfer = self.client.get_into(keys, staging, side)
                except KVStoreError as exc:  # the server is gone, or refused: recompute
                    log.warning("kvstore load of %s failed; recomputing: %s", load.req_id, exc)
                    self._fail(load)
                    continue
                started.append((load, staging, transfer))
            event = side.record_event() if side is not None else None
            self._loading[name] = (event, started)

    def wait_for_layer_load(self, layer_name: str) -> None:
        event, started = self._loading.pop(layer_name, (None, []))
        if not started:
            return
        _, kv = self._layers[layer_name]
        if event is not None:
            torch.cuda.current_stream(kv.device).wait_event(event)
        for load, staging, transfer in started:
            try:
                found = transfer.wait()  # every byte copied and its checksum checked
            except KVStoreError as exc:
                log.warning("kvstore load of %s failed; recomputing: %s", load.req_id, exc)
                found = [False] * len(load.chunk_keys)
            for c, blocks in enumerate(load.block_ids):
                skip = load.first_block if c == 0 else 0
                if not found[c]:
                    self._load_errors.update(blocks[skip:])
                    continue
                index = _on(kv.device, blocks[skip:], self._indices)
                kv.index_copy_(0, index, staging[c, skip : len(blocks)])

    def _fail(self, load: ChunkTransfer) -> None:
        for c, blocks in enumerate(load.block_ids):
            self._load_errors.update(blocks[load.first_block if c == 0 else 0 :])

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVStoreConnectorMetadata) or not meta.saves:
            return
        index, _ = self._layers[layer_name]
        for save in meta.saves:
            keys = [layer_key(k, self.rank, index) for k in save.chunk_keys]
            values = [
                kv_layer.index_select(0, _on(kv_layer.device, blocks, self._indices))
                for blocks in save.block_ids
            ]
            newest = keys[-1:] if save.newest else []
            try:
                transfer = self.client.put_from(
                    keys, values, retry_for=self.save_retry_s, newest=newest
                )
                self._saving.append(transfer)
            except KVStoreError as exc:
                log.warning("kvstore save of %s failed: %s", save.req_id, exc)

    def wait_for_save(self) -> None:
        self._indices = {}  # the step's block-index tensors
        saving, self._saving = self._saving, []
        for transfer in saving:
            try:
                transfer.wait()
            except KVStoreError as exc:
                log.warning("a kvstore save failed (a future miss): %s", exc)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        self.client.close()


def _on(device: torch.device, blocks: list[int], cache: dict[Any, torch.Tensor]) -> torch.Tensor:
    """`blocks` as an index tensor on `device`, made once per step: a host-to-device copy
    of a fresh list would wait for the GPU in every layer."""
    key = (str(device), tuple(blocks))
    index = cache.get(key)
    if index is None:
        index = torch.tensor(blocks, dtype=torch.long)
        if device.type == "cuda":
            index = index.pin_memory().to(device, non_blocking=True)
        cache[key] = index
    return index


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # no tensor-parallel group (one GPU, or a test)
        return 0
