"""Helpers for the monitoring tests: find promtool/prometheus, run a real Prometheus, read the shipped files.

CI installs Prometheus from Debian's packages (.ci/run). A missing binary FAILS the test with the install
command, unless ALLOW_SKIP_PROMETHEUS=1 is set (then it skips): a silently skipped monitoring suite would
pass CI without testing anything.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "monitoring"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
ALERTS_YML = MONITORING / "alerts.yml"
ALERTS_TEST_YML = MONITORING / "alerts_test.yml"
DASHBOARD_JSON = MONITORING / "grafana" / "dashboards" / "early-exit.json"
DATASOURCES_DIR = MONITORING / "grafana" / "provisioning" / "datasources"
DASHBOARD_PROVIDERS_DIR = MONITORING / "grafana" / "provisioning" / "dashboards"
INSTALL_HINT = ("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
                "prometheus")


def require_binary(name: str) -> str:
    """Path of `name` (promtool, prometheus); fail with the install command, or skip if allowed."""
    path = shutil.which(name)
    if path:
        return path
    message = (f"`{name}` is not on PATH. Install Prometheus (Debian package `prometheus`, which also "
               f"provides promtool): {INSTALL_HINT}. .ci/run installs it; set ALLOW_SKIP_PROMETHEUS=1 "
               f"to skip the monitoring tests instead.")
    if os.environ.get("ALLOW_SKIP_PROMETHEUS") == "1":
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([require_binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


# ----------------------------------------------------------------------------- the shipped files
def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_JSON.read_text())


def rules_of(doc: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """All `record` or `alert` rules of a rule file."""
    return [r for g in doc["groups"] for r in g["rules"] if kind in r]


def dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query of every panel (rows' nested panels included)."""
    out = []
    for panel in dashboard["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            for target in p.get("targets", []):
                out.append((p, target))
    return out


def grafana_to_promql(expr: str, rate_interval: str = "1m", model: str = ".*") -> str:
    """A panel query as Prometheus sees it once Grafana substituted its variables."""
    out = expr.replace("$__rate_interval", rate_interval).replace("${model}", model).replace("$model", model)
    leftover = re.findall(r"\$\{?\w+", out)
    if leftover:
        raise AssertionError(f"unsubstituted Grafana variables {leftover} in {expr!r}")
    return out


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(?![=~])(?!\s*bool\b)")


def with_bool(expr: str) -> str:
    """`expr` with every comparison made a `bool` one: the alert's signal, which has data whether or not the
    threshold is crossed (0/1 instead of filtered out), so a typo in a metric or label name shows as no data."""
    quoted = _QUOTED.findall(expr)
    masked = _QUOTED.sub("\x00", expr)
    # comparisons inside {label matchers} (=, !=, =~) stay as they are
    parts = re.split(r"(\{[^}]*\})", masked)
    masked = "".join(p if p.startswith("{") else _COMPARISON.sub(r"\1 bool", p) for p in parts)
    strings = iter(quoted)
    return re.sub("\x00", lambda _: next(strings), masked)


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """Metric (and recorded series) names an expression selects: identifiers that are not functions,
    keywords, label names in grouping clauses or matchers, durations or numbers."""
    text = _QUOTED.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\S+", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _KEYWORDS or re.fullmatch(r"\d+(ms|[smhdwy])", name):
            continue
        names.add(name)
    return names


# ----------------------------------------------------------------------------- a real Prometheus
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen
    log_path: Path

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        return self.api("query", query=promql)["result"]

    def query_range(self, promql: str, start: float, end: float, step: str = "1s") -> list[dict[str, Any]]:
        return self.api("query_range", query=promql, start=f"{start:.3f}", end=f"{end:.3f}", step=step)["result"]

    def alerts(self) -> list[dict[str, Any]]:
        return self.api("alerts")["alerts"]

    def rule_groups(self) -> list[dict[str, Any]]:
        return self.api("rules")["groups"]

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text()[-chars:] if self.log_path.exists() else ""


def start_prometheus(config: Path, data_dir: Path, timeout: float = 60.0) -> Prometheus:
    binary = require_binary("prometheus")
    port = free_port()
    log_path = data_dir / "prometheus.log"
    log_file = open(log_path, "w")
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={data_dir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h", "--log.level=warn"],
        stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    prom = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"prometheus exited with {process.returncode}: {prom.log_tail()}")
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    return prom
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    stop_prometheus(prom)
    raise AssertionError(f"prometheus not ready after {timeout} s: {prom.log_tail()}")


def stop_prometheus(prom: Prometheus) -> None:
    if prom.process.poll() is None:
        prom.process.terminate()
        try:
            prom.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prom.process.kill()
            prom.process.wait(timeout=10)


def wait_for(predicate, timeout: float, interval: float = 1.0, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; that value, or AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def series_points(result: list[dict[str, Any]]) -> Iterator[float]:
    for series in result:
        for _, value in series.get("values", [series.get("value", (0, "nan"))]):
            yield float(value)
