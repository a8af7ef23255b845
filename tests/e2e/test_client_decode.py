"""Values only on the ssd tier, stored through cachegen, fetched as containers and decoded by
the client (`KVClient(decode_codecs=...)`): the same bits the server's own decode gives,
nothing promoted, mixed with arena and missing keys in one `get_into`. On a GPU machine the
default client decodes on its GPU (test_cachegen_gpu.py covers that decoder)."""

from __future__ import annotations

import pytest
import torch

from kvstore.codecs import codec_from_spec, decode
from tests.e2e.helpers import gpu_ready

MiB = 1 << 20
SHAPE = (4, 2, 256, 4, 64)  # [layers, K/V, tokens, heads, head_dim]: 1 MiB of float16


def key(i: int) -> bytes:
    return b"D" + i.to_bytes(4, "little") + bytes(27)


def kv(i: int) -> torch.Tensor:
    """KV-like values: channels with their own offsets, drifting slowly along the tokens."""
    g = torch.Generator().manual_seed(i)
    base = torch.randn(SHAPE[0], 2, 1, *SHAPE[3:], generator=g) * 2
    drift = torch.cumsum(torch.randn(SHAPE, generator=g) * 0.05, dim=2)
    return (base + drift).to(torch.float16)


def tiers_of(client) -> dict[bytes, str]:  # type: ignore[no-untyped-def]
    return {e.header.key: e.tier for e in client.entries(client.namespace)}


@pytest.mark.parametrize("codec", ["cachegen", "cachegen-zstd"])
def test_ssd_values_come_as_containers_and_decode_in_the_client(start_server, codec: str) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB", "--codec", f"ssd={codec}")
    with srv.client() as plain, srv.client(decode_codecs=[codec]) as decoding:
        for i in range(12):
            plain.put(key(i), kv(i))
        where = tiers_of(plain)
        on_ssd = [i for i in range(12) if where[key(i)] == "ssd"]
        in_cpu = [i for i in range(12) if where[key(i)] == "cpu"]
        assert len(on_ssd) >= 4 and in_cpu
        before = plain.stats()

        picks = [on_ssd[0], in_cpu[0], on_ssd[1], 99]  # ssd-only, arena, ssd-only, missing
        out = torch.full((len(picks), *SHAPE), float("nan"), dtype=torch.float16)
        found = decoding.get_into([key(i) for i in picks], out).wait()
        assert found == [True, True, True, False]
        assert torch.isnan(out[3]).all()  # a missing key leaves its tensor alone
        assert torch.equal(out[1], kv(in_cpu[0]))  # the arena copy is exact

        after = plain.stats()
        assert after.tiers["cpu"].promotions == before.tiers["cpu"].promotions  # none
        assert after.tiers["ssd"].hits == before.tiers["ssd"].hits + 2
        assert tiers_of(plain)[key(on_ssd[0])] == "ssd"  # still only there

        # The server's own decode (a get promotes the value) gives the same bits, and they
        # are what cachegen makes of the value.
        for pos in (0, 2):
            i = picks[pos]
            served = plain.get(key(i))
            assert served is not None and torch.equal(out[pos], served)
            assert torch.equal(out[pos], decode(codec_from_spec(codec).encode(kv(i))))
            # one quantizer: both codecs decode to the same bits
            assert torch.equal(out[pos], decode(codec_from_spec("cachegen").encode(kv(i))))
            err = (out[pos].float() - kv(i).float()).norm() / kv(i).float().norm()
            assert err < 0.05
        assert plain.stats().tiers["cpu"].promotions == before.tiers["cpu"].promotions + 2


def test_a_client_that_decodes_nothing_gets_decoded_values(start_server) -> None:  # type: ignore[no-untyped-def]
    """The default client (no GPU here) and `decode_codecs=[]` leave decoding to the server."""
    srv = start_server("--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB", "--codec", "ssd=cachegen")
    with srv.client() as plain, srv.client(decode_codecs=[]) as off:
        for i in range(12):
            plain.put(key(i), kv(i))
        where = tiers_of(plain)
        on_ssd = [i for i in range(12) if where[key(i)] == "ssd"][:2]
        before = plain.stats().tiers["cpu"].promotions
        for c, i in ((plain, on_ssd[0]), (off, on_ssd[1])):
            out = torch.empty(SHAPE, dtype=torch.float16)
            assert c.get_into([key(i)], [out]).wait() == [True]
            assert torch.equal(out, decode(codec_from_spec("cachegen").encode(kv(i))))
        assert plain.stats().tiers["cpu"].promotions == before + 2


@pytest.mark.skipif(not gpu_ready(), reason="needs a CUDA GPU and CuPy")
def test_gpu_destinations_decode_on_the_gpu_by_default(start_server) -> None:  # type: ignore[no-untyped-def]
    """The default client with CUDA destinations asks for cachegen containers and decodes
    them on its GPU, into the tensors, on the caller's stream."""
    srv = start_server("--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB", "--codec", "ssd=cachegen")
    with srv.client() as c:
        for i in range(12):
            c.put(key(i), kv(i))
        where = tiers_of(c)
        on_ssd = [i for i in range(12) if where[key(i)] == "ssd"]
        before = c.stats()
        out = torch.empty((len(on_ssd), *SHAPE), dtype=torch.float16, device="cuda")
        stream = torch.cuda.Stream()
        assert c.get_into([key(i) for i in on_ssd], out, stream).wait() == [True] * len(on_ssd)
        after = c.stats()
        assert after.tiers["cpu"].promotions == before.tiers["cpu"].promotions
        for pos, i in enumerate(on_ssd):
            want = decode(codec_from_spec("cachegen").encode(kv(i)))
            assert torch.equal(out[pos].cpu(), want)


def test_after_a_restart_ssd_values_still_come_as_containers(start_server) -> None:  # type: ignore[no-untyped-def]
    """The index rebuilt from the ssd records knows each value's codec."""
    srv = start_server("--cpu-bytes", "8MiB", "--ssd-bytes", "64MiB", "--codec", "ssd=cachegen")
    with srv.client() as c:
        for i in range(12):
            c.put(key(i), kv(i))
    srv.restart()  # a clean stop persists every value to ssd; cpu starts empty
    with srv.client() as plain, srv.client(decode_codecs=["cachegen"]) as decoding:
        before = plain.stats().tiers["cpu"].promotions
        out = torch.empty((3, *SHAPE), dtype=torch.float16)
        assert decoding.get_into([key(i) for i in range(3)], out).wait() == [True] * 3
        assert plain.stats().tiers["cpu"].promotions == before
        for i in range(3):
            assert torch.equal(out[i], decode(codec_from_spec("cachegen").encode(kv(i))))
