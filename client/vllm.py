"""vLLM's v1 KV connector over the store: prefix KV saved and loaded by chunk and layer.

Register it as an out-of-tree connector (vLLM's `kv_connector_module_path`):

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "kvstore.client.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"address": "unix:///run/kvstore/kvstore.sock"}}'

`address` defaults to `kvstore.client.default_address()` ($KVSTORE_SOCKET, which the Helm
chart sets). The namespace is derived from the model, its dtype and the KV layout
(`namespace` in the extra config overrides it), and every value's key also carries the
tensor-parallel rank, so neither another model nor another rank reads it.

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

import hashlib
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
from kvstore.client._transfer import Transfer
from kvstore.errors import KVStoreError

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
    """`vllm/MODEL/DTYPE/TP-SIZE`: what a chunk's KV depends on besides its tokens."""
    model = vllm_config.model_config
    name = str(getattr(model, "model", "") or "model") if model is not None else "model"
    dtype = str(getattr(model, "dtype", "auto")).removeprefix("torch.")
    tp = vllm_config.parallel_config.tensor_parallel_size
    ident = _UNSAFE.sub("_", name).strip("/") or "model"
    return f"vllm/{ident}/{dtype}/tp{tp}"[:255]


def layer_key(chunk_key: bytes, rank: int, layer: int) -> bytes:
    """The key of one chunk's KV for one layer on one tensor-parallel rank."""
    tag = b"vllm-layer" + rank.to_bytes(4, "little") + layer.to_bytes(4, "little")
    return hashlib.blake2b(chunk_key + tag, digest_size=len(chunk_key)).digest()


@dataclass
class ChunkTransfer:
    """Chunks of one request to load or save: their prefix keys, and per chunk the vLLM
    block ids it occupies (a load may skip the blocks vLLM already holds)."""

    req_id: str
    chunk_keys: list[bytes]
    block_ids: list[list[int]]
    first_block: int = 0
    """Blocks of the first chunk before this index are vLLM's own (loads leave them)."""


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
        self.chunk_tokens = self.client.chunk_tokens
        if self.chunk_tokens % self.block_size:
            raise ValueError(
                f"the server's chunk_tokens ({self.chunk_tokens}) is not a multiple of vLLM's "
                f"block size ({self.block_size}); start kvstore-server with --chunk-tokens "
                f"{max(1, self.chunk_tokens // self.block_size) * self.block_size}"
            )
        self.blocks_per_chunk = self.chunk_tokens // self.block_size
        self.rank = _tp_rank() if role == KVConnectorRole.WORKER else 0
        # scheduler side
        self._matched: dict[str, tuple[int, int]] = {}  # req -> (computed, hit tokens)
        self._to_load: dict[str, tuple[int, int]] = {}  # req -> (first token, end token)
        self._tracked: dict[str, _Tracked] = {}
        # worker side
        self._layers: dict[str, tuple[int, torch.Tensor]] = {}  # name -> (index, kv cache)
        self._loading: dict[
            str, tuple[Any, list[tuple[ChunkTransfer, torch.Tensor, Transfer]]]
        ] = {}
        self._saving: list[Transfer] = []
        self._load_errors: set[int] = set()

    # ------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        tokens = list(request.prompt_token_ids or [])
        whole = (len(tokens) - 1) // self.chunk_tokens  # the last token is always computed
        if whole == 0:
            return 0, False
        try:
            keys = self.client.prefix_keys(tokens[: whole * self.chunk_tokens])
            # The last layer is saved last: if it is there, the chunk is whole.
            last = self._layer_count() - 1
            hit = self.client.lookup([layer_key(k, 0, last) for k in keys]) * self.chunk_tokens
        except KVStoreError as exc:
            log.warning("kvstore lookup failed; computing the prompt: %s", exc)
            return 0, False
        self._matched[request.request_id] = (num_computed_tokens, hit)
        return max(0, hit - num_computed_tokens), False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens > 0:
            computed = self._matched.get(request.request_id, (0, 0))[0]
            self._to_load[request.request_id] = (computed, computed + num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVStoreConnectorMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            tokens = list(new.prompt_token_ids or [])
            blocks = list(new.block_ids[0])
            # Chunks the store already holds are not saved again.
            stored = self._matched.get(new.req_id, (0, 0))[1] // self.chunk_tokens
            tracked = _Tracked(tokens, blocks, stored)
            self._tracked[new.req_id] = tracked
            span = self._to_load.pop(new.req_id, None)
            if span is not None:
                start, end = span
                first, last = start // self.chunk_tokens, end // self.chunk_tokens
                keys = self.client.prefix_keys(tokens[: last * self.chunk_tokens])[first:]
                meta.loads.append(
                    ChunkTransfer(
                        new.req_id,
                        keys,
                        [self._chunk_blocks(blocks, c) for c in range(first, last)],
                        first_block=(start % self.chunk_tokens) // self.block_size,
                    )
                )
                tracked.saved_chunks = max(tracked.saved_chunks, last)
            self._add_saves(meta, new.req_id, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            running = self._tracked.get(req_id)
            if running is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                running.block_ids.extend(new_blocks[0])
            self._add_saves(meta, req_id, cached.num_computed_tokens[i], scheduler_output)
        for req_id in scheduler_output.finished_req_ids:
            self._tracked.pop(req_id, None)
            self._matched.pop(req_id, None)
        self._to_load.clear()
        return meta

    def _add_saves(
        self, meta: KVStoreConnectorMetadata, req_id: str, computed: int, out: SchedulerOutput
    ) -> None:
        """Save the prompt chunks this step finishes computing (prefill, chunked or not)."""
        tracked = self._tracked[req_id]
        done = computed + out.num_scheduled_tokens.get(req_id, 0)
        upto = min(done, len(tracked.tokens)) // self.chunk_tokens
        if upto <= tracked.saved_chunks:
            return
        first = tracked.saved_chunks
        keys = self.client.prefix_keys(tracked.tokens[: upto * self.chunk_tokens])[first:]
        blocks = [self._chunk_blocks(tracked.block_ids, c) for c in range(first, upto)]
        meta.saves.append(ChunkTransfer(req_id, keys, blocks))
        tracked.saved_chunks = upto

    def _chunk_blocks(self, block_ids: list[int], chunk: int) -> list[int]:
        return block_ids[chunk * self.blocks_per_chunk : (chunk + 1) * self.blocks_per_chunk]

    def _layer_count(self) -> int:
        groups = self._kv_cache_config.kv_cache_groups
        return sum(len(g.layer_names) for g in groups)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, Any]:
        self._tracked.pop(request.request_id, None)
        self._matched.pop(request.request_id, None)
        return False, None  # saves finish within their step: the blocks can go now

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a save lost to preemption is only a future miss

    # --------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        def order(name: str) -> tuple[int, str]:
            found = _LAYER_INDEX.findall(name)
            return (int(found[0]) if found else 0, name)

        self._layers = {
            name: (i, kv_caches[name]) for i, name in enumerate(sorted(kv_caches, key=order))
        }

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVStoreConnectorMetadata) or not meta.loads:
            return
        self._loading = {}
        side = None
        for name, (index, kv) in self._layers.items():
            if kv.is_cuda and side is None:  # copies beside the forward pass, layer by layer
                side = torch.cuda.Stream(kv.device)
                side.wait_stream(torch.cuda.current_stream(kv.device))
            started = []
            for load in meta.loads:
                keys = [layer_key(k, self.rank, index) for k in load.chunk_keys]
                shape = (len(keys), self.blocks_per_chunk, *kv.shape[1:])
                staging = torch.empty(shape, dtype=kv.dtype, device=kv.device)
                transfer = self.client.get_into(keys, staging, side)
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
                index = torch.tensor(blocks[skip:], device=kv.device)
                kv.index_copy_(0, index, staging[c, skip : len(blocks)])

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
                kv_layer.index_select(0, torch.tensor(blocks, device=kv_layer.device))
                for blocks in save.block_ids
            ]
            try:
                self._saving.append(self.client.put_from(keys, values))
            except KVStoreError as exc:
                log.warning("kvstore save of %s failed: %s", save.req_id, exc)

    def wait_for_save(self) -> None:
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


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # no tensor-parallel group (one GPU, or a test)
        return 0
