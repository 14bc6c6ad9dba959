"""The multi-exit contract shared by training, attacks and export.

    stage_k(features_{k-1}) -> features_k     (features_0 = image in [0, 1])
    head_k(features_k)      -> logits_k

Indices in code are 0-based (exit 0 is the cheapest); user-facing numbers
(manifest, HTTP, reports) are 1-based.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from early_exit.costs import CostProfile


class Normalize(nn.Module):
    """Per-channel normalization held as buffers, so every caller passes [0, 1] images (RobustBench)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MultiExitNetwork(nn.Module):
    """Base class: subclasses fill `stages` and `heads` (one head per stage) and set `input_shape`."""

    model_name: str = ""
    model_args: dict = {}

    def __init__(self, stages: Sequence[nn.Module], heads: Sequence[nn.Module], input_shape: Sequence[int]) -> None:
        super().__init__()
        if len(stages) != len(heads) or not stages:
            raise ValueError("a multi-exit network needs one head per stage")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.input_shape = tuple(int(s) for s in input_shape)
        self._cost_profile: CostProfile | None = None
        self.backbone_frozen = False

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Heads-first fine-tuning (training/train.py `heads_first_iterations`): with `frozen`, the stages'
        parameters stop requiring gradients and the stages stay in eval mode even under `.train()`, so their
        BatchNorm running statistics do not drift and their dropout is off; the heads train as usual. Input
        gradients still flow through frozen stages (attacks work). `frozen=False` undoes both."""
        self.backbone_frozen = frozen
        for p in self.stages.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "MultiExitNetwork":
        """nn.Module.train, except that frozen stages (`freeze_backbone`) stay in eval mode."""
        super().train(mode)
        if getattr(self, "backbone_frozen", False):
            self.stages.eval()
        return self

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def forward_stage(self, k: int, features: torch.Tensor) -> torch.Tensor:
        """Stage k (0-based): features_{k-1} -> features_k."""
        return self.stages[k](features)

    def forward_head(self, k: int, features: torch.Tensor) -> torch.Tensor:
        return self.heads[k](features)

    def forward_exits(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Logits of exits 0..upto, running only the stages they need."""
        upto = self.num_exits - 1 if upto is None else upto
        logits = []
        features = x
        for k in range(upto + 1):
            features = self.forward_stage(k, features)
            logits.append(self.forward_head(k, features))
        return logits

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        """Every exit's logits, cheapest first."""
        return self.forward_exits(x)

    @torch.no_grad()
    def cost_profile(self) -> CostProfile:
        """Per-stage and per-head MFLOPs for one input, each counted by torch's FlopCounterMode (never typed in).

        `cost_profile().staged` is what an early-exit answer at exit k costs (stages and heads 1..k),
        `.anytime` the papers' per-exit cost (stages 1..k plus head k); see early_exit/costs.py.
        """
        if self._cost_profile is None:
            was_training = self.training
            self.eval()
            device = next(self.parameters()).device
            features = torch.zeros(1, *self.input_shape, device=device)
            stage_mflops, head_mflops = [], []
            for k in range(self.num_exits):
                counter = FlopCounterMode(display=False)
                with counter:
                    features = self.forward_stage(k, features)
                stage_mflops.append(counter.get_total_flops() / 1e6)
                counter = FlopCounterMode(display=False)
                with counter:
                    self.forward_head(k, features)
                head_mflops.append(counter.get_total_flops() / 1e6)
            self.train(was_training)
            self._cost_profile = CostProfile(tuple(stage_mflops), tuple(head_mflops))
        return self._cost_profile
