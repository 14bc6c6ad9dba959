"""Real TorchServe (Java frontend + Python worker) on the tiny MNIST archive: HTTP contract and metrics."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from early_exit.policy import entry_for_budget
from tests.promtools import wait_for

pytestmark = pytest.mark.integration

N_IMAGES = 40


def _predict_many(live, bodies: list[bytes], budgets: list[str | None], workers: int = 8) -> list:
    """Concurrent requests (one client per thread), answers in input order."""
    local = threading.local()

    def one(args):
        if not hasattr(local, "client"):
            local.client = live.client()
        return local.client.predict(*args)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, zip(bodies, budgets)))


def _check_answer(live, response, i: int, budget: float | None) -> None:
    tiny = live.tiny
    manifest = tiny.manifest
    exits, classes = tiny.offline(budget)
    requested = manifest.default_budget_mflops if budget is None else budget
    applied = min(requested, tiny.ceiling)
    entry = entry_for_budget(applied, manifest.calibration, manifest.staged_mflops)
    body = response.body
    assert response.status == 200, body
    assert body["class_index"] == classes[i] and body["label"] == manifest.classes[classes[i]]
    assert body["exit_index"] == exits[i] + 1 == int(response.headers["x-exit-index"])
    assert body["mflops_spent"] == pytest.approx(manifest.staged_mflops[exits[i]])
    assert float(response.headers["x-compute-spent"]) == pytest.approx(body["mflops_spent"], rel=1e-5)
    assert body["mflops_spent"] <= applied + 1e-9
    assert body["num_exits"] == manifest.num_exits and body["max_exit_allowed"] == entry.max_exit + 1
    assert body["budget_mflops"] == pytest.approx(applied)
    assert body["budget_requested_mflops"] == pytest.approx(requested)
    assert body["budget_clipped"] is (requested > tiny.ceiling)
    assert body["full_mflops"] == pytest.approx(manifest.full_graph.mflops)
    assert body["calibrated_budget_mflops"] == pytest.approx(entry.budget_mflops)
    assert body["budget_source"] == ("default" if budget is None else "header")
    assert len(body["top_k"]) == 3 and body["top_k"][0]["class_index"] == body["class_index"]
    assert 0.0 < body["confidence"] <= 1.0


def test_worker_imports_early_exit_from_the_archive(torchserve_server) -> None:
    line = next(l for l in torchserve_server.model_log().splitlines() if "early_exit imported from" in l)
    package, model_dir = line.split("early_exit imported from ")[1].split("; model_dir ")
    assert Path(package) == Path(model_dir.strip()) / "early_exit"
    assert str(torchserve_server.server.state_dir) in model_dir  # unpacked under this server's own TMPDIR


def test_token_authorization_is_on(torchserve_server) -> None:
    tiny = torchserve_server.tiny
    client = torchserve_server.client()
    client.token = None
    response = client.predict(tiny.png(0))
    client.close()
    assert response.status == 400 and "Token Authorization failed" in json.dumps(response.body)


def test_png_and_json_at_the_default_budget_match_the_offline_policy(torchserve_server) -> None:
    tiny = torchserve_server.tiny
    idx = list(range(N_IMAGES))
    pngs = _predict_many(torchserve_server, [tiny.png(i) for i in idx], [None] * N_IMAGES)
    jsons = _predict_many(torchserve_server, [tiny.json_body(i) for i in idx], [None] * N_IMAGES)
    for i, (a, b) in enumerate(zip(pngs, jsons)):
        _check_answer(torchserve_server, a, i, None)
        _check_answer(torchserve_server, b, i, None)
        assert a.body["confidence"] == pytest.approx(b.body["confidence"], abs=1e-6)
    assert len({r.body["exit_index"] for r in pngs}) >= 2, "the tiny model should use more than one exit"


def test_budgets_cap_the_exit_and_select_their_thresholds(torchserve_server) -> None:
    tiny = torchserve_server.tiny
    costs = tiny.manifest.staged_mflops
    budgets = sorted({*costs, (costs[0] + costs[1]) / 2, costs[-1] * 10})
    for budget in budgets:
        answers = _predict_many(torchserve_server, [tiny.png(i) for i in range(N_IMAGES)], [f"{budget!r}"] * N_IMAGES)
        entry = entry_for_budget(budget, tiny.manifest.calibration, costs)
        for i, response in enumerate(answers):
            _check_answer(torchserve_server, response, i, budget)
            assert response.body["exit_index"] <= entry.max_exit + 1
        if budget < costs[1]:
            assert {r.body["exit_index"] for r in answers} == {1}


@pytest.mark.parametrize("value, reason", [
    ("lots", "invalid_budget"), ("-3", "invalid_budget"), ("NaN", "invalid_budget"), ("inf", "invalid_budget"),
    ("0", "budget_below_minimum"), ("1e-9", "budget_below_minimum"),
])
def test_invalid_budget_gets_a_json_400(torchserve_server, value: str, reason: str) -> None:
    response = torchserve_server.predict(torchserve_server.tiny.png(0), value)
    costs = torchserve_server.tiny.manifest.staged_mflops
    assert response.status == 400 and response.headers["content-type"].startswith("application/json")
    assert response.body["reason"] == reason and response.body["error"]
    assert response.body["valid_budget_mflops"] == {"min": pytest.approx(costs[0]), "full_depth": pytest.approx(costs[-1])}
    assert "x-exit-index" not in response.headers


def _error_bodies(tiny) -> list[tuple[str, bytes, str, int]]:
    good = tiny.json_body(0)
    first = json.dumps(float(tiny.test_x[0].flat[0])).encode()
    return [
        ("undecodable image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "undecodable_image", 400),
        ("not an image", b"GIF89a....", "undecodable_image", 400),
        ("wrong shape", json.dumps({"data": np.zeros((3, 28, 28)).tolist()}).encode(), "wrong_shape", 400),
        ("nan", good.replace(first, b"NaN", 1), "non_finite", 400),
        ("infinity", good.replace(first, b"-Infinity", 1), "non_finite", 400),
        ("out of range", good.replace(first, b"255", 1), "out_of_range", 400),
        ("empty body", b"", "empty_body", 400),
        ("bad json", b'{"data": [[', "bad_json", 400),
        ("oversized", b'{"data": [' + b"0, " * 100_000 + b"0]}", "payload_too_large", 413),
    ]


def test_every_error_case_gets_its_4xx_and_the_worker_survives(torchserve_server) -> None:
    tiny = torchserve_server.tiny
    pids = torchserve_server.worker_pids()
    for name, body, reason, status in _error_bodies(tiny):
        response = torchserve_server.predict(
            body, content_type="application/json" if body[:1] == b"{" else "application/octet-stream")
        assert response.status == status, (name, response.body)
        assert response.body["reason"] == reason and response.body["status"] == status, name
    # curl -d @input.json: form-urlencoded. (Binary bodies sent so may already fail in the frontend's form decoder.)
    form = torchserve_server.predict(tiny.json_body(1), content_type="application/x-www-form-urlencoded")
    assert form.status == 415 and form.body["reason"] == "unsupported_content_type"
    # Above the frontend's max_request_size TorchServe answers 413 itself; the handler never sees it.
    assert torchserve_server.predict(b"{" + b" " * 3_000_000 + b"}").status == 413
    _check_answer(torchserve_server, torchserve_server.predict(tiny.png(1)), 1, None)
    assert torchserve_server.worker_pids() == pids


def _stage_rows_and_runs(live) -> tuple[float, float]:
    """Rows that ran stage 1 (every answered request) and stage-1 runs (batches)."""
    rows = sum(v for k, v in live.samples("StageRows").items() if dict(k)["Stage"] == "1")
    runs = sum(v for k, v in live.samples("StageRuns").items() if dict(k)["Stage"] == "1")
    return rows, runs


def test_mixed_budgets_and_a_bad_request_in_one_batch(torchserve_server) -> None:
    """8 requests released together (batchSize 8, maxBatchDelay 20 ms): each is answered on its own terms."""
    tiny = torchserve_server.tiny
    costs = tiny.manifest.staged_mflops
    plan: list[tuple[bytes, str | None, str]] = [  # request j carries test image j + 2
        (tiny.png(2), None, "ok"), (tiny.png(3), f"{costs[0]!r}", "ok"), (b"\x00garbage", None, "bad_json"),
        (tiny.json_body(5), f"{costs[1]!r}", "ok"), (tiny.png(6), "-1", "invalid_budget"),
        (tiny.png(7), f"{costs[-1]!r}", "ok"), (tiny.json_body(8), None, "ok"), (tiny.png(9), "1000", "ok"),
    ]
    for attempt in range(3):
        rows_before, runs_before = _stage_rows_and_runs(torchserve_server)
        barrier = threading.Barrier(len(plan))
        clients = [torchserve_server.client() for _ in plan]

        def send(j: int):
            barrier.wait()
            return clients[j].predict(plan[j][0], plan[j][1])

        with ThreadPoolExecutor(len(plan)) as pool:
            answers = list(pool.map(send, range(len(plan))))
        for c in clients:
            c.close()
        for j, ((_, budget, expect), response) in enumerate(zip(plan, answers)):
            if expect == "ok":
                _check_answer(torchserve_server, response, j + 2, None if budget is None else float(budget))
            else:
                assert response.status == 400 and response.body["reason"] == expect
        answered = sum(1 for _, _, expect in plan if expect == "ok")
        rows, runs = wait_for(lambda: _counted(_stage_rows_and_runs(torchserve_server), rows_before, answered),
                              timeout=10, interval=0.2, what="the stage counters to count the batch")
        if (rows - rows_before) > (runs - runs_before):  # some stage-1 run carried several requests
            return
    pytest.fail("the concurrent requests were never batched together")


def _counted(counts: tuple[float, float], rows_before: float, answered: int) -> tuple[float, float] | None:
    """The (rows, runs) once the handler's summed counters (written every metrics_flush_seconds) hold the batch."""
    return counts if counts[0] - rows_before >= answered else None


def _labels(series: dict) -> list[tuple[str, ...]]:
    return [tuple(name for name, _ in key) for key in series]


def test_metrics_and_their_labels_on_the_real_scrape(torchserve_server) -> None:
    live, tiny = torchserve_server, torchserve_server.tiny
    model = live.model
    before = {name: live.samples(name) for name in (
        "EarlyExitCount", "ComputeSpentMFLOPs", "ComputeFullMFLOPs", "RequestsRejected", "RequestLatencySeconds_count")}
    n = 24
    answers = _predict_many(live, [tiny.png(i) for i in range(n)], [None] * n)
    assert all(a.status == 200 for a in answers)
    assert live.predict(tiny.png(0), "nope").status == 400
    assert live.predict(b"").status == 400
    assert live.predict(b'{"data": [1, 2]}').status == 400

    def delta(name: str, **labels: str) -> float:
        after = live.samples(name)
        key = next(k for k in after if all(dict(k).get(l) == v for l, v in labels.items()))
        return after[key] - before.get(name, {}).get(key, 0.0)

    exits, _ = tiny.offline()
    # Counters and latency observations are written every metrics_flush_seconds, observations after the counters
    # they follow: once the last request's observation is on the scrape, every counter is.
    wait_for(lambda: delta("RequestLatencySeconds_count", ModelName=model) == n + 3, timeout=10, interval=0.2,
             what="one latency observation per request")
    expected_exits = np.bincount(exits[:n], minlength=tiny.manifest.num_exits)
    for k, count in enumerate(expected_exits, start=1):
        if count:
            assert delta("EarlyExitCount", ExitIndex=str(k), ModelName=model, Level="Model") == count
    spent = sum(tiny.manifest.staged_mflops[e] for e in exits[:n])
    assert delta("ComputeSpentMFLOPs", ModelName=model) == pytest.approx(spent, rel=1e-6)
    assert delta("ComputeFullMFLOPs", ModelName=model) == pytest.approx(n * tiny.manifest.full_graph.mflops, rel=1e-6)
    # the server's own figures: the responses' mflops_spent add up to the counter's change
    assert delta("ComputeSpentMFLOPs", ModelName=model) == pytest.approx(
        sum(a.body["mflops_spent"] for a in answers), rel=1e-6)
    for reason in ("invalid_budget", "empty_body", "wrong_shape"):
        assert delta("RequestsRejected", Reason=reason, ModelName=model, Level="Model") == 1

    # Label names and order as exposed: own dimension first, then ModelName, Level, Hostname.
    assert set(_labels(live.samples("EarlyExitCount"))) == {("ExitIndex", "ModelName", "Level", "Hostname")}
    assert set(_labels(live.samples("RequestsRejected"))) == {("Reason", "ModelName", "Level", "Hostname")}
    assert set(_labels(live.samples("ComputeSpentMFLOPs"))) == {("ModelName", "Level", "Hostname")}
    for name in ("StageTimeMs", "StageRuns", "StageRows"):
        series = live.samples(name)
        assert set(_labels(series)) == {("Stage", "ModelName", "Level", "Hostname")}
        assert {dict(k)["Stage"] for k in series} == {str(k) for k in range(1, tiny.manifest.num_exits + 1)}
    # Every series exists from load on (started at 0), with exactly these label values.
    exit_values = {dict(k)["ExitIndex"] for k in live.samples("EarlyExitCount")}
    assert exit_values == {str(k) for k in range(1, tiny.manifest.num_exits + 1)}
    reasons = {dict(k)["Reason"] for k in live.samples("RequestsRejected")}
    from serving.rejections import RejectReason

    assert reasons == {r.value for r in RejectReason}
    buckets = live.samples("RequestLatencySeconds_bucket")
    assert {("ModelName", "Level", "Hostname", "le")} == set(_labels(buckets))
    assert {dict(k)["le"] for k in buckets} >= {"0.005", "0.1", "1.0", "10.0", "+Inf"}
    text = live.scrape()
    for name, kind in (("EarlyExitCount", "counter"), ("ComputeSpentMFLOPs", "counter"),
                       ("RequestsRejected", "counter"), ("StageTimeMs", "counter"),
                       ("RequestLatencySeconds", "histogram")):
        assert f"# TYPE {name} {kind}" in text


def test_a_budget_equal_to_an_exits_staged_cost_is_never_exceeded(torchserve_server) -> None:
    """For each exit k: a budget of exactly exit k's staged cost (stages and heads 1..k) allows exit k and never
    spends more; a budget a hair below it caps at exit k-1 (or is refused below the cheapest exit)."""
    tiny = torchserve_server.tiny
    costs = tiny.manifest.staged_mflops
    n = 24
    for k, cost in enumerate(costs):
        answers = _predict_many(torchserve_server, [tiny.png(i) for i in range(n)], [repr(cost)] * n)
        assert all(a.status == 200 for a in answers)
        assert all(a.body["mflops_spent"] <= cost for a in answers)
        assert all(a.body["max_exit_allowed"] == k + 1 for a in answers)
        hair = cost * (1 - 1e-9)
        below = _predict_many(torchserve_server, [tiny.png(i) for i in range(n)], [repr(hair)] * n)
        if k == 0:
            assert {a.status for a in below} == {400}
            assert {a.body["reason"] for a in below} == {"budget_below_minimum"}
        else:
            assert all(a.status == 200 and a.body["max_exit_allowed"] == k for a in below)
            assert all(a.body["exit_index"] <= k and a.body["mflops_spent"] <= costs[k - 1] for a in below)


def test_budget_header_in_several_cases_applies_the_smallest(torchserve_server) -> None:
    tiny = torchserve_server.tiny
    costs = tiny.manifest.staged_mflops
    client = torchserve_server.client()
    try:
        response = client.predict(tiny.png(0), None, headers={"X-Compute-Budget": repr(costs[-1]),
                                                              "x-compute-budget": repr(costs[0])})
        assert response.status == 200, response.body
        assert response.body["budget_mflops"] == pytest.approx(costs[0]) and response.body["exit_index"] == 1
        invalid = client.predict(tiny.png(0), None, headers={"X-Compute-Budget": repr(costs[-1]),
                                                             "x-COMPUTE-budget": "lots"})
        assert invalid.status == 400 and invalid.body["reason"] == "invalid_budget"
    finally:
        client.close()


def test_the_operator_ceiling_clips_a_larger_budget(torchserve_server) -> None:
    live, tiny = torchserve_server, torchserve_server.tiny
    before = sum(live.samples("BudgetClipped").values())
    response = live.predict(tiny.png(0), repr(tiny.ceiling * 50))
    assert response.status == 200
    assert response.body["budget_clipped"] is True
    assert response.body["budget_mflops"] == pytest.approx(tiny.ceiling)
    assert response.body["budget_requested_mflops"] == pytest.approx(tiny.ceiling * 50)
    assert float(response.headers["x-compute-budget-applied"]) == pytest.approx(tiny.ceiling, rel=1e-5)
    wait_for(lambda: sum(live.samples("BudgetClipped").values()) == before + 1, timeout=10, interval=0.2,
             what="BudgetClipped to count the clipped request")
    unclipped = live.predict(tiny.png(0), repr(tiny.ceiling))
    assert unclipped.body["budget_clipped"] is False


def test_tampered_archive_refuses_to_load_on_a_real_server(tiny_mnist, tmp_path: Path) -> None:
    """One flipped byte in a stage graph: the worker refuses to load (sha256), and start_server says why."""
    import zipfile

    from serving.server import Ports, ServerError, start_server

    store = tmp_path / "store"
    store.mkdir()
    with zipfile.ZipFile(tiny_mnist.mar) as src, zipfile.ZipFile(store / tiny_mnist.mar.name, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == tiny_mnist.manifest.exits[1].file:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            dst.writestr(item, data)
    with pytest.raises(ServerError, match="sha256 of stage_2"):
        start_server(store, [tiny_mnist.mar.name], tmp_path / "state", Ports.free(), ready_timeout=120)
