"""Checkpoint + calibration.json + eval/eval.json -> checked stage graphs + manifest.json in one folder
(`export_checkpoint`).

Export recomputes nothing the earlier steps wrote: the manifest's thresholds, cost profile and validation
agreement per exit come from calibration.json (training.calibrate), its evaluation figures from eval.json
(training.evaluate, `headline`), and the robustness check attacks with the run's configured evaluation
attack (`AttackParams.from_config`). Each input keeps its own error type (CheckpointError, CalibrationError,
EvaluationError, ConfigError).

The folder is built under a temporary sibling name and renamed into place only
after every check passed, so a failed export never leaves a half-written folder
that `build_archive` could pick up.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch

from early_exit.costs import CostProfile
from early_exit.manifest import (
    MANIFEST_NAME,
    FullGraphSpec,
    Manifest,
    ManifestError,
    exit_specs,
    load_manifest,
    manifest_from_dict,
    sha256_file,
    verify_files,
    write_json_atomic,
    write_manifest,
)
from early_exit.runner import FullGraphRunner, StagedRunner
from early_exit.transform import EvalTransform
from export.errors import ExportCheckError, ExportError
from export.onnx_export import DEFAULT_OPSET, MIN_OPSET, GraphSpec, check_graph, export_graphs, full_spec, stage_spec
from export.parity import (
    ACCURACY_TOLERANCE,
    PARITY_ATOL,
    PARITY_BATCH_SIZES,
    AttackFactory,
    AttackParams,
    check_parity,
    check_robustness,
    load_test_subset,
    max_average_pgd,
)
from training.calibrate import Calibration, CalibrationError, calibration_path, read_calibration
from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from training.evaluate import read_evaluation
from training.models import MultiExitNetwork

log = logging.getLogger(__name__)

# TorchServe's (torch-model-archiver's) rule for model names; the manifest name is the served name.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")
DEFAULT_ADV_SAMPLES = 500
REPORT_NAME = "export-parity.json"
_PLACEHOLDER_SHA = "0" * 64


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    manifest: Manifest
    report: dict[str, Any]  # the parity/robustness report (also written as export-parity.json)
    parity_json: Path | None  # the extra copy asked for (a benchmark's results folder)

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / MANIFEST_NAME


def jsonable(obj: Any) -> Any:
    """Plain JSON types from checkpoint content (numpy/torch scalars, tuples, enums)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.generic, torch.Tensor)):
        return jsonable(obj.tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if hasattr(obj, "value") and isinstance(getattr(obj, "value"), (str, int, float)):  # Enum
        return obj.value
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def versions() -> dict[str, str]:
    """Library versions that shaped the graphs, recorded in the manifest and the report."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
           "onnxruntime": ort.__version__}
    for dist in ("onnxscript", "robust-early-exit"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            log.debug("%s is not installed as a distribution", dist)
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], MultiExitNetwork]:
    """Load and rebuild; every problem with the file is a one-line CheckpointError.

    The cost profile is measured again on the rebuilt model and must match the checkpoint's.
    """
    path = Path(path)
    ckpt = load_checkpoint(path)
    missing = [k for k in ("model_name", "model_args", "state_dict", "cost", "dataset", "config") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    try:
        model = model_from_checkpoint(ckpt)
    except Exception as exc:  # unknown architecture, state_dict mismatch, bad model_args
        raise CheckpointError(f"{path}: cannot rebuild the model ({_first_line(exc)})") from exc
    dataset = ckpt["dataset"]
    if not isinstance(dataset, dict) or not {"name", "input_shape", "classes"} <= set(dataset):
        raise CheckpointError(f"{path}: 'dataset' must hold name, input_shape and classes")
    if tuple(int(s) for s in dataset["input_shape"]) != tuple(model.input_shape):
        raise CheckpointError(f"{path}: dataset input_shape {list(dataset['input_shape'])} does not match "
                              f"the model's {list(model.input_shape)}")
    if CostProfile.from_dict(ckpt["cost"]) != model.cost_profile():
        raise CheckpointError(f"{path}: its cost profile does not match the model's measured one")
    with torch.no_grad():
        num_classes = model(torch.zeros(1, *model.input_shape))[-1].shape[-1]
    if len(dataset["classes"]) != num_classes:
        raise CheckpointError(f"{path}: {len(dataset['classes'])} class names for {num_classes} outputs")
    return ckpt, model


def build_manifest(
    ckpt: dict[str, Any], calibration: Calibration, evaluation: dict[str, Any], cost: CostProfile,
    specs: Sequence[GraphSpec], name: str, version: str, opset: int, sha256: dict[str, str],
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """The manifest from checkpoint fields, the calibration, the evaluation's headline figures, the measured
    cost profile and the graph specs (`sha256`: file name -> digest), validated exactly as serving will parse it.

    Raises CalibrationError for a calibration of other exit costs, CheckpointError otherwise."""
    stage_specs = [s for s in specs if s.index is not None]
    full = next((s for s in specs if s.index is None), None)
    graphs = [{"index": s.index, "file": s.file, "sha256": sha256[s.file], "input_name": s.input_name,
               "logits_name": s.logits_name, "features_name": s.features_name} for s in stage_specs]
    if calibration.cost != cost:
        raise CalibrationError("calibration.json was computed for other exit costs than this model's; "
                               "re-run python -m training.calibrate")
    try:
        d = Manifest(
            name=name,
            version=version,
            dataset=str(ckpt["dataset"]["name"]),
            input_shape=tuple(int(s) for s in ckpt["dataset"]["input_shape"]),
            input_background=float(ckpt["dataset"].get("background", 0.0)),
            classes=tuple(str(c) for c in ckpt["dataset"]["classes"]),
            confidence=calibration.confidence,
            exits=exit_specs(cost, graphs),
            calibration=calibration.table,
            default_budget_mflops=calibration.default_budget_mflops,
            opset=opset,
            full_graph=None if full is None else FullGraphSpec(
                file=full.file, sha256=sha256[full.file], mflops=cost.full, input_name=full.input_name,
                logits_name=full.logits_name),
            exit_agreement=calibration.exit_agreement,
            input_transform=(EvalTransform.from_dict(ckpt["dataset"]["transform"])  # TransformError: a ValueError
                             if ckpt["dataset"].get("transform") is not None else None),
            versions=versions(),
            evaluation=jsonable(evaluation),
            extra=jsonable({"calibration_tolerance": calibration.tolerance, **(extra or {})}),
        ).to_dict()
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint dataset entry is malformed ({type(exc).__name__}: {_first_line(exc)})"
                              ) from exc
    try:
        return manifest_from_dict(json.loads(json.dumps(d)))  # exactly what serving will parse
    except ManifestError as exc:
        raise CheckpointError(f"checkpoint and calibration do not make a valid manifest: {exc}") from exc


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder into place; an old one (--force) is removed only after the move."""
    trash = None
    if dst.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, trash / dst.name)
    os.replace(src, dst)
    if trash is not None:
        shutil.rmtree(trash)


def export_checkpoint(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    name: str,
    version: str = "1.0",
    *,
    opset: int = DEFAULT_OPSET,
    batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
    atol: float = PARITY_ATOL,
    adv_samples: int = DEFAULT_ADV_SAMPLES,
    adv_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    data_dir: str | Path = "data",
    attack_factory: AttackFactory | None = None,
    attack_params: AttackParams | None = None,
    accuracy_tolerance: float = ACCURACY_TOLERANCE,
    calibration_file: str | Path | None = None,
    evaluation_file: str | Path | None = None,
    parity_json: str | Path | None = None,
    force: bool = False,
    threads: int = 1,
    seed: int = 0,
) -> ExportResult:
    """Export, check and describe a checkpoint.

    The calibration comes from `calibration_file` (default: calibration.json beside the checkpoint, written
    by training.calibrate for exactly these weights), the manifest's evaluation figures from `evaluation_file`
    (eval.json written by training.evaluate for these weights and this calibration; None: the manifest
    carries none, as for benchmark archives of untrained weights).

    The robustness check attacks `adv_data` if given, else the first `adv_samples` test images of the
    checkpoint's dataset under `data_dir`; `adv_samples=0` without `adv_data` skips it (logged, and
    recorded in the report). `attack_factory(model) -> attack(x, y)` defaults to max-average PGD with
    `attack_params`, by default the run's configured evaluation attack (`AttackParams.from_config`).

    Raises CheckpointError, CalibrationError, EvaluationError, ConfigError (the checkpoint's config), ExportError
    or ExportCheckError (a failed check).
    """
    if not NAME_PATTERN.match(name):
        raise ExportError(f"model name {name!r} must match {NAME_PATTERN.pattern} (TorchServe's rule)")
    if not str(version).strip():
        raise ExportError("version must not be empty")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is not supported; use {MIN_OPSET} or later")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ExportError(f"parity batch sizes must be positive, got {list(batch_sizes)}")
    checkpoint_path, out_dir = Path(checkpoint_path), Path(out_dir)
    ckpt, model = read_checkpoint(checkpoint_path)
    calibration_file = Path(calibration_file) if calibration_file else calibration_path(checkpoint_path)
    calibration = read_calibration(calibration_file, checkpoint_path)
    evaluation: dict[str, Any] = {}
    if evaluation_file is not None:
        evaluation = read_evaluation(evaluation_file, calibration.checkpoint_sha256, calibration_file)
    cost = model.cost_profile()
    num_exits = model.num_exits
    specs = [stage_spec(k, num_exits) for k in range(num_exits)] + [full_spec()]
    build_manifest(ckpt, calibration, evaluation, cost, specs, name, str(version), opset,
                   {s.file: _PLACEHOLDER_SHA for s in specs})  # fail fast, before any export work
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise ExportError(f"{out_dir} already exists; pass --force to replace it")

    attack, attack_info = None, {}
    if adv_data is not None or adv_samples > 0:
        if attack_factory is None:
            params = attack_params or AttackParams.from_config(ckpt["config"])
            attack_factory, attack_info = max_average_pgd(params), params.to_dict()
        else:
            attack_info = {"name": "custom"}
        attack = attack_factory(model)  # fails here, before any export work
        if adv_data is None:
            adv_data = load_test_subset(str(ckpt["dataset"]["name"]), str(data_dir), adv_samples, ckpt["config"])
    else:
        log.warning("robustness check skipped: no adversarial samples requested")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        export_graphs(model, staging, opset)
        for spec in specs:
            check_graph(staging / spec.file, spec, opset)
        sha256 = {s.file: sha256_file(staging / s.file) for s in specs}
        extra = {"architecture": ckpt["model_name"], "model_args": ckpt["model_args"],
                 "checkpoint_sha256": calibration.checkpoint_sha256}
        manifest = build_manifest(ckpt, calibration, evaluation, cost, specs, name, str(version), opset, sha256,
                                  extra)
        runner = StagedRunner.from_folder(manifest, staging, threads)  # the runner the server will use
        full_runner = FullGraphRunner.from_folder(manifest, staging, threads)
        parity = check_parity(model, runner, full_runner, batch_sizes, atol, seed)
        if attack is not None and adv_data is not None:
            torch.manual_seed(seed)  # attacks without their own generator stay reproducible
            robustness = check_robustness(model, runner, adv_data[0], adv_data[1], attack, accuracy_tolerance)
            robustness["attack"] = attack_info
        else:
            robustness = {"skipped": True, "passed": True, "failures": []}
        report = {
            "model": name,
            "version": str(version),
            "architecture": ckpt["model_name"],
            "dataset": ckpt["dataset"]["name"],
            "checkpoint": str(checkpoint_path),
            "checkpoint_sha256": calibration.checkpoint_sha256,
            "opset": opset,
            "versions": versions(),
            "graphs": {f: {"sha256": h, "bytes": (staging / f).stat().st_size} for f, h in sha256.items()},
            "parity": parity,
            "robustness": robustness,
            "passed": bool(parity["passed"] and robustness["passed"]),
        }
        written = write_json_atomic(report, Path(parity_json)) if parity_json is not None else None
        failures = parity["failures"] + robustness["failures"]
        if failures:
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            where = f"; see {written}" if written else ""
            raise ExportCheckError(f"export check failed: {failures[0]}{more}{where}")
        write_json_atomic(report, staging / REPORT_NAME)
        max_diff = float(max(e["max_abs_diff_logits"] for e in parity["stages"] + parity["chain"]))
        manifest = replace(manifest, extra={**manifest.extra, "parity_max_abs_diff": max_diff})
        write_manifest(manifest, staging)
        verify_files(load_manifest(staging), staging)
        _replace_dir(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("exported %s %s to %s (max |diff| %.2g)", name, version, out_dir, max_diff)
    return ExportResult(out_dir=out_dir, manifest=load_manifest(out_dir), report=report, parity_json=written)
