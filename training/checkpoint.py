"""Checkpoints that hold everything needed to rebuild and describe a model (nanoGPT's `model_args`).

Keys (format_version 2):
    format_version, kind="robust-early-exit-checkpoint",
    model_name, model_args, state_dict,
    cost              per-stage and per-head MFLOPs measured with FlopCounterMode (early_exit.costs.CostProfile
                      as a dict, with the derived staged and anytime costs per exit),
    dataset           {"name", "input_shape", "classes", "background"},
    config            the resolved training config (dict),
    resume state (last.pt; optional): step, epoch, batch (position inside the epoch), samples, seconds,
                      optimizer, scheduler, timing (the in-run timing sums), history, and rng: {"world_size",
                      per-rank python / numpy / torch CPU and CUDA states and the attack and EOKD generators}.

No later step rewrites a checkpoint: calibration writes `calibration.json` beside it (training.calibrate) and
evaluation writes `eval/` beside it (training.evaluate); export reads all three.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from early_exit.manifest import write_atomic
from training.models import MultiExitNetwork, create_model

FORMAT_VERSION = 2  # 2: "cost" (per stage and head) replaced "exit_mflops"; no calibration inside
KIND = "robust-early-exit-checkpoint"


class CheckpointError(ValueError):
    """A missing, unreadable or foreign checkpoint."""


def make_checkpoint(model: MultiExitNetwork, dataset: dict[str, Any], config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "model_name": model.model_name,
        "model_args": dict(model.model_args),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "cost": model.cost_profile().to_dict(),
        "dataset": dataset,
        "config": config,
        **extra,
    }


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> Path:
    """Atomic write (`early_exit.manifest.write_atomic`): a crash mid-save never leaves a truncated checkpoint."""
    return write_atomic(path, lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a foreign/corrupt file
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(exc).__name__})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("kind") != KIND:
        raise CheckpointError(f"{path} is not a robust-early-exit checkpoint")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {ckpt.get('format_version')}, expected {FORMAT_VERSION}: "
                              "retrain it with this version (make train-export FORCE=1)")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> MultiExitNetwork:
    model = create_model(ckpt["model_name"], **ckpt["model_args"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model
