"""The attack contract: torchattacks-style `attack(x, y) -> x_adv` for multi-exit networks.

Every attack in this package
- takes and returns images in [0, 1] (normalization lives inside the model),
- returns a detached result inside the L-infinity eps-ball around x and inside [0, 1],
- gets gradients only through `torch.autograd.grad(loss, x_adv)`, so parameter `.grad` is never
  touched (an attack may run in the middle of a training step),
- restores every module's train/eval flag afterwards, even when it fails.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from enum import Enum
from typing import Callable

import torch

from training.models.base import MultiExitNetwork

logger = logging.getLogger(__name__)

Objective = Callable[[torch.Tensor], torch.Tensor]


class AttackModelMode(str, Enum):
    """The mode the model runs in while it is attacked.

    EVAL (default) freezes BatchNorm statistics and dropout. TRAIN runs them live: dropout is
    random and BatchNorm running statistics are updated by the attack's forward passes.
    """

    EVAL = "eval"
    TRAIN = "train"


class Attack(ABC):
    """Base class: subclasses implement `forward(x, y)`; `__call__` handles mode, projection and detaching."""

    def __init__(
        self,
        model: MultiExitNetwork,
        eps: float,
        *,
        model_mode: AttackModelMode | str = AttackModelMode.EVAL,
        random_start: bool = True,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        """`generator` (or `seed`, which builds a CPU generator) makes the random start reproducible."""
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if generator is not None and seed is not None:
            raise ValueError("pass either generator or seed, not both")
        self.model = model
        self.eps = float(eps)
        self.model_mode = AttackModelMode(model_mode)
        self.random_start = random_start
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        self.generator = generator

    @abstractmethod
    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Build adversarial examples for clean images `x` (detached, in [0, 1]) and labels `y`."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Attack a batch; `y` may be None only for attacks that ignore labels (DeepSloth)."""
        modes = {module: module.training for module in self.model.modules()}
        try:
            self.model.train(self.model_mode is AttackModelMode.TRAIN)
            x = x.detach()
            logger.debug("%r on a batch of %d", self, x.shape[0])
            x_adv = self.forward(x, None if y is None else y.detach())
            return self.project(x_adv, x)
        finally:
            # Restore per module: a model may hold a deliberately mixed state (e.g. frozen BatchNorm).
            for module, training in modes.items():
                module.training = training

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Clamp into the eps-ball around x, then into [0, 1]; same arithmetic as torchattacks.PGD."""
        delta = torch.clamp(x_adv.detach() - x, min=-self.eps, max=self.eps)
        return torch.clamp(x + delta, min=0.0, max=1.0).detach()

    def start_point(self, x: torch.Tensor) -> torch.Tensor:
        """x itself, or a uniform random point of the eps-ball (clamped to [0, 1]) when random_start is on."""
        if not self.random_start:
            return x.clone()
        device = self.generator.device if self.generator is not None else x.device
        unit = torch.rand(x.shape, generator=self.generator, device=device, dtype=x.dtype).to(x.device)
        return self.project(x + (2.0 * unit - 1.0) * self.eps, x)

    def _pgd(
        self, x: torch.Tensor, objective: Objective, *, step_size: float, steps: int, maximize: bool
    ) -> torch.Tensor:
        """L-infinity PGD on `objective(x_adv)` (a scalar): signed-gradient steps, projected after each.

        Grad mode is forced on, so evaluation loops may call attacks inside `torch.no_grad()`.
        """
        direction = 1.0 if maximize else -1.0
        x_adv = self.start_point(x)
        with torch.enable_grad():
            for _ in range(steps):
                x_adv.requires_grad_(True)
                loss = objective(x_adv)
                (grad,) = torch.autograd.grad(loss, x_adv)
                x_adv = self.project(x_adv.detach() + direction * step_size * grad.sign(), x)
        return x_adv

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps:.4g}, model_mode={self.model_mode.value})"


def require_labels(y: torch.Tensor | None, attack: Attack) -> torch.Tensor:
    """Label-driven attacks cannot run without labels; fail loudly instead of attacking nothing."""
    if y is None:
        raise ValueError(f"{type(attack).__name__} needs labels y")
    return y


def check_pgd_settings(step_size: float, steps: int) -> None:
    """Reject settings that would silently produce no attack or a wrong-direction one."""
    if step_size <= 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")

