"""Sample test photos per exit, clean and under DeepSloth, so a reader sees which photos leave early.

    python -m bench.photo_grid CHECKPOINT [--out-prefix PREFIX] [--limit 200] [--per-exit 16]

For a calibrated checkpoint of an image folder (calibration.json beside it, training.calibrate): the first
`limit` images of the test split (the run's saved split, training.image_folders, through the evaluation
transform), the exit the deployed policy at the default budget (the calibration's last row) answers each at
(training.calibrate.apply_policy, as the evaluation judges sets), then the same images after the project's
DeepSloth attack at the config's `slowdown_eps` (built by training.evaluate's AttackSuite, with the step the
evaluation uses at that radius) and the exit again.

One PNG per exit, PREFIX-exit<k>.png (default: photos-exit<k>.png beside the checkpoint): up to `per_exit`
clean photos the policy answers at exit k (#index in the split, label -> prediction; red when wrong), then, for
those of them whose exit the attack changed, the attacked photo (#index), its new exit and prediction. The tensors the model takes are already pixels in [0, 1] (the
network normalizes with its mean/std inside), so they are shown as they are.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from early_exit.policy import BudgetEntry, ConfidenceMeasure
from training.attacked_sets import evaluate
from training.calibrate import CalibrationError, apply_policy, calibration_path, read_calibration
from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from training.config import ConfigError, TrainConfig, validate_config
from training.data import DataError, DatasetName, Split, load_tensors
from training.evaluate import AttackSuite, slowdown_runs
from training.models import MultiExitNetwork

log = logging.getLogger("bench.photo_grid")

COLUMNS = 8  # photos per row of a grid


@dataclass(frozen=True)
class PhotoExits:
    """The photos and where the policy answers them, clean and under DeepSloth (N photos, K exits)."""

    clean: torch.Tensor  # N x C x H x W in [0, 1]
    attacked: torch.Tensor  # N x C x H x W in [0, 1], within slowdown_eps of `clean` (L-inf)
    labels: np.ndarray  # N class indices
    clean_exits: np.ndarray  # N 0-based exits the policy answers at
    clean_predictions: np.ndarray  # N class indices, the answering exit's argmax
    attacked_exits: np.ndarray  # N
    attacked_predictions: np.ndarray  # N
    classes: list[str]
    staged_mflops: list[float]  # K, the staged cost of answering at each exit
    eps: float  # DeepSloth's radius


def _answers(model: MultiExitNetwork, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, entry: BudgetEntry,
             measure: ConfidenceMeasure, staged: list[float], attack=None,
             desc: str = "photos") -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Exits (N, 0-based) and predictions (N) of the policy `entry` on `x`, attacked if `attack`; and the inputs."""
    result = evaluate(model, x, y, attack, cfg.eval_batch_size, desc, keep_inputs=True)
    exits = apply_policy(result.outputs, entry.thresholds, entry.max_exit, staged, measure).exits
    predictions = result.outputs.probs[exits, np.arange(len(exits))].argmax(-1)
    assert result.inputs is not None
    return exits, predictions, result.inputs


def photo_exits(checkpoint: str | Path, limit: int = 200) -> PhotoExits:
    """The first `limit` test photos of `checkpoint`'s image folder, judged by the default-budget policy clean and
    under DeepSloth (see the module docstring). Raises CheckpointError, CalibrationError, ConfigError or DataError
    (one line), ValueError for a dataset that is not an image folder or a config without a slowdown radius."""
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    cfg = validate_config(ckpt["config"])
    if cfg.dataset is not DatasetName.IMAGEFOLDER:
        raise ValueError(f"{checkpoint} was trained on {cfg.dataset.value}, not an image folder of photos")
    if cfg.slowdown_eps <= 0:
        raise ValueError(f"{checkpoint}'s config has no DeepSloth radius (slowdown_eps {cfg.slowdown_eps})")
    calibration = read_calibration(calibration_path(checkpoint), checkpoint)
    entry, measure = calibration.table[-1], calibration.confidence  # the default budget: the table's last row
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    model = model_from_checkpoint(ckpt)
    staged = list(model.cost_profile().staged)
    x, y = load_tensors(cfg.dataset, cfg.data_dir, Split.TEST, limit=limit, config=cfg)
    clean_exits, clean_pred, _ = _answers(model, x, y, cfg, entry, measure, staged, desc="photos (clean)")
    run = next(r for r in slowdown_runs(cfg) if r.eps == cfg.slowdown_eps)
    suite = AttackSuite(model, cfg, x, y, [run], measure)
    suite.progress.close()  # only its attack is used: the evaluation's DeepSloth at this radius
    attacked_exits, attacked_pred, attacked = _answers(model, x, y, cfg, entry, measure, staged,
                                                       attack=suite.attack(run), desc="photos (DeepSloth)")
    return PhotoExits(x, attacked, y.numpy(), clean_exits, clean_pred, attacked_exits, attacked_pred,
                      list(ckpt["dataset"]["classes"]), staged, run.eps)


def _show(ax, image: torch.Tensor, title: str, colour: str) -> None:
    """One photo (C x H x W in [0, 1]) on `ax`, titled."""
    pixels = image.clamp(0, 1).permute(1, 2, 0).numpy()
    ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, cmap="gray" if pixels.shape[-1] == 1 else None,
              interpolation="nearest")
    ax.set_title(title, fontsize=7, color=colour)


def write_grids(photos: PhotoExits, out_prefix: str | Path, per_exit: int = 16) -> list[Path]:
    """One PNG per exit, `out_prefix`-exit<k>.png (k 1-based): up to `per_exit` clean photos answered at exit k,
    then the attacked versions of those whose exit changed. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    n, paths = len(photos.labels), []
    for k, mflops in enumerate(photos.staged_mflops):
        at_k = np.flatnonzero(photos.clean_exits == k)
        shown = at_k[:per_exit]
        moved = shown[photos.attacked_exits[shown] != k]
        rows_clean, rows_moved = math.ceil(len(shown) / COLUMNS), math.ceil(len(moved) / COLUMNS)
        rows = max(rows_clean + rows_moved, 1)
        fig, axes = plt.subplots(rows, COLUMNS, figsize=(1.4 * COLUMNS, 1.6 * rows + 0.6), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i, idx in enumerate(shown):
            label, pred = photos.classes[photos.labels[idx]], photos.classes[photos.clean_predictions[idx]]
            _show(axes.flat[i], photos.clean[idx], f"#{idx} {label}\n-> {pred}", "black" if label == pred else "red")
        for i, idx in enumerate(moved):
            new_exit, pred = photos.attacked_exits[idx], photos.classes[photos.attacked_predictions[idx]]
            _show(axes.flat[rows_clean * COLUMNS + i], photos.attacked[idx],
                  f"#{idx} attacked: exit {new_exit + 1}\n-> {pred}", "darkorange")
        moved_all = int((photos.attacked_exits[at_k] != k).sum())
        fig.suptitle(f"exit {k + 1} ({mflops:.2f} staged MFLOPs): {len(at_k)} of {n} test photos leave here; "
                     f"DeepSloth (eps {photos.eps:.4g}) moves {moved_all} of them"
                     + ("" if len(moved) else " (none of those shown)"), fontsize=9)
        fig.tight_layout()
        paths.append(out_prefix.parent / f"{out_prefix.name}-exit{k + 1}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
        log.info("wrote %s: %d photos at exit %d, %d of them moved by DeepSloth", paths[-1], len(at_k), k + 1,
                 moved_all)
    return paths


def photo_grids(checkpoint: str | Path, out_prefix: str | Path | None = None, limit: int = 200,
                per_exit: int = 16) -> list[Path]:
    """`photo_exits` then `write_grids`; `out_prefix` defaults to photos beside the checkpoint."""
    out_prefix = out_prefix if out_prefix is not None else Path(checkpoint).parent / "photos"
    return write_grids(photo_exits(checkpoint, limit), out_prefix, per_exit)


def main(argv: list[str] | None = None) -> int:
    """The command line; a user error is one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m bench.photo_grid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out-prefix", type=Path, default=None,
                   help="PNG paths PREFIX-exit<k>.png (default: photos beside the checkpoint)")
    p.add_argument("--limit", type=int, default=200, help="the first LIMIT test photos (default 200)")
    p.add_argument("--per-exit", type=int, default=16, help="clean photos shown per exit (default 16)")
    args = p.parse_args(argv)
    try:
        photo_grids(args.checkpoint, args.out_prefix, args.limit, args.per_exit)
    except (CheckpointError, CalibrationError, ConfigError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
