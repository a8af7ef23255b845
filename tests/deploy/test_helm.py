"""The Helm chart deploy/helm/kvstore, rendered by Helm's engine: lint, the objects of each
mode, and the properties kvstore needs from its pod (sidecar placement, shared socket and
arena, gRPC probes, resources, IPC_LOCK, metrics annotations, a config the server reads)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from kvstore.config import ServerConfig, parse_size
from kvstore.preflight import PROCESS_OVERHEAD_BYTES

from .helpers import (
    ALL_VARIANTS,
    CHART,
    DAEMONSET_VARIANTS,
    SIDECAR_VARIANTS,
    Doc,
    all_containers,
    chart_values,
    container,
    helm_python,
    mount_of,
    only,
    pod_spec,
    quantity_bytes,
    render,
    render_raw,
    volume,
    volume_at,
)

HEALTH_SERVICES = {"", "kvstore.v1.KVStore"}  # the names kvstore's health service answers


def _toml(docs: list[Doc]) -> dict[str, Any]:
    text = only(docs, "ConfigMap")["data"]["kvstore.toml"]
    parsed: dict[str, Any] = tomllib.loads(text)
    return parsed


def _server_config(docs: list[Doc], tmp_path: Path) -> ServerConfig:
    path = tmp_path / "kvstore.toml"
    path.write_text(only(docs, "ConfigMap")["data"]["kvstore.toml"])
    return ServerConfig.load(config_file=path, environ={})


def _caps(c: dict[str, Any]) -> list[str]:
    return list(c.get("securityContext", {}).get("capabilities", {}).get("add", []))


# --- lint --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "values"), ALL_VARIANTS, ids=[i for i, _ in ALL_VARIANTS])
def test_helm_lint_passes(name: str, values: dict[str, Any]) -> None:
    report = helm_python.lint(CHART, values=values, strict=True)
    assert report["errors"] == []
    # Severity 2 and 3 are warnings and errors; 1 (info) is only "icon is recommended".
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


def test_chart_metadata() -> None:
    with helm_python.Chart.load(CHART) as chart:
        meta = chart.metadata
        assert meta["apiVersion"] == "v2"
        assert meta["kubeVersion"] == ">=1.29.0-0"
        assert chart.schema is not None, "the chart ships values.schema.json"


# --- what each mode renders --------------------------------------------------------------


def test_sidecar_mode_objects() -> None:
    kinds = sorted(d.kind for d in render())
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Service", "ServiceAccount"]
    )


def test_daemonset_mode_objects() -> None:
    kinds = sorted(d.kind for d in render({"mode": "daemonset"}))
    assert kinds == sorted(["ConfigMap", "DaemonSet", "ServiceAccount"])


def test_gpu_tier_objects() -> None:
    kinds = sorted(d.kind for d in render({"gpuTier": {"enabled": True}}))
    assert "ResourceClaimTemplate" in kinds
    assert "ResourceClaimTemplate" not in [d.kind for d in render()]


def test_service_monitor_is_optional() -> None:
    assert "ServiceMonitor" not in [d.kind for d in render()]
    docs = render({"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "p"}}}})
    monitor = only(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "p"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    services = [d.obj for d in docs if d.kind == "Service"]
    metrics_service = [s for s in services if s["spec"]["ports"][0]["name"] == "metrics"]
    assert len(metrics_service) == 1
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= metrics_service[0]["metadata"]["labels"].items()
    # The selector must not also pick the engine's Service.
    engine_service = [s for s in services if s["spec"]["ports"][0]["name"] == "http"]
    assert not selector.items() <= engine_service[0]["metadata"]["labels"].items()


def test_notes_render_for_each_mode() -> None:
    sidecar = render_raw()["kvstore/templates/NOTES.txt"]
    assert "KVSTORE_SOCKET=/run/kvstore/kvstore.sock" in sidecar
    daemonset = render_raw({"mode": "daemonset"})["kvstore/templates/NOTES.txt"]
    assert "/dev/shm/kvstore" in daemonset and "IPC_LOCK" in daemonset


# --- properties of every variant ---------------------------------------------------------


@pytest.mark.parametrize(("name", "values"), ALL_VARIANTS, ids=[i for i, _ in ALL_VARIANTS])
def test_kvstore_probes_are_grpc_on_the_health_port(name: str, values: dict[str, Any]) -> None:
    docs = render(values)
    health_port = chart_values(values)["kvstore"]["healthPort"]
    assert _toml(docs)["server"]["health-listen"] == f"0.0.0.0:{health_port}"
    kv = container(pod_spec(docs), "kvstore")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in kv, f"kvstore has no {probe}"
        grpc = kv[probe].get("grpc")
        assert grpc is not None, f"{probe} is not a gRPC probe"
        assert grpc["port"] == health_port
        assert grpc.get("service", "") in HEALTH_SERVICES
        assert not {"httpGet", "tcpSocket", "exec"} & kv[probe].keys()
    assert health_port in [p["containerPort"] for p in kv["ports"]]
    # The startup probe must allow a long index rebuild before liveness takes over.
    startup = kv["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


@pytest.mark.parametrize(("name", "values"), ALL_VARIANTS, ids=[i for i, _ in ALL_VARIANTS])
def test_every_container_has_requests_and_limits(name: str, values: dict[str, Any]) -> None:
    for c in all_containers(pod_spec(render(values))):
        resources = c.get("resources", {})
        for key in ("requests", "limits"):
            got = resources.get(key, {})
            assert "cpu" in got and "memory" in got, f"{c['name']}: {key} lacks cpu or memory"


@pytest.mark.parametrize(("name", "values"), ALL_VARIANTS, ids=[i for i, _ in ALL_VARIANTS])
def test_kvstore_memory_covers_the_arena(name: str, values: dict[str, Any]) -> None:
    docs = render(values)
    cpu_bytes = parse_size(_toml(docs)["server"]["cpu-bytes"])
    resources = container(pod_spec(docs), "kvstore")["resources"]
    limit = quantity_bytes(resources["limits"]["memory"])
    assert limit >= cpu_bytes + PROCESS_OVERHEAD_BYTES, (
        "kvstore's memory limit must cover the cpu arena plus the process "
        "(what kvstore-server --check-config checks)"
    )
    assert quantity_bytes(resources["requests"]["memory"]) == limit
    # The /dev/shm volume holds the arena.
    spec = pod_spec(docs)
    shm = volume_at(spec, container(spec, "kvstore"), "/dev/shm")
    if "emptyDir" in shm:
        assert quantity_bytes(shm["emptyDir"]["sizeLimit"]) > cpu_bytes


@pytest.mark.parametrize(("name", "values"), ALL_VARIANTS, ids=[i for i, _ in ALL_VARIANTS])
def test_ipc_lock_and_non_root(name: str, values: dict[str, Any]) -> None:
    spec = pod_spec(render(values))
    kv = container(spec, "kvstore")
    assert "IPC_LOCK" in _caps(kv)
    sc = kv["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == chart_values(values)["kvstore"]["uid"] == 10001
    assert sc["allowPrivilegeEscalation"] is False
    assert "ALL" in sc["capabilities"]["drop"]
    # The engine pins the arena too.
    for c in spec["containers"]:
        if c["name"] != "kvstore":
            assert "IPC_LOCK" in _caps(c), f"{c['name']} lacks IPC_LOCK"


@pytest.mark.parametrize(("name", "values"), ALL_VARIANTS, ids=[i for i, _ in ALL_VARIANTS])
def test_prometheus_scrape_annotations(name: str, values: dict[str, Any]) -> None:
    docs = render(values)
    workload = next(d.obj for d in docs if d.kind in ("Deployment", "DaemonSet"))
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    port = chart_values(values)["kvstore"]["metricsPort"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert _toml(docs)["server"]["metrics-listen"] == f"0.0.0.0:{port}"
    kv = container(pod_spec(docs), "kvstore")
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in kv["ports"]


@pytest.mark.parametrize(("name", "values"), ALL_VARIANTS, ids=[i for i, _ in ALL_VARIANTS])
def test_config_is_one_kvstore_reads(name: str, values: dict[str, Any], tmp_path: Path) -> None:
    docs = render(values)
    table = _toml(docs)["server"]
    known = set(ServerConfig.field_names())
    unknown = {k for k in table if k.replace("-", "_") not in known}
    assert not unknown, f"kvstore.toml sets settings kvstore does not know: {unknown}"
    config = _server_config(docs, tmp_path)
    v = chart_values(values)["kvstore"]
    assert config.cpu_bytes == parse_size(v["cpuBytes"])
    assert config.ssd_bytes == parse_size(v["ssdBytes"])
    assert config.log_format == v["logFormat"]
    assert config.eviction == v["eviction"]
    assert list(config.codec) == v["codec"]
    for key, value in v["extraConfig"].items():
        assert getattr(config, key.replace("-", "_")) == value
    # The pod mounts what the config names, and the config is what the pod mounts.
    spec = pod_spec(docs)
    kv = container(spec, "kvstore")
    assert mount_of(kv, "data") == str(config.data_dir)
    assert mount_of(kv, "socket") == str(config.socket_path.parent)
    assert mount_of(kv, "config") == "/etc/kvstore"
    env = {e["name"]: e.get("value") for e in kv["env"]}
    assert env["KVSTORE_CONFIG"] == "/etc/kvstore/kvstore.toml"
    assert env["KVSTORE_SOCKET"] == str(config.socket_path)
    # A read-only root: /tmp (numba's cache) is a volume.
    assert kv["securityContext"]["readOnlyRootFilesystem"] is True
    assert mount_of(kv, "tmp") == "/tmp"


@pytest.mark.parametrize("mode", ["sidecar", "daemonset"])
def test_a_tokens_secret_reaches_the_server(mode: str, tmp_path: Path) -> None:
    assert "auth-tokens" not in _toml(render({"mode": mode}))["server"]
    auth = {"tokensSecret": "kvstore-tokens", "trustSocket": True}
    docs = render({"mode": mode, "kvstore": {"auth": auth}})
    config = _server_config(docs, tmp_path)
    assert config.auth_tokens == Path("/etc/kvstore-auth/tokens.toml")
    assert config.trust_socket is True
    spec = pod_spec(docs)
    assert mount_of(container(spec, "kvstore"), "auth") == "/etc/kvstore-auth"
    secret = volume(spec, "auth")["secret"]
    assert secret["secretName"] == "kvstore-tokens" and secret["defaultMode"] == 0o400


@pytest.mark.parametrize("mode", ["sidecar", "daemonset"])
def test_the_remote_tier_and_its_password_reach_the_server(mode: str, tmp_path: Path) -> None:
    assert "remote" not in _toml(render({"mode": mode}))["server"]
    urls = ["rediss://redis-0.cache:6379", "rediss://redis-1.cache:6379"]
    remote = {
        "enabled": True,
        "urls": urls,
        "write": "evict",
        "timeoutSeconds": 0.5,
        "passwordSecret": {"name": "kv-redis", "key": "pw"},
    }
    docs = render({"mode": mode, "remote": remote})
    config = _server_config(docs, tmp_path)
    assert config.tiers == ("cpu", "ssd", "remote")
    assert config.remote == tuple(urls)
    assert config.remote_write == "evict" and config.remote_timeout == 0.5
    env = {e["name"]: e for e in container(pod_spec(docs), "kvstore")["env"]}
    ref = env["KVSTORE_REMOTE_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "kv-redis", "key": "pw"}
    # No Secret named: no password variable, and the toml carries none either.
    docs = render({"mode": mode, "remote": {**remote, "passwordSecret": {"name": ""}}})
    names = {e["name"] for e in container(pod_spec(docs), "kvstore")["env"]}
    assert "KVSTORE_REMOTE_PASSWORD" not in names


def test_config_checksum_rolls_pods() -> None:
    def checksum(values: dict[str, Any]) -> str:
        workload = only(render(values), "Deployment")
        return str(workload["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum({}) == checksum({"engine": {"gpus": 2}})
    assert checksum({}) != checksum({"kvstore": {"cpuBytes": "4GiB"}})


# --- sidecar mode ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "values"), SIDECAR_VARIANTS, ids=[i for i, _ in SIDECAR_VARIANTS])
def test_kvstore_is_a_native_sidecar(name: str, values: dict[str, Any]) -> None:
    spec = pod_spec(render(values))
    init = [c for c in spec.get("initContainers", []) if c["name"] == "kvstore"]
    assert len(init) == 1, "kvstore must be an initContainer"
    assert init[0].get("restartPolicy") == "Always", "a native sidecar has restartPolicy Always"
    assert "kvstore" not in [c["name"] for c in spec["containers"]]
    assert [c["name"] for c in spec["containers"]] == ["engine"]
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > chart_values(values)["kvstore"]["graceSeconds"]


@pytest.mark.parametrize(("name", "values"), SIDECAR_VARIANTS, ids=[i for i, _ in SIDECAR_VARIANTS])
def test_socket_and_arena_are_shared(name: str, values: dict[str, Any]) -> None:
    docs = render(values)
    spec = pod_spec(docs)
    kv, engine = container(spec, "kvstore"), container(spec, "engine")
    socket_dir = chart_values(values)["kvstore"]["socketDir"]
    socket = volume_at(spec, kv, socket_dir)
    assert "emptyDir" in socket
    assert mount_of(engine, socket["name"]) == socket_dir
    shm = volume_at(spec, kv, "/dev/shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert mount_of(engine, shm["name"]) == "/dev/shm"
    env = {e["name"]: e.get("value") for e in engine["env"]}
    assert env["KVSTORE_SOCKET"] == _toml(docs)["server"]["socket"]
    assert env["KVSTORE_SOCKET"].startswith(socket_dir + "/")


def test_ssd_on_a_local_persistent_volume() -> None:
    docs = render()
    spec = pod_spec(docs)
    claim = only(docs, "PersistentVolumeClaim")
    data = volume(spec, "data")
    assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["storageClassName"] == "local-storage"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    size = quantity_bytes(claim["spec"]["resources"]["requests"]["storage"])
    assert size >= parse_size(chart_values()["kvstore"]["ssdBytes"])
    # One claim: the old pod must let go of it before the new one starts.
    assert only(docs, "Deployment")["spec"]["strategy"]["type"] == "Recreate"


def test_ssd_overrides() -> None:
    overrides = dict(SIDECAR_VARIANTS)["overrides"]
    claim = only(render(overrides), "PersistentVolumeClaim")
    assert claim["spec"]["storageClassName"] == "nvme-local"
    assert claim["spec"]["resources"]["requests"]["storage"] == "3Ti"
    docs = render({"ssd": {"type": "emptyDir"}})
    assert "PersistentVolumeClaim" not in [d.kind for d in docs]
    data = volume(pod_spec(docs), "data")
    assert quantity_bytes(data["emptyDir"]["sizeLimit"]) >= parse_size("64GiB")
    existing = render({"ssd": {"pvc": {"existingClaim": "my-nvme"}}})
    assert "PersistentVolumeClaim" not in [d.kind for d in existing]
    assert volume(pod_spec(existing), "data")["persistentVolumeClaim"]["claimName"] == "my-nvme"


def test_overrides_reach_the_pod() -> None:
    docs = render(dict(SIDECAR_VARIANTS)["overrides"])
    spec = pod_spec(docs)
    kv, engine = container(spec, "kvstore"), container(spec, "engine")
    # 32GiB arena + 2GiB overhead.
    assert kv["resources"]["limits"]["memory"] == f"{34 * 1024}Mi"
    assert volume(spec, "shm")["emptyDir"]["sizeLimit"] == f"{33 * 1024}Mi"
    assert kv["startupProbe"]["grpc"]["port"] == 6000
    assert mount_of(engine, "socket") == "/var/run/kv"
    # The engine's own securityContext is kept, IPC_LOCK added.
    assert engine["securityContext"]["runAsUser"] == 10001
    assert sorted(_caps(engine)) == ["IPC_LOCK", "SYS_PTRACE"]


def test_engine_defaults() -> None:
    spec = pod_spec(render())
    engine = container(spec, "engine")
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert engine["image"].startswith("vllm/")
    assert "claims" not in engine["resources"]
    assert "resourceClaims" not in spec
    assert "shareProcessNamespace" not in spec
    kv = container(spec, "kvstore")
    assert kv["image"] == "kvstore:cpu"
    assert "nvidia.com/gpu" not in kv["resources"]["limits"]
    assert _toml(render())["server"]["tiers"] == ["cpu", "ssd"]


def test_gpu_tier_shares_one_dra_claim() -> None:
    docs = render({"gpuTier": {"enabled": True}, "engine": {"gpus": 2}})
    spec = pod_spec(docs)
    template = only(docs, "ResourceClaimTemplate")
    assert template["apiVersion"] == "resource.k8s.io/v1"
    (request,) = template["spec"]["spec"]["devices"]["requests"]
    assert request["exactly"]["deviceClassName"] == "gpu.nvidia.com"
    assert request["exactly"]["count"] == 2
    (claim,) = spec["resourceClaims"]
    assert claim["resourceClaimTemplateName"] == template["metadata"]["name"]
    for name in ("kvstore", "engine"):
        c = container(spec, name)
        assert {"name": claim["name"]} in c["resources"]["claims"], f"{name} lacks the claim"
        assert "nvidia.com/gpu" not in c["resources"]["limits"], "GPUs come from the claim"
    assert spec["shareProcessNamespace"] is True  # CUDA IPC across the two containers
    assert container(spec, "kvstore")["image"] == "kvstore:gpu"
    assert _toml(docs)["server"]["tiers"] == ["gpu", "cpu", "ssd"]
    assert _toml(docs)["server"]["gpu-bytes"] == "4GiB"


def test_gpu_tier_needs_kubernetes_1_34() -> None:
    values = {"gpuTier": {"enabled": True}}
    with pytest.raises(helm_python.HelmRenderError, match=r"Kubernetes >= 1\.34"):
        render(values, kube_version="v1.33.0")
    assert "ResourceClaimTemplate" in [d.kind for d in render(values, kube_version="v1.34.0")]


# --- daemonset mode ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "values"), DAEMONSET_VARIANTS, ids=[i for i, _ in DAEMONSET_VARIANTS]
)
def test_daemonset_shares_host_directories(name: str, values: dict[str, Any]) -> None:
    docs = render(values)
    spec = pod_spec(docs)
    v = chart_values(values)
    kv = container(spec, "kvstore")
    assert kv in spec["containers"]
    assert "restartPolicy" not in kv
    socket = volume_at(spec, kv, v["kvstore"]["socketDir"])
    assert socket["hostPath"]["path"] == v["daemonset"]["hostPaths"]["socketDir"]
    shm = volume_at(spec, kv, "/dev/shm")
    assert shm["hostPath"]["path"] == v["daemonset"]["hostPaths"]["shmDir"]
    data = volume_at(spec, kv, v["kvstore"]["dataDir"])
    if v["ssd"]["type"] == "emptyDir":
        assert "emptyDir" in data
    else:
        assert data["hostPath"]["path"] == v["ssd"]["hostPath"]
    assert spec.get("tolerations", []) == v["tolerations"]
    assert spec.get("nodeSelector", {}) == v["nodeSelector"]
    assert spec.get("priorityClassName", "") == v["priorityClassName"]
    assert spec["terminationGracePeriodSeconds"] > v["kvstore"]["graceSeconds"]


def test_daemonset_prepares_host_directories() -> None:
    spec = pod_spec(render({"mode": "daemonset"}))
    (prep,) = spec["initContainers"]
    assert prep.get("restartPolicy") is None  # a plain init container, run once
    script = " ".join(prep["command"])
    assert "chown 10001:10001" in script
    for name in ("socket", "shm", "data"):
        assert mount_of(prep, name) is not None
    assert sorted(_caps(prep)) == ["CHOWN", "FOWNER"]
    assert "initContainers" not in pod_spec(
        render({"mode": "daemonset", "daemonset": {"prepareHostDirs": False}})
    )


def test_daemonset_example_engine_mounts_the_same_paths() -> None:
    """deploy/examples/daemonset-engine.yaml is what the README tells engine pods to do."""
    import yaml

    example = yaml.safe_load((CHART.parents[1] / "examples" / "daemonset-engine.yaml").read_text())
    spec = example["spec"]["template"]["spec"]
    (engine,) = spec["containers"]
    v = chart_values({"mode": "daemonset"})
    socket = volume_at(spec, engine, v["kvstore"]["socketDir"])
    assert socket["hostPath"]["path"] == v["daemonset"]["hostPaths"]["socketDir"]
    shm = volume_at(spec, engine, "/dev/shm")
    assert shm["hostPath"]["path"] == v["daemonset"]["hostPaths"]["shmDir"]
    env = {e["name"]: e.get("value") for e in engine["env"]}
    assert env["KVSTORE_SOCKET"] == _toml(render({"mode": "daemonset"}))["server"]["socket"]
    assert engine["securityContext"]["runAsUser"] in (0, v["kvstore"]["uid"])
    assert "IPC_LOCK" in _caps(engine)


# --- values the chart refuses ------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sidecar": {"replicas": 2}}, "one ReadWriteOnce claim"),
        ({"mode": "daemonset", "ssd": {"type": "pvc"}}, "DaemonSet cannot"),
        ({"ssd": {"type": "hostPath"}}, "for mode daemonset"),
        ({"mode": "daemonset", "gpuTier": {"enabled": True}}, "PID namespaces"),
        ({"kvstore": {"graceSeconds": 60}}, "must exceed kvstore.graceSeconds"),
        ({"remote": {"enabled": True}}, "needs remote.urls"),
    ],
)
def test_bad_combinations_fail_with_a_reason(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=message):
        render(values)


@pytest.mark.parametrize(
    "values",
    [
        {"mode": "statefulset"},
        {"kvstore": {"cpuBytes": "1.5GiB"}},
        {"kvstore": {"cpuBytes": "8 gigs"}},
        {"kvstore": {"extraConfig": {"tiers": "gpu"}}},
        {"kvstore": {"resources": {"limits": {"memory": "1Gi"}}}},
        {"kvstore": {"logFormat": "xml"}},
        {"engine": {"name": "kvstore"}},
        {"remote": {"enabled": True, "urls": ["http://redis:6379"]}},
        {"remote": {"write": "sometimes"}},
        {"unknownKey": 1},
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        render(values)


def test_schema_extra_config_keys_are_server_settings() -> None:
    """extraConfig may name only settings kvstore knows and the chart does not set."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    extra = schema["properties"]["kvstore"]["properties"]["extraConfig"]["propertyNames"]["enum"]
    known = set(ServerConfig.field_names())
    assert {k.replace("-", "_") for k in extra} <= known
    set_by_chart = set(_toml(render({"gpuTier": {"enabled": True}}))["server"])
    assert not set(extra) & set_by_chart


def test_values_are_documented() -> None:
    """Every key of values.yaml has a comment above it, or sits in a block that has one."""
    undocumented = []
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    previous = ""
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith(("#", "-")) or ":" not in stripped:
            previous = stripped
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = previous.startswith("#") or (bool(stack) and stack[-1][1])
        if not documented:
            undocumented.append(stripped)
        stack.append((indent, documented))
        previous = stripped
    assert undocumented == []
