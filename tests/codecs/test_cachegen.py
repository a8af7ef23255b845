"""cachegen: anchors, deltas and rANS. Round trips within the quantization bounds, levels
trading size for error, token locality paying off, and forged payloads refused."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kvstore.codecs import ContainerError, codec_from_spec, decode, rans
from kvstore.codecs.cachegen import (
    ALPHABET,
    CENTER,
    LANES,
    LEVELS,
    OUTLIER_SPREADS,
    PRECISION,
    REACH,
    SEGMENT_TOKENS,
    CacheGen,
)
from kvstore.codecs.container import decode_header
from kvstore.errors import InvalidArgument
from kvstore.kernels.floatbits import F16_MAX


def smooth_kv(layers: int = 6, tokens: int = 70, heads: int = 2, dim: int = 32) -> torch.Tensor:
    """KV whose channels drift slowly along the tokens, as real KV does."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(layers, 2, 1, heads, dim, generator=g) * 2
    drift = torch.cumsum(torch.randn(layers, 2, tokens, heads, dim, generator=g) * 0.05, dim=2)
    return base + drift


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def reference(
    t: torch.Tensor, level: int, k: int, profile: str = "", version: int = 2
) -> tuple[bytes, torch.Tensor]:
    """The payload (format `version`) and the decoded value as the module docstring
    defines them, computed the straightforward way: NumPy over every channel at once, a
    token at a time, in float32 (sums in float64, in token order), on the `[L, 2, H, D]`
    slices of the value."""
    x = t.float().numpy()
    layers, _, tokens, heads, dim = x.shape
    res = CacheGen(level=level, profile=profile).resolution(layers, heads)[..., None]
    closed = np.zeros((layers, 2, 1, 1), bool)
    closed[:, 0] = bool(k)  # K by the previous token
    mean = np.zeros((layers, 2, heads, dim))
    for i in range(tokens):
        mean += x[:, :, i]
    mean /= tokens
    by_mean, by_prev = np.zeros_like(mean), np.zeros_like(mean)
    for i in range(tokens):
        by_mean += (x[:, :, i] - mean) ** 2
        if i:
            e = x[:, :, i] - x[:, :, i - 1]
            by_prev += e * e
    start = np.where(closed, x[:, :, 0], mean.astype(np.float32))
    spread = np.where(closed, np.sqrt(by_prev / max(tokens - 1, 1)), np.sqrt(by_mean / tokens))
    starts = np.clip(start, -F16_MAX, F16_MAX).astype(np.float16)
    # One step per head: the root mean square of its channels' spreads (float32, summed in
    # channel order) over the resolution.
    sp = spread.astype(np.float32)
    rms = np.zeros((layers, 2, heads), np.float32)
    for d in range(dim):
        rms = (rms + sp[..., d] * sp[..., d]).astype(np.float32)
    rms = np.sqrt(rms.astype(np.float64) / dim).astype(np.float32)[..., None]
    steps = np.clip(rms / res, -F16_MAX, F16_MAX).astype(np.float16)
    stored_steps = steps if version == 2 else np.broadcast_to(steps, (layers, 2, heads, dim))
    steps = np.broadcast_to(steps, (layers, 2, heads, dim))
    step, pred = steps.astype(np.float32), starts.astype(np.float32)
    inv = np.where(step > 0, np.float32(1) / np.where(step > 0, step, 1), 0).astype(np.float32)
    # Escapes beyond OUTLIER_SPREADS of each channel's own spread, and the first token but
    # where K's start value holds it.
    reach = np.clip(np.ceil(OUTLIER_SPREADS * sp.astype(np.float64) * inv), 1, REACH)
    exact = np.clip(x, -F16_MAX, F16_MAX).astype(np.float16)
    symbols = np.empty(x.shape, np.uint8)
    values = np.empty(x.shape, np.float32)
    for i in range(tokens):
        residual = x[:, :, i] - pred
        q = np.rint(residual * inv)
        escape = (np.abs(q) > reach) | ((step == 0) & (residual != 0)) | ((i == 0) & ~closed)
        symbols[:, :, i] = np.where(escape, 0, q + CENTER)
        values[:, :, i] = np.where(escape, exact[:, :, i].astype(np.float32), pred + q * step)
        pred = np.where(closed, values[:, :, i], pred)
    units = symbols.transpose(0, 1, 3, 2, 4).reshape(layers * 2 * heads, tokens * dim)
    counts = np.stack([np.bincount(s, minlength=ALPHABET) for s in units])
    freqs = rans.quantize_freqs(counts, PRECISION)
    tables = rans.pack_tables(freqs, PRECISION)
    # Each unit's symbols in streams of SEGMENT_TOKENS tokens, coded one at a time.
    width = SEGMENT_TOKENS * dim
    data, offsets = b"", [0]
    for u, row in enumerate(units):
        for a in range(0, row.size, width):
            part = row[None, a : a + width]
            coded, _ = rans.encode_streams(part, [0], freqs[u : u + 1], PRECISION, LANES)
            data += coded
            offsets.append(len(data))
    escaped = exact.transpose(0, 1, 3, 2, 4).reshape(units.shape)[units == 0]
    payload = b"".join(
        [
            struct.pack("<I", SEGMENT_TOKENS),
            starts.astype("<f2").tobytes(),
            stored_steps.astype("<f2").tobytes(),
            counts[:, 0].astype("<u4").tobytes(),
            struct.pack("<I", len(tables)),
            tables,
            np.array(offsets).astype("<u4").tobytes(),
            data,
            escaped.astype("<f2").tobytes(),
        ]
    )
    return payload, torch.from_numpy(values).to(t.dtype)  # rounded as torch rounds


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [0, 1])
@pytest.mark.parametrize("level", sorted(LEVELS))
def test_kernels_match_a_reference(dtype: torch.dtype, level: int, k: int) -> None:
    """The kernels work on the value's words in place, a (layer, K/V) at a time: their
    payload and decoded bits are exactly the reference's, escapes (also to float16
    subnormals), zero steps and tiny channels included."""
    t = smooth_kv(layers=4, tokens=37, heads=2, dim=24)
    t[:, :, 0] *= 30  # an attention sink: escapes
    t[1, :, :, 1, 3] = 0.5  # constant channels: zero steps
    t[2, 0, 20, 0, 5] = 1e-6  # an escape to a float16 subnormal
    t[3, 1, :, 0] *= 1e-4  # tiny channels: subnormal steps
    t = t.to(dtype)
    codec = CacheGen(level=level, k=k)
    want_payload, want_value = reference(t, level, k)
    payload = codec.encode_payload(t)
    assert payload == want_payload
    got = torch.empty_like(t)
    codec.decode_payload(memoryview(payload), got)
    assert torch.equal(got, want_value)
    # The encoder's own reconstruction (the value checksum's source) is the same bits.
    again, back = codec.encode_with_value(t)
    assert again == payload and torch.equal(back, want_value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [0, 1])
def test_version_1_payloads_match_the_reference(dtype: torch.dtype, k: int) -> None:
    """`version=1` writes the first payload format (a step per channel), which decodes to
    the same bits as version 2, whose payload is smaller by the repeated steps."""
    t = smooth_kv(layers=4, tokens=37, heads=2, dim=24)
    t[:, :, 0] *= 30
    t = t.to(dtype)
    old, new = CacheGen(level=1, k=k, version=1), CacheGen(level=1, k=k)
    want_payload, want_value = reference(t, 1, k, version=1)
    payload = old.encode_payload(t)
    assert payload == want_payload
    got = torch.empty_like(t)
    old.decode_payload(memoryview(payload), got)
    assert torch.equal(got, want_value)
    assert torch.equal(decode(old.encode(t)), decode(new.encode(t)))
    units = 4 * 2 * 2
    assert len(payload) - len(new.encode_payload(t)) == 2 * units * (24 - 1)


def test_containers_of_earlier_builds_decode() -> None:
    """A container written before payload version 2 (it records no version; made by the
    build before it, kept as a file) decodes to the value its checksum names, and a
    `version=1` container of this build looks the same to a reader: no version recorded,
    so those earlier builds read it too."""
    data = (Path(__file__).parent / "data" / "cachegen-v1.kvc").read_bytes()
    header, _ = decode_header(data)
    assert header.param_dict() == {"k": "1", "level": "1"}
    g = torch.Generator().manual_seed(5)
    t = torch.randn(2, 2, 1, 2, 16, generator=g) * 2
    t = (t + torch.cumsum(torch.randn(2, 2, 40, 2, 16, generator=g) * 0.05, 2)).half()
    t[:, :, 0] *= 30
    got = decode(data)  # checks the decoded value's checksum
    assert got.dtype == torch.float16 and got.shape == t.shape
    assert torch.equal(got[:, :, 0], t[:, :, 0]) and rel_err(got, t) < 0.05
    again, _ = decode_header(codec_from_spec("cachegen:version=1").encode(t))
    assert again.params == header.params
    now, _ = decode_header(codec_from_spec("cachegen").encode(t))
    assert now.param_dict()["version"] == "2"
    with pytest.raises(InvalidArgument, match="version"):
        codec_from_spec("cachegen:version=3")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("level", sorted(LEVELS))
def test_every_value_within_half_a_step(dtype: torch.dtype, level: int) -> None:
    """K by closed-loop prediction from the previous token, V around its channel mean:
    either way each value decodes within half its channel's step (plus the rounding to
    the output dtype), and K's error does not grow along the tokens."""
    t = smooth_kv().to(dtype)
    codec = CacheGen(level=level)
    payload = codec.encode_payload(t)
    got = torch.empty_like(t)
    codec.decode_payload(memoryview(payload), got)
    assert torch.equal(decode(codec.encode(t)), got)
    layers, _, _, heads, dim = t.shape
    ch = layers * 2 * heads * dim
    units = layers * 2 * heads
    steps = np.frombuffer(payload[4 + 2 * ch : 4 + 2 * ch + 2 * units], "<f2").astype(np.float32)
    step = torch.from_numpy(steps.reshape(layers, 2, 1, heads, 1))
    x = t.float()
    # Half a step, plus the rounding of the decoded value to the dtype.
    bound = step / 2 * 1.0001 + torch.maximum(x.abs(), got.float().abs()) * 2.0**-7 + 1e-6
    assert ((got.float() - x).abs() <= bound).all()


def test_levels_trade_size_for_error() -> None:
    t = smooth_kv(tokens=256).to(torch.bfloat16)
    sizes, errors = [], []
    for level in sorted(LEVELS):
        data = codec_from_spec(f"cachegen:level={level}").encode(t)
        sizes.append(len(data))
        errors.append(rel_err(decode(data), t))
    assert sizes == sorted(sizes, reverse=True) and errors == sorted(errors)
    assert t.numel() * 2 / sizes[1] > 2.5  # level 1 on smooth KV


def test_the_newest_chunk_of_a_sequence_takes_its_own_level() -> None:
    """`newest=LEVEL`: `for_newest()` codes at that level (one instance, so the ssd writer
    batches such values together); the setting is the encoder's, not the containers'."""
    codec = codec_from_spec("cachegen:level=3,newest=0")
    finer = codec.for_newest()
    assert finer is codec.for_newest() and finer.params["level"] == 0
    assert finer.for_newest() is finer
    t = smooth_kv(tokens=256).to(torch.float16)
    assert finer.encode_payload(t) == codec_from_spec("cachegen:level=0").encode_payload(t)
    header, _ = decode_header(codec.for_newest().encode(t))
    assert header.params == "k=1;level=0;version=2"  # no newest: the level it was coded at
    assert codec.spec() == "cachegen:k=1,level=3,newest=0,version=2"
    for spec in ("cachegen", "cachegen:level=2,newest=2", "zstd", "kivi:bits=2"):
        plain = codec_from_spec(spec)
        assert plain.for_newest() is plain
    with pytest.raises(InvalidArgument, match="cachegen newest must be -1"):
        codec_from_spec("cachegen:newest=7")


def test_k_locality_pays_off() -> None:
    """K is coded from the previous token: the same K with its tokens shuffled loses that.
    Steps follow each channel's spread, so the size holds and the error grows."""
    t = smooth_kv(tokens=256).to(torch.bfloat16)
    shuffled = t.clone()
    order = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    shuffled[:, 0] = t[:, 0, order]
    codec = codec_from_spec("cachegen")
    ordered, mixed = decode(codec.encode(t)), decode(codec.encode(shuffled))
    assert 2 * rel_err(ordered[:, 0], t[:, 0]) < rel_err(mixed[:, 0], shuffled[:, 0])
    by_mean = decode(codec_from_spec("cachegen:k=0").encode(t))
    assert rel_err(ordered[:, 0], t[:, 0]) < rel_err(by_mean[:, 0], t[:, 0])


def test_smaller_than_plain_quantization_at_similar_error() -> None:
    t = smooth_kv(tokens=256).to(torch.bfloat16)
    cg = codec_from_spec("cachegen:level=0").encode(t)
    i8 = codec_from_spec("int8").encode(t)
    assert len(cg) < 0.7 * len(i8) and rel_err(decode(cg), t) < 2 * rel_err(decode(i8), t)


def test_outliers_escape_to_exact_values() -> None:
    """A token far from its channel's prediction (an attention sink) is stored exactly."""
    t = smooth_kv(tokens=64).to(torch.float16)
    t[:, :, 0] *= 40  # the first token far out in every channel, K and V
    got = decode(codec_from_spec("cachegen:level=3").encode(t))
    exact = got[:, :, 0] == t[:, :, 0]
    # All but the channels where 40x stays close to the rest (a value near zero).
    assert exact.float().mean() > 0.95
    assert rel_err(got[:, :, 0], t[:, :, 0]) < 1e-3


def test_first_token_exact_without_storing_k_twice() -> None:
    """The chunk's first token decodes exactly, K and V; V's is escaped, K's is its start
    value (residual 0), so K units have no escapes on smooth KV: it is not stored twice."""
    t = smooth_kv(tokens=64).to(torch.float16)
    layers, _, _, heads, dim = t.shape
    codec = CacheGen(level=1)
    payload = codec.encode_payload(t)
    got = decode(codec.encode(t))
    assert torch.equal(got[:, :, 0], t[:, :, 0])
    units = layers * 2 * heads
    escapes = np.frombuffer(payload, "<u4", units, 4 + 2 * units * (dim + 1))
    escapes = escapes.reshape(layers, 2, heads)
    assert (escapes[:, 0] == 0).all() and (escapes[:, 1] >= dim).all()


@pytest.mark.parametrize("tokens", [0, 1, 15, 16, 17, 33])
def test_edge_token_counts(tokens: int) -> None:
    t = smooth_kv(layers=3, tokens=tokens).to(torch.float16)
    got = decode(codec_from_spec("cachegen").encode(t))
    assert got.shape == t.shape
    if tokens:
        assert rel_err(got, t) < 0.05


def test_constant_and_zero_values() -> None:
    z = torch.zeros(2, 2, 20, 1, 8, dtype=torch.bfloat16)
    assert torch.equal(decode(codec_from_spec("cachegen").encode(z)), z)
    c = torch.full((2, 2, 20, 1, 8), 0.75, dtype=torch.float16)
    assert torch.equal(decode(codec_from_spec("cachegen").encode(c)), c)


def test_refusals() -> None:
    codec = codec_from_spec("cachegen")
    with pytest.raises(InvalidArgument, match="layers, 2, tokens"):
        codec.encode(torch.zeros(4, 8))
    bad = smooth_kv(layers=1, tokens=4)
    bad[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(InvalidArgument, match="finite"):
        codec.encode(bad)
    with pytest.raises(InvalidArgument, match="finite"):
        codec.encode(smooth_kv(layers=1, tokens=4) * 1e6)
    with pytest.raises(InvalidArgument, match="level"):
        codec_from_spec("cachegen:level=9")


def test_forged_payloads_are_refused_without_crashing() -> None:
    t = smooth_kv(layers=2, tokens=40).to(torch.bfloat16)
    codec = CacheGen()
    payload = codec.encode_payload(t)
    out = torch.empty_like(t)
    for cut in (0, 10, len(payload) // 2, len(payload) - 1):
        with pytest.raises(ContainerError):
            codec.decode_payload(memoryview(payload[:cut]), out)
    rng = np.random.default_rng(0)
    refused = 0
    for _ in range(200):  # bytes flipped behind the container's checksum
        forged = bytearray(payload)
        forged[int(rng.integers(len(forged)))] ^= 1 << int(rng.integers(8))
        try:
            codec.decode_payload(memoryview(bytes(forged)), out)
        except ContainerError:
            refused += 1
    assert refused > 0  # the rest decode to some tensor; the container's checksums catch them
    with pytest.raises(ContainerError, match="shape"):
        codec.decode_payload(memoryview(payload), torch.empty(4, 4))


# ------------------------------------------------------------ cachegen-zstd


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("spec", ["level=1", "level=3,k=0", "level=0"])
@pytest.mark.parametrize("tokens", [0, 1, 33, 256])
def test_zstd_entropy_decodes_to_cachegens_values(
    dtype: torch.dtype, spec: str, tokens: int
) -> None:
    """The same quantizer under another entropy coder: the same decoded bits, in about the
    same size."""
    t = smooth_kv(layers=3, tokens=tokens).to(dtype)
    rans_coded = codec_from_spec(f"cachegen:{spec}").encode(t)
    zstd_coded = codec_from_spec(f"cachegen-zstd:{spec}").encode(t)
    got = decode(zstd_coded)
    assert got.dtype == dtype and got.shape == t.shape
    assert torch.equal(got, decode(rans_coded))
    if tokens >= 33:
        assert len(zstd_coded) < 1.15 * len(rans_coded)
    out = torch.empty(t.numel(), dtype=dtype)  # into a caller's buffer
    assert torch.equal(decode(zstd_coded, out).view(t.shape), got)


def test_zstd_entropy_has_no_gpu_coder_and_its_own_versions() -> None:
    codec = codec_from_spec("cachegen-zstd:level=3,newest=0")
    assert codec.gpu_decoder() is None and codec.gpu_encoder() is None
    assert codec.for_newest().params["level"] == 0
    assert codec.for_newest().name == "cachegen-zstd"
    with pytest.raises(InvalidArgument, match="version must be one of"):
        codec_from_spec("cachegen-zstd:version=2")


def _zstd_parts(payload: bytes, layers: int, heads: int, dim: int) -> tuple[int, np.ndarray]:
    """Where a cachegen-zstd payload's offsets start, and the offsets."""
    units = layers * 2 * heads
    at = 2 * units * dim + 2 * units + 4 * units
    return at, np.frombuffer(payload, "<u4", units + 1, at).astype(np.int64)


def test_zstd_forged_payloads_are_refused() -> None:
    import zstandard

    t = smooth_kv(layers=2, tokens=40, heads=2, dim=32).to(torch.bfloat16)
    codec = codec_from_spec("cachegen-zstd")
    payload = codec.encode_payload(t)
    out = torch.empty_like(t)
    codec.decode_payload(memoryview(payload), out)
    want = out.clone()
    for cut in (0, 10, len(payload) // 2, len(payload) - 1):
        with pytest.raises(ContainerError):
            codec.decode_payload(memoryview(payload[:cut]), out)
    at, offsets = _zstd_parts(payload, 2, 2, 32)
    base = at + 4 * offsets.size

    def with_frame(u: int, frame: bytes) -> bytes:
        """The payload with unit u's frame replaced (offsets moved to fit)."""
        old = offsets[u + 1] - offsets[u]
        moved = offsets.copy()
        moved[u + 1 :] += len(frame) - old
        start, end = base + offsets[u], base + offsets[u + 1]
        head = payload[:at] + moved.astype("<u4").tobytes()
        return head + payload[base:start] + frame + payload[end:]

    zc = zstandard.ZstdCompressor(level=1)
    symbols = 40 * 32
    forged = [  # (unit, frame, what the refusal says)
        (0, zc.compress(bytes([127]) * (symbols - 1)), "wrong size"),
        (0, zc.compress(bytes([255]) * symbols), "alphabet"),
        (1, b"\x28\xb5\x2f\xfd" + bytes(20), "frame"),
        # unit 2 (layer 0's V, head 0) escapes its first token: no symbol 0 left for it
        (2, zc.compress(bytes([127]) * symbols), "escapes disagree"),
    ]
    for u, frame, message in forged:
        with pytest.raises(ContainerError, match=message):
            codec.decode_payload(memoryview(with_frame(u, frame)), out)
    # a frame's bits flipped behind the container's checksum: refused, or decoded to some
    # tensor that the container's value checksum then refuses; never a crash
    rng = np.random.default_rng(0)
    for _ in range(100):
        bad = bytearray(payload)
        bad[int(rng.integers(base, base + offsets[-1]))] ^= 1 << int(rng.integers(8))
        try:
            codec.decode_payload(memoryview(bytes(bad)), out)
        except ContainerError:
            continue
    with pytest.raises(ContainerError, match="shape"):
        codec.decode_payload(memoryview(payload), torch.empty(4, 4))
    codec.decode_payload(memoryview(payload), out)
    assert torch.equal(out, want)


def test_zstd_frames_code_the_same_on_one_thread_or_several() -> None:
    import numba

    t = smooth_kv(layers=3, tokens=64).to(torch.float16)
    codec = codec_from_spec("cachegen-zstd")
    payload = codec.encode_payload(t)
    data = codec.encode(t)
    many = decode(data)
    before = numba.get_num_threads()
    numba.set_num_threads(1)  # one thread: the frames one after another, in one buffer
    try:
        one = decode(data)
        assert codec.encode_payload(t) == payload
    finally:
        numba.set_num_threads(before)
    assert torch.equal(one, many)
    assert torch.equal(many, decode(codec_from_spec("cachegen").encode(t)))
    if before > 1:  # frames coded on several threads come back in several buffers
        numba.set_num_threads(2)
        try:
            assert codec.encode_payload(t) == payload
        finally:
            numba.set_num_threads(before)
