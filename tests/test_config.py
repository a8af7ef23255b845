"""ServerConfig: strict sizes, flags > TOML file > KVSTORE_* environment > defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvstore.config import ConfigError, ServerConfig, parse_size


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("64GiB", 64 << 30),
        ("64gib", 64 << 30),
        ("512MiB", 512 << 20),
        ("1.5GB", 1_500_000_000),
        ("1.5 GB", 1_500_000_000),
        ("4.1MB", 4_100_000),
        ("2TB", 2 * 10**12),
        ("1TiB", 1 << 40),
        ("10KiB", 10 << 10),
        ("3kb", 3000),
        ("4096", 4096),
        ("4096B", 4096),
        (" 7 ", 7),
        ("0", 0),
        (8192, 8192),
    ],
)
def test_parse_size_accepts(text: str | int, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize(
    "text",
    ["64 gigs", "64G", "64 GiBs", "GiB", "", "  ", "-5", "-5MiB", "1e9", "1,024", "0x100", "5 5"],
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="cpu-bytes"):
        parse_size(text, "cpu-bytes")


def test_parse_size_rejects_negative_int_and_bool() -> None:
    with pytest.raises(ConfigError):
        parse_size(-1)
    with pytest.raises(ConfigError):
        parse_size(True)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_sizes_in_the_dataclass_are_parsed(tmp_path: Path) -> None:
    cfg = ServerConfig(data_dir=tmp_path, cpu_bytes="4MiB", ssd_bytes="1.5GB")
    assert cfg.cpu_bytes == 4 << 20
    assert cfg.ssd_bytes == 1_500_000_000


def test_bad_size_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cpu-bytes.*64 gigs"):
        ServerConfig(data_dir=tmp_path, cpu_bytes="64 gigs")


def test_defaults(tmp_path: Path) -> None:
    cfg = ServerConfig.load(environ={})
    assert cfg.tiers == ("cpu", "ssd")
    assert cfg.chunk_tokens == 256
    assert cfg.cpu_bytes == 1 << 30
    assert cfg.socket_path == cfg.data_dir / "kvstore.sock"
    assert cfg.ssd_path == cfg.data_dir / "ssd"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kvstore.toml"
    path.write_text(text)
    return path


def test_precedence_flags_over_file_over_env_over_defaults(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '[server]\nchunk_tokens = 128\ncpu_bytes = "8MiB"\nlog_level = "warning"\n',
    )
    env = {
        "KVSTORE_CHUNK_TOKENS": "64",
        "KVSTORE_CPU_BYTES": "16MiB",
        "KVSTORE_LOG_LEVEL": "error",
        "KVSTORE_GRACE_SECONDS": "3.5",
    }
    flags = {"chunk_tokens": 32, "log_level": None}  # None means "flag not given"
    cfg = ServerConfig.load(flags=flags, config_file=path, environ=env)
    assert cfg.chunk_tokens == 32  # flag beats file and env
    assert cfg.cpu_bytes == 8 << 20  # file beats env
    assert cfg.log_level == "warning"  # a None flag does not override the file
    assert cfg.grace_seconds == 3.5  # env beats default
    assert cfg.max_keys_per_request == 16384  # default


def test_env_alone_and_empty_env_value_ignored(tmp_path: Path) -> None:
    env = {
        "KVSTORE_TIERS": "ssd",
        "KVSTORE_DATA_DIR": str(tmp_path / "d"),
        "KVSTORE_CHUNK_TOKENS": "",
        "KVSTORE_SSD_BYTES": "2GiB",
    }
    cfg = ServerConfig.load(environ=env)
    assert cfg.tiers == ("ssd",)
    assert cfg.data_dir == tmp_path / "d"
    assert cfg.chunk_tokens == 256
    assert cfg.ssd_bytes == 2 << 30


def test_config_file_from_env_variable(tmp_path: Path) -> None:
    path = _write(tmp_path, "chunk-tokens = 16\n")  # top level, dashed name
    cfg = ServerConfig.load(environ={"KVSTORE_CONFIG": str(path)})
    assert cfg.chunk_tokens == 16


def test_load_reads_os_environ_when_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTORE_CHUNK_TOKENS", "48")
    monkeypatch.delenv("KVSTORE_CONFIG", raising=False)
    assert ServerConfig.load().chunk_tokens == 48


def test_unknown_toml_key_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "[server]\ncpu_bytes = 1048576\ncpu_byte = 5\n")
    with pytest.raises(ConfigError, match="unknown setting 'cpu_byte'"):
        ServerConfig.load(config_file=path, environ={})


def test_missing_and_malformed_toml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        ServerConfig.load(config_file=tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        ServerConfig.load(config_file=_write(tmp_path, "tiers = [\n"), environ={})


def test_error_says_where_a_bad_value_came_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="from environment"):
        ServerConfig.load(environ={"KVSTORE_CPU_BYTES": "lots"})
    path = _write(tmp_path, 'cpu_bytes = "lots"\n')
    with pytest.raises(ConfigError, match=f"from file {path}"):
        ServerConfig.load(config_file=path, environ={})
    with pytest.raises(ConfigError, match="from flag"):
        ServerConfig.load(flags={"cpu_bytes": "lots"}, environ={})


@pytest.mark.parametrize(
    ("tiers", "want"),
    [
        ("ssd,cpu", ("cpu", "ssd")),
        (("ssd", "gpu", "cpu"), ("gpu", "cpu", "ssd")),
        (" SSD , Cpu ", ("cpu", "ssd")),
        ("ssd", ("ssd",)),
        (["cpu"], ("cpu",)),
    ],
)
def test_tiers_normalised_fastest_first(tmp_path: Path, tiers: object, want: tuple) -> None:
    assert ServerConfig(tiers=tiers, data_dir=tmp_path).tiers == want  # type: ignore[arg-type]


def test_tiers_from_toml_list_are_normalised(tmp_path: Path) -> None:
    path = _write(tmp_path, 'tiers = ["ssd", "cpu"]\n')
    assert ServerConfig.load(config_file=path, environ={}).tiers == ("cpu", "ssd")


@pytest.mark.parametrize(
    ("tiers", "match"),
    [("cpu,nvme", "unknown tier 'nvme'"), ("", "at least one tier"), ("cpu,cpu", "twice")],
)
def test_bad_tiers(tmp_path: Path, tiers: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ServerConfig(tiers=tiers, data_dir=tmp_path)  # type: ignore[arg-type]


def test_tier_minimum_sizes_only_for_configured_tiers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cpu-bytes: at least 1MiB"):
        ServerConfig(data_dir=tmp_path, cpu_bytes="512KiB")
    with pytest.raises(ConfigError, match="ssd-bytes: at least 1MiB"):
        ServerConfig(data_dir=tmp_path, ssd_bytes="512KiB")
    assert ServerConfig(tiers="ssd", data_dir=tmp_path, cpu_bytes=0).cpu_bytes == 0


@pytest.mark.parametrize("listen", ["127.0.0.1:50051", "[::1]:8080", "localhost:0", "h:65535"])
def test_listen_accepts_host_port(tmp_path: Path, listen: str) -> None:
    assert ServerConfig(data_dir=tmp_path, listen=listen).listen == listen


@pytest.mark.parametrize(
    "listen",
    ["localhost", ":50051", "localhost:", "h:65536", "h:-1", "h:http", "h:5 0", "h:\u00b2"],
)
def test_listen_rejects_malformed(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError, match="listen: expected HOST:PORT"):
        ServerConfig(data_dir=tmp_path, listen=listen)


def test_socket_path_length_limit(tmp_path: Path) -> None:
    ok = Path("/" + "s" * 106)  # 107 bytes: the longest sun_path allows
    assert ServerConfig(data_dir=tmp_path, socket=ok).socket_path == ok
    with pytest.raises(ConfigError, match="longer than 107 bytes"):
        ServerConfig(data_dir=tmp_path, socket=Path("/" + "s" * 107))


def test_default_socket_under_a_long_data_dir_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="socket"):
        ServerConfig(data_dir=tmp_path / ("d" * 120))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("chunk_tokens", 0, "chunk-tokens"),
        ("chunk_tokens", "many", "chunk-tokens"),
        ("max_keys_per_request", 0, "max-keys-per-request"),
        ("grace_seconds", -1, "grace-seconds"),
        ("grace_seconds", "soon", "grace-seconds"),
        ("log_level", "verbose", "log-level"),
        ("max_value_bytes", 0, "max-value-bytes"),
        ("ssd_write_ahead", -0.1, "ssd-write-ahead: must be between 0 and 1"),
        ("ssd_write_ahead", 1.5, "ssd-write-ahead: must be between 0 and 1"),
        ("ssd_write_ahead", "half", "ssd-write-ahead: not a share"),
        ("encode_gpu", "yes", "encode-gpu: 'yes' is not auto, off or a CUDA device number"),
        ("encode_gpu", "-1", "encode-gpu"),
    ],
)
def test_other_validation(tmp_path: Path, field: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ServerConfig(data_dir=tmp_path, **{field: value})  # type: ignore[arg-type]


def test_staging_must_hold_the_largest_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="staging-bytes"):
        ServerConfig(data_dir=tmp_path, max_value_bytes="64MiB", staging_bytes="32MiB")


def test_describe_reports_effective_settings(tmp_path: Path) -> None:
    cfg = ServerConfig(tiers="ssd,cpu", data_dir=tmp_path)
    d = cfg.describe()
    assert d["tiers"] == "cpu,ssd"
    assert d["socket"] == str(tmp_path / "kvstore.sock")
    assert set(ServerConfig.field_names()) <= set(d)


def test_eviction_policy_is_checked() -> None:
    assert ServerConfig(eviction="GDSF").eviction == "gdsf"
    with pytest.raises(ConfigError, match="eviction"):
        ServerConfig(eviction="fifo")


def test_durability_from_env_flag_and_bad_value(tmp_path: Path) -> None:
    assert ServerConfig.load(environ={}).durability == "async"
    cfg = ServerConfig.load(environ={"KVSTORE_DURABILITY": "SYNC"})
    assert cfg.durability == "sync"
    cfg = ServerConfig.load({"durability": "none"}, environ={"KVSTORE_DURABILITY": "sync"})
    assert cfg.durability == "none"
    with pytest.raises(ConfigError, match=r"durability: 'fsync' is not one of none, async, sync"):
        ServerConfig.load(environ={"KVSTORE_DURABILITY": "fsync"})


def test_inflight_bounds_default_from_the_machine_and_are_checked(tmp_path: Path) -> None:
    cfg = ServerConfig(data_dir=tmp_path)
    cores = len(os.sched_getaffinity(0))
    assert cfg.max_inflight_requests == max(64, 32 * cores)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert cfg.max_inflight_bytes == max(2 * cfg.max_value_bytes, min(memory // 16, 8 << 30))
    set_ = ServerConfig(data_dir=tmp_path, max_inflight_requests="12", max_inflight_bytes="1GiB")
    assert (set_.max_inflight_requests, set_.max_inflight_bytes) == (12, 1 << 30)
    with pytest.raises(ConfigError, match=r"max-inflight-bytes: .* less than max-value-bytes"):
        ServerConfig(data_dir=tmp_path, max_inflight_bytes="1MiB")
    with pytest.raises(ConfigError, match="max-inflight-requests: must be between"):
        ServerConfig(data_dir=tmp_path, max_inflight_requests=-1)
    with pytest.raises(ConfigError, match="max-leases: must be between"):
        ServerConfig(data_dir=tmp_path, max_leases=0)
    with pytest.raises(ConfigError, match="max-watchers: must be between"):
        ServerConfig(data_dir=tmp_path, max_watchers=0)
    with pytest.raises(ConfigError, match="watch-queue-events: must be between"):
        ServerConfig(data_dir=tmp_path, watch_queue_events=1)
    assert ServerConfig(data_dir=tmp_path, quota="cpu[a/*]=1GiB;ssd[a/*]=2GiB").describe()[
        "quota"
    ] == ("cpu[a/*]=1GiB;ssd[a/*]=2GiB")


REMOTE = "redis://10.0.0.5:6379,redis://10.0.0.6:6379"


def test_remote_tier_settings(tmp_path: Path) -> None:
    cfg = ServerConfig(
        data_dir=tmp_path,
        tiers="remote,cpu",
        remote=REMOTE,
        remote_piece_bytes="256KiB",
        remote_write="EVICT",
        remote_ttl="3600",
        codec=("remote=zstd",),
    )
    assert cfg.tiers == ("cpu", "remote")  # remote is always the last tier
    assert cfg.remote == ("redis://10.0.0.5:6379", "redis://10.0.0.6:6379")
    assert (cfg.remote_piece_bytes, cfg.remote_write, cfg.remote_ttl) == (256 << 10, "evict", 3600)
    assert (cfg.remote_timeout, cfg.remote_queue_bytes) == (1.0, 256 << 20)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tiers": "cpu,remote"}, "give the cluster's URLs"),
        ({"remote": REMOTE}, "tiers do not include remote"),
        ({"tiers": "remote", "remote": REMOTE}, "needs a local tier"),
        ({"tiers": "cpu,remote", "remote": "http://h:1"}, "not a Redis URL"),
        ({"tiers": "cpu,remote", "remote": "unix:///tmp/r.sock"}, "names no host"),
        ({"tiers": "cpu,remote", "remote": "redis://h:1?bogus=1"}, "option redis-py rejects"),
        ({"tiers": "cpu,remote", "remote": REMOTE, "remote_write": "back"}, "remote-write"),
        ({"tiers": "cpu,remote", "remote": REMOTE, "remote_piece_bytes": "1KiB"}, "4KiB"),
        ({"tiers": "cpu,remote", "remote": REMOTE, "remote_timeout": "0"}, "remote-timeout"),
        ({"codec": ("cpu=zstd",)}, "cannot hold encoded values"),
    ],
)
def test_bad_remote_settings_are_clear_errors(
    tmp_path: Path, settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig(data_dir=tmp_path, **settings)  # type: ignore[arg-type]


def test_remote_password_from_the_environment_is_never_printed(tmp_path: Path) -> None:
    cfg = ServerConfig.load(
        {"data_dir": tmp_path, "tiers": "cpu,remote", "remote": "redis://:urlpw@h:1"},
        environ={"KVSTORE_REMOTE_PASSWORD": "s3cret"},
    )
    assert cfg.remote_password == "s3cret"
    text = str(cfg.describe())
    assert "s3cret" not in text and "urlpw" not in text
    assert cfg.describe()["remote"] == "redis://:***@h:1"
