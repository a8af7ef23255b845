"""bench_codecs' choices that decide what a row measures: which codec codes which chunk
(the last as a store codes a sequence's newest) and when a cachegen profile's figures count
as held out (`--prompt-set`)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from kvstore.codecs import codec_from_spec
from kvstore.codecs.cachegen_profile import CacheGenProfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_codecs


def test_the_last_chunk_is_coded_as_a_store_codes_the_newest() -> None:
    main = codec_from_spec("cachegen:level=3,newest=0")
    finer = main.for_newest()
    assert finer.params["level"] == 0
    assert bench_codecs.chunk_codecs(main, 4, 256) == [main, main, main, finer]
    assert bench_codecs.chunk_codecs(main, 1, 256) == [finer]
    assert bench_codecs.chunk_codecs(main, 0, 256) == []
    plain = codec_from_spec("cachegen:level=3")
    assert bench_codecs.chunk_codecs(plain, 3, 256) == [plain, plain, plain]


def test_prompt_set_option_parses() -> None:
    for name in ("fit", "extra", "all"):
        assert bench_codecs.build_parser().parse_args(["--prompt-set", name]).prompt_set == name
    assert bench_codecs.build_parser().parse_args([]).prompt_set == "scored"


def test_the_prompt_sets_share_no_text() -> None:
    """The scored, fitting and extra prompts' texts (all but the chats, which need the
    tokenizer's template) have no passage in common: of their lines of 30 characters or
    more, a handful of boilerplate ones at most (a rule of '=', a PEP's title in two
    sections' references, a traceback's first line): what is fitted on one set is held out
    from the others."""
    import _realkv as r

    sets = {
        "scored": [r._reference_prose(), r._python_source(), r._json_document()],
        "fit": [r._fit_prose(), r._fit_code(), r._fit_json()],
        "extra": [r._more_prose(), r._more_code(), r._more_json(), r._more_csv()],
    }
    lines = {
        name: {ln.strip() for t in texts for ln in t.splitlines() if len(ln.strip()) >= 30}
        for name, texts in sets.items()
    }
    assert all(len(v) > 500 for v in lines.values())
    for a, b in (("scored", "fit"), ("scored", "extra"), ("fit", "extra")):
        assert len(lines[a] & lines[b]) <= 5, (a, b, lines[a] & lines[b])


def test_profile_fitted_on_scored_prompts_is_refused_unless_in_sample(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    CacheGenProfile(np.ones((30, 2, 3)), "m", ("fit-prose", "fit-code")).save(path)
    codec = codec_from_spec(f"cachegen:profile={path}")
    held_out = bench_codecs.profile_notes([codec], ["prose", "code"])
    assert len(held_out) == 1 and "held out" in held_out[0]
    with pytest.raises(RuntimeError, match="fitted on scored prompts"):
        bench_codecs.profile_notes([codec], ["fit-prose", "json"])
    (note,) = bench_codecs.profile_notes([codec], ["fit-prose", "json"], in_sample=True)
    assert "in sample" in note


@pytest.mark.parametrize("spec", ["zstd", "cachegen:level=1"])
def test_demotion_rates_run_the_store_and_the_codec(spec: str) -> None:
    """The CPU section's rates come from real work: a store's ssd writer copies every chunk
    through the codec (it raises if one is missing), and each rate is a positive figure."""
    import _demotion
    import torch

    g = torch.Generator().manual_seed(3)
    chunks = [torch.randn(2, 2, 64, 2, 16, generator=g).half() for _ in range(5)]
    r = _demotion.rates(spec, codec_from_spec(spec), chunks, repeats=1)
    for name in (
        "encode_pool_GBps",
        "decode_one_core_GBps",
        "demotion_GBps",
        "lmdb_write_fp16_GBps",
    ):
        assert r[name] > 0, name
    assert r["demotion_over_lmdb"] == r["demotion_GBps"] / r["lmdb_write_fp16_GBps"]
    assert 0 < r["demotion_waiting"] < 1  # it waited for the first encode, and wrote
    assert spec in "\n".join(_demotion.lines([(spec, r)]))


def test_own_token_counts_cut_each_copys_shorter_chunks_to_counts_of_their_own() -> None:
    """The GPU demotion's second workload: whole chunks repeated as they are, each shorter
    chunk cut to a prefix of itself one token shorter in each copy (never empty), so that
    its copies are shapes of their own, as prefixes' last chunks are."""
    import _demotion
    import torch

    g = torch.Generator().manual_seed(5)
    chunks = [torch.randn(2, 2, t, 2, 16, generator=g).half() for t in (8, 3, 8, 5)]
    cut = _demotion.own_token_counts(chunks, 4)
    assert len(cut) == 16
    for k in range(4):
        got = cut[4 * k : 4 * k + 4]
        assert got[0] is chunks[0] and got[2] is chunks[2]
        assert [c.shape[2] for c in (got[1], got[3])] == [max(1, 3 - k), 5 - k]
        for c, whole in ((got[1], chunks[1]), (got[3], chunks[3])):
            assert c.is_contiguous() and torch.equal(c, whole[:, :, : c.shape[2]])
    short = [c.shape[2] for c in cut[3::4]]
    assert len(set(short)) == 4  # the 5-token chunk: 5, 4, 3, 2 tokens


def test_the_gpu_demotion_lines_name_both_workloads() -> None:
    import _demotion

    row = {
        "threads": 2, "encode_pool_GBps": 0.5, "decode_one_core_GBps": 0.2,
        "demotion_GBps": 0.4, "demotion_waiting": 0.8, "lmdb_write_fp16_GBps": 8.0,
        "demotion_over_lmdb": 0.05, "gpu_demotion_GBps": 6.0, "gpu_demotion_waiting": 0.2,
        "gpu_demotion_over_lmdb": 0.75, "gpu_encode_GBps": 3.0, "gpu_encode_one_GBps": 1.0,
        "gpu_demotion_own_counts_GBps": 3.2, "gpu_demotion_own_counts_over_lmdb": 0.4,
        "gpu_demotion_own_counts_waiting": 0.66,
    }  # fmt: skip
    text = "\n".join(_demotion.lines([("cachegen-x", row)]))
    assert "demotion   6.00" in text and "0.75x" in text
    assert "a token count of their own" in text and "demotion   3.20 (0.40x" in text


def test_default_codecs_run_without_files() -> None:
    """With no --codecs every registered codec runs at its levels, except one that needs a
    profile of the model (cachegen-x and cachegen-x-zstd), which a note names instead."""
    codecs, notes = bench_codecs.select_codecs(None)
    names = {c.name for _, c in codecs}
    assert {"zstd", "kivi", "cachegen", "cachegen-zstd"} <= names
    assert not {"cachegen-x", "cachegen-x-zstd"} & names
    assert any(n.startswith("cachegen-x needs a profile") for n in notes)
    assert any(n.startswith("cachegen-x-zstd needs a profile") for n in notes)
