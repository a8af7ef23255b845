"""Values go in and come back byte-exact, through a real server process."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kvstore.client import AsyncKVClient, KVClient
from kvstore.keys import chunk_keys

from .helpers import key, random_tensor

DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_round_trips_byte_exact(client: KVClient, dtype: torch.dtype) -> None:
    # Random bit patterns include NaNs and negative zeros: compared as bytes, not values.
    t = random_tensor((4, 2, 16, 3, 8), dtype, seed=DTYPES.index(dtype))
    assert client.put(key(1), t) == "cpu"
    got = client.get(key(1))
    assert got is not None and same_bytes(got, t)


@pytest.mark.parametrize("shape", [(), (0,), (1,), (7, 0, 3), (3, 5, 7)])
def test_odd_shapes_round_trip(client: KVClient, shape: tuple[int, ...]) -> None:
    t = random_tensor(shape, torch.float16)
    client.put(key(2), t)
    got = client.get(key(2))
    assert got is not None and same_bytes(got, t)


def test_value_larger_than_one_message_streams_in_pieces(client: KVClient) -> None:
    t = random_tensor((9 << 20,), torch.int8, seed=3)  # 9 MiB: three pieces
    client.put(key(3), t)
    got = client.get(key(3))
    assert got is not None and same_bytes(got, t)


def test_missing_key_reads_as_none(client: KVClient) -> None:
    assert client.get(key(99)) is None
    assert client.batch_get([key(98), key(97)]) == [None, None]


def test_batch_put_and_get_keep_order_and_report_missing(client: KVClient) -> None:
    ts = [random_tensor((i + 1, 64), torch.bfloat16, seed=i) for i in range(5)]
    keys = [key(10 + i) for i in range(5)]
    assert client.batch_put(keys, ts) == ["cpu"] * 5
    got = client.batch_get([keys[3], key(1000), keys[0], keys[3]])
    assert got[1] is None
    assert same_bytes(got[0], ts[3]) and same_bytes(got[2], ts[0]) and same_bytes(got[3], ts[3])


def test_overwrite_replaces_value(client: KVClient) -> None:
    client.put(key(4), torch.zeros(100, dtype=torch.float32))
    client.put(key(4), torch.ones(3, dtype=torch.float16))
    got = client.get(key(4))
    assert got is not None and same_bytes(got, torch.ones(3, dtype=torch.float16))


def test_lookup_exists_delete_pin(client: KVClient) -> None:
    keys = [key(20 + i) for i in range(4)]
    client.batch_put(keys[:2] + keys[3:], [torch.zeros(8)] * 3)
    assert client.lookup(keys) == 2
    assert client.exists(keys) == [True, True, False, True]
    assert client.pin(keys) == 3
    assert client.stats().pinned == 3
    assert client.unpin(keys) == 3
    assert client.unpin(keys) == 0  # pins never go negative
    assert client.delete(keys) == 3
    assert client.exists(keys) == [False] * 4
    assert client.lookup(keys) == 0


def test_prefix_put_and_get(client: KVClient) -> None:
    ct = client.stats().chunk_tokens
    tokens = list(range(1000, 1000 + 2 * ct + 17))  # two whole chunks and a partial one
    kv = random_tensor((3, 2, len(tokens), 2, 16), torch.bfloat16, seed=7)
    assert client.put_prefix(tokens, kv) == 3
    got = client.get_prefix(tokens)
    assert got is not None and same_bytes(got, kv)

    # A prompt that shares only the first chunk gets exactly that chunk back.
    other = tokens[:ct] + [5] * (ct + 3)
    got = client.get_prefix(other)
    assert got is not None and same_bytes(got, kv[:, :, :ct].contiguous())
    assert client.get_prefix([7] * ct) is None

    # Keys are the documented chained hash, so any process can compute them.
    assert client.lookup(chunk_keys(tokens, ct, client.namespace)) == 2


def test_namespaces_are_isolated(server) -> None:  # type: ignore[no-untyped-def]
    with server.client("model-a") as a, server.client("model-b") as b:
        a.put(key(5), torch.ones(4))
        assert b.get(key(5)) is None
        assert b.lookup([key(5)]) == 0
        ct = a.stats().chunk_tokens
        tokens = list(range(ct))
        a.put_prefix(tokens, torch.zeros(1, 2, ct, 1, 4))
        assert b.get_prefix(tokens) is None


def test_async_client_shares_behaviour(server) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        async with AsyncKVClient(server.address, "test/async") as c:
            t = random_tensor((2, 2, 33, 2, 8), torch.float16, seed=11)
            assert await c.put(key(6), t) == "cpu"
            got = await c.get(key(6))
            assert got is not None and same_bytes(got, t)
            assert await c.lookup([key(6), key(7)]) == 1
            results = await asyncio.gather(*(c.get(key(6)) for _ in range(8)))
            assert all(r is not None and same_bytes(r, t) for r in results)
            ct = (await c.stats()).chunk_tokens
            tokens = list(range(ct + 5))
            kv = random_tensor((1, 2, len(tokens), 1, 8), torch.float32, seed=12)
            await c.put_prefix(tokens, kv)
            got = await c.get_prefix(tokens)
            assert got is not None and same_bytes(got, kv)

    asyncio.run(run())
