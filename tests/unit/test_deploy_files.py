"""Static checks of the monitoring and deployment files (no server, no Docker engine).

Generic correctness is left to the tools each community uses: promtool for the Prometheus config, rules
and their unit tests, hadolint (with .hadolint.yaml) for the Dockerfile, kubernetes-validate (the
Kubernetes API's own JSON schemas, strict) for the manifests. What stays here is project-specific: the
scaled test copy of the rules is complete; every dashboard panel has valid PromQL on metrics that exist;
the Grafana provisioning, compose file, Dockerfile and Kubernetes manifests point at files and ports that
exist and agree with each other; Prometheus and Grafana are not reachable from the network by default and
Grafana needs a chosen admin password; the image's entrypoint runs its own config check.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from monitoring import scale_rules
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
    promtool,
    rules_of,
    with_bool,
)

K8S = REPO / "deploy" / "k8s"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
HADOLINT_CONFIG = REPO / ".hadolint.yaml"
TEST_SCALE = 1 / 60  # what the integration test uses


def _promtool_ok(*args: str, cwd: Path | None = None) -> str:
    proc = promtool(*args, cwd=cwd)
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _dev_tool(name: str) -> str:
    """A command-line tool from the dev extras (in the venv next to this Python, else on PATH)."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    if not path:
        pytest.fail(f"`{name}` is not installed: run `make setup` (pip install -e '.[dev]')", pytrace=False)
    return path


def _declared_metrics() -> set[str]:
    """Series names TorchServe exposes for serving/metrics.yaml (histograms as _bucket/_sum/_count)."""
    doc = load_yaml(REPO / "serving" / "metrics.yaml")
    names = set()
    for section in ("ts_metrics", "model_metrics"):
        for kind, metrics in (doc.get(section) or {}).items():
            for m in metrics or []:
                if kind == "histogram":
                    names |= {f"{m['name']}_bucket", f"{m['name']}_sum", f"{m['name']}_count"}
                else:
                    names.add(m["name"])
    return names


# ----------------------------------------------------------------------------- Prometheus
def test_promtool_accepts_config_and_rules() -> None:
    out = _promtool_ok("check", "config", str(PROMETHEUS_YML))
    assert "1 rule files found" in out
    _promtool_ok("check", "rules", str(ALERTS_YML))


def test_alert_rules_unit_tests_pass() -> None:
    """monitoring/alerts_test.yml: synthetic attack, errors, rejections, dead worker, production windows."""
    _promtool_ok("test", "rules", str(ALERTS_TEST_YML), cwd=MONITORING)


def test_alerts_cover_the_issue_and_carry_severity_and_summary() -> None:
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
    known = _declared_metrics() | {r["record"] for r in rules_of(rules, "record")} | {"up", "ALERTS"}
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
    _promtool_ok("check", "rules", str(path))
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
    _promtool_ok("check", "rules", str(path))
    variables = dashboard["templating"]["list"]
    assert [v["name"] for v in variables] == ["model"]
    assert variables[0]["query"]["query"] == "label_values(EarlyExitCount, ModelName)"


def test_dashboard_has_the_panels_the_issue_asks_for() -> None:
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
    assert [_published(p, {})[1:] for p in compose["services"]["prometheus"]["ports"]] == [("9090", "9090")]


# ----------------------------------------------------------------------------- compose
class ComposeVariableError(ValueError):
    """What `docker compose` says for an unset ${VAR:?message}."""


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message} (no Docker engine here to ask)."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        if env.get(name):
            return env[name]
        if op == ":?":
            raise ComposeVariableError(f"{name}: {arg}")
        return arg if op == ":-" else ""
    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def _published(port: str, env: dict[str, str]) -> tuple[str, str, str]:
    """(host address, host port, container port) of a compose `ports:` entry; address 0.0.0.0 when absent."""
    parts = _interpolate(port, env).split(":")
    return ("0.0.0.0", *parts) if len(parts) == 2 else tuple(parts)  # type: ignore[return-value]


def test_monitoring_is_on_loopback_unless_opened_and_grafana_needs_a_chosen_password() -> None:
    compose = load_yaml(REPO / "docker-compose.yml")
    services = compose["services"]
    for name, port in (("prometheus", "9090"), ("grafana", "3000")):
        (entry,) = services[name]["ports"]
        assert _published(entry, {}) == ("127.0.0.1", port, port), f"{name} must default to loopback"
        assert _published(entry, {"MONITORING_BIND": "0.0.0.0"}) == ("0.0.0.0", port, port), \
            f"{name}: MONITORING_BIND (documented) must open it"
    # The server's own ports stay published (token on inference); the management API never is.
    assert {_published(p, {})[2] for p in services["torchserve"]["ports"]} == {"8080", "8082"}
    grafana = services["grafana"]["environment"]
    with pytest.raises(ComposeVariableError, match="GRAFANA_ADMIN_PASSWORD"):
        _interpolate(grafana["GF_SECURITY_ADMIN_PASSWORD"], {})
    assert _interpolate(grafana["GF_SECURITY_ADMIN_PASSWORD"], {"GRAFANA_ADMIN_PASSWORD": "s3cret"}) == "s3cret"
    assert str(grafana["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in grafana
    assert str(grafana.get("GF_USERS_ALLOW_SIGN_UP", "false")).lower() == "false"
    docs = (REPO / "docs" / "deploy-and-monitor.md").read_text()
    assert "MONITORING_BIND" in docs and "GRAFANA_ADMIN_PASSWORD" in docs


def test_compose_interpolation_helper() -> None:
    assert _interpolate("${A:-x}:${B}", {"B": "b"}) == "x:b"
    assert _interpolate("${A:-x}", {"A": "a"}) == "a"
    with pytest.raises(ComposeVariableError, match="A: say it"):
        _interpolate("${A:?say it}", {"A": ""})
    assert _published("8080:8080", {}) == ("0.0.0.0", "8080", "8080")


def test_compose_mounts_existing_files_and_prometheus_scrapes_the_server() -> None:
    compose = load_yaml(REPO / "docker-compose.yml")
    assert set(compose["services"]) == {"torchserve", "prometheus", "grafana"}
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
    build = compose["services"]["torchserve"]["build"]
    assert (REPO / build["context"] / "Dockerfile").is_file() and build["args"]["VARIANT"] == "cpu"
    ports = compose["services"]["torchserve"]["ports"]
    assert any(p.startswith("8080:") for p in ports) and any(p.startswith("8082:") for p in ports)
    assert not any(p.split(":")[-1] == "8081" for p in ports), "the management API must not be published"
    # Prometheus reads /etc/prometheus/prometheus.yml and its rule file relative to it.
    prom_mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in compose["services"]["prometheus"]["volumes"]
                       if v.startswith("./"))
    config_in_container = Path(prom_mounts["./monitoring/prometheus.yml"])
    assert f"--config.file={config_in_container}" in compose["services"]["prometheus"]["command"]
    for rule_file in load_yaml(PROMETHEUS_YML)["rule_files"]:
        assert str(config_in_container.parent / rule_file) in prom_mounts.values()
    (job,) = [j for j in load_yaml(PROMETHEUS_YML)["scrape_configs"] if j["job_name"] == "torchserve"]
    assert job["static_configs"][0]["targets"] == ["torchserve:8082"]
    gpu = load_yaml(REPO / "docker-compose.gpu.yml")["services"]["torchserve"]
    assert gpu["build"]["args"]["VARIANT"] == "gpu"


# ----------------------------------------------------------------------------- Dockerfile
def _hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_dev_tool("hadolint"), "--no-color", "--config", str(HADOLINT_CONFIG), str(dockerfile)],
                          capture_output=True, text=True, timeout=60)


def test_hadolint_passes_on_the_dockerfile() -> None:
    """hadolint (with its built-in ShellCheck on every RUN) at failure threshold `style`; the rules
    .hadolint.yaml or an inline pragma switches off each carry a reason next to them."""
    assert load_yaml(HADOLINT_CONFIG)["failure-threshold"] == "style"
    proc = _hadolint(REPO / "Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (REPO / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(text):
        if line.startswith("# hadolint ignore="):
            assert text[i - 1].startswith("# ") and "hadolint" not in text[i - 1], \
                f"Dockerfile:{i + 1}: say why, in the comment line above the pragma"


def test_hadolint_is_really_checking(tmp_path: Path) -> None:
    """The configuration does not switch hadolint off: a root user, an untagged base and `cd` fail."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN cd /tmp && echo hi\nUSER root\n")
    proc = _hadolint(bad)
    assert proc.returncode != 0
    for rule in ("DL3006", "DL3003", "DL3002"):
        assert rule in proc.stdout, proc.stdout


def _dockerfile() -> list[str]:
    text = (REPO / "Dockerfile").read_text()
    return [line for line in text.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]


def _pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower(): d.replace(" ", "") for d in deps}


def _dockerignore_includes(path: str) -> bool:
    """Does the whitelist-style .dockerignore send `path` to the builder (last matching pattern wins)?"""
    included = True
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        if pattern == "*" or path == pattern or path.startswith(pattern + "/"):
            included = negate
    return included


def test_dockerfile_copies_existing_whitelisted_files() -> None:
    copies = [line.split()[1:] for line in _dockerfile() if line.split()[0] == "COPY"]
    sources = []
    for args in copies:
        args = [a for a in args if not a.startswith("--chmod") and not a.startswith("--chown")]
        if args[0].startswith("--from="):
            continue
        sources += args[:-1]
    assert sources, "no COPY from the build context"
    for source in sources:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
        assert _dockerignore_includes(source.rstrip("/")), f".dockerignore excludes {source}"
    assert not _dockerignore_includes(".venv") and not _dockerignore_includes("data")


def test_dockerfile_runs_unprivileged_exposes_inference_and_metrics_and_has_a_healthcheck() -> None:
    lines = _dockerfile()
    instructions = [line.split()[0] for line in lines]
    (user,) = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert instructions.index("USER") < instructions.index("ENTRYPOINT")
    (expose,) = [line.split()[1:] for line in lines if line.startswith("EXPOSE")]
    assert sorted(expose) == ["8080", "8082"]
    (health,) = [line for line in lines if line.startswith("HEALTHCHECK")]
    assert "entrypoint.sh" in health and "healthcheck" in health
    assert any(line.startswith("ENTRYPOINT") and "docker/entrypoint.sh" in line for line in lines)
    # USER is the numeric uid:gid of the user the image creates (so runAsNonRoot can check it), which is
    # the one the Kubernetes securityContext asks for.
    (useradd,) = [line for line in lines if "useradd" in line]
    uid = re.search(r"--uid (\d+)", useradd).group(1)
    assert "--user-group" in useradd and user == f"{uid}:{uid}" and uid != "0"
    pod = next(d for d in _k8s_docs() if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert str(pod["securityContext"]["runAsUser"]) == uid and str(pod["securityContext"]["runAsGroup"]) == uid


def test_dockerfile_variants_and_pins_match_pyproject() -> None:
    text = " ".join(_dockerfile())
    args = dict(re.findall(r"\bARG (\w+)=(\S+)", text))
    assert args["VARIANT"] == "cpu"
    assert "nvidia/cuda" in args["GPU_BASE"] and "cudnn" in args["GPU_BASE"]
    assert args["CPU_BASE"].startswith("python:3.11")
    pins = _pyproject_pins()
    assert args["ORT_CPU"] == pins["onnxruntime"]
    assert args["ORT_GPU"].startswith("onnxruntime-gpu==")
    assert "FROM base-${VARIANT}" in text
    requirements = [line.strip() for line in (REPO / "docker" / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    for req in requirements:
        name = re.split(r"[<>=!~ \[]", req, maxsplit=1)[0].lower()
        assert pins.get(name) == req.replace(" ", ""), f"docker/requirements.txt {req} != pyproject {pins.get(name)}"
    assert not any(r.startswith("onnxruntime") for r in requirements), "onnxruntime comes per VARIANT"


# ----------------------------------------------------------------------------- entrypoint
def _entrypoint(tmp_path: Path, *args: str, base_config: Path | None = None, metrics: Path | None = None,
                store_files: tuple[str, ...] = ("mnist.mar",), **env: str) -> subprocess.CompletedProcess:
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    for name in store_files:
        (store / name).write_bytes(b"PK")
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("EE_", "TS_"))},
        "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ.get('PATH', '')}",
        "EE_HOME": str(tmp_path),
        "EE_BASE_CONFIG": str(base_config or REPO / "serving" / "config.properties"),
        "EE_METRICS_CONFIG": str(metrics or REPO / "serving" / "metrics.yaml"),
        "EE_LOG_CONFIG": str(REPO / "serving" / "log4j2.xml"),
        "EE_MODEL_STORE": str(store),
        "LOG_LOCATION": str(tmp_path / "logs"),
        **env,
    }
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env=environ, capture_output=True, text=True,
                          timeout=60)


def _props(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def test_entrypoint_check_passes_on_the_repository_config(tmp_path: Path) -> None:
    if not (REPO / ".venv" / "bin" / "torchserve").exists() and not shutil.which("torchserve"):
        pytest.fail("torchserve is not installed: run `make setup`")
    proc = _entrypoint(tmp_path, "check")
    assert proc.returncode == 0, proc.stderr
    assert "config check passed" in proc.stderr
    props = _props(proc.stdout)
    assert props["inference_address"] == "http://0.0.0.0:8080"
    assert props["metrics_address"] == "http://0.0.0.0:8082"
    assert props["management_address"] == "http://127.0.0.1:8081"
    assert props["disable_token_authorization"] == "false"
    assert props["metrics_mode"] == "prometheus" and props["model_store"] == str(tmp_path / "store")
    assert (tmp_path / "run" / "config.properties").read_text() == proc.stdout
    # every key appears once: the base config's values for the container's keys were dropped
    keys = [line.split("=", 1)[0] for line in proc.stdout.splitlines() if "=" in line and not line.startswith("#")]
    assert len(keys) == len(set(keys))


def _variant(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", ["no_archive", "named_archive_missing", "model_api_on", "metrics_mode_log",
                                  "metric_not_declared", "bad_token_mode", "token_env_override"])
def test_entrypoint_check_refuses_unsafe_or_broken_configs(tmp_path: Path, case: str) -> None:
    base = (REPO / "serving" / "config.properties").read_text()
    kwargs: dict = {}
    expected = {
        "no_archive": "no .mar archive",
        "named_archive_missing": "EE_MODELS names other.mar",
        "model_api_on": "enable_model_api=true",
        "metrics_mode_log": "metrics_mode must be prometheus",
        "metric_not_declared": "EarlyExitCount",
        "bad_token_mode": "EE_TOKEN_AUTH must be",
        "token_env_override": "TS_DISABLE_TOKEN_AUTHORIZATION",
    }[case]
    if case == "no_archive":
        kwargs["store_files"] = ()
    elif case == "named_archive_missing":
        kwargs["EE_MODELS"] = "mnist=other.mar"
    elif case == "model_api_on":
        kwargs["base_config"] = _variant(tmp_path, "c.properties", base + "\nenable_model_api=true\n")
    elif case == "metrics_mode_log":
        kwargs["base_config"] = _variant(tmp_path, "c.properties", base.replace("metrics_mode=prometheus",
                                                                                "metrics_mode=log"))
    elif case == "metric_not_declared":
        text = (REPO / "serving" / "metrics.yaml").read_text().replace("name: EarlyExitCount", "name: Renamed")
        kwargs["metrics"] = _variant(tmp_path, "m.yaml", text)
    elif case == "bad_token_mode":
        kwargs["EE_TOKEN_AUTH"] = "off"
    elif case == "token_env_override":
        kwargs["base_config"] = _variant(tmp_path, "c.properties", base + "\nenable_envvars_config=true\n")
        kwargs["TS_DISABLE_TOKEN_AUTHORIZATION"] = "true"
    proc = _entrypoint(tmp_path, "check", **kwargs)
    assert proc.returncode == 2, proc.stderr
    assert "config check FAILED" in proc.stderr and expected in proc.stderr, proc.stderr


def test_entrypoint_keeps_token_auth_on_even_if_the_base_config_disables_it(tmp_path: Path) -> None:
    base = (REPO / "serving" / "config.properties").read_text() + "\ndisable_token_authorization=true\n"
    proc = _entrypoint(tmp_path, "check", base_config=_variant(tmp_path, "c.properties", base))
    assert proc.returncode == 0, proc.stderr
    assert _props(proc.stdout)["disable_token_authorization"] == "false"
    gateway = _entrypoint(tmp_path, "check", EE_TOKEN_AUTH="off-behind-gateway")
    assert gateway.returncode == 0 and "WARNING: token authorization is OFF" in gateway.stderr
    assert _props(gateway.stdout)["disable_token_authorization"] == "true"


def test_entrypoint_healthcheck_fails_without_a_server(tmp_path: Path) -> None:
    from tests.promtools import free_port

    proc = _entrypoint(tmp_path, "healthcheck", EE_MANAGEMENT_PORT=str(free_port()))
    assert proc.returncode != 0 and "unhealthy" in proc.stderr


# ----------------------------------------------------------------------------- Kubernetes
# The oldest (1.25) and newest Kubernetes API versions kubernetes-validate 1.37.0 ships schemas for.
K8S_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())


def _k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kustomization_applies_every_manifest() -> None:
    resources = load_yaml(K8S / "kustomization.yaml")["resources"]
    assert sorted(resources) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_kubernetes_api_schemas(version: str) -> None:
    """kubernetes-validate --strict: every field exists in the API version's schema, with the right type."""
    for name in load_yaml(K8S / "kustomization.yaml")["resources"]:
        for doc in [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']} against Kubernetes {version}: "
                            f"{'.'.join(map(str, exc.path))}: {exc.message}", pytrace=False)


def test_kubernetes_validate_is_really_checking() -> None:
    deployment = next(d for d in _k8s_docs() if d["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    typo = yaml.safe_load(yaml.safe_dump(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSIONS[-1], strict=True)


def test_k8s_manifests_agree() -> None:
    docs = _k8s_docs()
    by_kind = {d["kind"]: d for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
            "Kustomization"} <= set(by_kind)
    deployment = by_kind["Deployment"]
    name = deployment["metadata"]["name"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert by_kind["Service"]["spec"]["selector"].items() <= labels.items()
    assert by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert by_kind["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    target = by_kind["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", name)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"inference": 8080, "metrics": 8082}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert {p["targetPort"] for p in by_kind["Service"]["spec"]["ports"]} == set(ports)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["/home/model-server/docker/entrypoint.sh", "healthcheck"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e["value"] for e in container["env"]}
    # tokens off only together with a NetworkPolicy that admits just the gateway and Prometheus
    assert env["EE_TOKEN_AUTH"] == "off-behind-gateway"
    ingress_ports = sorted(p["port"] for rule in by_kind["NetworkPolicy"]["spec"]["ingress"] for p in rule["ports"])
    assert ingress_ports == [8080, 8082]


def test_k8s_prometheus_job_is_valid_prometheus_config(tmp_path: Path) -> None:
    """The kubernetes_sd job, checked by promtool (with static targets in place of the service discovery:
    Debian's Prometheus is built without the Kubernetes SD; the relabelling rules are what is checked)."""
    (job,) = load_yaml(K8S / "prometheus-kubernetes-job.yml")
    assert job["job_name"] == "torchserve" and job["kubernetes_sd_configs"] == [{"role": "pod"}]
    keep = {tuple(r["source_labels"]): r for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert keep[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]["regex"] == "true"
    address = next(r for r in job["relabel_configs"] if r.get("target_label") == "__address__")
    assert re.fullmatch(address["regex"], "10.0.0.7:8080;8082")
    assert re.sub(address["regex"], address["replacement"].replace("$", "\\"), "10.0.0.7:8080;8082") == \
           "10.0.0.7:8082"
    static = dict(job)
    del static["kubernetes_sd_configs"]
    static["static_configs"] = [{"targets": ["127.0.0.1:8082"]}]
    config = load_yaml(PROMETHEUS_YML)
    config["scrape_configs"] = [static]
    config["rule_files"] = [str(ALERTS_YML)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    _promtool_ok("check", "config", str(path))


def test_dashboard_json_is_the_file_compose_serves() -> None:
    assert DASHBOARD_JSON.is_file() and DASHBOARD_JSON.suffix == ".json"
