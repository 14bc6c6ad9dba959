"""The pure parts of the serving benchmarks: summaries, the HTTP / in-process analysis, the stock baseline's archive
and bodies, the settings sweep's config building and search (with a fake measurement), the result header; the
in-process loops on the toy model. No server is started."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench import archives, common, servers, stock, sweep
from bench.answers import summarize, violations
from bench.bench_serve import build_parser
from bench.common import Call
from bench.overhead import Run, cpu_bound_estimate, http_vs_in_process
from bench.sweep import settings_sweep
from export.archive import ServeConfig
from serving.server import render_config

REPO = Path(__file__).resolve().parents[2]
STAGED = [2.0, 5.0, 9.0]


def _answer(exit_index: int, budget: float = 9.0, cls: int = 1, spent: float | None = None) -> dict:
    return {"exit_index": exit_index, "budget_mflops": budget, "class_index": cls,
            "mflops_spent": STAGED[exit_index - 1] if spent is None else spent}


# ------------------------------------------------------------------------------------------------- common
def test_latency_summary_and_ratio() -> None:
    s = common.latency_summary([0.001] * 99 + [0.101], 0.5)
    assert s["requests"] == 100 and s["requests_per_s"] == 200.0
    assert s["p50_ms"] == pytest.approx(1.0) and s["p99_ms"] == pytest.approx(1.0 + 0.01 * 100, rel=0.01)
    assert common.latency_summary([], 1.0)["p50_ms"] is None
    assert common.ratio(3, 2) == 1.5 and common.ratio(1, 0) is None and common.ratio(None, 1) is None


def test_result_header_states_machine_versions_and_seed() -> None:
    h = common.result_header("serve", 7, "note")
    assert h["benchmark"] == "serve" and h["seed"] == 7 and h["note"] == "note"
    assert h["machine"]["cpu_count"] == os.cpu_count() and "load_average_at_start" in h["machine"]
    assert h["versions"]["torchserve"] == "0.12.0" and "onnxruntime" in h["versions"]
    assert set(common.versions("no-such-package-xyz").values()) == {"not installed"}
    json.dumps(h)


def test_cpu_accounting_reads_this_process() -> None:
    pid = os.getpid()
    assert pid in common.children_of(pid)
    with common.CpuMeter(pid) as meter:
        sum(i * i for i in range(200_000))
    assert meter.result["client_cpu_s"] >= 0 and meter.result["server_cpu_s"] >= 0
    assert meter.result["frontend_cpu_s"] == meter.result["server_cpu_s"]  # no children here
    assert common.process_cpu_seconds([2 ** 30]) == {}  # a pid that does not exist is left out


def test_seed_everything_seeds_python_numpy_and_torch() -> None:
    """The benchmarks seed through training.train.seed_everything: all three generators repeat."""
    import random

    import torch

    from training.train import seed_everything

    def draw() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(5)
    first = draw()
    seed_everything(5)
    assert draw() == first
    seed_everything(6)
    assert all(a != b for a, b in zip(draw(), first))


def test_png_bodies_decode_to_exactly_the_images() -> None:
    """Grey and RGB: the handler's decoder gives back the k/255 pixels the offline runs see."""
    from serving.decoding import InputSpec, decode_request

    rng = np.random.default_rng(0)
    for shape in ((1, 4, 4), (3, 4, 4)):
        x = rng.integers(0, 256, (3, *shape)).astype(np.float32) / 255
        for body, img in zip(common.png_bodies(x), x):
            decoded = decode_request({"body": body}, {"Content-Type": "image/png"}, InputSpec(shape, 0.0, 1 << 20, 64))
            assert np.array_equal(decoded.x, img)


# -------------------------------------------------------------------------------------------- summaries
def test_summarize_counts_errors_accuracy_and_violations() -> None:
    calls = [Call(200, 0.01, _answer(1, cls=3)), Call(200, 0.02, _answer(3, cls=4)), Call(400, 0.005, {"error": "x"}),
             Call(None, 0.5, None)]
    s = summarize(calls, 1.0, STAGED, np.array([3, 0, 1, 2]))
    assert (s["requests"], s["errors"], s["budget_violations"]) == (4, 2, 0)
    assert s["accuracy"] == 0.25 and s["mean_mflops"] == pytest.approx((2.0 + 9.0) / 2)


def test_violations_are_judged_by_the_manifest_costs() -> None:
    assert violations([Call(200, 0.0, _answer(2, budget=4.0))], STAGED) == 1  # exit 2 costs 5 > budget 4
    assert violations([Call(200, 0.0, _answer(2, budget=5.0, spent=4.0))], STAGED) == 1  # misreported spend
    assert violations([Call(200, 0.0, _answer(2, budget=5.0))], STAGED) == 0


def test_http_vs_in_process_matches_the_batch_size() -> None:
    runs = [{"server": "early_exit_http", "concurrency": 16, "requests_per_s": 700.0},
            {"server": "in_process", "concurrency": 16, "batch_size": 8, "requests_per_s": 2000.0},
            {"server": "in_process", "concurrency": 1, "batch_size": 1, "requests_per_s": 900.0}]
    h = http_vs_in_process(runs, 8)
    assert h["ratio"] == 0.35 and h["meets_target"] is True and h["in_process_batch_size"] == 8
    assert http_vs_in_process(runs, 16)["ratio"] is None
    assert http_vs_in_process(runs, 8, paired={"median": 0.3, "per_round": [0.3]})["meets_target"] is False
    assert h["against_parallel_loops"] is None  # one worker: no parallel loops measured
    runs.append({"server": "in_process_parallel", "concurrency": 16, "loops": 2, "requests_per_s": 3500.0})
    two = http_vs_in_process(runs, 8)
    assert two["ratio"] == 0.35 and two["against_parallel_loops"] == {
        "loops": 2, "in_process_requests_per_s": 3500.0, "ratio": 0.2, "per_round": None}
    paired = http_vs_in_process(runs, 8, paired_parallel={"median": 0.25, "per_round": [0.25]})
    assert paired["against_parallel_loops"]["ratio"] == 0.25 and paired["meets_target"]  # judged on one loop


def test_parallel_in_process_loops_each_answer_every_body(tmp_path: Path) -> None:
    """The stricter in-process limit: one handler per child process, all at once, on the toy model."""
    from bench.common import png_bodies
    from bench.inprocess import ParallelInProcess
    from tests.toy_model import SHAPE, build_model_dir

    build_model_dir(tmp_path)
    x = np.random.default_rng(0).integers(0, 256, (20, *SHAPE)).astype(np.float32) / 255
    loops = ParallelInProcess(tmp_path, 2)
    try:
        run = loops.run(png_bodies(x), 4, 1)
    finally:
        loops.close()
    assert (run["loops"], run["requests"], run["errors"]) == (2, 40, 0)
    assert run["requests_per_s"] > 0 and run["cpu"]["process_cpu_ms_per_request"] > 0


def test_cpu_bound_estimate() -> None:
    http = {"cpu_ms_per_request": {"client": 0.2, "server": 0.8, "frontend": 0.5, "workers": 0.3}}
    limit = {"cpu_ms_per_request": {"process": 0.2}}
    e = cpu_bound_estimate(http, limit, cores=2)
    assert e["http_ms_per_request"] == 1.0 and e["ratio_if_cpu_bound"] == 0.4
    assert cpu_bound_estimate({}, limit) is None and cpu_bound_estimate(http, None) is None


def _inputs(tmp_path: Path, manifest: object = None, x: np.ndarray | None = None, y: np.ndarray | None = None,
            concurrency: tuple[int, ...] = (1, 16)) -> "bench_serve.Inputs":
    import argparse

    from bench import bench_serve

    x = np.zeros((0, 1, 4, 4), np.float32) if x is None else x
    return bench_serve.Inputs(argparse.Namespace(concurrency=list(concurrency)), tmp_path, tmp_path, manifest,
                              ServeConfig(), x, np.zeros(0, np.int64) if y is None else y, [])


def test_summarize_runs_orders_rows_and_pairs_rounds(tmp_path: Path) -> None:
    from bench.bench_serve import Measured, summarize_runs

    def rounds(*rates: float) -> list:
        return [{"requests": 10, "requests_per_s": r, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 0} for r in rates]

    measured = Measured(rounds={(Run.IN_PROCESS, 16): [{**r, "budget_violations": 1} for r in rounds(1000.0, 1000.0)],
                                (Run.STOCK, 16): rounds(100.0, 200.0), (Run.EARLY, 16): rounds(300.0, 300.0),
                                (Run.EARLY, 1): rounds(50.0, 60.0), (Run.STOCK, 1): rounds(50.0, 40.0)},
                        answer_runs={Run.EARLY: {"requests_per_s": 250.0, "mean_mflops": 2.0, "accuracy": 0.9},
                                     Run.STOCK: {"requests_per_s": 125.0, "mean_mflops": 9.0, "accuracy": 0.8}})
    out = summarize_runs(_inputs(tmp_path), measured)
    assert [(r["server"], r["concurrency"]) for r in out["runs"]] == [
        (Run.EARLY, 1), (Run.EARLY, 16), (Run.STOCK, 1), (Run.STOCK, 16), (Run.IN_PROCESS, 16)]
    early16 = out["runs"][1]
    assert (early16["requests_per_s"], early16["mean_mflops"], early16["accuracy"]) == (300.0, 2.0, 0.9)
    limit = out["runs"][-1]
    assert (limit["batch_size"], limit["budget_violations"]) == (ServeConfig().batch_size, 2)
    vs = {r["concurrency"]: r for r in out["early_exit_vs_stock"]}
    assert vs[16]["throughput_ratio"] == 2.25 and vs[16]["throughput_ratio_per_round"] == [3.0, 1.5]
    assert vs[1]["meets_target"] is True and vs[16]["meets_target"] is True
    assert out["early_exit_vs_stock_no_spin"] is None
    assert out["http_vs_in_process"]["ratio"] == 0.3 and out["http_vs_in_process"]["per_round"] == [0.3, 0.3]
    assert out["python_client_c16"]["early_exit_vs_stock"] == 2.0
    json.dumps(out)


def test_check_compares_http_answers_with_the_offline_runners(tmp_path: Path) -> None:
    """On the toy model: answers equal to the staged (and full-graph) runners' count as agreeing, one changed
    answer is found, budget rows judge each budget against its own offline policy."""
    from bench.bench_serve import Measured, check
    from tests.toy_model import COSTS, FULL_MFLOPS, _weights, build_model_dir, reference

    manifest = build_model_dir(tmp_path)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (40, 1, 4, 4)).astype(np.float32) / 255
    y = rng.integers(0, 3, 40)

    def answers(budget: float, n: int) -> list:
        exits, classes = reference(x[:n], budget)
        return [Call(200, 0.0, {"class_index": int(c), "exit_index": int(e) + 1, "mflops_spent": COSTS[e],
                                "budget_mflops": budget}) for e, c in zip(exits, classes)]

    full_pred = (x.reshape(40, -1) @ _weights()[-1]).argmax(-1)  # full.onnx is the last exit's graph
    stock = [Call(200, 0.0, {"class_index": int(c), "exit_index": 3, "mflops_spent": FULL_MFLOPS,
                             "budget_mflops": float("inf")}) for c in full_pred]
    early = answers(manifest.default_budget_mflops, 40)
    measured = Measured(answers={Run.EARLY: early, Run.STOCK: stock},
                        budget_calls={1.0: answers(1.0, 10), 2.5: answers(2.5, 10)})
    inp = _inputs(tmp_path, manifest, x, y)
    out = check(inp, measured)
    acc = out["accuracy"]
    assert (acc["answers_differing_from_offline"], acc["exits_differing_from_offline"]) == (0, 0)
    assert acc["stock_answers_differing_from_offline_full_graph"] == 0
    assert acc["http_early_exit"] == acc["offline_same_policy"] and acc["http_full_graph"] is None
    assert sum(acc["offline_exit_histogram"]) == 40
    assert out["compute"]["full_network_mflops"] == FULL_MFLOPS
    assert out["compute"]["mean_mflops_per_request_http"] == pytest.approx(out["compute"]["mean_mflops_offline"])
    assert [(r["budget_mflops"], r["answers_differing"], r["budget_violations"]) for r in out["budget_sweep"]] == [
        (1.0, 0, 0), (2.5, 0, 0)]
    assert out["budget_sweep"][0]["max_exit_used"] == 1  # budget 1.0 affords exit 1 only
    early[0] = Call(200, 0.0, {**early[0].body, "class_index": (early[0].body["class_index"] + 1) % 3})
    measured.budget_calls[1.0][1] = Call(503, 0.0, None)
    out = check(inp, measured)
    assert out["accuracy"]["answers_differing_from_offline"] == 1
    assert out["budget_sweep"][0]["answers_differing"] == 1 and out["budget_sweep"][0]["errors"] == 1


# ------------------------------------------------------------------------------------------------ stock
def test_stock_model_config_keeps_only_torchserve_keys() -> None:
    ours = ServeConfig.from_values(min_workers=1, max_workers=2, batch_size=8, max_batch_delay=5, response_timeout=30,
                                   handler={"mode": "early_exit"})
    assert stock.stock_model_config(ours) == {"minWorkers": 1, "maxWorkers": 2, "batchSize": 8, "maxBatchDelay": 5,
                                              "responseTimeout": 30}


def test_stock_json_bodies_carry_exactly_the_pixels() -> None:
    x = (np.arange(2 * 1 * 4 * 4).reshape(2, 1, 4, 4) % 256 / 255.0).astype(np.float32)
    bodies = stock.json_bodies(x)
    for body, img in zip(bodies, x):
        doc = json.loads(body)
        assert list(doc) == ["instances"]
        back = np.asarray(doc["instances"], dtype=np.float32)  # what torch.as_tensor makes of it
        assert back.shape == (1, 1, 4, 4) and np.array_equal(back[0], img)


def test_stock_answer_is_normalized_to_the_early_exit_fields() -> None:
    got = stock.parse_answer({"predictions": [[0.1, 2.0, -1.0]]}, 3, 7.5)
    assert got == {"class_index": 1, "exit_index": 3, "mflops_spent": 7.5, "budget_mflops": float("inf")}
    assert stock.parse_answer({"code": 503}, 3, 7.5) is None
    assert stock.parse_answer({"predictions": []}, 3, 7.5) is None
    calls = [Call(200, 0.01, got)]
    assert violations(calls, [7.5] * 3) == 0


def test_stock_compare_and_targets() -> None:
    early = [{"concurrency": 1, "requests_per_s": 100.0, "p50_ms": 9.0, "p99_ms": 20.0},
             {"concurrency": 16, "requests_per_s": 1300.0, "p50_ms": 10.0, "p99_ms": 30.0}]
    base = [{"concurrency": 1, "requests_per_s": 105.0, "p50_ms": 9.5, "p99_ms": 18.0},
            {"concurrency": 16, "requests_per_s": 1000.0, "p50_ms": 15.0, "p99_ms": 40.0}]
    rows = stock.compare(early, base, {1: 1.0, 16: 1.2})
    assert [r["throughput_ratio"] for r in rows] == [0.952, 1.3]
    assert [r["meets_target"] for r in rows] == [False, True]
    assert rows[1]["p99_ratio"] == 0.75
    assert stock.compare(early, [], {1: 1.0}) == []
    paired = stock.compare(early, base, {1: 1.0, 16: 1.2}, {1: 1.01, 16: None})
    assert [r["throughput_ratio"] for r in paired] == [1.01, 1.3]  # the per-round median wins when there is one
    assert paired[0]["throughput_ratio_of_medians"] == 0.952 and paired[0]["meets_target"]
    assert rows[0]["server_cpu_ratio"] is None  # runs without CPU figures
    early[0]["cpu_ms_per_request"], base[0]["cpu_ms_per_request"] = {"server": 1.0, "client": 0.1}, {"server": 8.0}
    row = stock.compare(early, base, {1: 1.0})[0]
    assert (row["early_exit_server_cpu_ms_per_request"], row["stock_server_cpu_ms_per_request"],
            row["server_cpu_ratio"]) == (1.0, 8.0, 0.125)


def test_stock_handler_is_one_class_overriding_only_inference() -> None:
    """TorchServe loads the handler module's single class; everything but inference stays BaseHandler's."""
    from ts.torch_handler.base_handler import BaseHandler
    from ts.utils.util import list_classes_from_module

    import bench.stock_onnx_handler as module

    (cls,) = list_classes_from_module(module)
    assert issubclass(cls, BaseHandler)
    overridden = {name for name in vars(cls) if callable(vars(cls)[name])}
    assert overridden == {"inference"}


def _flatten_onnx() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Flatten", ["image"], ["logits"], axis=1)], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 2, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


FLATTEN_BATCH = [[[[0.0, 1.0], [2.0, 3.0]]], [[[4.0, 5.0], [6.0, 7.0]]]]


def test_stock_handler_runs_an_onnx_session() -> None:
    import onnxruntime as ort
    import torch

    from bench.stock_onnx_handler import StockOnnxHandler

    handler = StockOnnxHandler()
    handler.model = ort.InferenceSession(_flatten_onnx(), providers=["CPUExecutionProvider"])
    out = handler.inference(torch.as_tensor(FLATTEN_BATCH))
    assert np.array_equal(out, np.arange(8, dtype=np.float32).reshape(2, 4))


def test_no_spin_variant_reopens_the_session_with_spinning_off(tmp_path: Path) -> None:
    """The --stock-no-spin server: BaseHandler's load, then the same session with allow_spinning=0."""
    import psutil
    import torch
    from ts.context import Context
    from ts.utils.util import list_classes_from_module

    import bench.stock_onnx_no_spin_handler as module

    (cls,) = list_classes_from_module(module)
    (tmp_path / "full.onnx").write_bytes(_flatten_onnx())
    ctx = Context("m", str(tmp_path), {"model": {"modelName": "m", "serializedFile": "full.onnx"}}, 1, None,
                  "0.12.0", model_yaml_config={})
    handler = cls()
    handler.initialize(ctx)
    options = handler.model.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == psutil.cpu_count(logical=True)  # as BaseHandler's session
    out = handler.inference(torch.as_tensor(FLATTEN_BATCH))
    assert np.array_equal(out, np.arange(8, dtype=np.float32).reshape(2, 4))


def test_build_stock_archive(tmp_path: Path) -> None:
    graph = tmp_path / "full.onnx"
    graph.write_bytes(b"not really onnx: the archiver only copies it")
    ours = ServeConfig.from_values(batch_size=8, max_batch_delay=5, min_workers=1, max_workers=1,
                                   handler={"mode": "early_exit"})
    mar = stock.build_stock_archive(graph, ours, tmp_path / "out", "m_stock")
    with zipfile.ZipFile(mar) as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
        config = yaml.safe_load(z.read(manifest["configFile"]))
        assert manifest["serializedFile"] == "full.onnx" and manifest["handler"] == "stock_onnx_handler.py"
        assert z.read("stock_onnx_handler.py") == stock.HANDLER.read_bytes()
    assert config == {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 5, "responseTimeout": 30}


# ------------------------------------------------------------------------------------------------ sweep
def test_setting_round_trips_model_config_and_renders_server_keys(tmp_path: Path) -> None:
    base = ServeConfig.from_values(min_workers=2, max_workers=2, batch_size=8, max_batch_delay=2, response_timeout=30,
                                   handler={"mode": "early_exit", "intra_op_threads": 1, "top_k": 3})
    s = sweep.Setting.from_model_config(base)
    assert s == sweep.Setting()
    shipped = ServeConfig()  # the sweep starts from what export ships
    assert (s.workers, s.batch_size, s.max_batch_delay) == (shipped.min_workers, shipped.batch_size,
                                                            shipped.max_batch_delay)
    other = sweep.Setting(workers=1, batch_size=16, max_batch_delay=5, intra_op_threads=2, netty_threads=4,
                          job_queue_size=64)
    config = other.model_config(base)
    assert (config.min_workers, config.max_workers, config.batch_size, config.max_batch_delay) == (1, 1, 16, 5)
    assert config.handler == base.handler.model_copy(update={"intra_op_threads": 2})  # top_k 3 etc. kept
    assert config.response_timeout == 30 and base.batch_size == 8  # the base is not modified
    assert sweep.Setting.from_model_config(config).batch_size == 16
    assert other.server_config() == {"number_of_netty_threads": "4", "job_queue_size": "64"}
    assert sweep.Setting().server_config() == {}
    assert other.label() == "w1-b16-d5-t2-n4-q64"
    rendered = render_config(REPO / "serving" / "config.properties", tmp_path / "c.properties", other.server_config())
    lines = rendered.read_text().splitlines()
    assert "job_queue_size=64" in lines and "job_queue_size=256" not in lines
    assert "number_of_netty_threads=4" in lines and "number_of_netty_threads=1" not in lines


def test_handler_options_accept_the_swept_section() -> None:
    from serving.options import HandlerOptions

    section = sweep.Setting(intra_op_threads=2).model_config(ServeConfig()).to_yaml_dict()["handler"]
    assert HandlerOptions.from_config(section).intra_op_threads == 2


def test_parse_axes() -> None:
    assert sweep.parse_axes(["workers=1,2", "batch_size=8,16"]) == {"workers": (1, 2), "batch_size": (8, 16)}
    with pytest.raises(ValueError):
        sweep.parse_axes(["threads=1"])
    with pytest.raises(ValueError):
        sweep.parse_axes(["workers"])
    assert set(sweep.AXES) == set(sweep.AXIS_NAMES)


class FakeCompare:
    """Throughput = 1000 x per-axis factors; max_batch_delay 0 errs. Counts comparisons; confirm() as the real one."""

    def __init__(self, table: dict) -> None:
        self.table, self.calls = table, []

    def rps(self, s: sweep.Setting) -> float:
        out = 1000.0
        for axis, factors in self.table.items():
            out *= factors.get(getattr(s, axis), 1.0)
        return out

    def __call__(self, candidate: sweep.Setting, reference: sweep.Setting) -> dict:
        self.calls.append((candidate, reference))
        return {"requests_per_s": self.rps(candidate), "reference_requests_per_s": self.rps(reference),
                "paired_ratio": round(self.rps(candidate) / self.rps(reference), 3),
                "errors": 5 if candidate.max_batch_delay == 0 else 0}

    def confirm(self, base: sweep.Setting, best: sweep.Setting, rounds: int) -> dict:
        def runs(s: sweep.Setting, scale: float = 1.0) -> list:
            return [{"requests": 10, "requests_per_s": self.rps(s) * scale, "p50_ms": 1.0, "p99_ms": 2.0,
                     "errors": 0}] * rounds
        out = {which: {"setting": s.to_dict(), "label": s.label(), "http": servers.medians(runs(s)),
                       "in_process": servers.medians(runs(s, 4.0)),
                       "http_vs_in_process": servers.paired_ratio(runs(s), runs(s, 4.0))}
               for which, s in (("base", base), ("best", best))}
        out["best_over_base"] = servers.paired_ratio(runs(best), runs(base))
        return out


ONE_WORKER = sweep.Setting(workers=1, max_batch_delay=5)  # a base the fakes below can improve on


def test_coordinate_sweep_walks_axes_against_the_best_so_far() -> None:
    fake = FakeCompare({"workers": {2: 1.5}, "batch_size": {16: 1.03, 32: 1.2}})
    axes = {"workers": (1, 2), "batch_size": (8, 16, 32), "max_batch_delay": (0, 5)}
    best, rows = sweep.coordinate_sweep(ONE_WORKER, axes, fake, min_gain=0.05)
    assert best == sweep.Setting(workers=2, batch_size=32, max_batch_delay=5)
    # the base's own value of an axis is not measured again; each candidate against the best at that point
    assert [(c.label(), r.label()) for c, r in fake.calls] == [
        ("w2-b8-d5-t1", "w1-b8-d5-t1"), ("w2-b16-d5-t1", "w2-b8-d5-t1"), ("w2-b32-d5-t1", "w2-b8-d5-t1"),
        ("w2-b32-d0-t1", "w2-b32-d5-t1")]
    assert [r["won"] for r in rows] == [True, False, True, False]  # 3% is noise; errors never win
    assert rows[0]["reference"] == "w1-b8-d5-t1" and rows[0]["axis"] == "workers"


def test_a_throughput_gain_bought_with_single_request_latency_does_not_win() -> None:
    row = {"errors": 0, "paired_ratio": 1.2, "c1_p50_ms": 13.0, "reference_c1_p50_ms": 8.0}
    assert not sweep.wins(row, 0.05, 0.25)
    assert sweep.wins({**row, "c1_p50_ms": 9.0}, 0.05, 0.25)
    assert sweep.wins({"errors": 0, "paired_ratio": 1.2}, 0.05, 0.25)  # no c=1 figures: throughput decides
    assert not sweep.wins({"errors": 1, "paired_ratio": 2.0}, 0.05, 0.25)


def test_clearly_lower_single_request_latency_without_less_throughput_wins() -> None:
    row = {"errors": 0, "paired_ratio": 0.97, "c1_p50_ms": 4.0, "reference_c1_p50_ms": 7.5}
    assert sweep.wins(row, 0.05)
    assert not sweep.wins({**row, "paired_ratio": 0.9}, 0.05)  # throughput lost beyond the noise allowance
    assert not sweep.wins({**row, "c1_p50_ms": 6.5}, 0.05)  # 13% lower latency is not clear enough


def test_settings_sweep_raises_the_bar_to_the_noise_floor() -> None:
    class Noisy(FakeCompare):
        def control(self, base: sweep.Setting) -> dict:
            return {"setting": base.label(), "paired_ratio": {"median": 0.88, "per_round": [0.88]}}

    out = settings_sweep(Noisy({"workers": {2: 1.1}}), ONE_WORKER, {"workers": (1, 2)}, 2, 0.05)
    assert out["gain_needed"] == 0.12 and not out["rows"][0]["won"] and not out["confirmed"]


def test_coordinate_sweep_ignores_gains_below_min_gain() -> None:
    best, rows = sweep.coordinate_sweep(sweep.Setting(), {"batch_size": (8, 16)}, FakeCompare({"batch_size": {16: 1.03}}),
                                        min_gain=0.05)
    assert best == sweep.Setting() and len(rows) == 1 and not rows[0]["won"]


def test_settings_sweep_confirms_and_recommends() -> None:
    out = settings_sweep(FakeCompare({"workers": {2: 1.5}}), ONE_WORKER, {"workers": (1, 2)},
                         confirm_rounds=2, min_gain=0.05)
    assert out["confirmed"] and out["best_over_base"] == 1.5 and out["chosen_label"] == "w2-b8-d5-t1"
    assert out["recommended_defaults"] == {"export.archive.ServeConfig": {"min_workers": 2, "max_workers": 2},
                                           "serving/config.properties": {}, "unchanged": False}
    assert out["http_vs_in_process_c16"]["ratio"] == 0.25 and not out["http_vs_in_process_c16"]["meets_target"]
    json.dumps(out)
    flat = settings_sweep(FakeCompare({}), ONE_WORKER, {"workers": (1, 2)}, 1, 0.05)
    assert not flat["confirmed"] and flat["recommended_defaults"]["unchanged"]


def test_medians_and_paired_ratios_over_rounds() -> None:
    runs = [{"requests": 10, "requests_per_s": r, "p50_ms": p, "p99_ms": 2 * p, "errors": e,
             "cpu": {"client_cpu_ms_per_request": 0.1 * i, "server_cpu_ms_per_request": 1.0}}
            for i, (r, p, e) in enumerate(((100.0, 5.0, 0), (300.0, 7.0, 1), (200.0, 6.0, 0)))]
    m = servers.medians(runs)
    assert (m["rounds"], m["requests"], m["errors"], m["requests_per_s"], m["p50_ms"], m["p99_ms"]) == \
        (3, 30, 1, 200.0, 6.0, 12.0)
    assert m["cpu_ms_per_request"] == {"client": 0.1, "server": 1.0} and len(m["per_round"]) == 3
    other = [{"requests_per_s": v} for v in (50.0, 100.0, 200.0)]
    assert servers.paired_ratio(runs, other) == {"median": 2.0, "per_round": [2.0, 3.0, 1.0]}
    assert servers.paired_ratio(runs, [{"requests_per_s": 0}])["median"] is None
    assert servers.per_request({"client_cpu_s": 0.5, "wall_s": 1.0}, 100) == {
        "client_cpu_s": 0.5, "wall_s": 1.0, "client_cpu_ms_per_request": 5.0}


def test_recommendation_names_config_properties_keys() -> None:
    rec = sweep.recommendation(sweep.Setting(), sweep.Setting(netty_client_threads=1, max_batch_delay=5))
    assert rec["export.archive.ServeConfig"] == {"max_batch_delay": 5}
    assert rec["serving/config.properties"] == {"netty_client_threads": "1"}


def test_rewrite_model_config_changes_only_that_entry(tmp_path: Path) -> None:
    src = tmp_path / "a.mar"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("model-config.yaml", ServeConfig.from_values(batch_size=8, handler={"mode": "early_exit"}).to_yaml())
        z.writestr("stage_1.onnx", b"\x00graph")
    out = archives.rewrite_model_config(src, tmp_path / "b" / "a.mar", sweep.Setting(batch_size=4).model_config)
    with zipfile.ZipFile(out) as z:
        assert z.read("stage_1.onnx") == b"\x00graph"
        config = yaml.safe_load(z.read("model-config.yaml"))
    assert config["batchSize"] == 4 and config["handler"]["mode"] == "early_exit"
    full = archives.full_graph_archive(src, tmp_path / "c" / "a.mar")
    with zipfile.ZipFile(full) as z:
        served = ServeConfig.from_yaml(z.read("model-config.yaml"))
        assert z.read("stage_1.onnx") == b"\x00graph"
    assert served.handler.mode.value == "full_graph_only" and served.batch_size == 8


def test_cli_parses_the_sweep_options() -> None:
    args = build_parser().parse_args(["--sweep-only", "--sweep-axis", "workers=1,2", "--settings-requests", "50"])
    assert args.sweep_only and args.sweep_axis == ["workers=1,2"] and args.settings_requests == 50
    assert not build_parser().parse_args([]).no_stock


def test_log_filter_drops_only_the_per_request_echoes() -> None:
    """serving/log4j2.xml's RegexFilter (matched on the raw message, Java regex = Python re here): the three
    per-request frontend lines go, "Load model failed" (read by serving/server.py) and the rest stay."""
    import re
    import xml.etree.ElementTree as ET

    root = ET.parse(REPO / "serving" / "log4j2.xml").getroot()
    logger = next(x for x in root.iter("Logger") if x.get("name") == "org.pytorch.serve")
    (flt,) = logger.findall("RegexFilter")
    assert (flt.get("onMatch"), flt.get("onMismatch"), flt.get("useRawMsg")) == ("DENY", "NEUTRAL", "true")
    pattern = re.compile(flt.get("regex"))
    for dropped in ("result={}, pattern={}", "Sending response for jobId {}", "Backend response time: {}"):
        assert pattern.fullmatch(dropped)
    for kept in ("Load model failed: {}, error: {}", "Worker cmdline: {}", "Model {} loaded.",
                 "Backend worker process died."):
        assert not pattern.fullmatch(kept)
