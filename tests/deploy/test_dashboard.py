"""deploy/grafana/kvstore-dashboard.json: it parses, every panel queries Prometheus through
the dashboard's datasource variable, and it names only metrics kvstore-server exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from .helpers import DEPLOY

DASHBOARD = DEPLOY / "grafana" / "kvstore-dashboard.json"

# The metric names kvstore-server exposes (kvstore/metrics.py), histogram series included.
SERVER_METRICS = {
    "kvstore_tier_hits_total",
    "kvstore_tier_misses_total",
    "kvstore_tier_evictions_total",
    "kvstore_tier_promotions_total",
    "kvstore_tier_demotions_total",
    "kvstore_tier_entries",
    "kvstore_tier_used_bytes",
    "kvstore_tier_capacity_bytes",
    "kvstore_entries",
    "kvstore_pinned_entries",
    "kvstore_leases",
    "kvstore_request_duration_seconds_bucket",
    "kvstore_request_duration_seconds_sum",
    "kvstore_request_duration_seconds_count",
    "kvstore_requests_total",
    "kvstore_codec_raw_bytes_total",
    "kvstore_codec_encoded_bytes_total",
    "kvstore_ssd_writes_total",
    "kvstore_ssd_writer_encoded_total",
    "kvstore_ssd_writer_seconds_total",
    "kvstore_build_info",
    "kvstore_uptime_seconds",
}
TIER_METRICS = {m for m in SERVER_METRICS if m.startswith("kvstore_tier_")}
METRIC_RE = re.compile(r"\bkvstore_[a-z_]+\b")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return parsed


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p["targets"]]


def test_dashboard_basics(dashboard: dict[str, Any]) -> None:
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    ids = [p["id"] for p in [*rows, *_panels(dashboard)]]
    assert len(set(ids)) == len(ids), "panel ids must be unique"
    assert len(list(_panels(dashboard))) >= 10


def test_template_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    tier = variables["tier"]
    assert tier["type"] == "query"
    assert tier["datasource"]["uid"] == "${datasource}"
    query = tier["query"]["query"] if isinstance(tier["query"], dict) else tier["query"]
    assert re.fullmatch(r"label_values\(kvstore_tier_\w+(\{[^}]*\})?, *tier\)", query)
    assert tier["includeAll"] and tier["multi"]


def test_every_panel_queries_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    for panel in _panels(dashboard):
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel["targets"], f"{title} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), title
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{title}: empty expr"
            assert target.get("datasource", panel["datasource"])["uid"] == "${datasource}"


def test_only_metrics_the_server_exports(dashboard: dict[str, Any]) -> None:
    used = {m for e in _exprs(dashboard) for m in METRIC_RE.findall(e)}
    variables = json.dumps(dashboard["templating"])
    used |= set(METRIC_RE.findall(variables))
    assert used <= SERVER_METRICS, f"not exported by kvstore-server: {used - SERVER_METRICS}"
    # ... and the dashboard shows all of them.
    assert used == SERVER_METRICS, f"not on the dashboard: {SERVER_METRICS - used}"


def test_tier_panels_follow_the_tier_variable(dashboard: dict[str, Any]) -> None:
    for expr in _exprs(dashboard):
        for selector in re.findall(r"(kvstore_tier_\w+)(\{[^}]*\})?", expr):
            assert 'tier=~"$tier"' in selector[1], f"{selector[0]} ignores $tier: {expr}"


def _panel(dashboard: dict[str, Any], pattern: str) -> dict[str, Any]:
    found = [p for p in _panels(dashboard) if re.search(pattern, p["title"], re.IGNORECASE)]
    assert len(found) == 1, f"one panel matching {pattern!r}, got {[p['title'] for p in found]}"
    return found[0]


def test_panel_queries(dashboard: dict[str, Any]) -> None:
    def exprs(pattern: str) -> str:
        return "\n".join(t["expr"] for t in _panel(dashboard, pattern)["targets"])

    hit = exprs(r"hit ratio")
    assert "kvstore_tier_hits_total" in hit and "kvstore_tier_misses_total" in hit
    assert "/" in hit and "by (tier)" in hit
    assert "rate(kvstore_tier_misses_total" in exprs(r"hits and misses")
    used = exprs(r"bytes used")
    assert "kvstore_tier_used_bytes" in used and "kvstore_tier_capacity_bytes" in used
    moves = exprs(r"evictions")
    for name in ("evictions", "promotions", "demotions"):
        assert f"rate(kvstore_tier_{name}_total" in moves
    assert "sum by (rpc) (rate(kvstore_requests_total" in exprs(r"request rate")
    assert 'code!="OK"' in exprs(r"error rate")
    latency = exprs(r"p50")
    for q in ("0.5", "0.99"):
        assert f"histogram_quantile({q}, sum by (le, rpc) (rate(" in latency
    ratio = exprs(r"codec ratio")
    assert ratio.index("kvstore_codec_raw_bytes_total") < ratio.index("/")
    assert ratio.index("/") < ratio.index("kvstore_codec_encoded_bytes_total")
    assert "by (kind)" in exprs(r"^leases")
    assert "sum by (how) (rate(kvstore_ssd_writes_total" in exprs(r"ssd writes")
    assert "sum by (on) (rate(kvstore_ssd_writer_encoded_total" in exprs(r"ssd writer encodes")
    assert "sum by (doing) (rate(kvstore_ssd_writer_seconds_total" in exprs(r"ssd writer time")
