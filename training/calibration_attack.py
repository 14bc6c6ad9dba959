"""The calibration step on a checkpoint (`calibrate_checkpoint`, run by `python -m training.calibrate`).

It loads the checkpoint, runs the model on its validation split and, with `calibration_robust_tolerance`
set, attacks the last `calibration_attack_limit` validation images (`calibration_attack_sets`); the numpy
core of training/calibrate.py then fits one threshold row per exit's staged cost, and calibration.json
goes beside the checkpoint. This module holds the torch half of the step, so training/calibrate.py (the
table search, the file format) stays importable without torch.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from early_exit.manifest import sha256_file
from early_exit.policy import NEVER, BudgetEntry, ConfidenceMeasure
from training.attacks import AttackName, build_attack
from training.attacked_sets import apgd_settings, evaluate, policy_attack_settings
from training.calibrate import (
    Calibration,
    ExitOutputs,
    RobustConstraint,
    agreement_with_last_exit,
    calibrate_table,
    calibration_path,
    write_calibration,
)
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.config import TrainConfig, validate_config
from training.data import Split, load_tensors
from training.models import MultiExitNetwork

log = logging.getLogger("training.calibrate")

CONFIDENT = 1.0 - 1e-6  # a threshold no attack reaches: the policy attack aimed at it keeps raising confidence


def calibration_attack_sets(model: MultiExitNetwork, cfg: TrainConfig, x_val: torch.Tensor, y_val: torch.Tensor,
                            measure: ConfidenceMeasure) -> tuple[ExitOutputs, ...]:
    """Clean and attacked outputs of the last `calibration_attack_limit` validation images, for robust calibration.

    Per exit k, two sets: the policy attack (training/attacks/policy.py) aimed at k alone (every other exit's
    threshold is above 1, exit k's is `CONFIDENT`, so the attack makes exit k wrong and then as confident as it
    can; the last exit: wrong), and APGD-CE on exit k (the suite's strongest untargeted attack, whose wrong
    answers are often confident too). These sets do not depend on the thresholds being fitted, so one run
    serves every candidate; the evaluation afterwards attacks the chosen thresholds adaptively. Returns the
    clean set first, then 2 sets per exit, all over the same images.
    """
    n = min(cfg.calibration_attack_limit, len(y_val))
    x, y = x_val[-n:], y_val[-n:]
    k = model.num_exits
    sets = [evaluate(model, x, y, None, cfg.eval_batch_size, "calibration (clean)").outputs]
    for e in range(k):
        thresholds = [NEVER] * k
        if e < k - 1:
            thresholds[e] = CONFIDENT
        attack = build_attack(AttackName.POLICY, model, exit=e, thresholds=thresholds, max_exit=k - 1,
                              measure=measure, seed=cfg.seed, **policy_attack_settings(cfg))
        sets.append(evaluate(model, x, y, attack, cfg.eval_batch_size, f"calibration (policy, exit {e + 1})").outputs)
        attack = build_attack(AttackName.APGD_CE, model, exit=e, seed=cfg.seed, **apgd_settings(cfg))
        sets.append(evaluate(model, x, y, attack, cfg.eval_batch_size, f"calibration (apgd-ce, exit {e + 1})").outputs)
    return tuple(sets)


def robust_calibration_summary(robust: RobustConstraint | None, table: Sequence[BudgetEntry], cfg: TrainConfig,
                               measure: ConfidenceMeasure, seconds: float = 0.0) -> dict[str, Any] | None:
    """Per budget row, the calibration attack's validation robust accuracy: of the chosen thresholds and of
    always answering at the row's deepest allowed exit (the reference the tolerance is taken from). None
    without `robust`; `seconds` is the wall time of building the attacked sets."""
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


def calibrate_checkpoint(checkpoint: str | Path, overrides: dict[str, Any] | None = None) -> tuple[Calibration, Path]:
    """Fit `checkpoint`'s threshold table on its validation split and write calibration.json beside it.

    `overrides` change config keys of the checkpoint's saved config for this step (e.g.
    `calibration_robust_tolerance`). Returns the calibration and the path written. Raises CheckpointError,
    ConfigError or DataError with one line.
    """
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    cfg = validate_config({**ckpt["config"], **(overrides or {})})
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = model_from_checkpoint(ckpt)
    cost = model.cost_profile()
    measure = ConfidenceMeasure(cfg.confidence)

    x_val, y_val = load_tensors(cfg.dataset, cfg.data_dir, Split.VAL, cfg.val_size, cfg.seed, config=cfg)
    val = evaluate(model, x_val, y_val, None, cfg.eval_batch_size, "validation")
    robust, robust_seconds = None, 0.0
    if cfg.calibration_robust_tolerance is not None:
        start = time.perf_counter()
        robust = RobustConstraint(calibration_attack_sets(model, cfg, x_val, y_val, measure),
                                  cfg.calibration_robust_tolerance)
        robust_seconds = time.perf_counter() - start
    table = calibrate_table(val.outputs, cost.staged, cfg.calibration_tolerance, measure, robust)
    # what the server's audit of early answers should see: agreement with the last exit, at the default budget
    agreement = agreement_with_last_exit(val.outputs, table[-1], measure)
    summary = {"validation_samples": len(y_val),
               "robust": robust_calibration_summary(robust, table, cfg, measure, robust_seconds)}
    calibration = Calibration(measure, cfg.calibration_tolerance, cost, tuple(table), cost.staged[-1],
                              sha256_file(checkpoint), summary, tuple(agreement))
    path = write_calibration(calibration, calibration_path(checkpoint))
    log.info("wrote %s", path)
    return calibration, path
