"""The shipped Prometheus config and Grafana dashboard (service/deploy/) stay true to
`service/metrics.py`: every series a panel queries exists, every metric has a panel, and the
scrape config, datasource and dashboard agree with each other."""

import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import Metrics
from service.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "service" / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "speech-serve.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
PROMETHEUS = DEPLOY / "prometheus.yml"

# Families deliberately without a panel, with the reason. Keep it empty if you can.
NOT_ON_THE_DASHBOARD: dict[str, str] = {}

# Series names each family type exposes (the `_created` samples are not worth a panel).
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}

# PromQL functions and aggregations a panel may call (add one when a panel needs it); a typo in a
# call fails the test instead of failing in Grafana.
FUNCTIONS = frozenset(
    """abs absent avg avg_over_time bottomk ceil clamp clamp_max clamp_min count delta deriv
    floor histogram_quantile increase irate label_replace max max_over_time min min_over_time
    quantile rate round scalar sort sort_desc sum time topk vector""".split()  # noqa: SIM905
)
KEYWORDS = frozenset(
    "and or unless bool offset by without on ignoring group_left group_right".split()  # noqa: SIM905
)
# Counters and histogram parts: the only series `rate`, `irate` and `increase` make sense over.
RATE_SUFFIXES = ("_total", "_bucket", "_sum", "_count")


# ------------------------------------------------------------------ helpers


@cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(items: list[dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels a collapsed row keeps inside itself."""
    for panel in dashboard()["panels"] if items is None else items:
        yield panel
        yield from panels(panel.get("panels", []))


def query_panels() -> list[dict[str, Any]]:
    return [panel for panel in panels() if panel["type"] != "row"]


def expressions() -> list[str]:
    return [target["expr"] for panel in query_panels() for target in panel["targets"]]


def datasource_refs(node: Any) -> Iterator[Any]:
    """Every `datasource` value anywhere in the dashboard (panels, targets, variables, ...)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from datasource_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from datasource_refs(value)


def identifiers(expr: str) -> tuple[set[str], set[str]]:
    """(functions called, series selected) in a PromQL expression.

    Label values, label matchers, ranges and grouping label lists are removed first, so what is
    left is numbers, operators, keywords, calls (a name followed by `(`) and series names."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    functions, series = set(), set()
    for match in re.finditer(r"(?<![\w.:$])[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        name = match.group()
        if text[match.end() :].lstrip().startswith("("):
            functions.add(name)
        elif name not in KEYWORDS:
            series.add(name)
    return functions, series


@cache
def exposed() -> dict[str, str]:
    """Every series name the service exposes for its own families -> the family it belongs to."""
    metrics = Metrics()
    types = {f.name: f.type for f in text_string_to_metric_families(metrics.render().decode())}
    names = {}
    for family in metrics.family_names():
        for suffix in SUFFIXES.get(types[family], ("",)):
            names[family + suffix] = family
    return names


# ------------------------------------------------------------------ the dashboard


def test_identifier_extraction() -> None:
    """The extractor itself: calls, series, and nothing from labels, ranges or strings."""
    functions, series = identifiers(
        'histogram_quantile(0.95, sum by (endpoint, le) (rate(a_bucket{job="x", le!="+Inf"}'
        "[$__rate_interval]))) / on (endpoint) group_left max(b_total offset 5m) > bool 1e-3"
    )
    assert functions == {"histogram_quantile", "sum", "rate", "max"}
    assert series == {"a_bucket", "b_total"}


def test_dashboard_is_provisionable() -> None:
    board = dashboard()
    assert board["uid"] == "speech-serve"
    assert board["title"]
    assert board["schemaVersion"] >= 36
    assert board.get("id") is None  # file provisioning assigns the id
    assert "__inputs" not in board  # an export "for sharing externally" does not provision
    assert "${" not in DASHBOARD.read_text()  # no unresolved ${DS_...}-style inputs


def test_every_panel_has_a_title_a_query_and_a_unique_id() -> None:
    everything = list(panels())
    ids = [panel["id"] for panel in everything]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert any(panel["type"] == "row" for panel in everything)
    assert len(query_panels()) >= 20
    for panel in everything:
        assert panel.get("title"), panel["id"]
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
    for panel in query_panels():
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]


def test_every_datasource_is_the_provisioned_prometheus() -> None:
    refs = list(datasource_refs(dashboard()))
    assert len(refs) > len(query_panels())  # panels and their targets both name it
    for ref in refs:
        assert ref == {"type": "prometheus", "uid": "prometheus"}, ref


@pytest.mark.parametrize("expr", expressions())
def test_every_query_uses_only_defined_metrics(expr: str) -> None:
    functions, series = identifiers(expr)
    assert functions <= FUNCTIONS, functions - FUNCTIONS
    assert series, "a query with no metric"
    unknown = {name for name in series if name not in exposed()}
    assert not unknown, f"not exposed by service/metrics.py: {sorted(unknown)}"
    for match in re.finditer(r"\b(?:rate|irate|increase)\(\s*([a-zA-Z_:][\w:]*)", expr):
        assert match.group(1).endswith(RATE_SUFFIXES), f"rate over a gauge: {match.group(1)}"
    if "histogram_quantile" in expr:  # aggregated buckets must keep `le`: `sum by (le) (...)`
        assert "_bucket" in expr
        assert not re.search(r"\b(?:sum|avg|min|max|count)\s*\(", expr), "write `sum by (le) (`"
        for grouping in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            assert "le" in re.split(r"\s*,\s*", grouping.strip()), "quantile grouping drops le"


def test_every_metric_has_a_panel() -> None:
    shown = {exposed()[name] for expr in expressions() for name in identifiers(expr)[1]}
    families = set(Metrics().family_names())
    assert set(NOT_ON_THE_DASHBOARD) <= families, "a left-out family no longer exists"
    missing = families - shown - set(NOT_ON_THE_DASHBOARD)
    assert not missing, f"metrics without a panel: {sorted(missing)}"


# ------------------------------------------------------------------ prometheus and grafana


def test_prometheus_scrapes_the_service() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "speech-serve"]
    assert job["metrics_path"] == "/metrics"
    assert job["scrape_interval"] == "5s"
    port = Settings.model_fields["port"].default
    assert job["static_configs"] == [{"targets": [f"speech-serve:{port}"]}]


def test_grafana_datasource_and_dashboard_agree() -> None:
    datasources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    (source,) = [source for source in datasources if source["type"] == "prometheus"]
    assert source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"
    uids = {ref["uid"] for ref in datasource_refs(dashboard())}
    assert uids == {source["uid"]}
    interval = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"][0]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == interval  # so $__rate_interval spans 4 scrapes


def test_grafana_loads_the_dashboard_folder() -> None:
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert DASHBOARD.parent.name == "dashboards"
