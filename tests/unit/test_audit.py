"""The live audit of early answers: in-process handler on the toy chain (tests/toy_model.py), and the Auditor alone."""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from serving.audit import AuditJob, Auditor
from serving.handler import EarlyExitHandler
from serving.metrics import MetricName
from tests.toy_model import COSTS, EXIT_AGREEMENT, _weights, build_model_dir, reference
from tests.unit.test_handler import _metric_lines, as_json, make_context, rows, run_batch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("toy_audit")
    build_model_dir(folder)
    return folder


def test_every_early_answer_is_audited_against_the_last_exit(model_dir: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    ctx = make_context(model_dir, {"audit_rate": 1.0, "audit_seed": 0})
    handler = EarlyExitHandler()
    handler.initialize(ctx)
    # pixel 0 drives early confidence; pixels 1/2 decide the last exit's class: some early answers disagree
    x = np.concatenate([rows([1.0, 0.6, 0.5], (0.2, 0.9)), rows([1.0, 0.6], (0.9, 0.2)), rows([0.1, 0.0])])
    caplog.clear()
    results = run_batch(handler, ctx, [(as_json(r), {}) for r in x])
    handler.auditor.join()
    exits, classes = reference(x, 4.0)
    assert [r[2]["exit_index"] for r in results] == (exits + 1).tolist()
    final = np.array([int(np.argmax(r.reshape(-1) @ _weights()[-1])) for r in x])
    expected: dict[tuple[str, str], float] = {}
    for e, c, f in zip(exits, classes, final):
        if e < 2:
            key = (str(e + 1), "agree" if c == f else "disagree")
            expected[key] = expected.get(key, 0) + 1
    assert {v for k, v in expected.items() if k[1] == "disagree"}, "the batch should hold disagreeing answers"
    audits: dict[tuple[str, str], float] = {}
    for name, v, d, _ in _metric_lines(caplog):
        if name == "EarlyExitAudit":
            audits[(d["ExitIndex"], d["Outcome"])] = audits.get((d["ExitIndex"], d["Outcome"]), 0) + float(v)
    assert {k: v for k, v in audits.items() if v} == expected
    compute = sum(float(v) for name, v, _, _ in _metric_lines(caplog) if name == "AuditComputeMFLOPs")
    assert compute == pytest.approx(sum(COSTS[-1] - COSTS[e] for e in exits if e < 2))
    # the answers themselves were not charged for the audit
    assert [r[2]["mflops_spent"] for r in results] == [COSTS[e] for e in exits]


def test_the_audit_is_off_at_rate_zero_and_validation_agreement_is_published(model_dir: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    handler = EarlyExitHandler()
    handler.initialize(make_context(model_dir, {"audit_rate": 0.0}))
    assert handler.auditor is None
    caplog.clear()
    handler = EarlyExitHandler()
    ctx = make_context(model_dir)
    ctx.model_yaml_config = {"handler": {}}  # the shipped default, not the tests' audit-off context
    handler.initialize(ctx)
    assert handler.auditor is not None and handler.auditor.rate == 0.01  # the default
    published = {d["ExitIndex"]: float(v) for name, v, d, kind in _metric_lines(caplog)
                 if name == "EarlyExitValidationAgreement" and kind == "GAUGE"}
    assert published == {"1": EXIT_AGREEMENT[0], "2": EXIT_AGREEMENT[1]}


def test_a_full_queue_drops_audits_without_blocking() -> None:
    release = threading.Event()
    emitted: list[tuple] = []

    class SlowRunner:
        def finish(self, features, exit):
            release.wait(10)
            return np.array([[0.1, 0.9]]), 1.0

    metrics = SimpleNamespace(emit=lambda name, value, *dims, request_id="": emitted.append((name, value, dims)))
    auditor = Auditor(SlowRunner(), metrics, rate=1.0, queue_size=2, seed=0)
    jobs = [AuditJob(0, np.zeros(3), 1, f"r{i}") for i in range(6)]
    auditor.submit(jobs)  # one is taken by the worker, two wait, the rest are dropped at once
    dropped = sum(v for n, v, _ in emitted if n is MetricName.AUDIT_DROPPED)
    assert dropped >= 3
    release.set()
    auditor.join()
    audited = [d for n, _, d in emitted if n is MetricName.EARLY_EXIT_AUDIT]
    assert len(audited) + dropped == len(jobs) and all(d == ("1", "agree") for d in audited)
