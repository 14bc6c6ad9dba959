"""Per-exit confidence thresholds for a sweep of budgets, fitted on the validation split.

A budget B (MFLOPs per input) is a hard cap: the deepest exit a request may
reach is the deepest one whose cumulative cost is <= B. Within that cap, the
thresholds for B are the cheapest ones (lowest mean validation cost) whose
validation accuracy stays within `tolerance` of always answering at the
deepest allowed exit. The table has one row per exit cost; the server picks the
row of the largest tabulated budget not above the request's budget.

All decisions go through `early_exit.policy.select_exits`, the function the
server uses, so offline figures and HTTP answers agree by construction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from early_exit.policy import BudgetEntry, ConfidenceMeasure, confidence, select_exits, softmax

NEVER = 1.01  # above any confidence in [0, 1]: nobody leaves at this exit


@dataclass(frozen=True)
class ExitOutputs:
    """Per-exit softmax outputs of one dataset, plus labels: everything calibration needs."""

    probs: np.ndarray  # K x N x C
    targets: np.ndarray  # N

    @classmethod
    def from_logits(cls, logits: Sequence[np.ndarray], targets: np.ndarray) -> "ExitOutputs":
        return cls(np.stack([softmax(l) for l in logits]), np.asarray(targets))

    def confidences(self, measure: ConfidenceMeasure) -> np.ndarray:
        """N x K confidences."""
        return np.stack([confidence(p, measure) for p in self.probs], axis=1)

    def correct(self) -> np.ndarray:
        """N x K: is exit k right on sample n."""
        return (self.probs.argmax(-1) == self.targets[None, :]).T


@dataclass(frozen=True)
class PolicyResult:
    exits: np.ndarray  # 0-based exit per sample
    accuracy: float
    mean_mflops: float


def apply_policy(
    outputs: ExitOutputs, thresholds: Sequence[float], max_exit: int, exit_mflops: Sequence[float],
    measure: ConfidenceMeasure = ConfidenceMeasure.MAX_PROB,
) -> PolicyResult:
    conf = outputs.confidences(measure)
    exits = select_exits(conf, thresholds, max_exit)
    correct = outputs.correct()[np.arange(len(exits)), exits]
    costs = np.asarray(exit_mflops)[exits]
    return PolicyResult(exits, float(correct.mean()), float(costs.mean()))


def _candidate_thresholds(conf: np.ndarray) -> np.ndarray:
    """Quantiles of the observed confidences plus a fixed high-confidence ladder."""
    ladder = 1.0 - np.logspace(-6, np.log10(0.5), 60)
    quantiles = np.quantile(conf.ravel(), np.linspace(0.0, 1.0, 101))
    return np.unique(np.concatenate([ladder, quantiles, [NEVER]]))


def calibrate_budget(
    outputs: ExitOutputs, max_exit: int, exit_mflops: Sequence[float], tolerance: float,
    measure: ConfidenceMeasure = ConfidenceMeasure.MAX_PROB,
) -> BudgetEntry:
    """Thresholds for a cap at `max_exit`: cheapest on validation within `tolerance` of the capped exit's accuracy.

    Search: one shared threshold for all early exits, then per-exit coordinate refinement.
    """
    k = outputs.probs.shape[0]
    correct = outputs.correct()
    reference = float(correct[:, max_exit].mean())
    floor = reference - tolerance
    candidates = _candidate_thresholds(outputs.confidences(measure)[:, :max_exit]) if max_exit else np.array([NEVER])

    def evaluate(th: list[float]) -> PolicyResult:
        return apply_policy(outputs, th, max_exit, exit_mflops, measure)

    def better(res: PolicyResult, best: PolicyResult) -> bool:
        return (res.mean_mflops, -res.accuracy) < (best.mean_mflops, -best.accuracy)

    best_th = [NEVER] * k
    best = evaluate(best_th)
    for t in candidates:
        th = [float(t)] * max_exit + [NEVER] * (k - max_exit)
        res = evaluate(th)
        if res.accuracy >= floor and better(res, best):
            best, best_th = res, th
    for e in range(max_exit):  # coordinate refinement, one pass per early exit
        for t in candidates:
            th = list(best_th)
            th[e] = float(t)
            res = evaluate(th)
            if res.accuracy >= floor and better(res, best):
                best, best_th = res, th
    return BudgetEntry(
        budget_mflops=float(exit_mflops[max_exit]),
        max_exit=max_exit,
        thresholds=tuple(best_th),
        val_accuracy=best.accuracy,
        val_mean_mflops=best.mean_mflops,
    )


def calibrate_table(
    outputs: ExitOutputs, exit_mflops: Sequence[float], tolerance: float = 0.003,
    measure: ConfidenceMeasure = ConfidenceMeasure.MAX_PROB,
) -> list[BudgetEntry]:
    """One row per exit: the budget equal to that exit's cumulative cost."""
    return [calibrate_budget(outputs, k, exit_mflops, tolerance, measure) for k in range(len(exit_mflops))]


def sweep(
    outputs: ExitOutputs, exit_mflops: Sequence[float], thresholds_grid: Sequence[float] | None = None,
    measure: ConfidenceMeasure = ConfidenceMeasure.MAX_PROB,
) -> list[dict[str, float]]:
    """Accuracy against mean cost for a shared threshold swept over a grid (the budgeted-evaluation curve)."""
    k = outputs.probs.shape[0]
    grid = thresholds_grid if thresholds_grid is not None else np.concatenate(
        [np.linspace(0.1, 0.9, 9), 1.0 - np.logspace(-1.3, -6, 12), [NEVER]])
    rows = []
    for t in grid:
        res = apply_policy(outputs, [float(t)] * k, k - 1, exit_mflops, measure)
        rows.append({"threshold": float(t), "accuracy": res.accuracy, "mean_mflops": res.mean_mflops})
    return rows
