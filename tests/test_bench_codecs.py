"""bench_codecs' choices that decide what a row measures: which codec codes which chunk
(`--tail-codec`) and when a cachegen profile's figures count as held out (`--prompt-set`)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from kvstore.codecs import codec_from_spec
from kvstore.codecs.cachegen_profile import CacheGenProfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_codecs


def test_tail_codec_codes_only_the_last_chunk() -> None:
    main, tail = codec_from_spec("cachegen:level=3"), codec_from_spec("cachegen:level=0")
    assert bench_codecs.chunk_codecs(main, tail, 4) == [main, main, main, tail]
    assert bench_codecs.chunk_codecs(main, tail, 1) == [tail]
    assert bench_codecs.chunk_codecs(main, None, 3) == [main, main, main]
    assert bench_codecs.chunk_codecs(main, tail, 0) == []


def test_tail_codec_option_parses() -> None:
    args = bench_codecs.build_parser().parse_args(
        ["--tail-codec", "cachegen:level=0", "--prompt-set", "fit"]
    )
    assert (args.tail_codec, args.prompt_set) == ("cachegen:level=0", "fit")
    assert bench_codecs.build_parser().parse_args([]).prompt_set == "scored"


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
