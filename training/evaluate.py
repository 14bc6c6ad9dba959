"""Evaluate a calibrated checkpoint under attack and write eval/ (eval.json + plots).

    python -m training.evaluate runs/<name>/checkpoint.pt [--out DIR] [--limit N] [--split test|val]
                                [--set key=value ...]

The step reads the checkpoint and the calibration.json beside it (training.calibrate; one written for other
weights is refused), and attacks the first `limit` images of the evaluated split (test by default;
`--split val` attacks validation images, so recipe choices never look at test, judged by the same
calibration). The attack suite is a typed list of runs (`AttackRun`, planned by `plan_suite`), each
building one set:

- the papers' protocol, kept for comparability: PGD-`eval_steps` on each exit, the average attack and
  the max-average attack (docs/method.md, "Attacks");
- DeepSloth at the accuracy attacks' radius `eval_eps` (and, when the config's `slowdown_eps` differs,
  again at that radius, DeepSloth's own setting, reported beside it);
- per exit, AutoAttack's APGD-CE and APGD-T (`strong_eval`; "Evaluating robustness so that an attacker
  would agree"). APGD-T runs, as in AutoAttack, only on the images every earlier attack on that exit
  left correct, so its figure is cumulative: the worst case of all per-exit attacks up to it;
- the adaptive attack on the deployed policy (`strong_eval`): for each calibrated budget row and each
  exit k it may answer at, a set driving the policy to a wrong answer at or before k.

Robust accuracy is a per-sample worst case: of exit k, over every set at radius <= eval_eps evaluated at
exit k; of the policy at a budget row, over every such set judged by the policy
(`training.calibrate.apply_policy`) at that row, with the mean staged cost of the sets an attacker
would pick (a wrong answer first, then the most expensive one). Costs and budgets are staged costs
(early_exit/costs.py). eval.json records the sha256 of the checkpoint and of the calibration it was judged
with; export takes the manifest's evaluation figures from it (`headline`, `read_evaluation`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from early_exit.manifest import sha256_file, write_json_atomic
from early_exit.policy import BudgetEntry, ConfidenceMeasure
from training.attacks import AttackName, build_attack, keep_strongest
from training.attacks.autoattack import APGD_T_MIN_CLASSES
from training.attacked_sets import AttackFn, EvalResult, apgd_settings, evaluate, policy_attack_settings
from training.calibrate import (
    CalibrationError,
    ExitOutputs,
    apply_policy,
    calibration_path,
    judge_sets,
    read_calibration,
    sweep,
)
from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from training.config import ConfigError, TrainConfig, parse_overrides, validate_config
from training.data import DataError, Split, load_tensors
from training.models import MultiExitNetwork

log = logging.getLogger("training.evaluate")

EVAL_NAME = "eval.json"
# Config keys the calibration step reads: an evaluation is judged by the calibration.json it is given, so
# overriding them here would change nothing; they are refused (python -m training.calibrate --set takes them).
CALIBRATION_KEYS = frozenset({"confidence", "calibration_tolerance", "calibration_robust_tolerance",
                              "calibration_attack_limit"})


class EvaluationError(ValueError):
    """eval.json is missing or malformed, or was not made on the test split for this checkpoint and calibration."""


# --- the attack suite ---------------------------------------------------------------------------------------

class Family(str, Enum):
    """The groups the suite's timing is reported in."""

    CLEAN = "clean"
    PGD = "pgd"  # the papers' protocol: single-exit PGD, the average attack, max-average
    DEEPSLOTH = "deepsloth"
    APGD_CE = "apgd-ce"
    APGD_T = "apgd-t"
    POLICY = "policy"


class RunKind(str, Enum):
    """What one run of the suite does. The value begins the set's name in eval.json."""

    CLEAN = "clean"
    SINGLE = "single"  # PGD on one exit
    AVERAGE = "average"
    MAX_AVERAGE = "max-average"  # per sample the strongest SINGLE set (no attack of its own)
    DEEPSLOTH = "deepsloth"
    APGD_CE = "apgd-ce"
    APGD_T = "apgd-t"  # on the images every earlier set left right at its exit
    POLICY = "policy"

    @property
    def family(self) -> Family:
        if self in (RunKind.SINGLE, RunKind.AVERAGE, RunKind.MAX_AVERAGE):
            return Family.PGD
        return Family(self.value)


@dataclass(frozen=True)
class AttackRun:
    """One run of the attack suite: what it attacks and at which radius; the set it builds is named `name`."""

    kind: RunKind
    eps: float = 0.0  # the L-inf radius its images lie in around the clean ones
    exit: int | None = None  # 0-based exit it aims at (SINGLE, APGD_CE, APGD_T, POLICY)
    target: BudgetEntry | None = None  # POLICY: the calibrated budget row whose policy it attacks
    step_size: float | None = None  # DEEPSLOTH: its step at this radius
    own_radius: bool = False  # DEEPSLOTH at the config's slowdown_eps, beside the run at eval_eps

    @property
    def family(self) -> Family:
        return self.kind.family

    @property
    def name(self) -> str:
        """The set's name in eval.json: "clean", "single/exit1", "policy/cap2/exit1", "deepsloth@0.03137", ..."""
        if self.kind is RunKind.POLICY and self.target is not None and self.exit is not None:
            return f"policy/cap{self.target.max_exit + 1}/exit{self.exit + 1}"
        if self.exit is not None:
            return f"{self.kind.value}/exit{self.exit + 1}"
        if self.own_radius:
            return f"{self.kind.value}@{self.eps:.4g}"
        return self.kind.value


def slowdown_runs(cfg: TrainConfig) -> list[AttackRun]:
    """DeepSloth runs: at the accuracy attacks' radius eval_eps, and at the config's slowdown_eps if it differs.

    `slowdown_step_size` is the step for `slowdown_eps` (DeepSloth: 0.002 at 8/255, 30 steps); at another
    radius the step keeps the same share of the radius, so the attack can still cross its ball.
    """

    def step(eps: float) -> float:
        if cfg.slowdown_eps <= 0 or eps == cfg.slowdown_eps:
            return cfg.slowdown_step_size
        return cfg.slowdown_step_size / cfg.slowdown_eps * eps

    runs = [AttackRun(RunKind.DEEPSLOTH, cfg.eval_eps, step_size=step(cfg.eval_eps))]
    if cfg.slowdown_eps != cfg.eval_eps:
        runs.append(AttackRun(RunKind.DEEPSLOTH, cfg.slowdown_eps, step_size=step(cfg.slowdown_eps), own_radius=True))
    return runs


def policy_targets(table: Sequence[BudgetEntry]) -> list[tuple[BudgetEntry, int]]:
    """(row, exit) pairs the policy attack aims at: every exit a row lets answer, once per distinct loss.

    Exit k answers under a row if it is the row's deepest allowed exit or its threshold is <= 1. Two rows
    that agree on the thresholds the loss reads (exits before k, exit k unless it is the cap) share a set.
    """
    seen, targets = set(), []
    for entry in table:
        for k in range(entry.max_exit + 1):
            last = k == entry.max_exit
            if not last and entry.thresholds[k] > 1.0:
                continue
            key = (k, last, tuple(entry.thresholds[:k if last else k + 1]))
            if key not in seen:
                seen.add(key)
                targets.append((entry, k))
    return targets


def plan_suite(cfg: TrainConfig, num_exits: int, table: Sequence[BudgetEntry],
               num_classes: int = APGD_T_MIN_CLASSES) -> tuple[AttackRun, ...]:
    """Every run of one evaluation, in the order they run (see the module docstring). APGD-T is left out (and
    the omission logged) for fewer than APGD_T_MIN_CLASSES classes, where its DLR loss is undefined."""
    eps, exits = cfg.eval_eps, range(num_exits)
    runs = [AttackRun(RunKind.CLEAN), *(AttackRun(RunKind.SINGLE, eps, exit=k) for k in exits),
            AttackRun(RunKind.AVERAGE, eps), AttackRun(RunKind.MAX_AVERAGE, eps), *slowdown_runs(cfg)]
    if cfg.strong_eval:
        runs += [AttackRun(RunKind.APGD_CE, eps, exit=k) for k in exits]
        if num_classes >= APGD_T_MIN_CLASSES:
            runs += [AttackRun(RunKind.APGD_T, eps, exit=k) for k in exits]
        else:
            log.warning("APGD-T left out: its DLR loss needs %d classes, the model has %d", APGD_T_MIN_CLASSES,
                        num_classes)
        runs += [AttackRun(RunKind.POLICY, eps, exit=k, target=entry) for entry, k in policy_targets(table)]
    return tuple(runs)


def worst_case_correct(sets: Mapping[Any, EvalResult]) -> np.ndarray:
    """N x K: is exit k right on sample n under every set."""
    return np.logical_and.reduce([s.outputs.correct() for s in sets.values()])


def named(sets: Mapping[AttackRun, EvalResult]) -> dict[str, EvalResult]:
    """The sets by their names in eval.json."""
    return {run.name: s for run, s in sets.items()}


def find(sets: Mapping[AttackRun, EvalResult], kind: RunKind, at: int | None = None) -> EvalResult:
    """The set of the first run of `kind` aimed at exit `at` (0-based; None: no exit) in `sets`; KeyError if none."""
    for run, s in sets.items():
        if run.kind is kind and run.exit == at:
            return s
    raise KeyError(f"no {kind.value} run" + ("" if at is None else f" at exit {at + 1}"))


class AttackSuite:
    """Runs the planned attack runs in order and keeps every set, by run (see the module docstring)."""

    def __init__(self, model: MultiExitNetwork, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor,
                 runs: Sequence[AttackRun], measure: ConfidenceMeasure) -> None:
        self.model, self.cfg, self.x, self.y = model, cfg, x, y
        self.runs, self.measure = tuple(runs), measure
        self.sets: dict[AttackRun, EvalResult] = {}
        self.progress = tqdm(total=len(self.runs), desc="attack suite", dynamic_ncols=True)

    def accuracy_sets(self) -> dict[AttackRun, EvalResult]:
        """The sets whose images lie within the accuracy attacks' radius (every set a worst case may use)."""
        return {r: s for r, s in self.sets.items() if r.eps <= self.cfg.eval_eps + 1e-12}

    def attack(self, run: AttackRun) -> AttackFn:
        """The attack `run` builds, seeded with the config's seed (so a set does not depend on the runs before it)."""
        cfg = self.cfg
        if run.kind in (RunKind.SINGLE, RunKind.AVERAGE):
            kw: dict[str, Any] = dict(eps=run.eps, step_size=cfg.eval_step_size, steps=cfg.eval_steps)
        elif run.kind is RunKind.DEEPSLOTH:
            kw = dict(eps=run.eps, step_size=run.step_size, steps=cfg.slowdown_steps)
        elif run.kind is RunKind.APGD_CE:
            kw = apgd_settings(cfg)
        elif run.kind is RunKind.APGD_T:
            kw = dict(target_classes=cfg.apgd_target_classes, **apgd_settings(cfg))
        elif run.kind is RunKind.POLICY and run.target is not None:
            kw = dict(thresholds=run.target.thresholds, max_exit=run.target.max_exit, measure=self.measure,
                      **policy_attack_settings(cfg))
        else:
            raise ValueError(f"{run.name} builds no attack of its own")
        if run.exit is not None:
            kw["exit"] = run.exit
        return build_attack(AttackName(run.kind.value), self.model, seed=cfg.seed, **kw)

    def _evaluate(self, run: AttackRun, attack: AttackFn | None, keep_inputs: bool = False,
                  only: np.ndarray | None = None, x: torch.Tensor | None = None) -> EvalResult:
        return evaluate(self.model, self.x if x is None else x, self.y, attack, self.cfg.eval_batch_size, run.name,
                        keep_inputs, only=only)

    def _max_average(self, run: AttackRun) -> EvalResult:
        """Per sample, the SINGLE set whose summed cross-entropy over the exits is largest."""
        bs = self.cfg.eval_batch_size
        singles = [s for r, s in self.sets.items() if r.kind is RunKind.SINGLE]  # in exit order
        start = time.perf_counter()
        x_max = torch.cat([keep_strongest(self.model, [s.inputs[i:i + bs] for s in singles], self.y[i:i + bs])
                           for i in range(0, len(self.y), bs)])
        picking = time.perf_counter() - start
        for s in singles:
            s.inputs = None  # max-average holds what it needs; free the memory
        result = self._evaluate(run, None, x=x_max)
        result.seconds += picking
        return result

    def run(self, run: AttackRun) -> EvalResult:
        """Build `run`'s set (clean, attacked, or picked from earlier sets) and keep it."""
        self.progress.set_postfix_str(run.name)
        if run.kind is RunKind.CLEAN:
            result = self._evaluate(run, None)
        elif run.kind is RunKind.MAX_AVERAGE:
            result = self._max_average(run)
        elif run.kind is RunKind.APGD_T:
            survivors = worst_case_correct(self.accuracy_sets())[:, run.exit]
            result = self._evaluate(run, self.attack(run), only=survivors)
        else:
            result = self._evaluate(run, self.attack(run), keep_inputs=run.kind is RunKind.SINGLE)
        self.sets[run] = result
        self.progress.update()
        return result

    def run_all(self) -> dict[AttackRun, EvalResult]:
        for run in self.runs:
            self.run(run)
        self.progress.close()
        return self.sets


# --- summaries ----------------------------------------------------------------------------------------------

CLEAN = AttackRun(RunKind.CLEAN).name  # the clean set's name, which policy and slowdown rows compare against


def _histogram(exits: np.ndarray, k: int) -> list[float]:
    return [float(v) for v in np.bincount(exits, minlength=k) / max(len(exits), 1)]


def anytime_summary(sets: Mapping[AttackRun, EvalResult], worst_sets: Mapping[AttackRun, EvalResult],
                    k: int) -> dict[str, Any]:
    """Per-exit accuracy under each attack and the per-sample worst case (1 entry per exit)."""
    papers = {r: s for r, s in worst_sets.items() if r.family in (Family.CLEAN, Family.PGD)}
    summary: dict[str, Any] = {
        "clean": find(sets, RunKind.CLEAN).accuracy,
        "single": [find(sets, RunKind.SINGLE, j).accuracy for j in range(k)],
        "average": find(sets, RunKind.AVERAGE).accuracy, "max-average": find(sets, RunKind.MAX_AVERAGE).accuracy,
        "pgd_worst_case": [float(v) for v in worst_case_correct(papers).mean(axis=0)],
    }
    if any(r.kind is RunKind.APGD_CE for r in sets):
        summary["apgd-ce"] = [find(sets, RunKind.APGD_CE, j).accuracy[j] for j in range(k)]
    if any(r.kind is RunKind.APGD_T for r in sets):
        runs = list(worst_sets)
        summary["apgd-t"] = []  # cumulative: APGD-T ran on the survivors of every earlier set
        for j in range(k):
            last = next(i for i, r in enumerate(runs) if r.kind is RunKind.APGD_T and r.exit == j)
            upto = {r: worst_sets[r] for r in runs[:last + 1]}
            summary["apgd-t"].append(float(worst_case_correct(upto)[:, j].mean()))
    summary["worst_case"] = [float(v) for v in worst_case_correct(worst_sets).mean(axis=0)]
    summary["worst_case_sets"] = [r.name for r in worst_sets]
    return summary


def policy_row(entry: BudgetEntry, sets: dict[str, EvalResult], staged: Sequence[float],
               measure: ConfidenceMeasure) -> dict[str, Any]:
    """The policy of one budget row judged on every set (by name, the clean one among them): its accuracy on
    each, and the per-sample worst case.

    Per sample the attacker sends the set that makes the policy answer wrongly, else the one that costs
    most; the worst case's accuracy and mean staged cost are those of the sets so picked.
    """
    names, k = list(sets), len(staged)
    exits, correct = judge_sets([s.outputs for s in sets.values()], entry.thresholds, entry.max_exit, measure)
    n = exits.shape[1]
    cost = np.asarray(staged)[exits]
    pick = np.argmax(np.where(correct, 0.0, cost.max() + 1.0) + cost, axis=0)
    by_set = {name: {"accuracy": float(correct[i].mean()), "mean_mflops": float(cost[i].mean())}
              for i, name in enumerate(names)}
    return {
        "budget_mflops": entry.budget_mflops, "max_exit": entry.max_exit + 1,
        "clean": {**by_set[CLEAN], "exit_distribution": _histogram(exits[names.index(CLEAN)], k)},
        "robust_accuracy": float(correct.all(axis=0).mean()),
        "robust_mean_mflops": float(cost[pick, np.arange(n)].mean()),
        "robust_exit_distribution": _histogram(exits[pick, np.arange(n)], k),
        "weakest_set": min(by_set, key=lambda name: by_set[name]["accuracy"]),
        "by_set": by_set,
    }


def slowdown_row(entry: BudgetEntry, sets: dict[str, EvalResult], staged: Sequence[float],
                 measure: ConfidenceMeasure) -> dict[str, Any]:
    """Early-exit rate (share answering before the row's deepest allowed exit) and mean staged cost per set (by
    name, the clean one among them), and each set's cost rise over the clean one."""
    k = len(staged)
    row: dict[str, Any] = {"budget_mflops": entry.budget_mflops, "max_exit": entry.max_exit + 1}
    for name, s in sets.items():
        r = apply_policy(s.outputs, entry.thresholds, entry.max_exit, staged, measure)
        row[name] = {"early_exit_rate": float((r.exits < entry.max_exit).mean()), "mean_mflops": r.mean_mflops,
                     "accuracy": r.accuracy, "exit_distribution": _histogram(r.exits, k)}
    clean = row[CLEAN]
    row["cost_rise"] = {n: row[n]["mean_mflops"] - clean["mean_mflops"] for n in sets if n != CLEAN}
    return row


def budgeted(
    table: Sequence[BudgetEntry], staged_mflops: list[float], sets: dict[str, ExitOutputs], measure: ConfidenceMeasure,
) -> dict[str, Any]:
    """Accuracy, mean staged cost and exit distribution of each calibrated budget on each set."""
    k = len(staged_mflops)
    rows = []
    for entry in table:
        row: dict[str, Any] = {"budget_mflops": entry.budget_mflops, "max_exit": entry.max_exit + 1,
                               "thresholds": list(entry.thresholds)}
        for name, outputs in sets.items():
            res = apply_policy(outputs, entry.thresholds, entry.max_exit, staged_mflops, measure)
            row[name] = {"accuracy": res.accuracy, "mean_mflops": res.mean_mflops,
                         "exit_distribution": _histogram(res.exits, k),
                         "early_exit_rate": float((res.exits < k - 1).mean())}
        rows.append(row)
    curves = {name: sweep(outputs, staged_mflops, measure=measure) for name, outputs in sets.items()}
    return {"budgets": rows, "curves": curves}


def attack_timing(sets: Mapping[AttackRun, EvalResult], n: int) -> dict[str, Any]:
    """eval.json's `timing`: seconds per set, per attack family, and per family per 100 attacked samples (`n`)."""
    groups: dict[str, float] = {}
    for run, s in sets.items():
        groups[run.family.value] = groups.get(run.family.value, 0.0) + s.seconds
    total = sum(groups.values())
    return {"seconds": {run.name: round(s.seconds, 3) for run, s in sets.items()},
            "family_seconds": {g: round(v, 3) for g, v in groups.items()}, "total_seconds": round(total, 3),
            "per_100_samples": {g: round(100.0 * v / max(n, 1), 3) for g, v in {**groups, "total": total}.items()}}


# --- plots --------------------------------------------------------------------------------------------------

def plot(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    mflops = summary["cost"]["staged_mflops"]
    a, policy = summary["anytime"], summary["policy"]["budgets"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in summary["budgeted"]["curves"].items():
        ax.plot([c["mean_mflops"] for c in curve], [c["accuracy"] for c in curve], marker=".", alpha=0.6,
                label=f"{name} (threshold sweep)")
    ax.plot(mflops, a["clean"], "s--", label="clean, exit k")
    ax.plot(mflops, a["max-average"], "^--", label="max-average (PGD), exit k")
    ax.plot(mflops, a["worst_case"], "v--", label="worst case of all attacks, exit k")
    ax.plot([r["clean"]["mean_mflops"] for r in policy], [r["clean"]["accuracy"] for r in policy], "o-", lw=2,
            label="policy, clean (per budget row)")
    ax.plot([r["robust_mean_mflops"] for r in policy], [r["robust_accuracy"] for r in policy], "X-", lw=2,
            color="black", label="policy, robust: worst case incl. adaptive attack (per budget row)")
    ax.set_xlabel("mean staged MFLOPs per sample (stages and heads run)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{summary['name']} ({summary['split']}): accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "accuracy_vs_mflops.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    rows = summary["slowdown"]["budgets"]
    shown = [len(rows) - 1] + ([len(rows) - 2] if len(rows) > 1 else [])  # the default row and one capped row
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4), squeeze=False)
    idx = np.arange(len(mflops))
    for ax, r in zip(axes[0], shown):
        row = rows[r]
        bars = {n: (v["exit_distribution"], v["mean_mflops"]) for n, v in row.items() if isinstance(v, dict)
                and "exit_distribution" in v}
        bars["policy worst case"] = (policy[r]["robust_exit_distribution"], policy[r]["robust_mean_mflops"])
        width = 0.8 / len(bars)
        for i, (name, (dist, cost)) in enumerate(bars.items()):
            ax.bar(idx + i * width, dist, width, label=f"{name} ({cost:.2f} MFLOPs)")
        ax.set_xticks(idx + width * (len(bars) - 1) / 2, [f"exit {k + 1}" for k in idx])
        ax.set_ylabel("share of samples")
        ax.set_ylim(0, 1.3)  # room for the legend
        ax.set_title(f"budget {row['budget_mflops']:.2f} MFLOPs (cap: exit {row['max_exit']})", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"exit distribution, clean vs slowdown (DeepSloth eps {summary['slowdown_attack']['eps']:.4g})",
                 fontsize=10)
    fig.tight_layout()
    paths.append(out_dir / "exit_histogram.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


# --- the evaluation -----------------------------------------------------------------------------------------

def attack_settings(cfg: TrainConfig) -> dict[str, Any]:
    """eval.json's `attack`: the accuracy attacks' settings (PGD, and APGD and the policy attack with strong_eval)."""
    settings: dict[str, Any] = {"eps": cfg.eval_eps, "step_size": cfg.eval_step_size, "steps": cfg.eval_steps,
                                "random_start": True, "strong_eval": cfg.strong_eval}
    if cfg.strong_eval:
        settings["apgd"] = {"steps": cfg.apgd_steps, "restarts": cfg.apgd_restarts,
                            "target_classes": cfg.apgd_target_classes}
        settings["policy"] = {"steps": cfg.policy_attack_steps, "restarts": cfg.policy_attack_restarts,
                              "kappa": cfg.policy_attack_kappa, "optimizer": "apgd"}
    return settings


def evaluation_dir(checkpoint: str | Path, split: Split | str = Split.TEST) -> Path:
    """Where the evaluation of `checkpoint` on `split` goes by default: eval/ (test) or eval-val/ beside it."""
    return Path(checkpoint).parent / ("eval" if Split(split) is Split.TEST else "eval-val")


def _eval_config(ckpt: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    refused = sorted(CALIBRATION_KEYS & overrides.keys())
    if refused:
        raise ConfigError(f"{', '.join(refused)}: calibration keys, set by the calibration step "
                          "(python -m training.calibrate CHECKPOINT --set key=value), not by the evaluation")
    return validate_config({**ckpt["config"], **overrides})


def run_evaluation(checkpoint: str | Path, out_dir: str | Path | None = None, limit: int | None = None,
                   overrides: dict[str, Any] | None = None, split: Split | str = Split.TEST,
                   calibration_file: str | Path | None = None) -> dict[str, Any]:
    """Evaluate `checkpoint` on `split` as judged by its calibration; returns eval.json's content.

    The calibration is `calibration_file` (default: calibration.json beside the checkpoint). Writes eval.json
    and the plots to `out_dir` (default: `evaluation_dir`). `limit`: attacked images (default: the config's
    eval_limit). Raises CheckpointError, CalibrationError (missing, or made for other weights), ConfigError
    or DataError, each with one line.
    """
    split = Split(split)
    if split is Split.TRAIN:
        raise DataError("evaluate on the test or the validation split, not on training images")
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    cfg = _eval_config(ckpt, dict(overrides or {}))
    calibration_file = Path(calibration_file) if calibration_file else calibration_path(checkpoint)
    calibration = read_calibration(calibration_file, checkpoint)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = model_from_checkpoint(ckpt)
    cost = model.cost_profile()
    staged = cost.staged
    table, measure = list(calibration.table), calibration.confidence
    limit = limit if limit is not None else cfg.eval_limit
    out_dir = Path(out_dir) if out_dir else evaluation_dir(checkpoint, split)
    out_dir.mkdir(parents=True, exist_ok=True)

    if split is Split.TEST:
        x_eval, y_eval = load_tensors(cfg.dataset, cfg.data_dir, Split.TEST, config=cfg)
    else:
        x_eval, y_eval = load_tensors(cfg.dataset, cfg.data_dir, Split.VAL, cfg.val_size, cfg.seed, config=cfg)
        _warn_of_calibration_images(calibration.summary.get("robust"), limit, len(y_eval))
    clean_full = evaluate(model, x_eval, y_eval, None, cfg.eval_batch_size, f"{split.value} (clean, all)")
    x_att, y_att = x_eval[:limit], y_eval[:limit]  # the attacked subset (the strong suite is slow on CPU)
    log.info("attacking %d %s images", len(y_att), split.value)
    runs = plan_suite(cfg, model.num_exits, table, num_classes=len(ckpt["dataset"]["classes"]))
    suite = AttackSuite(model, cfg, x_att, y_att, runs, measure)
    sets = suite.run_all()
    worst_sets = suite.accuracy_sets()
    clean = find(sets, RunKind.CLEAN)
    sloth = named({r: s for r, s in sets.items() if r.kind is RunKind.DEEPSLOTH})
    curve_sets = {r.name: s.outputs for r, s in sets.items()
                  if r.kind in (RunKind.CLEAN, RunKind.MAX_AVERAGE) or (r.kind is RunKind.DEEPSLOTH and not r.own_radius)}
    sloth_runs = [{"name": r.name, "eps": r.eps, "step_size": r.step_size, "steps": cfg.slowdown_steps}
                  for r in slowdown_runs(cfg)]

    summary: dict[str, Any] = {
        "name": cfg.name, "checkpoint": str(checkpoint), "checkpoint_sha256": calibration.checkpoint_sha256,
        "calibration_file": str(calibration_file), "calibration_sha256": sha256_file(calibration_file),
        "method": cfg.method.value, "dataset": str(getattr(cfg.dataset, "value", cfg.dataset)), "split": split.value,
        "cost": cost.to_dict(), "attacked_samples": len(y_att), "split_samples": len(y_eval),
        "attack": attack_settings(cfg),
        "slowdown_attack": {**sloth_runs[0], "runs": sloth_runs},
        "anytime": {"clean_full": clean_full.accuracy, **anytime_summary(sets, worst_sets, model.num_exits)},
        "calibration": {"confidence": measure.value, "tolerance": calibration.tolerance,
                        "table": [r.to_dict() for r in table],
                        "exit_agreement_val": None if calibration.exit_agreement is None
                        else list(calibration.exit_agreement),
                        "robust": calibration.summary.get("robust")},
        "policy": {"sets": [r.name for r in worst_sets],
                   "budgets": [policy_row(entry, named(worst_sets), staged, measure) for entry in table]},
        "slowdown": {"budgets": [slowdown_row(entry, {CLEAN: clean, **sloth}, staged, measure) for entry in table]},
        "budgeted": budgeted(table, staged, curve_sets, measure),
        "timing": attack_timing(sets, len(y_att)),
    }
    if split is Split.TEST:
        summary["test_samples"] = len(y_eval)
        summary["anytime"]["clean_full_test"] = clean_full.accuracy
    summary["plots"] = [str(p) for p in plot(summary, out_dir)]
    # written last: its time stamp follows the plots', and make compares it with calibration.json's
    write_json_atomic(summary, out_dir / EVAL_NAME)
    log.info("wrote %s", out_dir / EVAL_NAME)
    return summary


def _warn_of_calibration_images(robust: dict[str, Any] | None, limit: int | None, n: int) -> None:
    """A `--split val` evaluation attacks the FIRST `limit` validation images, robust calibration the LAST ones:
    disjoint unless they add up to more than the split."""
    overlap = (limit or n) + (robust or {}).get("samples", 0) - n
    if overlap > 0 and robust:
        log.warning("robust calibration attacked %d of the %d validation images this evaluation attacks: "
                    "its validation figures are optimistic", overlap, n)


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """What the manifest's `evaluation` carries from eval.json's content `summary` (JSON types)."""
    evaluation = {k: summary[k] for k in ("split", "anytime", "attack", "slowdown_attack", "attacked_samples", "cost")}
    evaluation["budgeted"] = summary["budgeted"]["budgets"]
    evaluation["policy"] = [{k: v for k, v in row.items() if k != "by_set"} for row in summary["policy"]["budgets"]]
    evaluation["slowdown"] = summary["slowdown"]["budgets"]
    return evaluation


def read_evaluation(path: str | Path, checkpoint_sha256: str, calibration_file: str | Path) -> dict[str, Any]:
    """The `headline` of the eval.json at `path`, refused unless it was made on the test split for the weights
    whose sha256 is `checkpoint_sha256`, judged by the calibration in `calibration_file`.

    Raises EvaluationError with one line saying what to run.
    """
    path = Path(path)
    rerun = "re-run python -m training.evaluate on the checkpoint"
    if not path.is_file():
        raise EvaluationError(f"{path} does not exist; evaluate the checkpoint first (python -m training.evaluate)")
    try:
        summary = json.loads(path.read_text())
        split, weights, judged_by = summary["split"], summary["checkpoint_sha256"], summary["calibration_sha256"]
        evaluation = headline(summary)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise EvaluationError(f"{path} is malformed ({type(exc).__name__}: {str(exc)[:200]}); {rerun}") from None
    if split != Split.TEST.value:
        raise EvaluationError(f"{path} evaluates the {split} split; the manifest carries test figures")
    if weights != checkpoint_sha256:
        raise EvaluationError(f"{path} was made for other weights than the checkpoint's; {rerun}")
    if judged_by != sha256_file(calibration_file):
        raise EvaluationError(f"{path} judged another calibration than {calibration_file}; {rerun}")
    return evaluation


def main(argv: list[str] | None = None) -> int:
    """The evaluation's command line; a user error is one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: eval/ or eval-val/ beside it)")
    p.add_argument("--limit", type=int, default=None, help="attacked samples (default: config eval_limit)")
    p.add_argument("--split", choices=[Split.TEST.value, Split.VAL.value], default=Split.TEST.value,
                   help="attack test images (default) or validation images (for choosing a recipe)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an evaluation config key, e.g. --set strong_eval=false (repeatable)")
    args = p.parse_args(argv)
    try:
        summary = run_evaluation(args.checkpoint, args.out, args.limit, parse_overrides(args.overrides),
                                 split=args.split)
    except (CheckpointError, CalibrationError, DataError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    a = summary["anytime"]
    log.info("split: %s (%d attacked images)", summary["split"], summary["attacked_samples"])
    for k, mf in enumerate(summary["cost"]["staged_mflops"]):
        strong = f"  apgd-ce {a['apgd-ce'][k]:.4f}" if "apgd-ce" in a else ""
        log.info("exit %d (%.2f staged MFLOPs): clean %.4f  max-average %.4f  average %.4f%s  worst case %.4f",
                 k + 1, mf, a["clean"][k], a["max-average"][k], a["average"][k], strong, a["worst_case"][k])
    for row in summary["policy"]["budgets"]:
        log.info("policy at %.2f MFLOPs (cap exit %d): clean %.4f at %.2f MFLOPs, robust %.4f at %.2f MFLOPs "
                 "(weakest set: %s)", row["budget_mflops"], row["max_exit"], row["clean"]["accuracy"],
                 row["clean"]["mean_mflops"], row["robust_accuracy"], row["robust_mean_mflops"], row["weakest_set"])
    t = summary["timing"]
    log.info("attack time: %.1f s in all, %s s per 100 images", t["total_seconds"], t["per_100_samples"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
