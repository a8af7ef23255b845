"""`kvstore.client.vllm.KVStoreConnector` driven by vLLM's own classes, against a real server.

vLLM's connector classes import on a CPU-only machine (scripts/setup-vllm.sh builds the
venv they run in); the scheduler side gets vLLM `Request`s and `SchedulerOutput`s, the
worker side vLLM-layout paged KV caches (`[blocks, kv_heads, block_size, 2 * head_size]`
per layer), and the connector is built by vLLM's `KVConnectorFactory` from a
`KVTransferConfig` naming it as an out-of-tree connector. Without vLLM these tests skip,
unless KVSTORE_REQUIRE_VLLM=1 (scripts/test.sh), which makes that a failure.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

try:
    import vllm  # noqa: F401
except ImportError as exc:
    if os.environ.get("KVSTORE_REQUIRE_VLLM") == "1":
        raise
    pytest.skip(f"vLLM is not installed ({exc}); scripts/setup-vllm.sh", allow_module_level=True)

from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.forward_context import create_forward_context
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
)
from vllm.v1.request import Request

from kvstore.client.vllm import KVStoreConnector, layer_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from e2e.conftest import ServerProcess

pytestmark = pytest.mark.timeout(120)

BLOCK, HEADS, HEAD, BLOCKS, CHUNK = 16, 2, 8, 64, 32
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(3)]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path / "srv", "--cpu-bytes", "64MiB", "--chunk-tokens", str(CHUNK))
    srv.start()
    yield srv
    if srv.alive():
        srv.stop()


def configs(address: str) -> tuple[Any, Any]:
    transfer = KVTransferConfig(
        kv_connector="KVStoreConnector",
        kv_connector_module_path="kvstore.client.vllm",
        kv_role="kv_both",
        kv_buffer_device="cpu",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={"address": address},
    )
    vcfg = VllmConfig(
        kv_transfer_config=transfer,
        device_config=DeviceConfig(device="cpu"),
        cache_config=CacheConfig(block_size=BLOCK),
    )
    spec = FullAttentionSpec(
        block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.float16
    )
    kcc = KVCacheConfig(
        num_blocks=BLOCKS,
        kv_cache_tensors=[
            KVCacheTensor(size=spec.page_size_bytes * BLOCKS, layers=[name], layer_stride=0,
                          block_stride=spec.page_size_bytes)
            for name in LAYERS
        ],
        kv_cache_groups=[KVCacheGroupSpec(layer_names=LAYERS, kv_cache_spec=spec)],
    )  # fmt: skip
    return vcfg, kcc


def request(req_id: str, tokens: list[int]) -> Request:
    return Request(req_id, tokens, SamplingParams(max_tokens=4), None)


def step(
    new: list[tuple[Request, list[int], int]], scheduled: dict[str, int], cached: Any = None
) -> SchedulerOutput:
    """A SchedulerOutput: new requests (request, block ids, tokens computed before)."""
    reqs = []
    for req, blocks, computed in new:
        data = NewRequestData.from_request(req, (blocks,))
        data.num_computed_tokens = computed
        reqs.append(data)
    return SchedulerOutput(
        scheduled_new_reqs=reqs,
        scheduled_cached_reqs=cached or CachedRequestData.make_empty(),
        num_scheduled_tokens=scheduled,
        total_num_scheduled_tokens=sum(scheduled.values()),
        scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={},
        finished_req_ids=set(),
        free_encoder_mm_hashes=[],
    )


class Engine:
    """The two sides of the connector as vLLM builds them, and the worker's paged caches."""

    def __init__(self, address: str, seed: int = 0) -> None:
        vcfg, kcc = configs(address)
        self.vcfg = vcfg
        self.scheduler = KVConnectorFactory.create_connector(vcfg, KVConnectorRole.SCHEDULER, kcc)
        self.worker = KVConnectorFactory.create_connector(vcfg, KVConnectorRole.WORKER, kcc)
        g = torch.Generator().manual_seed(seed)
        self.kv = {
            name: torch.randn(BLOCKS, HEADS, BLOCK, 2 * HEAD, generator=g).half() for name in LAYERS
        }
        self.worker.register_kv_caches(self.kv)

    def schedule(self, req: Request, computed: int, blocks: list[int]) -> tuple[int, Any]:
        """vLLM's scheduler calls for a new request; (external tokens, metadata)."""
        external, is_async = self.scheduler.get_num_new_matched_tokens(req, computed)
        assert is_async is False
        used = KVCacheBlocks(([KVCacheBlock(b) for b in blocks],))
        self.scheduler.update_state_after_alloc(req, used, external)
        scheduled = {req.request_id: len(req.prompt_token_ids) - computed - external}
        meta = self.scheduler.build_connector_meta(
            step([(req, blocks, computed + external)], scheduled)
        )
        return external, meta

    def run(self, meta: Any) -> set[int]:
        """One forward pass as vLLM's worker drives the connector; the blocks that failed."""
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(create_forward_context({n: None for n in LAYERS}, self.vcfg))
        for name in LAYERS:
            self.worker.wait_for_layer_load(name)
            self.worker.save_kv_layer(name, self.kv[name], None)
        self.worker.wait_for_save()
        errors = self.worker.get_block_ids_with_load_errors()
        self.worker.clear_connector_metadata()
        return errors


def stored_then_asked_again(engine: Engine, prompt: list[int], blocks: list[int]) -> Any:
    """Run request a over `prompt` (saving its 3 chunks), then schedule request b over the
    same prompt into `blocks`; b's metadata, which loads all 96 tokens."""
    _, meta = engine.schedule(request("a", prompt), 0, list(range(7)))
    engine.run(meta)
    external, meta = engine.schedule(request("b", prompt), 0, blocks)
    assert external == 96
    return meta


def test_factory_builds_the_connector_for_both_roles(server: ServerProcess) -> None:
    engine = Engine(server.address)
    assert isinstance(engine.scheduler, KVStoreConnector)
    assert isinstance(engine.worker, KVStoreConnector)
    assert engine.scheduler.blocks_per_chunk == CHUNK // BLOCK


def test_second_request_loads_the_first_ones_prefix_into_its_blocks(server: ServerProcess) -> None:
    first = Engine(server.address, seed=1)
    prompt = list(range(1000, 1100))  # 100 tokens: 3 whole chunks of 32
    external, meta = first.schedule(request("a", prompt), 0, list(range(7)))
    assert external == 0 and not meta.loads
    assert [len(s.chunk_keys) for s in meta.saves] == [3]
    assert first.run(meta) == set()
    with server.client(first.scheduler.client.namespace) as c:
        assert c.stats().entries == 3 * len(LAYERS)

    # Another engine (fresh caches) gets a prompt sharing those 96 tokens.
    second = Engine(server.address, seed=2)
    other = prompt[:96] + list(range(5000, 5024))
    blocks = list(range(20, 28))
    untouched = {n: kv.clone() for n, kv in second.kv.items()}
    external, meta = second.schedule(request("b", other), 0, blocks)
    assert external == 96
    assert [len(load.chunk_keys) for load in meta.loads] == [3] and not meta.saves
    assert second.run(meta) == set()
    for name in LAYERS:
        torch.testing.assert_close(second.kv[name][20:26], first.kv[name][0:6], rtol=0, atol=0)
        assert torch.equal(second.kv[name][26:], untouched[name][26:])  # computed by vLLM

    # A local prefix-cache hit of 48 tokens: only what lies beyond it is loaded.
    third = Engine(server.address, seed=3)
    before = {n: kv.clone() for n, kv in third.kv.items()}
    external, meta = third.schedule(request("c", other), 48, blocks)
    assert external == 48
    (load,) = meta.loads
    assert len(load.chunk_keys) == 2 and load.first_block == 1  # chunk 1 from its 2nd block
    assert third.run(meta) == set()
    for name in LAYERS:
        assert torch.equal(third.kv[name][20:23], before[name][20:23])  # vLLM's own blocks
        assert torch.equal(third.kv[name][23:26], first.kv[name][3:6])


def test_last_prompt_token_is_never_offered(server: ServerProcess) -> None:
    engine = Engine(server.address, seed=4)
    prompt = list(range(64))  # exactly two chunks
    _, meta = engine.schedule(request("a", prompt), 0, list(range(4)))
    engine.run(meta)
    external, _ = engine.schedule(request("b", prompt), 0, list(range(10, 14)))
    assert external == 32  # the second chunk holds the last token: vLLM computes it


def test_chunked_prefill_saves_each_chunk_once_it_is_computed(server: ServerProcess) -> None:
    engine = Engine(server.address, seed=5)
    req = request("a", list(range(300, 400)))
    engine.scheduler.get_num_new_matched_tokens(req, 0)
    meta = engine.scheduler.build_connector_meta(step([(req, list(range(7)), 0)], {"a": 40}))
    assert [len(s.chunk_keys) for s in meta.saves] == [1]  # 40 tokens: one whole chunk
    assert not meta.saves[0].newest  # the prompt's last whole chunk is still to come
    engine.run(meta)
    cached = CachedRequestData(
        req_ids=["a"], resumed_req_ids=set(), new_token_ids=[[]], all_token_ids={},
        new_block_ids=[None], num_computed_tokens=[40], num_output_tokens=[0],
    )  # fmt: skip
    meta = engine.scheduler.build_connector_meta(step([], {"a": 60}, cached))
    (save,) = meta.saves
    assert len(save.chunk_keys) == 2 and save.block_ids == [[2, 3], [4, 5]]
    assert save.newest  # its last chunk is the prompt's last whole one
    engine.run(meta)
    with server.client(engine.scheduler.client.namespace) as c:
        assert c.stats().entries == 3 * len(LAYERS)


def test_a_chunk_gone_before_the_load_is_reported_for_recompute(server: ServerProcess) -> None:
    engine = Engine(server.address, seed=6)
    prompt = list(range(2000, 2100))
    meta = stored_then_asked_again(engine, prompt, list(range(30, 37)))
    gone = meta.loads[0].chunk_keys[2]  # evicted between scheduling and the forward pass
    with server.client(engine.scheduler.client.namespace) as c:
        assert c.delete([layer_key(gone, 0, 1)]) == 1
    assert engine.run(meta) == {34, 35}  # the third chunk's blocks, for vLLM to recompute
    engine.scheduler.request_finished(request("b", prompt), list(range(30, 37)))


def test_requests_of_another_tenant_or_adapter_do_not_share_kv(server: ServerProcess) -> None:
    engine = Engine(server.address, seed=7)
    prompt = list(range(3000, 3100))
    tenant_a = Request("a", prompt, SamplingParams(max_tokens=4), None, cache_salt="tenant-a")
    _, meta = engine.schedule(tenant_a, 0, list(range(7)))
    engine.run(meta)
    plain = request("p", prompt)
    assert engine.scheduler.get_num_new_matched_tokens(plain, 0) == (0, False)
    tenant_b = Request("b", prompt, SamplingParams(max_tokens=4), None, cache_salt="tenant-b")
    assert engine.scheduler.get_num_new_matched_tokens(tenant_b, 0) == (0, False)
    again = Request("a2", prompt, SamplingParams(max_tokens=4), None, cache_salt="tenant-a")
    assert engine.scheduler.get_num_new_matched_tokens(again, 0) == (96, False)


def test_a_resumed_request_loads_into_its_new_blocks(server: ServerProcess) -> None:
    first = Engine(server.address, seed=8)
    prompt = list(range(4000, 4100))
    _, meta = first.schedule(request("a", prompt), 0, list(range(7)))
    first.run(meta)
    # Request b is scheduled (nothing to load yet), preempted, then resumed with a hit.
    second = Engine(server.address, seed=9)
    b = request("b", [*prompt[:96], 1, 2, 3, 4])
    _, meta = second.schedule(b, 96, list(range(10, 17)))  # vLLM had it all locally
    assert not meta.loads
    external, _ = second.scheduler.get_num_new_matched_tokens(b, 0)
    assert external == 96
    resumed = list(range(40, 47))
    second.scheduler.update_state_after_alloc(
        b, KVCacheBlocks(([KVCacheBlock(i) for i in resumed],)), external
    )
    cached = CachedRequestData(
        req_ids=["b"], resumed_req_ids={"b"}, new_token_ids=[[]], all_token_ids={},
        new_block_ids=[(resumed,)], num_computed_tokens=[96], num_output_tokens=[0],
    )  # fmt: skip
    meta = second.scheduler.build_connector_meta(step([], {"b": 4}, cached))
    (load,) = meta.loads
    assert load.block_ids == [[40, 41], [42, 43], [44, 45]] and not meta.saves
    assert second.run(meta) == set()
    for name in LAYERS:
        assert torch.equal(second.kv[name][40:46], first.kv[name][0:6])


def test_a_server_gone_mid_step_turns_into_load_errors(server: ServerProcess) -> None:
    engine = Engine(server.address, seed=10)
    meta = stored_then_asked_again(engine, list(range(6000, 6100)), list(range(20, 27)))
    server.stop()
    assert engine.run(meta) == set(range(20, 26))  # recomputed by vLLM, no exception


def test_namespace_names_what_the_bytes_depend_on(server: ServerProcess) -> None:
    engine = Engine(server.address)
    ns = engine.scheduler.client.namespace
    assert "/b16/" in ns and "/kv-auto/" in ns and ns.endswith("/tp1-pp1")
    with pytest.raises(ValueError, match="blocks"):
        engine.worker.register_kv_caches({LAYERS[0]: torch.zeros(BLOCKS * 2, HEADS, 8, 2 * HEAD)})


def test_vllm_starts_before_kvstore_and_uses_it_once_it_answers(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "late", "--cpu-bytes", "64MiB", "--chunk-tokens", str(CHUNK))
    engine = Engine(srv.address, seed=11)  # nothing listens yet
    prompt = list(range(7000, 7100))
    external, meta = engine.schedule(request("a", prompt), 0, list(range(7)))
    assert external == 0 and not meta.loads and not meta.saves
    assert engine.run(meta) == set()
    srv.start()
    try:
        _, meta = engine.schedule(request("b", prompt), 0, list(range(7)))
        assert [len(s.chunk_keys) for s in meta.saves] == [3]
        engine.run(meta)
        external, _ = engine.schedule(request("c", prompt), 0, list(range(10, 17)))
        assert external == 96
    finally:
        srv.stop()
