"""deploy/kubernetes/monitoring, checked by the tools their users run.

- fanout.rules.yml passes `promtool check rules`, and its unit tests
  (fanout.rules.test.yml) pass `promtool test rules`, and fail when a rule loses
  what they test; prometheusrule.yaml holds exactly the same groups.
- Alerts exist for the failure modes issue 11 added metrics for: bus task
  restarts, publish timeouts, maxmemory refusals, upgrades refused, admin refused.
- grafana-dashboard.json: every query is valid PromQL (promtool), names only
  metrics the engine exports, and every exported metric is on the dashboard.
- The metrics the engine exports are read from its code (every `fanout_...`
  name in engine/, and which of them are histograms); the process test
  tests/process/test_metrics_scrape.py checks the same files against a real
  scrape.
- The kustomization renders; the ConfigMap validates against the Kubernetes
  schemas; the PodMonitor (a custom resource: kubernetes-validate has no schema
  for it) selects the Deployment's pods on the port the admin listens on.
"""

from __future__ import annotations

import ast
import itertools
import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.unit.test_deploy import K8S_VERSION, load_docs, raw_base, render

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "kubernetes" / "monitoring"
RULES = MONITORING / "fanout.rules.yml"
RULES_TEST = MONITORING / "fanout.rules.test.yml"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (`make system-deps` installs it)")
    return binary


def run_promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


# ---- what the engine exports, read from its code ------------------------------


@cache
def exported() -> dict[str, bool]:
    """Every metric name in engine/ (a string that is a whole `fanout_...` name)
    -> whether it is a histogram (the name next to "histogram" in a Family(...)
    call or a series tuple)."""
    names: dict[str, bool] = {}
    for path in sorted((REPO / "engine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.fullmatch(r"fanout_[a-z][a-z0-9_]*", node.value)
            ):
                names.setdefault(node.value, False)
            if isinstance(node, ast.Call | ast.Tuple):
                items = node.args if isinstance(node, ast.Call) else node.elts
                values = [i.value if isinstance(i, ast.Constant) else None for i in items]
                for name, kind in itertools.pairwise(values):
                    if isinstance(name, str) and name.startswith("fanout_") and kind == "histogram":
                        names[name] = True
    return names


def family_of(series: str, histograms: Iterable[str]) -> str:
    """The family a series name belongs to (a histogram's _bucket/_sum/_count)."""
    for name in histograms:
        if series.startswith(name) and series[len(name) :] in HISTOGRAM_SUFFIXES:
            return name
    return series


def test_the_engine_exports_what_the_readme_lists() -> None:
    """The reading of the code finds the families (a refactor that builds names
    another way must update exported())."""
    names = exported()
    assert len(names) >= 40
    assert {n for n, hist in names.items() if hist} == {
        "fanout_flush_duration_seconds",
        "fanout_ws_publish_duration_seconds",
        "fanout_publish_duration_seconds",
        "fanout_gc_pause_seconds",
    }
    assert {
        "fanout_upgrades_refused_total",
        "fanout_bus_events_total",
        "fanout_admin_bus_events_total",
        "fanout_admin_refused_total",
        "fanout_topics",
        "fanout_topic_load_failures_total",
    } <= set(names)


# ---- PromQL: the metric names a query reads ------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<num>\d[\w.]*)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^(){}\[\],=<>@:])
    )""",
    re.VERBOSE,
)
_AGGREGATIONS = frozenset({
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
})  # fmt: skip
_LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = (
    frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"})
    | _LABEL_LIST_KEYWORDS
)


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Prometheus gets it: Grafana's variables filled in."""
    expr = re.sub(r"\$__(rate_)?interval|\$__range", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)  # $instance in a =~ matcher


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not a
    function, an aggregation, a keyword, a label (in {...} or in by/on/... lists)."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        assert m and m.end() > pos, f"cannot read {expr[pos:]!r} in {expr!r}"
        pos = m.end()
        kind = m.lastgroup
        assert kind is not None
        tokens.append((kind, m.group(kind)))
    names: set[str] = set()
    braces = 0
    label_list = False
    for n, (kind, text) in enumerate(tokens):
        following = tokens[n + 1][1] if n + 1 < len(tokens) else ""
        if text == "{":
            braces += 1
        elif text == "}":
            braces -= 1
        elif label_list:
            label_list = text != ")"
        elif kind == "ident" and braces == 0:
            if text in _LABEL_LIST_KEYWORDS and following == "(":
                label_list = True
            elif following == "(" or text in _AGGREGATIONS or text in _KEYWORDS:
                continue
            else:
                names.add(text)
    return names


def test_metric_names_reads_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{x=~"1|2", le!="1"}[5m])))'
        " > on (instance) group_left (worker) b offset 5m or sum(c) without (d) / count(e == bool 1)"
    )
    assert metric_names(expr) == {"a_bucket", "b", "c", "e"}
    assert metric_names(grafana_to_promql('rate(f{instance=~"$instance"}[$__rate_interval])')) == {
        "f"
    }


# ---- the rules -----------------------------------------------------------------


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_rules_pass_promtool_check() -> None:
    done = run_promtool("check", "rules", "--lint=all", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_rule_unit_tests_pass() -> None:
    done = run_promtool("test", "rules", RULES_TEST.name)
    assert done.returncode == 0, done.stdout + done.stderr


def test_rule_unit_tests_fail_when_a_rule_loses_what_they_test(tmp_path: Path) -> None:
    """The unit tests bite: FanoutAdminRefusing without its idle filter fires for
    idle connections the admin closed, which the test says must not fire."""
    text = RULES.read_text()
    assert text.count('{reason!="idle"}') == 1
    (tmp_path / RULES.name).write_text(text.replace('{reason!="idle"}', ""))
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    done = run_promtool("test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert done.returncode != 0
    assert "FanoutAdminRefusing" in done.stdout + done.stderr


def test_the_prometheus_rule_holds_the_rules_file() -> None:
    [doc] = load_docs(PROMETHEUS_RULE.read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["spec"] == yaml.safe_load(RULES.read_text()), (
        "prometheusrule.yaml and fanout.rules.yml differ: change both"
    )


def test_every_rule_names_exported_metrics_and_says_what_to_do() -> None:
    names = exported()
    histograms = [n for n, hist in names.items() if hist]
    alerts = set()
    for rule in rules():
        alerts.add(rule["alert"])
        used = metric_names(rule["expr"])
        assert used, rule["alert"]
        unknown = {m for m in used if family_of(m, histograms) not in names}
        assert not unknown, f"{rule['alert']}: no such metric {sorted(unknown)}"
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
    assert len(alerts) == len(rules()), "two rules with one alert name"


def test_hardening_failures_have_alerts() -> None:
    """Issue 11's failure modes, each with an alert on its metric."""
    exprs = {rule["alert"]: rule["expr"] for rule in rules()}

    def alerting_on(metric: str, matcher: str = "") -> set[str]:
        return {a for a, e in exprs.items() if metric in metric_names(e) and matcher in e}

    for event in ("task_restarts", "publish_timeouts", "oom_refusals"):
        for family in ("fanout_bus_events_total", "fanout_admin_bus_events_total"):
            assert alerting_on(family, f'event="{event}"'), f"no alert on {family} {event}"
    assert alerting_on("fanout_upgrades_refused_total", "busy")
    assert alerting_on("fanout_upgrades_refused_total", "full")
    assert alerting_on("fanout_admin_refused_total")
    assert alerting_on("fanout_topic_load_failures_total")
    assert alerting_on("fanout_http_publish_failures_total")


# ---- the dashboard ---------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query, variables' queries included."""
    out = [
        (panel["title"], target["expr"])
        for panel in panels(board)
        for target in panel.get("targets", [])
    ]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            inner = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"]["query"])
            assert inner, var
            out.append((f"variable {var['name']}", inner.group(1)))
    return out


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every query, Grafana's variables filled in, checked by promtool as a
    recording rule."""
    records = [
        {"record": f"dashboard:query_{n}", "expr": grafana_to_promql(expr)}
        for n, (_, expr) in enumerate(queries(dashboard()))
    ]
    (tmp_path / "dashboard.rules.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]})
    )
    done = run_promtool("check", "rules", "dashboard.rules.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_names_only_exported_metrics_and_shows_every_one() -> None:
    names = exported()
    histograms = [n for n, hist in names.items() if hist]
    shown = set()
    for title, expr in queries(dashboard()):
        used = {family_of(m, histograms) for m in metric_names(grafana_to_promql(expr))}
        assert used, f"{title}: {expr} reads no metric"
        assert used <= set(names), f"{title}: no such metric {sorted(used - set(names))}"
        shown |= used
    assert set(names) <= shown, f"exported but not on the dashboard: {sorted(set(names) - shown)}"


def test_dashboard_is_importable() -> None:
    """What Grafana needs to import it anywhere: a uid, a data source chosen by a
    variable (no uid of someone's Prometheus), unique panel ids, each panel
    within the 24-column grid, every query with its own refId."""
    board = dashboard()
    assert board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel.get("description"), f"{panel['title']}: say what it shows"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


# ---- the kustomization -------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    docs = render(MONITORING)
    if docs is None:
        pytest.skip("no kustomize or kubectl installed: the monitoring kustomization is rendered")
    return docs


def test_every_file_is_listed_or_a_plain_prometheus_file() -> None:
    kust = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    for gen in kust.get("configMapGenerator", []):
        listed |= {f.partition("=")[2] or f for f in gen["files"]}
    plain = {RULES.name, RULES_TEST.name}  # for Prometheus without the operator
    on_disk = {p.name for p in MONITORING.iterdir() if p.name != "kustomization.yaml"}
    assert on_disk == listed | plain
    in_base = {d["kind"] for d in raw_base()} & {"PodMonitor", "PrometheusRule"}
    assert not in_base, (
        "custom resources in the base would make `kubectl apply -k base` fail without the CRDs"
    )


def test_rendered_resources_validate(rendered: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in rendered}
    assert kinds == {"ConfigMap", "PodMonitor", "PrometheusRule"}
    for doc in rendered:
        assert doc["metadata"]["namespace"] == "fanout", doc["kind"]
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # custom resources: checked below and by promtool
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    [configmap] = [d for d in rendered if d["kind"] == "ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"][DASHBOARD.name]) == dashboard()
    [rule] = [d for d in rendered if d["kind"] == "PrometheusRule"]
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_the_pod_monitor_scrapes_the_admin_port_of_the_engine_pods(
    rendered: list[dict[str, Any]],
) -> None:
    [monitor] = [d for d in rendered if d["kind"] == "PodMonitor"]
    base = raw_base()
    [deployment] = [d for d in base if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]
    assert monitor["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    [container] = [c for c in pod["spec"]["containers"] if c["name"] == "fanout"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert str(ports[endpoint["port"]]) == pod["metadata"]["annotations"]["prometheus.io/port"]
