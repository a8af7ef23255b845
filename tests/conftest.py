"""Fixtures shared by the unit tests of several modules."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from kvstore.config import ServerConfig
from kvstore.store import Store

if TYPE_CHECKING:
    from _redis_cluster import LocalCluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

MakeStore = Callable[..., Store]


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(
    script: str, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `benchmarks/<script>` with `args` as a user would; fails the test, with its
    output, if it exits with an error."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, (
        f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc


def require_redis_server() -> str:
    """The redis-server binary; without one the test fails under CI (or with
    KVSTORE_REQUIRE_REDIS=1, as scripts/test.sh sets) and is skipped elsewhere."""
    from _redis_cluster import redis_server_binary

    binary = redis_server_binary()
    if binary is not None:
        return binary
    reason = (
        "redis-server is not on PATH; this test runs real Redis servers "
        "(install it with `apt-get install redis-server`)"
    )
    if os.environ.get("CI") or os.environ.get("KVSTORE_REQUIRE_REDIS") == "1":
        pytest.fail(f"CI or KVSTORE_REQUIRE_REDIS is set but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A 3-master Redis Cluster on loopback, shared by a module's tests; a test that kills
    a master restarts it before it ends."""
    from _redis_cluster import local_cluster

    binary = require_redis_server()
    with local_cluster(tmp_path_factory.mktemp("redis-cluster"), 3, binary) as cluster:
        yield cluster


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[MakeStore]:
    """`make_store(**settings)`: stores with a 4 MiB cpu arena and 16 MiB of ssd by default,
    closed at teardown. Without the background ssd writer unless asked for
    (`ssd_write_ahead`): what eviction writes is then what each test says."""
    opened: list[Store] = []

    def make(**overrides: Any) -> Store:
        settings: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "cpu_bytes": "4MiB",
            "ssd_bytes": "16MiB",
            "ssd_write_ahead": 0,
        }
        settings.update(overrides)
        s = Store(ServerConfig(**settings))
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()
