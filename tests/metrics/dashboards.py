"""Reading the Grafana dashboards as Prometheus would see them: every panel query, variables substituted."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from ..conftest import REPO

GRAFANA = REPO / "monitoring" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside a collapsed row


def queries(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(panel title / refId, PromQL expr) of every target of every panel."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield f"{panel['title']} / {target['refId']}", target["expr"]


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace Grafana variables ($name and ${name}); an unknown one is an error, not a silent leftover."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no test value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)
