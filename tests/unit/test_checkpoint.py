"""training.checkpoint.load_checkpoint reads with weights_only=True: a checkpoint can hold tensors and plain values,
never an object whose unpickling runs code; the resume random states survive the trip exactly."""
from __future__ import annotations

import pathlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoint import FORMAT_VERSION, KIND, CheckpointError, load_checkpoint, make_checkpoint, \
    save_checkpoint
from training.models import create_model
from training.train import capture_rng, restore_rng


class _TouchOnLoad:
    """Pickles as a call of Path.touch: unpickling it creates `marker` (stands in for any callable)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return pathlib.Path.touch, (self.marker,)


def test_a_checkpoint_carrying_a_pickled_callable_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": FORMAT_VERSION, "kind": KIND, "config": {"hook": _TouchOnLoad(marker)}}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and "holds the Python object" in message and "refused" in message
    assert not marker.exists(), "loading the checkpoint ran the callable"
    torch.load(path, weights_only=False)  # the control: a plain pickle load would have run it
    assert marker.exists()


def test_a_model_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    model = create_model("smallcnn", num_classes=10)
    dataset = {"name": "mnist", "input_shape": [1, 28, 28], "classes": [str(i) for i in range(10)], "background": 0.0}
    path = save_checkpoint(make_checkpoint(model, dataset, {"method": "neokd", "lr": 0.002}), tmp_path / "m.pt")
    ckpt = load_checkpoint(path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ckpt["state_dict"].items())
    assert ckpt["config"] == {"method": "neokd", "lr": 0.002} and ckpt["dataset"] == dataset


def _draws(generators: dict[str, torch.Generator]) -> list:
    return [random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist(),
            *(torch.rand(2, generator=g).tolist() for g in generators.values())]


@pytest.mark.parametrize("legacy_numpy", [False, True])
def test_random_states_survive_a_weights_only_round_trip(tmp_path: Path, legacy_numpy: bool) -> None:
    generators = {"attack": torch.Generator().manual_seed(3), "eokd": torch.Generator().manual_seed(4)}
    random.seed(1)
    np.random.seed(2)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = capture_rng(generators, torch.device("cpu"))
    if legacy_numpy:  # as resume files were written before: numpy's state tuple with an ndarray key
        state["numpy"] = np.random.get_state()
    expected = _draws(generators)
    path = tmp_path / "last.pt"
    torch.save({"format_version": FORMAT_VERSION, "kind": KIND, "rng": {"world_size": 1, "ranks": [state]}}, path)
    _draws(generators)  # move every state on
    restore_rng(load_checkpoint(path)["rng"]["ranks"][0], generators, torch.device("cpu"))
    assert _draws(generators) == expected
