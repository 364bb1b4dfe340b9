"""The monitoring kit's checks (deploy/monitoring), for deploy/check.py.

- PodMonitors select pods of the rendering, by ports those pods name, and together
  scrape kura's `metrics` port and every sidecar that serves metrics;
- every PrometheusRule passes `promtool check rules` (Prometheus's own parser, with
  its checks of templates and durations);
- every expression of an alert or a dashboard panel parses as PromQL, and every
  metric it names is one kura exports (string literals in src/) or one listed in
  deploy/monitoring/sidecar-metrics.txt; a histogram's _bucket, _count and _sum count
  as its name;
- a dashboard ConfigMap holds JSON whose panels use the dashboard's data source
  variable.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

import promql_parser
import yaml

# Sidecars whose --http-endpoint serves csi-lib-utils' metrics (the livenessprobe's
# does too, but only times Probe, which kura's own histogram counts).
METRICS_SIDECARS = {
    "csi-provisioner", "csi-snapshotter", "csi-resizer", "csi-external-health-monitor-controller",
}
SIDECAR_REGISTRY = "registry.k8s.io/sig-storage/"
DASHBOARD_LABEL = "grafana_dashboard"
DATASOURCE = "${datasource}"
# Grafana's built-in interval variables, as a value PromQL takes.
GRAFANA_INTERVALS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
# A counter is registered without it; the encoder (OpenMetrics) appends it.
COUNTER_SUFFIX = "_total"


def exported_names(src: Path, sidecar_list: Path) -> set[str]:
    """kura's metric names (registered as string literals in src/) and the sidecars'."""
    names = set()
    for path in sorted(src.rglob("*.rs")):
        names.update(re.findall(r'"((?:kura|csi_plugin)_[a-z0-9_]+)"', path.read_text()))
    for line in sidecar_list.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.add(name)
    return names


def metric_names(expr: str) -> list[str]:
    """The metric names an expression selects; ValueError if it does not parse or
    selects series by anything but a literal name."""
    names = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name
            if name is None:
                equal = [m.value for m in node.matchers.matchers
                         if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal]
                if not equal:
                    raise ValueError(f"{node}: select series by a literal metric name")
                name = equal[0]
            names.append(name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def known(name: str, exported: set[str]) -> bool:
    return name in exported or any(
        name.endswith(s) and name[: -len(s)] in exported for s in (*HISTOGRAM_SUFFIXES, COUNTER_SUFFIX)
    )


def check_expr(expr: str, exported: set[str], add, where: str) -> None:
    try:
        names = metric_names(expr)
    except ValueError as e:
        add(where, f"PromQL {expr!r}: {e}")
        return
    for name in names:
        if not known(name, exported):
            add(where, f"{name} is exported neither by kura (src/) nor by a sidecar (sidecar-metrics.txt)")


def check_rules(obj: dict, promtool: str, exported: set[str], add, where: str) -> None:
    groups = (obj.get("spec") or {}).get("groups") or []
    for group in groups:
        for rule in group.get("rules") or []:
            check_expr(str(rule.get("expr", "")), exported,
                       add, f"{where} rule {rule.get('alert') or rule.get('record')}")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="kura-rules-") as f:
        yaml.safe_dump({"groups": groups}, f)
        f.flush()
        try:
            result = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
        except FileNotFoundError:
            add(where, f"promtool ({promtool}) is not installed: scripts/deps.sh installs it")
            return
    if result.returncode != 0:
        detail = " ".join((result.stdout + result.stderr).split()).replace(f.name, "rules")
        add(where, f"promtool check rules fails: {detail}")


def panels(items):
    for panel in items:
        yield panel
        yield from panels(panel.get("panels") or [])


def grafana_expr(expr: str) -> str:
    for variable, value in GRAFANA_INTERVALS.items():
        expr = expr.replace(variable, value)
    return expr


def check_dashboard(obj: dict, exported: set[str], add, where: str) -> None:
    for key, text in (obj.get("data") or {}).items():
        here = f"{where} {key}"
        try:
            dashboard = json.loads(text)
        except json.JSONDecodeError as e:
            add(here, f"not JSON: {e}")
            continue
        for panel in panels(dashboard.get("panels") or []):
            title = f"{here} panel {panel.get('title')!r}"
            if panel.get("type") == "row":
                continue
            if (panel.get("datasource") or {}).get("uid") != DATASOURCE:
                add(title, f"datasource is not the dashboard's {DATASOURCE}")
            if not panel.get("targets"):
                add(title, "no query")
            for target in panel.get("targets") or []:
                check_expr(grafana_expr(str(target.get("expr", ""))), exported, add, title)
        for variable in (dashboard.get("templating") or {}).get("list") or []:
            query = variable.get("query")
            query = query.get("query", "") if isinstance(query, dict) else str(query or "")
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
            if variable.get("type") == "query":
                if not m:
                    add(f"{here} variable {variable.get('name')}", f"expected label_values(SELECTOR, LABEL), not {query!r}")
                else:
                    check_expr(m.group(1), exported, add, f"{here} variable {variable.get('name')}")


def pod_ports(obj: dict) -> dict:
    """Named container ports of a workload's pod: name -> container."""
    spec = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    return {
        port.get("name"): container
        for container in spec.get("containers") or []
        for port in container.get("ports") or [] if port.get("name")
    }


def scraped_ports(obj: dict) -> set[str]:
    """The ports a workload must have scraped: kura's `metrics`, and each metrics
    sidecar's --http-endpoint port."""
    wanted = set()
    for name, container in pod_ports(obj).items():
        repo = container.get("image", "").split("@")[0].rsplit(":", 1)[0]
        if repo == "kura" and name == "metrics":
            wanted.add(name)
        if repo.removeprefix(SIDECAR_REGISTRY) in METRICS_SIDECARS:
            endpoints = [a.split("=", 1)[1] for a in container.get("args") or [] if a.startswith("--http-endpoint=")]
            numbers = {p.get("containerPort") for p in container.get("ports") or [] if p.get("name") == name}
            if any(e.rsplit(":", 1)[-1] == str(n) for e in endpoints for n in numbers):
                wanted.add(name)
    return wanted


def check_pod_monitors(objects: list, add) -> None:
    monitors = [o for o in objects if o.get("kind") == "PodMonitor"]
    workloads = [o for o in objects if o.get("kind") in ("Deployment", "DaemonSet")]
    if not monitors:
        return
    covered = {id(w): set() for w in workloads}
    for monitor in monitors:
        where = f"PodMonitor/{monitor['metadata'].get('namespace')}/{monitor['metadata'].get('name')}"
        spec = monitor.get("spec") or {}
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        selected = [
            w for w in workloads
            if w["metadata"].get("namespace") == monitor["metadata"].get("namespace")
            and selector
            and all((w["spec"]["template"]["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
        ]
        if not selected:
            add(where, f"its selector {selector} selects no pod of the rendering in its namespace")
        for endpoint in spec.get("podMetricsEndpoints") or []:
            port = endpoint.get("port")
            for w in selected:
                if port not in pod_ports(w):
                    add(where, f"port {port!r} is not a named port of {w['kind']}/{w['metadata']['name']}")
                else:
                    covered[id(w)].add(port)
    for w in workloads:
        for port in sorted(scraped_ports(w) - covered[id(w)]):
            add(f"{w['kind']}/{w['metadata'].get('namespace')}/{w['metadata']['name']}",
                f"port {port!r} serves metrics but no PodMonitor scrapes it")


def check_monitoring(objects: list, promtool: str, exported: set[str], add) -> None:
    for obj in objects:
        where = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('namespace')}/{(obj.get('metadata') or {}).get('name')}"
        if obj.get("kind") == "PrometheusRule":
            check_rules(obj, promtool, exported, add, where)
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if obj.get("kind") == "ConfigMap" and DASHBOARD_LABEL in labels:
            check_dashboard(obj, exported, add, where)
    check_pod_monitors(objects, add)
