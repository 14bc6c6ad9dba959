"""Prometheus and Grafana files, checked without a server: promtool accepts the config, the rules and
their unit tests; the scaled test copy of the rules is complete; every series the rules and the dashboard
select exists; every dashboard panel has valid PromQL; the Grafana provisioning matches compose."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from monitoring import scale_rules
from tests.deploy_files import declared_metrics, promtool_ok, published
from tests.promtools import (
    ALERTS_TEST_YML,
    ALERTS_YML,
    DASHBOARD_JSON,
    DASHBOARD_PROVIDERS_DIR,
    DATASOURCES_DIR,
    MONITORING,
    PROMETHEUS_YML,
    REPO,
    dashboard_targets,
    grafana_to_promql,
    load_dashboard,
    load_yaml,
    metric_names,
    rules_of,
    with_bool,
)

TEST_SCALE = 1 / 60  # what the integration test uses

# ----------------------------------------------------------------------------- Prometheus
def test_promtool_accepts_config_and_rules() -> None:
    out = promtool_ok("check", "config", str(PROMETHEUS_YML))
    assert "1 rule files found" in out
    promtool_ok("check", "rules", str(ALERTS_YML))


def test_alert_rules_unit_tests_pass() -> None:
    """monitoring/alerts_test.yml: synthetic attack, errors, rejections, dead worker, production windows."""
    promtool_ok("test", "rules", str(ALERTS_TEST_YML), cwd=MONITORING)


def test_alerts_cover_exit_rate_compute_errors_rejections_and_workers_with_severity() -> None:
    alerts = {r["alert"]: r for r in rules_of(load_yaml(ALERTS_YML), "alert")}
    assert {"EarlyExitRateDrop", "ComputePerRequestNearFull", "InferenceErrorRateHigh", "RequestRejectionRateHigh",
            "TorchServeDown", "ModelWorkersNotAnswering"} <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert "for" in rule, f"{name} would fire on one bad evaluation"


def test_every_series_the_rules_and_dashboard_select_exists() -> None:
    """Each name is a metric serving/metrics.yaml declares, a rule recorded in alerts.yml, or Prometheus's own."""
    rules = load_yaml(ALERTS_YML)
    known = declared_metrics() | {r["record"] for r in rules_of(rules, "record")} | {"up", "ALERTS"}
    exprs = [r["expr"] for r in rules_of(rules, "record") + rules_of(rules, "alert")]
    exprs += [t["expr"] for _, t in dashboard_targets(load_dashboard())]
    for expr in exprs:
        unknown = metric_names(expr) - known
        assert not unknown, f"{sorted(unknown)} in {expr!r} is neither declared nor recorded"
    # Custom counters carry no _total suffix in TorchServe's exposition (stack notes).
    assert not any(re.search(r"\b(EarlyExitCount|Compute\w+MFLOPs|RequestsRejected)_total\b", e) for e in exprs)


def test_scale_expr_rewrites_every_duration_and_nothing_else() -> None:
    s = scale_rules.scale_expr
    assert s('rate(x{a="5m"}[5m])', 1 / 60) == 'rate(x{a="5m"}[5s])'
    assert s("avg_over_time(r[1h] offset 10m)", 1 / 60) == "avg_over_time(r[60s] offset 10s)"
    assert s("max_over_time(rate(x[1m])[1h30m:1m])", 1 / 60) == "max_over_time(rate(x[1s])[90s:1s])"
    assert s("x[2m:]", 0.5) == "x[60s:]"
    assert s("up == 0", 0.01) == "up == 0"
    assert scale_rules.scale_duration("250ms", 1) == "1s"
    with pytest.raises(ValueError):
        scale_rules.parse_duration("5 minutes")


def test_scaled_test_rules_are_the_shipped_rules_with_shorter_durations(tmp_path: Path) -> None:
    doc = load_yaml(ALERTS_YML)
    fast = scale_rules.scale_rules(doc, TEST_SCALE)
    path = tmp_path / "fast.yml"
    path.write_text(scale_rules.dump_rules(fast))
    promtool_ok("check", "rules", str(path))
    for group, fast_group in zip(doc["groups"], fast["groups"]):
        assert [r.get("record") or r.get("alert") for r in group["rules"]] == \
               [r.get("record") or r.get("alert") for r in fast_group["rules"]]
        for rule, fast_rule in zip(group["rules"], fast_group["rules"]):
            before = scale_rules.durations_in(rule["expr"])
            after = scale_rules.durations_in(fast_rule["expr"])
            assert [scale_rules.scale_duration(d, TEST_SCALE) for d in before] == after
            # the expression is unchanged apart from its durations
            assert re.sub(r"\d+(ms|[smhdwy])", "D", rule["expr"]) == re.sub(r"\d+(ms|[smhdwy])", "D", fast_rule["expr"])
            assert all(scale_rules.parse_duration(d) <= 60 for d in after), fast_rule
            if "for" in rule:
                assert fast_rule["for"] == scale_rules.scale_duration(rule["for"], TEST_SCALE)


def test_with_bool_keeps_label_matchers_and_strings() -> None:
    assert with_bool('up{job="a",x!="b"} == 0') == 'up{job="a",x!="b"} == bool 0'
    assert with_bool('a > 0.5 * b and on (m) c >= bool 1') == 'a > bool 0.5 * b and on (m) c >= bool 1'
    assert with_bool('label_replace(x, "y", "$1", "z", "(a>b)") < 2') == \
           'label_replace(x, "y", "$1", "z", "(a>b)") < bool 2'


# ----------------------------------------------------------------------------- Grafana
def test_dashboard_panels_have_valid_promql(tmp_path: Path) -> None:
    """Every panel has a PromQL target; promtool parses each one (as a recording rule) after Grafana's
    variables are substituted; the datasource is the provisioned one."""
    dashboard = load_dashboard()
    datasource_uids = {d["uid"] for f in DATASOURCES_DIR.glob("*.yml") for d in load_yaml(f)["datasources"]}
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rules = []
    for panel in dashboard["panels"]:
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] in datasource_uids
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel.get("description"), f"panel {panel['title']!r} has no description"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in datasource_uids
            assert target["expr"].strip()
            rules.append({"record": f"dashboard:panel{panel['id']}_{target['refId']}",
                          "expr": grafana_to_promql(target["expr"])})
    for annotation in dashboard["annotations"]["list"]:
        rules.append({"record": "dashboard:annotation", "expr": grafana_to_promql(annotation["expr"])})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool_ok("check", "rules", str(path))
    variables = dashboard["templating"]["list"]
    assert [v["name"] for v in variables] == ["model"]
    assert variables[0]["query"]["query"] == "label_values(EarlyExitCount, ModelName)"


def test_dashboard_has_exit_compute_throughput_latency_and_rejection_panels() -> None:
    titles = " | ".join(p["title"].lower() for p in load_dashboard()["panels"])
    for words in ("exit distribution", "early-exit rate", "compute per request", "full network", "requests/s",
                  "p50", "p99", "errors and rejections by reason"):
        assert words in titles, words
    exprs = " ".join(t["expr"] for _, t in dashboard_targets(load_dashboard()))
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs
    assert "by (Reason)" in exprs and "by (ExitIndex)" in exprs


def test_grafana_provisioning_matches_compose() -> None:
    compose = load_yaml(REPO / "docker-compose.yml")
    grafana = compose["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./monitoring/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_in_container = mounts["./monitoring/grafana/dashboards"]
    providers = [p for f in DASHBOARD_PROVIDERS_DIR.glob("*.yml") for p in load_yaml(f)["providers"]]
    assert providers and all(p["options"]["path"] == dashboards_in_container for p in providers)
    assert Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]).parent == \
           Path(dashboards_in_container)
    (datasource,) = [d for f in DATASOURCES_DIR.glob("*.yml") for d in load_yaml(f)["datasources"]]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert [published(p, {})[1:] for p in compose["services"]["prometheus"]["ports"]] == [("9090", "9090")]


def test_dashboard_json_is_the_file_compose_serves() -> None:
    assert DASHBOARD_JSON.is_file() and DASHBOARD_JSON.suffix == ".json"
