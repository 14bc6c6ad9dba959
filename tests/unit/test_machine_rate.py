"""train.json's machine rate and efficiency (training/train.py): an iteration's FLOPs, counted by FlopCounterMode,
equal the sum of its parts worked out by hand on a linear two-exit network; the achieved rate of a short run
against the machine's is a ratio in (0, 1.5); measuring changes nothing in the run."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from training.config import TrainConfig
from training.models.base import MultiExitNetwork
from training.train import build_objective, count_iteration_flops, measure_machine_rate, train

IN, WIDTH, CLASSES, BATCH, STEPS = 4, 8, 10, 6, 3


class TwoExitLinear(MultiExitNetwork):
    """stage 0: Linear(4, 8) + ReLU, head 0: Linear(8, 10); stage 1: Linear(8, 8) + ReLU, head 1: Linear(8, 10)."""

    def __init__(self) -> None:
        super().__init__(
            [nn.Sequential(nn.Linear(IN, WIDTH), nn.ReLU()), nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU())],
            [nn.Linear(WIDTH, CLASSES), nn.Linear(WIDTH, CLASSES)], input_shape=(IN,))


def mm(rows: int, a: int, b: int) -> int:
    """FLOPs of a (rows x a) @ (a x b) product: a multiply-add is 2."""
    return 2 * rows * a * b


def config(attack: str) -> TrainConfig:
    return TrainConfig(dataset="mnist", method="neokd", attack=attack, attack_steps=STEPS, eps=0.1, step_size=0.05,
                       batch_size=BATCH, gamma=[1.0, 1.0], device="cpu")


@pytest.mark.parametrize("attack", ["max-average", "average"])
def test_iteration_flops_equal_the_sum_of_their_parts(attack):
    torch.manual_seed(0)
    model = TwoExitLinear()
    cfg = config(attack)
    x, y = torch.rand(BATCH, IN), torch.arange(BATCH) % CLASSES
    counts = count_iteration_flops(model, cfg, build_objective(cfg, model), x, y)

    s0, h0, s1, h1 = (mm(BATCH, IN, WIDTH), mm(BATCH, WIDTH, CLASSES), mm(BATCH, WIDTH, WIDTH),
                      mm(BATCH, WIDTH, CLASSES))
    full = s0 + h0 + s1 + h1
    if attack == "max-average":
        # exit 0's PGD runs stage 0 and head 0 only; its input gradient goes back through both
        exit0 = STEPS * (s0 + h0 + h0 + s0)
        # exit 1's prefix is the whole network, forward; the input gradient skips head 0 (CE_1 does not use it)
        exit1 = STEPS * (full + h1 + s1 + s0)
        scoring = 2 * full  # one no-grad forward per candidate
        expected_attack = exit0 + exit1 + scoring
    else:
        expected_attack = STEPS * 2 * full  # every step: the full forward and the input gradient through all of it
    # no BatchNorm: one forward of the clean and adversarial rows together (2 x BATCH), then the backward: every
    # layer's weight gradient, and the input gradient of every layer but the first (the images need none)
    update = 2 * full + 2 * full + 2 * (h0 + s1 + h1)
    assert counts["attack"] == expected_attack
    assert counts["update"] == update
    assert counts["total"] == expected_attack + update
    assert all(p.grad is None for p in model.parameters())


def test_measuring_leaves_the_run_untouched_and_reports_a_positive_rate():
    torch.manual_seed(0)
    model = TwoExitLinear()
    cfg = config("max-average")
    objective = build_objective(cfg, model)
    generators = {"eokd": objective.eokd.generator, "attack": torch.Generator().manual_seed(3)}
    before = ({k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state(),
              {k: g.get_state() for k, g in generators.items()})
    rate = measure_machine_rate(model, cfg, objective, generators, torch.device("cpu"), repeats=3)
    assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), before[1])
    assert all(torch.equal(g.get_state(), before[2][k]) for k, g in generators.items())
    assert len(rate.pass_seconds) == 3 and rate.gflops_per_s > 0
    # the plain pass: forward of everything, weight gradients of everything, input gradients of all but stage 0
    full = sum(mm(BATCH, a, b) for a, b in ((IN, WIDTH), (WIDTH, CLASSES), (WIDTH, WIDTH), (WIDTH, CLASSES)))
    assert rate.pass_flops == 2 * full + mm(BATCH, WIDTH, CLASSES) * 2 + mm(BATCH, WIDTH, WIDTH)
    eff = rate.efficiency(iterations=10, seconds=2.0)
    assert eff["achieved_gflops_per_s"] == pytest.approx(rate.iteration_flops["total"] * 10 / 2.0 / 1e9)
    assert eff["ratio"] == pytest.approx(eff["achieved_gflops_per_s"] / rate.gflops_per_s)


def test_a_short_run_writes_its_efficiency_in_train_json(tmp_path, data_root):
    cfg = TrainConfig(dataset="mnist", data_dir=str(data_root), name="rate", out_dir=str(tmp_path), device="cpu",
                      method="neokd", iterations=8, train_limit=512, val_size=1000, batch_size=64, attack_steps=2,
                      step_size=0.1, lr_milestones=[100], checkpoint_every=100, threads=2)
    train(cfg)
    summary = json.loads((tmp_path / "rate" / "train.json").read_text())
    rate, eff = summary["machine_rate"], summary["efficiency"]
    assert rate["batch_size"] == 64 and rate["gflops_per_s"] > 0 and len(rate["pass_seconds"]) >= 3
    parts = rate["iteration_gflop"]
    assert parts["attack"] > 0 and parts["update"] > 0
    assert parts["total"] == pytest.approx(parts["attack"] + parts["update"])
    assert eff["iterations"] == 8 and eff["seconds"] == pytest.approx(summary["train_seconds"])
    assert eff["achieved_gflops_per_s"] == pytest.approx(parts["total"] * 8 / eff["seconds"])
    assert 0 < eff["ratio"] < 1.5
