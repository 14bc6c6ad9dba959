"""PGD against one exit or against the average of all exits (docs/method.md, "Attacks")."""
from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F

from training.attacks.base import Attack, AttackModelMode, check_pgd_settings, require_labels
from training.models.base import MultiExitNetwork


class AttackTarget(str, Enum):
    """Targets that are not a single exit index."""

    AVERAGE = "average"


class PGD(Attack):
    """L-infinity PGD maximizing CE at exit `target` (0-based) or the mean CE over all exits (AVERAGE).

    A single-exit attack on exit k runs only stages 0..k: the later stages cannot change CE_k, and
    skipping them is what makes attacking early exits cheap.
    """

    def __init__(
        self,
        model: MultiExitNetwork,
        eps: float,
        step_size: float,
        steps: int,
        target: int | AttackTarget | str = AttackTarget.AVERAGE,
        *,
        model_mode: AttackModelMode | str = AttackModelMode.EVAL,
        random_start: bool = True,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            model, eps, model_mode=model_mode, random_start=random_start, generator=generator, seed=seed
        )
        check_pgd_settings(step_size, steps)
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.target = _resolve_target(target, model.num_exits)

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss PGD ascends: batch-mean CE at the target exit, or (1/K) sum_i CE_i."""
        if isinstance(self.target, AttackTarget):
            logits = self.model.forward_exits(x)
            return torch.stack([F.cross_entropy(out, y) for out in logits]).mean()
        return F.cross_entropy(self.model.forward_exits(x, upto=self.target)[self.target], y)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        y = require_labels(y, self)
        return self._pgd(
            x, lambda x_adv: self.objective(x_adv, y), step_size=self.step_size, steps=self.steps, maximize=True
        )

    def __repr__(self) -> str:
        target = self.target.value if isinstance(self.target, AttackTarget) else f"exit {self.target}"
        return f"PGD(target={target}, eps={self.eps:.4g}, step_size={self.step_size:.4g}, steps={self.steps})"


def _resolve_target(target: int | AttackTarget | str, num_exits: int) -> int | AttackTarget:
    """Validate a target: an exit index in [0, K) or an AttackTarget (by value or member)."""
    if isinstance(target, bool):  # bool is an int subclass; never a meaningful exit index
        raise TypeError("target must be an exit index or an AttackTarget, not a bool")
    if isinstance(target, int):
        if not 0 <= target < num_exits:
            raise ValueError(f"exit index {target} out of range for a {num_exits}-exit model (0-based)")
        return target
    try:
        return AttackTarget(target)
    except ValueError:
        valid = ", ".join(t.value for t in AttackTarget)
        raise ValueError(f"unknown attack target {target!r}; use an exit index or one of: {valid}") from None
