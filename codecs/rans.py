"""Static-model rANS: many independent byte streams, each coded with one of a set of models.

Primitives (NumPy arrays in and out, every loop over symbols or bits in numba):

- `quantize_freqs(counts, precision)`: symbol counts per model -> frequencies summing to
  exactly `2**precision` per model: the integer table that codes the counted symbols in
  the fewest bits. A symbol seen keeps a frequency >= 1, an unseen one gets 0 (it cannot be
  encoded), a model that saw nothing puts all mass on symbol 0. `significant_bits` trades
  a little coding efficiency for tables that pack smaller.
- `pack_tables(freqs, precision)` / `unpack_tables(data, n_models, alphabet, precision)`:
  the tables in a few bits per symbol (format below); unpacking checks every field and
  every row's sum and raises `ContainerError` on anything inconsistent or truncated.
- `encode_streams(symbols, model_of_stream, freqs, precision, lanes)` -> (bytes, offsets)
  and `decode_streams(data, offsets, model_of_stream, freqs, precision, n_symbols, lanes)`;
  both take `lengths` for streams shorter than the rows that hold them.

The coder is Duda's range asymmetric numeral systems as in Fabian Giesen's ryg_rans:
32-bit states kept in [L, 256 L) with L = 2**23, byte-wise renormalization, frequencies of
`precision` bits (12 to 15). Assumed: an alphabet of at most 256 symbols (uint8) and
precision <= 15, which bounds the bytes one symbol
reads or writes to two.

Stream format. Stream k is `data[offsets[k]:offsets[k + 1]]` and decodes alone: a GPU
thread holding its model's tables needs nothing else. Symbol i of a stream goes through
lane `i % lanes`; lanes are independent rANS states sharing one byte stream, so that a core
overlaps their dependency chains. A stream starts with the final encoder state of each
lane that holds a symbol (`min(lanes, n_symbols)` of them, 4 bytes little-endian each, lane
0 first), then the renormalization bytes in the order the decoder takes them. Decoding
symbol i, with x the state of its lane:

    slot = x & (2**precision - 1); s = the symbol with cum[s] <= slot < cum[s] + freq[s]
    x = freq[s] * (x >> precision) + slot - cum[s]
    while x < L: x = (x << 8) | next byte

A stream of zero symbols is zero bytes. Every lane must end at L, where the encoder
started it, and every byte of the stream must be consumed; anything else, including a read
past the stream's end, is corruption. Each lane costs 3-4 bytes over the entropy per
stream: its 4-byte flush, less the few bits of information a final state holds.

Table format. Rows one after another as a little-endian bit stream, zero-padded to a byte.
A row: 4 bits `K - 1`, where every symbol but one keeps at most K significant bits;
`ceil(log2 alphabet)` bits naming that one exception; then per symbol, in order, its
frequency's bit length b (0 for a zero frequency) as the Elias-gamma code of 1 + the
zigzagged difference to the previous symbol's b, then the b - 1 bits below the leading one,
of which only the top K - 1 are stored (the rest are zero) except for the exception. Bit
lengths of a smooth distribution change by 0 or 1 between neighbours, so they cost one to
three bits each: a 32-symbol Laplace-like model takes 20-45 bytes, where a 16-bit CDF takes
66.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np

from kvstore.codecs.base import ContainerError

MIN_PRECISION, MAX_PRECISION = 12, 15
MAX_ALPHABET = 256
MAX_LANES = 32
RANS_L = 1 << 23  # lower bound of a normalized state

# Decoder outcomes per stream.
_OK, _TRUNCATED, _BAD_START, _BAD_END, _TRAILING = 0, 1, 2, 3, 4
_STREAM_ERRORS = {
    _TRUNCATED: "is truncated (it needs more bytes than it has)",
    _BAD_START: "is corrupted (a lane's initial state is out of range)",
    _BAD_END: "is corrupted (a lane did not return to its initial state)",
    _TRAILING: "is corrupted (bytes left over after its last symbol)",
}


# ------------------------------------------------------------------------------ checks


def _check_precision(precision: int) -> int:
    if not MIN_PRECISION <= precision <= MAX_PRECISION:
        raise ValueError(f"precision must be {MIN_PRECISION}-{MAX_PRECISION} bits, got {precision}")
    return int(precision)


def _check_lanes(lanes: int) -> int:
    if not 1 <= lanes <= MAX_LANES:
        raise ValueError(f"lanes must be 1-{MAX_LANES}, got {lanes}")
    return int(lanes)


def _int_table(table: np.ndarray, what: str) -> np.ndarray:
    t = np.asarray(table)
    if t.ndim != 2 or not 1 <= t.shape[1] <= MAX_ALPHABET or t.dtype.kind not in "iu":
        raise ValueError(
            f"{what} must be integers [n_models, alphabet <= {MAX_ALPHABET}], "
            f"got {t.dtype} {t.shape}"
        )
    t = t.astype(np.int64)
    if t.size and t.min() < 0:
        raise ValueError(f"{what} must be >= 0")
    return t


def _check_freqs(freqs: np.ndarray, precision: int) -> np.ndarray:
    """`freqs` as int64 [n_models, alphabet], each row a valid table; ValueError if not."""
    f = _int_table(freqs, "freqs")
    if f.size and (f.max() > 1 << precision or np.any(f.sum(axis=1) != 1 << precision)):
        raise ValueError(f"every row of freqs must sum to 2**{precision}")
    return f


def _check_models(model_of_stream: np.ndarray, n_streams: int, n_models: int) -> np.ndarray:
    m = np.asarray(model_of_stream)
    if m.shape != (n_streams,) or (m.size and m.dtype.kind not in "iu"):
        raise ValueError(f"model_of_stream must be {n_streams} integers, got {m.dtype} {m.shape}")
    m = m.astype(np.int64)
    if m.size and (m.min() < 0 or m.max() >= n_models):
        raise ValueError(f"model_of_stream names a model outside 0-{n_models - 1}")
    return m


def _check_lengths(lengths: np.ndarray | None, n_streams: int, width: int) -> np.ndarray:
    """Symbols per stream as int64 [n_streams], each 0 to `width` (all `width` if None)."""
    if lengths is None:
        return np.full(n_streams, width, np.int64)
    n = np.asarray(lengths)
    if n.shape != (n_streams,) or (n.size and n.dtype.kind not in "iu"):
        raise ValueError(f"lengths must be {n_streams} integers, got {n.dtype} {n.shape}")
    n = n.astype(np.int64)
    if n.size and (n.min() < 0 or n.max() > width):
        raise ValueError(f"lengths must be 0-{width} symbols")
    return n


def _runs(models: np.ndarray) -> tuple[np.ndarray, int]:
    """Streams in model order, and how many runs of them to share among threads: each run
    builds a model's coding table once for all its streams of that model."""
    return np.argsort(models, kind="stable"), min(models.size, numba.get_num_threads())


# ------------------------------------------------------------------------------ frequencies


@numba.njit(cache=True, nogil=True)
def _bit_length(v: int) -> int:
    """Bits of 0 <= v < 2**53 up to its leading one (0 for 0): the exponent of v as a
    float64, exact for such integers, where a loop over the bits cost the table packer
    most of its time."""
    if v == 0:
        return 0
    return int((np.float64(v).view(np.uint64) >> 52) - 1022)


@numba.njit(cache=True, nogil=True)
def _significant_bits(v: int) -> int:
    """Bits from the leading one to the last one of 0 < v < 2**53."""
    return _bit_length(v) - _bit_length(v & -v) + 1


# log2 of every frequency up to 2**MAX_PRECISION + 1 (0 at 0, never used): the gains of
# `_quantize_row` as differences of two loads rather than a logarithm each (half its time).
_LOG2 = np.log2(np.maximum(np.arange((1 << MAX_PRECISION) + 2), 1))


@numba.njit(cache=True, nogil=True)
def _gain(count: float, f: int) -> float:
    """Bits saved over `count` symbols by raising a frequency from f to f + 1."""
    return count * (_LOG2[f + 1] - _LOG2[f])


@numba.njit(cache=True, nogil=True)
def _quantize_row(counts: np.ndarray, total_freq: int, out: np.ndarray) -> None:
    total = counts.sum()
    if total == 0:
        out[0] = total_freq
        return
    seen = np.flatnonzero(counts > 0)
    for s in seen:
        out[s] = max(1, int(counts[s] * total_freq / total + 0.5))
    # The coded size, -sum(count * log2 f), is convex in each f: moving one unit of
    # frequency at a time to where it saves the most reaches the integer optimum. Each
    # symbol's gain from one unit more and cost of one unit less are kept, and only the
    # two symbols a move changes are computed again.
    up = np.empty(seen.size)
    down = np.empty(seen.size)
    for j in range(seen.size):
        _refresh(counts, out, seen, j, up, down)
    excess = out.sum() - total_freq
    while True:
        best_up, best_down = -1, -1
        gain_up, cost_down = -1.0, np.inf
        for j in range(seen.size):
            if up[j] > gain_up:
                best_up, gain_up = j, up[j]
            if down[j] < cost_down:
                best_down, cost_down = j, down[j]
        if excess < 0:
            out[seen[best_up]] += 1
            excess += 1
        elif excess > 0:
            out[seen[best_down]] -= 1
            excess -= 1
        elif best_down >= 0 and best_up != best_down and gain_up > cost_down * (1 + 1e-12):
            out[seen[best_up]] += 1
            out[seen[best_down]] -= 1
        else:
            return
        for j in (best_up, best_down):
            if j >= 0:
                _refresh(counts, out, seen, j, up, down)


@numba.njit(cache=True, nogil=True)
def _refresh(
    counts: np.ndarray, out: np.ndarray, seen: np.ndarray, j: int, up: np.ndarray, down: np.ndarray
) -> None:
    """The gain of one more unit of frequency for symbol seen[j], and the cost of one less
    (infinite at frequency 1: a counted symbol keeps one)."""
    s = seen[j]
    up[j] = _gain(counts[s], out[s])
    down[j] = _gain(counts[s], out[s] - 1) if out[s] > 1 else np.inf


@numba.njit(cache=True, nogil=True)
def _coarsen_row(row: np.ndarray, keep: int) -> None:
    """Round every frequency but the largest to `keep` significant bits, the largest taking
    the difference; left as is when that would more than halve or double the largest."""
    top = np.argmax(row)
    rest = row.sum()
    coarse = row.copy()
    for s in range(row.size):
        b = _bit_length(row[s])
        if s != top and b > keep:
            drop = b - keep
            coarse[s] = ((row[s] + (1 << (drop - 1))) >> drop) << drop
        if s != top:
            rest -= coarse[s]
    if 2 * rest >= row[top] and rest <= 2 * row[top]:
        coarse[top] = rest
        row[:] = coarse


@numba.njit(cache=True, nogil=True, parallel=True)  # a GPU encode's batch: 1,000s of rows
def _quantize(counts: np.ndarray, total_freq: int, keep: int, out: np.ndarray) -> None:
    for m in numba.prange(counts.shape[0]):
        _quantize_row(counts[m], total_freq, out[m])
        if keep > 0:
            _coarsen_row(out[m], keep)


def quantize_freqs(
    counts: np.ndarray, precision: int, *, significant_bits: int | None = None
) -> np.ndarray:
    """Frequencies for coding symbols with these counts ([n_models, alphabet]): uint16 of
    the same shape, each row summing to exactly `2**precision`, the integer table that
    codes the counted symbols in the fewest bits. A symbol counted once or more gets a
    frequency >= 1; one never counted gets 0; a row with no counts puts all mass on 0.

    With `significant_bits` (1-16), every frequency of a row but the largest is rounded
    to that many significant bits, all the table format then stores of them: for 32-symbol
    Laplace-like models, 5 bits add under 0.01% to the coded size and pack the tables
    10-20% smaller at precision 12, 20-35% at 15."""
    precision = _check_precision(precision)
    keep = 0 if significant_bits is None else int(significant_bits)
    if significant_bits is not None and not 1 <= keep <= 16:
        raise ValueError(f"significant_bits must be 1-16, got {significant_bits}")
    c = _int_table(counts, "counts").astype(np.float64)
    out = np.zeros(c.shape, np.int64)
    _quantize(c, 1 << precision, keep, out)
    return out.astype(np.uint16)


# ------------------------------------------------------------------------------ table format


@numba.njit(cache=True, nogil=True)
def _put(buf: np.ndarray, io: np.ndarray, value: int, nbits: int) -> None:
    """Append the low `nbits` of `value` to the bit stream `buf`; `io` holds the byte
    position, the pending bits and their count."""
    io[1] |= value << io[2]
    io[2] += nbits
    while io[2] >= 8:
        buf[io[0]] = io[1] & 0xFF
        io[0] += 1
        io[1] >>= 8
        io[2] -= 8


@numba.njit(cache=True, nogil=True)
def _fill(data: np.ndarray, io: np.ndarray, nbits: int) -> bool:
    """Buffer at least `nbits` (<= 56) of the bit stream `data`; False past its end."""
    while io[2] < nbits:
        if io[0] >= data.size:
            return False
        io[1] |= int(data[io[0]]) << io[2]
        io[0] += 1
        io[2] += 8
    return True


@numba.njit(cache=True, nogil=True)
def _get(data: np.ndarray, io: np.ndarray, nbits: int) -> int:
    """The next `nbits` of the bit stream `data`, or -1 past its end."""
    if not _fill(data, io, nbits):
        return -1
    value = io[1] & ((1 << nbits) - 1)
    io[1] >>= nbits
    io[2] -= nbits
    return value


@numba.njit(cache=True, nogil=True)
def _put_gamma(buf: np.ndarray, io: np.ndarray, v: int) -> None:
    """Elias gamma of v >= 1: a zero per bit of v after its leading one, a one, the bits."""
    n = _bit_length(v) - 1
    _put(buf, io, 1 << n, n + 1)
    _put(buf, io, v & ((1 << n) - 1), n)


@numba.njit(cache=True, nogil=True)
def _get_gamma(data: np.ndarray, io: np.ndarray, max_bits: int) -> int:
    """The next gamma-coded value, or -1 if truncated or if it has more than `max_bits`
    bits after its leading one."""
    _fill(data, io, 2 * max_bits + 1)  # the longest code, or all that is left
    n = 0
    while n < io[2] and not (io[1] >> n) & 1:
        n += 1
    if n > max_bits or 2 * n + 1 > io[2]:
        return -1
    value = (1 << n) | ((io[1] >> (n + 1)) & ((1 << n) - 1))
    io[1] >>= 2 * n + 1
    io[2] -= 2 * n + 1
    return value


@numba.njit(cache=True, nogil=True)
def _pack(freqs: np.ndarray, buf: np.ndarray) -> int:
    n_models, alphabet = freqs.shape
    name_bits = _bit_length(alphabet - 1)
    io = np.zeros(3, np.int64)
    for m in range(n_models):
        row = freqs[m]
        # The exception is the symbol with the most significant bits; K covers the rest.
        exception, most, keep = 0, 0, 1
        for s in range(alphabet):
            if row[s] > 0:
                bits = _significant_bits(row[s])
                if bits > most:
                    keep, most, exception = max(keep, most), bits, s
                else:
                    keep = max(keep, bits)
        _put(buf, io, keep - 1, 4)
        _put(buf, io, exception, name_bits)
        prev = 0
        s = 0
        while s < alphabet:
            if prev == 0 and row[s] == 0:
                # A run of unused symbols (most of a large alphabet): the gamma code of 1,
                # a one bit, each; put 32 at a time.
                run = 1
                while s + run < alphabet and row[s + run] == 0:
                    run += 1
                s += run
                while run > 0:
                    k = min(run, 32)
                    _put(buf, io, (1 << k) - 1, k)
                    run -= k
                continue
            b = _bit_length(row[s])
            d = b - prev
            _put_gamma(buf, io, (2 * d if d >= 0 else -2 * d - 1) + 1)
            prev = b
            stored = b - 1 if s == exception else min(b - 1, keep - 1)
            if stored > 0:
                _put(buf, io, (row[s] >> (b - 1 - stored)) & ((1 << stored) - 1), stored)
            s += 1
    _put(buf, io, 0, 7)  # flush the last partial byte
    return io[0]


@numba.njit(cache=True, nogil=True)  # batches of payloads unpack on several threads
def _unpack(data: np.ndarray, precision: int, freqs: np.ndarray) -> int:
    """Fill `freqs` from `data`; return -1 if all is well, else the first row that is
    wrong (n_models when bytes are left over)."""
    n_models, alphabet = freqs.shape
    name_bits = _bit_length(alphabet - 1)
    io = np.zeros(3, np.int64)
    for m in range(n_models):
        keep = _get(data, io, 4) + 1
        exception = _get(data, io, name_bits)
        if keep < 1 or exception < 0 or exception >= alphabet:
            return m
        prev, total = 0, 0
        for s in range(alphabet):
            # A bit length moves by at most 16, so its zigzag code is at most 32.
            z = _get_gamma(data, io, 5) - 1
            if z < 0:
                return m
            b = prev + (z >> 1 if z % 2 == 0 else -((z + 1) >> 1))
            if b < 0 or b > precision + 1:
                return m
            prev = b
            f = 0
            if b > 0:
                stored = b - 1 if s == exception else min(b - 1, keep - 1)
                mantissa = _get(data, io, stored)
                if mantissa < 0:
                    return m
                f = ((1 << stored) | mantissa) << (b - 1 - stored)
            freqs[m, s] = f
            total += f
        if total != 1 << precision:
            return m
    # All that may remain is the zero padding of the last byte.
    return -1 if io[0] == data.size and io[1] == 0 else n_models


def packed_bound(n_models: int, alphabet: int) -> int:
    """Most bytes `pack_tables` takes for `n_models` rows of `alphabet` symbols: per symbol
    at most an 11-bit gamma code and 15 stored bits; per row 12 bits."""
    return (n_models * (26 * alphabet + 12)) // 8 + 2


def pack_tables(freqs: np.ndarray, precision: int) -> bytes:
    """The frequency tables `freqs` ([n_models, alphabet], rows summing to 2**precision)
    in this module's compact format; `unpack_tables` gives them back exactly."""
    precision = _check_precision(precision)
    f = _check_freqs(freqs, precision)
    buf = np.empty(packed_bound(*f.shape), np.uint8)
    return buf[: _pack(f, buf)].tobytes()


def unpack_tables(
    data: bytes | bytearray | memoryview, n_models: int, alphabet: int, precision: int
) -> np.ndarray:
    """The tables `pack_tables` wrote for `n_models` models of `alphabet` symbols, as
    uint16 [n_models, alphabet]; ContainerError if `data` is truncated, has bytes left
    over, or holds a field out of range or a row that does not sum to 2**precision."""
    precision = _check_precision(precision)
    if n_models < 0 or not 1 <= alphabet <= MAX_ALPHABET:
        raise ValueError(f"no tables of {n_models} models x {alphabet} symbols")
    buf = np.frombuffer(memoryview(data).cast("B"), np.uint8)
    buf.flags.writeable = False  # one compiled signature for bytes and bytearray alike
    freqs = np.zeros((n_models, alphabet), np.int64)
    _check_unpacked(_unpack(buf, precision, freqs), n_models, buf.size, alphabet, precision)
    return freqs.astype(np.uint16)


def _check_unpacked(bad: int, n_models: int, nbytes: int, alphabet: int, precision: int) -> None:
    """ContainerError for `_unpack`'s answer `bad` (-1: all is well)."""
    if bad == n_models:
        raise ContainerError(f"rANS tables: {nbytes} bytes hold more than {n_models} tables")
    if bad >= 0:
        raise ContainerError(
            f"rANS tables: table {bad} of {n_models} is truncated or corrupted "
            f"({nbytes} bytes for {n_models} x {alphabet} symbols at {precision} bits)"
        )


@numba.njit(cache=True, nogil=True, parallel=True)
def _unpack_many(
    data: np.ndarray, data_at: np.ndarray, spans: np.ndarray, precision: int, out: np.ndarray
) -> np.ndarray:
    """`_unpack` of part i, data[data_at[i]:data_at[i + 1]], into its rows of `out`,
    out[spans[i, 0]:spans[i, 1]], the parts in parallel; each part's answer."""
    n = spans.shape[0]
    bad = np.empty(n, np.int64)
    for i in numba.prange(n):
        rows = out[spans[i, 0] : spans[i, 1]]
        rows[:] = 0
        bad[i] = _unpack(data[data_at[i] : data_at[i + 1]], precision, rows)
    return bad


def unpack_tables_into(
    parts: Sequence[np.ndarray],
    spans: Sequence[tuple[int, int]],
    out: np.ndarray,
    precision: int,
) -> None:
    """`unpack_tables` of many packed parts at once, without the GIL and in parallel, into
    rows of the uint16 `out` ([rows, alphabet]): part i's tables (a uint8 array) fill rows
    spans[i][0]:spans[i][1], one row a model. ContainerError (naming the part) for a bad
    part, as `unpack_tables` words it; `out` is then partly written."""
    precision = _check_precision(precision)
    rows = np.asarray(spans, np.int64).reshape(len(parts), 2)
    if out.dtype != np.uint16 or out.ndim != 2 or not 1 <= out.shape[1] <= MAX_ALPHABET:
        raise ValueError("unpack_tables_into writes uint16 rows [rows, alphabet]")
    if np.any(rows[:, 0] > rows[:, 1]) or np.any(rows < 0) or np.any(rows > out.shape[0]):
        raise ValueError(f"unpack_tables_into: spans outside the {out.shape[0]} rows")
    data_at = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([p.size for p in parts], out=data_at[1:])
    data = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    bad = _unpack_many(data, data_at, rows, precision, out)
    for i in np.flatnonzero(bad >= 0).tolist():
        n_models = int(rows[i, 1] - rows[i, 0])
        try:
            _check_unpacked(int(bad[i]), n_models, parts[i].size, out.shape[1], precision)
        except ContainerError as exc:
            raise ContainerError(f"payload {i} of {len(parts)}: {exc}") from None


# ------------------------------------------------------------------------------ encoding


@numba.njit(cache=True, nogil=True)
def _fill_encoder_table(freqs: np.ndarray, precision: int, enc: np.ndarray) -> None:
    """Per symbol 0-255: x_max, reciprocal, shift, bias and complement of its frequency
    (ryg_rans' RansEncSymbolInit), so that encoding multiplies instead of dividing. A
    symbol the model cannot code (frequency 0, or beyond the alphabet) gets x_max = 0."""
    enc[:] = 0
    start = 0
    for s in range(freqs.size):
        f = freqs[s]
        if f == 0:
            continue
        e = enc[s]
        e[0] = f << (31 - precision)
        e[4] = (1 << precision) - f
        if f == 1:
            # x * (2**32 - 1) >> 32 is x - 1, and x + (x - 1) * (M - 1) + M - 1 = x * M.
            e[1], e[2], e[3] = (1 << 32) - 1, 32, start + (1 << precision) - 1
        else:
            shift = _bit_length(f - 1)
            e[1] = ((1 << (shift + 31)) + f - 1) // f
            e[2], e[3] = 32 + shift - 1, start
        start += f


@numba.njit(cache=True, inline="always")
def _push(x: int, s: int, enc: np.ndarray, buf: np.ndarray, ptr: int) -> tuple[int, int]:
    """Encode symbol s into state x, renormalizing into buf below ptr: the new state and
    pointer. Zero to two bytes leave per symbol; writing two always and moving the pointer
    by the count avoids an unpredictable branch (a byte not kept is overwritten later)."""
    x_max = enc[s, 0]
    k = int(x >= x_max) + int(x >= x_max << 8)
    buf[ptr - 1] = x & 0xFF
    buf[ptr - 2] = (x >> 8) & 0xFF
    x >>= 8 * k
    return x + enc[s, 3] + ((x * enc[s, 1]) >> enc[s, 2]) * enc[s, 4], ptr - k


@numba.njit(cache=True, nogil=True)
def _encode_stream(symbols: np.ndarray, enc: np.ndarray, lanes: int, buf: np.ndarray) -> int:
    """Encode one stream backwards into the end of `buf` (room for 2 bytes per symbol and
    4 per lane); return its length, or -1 if a symbol has no frequency in the model.
    Four lanes, the codecs' setting, run unrolled with their states in registers: 20%
    faster than states in an array indexed by lane, which chains each symbol's state
    through memory."""
    n = symbols.size
    ptr = buf.size
    bad = False
    if lanes == 4:
        x0 = x1 = x2 = x3 = RANS_L
        i = n - 1
        while i >= 0 and i % 4 != 3:  # the tail, highest symbol first
            s = symbols[i]
            bad |= enc[s, 0] == 0
            if i % 4 == 0:
                x0, ptr = _push(x0, s, enc, buf, ptr)
            elif i % 4 == 1:
                x1, ptr = _push(x1, s, enc, buf, ptr)
            else:
                x2, ptr = _push(x2, s, enc, buf, ptr)
            i -= 1
        for g in range((i + 1) // 4 - 1, -1, -1):
            s3, s2, s1, s0 = (
                symbols[4 * g + 3],
                symbols[4 * g + 2],
                symbols[4 * g + 1],
                symbols[4 * g],
            )
            bad |= (enc[s3, 0] == 0) | (enc[s2, 0] == 0) | (enc[s1, 0] == 0) | (enc[s0, 0] == 0)
            x3, ptr = _push(x3, s3, enc, buf, ptr)
            x2, ptr = _push(x2, s2, enc, buf, ptr)
            x1, ptr = _push(x1, s1, enc, buf, ptr)
            x0, ptr = _push(x0, s0, enc, buf, ptr)
        state = np.array([x0, x1, x2, x3], np.int64)
    else:
        state = np.full(lanes, RANS_L, np.int64)
        j = (n - 1) % lanes if n else 0  # lane of symbol i, counted down (no division)
        for i in range(n - 1, -1, -1):
            s = symbols[i]
            bad |= enc[s, 0] == 0
            state[j], ptr = _push(state[j], s, enc, buf, ptr)
            j = j - 1 if j else lanes - 1
    if bad:
        return -1
    for j in range(min(lanes, n) - 1, -1, -1):
        ptr -= 4
        for b in range(4):
            buf[ptr + b] = (state[j] >> (8 * b)) & 0xFF
    return buf.size - ptr


@numba.njit(cache=True, parallel=True, nogil=True)
def _encode_all(
    symbols: np.ndarray,
    order: np.ndarray,
    model_of_stream: np.ndarray,
    freqs: np.ndarray,
    precision: int,
    lanes: int,
    n_runs: int,
    counts: np.ndarray,
    out: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
) -> None:
    """Each run of streams (in `order`) coded by one thread, each stream backwards into a
    scratch of one stream's worst case (in L1), then copied to the run's part of `out`,
    from `starts` of the run's first stream on: out[starts[k]:starts[k] + lengths[k]] is
    stream k. A run's part has room for its streams' worst case, but only what they take
    is written. lengths[k] = -1 if a symbol of stream k has no frequency in its model."""
    n = order.size
    for r in numba.prange(n_runs):
        enc = np.empty((MAX_ALPHABET, 5), np.int64)
        scratch = np.empty(2 * symbols.shape[1] + 4 * lanes, np.uint8)
        current = -1
        lo, hi = r * n // n_runs, (r + 1) * n // n_runs
        pos = starts[order[lo]] if hi > lo else 0
        for t in range(lo, hi):
            k = order[t]
            if model_of_stream[k] != current:
                current = model_of_stream[k]
                _fill_encoder_table(freqs[current], precision, enc)
            m = _encode_stream(symbols[k, : counts[k]], enc, lanes, scratch)
            lengths[k] = m
            starts[k] = pos
            if m > 0:
                out[pos : pos + m] = scratch[scratch.size - m :]
                pos += m


@numba.njit(cache=True, nogil=True)  # a copy at memory speed: threads would add little
def _gather_streams(
    coded: np.ndarray, starts: np.ndarray, offsets: np.ndarray, out: np.ndarray
) -> None:
    """out[offsets[k]:offsets[k + 1]] = stream k, from `starts[k]` in `coded`; streams that
    lie back to back there (a run's, when they are in model order) in one copy."""
    n = starts.size
    k = 0
    while k < n:
        j = k + 1
        while j < n and starts[j] == starts[j - 1] + offsets[j] - offsets[j - 1]:
            j += 1
        out[offsets[k] : offsets[j]] = coded[starts[k] : starts[k] + offsets[j] - offsets[k]]
        k = j


def encode_streams(
    symbols: np.ndarray,
    model_of_stream: np.ndarray,
    freqs: np.ndarray,
    precision: int,
    lanes: int = 4,
    lengths: np.ndarray | None = None,
) -> tuple[bytes, np.ndarray]:
    """Encode each row of `symbols` (uint8 [n_streams, n_symbols]) as its own stream with
    the model `freqs[model_of_stream[k]]`; only the first `lengths[k]` symbols of row k if
    `lengths` is given (streams of different lengths). Returns the streams back to back and
    int64 offsets [n_streams + 1] delimiting them. ValueError if a symbol has frequency 0 in
    its stream's model (or lies beyond the model's alphabet)."""
    precision = _check_precision(precision)
    lanes = _check_lanes(lanes)
    f = _check_freqs(freqs, precision)
    sym = np.asarray(symbols)
    if sym.ndim != 2 or sym.dtype != np.uint8:
        raise ValueError(
            f"symbols must be uint8 [n_streams, n_symbols], got {sym.dtype} {sym.shape}"
        )
    sym = np.ascontiguousarray(sym)
    n_streams, n_symbols = sym.shape
    models = _check_models(model_of_stream, n_streams, f.shape[0])
    counts = _check_lengths(lengths, n_streams, n_symbols)
    offsets = np.zeros(n_streams + 1, np.int64)
    if n_streams == 0 or n_symbols == 0:
        return b"", offsets
    order, n_runs = _runs(models)
    # Room for every stream's worst case, in `order`; fresh or reused, only the pages the
    # coded bytes land on are touched.
    starts = np.zeros(n_streams, np.int64)
    starts[order[1:]] = np.cumsum(2 * counts[order[:-1]] + 4 * lanes)
    coded = np.empty(int(starts[order[-1]] + 2 * counts[order[-1]] + 4 * lanes), np.uint8)
    sizes = np.empty(n_streams, np.int64)
    _encode_all(sym, order, models, f, precision, lanes, n_runs, counts, coded, starts, sizes)
    if sizes.min() < 0:
        k = int(np.flatnonzero(sizes < 0)[0])
        row, values = f[models[k]], sym[k, : counts[k]]
        uncodable = (values >= row.size) | (row[np.minimum(values, row.size - 1)] == 0)
        i = int(np.flatnonzero(uncodable)[0])
        raise ValueError(
            f"stream {k}, symbol {i}: value {sym[k, i]} has frequency 0 in model {models[k]}"
        )
    np.cumsum(sizes, out=offsets[1:])
    out = np.empty(int(offsets[-1]), np.uint8)
    _gather_streams(coded, starts, offsets, out)
    return out.tobytes(), offsets


# ------------------------------------------------------------------------------ decoding


def _decoder_tables(n: int, precision: int) -> np.ndarray:
    """Scratch for `n` runs' `_fill_decoder_table`: one entry per slot, 32 bits wide where
    they fit (precision <= 12: 16 KiB, in L1 beside the stream)."""
    return np.empty((n, 1 << precision), np.uint32 if 8 + 2 * precision <= 32 else np.int64)


@numba.njit(cache=True, nogil=True)
def _fill_decoder_table(freqs: np.ndarray, precision: int, table: np.ndarray) -> None:
    """Per slot, everything decoding it needs in one load: its symbol s | (freq[s] - 1) << 8
    | (slot - cum[s]) << (8 + precision). (slot -> symbol, then symbol -> frequency, were
    two loads, the second waiting on the first, on every symbol's critical path.)"""
    start = 0
    for s in range(freqs.size):
        f = freqs[s]
        head = s | (f - 1) << 8
        for j in range(f):
            table[start + j] = head | j << (8 + precision)
        start += f


@numba.njit(cache=True, nogil=True)
def _read_state(data: np.ndarray, pos: int) -> int:
    return (
        int(data[pos])
        | int(data[pos + 1]) << 8
        | int(data[pos + 2]) << 16
        | int(data[pos + 3]) << 24
    )


@numba.njit(cache=True, inline="always")
def _take(x: int, table: np.ndarray, mask: int, precision: int) -> tuple[int, int]:
    """A lane's state `x` with its symbol taken out, before renormalization; the symbol."""
    e = int(table[x & mask])
    return (((e >> 8) & mask) + 1) * (x >> precision) + (e >> (8 + precision)), e & 0xFF


@numba.njit(cache=True, inline="always")
def _step(
    x: int, data: np.ndarray, pos: int, table: np.ndarray, mask: int, precision: int
) -> tuple[int, int, int]:
    """One symbol of one lane: (its next state, the next byte to read, the symbol)."""
    x, s = _take(x, table, mask, precision)
    k = int(x < RANS_L) + int(x < RANS_L >> 8)
    w = int(data[pos]) << 8 | int(data[pos + 1])
    return (x << (8 * k)) | (w >> (16 - 8 * k)), pos + k, s


@numba.njit(cache=True, nogil=True)
def _open_lanes(data: np.ndarray, start: int, end: int, n: int, state: np.ndarray) -> int:
    """Read the initial lane states of a stream of `n` > 0 symbols into `state`: the
    position after them, or minus what is wrong with the stream."""
    active = min(state.size, n)
    if end - start < 4 * active:
        return -_TRUNCATED
    pos = start
    for j in range(active):
        x = _read_state(data, pos)
        # The encoder never leaves [L, 256 L); a state below L could also read an
        # unbounded number of bytes for one symbol.
        if x < RANS_L or x >= RANS_L << 8:
            return -_BAD_START
        state[j] = x
        pos += 4
    return pos


@numba.njit(cache=True, nogil=True)
def _finish(
    data: np.ndarray,
    pos: int,
    end: int,
    table: np.ndarray,
    precision: int,
    state: np.ndarray,
    i: int,
    out: np.ndarray,
) -> int:
    """Decode the rest of a stream, `out[i:]`, from `data[pos:end]` with its lanes in
    `state`; _OK or what is wrong with it. No read goes past `end`."""
    n, lanes = out.size, state.size
    mask = (1 << precision) - 1
    # A symbol reads at most 2 bytes, so a group of `lanes` symbols stays within the
    # stream while 2 * lanes bytes remain. Reading two bytes and keeping 0-2 of them
    # replaces the unpredictable renormalization branch.
    while i + lanes <= n and pos + 2 * lanes <= end:
        for j in range(lanes):
            state[j], pos, out[i + j] = _step(state[j], data, pos, table, mask, precision)
        i += lanes
    while i < n:
        j = i % lanes
        x, s = _take(state[j], table, mask, precision)
        while x < RANS_L:
            if pos >= end:
                return _TRUNCATED
            x = (x << 8) | int(data[pos])
            pos += 1
        state[j] = x
        out[i] = s
        i += 1
    for j in range(min(lanes, n)):
        if state[j] != RANS_L:
            return _BAD_END
    return _OK if pos == end else _TRAILING


@numba.njit(cache=True, nogil=True)
def _decode_stream(
    data: np.ndarray,
    start: int,
    end: int,
    table: np.ndarray,
    precision: int,
    lanes: int,
    out: np.ndarray,
) -> int:
    """Decode `data[start:end]` into `out`; return _OK or what is wrong with the stream."""
    if out.size == 0:
        return _OK if start == end else _TRAILING
    state = np.empty(lanes, np.int64)
    pos = _open_lanes(data, start, end, out.size, state)
    if pos < 0:
        return -pos
    return _finish(data, pos, end, table, precision, state, 0, out)


@numba.njit(cache=True, nogil=True)
def _decode_pair(
    data: np.ndarray,
    a: tuple[int, int],
    b: tuple[int, int],
    table: np.ndarray,
    precision: int,
    out_a: np.ndarray,
    out_b: np.ndarray,
) -> tuple[int, int]:
    """`_decode_stream` of two streams (start, end) of one model with four lanes each, side
    by side: eight independent states where one stream has four, whose table loads and
    multiplies the core overlaps (a stream's lanes share its byte position, so one
    stream's symbols wait on each other's renormalization)."""
    na, nb = out_a.size, out_b.size
    if na < 4 or nb < 4:
        return (
            _decode_stream(data, a[0], a[1], table, precision, 4, out_a),
            _decode_stream(data, b[0], b[1], table, precision, 4, out_b),
        )
    sa, sb = np.empty(4, np.int64), np.empty(4, np.int64)
    pa, pb = _open_lanes(data, a[0], a[1], na, sa), _open_lanes(data, b[0], b[1], nb, sb)
    if pa < 0 or pb < 0:
        return (
            -pa if pa < 0 else _decode_stream(data, a[0], a[1], table, precision, 4, out_a),
            -pb if pb < 0 else _decode_stream(data, b[0], b[1], table, precision, 4, out_b),
        )
    mask = (1 << precision) - 1
    ea, eb = a[1], b[1]
    n = min(na, nb)
    i = 0
    x0, x1, x2, x3 = sa[0], sa[1], sa[2], sa[3]
    y0, y1, y2, y3 = sb[0], sb[1], sb[2], sb[3]
    while i + 4 <= n and pa + 8 <= ea and pb + 8 <= eb:
        x0, pa, out_a[i] = _step(x0, data, pa, table, mask, precision)
        y0, pb, out_b[i] = _step(y0, data, pb, table, mask, precision)
        x1, pa, out_a[i + 1] = _step(x1, data, pa, table, mask, precision)
        y1, pb, out_b[i + 1] = _step(y1, data, pb, table, mask, precision)
        x2, pa, out_a[i + 2] = _step(x2, data, pa, table, mask, precision)
        y2, pb, out_b[i + 2] = _step(y2, data, pb, table, mask, precision)
        x3, pa, out_a[i + 3] = _step(x3, data, pa, table, mask, precision)
        y3, pb, out_b[i + 3] = _step(y3, data, pb, table, mask, precision)
        i += 4
    sa[0], sa[1], sa[2], sa[3] = x0, x1, x2, x3
    sb[0], sb[1], sb[2], sb[3] = y0, y1, y2, y3
    return (
        _finish(data, pa, ea, table, precision, sa, i, out_a),
        _finish(data, pb, eb, table, precision, sb, i, out_b),
    )


@numba.njit(cache=True, parallel=True, nogil=True)
def _decode_all(
    data: np.ndarray,
    offsets: np.ndarray,
    order: np.ndarray,
    model_of_stream: np.ndarray,
    freqs: np.ndarray,
    precision: int,
    lanes: int,
    n_runs: int,
    counts: np.ndarray,
    out: np.ndarray,
    status: np.ndarray,
    tables: np.ndarray,
) -> None:
    n = order.size
    for r in numba.prange(n_runs):
        table = tables[r]
        current = -1
        t, hi = r * n // n_runs, (r + 1) * n // n_runs
        while t < hi:
            k = order[t]
            if model_of_stream[k] != current:
                current = model_of_stream[k]
                _fill_decoder_table(freqs[current], precision, table)
            if lanes == 4 and t + 1 < hi and model_of_stream[order[t + 1]] == current:
                k2 = order[t + 1]
                status[k], status[k2] = _decode_pair(
                    data, (offsets[k], offsets[k + 1]), (offsets[k2], offsets[k2 + 1]),
                    table, precision, out[k, : counts[k]], out[k2, : counts[k2]],
                )  # fmt: skip
                t += 2
                continue
            status[k] = _decode_stream(
                data, offsets[k], offsets[k + 1], table, precision, lanes, out[k, : counts[k]]
            )
            t += 1


def decode_streams(
    data: bytes | bytearray | memoryview,
    offsets: np.ndarray,
    model_of_stream: np.ndarray,
    freqs: np.ndarray,
    precision: int,
    n_symbols: int,
    lanes: int = 4,
    out: np.ndarray | None = None,
    lengths: np.ndarray | None = None,
) -> np.ndarray:
    """Decode what `encode_streams` made: uint8 [n_streams, n_symbols], into `out` if
    given; with `lengths`, stream k fills only the first `lengths[k]` symbols of its row.
    `offsets` must run from 0 to the length of `data`. ContainerError if a stream is
    truncated or corrupted or the offsets do not delimit `data`; ValueError for arguments
    that are wrong whatever the data (tables, models, `out`)."""
    precision = _check_precision(precision)
    lanes = _check_lanes(lanes)
    f = _check_freqs(freqs, precision)
    buf = np.frombuffer(memoryview(data).cast("B"), np.uint8)
    buf.flags.writeable = False  # one compiled signature for bytes and bytearray alike
    off = np.asarray(offsets)
    if off.ndim != 1 or off.size < 1 or off.dtype.kind not in "iu":
        raise ContainerError(f"stream offsets must be integers [n_streams + 1], got {off.shape}")
    off = off.astype(np.int64)
    if off[0] != 0 or off[-1] != buf.size or np.any(np.diff(off) < 0):
        raise ContainerError(
            f"stream offsets do not delimit the {buf.size} bytes of data "
            f"(first {off[0]}, last {off[-1]}, or not ascending)"
        )
    n_streams = off.size - 1
    models = _check_models(model_of_stream, n_streams, f.shape[0])
    if n_symbols < 0:
        raise ValueError(f"n_symbols must be >= 0, got {n_symbols}")
    shape = (n_streams, int(n_symbols))
    if out is None:
        out = np.empty(shape, np.uint8)
    elif out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be contiguous uint8 {shape}, got {out.dtype} {out.shape}")
    counts = _check_lengths(lengths, n_streams, shape[1])
    if n_streams == 0:
        return out
    status = np.empty(n_streams, np.int64)
    order, n_runs = _runs(models)
    tables = _decoder_tables(n_runs, precision)
    _decode_all(buf, off, order, models, f, precision, lanes, n_runs, counts, out, status, tables)
    bad = np.flatnonzero(status)
    if bad.size:
        k = int(bad[0])
        raise ContainerError(f"rANS stream {k} of {n_streams} {_STREAM_ERRORS[int(status[k])]}")
    return out
