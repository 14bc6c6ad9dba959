"""bench-serve on a photo archive, the pure parts: the test split's requests and their offline decoding
(bench/photos.py), the attacked loads' alert conditions and summaries (bench/attacked_loads.py), and the
compute-bound and latency-spread figures of bench/bench_serve.py. No server is started."""
from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from bench import attacked_loads, photos
from bench.bench_serve import compute_bound, latency_spread, time_breakdown
from bench.common import Call
from bench.overhead import Run
from early_exit.manifest import ManifestError
from early_exit.transform import EvalTransform


# ------------------------------------------------------------------------------------------------- photos
def test_mixed_bodies_attack_one_request_in_ten() -> None:
    clean = [b"c%d" % i for i in range(25)]
    bodies, flags = photos.mixed_bodies(clean, [b"a0", b"a1"], every=10)
    assert len(bodies) == 20 and flags == [i % 10 == 0 for i in range(20)]
    assert bodies[0] == b"a0" and bodies[10] == b"a1" and bodies[1:10] == clean[1:10]
    assert len(photos.mixed_bodies(clean, [b"a"] * 5)[0]) == 25  # the clean list bounds the load
    with pytest.raises(ValueError):
        photos.mixed_bodies(clean, [])


def test_relative_config_paths_are_taken_from_the_repository() -> None:
    out = photos.resolve_paths({"data_dir": "data/x", "out_dir": "/abs", "val_dir": None, "seed": 1}, Path("/repo"))
    assert out == {"data_dir": "/repo/data/x", "out_dir": "/abs", "val_dir": None, "seed": 1}


def test_a_checkpoint_other_than_the_archives_is_refused(tmp_path: Path) -> None:
    manifest = SimpleNamespace(name="m", extra={"checkpoint_sha256": "0" * 64})
    with pytest.raises(FileNotFoundError):
        photos.run_config(tmp_path / "missing.pt", manifest)
    (tmp_path / "other.pt").write_bytes(b"not the one")
    with pytest.raises(ManifestError, match="sha256"):
        photos.run_config(tmp_path / "other.pt", manifest)


def _folder(root: Path, per_class: int = 6) -> None:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(buf, format="JPEG")
            (root / name / f"{i}.jpg").write_bytes(buf.getvalue())


def test_test_set_is_the_runs_test_split_sent_as_its_files_and_decoded_as_the_handler_does(tmp_path: Path) -> None:
    from serving.decoding import InputSpec, decode_request
    from training.data import Split
    from training.image_folders import folder_spec, folder_split

    _folder(tmp_path / "photos")
    config = {"dataset": "imagefolder", "data_dir": str(tmp_path / "photos"), "input_size": 8, "val_size": 2,
              "test_size": 4, "seed": 3, "out_dir": str(tmp_path / "runs"), "name": "tiny", "mean": [0.5] * 3,
              "std": [0.25] * 3}
    transform = EvalTransform(3, 8, (8, 8))
    manifest = SimpleNamespace(input_shape=(3, 8, 8), input_background=1.0, input_transform=transform)
    test = photos.test_set(config, manifest, limit=3)
    carved = folder_split(folder_spec(config)).samples[Split.TEST][:3]
    assert test.files == [path for path, _ in carved] and test.y.tolist() == [label for _, label in carved]
    assert test.bodies == [path.read_bytes() for path in test.files] and test.bodies[0][:2] == b"\xff\xd8"
    spec = InputSpec((3, 8, 8), 1.0, transform=transform)
    assert np.array_equal(test.x, np.stack([decode_request(b, {}, spec).x for b in test.bodies]))
    assert test.x.shape == (3, 3, 8, 8) and test.x.dtype == np.float32


def test_three_channel_png_bodies_decode_back_to_their_pixels() -> None:
    """What the attacked loads rely on: an RGB image at the input size survives the PNG body and the handler's
    decoding exactly (the transform is the identity at the input size)."""
    from bench.common import png_bodies

    x = np.random.default_rng(2).integers(0, 256, (4, 3, 8, 8)).astype(np.float32) / 255
    manifest = SimpleNamespace(input_shape=(3, 8, 8), input_background=1.0, input_transform=EvalTransform(3, 8, (8, 8)))
    assert np.array_equal(photos.decode_bodies(png_bodies(x), photos.input_spec(manifest)), x)


# ------------------------------------------------------------------------------------------ attacked loads
SCRAPE = """# TYPE EarlyExitCount counter
EarlyExitCount{ExitIndex="1",Level="Model",ModelName="m"} 30.0
EarlyExitCount{ExitIndex="2",Level="Model",ModelName="m"} 10.0
EarlyExitCount{ExitIndex="3",Level="Model",ModelName="m"} 10.0
EarlyExitCount{ExitIndex="3",Level="Model",ModelName="other"} 99.0
# TYPE ComputeSpentMFLOPs counter
ComputeSpentMFLOPs{Level="Model",ModelName="m"} 200.0
# TYPE ComputeFullMFLOPs counter
ComputeFullMFLOPs{Level="Model",ModelName="m"} 500.0
# TYPE EarlyExitAudit counter
EarlyExitAudit{ExitIndex="1",Level="Model",ModelName="m",Outcome="agree"} 8.0
EarlyExitAudit{ExitIndex="1",Level="Model",ModelName="m",Outcome="disagree"} 2.0
"""


def test_metric_totals_read_one_models_counters() -> None:
    t = attacked_loads.metric_totals(SCRAPE, "m")
    assert t[("count", "1")] == 30 and t[("count", "3")] == 10 and t[("spent",)] == 200 and t[("full",)] == 500
    assert t[("audit", "1", "agree")] == 8 and t[("audit", "1", "disagree")] == 2
    assert attacked_loads.early_exit_rate(t) == pytest.approx(0.8)
    later = {**t, ("count", "3"): 60.0, ("audit", "2", "agree"): 1.0}
    grown = attacked_loads.increase(t, later)
    assert grown[("count", "3")] == 50 and grown[("count", "1")] == 0 and grown[("audit", "2", "agree")] == 1
    assert attacked_loads.add(t, grown)[("count", "3")] == 60


def test_alert_conditions_follow_the_rules_thresholds() -> None:
    clean = {("count", "1"): 60.0, ("count", "2"): 20.0, ("count", "3"): 20.0, ("spent",): 300.0, ("full",): 1000.0}
    sloth = {("count", "1"): 5.0, ("count", "2"): 5.0, ("count", "3"): 90.0, ("spent",): 900.0, ("full",): 1000.0,
             ("audit", "1", "agree"): 10.0, ("audit", "1", "disagree"): 15.0}
    out = attacked_loads.alert_conditions(clean, sloth, [0.9, None])
    assert out["early_exit_rate"] == 0.1 and out["clean_early_exit_rate"] == 0.8
    assert out["EarlyExitRateDrop"] is True and out["ComputePerRequestNearFull"] is True
    audit = out["EarlyExitDisagreementHigh"]
    assert audit["condition_met"] is True and audit["per_exit"]["1"]["live_agreement"] == 0.4
    assert audit["per_exit"]["2"]["condition_met"] is False  # no validation figure, no audits
    quiet = attacked_loads.alert_conditions(clean, clean, [0.9, 0.9])
    assert not quiet["EarlyExitRateDrop"] and not quiet["ComputePerRequestNearFull"]
    assert quiet["EarlyExitDisagreementHigh"]["condition_met"] is False  # too few audits to judge
    few = {**sloth, ("audit", "1", "disagree"): 5.0}  # 15 audits < MIN_AUDITS
    assert attacked_loads.alert_conditions(clean, few, [0.9])["EarlyExitDisagreementHigh"]["condition_met"] is False


def test_spread_and_summarize_loads() -> None:
    assert attacked_loads.spread([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert attacked_loads.spread([None]) == {"median": None, "min": None, "max": None}

    def figures(mflops: float, violations: int) -> dict:
        return {"answer_pass": {"mean_mflops": mflops, "budget_violations": violations},
                "capped_pass": {"budget_violations": 0}}

    clean = {("count", "1"): 8.0, ("count", "2"): 2.0}
    out = attacked_loads.summarize_loads({"clean": figures(2.0, 0), "deepsloth": figures(5.0, 0)},
                                         {"clean": clean, "deepsloth": {("count", "2"): 10.0}}, [0.95])
    assert out["deepsloth"]["cost_rise_over_clean_mflops"] == 3.0 and out["deepsloth"]["cost_ratio_to_clean"] == 2.5
    assert out["deepsloth"]["alerts"]["EarlyExitRateDrop"] is True and out["clean"]["alerts"]["EarlyExitRateDrop"] is False
    assert out["no_budget_violations"] is True
    out = attacked_loads.summarize_loads({"clean": figures(2.0, 1)}, {"clean": clean}, None)
    assert out["budget_violations"] == 1 and out["no_budget_violations"] is False


def test_exit_histogram_counts_answers_per_exit() -> None:
    calls = [Call(200, 0.0, {"exit_index": 1}), Call(200, 0.0, {"exit_index": 3}), Call(503, 0.0, None)]
    assert attacked_loads.exit_histogram(calls, 3) == [1, 0, 1]


# ------------------------------------------------------------------------------------ compute-bound, latency
def _rounds(rates: list[float], p99: list[float] | None = None) -> list[dict]:
    return [{"requests": 10, "requests_per_s": r, "p50_ms": 1.0 + i, "p99_ms": (p99 or [5.0] * len(rates))[i]}
            for i, r in enumerate(rates)]


def test_compute_bound_reuses_bench_computes_efficiency_against_each_baseline() -> None:
    per = {(Run.EARLY, 16): _rounds([180.0, 200.0]), (Run.FULL, 16): _rounds([100.0, 100.0]),
           (Run.STOCK_NO_SPIN, 16): _rounds([150.0, 160.0])}
    out = compute_bound(per, early_mflops=40.0, full_mflops=100.0, concurrency=16)
    full, stock = out["against"][Run.FULL], out["against"][Run.STOCK_NO_SPIN]
    # speedup 1.9 (median of 1.8, 2.0): wall saving 1 - 1/1.9 = 0.4737 over FLOP saving 0.6
    assert full["throughput_ratio"] == 1.9 and full["flop_saving"] == 0.6
    assert full["efficiency"] == pytest.approx(0.4737 / 0.6, abs=2e-3) and full["meets_target"] is True
    assert stock["meets_target"] is False and out["met"] is False
    assert full["efficiency_per_round"] == [pytest.approx(0.741, abs=1e-3), pytest.approx(0.833, abs=1e-3)]
    missing = compute_bound({(Run.EARLY, 16): _rounds([1.0])}, 40.0, 100.0, 16)
    assert missing["against"][Run.FULL] is None and missing["met"] is False
    json.dumps(out)


def test_latency_spread_reports_every_server_and_checks_p99_against_stock_without_spinning() -> None:
    per = {(Run.EARLY, 1): _rounds([10.0, 10.0, 10.0], [4.0, 6.0, 5.0]),
           (Run.STOCK_NO_SPIN, 1): _rounds([9.0, 9.0, 9.0], [5.0, 5.5, 7.0]),
           (Run.EARLY, 16): _rounds([10.0], [9.0]), (Run.STOCK_NO_SPIN, 16): _rounds([9.0], [8.0]),
           (Run.IN_PROCESS, 16): [{"requests": 10, "requests_per_s": 50.0, "p50_ms": None, "p99_ms": None}]}
    out = latency_spread(per)
    assert [(r["server"], r["concurrency"]) for r in out["rows"]] == [
        (Run.EARLY, 1), (Run.EARLY, 16), (Run.STOCK_NO_SPIN, 1), (Run.STOCK_NO_SPIN, 16)]
    assert out["rows"][0]["p99_ms"] == {"median": 5.0, "min": 4.0, "max": 6.0}
    assert out["rows"][0]["p50_ms"] == {"median": 2.0, "min": 1.0, "max": 3.0}
    checks = {c["concurrency"]: c["passed"] for c in out[f"p99_no_worse_than_{Run.STOCK_NO_SPIN}"]}
    assert checks == {1: True, 16: False} and out["passed"] is False
    assert latency_spread({(Run.EARLY, 1): _rounds([1.0])})["passed"] is False  # no baseline: not passed


def test_deepsloth_set_is_the_projects_attack_on_the_checkpoint_as_lossless_png(tmp_path: Path) -> None:
    """A small real resnet_me checkpoint (no fakes): the PNG bodies stay within eps (+ half a grey level) of the
    clean images, decode through the handler's decoding, and flatten the early exits as DeepSloth intends."""
    import torch

    from training.attacks.slowdown import early_exit_uniform_ce
    from training.checkpoint import make_checkpoint, save_checkpoint
    from training.data import dataset_info
    from training.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet_me", num_classes=10, blocks_per_stage=1, width=4).eval()
    path = save_checkpoint(make_checkpoint(model, dataset_info("cifar10").to_dict(), {"purpose": "test"}),
                           tmp_path / "model.pt")
    config = {"slowdown_eps": 8 / 255, "slowdown_step_size": 2 / 255, "slowdown_steps": 5}
    manifest = SimpleNamespace(input_shape=(3, 32, 32), input_background=1.0,
                               input_transform=EvalTransform(3, 32, (32, 32)))
    x = np.random.default_rng(0).integers(0, 256, (6, 3, 32, 32)).astype(np.float32) / 255
    attacked = photos.deepsloth(path, config, manifest, x, seed=0)
    assert len(attacked.bodies) == 6 and all(b.startswith(b"\x89PNG") for b in attacked.bodies)
    assert attacked.max_perturbation <= 8 / 255 + 1 / 510 + 1e-6 and attacked.max_perturbation > 0
    assert np.array_equal(attacked.x, photos.decode_bodies(attacked.bodies, photos.input_spec(manifest)))
    assert attacked.attack["eps"] == config["slowdown_eps"] and attacked.attack["steps"] == 5
    with torch.no_grad():
        before = early_exit_uniform_ce(model, torch.from_numpy(x)).item()
        after = early_exit_uniform_ce(model, torch.from_numpy(attacked.x)).item()
    assert after < before  # the early exits moved toward uniform


def test_time_breakdown_takes_the_runners_efficiency_and_the_compute_share() -> None:
    rates = {"full": {"rows_per_s": 1000.0}, "1": {"rows_per_s": 2500.0}, "policy": {"rows_per_s": 1250.0}}
    runs = [{"server": Run.FULL, "concurrency": 16, "cpu_ms_per_request": {"server": 4.0}},
            {"server": Run.FULL, "concurrency": 1, "cpu_ms_per_request": {"server": 9.0}}]
    out = time_breakdown(rates, early_mflops=60.0, full_mflops=100.0, runs=runs, concurrency=16)
    assert out["runner_ms_per_image"] == {"full": 1.0, "1": 0.4, "policy": 0.8}
    # runner: wall saving 1 - 0.8 / 1.0 = 0.2 over FLOP saving 0.4
    assert out["runner"]["efficiency"] == 0.5 and out["runner"]["flop_saving"] == 0.4
    assert out["compute_share_of_full_graph_request"] == 0.25  # 1.0 ms of the c=16 row's 4.0, not c=1's 9.0
    assert out["http_efficiency_if_rest_fixed"] == 0.125
    none = time_breakdown({"full": {"rows_per_s": 1000.0}}, 60.0, 100.0, [], 16)
    assert none["runner"]["efficiency"] is None and none["compute_share_of_full_graph_request"] is None
    assert none["http_efficiency_if_rest_fixed"] is None
    json.dumps(out)
