"""The exit policy and the calibration that tunes it (numpy only; shared with the server)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from early_exit.policy import (
    BudgetEntry, BudgetError, ConfidenceMeasure, confidence, deepest_exit_within, entry_for_budget,
    select_exits, softmax,
)
from training.calibrate import NEVER, ExitOutputs, RobustConstraint, apply_policy, calibrate_table, policy_correct

COSTS = [2.0, 15.0, 20.0]


def test_select_exits_first_confident_exit_and_last_allowed_always_answers():
    conf = np.array([[0.95, 0.1, 0.1], [0.5, 0.99, 0.2], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
    assert select_exits(conf, [0.9, 0.9, 0.9], max_exit=2).tolist() == [0, 1, 2, 2]
    assert select_exits(conf, [0.9, 0.9, 0.9], max_exit=1).tolist() == [0, 1, 1, 1]
    assert select_exits(conf, [0.9, 0.9, 0.9], max_exit=0).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        select_exits(conf, [0.9] * 3, max_exit=3)


def test_confidence_measures():
    p = softmax(np.array([[10.0, 0, 0], [0.0, 0, 0]]))
    mp = confidence(p, ConfidenceMeasure.MAX_PROB)
    ent = confidence(p, "entropy")
    assert mp[0] > 0.99 and mp[1] == pytest.approx(1 / 3)
    assert ent[0] > 0.99 and ent[1] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf") * -1, 1.0])
def test_budgets_below_cheapest_or_invalid_are_rejected(bad):
    with pytest.raises(BudgetError):
        deepest_exit_within(bad, COSTS)


def test_budget_caps_the_deepest_exit_and_selects_its_row():
    table = [BudgetEntry(c, k, (0.5 + k / 10,) * 3, 0.9, c) for k, c in enumerate(COSTS)]
    assert deepest_exit_within(14.9, COSTS) == 0
    assert entry_for_budget(14.9, table, COSTS).max_exit == 0
    assert entry_for_budget(15.0, table, COSTS).max_exit == 1
    assert entry_for_budget(1e9, table, COSTS).thresholds == (0.7, 0.7, 0.7)
    assert not math.isnan(entry_for_budget(19.99, table, COSTS).budget_mflops)


def _synthetic(n: int = 3000, seed: int = 0) -> ExitOutputs:
    """Exit k is right more often and more confident on easy samples, like a trained network."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    difficulty = rng.random(n)
    logits = []
    for k in range(3):
        l = rng.normal(size=(n, 10))
        l[np.arange(n), y] += (3 + 3 * k) * (1.2 - difficulty)
        logits.append(l)
    return ExitOutputs.from_logits(logits, y)


def test_calibration_meets_tolerance_and_saves_compute():
    val = _synthetic()
    table = calibrate_table(val, COSTS, tolerance=0.005)
    assert [r.max_exit for r in table] == [0, 1, 2]
    assert [r.budget_mflops for r in table] == COSTS
    correct = val.correct()
    for row in table:
        assert row.val_accuracy >= correct[:, row.max_exit].mean() - 0.005 - 1e-12
        assert row.val_mean_mflops <= row.budget_mflops + 1e-9
        # the figures stored in the table are what the shared policy gives on the same data
        res = apply_policy(val, row.thresholds, row.max_exit, COSTS)
        assert res.accuracy == pytest.approx(row.val_accuracy)
        assert res.mean_mflops == pytest.approx(row.val_mean_mflops)
        assert all(t == NEVER for t in row.thresholds[row.max_exit:])
    assert table[-1].val_mean_mflops < 0.8 * COSTS[-1]


def test_calibration_on_validation_transfers_to_fresh_data():
    table = calibrate_table(_synthetic(seed=1), COSTS, tolerance=0.005)
    test = _synthetic(seed=2)
    row = table[-1]
    res = apply_policy(test, row.thresholds, row.max_exit, COSTS)
    assert res.accuracy >= test.correct()[:, 2].mean() - 0.02


def test_per_row_thresholds_and_caps_equal_row_by_row_decisions():
    from early_exit.policy import select_exits

    rng = np.random.default_rng(3)
    conf = rng.random((200, 3))
    thresholds = rng.random((200, 3))
    caps = rng.integers(0, 3, 200)
    batched = select_exits(conf, thresholds, caps)
    one_by_one = [select_exits(conf[i:i + 1], thresholds[i], int(caps[i]))[0] for i in range(200)]
    assert batched.tolist() == one_by_one
    assert (batched <= caps).all()


def test_agreement_with_last_exit_counts_only_the_answers_that_left_there():
    from training.calibrate import agreement_with_last_exit

    # 4 samples, 3 exits, 2 classes: exit 1 is confident on samples 0-2 (and wrong on sample 2)
    probs = np.array([
        [[0.99, 0.01], [0.99, 0.01], [0.99, 0.01], [0.6, 0.4]],
        [[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.6, 0.4]],
        [[0.8, 0.2], [0.8, 0.2], [0.3, 0.7], [0.3, 0.7]],
    ])
    outputs = ExitOutputs(probs, np.array([0, 0, 1, 1]))
    entry = BudgetEntry(3.0, 2, (0.95, 0.95, NEVER), 1.0, 1.0)
    assert agreement_with_last_exit(outputs, entry) == [pytest.approx(2 / 3), None, 1.0]


def _attacked(clean: ExitOutputs, fooled_share: float, wrong_confidence: float, seed: int = 0) -> ExitOutputs:
    """`clean` with exit 1 made wrong at `wrong_confidence` on a share of samples (an attack on exit 1)."""
    rng = np.random.default_rng(seed)
    probs = clean.probs.copy()
    n, c = probs.shape[1], probs.shape[2]
    hit = rng.random(n) < fooled_share
    wrong = (clean.targets + 1) % c
    rest = (1.0 - wrong_confidence) / (c - 1)
    probs[0, hit] = rest
    probs[0, hit, wrong[hit]] = wrong_confidence
    return ExitOutputs(probs, clean.targets)


def test_robust_calibration_raises_early_thresholds_above_the_attacked_confidence():
    val = _synthetic()
    attacked = _attacked(val, fooled_share=0.3, wrong_confidence=0.97)
    plain = calibrate_table(val, COSTS, tolerance=0.005)[-1]
    robust = RobustConstraint((val, attacked), tolerance=0.01)
    row = calibrate_table(val, COSTS, tolerance=0.005, robust=robust)[-1]
    reference = robust.accuracy([NEVER] * 3, 2, ConfidenceMeasure.MAX_PROB)
    # clean-only thresholds let the attacked exit 1 answer; the robust ones keep the floor, at a clean cost
    assert robust.accuracy(plain.thresholds, 2, ConfidenceMeasure.MAX_PROB) < reference - 0.01
    assert robust.accuracy(row.thresholds, 2, ConfidenceMeasure.MAX_PROB) >= reference - 0.01 - 1e-12
    assert row.thresholds[0] > 0.97
    assert row.val_accuracy >= val.correct()[:, 2].mean() - 0.005 - 1e-12
    assert plain.val_mean_mflops <= row.val_mean_mflops <= COSTS[-1]


def test_policy_correct_is_the_per_sample_worst_case_over_sets():
    val = _synthetic(n=500)
    attacked = _attacked(val, fooled_share=0.5, wrong_confidence=0.99, seed=1)
    th = [0.9, 0.9, NEVER]
    both = policy_correct([val, attacked], th, 2)
    alone = [apply_policy(o, th, 2, COSTS) for o in (val, attacked)]
    assert both.mean() <= min(r.accuracy for r in alone)
    right = [o.correct()[np.arange(500), r.exits] for o, r in zip((val, attacked), alone)]
    assert both.tolist() == (right[0] & right[1]).tolist()
