"""Build a served archive from an in-memory multi-exit model, the way the project's own tools do.

A benchmark that needs a model nobody trained (the CIFAR ResNet of `bench_compute`, a stand-in MNIST model
while developing) goes through exactly the artifacts `make train-export` makes: a checkpoint written by
`training.checkpoint.make_checkpoint`, a calibration.json beside it written by `training.calibrate`, then
`export.pipeline.export_checkpoint` (ONNX stage graphs, full.onnx, manifest, parity checks) and
`export.archive.build_archive` (the .mar with serving/handler.py). Nothing here is served by itself.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("bench.archives")
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BuiltArchive:
    checkpoint: Path
    export_dir: Path
    mar: Path


def calibrated_archive(model: Any, dataset: dict[str, Any], calib_x: Any, calib_y: Any, root: Path, name: str,
                       serve_values: dict[str, Any] | None = None, tolerance: float = 0.003,
                       thresholds: Sequence[float] | None = None, config: dict[str, Any] | None = None,
                       parity_batch_sizes: Sequence[int] = (1, 7)) -> BuiltArchive:
    """Checkpoint + calibration.json (fitted on `calib_x`/`calib_y`, or a table whose every row uses the fixed
    `thresholds`) + export + .mar under `root`. `serve_values`: ServeConfig.from_values keyword arguments."""
    import torch

    from early_exit.manifest import sha256_file
    from early_exit.policy import NEVER, BudgetEntry, ConfidenceMeasure
    from export.archive import ServeConfig, build_archive
    from export.pipeline import export_checkpoint
    from training.calibrate import (Calibration, ExitOutputs, apply_policy, calibrate_table, calibration_path,
                                    write_calibration)
    from training.checkpoint import make_checkpoint, save_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    model.eval()
    with torch.no_grad():
        logits = [out.numpy() for out in model(calib_x)]
    cost = model.cost_profile()
    outputs = ExitOutputs.from_logits(logits, np.asarray(calib_y))
    if thresholds is None:
        table = calibrate_table(outputs, cost.staged, tolerance)
    else:
        table = []
        for k in range(model.num_exits):
            th = tuple(float(t) for t in thresholds[:k]) + (NEVER,) * (model.num_exits - k)
            res = apply_policy(outputs, th, k, cost.staged)
            table.append(BudgetEntry(float(cost.staged[k]), k, th, res.accuracy, res.mean_mflops))
    ckpt_path = save_checkpoint(make_checkpoint(model, dataset, config or {"purpose": "benchmark"}), root / "model.pt")
    write_calibration(Calibration(ConfidenceMeasure.MAX_PROB, tolerance, cost, tuple(table), cost.staged[-1],
                                  sha256_file(ckpt_path), {"purpose": "benchmark", "calibration_rows": len(calib_y)}),
                      calibration_path(ckpt_path))
    result = export_checkpoint(ckpt_path, root / "export", name, "1.0", adv_samples=0,
                               batch_sizes=tuple(parity_batch_sizes), force=True)
    mar = build_archive(result.out_dir, root / "store", name, "1.0", REPO / "serving" / "handler.py",
                        serve_config=ServeConfig.from_values(**(serve_values or {})), force=True)
    log.info("built %s (staged MFLOPs %s)", mar, [round(c, 4) for c in cost.staged])
    return BuiltArchive(ckpt_path, result.out_dir, mar)
