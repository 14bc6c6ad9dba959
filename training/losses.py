"""Training objectives for multi-exit networks (docs/method.md, "Training objectives").

Every loss maps (clean logits per exit, adversarial logits per exit or None, targets) to
(a scalar to backpropagate, a dict of detached floats for logging). Exit indices are 0-based.
Distillation teachers are always built from detached clean outputs: gradients reach the network
only through the students (the adversarial logits) and through the cross-entropy terms.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from enum import Enum
from typing import Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

Logits = list[torch.Tensor]


class Method(str, Enum):
    """Training methods the trainer can run."""

    CLEAN = "clean"
    ADV = "adv"
    NEOKD = "neokd"


class RedrawPolicy(str, Enum):
    """How often EOKD redraws its class-to-exit split (the paper does not say; default BATCH)."""

    BATCH = "batch"  # a fresh split per sample at every call
    FIXED = "fixed"  # one split per ground-truth class, drawn once at construction


class BaseLossWeighting(str, Enum):
    """Weights of the clean and adversarial cross-entropies in the `adv` and `neokd` base loss.

    RDI (default): 0.5 * CE_i(x) + 0.5 * CE_i(x_adv), the RDI-Nets baseline ("Adv. w/o distill"), which
    NEO-KD's base loss follows in this project, so that `adv` and `neokd` share one base loss and NEO-KD's
    difference is the distillation alone. UNWEIGHTED: CE_i(x) + CE_i(x_adv), NEO-KD's base loss as
    docs/method.md writes it; it doubles the CE terms against alpha * NKD + beta * EOKD.
    """

    RDI = "rdi"
    UNWEIGHTED = "unweighted"

    @property
    def weights(self) -> tuple[float, float]:
        """(clean weight, adversarial weight)."""
        return (0.5, 0.5) if self is BaseLossWeighting.RDI else (1.0, 1.0)


class MultiExitLoss(ABC):
    """Base class; `requires_adversarial` tells the trainer whether to build x_adv at all."""

    requires_adversarial: bool = True

    @abstractmethod
    def __call__(
        self, clean_logits: Logits, adv_logits: Logits | None, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return (loss, parts) where parts holds detached floats for logging."""


def exit_cross_entropies(logits: Logits, targets: torch.Tensor) -> list[torch.Tensor]:
    """Batch-mean CE at every exit."""
    return [F.cross_entropy(out, targets) for out in logits]


def kl_divergence(teacher: torch.Tensor, student_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student), summed over classes and averaged over the batch (PyTorch's `batchmean`).

    Classes where the teacher is exactly zero contribute nothing, even where the student's
    log-probability is -inf (EOKD teachers are sparse, and 0 * -inf must not become NaN).
    """
    positive = teacher > 0
    log_teacher = torch.log(torch.where(positive, teacher, torch.ones_like(teacher)))
    student = torch.where(positive, student_log_probs, torch.zeros_like(student_log_probs))
    terms = torch.where(positive, teacher * (log_teacher - student), torch.zeros_like(teacher))
    return terms.sum() / teacher.shape[0]


def _check_pair(clean_logits: Logits, adv_logits: Logits | None, who: str) -> Logits:
    if adv_logits is None:
        raise ValueError(f"{who} needs adversarial logits")
    if len(adv_logits) != len(clean_logits):
        raise ValueError(f"{who}: {len(clean_logits)} clean exits but {len(adv_logits)} adversarial exits")
    return adv_logits


def _check_temperature(temperature: float) -> float:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


class CleanLoss(MultiExitLoss):
    """sum_i CE_i(x): standard multi-exit training, no attack."""

    requires_adversarial = False

    def __call__(
        self, clean_logits: Logits, adv_logits: Logits | None, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        ces = exit_cross_entropies(clean_logits, targets)
        total = torch.stack(ces).sum()
        parts = {f"clean_ce/exit{i}": ce.item() for i, ce in enumerate(ces)}
        parts["total"] = total.item()
        return total, parts


class AdversarialLoss(MultiExitLoss):
    """sum_i [clean_weight * CE_i(x) + adv_weight * CE_i(x_adv)]: the RDI-Nets baseline ("Adv. w/o distill").

    `BaseLossWeighting` names the two weightings the trainer offers (0.5 / 0.5 and 1 / 1).
    """

    def __init__(self, clean_weight: float = 0.5, adv_weight: float = 0.5) -> None:
        self.clean_weight = float(clean_weight)
        self.adv_weight = float(adv_weight)

    def __call__(
        self, clean_logits: Logits, adv_logits: Logits | None, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        adv_logits = _check_pair(clean_logits, adv_logits, type(self).__name__)
        clean_ces = exit_cross_entropies(clean_logits, targets)
        adv_ces = exit_cross_entropies(adv_logits, targets)
        total = torch.stack([self.clean_weight * c + self.adv_weight * a for c, a in zip(clean_ces, adv_ces)]).sum()
        parts = {f"clean_ce/exit{i}": ce.item() for i, ce in enumerate(clean_ces)}
        parts.update({f"adv_ce/exit{i}": ce.item() for i, ce in enumerate(adv_ces)})
        parts["total"] = total.item()
        return total, parts


class NKDLoss(MultiExitLoss):
    """Neighbor KD: exit i's adversarial output learns the mean clean softmax of exits {i-1, i, i+1}.

    Whether exit i is one of its own neighbors is not confirmed by the paper: `include_self`.
    """

    def __init__(self, include_self: bool = True, temperature: float = 1.0) -> None:
        self.include_self = include_self
        self.temperature = _check_temperature(temperature)

    def neighbors(self, i: int, num_exits: int) -> list[int]:
        """The existing exits whose clean outputs form exit i's teacher."""
        candidates = [i - 1, i, i + 1] if self.include_self else [i - 1, i + 1]
        found = [j for j in candidates if 0 <= j < num_exits]
        if not found:
            raise ValueError(f"exit {i} of a {num_exits}-exit model has no neighbors (include_self=False)")
        return found

    def teachers(self, clean_logits: Logits) -> list[torch.Tensor]:
        """Detached teacher distributions, one per exit."""
        probs = [F.softmax(out.detach() / self.temperature, dim=1) for out in clean_logits]
        return [
            torch.stack([probs[j] for j in self.neighbors(i, len(probs))]).mean(dim=0) for i in range(len(probs))
        ]

    def terms(self, clean_logits: Logits, adv_logits: Logits | None) -> list[torch.Tensor]:
        """NKD_i for every exit: T^2 * KL(teacher_i || softmax(adv_i / T))."""
        adv_logits = _check_pair(clean_logits, adv_logits, type(self).__name__)
        scale = self.temperature**2
        return [
            scale * kl_divergence(teacher, F.log_softmax(adv / self.temperature, dim=1))
            for teacher, adv in zip(self.teachers(clean_logits), adv_logits)
        ]

    def __call__(
        self, clean_logits: Logits, adv_logits: Logits | None, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        terms = self.terms(clean_logits, adv_logits)
        total = torch.stack(terms).sum()
        parts = {f"nkd/exit{i}": t.item() for i, t in enumerate(terms)}
        parts["total"] = total.item()
        return total, parts


class EOKDLoss(MultiExitLoss):
    """Exit-wise orthogonal KD: each exit distils only the ground truth and its own share of the other classes.

    The non-ground-truth classes of every sample are split into `num_exits` disjoint sets of
    (near-)equal size, at random; exit i's teacher is its own clean softmax with the classes of the
    other exits zeroed, then renormalized. Keeping the ground truth and the redraw frequency are
    not confirmed by the paper: `keep_ground_truth`, `redraw`.
    """

    def __init__(
        self,
        num_classes: int,
        num_exits: int,
        keep_ground_truth: bool = True,
        redraw: RedrawPolicy | str = RedrawPolicy.BATCH,
        seed: int | None = None,
        temperature: float = 1.0,
    ) -> None:
        if num_classes < 2 or num_exits < 1:
            raise ValueError(f"need num_classes >= 2 and num_exits >= 1, got {num_classes}, {num_exits}")
        self.num_classes = num_classes
        self.num_exits = num_exits
        self.keep_ground_truth = keep_ground_truth
        self.redraw = RedrawPolicy(redraw)
        self.temperature = _check_temperature(temperature)
        if seed is None:  # derive from torch's global RNG so torch.manual_seed makes runs reproducible
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator().manual_seed(seed)
        # FIXED: row c is the split used for every sample whose ground truth is c.
        self._fixed_table: torch.Tensor | None = None
        if self.redraw is RedrawPolicy.FIXED:
            self._fixed_table = self.draw_assignment(torch.arange(num_classes))
        if num_exits > num_classes - 1:
            logger.warning("EOKD: %d exits but only %d non-ground-truth classes; some exits get none",
                           num_exits, num_classes - 1)

    def draw_assignment(self, targets: torch.Tensor) -> torch.Tensor:
        """A (B, C) long tensor: the exit owning each class for each sample, -1 at the ground truth.

        A random permutation of the non-ground-truth classes is dealt round-robin from a random
        first exit, so the sets are disjoint, cover every non-ground-truth class, and their sizes
        differ by at most one without favouring the early exits.
        """
        targets = targets.detach().cpu()
        batch = targets.shape[0]
        scores = torch.rand(batch, self.num_classes, generator=self.generator)
        scores[torch.arange(batch), targets] = 2.0  # the ground truth ranks last
        ranks = scores.argsort(dim=1).argsort(dim=1)
        offsets = torch.randint(self.num_exits, (batch, 1), generator=self.generator)
        assignment = (ranks + offsets) % self.num_exits
        assignment[torch.arange(batch), targets] = -1
        return assignment

    def assignment_for(self, targets: torch.Tensor) -> torch.Tensor:
        """The split for this batch under the redraw policy, on the targets' device."""
        if self._fixed_table is not None:
            return self._fixed_table.to(targets.device)[targets]
        return self.draw_assignment(targets).to(targets.device)

    def teachers(self, clean_logits: Logits, assignment: torch.Tensor) -> list[torch.Tensor]:
        """Detached, masked and renormalized clean softmax per exit, given `assignment` from `assignment_for`.

        A row with no mass left (no classes assigned and the ground truth dropped, or underflow)
        stays all zero rather than dividing by zero: that sample then contributes no EOKD signal.
        """
        is_truth = assignment < 0
        result = []
        for i, out in enumerate(clean_logits):
            probs = F.softmax(out.detach() / self.temperature, dim=1)
            keep = assignment == i
            if self.keep_ground_truth:
                keep = keep | is_truth
            masked = probs * keep
            mass = masked.sum(dim=1, keepdim=True)
            result.append(masked / mass.clamp_min(torch.finfo(masked.dtype).tiny))
        return result

    def terms(
        self,
        clean_logits: Logits,
        adv_logits: Logits | None,
        targets: torch.Tensor,
        assignment: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """EOKD_i for every exit; `assignment` overrides the drawn split (tests, replay)."""
        adv_logits = _check_pair(clean_logits, adv_logits, type(self).__name__)
        if len(clean_logits) != self.num_exits:
            raise ValueError(f"EOKDLoss built for {self.num_exits} exits, got {len(clean_logits)}")
        if assignment is None:
            assignment = self.assignment_for(targets)
        scale = self.temperature**2
        return [
            scale * kl_divergence(teacher, F.log_softmax(adv / self.temperature, dim=1))
            for teacher, adv in zip(self.teachers(clean_logits, assignment), adv_logits)
        ]

    def __call__(
        self, clean_logits: Logits, adv_logits: Logits | None, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        terms = self.terms(clean_logits, adv_logits, targets)
        total = torch.stack(terms).sum()
        parts = {f"eokd/exit{i}": t.item() for i, t in enumerate(terms)}
        parts["total"] = total.item()
        return total, parts


class NeoKDLoss(MultiExitLoss):
    """NEO-KD: base + sum_i gamma_i * (alpha * NKD_i + beta * EOKD_i)."""

    def __init__(
        self,
        base: AdversarialLoss,
        nkd: NKDLoss,
        eokd: EOKDLoss,
        alpha: float = 3.0,
        beta: float = 1.0,
        gamma: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> None:
        self.base = base
        self.nkd = nkd
        self.eokd = eokd
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gamma = [float(g) for g in gamma]

    def __call__(
        self, clean_logits: Logits, adv_logits: Logits | None, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if len(self.gamma) != len(clean_logits):
            raise ValueError(f"gamma has {len(self.gamma)} weights for {len(clean_logits)} exits")
        base, base_parts = self.base(clean_logits, adv_logits, targets)
        nkd = self.nkd.terms(clean_logits, adv_logits)
        eokd = self.eokd.terms(clean_logits, adv_logits, targets)
        distill = torch.stack(
            [g * (self.alpha * n + self.beta * e) for g, n, e in zip(self.gamma, nkd, eokd)]
        ).sum()
        total = base + distill
        parts = {f"base/{key}": value for key, value in base_parts.items()}
        parts.update({f"nkd/exit{i}": t.item() for i, t in enumerate(nkd)})
        parts.update({f"eokd/exit{i}": t.item() for i, t in enumerate(eokd)})
        parts["distill"] = distill.item()
        parts["total"] = total.item()
        return total, parts


def build_loss(
    method: Method | str,
    *,
    num_classes: int,
    num_exits: int,
    alpha: float = 3.0,
    beta: float = 1.0,
    gamma: Sequence[float] | None = None,
    nkd_include_self: bool = True,
    eokd_keep_ground_truth: bool = True,
    eokd_redraw: RedrawPolicy | str = RedrawPolicy.BATCH,
    temperature: float = 1.0,
    base_weighting: BaseLossWeighting | str = BaseLossWeighting.RDI,
    seed: int | None = None,
) -> MultiExitLoss:
    """The loss for a training method; `gamma` defaults to 1 per exit; `seed` seeds EOKD's split draws."""
    try:
        method = Method(method)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in Method)
        raise ValueError(f"unknown method {method!r}; valid: {valid}") from None
    if method is Method.CLEAN:
        return CleanLoss()
    try:
        clean_weight, adv_weight = BaseLossWeighting(base_weighting).weights
    except ValueError:
        valid = ", ".join(repr(w.value) for w in BaseLossWeighting)
        raise ValueError(f"unknown base loss weighting {base_weighting!r}; valid: {valid}") from None
    base = AdversarialLoss(clean_weight=clean_weight, adv_weight=adv_weight)
    if method is Method.ADV:
        return base
    if method is Method.NEOKD:
        gamma = [1.0] * num_exits if gamma is None else list(gamma)
        if len(gamma) != num_exits:
            raise ValueError(f"gamma has {len(gamma)} weights for {num_exits} exits")
        return NeoKDLoss(
            base,
            NKDLoss(include_self=nkd_include_self, temperature=temperature),
            EOKDLoss(num_classes, num_exits, keep_ground_truth=eokd_keep_ground_truth, redraw=eokd_redraw,
                     seed=seed, temperature=temperature),
            alpha=alpha,
            beta=beta,
            gamma=gamma,
        )
    raise AssertionError(f"unhandled method {method!r}")
