"""An adaptive attack on the deployed early-exit policy (docs/method.md, "Evaluating robustness").

The policy answers at the first exit whose confidence reaches its threshold, or at the deepest exit the
budget allows. It is a different classifier from any single exit, so it is attacked as such: an
attacker who knows the thresholds of a budget row aims at an exit k and asks that

- every earlier exit i < k does not answer correctly: it is wrong, or its confidence stays below t_i
  (an exit whose threshold is above 1 never answers and asks nothing);
- exit k answers, wrongly: it is wrong and its confidence reaches t_k (when k is the deepest allowed
  exit it answers anyway, so wrong is enough).

Each condition is a slack in nats, positive when it holds (wrong: the CW margin
max_{j != y} z_j - z_y; unconfident: log t_i - log conf_i; confident: log conf_k - log t_k), capped at
`kappa` as in the CW loss so that met conditions stop pulling; the attack ascends their sum with
APGD's L-infinity ascent (random start, momentum, step halved where progress stalls; plain PGD with a
fixed step proved much weaker here), and keeps per sample the best iterate: one that fools the policy
within exits 0..k, else the one with the highest loss.
Judging is done afterwards, by `training.calibrate.apply_policy`, at every budget row.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from early_exit.policy import ConfidenceMeasure
from training.attacks.base import Attack, AttackModelMode, require_labels
from training.models.base import MultiExitNetwork


def wrong_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per sample, max_{j != y} z_j - z_y: positive exactly when the prediction is wrong (the CW margin)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.max(dim=1).values - true


def log_confidence(logits: torch.Tensor, measure: ConfidenceMeasure) -> torch.Tensor:
    """log of the policy's confidence (early_exit.policy.confidence) in torch, differentiable."""
    logp = F.log_softmax(logits, dim=1)
    if measure is ConfidenceMeasure.MAX_PROB:
        return logp.max(dim=1).values
    entropy = -(logp.exp() * logp).sum(dim=1)
    return torch.log((1.0 - entropy / math.log(logits.shape[1])).clamp_min(1e-12))


def policy_loss(
    logits: Sequence[torch.Tensor], y: torch.Tensor, thresholds: Sequence[float], must_leave: bool,
    measure: ConfidenceMeasure = ConfidenceMeasure.MAX_PROB, kappa: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample loss to ascend, per-sample "the policy answers wrongly within these exits").

    `logits` are exits 0..k, the last one the target; `must_leave`: exit k is not the deepest allowed
    exit, so it must reach its threshold to answer.
    """
    k = len(logits) - 1
    terms = []
    fooled = torch.zeros_like(y, dtype=torch.bool)
    decided = torch.zeros_like(y, dtype=torch.bool)
    for i, z in enumerate(logits):
        margin = wrong_margin(z, y)
        log_conf = log_confidence(z, measure)
        t = float(thresholds[i])
        can_leave = t <= 1.0
        log_t = math.log(t) if can_leave else 0.0
        if i < k:
            if not can_leave:
                continue
            slack = torch.maximum(margin, log_t - log_conf)  # wrong, or not confident enough to answer
            leaves = log_conf >= log_t
        else:
            slack = torch.minimum(margin, log_conf - log_t) if must_leave else margin
            leaves = log_conf >= log_t if must_leave else torch.ones_like(decided)
        terms.append(slack.clamp(max=kappa))
        leaves = leaves & ~decided
        fooled |= leaves & (margin > 0)
        decided |= leaves
    return torch.stack(terms).sum(dim=0), fooled


def apgd_ascent(
    x: torch.Tensor, start: torch.Tensor, objective: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    eps: float, steps: int, project: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rho: float = 0.75, momentum: float = 0.75,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """APGD's L-infinity ascent (Croce & Hein 2020, as in torchattacks' APGD) on any per-sample objective.

    `objective(x_adv)` -> (per-sample loss, per-sample success). Step 2*eps, momentum, and per sample the
    step halved (and the iterate reset to its best point) at checkpoints where the loss rose in fewer than
    `rho` of the steps since the last one, or neither the step nor the best loss changed. Returns the best
    iterate per sample (a successful one first, else the highest loss), its loss and its success flag.
    """
    n = len(x)
    dev = x.device
    view = (-1,) + (1,) * (x.dim() - 1)

    def loss_grad(x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_adv = x_adv.detach().requires_grad_(True)
        loss, success = objective(x_adv)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        return loss.detach(), success.detach(), grad.detach()

    x_cur = start.detach()
    loss, success, grad = loss_grad(x_cur)
    best_x, best_loss, best_ok = x_cur.clone(), loss.clone(), success.clone()
    ckpt_x, ckpt_grad, ckpt_loss = x_cur.clone(), grad.clone(), loss.clone()  # the loss-best point (step control)
    step = torch.full((n,), 2.0 * eps, device=dev)
    x_prev = x_cur.clone()
    window = max(int(0.22 * steps), 1)
    window_min, window_decrease = max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    since_check, increases = 0, torch.zeros(n, device=dev)
    loss_at_check, reduced_at_check = ckpt_loss.clone(), torch.ones(n, dtype=torch.bool, device=dev)
    last_loss = loss.clone()
    for i in range(steps):
        a = momentum if i > 0 else 1.0
        z = project(x_cur + step.view(view) * grad.sign(), x)
        x_next = project(x_cur + a * (z - x_cur) + (1.0 - a) * (x_cur - x_prev), x)
        x_prev, x_cur = x_cur, x_next
        loss, success, grad = loss_grad(x_cur)
        better = (success & ~best_ok) | ((success == best_ok) & (loss > best_loss))
        best_x[better], best_loss[better], best_ok[better] = x_cur[better], loss[better], success[better]
        increases += (loss > last_loss).float()
        last_loss = loss
        improved = loss > ckpt_loss
        ckpt_x[improved], ckpt_grad[improved], ckpt_loss[improved] = x_cur[improved], grad[improved], loss[improved]
        since_check += 1
        if since_check == window:
            oscillating = increases <= window * rho
            stalled = ~reduced_at_check & (loss_at_check >= ckpt_loss)
            reduce = oscillating | stalled
            reduced_at_check, loss_at_check = reduce.clone(), ckpt_loss.clone()
            step[reduce] /= 2.0
            x_cur[reduce], grad[reduce] = ckpt_x[reduce], ckpt_grad[reduce]
            since_check, increases = 0, torch.zeros(n, device=dev)
            window = max(window - window_decrease, window_min)
    return best_x, best_loss, best_ok


class PolicyAttack(Attack):
    """Drive the early-exit policy of one budget row to a wrong answer at or before exit `exit` (0-based).

    `thresholds`: the row's per-exit thresholds (above 1: the exit never answers); `max_exit`: the row's
    deepest allowed exit (default: the last). Exit `exit` must be able to answer under them. Optimizer:
    APGD's ascent (`apgd_ascent`: random start, momentum, adaptive step), `steps` iterations per restart.
    """

    def __init__(
        self,
        model: MultiExitNetwork,
        eps: float,
        steps: int = 100,
        *,
        exit: int,  # noqa: A002
        thresholds: Sequence[float],
        max_exit: int | None = None,
        measure: ConfidenceMeasure | str = ConfidenceMeasure.MAX_PROB,
        kappa: float = 1.0,
        restarts: int = 1,
        model_mode: AttackModelMode | str = AttackModelMode.EVAL,
        random_start: bool = True,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(model, eps, model_mode=model_mode, random_start=random_start, generator=generator,
                         seed=seed)
        k = model.num_exits
        max_exit = k - 1 if max_exit is None else int(max_exit)
        if len(thresholds) != k:
            raise ValueError(f"need one threshold per exit ({k}), got {len(thresholds)}")
        if not 0 <= exit <= max_exit < k:
            raise ValueError(f"target exit {exit} must lie in [0, max_exit={max_exit}] of a {k}-exit model")
        if exit < max_exit and thresholds[exit] > 1.0:
            raise ValueError(f"exit {exit} never answers under threshold {thresholds[exit]}; nothing to aim at")
        if kappa <= 0 or restarts < 1 or steps < 1:
            raise ValueError(f"kappa must be > 0, restarts and steps >= 1, got {kappa}, {restarts}, {steps}")
        self.steps, self.restarts = int(steps), int(restarts)
        self.exit, self.max_exit = int(exit), max_exit
        self.thresholds = tuple(float(t) for t in thresholds)
        self.measure = ConfidenceMeasure(measure)
        self.kappa = float(kappa)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample loss and fooled flags on exits 0..exit (the later stages cannot change them)."""
        logits = self.model.forward_exits(x, upto=self.exit)
        return policy_loss(logits, y, self.thresholds, self.exit < self.max_exit, self.measure, self.kappa)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        y = require_labels(y, self)
        best, best_loss, best_ok = None, None, None
        with torch.enable_grad():
            for _ in range(self.restarts):
                x_adv, loss, ok = apgd_ascent(x, self.start_point(x), lambda xa: self.loss(xa, y), self.eps,
                                              self.steps, self.project)
                if best is None:
                    best, best_loss, best_ok = x_adv, loss, ok
                    continue
                better = (ok & ~best_ok) | ((ok == best_ok) & (loss > best_loss))
                best[better], best_loss[better], best_ok[better] = x_adv[better], loss[better], ok[better]
        return best

    def __repr__(self) -> str:
        return (f"PolicyAttack(exit {self.exit}, max_exit={self.max_exit}, eps={self.eps:.4g}, steps={self.steps}, "
                f"restarts={self.restarts})")
