"""The multi-exit contract, for every registered architecture."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from training.models import MultiExitNetwork, create_model, list_models
from training.models.registry import UnknownModelError

SMALL_ARGS = {"smallcnn": {}, "resnet_me": {"blocks_per_stage": 1, "width": 8}}


@pytest.fixture(params=list_models())
def model(request) -> MultiExitNetwork:
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


def test_exit_costs_are_measured_and_grow(model):
    costs = model.exit_mflops()
    assert all(b > a for a, b in zip(costs, costs[1:]))
    # the last exit's cost is the full forward's FLOPs, as counted by torch itself
    counter = FlopCounterMode(display=False)
    model.eval()
    with counter, torch.no_grad():
        model.forward_exits(torch.zeros(1, *model.input_shape))
    heads_before_last = 0.0
    features = torch.zeros(1, *model.input_shape)
    with torch.no_grad():
        for k in range(model.num_exits - 1):
            features = model.forward_stage(k, features)
            c = FlopCounterMode(display=False)
            with c:
                model.forward_head(k, features)
            heads_before_last += c.get_total_flops()
    assert costs[-1] == pytest.approx((counter.get_total_flops() - heads_before_last) / 1e6)


def test_smallcnn_costs_match_the_reference_architecture():
    # RDI-Nets counts conv MACs / 2^20: 0.818, 7.00, 9.25. FLOPs/1e6 with heads is about 2x that.
    costs = create_model("smallcnn").exit_mflops()
    for ours, ref in zip(costs, (0.818, 7.00, 9.25)):
        assert 1.9 < ours / (ref * 2**20 / 1e6) < 2.7


def test_registry_records_args_and_rejects_unknown_names():
    m = create_model("resnet_me", num_classes=7, width=8, blocks_per_stage=1)
    assert m.model_name == "resnet_me" and m.model_args == {"num_classes": 7, "width": 8, "blocks_per_stage": 1}
    with pytest.raises(UnknownModelError, match="registered"):
        create_model("nope")
