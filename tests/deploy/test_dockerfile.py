"""deploy/docker: the Dockerfile's stages and runtime settings, its ignore file, the default
config it ships, the wheel its builder stage makes, and (where a Docker daemon answers) a
real build of the cpu image."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

from kvstore.config import ServerConfig

from .helpers import DEPLOY, ROOT, chart_values

dockerfile_parse = pytest.importorskip("dockerfile_parse")

DOCKER_DIR = DEPLOY / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
# BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile before the context's own.
DOCKERIGNORE = DOCKER_DIR / "Dockerfile.dockerignore"
DEFAULT_CONFIG = DOCKER_DIR / "kvstore.toml"
RUNTIME_STAGES = ("cpu", "gpu")
BUILD_TOOLS = re.compile(
    r"(?<![\w/.-])(gcc|g\+\+|cc|clang|make|cmake|build-essential|[\w.+]+-dev|"
    r"python3?-pip|rustc|cargo)(?![\w.+-])"
)


class Stage:
    def __init__(self, from_value: str) -> None:
        parts = from_value.split()
        self.image = parts[0]
        self.name = parts[2] if len(parts) >= 3 and parts[1].lower() == "as" else ""
        self.instructions: list[dict[str, Any]] = []

    def values(self, instruction: str) -> list[str]:
        return [str(i["value"]) for i in self.instructions if i["instruction"] == instruction]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for value in self.values("ENV"):
            for token in shlex.split(value):
                key, _, val = token.partition("=")
                out[key] = val
        return out

    def args(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for value in self.values("ARG"):
            key, _, default = value.partition("=")
            out[key.strip()] = default.strip()
        return out

    def runs(self) -> list[str]:
        return self.values("RUN")


def _stages() -> dict[str, Stage]:
    parser = dockerfile_parse.DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes()))
    stages: list[Stage] = []
    for item in parser.structure:
        if item["instruction"] == "FROM":
            stages.append(Stage(item["value"]))
        elif stages:
            stages[-1].instructions.append(item)
    return {s.name or f"#{i}": s for i, s in enumerate(stages)}


def _default_config() -> dict[str, Any]:
    table: dict[str, Any] = tomllib.loads(DEFAULT_CONFIG.read_text())["server"]
    return table


def test_stages_and_bases() -> None:
    stages = _stages()
    assert {"builder", "cpu", "gpu"} <= stages.keys()
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", stages["cpu"].image)
    assert re.fullmatch(r"nvidia/cuda:13\.\d+(\.\d+)?-runtime-ubuntu\d+\.\d+", stages["gpu"].image)
    names = set(stages)
    for stage in stages.values():
        if stage.image in names:
            continue  # FROM an earlier stage
        tag = stage.image.partition(":")[2]
        assert "@sha256:" in stage.image or (tag and tag != "latest" and re.search(r"\d", tag)), (
            f"base image {stage.image} is not pinned to a version tag"
        )


@pytest.mark.parametrize("target", RUNTIME_STAGES)
def test_runtime_stage_settings(target: str) -> None:
    stage = _stages()[target]
    users = stage.values("USER")
    assert users, f"{target} sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid"
    assert gid.isdigit() and int(gid) != 0
    # The chart runs the image as the same uid (and the engine must match it).
    assert int(uid) == chart_values()["kvstore"]["uid"]
    assert int(gid) == chart_values()["kvstore"]["gid"]
    (entrypoint,) = stage.values("ENTRYPOINT")
    assert json.loads(entrypoint) == ["kvstore-server"]
    (healthcheck,) = stage.values("HEALTHCHECK")
    command = healthcheck.split("CMD", 1)[1].strip()
    assert json.loads(command)[0] == "kvstore" and json.loads(command)[-1] == "health"
    exposed = {int(p.split("/")[0]) for v in stage.values("EXPOSE") for p in v.split()}
    config = _default_config()
    ports = {int(config[k].rsplit(":", 1)[1]) for k in ("metrics-listen", "health-listen")}
    assert ports <= exposed
    env = stage.env()
    # The default config sits where KVSTORE_CONFIG points, and `kvstore health` finds the
    # socket the config names.
    copies = [v.split() for v in stage.values("COPY")]
    assert ["deploy/docker/kvstore.toml", env["KVSTORE_CONFIG"]] in copies
    assert env["KVSTORE_SOCKET"] == config["socket"]
    assert env.get("NUMBA_CACHE_DIR", "").startswith("/tmp/")


@pytest.mark.parametrize("target", RUNTIME_STAGES)
def test_runtime_stages_hold_no_build_tools(target: str) -> None:
    stage = _stages()[target]
    installed: set[str] = set()
    for run in stage.runs():
        found = BUILD_TOOLS.findall(run)
        assert not found, f"{target}: RUN installs build tools {found}: {run}"
        for command in run.split("&&"):
            words = command.split()
            if "apt-get" in words and "install" in words:
                installed |= {w for w in words[words.index("install") + 1 :] if w[0] != "-"}
            if "pip" in words and "install" in words:
                assert "--only-binary=:all:" in words, f"{target}: pip may build from source"
    assert installed <= {"python3", "python3-venv", "ca-certificates", "libgomp1"}, installed
    # numba's OpenMP layer: without it the server refuses the lossy codecs' rules.
    assert "libgomp1" in installed
    # The wheel comes from the builder stage, not from a compile here.
    assert any("--from=builder" in v for v in stage.values("COPY"))


def test_torch_is_installed_first_from_a_chosen_index() -> None:
    stages = _stages()
    text = DOCKERFILE.read_text()
    assert "://" not in text, "no index URL is written into the Dockerfile"
    for target, arg in (("cpu", "TORCH_INDEX_URL"), ("gpu", "GPU_TORCH_INDEX_URL")):
        stage = stages[target]
        assert stage.args()[arg] == "", f"{arg} defaults to empty (the default index)"
        installs = [c for r in stage.runs() for c in r.split("&&") if "pip install" in c]
        assert len(installs) == 2
        assert "torch==" in installs[0] and f'--index-url "${arg}"' in installs[0]
        assert "kvstore-" in installs[1]
    gpu_install = [c for r in stages["gpu"].runs() for c in r.split("&&") if "kvstore-" in c]
    assert "[gpu]" in gpu_install[0], "the gpu image installs the gpu extra (CuPy)"


def test_default_config_loads() -> None:
    config = ServerConfig.load(config_file=DEFAULT_CONFIG, environ={})
    assert config.tiers == ("cpu", "ssd")
    assert str(config.data_dir) == "/var/lib/kvstore"
    assert str(config.socket_path) == "/run/kvstore/kvstore.sock"
    assert config.metrics_listen == "0.0.0.0:9400"
    assert config.health_listen == "0.0.0.0:50052"
    assert config.log_format == "json"


# --- the build context -------------------------------------------------------------------


def _ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) of each line of the ignore file, in Docker's semantics."""
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i : end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(out)))
    return rules


def _ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, rx in rules:
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def _copy_sources(stage: str) -> list[str]:
    sources = []
    for value in _stages()[stage].values("COPY"):
        words = value.split()
        if any(w.startswith("--from") for w in words):
            continue
        sources += [w for w in words[:-1] if not w.startswith("--")]
    return sources


def test_dockerignore_keeps_what_the_build_copies() -> None:
    rules = _ignore_rules()
    for stage in ("builder", *RUNTIME_STAGES):
        for source in _copy_sources(stage):
            assert (ROOT / source).exists(), f"COPY {source}: no such path"
            assert not _ignored(source, rules), f"COPY {source} is excluded from the context"
    for kept in ("kvstore/server.py", "kvstore/v1/kvstore_pb2.pyi", "client/sync.py"):
        assert not _ignored(kept, rules)
    for dropped in (
        ".venv/bin/python",
        ".git/config",
        "tests/test_config.py",
        "benchmarks/bench_ttft.py",
        "kvstore-data/ssd/data.mdb",
        "kvstore/__pycache__/server.cpython-311.pyc",
        "kvstore.egg-info/PKG-INFO",
        "deploy/k8s/sidecar.yaml",
    ):
        assert _ignored(dropped, rules), f"{dropped} would be sent to the daemon"


def test_builder_stage_makes_a_complete_wheel(tmp_path: Path) -> None:
    """Build the wheel from exactly the files the builder stage gets (COPY sources minus
    ignored files), as its `pip wheel --no-deps` does, and look inside."""
    rules = _ignore_rules()
    src = tmp_path / "src"
    src.mkdir()
    for source in _copy_sources("builder"):
        origin = ROOT / source
        files = [origin] if origin.is_file() else sorted(origin.rglob("*"))
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if f.is_file() and not _ignored(rel, rules):
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, src / rel)
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"),
            *("--wheel-dir", str(tmp_path / "wheels"), str(src)),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("kvstore-*-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for needed in (
            "kvstore/server_cli.py",
            "kvstore/admin_cli.py",
            "kvstore/py.typed",
            "kvstore/v1/kvstore_pb2.py",
            "kvstore/v1/kvstore_pb2.pyi",
            "kvstore/codecs/__init__.py",
            "kvstore/kernels/__init__.py",
            "kvstore/client/__init__.py",
        ):
            assert needed in names, f"the image's wheel lacks {needed}"
        assert not any(n.startswith(("codecs/", "client/", "tests/")) for n in names)
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = zf.read(info).decode()
        metadata = zf.read(info.replace("entry_points.txt", "METADATA")).decode()
    assert "kvstore-server = kvstore.server_cli:main" in entry_points
    assert "kvstore = kvstore.admin_cli:main" in entry_points
    assert "Provides-Extra: gpu" in metadata


# --- a real build --------------------------------------------------------------------------


def _docker_daemon() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.timeout(3600)
def test_cpu_image_builds_and_runs() -> None:
    if not _docker_daemon():
        pytest.skip("no Docker daemon answers `docker info`: the image build is not tested")
    tag = "kvstore:deploy-test-cpu"
    build = ["docker", "build", "-f", str(DOCKERFILE), "--target", "cpu", "-t", tag]
    # The CPU torch index, if the environment names one (never written in the repository).
    index = os.environ.get("KVSTORE_TORCH_INDEX_URL")
    if index:
        build += ["--build-arg", f"TORCH_INDEX_URL={index}"]
    result = subprocess.run([*build, str(ROOT)], capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, result.stderr[-4000:]
    help_run = subprocess.run(
        ["docker", "run", "--rm", tag, "--help"], capture_output=True, text=True, timeout=120
    )
    assert help_run.returncode == 0 and "kvstore-server" in help_run.stdout
    check = subprocess.run(
        ["docker", "run", "--rm", "--shm-size=2g", tag, "--check-config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["socket"] == "/run/kvstore/kvstore.sock"
