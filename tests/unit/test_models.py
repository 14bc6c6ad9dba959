"""The multi-exit contract, for every registered architecture."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from training.models import MultiExitNetwork, create_model, list_models
from training.models.registry import UnknownModelError
from tests.torchvision_cases import SMALL_CASES, build_case

SMALL_ARGS = {"smallcnn": {}, "resnet_me": {"blocks_per_stage": 1, "width": 8}}


@pytest.fixture(params=list_models())
def model(request) -> MultiExitNetwork:
    torch.manual_seed(0)
    return create_model(request.param, num_classes=10, **SMALL_ARGS.get(request.param, {}))


@pytest.fixture(params=list_models() + [f"torchvision/{case}" for case in sorted(SMALL_CASES)])
def any_model(request) -> MultiExitNetwork:
    """Every registered architecture and the small torchvision cases (tests/torchvision_cases.py)."""
    if request.param.startswith("torchvision/"):
        return build_case(request.param.split("/", 1)[1])
    torch.manual_seed(0)
    return create_model(request.param, num_classes=10, **SMALL_ARGS.get(request.param, {}))


def test_every_architecture_has_a_small_config():
    assert set(list_models()) == set(SMALL_ARGS), "add a small config for each new architecture"


def test_contract_shapes_and_types(model):
    assert isinstance(model.stages, torch.nn.ModuleList) and isinstance(model.heads, torch.nn.ModuleList)
    assert model.num_exits >= 3
    x = torch.rand(4, *model.input_shape)
    logits = model(x)
    assert len(logits) == model.num_exits
    assert all(l.shape == (4, 10) for l in logits)


def test_chained_stages_equal_forward(model):
    model.eval()
    x = torch.rand(3, *model.input_shape)
    features, chained = x, []
    for k in range(model.num_exits):
        features = model.forward_stage(k, features)
        chained.append(model.forward_head(k, features))
    for a, b in zip(chained, model(x)):
        torch.testing.assert_close(a, b)


def test_forward_exits_runs_only_needed_stages(model):
    calls = []
    for k, stage in enumerate(model.stages):
        stage.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
    model.forward_exits(torch.rand(2, *model.input_shape), upto=0)
    assert calls == [0]


def test_every_parameter_gets_a_gradient(model):
    model.train()
    x = torch.rand(4, *model.input_shape)
    y = torch.randint(0, 10, (4,))
    sum(F.cross_entropy(l, y) for l in model(x)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"parameters without gradient: {missing}"


def test_normalization_is_a_buffer_inside_stage_one(model):
    buffers = dict(model.stages[0].named_buffers())
    assert any(n.endswith("mean") for n in buffers) and any(n.endswith("std") for n in buffers)
    assert not any("mean" in n or "std" in n for n, _ in model.named_parameters())


def _counted_mflops(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 1e6


class _TorchStageSession:
    """A torch-backed stand-in for an onnxruntime session of stage k (what export writes as stage_k.onnx)."""

    def __init__(self, model: MultiExitNetwork, k: int) -> None:
        self.model, self.k = model, k

    def run(self, output_names, feed):
        with torch.no_grad():
            features = self.model.forward_stage(self.k, torch.from_numpy(next(iter(feed.values()))))
            logits = self.model.forward_head(self.k, features).numpy()
        return [logits] if len(output_names) == 1 else [features.numpy(), logits]


def test_runner_charges_what_flopcountermode_counts_on_the_staged_path(any_model):
    """For each exit k, the staged runner's cost of an answer at k equals torch's count of everything that ran
    to produce it: stages 1..k and heads 1..k (forward_exits(x, upto=k)), not the anytime cost."""
    import numpy as np

    from early_exit.manifest import exit_specs
    from early_exit.runner import NEVER, StagedRunner

    model = any_model.eval()
    cost = model.cost_profile()
    x = torch.zeros(1, *model.input_shape)
    k_exits = model.num_exits
    graphs = [{"index": k + 1, "file": f"stage_{k + 1}.onnx", "sha256": "0" * 64, "input_name": f"in{k}",
               "logits_name": f"logits{k}", "features_name": None if k == k_exits - 1 else f"f{k}"}
              for k in range(k_exits)]
    manifest = SimpleNamespace(exits=exit_specs(cost, graphs), num_exits=k_exits, confidence="max_prob",
                               staged_mflops=cost.staged)
    runner = StagedRunner(manifest, [_TorchStageSession(model, k) for k in range(k_exits)])
    for k in range(k_exits):
        counted = _counted_mflops(lambda: model.forward_exits(x, upto=k))
        charged = runner.run(x.numpy(), np.full(k_exits, NEVER), k).mflops[0]
        assert charged == pytest.approx(counted, rel=1e-9)
        assert cost.staged[k] == pytest.approx(counted, rel=1e-9)
        with torch.no_grad():
            features = _features(model, x, k)
        anytime = _counted_mflops(lambda: _features(model, x, k)) + _counted_mflops(
            lambda: model.forward_head(k, features))
        assert cost.anytime[k] == pytest.approx(anytime, rel=1e-9)
    assert all(b > a for a, b in zip(cost.staged, cost.staged[1:]))
    assert cost.full == pytest.approx(cost.anytime[-1])


def _features(model: MultiExitNetwork, x: torch.Tensor, k: int) -> torch.Tensor:
    for i in range(k + 1):
        x = model.forward_stage(i, x)
    return x


def test_smallcnn_costs_match_the_reference_architecture():
    # RDI-Nets counts conv MACs / 2^20: 0.818, 7.00, 9.25 (anytime, conv only). FLOPs/1e6 with heads is about 2x.
    cost = create_model("smallcnn").cost_profile()
    for ours, ref in zip(cost.anytime, (0.818, 7.00, 9.25)):
        assert 1.9 < ours / (ref * 2**20 / 1e6) < 2.7
    # the heads are not small: the staged cost of the last exit exceeds its anytime cost by the early heads
    assert cost.staged[-1] - cost.anytime[-1] == pytest.approx(sum(cost.head_mflops[:-1]))
    assert cost.staged[-1] / cost.anytime[-1] > 1.05


def test_registry_records_args_and_rejects_unknown_names():
    m = create_model("resnet_me", num_classes=7, width=8, blocks_per_stage=1)
    assert m.model_name == "resnet_me" and m.model_args == {"num_classes": 7, "width": 8, "blocks_per_stage": 1}
    with pytest.raises(UnknownModelError, match="registered"):
        create_model("nope")
