"""Disk and memory faults against a real server (issue 9): a write the disk refuses, an
arena full of pinned values. The caller gets a clear status, values already stored read
back byte for byte, and the server keeps serving.

A disk that refuses writes is made with RLIMIT_FSIZE on the server process (SIGXFSZ
ignored, `ServerProcess.file_size_limit`): once its LMDB file would grow past the limit,
every write fails as on a full disk, without needing root to mount a small filesystem.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvstore.errors import ResourceExhausted

from .conftest import ServerProcess
from .helpers import random_tensor

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20


def value(i: int) -> torch.Tensor:
    return random_tensor((4 * MiB,), torch.uint8, seed=i)


def key(i: int) -> bytes:
    return bytes([i + 1]) * 32


def limited_server(tmp_path: Path, limit: int, *flags: str) -> ServerProcess:
    srv = ServerProcess(tmp_path / "srv", *flags)
    srv.file_size_limit = limit
    return srv.start()


def test_a_disk_that_refuses_writes_refuses_puts_and_keeps_what_it_has(tmp_path: Path) -> None:
    srv = limited_server(tmp_path, 40 * MiB, "--tiers", "ssd", "--ssd-bytes", "256MiB")
    stored, refused = [], []
    try:
        with srv.client(timeout=30) as c:
            for i in range(20):
                try:
                    assert c.put(key(i), value(i)) == "ssd"
                    stored.append(i)
                except ResourceExhausted as exc:
                    assert "ssd" in str(exc) and "write" in str(exc), exc
                    refused.append(i)
            assert stored and refused and stored == list(range(len(stored)))
            for i in stored:
                got = c.get(key(i))
                assert got is not None and torch.equal(got, value(i)), i
            assert all(c.get(key(i)) is None for i in refused)
        assert srv.alive()
    finally:
        srv.stop()
    srv.file_size_limit = None  # the disk has room again: everything stored survives a restart
    srv.start()
    try:
        with srv.client(timeout=30) as c:
            for i in stored:
                got = c.get(key(i))
                assert got is not None and torch.equal(got, value(i)), i
            assert c.put(key(50), value(50)) == "ssd"
    finally:
        srv.stop()


def test_a_disk_that_refuses_demotions_turns_them_into_misses(tmp_path: Path) -> None:
    flags = ("--tiers", "cpu,ssd", "--cpu-bytes", "64MiB", "--ssd-bytes", "256MiB")
    srv = limited_server(tmp_path, 96 * MiB, *flags)
    try:
        with srv.client(timeout=30) as c:
            for i in range(30):  # 120 MiB through a 64 MiB cpu tier: demotions must fail
                assert c.put(key(i), value(i)) == "cpu"
            hits = 0
            for i in range(30):
                got = c.get(key(i))
                if got is not None:
                    assert torch.equal(got, value(i)), i
                    hits += 1
            assert 0 < hits < 30
            assert c.stats().tiers["ssd"].entries > 0  # some demotions did land
        assert srv.alive()
        assert "the ssd tier cannot take writes" in srv.log()
    finally:
        srv.stop()


def test_an_arena_full_of_pinned_values_refuses_puts(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "srv", "--tiers", "cpu", "--cpu-bytes", "64MiB").start()
    try:
        with srv.client(timeout=30) as c:
            stored = []
            for i in range(20):
                try:
                    c.put(key(i), value(i))
                except ResourceExhausted:
                    break
                stored.append(i)
                assert c.pin([key(i)]) == 1
            else:
                raise AssertionError("a 64 MiB arena took 80 MiB of pinned values")
            with pytest.raises(ResourceExhausted):
                c.put(key(40), value(40))
            for i in stored:
                got = c.get(key(i))
                assert got is not None and torch.equal(got, value(i)), i
            assert c.unpin([key(stored[0])]) == 1  # room again once one may go
            assert c.put(key(40), value(40)) == "cpu"
        assert srv.alive()
    finally:
        srv.stop()
