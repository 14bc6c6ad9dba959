"""The handler in-process, with TorchServe's own Context, request decoding and metrics cache.

The model is the synthetic three-stage ONNX chain of tests/toy_model.py: its logits are linear in the
input, so the expected exit of every row follows from the shared policy functions applied to numpy
logits, i.e. the test checks handler == policy.
"""
from __future__ import annotations

import ast
import dataclasses
import io
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from ts.context import Context
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.metrics.metric_type_enum import MetricTypes
from ts.service import Service

from early_exit.manifest import ManifestError, write_manifest
from early_exit.policy import entry_for_budget
from early_exit.runner import FullGraphRunner
from early_exit.transform import EvalTransform
from serving.decoding import decode_image
from serving.handler import EarlyExitHandler
from serving.metrics import METRICS, MetricName
from serving.options import OptionsError
from serving.rejections import RejectReason, printable
from tests.toy_model import (
    CLASSES,
    COSTS,
    REPO,
    _weights,
    FULL_MFLOPS,
    METRICS_YAML,
    MODEL,
    SHAPE,
    TABLE,
    build_model_dir,
    reference,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("toy_model")
    build_model_dir(folder)
    return folder


def make_context(model_dir: Path, options: dict[str, Any] | None = None, gpu: int | None = None) -> Context:
    """TorchServe's Context for the toy model. The audit and the metrics' flush thread are off unless `options`
    turn them on: a background thread writes metric lines at any time, which would race with the tests that read
    the emitted lines (test_audit.py and test_counters_and_latencies_are_written_by_the_flush_thread cover them)."""
    options = {"audit_rate": 0.0, "metrics_flush_seconds": 0.0, **(options or {})}
    cache = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    cache.initialize_cache()
    cache.model_name = MODEL
    return Context(MODEL, str(model_dir), {"model": {"modelName": MODEL}}, 8, gpu, "0.12.0", metrics=cache,
                   model_yaml_config={"handler": options})


@pytest.fixture(scope="module")
def served(model_dir: Path) -> tuple[EarlyExitHandler, Context]:
    ctx = make_context(model_dir)
    handler = EarlyExitHandler()
    handler.initialize(ctx)
    return handler, ctx


def run_batch(handler: EarlyExitHandler, ctx: Context, requests: list[tuple[Any, dict[str, str]]],
              content_type: str = "application/octet-stream") -> list[tuple[int, dict[str, str], dict]]:
    """Decode a batch the way TorchServe's worker does (Service.retrieve_data_for_inference), then handle it."""
    batch = [{
        "requestId": f"req-{i}".encode(),
        "parameters": [{"name": "body", "contentType": content_type, "value": body}],
        "headers": [{"name": k.encode(), "value": v.encode()} for k, v in headers.items()],
    } for i, (body, headers) in enumerate(requests)]
    processors, inputs, ids = Service.retrieve_data_for_inference(batch)
    ctx.request_ids, ctx.request_processor = ids, processors
    ctx.metrics.request_ids = ids
    out = handler.handle(inputs, ctx)
    assert len(out) == len(requests)
    assert all(isinstance(text, str) for text in out)  # encoded by the handler, sent as they are by TorchServe
    return [(ctx.get_response_status(i)[0], ctx.get_response_headers(i), json.loads(text))
            for i, text in enumerate(out)]


def as_json(x: np.ndarray) -> bytes:
    return json.dumps({"data": x.tolist()}).encode()


def rows(pixel0: list[float], pixel12: tuple[float, float] = (0.2, 0.9)) -> np.ndarray:
    x = np.zeros((len(pixel0), *SHAPE), dtype=np.float32)
    for i, p in enumerate(pixel0):
        x[i, 0, 0, 0], x[i, 0, 0, 1], x[i, 0, 0, 2] = p, *pixel12
    return x


def png(array: np.ndarray, mode: str = "L", fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


PIXELS = [1.0, 0.6, 0.5, 0.39, 0.3, 0.1, 0.0, 0.38]


@pytest.mark.parametrize("budget", [None, "1", "2.5", "3.3", "4", "1000"])
def test_batch_answers_match_the_shared_policy(served, budget: str | None) -> None:
    handler, ctx = served
    x = rows(PIXELS)
    headers = {} if budget is None else {"X-Compute-Budget": budget}
    results = run_batch(handler, ctx, [(as_json(r), headers) for r in x])
    exits, classes = reference(x, 4.0 if budget is None else float(budget))
    applied = entry_for_budget(4.0 if budget is None else float(budget), TABLE, COSTS)
    for (status, hdrs, body), e, c in zip(results, exits, classes):
        assert status == 200
        assert body["exit_index"] == e + 1 and body["class_index"] == c and body["label"] == CLASSES[c]
        assert body["num_exits"] == 3 and body["max_exit_allowed"] == applied.max_exit + 1
        assert body["mflops_spent"] == COSTS[e] <= body["budget_mflops"]
        assert body["calibrated_budget_mflops"] == applied.budget_mflops
        assert body["budget_source"] == ("default" if budget is None else "header")
        assert hdrs["X-Exit-Index"] == str(e + 1) and float(hdrs["X-Compute-Spent"]) == COSTS[e]
        assert hdrs["content-type"] == "application/json"
        assert len(body["top_k"]) == 3 and body["top_k"][0]["class_index"] == c
        assert abs(sum(t["probability"] for t in body["top_k"]) - 1.0) < 1e-6
    if budget is None:  # the default budget uses every exit: the test data must exercise all three
        assert set(exits.tolist()) == {0, 1, 2}


def test_budget_header_name_is_case_insensitive(served) -> None:
    handler, ctx = served
    x = rows([0.1])[0]  # would go to exit 3 under the default budget
    for name in ("x-compute-budget", "X-COMPUTE-BUDGET", "X-Compute-Budget"):
        (status, _, body), = run_batch(handler, ctx, [(as_json(x), {name: "1.0"})])
        assert status == 200 and body["exit_index"] == 1 and body["budget_mflops"] == 1.0


@pytest.mark.parametrize("value, reason", [
    ("abc", RejectReason.INVALID_BUDGET), ("", RejectReason.INVALID_BUDGET), ("-1", RejectReason.INVALID_BUDGET),
    ("nan", RejectReason.INVALID_BUDGET), ("inf", RejectReason.INVALID_BUDGET), ("1e999", RejectReason.INVALID_BUDGET),
    ("0.99", RejectReason.BUDGET_BELOW_MINIMUM), ("0", RejectReason.BUDGET_BELOW_MINIMUM),
])
def test_invalid_budget_is_a_400_for_that_request_only(served, value: str, reason: RejectReason) -> None:
    handler, ctx = served
    x = rows([1.0, 0.1])
    results = run_batch(handler, ctx, [(as_json(x[0]), {}), (as_json(x[1]), {"X-Compute-Budget": value}),
                                       (as_json(x[1]), {"X-Compute-Budget": "2.5"})])
    assert [r[0] for r in results] == [200, 400, 200]
    body = results[1][2]
    assert body["reason"] == reason.value and body["status"] == 400
    assert body["valid_budget_mflops"] == {"min": 1.0, "full_depth": 4.0}
    assert "X-Exit-Index" not in results[1][1]


def _deep(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


def _bad_inputs() -> list[tuple[str, Any, RejectReason]]:
    good = rows([0.5])[0]
    png_bytes = png((good[0] * 255).astype(np.uint8))
    return [
        ("empty", b"", RejectReason.EMPTY_BODY),
        ("whitespace", b"  \n", RejectReason.EMPTY_BODY),
        ("garbage", b"\x00\x01not an image", RejectReason.UNDECODABLE_IMAGE),
        ("truncated png", png_bytes[: len(png_bytes) // 2], RejectReason.UNDECODABLE_IMAGE),
        ("png header only", png_bytes[:8], RejectReason.UNDECODABLE_IMAGE),
        ("jpeg magic", b"\xff\xd8\xff\xe0" + b"\x00" * 20, RejectReason.UNDECODABLE_IMAGE),
        ("gif", b"GIF89a" + b"\x00" * 30, RejectReason.UNDECODABLE_IMAGE),
        ("wrong shape", json.dumps({"data": np.zeros((1, 3, 4)).tolist()}).encode(), RejectReason.WRONG_SHAPE),
        ("ragged", json.dumps({"data": [[[0.1, 0.2], [0.3]]]}).encode(), RejectReason.WRONG_SHAPE),
        ("scalar", b'{"data": 0.5}', RejectReason.BAD_JSON),
        ("nan", as_json(good).replace(b"0.5", b"NaN", 1), RejectReason.NON_FINITE),
        ("infinity", as_json(good).replace(b"0.5", b"Infinity", 1), RejectReason.NON_FINITE),
        ("overflow", as_json(good).replace(b"0.5", b"1e999", 1), RejectReason.OUT_OF_RANGE),
        ("huge integer", as_json(good).replace(b"0.5", b"9" * 400, 1), RejectReason.OUT_OF_RANGE),
        ("beyond float32", as_json(good).replace(b"0.5", b"1e39", 1), RejectReason.OUT_OF_RANGE),
        ("above one", as_json(good).replace(b"0.5", b"1.5", 1), RejectReason.OUT_OF_RANGE),
        ("negative", as_json(good).replace(b"0.5", b"-0.1", 1), RejectReason.OUT_OF_RANGE),
        ("bad json", b'{"data": [1, 2', RejectReason.BAD_JSON),
        ("no data key", b'{"pixels": []}', RejectReason.BAD_JSON),
        ("json list", b"[1, 2, 3]", RejectReason.BAD_JSON),
        ("strings", json.dumps({"data": [[["0.5"] * 4] * 4]}).encode(), RejectReason.BAD_JSON),
        ("nulls", json.dumps({"data": [[[None] * 4] * 4]}).encode(), RejectReason.BAD_JSON),
        ("deep nesting", b'{"data": ' + b"[" * 2000 + b"]" * 2000 + b"}", RejectReason.BAD_JSON),
        ("nested 50 deep", json.dumps({"data": _deep(0.5, 50)}).encode(), RejectReason.WRONG_SHAPE),  # was a 500
        ("more values than the input", json.dumps({"data": [[0.5] * 17]}).encode(), RejectReason.WRONG_SHAPE),
        ("not utf-8", b'{"data": "\xff\xfe"}', RejectReason.BAD_JSON),
        ("oversized", b"{" + b" " * (1 << 20) + b"}", RejectReason.PAYLOAD_TOO_LARGE),
    ]


BAD = _bad_inputs()


@pytest.mark.parametrize("name, body, reason", BAD, ids=[b[0] for b in BAD])
def test_bad_input_among_good_requests(served, name: str, body: Any, reason: RejectReason) -> None:
    handler, ctx = served
    x = rows([1.0, 0.1])
    results = run_batch(handler, ctx, [(as_json(x[0]), {}), (body, {}), (as_json(x[1]), {})])
    assert [r[0] for r in results] == [200, reason.status, 200], results[1][2]
    assert results[1][2]["reason"] == reason.value and results[1][2]["error"]
    exits, _ = reference(x, 4.0)
    assert [results[0][2]["exit_index"], results[2][2]["exit_index"]] == (exits + 1).tolist()


def test_corrupted_images_never_escape_as_exceptions(served) -> None:
    """Flip bytes all over a valid PNG and JPEG: every variant is a 200 or a 400, never an exception."""
    handler, ctx = served
    rng = np.random.default_rng(0)
    base = [png((rng.random((4, 4)) * 255).astype(np.uint8)),
            png((rng.random((4, 4)) * 255).astype(np.uint8), fmt="JPEG")]
    batch = []
    for data in base:
        for _ in range(30):
            corrupt = bytearray(data)
            for pos in rng.integers(0, len(corrupt), size=3):
                corrupt[pos] = int(rng.integers(0, 256))
            batch.append((bytes(corrupt), {}))
    for start in range(0, len(batch), 8):
        for status, _, body in run_batch(handler, ctx, batch[start:start + 8]):
            assert status == 200 or body["reason"] == RejectReason.UNDECODABLE_IMAGE.value


def test_images_are_converted_to_the_model_input(served) -> None:
    handler, ctx = served
    x = rows([1.0, 0.1])
    gray = [(r[0] * 255).round().astype(np.uint8) for r in x]
    rgb_big = np.repeat(np.repeat(np.stack([gray[1]] * 3, axis=-1), 4, axis=0), 4, axis=1)  # 16x16 RGB
    results = run_batch(handler, ctx, [(png(gray[0]), {}), (png(gray[1]), {}), (png(rgb_big, "RGB"), {}),
                                       (png(gray[1], fmt="JPEG"), {}), (as_json(x[1]), {})])
    assert all(r[0] == 200 for r in results), results
    exits, classes = reference(x, 4.0)
    assert results[0][2]["exit_index"] == exits[0] + 1
    for status, _, body in results[1:]:  # 8-bit rounding, resizing and JPEG keep the deep answer
        assert body["class_index"] == classes[1]


def test_image_pixel_limit(model_dir: Path) -> None:
    ctx = make_context(model_dir, {"max_image_pixels": 100})
    handler = EarlyExitHandler()
    handler.initialize(ctx)
    (status, _, body), = run_batch(handler, ctx, [(png(np.zeros((11, 10), dtype=np.uint8)), {})])
    assert status == 413 and body["reason"] == RejectReason.PAYLOAD_TOO_LARGE.value
    big_jpeg = png(np.zeros((64, 64), dtype=np.uint8), fmt="JPEG")  # draft() must not dodge the limit
    (status, _, body), = run_batch(handler, ctx, [(big_jpeg, {})])
    assert status == 413


def test_bodies_torchserve_already_decoded(served) -> None:
    """With decode_input_request=true TorchServe hands over parsed JSON (application/json) or str (text/*)."""
    handler, ctx = served
    x = rows([1.0])[0]
    parsed = {"data": x.tolist()}
    results = run_batch(handler, ctx, [(parsed, {}), ({"data": [1, 2]}, {}), (json.dumps(parsed), {})])
    assert [r[0] for r in results] == [200, 400, 200]
    assert results[1][2]["reason"] == RejectReason.WRONG_SHAPE.value


def test_form_urlencoded_bodies_get_a_415_that_says_what_to_send(served) -> None:
    """curl -d/--data-binary sends application/x-www-form-urlencoded; TorchServe splits such bodies into fields."""
    handler, ctx = served
    x = rows([1.0])[0]
    results = run_batch(handler, ctx, [({"garbage": b""}, {"Content-Type": "application/x-www-form-urlencoded"}),
                                       (as_json(x), {"content-type": "application/json"})])
    assert [r[0] for r in results] == [415, 200]
    assert results[0][2]["reason"] == "unsupported_content_type" and "image/png" in results[0][2]["error"]


def test_describe_and_explain_headers_do_not_hijack_the_batch(served) -> None:
    """BaseHandler looks at request 0's `describe`/`explain` headers for the whole batch; we must not."""
    handler, ctx = served
    x = rows([1.0, 0.1])
    results = run_batch(handler, ctx, [(as_json(x[0]), {"describe": "True", "explain": "True"}), (as_json(x[1]), {})])
    assert [r[0] for r in results] == [200, 200] and all("exit_index" in r[2] for r in results)


def test_all_rejected_batch(served) -> None:
    handler, ctx = served
    results = run_batch(handler, ctx, [(b"", {}), (b"{", {"X-Compute-Budget": "x"})])
    assert [(r[0], r[2]["reason"]) for r in results] == [(400, "empty_body"), (400, "invalid_budget")]


def _metric_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, dict[str, str], str]]:
    """(name, value, dimensions, type) from the [METRICS] lines the worker prints for the frontend."""
    pattern = re.compile(r"\[METRICS\](\w+)\.\w+:([^|]+)\|#([^|]*)\|#type:(\w+)")
    out = []
    for record in caplog.records:
        m = pattern.search(record.getMessage())
        if m:
            dims = dict(pair.split(":", 1) for pair in m.group(3).split(",") if pair)
            out.append((m.group(1), m.group(2), dims, m.group(4)))
    return out


def test_metrics_are_emitted_with_our_dimensions_first(served, caplog: pytest.LogCaptureFixture) -> None:
    handler, ctx = served
    x = rows(PIXELS)
    caplog.set_level(logging.INFO)
    run_batch(handler, ctx, [(as_json(r), {}) for r in x] + [(b"", {}), (b"{", {"X-Compute-Budget": "-2"})])
    lines = _metric_lines(caplog)
    exits, _ = reference(x, 4.0)
    counts = {name: [] for name, *_ in lines}
    for name, value, dims, kind in lines:
        counts[name].append((float(value), dims, kind))
    exit_counts = {d["ExitIndex"]: v for v, d, _ in counts["EarlyExitCount"]}
    assert exit_counts == {str(e + 1): float((exits == e).sum()) for e in set(exits.tolist())}
    for name in ("EarlyExitCount", "RequestsRejected", "StageTimeMs", "StageRuns", "StageRows"):
        for _, dims, kind in counts[name]:
            assert list(dims)[1:] == ["ModelName", "Level"] and dims["ModelName"] == MODEL
            assert dims["Level"] == "Model" and kind == "COUNTER"
    assert sorted(d["Reason"] for _, d, _ in counts["RequestsRejected"]) == ["empty_body", "invalid_budget"]
    assert [v for v, _, _ in counts["ComputeSpentMFLOPs"]] == [pytest.approx(sum(COSTS[e] for e in exits))]
    assert [v for v, _, _ in counts["ComputeFullMFLOPs"]] == [pytest.approx(FULL_MFLOPS * len(x))]
    assert {d["Stage"]: v for v, d, _ in counts["StageRuns"]} == {"1": 1.0, "2": 1.0, "3": 1.0}
    assert {d["Stage"]: v for v, d, _ in counts["StageRows"]} == {"1": 8.0, "2": float((exits >= 1).sum()),
                                                                  "3": float((exits >= 2).sum())}
    latency = counts["RequestLatencySeconds"]
    assert len(latency) == len(x) + 2 and all(k == "HISTOGRAM" and 0 < v < 5 for v, _, k in latency)


def test_counters_and_latencies_are_written_by_the_flush_thread(model_dir: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """With a flush interval, counters are summed across batches and written by the flush thread (one line per
    series), and so are the latency observations (one line per request), none on the request path."""
    handler = EarlyExitHandler()
    handler.initialize(make_context(model_dir, {"metrics_flush_seconds": 0.2}))
    try:
        x = rows(PIXELS)
        caplog.set_level(logging.INFO)
        handler.metrics.flush()  # the series started at 0 on load
        caplog.clear()
        ctx = handler.context
        for _ in range(3):
            run_batch(handler, ctx, [(as_json(r), {}) for r in x] + [(b"", {})])
        deadline = time.monotonic() + 10  # the flush thread writes them, no request needed
        while time.monotonic() < deadline and not any(n == "ComputeSpentMFLOPs" for n, *_ in _metric_lines(caplog)):
            time.sleep(0.05)
        assert any(n == "ComputeSpentMFLOPs" for n, *_ in _metric_lines(caplog))
    finally:
        handler.metrics.close()  # writes whatever the thread had not written yet
    written = _metric_lines(caplog)
    latency = [v for name, v, _, kind in written if name == "RequestLatencySeconds" and kind == "HISTOGRAM"]
    assert len(latency) == 3 * (len(x) + 1) and all(0 < float(v) < 5 for v in latency)  # one line per request
    lines = [line for line in written if line[3] == "COUNTER"]
    exits, _ = reference(x, 4.0)
    totals: dict[tuple[str, str], float] = {}
    for name, value, dims, _ in lines:
        key = (name, next(iter(dims.values())) if len(dims) > 2 else "")
        totals[key] = totals.get(key, 0.0) + float(value)
    assert totals[("ComputeSpentMFLOPs", "")] == pytest.approx(3 * sum(COSTS[e] for e in exits))
    assert totals[("RequestsRejected", "empty_body")] == 3
    assert {k: v for k, v in totals.items() if k[0] == "EarlyExitCount"} == {
        ("EarlyExitCount", str(e + 1)): 3.0 * (exits == e).sum() for e in set(exits.tolist())}
    assert totals[("StageRuns", "1")] == 3
    # summed: a few lines per series, not one per batch and stage
    assert sum(1 for name, *_ in lines if name == "StageRuns") < 3 * 3


def test_every_counter_series_starts_at_zero_on_load(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    EarlyExitHandler().initialize(make_context(model_dir, {"audit_rate": 0.01}))  # audit series start too
    lines = [line for line in _metric_lines(caplog) if line[3] == "COUNTER"]  # gauges carry the manifest's figures
    assert all(float(v) == 0 for _, v, _, _ in lines)
    started = {(name, next(iter(dims.values()))) for name, _, dims, _ in lines}
    assert {("EarlyExitCount", str(k)) for k in (1, 2, 3)} <= started
    assert {("RequestsRejected", r.value) for r in RejectReason} <= started
    assert {(n, str(k)) for n in ("StageTimeMs", "StageRuns", "StageRows") for k in (1, 2, 3)} <= started
    assert {("ComputeSpentMFLOPs", "toy"), ("ComputeFullMFLOPs", "toy")} <= started
    audit = {(d["ExitIndex"], d["Outcome"]) for name, _, d, _ in lines if name == "EarlyExitAudit"}
    assert audit == {(e, o) for e in ("1", "2") for o in ("agree", "disagree", "error")}


def test_metrics_yaml_declares_every_handler_metric_in_emission_order() -> None:
    cache = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    cache.initialize_cache()
    for spec in METRICS:
        declared = cache.get_metric(spec.name.value, spec.kind)
        assert declared.dimension_names == spec.all_dimensions, spec.name
    assert cache.get_metric("HandlerTime", MetricTypes.GAUGE)  # TorchServe's own model metrics stay declared


def test_yaml_with_other_dimension_order_refuses_to_load(model_dir: Path, tmp_path: Path) -> None:
    text = METRICS_YAML.read_text().replace('["ExitIndex", *model_name, *level]', '[*model_name, *level, "ExitIndex"]')
    (tmp_path / "metrics.yaml").write_text(text)
    cache = MetricsCacheYamlImpl(config_file_path=str(tmp_path / "metrics.yaml"))
    cache.initialize_cache()
    ctx = make_context(model_dir)
    ctx.metrics = cache
    with pytest.raises(ValueError, match="EarlyExitCount"):
        EarlyExitHandler().initialize(ctx)


def test_tampered_graph_refuses_to_load(model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    data = bytearray((folder / "stage_2.onnx").read_bytes())
    data[-1] ^= 0xFF
    (folder / "stage_2.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256"):
        EarlyExitHandler().initialize(make_context(folder))


def test_unknown_handler_option_refuses_to_load(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_payload_byte"):
        EarlyExitHandler().initialize(make_context(model_dir, {"max_payload_byte": 10}))


def test_a_negative_flush_interval_refuses_to_load_and_only_counters_are_summed(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="metrics_flush_seconds"):
        EarlyExitHandler().initialize(make_context(model_dir, {"metrics_flush_seconds": -1}))
    handler = EarlyExitHandler()
    handler.initialize(make_context(model_dir))
    with pytest.raises(ValueError, match="not a counter"):
        handler.metrics.count(MetricName.REQUEST_LATENCY, 0.1)
    with pytest.raises(ValueError, match="not a histogram"):
        handler.metrics.observe(MetricName.EARLY_EXIT_COUNT, 1)


def test_full_graph_only_mode(model_dir: Path) -> None:
    ctx = make_context(model_dir, {"mode": "full_graph_only"})
    handler = EarlyExitHandler()
    handler.initialize(ctx)
    assert isinstance(handler.runner, FullGraphRunner)
    x = rows(PIXELS)
    results = run_batch(handler, ctx, [(as_json(r), {}) for r in x] + [(as_json(x[0]), {"X-Compute-Budget": "2.5"})])
    full_classes = [int(np.argmax(r.reshape(-1) @ _weights()[-1])) for r in x]
    for (status, hdrs, body), c in zip(results, full_classes):
        assert status == 200 and body["exit_index"] == 3 and body["class_index"] == c
        assert body["mflops_spent"] == FULL_MFLOPS and body["mode"] == "full_graph_only"
        assert body["calibrated_budget_mflops"] is None
    assert results[-1][0] == 400 and results[-1][2]["reason"] == "budget_below_minimum"
    assert results[-1][2]["valid_budget_mflops"] == {"min": FULL_MFLOPS, "full_depth": FULL_MFLOPS}


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_cuda_is_used_only_when_really_active(model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """onnxruntime-gpu on a GPU-less host lists CUDA but runs on CPU: the handler must notice."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    caplog.set_level(logging.WARNING)
    handler = EarlyExitHandler()
    handler.initialize(make_context(model_dir, gpu=0))
    assert {s.get_providers()[0] for s in handler.runner.sessions} == {"CPUExecutionProvider"}
    assert "CUDA was requested" in caplog.text


def test_torchserve_loader_accepts_the_module(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """TorchServe's own loader on an unpacked-archive layout (handler.py + early_exit/ + serving/ + graphs): it
    finds the handler class itself (the module defines exactly one class and no module-level entry point)."""
    from ts.model_loader import TsModelLoader

    folder = tmp_path / "mar"
    shutil.copytree(model_dir, folder)
    shutil.copy(REPO / "serving" / "handler.py", folder / "handler.py")
    shutil.copytree(REPO / "serving", folder / "serving")
    shutil.copytree(REPO / "early_exit", folder / "early_exit")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(__import__("sys").modules, "handler", raising=False)
    cache = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    cache.initialize_cache()
    service = TsModelLoader().load(MODEL, str(folder), "handler", None, 4, None, True, cache)
    batch = [{"requestId": b"r0", "parameters": [{"name": "body", "contentType": "application/json",
                                                   "value": as_json(rows([1.0])[0])}], "headers": []}]
    service.set_cl_socket(None)
    response = service.predict(batch)
    assert b"exit_index" in bytes(response) and b"Prediction success" in bytes(response)
    __import__("sys").modules.pop("handler", None)


@pytest.mark.parametrize("module", ["handler", "budget", "decoding", "metrics", "options", "rejections"])
def test_serving_imports_only_what_the_worker_has(module: str) -> None:
    """The worker has early_exit and serving (from the archive), numpy, onnxruntime, PIL, pydantic, ts and the
    stdlib: never training or export code."""
    import sys

    tree = ast.parse((REPO / "serving" / f"{module}.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    third_party = roots - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party <= {"early_exit", "serving", "numpy", "onnxruntime", "PIL", "pydantic", "ts"}


def test_handler_module_defines_one_class_for_torchserves_loader() -> None:
    import inspect

    import serving.handler as module

    assert not hasattr(module, "handle")
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
    assert classes == [EarlyExitHandler]


def test_one_batch_mixing_good_requests_with_every_failing_kind(served, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every bad kind and an unexpected exception (a bug) in one batch: each gets its own answer, the good
    requests are answered as if alone."""
    import serving.handler as handler_module

    handler, ctx = served
    real = handler_module.decode_request

    def buggy(row, headers, spec):
        if headers.get("X-Test-Bug"):
            raise RuntimeError("a bug in decoding")
        return real(row, headers, spec)

    monkeypatch.setattr(handler_module, "decode_request", buggy)
    x = rows([1.0, 0.1, 0.5])
    good = [(as_json(r), {}) for r in x]
    bad = [(body, {}) for _, body, _ in BAD] + [(as_json(x[0]), {"X-Test-Bug": "1"})]
    requests = [good[0], *bad[: len(bad) // 2], good[1], *bad[len(bad) // 2:], good[2]]
    results = run_batch(handler, ctx, requests)
    expected_exits, _ = reference(x, 4.0)
    answers = [r for r in results if r[0] == 200]
    assert [a[2]["exit_index"] for a in answers] == (expected_exits + 1).tolist()
    failures = [r for r in results if r[0] != 200]
    assert [f[2]["reason"] for f in failures] == [reason.value for _, _, reason in BAD] + ["internal_error"]
    internal = failures[-1]
    assert internal[0] == 500 and "a bug in decoding" not in internal[2]["error"]
    assert "req-" in internal[2]["error"]  # names the request id the log line carries
    for status, _, body in failures:
        assert body["status"] == status and "Traceback" not in body["error"] and "object at 0x" not in body["error"]


def test_budget_headers_in_several_cases_apply_the_smallest(served) -> None:
    handler, ctx = served
    x = rows([0.1])[0]  # not confident anywhere: answers at the deepest allowed exit
    results = run_batch(handler, ctx, [
        (as_json(x), {"X-Compute-Budget": "4", "x-compute-budget": "2.5"}),
        (as_json(x), {"X-COMPUTE-BUDGET": "1", "x-compute-budget": "4"}),
        (as_json(x), {"X-Compute-Budget": "4", "x-compute-budget": "lots"}),
    ])
    assert [r[0] for r in results] == [200, 200, 400]
    assert results[0][2]["budget_mflops"] == 2.5 and results[0][2]["exit_index"] == 2
    assert results[1][2]["budget_mflops"] == 1.0 and results[1][2]["exit_index"] == 1
    assert results[2][2]["reason"] == "invalid_budget"


def test_operator_ceiling_clips_budgets(model_dir: Path) -> None:
    ctx = make_context(model_dir, {"max_budget_mflops": 2.5})
    handler = EarlyExitHandler()
    handler.initialize(ctx)
    x = rows([0.1])[0]
    results = run_batch(handler, ctx, [(as_json(x), {"X-Compute-Budget": "1000"}), (as_json(x), {}),
                                       (as_json(x), {"X-Compute-Budget": "1"})])
    for (status, hdrs, body), requested, clipped in zip(results, (1000.0, 4.0, 1.0), (True, True, False)):
        assert status == 200 and body["budget_clipped"] is clipped
        assert body["budget_requested_mflops"] == requested
        assert body["budget_mflops"] == min(requested, 2.5) and body["mflops_spent"] <= 2.5
    assert results[0][2]["exit_index"] == 2
    with pytest.raises(ManifestError, match="below the cheapest"):
        EarlyExitHandler().initialize(make_context(model_dir, {"max_budget_mflops": 0.5}))
    with pytest.raises(ValueError, match="max_budget_mflops"):
        EarlyExitHandler().initialize(make_context(model_dir, {"max_budget_mflops": "lots"}))


def test_open_inference_protocol_v2_request_and_answer(served) -> None:
    handler, ctx = served
    x = rows([1.0])[0]
    v2 = json.dumps({"id": "client-7", "inputs": [{"name": "image", "shape": [1, *SHAPE], "datatype": "FP32",
                                                   "data": x.reshape(-1).tolist()}]}).encode()
    results = run_batch(handler, ctx, [(v2, {}), (as_json(x), {})], content_type="application/json")
    (status, _, body), (_, _, plain) = results
    assert status == 200 and body["model_name"] == MODEL and body["id"] == "client-7"
    (output,) = body["outputs"]
    assert output["datatype"] == "FP32" and output["shape"] == [1, len(CLASSES)]
    assert int(np.argmax(output["data"])) == plain["class_index"]
    assert body["parameters"]["exit_index"] == plain["exit_index"]


def test_response_detail_label_leaves_out_every_score(model_dir: Path, served) -> None:
    full_handler, full_ctx = served
    ctx = make_context(model_dir, {"response_detail": "label", "top_k": 3})
    handler = EarlyExitHandler()
    handler.initialize(ctx)
    x = rows(PIXELS)
    requests = [(as_json(row), {"X-Compute-Budget": budget}) for row in x for budget in ("1.0", "4.0")]
    labelled = run_batch(handler, ctx, requests)
    full = run_batch(full_handler, full_ctx, requests)
    for (status, headers, body), (_, full_headers, full_body) in zip(labelled, full):
        assert status == 200 and headers == full_headers
        assert "confidence" not in body and "top_k" not in body and "probabilities" not in json.dumps(body)
        assert body == {k: v for k, v in full_body.items() if k not in ("confidence", "top_k")}
        assert body["label"] == CLASSES[body["class_index"]] and body["mflops_spent"] > 0


def test_response_detail_label_v2_answer_carries_the_class_index_only(model_dir: Path) -> None:
    ctx = make_context(model_dir, {"response_detail": "label"})
    handler = EarlyExitHandler()
    handler.initialize(ctx)
    x = rows([1.0, 0.1])
    v2 = [json.dumps({"inputs": [{"name": "image", "shape": [1, *SHAPE], "datatype": "FP32",
                                  "data": row.reshape(-1).tolist()}]}).encode() for row in x]
    results = run_batch(handler, ctx, [(v2[0], {}), (v2[1], {}), (as_json(x[1]), {})], content_type="application/json")
    for status, _, body in results[:2]:
        assert status == 200
        assert body["outputs"] == [{"name": "class_index", "shape": [1, 1], "datatype": "INT64",
                                    "data": [body["parameters"]["class_index"]]}]
        assert "confidence" not in body["parameters"] and "top_k" not in body["parameters"]
    assert results[1][2]["parameters"]["class_index"] == results[2][2]["class_index"]


def test_response_detail_is_a_closed_set(model_dir: Path) -> None:
    with pytest.raises(OptionsError, match="response_detail"):
        EarlyExitHandler().initialize(make_context(model_dir, {"response_detail": "scores"}))


def test_limits_are_derived_from_the_manifest_input(served) -> None:
    handler, ctx = served  # the toy model takes 1 x 4 x 4: PNGs up to 32 x 16 pixels, JSON up to 4864 bytes
    limits = handler.input_spec.limits
    assert (limits.png_pixels, limits.json_bytes) == (512, 4864)
    results = run_batch(handler, ctx, [(png(np.zeros((16, 32), dtype=np.uint8)), {}),
                                       (png(np.zeros((17, 32), dtype=np.uint8)), {}),
                                       (b'{"data": ' + b" " * 4864 + b"[]}", {})])
    assert [r[0] for r in results] == [200, 413, 413]
    assert results[1][2]["max_image_pixels"] == 512 and results[2][2]["max_payload_bytes"] == 4864


def test_client_text_is_escaped_before_it_is_logged(served, caplog: pytest.LogCaptureFixture) -> None:
    handler, ctx = served
    hostile = "\x1b[31mred\r\nINFO forged line\x00end"
    batch = [{"requestId": "id-\x1b[2J\n".encode(),
              "parameters": [{"name": "body", "contentType": "application/json", "value": as_json(rows([1.0])[0])}],
              "headers": [{"name": b"X-Compute-Budget", "value": hostile.encode()}]}]
    processors, inputs, ids = Service.retrieve_data_for_inference(batch)
    ctx.request_ids, ctx.request_processor = ids, processors
    ctx.metrics.request_ids = ids
    with caplog.at_level(logging.INFO, logger="serving.handler"):
        (text,) = handler.handle(inputs, ctx)
    assert json.loads(text)["reason"] == RejectReason.INVALID_BUDGET.value
    (line,) = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert "request id-\\x1b[2J\\x0a rejected (invalid_budget)" in line
    assert "'\\x1b[31mred\\x0d\\x0aINFO forged line\\x00end'" in line
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in line), repr(line)


@pytest.mark.parametrize("text, shown", [
    ("plain id-7", "plain id-7"), ("a\\b", "a\\\\b"), ("\x1b[0m", "\\x1b[0m"), ("\x85\x9b", "\\x85\\x9b"),
    ("tab\there", "tab\\x09here"), ("rtl\u202eevil", "rtl\\u202eevil"), ("line\u2028sep", "line\\u2028sep"),
    ("caf\u00e9 \U0001f600", "caf\u00e9 \U0001f600"), ("\ud800", "\\ud800"),
])
def test_printable_escapes_what_a_terminal_would_act_on(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert len(printable("\x00" * 1000, 50)) == 50


def test_client_images_go_through_the_manifests_input_transform(tmp_path: Path) -> None:
    """The handler decodes client images with the manifest's evaluation transform (here: shorter side to 8, then
    the central 4 x 4), which differs from the default for the input shape (shorter side to 4, central 4 x 4)."""
    manifest = build_model_dir(tmp_path)
    transform = EvalTransform(channels=1, resize_size=8, crop_size=(4, 4))
    write_manifest(dataclasses.replace(manifest, input_transform=transform), tmp_path)
    handler = EarlyExitHandler()
    handler.initialize(make_context(tmp_path))
    assert handler.input_spec.transform == transform
    image = np.random.default_rng(0).integers(0, 256, size=(16, 6), dtype=np.uint8)  # H x W, not square
    x = decode_image(png(image), handler.input_spec)
    expected = transform.planes(Image.fromarray(image), 0.0)
    default = EvalTransform.for_shape((1, 4, 4)).planes(Image.fromarray(image), 0.0)
    assert np.array_equal(x, expected) and not np.allclose(x, default, atol=0.05)
