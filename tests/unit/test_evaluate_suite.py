"""training.evaluate: the attack suite's bookkeeping (worst cases, the policy judged per budget row, slowdown,
APGD-T on survivors), `--split val`, and an end-to-end run on a tiny checkpoint (eval.json, calibration.json)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from early_exit.policy import BudgetEntry, ConfidenceMeasure
from training.calibrate import ExitOutputs, read_calibration
from training.checkpoint import make_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.data import dataset_info
from training.evaluate import (
    EvalResult,
    evaluate,
    main,
    policy_row,
    policy_targets,
    run_evaluation,
    slowdown_row,
    slowdown_settings,
    worst_case_correct,
)
from training.models import create_model

STAGED = [1.0, 5.0, 10.0]
MAX_PROB = ConfidenceMeasure.MAX_PROB


def _entry(max_exit: int, thresholds) -> BudgetEntry:
    return BudgetEntry(STAGED[max_exit], max_exit, tuple(thresholds), 1.0, STAGED[max_exit])


def _set(predictions: list[list[int]], confident: list[list[bool]], targets=(0, 0, 0, 0)) -> EvalResult:
    """A fake set: per exit (outer list) each sample's predicted class, confident (p ~ 0.99) or not (p ~ 0.4)."""
    logits = []
    for pred, conf in zip(predictions, confident):
        z = np.zeros((len(pred), 4))
        for i, (p, c) in enumerate(zip(pred, conf)):
            z[i, p] = 6.0 if c else 0.5
        logits.append(z)
    return EvalResult(ExitOutputs.from_logits(logits, np.asarray(targets)), None)


def test_policy_targets_skip_exits_that_never_answer_and_share_identical_losses():
    table = [_entry(0, (1.01, 1.01, 1.01)), _entry(1, (0.9, 1.01, 1.01)), _entry(2, (0.9, 1.01, 1.01))]
    pairs = [(e.max_exit, k) for e, k in policy_targets(table)]
    # row 2 (cap exit 3): exit 1 answers (as in row 1, same loss: shared), exit 2 never does, exit 3 is the cap
    assert pairs == [(0, 0), (1, 0), (1, 1), (2, 2)]


def test_worst_case_is_per_sample_over_every_set():
    a = _set([[0, 1, 0, 0]] * 3, [[True] * 4] * 3)
    b = _set([[0, 0, 2, 0]] * 3, [[True] * 4] * 3)
    assert worst_case_correct({"a": a, "b": b}).tolist() == [[True] * 3, [False] * 3, [False] * 3, [True] * 3]


def test_policy_row_picks_a_wrong_answer_first_then_the_dearest():
    entry = _entry(2, (0.9, 0.9, 1.01))
    clean = _set([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], [[True, True, False, False]] * 3)
    # sample 0: fooled at exit 1 (confident, wrong); sample 1: pushed to the last exit, but right there
    slow = _set([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], [[True, False, False, False], [False] * 4, [False] * 4])
    row = policy_row(entry, {"clean": clean, "slow": slow}, STAGED, MAX_PROB)
    assert row["clean"]["accuracy"] == 1.0 and row["clean"]["mean_mflops"] == pytest.approx((1 + 1 + 10 + 10) / 4)
    assert row["robust_accuracy"] == 0.75  # sample 0 is lost
    # picked: sample 0 the wrong answer (exit 1, cost 1), samples 1-3 the dearer set (slow: last exit, 10)
    assert row["robust_mean_mflops"] == pytest.approx((1 + 10 + 10 + 10) / 4)
    assert row["robust_exit_distribution"] == [0.25, 0.0, 0.75]
    assert row["by_set"]["slow"]["accuracy"] == 0.75 and row["weakest_set"] == "slow"


def test_slowdown_row_measures_early_exits_below_the_rows_cap():
    entry = _entry(1, (0.9, 1.01, 1.01))
    clean = _set([[0] * 4] * 3, [[True, True, True, False]] * 3)
    sloth = _set([[0] * 4] * 3, [[False, False, True, False]] * 3)
    row = slowdown_row(entry, {"clean": clean, "deepsloth": sloth}, STAGED, MAX_PROB)
    assert row["clean"]["early_exit_rate"] == 0.75 and row["deepsloth"]["early_exit_rate"] == 0.25
    assert row["clean"]["mean_mflops"] == pytest.approx((3 * 1 + 5) / 4)
    assert row["cost_rise"]["deepsloth"] == pytest.approx((1 + 3 * 5) / 4 - (3 * 1 + 5) / 4)


def test_slowdown_runs_at_the_accuracy_radius_with_a_scaled_step():
    runs = slowdown_settings(TrainConfig(eval_eps=0.3, slowdown_eps=8 / 255, slowdown_step_size=0.002))
    assert [r["name"] for r in runs] == ["deepsloth", "deepsloth@0.03137"]
    assert runs[0]["eps"] == 0.3 and runs[0]["step_size"] == pytest.approx(0.002 * 0.3 / (8 / 255))
    assert runs[1]["step_size"] == 0.002
    same = slowdown_settings(TrainConfig(eval_eps=8 / 255, slowdown_eps=8 / 255))
    assert len(same) == 1 and same[0]["name"] == "deepsloth" and same[0]["step_size"] == 0.002


def test_evaluate_attacks_only_the_rows_asked_for():
    torch.manual_seed(0)
    net = create_model("smallcnn").eval()
    x, y = torch.rand(6, 1, 28, 28), torch.zeros(6, dtype=torch.long)
    seen = []

    def blank(xb, yb):
        seen.append(len(xb))
        return torch.zeros_like(xb)

    only = np.array([True, False, True, False, False, True])
    result = evaluate(net, x, y, blank, batch_size=4, keep_inputs=True, only=only)
    assert seen == [2, 1]
    assert result.inputs[only].abs().sum() == 0 and torch.equal(result.inputs[~only], x[~only])


TINY = dict(val_size=300, eval_batch_size=64, eval_steps=2, slowdown_steps=2, apgd_steps=2, apgd_target_classes=1,
            policy_attack_steps=2, calibration_tolerance=0.05)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_root):
    torch.manual_seed(0)
    net = create_model("smallcnn")
    cfg = TrainConfig(name="tiny", data_dir=str(data_root), **TINY)
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    save_checkpoint(make_checkpoint(net, dataset_info("mnist").to_dict(), cfg.to_dict()), path)
    return path


def test_run_evaluation_end_to_end(checkpoint):
    ev = run_evaluation(checkpoint, limit=12)
    assert json.loads((checkpoint.parent / "eval" / "eval.json").read_text())["split"] == "test"
    assert ev["split"] == "test" and ev["attacked_samples"] == 12 and ev["test_samples"] == 10000
    a, k = ev["anytime"], 3
    for key in ("clean", "average", "max-average", "pgd_worst_case", "apgd-ce", "apgd-t", "worst_case"):
        assert len(a[key]) == k, key
    for j in range(k):  # the worst case is never above any attack on that exit
        assert a["worst_case"][j] <= min(a["apgd-ce"][j], a["apgd-t"][j], a["pgd_worst_case"][j], a["clean"][j])
        assert a["apgd-t"][j] <= a["apgd-ce"][j] and a["pgd_worst_case"][j] <= a["max-average"][j]
    assert {"apgd-ce/exit1", "apgd-t/exit3", "policy/cap3/exit3", "deepsloth", "max-average"} <= set(
        a["worst_case_sets"])
    assert "deepsloth@0.03137" in a["worst_case_sets"]  # DeepSloth's own radius (8/255) lies inside eval_eps
    rows = ev["policy"]["budgets"]
    assert [r["max_exit"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["robust_accuracy"] <= min(v["accuracy"] for v in r["by_set"].values())
        assert r["robust_mean_mflops"] <= r["budget_mflops"] + 1e-9
        assert sum(r["robust_exit_distribution"]) == pytest.approx(1.0)
    sloth = ev["slowdown"]["budgets"]
    assert ev["slowdown_attack"]["eps"] == 0.3 and {"clean", "deepsloth"} <= set(sloth[-1])
    assert ev["timing"]["per_100_samples"]["total"] > 0 and "policy" in ev["timing"]["family_seconds"]
    cal = read_calibration(checkpoint.with_name("calibration.json"), checkpoint)
    assert cal.evaluation["policy"][-1]["robust_accuracy"] == rows[-1]["robust_accuracy"]
    assert cal.evaluation["anytime"]["worst_case"] == a["worst_case"] and cal.evaluation["split"] == "test"
    assert {"slowdown", "budgeted", "attack"} <= set(cal.evaluation)
    for png in ev["plots"]:
        assert (checkpoint.parent / "eval" / png.split("/")[-1]).stat().st_size > 1000


def test_split_val_attacks_validation_images_and_leaves_calibration_alone(checkpoint, caplog):
    calibration = checkpoint.with_name("calibration.json")
    before = calibration.read_bytes() if calibration.exists() else None
    with caplog.at_level(logging.INFO, logger="training.evaluate"):
        assert main([str(checkpoint), "--split", "val", "--limit", "8", "--set", "strong_eval=false"]) == 0
    ev = json.loads((checkpoint.parent / "eval-val" / "eval.json").read_text())
    assert ev["split"] == "val" and ev["split_samples"] == 300 and "test_samples" not in ev
    assert "clean_full_test" not in ev["anytime"] and "apgd-ce" not in ev["anytime"]
    assert ev["attack"]["strong_eval"] is False
    assert any("split: val" in m for m in caplog.messages)
    assert (calibration.read_bytes() if calibration.exists() else None) == before


def test_bad_strong_suite_settings_are_one_line_errors(checkpoint, capsys):
    assert main([str(checkpoint), "--limit", "4", "--set", "apgd_steps=0", "--no-calibration"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apgd_steps must be >= 1" in err[0]


def test_robust_calibration_attacks_validation_images_and_keeps_its_floor(checkpoint, tmp_path):
    ev = run_evaluation(checkpoint, tmp_path / "eval", limit=8, write_calibration_file=False, split="val",
                        overrides={"strong_eval": False, "calibration_robust_tolerance": 0.0,
                                   "calibration_attack_limit": 40})
    robust = ev["calibration"]["robust"]
    assert robust["samples"] == 40 and robust["tolerance"] == 0.0
    assert [r["budget_mflops"] for r in robust["rows"]] == ev["cost"]["staged_mflops"]
    for row in robust["rows"]:  # tolerance 0: the chosen thresholds lose nothing on the attacked images
        assert row["val_robust_accuracy"] >= row["reference"] - 1e-12
    assert run_evaluation(checkpoint, tmp_path / "plain", limit=8, write_calibration_file=False, split="val",
                          overrides={"strong_eval": False})["calibration"]["robust"] is None
