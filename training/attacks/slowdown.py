"""DeepSloth (ICLR 2021): a slowdown attack that pushes inputs past the early exits.

It minimizes sum over the early exits (all but the last) of CE(softmax_i, uniform), which flattens
the early exits' outputs so no confidence threshold fires and every input pays for the deepest exit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from training.attacks.base import Attack, AttackModelMode, check_pgd_settings
from training.models.base import MultiExitNetwork


def uniform_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Batch mean of CE(softmax(logits), uniform) = -(1/C) sum_c log p_c; its minimum, log C, is at p = uniform."""
    return -F.log_softmax(logits, dim=1).mean(dim=1).mean()


def early_exit_uniform_ce(model: MultiExitNetwork, x: torch.Tensor) -> torch.Tensor:
    """DeepSloth's objective: sum over exits 0..K-2 of the uniform CE, running only the stages those exits need."""
    if model.num_exits < 2:
        raise ValueError("a slowdown attack needs a model with at least one early exit")
    return torch.stack([uniform_cross_entropy(out) for out in model.forward_exits(x, upto=model.num_exits - 2)]).sum()


class DeepSloth(Attack):
    """PGD descending `early_exit_uniform_ce`; labels are accepted for a uniform signature and ignored."""

    def __init__(
        self,
        model: MultiExitNetwork,
        eps: float = 8 / 255,
        step_size: float = 0.002,
        steps: int = 30,
        *,
        model_mode: AttackModelMode | str = AttackModelMode.EVAL,
        random_start: bool = True,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            model, eps, model_mode=model_mode, random_start=random_start, generator=generator, seed=seed
        )
        if model.num_exits < 2:
            raise ValueError("a slowdown attack needs a model with at least one early exit")
        check_pgd_settings(step_size, steps)
        self.step_size = float(step_size)
        self.steps = int(steps)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self._pgd(
            x, lambda x_adv: early_exit_uniform_ce(self.model, x_adv),
            step_size=self.step_size, steps=self.steps, maximize=False,
        )

    def __repr__(self) -> str:
        return f"DeepSloth(eps={self.eps:.4g}, step_size={self.step_size:.4g}, steps={self.steps})"
