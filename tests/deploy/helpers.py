"""Helpers of the deploy tests: the chart rendered through Helm's engine (helm-python-sdk),
its objects parsed, and the pieces of a pod spec the tests look at."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "kvstore"
K8S_DIR = DEPLOY / "k8s"
YAMLLINT_CONFIG = DEPLOY / ".yamllint.yaml"
RELEASE = "kvstore"

helm_python = pytest.importorskip("helm_python")


def load_script() -> ModuleType:
    """scripts/render_manifests.py as a module (scripts/ is no package)."""
    name = "render_manifests"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "render_manifests.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@functools.cache
def _chart() -> Any:
    return helm_python.Chart.load(CHART)


@dataclass(frozen=True)
class Doc:
    """One object of a rendering: its template, its text and its parsed form."""

    template: str
    text: str
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.obj["kind"])


@functools.cache
def _render_cached(values_json: str, kube_version: str | None) -> dict[str, str]:
    values = json.loads(values_json)
    if kube_version is None:
        rendered: dict[str, str] = _chart().render(values=values, name=RELEASE)
        return rendered
    # helm-python-sdk 0.2.2 passes no kube_version to render; its C library takes one.
    from helm_python import _native

    opts = {"name": RELEASE, "kube_version": kube_version}
    text = _native.call_string("helm_render", _chart()._raw(), values_json, json.dumps(opts))
    out: dict[str, str] = json.loads(text)
    return out


def render_raw(
    values: dict[str, Any] | None = None, kube_version: str | None = None
) -> dict[str, str]:
    """{template path: text} of the chart with `values` over its defaults."""
    return dict(_render_cached(json.dumps(values or {}, sort_keys=True), kube_version))


def render(values: dict[str, Any] | None = None, kube_version: str | None = None) -> list[Doc]:
    """Every object the chart renders with `values` (NOTES.txt left out)."""
    split = load_script().split_documents
    docs = []
    for path, text in sorted(render_raw(values, kube_version).items()):
        if path.endswith("NOTES.txt"):
            continue
        for part in split(text):
            obj = yaml.safe_load(part)
            assert isinstance(obj, dict), f"{path}: a document is not a mapping"
            docs.append(Doc(path, part, obj))
    return docs


def only(docs: list[Doc], kind: str) -> dict[str, Any]:
    found = [d.obj for d in docs if d.kind == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def chart_values(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The values a release with `overrides` uses (defaults coalesced)."""
    merged: dict[str, Any] = _chart().merge_values(overrides or {})
    return merged


def pod_spec(docs: list[Doc]) -> dict[str, Any]:
    workloads = [d.obj for d in docs if d.kind in ("Deployment", "DaemonSet")]
    assert len(workloads) == 1, [d.kind for d in docs]
    spec: dict[str, Any] = workloads[0]["spec"]["template"]["spec"]
    return spec


def all_containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in all_containers(spec) if c["name"] == name]
    assert len(found) == 1, f"expected one container {name!r}, got {len(found)}"
    return found[0]


def volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [v for v in spec.get("volumes", []) if v["name"] == name]
    assert len(found) == 1, f"expected one volume {name!r}, got {len(found)}"
    return found[0]


def mount_of(c: dict[str, Any], volume_name: str) -> str | None:
    """Where container `c` mounts volume `volume_name` (None: it does not)."""
    for m in c.get("volumeMounts", []):
        if m["name"] == volume_name:
            return str(m["mountPath"])
    return None


def volume_at(spec: dict[str, Any], c: dict[str, Any], path: str) -> dict[str, Any]:
    """The pod volume container `c` mounts at `path`; fails if none."""
    names = [m["name"] for m in c.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(names) == 1, f"{c['name']} mounts {len(names)} volumes at {path}"
    return volume(spec, names[0])


_QUANTITY_SUFFIXES = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "Pi": 1 << 50,
}


def quantity_bytes(q: str | int) -> int:
    """A Kubernetes memory quantity ("9216Mi", "8Gi", "1e9") in bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?", str(q))
    assert m, f"cannot read quantity {q!r}"
    return int(Decimal(m.group(1)) * _QUANTITY_SUFFIXES[m.group(2) or ""])


# The render variants the tests check: (id, values).
SIDECAR_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("default", {}),
    ("ssd-emptydir", {"ssd": {"type": "emptyDir"}}),
    (
        "overrides",
        {
            "kvstore": {
                "cpuBytes": "32GiB",
                "ssdBytes": "2TB",
                "memoryOverhead": "2GiB",
                "healthPort": 6000,
                "metricsPort": 6001,
                "socketDir": "/var/run/kv",
                "codec": ["ssd[llama-3-8b/*]=kivi:bits=4", "ssd=zstd"],
                "eviction": "gdsf",
                "extraConfig": {"lease-seconds": 45, "chunk-tokens": 512},
            },
            "engine": {
                "securityContext": {"runAsUser": 10001, "capabilities": {"add": ["SYS_PTRACE"]}}
            },
            "ssd": {"pvc": {"storageClassName": "nvme-local", "size": "3Ti"}},
        },
    ),
    ("gpu-tier", {"gpuTier": {"enabled": True}}),
]
DAEMONSET_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("default", {"mode": "daemonset"}),
    (
        "overrides",
        {
            "mode": "daemonset",
            "ssd": {"type": "emptyDir"},
            "kvstore": {"cpuBytes": "64GiB", "healthPort": 7000},
            "daemonset": {"hostPaths": {"socketDir": "/run/kv", "shmDir": "/mnt/kv-shm"}},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "priorityClassName": "system-node-critical",
        },
    ),
]
ALL_VARIANTS = [(f"sidecar-{i}", v) for i, v in SIDECAR_VARIANTS] + [
    (f"daemonset-{i}", v) for i, v in DAEMONSET_VARIANTS
]
