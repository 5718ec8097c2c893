"""The Grafana dashboards and provisioning files, read without Grafana: structure, variables, metric names."""

from __future__ import annotations

import re

import pytest
import yaml

from ..conftest import REPO
from .dashboards import DASHBOARDS, GRAFANA, load, panels, queries, substitute
from .registry import full_registry, metric_names

DATASOURCE_UID = "testbed-prometheus"


def test_the_three_dashboards_exist_with_unique_uids() -> None:
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert sorted(uids) == ["testbed-links", "testbed-overview", "testbed-training"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_structure(path) -> None:
    d = load(path)
    assert d["id"] is None  # provisioned dashboards must not carry a database id
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == DATASOURCE_UID
    for panel in panels(d):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$\{?(\w+)", target["expr"])) - {"__rate_interval", "__interval", "__range"}
            assert used <= set(variables), f"{panel['title']}: undefined variables {used - set(variables)}"


def test_every_query_uses_only_exported_metrics() -> None:
    exported = metric_names(full_registry())
    for path in DASHBOARDS:
        for where, expr in queries(load(path)):
            for name in re.findall(r"\btestbed_[a-z0-9_]+", expr):
                assert name in exported, f"{path.name} {where}: {name} is not exported"


def test_substitute_refuses_unknown_variables() -> None:
    assert substitute('x{device=~"$device"}[$__rate_interval]', {"device": ".*", "__rate_interval": "2s"}) == \
        'x{device=~".*"}[2s]'
    with pytest.raises(KeyError, match="nope"):
        substitute("x[${nope}]", {})


def test_provisioning_files() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "testbed-prometheus.yaml").read_text())
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == DATASOURCE_UID and source["url"].startswith("http")
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "testbed.yaml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


def test_docs_list_every_metric() -> None:
    doc = (REPO / "docs" / "metrics.md").read_text()
    families = {f.name for f in full_registry().collect() if f.name.startswith("testbed_")}
    missing = [name for name in sorted(families) if name not in doc]
    assert not missing, f"docs/metrics.md does not describe {missing}"
