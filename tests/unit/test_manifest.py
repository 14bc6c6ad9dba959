"""The manifest contract (format 2): staged costs checked against their parts, typed entries, old formats refused."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from early_exit.costs import CostError, CostProfile
from early_exit.manifest import FORMAT_VERSION, ManifestError, load_manifest, manifest_from_dict
from tests.toy_model import COST, build_model_dir


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("toy_manifest")
    build_model_dir(folder)
    return json.loads((folder / "manifest.json").read_text())


def test_round_trip(good: dict) -> None:
    m = manifest_from_dict(copy.deepcopy(good))
    assert m.staged_mflops == COST.staged and m.cost == COST and m.full_graph.mflops == COST.full
    assert manifest_from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_an_old_format_is_refused_with_one_line_saying_to_re_export(tmp_path: Path, good: dict) -> None:
    old = copy.deepcopy(good)
    old["format_version"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "re-export" in message and "make archive" in message
    assert FORMAT_VERSION == 2


@pytest.mark.parametrize("field, value, match", [
    ("staged_mflops", 0.9, "staged_mflops"),  # a staged cost that skips a head
    ("anytime_mflops", 1.5, "anytime_mflops"),
    ("head_mflops", -1.0, "non-negative"),
])
def test_exit_costs_must_agree_with_their_parts(good: dict, field: str, value: float, match: str) -> None:
    bad = copy.deepcopy(good)
    bad["exits"][1][field] = value
    with pytest.raises(ManifestError, match=match):
        manifest_from_dict(bad)


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["full_graph"].pop("sha256"), "missing keys"),
    (lambda d: d["full_graph"].update(extra=1), "unknown keys"),
    (lambda d: d["full_graph"].update(mflops=4.0), "anytime cost"),
    (lambda d: d["full_graph"].update(file="../full.onnx"), "plain file name"),
    (lambda d: d["exits"][0].update(mflops=1.0), "unknown keys"),
    (lambda d: d["exits"][0].update(file="/etc/passwd"), "plain file name"),
    (lambda d: d["exits"][0].update(index="1"), "type"),
    (lambda d: d.update(input_background=2.0), "input_background"),
    (lambda d: d["calibration"][0].update(max_exit=2), "deeper exit"),
])
def test_entries_are_validated(good: dict, mutate, match: str) -> None:
    bad = copy.deepcopy(good)
    mutate(bad)
    with pytest.raises(ManifestError, match=match):
        manifest_from_dict(bad)


def test_cost_profile() -> None:
    cost = CostProfile((0.39, 14.30, 4.72), (1.64, 0.72, 0.49))
    assert cost.staged == pytest.approx([2.03, 17.05, 22.26])
    assert cost.anytime == pytest.approx([2.03, 15.41, 19.90])
    assert CostProfile.from_dict(cost.to_dict()) == cost
    with pytest.raises(CostError):
        CostProfile((1.0,), (1.0, 2.0))
    with pytest.raises(CostError, match="does not match"):
        CostProfile.from_dict({**cost.to_dict(), "staged_mflops": cost.anytime})
