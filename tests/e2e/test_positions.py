"""A value's position in its sequence travels with its put (`put_prefix` gives each chunk's;
`put(position=)`, `batch_put(positions=)` any value's), and a server storing through
`cachegen` with a cross-layer profile codes the chunks at their positions with cachegen-x,
the newest one level finer; values without a position through cachegen itself."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "codecs"))
from cross_fixture import LayeredKV

from kvstore.codecs import codec_from_spec, decode
from kvstore.errors import InvalidArgument
from tests.e2e.helpers import filler, gpu_ready
from tests.e2e.test_metrics import free_port, scrape, value

CHUNK = 256  # the server's default --chunk-tokens
WORLD = LayeredKV(4, 2, 64)  # 2 KiB of float16 a token


def coded(spec: str, value: torch.Tensor, position: int | None = None) -> torch.Tensor:
    """What `spec` (at `position`) decodes `value` to: the bits a server serves."""
    codec = codec_from_spec(spec)
    if position is not None:
        codec = codec.for_position(position, value.shape)
    return decode(codec.encode(value))


def test_prefix_chunks_are_coded_at_their_positions(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    profile = WORLD.profile_file(tmp_path / "p.json")
    spec = f"cachegen:level=1,profile={profile}"
    srv = start_server("--cpu-bytes", "4MiB", "--ssd-bytes", "64MiB", "--codec", f"ssd={spec}")
    with srv.client() as c:
        tokens = list(range(1000, 1000 + 3 * CHUNK + 100))  # 3 whole chunks and a partial
        prefix = WORLD.tensor(len(tokens), 0, seed=3)
        assert c.put_prefix(tokens, prefix) == 4
        keys = c.prefix_keys(tokens)
        filler(c, 8)
        read_back_from_ssd(c, keys, prefix, profile)


def read_back_from_ssd(c, keys: list[bytes], prefix: torch.Tensor, profile: Path) -> None:  # type: ignore[no-untyped-def]
    """Each of a prefix's chunks (`keys`) is on ssd, and reads back as cachegen-x coded it
    at its position, level 1, the last whole chunk and the partial one (the newest) at 0."""
    where = {e.header.key: e.tier for e in c.entries(c.namespace)}
    assert all(where[k] == "ssd" for k in keys)
    for i, k in enumerate(keys):
        chunk = prefix[:, :, i * CHUNK : (i + 1) * CHUNK].contiguous()
        level = 0 if i >= 2 else 1
        want = coded(f"cachegen-x:level={level},profile={profile}", chunk, i * CHUNK)
        got = c.get(k)
        assert got is not None and torch.equal(got, want), i


@pytest.mark.parametrize(
    "on",
    [
        "host",
        pytest.param("gpu", marks=pytest.mark.skipif(not gpu_ready(), reason="needs a CUDA GPU")),
    ],
)
def test_the_ssd_writer_codes_chunks_at_their_positions(  # type: ignore[no-untyped-def]
    start_server, tmp_path: Path, on: str
) -> None:
    """A server's ssd writer (`--ssd-write-ahead`) stores prefixes' chunks as a put's
    eviction would: cachegen-x at their positions, the newest a level finer. On a GPU
    (`--encode-gpu 0`) whole chunks go in batches across levels and prefixes, and every
    value is still the host's bytes; on the host, a value per thread."""
    profile = WORLD.profile_file(tmp_path / "p.json")
    spec = f"cachegen:level=1,profile={profile}"
    metrics = free_port()
    srv = start_server(
        "--cpu-bytes", "16MiB", "--ssd-bytes", "64MiB", "--codec", f"ssd={spec}",
        "--encode-gpu", "0" if on == "gpu" else "off", "--ssd-write-ahead", "1.0",
        "--metrics-listen", f"127.0.0.1:{metrics}",
    )  # fmt: skip
    with srv.client() as c:
        prefixes = []
        for p in range(2):
            tokens = list(range(1000 * (p + 1), 1000 * (p + 1) + 3 * CHUNK + 240))
            prefix = WORLD.tensor(len(tokens), 0, seed=3 + p)
            assert c.put_prefix(tokens, prefix) == 4
            prefixes.append((c.prefix_keys(tokens), prefix))
        deadline = time.monotonic() + 90
        other = "host" if on == "gpu" else "gpu"
        while value(scrape(metrics), "kvstore_ssd_writer_encoded_total", on=on) < 8:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.1)
        assert value(scrape(metrics), "kvstore_ssd_writer_encoded_total", on=other) == 0
        filler(c, 24)
        for keys, prefix in prefixes:
            read_back_from_ssd(c, keys, prefix, profile)
        # The writer's time: writing to ssd, and waiting for the encodes before each write.
        samples = scrape(metrics)
        for doing in ("writing", "waiting"):
            assert value(samples, "kvstore_ssd_writer_seconds_total", doing=doing) > 0


def test_positions_a_client_gives(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    profile = WORLD.profile_file(tmp_path / "p.json")
    spec = f"cachegen:level=1,profile={profile}"
    srv = start_server("--cpu-bytes", "4MiB", "--ssd-bytes", "64MiB", "--codec", f"ssd={spec}")
    keys = [bytes([0xA0, i]) + bytes(30) for i in range(4)]
    values = [WORLD.tensor(CHUNK, 512 * i, seed=10 + i) for i in range(4)]
    other = torch.randn(2, 2, CHUNK, 2, 64).half()  # 2 layers: not what the maps are for
    with srv.client() as c:
        c.put(keys[0], values[0], position=0)
        c.batch_put(keys[1:3], values[1:3], positions={keys[2]: np.int64(1024)})
        c.put(keys[3], other, position=256)
        with pytest.raises(InvalidArgument, match="positions names a key this put does not"):
            c.batch_put(keys[:1], values[:1], positions={keys[3]: 0})
        with pytest.raises(InvalidArgument, match="must be an int"):
            c.put(keys[0], values[0], position=-1)
        filler(c, 8)
        assert torch.equal(c.get(keys[0]), coded(f"cachegen-x:profile={profile}", values[0], 0))
        assert torch.equal(c.get(keys[1]), coded(spec, values[1]))  # no position given
        assert torch.equal(c.get(keys[2]), coded(f"cachegen-x:profile={profile}", values[2], 1024))
        # A profile is for one model's shape: cachegen stores other values raw, position or not.
        assert torch.equal(c.get(keys[3]), other)


def test_a_server_without_the_profile_keeps_what_it_cannot_decode(
    start_server, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """cachegen-x values on ssd decode only where their maps are loaded: a server restarted
    without the profile refuses them (DataLoss, saying why) but keeps them, and serves
    them again once restarted with it."""
    from kvstore.errors import DataLoss

    profile = WORLD.profile_file(tmp_path / "p.json")
    flags = ["--cpu-bytes", "4MiB", "--ssd-bytes", "64MiB"]
    with_maps = [*flags, "--codec", f"ssd=cachegen:level=1,profile={profile}"]
    srv = start_server(*with_maps)
    key = bytes([0xC0]) + bytes(31)
    value = WORLD.tensor(CHUNK, 256, seed=4)
    with srv.client() as c:
        c.put(key, value, position=256)
        filler(c, 8)
        want = c.get(key)
    assert want is not None
    srv.flags = flags  # no codec: the maps are not loaded
    srv.restart()
    with srv.client() as c:
        with pytest.raises(DataLoss, match=r"maps \w+ are not loaded"):
            c.get(key)
        assert c.exists([key]) == [True]
    srv.flags = with_maps
    srv.restart()
    with srv.client() as c:
        got = c.get(key)
        assert got is not None and torch.equal(got, want)
