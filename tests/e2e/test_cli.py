"""The command lines: `kvstore-server` (flags, config, lifecycle) and `kvstore` (stats, ls).

Both run as real subprocesses (`python -m kvstore.server_cli`, `python -m kvstore.admin_cli`)
with a clean environment: no KVSTORE_* variable leaks in from the shell running the tests.
"""

from __future__ import annotations

import grp
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvstore.client import KVClient
from kvstore.gpu import cuda_device_count

from .conftest import NAMESPACE, ServerProcess
from .test_security import Certs, Tenants

pytestmark = pytest.mark.timeout(120)

SERVER_FLAGS = [
    "--tiers",
    "--data-dir",
    "--socket",
    "--listen",
    "--tls-cert",
    "--tls-key",
    "--tls-client-ca",
    "--auth-tokens",
    "--trust-socket",
    "--socket-group",
    "--health-listen",
    "--metrics-listen",
    "--cpu-bytes",
    "--ssd-bytes",
    "--durability",
    "--chunk-tokens",
    "--max-value-bytes",
    "--max-keys-per-request",
    "--staging-bytes",
    "--grace-seconds",
    "--lease-seconds",
    "--log-level",
    "--log-format",
    "--config",
    "--check-config",
]
GiB = 1 << 30
MiB = 1 << 20


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env["PYTHONIOENCODING"] = "utf-8"
    env.update(extra)
    return env


def run_module(
    module: str,
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env if env is not None else clean_env(),
        timeout=timeout,
    )


def server_cli(*args: str, cwd: Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return run_module("kvstore.server_cli", *args, cwd=cwd, **kw)  # type: ignore[arg-type]


def admin_cli(*args: str, cwd: Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return run_module("kvstore.admin_cli", *args, cwd=cwd, **kw)  # type: ignore[arg-type]


def one_line(text: str) -> str:
    lines = text.strip("\n").splitlines()
    assert len(lines) == 1, f"expected exactly one line, got {len(lines)}:\n{text}"
    return lines[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def key(i: int) -> bytes:
    return bytes([i]) * 32


# ------------------------------------------------------------------ kvstore-server flags


def test_help_lists_every_flag(tmp_path: Path) -> None:
    r = server_cli("--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    missing = [f for f in SERVER_FLAGS if f not in r.stdout]
    assert not missing, f"--help does not mention {missing}:\n{r.stdout}"
    assert r.stdout.startswith("usage: kvstore-server")


@pytest.mark.skipif(cuda_device_count()[0] > 0, reason="this machine has a CUDA GPU")
def test_gpu_tier_without_cuda_exits_2_with_one_line(tmp_path: Path) -> None:
    r = server_cli("--tiers", "gpu,cpu,ssd", "--data-dir", str(tmp_path / "d"), cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    line = one_line(r.stderr)
    assert "gpu" in line and "CUDA" in line, line
    assert r.stdout == ""
    assert not (tmp_path / "d" / "kvstore.sock").exists()


BAD_SETTINGS = {
    # name: (flags, word the error must contain)
    "size-with-unknown-unit": (["--cpu-bytes", "64gigs"], "cpu-bytes"),
    "size-not-a-number": (["--ssd-bytes", "lots"], "ssd-bytes"),
    "cpu-tier-too-small": (["--cpu-bytes", "4KiB"], "cpu-bytes"),
    "unknown-tier": (["--tiers", "cpu,tape"], "tiers"),
    "tier-twice": (["--tiers", "cpu,cpu"], "tiers"),
    "listen-without-port": (["--listen", "localhost"], "listen"),
    "listen-port-out-of-range": (["--listen", "127.0.0.1:70000"], "listen"),
    "chunk-tokens-zero": (["--chunk-tokens", "0"], "chunk-tokens"),
    "max-keys-zero": (["--max-keys-per-request", "0"], "max-keys-per-request"),
    "staging-below-max-value": (["--max-value-bytes", "2GiB"], "staging-bytes"),
    "negative-grace": (["--grace-seconds=-1"], "grace-seconds"),
    "zero-lease": (["--lease-seconds=0"], "lease-seconds"),
    "unknown-log-level": (["--log-level", "loud"], "log-level"),
    "socket-path-too-long": (["--socket", "/tmp/" + "s" * 200 + ".sock"], "socket"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS.values()), ids=list(BAD_SETTINGS))
def test_bad_setting_exits_2_with_one_line_naming_it(tmp_path: Path, case: tuple) -> None:
    flags, word = case
    started = time.monotonic()
    r = server_cli(*flags, "--data-dir", str(tmp_path / "d"), cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    line = one_line(r.stderr)
    assert line.startswith("kvstore-server: ") and word in line, line
    assert "Traceback" not in r.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "d" / "kvstore.sock").exists()


def test_bad_size_names_the_value_and_how_to_write_it(tmp_path: Path) -> None:
    r = server_cli("--cpu-bytes", "64gigs", cwd=tmp_path)
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert "cpu-bytes" in line and "'64gigs'" in line and "GiB" in line and "flag" in line, line


def test_bad_setting_from_environment_or_file_says_where_it_came_from(tmp_path: Path) -> None:
    r = server_cli("--check-config", cwd=tmp_path, env=clean_env(KVSTORE_CPU_BYTES="64gigs"))
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert "cpu-bytes" in line and "environment" in line, line

    cfg = tmp_path / "bad.toml"
    cfg.write_text('ssd-bytes = "lots"\n')
    r = server_cli("--check-config", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert "ssd-bytes" in line and str(cfg) in line, line

    cfg.write_text('cpu-bytez = "1GiB"\n')
    r = server_cli("--check-config", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert "cpu-bytez" in line and "unknown" in line, line

    cfg.write_text("cpu-bytes = [\n")
    r = server_cli("--check-config", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 2
    assert "TOML" in one_line(r.stderr)

    r = server_cli("--check-config", "--config", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert r.returncode == 2
    assert "does not exist" in one_line(r.stderr)


def _check_config(tmp_path: Path, *flags: str, **env: str) -> dict:
    r = server_cli("--check-config", *flags, cwd=tmp_path, env=clean_env(**env))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("table", [True, False], ids=["server-table", "top-level"])
def test_check_config_merges_flags_over_file_over_environment(tmp_path: Path, table: bool) -> None:
    cfg = tmp_path / "kvstore.toml"
    cfg.write_text(
        ("[server]\n" if table else "")
        + 'cpu-bytes = "4GiB"\n'
        + 'ssd-bytes = "5GiB"\n'
        + "max-keys-per-request = 100\n"
        + 'tiers = ["ssd", "cpu"]\n'
    )
    data_dir = tmp_path / "data"
    got = _check_config(
        tmp_path,
        "--config",
        str(cfg),
        "--cpu-bytes",
        "8GiB",
        "--data-dir",
        str(data_dir),
        KVSTORE_CPU_BYTES="2GiB",
        KVSTORE_SSD_BYTES="3GiB",
        KVSTORE_CHUNK_TOKENS="64",
        KVSTORE_LOG_LEVEL="debug",
        KVSTORE_MAX_KEYS_PER_REQUEST="7",
    )
    assert got["cpu_bytes"] == 8 * GiB  # flag > file > env
    assert got["ssd_bytes"] == 5 * GiB  # file > env
    assert got["max_keys_per_request"] == 100  # file > env
    assert got["chunk_tokens"] == 64  # env > default
    assert got["log_level"] == "debug"  # env > default
    assert got["tiers"] == "cpu,ssd"  # file, in the fixed hierarchy order
    assert got["max_value_bytes"] == 256 * MiB  # default
    assert got["listen"] is None
    assert got["data_dir"] == str(data_dir)
    assert got["socket"] == str(data_dir / "kvstore.sock")
    # --check-config serves nothing.
    assert not data_dir.exists() or not (data_dir / "kvstore.sock").exists()


def test_check_config_reads_every_flag_and_kvstore_config(tmp_path: Path) -> None:
    certs, tenants = Certs(tmp_path), Tenants(tmp_path / "tokens.toml")
    group = grp.getgrgid(os.getgid()).gr_name
    got = _check_config(
        tmp_path,
        "--tiers",
        "remote,ssd,cpu",
        "--data-dir",
        str(tmp_path / "d"),
        "--socket",
        str(tmp_path / "s.sock"),
        "--listen",
        "127.0.0.1:5999",
        "--gpu-bytes",
        "5MiB",
        "--gpu-twin",
        "--cpu-bytes",
        "3MiB",
        "--ssd-bytes",
        "2TB",
        "--ssd-write-ahead",
        "0.25",
        "--encode-gpu",
        "off",
        "--durability",
        "sync",
        "--codec",
        "ssd=zstd:level=2",
        "--codec",
        "ssd[llama-*]=raw",
        "--codec",
        "remote=zstd",
        "--remote",
        "redis://:pw@10.0.0.5:6379,rediss://10.0.0.6:6380",
        "--remote-write",
        "evict",
        "--remote-piece-bytes",
        "256KiB",
        "--remote-timeout",
        "0.5",
        "--remote-backoff",
        "3",
        "--remote-ttl",
        "60",
        "--remote-queue-bytes",
        "8MiB",
        "--remote-workers",
        "4",
        "--chunk-tokens",
        "128",
        "--max-value-bytes",
        "1.5MiB",
        "--max-keys-per-request",
        "99",
        "--staging-bytes",
        "4.1MB",
        "--grace-seconds",
        "2.5",
        "--lease-seconds",
        "7",
        "--eviction",
        "gdsf",
        "--log-level",
        "WARNING",
        "--log-format",
        "JSON",
        "--health-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "[::1]:0",
        "--tls-cert",
        str(certs.server_pem),
        "--tls-key",
        str(certs.server_key),
        "--tls-client-ca",
        str(certs.ca_pem),
        "--auth-tokens",
        str(tenants.path),
        "--trust-socket",
        "--socket-group",
        group,
        "--max-inflight-requests",
        "12",
        "--max-inflight-bytes",
        "3MiB",
        "--max-leases",
        "100",
        "--max-watchers",
        "7",
        "--watch-queue-events",
        "100",
        "--quota",
        "cpu[a/*]=1MiB",
        "--quota",
        "ssd[a/*]=2MiB",
    )
    assert got == {
        "tiers": "cpu,ssd,remote",
        "data_dir": str(tmp_path / "d"),
        "socket": str(tmp_path / "s.sock"),
        "listen": "127.0.0.1:5999",
        "gpu_bytes": 5 * MiB,
        "gpu_twin": True,
        "cpu_bytes": 3 * MiB,
        "ssd_bytes": 2 * 10**12,
        "ssd_write_ahead": 0.25,
        "encode_gpu": "off",
        "durability": "sync",
        "codec": "ssd=zstd:level=2;ssd[llama-*]=raw;remote=zstd",
        "remote": "redis://:***@10.0.0.5:6379,rediss://10.0.0.6:6380",
        "remote_password": None,
        "remote_write": "evict",
        "remote_piece_bytes": 256 * 1024,
        "remote_timeout": 0.5,
        "remote_backoff": 3.0,
        "remote_ttl": 60.0,
        "remote_queue_bytes": 8 * MiB,
        "remote_workers": 4,
        "chunk_tokens": 128,
        "max_value_bytes": 3 * MiB // 2,
        "max_keys_per_request": 99,
        "staging_bytes": 4_100_000,
        "grace_seconds": 2.5,
        "lease_seconds": 7.0,
        "eviction": "gdsf",
        "log_level": "warning",
        "log_format": "json",
        "health_listen": "127.0.0.1:0",
        "metrics_listen": "[::1]:0",
        "tls_cert": str(certs.server_pem),
        "tls_key": str(certs.server_key),
        "tls_client_ca": str(certs.ca_pem),
        "auth_tokens": str(tenants.path),
        "trust_socket": True,
        "socket_group": group,
        "max_inflight_requests": 12,
        "max_inflight_bytes": 3 * MiB,
        "max_leases": 100,
        "max_watchers": 7,
        "watch_queue_events": 100,
        "quota": "cpu[a/*]=1MiB;ssd[a/*]=2MiB",
    }
    # KVSTORE_CONFIG names the file when --config does not.
    cfg = tmp_path / "env.toml"
    cfg.write_text('chunk-tokens = 32\ncpu-bytes = "16MiB"\n')
    got = _check_config(tmp_path, KVSTORE_CONFIG=str(cfg), KVSTORE_CHUNK_TOKENS="64")
    assert (got["chunk_tokens"], got["cpu_bytes"]) == (32, 16 * MiB)


def test_check_config_finds_what_would_stop_the_server(
    tmp_path: Path, server: ServerProcess
) -> None:
    # A small ssd tier: the default's 16 GiB would warn on a disk with less free.
    r = server_cli(
        "--check-config",
        "--data-dir",
        str(tmp_path / "fresh"),
        "--ssd-bytes",
        "64MiB",
        cwd=tmp_path,
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    shm = os.statvfs("/dev/shm")
    too_much = (shm.f_bavail * shm.f_frsize) // MiB + 1024
    (tmp_path / "a-file").write_text("")
    with busy:
        r = server_cli(
            "--check-config", "--data-dir", str(tmp_path / "a-file" / "d"),
            "--socket", str(server.socket), "--metrics-listen", f"127.0.0.1:{port}",
            "--cpu-bytes", f"{too_much}MiB", "--ssd-bytes", "64MiB", cwd=tmp_path,
        )  # fmt: skip
    assert r.returncode == 1, r.stderr
    errors = r.stderr.splitlines()
    assert all(line.startswith("kvstore-server: error: ") for line in errors), r.stderr
    joined = "\n".join(errors)
    assert "data-dir:" in joined and "not a directory" in joined
    assert f"metrics-listen: cannot listen on 127.0.0.1:{port}" in joined
    assert "cpu-bytes:" in joined and "shared memory free" in joined
    assert f"a server is already listening on {server.socket}" in joined
    assert json.loads(r.stdout)["metrics_listen"] == f"127.0.0.1:{port}"


# ------------------------------------------------------------------ serving


def test_unix_socket_is_private(server: ServerProcess) -> None:
    st = os.stat(server.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    with server.client(timeout=10) as c:
        arena = Path(c.stats().host_arena_path)
    assert stat.S_IMODE(os.stat(arena).st_mode) == 0o600, oct(os.stat(arena).st_mode)


def test_listen_also_serves_over_tcp(start_server: Callable[..., ServerProcess]) -> None:
    port = free_port()
    srv = start_server(
        "--cpu-bytes", "64MiB", "--ssd-bytes", "256MiB", "--listen", f"127.0.0.1:{port}"
    )
    t = torch.arange(1000, dtype=torch.int32)
    with srv.client(timeout=10) as over_uds:
        over_uds.put(key(1), t)
    with KVClient(f"127.0.0.1:{port}", NAMESPACE, timeout=10) as over_tcp:
        got = over_tcp.get(key(1))
        assert got is not None and torch.equal(got, t)
        over_tcp.put(key(2), t * 2)
    with srv.client(timeout=10) as over_uds:
        got = over_uds.get(key(2))
        assert got is not None and torch.equal(got, t * 2)


@pytest.fixture
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def test_standard_health_check_reports_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "kvstore.v1.KVStore"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as ei:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_services(channel: grpc.Channel) -> None:
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="kvstore.v1.KVStore"),
    ]
    listed, described = list(refl.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"kvstore.v1.KVStore", "grpc.health.v1.Health"} <= names, names

    from google.protobuf import descriptor_pb2

    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    kv = next(f for f in files if f.name == "kvstore/v1/kvstore.proto")
    (svc,) = [s for s in kv.service if s.name == "KVStore"]
    methods = {m.name for m in svc.method}
    assert {"Put", "Get", "BatchPut", "BatchGet", "Lookup", "Exists", "Delete", "Stats"} <= methods


# ------------------------------------------------------------------ lifecycle


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_and_removes_socket_and_arena(
    start_server: Callable[..., ServerProcess], sig: signal.Signals
) -> None:
    srv = start_server("--cpu-bytes", "64MiB", "--ssd-bytes", "256MiB")
    with srv.client(timeout=10) as c:
        c.put(key(1), torch.ones(64, dtype=torch.float16))
        arena = Path(c.stats().host_arena_path)
    assert arena.exists() and srv.socket.exists()
    started = time.monotonic()
    assert srv.stop(sig, timeout=30) == 0, srv.log()[-3000:]
    assert time.monotonic() - started < 15
    assert not srv.socket.exists(), "the socket file was left behind"
    assert not arena.exists(), f"the shared-memory arena {arena} was left behind"
    assert "Traceback" not in srv.log(), srv.log()[-3000:]


def test_second_server_on_the_same_data_dir_is_refused(server: ServerProcess) -> None:
    with server.client(timeout=10) as c:
        t = torch.arange(64, dtype=torch.float32)
        c.put(key(1), t)
        arena = Path(c.stats().host_arena_path)
    r = server_cli(
        "--data-dir", str(server.data_dir), "--cpu-bytes", "64MiB", "--ssd-bytes", "256MiB",
        cwd=server.data_dir.parent, timeout=60,
    )  # fmt: skip
    assert r.returncode != 0
    line = one_line(r.stderr)
    assert "another kvstore-server" in line and str(server.data_dir) in line, line
    assert server.proc is not None and str(server.proc.pid) in line, line
    # The refused server touched nothing of the first one's.
    assert server.alive() and server.socket.exists() and arena.exists()
    with server.client(timeout=10) as c:
        got = c.get(key(1))
        assert got is not None and torch.equal(got, t)


def test_second_server_on_the_same_socket_is_refused(server: ServerProcess, tmp_path: Path) -> None:
    r = server_cli(
        "--data-dir", str(tmp_path / "other"), "--socket", str(server.socket),
        "--cpu-bytes", "64MiB", "--ssd-bytes", "256MiB",
        cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert r.returncode != 0
    line = one_line(r.stderr)
    assert "already listening" in line and str(server.socket) in line, line
    assert server.alive() and server.socket.exists()
    with server.client(timeout=10) as c:
        c.stats()


def test_server_killed_with_sigkill_restarts_on_the_same_data_dir(
    start_server: Callable[..., ServerProcess],
) -> None:
    srv = start_server("--cpu-bytes", "64MiB", "--ssd-bytes", "256MiB")
    assert srv.stop(signal.SIGKILL) == -signal.SIGKILL
    assert srv.socket.exists()  # stale: nobody removed it
    srv.start()  # the stale socket and the dead process's lock must not block a new server
    with srv.client(timeout=10) as c:
        c.put(key(1), torch.ones(4))
        assert c.exists([key(1)]) == [True]


# ------------------------------------------------------------------ kvstore stats / ls

OTHER_NAMESPACE = "test/model-b"


@pytest.fixture
def populated(server: ServerProcess) -> ServerProcess:
    """Three values moved to ssd by a restart, one of them read back into cpu, two new in
    cpu, and one in another namespace: cpu holds 4, ssd 3, 6 entries in all."""
    with server.client(timeout=10) as c:
        for i in range(3):
            c.put(key(i), torch.full((4, 8), float(i), dtype=torch.float16))
    server.restart()  # shutdown copies the cpu tier to ssd; restart rebuilds from ssd
    with server.client(timeout=10) as c:
        assert c.get(key(0)) is not None  # promoted back to cpu, ssd copy kept
        for i in (3, 4):
            c.put(key(i), torch.zeros(3, dtype=torch.int8))
    with server.client(OTHER_NAMESPACE, timeout=10) as c:
        c.put(key(9), torch.zeros(2, 5, dtype=torch.bfloat16))
    return server


EXPECTED_ENTRIES = {
    # (namespace, key index): (dtype, shape, bytes, tier)
    (NAMESPACE, 0): ("float16", [4, 8], 64, "cpu"),
    (NAMESPACE, 1): ("float16", [4, 8], 64, "ssd"),
    (NAMESPACE, 2): ("float16", [4, 8], 64, "ssd"),
    (NAMESPACE, 3): ("int8", [3], 3, "cpu"),
    (NAMESPACE, 4): ("int8", [3], 3, "cpu"),
    (OTHER_NAMESPACE, 9): ("bfloat16", [2, 5], 20, "cpu"),
}


def _table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line)[1:-1]]
        if cells:
            rows.append(cells)
    return rows


def test_stats_prints_a_table_per_tier(populated: ServerProcess) -> None:
    r = admin_cli("--address", populated.address, "stats", cwd=populated.data_dir.parent)
    assert r.returncode == 0, r.stderr
    rows = {row[0]: row for row in _table_rows(r.stdout)}
    header = rows["tier"]
    entries_col = header.index("entries")
    assert rows["cpu"][entries_col] == "4", r.stdout
    assert rows["ssd"][entries_col] == "3", r.stdout
    assert "capacity" in header and rows["cpu"][header.index("capacity")] == "64.0 MiB"
    assert rows["ssd"][header.index("capacity")] == "256.0 MiB"
    assert re.search(r"\bentries 6\b", r.stdout), r.stdout


def test_stats_json_matches_the_server(populated: ServerProcess) -> None:
    r = admin_cli("--address", populated.address, "stats", "--json", cwd=populated.data_dir.parent)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    with populated.client(timeout=10) as c:
        want = c.stats()
    assert got["entries"] == want.entries == 6
    assert got["version"] == want.version
    assert got["host_arena_path"] == want.host_arena_path
    assert set(got["tiers"]) == {"cpu", "ssd"}
    for name, t in want.tiers.items():
        g = got["tiers"][name]
        for field in ("entries", "used_bytes", "capacity_bytes", "hits", "misses", "promotions"):
            assert g[field] == getattr(t, field), (name, field)
    assert (got["tiers"]["cpu"]["entries"], got["tiers"]["ssd"]["entries"]) == (4, 3)


def test_ls_lists_the_stored_keys(populated: ServerProcess) -> None:
    r = admin_cli("--address", populated.address, "ls", cwd=populated.data_dir.parent)
    assert r.returncode == 0, r.stderr
    rows = _table_rows(r.stdout)
    assert rows[0][:2] == ["namespace", "key"], r.stdout
    listed = {(row[0], row[1]) for row in rows[1:]}
    want = {(ns, key(i).hex()[:16] + "…") for ns, i in EXPECTED_ENTRIES}
    assert listed == want, r.stdout
    assert "6 entries" in r.stdout

    r = admin_cli(
        "--address", populated.address, "ls", "--namespace", OTHER_NAMESPACE,
        cwd=populated.data_dir.parent,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert {row[0] for row in _table_rows(r.stdout)[1:]} == {OTHER_NAMESPACE}
    assert "1 entries" in r.stdout


def test_ls_json_gives_one_object_per_line(populated: ServerProcess) -> None:
    r = admin_cli("--address", populated.address, "ls", "--json", cwd=populated.data_dir.parent)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == len(EXPECTED_ENTRIES), r.stdout
    got = {}
    for line in lines:
        obj = json.loads(line)
        assert {"namespace", "key", "dtype", "shape", "bytes", "tier"} <= set(obj), obj
        fields = (obj["dtype"], obj["shape"], obj["bytes"], obj["tier"])
        got[(obj["namespace"], obj["key"])] = fields
    want = {(ns, key(i).hex()): v for (ns, i), v in EXPECTED_ENTRIES.items()}
    assert got == want

    r = admin_cli(
        "--address", populated.address, "ls", "--json", "--limit", "2",
        cwd=populated.data_dir.parent,
    )  # fmt: skip
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 2, r.stdout


def test_health_says_serving(populated: ServerProcess) -> None:
    r = admin_cli("--address", populated.address, "health", cwd=populated.data_dir.parent)
    assert (r.returncode, r.stdout.strip()) == (0, "SERVING"), r.stderr
    r = admin_cli(
        "--address", populated.address, "health", "--service", "kvstore.v1.KVStore",
        cwd=populated.data_dir.parent,
    )  # fmt: skip
    assert (r.returncode, r.stdout.strip()) == (0, "SERVING"), r.stderr
    bare = str(populated.socket)  # a plain socket path, as `stats` takes it
    r = admin_cli("--address", bare, "health", cwd=populated.data_dir.parent)
    assert (r.returncode, r.stdout.strip()) == (0, "SERVING"), r.stderr
    r = admin_cli(
        "--address", populated.address, "health", "--service", "no.such.Service",
        cwd=populated.data_dir.parent,
    )  # fmt: skip
    assert r.returncode == 1 and "NOT_FOUND" in one_line(r.stderr), r.stderr


def follow_admin(
    server: ServerProcess, *args: str
) -> tuple[subprocess.Popen[str], list[str], threading.Thread]:
    """`kvstore --address ADDRESS *args` running, with a thread collecting its output lines."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstore.admin_cli", "--address", server.address, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    return proc, lines, reader


def test_stats_watch_redraws_rates_until_interrupted(populated: ServerProcess) -> None:
    proc, lines, reader = follow_admin(populated, "stats", "--watch", "0.2")
    with populated.client(timeout=10) as c:
        # Reads while the watch runs, so that rates move: from its first sample on (into a
        # pipe it prints each one; a loaded machine can take seconds to start it), for a few
        # more samples.
        deadline = time.monotonic() + 60
        while not any("every 0.2s" in line for line in lines) and time.monotonic() < deadline:
            c.get(key(0))
            time.sleep(0.01)
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            c.get(key(0))
            time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    reader.join(timeout=10)
    err = proc.stderr.read()
    out = "".join(lines)
    assert proc.returncode == 0, err
    rows = {row[0]: row for row in _table_rows(out)}
    header = rows["tier"]
    assert "hits/s" in header and "hit ratio" in header, out
    assert float(rows["cpu"][header.index("hits/s")]) > 0, out
    assert "every 0.2s" in out and "Traceback" not in err


def test_events_print_the_snapshot_then_each_change(populated: ServerProcess) -> None:
    r = admin_cli(
        "--address", populated.address, "events", "--snapshot", "--json", "--count", "8",
        cwd=populated.data_dir.parent, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    kinds = [row["kind"] for row in rows]
    assert kinds == ["SNAPSHOT_BEGIN", *["SNAPSHOT"] * 6, "SNAPSHOT_END"], r.stdout
    held = {(row["namespace"], row["key"]): row["tiers"][0] for row in rows[1:7]}
    assert held == {(ns, key(i).hex()): v[3] for (ns, i), v in EXPECTED_ENTRIES.items()}

    # Live: a put and a delete while it follows, as text lines (after 5 SNAPSHOT lines).
    proc, lines, reader = follow_admin(
        populated, "events", "--namespace", NAMESPACE, "--snapshot", "--count", "9"
    )
    deadline = time.monotonic() + 60
    while not any("SNAPSHOT_END" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.02)
    with populated.client(timeout=10) as c:
        c.put(key(7), torch.zeros(16, dtype=torch.float16))
        assert c.delete([key(7)]) == 1
    proc.wait(timeout=30)
    reader.join(timeout=10)
    assert proc.returncode == 0, proc.stderr.read()
    live = [line.split() for line in lines if "SNAPSHOT" not in line]
    assert [(f[1], f[3]) for f in live] == [
        ("STORED", key(7).hex()[:16]),
        ("DELETED", key(7).hex()[:16]),
    ], lines
    assert live[0][4:6] == ["cpu", "->"] and live[0][6] == "cpu", lines
    assert int(live[1][0]) > int(live[0][0])  # seq grows


def test_address_defaults_to_kvstore_address(populated: ServerProcess) -> None:
    r = admin_cli(
        "stats", "--json", cwd=populated.data_dir.parent,
        env=clean_env(KVSTORE_ADDRESS=populated.address),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["entries"] == 6
    r = admin_cli(
        "ls", "--json", cwd=populated.data_dir.parent,
        env=clean_env(KVSTORE_DATA_DIR=str(populated.data_dir)),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 6


@pytest.mark.parametrize(
    "command", [["stats"], ["stats", "--json"], ["ls"], ["ls", "--json"], ["health"]]
)
@pytest.mark.parametrize("where", ["unix", "tcp"])
def test_dead_address_exits_1_with_one_line(tmp_path: Path, where: str, command: list) -> None:
    address = f"unix://{tmp_path}/nobody.sock" if where == "unix" else f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    r = admin_cli("--address", address, "--timeout", "5", *command, cwd=tmp_path, timeout=30)
    assert r.returncode == 1, (r.stdout, r.stderr)
    line = one_line(r.stderr)
    assert line.startswith(f"kvstore: {address}: "), line
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert time.monotonic() - started < 20
