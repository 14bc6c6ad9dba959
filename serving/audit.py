"""A live audit of early answers: for a sampled share of requests answered before the last exit, the
remaining stages also run, off the request path, and the early answer is compared with the last exit's.

An early exit saves compute only while its answers agree with what the full network would have said.
Calibration measured that agreement on validation images (the manifest's `exit_agreement`); in
production a drift in the inputs, or an attack that makes an early exit confident and wrong, would go
unseen. Apparate (SOSP 2024) keeps exits honest by running the full model on every request; here only
a sample pays, and never the request itself:

- the answer is not delayed: audit jobs go to a bounded queue after the batch's answers are computed, and a
  daemon thread runs them; a full queue drops the job (counted), it never blocks;
- the request's budget is not charged: audit compute has its own counter (AuditComputeMFLOPs);
- a failing audit never fails a request: it is logged and counted as an error outcome.

Metrics: EarlyExitAudit{ExitIndex, Outcome="agree"|"disagree"|"error"}, EarlyExitAuditDropped,
AuditComputeMFLOPs, and EarlyExitValidationAgreement{ExitIndex} (a gauge set at load from the manifest,
so Prometheus can compare live agreement with the validation figure).
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from enum import Enum

import numpy as np

from early_exit.runner import StagedRunner
from serving.metrics import MetricName, Metrics
from serving.rejections import printable

log = logging.getLogger(__name__)


class AuditOutcome(str, Enum):
    AGREE = "agree"
    DISAGREE = "disagree"
    ERROR = "error"


@dataclass(frozen=True)
class AuditJob:
    """One early answer to check: the exit (0-based) it left at, its features there, the class it answered."""

    exit: int
    features: np.ndarray  # features_exit of this one request (no batch axis)
    answered: int
    request_id: str


class Auditor:
    """Samples requests to audit and runs their remaining stages on a background thread."""

    def __init__(self, runner: StagedRunner, metrics: Metrics, rate: float, queue_size: int,
                 seed: int | None = None) -> None:
        """rate: share of requests audited, in [0, 1]; queue_size: jobs waiting at most (beyond: dropped)."""
        self.runner = runner
        self.metrics = metrics
        self.rate = rate
        self._rng = np.random.default_rng(seed)
        self._queue: queue.Queue[AuditJob] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._work, name="early-exit-audit", daemon=True)
        self._thread.start()

    def sample(self, n: int) -> np.ndarray:
        """(n,) bool: which rows of a batch to audit if they leave early."""
        return self._rng.random(n) < self.rate

    def submit(self, jobs: list[AuditJob]) -> None:
        """Queue jobs without blocking; a full queue drops them (EarlyExitAuditDropped)."""
        for job in jobs:
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                self.metrics.emit(MetricName.AUDIT_DROPPED, 1, request_id=job.request_id)

    def join(self) -> None:
        """Wait until every queued job ran (tests and shutdown)."""
        self._queue.join()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                self._audit(job)
            except Exception:  # an audit must never take the worker down: logged, counted, and the loop goes on
                log.exception("audit of request %s failed", printable(job.request_id))
                self.metrics.emit(MetricName.EARLY_EXIT_AUDIT, 1, str(job.exit + 1), AuditOutcome.ERROR.value,
                                  request_id=job.request_id)
            finally:
                self._queue.task_done()

    def _audit(self, job: AuditJob) -> None:
        probs, cost = self.runner.finish(job.features[None], job.exit)
        outcome = AuditOutcome.AGREE if int(np.argmax(probs[0])) == job.answered else AuditOutcome.DISAGREE
        self.metrics.emit(MetricName.EARLY_EXIT_AUDIT, 1, str(job.exit + 1), outcome.value, request_id=job.request_id)
        self.metrics.emit(MetricName.AUDIT_COMPUTE, cost, request_id=job.request_id)
