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

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from early_exit.manifest import write_atomic
from training.models import MultiExitNetwork, create_model

FORMAT_VERSION = 2  # 2: "cost" (per stage and head) replaced "exit_mflops"; no calibration inside
KIND = "robust-early-exit-checkpoint"
# A resume checkpoint written before the random states became tensors holds numpy's MT19937 key as an array: these
# rebuild an ndarray from its bytes and call nothing else, so such a last.pt still resumes.
LEGACY_RNG_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np._core.multiarray._reconstruct]
# torch's weights_only refusal names the global it met: "Unsupported global: GLOBAL pathlib.Path.touch was not ..."
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_REFUSED_CLASS = re.compile(r"but got <class '([\w.]+)'>")  # "Can only build Tensor, ... but got <class '...'>"


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
    """Read a checkpoint with `torch.load(weights_only=True)`: tensors, plain containers and numbers only, so a
    file can never run code while it is read (pickle would call any callable it names). The checkpoint holds
    nothing else: configs are stored as plain values (enums as their values), random states as tensors; numpy
    arrays (`LEGACY_RNG_GLOBALS`) are allowed for resume files written before that.

    Returns the checkpoint dict (CPU tensors). Raises CheckpointError (one line) for a missing, unreadable or
    foreign file, one that names any other Python object (a pickled callable or class), or another format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(LEGACY_RNG_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a global (nothing was called), or not a pickle
        named = _REFUSED_GLOBAL.search(str(exc)) or _REFUSED_CLASS.search(str(exc))
        if named is None:
            raise CheckpointError(f"{path} is not a readable torch checkpoint (UnpicklingError)") from exc
        raise CheckpointError(f"{path} holds the Python object {named.group(1)}, which a checkpoint may not hold: "
                              "refused without running it (only tensors and plain values load)") from None
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
