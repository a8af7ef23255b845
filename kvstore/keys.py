"""Prefix keys: the 32-byte names both engine and store give to chunks of KV.

`chunk_keys(token_ids, chunk_tokens, salt)` chains blake2b over the chunks of a token
sequence: `h_i = blake2b(h_{i-1} || tokens_i as little-endian int32, key=salt)`, with
`h_{-1}` empty. Key i therefore names the whole prefix up to the end of chunk i, and two
prompts share key i exactly when they share that prefix. The salt is the namespace (model,
dtype, layout, parallelism, codec), so two models never read each other's KV. Nothing here
depends on Python's `hash()`: keys match across processes, hosts and restarts.

`doc_key(token_ids, salt)` names a document chunk wherever it appears (RAG chunk reuse):
`blake2b(tokens as little-endian int32, key=salt || "doc")`, without the chain, so the same
document has the same key at any position of any prompt. Its KV is stored as computed at a
known position and re-rotated to where it lands (`kvstore.client.chunks`); the "doc" tag
keeps a document key from ever equalling a prefix key.

`derived_key(key, tag)` names one part of what a key names (a layer group, a layer, a
tenant's copy), for engine adapters that store a chunk as several values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

KEY_BYTES = 32
# Token positions a value may be put at (`ValueHeader.position`): far past any context.
MAX_POSITION = 1 << 40
_BLAKE2B_MAX_KEY = 64


def _blake_key(salt: bytes | str) -> bytes:
    raw = salt.encode() if isinstance(salt, str) else bytes(salt)
    # blake2b takes at most 64 key bytes; a longer salt is condensed, not truncated.
    if len(raw) > _BLAKE2B_MAX_KEY:
        raw = hashlib.blake2b(raw, digest_size=_BLAKE2B_MAX_KEY).digest()
    return raw


def _as_int32_le(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise ValueError(f"token_ids must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token_ids must be integers, got {arr.dtype}")
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ValueError("token_ids must fit in int32")
    return arr.astype("<i4", copy=False)


def chunk_keys(
    token_ids: Sequence[int] | np.ndarray,
    chunk_tokens: int,
    salt: bytes | str,
    *,
    include_partial: bool = False,
) -> list[bytes]:
    """Chained keys of the whole chunks of `token_ids` (and of the partial tail if asked).

    A partial tail chunk has its own key, distinct from the key of any whole chunk, so it
    can be stored and read back but never matches a longer prompt's chunk.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    tokens = _as_int32_le(token_ids)
    key = _blake_key(salt)
    n = len(tokens)
    stop = n if include_partial else n - n % chunk_tokens
    keys: list[bytes] = []
    prev = b""
    for start in range(0, stop, chunk_tokens):
        h = hashlib.blake2b(prev, digest_size=KEY_BYTES, key=key)
        h.update(tokens[start : start + chunk_tokens].tobytes())
        prev = h.digest()
        keys.append(prev)
    return keys


def doc_key(token_ids: Sequence[int] | np.ndarray, salt: bytes | str) -> bytes:
    """The position-independent key of a document chunk's tokens (see the module doc)."""
    tokens = _as_int32_le(token_ids)
    if not tokens.size:
        raise ValueError("a document chunk needs at least one token")
    raw = salt.encode() if isinstance(salt, str) else bytes(salt)
    return hashlib.blake2b(
        tokens.tobytes(), digest_size=KEY_BYTES, key=_blake_key(raw + b"doc")
    ).digest()


def derived_key(key: bytes, tag: bytes) -> bytes:
    """The key of one part of what `key` names (a layer group, a layer, a tenant's copy):
    `blake2b(key || tag)`, as long as `key`. Engine adapters split a chunk into several
    values this way; the tag says which part."""
    return hashlib.blake2b(key + tag, digest_size=len(key)).digest()
