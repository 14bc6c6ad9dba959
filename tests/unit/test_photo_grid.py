"""bench.photo_grid: which test photos the deployed policy answers at each exit, clean and under DeepSloth."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.photo_grid import PhotoExits, main, photo_exits, write_grids
from training.config import load_config

CLASSES = ["ant", "bee", "cat"]
PRESET = "cifar10-jpeg-quick"


def _fake(clean_exits: list[int], attacked_exits: list[int]) -> PhotoExits:
    n = len(clean_exits)
    x = torch.rand(n, 3, 8, 8)
    labels = np.arange(n) % 3
    return PhotoExits(x, (x + 0.03).clamp(0, 1), labels, np.array(clean_exits), labels, np.array(attacked_exits),
                      (labels + 1) % 3, CLASSES, [1.0, 2.0, 4.0], 8 / 255)


def test_one_png_per_exit_with_a_row_of_attacked_photos_whose_exit_changed(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    photos = _fake(clean_exits=[0] * 10 + [1] * 3, attacked_exits=[2] * 9 + [0] + [1] * 3)
    with caplog.at_level(logging.INFO, logger="bench.photo_grid"):
        paths = write_grids(photos, tmp_path / "p", per_exit=8)
    assert [p.name for p in paths] == ["p-exit1.png", "p-exit2.png", "p-exit3.png"]
    heights = [Image.open(p).size[1] for p in paths]
    # exit 1: 8 shown clean (one row) + their 8 attacked versions (one row); exit 2: 3 clean, none moved
    assert heights[0] > heights[1]
    assert "10 photos at exit 1, 9 of them moved by DeepSloth" in caplog.text
    assert "0 photos at exit 3" in caplog.text


def _tiny_photo_checkpoint(tmp_path: Path) -> Path:
    """A 2-iteration NEO-KD ResNet (the preset's exits) on a folder of 16x16 colour photos, calibrated by the CLI."""
    from training import train
    from training.calibrate import main as calibrate_main

    for c, name in enumerate(CLASSES):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(12):
            base = np.random.default_rng(100 * c + i).integers(0, 256, (5, 5, 3), dtype=np.uint8)
            base[..., c] = 255
            Image.fromarray(base).resize((20, 20), Image.Resampling.BICUBIC).save(
                tmp_path / "imgs" / name / f"{i:03d}.png")
    argv = ["--preset", PRESET, f"data_dir={tmp_path / 'imgs'}", "input_size=16", "val_size=9",
            "test_size=12", "iterations=2", "batch_size=6", "eps_warmup_iters=0", "checkpoint_every=1000",
            "threads=1", "slowdown_steps=2", f"out_dir={tmp_path / 'runs'}", "name=photos"]
    assert train.main(argv) == 0
    ckpt = tmp_path / "runs" / "photos" / "checkpoint.pt"
    assert calibrate_main([str(ckpt), "--set", "calibration_robust_tolerance=null"]) == 0
    return ckpt


@pytest.fixture(scope="module")
def photo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_photo_checkpoint(tmp_path_factory.mktemp("photos"))


def test_grids_of_a_tiny_photo_checkpoint(photo_checkpoint: Path, tmp_path: Path) -> None:
    photos = photo_exits(photo_checkpoint, limit=10)
    exits = len(load_config(PRESET).exits) + 1  # the preset's named exits and the final one
    assert len(photos.labels) == 10 and photos.classes == CLASSES and len(photos.staged_mflops) == exits
    assert photos.clean.min() >= 0 and photos.clean.max() <= 1
    assert (photos.attacked - photos.clean).abs().max() <= photos.eps + 1e-6  # DeepSloth's L-inf ball
    assert photos.eps == pytest.approx(8 / 255)
    assert set(photos.clean_exits) | set(photos.attacked_exits) <= set(range(exits))
    assert main([str(photo_checkpoint), "--limit", "10", "--out-prefix", str(tmp_path / "g")]) == 0
    assert sorted(p.name for p in tmp_path.glob("g-exit*.png")) == [f"g-exit{k}.png" for k in range(1, exits + 1)]


def test_bench_train_reads_the_photo_evaluation_with_intervals_and_targets(photo_checkpoint: Path,
                                                                          tmp_path: Path) -> None:
    """eval.json of the tiny checkpoint -> bench-train's figures, the photo preset's targets and the .md table."""
    from bench.bench_train import evaluation_figures, markdown
    from bench.intervals import accuracy_interval
    from bench.train_targets import targets
    from training.evaluate import run_evaluation

    steps = {k: 1 for k in ("eval_steps", "slowdown_steps", "apgd_steps", "policy_attack_steps")}
    ev = run_evaluation(photo_checkpoint, out_dir=tmp_path / "eval", limit=6, overrides=steps)
    figures = evaluation_figures(ev)
    assert figures["samples"] == {"attacked": 6, "clean_test": 12}
    last = figures["exits"][-1]
    assert last["intervals"]["clean_acc"] == accuracy_interval(last["clean_acc"], 12).to_list()
    worst = last["adv_acc"]["strong_worst_case"]
    assert last["intervals"]["strong_worst_case"] == accuracy_interval(worst, 6).to_list()
    methods = {"adv": figures, "neokd": figures}
    t = targets(methods, "cifar10-jpeg-quick")
    assert t["policy_robust_accuracy_default_budget"]["target"] == pytest.approx(worst - 0.01)
    assert t["neokd_at_least_adv_every_exit"]["met"] is True  # the same model on both sides
    assert t["deepsloth_cost_rise_no_cap"]["measured"]["set"] == "deepsloth"
    assert "deepsloth_cost_rise_with_cap" in t
    timing = {"ms_per_iteration": {}, "share": {}, "achieved_gflops": {}}
    result = {"preset": "cifar10-jpeg-quick", "seed": 0, "eval_steps": 20, "machine": {"cpu": "test"}, "targets": t,
              "methods": {m: {**f, "throughput": timing, "train_seconds": 1.0} for m, f in methods.items()},
              "comparison": {"neokd_minus_adv_strong_worst_case": t["neokd_at_least_adv_every_exit"]["differences"]},
              "throughput": {"train_samples_per_s": 1.0, "bound_samples_per_s": 1.0, "ratio": 1.0}}
    md = markdown(result)
    lo, hi = last["intervals"]["strong_worst_case"]
    assert f"{worst:.4f} [{lo:.3f}, {hi:.3f}]" in md
    assert "| PGD-20 max-average | PGD-20 average |" in md  # the run's own eval_steps, not a fixed label
    assert "deepsloth_cost_rise_no_cap" in md and "reported" in md and "| neokd - adv |" in md


def test_exit_placement_judges_a_validation_evaluation_and_refuses_a_test_one(
        photo_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.exit_placement: the tiny run's val evaluation -> costs per exit, the policy, the photo targets."""
    import json

    from bench import exit_placement
    from training.evaluate import run_evaluation

    steps = {k: 1 for k in ("eval_steps", "slowdown_steps", "apgd_steps", "policy_attack_steps")}
    run_dir = photo_checkpoint.parent
    run_evaluation(photo_checkpoint, out_dir=run_dir / "eval-val", limit=5, overrides=steps, split="val")
    monkeypatch.setattr(exit_placement, "RESULTS", tmp_path)
    assert exit_placement.main(["--run", f"tiny={run_dir}", "--out", "placements"]) == 0
    result = json.loads((tmp_path / "placements.json").read_text())
    assert (tmp_path / result["plot"]).is_file() and result["machine"]["cpu_count"] >= 1
    row = result["placements"][0]
    assert row["label"] == "tiny" and row["samples"] == {"attacked": 5, "clean_test": 9}  # val_size=9
    assert row["recipe"]["method"] == "neokd" and row["recipe"]["iterations"] == 2
    fractions = [e["cost_over_full_network"] for e in row["exits"]]
    assert fractions == sorted(fractions) and fractions[-1] > 1  # staged: the early heads are paid for too
    judged = row["val_targets"]
    worst = row["exits"][-1]["strong_worst_case"]
    assert judged["policy_robust_accuracy_default_budget"]["target"] == pytest.approx(worst - 0.01)
    assert judged["policy_clean_cost_over_full_network"]["measured"] == pytest.approx(
        row["policy_default_budget"]["clean_cost_over_full_network"])

    ev = json.loads((run_dir / "eval-val" / "eval.json").read_text())
    other = tmp_path / "other"
    (other / "eval-val").mkdir(parents=True)
    (other / "eval-val" / "eval.json").write_text(json.dumps({**ev, "split": "test"}))
    with pytest.raises(ValueError, match="not 'val'"):
        exit_placement.placement_row("other", other, exit_placement.PhotoTargets())
