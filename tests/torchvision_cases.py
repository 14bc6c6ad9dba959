"""Small `torchvision:<builder>` configurations for tests (random init, inputs of 32x32 or less).

`build_case(name)` builds each once per process and hands out deep copies (a build runs the equivalence check
and FlopCounterMode, seconds on a loaded 2-core machine).
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import torch

from training.models import MultiExitNetwork, create_model

SMALL_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet18": ("torchvision:resnet18", {"input_shape": (3, 32, 32), "exits": ["layer1", "layer2"]}),
    "resnet-1111": ("torchvision:resnet", {"block": "basic", "layers": [1, 1, 1, 1], "input_shape": (3, 32, 32),
                                           "exits": "flops:0.33,0.67"}),
    "mobilenet_v3_small": ("torchvision:mobilenet_v3_small", {"input_shape": (3, 16, 16)}),
    "efficientnet_b0": ("torchvision:efficientnet_b0", {"input_shape": (3, 16, 16), "exits": "flops:0.3,0.6"}),
    "convnext-small-setting": ("torchvision:convnext", {
        "block_setting": [[16, 32, 1], [32, 64, 1], [64, None, 1]], "input_shape": (3, 32, 32),
        "exits": ["features.1", "features.3"]}),
}


@functools.cache
def _built(case: str) -> MultiExitNetwork:
    name, kwargs = SMALL_CASES[case]
    torch.manual_seed(0)
    return create_model(name, num_classes=10, **kwargs)


def build_case(case: str) -> MultiExitNetwork:
    """A fresh copy of the small model `case` (a key of SMALL_CASES), in train mode."""
    model = copy.deepcopy(_built(case))
    model.train()
    return model


def export_case(case: str, root: Path, batch_sizes: tuple[int, ...] = (1, 3)):
    """Checkpoint `case` (untrained; dataset cifar10-shaped), write the calibration.json evaluation would (a real
    table fitted on random data) and export it (export.export_checkpoint, parity at `batch_sizes`, no attack).
    Returns (model, checkpoint path, ExportResult)."""
    from early_exit.manifest import sha256_file
    from early_exit.policy import ConfidenceMeasure
    from export.pipeline import export_checkpoint
    from training.calibrate import Calibration, ExitOutputs, calibrate_table, calibration_path, write_calibration
    from training.checkpoint import make_checkpoint, save_checkpoint

    model = build_case(case).eval()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, *model.input_shape, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    with torch.no_grad():
        logits = [out.numpy() for out in model(x)]
    cost = model.cost_profile()
    table = calibrate_table(ExitOutputs.from_logits(logits, y.numpy()), cost.staged, tolerance=0.01)
    dataset = {"name": "cifar10", "input_shape": list(model.input_shape), "classes": [f"c{i}" for i in range(10)],
               "background": 1.0}
    ckpt = save_checkpoint(make_checkpoint(model, dataset, {"seed": 0}), root / "model.pt")
    write_calibration(Calibration(ConfidenceMeasure.MAX_PROB, 0.01, cost, tuple(table), cost.staged[-1],
                                  sha256_file(ckpt), {"note": "untrained"}), calibration_path(ckpt))
    name = "tv-" + case.replace("_", "-")
    return model, ckpt, export_checkpoint(ckpt, root / "out", name, adv_samples=0, batch_sizes=batch_sizes)
