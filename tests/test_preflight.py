"""`kvstore-server --check-config`'s checks of the machine, one at a time."""

from __future__ import annotations

import socket
from pathlib import Path

from _redis_cluster import LocalCluster

from kvstore.config import ServerConfig
from kvstore.preflight import PROCESS_OVERHEAD_BYTES, check_environment

MiB = 1 << 20
# Tests of other checks ask for an ssd tier any machine has room for: the default (16 GiB)
# would add a free-disk warning on a fuller disk.
SSD = "64MiB"


def _messages(config: ServerConfig, cgroup: Path) -> list[str]:
    return [f"{f.level}: {f.message}" for f in check_environment(config, cgroup)]


def test_a_fresh_data_dir_passes(tmp_path: Path) -> None:
    config = ServerConfig(data_dir=tmp_path / "new" / "dir", cpu_bytes="16MiB", ssd_bytes=SSD)
    assert _messages(config, tmp_path / "no-cgroup") == []


def test_memory_limit_below_the_arena_is_an_error(tmp_path: Path) -> None:
    cgroup = tmp_path / "memory.max"
    config = ServerConfig(data_dir=tmp_path / "d", cpu_bytes="64MiB", ssd_bytes=SSD)
    cgroup.write_text(f"{PROCESS_OVERHEAD_BYTES + 32 * MiB}\n")
    (got,) = _messages(config, cgroup)
    assert got.startswith("error: memory:") and "--cpu-bytes" in got
    cgroup.write_text(f"{PROCESS_OVERHEAD_BYTES + 64 * MiB}\n")
    assert _messages(config, cgroup) == []
    cgroup.write_text("max\n")
    assert _messages(config, cgroup) == []
    # Without the cpu tier the arena costs nothing.
    ssd_only = ServerConfig(data_dir=tmp_path / "d", tiers="ssd", ssd_bytes=SSD)
    cgroup.write_text(f"{PROCESS_OVERHEAD_BYTES}\n")
    assert _messages(ssd_only, cgroup) == []


def test_ssd_larger_than_the_disk_is_a_warning(tmp_path: Path) -> None:
    config = ServerConfig(data_dir=tmp_path, ssd_bytes="1000000TiB")
    (got,) = _messages(config, tmp_path / "no-cgroup")
    assert got.startswith("warning: ssd-bytes:") and "disk free" in got


def test_a_stale_socket_file_is_fine_and_a_regular_file_is_not(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # bound, never listening, then closed: a stale socket file
    config = ServerConfig(data_dir=tmp_path, socket=path, cpu_bytes="16MiB", ssd_bytes=SSD)
    assert _messages(config, tmp_path / "no-cgroup") == []
    path.unlink()
    path.write_text("")
    (got,) = _messages(config, tmp_path / "no-cgroup")
    assert got == f"error: socket: {path} exists and is not a socket"


def test_a_remote_cluster_that_does_not_answer_is_a_warning(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    cfg = ServerConfig(
        data_dir=tmp_path / "d", tiers="cpu,remote", remote=f"redis://127.0.0.1:{port}"
    )
    [finding] = [f for f in check_environment(cfg) if f.message.startswith("remote:")]
    assert finding.level == "warning" and f"127.0.0.1:{port}" in finding.message


def test_a_remote_cluster_that_answers_passes(tmp_path: Path, redis_cluster: LocalCluster) -> None:
    cfg = ServerConfig(data_dir=tmp_path / "d", tiers="cpu,remote", remote=redis_cluster.urls[1])
    assert [f for f in check_environment(cfg) if f.message.startswith("remote:")] == []
