"""training.evaluate: the typed attack suite (its runs, names, progress and timing), its bookkeeping (worst
cases, the policy judged per budget row, slowdown, APGD-T on survivors), `--split val`, and end to end on a
tiny checkpoint: training.calibrate writes calibration.json, training.evaluate reads it and writes eval/."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil

import numpy as np
import pytest
import torch

from early_exit.policy import BudgetEntry, ConfidenceMeasure
from training.attacked_sets import EvalResult, evaluate
from training.calibrate import CalibrationError, ExitOutputs, calibration_path, read_calibration
from training.calibrate import main as calibrate_main
from training.calibration_attack import calibrate_checkpoint
from training.checkpoint import make_checkpoint, save_checkpoint
from training.config import ConfigError, TrainConfig
from training.data import dataset_info
from training.evaluate import (
    AttackRun,
    AttackSuite,
    EvaluationError,
    Family,
    RunKind,
    attack_timing,
    evaluation_dir,
    main,
    plan_suite,
    policy_row,
    policy_targets,
    read_evaluation,
    run_evaluation,
    slowdown_row,
    slowdown_runs,
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
    runs = slowdown_runs(TrainConfig(eval_eps=0.3, slowdown_eps=8 / 255, slowdown_step_size=0.002))
    assert [r.name for r in runs] == ["deepsloth", "deepsloth@0.03137"]
    assert runs[0].eps == 0.3 and runs[0].step_size == pytest.approx(0.002 * 0.3 / (8 / 255))
    assert runs[1].step_size == 0.002
    same = slowdown_runs(TrainConfig(eval_eps=8 / 255, slowdown_eps=8 / 255))
    assert len(same) == 1 and same[0].name == "deepsloth" and same[0].step_size == 0.002
    assert {r.family for r in runs} == {Family.DEEPSLOTH}


def test_runs_name_their_sets_and_the_plan_follows_the_config():
    entry = _entry(1, (0.9, 1.01, 1.01))
    assert AttackRun(RunKind.CLEAN).name == "clean" and AttackRun(RunKind.MAX_AVERAGE, 0.3).name == "max-average"
    assert AttackRun(RunKind.SINGLE, 0.3, exit=0).name == "single/exit1"
    assert AttackRun(RunKind.APGD_T, 0.3, exit=2).name == "apgd-t/exit3"
    assert AttackRun(RunKind.POLICY, 0.3, exit=0, target=entry).name == "policy/cap2/exit1"
    assert AttackRun(RunKind.AVERAGE, 0.3).family is Family.PGD and AttackRun(RunKind.POLICY).family is Family.POLICY
    table = [_entry(0, (1.01, 1.01, 1.01)), entry, _entry(2, (0.9, 1.01, 1.01))]
    cfg = TrainConfig(eval_eps=0.3, slowdown_eps=8 / 255)
    strong = plan_suite(cfg, 3, table)
    weak = plan_suite(TrainConfig(eval_eps=0.3, slowdown_eps=8 / 255, strong_eval=False), 3, table)
    assert [r.name for r in weak] == ["clean", "single/exit1", "single/exit2", "single/exit3", "average",
                                      "max-average", "deepsloth", "deepsloth@0.03137"]
    assert strong[:len(weak)] == weak and len(strong) == len(weak) + 2 * 3 + len(policy_targets(table))
    assert len({r.name for r in strong}) == len(strong)  # every set has its own name
    # APGD-T's DLR loss needs 4 classes: a 3-class model is evaluated without it, not crashed
    three = plan_suite(cfg, 3, table, num_classes=3)
    assert [r for r in strong if r.kind is not RunKind.APGD_T] == list(three)
    assert not any(r.kind is RunKind.APGD_T for r in three)


def test_attack_timing_groups_runs_by_family():
    runs = [AttackRun(RunKind.CLEAN), AttackRun(RunKind.SINGLE, 0.3, exit=0), AttackRun(RunKind.MAX_AVERAGE, 0.3),
            AttackRun(RunKind.DEEPSLOTH, 0.3), AttackRun(RunKind.DEEPSLOTH, 0.03, own_radius=True)]
    sets = {r: _set([[0] * 4] * 3, [[True] * 4] * 3) for r in runs}
    for seconds, s in zip((0.5, 1.0, 2.0, 4.0, 8.0), sets.values()):
        s.seconds = seconds
    t = attack_timing(sets, 4)
    assert t["family_seconds"] == {"clean": 0.5, "pgd": 3.0, "deepsloth": 12.0}
    assert t["seconds"]["deepsloth@0.03"] == 8.0 and t["total_seconds"] == 15.5
    assert t["per_100_samples"]["total"] == pytest.approx(100 * 15.5 / 4)


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


def _tiny_checkpoint(path, data_root, seed: int = 0):
    torch.manual_seed(seed)
    net = create_model("smallcnn")
    cfg = TrainConfig(name="tiny", data_dir=str(data_root), **TINY)
    return save_checkpoint(make_checkpoint(net, dataset_info("mnist").to_dict(), cfg.to_dict()), path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_root):
    """A tiny checkpoint, calibrated by the calibration step's command line (calibration.json beside it)."""
    path = _tiny_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint.pt", data_root)
    assert calibrate_main([str(path)]) == 0
    return path


def test_the_suite_makes_exactly_the_planned_runs_and_counts_them(checkpoint):
    torch.manual_seed(0)
    model = create_model("smallcnn").eval()
    cfg = TrainConfig(**{**TINY, "apgd_steps": 1, "policy_attack_steps": 1, "eval_steps": 1, "slowdown_steps": 1})
    table = read_calibration(calibration_path(checkpoint), checkpoint).table
    runs = plan_suite(cfg, model.num_exits, table)
    suite = AttackSuite(model, cfg, torch.rand(5, 1, 28, 28), torch.arange(5), runs,
                        ConfidenceMeasure.MAX_PROB)
    sets = suite.run_all()
    assert list(sets) == list(runs) and suite.progress.total == len(runs) == suite.progress.n
    assert any(r.kind is RunKind.POLICY for r in sets) and any(r.kind is RunKind.APGD_T for r in sets)


def test_calibrate_cli_writes_the_calibration_evaluate_reads(checkpoint):
    calibration_file = calibration_path(checkpoint)
    calibration = read_calibration(calibration_file, checkpoint)
    assert len(calibration.table) == 3 and calibration.summary["validation_samples"] == 300
    assert calibration.summary["robust"] is None  # calibration_robust_tolerance is null in this config
    ev = run_evaluation(checkpoint, limit=12)
    assert ev["calibration"]["table"] == [r.to_dict() for r in calibration.table]
    assert ev["calibration"]["exit_agreement_val"] == list(calibration.exit_agreement)
    assert ev["calibration_file"] == str(calibration_file)
    assert ev["calibration_sha256"] == hashlib.sha256(calibration_file.read_bytes()).hexdigest()
    assert [r["budget_mflops"] for r in ev["policy"]["budgets"]] == [r.budget_mflops for r in calibration.table]

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
    assert set(ev["timing"]["seconds"]) == set(a["worst_case_sets"])  # every set timed, by its run's name
    headline = read_evaluation(evaluation_dir(checkpoint) / "eval.json", calibration.checkpoint_sha256,
                               calibration_file)
    assert headline["policy"][-1]["robust_accuracy"] == rows[-1]["robust_accuracy"]
    assert headline["anytime"]["worst_case"] == a["worst_case"] and headline["split"] == "test"
    assert {"slowdown", "budgeted", "attack"} <= set(headline)
    for png in ev["plots"]:
        assert (checkpoint.parent / "eval" / png.split("/")[-1]).stat().st_size > 1000


def test_split_val_attacks_validation_images_with_the_same_calibration(checkpoint, caplog):
    calibration = calibration_path(checkpoint)
    before = calibration.read_bytes()
    with caplog.at_level(logging.INFO, logger="training.evaluate"):
        assert main([str(checkpoint), "--split", "val", "--limit", "8", "--set", "strong_eval=false"]) == 0
    ev = json.loads((checkpoint.parent / "eval-val" / "eval.json").read_text())
    assert ev["split"] == "val" and ev["split_samples"] == 300 and "test_samples" not in ev
    assert "clean_full_test" not in ev["anytime"] and "apgd-ce" not in ev["anytime"]
    assert ev["attack"]["strong_eval"] is False
    assert any("split: val" in m for m in caplog.messages)
    assert calibration.read_bytes() == before  # evaluation never writes the calibration
    table = read_calibration(calibration, checkpoint).table
    assert ev["calibration"]["table"] == [r.to_dict() for r in table]
    with pytest.raises(EvaluationError, match="evaluates the val split"):  # export takes test figures only
        read_evaluation(checkpoint.parent / "eval-val" / "eval.json", ev["checkpoint_sha256"], calibration)


def test_bad_strong_suite_settings_are_one_line_errors(checkpoint, capsys):
    assert main([str(checkpoint), "--limit", "4", "--set", "apgd_steps=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apgd_steps must be >= 1" in err[0]
    assert main([str(checkpoint), "--limit", "4", "--set", "calibration_tolerance=0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calibration_tolerance" in err[0] and "training.calibrate" in err[0]


def test_evaluate_refuses_a_calibration_of_other_weights(checkpoint, tmp_path, capsys):
    other = _tiny_checkpoint(tmp_path / "checkpoint.pt", checkpoint.parent, seed=1)
    shutil.copy(calibration_path(checkpoint), calibration_path(other))
    with pytest.raises(CalibrationError, match="other weights"):
        run_evaluation(other, limit=4)
    assert main([str(other), "--limit", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other weights" in err[0] and "training.calibrate" in err[0]
    assert not (tmp_path / "eval").exists()
    calibration_path(other).unlink()
    assert main([str(other), "--limit", "4"]) == 2
    assert "calibrate the checkpoint first" in capsys.readouterr().err


def test_robust_calibration_attacks_validation_images_and_keeps_its_floor(checkpoint, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    shutil.copy(checkpoint, ckpt)
    calibration, _ = calibrate_checkpoint(ckpt, {"calibration_robust_tolerance": 0.0,
                                                 "calibration_attack_limit": 40})
    robust = calibration.summary["robust"]
    assert robust["samples"] == 40 and robust["tolerance"] == 0.0 and robust["attack_seconds"] > 0
    assert [r["budget_mflops"] for r in robust["rows"]] == list(calibration.cost.staged)
    for row in robust["rows"]:  # tolerance 0: the chosen thresholds lose nothing on the attacked images
        assert row["val_robust_accuracy"] >= row["reference"] - 1e-12
    ev = run_evaluation(ckpt, tmp_path / "eval", limit=8, split="val", overrides={"strong_eval": False})
    assert ev["calibration"]["robust"] == robust  # the evaluation reports the calibration it was judged by
    plain, _ = calibrate_checkpoint(ckpt)
    assert plain.summary["robust"] is None
    with pytest.raises(ConfigError, match="calibration_robust_tolerance"):
        run_evaluation(ckpt, tmp_path / "eval", limit=8, overrides={"calibration_robust_tolerance": 0.0})
