"""Per-exit confidence thresholds for a sweep of budgets, fitted on the validation split.

    python -m training.calibrate runs/<name>/checkpoint.pt [--set key=value ...]

writes calibration.json beside the checkpoint: the threshold table, the cost profile, the validation
agreement of each exit with the last one, the robust-calibration summary, and the checkpoint's sha256.
The evaluation (training.evaluate) and export read it; the checkpoint itself is never rewritten.

A budget B (MFLOPs per input) is a hard cap: the deepest exit a request may
reach is the deepest one whose staged cost (stages and heads 1..k,
early_exit/costs.py) is <= B. Within that cap, the
thresholds for B are the cheapest ones (lowest mean validation cost) whose
validation accuracy stays within `tolerance` of always answering at the
deepest allowed exit. The table has one row per exit's staged cost; the server picks
the row of the largest tabulated budget not above the request's budget.

Robust calibration (`RobustConstraint`, config `calibration_robust_tolerance`): the thresholds must also
keep the policy's accuracy on attacked validation images (per sample, right under every attacked set)
within a second tolerance of always answering at the deepest allowed exit. Clean-only thresholds let an
attacker who makes exit 1 wrong with modest confidence walk through it; this constraint raises the early
thresholds until attacked exits rarely clear them, at the clean cost that takes. The attacked sets come
from `training.calibration_attack.calibration_attack_sets` (for each exit, APGD-CE and the policy attack
aimed at it alone).

This module is the numpy core (table search, file format) and imports no torch; the step that runs the
model and the attacks is training/calibration_attack.py, imported only when the command runs.

All decisions go through `early_exit.policy.select_exits`, the function the
server uses, so offline figures and HTTP answers agree by construction.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from early_exit.costs import CostProfile
from early_exit.manifest import sha256_file, write_json_atomic
from early_exit.policy import NEVER, BudgetEntry, ConfidenceMeasure, confidence, select_exits, softmax

CALIBRATION_NAME = "calibration.json"
CALIBRATION_FORMAT = 1

log = logging.getLogger("training.calibrate")


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
    outputs: ExitOutputs, thresholds: Sequence[float], max_exit: int, staged_mflops: Sequence[float],
    measure: ConfidenceMeasure = ConfidenceMeasure.MAX_PROB,
) -> PolicyResult:
    conf = outputs.confidences(measure)
    exits = select_exits(conf, thresholds, max_exit)
    correct = outputs.correct()[np.arange(len(exits)), exits]
    costs = np.asarray(staged_mflops)[exits]
    return PolicyResult(exits, float(correct.mean()), float(costs.mean()))


def judge_sets(sets: Sequence[ExitOutputs], thresholds: Sequence[float], max_exit: int,
               measure: ConfidenceMeasure = ConfidenceMeasure.MAX_PROB) -> tuple[np.ndarray, np.ndarray]:
    """The policy (`thresholds`, cap `max_exit`) on each of `sets` (the same N samples, each attacked
    differently): S x N exits it answers at (0-based) and S x N whether those answers are right."""
    exits = np.stack([select_exits(o.confidences(measure), thresholds, max_exit) for o in sets])
    rows = np.arange(exits.shape[1])
    return exits, np.stack([o.correct()[rows, e] for o, e in zip(sets, exits)])


def policy_correct(sets: Sequence[ExitOutputs], thresholds: Sequence[float], max_exit: int,
                   measure: ConfidenceMeasure = ConfidenceMeasure.MAX_PROB) -> np.ndarray:
    """N booleans: the policy answers sample n correctly on every one of `sets` (the per-sample worst case)."""
    return judge_sets(sets, thresholds, max_exit, measure)[1].all(axis=0)


@dataclass(frozen=True)
class RobustConstraint:
    """Attacked validation sets (the same samples, clean first) and how far the policy's robust accuracy on
    them may fall below the robust accuracy of always answering at the deepest allowed exit."""

    sets: tuple[ExitOutputs, ...]
    tolerance: float

    def accuracy(self, thresholds: Sequence[float], max_exit: int, measure: ConfidenceMeasure) -> float:
        return float(policy_correct(self.sets, thresholds, max_exit, measure).mean())


def _candidate_thresholds(conf: np.ndarray) -> np.ndarray:
    """Quantiles of the observed confidences plus a fixed high-confidence ladder."""
    ladder = 1.0 - np.logspace(-6, np.log10(0.5), 60)
    quantiles = np.quantile(conf.ravel(), np.linspace(0.0, 1.0, 101))
    return np.unique(np.concatenate([ladder, quantiles, [NEVER]]))


def calibrate_budget(
    outputs: ExitOutputs, max_exit: int, staged_mflops: Sequence[float], tolerance: float,
    measure: ConfidenceMeasure = ConfidenceMeasure.MAX_PROB, robust: RobustConstraint | None = None,
) -> BudgetEntry:
    """Thresholds for a cap at `max_exit`: cheapest on validation within `tolerance` of the capped exit's accuracy
    (and, with `robust`, within `robust.tolerance` of its robust accuracy on the attacked sets).

    Search: one shared threshold for all early exits, then per-exit coordinate refinement.
    """
    k = outputs.probs.shape[0]
    correct = outputs.correct()
    floor = float(correct[:, max_exit].mean()) - tolerance
    never = [NEVER] * k
    robust_floor = robust.accuracy(never, max_exit, measure) - robust.tolerance if robust else 0.0
    candidates = _candidate_thresholds(outputs.confidences(measure)[:, :max_exit]) if max_exit else np.array([NEVER])

    def evaluate(th: list[float]) -> PolicyResult:
        return apply_policy(outputs, th, max_exit, staged_mflops, measure)

    def better(res: PolicyResult, best: PolicyResult) -> bool:
        return (res.mean_mflops, -res.accuracy) < (best.mean_mflops, -best.accuracy)

    def admissible(res: PolicyResult, th: list[float]) -> bool:
        return res.accuracy >= floor and (robust is None or robust.accuracy(th, max_exit, measure) >= robust_floor)

    best_th = never
    best = evaluate(best_th)
    for t in candidates:
        th = [float(t)] * max_exit + [NEVER] * (k - max_exit)
        res = evaluate(th)
        if better(res, best) and admissible(res, th):
            best, best_th = res, th
    for e in range(max_exit):  # coordinate refinement, one pass per early exit
        for t in candidates:
            th = list(best_th)
            th[e] = float(t)
            res = evaluate(th)
            if better(res, best) and admissible(res, th):
                best, best_th = res, th
    return BudgetEntry(
        budget_mflops=float(staged_mflops[max_exit]),
        max_exit=max_exit,
        thresholds=tuple(best_th),
        val_accuracy=best.accuracy,
        val_mean_mflops=best.mean_mflops,
    )


def calibrate_table(
    outputs: ExitOutputs, staged_mflops: Sequence[float], tolerance: float = 0.003,
    measure: ConfidenceMeasure = ConfidenceMeasure.MAX_PROB, robust: RobustConstraint | None = None,
) -> list[BudgetEntry]:
    """One row per exit: the budget equal to that exit's cumulative cost."""
    return [calibrate_budget(outputs, k, staged_mflops, tolerance, measure, robust)
            for k in range(len(staged_mflops))]


def sweep(
    outputs: ExitOutputs, staged_mflops: Sequence[float], thresholds_grid: Sequence[float] | None = None,
    measure: ConfidenceMeasure = ConfidenceMeasure.MAX_PROB,
) -> list[dict[str, float]]:
    """Accuracy against mean cost for a shared threshold swept over a grid (the budgeted-evaluation curve)."""
    k = outputs.probs.shape[0]
    grid = thresholds_grid if thresholds_grid is not None else np.concatenate(
        [np.linspace(0.1, 0.9, 9), 1.0 - np.logspace(-1.3, -6, 12), [NEVER]])
    rows = []
    for t in grid:
        res = apply_policy(outputs, [float(t)] * k, k - 1, staged_mflops, measure)
        rows.append({"threshold": float(t), "accuracy": res.accuracy, "mean_mflops": res.mean_mflops})
    return rows


def agreement_with_last_exit(outputs: ExitOutputs, entry: BudgetEntry,
                             measure: ConfidenceMeasure = ConfidenceMeasure.MAX_PROB) -> list[float | None]:
    """Per exit k, among the samples the policy answers at k under `entry` (a calibrated budget row), the share
    whose answer equals the last exit's; None where no sample leaves at k (1.0 for the last exit itself).

    The audit of early answers (serving/audit.py) measures exactly this population in production: the
    confident answers that left early. On the validation split it is what "normal" looks like; a drop
    means drifted inputs or an attack aimed at an early exit.
    """
    exits = select_exits(outputs.confidences(measure), entry.thresholds, entry.max_exit)
    answers = outputs.probs.argmax(-1)  # K x N
    out: list[float | None] = []
    for k in range(answers.shape[0]):
        rows = exits == k
        out.append(float((answers[k, rows] == answers[-1, rows]).mean()) if rows.any() else None)
    return out


class CalibrationError(ValueError):
    """calibration.json is missing, malformed, or belongs to another checkpoint."""


@dataclass(frozen=True)
class Calibration:
    """calibration.json: thresholds per budget (staged MFLOPs), the cost profile, and what the step measured."""

    confidence: ConfidenceMeasure
    tolerance: float
    cost: CostProfile
    table: tuple[BudgetEntry, ...]
    default_budget_mflops: float
    checkpoint_sha256: str
    # what the step reports beside the table (JSON types only): training.calibration_attack writes
    # {"validation_samples", "robust": the robust-calibration summary with its attack seconds, or None}
    summary: dict[str, Any]
    exit_agreement: tuple[float | None, ...] | None = None  # per exit: agreement_with_last_exit on validation

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": CALIBRATION_FORMAT, "checkpoint_sha256": self.checkpoint_sha256,
                "confidence": self.confidence.value, "tolerance": self.tolerance, "cost": self.cost.to_dict(),
                "default_budget_mflops": self.default_budget_mflops, "table": [r.to_dict() for r in self.table],
                "exit_agreement": None if self.exit_agreement is None else list(self.exit_agreement),
                "summary": self.summary}


def calibration_path(checkpoint: str | Path) -> Path:
    """Where the calibration step writes (and evaluation and export read) the calibration of `checkpoint`."""
    return Path(checkpoint).with_name(CALIBRATION_NAME)


def write_calibration(calibration: Calibration, path: str | Path) -> Path:
    """Atomic JSON write (a reader never sees half a file)."""
    return write_json_atomic(calibration.to_dict(), path)


def read_calibration(path: str | Path, checkpoint: str | Path | None = None) -> Calibration:
    """Load calibration.json; with `checkpoint`, refuse one written for different weights.

    Raises CalibrationError with one line saying what to run.
    """
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path} does not exist; calibrate the checkpoint first "
                               f"(python -m training.calibrate {checkpoint or '<checkpoint>'})")
    try:
        d = json.loads(path.read_text())
        if d.get("format_version") != CALIBRATION_FORMAT:
            raise CalibrationError(f"{path} has format {d.get('format_version')}, expected {CALIBRATION_FORMAT}; "
                                   "re-run python -m training.calibrate")
        calibration = Calibration(
            confidence=ConfidenceMeasure(d["confidence"]), tolerance=float(d["tolerance"]),
            cost=CostProfile.from_dict(d["cost"]), table=tuple(BudgetEntry.from_dict(r) for r in d["table"]),
            default_budget_mflops=float(d["default_budget_mflops"]), checkpoint_sha256=str(d["checkpoint_sha256"]),
            summary=dict(d.get("summary") or {}),
            exit_agreement=None if d.get("exit_agreement") is None else tuple(
                None if a is None else float(a) for a in d["exit_agreement"]),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, CalibrationError):
            raise
        raise CalibrationError(f"{path} is malformed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                               ) from None
    if not calibration.table:
        raise CalibrationError(f"{path} holds an empty calibration table")
    if checkpoint is not None and sha256_file(checkpoint) != calibration.checkpoint_sha256:
        raise CalibrationError(f"{path} was written for other weights than {checkpoint}; "
                               f"re-run python -m training.calibrate {checkpoint}")
    return calibration


def main(argv: list[str] | None = None) -> int:
    """The calibration step's command line; a user error is one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m training.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for this step, e.g. --set calibration_robust_tolerance=0.02")
    args = p.parse_args(argv)
    # torch and the model only now: importing this module stays torch-free
    from training.calibration_attack import calibrate_checkpoint
    from training.checkpoint import CheckpointError
    from training.config import ConfigError, parse_overrides
    from training.data import DataError

    try:
        calibration, _ = calibrate_checkpoint(args.checkpoint, parse_overrides(args.overrides))
    except (CheckpointError, ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for row in calibration.table:
        log.info("budget %.2f MFLOPs (cap exit %d): thresholds %s, validation accuracy %.4f at %.2f MFLOPs",
                 row.budget_mflops, row.max_exit + 1, [round(t, 4) for t in row.thresholds], row.val_accuracy,
                 row.val_mean_mflops)
    robust = calibration.summary.get("robust")
    if robust:
        log.info("robust calibration: %d attacked validation images, %.1f s of attacks", robust["samples"],
                 robust["attack_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
