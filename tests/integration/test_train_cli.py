"""End to end on a real MNIST subset: train (neokd), resume (exact), calibrate, evaluate; CLI error handling;
the trainer's pieces (BatchNorm-aware clean/adversarial forwards, schedules, CIFAR augmentation per worker)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.config import TrainConfig, apply_overrides, load_config
from training.data import AugmentedTensorDataset, seed_worker
from training.models import create_model
from training.train import CleanAdvPair, build_optimizer, build_scheduler, separate_forwards, train

REPO = Path(__file__).resolve().parents[2]

TINY = ["iterations=12", "train_limit=1536", "batch_size=64", "attack_steps=2", "eps_warmup_iters=4",
        "eval_limit=64", "eval_steps=3", "eval_batch_size=64", "slowdown_steps=3", "val_size=1000",
        "log_every=4", "checkpoint_every=6", "lr_schedule=multistep", "lr_milestones=[10]", "apgd_steps=5",
        "policy_attack_steps=5"]


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
    assert ckpt["model_name"] == "smallcnn" and len(ckpt["cost"]["staged_mflops"]) == 3
    assert ckpt["dataset"]["name"] == "mnist" and len(ckpt["dataset"]["classes"]) == 10
    model = model_from_checkpoint(ckpt)
    assert len(model(torch.rand(2, 1, 28, 28))) == 3
    summary = json.loads((trained / "train.json").read_text())
    assert summary["steps"] == 12 and summary["samples"] == 12 * 64
    assert "nkd/exit0" in summary["history"][0] and "eokd/exit2" in summary["history"][0]
    assert summary["train_samples_per_s"] == pytest.approx(summary["samples"] / summary["train_seconds"])
    # the parts of the iterations, timed inside the run: they never add up to more than the whole
    timing = summary["timing"]
    parts = timing["parts_s"]
    assert timing["iterations"] == 12 and timing["seconds"] == pytest.approx(summary["train_seconds"])
    assert sum(parts[k] for k in ("data", "attack", "update", "other")) == pytest.approx(timing["seconds"])
    per_exit = [parts[f"attack/exit{k}"] for k in range(3)]
    assert all(t > 0 for t in per_exit) and sum(per_exit) + parts["attack/scoring"] <= parts["attack"] + 1e-9
    assert len(timing["attack_step_ms_per_exit"]) == 3


def test_resume_continues_from_last_checkpoint(trained, data_root):
    proc = run("-m", "training.train", "--preset", "mnist-quick", "--resume", "name=tiny",
               f"out_dir={trained.parent}", f"data_dir={data_root}", *TINY[1:], "iterations=14")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stderr and "at step 12" in proc.stderr
    assert json.loads((trained / "train.json").read_text())["steps"] == 14


def test_calibrate_then_evaluate_write_calibration_json_and_plots(trained):
    proc = run("-m", "training.calibrate", str(trained / "checkpoint.pt"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (trained / "calibration.json").is_file() and not (trained / "eval").exists()
    proc = run("-m", "training.evaluate", str(trained / "checkpoint.pt"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ev = json.loads((trained / "eval" / "eval.json").read_text())
    a = ev["anytime"]
    for key in ("clean", "average", "max-average"):
        assert len(a[key]) == 3 and all(0.0 <= v <= 1.0 for v in a[key])
    assert len(a["single"]) == 3 and all(len(s) == 3 for s in a["single"])
    assert ev["attacked_samples"] == 64 and ev["test_samples"] == 10000
    # the per-sample worst case over the papers' sets (clean included) is never above any of them, and the
    # strong suite's worst case is never above the papers'
    for k in range(3):
        assert a["pgd_worst_case"][k] <= min(a["clean"][k], a["max-average"][k], a["average"][k]) + 1e-9
        assert a["worst_case"][k] <= a["pgd_worst_case"][k] + 1e-9
    budgets = ev["budgeted"]["budgets"]
    assert [b["max_exit"] for b in budgets] == [1, 2, 3]
    for b in budgets:
        for s in ("clean", "max-average", "deepsloth"):
            assert sum(b[s]["exit_distribution"]) == pytest.approx(1.0)
            assert b[s]["mean_mflops"] <= b["budget_mflops"] + 1e-9
    for png in ev["plots"]:
        assert Path(png).stat().st_size > 1000
    # the calibration goes to calibration.json beside the checkpoint, which no step rewrites
    from training.calibrate import calibration_path, read_calibration

    checkpoint = trained / "checkpoint.pt"
    calibration = read_calibration(calibration_path(checkpoint), checkpoint)
    assert len(calibration.table) == 3
    assert calibration.default_budget_mflops == pytest.approx(calibration.cost.staged[-1])
    assert "calibration" not in load_checkpoint(checkpoint)
    assert calibration.exit_agreement is not None and len(calibration.exit_agreement) == 3
    assert calibration.exit_agreement[-1] in (1.0, None)
    for key in ("worst_case", "apgd-ce"):
        assert len(a[key]) == 3 and all(w <= m + 1e-9 for w, m in zip(a["worst_case"], a["max-average"]))
    default = ev["policy"]["budgets"][-1]
    assert default["robust_accuracy"] <= default["clean"]["accuracy"] + 1e-9
    assert ev["calibration"]["table"] == [r.to_dict() for r in calibration.table]  # judged by that calibration


@pytest.mark.parametrize("args, message", [
    (["--preset", "no-such-preset"], "unknown preset"),
    (["no_such_key=1"], "unknown config key"),
    (["model=resnet9000"], "unknown model"),
    (["iterations=lots"], "must be an integer"),
    (["method=magic"], "method must be one of"),
    (["data_dir=/nonexistent/data"], "missing"),
    (["iterations=true"], "iterations must be an integer, got True"),
    (["gamma=[1, 1]"], "gamma has 2 weights for 3 exits"),
    (["model_args={depth: 3}"], "do not fit model 'smallcnn'"),
])
def test_train_cli_errors_are_one_line_with_exit_code_2(args, message, tmp_path):
    proc = run("-m", "training.train", f"out_dir={tmp_path}", "iterations=1", *args)
    assert proc.returncode == 2, proc.stderr[-1500:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("step", ["training.calibrate", "training.evaluate"])
def test_calibrate_and_evaluate_clis_reject_missing_and_foreign_checkpoints(tmp_path, step):
    foreign = tmp_path / "foreign.pt"
    torch.save({"hello": 1}, foreign)
    for path in (tmp_path / "missing.pt", foreign):
        proc = run("-m", step, str(path))
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---------------------------------------------------------------- exact resume (in process)

RESUME = ["train_limit=160", "batch_size=32", "attack_steps=1", "eps_warmup_iters=2", "val_size=1000",
          "checkpoint_every=100", "log_every=100", "lr_schedule=multistep", "lr_milestones=[4]", "threads=1",
          "num_workers=0"]


@pytest.mark.parametrize("recipe", [
    ["method=neokd"],  # dropout, random starts, EOKD's redrawn splits, Adam
    ["method=adv", "optimizer=sgd", "lr=0.01", "lr_schedule=onecycle", "attack_model_mode=train"],
    # BatchNorm: separate clean / adversarial forwards, running statistics updated by the attack too
    ["model=resnet_me", "model_args={blocks_per_stage: 1, width: 4, in_channels: 1, image_size: 28}",
     "attack_model_mode=train"],
    ["method=neokd", "ema_decay=0.9"],  # the weight average is resumed too; the final checkpoint holds it
], ids=["neokd", "adv-onecycle", "neokd-batchnorm", "neokd-ema"])
def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, data_root, recipe):
    """8 steps straight == 3 steps, then --resume to 8: the resume lands mid-epoch (5 batches per epoch) and
    crosses an epoch boundary, so the data position and every random state must come back exactly."""
    common = [*RESUME, *recipe, f"out_dir={tmp_path}", f"data_dir={data_root}"]
    straight = train(load_config("mnist-quick", [*common, "name=straight", "iterations=8"]))
    if "lr_schedule=onecycle" in recipe:  # a one-cycle schedule is laid out for the whole run
        first = load_config("mnist-quick", [*common, "name=resumed", "iterations=8"])
        first.checkpoint_every = 3
        first.iterations = 8
        _train_until(first, 3)
    else:
        train(load_config("mnist-quick", [*common, "name=resumed", "iterations=3"]))
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["batch"] == 3
    resumed = train(load_config("mnist-quick", [*common, "name=resumed", "iterations=8"]), resume=True)
    a, b = load_checkpoint(straight)["state_dict"], load_checkpoint(resumed)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    last_a = load_checkpoint(tmp_path / "straight" / "last.pt")
    last_b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert (last_a["epoch"], last_a["batch"]) == (last_b["epoch"], last_b["batch"]) == (1, 3)
    assert torch.equal(last_a["rng"]["ranks"][0]["torch"], last_b["rng"]["ranks"][0]["torch"])


def test_ema_checkpoint_holds_the_average_of_the_iterates(tmp_path, data_root):
    """With ema_decay, checkpoint.pt holds the weight average, last.pt the last iterate and the average's state."""
    cfg = load_config("mnist-quick", [*RESUME, "method=adv", "ema_decay=0.5", "iterations=4", "name=ema",
                                      f"out_dir={tmp_path}", f"data_dir={data_root}"])
    final = load_checkpoint(train(cfg))["state_dict"]
    last = load_checkpoint(tmp_path / "ema" / "last.pt")
    ema = {k.removeprefix("module."): v for k, v in last["ema_state_dict"].items() if k.startswith("module.")}
    assert ema.keys() == final.keys() == last["state_dict"].keys()
    assert all(torch.equal(final[k], ema[k]) for k in final)
    assert any(not torch.equal(final[k], last["state_dict"][k]) for k in final)  # not the last iterate
    assert int(last["ema_state_dict"]["n_averaged"]) == 4


def _train_until(cfg: TrainConfig, steps: int) -> None:
    """Train `cfg` and stop right after the checkpoint at `steps` (an interrupted run)."""
    import training.train as trainer

    class Stop(Exception):
        pass

    original = trainer._save_resume

    def save_then_stop(*args, **kwargs):
        original(*args, **kwargs)
        raise Stop
    trainer._save_resume = save_then_stop
    try:
        with pytest.raises(Stop):
            train(cfg)
    finally:
        trainer._save_resume = original


# ---------------------------------------------------------------- trainer pieces

def test_batchnorm_models_get_separate_clean_and_adversarial_forwards():
    torch.manual_seed(0)
    resnet = create_model("resnet_me", blocks_per_stage=1, width=4).train()
    smallcnn = create_model("smallcnn").eval()
    cfg = TrainConfig()
    assert separate_forwards(cfg, resnet) and not separate_forwards(cfg, smallcnn)
    assert separate_forwards(apply_overrides(TrainConfig(), {"clean_adv_forward": "separate"}), smallcnn)
    assert not separate_forwards(apply_overrides(TrainConfig(), {"clean_adv_forward": "joint"}), resnet)
    x, x_adv = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    clean, adv = CleanAdvPair(resnet, separate=True)(x, x_adv)
    alone = resnet(x_adv)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(adv, alone))  # statistics of x_adv alone
    _, mixed = CleanAdvPair(resnet, separate=False)(x, x_adv)
    assert not torch.allclose(mixed[-1], alone[-1], atol=1e-4)  # a joint forward mixes the batch statistics
    xs, xs_adv = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)
    joint = CleanAdvPair(smallcnn, separate=False)(xs, xs_adv)
    apart = CleanAdvPair(smallcnn, separate=True)(xs, xs_adv)
    for j, p in zip(joint, apart):
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(j, p))


def test_onecycle_schedule_peaks_at_lr():
    cfg = apply_overrides(TrainConfig(), {"lr_schedule": "onecycle", "lr": 0.1, "iterations": 100,
                                          "onecycle_pct_start": 0.25, "optimizer": "sgd"})
    model = create_model("smallcnn")
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    lrs = []
    for _ in range(cfg.iterations):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1 / 25) and max(lrs) == pytest.approx(0.1, rel=1e-3)
    assert abs(lrs.index(max(lrs)) - 25) <= 1 and lrs[-1] < 1e-4
    assert optimizer.param_groups[0]["momentum"] == cfg.momentum  # momentum is not cycled


def test_cifar_augmentation_differs_between_workers_and_is_reproducible():
    """Every worker seeds its own crops and flips (the old dataset's one generator was copied into each)."""
    torch.manual_seed(0)
    image = torch.rand(1, 3, 32, 32)
    dataset = AugmentedTensorDataset(image.repeat(16, 1, 1, 1), torch.zeros(16, dtype=torch.long))

    def batches(seed: int) -> list[torch.Tensor]:
        loader = DataLoader(dataset, batch_size=8, shuffle=False, num_workers=2, worker_init_fn=seed_worker,
                            generator=torch.Generator().manual_seed(seed))
        return [x for x, _ in loader]

    first, second = batches(1)
    assert first.shape == (8, 3, 32, 32)
    assert not torch.equal(first, second), "the two workers repeated each other's augmentations"
    assert len({x.numpy().tobytes() for x in first}) > 1
    assert all(torch.equal(a, b) for a, b in zip(batches(1), [first, second]))
    assert not all(torch.equal(a, b) for a, b in zip(batches(2), [first, second]))
