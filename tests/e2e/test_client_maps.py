"""cachegen-x values on the server's ssd, fetched as containers by a client that decodes them
itself (`decode_codecs`, or by default a client with a GPU): the client has not loaded the
profile, so it fetches the cross-layer maps the containers name from the server (the Maps
RPC) once, and decodes them to the bits the server's own decode gives. A client that cannot
get the maps leaves the decoding to the server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "codecs"))
from cross_fixture import LayeredKV

from kvstore.client import AsyncKVClient
from kvstore.codecs import cachegen_profile as cp
from kvstore.codecs import codec_from_spec, decode
from kvstore.errors import DataLoss
from tests.e2e.conftest import NAMESPACE
from tests.e2e.helpers import filler

CHUNK = 256

WORLD = LayeredKV(4, 2, 64, seed=7)


def keys_of(n: int) -> list[bytes]:
    return [bytes([0xB0, i]) + bytes(30) for i in range(n)]


@pytest.fixture
def no_maps_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process starts without any cross-layer maps (other tests load the same ones)."""
    monkeypatch.setattr(cp, "_registry", {})


@pytest.mark.parametrize("kv", [False, True], ids=["maps", "kv-maps"])
def test_a_client_fetches_the_maps_and_decodes_itself(
    start_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_maps_here: None, kv: bool
) -> None:  # type: ignore[no-untyped-def]
    """`kv`: with maps that predict each layer's V from its K too (a version 3 profile)."""
    profile = WORLD.profile_file(tmp_path / "p.json", kv=kv)
    digest = cp.CacheGenProfile.load(profile).cross.digest  # not registered: load() alone
    spec = f"cachegen:level=1,profile={profile}"
    srv = start_server("--cpu-bytes", "4MiB", "--ssd-bytes", "64MiB", "--codec", f"ssd={spec}")
    keys = keys_of(3)
    values = [WORLD.tensor(CHUNK, CHUNK * i, seed=20 + i) for i in range(3)]
    with srv.client() as plain, srv.client(decode_codecs=["cachegen-x"]) as decoding:
        plain.batch_put(keys, values, positions={k: CHUNK * i for i, k in enumerate(keys)})
        filler(plain, 8)
        assert all(e.tier == "ssd" for e in plain.entries(plain.namespace) if e.header.key in keys)
        before = plain.stats()
        assert cp.registered_cross(digest) is None

        out = torch.full((3, *values[0].shape), float("nan"), dtype=torch.float16)
        assert decoding.get_into(keys, out).wait() == [True, True, True]
        assert cp.registered_cross(digest) is not None  # fetched from the server
        after = plain.stats()
        assert after.tiers["cpu"].promotions == before.tiers["cpu"].promotions  # none

        # Twice: the maps are loaded now, and nothing is fetched again.
        again = torch.empty_like(out)
        assert decoding.get_into(keys, again).wait() == [True, True, True]
        assert torch.equal(again, out)

        # The async client fetches them the same way (the shared operation, its driver).
        monkeypatch.setattr(cp, "_registry", {})

        async def fetch_async() -> torch.Tensor:
            got = torch.empty_like(out)
            async with AsyncKVClient(srv.address, NAMESPACE, decode_codecs=["cachegen-x"]) as a:
                assert await (await a.get_into(keys, got)).wait() == [True, True, True]
            return got

        assert torch.equal(asyncio.run(fetch_async()), out)
        assert cp.registered_cross(digest) is not None

        for i, k in enumerate(keys):
            served = plain.get(k)  # the server's own decode (it promotes the value)
            assert served is not None and torch.equal(out[i], served), i
            # and what cachegen-x at the chunk's position makes of it (the newest chunk,
            # none here: a batch_put marks none)
            codec = codec_from_spec(f"cachegen-x:level=1,profile={profile}")
            assert torch.equal(out[i], decode(codec.for_position(CHUNK * i).encode(values[i])))


def test_the_maps_rpc_refuses_what_it_does_not_hold(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from kvstore.v1 import kvstore_pb2 as pb
    from kvstore.wire import PIECE_BYTES, client_stubs

    profile = WORLD.profile_file(tmp_path / "p.json")
    digest = cp.CacheGenProfile.load(profile).cross.digest
    spec = f"cachegen:profile={profile}"
    srv = start_server("--cpu-bytes", "4MiB", "--ssd-bytes", "64MiB", "--codec", f"ssd={spec}")
    with srv.client() as c:
        maps = client_stubs(c._channel)["Maps"]
        for bad, code in [("0123456789abcdef", grpc.StatusCode.NOT_FOUND),
                          ("xyz", grpc.StatusCode.INVALID_ARGUMENT)]:  # fmt: skip
            with pytest.raises(grpc.RpcError) as info:
                list(maps(pb.MapsRequest(digest=bad)))
            assert info.value.code() == code, bad
        pieces = list(maps(pb.MapsRequest(digest=digest)))
        data = b"".join(p.data for p in pieces)
        assert len(pieces) == -(-len(data) // PIECE_BYTES)
        assert all(p.total == len(data) for p in pieces)
        assert cp.maps_from_document(data, digest).digest == digest
        with pytest.raises(ValueError, match="sent for"):
            cp.maps_from_document(data, "0123456789abcdef")
        damaged = bytearray(data)
        damaged[len(damaged) // 2] ^= 0x01
        with pytest.raises(ValueError):
            cp.maps_from_document(bytes(damaged), digest)
        assert c.stats().tiers  # the server goes on serving


def test_a_client_that_cannot_get_the_maps_leaves_decoding_to_the_server(
    start_server, tmp_path: Path, no_maps_here: None
) -> None:  # type: ignore[no-untyped-def]
    """The server restarted without the profile holds cachegen-x values it cannot decode
    nor send maps for: the client asks again without cachegen-x, and the server's answer
    (DataLoss naming the maps) is what it gets; with the profile back, both work."""
    profile = WORLD.profile_file(tmp_path / "p.json")
    flags = ["--cpu-bytes", "4MiB", "--ssd-bytes", "64MiB"]
    with_maps = [*flags, "--codec", f"ssd=cachegen:level=1,profile={profile}"]
    srv = start_server(*with_maps)
    key = keys_of(1)[0]
    value = WORLD.tensor(CHUNK, 512, seed=5)
    with srv.client() as c:
        c.put(key, value, position=512)
        filler(c, 8)
    srv.flags = flags
    srv.restart()
    out = torch.empty_like(value)
    with srv.client(decode_codecs=["cachegen-x"]) as c:
        with pytest.raises(DataLoss, match=r"maps \w+ are not loaded") as refused:
            c.get_into([key], out.unsqueeze(0)).wait()
        assert "the server sent" not in str(refused.value)  # the server's refusal
        assert c.exists([key]) == [True]
    srv.flags = with_maps
    srv.restart()
    with srv.client(decode_codecs=["cachegen-x"]) as c:
        assert c.get_into([key], out.unsqueeze(0)).wait() == [True]
        codec = codec_from_spec(f"cachegen-x:level=1,profile={profile}").for_position(512)
        assert torch.equal(out, decode(codec.encode(value)))


def _drive(op, pieces):  # type: ignore[no-untyped-def]
    """Run a client operation whose one call (Maps) answers `pieces`; what it returns."""
    from kvstore.client._core import Block, Call

    step = next(op)
    assert isinstance(step, Call) and step.method == "Maps" and step.sink is not None
    for piece in pieces:
        step.sink(piece)
    try:
        step = op.send(None)
        while True:
            assert isinstance(step, Block)
            step = op.send(step.fn())
    except StopIteration as stop:
        return stop.value


def test_a_client_refuses_maps_that_arrive_short(
    no_maps_here: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A Maps stream cut short (fewer bytes than its pieces' `total`) is refused by its
    length, with a message that says so, and nothing is loaded; the whole stream loads."""
    from kvstore.client._core import ClientCore
    from kvstore.v1 import kvstore_pb2 as pb

    cross = WORLD.profile().cross
    assert cross is not None
    doc = cp.maps_document(cross)
    pieces = [pb.MapsPiece(data=doc[at : at + 1000], total=len(doc)) for at in (0, 1000)]
    pieces.append(pb.MapsPiece(data=doc[2000:], total=len(doc)))
    core = ClientCore.__new__(ClientCore)  # load_maps keeps no state of its own
    assert _drive(core.load_maps([cross.digest]), pieces[:2]) == {cross.digest}
    assert f"sent 2000 of {len(doc)} bytes" in caplog.text
    assert cp.registered_cross(cross.digest) is None
    assert _drive(core.load_maps([cross.digest]), pieces) == set()
    assert cp.registered_cross(cross.digest) is not None
