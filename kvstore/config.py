"""Server configuration: one typed, validated dataclass.

`ServerConfig.load()` merges, from highest precedence to lowest: command-line flags, a TOML
file (`--config`), `KVSTORE_*` environment variables, then the defaults below. Sizes are
parsed strictly (`"64GiB"`, `"512MB"`, `"1048576"`); anything else is a clear error.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from kvstore import threads

KNOWN_TIERS = ("gpu", "cpu", "ssd", "remote")
DURABILITY_MODES = ("none", "async", "sync")
REMOTE_WRITE_MODES = ("through", "evict", "off")
# Redis refuses a bulk string over 512MB (proto-max-bulk-len's default).
MAX_REMOTE_PIECE_BYTES = 512 << 20
# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


class ConfigError(ValueError):
    """A setting is missing, malformed or out of range; the message says which and why."""


def parse_size(value: str | int, what: str = "size") -> int:
    """Bytes from `"64GiB"`, `"1.5 GB"`, `"4096"` or an int; rejects anything vaguer."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size like 64GiB, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(str(value))
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _UNITS:
            raise ConfigError(
                f"{what}: cannot read {value!r} as a size; write e.g. 512MiB, 64GiB, 2TB or "
                "a plain number of bytes"
            )
        # Decimal, not float: "4.1MB" is 4100000 bytes, not 4099999.
        exact = Decimal(m.group(1)) * _UNITS[unit]
        if exact != exact.to_integral_value():
            raise ConfigError(f"{what}: {value!r} is not a whole number of bytes")
        n = int(exact)
    if n < 0:
        raise ConfigError(f"{what}: must not be negative, got {value!r}")
    return n


def format_size(n: float) -> str:
    """Readable binary size: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class ServerConfig:
    """Everything `kvstore-server` needs to start."""

    tiers: tuple[str, ...] = ("cpu", "ssd")
    """Tiers to run, fastest first; any of gpu, cpu, ssd, remote."""
    data_dir: Path = Path("kvstore-data")
    """Directory for the ssd tier's LMDB environment and, by default, the socket."""
    socket: Path | None = None
    """Unix socket to listen on (mode 0600); default `<data_dir>/kvstore.sock`."""
    listen: str | None = None
    """Optional TCP address HOST:PORT to listen on as well as the socket."""
    health_listen: str | None = None
    """Optional TCP address HOST:PORT serving only the gRPC health service, for Kubernetes
    `grpc` probes: safe to open on the pod's address while data stays on the socket."""
    metrics_listen: str | None = None
    """Optional TCP address HOST:PORT of a Prometheus endpoint (`/metrics`)."""
    tls_cert: Path | None = None
    """PEM certificate (chain) of the `listen` address: with `tls_key`, TCP is TLS."""
    tls_key: Path | None = None
    """PEM private key of `tls_cert`, unencrypted."""
    tls_client_ca: Path | None = None
    """PEM CA bundle: clients on `listen` must present a certificate it signed (mTLS)."""
    auth_tokens: Path | None = None
    """Tokens file (TOML, or JSON by its .json suffix) of tenants, their token hashes and
    the namespaces each may read and write: every data call then needs a token."""
    trust_socket: bool = False
    """With `auth_tokens`: Unix-socket callers that send no token may use every namespace
    (whoever can open the socket can open the shared-memory arena anyway)."""
    socket_group: str | None = None
    """Group given access to the socket and the shared-memory files (mode 0660); default
    none: the owner only (0600)."""
    gpu_bytes: int = 4 << 30
    """Size of the gpu tier's pool on each visible GPU."""
    gpu_twin: bool = False
    """Run the gpu tier as one pool of shared host memory standing in for a GPU, on a
    machine without one: for testing the gpu tier's protocol, never faster than cpu."""
    cpu_bytes: int = 1 << 30
    """Size of the shared-memory host arena (cpu tier)."""
    ssd_bytes: int = 16 << 30
    """Bytes of values the ssd tier may hold."""
    ssd_write_ahead: float = 0.125
    """Share of the cpu tier that a background thread keeps copied to ssd ahead of
    eviction: once the tier has less free room than this share, the values eviction would
    take next, within this share, are encoded (through the ssd codec) and written to ssd,
    several at once, off the store's lock; evicting them then frees their memory at once
    instead of encoding and writing them on the put that needs the room. 0: values are
    written to ssd only when evicted. Between 0 and 1."""
    encode_gpu: str = "auto"
    """Where the ssd writer encodes values whose ssd codec encodes on a GPU too (cachegen):
    "auto", on the gpu tier's first CUDA GPU when the server has one, else on host threads;
    "off", always on host threads; a CUDA device number N, on that GPU (the cpu arena is then
    pinned for copies to it). On a GPU the values are encoded in batches, into the same
    bytes as on the host, leaving the host's cores to the serving engine beside it; while
    a burst of writes runs that takes ~400 MB of the GPU's memory beyond the gpu tier,
    given back once the writer has not encoded on the GPU for 2 seconds."""
    durability: str = "async"
    """When the ssd tier's writes reach the disk. "sync": a put acknowledged as stored on
    ssd is on disk first (LMDB syncs on commit; concurrent puts share one flush), so it
    survives power loss as far as the disk honours fsync. "async": flushed every second
    and at shutdown; a power loss may lose the last second of writes. "none": never flushed
    explicitly (the kernel writes back when it likes). In every mode a killed server loses
    no committed write: they are in the kernel's page cache."""
    codec: tuple[str, ...] = ()
    """How the ssd and remote tiers encode values, as rules `TIER=SPEC` (every namespace)
    and `TIER[GLOB]=SPEC` (namespaces matching a shell-style glob, checked first, in order);
    e.g. `ssd=zstd`, `ssd[llama-3-8b/*]=kivi:bits=4`, `remote=zstd`. Unmatched namespaces:
    raw. Lossy codecs should be opted into per namespace: readers get the decoded
    approximation."""
    remote: tuple[str, ...] = ()
    """The remote tier's Redis/Valkey Cluster: seed node URLs (`redis://[:PASSWORD@]HOST:PORT`,
    `rediss://` for TLS), comma-separated; any one that answers gives the whole cluster's
    slot map. One URL of a plain (non-cluster) Redis works too."""
    remote_password: str | None = field(default=None, repr=False)
    """Password of the remote cluster when its URLs carry none; set it through the
    KVSTORE_REMOTE_PASSWORD environment variable (from a Kubernetes Secret) rather than a
    flag, which other users of the host can read in the process list."""
    remote_write: str = "through"
    """What the node writes to the remote tier: "through" (a copy of every put, in the
    background: puts never wait for Redis; values leaving the node unwritten go too),
    "evict" (only values leaving the node's last local tier: write-back) or "off" (reads
    only). A value fetched from remote is never written back."""
    remote_piece_bytes: int = 1 << 20
    """Largest record a value is split into on the remote tier."""
    remote_timeout: float = 1.0
    """Deadline of each remote call, in seconds: socket connect and reads, and each batch
    as a whole (one per wave of the thread pool; writes get a second more per 100 MB they
    send). A master that misses it is skipped for remote-backoff seconds: its keys miss at
    once."""
    remote_backoff: float = 2.0
    """Seconds a failed remote master is skipped before it is tried again."""
    remote_ttl: float = 0.0
    """Seconds remote records live (Redis TTL); 0: no TTL, the cluster's own memory policy
    (maxmemory with allkeys-lru) decides what to drop."""
    remote_workers: int = 16
    """Threads that run remote batches, all requests together: a read's pieces use two
    per master (lanes of ~8 MiB pipelines); writes, existence checks and deletes one per
    8 keys of a master's share."""
    remote_queue_bytes: int = 256 << 20
    """Bytes of values waiting to be written to the remote tier; past it the oldest pending
    write is dropped (counted), so puts never wait for the remote."""
    chunk_tokens: int = 256
    """Tokens per chunk for prefix keys; clients read it from the server."""
    max_value_bytes: int = 256 << 20
    """Largest single value a put may carry."""
    max_keys_per_request: int = 16384
    """Most keys one Lookup, Exists, Delete, Pin or BatchGet may name."""
    staging_bytes: int = 1 << 30
    """Bound on buffers for values in flight that do not pass through the cpu arena."""
    max_inflight_requests: int = 0
    """Most calls served at once (all but Commit, Release, Renew and Stats, which give
    resources back or cost nothing); more are refused with RESOURCE_EXHAUSTED and a retry
    hint. 0: derived from the machine, 32 per CPU core and at least 64."""
    max_inflight_bytes: int = 0
    """Most bytes of values in flight through gRPC: streamed puts from their header until
    stored, streamed get answers until sent. Past it a call is refused with
    RESOURCE_EXHAUSTED and a retry hint. 0: derived from the machine, 1/16 of its memory
    within [2 x max-value-bytes, 8GiB]."""
    max_leases: int = 1 << 18
    """Most read leases (shared slices) and, separately, put reservations held at once by
    all same-host clients together: past it, shared reads are refused with a retry hint
    and reservations are answered "stream it instead"."""
    max_watchers: int = 64
    """Most Watch streams (KV events) open at once; past it Watch is refused with
    RESOURCE_EXHAUSTED."""
    watch_queue_events: int = 65536
    """Events one Watch stream may have queued and not yet sent. A watcher further behind
    loses the events past it and gets a GAP event (then a fresh snapshot if it asked for
    snapshots): puts never wait for a watcher, and its memory stays bounded."""
    quota: tuple[str, ...] = ()
    """Per-namespace-group quotas of bytes per tier, as rules `TIER[GLOB]=SIZE` (gpu, cpu
    or ssd), e.g. `cpu[tenant-a/*]=8GiB`. The namespaces matching the first rule of a tier
    that matches share its quota; a group at its quota makes room by evicting its own
    entries on that tier, by the eviction policy (a gpu group's puts land in cpu while the
    demoter moves its oldest values there; the gpu quota spans all pools)."""
    grace_seconds: float = 10.0
    """On SIGTERM/SIGINT, how long in-flight calls may take to finish."""
    lease_seconds: float = 30.0
    """How long a same-host client may hold a shared slice before it is reclaimed."""
    eviction: str = "lru"
    """The eviction policy of every tier: "lru" (least recently used) or "gdsf" (greedy
    dual size frequency: entries reused often outlive one-off ones, and an entry that stops
    being read ages out; for RAG chunk caches)."""
    log_level: str = "info"
    """One of debug, info, warning, error."""
    log_format: str = "text"
    """"text" (one readable line per record) or "json" (one JSON object per line, with the
    request id of the call that logged it, for log collectors)."""
    _sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.tiers, str):
            self.tiers = tuple(t for t in self.tiers.split(",") if t.strip())
        tiers = tuple(t.strip().lower() for t in self.tiers)
        unknown = [t for t in tiers if t not in KNOWN_TIERS]
        if unknown:
            raise ConfigError(
                f"tiers: unknown tier {unknown[0]!r}; choose from {', '.join(KNOWN_TIERS)}"
            )
        if not tiers:
            raise ConfigError("tiers: name at least one tier, e.g. cpu,ssd")
        if len(set(tiers)) != len(tiers):
            raise ConfigError(f"tiers: {','.join(tiers)} names a tier twice")
        # The hierarchy is fixed (gpu above cpu above ssd); order in the flag does not matter.
        self.tiers = tuple(t for t in KNOWN_TIERS if t in tiers)

        # Absolute, so the socket's gRPC address is unix:///... wherever the server was started.
        self.data_dir = Path(self.data_dir).expanduser().absolute()
        self.socket = Path(self.socket).expanduser().absolute() if self.socket else None
        self._check_remote()
        if "gpu" in self.tiers and "cpu" not in self.tiers:
            raise ConfigError(
                "tiers: the gpu tier demotes to the cpu tier; add cpu (e.g. --tiers gpu,cpu,ssd)"
            )
        self.gpu_twin = _as_bool(self.gpu_twin, "gpu-twin")
        if isinstance(self.codec, str):
            self.codec = tuple(r for r in self.codec.split(";") if r.strip())
        self.codec = tuple(r.strip() for r in self.codec)
        for rule in self.codec:
            codec_rule(rule)  # a clear error now rather than at the first demotion
        if isinstance(self.quota, str):
            self.quota = tuple(r for r in self.quota.split(";") if r.strip())
        self.quota = tuple(r.strip() for r in self.quota)
        rules = [quota_rule(r) for r in self.quota]
        if len({r.text for r in rules}) != len(rules):
            raise ConfigError("quota: two rules name the same tier and namespaces")
        sizes = ("gpu_bytes", "cpu_bytes", "ssd_bytes", "max_value_bytes", "staging_bytes")
        for name in (*sizes, "max_inflight_bytes"):
            setattr(self, name, parse_size(getattr(self, name), name.replace("_", "-")))
        if "gpu" in self.tiers and self.gpu_bytes < (1 << 20):
            raise ConfigError(f"gpu-bytes: at least 1MiB, got {self.gpu_bytes}")
        if "cpu" in self.tiers and self.cpu_bytes < (1 << 20):
            raise ConfigError(f"cpu-bytes: at least 1MiB, got {self.cpu_bytes}")
        if "ssd" in self.tiers and self.ssd_bytes < (1 << 20):
            raise ConfigError(f"ssd-bytes: at least 1MiB, got {self.ssd_bytes}")
        if self.max_value_bytes < 1:
            raise ConfigError("max-value-bytes: must be at least 1 byte")
        if self.staging_bytes < self.max_value_bytes:
            raise ConfigError(
                f"staging-bytes: {self.staging_bytes} is less than max-value-bytes "
                f"({self.max_value_bytes}), so a large value could never be received"
            )
        if self.max_inflight_bytes == 0:
            self.max_inflight_bytes = default_inflight_bytes(self.max_value_bytes)
        if self.max_inflight_bytes < self.max_value_bytes:
            raise ConfigError(
                f"max-inflight-bytes: {self.max_inflight_bytes} is less than max-value-bytes "
                f"({self.max_value_bytes}), so a large value could never be received"
            )
        self.max_inflight_requests = (
            _as_int(self.max_inflight_requests, "max-inflight-requests", 0, 1 << 20)
            or default_inflight_requests()
        )
        self.max_leases = _as_int(self.max_leases, "max-leases", 1, 1 << 24)
        self.max_watchers = _as_int(self.max_watchers, "max-watchers", 1, 1 << 16)
        self.watch_queue_events = _as_int(
            self.watch_queue_events, "watch-queue-events", 16, 1 << 24
        )
        self.chunk_tokens = _as_int(self.chunk_tokens, "chunk-tokens", 1, 1 << 20)
        # A key costs 34 bytes in a request, and a request is at most 5 MiB.
        self.max_keys_per_request = _as_int(
            self.max_keys_per_request, "max-keys-per-request", 1, 1 << 17
        )
        self.grace_seconds = _as_seconds(self.grace_seconds, "grace-seconds", 0.0)
        try:
            self.ssd_write_ahead = float(self.ssd_write_ahead)
        except (TypeError, ValueError):
            raise ConfigError(
                f"ssd-write-ahead: not a share of the cpu tier: {self.ssd_write_ahead!r}"
            ) from None
        if not 0.0 <= self.ssd_write_ahead <= 1.0:
            raise ConfigError(
                f"ssd-write-ahead: must be between 0 and 1, got {self.ssd_write_ahead}"
            )
        self.encode_gpu = str(self.encode_gpu).strip().lower()
        if self.encode_gpu not in ("auto", "off") and not (
            self.encode_gpu.isdigit() and int(self.encode_gpu) < 1024
        ):
            raise ConfigError(
                f"encode-gpu: {self.encode_gpu!r} is not auto, off or a CUDA device number"
            )
        self.lease_seconds = _as_seconds(self.lease_seconds, "lease-seconds", 0.01)
        self.durability = str(self.durability).lower()
        if self.durability not in DURABILITY_MODES:
            raise ConfigError(
                f"durability: {self.durability!r} is not one of {', '.join(DURABILITY_MODES)}"
            )
        self.eviction = str(self.eviction).lower()
        if self.eviction not in ("lru", "gdsf"):
            raise ConfigError(f"eviction: {self.eviction!r} is not lru or gdsf")
        self.log_level = str(self.log_level).lower()
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log-level: {self.log_level!r} is not debug/info/warning/error")
        self.log_format = str(self.log_format).lower()
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log-format: {self.log_format!r} is not text or json")
        ports = []  # fixed ones; port 0 lets the system pick
        for name in ("listen", "health_listen", "metrics_listen"):
            address = getattr(self, name)
            if address is not None:
                port = split_address(address, name.replace("_", "-"))[1]
                ports += [port] if port else []
        if len(set(ports)) != len(ports):
            raise ConfigError("listen: listen, health-listen and metrics-listen share a port")
        self._check_security()
        if len(os.fsencode(str(self.socket_path))) > _MAX_SOCKET_PATH:
            raise ConfigError(
                f"socket: path {self.socket_path} is longer than {_MAX_SOCKET_PATH} bytes, "
                "the Unix limit; pass a shorter --socket"
            )

    def _check_remote(self) -> None:
        if isinstance(self.remote, str):
            self.remote = tuple(self.remote.split(","))
        self.remote = tuple(u.strip() for u in self.remote if u.strip())
        if "remote" not in self.tiers:
            if self.remote:
                raise ConfigError("remote: URLs given but the tiers do not include remote")
        elif not self.remote:
            raise ConfigError(
                "remote: --tiers includes remote; give the cluster's URLs, e.g. "
                "--remote redis://10.0.0.5:6379,redis://10.0.0.6:6379"
            )
        elif self.tiers == ("remote",):
            raise ConfigError(
                "tiers: the remote tier needs a local tier to serve from; add cpu "
                "(e.g. --tiers cpu,ssd,remote)"
            )
        for url in self.remote:
            from kvstore.tiers.remote import seed  # imports redis: only with a remote tier

            try:
                seed(url)
            except ValueError as exc:
                raise ConfigError(f"remote: {exc}") from None
        self.remote_password = str(self.remote_password) if self.remote_password else None
        self.remote_write = str(self.remote_write).lower()
        if self.remote_write not in REMOTE_WRITE_MODES:
            raise ConfigError(
                f"remote-write: {self.remote_write!r} is not one of {', '.join(REMOTE_WRITE_MODES)}"
            )
        self.remote_piece_bytes = parse_size(self.remote_piece_bytes, "remote-piece-bytes")
        if not 4096 <= self.remote_piece_bytes <= MAX_REMOTE_PIECE_BYTES:
            raise ConfigError(
                "remote-piece-bytes: must be between 4KiB and 512MiB, got "
                f"{self.remote_piece_bytes}"
            )
        self.remote_timeout = _as_seconds(self.remote_timeout, "remote-timeout", 0.001)
        self.remote_backoff = _as_seconds(self.remote_backoff, "remote-backoff", 0.0)
        self.remote_ttl = _as_seconds(self.remote_ttl, "remote-ttl", 0.0)
        self.remote_queue_bytes = parse_size(self.remote_queue_bytes, "remote-queue-bytes")
        self.remote_workers = _as_int(self.remote_workers, "remote-workers", 1, 1024)

    def _check_security(self) -> None:
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens"):
            value = getattr(self, name)
            setattr(self, name, Path(value).expanduser().absolute() if value else None)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls-cert: tls-cert and tls-key go together; give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError(
                "tls-client-ca: client certificates need TLS; give tls-cert and tls-key"
            )
        if self.tls_cert is not None and self.listen is None:
            raise ConfigError("tls-cert: TLS applies to the TCP listener; set listen too")
        self.trust_socket = _as_bool(self.trust_socket, "trust-socket")
        if self.trust_socket and self.auth_tokens is None:
            raise ConfigError("trust-socket: only means something with auth-tokens")
        self.socket_group = (str(self.socket_group).strip() or None) if self.socket_group else None
        if self.socket_group is not None:
            try:
                grp.getgrnam(self.socket_group)
            except KeyError:
                raise ConfigError(f"socket-group: no group named {self.socket_group!r}") from None

    @property
    def socket_path(self) -> Path:
        return self.socket if self.socket is not None else self.data_dir / "kvstore.sock"

    @property
    def ssd_path(self) -> Path:
        return self.data_dir / "ssd"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]

    @classmethod
    def load(
        cls,
        flags: Mapping[str, Any] | None = None,
        config_file: Path | str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ServerConfig:
        """Merge flags > file > KVSTORE_* environment > defaults into one validated config."""
        names = cls.field_names()
        merged: dict[str, Any] = {}
        sources: dict[str, str] = {}
        env = os.environ if environ is None else environ
        for name in names:
            value = env.get("KVSTORE_" + name.upper())
            if value is not None and value != "":
                merged[name], sources[name] = value, "environment"
        if config_file is None:
            config_file = env.get("KVSTORE_CONFIG") or None
        if config_file is not None:
            for name, value in _read_toml(Path(config_file), names).items():
                merged[name], sources[name] = value, f"file {config_file}"
        for name, value in (flags or {}).items():
            if value is not None and name in names:
                merged[name], sources[name] = value, "flag"
        try:
            cfg = cls(**merged)
        except ConfigError as exc:
            bad = str(exc).split(":", 1)[0].replace("-", "_")
            where = sources.get(bad)
            raise ConfigError(f"{exc} (from {where})" if where else str(exc)) from None
        cfg._sources = sources
        return cfg

    def describe(self) -> dict[str, Any]:
        """The effective settings, for --check-config and logs."""
        out: dict[str, Any] = {}
        for name in self.field_names():
            value = getattr(self, name)
            sep = ";" if name in ("codec", "quota") else ","  # codec specs contain commas
            out[name] = sep.join(value) if isinstance(value, tuple) else value
        if self.remote_password:
            out["remote_password"] = "(set)"
        out["remote"] = ",".join(_without_password(u) for u in self.remote)
        out["socket"] = str(self.socket_path)
        out["data_dir"] = str(self.data_dir)
        return out


def default_inflight_requests() -> int:
    """Calls served at once by default: 32 per CPU core this process may use, at least 64."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(64, 32 * (cores or 1))


def default_inflight_bytes(max_value_bytes: int) -> int:
    """Bytes in flight by default: 1/16 of the machine's memory, at least two of the largest
    values and at most 8 GiB."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 16 << 30
    return max(2 * max_value_bytes, min(memory // 16, 8 << 30))


def split_address(address: str, what: str) -> tuple[str, int]:
    """(host, port) of `HOST:PORT` (`[::1]:PORT` for IPv6); ConfigError if malformed."""
    host, sep, port = str(address).rpartition(":")
    digits = port.isascii() and port.isdigit()
    if not sep or not host or not digits or not 0 <= int(port) < 65536:
        raise ConfigError(f"{what}: expected HOST:PORT, got {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _as_seconds(value: Any, what: str, lo: float) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: not a number of seconds: {value!r}") from None
    if not lo <= x < float("inf"):
        raise ConfigError(f"{what}: must be at least {lo:g} seconds, got {value!r}")
    return x


CODEC_TIERS = ("ssd", "remote")  # tiers that store encoded values; memory tiers hold them raw


def _tier_rule(rule: str, what: str, value_name: str, examples: str) -> tuple[str, str | None, str]:
    """(tier, namespace glob or None, value) of a `TIER=VALUE` or `TIER[GLOB]=VALUE` rule,
    VALUE named `value_name` in the error message."""
    head, sep, value = rule.partition("]=") if "[" in rule.partition("=")[0] else ("", "", "")
    if sep:
        tier, _, glob = head.partition("[")
    else:
        tier, sep, value = rule.partition("=")
        glob = None
    if not sep or not value.strip() or (glob is not None and not glob.strip()):
        raise ConfigError(
            f"{what}: {rule!r} is not TIER={value_name} or TIER[GLOB]={value_name} "
            f"(e.g. {examples})"
        )
    return tier.strip().lower(), glob.strip() if glob is not None else None, value.strip()


def codec_rule(rule: str) -> tuple[str, str | None, str]:
    """(tier, namespace glob or None, codec spec) of a `--codec` rule; ConfigError if bad."""
    tier, glob, spec = _tier_rule(rule, "codec", "SPEC", "ssd=zstd, ssd[llama-*]=kivi:bits=4")
    if tier not in CODEC_TIERS:
        raise ConfigError(
            f"codec: tier {tier!r} cannot hold encoded values; codecs apply to "
            f"{', '.join(CODEC_TIERS)} (memory tiers keep values raw so clients read them "
            "in place)"
        )
    from kvstore.codecs import codec_from_spec  # imports torch: only when rules are given
    from kvstore.errors import InvalidArgument

    try:
        codec = codec_from_spec(spec)
    except InvalidArgument as exc:
        raise ConfigError(f"codec: {exc}") from None
    if codec.thread_teams and threads.threadsafe_layer() is None:
        raise ConfigError(
            f"codec: {codec.name} codes on several threads at once, which needs numba's "
            "OpenMP threading layer (install the libgomp1 package: apt-get install "
            "libgomp1) or its TBB one; this machine has neither, and numba's fallback "
            "aborts the server when two threads code at once"
        )
    return tier, glob, spec


QUOTA_TIERS = ("gpu", "cpu", "ssd")


@dataclass(frozen=True)
class QuotaRule:
    """`--quota TIER[GLOB]=SIZE`: the namespaces matching `glob` together hold at most
    `quota_bytes` of values in `tier`."""

    tier: str
    glob: str
    quota_bytes: int

    @property
    def text(self) -> str:
        return f"{self.tier}[{self.glob}]"


def quota_rule(rule: str) -> QuotaRule:
    """The `QuotaRule` of a `--quota` rule such as `cpu[tenant-a/*]=8GiB`; ConfigError if bad."""
    tier, glob, size = _tier_rule(
        rule, "quota", "SIZE", "gpu[tenant-a/*]=4GiB, cpu[tenant-a/*]=8GiB, ssd[tenant-a/*]=100GiB"
    )
    if tier not in QUOTA_TIERS:
        raise ConfigError(
            f"quota: tier {tier!r} takes no quota; quotas apply to {', '.join(QUOTA_TIERS)}"
        )
    if glob is None:
        raise ConfigError(
            f"quota: {rule!r} names no namespaces; write {tier}[GLOB]=SIZE (the whole tier's "
            f"size is --{tier}-bytes)"
        )
    return QuotaRule(tier, glob, parse_size(size, f"quota {tier}[{glob}]"))


def _without_password(url: str) -> str:
    """`url` with any password replaced, for logs and --check-config."""
    return re.sub(r"(://[^:@/]*:)[^@/]*@", r"\1***@", url)


def _as_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{what}: expected true or false, got {value!r}")


def _as_int(value: Any, what: str, lo: int, hi: int) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: not an integer: {value!r}") from None
    if not lo <= n <= hi:
        raise ConfigError(f"{what}: must be between {lo} and {hi}, got {n}")
    return n


def _read_toml(path: Path, names: list[str]) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config: file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    table = raw.get("server", raw)
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in names:
            raise ConfigError(
                f"config: {path} sets unknown setting {key!r}; known: {', '.join(names)}"
            )
        out[name] = tuple(value) if isinstance(value, list) else value
    return out
