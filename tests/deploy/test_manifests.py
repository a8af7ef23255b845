"""Kubernetes schemas, yamllint and freshness of everything deploy/ ships: the chart's
renderings, the plain manifests in deploy/k8s and the daemonset engine example."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helpers import (
    ALL_VARIANTS,
    CHART,
    DEPLOY,
    K8S_DIR,
    ROOT,
    YAMLLINT_CONFIG,
    load_script,
    render,
    render_raw,
)

kubernetes_validate = pytest.importorskip("kubernetes_validate")
yamllint_config = pytest.importorskip("yamllint.config")
yamllint_linter = pytest.importorskip("yamllint.linter")

OLDEST = "1.29.0"  # the chart's kubeVersion floor
NEWEST = kubernetes_validate.latest_version()
# Dynamic Resource Allocation objects and fields: resource.k8s.io/v1 is Kubernetes >= 1.34.
DRA_ONLY_VARIANTS = {"sidecar-gpu-tier"}
# Prometheus Operator kinds: no schema in kubernetes-validate.
CUSTOM_KINDS = {"ServiceMonitor"}
MANIFEST_FILES = sorted(K8S_DIR.glob("*.yaml"))
EXAMPLES = sorted((DEPLOY / "examples").glob("*.yaml"))


def _validate(obj: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path)
        kind = obj.get("kind")
        pytest.fail(
            f"{kind} {obj['metadata']['name']}: Kubernetes {version}: {path}: {exc.message}"
        )


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _lint(text: str, name: str) -> list[str]:
    config = yamllint_config.YamlLintConfig(file=str(YAMLLINT_CONFIG))
    return [f"{name}:{p.line}:{p.column}: {p.message}" for p in yamllint_linter.run(text, config)]


def test_there_are_plain_manifests_for_both_modes() -> None:
    assert [p.name for p in MANIFEST_FILES] == ["daemonset.yaml", "sidecar.yaml"]


# --- schemas -----------------------------------------------------------------------------


def test_strict_validation_catches_mistakes() -> None:
    """The validator this file relies on rejects a misspelt field and a wrong type."""
    deployment = next(d.obj for d in render() if d.kind == "Deployment")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    for bad in (typo, wrong):
        for version in (OLDEST, NEWEST):
            with pytest.raises(kubernetes_validate.ValidationError):
                kubernetes_validate.validate(bad, version, strict=True)


@pytest.mark.parametrize(("name", "values"), ALL_VARIANTS, ids=[i for i, _ in ALL_VARIANTS])
def test_rendered_objects_match_the_kubernetes_schemas(name: str, values: dict[str, Any]) -> None:
    versions = [NEWEST] if name in DRA_ONLY_VARIANTS else [OLDEST, NEWEST]
    checked = 0
    for doc in render(values):
        if doc.kind in CUSTOM_KINDS:
            continue
        for version in versions:
            _validate(doc.obj, version)
        checked += 1
    assert checked >= 3


def test_service_monitor_rendering_validates() -> None:
    docs = render({"metrics": {"serviceMonitor": {"enabled": True}}})
    for doc in docs:
        if doc.kind not in CUSTOM_KINDS:
            _validate(doc.obj, OLDEST)
            _validate(doc.obj, NEWEST)
    monitor = next(d.obj for d in docs if d.kind == "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"


@pytest.mark.parametrize("path", MANIFEST_FILES + EXAMPLES, ids=lambda p: p.name)
def test_plain_manifests_match_the_kubernetes_schemas(path: Path) -> None:
    objects = _load_all(path)
    assert objects
    for obj in objects:
        _validate(obj, OLDEST)
        _validate(obj, NEWEST)


# --- yamllint ----------------------------------------------------------------------------


def test_yamllint_config_is_strict_enough() -> None:
    problems = _lint("a: 1\nb:   [1,2]\nc: yes\n" + "d: " + "x" * 130 + "\n", "sample")
    assert len(problems) >= 3, problems


@pytest.mark.parametrize(("name", "values"), ALL_VARIANTS, ids=[i for i, _ in ALL_VARIANTS])
def test_rendered_output_passes_yamllint(name: str, values: dict[str, Any]) -> None:
    problems = []
    for path, text in render_raw(values).items():
        if not path.endswith("NOTES.txt"):
            problems += _lint(text, path)
    assert problems == []


@pytest.mark.parametrize(
    "path",
    [*MANIFEST_FILES, *EXAMPLES, CHART / "values.yaml", CHART / "Chart.yaml", YAMLLINT_CONFIG],
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_files_pass_yamllint(path: Path) -> None:
    assert _lint(path.read_text(), str(path.relative_to(ROOT))) == []


# --- freshness of deploy/k8s -------------------------------------------------------------


def test_plain_manifests_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "render_manifests.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (
        "deploy/k8s is stale: run python scripts/render_manifests.py and commit\n"
        + result.stdout[-3000:]
        + result.stderr[-2000:]
    )


def test_check_mode_reports_a_stale_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script()
    for mode in script.MODES:
        (tmp_path / f"{mode}.yaml").write_text(script.render_mode(mode))
    monkeypatch.setattr(script, "OUT_DIR", tmp_path)
    assert script.main(["--check"]) == 0
    stale = tmp_path / "daemonset.yaml"
    stale.write_text(stale.read_text().replace("cpu-bytes", "cpu-byte"))
    assert script.main(["--check"]) == 1
    out, err = capsys.readouterr()
    assert f"stale: {stale}" in err
    assert "-    cpu-byte = " in out and "+    cpu-bytes = " in out  # the diff
    # Without --check it rewrites the file.
    assert script.main([]) == 0
    assert script.main(["--check"]) == 0


def test_plain_manifests_are_the_chart_defaults() -> None:
    """The generated files hold each default rendering's objects, nothing more."""
    for mode in ("sidecar", "daemonset"):
        from_file = _load_all(K8S_DIR / f"{mode}.yaml")
        from_chart = [d.obj for d in render({"mode": mode})]
        key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
        assert sorted(from_file, key=key) == sorted(from_chart, key=key)
        text = (K8S_DIR / f"{mode}.yaml").read_text()
        assert text.startswith("# kvstore in")
        assert "GENERATED by scripts/render_manifests.py" in text.split("---", 1)[0]
        # Objects in an order kubectl can apply: the workload after its ConfigMap.
        kinds = [o["kind"] for o in from_file]
        workload = "Deployment" if mode == "sidecar" else "DaemonSet"
        assert kinds.index("ConfigMap") < kinds.index(workload)
