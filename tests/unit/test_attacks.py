"""Attacks: contract (grads, modes, projection), strength, stage pruning, max-average choice, torchattacks parity."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from early_exit.policy import ConfidenceMeasure, select_exits
from training.attacks import (
    APGD,
    PGD,
    Attack,
    AttackModelMode,
    AttackName,
    AttackTarget,
    DeepSloth,
    ExitModel,
    MaxAveragePGD,
    PolicyAttack,
    build_attack,
    early_exit_uniform_ce,
    policy_loss,
    summed_exit_ce,
    wrong_margin,
)
from training.calibrate import ExitOutputs
from training.models import MultiExitNetwork, create_model

EPS, STEP, STEPS = 0.3, 0.05, 3
THRESHOLDS = (0.6, 0.7, 1.01)  # a budget row's thresholds: exits 1 and 2 may answer early, exit 3 is the cap
ALL_ATTACKS = [
    (AttackName.SINGLE, {"exit": 1}),
    (AttackName.AVERAGE, {}),
    (AttackName.MAX_AVERAGE, {}),
    (AttackName.DEEPSLOTH, {}),
    (AttackName.APGD_CE, {"exit": 1}),
    (AttackName.APGD_T, {"exit": 2, "target_classes": 2}),
    (AttackName.POLICY, {"exit": 1, "thresholds": THRESHOLDS}),
]
APGD_NAMES = (AttackName.APGD_CE, AttackName.APGD_T)
ATTACK_IDS = [name.value for name, _ in ALL_ATTACKS]


@pytest.fixture(scope="module")
def model() -> MultiExitNetwork:
    """A random SmallCNN with its heads' last layers scaled up: a fresh net's logits are nearly flat."""
    torch.manual_seed(0)
    net = create_model("smallcnn")
    with torch.no_grad():
        for head in net.heads:
            last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
            last.weight.mul_(20.0)
    return net.eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 28, 28, generator=g)
    x[0] = (x[0] > 0.5).float()  # saturated pixels exercise the [0, 1] clamp
    y = torch.randint(0, 10, (6,), generator=g)
    return x, y


def _make(name: AttackName, model: MultiExitNetwork, **kwargs) -> Attack:
    return build_attack(name, model, EPS, STEP, STEPS, seed=0, **kwargs)


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize(("name", "kwargs"), ALL_ATTACKS, ids=ATTACK_IDS)
def test_parameter_grads_untouched(model, batch, name, kwargs):
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.grad = torch.randn_like(p) if i % 2 == 0 else None
    before = [(p.grad, None if p.grad is None else p.grad.clone()) for p in params]
    _make(name, model, **kwargs)(*batch)
    for p, (ref, copy_) in zip(params, before):
        if ref is None:
            assert p.grad is None
        else:
            assert p.grad is ref and torch.equal(p.grad, copy_)
    for p in params:
        p.grad = None


@pytest.mark.parametrize("attack_mode", list(AttackModelMode))
@pytest.mark.parametrize("start_training", [True, False])
@pytest.mark.parametrize(("name", "kwargs"), ALL_ATTACKS, ids=ATTACK_IDS)
def test_mode_set_during_attack_and_restored(model, batch, name, kwargs, start_training, attack_mode):
    model.train(start_training)
    model.heads[0][-1][3].train(not start_training)  # a mixed state (one dropout flipped) must come back too
    expected = _modes(model)
    seen: list[bool] = []
    handle = model.stages[0].register_forward_hook(lambda m, i, o: seen.append(m.training))
    try:
        _make(name, model, model_mode=attack_mode, **kwargs)(*batch)
    finally:
        handle.remove()
    assert seen and all(t == (attack_mode is AttackModelMode.TRAIN) for t in seen)
    assert _modes(model) == expected
    model.eval()


class _Failing(Attack):
    def forward(self, x, y):
        assert not self.model.training
        raise RuntimeError("boom")


@pytest.mark.parametrize("start_training", [True, False])
def test_mode_restored_when_forward_raises(model, batch, start_training):
    model.train(start_training)
    expected = _modes(model)
    with pytest.raises(RuntimeError, match="boom"):
        _Failing(model, EPS)(*batch)
    assert _modes(model) == expected
    model.eval()


@pytest.mark.parametrize(("name", "kwargs"), ALL_ATTACKS, ids=ATTACK_IDS)
def test_result_in_eps_ball_and_unit_range(model, batch, name, kwargs):
    x, y = batch
    if name in APGD_NAMES:  # APGD leaves points the exit already gets wrong alone: label them as predicted
        with torch.no_grad():
            y = model.forward_exits(x, upto=kwargs["exit"])[kwargs["exit"]].argmax(1)
    x_adv = _make(name, model, **kwargs)(x, y)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert not torch.equal(x_adv, x)


def test_attack_works_inside_no_grad(model, batch):
    x, y = batch
    with torch.no_grad():
        x_adv = PGD(model, EPS, STEP, STEPS, target=AttackTarget.AVERAGE, random_start=False)(x, y)
    assert not torch.equal(x_adv, x)


def test_random_start_in_ball_and_seeded(model, batch):
    x, _ = batch
    start = PGD(model, EPS, STEP, 0, target=0, seed=3)(x, batch[1])  # 0 steps: the random start itself
    assert (start - x).abs().max() <= EPS + 1e-6 and start.min() >= 0 and start.max() <= 1
    assert (start - x).abs().max() > EPS / 2
    again = PGD(model, EPS, STEP, 0, target=0, seed=3)(x, batch[1])
    assert torch.equal(start, again)


@pytest.mark.parametrize("target", [0, 1, 2, AttackTarget.AVERAGE])
def test_pgd_raises_its_objective(model, batch, target):
    model.eval()
    x, y = batch
    attack = PGD(model, EPS, STEP, STEPS, target=target, seed=0)
    x_adv = attack(x, y)
    with torch.no_grad():
        assert attack.objective(x_adv, y) > attack.objective(x, y) + 0.05


class _Forbidden(nn.Module):
    def forward(self, x):
        raise AssertionError("a later stage or head ran")


@pytest.mark.parametrize("k", [0, 1])
def test_single_exit_attack_runs_only_its_prefix(model, batch, k):
    pruned = copy.deepcopy(model)
    for j in range(k + 1, pruned.num_exits):
        pruned.stages[j] = _Forbidden()
        pruned.heads[j] = _Forbidden()
    PGD(pruned, EPS, STEP, STEPS, target=k, seed=0)(*batch)


def test_max_average_keeps_the_strongest_candidate_per_sample(model, batch):
    model.eval()
    x, y = batch
    kept = MaxAveragePGD(model, EPS, STEP, STEPS, seed=7)(x, y)
    gen = torch.Generator().manual_seed(7)  # replay the K single-exit attacks with the same random stream
    candidates = torch.stack([PGD(model, EPS, STEP, STEPS, target=k, generator=gen)(x, y) for k in range(3)])
    with torch.no_grad():
        scores = torch.stack([summed_exit_ce(model, c, y) for c in candidates])  # (K, B)
        kept_score = summed_exit_ce(model, kept, y)
    best = scores.argmax(dim=0)
    assert torch.equal(kept, candidates[best, torch.arange(x.shape[0])])
    assert torch.all(kept_score >= scores.max(dim=0).values - 1e-5)


def test_deepsloth_pushes_early_exits_toward_uniform(model, batch):
    model.eval()
    x, y = batch
    x_adv = DeepSloth(model, steps=5, seed=0)(x, y)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    with torch.no_grad():
        assert early_exit_uniform_ce(model, x_adv) < early_exit_uniform_ce(model, x)
    assert torch.equal(DeepSloth(model, steps=5, seed=0)(x), x_adv)  # labels are ignored


class _ExitAsModel(nn.Module):
    """Exit k of a multi-exit network as a single-output classifier, for torchattacks."""

    def __init__(self, net: MultiExitNetwork, k: int) -> None:
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x):
        return self.net.forward_exits(x, upto=self.k)[self.k]


@pytest.mark.parametrize("k", [0, 2])
def test_single_exit_pgd_matches_torchattacks(model, batch, k):
    torchattacks = pytest.importorskip("torchattacks")
    model.eval()
    x, y = batch
    # torchattacks restores the wrapper's own mode on exit, so the wrapper must start in eval mode too.
    wrapped = _ExitAsModel(model, k).eval()
    theirs = torchattacks.PGD(wrapped, eps=EPS, alpha=STEP, steps=5, random_start=False)(x, y)
    assert not model.training
    ours = PGD(model, EPS, STEP, 5, target=k, random_start=False)(x, y)
    assert torch.allclose(ours, theirs, atol=1e-6)
    with torch.no_grad():
        ce_ours = F.cross_entropy(model.forward_exits(ours, upto=k)[k], y)
        ce_theirs = F.cross_entropy(model.forward_exits(theirs, upto=k)[k], y)
    assert torch.isclose(ce_ours, ce_theirs, rtol=1e-5)


def test_build_attack_names_and_errors(model):
    assert isinstance(build_attack("single", model, EPS, STEP, STEPS, exit=2), PGD)
    assert build_attack("apgd-ce", model, EPS, STEP, STEPS, exit=0).loss.value == "ce"
    assert build_attack("apgd-t", model, EPS, STEP, STEPS, exit=0).loss.value == "dlr-targeted"
    assert isinstance(build_attack("policy", model, EPS, STEP, STEPS, exit=1, thresholds=THRESHOLDS), PolicyAttack)
    for name in ("apgd-ce", "apgd-t", "policy"):
        with pytest.raises(ValueError, match="needs exit"):
            build_attack(name, model, EPS, STEP, STEPS)
    assert build_attack("average", model, EPS, STEP, STEPS).target is AttackTarget.AVERAGE
    assert isinstance(build_attack("max-average", model, EPS, STEP, STEPS), MaxAveragePGD)
    assert isinstance(build_attack(AttackName.DEEPSLOTH, model, 8 / 255, 0.002, 30), DeepSloth)
    with pytest.raises(ValueError, match="max-average"):
        build_attack("single-1", model, EPS, STEP, STEPS)
    with pytest.raises(ValueError, match="needs exit"):
        build_attack("single", model, EPS, STEP, STEPS)
    with pytest.raises(ValueError, match="only applies"):
        build_attack("average", model, EPS, STEP, STEPS, exit=0)
    with pytest.raises(ValueError, match="out of range"):
        PGD(model, EPS, STEP, STEPS, target=3)
    with pytest.raises(ValueError, match="step_size"):
        PGD(model, EPS, 0.0, STEPS, target=0)
    with pytest.raises(ValueError, match="labels"):
        PGD(model, EPS, STEP, STEPS, target=0)(torch.rand(2, 1, 28, 28))


def test_max_average_eps_reaches_every_single_exit_attack():
    """The trainer's eps warm-up sets `attack.eps`; every sub-attack must follow it."""
    from training.attacks import MaxAveragePGD
    from training.models import create_model

    attack = MaxAveragePGD(create_model("smallcnn"), eps=0.3, step_size=0.01, steps=1)
    attack.eps = 0.05
    assert [a.eps for a in attack.single_exit_attacks] == [0.05] * 3


# --- APGD (torchattacks) on one exit -------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["ce", "dlr-targeted"])
def test_apgd_matches_torchattacks_on_the_truncated_exit(model, batch, loss):
    torchattacks = pytest.importorskip("torchattacks")
    x, _ = batch
    with torch.no_grad():
        y = model.forward_exits(x, upto=1)[1].argmax(1)
    ours = APGD(model, EPS, 5, exit=1, loss=loss, target_classes=2, seed=3)(x, y)
    wrapped = ExitModel(model, 1).eval()
    if loss == "ce":
        ref = torchattacks.APGD(wrapped, norm="Linf", eps=EPS, steps=5, n_restarts=1, seed=3, loss="ce")
    else:
        ref = torchattacks.APGDT(wrapped, norm="Linf", eps=EPS, steps=5, n_restarts=1, seed=3, n_classes=10)
        ref.n_target_classes = 2
    assert torch.allclose(ours, ref(x, y), atol=1e-6)


def test_apgd_leaves_the_global_random_state_alone(model, batch):
    x, _ = batch
    with torch.no_grad():
        y = model(x)[0].argmax(1)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    APGD(model, EPS, 3, exit=0, seed=0)(x, y)
    assert torch.equal(torch.rand(3), expected)


def test_apgd_runs_only_its_exit_prefix(model, batch):
    pruned = copy.deepcopy(model)
    pruned.stages[2] = _Forbidden()
    pruned.heads[2] = _Forbidden()
    x, _ = batch
    for loss in ("ce", "dlr-targeted"):
        APGD(pruned, EPS, 3, exit=1, loss=loss, target_classes=1, seed=0)(x, torch.zeros(len(x), dtype=torch.long))


# --- the adaptive policy attack ------------------------------------------------------------------------------

def test_wrong_margin_sign():
    logits = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.5, 0.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(wrong_margin(logits, y), torch.tensor([-2.0, 1.5]))


@pytest.mark.parametrize("measure", list(ConfidenceMeasure))
def test_policy_loss_fooled_flags_agree_with_the_policy(measure):
    """The attack's own view of the policy (within exits 0..k) agrees with early_exit.policy on random logits."""
    g = torch.Generator().manual_seed(0)
    n, k, c = 400, 3, 10
    logits = [torch.randn(n, c, generator=g, dtype=torch.float64) * 3 for _ in range(k)]
    y = torch.randint(0, c, (n,), generator=g)
    thresholds = (0.5, 0.6, 1.01) if measure is ConfidenceMeasure.MAX_PROB else (0.3, 0.4, 1.01)
    outputs = ExitOutputs.from_logits([z.numpy() for z in logits], y.numpy())
    exits = select_exits(outputs.confidences(measure), thresholds, 2)
    assert 0 < (exits == 0).sum() < n and (exits == 2).sum() > 0  # the policy really chooses
    wrong = ~outputs.correct()[np.arange(n), exits]
    _, fooled = policy_loss(logits, y, thresholds, must_leave=False, measure=measure)  # aimed at exit 3, the cap
    assert np.array_equal(fooled.numpy(), wrong)
    _, fooled_by_2 = policy_loss(logits[:2], y, thresholds, must_leave=True, measure=measure)  # aimed at exit 2
    assert np.array_equal(fooled_by_2.numpy(), wrong & (exits <= 1))


def test_policy_loss_is_positive_exactly_when_every_condition_holds():
    y = torch.tensor([0])
    confident_wrong = torch.tensor([[0.0, 6.0, 0.0]])
    unconfident_right = torch.tensor([[0.5, 0.0, 0.0]])  # right, but max prob about 0.45 < 0.6
    confident_right = torch.tensor([[6.0, 0.0, 0.0]])
    loss, fooled = policy_loss([unconfident_right, confident_wrong], y, (0.6, 0.6, 1.01), must_leave=True)
    assert loss.item() > 0 and fooled.item()
    loss, fooled = policy_loss([confident_right, confident_wrong], y, (0.6, 0.6, 1.01), must_leave=True)
    assert not fooled.item()  # exit 1 answers, rightly


def test_policy_attack_raises_its_loss_and_rejects_impossible_targets(model, batch):
    x, y = batch
    attack = PolicyAttack(model, EPS, 5, exit=1, thresholds=THRESHOLDS, seed=0)
    with torch.no_grad():
        before, _ = attack.loss(x, y)
        after, _ = attack.loss(attack(x, y), y)
    assert after.sum() > before.sum()
    with pytest.raises(ValueError, match="never answers"):
        PolicyAttack(model, EPS, 5, exit=1, thresholds=(0.6, 1.01, 1.01), max_exit=2)
    with pytest.raises(ValueError, match="max_exit"):
        PolicyAttack(model, EPS, 5, exit=2, thresholds=THRESHOLDS, max_exit=1)
    PolicyAttack(model, EPS, 5, exit=1, thresholds=(0.6, 1.01, 1.01), max_exit=1)  # the cap always answers


def test_policy_attack_runs_only_its_exit_prefix(model, batch):
    pruned = copy.deepcopy(model)
    pruned.stages[2] = _Forbidden()
    pruned.heads[2] = _Forbidden()
    PolicyAttack(pruned, EPS, 3, exit=1, thresholds=THRESHOLDS, seed=0)(*batch)
