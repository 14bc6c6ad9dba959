"""Attacks on multi-exit networks (docs/method.md) and `build_attack`, the one place configs name them."""
from __future__ import annotations

from enum import Enum
from typing import Any

from training.attacks.base import Attack, AttackModelMode
from training.attacks.max_average import MaxAveragePGD, keep_strongest, summed_exit_ce
from training.attacks.pgd import PGD, AttackTarget
from training.attacks.slowdown import DeepSloth, early_exit_uniform_ce, uniform_cross_entropy
from training.models.base import MultiExitNetwork

__all__ = [
    "Attack",
    "AttackModelMode",
    "AttackName",
    "AttackTarget",
    "DeepSloth",
    "MaxAveragePGD",
    "PGD",
    "build_attack",
    "early_exit_uniform_ce",
    "keep_strongest",
    "summed_exit_ce",
    "uniform_cross_entropy",
]


class AttackName(str, Enum):
    """Attacks a config can name; SINGLE needs the `exit` argument (0-based)."""

    SINGLE = "single"
    AVERAGE = "average"
    MAX_AVERAGE = "max-average"
    DEEPSLOTH = "deepsloth"


def build_attack(
    name: AttackName | str,
    model: MultiExitNetwork,
    eps: float,
    step_size: float,
    steps: int,
    *,
    exit: int | None = None,  # noqa: A002 - the natural name in configs
    **kwargs: Any,
) -> Attack:
    """Build an attack by name; `kwargs` (model_mode, random_start, generator, seed) go to the attack."""
    try:
        name = AttackName(name)
    except ValueError:
        valid = ", ".join(repr(n.value) for n in AttackName)
        raise ValueError(f"unknown attack {name!r}; valid: {valid} (single takes exit=<0-based index>)") from None
    if name is AttackName.SINGLE:
        if exit is None:
            raise ValueError("the single-exit attack needs exit=<0-based exit index>")
        return PGD(model, eps, step_size, steps, target=exit, **kwargs)
    if exit is not None:
        raise ValueError(f"exit={exit} only applies to the {AttackName.SINGLE.value!r} attack, not {name.value!r}")
    if name is AttackName.AVERAGE:
        return PGD(model, eps, step_size, steps, target=AttackTarget.AVERAGE, **kwargs)
    if name is AttackName.MAX_AVERAGE:
        return MaxAveragePGD(model, eps, step_size, steps, **kwargs)
    if name is AttackName.DEEPSLOTH:
        return DeepSloth(model, eps, step_size, steps, **kwargs)
    raise AssertionError(f"unhandled attack name {name!r}")
