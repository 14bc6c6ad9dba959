"""The early-exit policy: one batched, numpy-only implementation.

Offline evaluation, calibration and the TorchServe handler all call these
functions, so the exit a request takes through HTTP is the exit evaluation
predicted for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence

import numpy as np

# A threshold above any confidence in [0, 1]: no input ever leaves at an exit that has it.
NEVER = 1.01


class ConfidenceMeasure(str, Enum):
    """How a softmax vector is turned into a single confidence score in [0, 1]."""

    MAX_PROB = "max_prob"
    ENTROPY = "entropy"  # 1 - normalized entropy


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis (float64 for threshold stability)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def confidence(probs: np.ndarray, measure: ConfidenceMeasure | str = ConfidenceMeasure.MAX_PROB) -> np.ndarray:
    """Confidence of each row of `probs` (N x C) under `measure`."""
    measure = ConfidenceMeasure(measure)
    probs = np.asarray(probs, dtype=np.float64)
    if measure is ConfidenceMeasure.MAX_PROB:
        return probs.max(axis=-1)
    num_classes = probs.shape[-1]
    p = np.clip(probs, 1e-12, 1.0)
    entropy = -(p * np.log(p)).sum(axis=-1)
    return 1.0 - entropy / np.log(num_classes)


def exit_mask(conf: np.ndarray, thresholds: np.ndarray | float, exit: int, max_exits: np.ndarray | int) -> np.ndarray:
    """Which rows leave at `exit` (0-based): confident enough, or `exit` is the deepest they may reach.

    conf: (N,) confidences at this exit; thresholds: this exit's threshold, per row (N,) or shared;
    max_exits: each row's deepest allowed exit (N,) or shared. The rule of the staged runner and of
    `select_exits`, so offline and served decisions cannot differ.
    """
    conf = np.asarray(conf, dtype=np.float64)
    return (conf >= np.asarray(thresholds, dtype=np.float64)) | (exit >= np.asarray(max_exits))


def select_exits(confidences: np.ndarray, thresholds: Sequence[float] | np.ndarray, max_exit: int | np.ndarray
                 ) -> np.ndarray:
    """Exit (0-based) taken by each row, given every exit's confidence (N x K).

    thresholds: (K,) shared or (N x K) per row; max_exit: the deepest exit allowed (0-based, inclusive),
    shared or (N,) per row. Rows leave at the first exit whose confidence reaches its threshold; the
    deepest allowed exit always answers. Walks the exits as the staged runner does, one `exit_mask` each.
    """
    confidences = np.asarray(confidences, dtype=np.float64)
    n, k = confidences.shape
    max_exits = np.broadcast_to(np.asarray(max_exit, dtype=np.int64), (n,))
    if max_exits.size and (max_exits.min() < 0 or max_exits.max() >= k):
        raise ValueError(f"max_exit must be in [0, {k - 1}], got {np.unique(max_exits).tolist()}")
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (n, k))
    chosen = np.full(n, -1, dtype=np.int64)
    pending = np.arange(n)
    for e in range(k):
        if not pending.size:
            break
        leave = exit_mask(confidences[pending, e], thresholds[pending, e], e, max_exits[pending])
        chosen[pending[leave]] = e
        pending = pending[~leave]
    return chosen


@dataclass(frozen=True)
class BudgetEntry:
    """One row of the calibration table: the thresholds calibrated for a per-input budget."""

    budget_mflops: float
    max_exit: int  # 0-based, deepest exit whose staged cost fits the budget
    thresholds: tuple[float, ...]
    val_accuracy: float
    val_mean_mflops: float

    def to_dict(self) -> dict:
        return {
            "budget_mflops": self.budget_mflops,
            "max_exit": self.max_exit,
            "thresholds": list(self.thresholds),
            "val_accuracy": self.val_accuracy,
            "val_mean_mflops": self.val_mean_mflops,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "BudgetEntry":
        return cls(
            budget_mflops=float(d["budget_mflops"]),
            max_exit=int(d["max_exit"]),
            thresholds=tuple(float(t) for t in d["thresholds"]),
            val_accuracy=float(d["val_accuracy"]),
            val_mean_mflops=float(d["val_mean_mflops"]),
        )


class BudgetError(ValueError):
    """A budget that no exit can honour (below the cheapest exit, NaN, negative)."""


def deepest_exit_within(budget_mflops: float, exit_mflops: Sequence[float]) -> int:
    """0-based index of the deepest exit whose cost (the staged cost, early_exit.costs) is <= budget."""
    if not np.isfinite(budget_mflops) or budget_mflops < 0:
        raise BudgetError(f"budget must be a finite, non-negative number of MFLOPs, got {budget_mflops!r}")
    fitting = [i for i, c in enumerate(exit_mflops) if c <= budget_mflops]
    if not fitting:
        raise BudgetError(
            f"budget {budget_mflops:g} MFLOPs is below the cheapest exit ({exit_mflops[0]:g} MFLOPs)"
        )
    return fitting[-1]


def entry_for_budget(budget_mflops: float, table: Sequence[BudgetEntry], exit_mflops: Sequence[float]) -> BudgetEntry:
    """The calibration row to apply for a per-input budget.

    The budget caps the deepest exit (staged cost <= budget); the row is the
    one calibrated for the largest tabulated budget not above the request's.
    """
    max_exit = deepest_exit_within(budget_mflops, exit_mflops)
    rows = sorted((r for r in table if r.budget_mflops <= budget_mflops), key=lambda r: r.budget_mflops)
    if not rows:
        raise BudgetError(
            f"budget {budget_mflops:g} MFLOPs is below the smallest calibrated budget "
            f"({min(r.budget_mflops for r in table):g} MFLOPs)"
        )
    row = rows[-1]
    if row.max_exit > max_exit:  # defensive: a table row must never allow more than the cap
        raise BudgetError(f"calibration row for {row.budget_mflops:g} MFLOPs exceeds the cap")
    return row
