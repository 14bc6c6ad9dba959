"""End to end on a real MNIST subset: train (neokd), resume, evaluate + calibrate; CLI error handling."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.checkpoint import load_checkpoint, model_from_checkpoint

REPO = Path(__file__).resolve().parents[2]

TINY = ["iterations=12", "train_limit=1536", "batch_size=64", "attack_steps=2", "eps_warmup_iters=4",
        "eval_limit=64", "eval_steps=3", "eval_batch_size=64", "slowdown_steps=3", "val_size=1000",
        "log_every=4", "checkpoint_every=6", "lr_milestones=[10]"]


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root) -> Path:
    out = tmp_path_factory.mktemp("runs")
    proc = run("-m", "training.train", "--preset", "mnist-quick", "name=tiny", f"out_dir={out}",
               f"data_dir={data_root}", *TINY)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "tiny"


def test_training_writes_config_checkpoint_and_summary(trained):
    assert (trained / "config.yaml").is_file()
    ckpt = load_checkpoint(trained / "checkpoint.pt")
    assert ckpt["config"]["method"] == "neokd" and ckpt["config"]["iterations"] == 12
    assert ckpt["model_name"] == "smallcnn" and len(ckpt["exit_mflops"]) == 3
    assert ckpt["dataset"]["name"] == "mnist" and len(ckpt["dataset"]["classes"]) == 10
    model = model_from_checkpoint(ckpt)
    assert len(model(torch.rand(2, 1, 28, 28))) == 3
    summary = json.loads((trained / "train.json").read_text())
    assert summary["steps"] == 12 and summary["samples"] == 12 * 64
    assert "nkd/exit0" in summary["history"][0] and "eokd/exit2" in summary["history"][0]


def test_resume_continues_from_last_checkpoint(trained, data_root):
    proc = run("-m", "training.train", "--preset", "mnist-quick", "--resume", "name=tiny",
               f"out_dir={trained.parent}", f"data_dir={data_root}", *TINY[1:], "iterations=14")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stderr and "at step 12" in proc.stderr
    assert json.loads((trained / "train.json").read_text())["steps"] == 14


def test_evaluate_calibrates_and_writes_json_and_plots(trained):
    proc = run("-m", "training.evaluate", str(trained / "checkpoint.pt"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ev = json.loads((trained / "eval" / "eval.json").read_text())
    a = ev["anytime"]
    for key in ("clean", "average", "max-average"):
        assert len(a[key]) == 3 and all(0.0 <= v <= 1.0 for v in a[key])
    assert len(a["single"]) == 3 and all(len(s) == 3 for s in a["single"])
    assert ev["attacked_samples"] == 64 and ev["test_samples"] == 10000
    # the max-average set is at least as damaging to the summed loss as each single attack: per exit, its
    # accuracy is never above the clean accuracy
    assert all(m <= c + 1e-9 for m, c in zip(a["max-average"], a["clean"]))
    budgets = ev["budgeted"]["budgets"]
    assert [b["max_exit"] for b in budgets] == [1, 2, 3]
    for b in budgets:
        for s in ("clean", "max-average", "deepsloth"):
            assert sum(b[s]["exit_distribution"]) == pytest.approx(1.0)
            assert b[s]["mean_mflops"] <= b["budget_mflops"] + 1e-9
    for png in ev["plots"]:
        assert Path(png).stat().st_size > 1000
    ckpt = load_checkpoint(trained / "checkpoint.pt")
    assert len(ckpt["calibration"]["table"]) == 3
    assert ckpt["calibration"]["default_budget_mflops"] == ckpt["exit_mflops"][-1]
    assert ckpt["evaluation"]["anytime"]["clean"] == a["clean"]


@pytest.mark.parametrize("args, message", [
    (["--preset", "no-such-preset"], "unknown preset"),
    (["no_such_key=1"], "unknown config key"),
    (["model=resnet9000"], "unknown model"),
    (["iterations=lots"], "must be an integer"),
    (["method=magic"], "method must be one of"),
    (["data_dir=/nonexistent/data"], "does not exist"),
])
def test_train_cli_errors_are_one_line_with_exit_code_2(args, message, tmp_path):
    proc = run("-m", "training.train", f"out_dir={tmp_path}", "iterations=1", *args)
    assert proc.returncode == 2, proc.stderr[-1500:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr


def test_evaluate_cli_rejects_missing_and_foreign_checkpoints(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"hello": 1}, foreign)
    for path in (tmp_path / "missing.pt", foreign):
        proc = run("-m", "training.evaluate", str(path))
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
