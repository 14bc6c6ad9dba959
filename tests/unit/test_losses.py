"""Losses on hand-made tensors: teacher construction, masking, zero points, weighting, gradient routing."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import (
    AdversarialLoss,
    BaseLossWeighting,
    CleanLoss,
    EOKDLoss,
    Method,
    NeoKDLoss,
    NKDLoss,
    RedrawPolicy,
    build_loss,
    kl_divergence,
)


def _logits(num_exits: int, batch: int = 4, classes: int = 5, seed: int = 0, grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, classes, generator=g).requires_grad_(grad) for _ in range(num_exits)]


def _targets(batch: int = 4, classes: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed + 100))


# ---------------------------------------------------------------- KL helper

def test_kl_matches_torch_batchmean_and_ignores_zero_teacher_entries():
    teacher = F.softmax(torch.randn(3, 4), dim=1)
    student = F.log_softmax(torch.randn(3, 4), dim=1)
    expected = F.kl_div(student, teacher, reduction="batchmean")
    assert torch.allclose(kl_divergence(teacher, student), expected, atol=1e-6)
    sparse = torch.tensor([[0.5, 0.5, 0.0]])
    log_student = torch.tensor([[math.log(0.5), math.log(0.5), -math.inf]])
    assert kl_divergence(sparse, log_student).item() == 0.0


# ---------------------------------------------------------------- CE baselines

def test_clean_and_adversarial_losses():
    clean, adv, y = _logits(3), _logits(3, seed=1), _targets()
    ce_clean = [F.cross_entropy(c, y) for c in clean]
    ce_adv = [F.cross_entropy(a, y) for a in adv]
    total, parts = CleanLoss()(clean, None, y)
    assert torch.allclose(total, sum(ce_clean))
    assert parts["clean_ce/exit2"] == pytest.approx(ce_clean[2].item())
    total, parts = AdversarialLoss(clean_weight=0.25, adv_weight=0.75)(clean, adv, y)
    assert torch.allclose(total, sum(0.25 * c + 0.75 * a for c, a in zip(ce_clean, ce_adv)))
    assert parts["total"] == pytest.approx(total.item())
    assert CleanLoss.requires_adversarial is False and AdversarialLoss().requires_adversarial
    with pytest.raises(ValueError, match="adversarial"):
        AdversarialLoss()(clean, None, y)


# ---------------------------------------------------------------- NKD

def test_nkd_teachers_edges_and_middle():
    clean = _logits(4)
    p = [F.softmax(c, dim=1) for c in clean]
    t = NKDLoss().teachers(clean)
    assert torch.allclose(t[0], (p[0] + p[1]) / 2)
    assert torch.allclose(t[1], (p[0] + p[1] + p[2]) / 3)
    assert torch.allclose(t[2], (p[1] + p[2] + p[3]) / 3)
    assert torch.allclose(t[3], (p[2] + p[3]) / 2)
    t = NKDLoss(include_self=False).teachers(clean)
    assert torch.allclose(t[0], p[1])
    assert torch.allclose(t[1], (p[0] + p[2]) / 2)
    assert torch.allclose(t[3], p[2])
    with pytest.raises(ValueError, match="no neighbors"):
        NKDLoss(include_self=False).teachers(_logits(1))


def test_nkd_term_is_temperature_scaled_kl():
    clean, adv = _logits(3), _logits(3, seed=1)
    nkd = NKDLoss(temperature=2.0)
    teacher = (F.softmax(clean[0] / 2, dim=1) + F.softmax(clean[1] / 2, dim=1)) / 2
    expected = 4.0 * F.kl_div(F.log_softmax(adv[0] / 2, dim=1), teacher, reduction="batchmean")
    assert torch.allclose(nkd.terms(clean, adv)[0], expected, atol=1e-6)


def test_nkd_zero_when_student_equals_teacher():
    same = _logits(1)[0]
    clean = [same.clone() for _ in range(3)]  # identical exits: every neighbor average is softmax(same)
    total, parts = NKDLoss()(clean, [same.clone() for _ in range(3)], _targets())
    assert abs(total.item()) < 1e-6 and all(abs(parts[f"nkd/exit{i}"]) < 1e-6 for i in range(3))


# ---------------------------------------------------------------- EOKD

# 5 classes, 2 exits. Sample 0: truth 0, exit 0 owns {1, 3}, exit 1 owns {2, 4}.
# Sample 1: truth 1, exit 0 owns {2, 3}, exit 1 owns {0, 4}.
ASSIGNMENT = torch.tensor([[-1, 0, 1, 0, 1], [1, -1, 0, 0, 1]])
TARGETS = torch.tensor([0, 1])
PROBS = torch.tensor([[0.4, 0.1, 0.2, 0.2, 0.1], [0.1, 0.3, 0.2, 0.1, 0.3]])


def test_eokd_teacher_masking_and_renormalization():
    clean = [PROBS.log(), PROBS.log()]
    t = EOKDLoss(5, 2).teachers(clean, ASSIGNMENT)
    row_mass = torch.tensor([[0.7], [0.6]])
    assert torch.allclose(t[0], torch.tensor([[0.4, 0.1, 0, 0.2, 0], [0, 0.3, 0.2, 0.1, 0]]) / row_mass)
    assert torch.allclose(t[1], torch.tensor([[0.4, 0, 0.2, 0, 0.1], [0.1, 0.3, 0, 0, 0.3]]) / 0.7)
    t = EOKDLoss(5, 2, keep_ground_truth=False).teachers(clean, ASSIGNMENT)
    assert torch.allclose(t[0], torch.tensor([[0, 0.1, 0, 0.2, 0], [0, 0, 0.2, 0.1, 0]]) / 0.3)
    assert torch.allclose(t[1], torch.tensor([[0, 0, 0.2, 0, 0.1], [0.1, 0, 0, 0, 0.3]]) / torch.tensor([[0.3], [0.4]]))


def test_eokd_zero_when_student_is_the_masked_teacher():
    clean = [PROBS.log(), (PROBS.flip(1)).log()]
    eokd = EOKDLoss(5, 2)
    adv = [t.log() for t in eokd.teachers(clean, ASSIGNMENT)]  # -inf on the masked classes
    terms = eokd.terms(clean, adv, TARGETS, assignment=ASSIGNMENT)
    assert all(abs(t.item()) < 1e-6 for t in terms)


@pytest.mark.parametrize(("classes", "exits"), [(10, 3), (100, 7), (5, 4)])
def test_eokd_split_is_disjoint_covering_and_balanced(classes, exits):
    eokd = EOKDLoss(classes, exits, seed=0)
    y = torch.randint(0, classes, (64,), generator=torch.Generator().manual_seed(0))
    a = eokd.assignment_for(y)
    assert a.shape == (64, classes)
    assert torch.equal(a[torch.arange(64), y], torch.full((64,), -1))  # truth belongs to no exit
    non_truth = torch.ones_like(a, dtype=torch.bool)
    non_truth[torch.arange(64), y] = False
    assert torch.all((a[non_truth] >= 0) & (a[non_truth] < exits))  # one owner each: disjoint and covering
    sizes = torch.stack([(a == i).sum(dim=1) for i in range(exits)], dim=1)
    assert torch.all(sizes.sum(dim=1) == classes - 1)
    assert torch.all(sizes.max(dim=1).values - sizes.min(dim=1).values <= 1)
    assert len({tuple(row.tolist()) for row in a}) > 1  # random per sample


def test_eokd_redraw_policies():
    y = torch.tensor([3, 3, 7, 0])
    batch = EOKDLoss(10, 3, seed=0)
    assert not torch.equal(batch.assignment_for(y), batch.assignment_for(y))
    fixed = EOKDLoss(10, 3, redraw=RedrawPolicy.FIXED, seed=0)
    first = fixed.assignment_for(y)
    assert torch.equal(first, fixed.assignment_for(y))
    assert torch.equal(first[0], first[1])  # same truth, same split
    assert torch.equal(EOKDLoss(10, 3, seed=5).assignment_for(y), EOKDLoss(10, 3, seed=5).assignment_for(y))


def test_eokd_all_zero_teacher_row_is_safe():
    # 3 classes, 4 exits, truth dropped: at least two exits own nothing for every sample.
    eokd = EOKDLoss(3, 4, keep_ground_truth=False, seed=0)
    clean, adv = _logits(4, classes=3), _logits(4, classes=3, seed=1, grad=True)
    y = _targets(classes=3)
    teachers = eokd.teachers(clean, eokd.assignment_for(y))
    empty = sum(int((t.sum(dim=1) == 0).sum()) for t in teachers)
    assert empty >= 2 * 4
    for t in teachers:
        assert torch.all(torch.isfinite(t))
        assert torch.allclose(t.sum(dim=1)[t.sum(dim=1) > 0], torch.tensor(1.0))
    total, _ = eokd(clean, adv, y)
    grads = torch.autograd.grad(total, adv)
    assert torch.isfinite(total) and all(torch.all(torch.isfinite(g)) for g in grads)


# ---------------------------------------------------------------- NEO-KD

def test_neokd_total_is_base_plus_weighted_terms():
    clean, adv, y = _logits(3), _logits(3, seed=1), _targets()
    base, nkd = AdversarialLoss(), NKDLoss()
    eokd = EOKDLoss(5, 3, redraw=RedrawPolicy.FIXED, seed=0)
    gamma = (1.0, 1.5, 2.0)
    total, parts = NeoKDLoss(base, nkd, eokd, alpha=3.0, beta=0.5, gamma=gamma)(clean, adv, y)
    expected = base(clean, adv, y)[0] + sum(
        g * (3.0 * n + 0.5 * e) for g, n, e in zip(gamma, nkd.terms(clean, adv), eokd.terms(clean, adv, y))
    )
    assert torch.allclose(total, expected, atol=1e-6)
    assert parts["total"] == pytest.approx(total.item(), rel=1e-6)
    assert {"base/total", "nkd/exit0", "eokd/exit2", "distill"} <= parts.keys()
    with pytest.raises(ValueError, match="gamma"):
        NeoKDLoss(base, nkd, eokd, gamma=(1.0, 1.0))(clean, adv, y)


def test_distillation_gradient_reaches_adversarial_logits_only():
    clean, adv, y = _logits(3, grad=True), _logits(3, seed=1, grad=True), _targets()
    for loss in (NKDLoss(), EOKDLoss(5, 3, seed=0)):
        total, _ = loss(clean, adv, y)
        grads = torch.autograd.grad(total, clean + adv, allow_unused=True)
        assert all(g is None or torch.count_nonzero(g) == 0 for g in grads[:3])
        assert all(g is not None and torch.count_nonzero(g) > 0 for g in grads[3:])
    # In NEO-KD the clean logits get exactly the baseline's clean-CE gradient.
    eokd = EOKDLoss(5, 3, redraw=RedrawPolicy.FIXED, seed=0)
    neo, _ = NeoKDLoss(AdversarialLoss(), NKDLoss(), eokd)(clean, adv, y)
    base, _ = AdversarialLoss()(clean, adv, y)
    for g_neo, g_base in zip(torch.autograd.grad(neo, clean), torch.autograd.grad(base, clean)):
        assert torch.allclose(g_neo, g_base, atol=1e-7)


def test_build_loss():
    common = dict(num_classes=10, num_exits=3)
    assert isinstance(build_loss(Method.CLEAN, **common), CleanLoss)
    adv = build_loss("adv", **common, base_weighting="unweighted")
    assert type(adv) is AdversarialLoss and (adv.clean_weight, adv.adv_weight) == (1.0, 1.0)
    default = build_loss("adv", **common)
    assert (default.clean_weight, default.adv_weight) == (0.5, 0.5)  # RDI-Nets' weighting is the default
    neo = build_loss("neokd", **common, nkd_include_self=False, eokd_keep_ground_truth=False,
                     eokd_redraw="fixed", temperature=2.0, seed=1)
    assert isinstance(neo, NeoKDLoss) and neo.gamma == [1.0, 1.0, 1.0] and neo.alpha == 3.0
    assert neo.nkd.include_self is False and neo.eokd.redraw is RedrawPolicy.FIXED and neo.eokd.temperature == 2.0
    with pytest.raises(ValueError, match="'clean', 'adv', 'neokd'"):
        build_loss("trades", **common)
    with pytest.raises(ValueError, match="gamma"):
        build_loss("neokd", **common, gamma=(1.0,))
    with pytest.raises(ValueError, match="'rdi', 'unweighted'"):
        build_loss("adv", **common, base_weighting="half")


@pytest.mark.parametrize("weighting, weights", [(BaseLossWeighting.RDI, (0.5, 0.5)),
                                                (BaseLossWeighting.UNWEIGHTED, (1.0, 1.0))])
def test_neokd_base_loss_weighting(weighting, weights):
    """NEO-KD = weighted base CE + the distillation terms; the weighting scales the CE terms only."""
    clean, adv, y = _logits(3), _logits(3, seed=1), _targets()
    neo = build_loss("neokd", num_classes=5, num_exits=3, base_weighting=weighting, eokd_redraw="fixed", seed=0)
    total, parts = neo(clean, adv, y)
    ce = sum(weights[0] * F.cross_entropy(c, y) + weights[1] * F.cross_entropy(a, y) for c, a in zip(clean, adv))
    assert parts["base/total"] == pytest.approx(ce.item(), rel=1e-6)
    assert parts["total"] == pytest.approx(ce.item() + parts["distill"], rel=1e-6)


def test_neokd_on_a_smallcnn_batch_trains_every_exit():
    from training.attacks import PGD, AttackTarget
    from training.models import create_model

    torch.manual_seed(0)
    model = create_model("smallcnn")
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    x_adv = PGD(model, 0.3, 0.1, 1, target=AttackTarget.AVERAGE, seed=0)(x, y)
    assert model.training  # the attack gave the training mode back
    loss = build_loss("neokd", num_classes=10, num_exits=model.num_exits, seed=0)
    total, parts = loss(model(x), model(x_adv), y)
    total.backward()
    assert math.isfinite(parts["total"])
    for head in model.heads:
        assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in head.parameters())
