"""Sanity checks that catch masked gradients or a broken attack (docs/method.md, "Evaluating robustness").

On a briefly trained SmallCNN (clean training, a few hundred steps on a few thousand MNIST images):
accuracy falls to about 0 as eps grows, more steps never help the defender, APGD is never weaker than
PGD-40 on the same images, every adversarial image lies in the eps-ball and in [0, 1], and the adaptive
policy attack hurts the deployed policy at least as much as the max-average attack does.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from early_exit.policy import ConfidenceMeasure
from training.attacks import AttackName, build_attack, keep_strongest
from training.calibrate import apply_policy, calibrate_table
from training.data import Split, load_tensors
from training.evaluate import evaluate, policy_targets
from training.models import MultiExitNetwork, create_model

N = 128  # attacked test images
EPS = 0.1  # a radius where this model is neither unbreakable nor already broken
NOISE = 3 / N  # "beyond noise": three images of N


@pytest.fixture(scope="module")
def net(data_root) -> MultiExitNetwork:
    torch.manual_seed(0)
    x, y = load_tensors("mnist", data_root, Split.TRAIN, limit=4096)
    model = create_model("smallcnn")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(300):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = sum(F.cross_entropy(out, y[idx]) for out in model(x[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def test_set(data_root) -> tuple[torch.Tensor, torch.Tensor]:
    return load_tensors("mnist", data_root, Split.TEST, limit=N)


def _correct(net: MultiExitNetwork, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """N x K: is exit k right on each image."""
    with torch.no_grad():
        return torch.stack([out.argmax(1) == y for out in net(x)], dim=1).numpy()


def _check_valid(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


def _attack(net, name, x, y, eps, step_size=0.01, steps=40, **kw) -> torch.Tensor:
    x_adv = build_attack(name, net, eps, step_size, steps, seed=0, **kw)(x, y)
    _check_valid(x_adv, x, eps)
    return x_adv


@pytest.fixture(scope="module")
def pgd40(net, test_set) -> list[torch.Tensor]:
    """The papers' PGD-40 (step 0.01, random start) on each exit at EPS."""
    x, y = test_set
    return [_attack(net, "single", x, y, EPS, exit=k) for k in range(net.num_exits)]


def test_model_learned_something(net, test_set):
    assert _correct(net, *test_set).mean(axis=0).min() > 0.85


@pytest.mark.parametrize("k", [0, 2])
def test_accuracy_falls_to_about_zero_as_eps_grows(net, test_set, k):
    x, y = test_set
    accuracy = [_correct(net, x, y)[:, k].mean()]
    for eps in (0.05, 0.15, 0.3, 0.45):
        x_adv = _attack(net, "single", x, y, eps, step_size=eps / 6, steps=15, exit=k)
        accuracy.append(_correct(net, x_adv, y)[:, k].mean())
    assert all(b <= a + NOISE for a, b in zip(accuracy, accuracy[1:])), accuracy
    assert accuracy[-1] <= 0.05, accuracy


def test_more_steps_never_help_the_defender(net, test_set, pgd40):
    x, y = test_set
    k = 1
    few = _correct(net, _attack(net, "single", x, y, EPS, steps=10, exit=k), y)[:, k].mean()
    many = _correct(net, pgd40[k], y)[:, k].mean()
    apgd_few = _correct(net, _attack(net, "apgd-ce", x, y, EPS, steps=10, exit=k), y)[:, k].mean()
    apgd_many = _correct(net, _attack(net, "apgd-ce", x, y, EPS, steps=40, exit=k), y)[:, k].mean()
    assert many <= few + NOISE and apgd_many <= apgd_few + NOISE, (few, many, apgd_few, apgd_many)


@pytest.mark.parametrize("k", [0, 2])
def test_apgd_is_never_weaker_than_pgd40(net, test_set, pgd40, k):
    x, y = test_set
    ce = _correct(net, _attack(net, "apgd-ce", x, y, EPS, steps=25, exit=k), y)[:, k]
    t = _correct(net, _attack(net, "apgd-t", x, y, EPS, steps=25, exit=k, target_classes=1), y)[:, k]
    pgd = _correct(net, pgd40[k], y)[:, k]
    assert (ce & t).mean() <= pgd.mean(), ((ce & t).mean(), pgd.mean())
    assert ce.mean() <= pgd.mean() + NOISE, (ce.mean(), pgd.mean())


def test_every_attack_stays_in_the_ball_and_the_unit_box(net, test_set):
    x, y = test_set
    x, y = x[:8], y[:8]
    thresholds = (0.9, 0.9, 1.01)
    for name in AttackName:
        kw = {"exit": 1} if name in (AttackName.SINGLE, AttackName.APGD_CE, AttackName.APGD_T) else {}
        if name is AttackName.POLICY:
            kw = {"exit": 1, "thresholds": thresholds}
        _attack(net, name, x, y, 0.3, step_size=0.1, steps=3, **kw)  # checks the ball and the box


def test_policy_attack_hurts_the_policy_at_least_as_much_as_max_average(net, test_set, pgd40, data_root):
    x, y = test_set
    staged = net.cost_profile().staged
    x_val, y_val = load_tensors("mnist", data_root, Split.VAL, val_size=1000, limit=1000)
    table = calibrate_table(evaluate(net, x_val, y_val).outputs, staged, tolerance=0.01)
    entry = table[-1]  # the default row: every exit may answer
    x_max = keep_strongest(net, pgd40, y)
    _check_valid(x_max, x, EPS)

    def policy_correct(x_adv: torch.Tensor) -> np.ndarray:
        outputs = evaluate(net, x_adv, y).outputs
        res = apply_policy(outputs, entry.thresholds, entry.max_exit, staged, ConfidenceMeasure.MAX_PROB)
        return outputs.correct()[np.arange(len(y)), res.exits]

    targets = [k for e, k in policy_targets(table) if e is entry]
    assert targets, "the default row must let some exit answer"
    policy = np.ones(len(y), dtype=bool)
    for k in targets:
        x_adv = _attack(net, "policy", x, y, EPS, steps=25, exit=k, thresholds=entry.thresholds,
                        max_exit=entry.max_exit)
        policy &= policy_correct(x_adv)
    max_average = policy_correct(x_max)
    assert policy.mean() <= max_average.mean(), (policy.mean(), max_average.mean())
    assert policy.mean() < policy_correct(x).mean()  # it does something at all

