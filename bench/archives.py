"""The benchmarks' archives: built from an in-memory model, unpacked, and copied with another model-config.yaml.

A benchmark that needs a model nobody trained (the CIFAR ResNet of `bench_compute`, a stand-in MNIST model
while developing) goes through exactly the artifacts `make train-export` makes (`calibrated_archive`): a
checkpoint written by `training.checkpoint.make_checkpoint`, a calibration.json beside it written by
`training.calibrate`, then `export.pipeline.export_checkpoint` (ONNX stage graphs, full.onnx, manifest, parity
checks) and `export.archive.build_archive` (the .mar with serving/handler.py). An archive's model-config.yaml
is read and written only through `export.archive.ServeConfig`, so a benchmark sees exactly what TorchServe and
the handler are given.
"""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from early_exit.manifest import Manifest, load_manifest, verify_files
from export.archive import MODEL_CONFIG_NAME, ServeConfig, build_archive
from serving.options import ServingMode

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


def unpack(archive: Path, folder: Path) -> tuple[Manifest, ServeConfig]:
    """Extract a .mar into `folder`; its manifest (every file checked against its hash) and its model-config.yaml.

    Raises ManifestError (early_exit.manifest) for a bad manifest or file, FileNotFoundError when the archive
    holds no model-config.yaml, ExportError when that does not validate (ServeConfig.read)."""
    with zipfile.ZipFile(archive) as z:
        z.extractall(folder)
    manifest = load_manifest(folder)
    verify_files(manifest, folder)
    return manifest, ServeConfig.read(folder / MODEL_CONFIG_NAME)


def rewrite_model_config(archive: Path, out: Path, edit: Callable[[ServeConfig], ServeConfig]) -> Path:
    """A copy of `archive` at `out` whose model-config.yaml is edit(its config); every other entry unchanged.
    Raises KeyError when the archive holds no model-config.yaml, ExportError when it does not validate."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        config = edit(ServeConfig.from_yaml(src.read(MODEL_CONFIG_NAME)))
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == MODEL_CONFIG_NAME:
                data = config.to_yaml().encode()
            dst.writestr(item, data)
    return out


def full_graph_only(config: ServeConfig) -> ServeConfig:
    """`config` with handler.mode full_graph_only: the same server answering from full.onnx."""
    handler = config.handler.model_copy(update={"mode": ServingMode.FULL_GRAPH_ONLY})
    return config.model_copy(update={"handler": handler})


def full_graph_archive(archive: Path, out: Path) -> Path:
    """A copy of the archive (same model name) serving in handler mode full_graph_only."""
    return rewrite_model_config(archive, out, full_graph_only)
