"""AutoAttack's parameter-free APGD-CE and APGD-T (Croce & Hein 2020) on one exit, through torchattacks.

An exit k of a multi-exit network is attacked as the classifier it is: the truncated forward through
stages and head 0..k (`ExitModel`). torchattacks supplies the attacks; this wrapper puts them on the
`Attack` contract (modes restored, result projected and detached, parameter gradients untouched:
torchattacks differentiates with `torch.autograd.grad` on the input) and keeps torch's global random
state as it was (torchattacks reseeds it on every call).

torchattacks' semantics are kept: points the exit already gets wrong are not attacked, and a point
no run fooled comes back unchanged (x itself); a fooled point comes back as the image that fooled it.
"""
from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

import torch
from torch import nn

from training.attacks.base import Attack, AttackModelMode, require_labels
from training.models.base import MultiExitNetwork

if TYPE_CHECKING:
    import torchattacks


# The targeted DLR loss divides by the gap between the 1st and 3rd largest logits and targets another class:
# it is defined for 4 classes or more (Croce & Hein 2020).
APGD_T_MIN_CLASSES = 4

class ExitModel(nn.Module):
    """Exit k (0-based) of a multi-exit network as a single-output classifier: stages and heads 0..k only."""

    def __init__(self, net: MultiExitNetwork, exit: int) -> None:  # noqa: A002 - the natural name
        super().__init__()
        if not 0 <= exit < net.num_exits:
            raise ValueError(f"exit index {exit} out of range for a {net.num_exits}-exit model (0-based)")
        self.net, self.exit = net, exit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_exits(x, upto=self.exit)[self.exit]


class APGDLoss(str, Enum):
    CE = "ce"  # APGD-CE: untargeted, cross-entropy
    DLR_TARGETED = "dlr-targeted"  # APGD-T: targeted DLR loss, one run per target class


class APGD(Attack):
    """APGD-CE or APGD-T (L-infinity) on exit `exit`: `steps` iterations, `restarts` random restarts.

    APGD-T runs once per target class (the `target_classes` highest-scoring wrong classes, at most C-1;
    AutoAttack's standard setting is 9), each with `restarts` restarts, on the points no earlier run fooled.
    """

    def __init__(
        self,
        model: MultiExitNetwork,
        eps: float,
        steps: int = 100,
        *,
        exit: int,  # noqa: A002
        loss: APGDLoss | str = APGDLoss.CE,
        restarts: int = 1,
        target_classes: int = 9,
        model_mode: AttackModelMode | str = AttackModelMode.EVAL,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(model, eps, model_mode=model_mode, random_start=True, generator=generator, seed=seed)
        if steps < 1 or restarts < 1 or target_classes < 1:
            raise ValueError(f"APGD needs steps, restarts and target_classes >= 1, got {steps}, {restarts}, "
                             f"{target_classes}")
        self.exit_model = ExitModel(model, exit)
        self.exit = exit
        self.loss = APGDLoss(loss)
        self.steps, self.restarts, self.target_classes = int(steps), int(restarts), int(target_classes)
        # torchattacks draws its random starts from the global generator after seeding it with this.
        self.seed = int(seed) if seed is not None else int(
            torch.randint(0, 2**31 - 1, (1,), generator=self.generator).item())

    def _torchattack(self, num_classes: int) -> torchattacks.attack.Attack:
        import torchattacks  # here, not at module level: it costs about a second to import (scipy)

        common = dict(norm="Linf", eps=self.eps, steps=self.steps, n_restarts=self.restarts, seed=self.seed)
        if self.loss is APGDLoss.CE:
            attack = torchattacks.APGD(self.exit_model, loss="ce", **common)
        else:
            if num_classes < APGD_T_MIN_CLASSES:
                raise ValueError(f"APGD-T's DLR loss needs at least {APGD_T_MIN_CLASSES} classes")
            attack = torchattacks.APGDT(self.exit_model, n_classes=num_classes, **common)
            attack.n_target_classes = min(self.target_classes, num_classes - 1)
        if self.model_mode is AttackModelMode.TRAIN:  # torchattacks switches to eval unless told otherwise
            attack.set_model_training_mode(model_training=True, batchnorm_training=True, dropout_training=True)
        return attack

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        y = require_labels(y, self)
        if not len(x):
            return x.clone()
        self.exit_model.train(self.model.training)  # torchattacks restores the wrapper's flag afterwards
        with torch.no_grad():
            num_classes = self.exit_model(x[:1]).shape[1]
        devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()] \
            if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            return self._torchattack(num_classes)(x, y)

    def __repr__(self) -> str:
        name = "APGD-CE" if self.loss is APGDLoss.CE else f"APGD-T(targets={self.target_classes})"
        return f"{name}(exit {self.exit}, eps={self.eps:.4g}, steps={self.steps}, restarts={self.restarts})"
