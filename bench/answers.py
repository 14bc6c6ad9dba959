"""What the early-exit server's answers say, and the offline answers they must reproduce.

An answer (bench.common.Call.body) holds `class_index`, `exit_index` (1-based), `mflops_spent` and
`budget_mflops`; a stock TorchServe answer is normalized to the same fields (bench.stock.parse_answer). A
budget violation is judged against the manifest's staged cost of the exit that answered (stages and heads
1..k), not against what the answer reports.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from bench.common import Call, latency_summary
from early_exit.policy import entry_for_budget
from early_exit.runner import StagedRunner


def offline_policy(runner: StagedRunner, x: np.ndarray, y: np.ndarray, budget: float, batch: int = 256
                   ) -> dict[str, Any]:
    """What the staged runner answers offline on `x` (N x C x H x W) under `budget` (MFLOPs), in batches of `batch`:
    per row the 0-based exit and the predicted class, the accuracy against `y` and the mean staged MFLOPs."""
    manifest = runner.manifest
    entry = entry_for_budget(budget, manifest.calibration, manifest.staged_mflops)
    parts = [runner.run(x[i:i + batch], entry.thresholds, entry.max_exit) for i in range(0, len(x), batch)]
    exits = np.concatenate([p.exits for p in parts])
    pred = np.concatenate([p.probs.argmax(-1) for p in parts])
    return {"exits": exits, "pred": pred, "accuracy": float((pred == y).mean()),
            "mean_mflops": float(np.concatenate([p.mflops for p in parts]).mean())}


def violations(calls: Sequence[Call], staged: Sequence[float]) -> int:
    """Answers whose exit's staged cost (`staged`: MFLOPs per exit) exceeds the budget applied, or whose reported
    spend differs from that staged cost."""
    ok = [c for c in calls if c.status == 200 and c.body]
    return sum(1 for c in ok if staged[c.body["exit_index"] - 1] > c.body["budget_mflops"] + 1e-9
               or abs(c.body["mflops_spent"] - staged[c.body["exit_index"] - 1]) > 1e-9 * staged[-1])


def summarize(calls: Sequence[Call], seconds: float, staged: Sequence[float], y: np.ndarray | None = None
              ) -> dict[str, Any]:
    """One run of `calls` over `seconds`: bench.common.latency_summary, errors (no 200 answer), mean MFLOPs
    spent, budget violations and, when `y` holds one label per call, accuracy."""
    ok = [c for c in calls if c.status == 200 and c.body]
    out: dict[str, Any] = {**latency_summary([c.latency_s for c in calls], seconds), "errors": len(calls) - len(ok),
                           "mean_mflops": round(float(np.mean([c.body["mflops_spent"] for c in ok])), 4) if ok else None,
                           "budget_violations": violations(calls, staged)}
    if y is not None and len(calls) == len(y):
        out["accuracy"] = float(np.mean([c.status == 200 and c.body is not None and c.body["class_index"] == t
                                         for c, t in zip(calls, y)]))
    return out


def answer_stats(calls: Sequence[Call], staged: Sequence[float], y: np.ndarray | None) -> dict[str, Any]:
    """What a run's answers say beyond its latency: mean MFLOPs, budget violations, accuracy (see `summarize`)."""
    s = summarize(calls, 1.0, staged, y)
    return {k: s[k] for k in ("mean_mflops", "budget_violations", "accuracy") if k in s}


def answer_field(calls: Sequence[Call], key: str) -> np.ndarray:
    """`key` of every answer (int), -1 where the call got no 200 answer."""
    return np.array([int(c.body[key]) if c.status == 200 and c.body else -1 for c in calls], dtype=np.int64)


def accuracy(pred: np.ndarray | None, y: np.ndarray) -> float | None:
    """Share of `pred` equal to `y`; None when there is no prediction per label."""
    return None if pred is None or len(pred) != len(y) else float((pred == y).mean())
