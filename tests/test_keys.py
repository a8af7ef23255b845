"""Prefix keys: a blake2b chain that must agree across processes, hosts and restarts."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from kvstore.keys import KEY_BYTES, chunk_keys, doc_key

SALT = b"llama-3-8b/bf16/tp0of1/raw"


def reference_keys(tokens: list[int], chunk: int, salt: bytes, partial: bool) -> list[bytes]:
    """The documented chain, written out with hashlib and struct only."""
    key = salt if len(salt) <= 64 else hashlib.blake2b(salt, digest_size=64).digest()
    stop = len(tokens) if partial else len(tokens) - len(tokens) % chunk
    out, prev = [], b""
    for start in range(0, stop, chunk):
        part = tokens[start : start + chunk]
        prev = hashlib.blake2b(
            prev + struct.pack(f"<{len(part)}i", *part), digest_size=32, key=key
        ).digest()
        out.append(prev)
    return out


def test_known_answer_matches_independent_chain() -> None:
    tokens = [1, 0, -1, 2**31 - 1, -(2**31), 128000, 7, 9, 11, 13]
    keys = chunk_keys(tokens, 4, SALT)
    assert keys == reference_keys(tokens, 4, SALT, partial=False)
    assert len(keys) == 2
    assert all(len(k) == KEY_BYTES == 32 for k in keys)


def test_known_answer_first_key_literal() -> None:
    # Pinned literally so a change of the chain (byte order, digest size) cannot hide
    # behind a reference that changes with it.
    first = hashlib.blake2b(struct.pack("<4i", 1, 2, 3, 4), digest_size=32, key=b"s").digest()
    assert chunk_keys([1, 2, 3, 4], 4, b"s") == [first]


def test_str_salt_equals_its_utf8_bytes() -> None:
    assert chunk_keys(range(8), 4, "modèl") == chunk_keys(range(8), 4, "modèl".encode())


def test_accepts_numpy_and_any_integer_dtype() -> None:
    tokens = list(range(100, 116))
    want = chunk_keys(tokens, 4, SALT)
    for dtype in (np.int32, np.int64, np.uint16, np.uint32, ">i8"):
        assert chunk_keys(np.array(tokens, dtype=dtype), 4, SALT) == want


@pytest.mark.parametrize("seed", ["0", "12345"])
def test_same_keys_in_another_process_with_another_hash_seed(seed: str) -> None:
    tokens = list(range(1000, 1037))
    here = [k.hex() for k in chunk_keys(tokens, 8, "ns-\u00e9", include_partial=True)]
    code = (
        "from kvstore.keys import chunk_keys\n"
        "print(' '.join(k.hex() for k in "
        f"chunk_keys({tokens!r}, 8, 'ns-\\u00e9', include_partial=True)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == here


def test_shared_prefix_shares_leading_keys_then_diverges() -> None:
    base = list(range(40))
    other = base.copy()
    other[21] = 99_999  # chunk 5 of size 4 (tokens 20..23)
    a, b = chunk_keys(base, 4, SALT), chunk_keys(other, 4, SALT)
    assert len(a) == len(b) == 10
    assert a[:5] == b[:5]
    # The chain carries the difference into every later chunk, even identical ones.
    assert all(x != y for x, y in zip(a[5:], b[5:], strict=True))


def test_key_depends_on_whole_prefix_not_just_chunk() -> None:
    # Chunk 1 has the same tokens in both prompts; only chunk 0 differs.
    a = chunk_keys([1, 2, 3, 4, 5, 6, 7, 8], 4, SALT)
    b = chunk_keys([9, 2, 3, 4, 5, 6, 7, 8], 4, SALT)
    assert a[1] != b[1]


def test_extending_a_prompt_keeps_its_keys() -> None:
    tokens = list(range(64))
    assert chunk_keys(tokens[:32], 8, SALT) == chunk_keys(tokens, 8, SALT)[:4]


def test_different_salt_gives_different_keys() -> None:
    tokens = list(range(32))
    a = chunk_keys(tokens, 8, b"model-a")
    b = chunk_keys(tokens, 8, b"model-b")
    assert not set(a) & set(b)
    assert chunk_keys(tokens, 8, b"") != a


def test_partial_tail_only_with_include_partial() -> None:
    tokens = list(range(10))
    whole = chunk_keys(tokens, 4, SALT)
    with_tail = chunk_keys(tokens, 4, SALT, include_partial=True)
    assert len(whole) == 2
    assert len(with_tail) == 3
    assert with_tail[:2] == whole
    assert with_tail[2] == reference_keys(tokens, 4, SALT, partial=True)[2]
    # The tail's key is not the key of the whole chunk that would complete it.
    completed = chunk_keys([*tokens, 10, 11], 4, SALT)
    assert with_tail[2] != completed[2]


def test_exact_multiple_has_no_extra_key_with_include_partial() -> None:
    tokens = list(range(12))
    assert chunk_keys(tokens, 4, SALT, include_partial=True) == chunk_keys(tokens, 4, SALT)


def test_short_and_empty_inputs() -> None:
    assert chunk_keys([1, 2, 3], 4, SALT) == []
    assert len(chunk_keys([1, 2, 3], 4, SALT, include_partial=True)) == 1
    assert chunk_keys([], 4, SALT) == []
    assert chunk_keys(np.array([], dtype=np.float32), 4, SALT) == []


@pytest.mark.parametrize(
    "tokens",
    [
        np.zeros((2, 4), dtype=np.int32),
        [[1, 2], [3, 4]],
        np.int32(5),
        [1.0, 2.0, 3.0, 4.0],
        np.array([1.5, 2.5]),
        [True, False],
        [2**31],
        [-(2**31) - 1],
        [2**64],
        np.array([2**40], dtype=np.int64),
        ["a", "b"],
    ],
    ids=[
        "2d-array",
        "2d-list",
        "scalar",
        "float-list",
        "float-array",
        "bool",
        "above-int32",
        "below-int32",
        "beyond-int64",
        "int64-array-above-int32",
        "strings",
    ],
)
def test_bad_tokens_raise_value_error(tokens: object) -> None:
    with pytest.raises(ValueError):
        chunk_keys(tokens, 4, SALT)  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk", [0, -1, -256])
def test_non_positive_chunk_tokens_raise_value_error(chunk: int) -> None:
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunk_keys([1, 2, 3, 4], chunk, SALT)


def test_int32_bounds_are_accepted() -> None:
    keys = chunk_keys([-(2**31), 2**31 - 1], 2, SALT)
    assert keys == reference_keys([-(2**31), 2**31 - 1], 2, SALT, partial=False)


def test_salt_longer_than_blake2b_key_limit() -> None:
    tokens = list(range(16))
    long_a = b"a" * 65 + b"/tp0of8"
    long_b = b"a" * 65 + b"/tp1of8"
    a = chunk_keys(tokens, 4, long_a)
    b = chunk_keys(tokens, 4, long_b)
    assert len(a) == 4
    assert a == reference_keys(tokens, 4, long_a, partial=False)
    # Condensed, not truncated: salts that differ only past byte 64 stay apart.
    assert not set(a) & set(b)
    assert chunk_keys(tokens, 4, "x" * 1000) == chunk_keys(tokens, 4, b"x" * 1000)
    # Exactly 64 bytes is used as is.
    salt64 = bytes(range(64))
    first = hashlib.blake2b(struct.pack("<4i", 0, 1, 2, 3), digest_size=32, key=salt64).digest()
    assert chunk_keys(tokens, 4, salt64)[0] == first


# ------------------------------------------------------------------------------ doc keys


def test_doc_key_is_the_documented_hash() -> None:
    tokens = [5, -1, 2**31 - 1, 128000]
    want = hashlib.blake2b(struct.pack("<4i", *tokens), digest_size=32, key=SALT + b"doc").digest()
    assert doc_key(tokens, SALT) == want
    assert doc_key(np.array(tokens, dtype=np.int64), SALT.decode()) == want


def test_doc_key_names_the_tokens_not_their_place() -> None:
    doc = list(range(100, 164))
    # The same document inside two prompts at different offsets: one key.
    a, b = [1, 2, 3, *doc], [9, *doc, 4]
    assert doc_key(a[3:], SALT) == doc_key(b[1:65], SALT) == doc_key(doc, SALT)
    assert doc_key(doc[:-1], SALT) != doc_key(doc, SALT)
    assert doc_key(doc, SALT + b"x") != doc_key(doc, SALT)
    # Never a prefix key, even of the same tokens as the first chunk of a prompt.
    assert doc_key(doc, SALT) not in chunk_keys(doc, 64, SALT, include_partial=True)


def test_doc_key_refuses_no_tokens() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        doc_key([], SALT)
