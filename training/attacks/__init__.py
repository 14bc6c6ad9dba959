"""Attacks on multi-exit networks (docs/method.md) and `build_attack`, the one place configs name them."""
from __future__ import annotations

from enum import Enum
from typing import Any

from training.attacks.autoattack import APGD, APGDLoss, ExitModel
from training.attacks.base import Attack, AttackModelMode
from training.attacks.max_average import MaxAveragePGD, keep_strongest, summed_exit_ce
from training.attacks.pgd import PGD, AttackTarget
from training.attacks.policy import PolicyAttack, apgd_ascent, policy_loss, wrong_margin
from training.attacks.slowdown import DeepSloth, early_exit_uniform_ce, uniform_cross_entropy
from training.models.base import MultiExitNetwork

__all__ = [
    "APGD",
    "APGDLoss",
    "Attack",
    "AttackModelMode",
    "AttackName",
    "AttackTarget",
    "DeepSloth",
    "ExitModel",
    "MaxAveragePGD",
    "PGD",
    "PolicyAttack",
    "apgd_ascent",
    "build_attack",
    "early_exit_uniform_ce",
    "keep_strongest",
    "policy_loss",
    "summed_exit_ce",
    "uniform_cross_entropy",
    "wrong_margin",
]


class AttackName(str, Enum):
    """Attacks a config can name; SINGLE, APGD_CE, APGD_T and POLICY need the `exit` argument (0-based)."""

    SINGLE = "single"
    AVERAGE = "average"
    MAX_AVERAGE = "max-average"
    DEEPSLOTH = "deepsloth"
    APGD_CE = "apgd-ce"
    APGD_T = "apgd-t"
    POLICY = "policy"


PER_EXIT = (AttackName.SINGLE, AttackName.APGD_CE, AttackName.APGD_T, AttackName.POLICY)


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
    """Build an attack by name; `kwargs` (model_mode, random_start, generator, seed, and each attack's own
    options: APGD's restarts/target_classes, the policy attack's thresholds/max_exit/measure/kappa/restarts)
    go to the attack. APGD and the policy attack (APGD's adaptive step) ignore `step_size`."""
    try:
        name = AttackName(name)
    except ValueError:
        valid = ", ".join(repr(n.value) for n in AttackName)
        raise ValueError(f"unknown attack {name!r}; valid: {valid} "
                         f"({', '.join(n.value for n in PER_EXIT)} take exit=<0-based index>)") from None
    if name in PER_EXIT and exit is None:
        raise ValueError(f"the {name.value!r} attack needs exit=<0-based exit index>")
    if name not in PER_EXIT and exit is not None:
        raise ValueError(f"exit={exit} only applies to the {', '.join(repr(n.value) for n in PER_EXIT)} attacks, "
                         f"not {name.value!r}")
    if name is AttackName.SINGLE:
        return PGD(model, eps, step_size, steps, target=exit, **kwargs)
    if name is AttackName.APGD_CE:
        kwargs.pop("random_start", None)
        return APGD(model, eps, steps, exit=exit, loss=APGDLoss.CE, **kwargs)
    if name is AttackName.APGD_T:
        kwargs.pop("random_start", None)
        return APGD(model, eps, steps, exit=exit, loss=APGDLoss.DLR_TARGETED, **kwargs)
    if name is AttackName.POLICY:
        return PolicyAttack(model, eps, steps, exit=exit, **kwargs)
    if name is AttackName.AVERAGE:
        return PGD(model, eps, step_size, steps, target=AttackTarget.AVERAGE, **kwargs)
    if name is AttackName.MAX_AVERAGE:
        return MaxAveragePGD(model, eps, step_size, steps, **kwargs)
    if name is AttackName.DEEPSLOTH:
        return DeepSloth(model, eps, step_size, steps, **kwargs)
    raise AssertionError(f"unhandled attack name {name!r}")
