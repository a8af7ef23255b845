"""Checks of the machine against a config, for `kvstore-server --check-config`.

`check_environment(config)` looks at what start-up would trip over, without starting
anything: the data directory, room in `/dev/shm` for the cpu arena and on disk for the ssd
tier, a server already on the socket, TCP ports in use, the container's memory limit, and
whether the remote tier's cluster answers.
Each finding is an error (the server would not start or would fail later) or a warning.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from kvstore.config import ConfigError, ServerConfig, format_size, split_address
from kvstore.tiers.host import SHM_DIR, default_arena_path

# Besides the arena: the interpreter, torch and numba, the index, gRPC buffers.
PROCESS_OVERHEAD_BYTES = 1 << 30
CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")


@dataclass(frozen=True)
class Finding:
    level: str  # "error" or "warning"
    message: str


def check_environment(config: ServerConfig, cgroup_max: Path = CGROUP_MEMORY_MAX) -> list[Finding]:
    out: list[Finding] = []
    out += _check_data_dir(config.data_dir)
    if "cpu" in config.tiers:
        shm = config.cpu_bytes
        if "gpu" in config.tiers and config.gpu_twin:
            shm += config.gpu_bytes  # the twin's pool is a /dev/shm file too
        ours = default_arena_path(config.data_dir)
        out += _check_room(SHM_DIR, shm, "cpu-bytes", "shared memory", "error", ours)
    if "ssd" in config.tiers:
        out += _check_room(config.data_dir, config.ssd_bytes, "ssd-bytes", "disk", "warning")
    out += _check_socket(config.socket_path)
    for name in ("listen", "health_listen", "metrics_listen"):
        address = getattr(config, name)
        if address is not None:
            out += _check_port(address, name.replace("_", "-"))
    out += _check_memory_limit(config, cgroup_max)
    out += _check_security(config)
    if "remote" in config.tiers:
        out += _check_remote(config)
    return out


def _check_remote(config: ServerConfig) -> list[Finding]:
    """A warning when no seed of the remote cluster answers: the server would still start
    (serving from its local tiers and retrying), but share nothing until one does."""
    from kvstore.tiers.remote import RemoteTier  # imports redis: only with a remote tier
    from kvstore.tiers.remote import log as remote_log

    quiet, remote_log.disabled = remote_log.disabled, True  # the finding says it
    try:
        tier = RemoteTier(
            config.remote, timeout_s=config.remote_timeout, password=config.remote_password
        )
    finally:
        remote_log.disabled = quiet
    try:
        if tier.connected:
            return []
        return [
            Finding(
                "warning",
                f"remote: no node of the cluster answers at {', '.join(tier.seeds)}; the "
                "server would serve from its local tiers only until one does",
            )
        ]
    finally:
        tier.close()


def _check_security(config: ServerConfig) -> list[Finding]:
    """Certificates, key and tokens file read and checked as the server would at start."""
    from kvstore.auth import ServerSecurity  # imports grpc: only when asked

    try:
        ServerSecurity.load(config)
    except ConfigError as exc:
        return [Finding("error", str(exc))]
    return []


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_data_dir(data_dir: Path) -> list[Finding]:
    if data_dir.exists() and not data_dir.is_dir():
        return [Finding("error", f"data-dir: {data_dir} exists and is not a directory")]
    parent = _existing_parent(data_dir)
    if not parent.is_dir():
        return [Finding("error", f"data-dir: {parent} is not a directory")]
    if not os.access(parent, os.W_OK | os.X_OK):
        what = "data-dir" if parent == data_dir else f"data-dir: cannot create {data_dir}:"
        return [Finding("error", f"{what} {parent} is not writable by uid {os.getuid()}")]
    return []


def _check_room(
    where: Path, need: int, flag: str, what: str, level: str, replaced: Path | None = None
) -> list[Finding]:
    """Does the filesystem of `where` have `need` bytes free? `replaced`: this server's
    arena file, which a start replaces (with its twin), so its bytes count as free; other
    servers' arenas stay in use."""
    parent = _existing_parent(where)
    try:
        st = os.statvfs(parent)
    except OSError as exc:
        return [Finding("error", f"{flag}: cannot inspect {parent}: {exc.strerror}")]
    free = st.f_bavail * st.f_frsize
    if replaced is not None:
        for f in (replaced, Path(f"{replaced}-gpu1")):
            try:
                free += f.stat().st_blocks * 512
            except OSError:
                continue
    if free >= need:
        return []
    return [
        Finding(
            level,
            f"{flag}: {format_size(need)} asked for, but {parent} has {format_size(free)} of "
            f"{what} free",
        )
    ]


def _check_socket(path: Path) -> list[Finding]:
    if not path.exists() and not path.is_symlink():
        parent = _existing_parent(path.parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            return [Finding("error", f"socket: cannot create {path}: {parent} is not writable")]
        return []
    if not stat.S_ISSOCK(path.lstat().st_mode):
        return [Finding("error", f"socket: {path} exists and is not a socket")]
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return []  # a stale socket file: the server removes it
    finally:
        probe.close()
    return [Finding("error", f"socket: a server is already listening on {path}")]


def _check_port(address: str, flag: str) -> list[Finding]:
    host, port = split_address(address, flag)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return [Finding("error", f"{flag}: cannot resolve {host!r}: {exc.strerror}")]
    family, kind, proto, _, sockaddr = infos[0]
    probe = socket.socket(family, kind, proto)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(sockaddr)
    except OSError as exc:
        return [Finding("error", f"{flag}: cannot listen on {address}: {exc.strerror}")]
    finally:
        probe.close()
    return []


def _check_memory_limit(config: ServerConfig, cgroup_max: Path) -> list[Finding]:
    """The arena's pages are charged to this container: its limit must cover them."""
    try:
        text = cgroup_max.read_text().strip()
    except OSError:
        return []
    if text == "max" or not text.isdigit():
        return []
    limit = int(text)
    need = PROCESS_OVERHEAD_BYTES
    if "cpu" in config.tiers:
        need += config.cpu_bytes
    if config.gpu_twin and "gpu" in config.tiers:
        need += config.gpu_bytes
    if need <= limit:
        return []
    return [
        Finding(
            "error",
            f"memory: the container may use {format_size(limit)}, but the cpu arena and the "
            f"process need about {format_size(need)}; raise the memory limit or lower "
            "--cpu-bytes",
        )
    ]
