"""cachegen profiles: the file format and its refusals, the codec option (the encoder reads
the profile, decoders never need it), and the measuring tool on a tiny real transformer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cachegen import reference, rel_err, smooth_kv

from kvstore.codecs import codec_from_spec, decode, decode_header
from kvstore.codecs.cachegen import LEVELS, CacheGen
from kvstore.codecs.cachegen_profile import (
    WEIGHT_RANGE,
    CacheGenProfile,
    residual_spread,
    weights_from,
)
from kvstore.config import ConfigError, codec_rule
from kvstore.errors import InvalidArgument


def write_profile(path: Path, layers: int, heads: int, seed: int = 0) -> CacheGenProfile:
    rng = np.random.default_rng(seed)
    profile = CacheGenProfile(np.exp(rng.normal(0, 0.7, (layers, 2, heads))), "test", ("a",))
    profile.save(path)
    return profile


def test_profile_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    profile = write_profile(path, 4, 3)
    again = CacheGenProfile.load(path)
    assert np.allclose(again.weights, profile.weights, rtol=1e-4)
    assert (again.layers, again.heads, again.model, again.fitted_on) == (4, 3, "test", ("a",))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "cannot read"),
        ("{not json", "cannot read"),
        (json.dumps({"format": "other"}), "not a kvstore-cachegen-profile"),
        (json.dumps({"format": "kvstore-cachegen-profile", "version": 99}), "version 99"),
        (
            json.dumps(
                {"format": "kvstore-cachegen-profile", "version": 1, "layers": 2, "heads": 1}
            ),
            "weights missing",
        ),
        (
            json.dumps(
                {
                    "format": "kvstore-cachegen-profile",
                    "version": 1,
                    "layers": 2,
                    "heads": 1,
                    "weights": [[[1.0], [1.0]]],
                }
            ),
            "shape",
        ),
        (
            json.dumps(
                {
                    "format": "kvstore-cachegen-profile",
                    "version": 1,
                    "layers": 1,
                    "heads": 1,
                    "weights": [[[1.0], [-2.0]]],
                }
            ),
            "positive",
        ),
    ],
)
def test_bad_profile_files_are_refused_clearly(
    tmp_path: Path, content: str | None, match: str
) -> None:
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InvalidArgument, match=match):
        CacheGenProfile.load(path)
    # Through the spec, as the server's --codec rules parse it at start.
    with pytest.raises(InvalidArgument, match=match):
        codec_from_spec(f"cachegen:profile={path}")
    with pytest.raises(ConfigError, match=match):
        codec_rule(f"ssd=cachegen:level=1,profile={path}")


def test_profile_path_must_fit_a_container() -> None:
    with pytest.raises(InvalidArgument, match="profile path"):
        CacheGen(profile="a;b.json")


def test_profile_for_another_model_is_refused(tmp_path: Path) -> None:
    write_profile(tmp_path / "p.json", 3, 2)
    codec = codec_from_spec(f"cachegen:profile={tmp_path / 'p.json'}")
    with pytest.raises(InvalidArgument, match="3 layers x 2 KV heads"):
        codec.encode(smooth_kv(layers=4, heads=2))


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_kernels_follow_the_profile(tmp_path: Path, level: int) -> None:
    """The payload and decoded bits are the reference's with the profile's resolutions,
    and the container decodes after the profile file is gone."""
    path = tmp_path / "p.json"
    write_profile(path, 4, 2)
    t = smooth_kv(layers=4, tokens=37, heads=2, dim=24).to(torch.float16)
    codec = CacheGen(level=level, profile=str(path))
    want_payload, want_value = reference(t, level, 1, str(path))
    assert codec.encode_payload(t) == want_payload
    data = codec.encode(t)
    path.unlink()
    assert torch.equal(decode(data), want_value)
    # The container records no profile: it reads as any cachegen container of its payload
    # version.
    assert decode_header(data)[0].params == f"k=1;level={level};version=2"
    assert codec.spec() == f"cachegen:k=1,level={level},profile={path},version=2"
    assert CacheGen(level=level).spec() == f"cachegen:k=1,level={level},version=2"


def test_profile_moves_error_to_the_heads_it_weights_down(tmp_path: Path) -> None:
    """A head weighted 4x finer than another decodes with far less error."""
    weights = np.ones((3, 2, 2), np.float32)
    weights[:, :, 0], weights[:, :, 1] = 2.0, 0.5
    CacheGenProfile(weights).save(tmp_path / "p.json")
    t = smooth_kv(layers=3, tokens=128, heads=2).to(torch.float16)
    got = decode(codec_from_spec(f"cachegen:profile={tmp_path / 'p.json'}").encode(t))
    fine = rel_err(got[:, :, 1:, 0], t[:, :, 1:, 0])
    coarse = rel_err(got[:, :, 1:, 1], t[:, :, 1:, 1])
    assert fine * 2.5 < coarse


def test_weights_follow_sensitivity_and_spread() -> None:
    fisher = np.array([[[1.0, 100.0], [1.0, 1.0]]])
    spread = np.array([[[1.0, 1.0], [4.0, 1.0]]])
    w = weights_from(fisher, spread, np.full(fisher.shape, 10.0))
    assert abs(float(np.log(w).mean())) < 1e-5  # geometric mean 1
    assert np.isclose(w[0, 0, 1] / w[0, 0, 0], 10) and np.isclose(w[0, 1, 0] / w[0, 1, 1], 4)
    extreme = weights_from(np.array([[[1e-12, 1e12]]]), np.ones((1, 1, 2)), np.ones((1, 1, 2)))
    assert extreme.max() <= WEIGHT_RANGE and extreme.min() >= 1 / WEIGHT_RANGE


def test_residual_spread_is_what_the_codec_codes() -> None:
    x = np.zeros((1, 2, 4, 1, 2))
    x[0, 0, :, 0, 0] = [0, 1, 2, 3]  # K steps of 1 in one channel, 0 in the other
    x[0, 1, :, 0, 1] = [1, -1, 1, -1]  # V spread 1 around its mean in one channel
    s = residual_spread(x)
    assert np.allclose(s[0, :, 0], [np.sqrt(0.5), np.sqrt(0.5)])


def tiny_llama(path: Path) -> None:
    """A tiny random Llama with a word-level tokenizer, saved where the tool reads it."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[UNK]"] + [f"w{i}" for i in range(60)]
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(
        path
    )
    config = transformers.LlamaConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def test_tool_measures_a_model_and_writes_a_profile_the_codec_uses(tmp_path: Path) -> None:
    from kvstore.codecs.cachegen_profile import main

    tiny_llama(tmp_path / "model")
    rng = np.random.default_rng(0)
    text = tmp_path / "fit.txt"
    text.write_text(" ".join(f"w{i}" for i in rng.integers(0, 60, 200)))
    out = tmp_path / "p.json"
    assert main(["--model", str(tmp_path / "model"), "--text", str(text), "--out", str(out)]) == 0
    profile = CacheGenProfile.load(out)
    assert profile.weights.shape == (2, 2, 2) and profile.fitted_on == ("fit.txt",)
    assert len(np.unique(profile.weights)) > 1  # heads measured apart
    t = smooth_kv(layers=2, heads=2, dim=8, tokens=40).to(torch.float16)
    codec = codec_from_spec(f"cachegen:profile={out}")
    got = decode(codec.encode(t))
    assert rel_err(got, t) < 0.2
    # Fitted from a model: cross-layer maps of its shape, for the model's RoPE, V from K too.
    assert profile.cross is not None and profile.cross.maps.shape == (1, 32, 32)
    assert profile.cross.kv_maps is not None and profile.cross.kv_maps.shape == (2, 16, 16)
    assert json.loads(out.read_text())["version"] == 3
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "model")
    assert np.array_equal(profile.cross.inv_freq, model.model.rotary_emb.inv_freq.double().numpy())
    ids = torch.tensor([rng.integers(1, 60, 80).tolist()])
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    kv = torch.stack([torch.stack((c.keys[0], c.values[0])) for c in cache.layers])
    chunk = kv.transpose(2, 3)[:, :, 40:].contiguous().half()  # tokens 40-79 of its own KV
    at = codec.for_position(40)
    assert at.name == "cachegen-x"
    # A random model's KV is noise-like and codes badly at level 1 either way; its maps still
    # predict it better than cachegen's predictors do.
    assert rel_err(decode(at.encode(chunk)), chunk) < rel_err(decode(codec.encode(chunk)), chunk)


def test_tool_fits_weights_only_when_asked(tmp_path: Path) -> None:
    from kvstore.codecs.cachegen_profile import main

    tiny_llama(tmp_path / "model")
    text = tmp_path / "fit.txt"
    text.write_text(" ".join(f"w{i % 60}" for i in range(200)))
    out = tmp_path / "p.json"
    args = ["--model", str(tmp_path / "model"), "--text", str(text), "--out", str(out)]
    assert main([*args, "--weights-only"]) == 0
    assert CacheGenProfile.load(out).cross is None
    assert json.loads(out.read_text())["version"] == 1  # what builds before maps read
    assert main([*args, "--no-kv-maps"]) == 0  # maps builds before kv maps read
    cross = CacheGenProfile.load(out).cross
    assert cross is not None and not cross.has_kv
    assert json.loads(out.read_text())["version"] == 2


def test_tool_refuses_a_text_too_short(tmp_path: Path) -> None:
    from kvstore.codecs.cachegen_profile import main

    tiny_llama(tmp_path / "model")
    text = tmp_path / "short.txt"
    text.write_text("w1 w2 w3")
    args = ["--model", str(tmp_path / "model"), "--text", str(text), "--out", "x.json"]
    assert main(args) == 2


def test_fit_refuses_no_samples() -> None:
    from kvstore.codecs.cachegen_profile import fit

    with pytest.raises(InvalidArgument, match="samples"):
        fit(None, [[1, 2, 3]], samples=0)
