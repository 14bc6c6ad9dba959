"""What the calibration step and the evaluation both run: a network's per-exit outputs on a dataset, clean or
attacked batch by batch (`evaluate` -> `EvalResult`, one "set"), and the evaluation attacks' arguments taken
from the config (`apgd_settings`, `policy_attack_settings`), so calibration attacks validation images exactly
as the evaluation's strong suite attacks test images.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from training.calibrate import ExitOutputs
from training.config import TrainConfig
from training.models import MultiExitNetwork

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EvalResult:
    """Per-exit outputs of one (possibly attacked) dataset and the seconds it took."""

    outputs: ExitOutputs
    inputs: torch.Tensor | None  # the (adversarial) inputs, N x C x H x W in [0, 1], kept when asked for
    seconds: float = 0.0

    @property
    def accuracy(self) -> list[float]:
        """Per exit, the share of samples it classifies correctly (K floats in [0, 1])."""
        return [float(a) for a in self.outputs.correct().mean(axis=0)]


def evaluate(
    model: MultiExitNetwork, x: torch.Tensor, y: torch.Tensor, attack: AttackFn | None = None,
    batch_size: int = 500, desc: str = "eval", keep_inputs: bool = False, device: torch.device | None = None,
    only: np.ndarray | None = None,
) -> EvalResult:
    """Per-exit logits of `model` on `x` (N x C x H x W in [0, 1], labels `y`: N), attacked batch by batch when
    `attack` is given.

    `only` (N booleans): attack just those samples; the others are evaluated clean.
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


def apgd_settings(cfg: TrainConfig) -> dict[str, Any]:
    """APGD's arguments in every evaluation run (the strong suite and the calibration attack), exit aside."""
    return dict(eps=cfg.eval_eps, step_size=cfg.eval_step_size, steps=cfg.apgd_steps, restarts=cfg.apgd_restarts)


def policy_attack_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The policy attack's arguments in every evaluation run, its target (exit, thresholds, cap) aside."""
    return dict(eps=cfg.eval_eps, step_size=cfg.eval_step_size, steps=cfg.policy_attack_steps,
                kappa=cfg.policy_attack_kappa, restarts=cfg.policy_attack_restarts)
