"""Attacked loads on the early-exit server: what DeepSloth traffic costs it, and whether its alerts would see it.

Three loads go to the running early-exit server (bench_serve's (a)), interleaved over rounds like the standard
runs: `clean` (the first N test files, the images that were attacked), `deepsloth` (the same N images attacked,
bench/photos.py) and `mixed` (one request in ten attacked, bench.photos.mixed_bodies). Per load: wrk bursts at
the highest concurrency (requests/s, p50/p99: medians over rounds with their min and max), then one pass of this
project's Python client whose answers give the mean staged MFLOPs per request and the budget violations
(bench/answers.py), then the same pass with an X-Compute-Budget cap below the full cost (the second-to-last
exit's staged cost), where every answer must stay within the cap.

Alerts: the server's Prometheus metrics (serving/metrics.py: EarlyExitCount, ComputeSpentMFLOPs,
ComputeFullMFLOPs, EarlyExitAudit) are scraped before and after each load's requests, and the conditions of
monitoring/alerts.yml's EarlyExitRateDrop, ComputePerRequestNearFull and EarlyExitDisagreementHigh (the audit's
alert) are evaluated on the load's increases, the clean load standing in for the baseline. The `for:` durations
and the rate windows are not simulated (a benchmark load lasts seconds): `condition_met` says whether the
alert's expression would hold, not that Prometheus fired.
"""
from __future__ import annotations

import logging
import urllib.request
from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np

from bench import servers
from bench.answers import summarize
from bench.common import Call

log = logging.getLogger("bench.attacked_loads")

# The thresholds of monitoring/alerts.yml (the one source of the rules; this evaluates them on a benchmark load).
RATE_DROP_FACTOR = 0.5  # EarlyExitRateDrop: early-exit rate below this share of its baseline ...
RATE_BASELINE_MIN = 0.2  # ... whose baseline is above this
NEAR_FULL_RATIO = 0.85  # ComputePerRequestNearFull: compute spent / full above this
DISAGREEMENT_MARGIN = 0.1  # EarlyExitDisagreementHigh: live agreement below validation agreement minus this ...
MIN_AUDITS = 20  # ... over at least this many audited answers (agree + disagree)

Totals = dict[tuple[str, ...], float]  # (metric, label values...) -> counter value


def metric_totals(text: str, model: str) -> Totals:
    """The early-exit counters of one Prometheus scrape for `model`: ("count", exit), ("spent",), ("full",),
    ("audit", exit, outcome). Parsed with prometheus_client's parser (counter samples may carry `_total`)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Totals = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("ModelName") != model:
                continue
            name = sample.name.removesuffix("_total")
            if name == "EarlyExitCount":
                out[("count", labels["ExitIndex"])] += sample.value
            elif name == "ComputeSpentMFLOPs":
                out[("spent",)] += sample.value
            elif name == "ComputeFullMFLOPs":
                out[("full",)] += sample.value
            elif name == "EarlyExitAudit":
                out[("audit", labels["ExitIndex"], labels["Outcome"])] += sample.value
    return dict(out)


def scrape(running: servers.Running) -> Totals:
    """metric_totals of the server's metrics endpoint now."""
    with urllib.request.urlopen(running.server.metrics_url, timeout=10) as response:
        return metric_totals(response.read().decode(), running.server.models[0])


def increase(before: Totals, after: Totals) -> Totals:
    """Per key after - before (a key new in `after` counts from 0)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def add(a: Totals, b: Totals) -> Totals:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in {*a, *b}}


def early_exit_rate(totals: Totals) -> float | None:
    """Share of answers that left before the last exit (the recorded model:early_exit:ratio_rate5m)."""
    counts = {int(k[1]): v for k, v in totals.items() if k[0] == "count"}
    total = sum(counts.values())
    return None if not counts or total <= 0 else 1.0 - counts[max(counts)] / total


def alert_conditions(clean: Totals, load: Totals, validation_agreement: Sequence[float | None] | None
                     ) -> dict[str, Any]:
    """monitoring/alerts.yml's conditions on a load's counter increases, `clean` as the baseline (see the module
    docstring). `validation_agreement`: the manifest's exit_agreement (per early exit, None where unmeasured)."""
    base, rate = early_exit_rate(clean), early_exit_rate(load)
    spent, full = load.get(("spent",), 0.0), load.get(("full",), 0.0)
    compute_ratio = spent / full if full > 0 else None
    audit: dict[str, dict[str, Any]] = {}
    for k, normal in enumerate(validation_agreement or (), start=1):
        agree, disagree = load.get(("audit", str(k), "agree"), 0.0), load.get(("audit", str(k), "disagree"), 0.0)
        audited = agree + disagree
        live = agree / audited if audited else None
        audit[str(k)] = {"audited": int(audited), "live_agreement": None if live is None else round(live, 4),
                         "validation_agreement": normal, "enough_audits": audited >= MIN_AUDITS,
                         "condition_met": bool(normal is not None and live is not None and audited >= MIN_AUDITS
                                               and live < normal - DISAGREEMENT_MARGIN)}
    return {
        "early_exit_rate": None if rate is None else round(rate, 4),
        "clean_early_exit_rate": None if base is None else round(base, 4),
        "compute_spent_over_full": None if compute_ratio is None else round(compute_ratio, 4),
        "EarlyExitRateDrop": bool(rate is not None and base is not None and base > RATE_BASELINE_MIN
                                  and rate < RATE_DROP_FACTOR * base),
        "ComputePerRequestNearFull": bool(compute_ratio is not None and compute_ratio > NEAR_FULL_RATIO),
        "EarlyExitDisagreementHigh": {"condition_met": any(a["condition_met"] for a in audit.values()),
                                      "per_exit": audit},
    }


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """Median, min and max of the values that are present (None when there is none)."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None}
    return {"median": round(float(np.median(present)), 3), "min": round(min(present), 3),
            "max": round(max(present), 3)}


def run_loads(running: servers.Running, loads: Mapping[str, Sequence[bytes]], staged: Sequence[float],
              concurrency: int, rounds: int, seconds: float, cap_mflops: float
              ) -> tuple[dict[str, dict[str, Any]], dict[str, list[Call]], dict[str, Totals]]:
    """Each load in `loads` (one named `clean`: the alerts' baseline) on `running` as the module docstring says.
    Returns per load its figures, the answers of its uncapped pass (in body order) and its metric increases."""
    loads = {name: list(bodies) for name, bodies in loads.items()}  # one list each: wrk writes its files once
    increases: dict[str, Totals] = {name: {} for name in loads}
    bursts: dict[str, list[dict[str, Any]]] = {name: [] for name in loads}
    names = list(loads)
    for round_ in range(rounds):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            before = scrape(running)
            bursts[name].append(running.burst(loads[name], concurrency, seconds))
            increases[name] = add(increases[name], increase(before, scrape(running)))
    figures: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[Call]] = {}
    for name, bodies in loads.items():
        before = scrape(running)
        run, answers[name] = running.run(bodies, concurrency)
        increases[name] = add(increases[name], increase(before, scrape(running)))
        capped_run, capped = running.run(bodies, concurrency, cap_mflops)
        uncapped, under_cap = summarize(answers[name], 1.0, staged), summarize(capped, 1.0, staged)
        figures[name] = {
            "requests_per_s": spread([b["requests_per_s"] for b in bursts[name]]),
            "p50_ms": spread([b["p50_ms"] for b in bursts[name]]),
            "p99_ms": spread([b["p99_ms"] for b in bursts[name]]),
            "burst_errors": int(sum(b.get("errors", 0) for b in bursts[name])),
            "answer_pass": {"requests": len(answers[name]), "errors": uncapped["errors"],
                            "mean_mflops": uncapped["mean_mflops"], "budget_violations": uncapped["budget_violations"],
                            "exit_histogram": exit_histogram(answers[name], len(staged))},
            "capped_pass": {"budget_mflops": cap_mflops, "requests": len(capped), "errors": under_cap["errors"],
                            "mean_mflops": under_cap["mean_mflops"], "budget_violations": under_cap["budget_violations"],
                            "max_exit_used": max((c.body["exit_index"] for c in capped if c.status == 200 and c.body),
                                                 default=None),
                            "requests_per_s": capped_run["requests_per_s"]},
        }
        log.info("load %s: %s req/s, mean %s MFLOPs, violations %d (capped %d)", name,
                 figures[name]["requests_per_s"]["median"], uncapped["mean_mflops"], uncapped["budget_violations"],
                 under_cap["budget_violations"])
    return figures, answers, increases


def exit_histogram(calls: Sequence[Call], num_exits: int) -> list[int]:
    """Answers per exit (index 0 = exit 1) among the 200 answers of `calls`."""
    exits = [c.body["exit_index"] - 1 for c in calls if c.status == 200 and c.body]
    return np.bincount(np.asarray(exits, dtype=np.int64), minlength=num_exits).tolist()


def summarize_loads(figures: Mapping[str, dict[str, Any]], increases: Mapping[str, Totals],
                    validation_agreement: Sequence[float | None] | None) -> dict[str, Any]:
    """The result's `attacked_loads` rows: per load its figures, the rise of its mean staged cost over the clean
    load's, and the alerts' conditions on its metric increases."""
    clean = figures["clean"]["answer_pass"]["mean_mflops"]
    out: dict[str, Any] = {}
    for name, fig in figures.items():
        cost = fig["answer_pass"]["mean_mflops"]
        out[name] = {**fig,
                     "cost_rise_over_clean_mflops": None if cost is None or clean is None else round(cost - clean, 4),
                     "cost_ratio_to_clean": None if cost is None or not clean else round(cost / clean, 4),
                     "alerts": alert_conditions(increases["clean"], increases[name], validation_agreement)}
    violations = sum(f["answer_pass"]["budget_violations"] + f["capped_pass"]["budget_violations"]
                     for f in figures.values())
    out["budget_violations"] = int(violations)
    out["no_budget_violations"] = violations == 0
    return out
