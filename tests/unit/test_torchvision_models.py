"""`model: torchvision:<builder>`: cutting, equivalence, refusals, in-place safety, stems, weights, heads,
NEO-KD steps, export parity and the heads-first phase, on small random-init configurations (32x32 or less)."""
from __future__ import annotations

import copy
import logging
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tests.torchvision_cases import SMALL_CASES, build_case, export_case
from training.models import create_model
from training.models import torchvision_net as tvn
from training.models.torchvision_net import BackboneError, WeightsUnavailable

REPO = Path(__file__).resolve().parents[2]
TINY_RESNET = {"block": "basic", "layers": [1, 1, 1, 1], "input_shape": (3, 32, 32)}


@pytest.fixture(params=sorted(SMALL_CASES))
def case(request: pytest.FixtureRequest) -> str:
    return request.param


def test_builds_cut_where_asked_and_chains_to_its_own_forward(case: str) -> None:
    model = build_case(case)
    name, kwargs = SMALL_CASES[case]
    assert model.model_name == name and model.num_exits == 3
    assert model.model_args["exits"] == model.exit_names and len(model.exit_names) == 2
    if isinstance(kwargs.get("exits"), list):
        assert model.exit_names == kwargs["exits"]
    assert model.stages[0].normalize.mean.shape == (1, 3, 1, 1)  # a buffer, first in stage 1
    x = torch.rand(2, *model.input_shape)
    assert [tuple(l.shape) for l in model.eval()(x)] == [(2, 10)] * 3
    if case != "resnet-1111":
        return  # (export rebuilds every case from its checkpoint)
    # the build checked equivalence; a rebuild from model_args alone gives the same cut and state dict keys
    torch.manual_seed(1)
    rebuilt = create_model(model.model_name, **model.model_args)
    assert rebuilt.exit_names == model.exit_names
    rebuilt.load_state_dict(model.state_dict())
    for a, b in zip(rebuilt.eval()(x), model(x)):
        torch.testing.assert_close(a, b)


def test_the_equivalence_check_catches_work_outside_the_children(monkeypatch: pytest.MonkeyPatch) -> None:
    real_tail = tvn._tail

    def tail_with_extra_work(network, layout):
        return nn.Sequential(nn.Sigmoid(), *real_tail(network, layout))  # not what ResNet.forward does

    monkeypatch.setattr(tvn, "_tail", tail_with_extra_work)
    with pytest.raises(BackboneError, match="does not reproduce its own forward"):
        create_model("torchvision:resnet", **TINY_RESNET, exits=["layer1"])


@pytest.mark.parametrize("builder, reason", [("shufflenet_v2_x0_5", r"x\.mean\(\[2, 3\]\)"),
                                             ("googlenet", "auxiliary classifiers")])
def test_networks_that_cannot_be_cut_are_refused_in_one_line(builder: str, reason: str) -> None:
    with pytest.raises(BackboneError, match=reason) as info:
        create_model(f"torchvision:{builder}", input_shape=(3, 32, 32))
    assert "\n" not in str(info.value) and "LAYOUTS" in str(info.value)


def test_mobilenet_v2_has_a_known_tail_for_its_functional_pool() -> None:
    model = create_model("torchvision:mobilenet_v2", input_shape=(3, 16, 16), exits="flops:0.5")
    assert [type(m).__name__ for m in model.heads[-1]] == ["AdaptiveAvgPool2d", "Flatten", "Sequential"]


def test_candidates_exits_by_name_and_by_cost() -> None:
    backbone = tvn.load_backbone("resnet", 10, (3, 32, 32), block="basic", layers=[1, 1, 1, 1])
    names = [c.name for c in backbone.candidates]
    assert names == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert [c.shape for c in backbone.candidates[-4:]] == [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]
    cum = [c.cumulative_mflops for c in backbone.candidates]
    assert cum == sorted(cum) and backbone.candidates[-1].fraction < 1.0  # the tail's fc is part of the whole
    fractions = {c.name: c.fraction for c in backbone.candidates}
    picked = tvn.resolve_exits("flops:0.3,0.55", backbone.candidates)
    for f, name in zip((0.3, 0.55), picked):
        assert abs(fractions[name] - f) == min(abs(c.fraction - f) for c in backbone.candidates[:-1])
    assert tvn.resolve_exits("layer1,layer3", backbone.candidates) == ["layer1", "layer3"]
    for bad, message in [(["layer9"], "not a candidate"), (["layer4"], "tail"),
                         (["layer2", "layer1"], "after the previous"), ("flops:1.5", "between 0 and 1"),
                         ("flops:a", "flops:<fraction>")]:
        with pytest.raises(BackboneError, match=message):
            tvn.resolve_exits(bad, backbone.candidates)


def test_listing_command_prints_candidates_and_refuses_in_one_line() -> None:
    run = lambda *a: subprocess.run([sys.executable, "-m", "training.models", *a], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    ok = run("torchvision:resnet", "--arg", "block=basic", "--arg", "layers=[1,1,1,1]", "--input-size", "32")
    assert ok.returncode == 0, ok.stderr
    rows = {line.split()[0]: line.split() for line in ok.stdout.splitlines()[2:10]}
    assert rows["layer1"][2:5] == ["64", "x", "8"] and "(last:" in " ".join(rows["layer4"]) and len(rows) == 8
    refused = run("torchvision:shufflenet_v2_x0_5")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "x.mean" in refused.stderr


def _all_out_of_place(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    return twin


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    sum(F.cross_entropy(l, y) for l in model(x)).backward()
    return {"input": x.grad, **{n: p.grad for n, p in model.named_parameters()}}


def test_in_place_ops_never_change_features_a_head_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exit at bn1 puts ReLU(inplace=True) first in stage 2, where it would overwrite what head 1 read."""
    torch.manual_seed(0)
    model = create_model("torchvision:resnet", **TINY_RESNET, exits=["bn1", "layer1"])
    assert model.stages[1][0].inplace is False
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    got, want = _grads(model, x, y), _grads(_all_out_of_place(model), x, y)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, msg=name)
    # the same cut without the fix: autograd refuses (or the gradient differs)
    monkeypatch.setattr(tvn, "_out_of_place_start", lambda stage: None)
    torch.manual_seed(0)
    unsafe = create_model("torchvision:resnet", **TINY_RESNET, exits=["bn1", "layer1"])
    assert unsafe.stages[1][0].inplace is True
    try:
        bad = _grads(unsafe, x, y)
    except RuntimeError as exc:
        assert "inplace" in str(exc)
    else:
        assert any(not torch.allclose(bad[n], g) for n, g in want.items())


def test_small_input_stem_and_its_cost(caplog: pytest.LogCaptureFixture) -> None:
    imagenet = tvn.load_backbone("resnet18", 10, (3, 32, 32))
    small = tvn.load_backbone("resnet18", 10, (3, 32, 32), small_input_stem=True)
    assert small.network.conv1.kernel_size == (3, 3) and small.network.conv1.stride == (1, 1)
    assert isinstance(small.network.maxpool, nn.Identity)
    assert small.candidates[4].shape == (64, 32, 32) and imagenet.candidates[4].shape == (64, 8, 8)
    assert imagenet.mflops == pytest.approx(74.03, abs=0.01) and small.mflops == pytest.approx(1110.85, abs=0.01)
    mobile = tvn.load_backbone("mobilenet_v3_small", 10, (3, 16, 16), small_input_stem=True)
    assert mobile.candidates[0].shape[1:] == (16, 16)  # the stem conv runs at stride 1
    with pytest.raises(BackboneError, match="small_input_stem is not defined") as info:
        tvn.load_backbone("convnext", 10, (3, 32, 32), small_input_stem=True, block_setting=[[8, 16, 1], [16, None, 1]])
    assert "\n" not in str(info.value)


def test_heads_are_counted_and_costly_ones_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=tvn.__name__):
        model = create_model("torchvision:resnet", **TINY_RESNET, exits=["relu", "layer3"], head="conv3x3")
    cost = model.cost_profile()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval().forward_head(0, torch.zeros(1, 64, 16, 16))
    assert cost.head_mflops[0] == pytest.approx(counter.get_total_flops() / 1e6) and cost.head_mflops[0] > 0.1 * cost.full
    assert any("exit 1 (relu)" in r.message for r in caplog.records)
    assert not any("exit 2" in r.message for r in caplog.records)  # 256 -> 128 channels at 2x2: cheap
    assert isinstance(model.heads[1][0], nn.Conv2d) and model.heads[1][0].out_channels == 128


def test_weights_from_a_local_state_dict_keep_the_backbone_and_refit_the_classifier(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = tvn._construct("resnet", 1000, {"block": "basic", "layers": [1, 1, 1, 1]})
    torch.save(source.state_dict(), tmp_path / "tv.pth")
    model = create_model("torchvision:resnet", **TINY_RESNET, exits=["layer2"], weights_path=str(tmp_path / "tv.pth"))
    torch.testing.assert_close(model.stages[1].layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert model.heads[-1].fc.out_features == 10 and "weights_path" not in model.model_args
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(BackboneError, match="does not fit"):
        create_model("torchvision:resnet", **TINY_RESNET, weights_path=str(tmp_path / "bad.pth"))


def test_named_weights_offline_say_which_file_to_put_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsUnavailable, match=r"put resnet18-f37072fd\.pth \(from https://download\.pytorch\.org"):
        tvn.load_backbone("resnet18", 10, weights="IMAGENET1K_V1")
    with pytest.raises(BackboneError, match="available: IMAGENET1K_V1"):
        tvn.load_backbone("resnet18", 10, weights="NOPE")
    from training.train import main

    code = main(["--preset", "mnist-quick", "model=torchvision:resnet18", "weights=DEFAULT",
                 f"out_dir={tmp_path / 'runs'}", "device=cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"into {tmp_path / 'hub' / 'checkpoints'}/" in err[0]


def test_a_few_neokd_steps(case: str) -> None:
    """The project's max-average PGD and NEO-KD loss, as training/train.py runs a step (two forwards)."""
    from training.attacks import build_attack
    from training.losses import build_loss

    model = build_case(case)
    torch.manual_seed(0)
    attack = build_attack("max-average", model, eps=8 / 255, step_size=4 / 255, steps=1,
                          generator=torch.Generator().manual_seed(0))
    objective = build_loss("neokd", num_classes=10, num_exits=model.num_exits, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(4, *model.input_shape), torch.randint(0, 10, (4,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        x_adv = attack(x, y)
        assert model.training and (x_adv - x).abs().max() <= 8 / 255 + 1e-6
        loss, parts = objective(model(x), model(x_adv), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and parts["total"] > 0
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("stages.0.") for n in moved) and any(n.startswith("heads.0.") for n in moved)


def test_export_with_per_stage_onnx_parity(case: str, tmp_path: Path) -> None:
    model, _, result = export_case(case, tmp_path)
    parity = result.report["parity"]
    assert result.report["passed"] and len(parity["stages"]) == model.num_exits
    for entry in parity["stages"] + parity["chain"] + [parity["full"]]:
        assert entry["max_abs_diff_logits"] <= 1e-4 and entry["argmax_agree"]
    assert result.manifest.staged_mflops == pytest.approx(model.cost_profile().staged)
    assert result.manifest.extra["model_args"]["exits"] == model.exit_names


def test_heads_first_keeps_the_backbone_and_its_batchnorm_still() -> None:
    model = build_case("resnet-1111")
    model.freeze_backbone(True)
    model.train()
    assert model.training and not model.stages.training and all(not m.training for m in model.stages.modules())
    assert all(m.training for m in model.heads.modules())
    stages_before = copy.deepcopy(model.stages.state_dict())
    heads_before = copy.deepcopy(model.heads.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = torch.rand(4, 3, 32, 32).requires_grad_(True), torch.randint(0, 10, (4,))
    loss = sum(F.cross_entropy(l, y) for l in model(x))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert x.grad is not None and x.grad.abs().sum() > 0  # attacks still get input gradients
    for k, v in model.stages.state_dict().items():  # weights and BatchNorm running statistics
        assert torch.equal(v, stages_before[k]), k
    assert any(not torch.equal(v, heads_before[k]) for k, v in model.heads.state_dict().items())
    model.freeze_backbone(False)
    model.train()
    assert model.stages.training and all(p.requires_grad for p in model.parameters())


def test_training_cli_with_a_torchvision_backbone_and_heads_first(data_root: Path, tmp_path: Path) -> None:
    """mnist (1 channel, 28x28) through train.py: the dataset's shape reaches the builder and the first conv
    takes one channel; two heads-first steps leave the stages (and their BatchNorm statistics) as built, the
    third, after a resume, trains them; the checkpoint rebuilds."""
    from training.checkpoint import load_checkpoint, model_from_checkpoint
    from training.config import load_config
    from training.train import build_model, train

    overrides = ["model=torchvision:resnet", "model_args={block: basic, layers: [1, 1, 1, 1]}",
                 "exits=[layer1, layer2]", "head=linear", "heads_first_iterations=2", "batch_size=8",
                 "train_limit=16", "val_size=100", "attack_steps=1", "step_size=0.1", "lr_schedule=multistep", "lr_milestones=[100]",
                 "device=cpu", f"data_dir={data_root}", f"out_dir={tmp_path}", "name=tv"]
    cfg = load_config("mnist-quick", overrides + ["iterations=2"])
    torch.manual_seed(cfg.seed)
    initial = build_model(cfg).state_dict()
    ckpt = load_checkpoint(train(cfg))
    model = model_from_checkpoint(ckpt)
    assert ckpt["model_args"]["input_shape"] == [1, 28, 28] and model.stages[0].conv1.in_channels == 1
    assert ckpt["model_args"]["exits"] == ["layer1", "layer2"]
    changed = {k for k, v in ckpt["state_dict"].items() if not torch.equal(v, initial[k])}
    assert changed and all(k.startswith("heads.") for k in changed)
    assert {k.split(".")[1] for k in changed} == {"0", "1", "2"}
    ckpt = load_checkpoint(train(load_config("mnist-quick", overrides + ["iterations=3"]), resume=True))
    changed = {k for k, v in ckpt["state_dict"].items() if not torch.equal(v, initial[k])}
    assert any(k.startswith("stages.") for k in changed)
