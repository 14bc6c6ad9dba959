"""The max-average attack (RDI-Nets): the strongest of the K single-exit attacks, chosen per sample."""
from __future__ import annotations

import contextlib
from typing import ContextManager, Protocol

import torch
import torch.nn.functional as F

from training.attacks.base import Attack, AttackModelMode, require_labels
from training.attacks.pgd import PGD
from training.models.base import MultiExitNetwork


def summed_exit_ce(model: MultiExitNetwork, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample sum over all exits of CE_i: the score the max-average attack ranks candidates by."""
    logits = model.forward_exits(x)
    return torch.stack([F.cross_entropy(out, y, reduction="none") for out in logits]).sum(dim=0)


def keep_strongest(model: MultiExitNetwork, candidates: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Per sample, the candidate with the largest summed CE over all exits (ties: the earliest candidate)."""
    with torch.no_grad():
        scores = torch.stack([summed_exit_ce(model, c, y) for c in candidates])
    best = scores.argmax(dim=0)
    return torch.stack(candidates)[best, torch.arange(len(y), device=y.device)]


class SectionTimer(Protocol):
    """What `MaxAveragePGD.timer` takes: e.g. training.train.Timings."""

    def section(self, name: str) -> ContextManager[None]: ...


class MaxAveragePGD(Attack):
    """Runs PGD on each exit k (stages 0..k only) and keeps, per sample, the candidate with the largest summed CE.

    The K single-exit attacks share one random generator, drawn in exit order, so a seeded run is
    reproducible and can be replayed exit by exit.

    The K attacks run one after another. Running them as one batched pass per PGD step (stage 1 on K copies
    of the batch, stage 2 on K-1, ..., head k on copy k; the scoring as one forward of the K candidates)
    gives the same candidates but measured about 1.5x slower on the 2-core CPU with the SmallCNN at batch 128
    (attack 327 vs 500 ms, scoring 53 vs 74 ms per iteration, best of 12): the larger activations fall
    out of cache. It is not kept.

    `timer` (optional, anything with `section(name)`) receives the time of each exit's attack
    (`attack/exit<k>`) and of the scoring forwards (`attack/scoring`).
    """

    def __init__(
        self,
        model: MultiExitNetwork,
        eps: float,
        step_size: float,
        steps: int,
        *,
        model_mode: AttackModelMode | str = AttackModelMode.EVAL,
        random_start: bool = True,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            model, eps, model_mode=model_mode, random_start=random_start, generator=generator, seed=seed
        )
        self.timer: SectionTimer | None = None
        self.single_exit_attacks = [
            PGD(
                model, eps, step_size, steps, target=k,
                model_mode=self.model_mode, random_start=random_start, generator=self.generator,
            )
            for k in range(model.num_exits)
        ]

    @property
    def eps(self) -> float:
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        """Setting eps (e.g. a training warm-up) reaches every single-exit attack."""
        self._eps = float(value)
        for attack in getattr(self, "single_exit_attacks", []):
            attack.eps = self._eps

    def _section(self, name: str) -> ContextManager[None]:
        return self.timer.section(name) if self.timer is not None else contextlib.nullcontext()

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        y = require_labels(y, self)
        candidates = []
        for k, attack in enumerate(self.single_exit_attacks):
            with self._section(f"attack/exit{k}"):
                candidates.append(attack(x, y))
        with self._section("attack/scoring"):
            return keep_strongest(self.model, candidates, y)

    def __repr__(self) -> str:
        first = self.single_exit_attacks[0]
        return (
            f"MaxAveragePGD(exits={len(self.single_exit_attacks)}, eps={self.eps:.4g}, "
            f"step_size={first.step_size:.4g}, steps={first.steps})"
        )
