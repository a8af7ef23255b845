"""cachegen-x: cross-layer maps in profiles, the exact integer prediction, the codec's round
trips and bounds, positions (given, recorded, searched), and the refusals of containers
whose maps this process does not have."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch
from cross_fixture import LayeredKV

from kvstore.codecs import ContainerError, cachegen_profile, codec_from_spec, decode, decode_header
from kvstore.codecs import cachegen_cross as cx
from kvstore.codecs.cachegen_profile import CacheGenProfile, CrossLayer, channels_of
from kvstore.errors import InvalidArgument

L, H, D = 4, 2, 16
WORLD = LayeredKV(L, H, D)


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return WORLD.profile_file(tmp_path_factory.mktemp("x") / "p.json")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_profile_with_maps_round_trips_and_refuses_damage(tmp_path: Path) -> None:
    profile = WORLD.profile()
    path = tmp_path / "p.json"
    profile.save(path)
    again = CacheGenProfile.load(path)
    assert again.cross is not None and profile.cross is not None
    assert again.cross.digest == profile.cross.digest
    assert np.array_equal(again.cross.maps, profile.cross.maps)
    doc = json.loads(path.read_text())
    assert doc["version"] == 2
    doc["cross"]["out_exp"][0][0] += 1  # what a decoder uses, changed: the digest says so
    path.write_text(json.dumps(doc))
    with pytest.raises(InvalidArgument, match="digest"):
        CacheGenProfile.load(path)
    doc["cross"]["maps_zstd_base64"] = "not base64!"
    path.write_text(json.dumps(doc))
    with pytest.raises(InvalidArgument, match="malformed"):
        CacheGenProfile.load(path)


def _refusing_int_mm(*_: object) -> None:
    raise RuntimeError("_int_mm: not implemented for this CPU")


def _wrong_int_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape[0], w.shape[1], dtype=torch.int32)


def _slow_int_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    time.sleep(0.01)  # a reference loop on a CPU without VNNI or AMX
    return (x.long() @ w.long()).int()


def _float64_only(mm: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def checked(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        assert a.dtype == b.dtype == torch.float64, "a float32 GEMM where it is not exact"
        return mm(a, b)

    return checked


@pytest.mark.parametrize(
    ("int_mm", "ways"),
    [
        ("torch's", {"int_mm", "float32", "float64"}),
        ("missing", {"float32", "float64"}),
        ("refusing", {"float32", "float64"}),
        ("wrong", {"float32", "float64"}),
        ("slow", {"float32", "float64"}),
    ],
)
def test_the_int8_way_is_an_exact_one_and_the_fastest(
    int_mm: str, ways: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host's way of summing 8-bit products is chosen among the exact ones by timing:
    an `_int_mm` that is missing, refuses the CPU or answers wrong is never taken, nor one
    slower than a float32 GEMM (oneDNN's reference loop on a CPU without VNNI or AMX)."""
    fake = {"missing": None, "refusing": _refusing_int_mm, "wrong": _wrong_int_mm}
    fake["slow"] = _slow_int_mm
    if int_mm in fake:
        monkeypatch.setattr(cachegen_profile, "_INT_MM", fake[int_mm])
    monkeypatch.setattr(cachegen_profile, "_WAY", None)
    way = cachegen_profile._int8_way()
    assert way in ways
    assert cachegen_profile._int8_way() == way  # chosen once


@pytest.mark.parametrize(
    ("bits", "way"),
    [(8, "int_mm"), (8, "float32"), (8, "float32 inexact"), (8, "float64"), (16, "")],
)
def test_prediction_is_the_exact_integer_product(
    bits: int, way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prediction is the integer product to the bit, whatever computes it: for 8-bit
    maps torch's int8 GEMM, a float32 GEMM (where no partial sum can pass 2^24; float64
    for maps where one could) or a float64 one; float64 (integers below 2^53) for 16-bit
    ones. The same prediction on any machine: the decoders' agreement rests on it."""
    if way == "int_mm" and cachegen_profile._INT_MM is None:
        pytest.skip("this torch has no _int_mm")
    monkeypatch.setattr(cachegen_profile, "_WAY", way.split(" ")[0] or None)
    cross = WORLD.profile(bits=bits).cross
    assert cross is not None and cross.map_bits == bits
    if way == "float32 inexact":  # maps whose columns could pass 2^24 in float32
        monkeypatch.setitem(cross.__dict__, "_f32_exact", np.zeros_like(cross._f32_exact))
        monkeypatch.setattr(torch, "mm", _float64_only(torch.mm))
    limit = {8: 127, 16: 32767}[bits]
    assert cross.input_limit == limit
    assert np.abs(cross.maps.astype(np.int64)).max() <= limit
    rng = np.random.default_rng(1)
    below = rng.normal(0, 3, (37, cross.channels)) * 10.0 ** rng.integers(-3, 3, cross.channels)
    below = below.astype(np.float32)
    below[0, :4] = [1e30, -1e30, 0.0, -0.0]  # clipped, and zeros
    for layer in range(1, cross.layers):
        got = cross.predict(below, layer)
        scale = np.ldexp(np.float32(1), cross.in_exp[layer - 1].astype(np.int32))
        xi = np.clip(np.rint(below * scale), -limit, limit).astype(np.int64)
        assert (np.abs(xi) == limit).sum() >= 2  # the clip is exercised
        acc = xi @ cross.maps[layer - 1].astype(np.int64)  # exact integers
        want = acc.astype(np.float64) * np.ldexp(1.0, -cross.out_exp[layer - 1].astype(np.int32))
        assert np.array_equal(got, want.astype(np.float32))


def test_sixteen_bit_maps_still_load_and_decode(tmp_path: Path) -> None:
    """A profile document as written before 8-bit maps (no `map_bits`) loads as 16-bit
    maps with the digest its containers name, and codes and decodes as it did: a container
    coded with it decodes to the value its checksum names. Both are kept files, the profile
    too: a fit's maps differ in a few entries from CPU to CPU (BLAS's summation order), so
    a profile fitted here would not be the one the container names."""
    data = Path(__file__).parent / "data"
    path = tmp_path / "p16.json"
    path.write_bytes((data / "cachegen-x-maps16.json").read_bytes())
    doc = json.loads(path.read_text())
    assert "map_bits" not in doc["cross"]
    profile = CacheGenProfile.load(path)
    assert profile.cross is not None
    cachegen_profile.register_cross(profile.cross)
    t = WORLD.tensor(40, 300, seed=7)
    got = decode((data / "cachegen-x-maps16.kvc").read_bytes())  # checks its checksum
    assert got.shape == t.shape and rel_err(got, t) < 0.05
    assert profile.cross is not None and profile.cross.map_bits == 16
    assert profile.cross.maps.dtype == np.int16
    assert profile.cross.digest == doc["cross"]["digest"]
    eight = WORLD.profile()
    assert eight.cross is not None and eight.cross.digest != profile.cross.digest
    t = WORLD.tensor(64, 300, seed=3)
    blob = codec_from_spec(f"cachegen-x:profile={path}").for_position(300).encode(t)
    assert rel_err(decode(blob), t) < 0.05
    doc["cross"]["map_bits"] = 12
    path.write_text(json.dumps(doc))
    with pytest.raises(InvalidArgument, match="map_bits"):
        CacheGenProfile.load(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_is_bounded_and_matches_the_encoders_value(
    profile_path: Path, dtype: torch.dtype
) -> None:
    t = WORLD.tensor(200, 700, seed=5, dtype=dtype)
    codec = codec_from_spec(f"cachegen-x:level=1,profile={profile_path}").for_position(700)
    payload, back = codec.encode_with_value(t)
    data = codec.encode(t)
    got = decode(data)
    assert got.dtype == dtype and got.shape == t.shape
    assert torch.equal(got, back)  # the decoder's value, computed by the encoder
    assert torch.equal(decode(data), got)
    # Every channel (K before RoPE) within half its head's step of the original, or exact
    # to float16 where escaped; RoPE and the dtype's rounding add a little.
    x = channels_of(t.double().numpy(), WORLD.inv_freq, 1.0, 700)
    y = channels_of(got.double().numpy(), WORLD.inv_freq, 1.0, 700)
    err = np.abs(x - y).reshape(L, 200, 2, H, D).max(axis=(1, 4))  # [layers, 2, heads]
    steps = np.frombuffer(bytes(payload), np.uint8, offset=8 + 4 + 2 * L * 2 * H * D)
    steps = steps[: 2 * L * 2 * H].view("<f2").astype(np.float64).reshape(L, 2, H)
    slack = 1e-2 * np.abs(x).reshape(L, 200, 2, H, D).max(axis=(1, 4))
    assert (err <= steps / 2 + slack).all()
    assert rel_err(got, t) < 0.05


@pytest.fixture(scope="module")
def cross_points(profile_path: Path) -> list[tuple[int, float]]:
    """(size, error) of cachegen-x at each level on KV of the structure its maps capture."""
    t = WORLD.tensor(256, 512, seed=6)
    points = []
    for level in cx.CROSS_LEVELS:
        data = codec_from_spec(f"cachegen-x:level={level},profile={profile_path}")
        data = data.for_position(512).encode(t)
        points.append((len(data), rel_err(decode(data), t)))
    return points


@pytest.mark.parametrize("level", [1, 2, 3])
def test_cross_layer_beats_cachegen_where_layers_predict_each_other(
    cross_points: list[tuple[int, float]], level: int
) -> None:
    """On KV with the structure the maps capture, some level of cachegen-x is both smaller
    than cachegen at `level` and decodes closer to the original."""
    t = WORLD.tensor(256, 512, seed=6)
    plain = codec_from_spec(f"cachegen:level={level}").encode(t)
    size, err = len(plain), rel_err(decode(plain), t)
    assert any(s < 0.95 * size and e < err for s, e in cross_points), (size, err, cross_points)


def test_the_position_is_recorded_and_searched(profile_path: Path) -> None:
    t = WORLD.tensor(64, 1000, seed=7)
    codec = codec_from_spec(f"cachegen-x:profile={profile_path}")
    assert cx.find_position(codec.cross, t.float().numpy()) == 1000
    searched = codec.encode(t)  # no position given: the encoder finds it
    assert codec.encode_payload(t) == codec.for_position(1000).encode_payload(t)
    wrong = codec.for_position(3).encode(t)  # a wrong one still decodes right, larger
    assert len(wrong) > len(searched)
    assert rel_err(decode(wrong), t) < 0.1
    _, at = decode_header(searched)
    assert int.from_bytes(searched[at : at + 8], "little") == 1000


def test_cachegen_hands_positioned_values_to_cachegen_x(profile_path: Path, tmp_path: Path) -> None:
    codec = codec_from_spec(f"cachegen:level=2,newest=0,profile={profile_path}")
    at = codec.for_position(256)
    assert at.name == "cachegen-x" and at.params["level"] == 2 and at.params["position"] == 256
    assert codec.for_newest().for_position(0).params["level"] == 0
    assert at.for_newest().params["level"] == 0 and at.for_newest().params["position"] == 256
    default = codec_from_spec(f"cachegen-x:profile={profile_path}").for_position(9)
    finer = default.for_newest()  # by default the newest chunk one level finer
    assert (default.params["level"], finer.params["level"], finer.params["position"]) == (1, 0, 9)
    assert finer.for_newest() is finer
    assert default.for_position(10).for_newest().params["position"] == 10
    header, _ = decode_header(at.encode(WORLD.tensor(32, 256)))
    assert header.codec == cx.CacheGenX.codec_id
    assert f"maps={at.params['maps']}" in header.params and "position" not in header.params
    plain = CacheGenProfile(np.ones((L, 2, H)))  # no maps: cachegen codes it itself
    plain.save(tmp_path / "w.json")
    weights_only = codec_from_spec(f"cachegen:profile={tmp_path / 'w.json'}")
    assert weights_only.for_position(256) is weights_only


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [0, 1, 33, 200])
def test_zstd_frames_decode_to_the_bits_of_the_rans_streams(
    profile_path: Path, dtype: torch.dtype, tokens: int
) -> None:
    """cachegen-x-zstd is cachegen-x's quantizer with zstd frames: the same decoded value
    to the bit, in its own containers, decoded on the host only."""
    t = WORLD.tensor(tokens, 700, seed=5, dtype=dtype)
    streams = codec_from_spec(f"cachegen-x:level=1,profile={profile_path}").for_position(700)
    frames = codec_from_spec(f"cachegen-x-zstd:level=1,profile={profile_path}").for_position(700)
    data = frames.encode(t)
    header, _ = decode_header(data)
    assert header.codec == cx.CacheGenXZstd.codec_id
    got = decode(data)
    assert got.dtype == dtype and got.shape == t.shape
    assert torch.equal(got, decode(streams.encode(t)))
    _, back = frames.encode_with_value(t)
    assert torch.equal(got, back)
    assert frames.gpu_decoder() is None and streams.gpu_decoder() is not None


def test_cachegen_zstd_hands_positioned_values_to_cachegen_x_zstd(profile_path: Path) -> None:
    codec = codec_from_spec(f"cachegen-zstd:level=2,newest=0,profile={profile_path}")
    at = codec.for_position(256)
    assert at.name == "cachegen-x-zstd" and at.params["level"] == 2
    assert at.for_newest().name == "cachegen-x-zstd" and at.for_newest().params["level"] == 0
    assert at.for_newest().params["position"] == 256
    t = WORLD.tensor(32, 256)
    assert torch.equal(decode(at.encode(t)), decode(codec_from_spec(
        f"cachegen:level=2,profile={profile_path}").for_position(256).encode(t)))  # fmt: skip


def test_the_gpu_encoder_refuses_what_it_cannot_code_before_any_gpu_work(
    profile_path: Path, kv_profiles: tuple[Path, Path]
) -> None:
    """The refusals `encode_x_many_on_gpu` makes before it needs a GPU (so they hold on
    any machine): a codec that does not encode there (cachegen-x-zstd's frames), codecs of
    two profiles' maps in one batch, a codec count unlike the values', KV its maps are not
    for (named by index); no values, nothing done."""
    from kvstore.codecs.base import ValuesRefused
    from kvstore.kernels.cachegen_cross_encode import encode_x_many_on_gpu

    x = codec_from_spec(f"cachegen-x:profile={profile_path}").for_position(0)
    assert x.gpu_encoder() is encode_x_many_on_gpu
    t = WORLD.tensor(16)
    framed = codec_from_spec(f"cachegen-x-zstd:profile={profile_path}").for_position(0)
    assert framed.gpu_encoder() is None
    with pytest.raises(InvalidArgument, match="cachegen-x-zstd does not encode on the GPU"):
        encode_x_many_on_gpu(framed, [t])
    other = codec_from_spec(f"cachegen-x:profile={kv_profiles[0]}").for_position(0)
    with pytest.raises(InvalidArgument, match="one profile's maps at a time"):
        encode_x_many_on_gpu([x, other], [t, KV_WORLD.tensor(16)])
    with pytest.raises(InvalidArgument, match="1 codecs for 2 values"):
        encode_x_many_on_gpu([x], [t, t])
    with pytest.raises(ValuesRefused, match=r"value 1: .*KV heads") as got:
        encode_x_many_on_gpu(x, [t, t[:, :, :, :1].contiguous()])
    assert got.value.indexes == [1]
    assert encode_x_many_on_gpu(x, []) == []


def test_the_gpu_encoders_idle_plans_keep_the_most_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU encoder keeps a batch shape's buffers and graph (a plan) for the next batch
    of that shape; past _IDLE_PLANS idle ones or _IDLE_PLAN_BYTES, one of the key with the
    fewest batches goes (the longest idle of those), so the shapes of prefixes' last
    chunks, a batch each, do not push out those full batches use; a plan taken is the
    caller's alone, and release drops them."""
    import collections
    import types

    import kvstore.kernels.cachegen_cross_encode as xe

    monkeypatch.setattr(xe, "_idle", collections.OrderedDict())
    monkeypatch.setattr(xe, "_batches", collections.Counter())
    monkeypatch.setattr(xe, "_IDLE_PLANS", 4)
    size = 100 << 20
    monkeypatch.setattr(xe, "_IDLE_PLAN_BYTES", 4 * size)
    made: list[object] = []

    def plan(key: tuple[object, ...]) -> object:
        def make() -> object:
            made.append(types.SimpleNamespace(key=key, nbytes=size))
            return made[-1]

        return xe._take_plan(key, make)  # type: ignore[arg-type]

    full = (0, "maps", 1, (30, 2, 256, 3, 64), 32, 11)
    a, b = plan(full), plan(full)  # two batches side by side: two plans
    assert a is not b
    xe._give_plan(a)  # type: ignore[arg-type]
    xe._give_plan(b)  # type: ignore[arg-type]
    for _ in range(3):
        got = plan(full)
        assert got in (a, b)
        xe._give_plan(got)  # type: ignore[arg-type]
    tails = [(0, "maps", 1, (30, 2, tokens, 3, 64), 32, 1) for tokens in (79, 234, 238, 101)]
    for key in tails:
        xe._give_plan(plan(key))  # type: ignore[arg-type]
    idle = [p for plans in xe._idle.values() for p in plans]
    assert len(idle) == xe._IDLE_PLANS and a in idle and b in idle
    assert [p.key[3][2] for p in idle if p not in (a, b)] == [238, 101]  # type: ignore[attr-defined]
    assert len(made) == 6
    # Past the bytes, too: the least used go until the rest fit.
    monkeypatch.setattr(xe, "_IDLE_PLAN_BYTES", 3 * size)
    xe._give_plan(plan((0, "maps", 1, (30, 2, 55, 3, 64), 32, 1)))  # type: ignore[arg-type]
    idle = [p for plans in xe._idle.values() for p in plans]
    assert len(idle) == 3 and a in idle and b in idle and made[-1] in idle
    xe._drop_plans(1)  # another GPU's: none of these
    assert len([p for plans in xe._idle.values() for p in plans]) == 3
    xe._drop_plans(0)
    assert not xe._idle and not xe._batches


def test_containers_need_their_maps(profile_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = (
        codec_from_spec(f"cachegen-x:profile={profile_path}")
        .for_position(0)
        .encode(WORLD.tensor(16))
    )
    monkeypatch.setattr(cachegen_profile, "_registry", {})  # a process without the profile
    with pytest.raises(ContainerError, match="not loaded in this process"):
        decode(data)
    with pytest.raises(InvalidArgument, match="needs a profile"):
        codec_from_spec("cachegen-x")


def test_shapes_and_values_it_cannot_take_are_refused(profile_path: Path, tmp_path: Path) -> None:
    codec = codec_from_spec(f"cachegen-x:profile={profile_path}").for_position(0)
    with pytest.raises(InvalidArgument, match=r"maps \w+ are for 4 layers x 2 KV heads x 16"):
        codec.encode(torch.zeros(4, 2, 8, 3, 16, dtype=torch.float16))
    bad = WORLD.tensor(8)
    bad[1, 1, 3, 0, 0] = float("inf")
    with pytest.raises(InvalidArgument, match="finite"):
        codec.encode(bad)
    searched = codec_from_spec(f"cachegen-x:profile={profile_path}")  # no position given
    with pytest.raises(InvalidArgument, match="finite"):
        searched.encode(bad)
    bad = WORLD.tensor(8)
    bad[0, 0, 5, 1, 2] = float("nan")  # in K
    with pytest.raises(InvalidArgument, match="finite"):
        codec.encode(bad)
    big = WORLD.tensor(8)
    big[2, 0, 3] = 60000.0  # within float16, but some of K's pairs rotated back are not
    with pytest.raises(InvalidArgument, match="RoPE undone"):
        codec.encode(big)
    with pytest.raises(InvalidArgument, match="position"):
        codec.for_position(-1)
    plain = CacheGenProfile(np.ones((L, 2, H)))
    plain.save(tmp_path / "w.json")
    with pytest.raises(InvalidArgument, match="no cross-layer maps"):
        codec_from_spec(f"cachegen-x:profile={tmp_path / 'w.json'}")


@pytest.mark.parametrize("tokens", [0, 1, 2, 33])
def test_short_chunks_round_trip(profile_path: Path, tokens: int) -> None:
    t = WORLD.tensor(tokens, 5)
    codec = codec_from_spec(f"cachegen-x:profile={profile_path}").for_position(5)
    _, back = codec.encode_with_value(t)
    got = decode(codec.encode(t))
    assert torch.equal(got, back) and got.shape == t.shape
    if tokens:
        assert rel_err(got, t) < 0.05


def test_a_container_says_which_maps_it_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients with a GPU ask for cachegen-x values encoded; a container whose maps this
    process has not loaded is refused with their digest (`MissingContext.maps`), which a
    client fetches from its server (tests/e2e/test_client_maps.py)."""
    from kvstore.codecs import cachegen_profile as cp
    from kvstore.codecs.base import codec_by_id, gpu_decodable_codecs
    from kvstore.codecs.container import MissingContext

    assert cx.CacheGenX.codec_id in gpu_decodable_codecs()
    world = LayeredKV(3, 2, 16, seed=9)
    cross = world.profile().cross
    assert cross is not None
    monkeypatch.setattr(cp, "_registry", {})
    with pytest.raises(MissingContext, match="not loaded") as info:
        codec_by_id(cx.CacheGenX.codec_id, {"maps": cross.digest})
    assert info.value.maps == cross.digest
    cp.register_cross(cross)
    assert codec_by_id(cx.CacheGenX.codec_id, {"maps": cross.digest}).cross is cross


def test_rope_tables_are_kept_read_only_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoders share the cos / sin tables of a position (prefix chunks sit at the same few):
    the same arrays again, read-only, equal to fresh ones; the oldest dropped past the bound."""
    import collections

    cross = LayeredKV(2, 1, 16, seed=3).profile().cross
    assert cross is not None
    monkeypatch.setattr(cx, "_tables", collections.OrderedDict())
    monkeypatch.setattr(cx, "_TABLES_KEPT", 4)
    cos, sin = cx.rope_tables(cross, 256, 7)
    again = cx.rope_tables(cross, 256, 7)
    assert again[0] is cos and again[1] is sin
    assert not cos.flags.writeable and not sin.flags.writeable
    ang = cp_angles(cross, 256, 7)
    assert np.array_equal(cos, cx.rounded_f32(np.cos, mpmath.cos, ang, cross.rope_scale))
    assert np.array_equal(sin, cx.rounded_f32(np.sin, mpmath.sin, ang, cross.rope_scale))
    for p in range(10):
        cx.rope_tables(cross, p, 7)
    assert len(cx._tables) == 4 and (cross.digest, 256, 7) not in cx._tables


def _past_the_tie(fn):  # type: ignore[no-untyped-def]
    """`fn` as a CPU might have it an ulp or two off: each value just past the float32 tie
    next to it, on the side of the other float32."""

    def skewed(a: np.ndarray) -> np.ndarray:
        v = fn(a)
        f = v.astype(np.float32)
        other = np.nextafter(f, np.where(v > f, np.float32(np.inf), np.float32(-np.inf)))
        mid = (f.astype(np.float64) + other.astype(np.float64)) / 2
        return np.nextafter(mid, other.astype(np.float64))

    return skewed


@pytest.mark.parametrize(("fn", "exact"), [(np.cos, mpmath.cos), (np.sin, mpmath.sin)])
def test_rope_table_entries_are_the_nearest_float32_on_any_cpu(fn, exact) -> None:  # type: ignore[no-untyped-def]
    """Each table entry is the float32 nearest the true value: a CPU whose float64 cos or
    sin lands on the other side of a float32 tie (an ulp off) still makes the encoder's
    table, so its decodes give the encoder's bits."""
    rng = np.random.default_rng(3)
    ang = rng.uniform(0, 3e4, (32, 8))
    want = cx.rounded_f32(fn, exact, ang, 1.0)
    with mpmath.workprec(160):
        for i, j in zip(range(32), rng.integers(0, 8, 32), strict=True):
            true = exact(mpmath.mpf(float(ang[i, j])))
            w = want[i, j]
            for neighbour in (np.nextafter(w, np.float32(-2)), np.nextafter(w, np.float32(2))):
                assert abs(true - float(w)) <= abs(true - float(neighbour))
    skewed = _past_the_tie(fn)
    assert (skewed(ang).astype(np.float32) != want).all()  # rounded as it comes, every entry is off
    assert np.array_equal(cx.rounded_f32(skewed, exact, ang, 1.0), want)


def cp_angles(cross, position: int, tokens: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    from kvstore.codecs.cachegen_profile import rope_angles

    return rope_angles(cross.inv_freq, position, tokens)


# ------------------------------------------------------------------ V from its layer's K

KV_WORLD = LayeredKV(L, H, D, seed=4, v_from_k=0.8)  # V mostly a map of its layer's K


@pytest.fixture(scope="module")
def kv_profiles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Profiles of KV_WORLD without and with `kv_maps`, fitted on the same samples."""
    d = tmp_path_factory.mktemp("kv")
    return KV_WORLD.profile_file(d / "plain.json"), KV_WORLD.profile_file(d / "kv.json", kv=True)


def test_kv_maps_travel_in_version_3_profiles_and_maps_documents(
    kv_profiles: tuple[Path, Path], tmp_path: Path
) -> None:
    plain_path, kv_path = kv_profiles
    plain, kv = CacheGenProfile.load(plain_path).cross, CacheGenProfile.load(kv_path).cross
    assert plain is not None and kv is not None
    assert not plain.has_kv and kv.has_kv and kv.kv_maps is not None
    assert json.loads(plain_path.read_text())["version"] == 2  # unchanged for plain maps
    doc = json.loads(kv_path.read_text())
    assert doc["version"] == 3 and kv.digest != plain.digest
    # The document a server's Maps RPC sends clients carries them.
    sent = cachegen_profile.maps_from_document(cachegen_profile.maps_document(kv), kv.digest)
    assert sent.kv_maps is not None and np.array_equal(sent.kv_maps, kv.kv_maps)
    assert np.array_equal(sent.kv_out_exp, kv.kv_out_exp)  # type: ignore[arg-type]
    path = tmp_path / "damaged.json"
    doc["cross"]["kv_out_exp"][0] += 1  # what a decoder uses, changed: the digest says so
    path.write_text(json.dumps(doc))
    with pytest.raises(InvalidArgument, match="digest"):
        CacheGenProfile.load(path)
    doc["cross"]["kv_out_exp"].pop()
    path.write_text(json.dumps(doc))
    with pytest.raises(InvalidArgument, match="kv_out_exp must be"):
        CacheGenProfile.load(path)


def test_kv_maps_are_checked() -> None:
    c = KV_WORLD.profile(kv=True).cross
    assert c is not None and c.kv_maps is not None
    base = (c.inv_freq, c.rope_scale, c.in_exp, c.maps, c.out_exp, c.weights)
    with pytest.raises(InvalidArgument, match="together"):
        CrossLayer(*base, 8, c.kv_maps, None)
    with pytest.raises(InvalidArgument, match=r"within \+-127"):
        CrossLayer(*base, 8, c.kv_maps.astype(np.int16) * 3, c.kv_out_exp)
    with pytest.raises(InvalidArgument, match="kv_maps must be"):
        CrossLayer(*base, 8, c.kv_maps[1:], c.kv_out_exp)
    sixteen = (*base[:3], c.maps.astype(np.int16), *base[4:])
    with pytest.raises(InvalidArgument, match="8-bit"):
        CrossLayer(*sixteen, 16, c.kv_maps, c.kv_out_exp)


@pytest.mark.parametrize("way", ["int_mm", "float32", "float64"])
def test_v_from_k_is_the_exact_integer_product(way: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """V's prediction with kv maps: the map's integer product of the layer below plus the
    kv map's of this layer's K (layer 0: that alone, on its own scales), to the bit."""
    if way == "int_mm" and cachegen_profile._INT_MM is None:
        pytest.skip("this torch has no _int_mm")
    monkeypatch.setattr(cachegen_profile, "_WAY", way)
    c = KV_WORLD.profile(kv=True).cross
    assert c is not None and c.kv_maps is not None and c.kv_out_exp is not None
    half = c.channels // 2
    rng = np.random.default_rng(2)
    below = (rng.normal(0, 3, (37, c.channels)) * 10.0 ** rng.integers(-2, 3, c.channels)).astype(
        np.float32
    )
    k = (rng.normal(0, 3, (37, half)) * 10.0 ** rng.integers(-2, 3, half)).astype(np.float32)
    k[0, :2] = [1e30, -1e30]  # clipped
    for layer in range(c.layers):
        got = c.predict_v(below if layer else None, k, layer)
        ke = c.in_exp[min(layer, c.layers - 2), :half].astype(np.int32)
        ki = np.clip(np.rint(k * np.ldexp(np.float32(1), ke)), -127, 127).astype(np.int64)
        acc = ki @ c.kv_maps[layer].astype(np.int64)
        out_exp = c.kv_out_exp
        if layer:
            scale = np.ldexp(np.float32(1), c.in_exp[layer - 1].astype(np.int32))
            xi = np.clip(np.rint(below * scale), -127, 127).astype(np.int64)
            acc += xi @ c.maps[layer - 1][:, half:].astype(np.int64)
            out_exp = c.out_exp[layer - 1, half:]
        want = acc.astype(np.float64) * np.ldexp(1.0, -out_exp.astype(np.int32))
        assert np.array_equal(got, want.astype(np.float32))


def test_kv_maps_code_values_smaller_where_v_follows_k(kv_profiles: tuple[Path, Path]) -> None:
    """On KV whose V is mostly a map of its layer's K, the kv maps' containers decode to
    the encoder's value, and some level of them is both smaller than the plain maps' at
    the default level and at least as close."""
    t = KV_WORLD.tensor(256, 512, seed=6)
    points = {}
    for name, path in zip(("plain", "kv"), kv_profiles, strict=True):
        for level in cx.CROSS_LEVELS:
            codec = codec_from_spec(f"cachegen-x:level={level},profile={path}").for_position(512)
            _, back = codec.encode_with_value(t)
            data = codec.encode(t)
            got = decode(data)
            assert torch.equal(got, back)
            points[name, level] = (len(data), rel_err(got, t))
    size, err = points["plain", 1]
    kv = [points["kv", level] for level in cx.CROSS_LEVELS]
    assert any(s < 0.95 * size and e <= err for s, e in kv), (points["plain", 1], kv)


@pytest.mark.parametrize("kv", [False, True], ids=["maps", "kv-maps"])
def test_one_thread_codes_the_same_bits_without_numbas_pool(
    kv_profiles: tuple[Path, Path], kv: bool
) -> None:
    """A thread that runs numba on one thread (a server's host thread) takes the layer
    kernels that never start numba's pool: the same payload and value as the parallel ones,
    K's units and V's alike."""
    import numba

    t = KV_WORLD.tensor(100, 256, seed=11)
    codec = codec_from_spec(f"cachegen-x:profile={kv_profiles[kv]}").for_position(256)
    runs = []
    before = numba.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            payload, back = codec.encode_with_value(t)
            runs.append((bytes(payload), back, decode(codec.encode(t))))
    finally:
        numba.set_num_threads(before)
    (p1, b1, d1), (p2, b2, d2) = runs
    assert p1 == p2 and torch.equal(b1, b2) and torch.equal(d1, d2) and torch.equal(d1, b1)
