"""Evaluate a checkpoint under attack, calibrate exit thresholds, and write JSON + plots.

    python -m training.evaluate runs/<name>/checkpoint.pt [--out DIR] [--limit N] [--split test|val]
                                [--set key=value ...] [--no-calibration]

Thresholds are calibrated on the validation split, one row per exit's staged cost (clean images; with
`calibration_robust_tolerance` also the last `calibration_attack_limit` validation images attacked, see
`calibration_attack_sets`). Then the first `limit` images of the evaluated split (test by default;
`--split val` attacks validation images, so recipe choices never look at test) are attacked, every attack
building one adversarial set:

- the papers' protocol, kept for comparability: PGD-`eval_steps` on each exit, the average attack and
  the max-average attack (docs/method.md, "Attacks");
- per exit, AutoAttack's APGD-CE and APGD-T (`strong_eval`; "Evaluating robustness so that an attacker
  would agree"). APGD-T runs, as in AutoAttack, only on the images every earlier attack on that exit
  left correct, so its figure is cumulative: the worst case of all per-exit attacks up to it;
- the adaptive attack on the deployed policy (`strong_eval`): for each calibrated budget row and each
  exit k it may answer at, a set driving the policy to a wrong answer at or before k;
- DeepSloth at the accuracy attacks' radius `eval_eps` (and, when the config's `slowdown_eps` differs,
  again at that radius, DeepSloth's own setting, reported beside it).

Robust accuracy is a per-sample worst case: of exit k, over every set at radius <= eval_eps evaluated at
exit k; of the policy at a budget row, over every such set judged by the policy
(`training.calibrate.apply_policy`) at that row, with the mean staged cost of the sets an attacker
would pick (a wrong answer first, then the most expensive one). Costs and budgets are staged costs
(early_exit/costs.py). eval.json and the plots go to `--out`; the calibration table, the cost profile
and the headline figures go to calibration.json beside the checkpoint (export copies its `evaluation`
into the manifest). A `--split val` run writes no calibration.json: the manifest carries test figures.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import yaml
from tqdm import tqdm

from early_exit.manifest import sha256_file
from early_exit.policy import BudgetEntry, ConfidenceMeasure
from training.attacks import build_attack, keep_strongest
from training.calibrate import (
    NEVER,
    Calibration,
    ExitOutputs,
    RobustConstraint,
    apply_policy,
    agreement_with_last_exit,
    calibrate_table,
    calibration_path,
    judge_sets,
    sweep,
    write_calibration,
)
from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from training.config import ConfigError, TrainConfig, apply_overrides
from training.data import DataError, Split, load_tensors
from training.models import MultiExitNetwork

log = logging.getLogger("training.evaluate")

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DEEPSLOTH = "deepsloth"


@dataclass
class EvalResult:
    """Per-exit outputs of one (possibly attacked) dataset, the time it took, and its radius."""

    outputs: ExitOutputs
    inputs: torch.Tensor | None  # the (adversarial) inputs, kept when asked for
    seconds: float = 0.0
    eps: float = 0.0  # the L-inf radius its images lie in around the clean ones

    @property
    def accuracy(self) -> list[float]:
        return [float(a) for a in self.outputs.correct().mean(axis=0)]


def evaluate(
    model: MultiExitNetwork, x: torch.Tensor, y: torch.Tensor, attack: AttackFn | None = None,
    batch_size: int = 500, desc: str = "eval", keep_inputs: bool = False, device: torch.device | None = None,
    only: np.ndarray | None = None,
) -> EvalResult:
    """Per-exit logits of `model` on `x`, attacked batch by batch when `attack` is given.

    `only` (bool per sample): attack just those samples; the others are evaluated clean.
    """
    device = device or next(model.parameters()).device
    model.eval()
    logits: list[list[np.ndarray]] = [[] for _ in range(model.num_exits)]
    kept = []
    start_time = time.perf_counter()
    for start in tqdm(range(0, len(x), batch_size), desc=desc, leave=False, dynamic_ncols=True):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        if attack is not None:
            rows = torch.arange(len(xb)) if only is None else torch.from_numpy(
                np.flatnonzero(only[start:start + batch_size]))
            if len(rows):
                xb = xb.clone()
                xb[rows] = attack(xb[rows], yb[rows])
        if keep_inputs:
            kept.append(xb.cpu())
        with torch.no_grad():
            for k, out in enumerate(model(xb)):
                logits[k].append(out.cpu().numpy())
    outputs = ExitOutputs.from_logits([np.concatenate(l) for l in logits], y.numpy())
    return EvalResult(outputs, torch.cat(kept) if keep_inputs else None, time.perf_counter() - start_time)


# --- the attack suite ---------------------------------------------------------------------------------------

def exit_name(attack: str, k: int) -> str:
    return f"{attack}/exit{k + 1}"


def policy_set_name(entry: BudgetEntry, k: int) -> str:
    return f"policy/cap{entry.max_exit + 1}/exit{k + 1}"


def deepsloth_name(eps: float, eval_eps: float) -> str:
    return DEEPSLOTH if eps == eval_eps else f"{DEEPSLOTH}@{eps:.4g}"


def apgd_settings(cfg: TrainConfig) -> dict[str, Any]:
    """APGD's arguments in every evaluation run (the strong suite and the calibration attack), exit aside."""
    return dict(eps=cfg.eval_eps, step_size=cfg.eval_step_size, steps=cfg.apgd_steps, restarts=cfg.apgd_restarts)


def policy_attack_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The policy attack's arguments in every evaluation run, its target (exit, thresholds, cap) aside."""
    return dict(eps=cfg.eval_eps, step_size=cfg.eval_step_size, steps=cfg.policy_attack_steps,
                kappa=cfg.policy_attack_kappa, restarts=cfg.policy_attack_restarts)


def slowdown_settings(cfg: TrainConfig) -> list[dict[str, Any]]:
    """DeepSloth runs: at the accuracy attacks' radius eval_eps, and at the config's slowdown_eps if it differs.

    `slowdown_step_size` is the step for `slowdown_eps` (DeepSloth: 0.002 at 8/255, 30 steps); at another
    radius the step keeps the same share of the radius, so the attack can still cross its ball.
    """
    ratio = cfg.slowdown_step_size / cfg.slowdown_eps if cfg.slowdown_eps > 0 else None
    runs = []
    for eps in [cfg.eval_eps] + ([cfg.slowdown_eps] if cfg.slowdown_eps != cfg.eval_eps else []):  # headline first
        step = cfg.slowdown_step_size if ratio is None or eps == cfg.slowdown_eps else ratio * eps
        runs.append({"name": deepsloth_name(eps, cfg.eval_eps), "eps": eps, "step_size": step,
                     "steps": cfg.slowdown_steps})
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


def worst_case_correct(sets: dict[str, EvalResult]) -> np.ndarray:
    """N x K: is exit k right on sample n under every set."""
    return np.logical_and.reduce([s.outputs.correct() for s in sets.values()])


class AttackSuite:
    """Runs the attacks of one evaluation in order and keeps every set, by name (see the module docstring)."""

    def __init__(self, model: MultiExitNetwork, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor,
                 table: Sequence[BudgetEntry], measure: ConfidenceMeasure) -> None:
        self.model, self.cfg, self.x, self.y = model, cfg, x, y
        self.table, self.measure = list(table), measure
        self.sets: dict[str, EvalResult] = {}
        k = model.num_exits
        policy = policy_targets(self.table) if cfg.strong_eval else []
        total = 1 + k + 2 + len(slowdown_settings(cfg)) + (2 * k + len(policy) if cfg.strong_eval else 0)
        self.progress = tqdm(total=total, desc="attack suite", dynamic_ncols=True)

    def _attack(self, name: str, **kw: Any):
        return build_attack(name, self.model, seed=self.cfg.seed, **kw)

    def run(self, name: str, attack: AttackFn | None, eps: float, keep_inputs: bool = False,
            only: np.ndarray | None = None, x: torch.Tensor | None = None) -> EvalResult:
        """Evaluate `x` (default: the clean images) attacked by `attack`; keep the set as `name`."""
        self.progress.set_postfix_str(name)
        result = evaluate(self.model, self.x if x is None else x, self.y, attack, self.cfg.eval_batch_size, name,
                          keep_inputs, only=only)
        result.eps = eps
        self.sets[name] = result
        self.progress.update()
        return result

    def accuracy_sets(self) -> dict[str, EvalResult]:
        """The sets whose images lie within the accuracy attacks' radius (every set a worst case may use)."""
        return {n: s for n, s in self.sets.items() if s.eps <= self.cfg.eval_eps + 1e-12}

    def papers_protocol(self) -> None:
        """Clean, PGD on each exit, the average attack, and max-average picked from the single-exit sets."""
        cfg, bs = self.cfg, self.cfg.eval_batch_size
        pgd = dict(eps=cfg.eval_eps, step_size=cfg.eval_step_size, steps=cfg.eval_steps)
        self.run("clean", None, 0.0)
        singles = [self.run(exit_name("single", k), self._attack("single", exit=k, **pgd), cfg.eval_eps,
                            keep_inputs=True) for k in range(self.model.num_exits)]
        self.run("average", self._attack("average", **pgd), cfg.eval_eps)
        start = time.perf_counter()
        x_max = torch.cat([keep_strongest(self.model, [s.inputs[i:i + bs] for s in singles], self.y[i:i + bs])
                           for i in range(0, len(self.y), bs)])
        picking = time.perf_counter() - start
        for s in singles:
            s.inputs = None  # max-average holds what it needs; free the memory
        self.run("max-average", None, cfg.eval_eps, x=x_max).seconds += picking

    def deepsloth(self) -> None:
        for run in slowdown_settings(self.cfg):
            attack = self._attack(DEEPSLOTH, eps=run["eps"], step_size=run["step_size"], steps=run["steps"])
            self.run(run["name"], attack, run["eps"])

    def apgd(self) -> None:
        """APGD-CE on every exit; then APGD-T on every exit, on the images still right there under every set."""
        cfg = self.cfg
        common = apgd_settings(cfg)
        for k in range(self.model.num_exits):
            self.run(exit_name("apgd-ce", k), self._attack("apgd-ce", exit=k, **common), cfg.eval_eps)
        for k in range(self.model.num_exits):
            survivors = worst_case_correct(self.accuracy_sets())[:, k]
            attack = self._attack("apgd-t", exit=k, target_classes=cfg.apgd_target_classes, **common)
            self.run(exit_name("apgd-t", k), attack, cfg.eval_eps, only=survivors)

    def policy(self) -> None:
        cfg = self.cfg
        for entry, k in policy_targets(self.table):
            attack = self._attack("policy", exit=k, thresholds=entry.thresholds, max_exit=entry.max_exit,
                                  measure=self.measure, **policy_attack_settings(cfg))
            self.run(policy_set_name(entry, k), attack, cfg.eval_eps)

    def run_all(self) -> dict[str, EvalResult]:
        self.papers_protocol()
        self.deepsloth()
        if self.cfg.strong_eval:
            self.apgd()
            self.policy()
        self.progress.close()
        return self.sets


# --- robust calibration -------------------------------------------------------------------------------------

CONFIDENT = 1.0 - 1e-6  # a threshold no attack reaches: the policy attack aimed at it keeps raising confidence


def calibration_attack_sets(model: MultiExitNetwork, cfg: TrainConfig, x_val: torch.Tensor, y_val: torch.Tensor,
                            split: Split, limit: int | None, measure: ConfidenceMeasure) -> tuple[ExitOutputs, ...]:
    """Clean and attacked outputs of the last `calibration_attack_limit` validation images, for robust calibration.

    Per exit k, two sets: the policy attack (training/attacks/policy.py) aimed at k alone (every other exit's
    threshold is above 1, exit k's is `CONFIDENT`, so the attack makes exit k wrong and then as confident as it
    can; the last exit: wrong), and APGD-CE on exit k (the suite's strongest untargeted attack, whose wrong
    answers are often confident too). These sets do not depend on the thresholds being fitted, so one run
    serves every candidate; the evaluation afterwards attacks the chosen thresholds adaptively. A `--split val`
    evaluation attacks the FIRST `limit` validation images: the two are disjoint unless they add up to more
    than the split.
    """
    n = min(cfg.calibration_attack_limit, len(y_val))
    if split is Split.VAL and (limit or len(y_val)) + n > len(y_val):
        log.warning("robust calibration attacks %d of the %d validation images this evaluation also attacks: "
                    "its validation figures are optimistic", (limit or len(y_val)) + n - len(y_val), len(y_val))
    x, y = x_val[-n:], y_val[-n:]
    k = model.num_exits
    sets = [evaluate(model, x, y, None, cfg.eval_batch_size, "calibration (clean)").outputs]
    for e in range(k):
        thresholds = [NEVER] * k
        if e < k - 1:
            thresholds[e] = CONFIDENT
        attack = build_attack("policy", model, exit=e, thresholds=thresholds, max_exit=k - 1, measure=measure,
                              seed=cfg.seed, **policy_attack_settings(cfg))
        sets.append(evaluate(model, x, y, attack, cfg.eval_batch_size, f"calibration (policy, exit {e + 1})").outputs)
        attack = build_attack("apgd-ce", model, exit=e, seed=cfg.seed, **apgd_settings(cfg))
        sets.append(evaluate(model, x, y, attack, cfg.eval_batch_size, f"calibration (apgd-ce, exit {e + 1})").outputs)
    return tuple(sets)


def robust_calibration_summary(robust: RobustConstraint | None, table: Sequence[BudgetEntry], cfg: TrainConfig,
                               measure: ConfidenceMeasure, seconds: float = 0.0) -> dict[str, Any] | None:
    """Per budget row, the calibration attack's validation robust accuracy: of the chosen thresholds and of
    always answering at the row's deepest allowed exit (the reference the tolerance is taken from)."""
    if robust is None:
        return None
    k = len(table[-1].thresholds)
    return {"tolerance": robust.tolerance, "samples": len(robust.sets[0].targets), "attack_seconds": round(seconds, 3),
            "attacks": {"policy (each exit alone, confident and wrong)": {
                "eps": cfg.eval_eps, "steps": cfg.policy_attack_steps, "restarts": cfg.policy_attack_restarts},
                "apgd-ce (each exit)": {"eps": cfg.eval_eps, "steps": cfg.apgd_steps, "restarts": cfg.apgd_restarts}},
            "rows": [{"budget_mflops": e.budget_mflops,
                      "val_robust_accuracy": robust.accuracy(e.thresholds, e.max_exit, measure),
                      "reference": robust.accuracy([NEVER] * k, e.max_exit, measure)} for e in table]}


# --- summaries ----------------------------------------------------------------------------------------------

def _histogram(exits: np.ndarray, k: int) -> list[float]:
    return [float(v) for v in np.bincount(exits, minlength=k) / max(len(exits), 1)]


def anytime_summary(sets: dict[str, EvalResult], worst_sets: dict[str, EvalResult], k: int) -> dict[str, Any]:
    """Per-exit accuracy under each attack and the per-sample worst case (1 entry per exit)."""
    acc = {name: s.accuracy for name, s in sets.items()}
    papers = {n: worst_sets[n] for n in ("clean", "average", "max-average",
                                         *(exit_name("single", j) for j in range(k)))}
    summary: dict[str, Any] = {
        "clean": acc["clean"], "single": [acc[exit_name("single", j)] for j in range(k)],
        "average": acc["average"], "max-average": acc["max-average"],
        "pgd_worst_case": [float(v) for v in worst_case_correct(papers).mean(axis=0)],
    }
    if exit_name("apgd-ce", 0) in sets:
        names = list(worst_sets)
        summary["apgd-ce"] = [acc[exit_name("apgd-ce", j)][j] for j in range(k)]
        summary["apgd-t"] = []  # cumulative: APGD-T ran on the survivors of every earlier set
        for j in range(k):
            upto = names[:names.index(exit_name("apgd-t", j)) + 1]
            summary["apgd-t"].append(float(worst_case_correct({n: worst_sets[n] for n in upto})[:, j].mean()))
    summary["worst_case"] = [float(v) for v in worst_case_correct(worst_sets).mean(axis=0)]
    summary["worst_case_sets"] = list(worst_sets)
    return summary


def policy_row(entry: BudgetEntry, sets: dict[str, EvalResult], staged: Sequence[float],
               measure: ConfidenceMeasure) -> dict[str, Any]:
    """The policy of one budget row judged on every set: its accuracy on each, and the per-sample worst case.

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
        "clean": {**by_set["clean"], "exit_distribution": _histogram(exits[names.index("clean")], k)},
        "robust_accuracy": float(correct.all(axis=0).mean()),
        "robust_mean_mflops": float(cost[pick, np.arange(n)].mean()),
        "robust_exit_distribution": _histogram(exits[pick, np.arange(n)], k),
        "weakest_set": min(by_set, key=lambda name: by_set[name]["accuracy"]),
        "by_set": by_set,
    }


def slowdown_row(entry: BudgetEntry, sets: dict[str, EvalResult], staged: Sequence[float],
                 measure: ConfidenceMeasure) -> dict[str, Any]:
    """Early-exit rate (share answering before the row's deepest allowed exit) and mean staged cost per set."""
    k = len(staged)
    row: dict[str, Any] = {"budget_mflops": entry.budget_mflops, "max_exit": entry.max_exit + 1}
    for name, s in sets.items():
        r = apply_policy(s.outputs, entry.thresholds, entry.max_exit, staged, measure)
        row[name] = {"early_exit_rate": float((r.exits < entry.max_exit).mean()), "mean_mflops": r.mean_mflops,
                     "accuracy": r.accuracy, "exit_distribution": _histogram(r.exits, k)}
    clean = row["clean"]
    row["cost_rise"] = {n: row[n]["mean_mflops"] - clean["mean_mflops"] for n in sets if n != "clean"}
    return row


def budgeted(
    table, staged_mflops: list[float], sets: dict[str, ExitOutputs], measure: ConfidenceMeasure,
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


def timing_summary(sets: dict[str, EvalResult], n: int) -> dict[str, Any]:
    """Seconds per set, and per attack family per 100 attacked samples."""
    groups: dict[str, float] = {}
    for name, s in sets.items():
        family = name.split("/")[0].split("@")[0]
        family = "pgd" if family in ("single", "average", "max-average") else family
        groups[family] = groups.get(family, 0.0) + s.seconds
    total = sum(groups.values())
    return {"seconds": {name: round(s.seconds, 3) for name, s in sets.items()},
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
    settings: dict[str, Any] = {"eps": cfg.eval_eps, "step_size": cfg.eval_step_size, "steps": cfg.eval_steps,
                                "random_start": True, "strong_eval": cfg.strong_eval}
    if cfg.strong_eval:
        settings["apgd"] = {"steps": cfg.apgd_steps, "restarts": cfg.apgd_restarts,
                            "target_classes": cfg.apgd_target_classes}
        settings["policy"] = {"steps": cfg.policy_attack_steps, "restarts": cfg.policy_attack_restarts,
                              "kappa": cfg.policy_attack_kappa, "optimizer": "apgd"}
    return settings


def check_eval_config(cfg: TrainConfig) -> None:
    """The strong suite's keys are plain ints/floats in the config; refuse values that would attack nothing."""
    for key in ("apgd_steps", "apgd_restarts", "apgd_target_classes", "policy_attack_steps", "policy_attack_restarts"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)!r}")
    if cfg.policy_attack_kappa <= 0:
        raise ConfigError(f"policy_attack_kappa must be > 0, got {cfg.policy_attack_kappa!r}")


def run_evaluation(checkpoint: Path, out_dir: Path | None = None, limit: int | None = None,
                   overrides: dict[str, Any] | None = None, write_calibration_file: bool = True,
                   split: Split | str = Split.TEST) -> dict[str, Any]:
    """Evaluate `checkpoint` on `split`; writes eval.json + plots to `out_dir` (default: eval/ or eval-val/ beside
    the checkpoint) and, for the test split, calibration.json beside the checkpoint."""
    split = Split(split)
    if split is Split.TRAIN:
        raise DataError("evaluate on the test or the validation split, not on training images")
    ckpt = load_checkpoint(checkpoint)
    cfg = apply_overrides(TrainConfig(), {k: v for k, v in ckpt["config"].items()})
    if overrides:
        apply_overrides(cfg, overrides)
    check_eval_config(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = model_from_checkpoint(ckpt)
    cost = model.cost_profile()
    staged = cost.staged
    measure = ConfidenceMeasure(cfg.confidence)
    limit = limit if limit is not None else cfg.eval_limit
    out_dir = Path(out_dir) if out_dir else Path(checkpoint).parent / ("eval" if split is Split.TEST else "eval-val")
    out_dir.mkdir(parents=True, exist_ok=True)

    x_val, y_val = load_tensors(cfg.dataset, cfg.data_dir, Split.VAL, cfg.val_size, cfg.seed)
    val = evaluate(model, x_val, y_val, None, cfg.eval_batch_size, "validation")
    robust, robust_seconds = None, 0.0
    if cfg.calibration_robust_tolerance is not None:
        start = time.perf_counter()
        robust = RobustConstraint(calibration_attack_sets(model, cfg, x_val, y_val, split, limit, measure),
                                  cfg.calibration_robust_tolerance)
        robust_seconds = time.perf_counter() - start
    table = calibrate_table(val.outputs, staged, cfg.calibration_tolerance, measure, robust)
    # what the server's audit of early answers should see: agreement with the last exit, at the default budget
    agreement = agreement_with_last_exit(val.outputs, table[-1], measure)

    if split is Split.TEST:
        x_eval, y_eval = load_tensors(cfg.dataset, cfg.data_dir, Split.TEST)
        clean_full = evaluate(model, x_eval, y_eval, None, cfg.eval_batch_size, "test (clean, all)")
    else:
        x_eval, y_eval, clean_full = x_val, y_val, val
    x_att, y_att = x_eval[:limit], y_eval[:limit]  # the attacked subset (the strong suite is slow on CPU)
    log.info("attacking %d %s images", len(y_att), split.value)
    suite = AttackSuite(model, cfg, x_att, y_att, table, measure)
    sets = suite.run_all()
    worst_sets = suite.accuracy_sets()
    sloth = {n: s for n, s in sets.items() if n.startswith(DEEPSLOTH)}

    summary: dict[str, Any] = {
        "name": cfg.name, "checkpoint": str(checkpoint), "method": cfg.method.value,
        "dataset": str(getattr(cfg.dataset, "value", cfg.dataset)), "split": split.value,
        "cost": cost.to_dict(), "attacked_samples": len(y_att), "split_samples": len(y_eval),
        "attack": attack_settings(cfg),
        "slowdown_attack": {**slowdown_settings(cfg)[0], "runs": slowdown_settings(cfg)},
        "anytime": {"clean_full": clean_full.accuracy, **anytime_summary(sets, worst_sets, model.num_exits)},
        "calibration": {"confidence": measure.value, "tolerance": cfg.calibration_tolerance,
                        "table": [r.to_dict() for r in table], "exit_agreement_val": agreement,
                        "robust": robust_calibration_summary(robust, table, cfg, measure, robust_seconds)},
        "policy": {"sets": list(worst_sets),
                   "budgets": [policy_row(entry, worst_sets, staged, measure) for entry in table]},
        "slowdown": {"budgets": [slowdown_row(entry, {"clean": sets["clean"], **sloth}, staged, measure)
                                 for entry in table]},
        "budgeted": budgeted(table, staged, {n: sets[n].outputs for n in ("clean", "max-average", DEEPSLOTH)},
                             measure),
        "timing": timing_summary(sets, len(y_att)),
    }
    if split is Split.TEST:
        summary["test_samples"] = len(y_eval)
        summary["anytime"]["clean_full_test"] = clean_full.accuracy
    summary["plots"] = [str(p) for p in plot(summary, out_dir)]
    if write_calibration_file and split is Split.TEST:
        path = write_calibration(Calibration(measure, cfg.calibration_tolerance, cost, tuple(table), staged[-1],
                                             sha256_file(checkpoint), headline(summary), tuple(agreement)),
                                 calibration_path(checkpoint))
        summary["calibration_file"] = str(path)
    elif write_calibration_file:
        log.info("a --split val evaluation writes no calibration.json: the manifest carries test figures")
    # Written last, so eval.json is newer than the checkpoint it describes (make skips a finished step).
    (out_dir / "eval.json").write_text(json.dumps(summary, indent=2))
    log.info("wrote %s", out_dir / "eval.json")
    return summary


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """What calibration.json's `evaluation` (and so the manifest) carries."""
    evaluation = {k: summary[k] for k in ("split", "anytime", "attack", "slowdown_attack", "attacked_samples", "cost")}
    evaluation["budgeted"] = summary["budgeted"]["budgets"]
    evaluation["policy"] = [{k: v for k, v in row.items() if k != "by_set"} for row in summary["policy"]["budgets"]]
    evaluation["slowdown"] = summary["slowdown"]["budgets"]
    return evaluation


def _parse_sets(items: list[str]) -> dict[str, Any]:
    values = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not key=value")
        key, raw = item.split("=", 1)
        values[key.strip()] = yaml.safe_load(raw)
    return values


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("--no-calibration", action="store_true",
                   help="do not write calibration.json beside the checkpoint (a look only)")
    args = p.parse_args(argv)
    try:
        summary = run_evaluation(args.checkpoint, args.out, args.limit, _parse_sets(args.overrides),
                                 write_calibration_file=not args.no_calibration, split=args.split)
    except (CheckpointError, DataError, ConfigError) as exc:
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
