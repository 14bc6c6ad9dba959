"""Evaluate a checkpoint under attack, calibrate exit thresholds, and write JSON + plots.

    python -m training.evaluate runs/<name>/checkpoint.pt [--out runs/<name>/eval] [--limit N]

Anytime setup: per-exit clean accuracy and per-exit adversarial accuracy under each single-exit
attack, the average attack and the max-average attack (PGD, docs/method.md settings).
Budgeted setup: thresholds calibrated on the validation split (never the test set) for one budget per
exit; accuracy against mean cost per sample, clean and adversarial; exit distributions for clean,
adversarial and DeepSloth inputs. Budgets and costs are staged costs (stages and heads 1..k,
early_exit/costs.py); the anytime cost is reported beside the per-exit tables. The calibration table,
the cost profile and a summary go to calibration.json beside the checkpoint (export reads it); the
checkpoint itself is never rewritten.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from early_exit.policy import ConfidenceMeasure
from training.attacks import build_attack, keep_strongest
from training.calibrate import (
    Calibration,
    ExitOutputs,
    apply_policy,
    calibrate_table,
    calibration_path,
    file_sha256,
    sweep,
    write_calibration,
)
from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from training.config import ConfigError, TrainConfig, apply_overrides
from training.data import DataError, Split, load_tensors
from training.models import MultiExitNetwork

log = logging.getLogger("training.evaluate")

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EvalResult:
    """Per-exit outputs of one (possibly attacked) dataset."""

    outputs: ExitOutputs
    inputs: torch.Tensor | None  # the (adversarial) inputs, kept when asked for

    @property
    def accuracy(self) -> list[float]:
        return [float(a) for a in self.outputs.correct().mean(axis=0)]


def evaluate(
    model: MultiExitNetwork, x: torch.Tensor, y: torch.Tensor, attack: AttackFn | None = None,
    batch_size: int = 500, desc: str = "eval", keep_inputs: bool = False, device: torch.device | None = None,
) -> EvalResult:
    """Per-exit logits of `model` on `x` (attacked batch by batch when `attack` is given)."""
    device = device or next(model.parameters()).device
    model.eval()
    logits: list[list[np.ndarray]] = [[] for _ in range(model.num_exits)]
    kept = []
    for start in tqdm(range(0, len(x), batch_size), desc=desc, leave=False, dynamic_ncols=True):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        if attack is not None:
            xb = attack(xb, yb)
        if keep_inputs:
            kept.append(xb.cpu())
        with torch.no_grad():
            for k, out in enumerate(model(xb)):
                logits[k].append(out.cpu().numpy())
    outputs = ExitOutputs.from_logits([np.concatenate(l) for l in logits], y.numpy())
    return EvalResult(outputs, torch.cat(kept) if keep_inputs else None)


def anytime(model: MultiExitNetwork, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Clean and adversarial per-exit accuracy; returns the max-average adversarial set too."""
    def attack(name: str, **kw: Any):
        a = build_attack(name, model, eps=cfg.eval_eps, step_size=cfg.eval_step_size, steps=cfg.eval_steps,
                         seed=cfg.seed, **kw)
        return a

    bs = cfg.eval_batch_size
    clean = evaluate(model, x, y, None, bs, "clean")
    singles = [evaluate(model, x, y, attack("single", exit=k), bs, f"PGD-{cfg.eval_steps} exit {k + 1}",
                        keep_inputs=True) for k in range(model.num_exits)]
    average = evaluate(model, x, y, attack("average"), bs, f"PGD-{cfg.eval_steps} average")
    x_max = torch.cat([keep_strongest(model, [s.inputs[i:i + bs] for s in singles], y[i:i + bs])
                       for i in range(0, len(y), bs)])
    max_average = evaluate(model, x_max, y, None, bs, "max-average")
    return {
        "clean": clean, "single": singles, "average": average, "max-average": max_average,
        "max_average_inputs": x_max,
    }


def _exit_histogram(exits: np.ndarray, k: int) -> list[float]:
    return [float(v) for v in np.bincount(exits, minlength=k) / max(len(exits), 1)]


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
                         "exit_distribution": _exit_histogram(res.exits, k),
                         "early_exit_rate": float((res.exits < k - 1).mean())}
        rows.append(row)
    curves = {name: sweep(outputs, staged_mflops, measure=measure) for name, outputs in sets.items()}
    return {"budgets": rows, "curves": curves}


def plot(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    mflops = summary["cost"]["staged_mflops"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in summary["budgeted"]["curves"].items():
        ax.plot([c["mean_mflops"] for c in curve], [c["accuracy"] for c in curve], marker=".", label=f"{name} (sweep)")
    ax.plot(mflops, summary["anytime"]["clean"], "s--", label="clean, capped at exit k")
    ax.plot(mflops, summary["anytime"]["max-average"], "^--", label="max-average, capped at exit k")
    ax.set_xlabel("mean staged MFLOPs per sample (stages and heads run)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{summary['name']}: accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "accuracy_vs_mflops.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    default = summary["budgeted"]["budgets"][-1]
    sets = [s for s in ("clean", "max-average", "deepsloth") if s in default]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(sets)
    idx = np.arange(len(mflops))
    for i, s in enumerate(sets):
        ax.bar(idx + i * width, default[s]["exit_distribution"], width, label=f"{s} ({default[s]['mean_mflops']:.2f} MFLOPs)")
    ax.set_xticks(idx + width * (len(sets) - 1) / 2, [f"exit {k + 1}" for k in idx])
    ax.set_ylabel("share of samples")
    ax.set_title(f"exit distribution at budget {default['budget_mflops']:.2f} MFLOPs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "exit_histogram.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def run_evaluation(checkpoint: Path, out_dir: Path | None = None, limit: int | None = None,
                   overrides: dict[str, Any] | None = None, write_calibration_file: bool = True) -> dict[str, Any]:
    """Evaluate `checkpoint`; writes eval.json + plots to `out_dir` and calibration.json beside the checkpoint."""
    ckpt = load_checkpoint(checkpoint)
    cfg = apply_overrides(TrainConfig(), {k: v for k, v in ckpt["config"].items()})
    if overrides:
        apply_overrides(cfg, overrides)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = model_from_checkpoint(ckpt)
    cost = model.cost_profile()
    staged = cost.staged
    measure = ConfidenceMeasure(cfg.confidence)
    limit = limit if limit is not None else cfg.eval_limit
    out_dir = Path(out_dir) if out_dir else Path(checkpoint).parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)

    x_val, y_val = load_tensors(cfg.dataset, cfg.data_dir, Split.VAL, cfg.val_size, cfg.seed)
    val = evaluate(model, x_val, y_val, None, cfg.eval_batch_size, "validation")
    table = calibrate_table(val.outputs, staged, cfg.calibration_tolerance, measure)

    x_test, y_test = load_tensors(cfg.dataset, cfg.data_dir, Split.TEST)
    clean_full = evaluate(model, x_test, y_test, None, cfg.eval_batch_size, "test (clean, all)")
    x_att, y_att = x_test[:limit], y_test[:limit]  # attacked subset (PGD-40 over 10k samples is slow on CPU)
    any_res = anytime(model, cfg, x_att, y_att)
    sloth = build_attack("deepsloth", model, eps=cfg.slowdown_eps, step_size=cfg.slowdown_step_size,
                         steps=cfg.slowdown_steps, seed=cfg.seed)
    deepsloth = evaluate(model, x_att, y_att, sloth, cfg.eval_batch_size, "DeepSloth")
    sets = {"clean": any_res["clean"].outputs, "max-average": any_res["max-average"].outputs,
            "deepsloth": deepsloth.outputs}

    summary: dict[str, Any] = {
        "name": cfg.name, "checkpoint": str(checkpoint), "method": cfg.method.value, "dataset": cfg.dataset,
        "cost": cost.to_dict(), "attacked_samples": len(y_att), "test_samples": len(y_test),
        "attack": {"eps": cfg.eval_eps, "step_size": cfg.eval_step_size, "steps": cfg.eval_steps,
                   "random_start": True},
        "slowdown_attack": {"eps": cfg.slowdown_eps, "step_size": cfg.slowdown_step_size,
                            "steps": cfg.slowdown_steps},
        "anytime": {
            "clean_full_test": clean_full.accuracy,
            "clean": any_res["clean"].accuracy,
            "single": [s.accuracy for s in any_res["single"]],
            "average": any_res["average"].accuracy,
            "max-average": any_res["max-average"].accuracy,
        },
        "calibration": {"confidence": measure.value, "tolerance": cfg.calibration_tolerance,
                        "table": [r.to_dict() for r in table]},
        "budgeted": budgeted(table, staged, sets, measure),
    }
    summary["plots"] = [str(p) for p in plot(summary, out_dir)]
    if write_calibration_file:
        evaluation = {k: summary[k] for k in ("anytime", "attack", "attacked_samples", "cost")}
        evaluation["budgeted"] = summary["budgeted"]["budgets"]
        path = write_calibration(Calibration(measure, cfg.calibration_tolerance, cost, tuple(table), staged[-1],
                                             file_sha256(checkpoint), evaluation), calibration_path(checkpoint))
        summary["calibration_file"] = str(path)
    # Written last, so eval.json is newer than the checkpoint it describes (make skips a finished step).
    (out_dir / "eval.json").write_text(json.dumps(summary, indent=2))
    log.info("wrote %s", out_dir / "eval.json")
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <checkpoint dir>/eval)")
    p.add_argument("--limit", type=int, default=None, help="attacked test samples (default: config eval_limit)")
    p.add_argument("--no-calibration", action="store_true",
                   help="do not write calibration.json beside the checkpoint (a look only)")
    args = p.parse_args(argv)
    try:
        summary = run_evaluation(args.checkpoint, args.out, args.limit, write_calibration_file=not args.no_calibration)
    except (CheckpointError, DataError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    a = summary["anytime"]
    for k, mf in enumerate(summary["cost"]["staged_mflops"]):
        log.info("exit %d (%.2f staged MFLOPs): clean %.4f  max-average %.4f  average %.4f", k + 1, mf, a["clean"][k],
                 a["max-average"][k], a["average"][k])
    return 0


if __name__ == "__main__":
    sys.exit(main())
