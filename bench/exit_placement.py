"""Where the exits go: trained exit placements compared on the validation split, against the photo targets.

    python -m bench.exit_placement --run LABEL=RUN_DIR [--run LABEL=RUN_DIR ...] [--trained-on TEXT]
                                   [--out cifar10-jpeg-quick-exits]

Each RUN_DIR holds a trained checkpoint.pt, its calibration.json (python -m training.calibrate) and
eval-val/eval.json (python -m training.evaluate RUN_DIR/checkpoint.pt --split val --limit 500: the first 500
validation images are attacked; robust calibration attacked the last 250, so the two do not overlap). The
test split is never read: this is for choosing, and the preset's test figures come from `make bench-train`.

Writes bench/results/<out>.json and <out>.png: per placement its recipe (from the checkpoint's config), each
exit's staged cost as a fraction of the full network, clean accuracy (all validation images) and strong-suite
worst case, the deployed policy at the default budget (robust accuracy and its cost under attack, cost on clean
images), and the photo preset's targets judged on these validation figures (bench.train_targets.PhotoTargets,
neokd's rows only: the adv comparison needs bench-train's paired run). `--trained-on` says where the
checkpoints were trained when that was not this machine (it goes into the JSON beside this machine's header,
which is where calibration and evaluation ran).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from bench.bench_train import RESULTS, evaluation_figures
from bench.common import result_header
from bench.train_targets import PhotoTargets
from training.checkpoint import load_checkpoint
from training.data import Split
from training.evaluate import EVAL_NAME, evaluation_dir

log = logging.getLogger("bench.exit_placement")

RECIPE_KEYS = ("model", "model_args", "small_input_stem", "exits", "head", "method", "iterations",
               "batch_size", "attack", "attack_steps", "eps", "gamma", "seed", "device")


def recipe(checkpoint: Path) -> dict[str, Any]:
    """What trained `checkpoint`: the RECIPE_KEYS of its saved config (a nanoGPT-style checkpoint holds it)."""
    config = load_checkpoint(checkpoint)["config"]
    return {k: config.get(k) for k in RECIPE_KEYS}


def placement_row(label: str, run_dir: Path, targets: PhotoTargets) -> dict[str, Any]:
    """One placement's figures from RUN_DIR's checkpoint and eval-val/eval.json.

    Raises FileNotFoundError for a missing file and ValueError for an evaluation of another split."""
    checkpoint = run_dir / "checkpoint.pt"
    eval_json = evaluation_dir(checkpoint, Split.VAL) / EVAL_NAME
    ev = json.loads(eval_json.read_text())
    if ev.get("split") != Split.VAL.value:
        raise ValueError(f"{eval_json} evaluated the {ev.get('split')!r} split, not {Split.VAL.value!r}")
    figures = evaluation_figures(ev)
    full = ev["cost"]["anytime_mflops"][-1]
    policy = figures["policy_default_budget"]
    return {
        "label": label, "run_dir": str(run_dir), "recipe": recipe(checkpoint),
        "full_network_mflops": full,
        "exits": [{"exit": e["exit"], "staged_mflops": e["staged_mflops"],
                   "cost_over_full_network": e["staged_mflops"] / full, "clean_acc": e["clean_acc"],
                   "strong_worst_case": e["adv_acc"]["strong_worst_case"],
                   "intervals": {k: e["intervals"][k] for k in ("clean_acc", "strong_worst_case")}}
                  for e in figures["exits"]],
        "policy_default_budget": policy,
        "policy_by_budget": figures["policy_by_budget"],
        "samples": figures["samples"],
        "val_targets": {name: j.to_dict() for name, j in targets.judge_one(figures).items()},
    }


def plot(rows: Sequence[dict[str, Any]], targets: PhotoTargets, path: Path) -> Path:
    """Two panels, one point per placement: the policy's accuracy against its mean cost (fraction of the full
    network) on clean and on attacked validation images, with the cost targets as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    panels = (("clean", "clean_cost_over_full_network", "clean_accuracy", targets.policy_clean_cost),
              ("attacked (worst set)", "robust_cost_over_full_network", "robust_accuracy", targets.policy_robust_cost))
    for ax, (title, cost_key, acc_key, cost_target) in zip(axes, panels):
        for row in rows:
            p = row["policy_default_budget"]
            ax.scatter(p[cost_key], p[acc_key], label=row["label"])
            ax.annotate(row["label"].split(":")[0], (p[cost_key], p[acc_key]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
        ax.axvline(cost_target, ls="--", c="grey",
                   label=f"cost targets: <= {targets.policy_clean_cost} clean, <= {targets.policy_robust_cost} attacked")
        ax.set_xlim(0, max(1.05, *(r["policy_default_budget"][cost_key] + 0.05 for r in rows)))
        ax.set(title=f"policy at the default budget, {title}", xlabel="mean staged cost / full network",
               ylabel="accuracy (validation)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m bench.exit_placement", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=RUN_DIR")
    p.add_argument("--trained-on", default="", help="where the checkpoints were trained, if not here")
    p.add_argument("--out", default="cifar10-jpeg-quick-exits", help="result name under bench/results/")
    args = p.parse_args(argv)
    targets = PhotoTargets()
    rows = []
    for item in args.run:
        label, sep, run_dir = item.partition("=")
        if not sep:
            p.error(f"--run {item!r} is not LABEL=RUN_DIR")
        rows.append(placement_row(label, Path(run_dir), targets))
    png = plot(rows, targets, RESULTS / f"{args.out}.png")
    result = {**result_header("exit-placement", seed=rows[0]["recipe"]["seed"],
                              note="calibration and validation-split evaluation ran on this machine"),
              "trained_on": args.trained_on, "targets_source": targets.source, "placements": rows,
              "plot": png.name}
    out = RESULTS / f"{args.out}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s and %s", out, png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
