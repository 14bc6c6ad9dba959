"""Real TorchServe + real Prometheus on loopback: every dashboard query and alert expression has data, and the
early-exit-rate alert fires when clean traffic turns into late-exiting traffic.

Prometheus scrapes the session's TorchServe (tests/integration/conftest.py) every second and loads
monitoring/alerts.yml with every duration scaled by TIME_SCALE (monitoring/scale_rules.py): the shipped
expressions, with 5 s rate windows, a 60 s baseline and 10 s `for:` instead of 5 min, 1 h and 10 min.
Traffic: clean MNIST test digits (mostly early exits), then inputs the model is unsure about (blends of two
digits of different classes, and noise) picked offline, with the same shared policy the handler runs, among
those that go to the last exit.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import yaml

from early_exit.policy import confidence, entry_for_budget, select_exits, softmax
from monitoring.scale_rules import dump_rules, scale_expr, scale_rules
from tests.promtools import (
    ALERTS_YML,
    PROMETHEUS_YML,
    Prometheus,
    dashboard_targets,
    grafana_to_promql,
    load_dashboard,
    load_yaml,
    require_binary,
    rules_of,
    series_points,
    start_prometheus,
    stop_prometheus,
    wait_for,
    with_bool,
)

pytestmark = pytest.mark.integration

TIME_SCALE = 1 / 60          # 5m -> 5s, 1h -> 60s, 10m -> 10s
RATE_INTERVAL = "5s"         # Grafana's $__rate_interval for a 1 s scrape interval
REQUESTS_PER_SECOND = 25     # both phases; 2 shared cores
CLEAN_SECONDS = 20           # enough for the (scaled) baseline to settle
ALERT_TIMEOUT = 75           # late traffic until both compute/exit alerts fire (10 s `for:` + windows)
REJECT_EVERY = 25            # every 25th request carries a bad budget header (4% rejections)


# ----------------------------------------------------------------------------- traffic
def _exit_logits(tiny, x: np.ndarray) -> list[np.ndarray]:
    """Every exit's logits from the exported stage graphs through the staged runner (batched; the margin below
    absorbs rounding)."""
    from early_exit.runner import StagedRunner

    return StagedRunner.from_folder(tiny.manifest, tiny.export_dir).exit_logits(x)


def _late_inputs(tiny, want: int = 40, margin: float = 0.03) -> np.ndarray:
    """Inputs the policy sends to the deepest exit the default budget allows, with every earlier exit's
    confidence at least `margin` below its threshold."""
    manifest = tiny.manifest
    entry = entry_for_budget(manifest.default_budget_mflops, manifest.calibration, manifest.staged_mflops)
    rng = np.random.default_rng(0)
    x, y = tiny.test_x, tiny.test_y
    i, j = rng.integers(0, len(x), 600), rng.integers(0, len(x), 600)
    keep = y[i] != y[j]
    blends = 0.5 * x[i[keep]] + 0.5 * x[j[keep]]
    noise = rng.uniform(0.0, 1.0, size=(200, *x.shape[1:]))
    candidates = np.concatenate([blends, noise]).astype(np.float32)
    conf = np.stack([confidence(softmax(l), manifest.confidence) for l in _exit_logits(tiny, candidates)], axis=1)
    exits = select_exits(conf, entry.thresholds, entry.max_exit)
    sure = np.all(conf[:, :entry.max_exit] < np.asarray(entry.thresholds[:entry.max_exit]) - margin, axis=1)
    picked = candidates[(exits == entry.max_exit) & sure]
    assert len(picked) >= 10, (f"only {len(picked)} of {len(candidates)} blended/noise inputs go to exit "
                               f"{entry.max_exit + 1}: the tiny model is too sure of itself for this test")
    return picked[:want]


@dataclass
class Traffic:
    """Requests from a few client threads at a steady rate until stopped; answers are tallied."""

    live: Any
    bodies: list[bytes]
    rate: float = REQUESTS_PER_SECOND
    threads: int = 4
    statuses: Counter = field(default_factory=Counter)
    exits: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._workers: list[threading.Thread] = []
        self.errors: list[str] = []

    def _next(self) -> tuple[bytes, str | None]:
        with self._lock:
            n = next(self._counter)
        if n % REJECT_EVERY == REJECT_EVERY - 1:  # alternate the two budget rejections
            return self.bodies[n % len(self.bodies)], ("-1" if (n // REJECT_EVERY) % 2 else "1e-9")
        return self.bodies[n % len(self.bodies)], None

    def _run(self) -> None:
        client = self.live.client(timeout=30)
        interval = self.threads / self.rate
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                body, budget = self._next()
                try:
                    response = client.predict(body, budget)
                except Exception as exc:  # noqa: BLE001 - reported by the test
                    with self._lock:
                        self.errors.append(repr(exc))
                    continue
                with self._lock:
                    self.statuses[response.status] += 1
                    if response.status == 200:
                        self.exits[response.body["exit_index"]] += 1
                    elif isinstance(response.body, dict):
                        self.reasons[response.body.get("reason")] += 1
                self._stop.wait(max(0.0, interval - (time.monotonic() - started)))
        finally:
            client.close()

    def start(self) -> "Traffic":
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def stop(self) -> "Traffic":
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=60)
        return self


# ----------------------------------------------------------------------------- Prometheus
@pytest.fixture(scope="module")
def prometheus(torchserve_server, tmp_path_factory) -> Iterator[Prometheus]:
    """A real Prometheus scraping the session's TorchServe every second, with the scaled shipped rules."""
    require_binary("promtool")
    folder = tmp_path_factory.mktemp("prometheus")
    rules = folder / "alerts-fast.yml"
    rules.write_text(dump_rules(scale_rules(load_yaml(ALERTS_YML), TIME_SCALE)))
    config = load_yaml(PROMETHEUS_YML)
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    config["rule_files"] = [str(rules)]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "torchserve"]
    metrics = urllib.parse.urlsplit(torchserve_server.server.metrics_url)
    job["static_configs"] = [{"targets": [metrics.netloc]}]
    job["metrics_path"] = metrics.path or "/metrics"
    config["scrape_configs"] = [job]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    prom = start_prometheus(folder / "prometheus.yml", folder)
    try:
        wait_for(lambda: [t for t in prom.targets() if t["labels"]["job"] == "torchserve" and t["health"] == "up"],
                 timeout=30, what="Prometheus to scrape TorchServe")
        yield prom
    finally:
        stop_prometheus(prom)


def _has_data(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(v) for v in series_points(result))


def _firing(prom: Prometheus, name: str) -> list[dict[str, Any]]:
    return [a for a in prom.alerts() if a["labels"]["alertname"] == name and a["state"] == "firing"]


# ----------------------------------------------------------------------------- tests
def test_every_exit_counter_is_registered_when_the_model_loads(torchserve_server) -> None:
    """model:exits:count (the number of exits K, which picks the last exit's series) counts the ExitIndex
    values on :8082/metrics: the handler must register every exit's counter, at 0, before any answer, or
    a fresh server whose clean traffic never reached exit K computes the early-exit rate against exit K-1."""
    live = torchserve_server
    indices = {dict(labels)["ExitIndex"] for labels in live.samples("EarlyExitCount")
               if dict(labels).get("ModelName") == live.model}
    expected = {str(k) for k in range(1, live.tiny.manifest.num_exits + 1)}
    assert indices == expected, (
        f"EarlyExitCount has series for exits {sorted(indices)} but the model has exits {sorted(expected)}: "
        f"serving/handler.py should add 0 to EarlyExitCount{{ExitIndex=k}} for every exit k when it loads")


def test_container_healthcheck_sees_the_ready_worker(torchserve_server) -> None:
    """docker/entrypoint.sh healthcheck (the image's HEALTHCHECK, the Kubernetes probes) on a real server:
    it reads the management key from key_file.json and finds the model's READY worker."""
    server = torchserve_server.server
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "EE_HOME": str(server.state_dir), "EE_MANAGEMENT_PORT": str(server.ports.management),
           "PATH": f"{repo / '.venv' / 'bin'}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", str(repo / "docker" / "entrypoint.sh"), "healthcheck"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() == "healthy", proc.stderr
    env["EE_HOME"] = str(server.state_dir / "nowhere")  # no key file: the token-protected API refuses
    proc = subprocess.run(["bash", str(repo / "docker" / "entrypoint.sh"), "healthcheck"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "unhealthy" in proc.stderr


def test_dashboard_and_alerts_on_live_traffic(torchserve_server, prometheus) -> None:
    live, prom = torchserve_server, prometheus
    tiny = live.tiny
    manifest = tiny.manifest
    entry = entry_for_budget(manifest.default_budget_mflops, manifest.calibration, manifest.staged_mflops)
    assert entry.max_exit == manifest.num_exits - 1, "the default budget should allow the full network"
    clean_early = float(np.mean(tiny.offline_exits < entry.max_exit))
    assert clean_early >= 0.4, f"only {clean_early:.0%} of clean test digits exit early: nothing to drop from"
    clean = [tiny.json_body(i) for i in range(len(tiny.test_x))]
    late = [json.dumps({"data": x.tolist()}).encode() for x in _late_inputs(tiny)]

    # Every exit's series exists from here on (the registration itself is the test above).
    for body in late[:2]:
        assert live.predict(body).status == 200

    # Phase 1: clean digits. No exit-rate alert; the recorded early-exit rate matches the offline policy.
    started = time.time()
    traffic = Traffic(live, clean).start()
    try:
        time.sleep(CLEAN_SECONDS)
        rate_now = wait_for(lambda: prom.query(f'model:early_exit:ratio_rate5m{{ModelName="{live.model}"}}'),
                            timeout=10, what="the recorded early-exit rate")
    finally:
        traffic.stop()
    clean_done = time.time()
    assert not traffic.errors, traffic.errors[:3]
    assert traffic.statuses[200] > 0.9 * sum(traffic.statuses.values()) and set(traffic.statuses) <= {200, 400}
    assert float(rate_now[0]["value"][1]) == pytest.approx(clean_early, abs=0.2)

    # Phase 2: late-exiting inputs until the exit-rate (and compute) alerts fire.
    traffic = Traffic(live, late).start()
    try:
        fired = wait_for(lambda: _firing(prom, "EarlyExitRateDrop"), timeout=ALERT_TIMEOUT,
                         what="EarlyExitRateDrop to fire on late-exiting traffic")
        compute = wait_for(lambda: _firing(prom, "ComputePerRequestNearFull"), timeout=30,
                           what="ComputePerRequestNearFull to fire on late-exiting traffic")
        # The ALERTS series is written at the rule evaluation after the API reports firing: wait for it, so the
        # range queries below (which end now) see it.
        wait_for(lambda: prom.query('ALERTS{alertstate="firing"}'), timeout=10, what="the ALERTS series")
        time.sleep(2)
        end = time.time()
        # Every panel query and every rule while the traffic still flows.
        missing = []
        for panel, target in dashboard_targets(load_dashboard()):
            expr = grafana_to_promql(target["expr"], RATE_INTERVAL)
            if not _has_data(prom.query_range(expr, started, end)):
                missing.append(f"panel {panel['title']!r} {target['refId']}: {expr}")
        for annotation in load_dashboard()["annotations"]["list"]:
            expr = grafana_to_promql(annotation["expr"], RATE_INTERVAL)
            if not _has_data(prom.query_range(expr, started, end)):
                missing.append(f"annotation {annotation['name']!r}: {expr}")
        rules = load_yaml(ALERTS_YML)
        for rule in rules_of(rules, "record"):
            if not _has_data(prom.query_range(rule["record"], started, end)):
                missing.append(f"recording rule {rule['record']}")
        for rule in rules_of(rules, "alert"):
            # The alert's signal: its expression with 0/1 comparisons, which has data crossed or not.
            expr = with_bool(scale_expr(rule["expr"], TIME_SCALE))
            if not _has_data(prom.query_range(expr, started, end)):
                missing.append(f"alert {rule['alert']}: {expr}")
        models = prom.api(f"label/ModelName/values", **{"match[]": "EarlyExitCount"})
    finally:
        traffic.stop()
    assert not traffic.errors, traffic.errors[:3]
    assert not missing, "no data for:\n" + "\n".join(missing)
    assert live.model in models, "the dashboard's $model variable would not list the model"
    assert traffic.exits and max(traffic.exits) == manifest.num_exits
    assert traffic.exits[manifest.num_exits] >= 0.9 * sum(traffic.exits.values())
    assert traffic.reasons.keys() <= {"invalid_budget", "budget_below_minimum"} and traffic.reasons

    # The alert says which model; it did not fire during the clean phase; nothing else is wrong.
    assert fired[0]["labels"]["ModelName"] == live.model and fired[0]["labels"]["severity"] == "warning"
    assert compute[0]["labels"]["ModelName"] == live.model
    during_clean = prom.query_range('ALERTS{alertname="EarlyExitRateDrop"}', started, clean_done)
    assert not during_clean, "EarlyExitRateDrop was pending or firing on clean traffic"
    current = float(prom.query(f'model:early_exit:ratio_rate5m{{ModelName="{live.model}"}}')[0]["value"][1])
    baseline = float(prom.query(f'model:early_exit:ratio_baseline1h{{ModelName="{live.model}"}}')[0]["value"][1])
    assert current < 0.5 * baseline, (current, baseline)
    for name in ("TorchServeDown", "ModelWorkersNotAnswering", "InferenceErrorRateHigh"):
        assert not [a for a in prom.alerts() if a["labels"]["alertname"] == name], f"{name} is active"
    for group in prom.rule_groups():
        for rule in group["rules"]:
            assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"


# ----------------------------------------------------------------------------- the audit of early answers
def _exit1_attack(tiny, want: int = 40) -> np.ndarray:
    """Test digits perturbed (L-inf 0.3, PGD on the torch model) so that exit 1 answers a wrong class confidently
    while the last exit keeps the true one; kept where the served policy (staged runner) really answers them
    early and the last exit disagrees."""
    import torch

    from early_exit.runner import StagedRunner
    from training.checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(tiny.checkpoint)).eval()
    x = torch.from_numpy(tiny.test_x[:200])
    y = torch.from_numpy(tiny.test_y[:200]).long()
    target = (y + 1) % 10
    eps, step = 0.3, 0.02
    adv = x.clone()
    for _ in range(40):
        adv.requires_grad_(True)
        logits = model.forward_exits(adv)
        loss = torch.nn.functional.cross_entropy(logits[0], target) + torch.nn.functional.cross_entropy(logits[-1], y)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = (adv.detach() - step * grad.sign()).clamp(x - eps, x + eps).clamp(0, 1)
    adv_np = adv.numpy().astype(np.float32)
    runner = StagedRunner.from_folder(tiny.manifest, tiny.export_dir)
    entry = entry_for_budget(tiny.manifest.default_budget_mflops, tiny.manifest.calibration,
                             tiny.manifest.staged_mflops)
    answered = runner.run(adv_np, entry.thresholds, entry.max_exit)
    final = runner.exit_logits(adv_np)[-1].argmax(-1)
    keep = (answered.exits == 0) & (answered.probs.argmax(-1) != final)
    assert keep.sum() >= 10, f"only {int(keep.sum())} attacked digits leave exit 1 disagreeing with the last exit"
    return adv_np[keep][:want]


def test_the_audit_sees_clean_agreement_and_flags_an_attack_on_exit_1(torchserve_server, prometheus) -> None:
    """Clean digits: live agreement of exit 1 near its validation figure, EarlyExitDisagreementHigh quiet. Inputs
    attacked to make exit 1 confident and wrong: agreement collapses and the alert fires (the audit as an attack
    detector)."""
    live, prom = torchserve_server, prometheus
    tiny = live.tiny
    validation = tiny.manifest.exit_agreement
    assert validation is not None
    model = live.model
    agreement_q = f'model_exit:early_exit_audit_agreement:ratio_rate10m{{ModelName="{model}",ExitIndex="1"}}'
    traffic = Traffic(live, [tiny.json_body(i) for i in range(len(tiny.test_x))]).start()
    try:
        time.sleep(15)  # two scaled 10 s windows of clean traffic
        clean = float(wait_for(lambda: prom.query(agreement_q), timeout=10, what="live agreement")[0]["value"][1])
    finally:
        traffic.stop()
    assert clean == pytest.approx(validation[0], abs=0.1)
    assert not _firing(prom, "EarlyExitDisagreementHigh")

    attacked = [json.dumps({"data": x.tolist()}).encode() for x in _exit1_attack(tiny)]
    traffic = Traffic(live, attacked).start()
    try:
        fired = wait_for(lambda: _firing(prom, "EarlyExitDisagreementHigh"), timeout=60,
                         what="EarlyExitDisagreementHigh to fire on inputs attacking exit 1")
        attacked_agreement = float(prom.query(agreement_q)[0]["value"][1])
    finally:
        traffic.stop()
    assert fired[0]["labels"]["ExitIndex"] == "1" and fired[0]["labels"]["ModelName"] == model
    assert attacked_agreement < validation[0] - 0.3
    dropped = sum(live.samples("EarlyExitAuditDropped").values())
    audited = sum(live.samples("EarlyExitAudit").values())
    print(f"\naudit: validation agreement exit 1 {validation[0]:.3f}, live clean {clean:.3f}, "
          f"under attack {attacked_agreement:.3f}; {audited:.0f} audits, {dropped:.0f} dropped")
