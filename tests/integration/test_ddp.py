"""Multi-process training: `torchrun --nproc_per_node 2 -m training.train` with DistributedDataParallel on
2 CPU processes (gloo), a tiny MNIST subset; the replicas must end bit-identical, and equal to the checkpoint,
while their randomness (dropout, attack starts, EOKD splits) differs; throughput counts both ranks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.config import load_config
from training.train import build_model, parameter_sha256

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# A few NEO-KD steps with a 1-step attack: enough for gradients to differ per rank (each sees its own shard),
# so only DDP's all-reduce keeps the replicas equal.
TINY = ["iterations=6", "train_limit=512", "batch_size=32", "attack_steps=1", "eps_warmup_iters=2",
        "val_size=1000", "checkpoint_every=100", "log_every=2", "lr_schedule=multistep", "lr_milestones=[5]", "threads=1",
        "num_workers=0"]


def test_torchrun_two_cpu_processes_keep_replicas_identical(tmp_path: Path, data_root: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "training.train", "--preset", "mnist-quick", "name=ddp", f"out_dir={tmp_path}",
         f"data_dir={data_root}", "device=cpu", *TINY],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads((tmp_path / "ddp" / "train.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert summary["samples"] == 6 * 32 * 2, "each rank trains on its own batch of 32"
    hashes = summary["replica_param_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1], f"replicas diverged: {hashes}"
    rng = summary["replica_rng_sha256"]
    assert len(rng) == 2 and rng[0] != rng[1], "both ranks drew the same random numbers"
    # both ranks train at once: the rate is all samples over the slower rank's time
    assert summary["train_seconds"] == max(summary["replica_train_seconds"])
    assert summary["train_samples_per_s"] == pytest.approx(summary["samples"] / summary["train_seconds"])
    assert summary["train_samples_per_s"] > summary["train_samples_per_s_per_rank"]
    last = load_checkpoint(tmp_path / "ddp" / "last.pt")  # resumable per rank
    assert last["rng"]["world_size"] == 2
    assert not torch.equal(last["rng"]["ranks"][0]["torch"], last["rng"]["ranks"][1]["torch"])

    # Rank 0's checkpoint is that replica, and training moved it away from the (shared) initialization.
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    trained = model_from_checkpoint(ckpt)
    assert parameter_sha256(trained) == hashes[0]
    cfg = load_config("mnist-quick", TINY)
    torch.manual_seed(cfg.seed)  # what every rank starts from
    assert parameter_sha256(build_model(cfg)) != hashes[0], "the parameters did not change"


def _torchrun(tmp_path: Path, data_root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "training.train", "--preset", "mnist-quick", f"out_dir={tmp_path}", f"data_dir={data_root}",
         "device=cpu", *TINY, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_torchrun_resume_restores_every_rank(tmp_path: Path, data_root: Path) -> None:
    """6 steps straight == 3 steps and a resume to 6, under DDP: each rank gets its own random state back
    (8 batches of 32 per rank and epoch, so the resume lands mid-epoch)."""
    _torchrun(tmp_path, data_root, "name=straight")
    _torchrun(tmp_path, data_root, "name=resumed", "iterations=3")
    proc = _torchrun(tmp_path, data_root, "--resume", "name=resumed")
    assert "at step 3 (epoch 0, batch 3)" in proc.stderr, proc.stderr[-3000:]
    straight = json.loads((tmp_path / "straight" / "train.json").read_text())["replica_param_sha256"]
    resumed = json.loads((tmp_path / "resumed" / "train.json").read_text())["replica_param_sha256"]
    assert straight == resumed
