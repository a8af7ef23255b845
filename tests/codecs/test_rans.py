"""The rANS coder: round trips over distributions, models, lanes and stream lengths; table
quantization and packing; size against the entropy; and decoders fed truncated, flipped or
inconsistent input, which must refuse it with ContainerError and never read out of bounds.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.codecs import rans
from kvstore.codecs.base import ContainerError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def laplace(
    rng: np.random.Generator, shape: tuple[int, ...], alphabet: int, scale: float
) -> np.ndarray:
    """Quantized-delta-like symbols: a discretized Laplace centred in the alphabet."""
    v = np.rint(rng.laplace(0.0, scale, shape)).astype(np.int64) + alphabet // 2
    return np.clip(v, 0, alphabet - 1).astype(np.uint8)


def counts_of(symbols: np.ndarray, models: np.ndarray, n_models: int, alphabet: int) -> np.ndarray:
    counts = np.zeros((n_models, alphabet), np.int64)
    np.add.at(counts, (np.repeat(models, symbols.shape[1]), symbols.ravel()), 1)
    return counts


def entropy_bytes(counts: np.ndarray) -> float:
    """Empirical entropy of the counted symbols, each row its own model, in bytes."""
    p = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return float(-(counts * np.log2(np.where(p > 0, p, 1))).sum() / 8)


def round_trip(
    symbols: np.ndarray, models: np.ndarray, freqs: np.ndarray, precision: int, lanes: int
) -> tuple[bytes, np.ndarray]:
    data, offsets = rans.encode_streams(symbols, models, freqs, precision, lanes)
    assert offsets.dtype == np.int64 and offsets.shape == (symbols.shape[0] + 1,)
    assert offsets[0] == 0 and offsets[-1] == len(data)
    got = rans.decode_streams(data, offsets, models, freqs, precision, symbols.shape[1], lanes)
    np.testing.assert_array_equal(got, symbols)
    return data, offsets


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("kind", ["uniform", "skewed", "single"])
@pytest.mark.parametrize("lanes", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 6, 7, 8, 1001])  # every tail of four lanes
def test_round_trip(kind: str, lanes: int, n: int) -> None:
    rng = np.random.default_rng(n * 10 + lanes)
    alphabet = 32
    if kind == "uniform":
        symbols = rng.integers(0, alphabet, (5, n)).astype(np.uint8)
    elif kind == "skewed":
        symbols = laplace(rng, (5, n), alphabet, 1.5)
    else:
        symbols = np.full((5, n), 9, np.uint8)
    models = np.zeros(5, np.int32)
    counts = counts_of(symbols, models, 1, alphabet) + (kind == "uniform")
    for precision in (12, 15):
        freqs = rans.quantize_freqs(counts, precision)
        data, _ = round_trip(symbols, models, freqs, precision, lanes)
        if kind == "single" and n:
            # A certain symbol costs nothing: only the lanes' flushed states remain.
            assert len(data) == 5 * 4 * min(lanes, n)


def test_models_across_streams() -> None:
    rng = np.random.default_rng(1)
    alphabet, n_models = 24, 5
    models = rng.integers(0, n_models - 1, 40).astype(np.int32)  # the last model unused
    scales = np.array([0.3, 1.0, 2.5, 6.0, 1.0])
    symbols = np.stack([laplace(rng, (777,), alphabet, scales[m]) for m in models])
    counts = counts_of(symbols, models, n_models, alphabet)
    freqs = rans.quantize_freqs(counts, 13)
    assert freqs[n_models - 1, 0] == 1 << 13  # no counts: all mass on symbol 0
    data, offsets = round_trip(symbols, models, freqs, 13, 4)
    # Each stream decodes alone, from its own bytes only.
    k = 17
    part = data[offsets[k] : offsets[k + 1]]
    one = rans.decode_streams(part, np.array([0, len(part)]), models[k : k + 1], freqs, 13, 777)
    np.testing.assert_array_equal(one[0], symbols[k])


def test_decode_into_out() -> None:
    rng = np.random.default_rng(2)
    symbols = laplace(rng, (3, 500), 16, 2.0)
    models = np.zeros(3, np.int64)
    freqs = rans.quantize_freqs(counts_of(symbols, models, 1, 16), 12)
    data, offsets = rans.encode_streams(symbols, models, freqs, 12)
    out = np.empty((3, 500), np.uint8)
    assert rans.decode_streams(bytearray(data), offsets, models, freqs, 12, 500, out=out) is out
    np.testing.assert_array_equal(out, symbols)
    for bad in (np.empty((3, 499), np.uint8), np.empty((3, 500), np.int8)):
        with pytest.raises(ValueError, match="out must be"):
            rans.decode_streams(data, offsets, models, freqs, 12, 500, out=bad)


def test_streams_of_different_lengths() -> None:
    """`lengths`: each row holds one stream of its own length; symbols past it are neither
    coded nor written, and each stream is what coding its symbols alone gives."""
    rng = np.random.default_rng(3)
    symbols = laplace(rng, (4, 300), 16, 2.0)
    lengths = np.array([300, 0, 1, 123])
    models = np.array([0, 0, 1, 1])
    freqs = rans.quantize_freqs(counts_of(symbols, models, 2, 16) + 1, 12)
    data, offsets = rans.encode_streams(symbols, models, freqs, 12, 4, lengths=lengths)
    for k, n in enumerate(lengths):
        alone, _ = rans.encode_streams(symbols[k : k + 1, :n], models[k : k + 1], freqs, 12, 4)
        assert data[offsets[k] : offsets[k + 1]] == alone
    out = np.full((4, 300), 99, np.uint8)
    rans.decode_streams(data, offsets, models, freqs, 12, 300, 4, out=out, lengths=lengths)
    for k, n in enumerate(lengths):
        np.testing.assert_array_equal(out[k, :n], symbols[k, :n])
        assert (out[k, n:] == 99).all()
    with pytest.raises(ContainerError):  # lengths that do not match the streams
        rans.decode_streams(
            data, offsets, models, freqs, 12, 300, 4, lengths=np.array([299, 0, 1, 123])
        )
    for bad in (np.array([301, 0, 1, 1]), np.array([-1, 0, 1, 1]), np.array([1, 2])):
        with pytest.raises(ValueError, match="lengths"):
            rans.encode_streams(symbols, models, freqs, 12, 4, lengths=bad)


def test_streams_of_one_model_decode_in_pairs() -> None:
    """The decoder takes consecutive streams of one model two at a time (eight lanes side by
    side): pairs of unequal lengths, one too short for the paired loop, and damage to
    either stream of a pair are each told apart."""
    rng = np.random.default_rng(4)
    lengths = np.array([300, 297, 5, 4, 3, 260, 1, 300])
    symbols = laplace(rng, (8, 300), 16, 2.0)
    models = np.zeros(8, np.int32)
    freqs = rans.quantize_freqs(counts_of(symbols, models, 1, 16) + 1, 12)
    data, offsets = rans.encode_streams(symbols, models, freqs, 12, 4, lengths=lengths)
    out = rans.decode_streams(data, offsets, models, freqs, 12, 300, 4, lengths=lengths)
    for k, n in enumerate(lengths):
        np.testing.assert_array_equal(out[k, :n], symbols[k, :n])
    for k in (0, 1, 5):  # the first or the second stream of a pair, cut short by a byte
        short = data[: offsets[k + 1] - 1] + data[offsets[k + 1] :]
        off = offsets.copy()
        off[k + 1 :] -= 1
        with pytest.raises(ContainerError, match=f"rANS stream {k} of 8"):
            rans.decode_streams(short, off, models, freqs, 12, 300, 4, lengths=lengths)
        bad = bytearray(data)
        bad[offsets[k]] ^= 0xFF  # the first lane's initial state
        with pytest.raises(ContainerError, match=f"rANS stream {k} of 8"):
            rans.decode_streams(bytes(bad), offsets, models, freqs, 12, 300, 4, lengths=lengths)


# ------------------------------------------------------------------------------ tables


@given(
    counts=st.lists(st.integers(0, 10**6), min_size=1, max_size=40),
    precision=st.integers(rans.MIN_PRECISION, rans.MAX_PRECISION),
    significant_bits=st.none() | st.integers(1, 16),
)
@FUZZ
def test_quantize_and_pack_round_trip(
    counts: list[int], precision: int, significant_bits: int | None
) -> None:
    c = np.array([counts, counts[::-1], [0] * len(counts)], np.int64)
    freqs = rans.quantize_freqs(c, precision, significant_bits=significant_bits)
    assert freqs.shape == c.shape and np.all(freqs.sum(axis=1) == 1 << precision)
    for row, f in zip(c, freqs, strict=True):
        if row.any():
            np.testing.assert_array_equal(f > 0, row > 0)
        else:
            assert f[0] == 1 << precision
    packed = rans.pack_tables(freqs, precision)
    got = rans.unpack_tables(packed, 3, len(counts), precision)
    np.testing.assert_array_equal(got, freqs)


def test_quantize_is_optimal() -> None:
    """No unit of frequency moved from one symbol to another codes the counts shorter."""
    rng = np.random.default_rng(3)
    counts = np.concatenate([rng.integers(0, 1000, (20, 12)), rng.integers(0, 3, (20, 12))])
    freqs = rans.quantize_freqs(counts, 12).astype(np.int64)

    def bits(c: np.ndarray, f: np.ndarray) -> float:
        return float(-(c[c > 0] * np.log2(f[c > 0])).sum())

    for c, f in zip(counts, freqs, strict=True):
        best = bits(c, f)
        for up in np.flatnonzero(c):
            for down in np.flatnonzero(f > 1):
                if up != down:
                    g = f.copy()
                    g[up] += 1
                    g[down] -= 1
                    assert bits(c, g) >= best - 1e-6


def test_tables_are_compact() -> None:
    rng = np.random.default_rng(4)
    counts = counts_of(laplace(rng, (1, 1 << 16), 32, 1.5), np.zeros(1, np.int64), 1, 32)
    cdf16 = 2 * 33  # CacheGen: a 16-bit CDF entry per symbol, and one to close it
    for precision in (12, 15):
        exact = rans.pack_tables(rans.quantize_freqs(counts, precision), precision)
        coarse_freqs = rans.quantize_freqs(counts, precision, significant_bits=5)
        coarse = rans.pack_tables(coarse_freqs, precision)
        assert len(exact) <= cdf16 * 0.6 and len(coarse) <= cdf16 * 0.45
        assert len(coarse) < len(exact)
    uniform = np.full((1, 256), 1 << 4, np.uint16)  # 256 x 16 = 2**12
    assert len(rans.pack_tables(uniform, 12)) < 50


def test_unpack_rejects_damage() -> None:
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 300, (4, 20)) * (rng.random((4, 20)) < 0.8)
    freqs = rans.quantize_freqs(counts, 14)
    packed = rans.pack_tables(freqs, 14)
    for cut in range(len(packed)):
        with pytest.raises(ContainerError, match="rANS tables"):
            rans.unpack_tables(packed[:cut], 4, 20, 14)
    with pytest.raises(ContainerError, match="more than 4 tables"):
        rans.unpack_tables(packed + b"\0", 4, 20, 14)
    with pytest.raises(ContainerError):
        rans.unpack_tables(packed, 4, 20, 13)  # rows no longer sum to 2**precision
    damaged = 0
    for _ in range(300):
        flipped = bytearray(packed)
        flipped[rng.integers(len(packed))] ^= 1 << rng.integers(8)
        try:
            got = rans.unpack_tables(flipped, 4, 20, 14)
        except ContainerError:
            damaged += 1
        else:  # a flip that still parses must at least give valid tables
            assert np.all(got.astype(np.int64).sum(axis=1) == 1 << 14)
    assert damaged > 250


def test_many_parts_unpack_at_once_into_their_rows() -> None:
    """A GPU batch's tables, unpacked in one call into the rows its units take, the same as
    one by one; a damaged part is refused in `unpack_tables`' words, naming the part."""
    rng = np.random.default_rng(4)
    tables = []
    for n_models in (3, 1, 5, 2):
        counts = rng.integers(1, 300, size=(n_models, 20)).astype(np.int64)
        counts[:, rng.integers(0, 20)] = 0  # a symbol a model never codes
        tables.append((rans.pack_tables(rans.quantize_freqs(counts, 14), 14), n_models))
    parts = [np.frombuffer(t, np.uint8) for t, _ in tables]
    spans = [(0, 3), (10, 11), (3, 8), (12, 14)]  # in any order, with rows between left alone
    out = np.full((15, 20), 7, np.uint16)
    rans.unpack_tables_into(parts, spans, out, 14)
    for (packed, n_models), (a, b) in zip(tables, spans, strict=True):
        assert np.array_equal(out[a:b], rans.unpack_tables(packed, n_models, 20, 14))
    assert (out[8:10] == 7).all() and (out[11] == 7).all() and (out[14] == 7).all()

    damaged = bytearray(tables[2][0])
    damaged[len(damaged) // 2] ^= 0xFF
    with pytest.raises(ContainerError) as one:
        rans.unpack_tables(bytes(damaged), 5, 20, 14)
    parts[2] = np.frombuffer(bytes(damaged), np.uint8)
    with pytest.raises(ContainerError) as batch:
        rans.unpack_tables_into(parts, spans, out, 14)
    assert str(batch.value) == f"payload 2 of 4: {one.value}"
    with pytest.raises(ValueError, match="spans outside"):
        rans.unpack_tables_into(parts[:1], [(14, 16)], out, 14)
    with pytest.raises(ValueError, match="uint16"):
        rans.unpack_tables_into(parts[:1], [(0, 3)], out.astype(np.int64), 14)


# ------------------------------------------------------------------------------ size


@pytest.mark.parametrize(("precision", "lanes"), [(12, 4), (15, 8)])
def test_size_near_entropy(precision: int, lanes: int) -> None:
    rng = np.random.default_rng(6)
    n_models = 4
    models = np.arange(32, dtype=np.int32) % n_models
    symbols = np.stack([laplace(rng, (1 << 15,), 32, 0.7 + m) for m in models])
    counts = counts_of(symbols, models, n_models, 32)
    freqs = rans.quantize_freqs(counts, precision)
    data, _ = round_trip(symbols, models, freqs, precision, lanes)
    assert len(data) <= entropy_bytes(counts) * 1.01


# ------------------------------------------------------------------------------ damage


def small_streams(lanes: int = 4) -> tuple[np.ndarray, bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    symbols = laplace(rng, (3, 150), 16, 1.2)
    models = np.array([0, 1, 0], np.int32)
    freqs = rans.quantize_freqs(counts_of(symbols, models, 2, 16), 12)
    data, offsets = rans.encode_streams(symbols, models, freqs, 12, lanes)
    return symbols, data, offsets, freqs


def decode_small(
    data: bytes | bytearray, offsets: np.ndarray, freqs: np.ndarray, lanes: int = 4
) -> np.ndarray:
    return rans.decode_streams(data, offsets, np.array([0, 1, 0]), freqs, 12, 150, lanes)


@pytest.mark.parametrize("lanes", [1, 4])
def test_every_truncation_is_refused(lanes: int) -> None:
    _, data, offsets, freqs = small_streams(lanes)
    start, end = int(offsets[1]), int(offsets[2])
    for cut in range(1, end - start + 1):
        # Stream 1 loses its last `cut` bytes; the offsets stay consistent with the data.
        short = data[: end - cut] + data[end:]
        off = offsets.copy()
        off[2:] -= cut
        with pytest.raises(ContainerError, match="rANS stream 1 of 3"):
            decode_small(short, off, freqs, lanes)
        # Or the bytes are cut but not the offsets.
        with pytest.raises(ContainerError, match="offsets do not delimit"):
            decode_small(data[:-cut], offsets, freqs, lanes)


@given(st.data())
@FUZZ
def test_flipped_bytes_are_refused_or_harmless(data: st.DataObject) -> None:
    _, encoded, offsets, freqs = small_streams()
    flipped = bytearray(encoded)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(encoded) - 1))
        flipped[i] ^= data.draw(st.integers(1, 255))
    try:
        decode_small(flipped, offsets, freqs)
    except ContainerError as exc:
        assert "rANS stream" in str(exc)


def test_random_flips_are_mostly_caught() -> None:
    symbols, encoded, offsets, freqs = small_streams()
    rng = np.random.default_rng(8)
    silent = 0
    for _ in range(400):
        flipped = bytearray(encoded)
        flipped[rng.integers(len(encoded))] ^= int(rng.integers(1, 256))
        try:
            got = decode_small(flipped, offsets, freqs)
        except ContainerError:
            continue
        silent += not np.array_equal(got, symbols)
    # The lanes' final states are the only check (the container's checksum is the real
    # one): a flip that keeps them consistent decodes to other symbols.
    assert silent <= 10


def test_garbage_streams_are_refused() -> None:
    _, _, _, freqs = small_streams()
    rng = np.random.default_rng(9)
    for length in (0, 3, 16, 40, 200, 5000):
        junk = rng.integers(0, 256, 3 * length, dtype=np.uint8).tobytes()
        off = np.arange(4, dtype=np.int64) * length
        with pytest.raises(ContainerError):
            decode_small(junk, off, freqs)


def test_inconsistent_arguments_are_refused() -> None:
    _, data, offsets, freqs = small_streams()
    models = np.array([0, 1, 0])
    with pytest.raises(ContainerError, match="offsets do not delimit"):
        rans.decode_streams(data, offsets[::-1].copy(), models, freqs, 12, 150)
    with pytest.raises(ContainerError):
        rans.decode_streams(data, offsets, models, freqs, 12, 151)  # wrong length
    with pytest.raises(ContainerError):
        rans.decode_streams(data, offsets, models, freqs, 12, 150, lanes=2)  # wrong lanes
    with pytest.raises(ContainerError):
        rans.decode_streams(data, offsets, models[::-1].copy() ^ 1, freqs, 12, 150)
    with pytest.raises(ValueError, match="outside 0-1"):
        rans.decode_streams(data, offsets, np.array([0, 2, 0]), freqs, 12, 150)
    with pytest.raises(ValueError, match="sum to 2\\*\\*13"):
        rans.decode_streams(data, offsets, models, freqs, 13, 150)
    with pytest.raises(ValueError, match="precision must be 12-15"):
        rans.decode_streams(data, offsets, models, freqs, 16, 150)
    with pytest.raises(ValueError, match="lanes must be"):
        rans.encode_streams(np.zeros((1, 4), np.uint8), np.zeros(1), freqs, 12, lanes=0)


def test_zero_frequency_symbol_is_refused_at_encode() -> None:
    counts = np.zeros((2, 8), np.int64)
    counts[0, :4] = 10
    counts[1] = 1
    freqs = rans.quantize_freqs(counts, 12)
    symbols = np.zeros((3, 50), np.uint8)
    symbols[2, 33] = 6
    with pytest.raises(ValueError, match="stream 2, symbol 33: value 6 has frequency 0"):
        rans.encode_streams(symbols, np.array([1, 1, 0]), freqs, 12)
    symbols[2, 33] = 8  # beyond the alphabet
    with pytest.raises(ValueError, match="value 8 has frequency 0"):
        rans.encode_streams(symbols, np.array([1, 1, 1]), freqs, 12)


def test_the_gpu_encoders_tables_are_quantize_freqs() -> None:
    """`cachegen_encode._tables` (the GPU encoder's host step, in parallel over units) gives
    `quantize_freqs`' tables and the rANS kernel's frequency | cumulative << 16 entries."""
    from kvstore.kernels.cachegen_encode import _tables

    rng = np.random.default_rng(11)
    counts = rng.integers(0, 50, (300, 254)) * (rng.random((300, 254)) < 0.2)
    counts[:, 120:135] += rng.integers(0, 5000, (300, 15))
    counts[7] = 0  # a unit with no symbols
    counts = counts.astype(np.int32)
    freqs = np.empty(counts.shape, np.uint16)
    fc = np.full((300, 256), 7, np.uint32)
    _tables(counts, 1 << 12, freqs, fc)
    want = rans.quantize_freqs(counts.astype(np.int64), 12)
    assert np.array_equal(freqs, want)
    cum = np.cumsum(want, axis=1) - want
    assert np.array_equal(fc[:, :254], want | cum.astype(np.uint32) << 16)
    assert not fc[:, 254:].any()
