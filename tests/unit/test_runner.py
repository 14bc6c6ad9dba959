"""The staged runner over real onnxruntime sessions of a synthetic three-stage chain (tests/toy_model.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from early_exit.manifest import load_manifest
from early_exit.policy import BudgetEntry, ConfidenceMeasure, confidence, select_exits, softmax
from early_exit.runner import NEVER, FullGraphRunner, StagedRunner
from tests.toy_model import COSTS, FULL_MFLOPS, SHAPE, TABLE, _weights, build_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("toy_runner")
    build_model_dir(folder)
    return folder


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


def _numpy_logits(x: np.ndarray) -> list[np.ndarray]:
    return [x.reshape(len(x), -1) @ w for w in _weights()]


def test_per_row_thresholds_and_caps_match_the_policy(model_dir: Path) -> None:
    manifest = load_manifest(model_dir)
    calls: list[tuple[str, int]] = []
    runner = StagedRunner.from_folder(manifest, model_dir, on_stage=lambda s, rows, ms: calls.append((s, rows)))
    x = _x(64)
    rng = np.random.default_rng(1)
    rows_entries = [TABLE[i] for i in rng.integers(0, len(TABLE), len(x))]
    thresholds = np.array([e.thresholds for e in rows_entries])
    max_exits = np.array([e.max_exit for e in rows_entries])
    result = runner.run(x, thresholds, max_exits)

    logits = _numpy_logits(x)
    conf = np.stack([confidence(softmax(l), ConfidenceMeasure.MAX_PROB) for l in logits], axis=1)
    expected = select_exits(conf, thresholds, max_exits)
    np.testing.assert_array_equal(result.exits, expected)
    assert (result.exits <= max_exits).all()
    np.testing.assert_allclose(result.mflops, np.asarray(COSTS)[expected])
    for i, e in enumerate(expected):
        np.testing.assert_allclose(result.probs[i], softmax(logits[e][i]), atol=1e-6)
    # stage k ran once, on exactly the rows that had not left before it
    reached = [int((expected >= k).sum()) for k in range(3)]
    assert calls == [(str(k + 1), n) for k, n in enumerate(reached) if n]


def test_a_batch_that_leaves_early_skips_later_stages(model_dir: Path) -> None:
    calls: list[str] = []
    runner = StagedRunner.from_folder(load_manifest(model_dir), model_dir, on_stage=lambda s, r, ms: calls.append(s))
    result = runner.run(_x(5), np.zeros(3), 2)  # threshold 0: everyone is confident at exit 1
    assert calls == ["1"] and (result.exits == 0).all() and (result.mflops == COSTS[0]).all()


def test_exit_logits_runs_the_whole_chain(model_dir: Path) -> None:
    runner = StagedRunner.from_folder(load_manifest(model_dir), model_dir)
    x = _x(7)
    got = runner.exit_logits(x)
    for a, b in zip(got, _numpy_logits(x)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    kept = runner.run(x, np.zeros(3), 2, keep_logits=True).logits
    assert kept is not None and np.isnan(kept[1]).all() and np.isnan(kept[2]).all()


def test_full_graph_runner_charges_the_full_graph(model_dir: Path) -> None:
    manifest = load_manifest(model_dir)
    result = FullGraphRunner.from_folder(manifest, model_dir).run(_x(3))
    assert (result.exits == 2).all() and (result.mflops == FULL_MFLOPS).all()
    assert FULL_MFLOPS < COSTS[-1]  # no early heads on the full graph


def test_bad_shapes_are_refused(model_dir: Path) -> None:
    runner = StagedRunner.from_folder(load_manifest(model_dir), model_dir)
    with pytest.raises(ValueError, match="thresholds"):
        runner.run(_x(4), np.zeros((3, 3)), 2)
    with pytest.raises(ValueError, match="max_exits"):
        runner.run(_x(4), np.full(3, NEVER), 3)
    assert runner.run(_x(0), np.full(3, NEVER), 2).exits.shape == (0,)


def test_budget_entry_rows_are_usable_directly(model_dir: Path) -> None:
    runner = StagedRunner.from_folder(load_manifest(model_dir), model_dir)
    entry: BudgetEntry = TABLE[1]
    result = runner.run(_x(16), entry.thresholds, entry.max_exit)
    assert result.exits.max() <= 1 and (result.mflops <= entry.budget_mflops).all()


def test_audit_keeps_features_and_finish_runs_only_the_remaining_stages(model_dir: Path) -> None:
    calls: list[str] = []
    runner = StagedRunner.from_folder(load_manifest(model_dir), model_dir, on_stage=lambda s, r, ms: calls.append(s))
    x = _x(12, seed=5)
    entry = TABLE[-1]
    audit = np.arange(12) % 2 == 0
    result = runner.run(x, entry.thresholds, entry.max_exit, audit=audit)
    early = {i for i in range(12) if audit[i] and result.exits[i] < 2}
    assert early and len(early) < 12, "the batch should mix early and late rows"
    assert {row for row, _, _ in result.audit} == early
    final = _numpy_logits(x)[-1]
    for row, exit, features in result.audit:
        calls.clear()
        probs, cost = runner.finish(features[None], exit)
        assert calls == []  # audit work is not traffic: no stage metrics
        np.testing.assert_allclose(probs[0], softmax(final[row]), atol=1e-6)
        assert cost == pytest.approx(COSTS[-1] - COSTS[exit])
    with pytest.raises(ValueError):
        runner.finish(x, 2)
