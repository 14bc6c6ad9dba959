"""The handler's metrics: specs (names are an interface), registration once, emission.

TorchServe drops metrics that serving/metrics.yaml does not declare, and matches dimension values to
the yaml's names by position: our own dimensions first, then ModelName and Level (stack-notes.md).
`Metrics` refuses to load when the yaml disagrees with a spec here.

Every emission is a log line the worker formats and the Java frontend parses (TorchServe's backend
metrics protocol), so lines cost CPU on both sides of the request path. Counters are therefore summed
in the worker and written once per `flush_interval_s` by a background thread (`Metrics.count`), the way
StatsD clients aggregate; histogram observations (`Metrics.observe`) are kept and written by the same
thread, one line each, off the request path; gauges are written at once (`Metrics.emit`). Measured on
the MNIST archive (batches of 8): the handler wrote 24 lines per batch on the request path before, none
now (TorchServe still writes its own HandlerTime and PredictionTime there).
"""
from __future__ import annotations

import atexit
import logging
import threading
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable

from ts.metrics.metric_cache_errors import MetricsCacheKeyError
from ts.metrics.metric_type_enum import MetricTypes

from serving.rejections import printable

log = logging.getLogger(__name__)

LEVEL = "Model"  # TorchServe's Level dimension value for model metrics


class MetricName(str, Enum):
    """Metric names are an interface (alerts and dashboards query them): keep them stable."""

    EARLY_EXIT_COUNT = "EarlyExitCount"
    COMPUTE_SPENT = "ComputeSpentMFLOPs"  # staged cost of every answer (early_exit/costs.py)
    COMPUTE_FULL = "ComputeFullMFLOPs"  # what the same answers would have cost at full depth
    REQUESTS_REJECTED = "RequestsRejected"
    BUDGET_CLIPPED = "BudgetClipped"  # requests whose budget the operator ceiling lowered
    EARLY_EXIT_AUDIT = "EarlyExitAudit"  # audited early answers by exit and outcome (serving/audit.py)
    AUDIT_DROPPED = "EarlyExitAuditDropped"
    AUDIT_COMPUTE = "AuditComputeMFLOPs"
    VALIDATION_AGREEMENT = "EarlyExitValidationAgreement"  # per exit, from the manifest
    STAGE_TIME = "StageTimeMs"
    STAGE_RUNS = "StageRuns"
    STAGE_ROWS = "StageRows"
    REQUEST_LATENCY = "RequestLatencySeconds"


@dataclass(frozen=True)
class MetricSpec:
    name: MetricName
    unit: str
    dimensions: tuple[str, ...]  # our own dimensions; ModelName and Level follow, in that order
    kind: MetricTypes

    @property
    def all_dimensions(self) -> list[str]:
        return [*self.dimensions, "ModelName", "Level"]


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(MetricName.EARLY_EXIT_COUNT, "count", ("ExitIndex",), MetricTypes.COUNTER),
    MetricSpec(MetricName.COMPUTE_SPENT, "MFLOPs", (), MetricTypes.COUNTER),
    MetricSpec(MetricName.COMPUTE_FULL, "MFLOPs", (), MetricTypes.COUNTER),
    MetricSpec(MetricName.REQUESTS_REJECTED, "count", ("Reason",), MetricTypes.COUNTER),
    MetricSpec(MetricName.BUDGET_CLIPPED, "count", (), MetricTypes.COUNTER),
    MetricSpec(MetricName.EARLY_EXIT_AUDIT, "count", ("ExitIndex", "Outcome"), MetricTypes.COUNTER),
    MetricSpec(MetricName.AUDIT_DROPPED, "count", (), MetricTypes.COUNTER),
    MetricSpec(MetricName.AUDIT_COMPUTE, "MFLOPs", (), MetricTypes.COUNTER),
    MetricSpec(MetricName.VALIDATION_AGREEMENT, "ratio", ("ExitIndex",), MetricTypes.GAUGE),
    MetricSpec(MetricName.STAGE_TIME, "ms", ("Stage",), MetricTypes.COUNTER),
    MetricSpec(MetricName.STAGE_RUNS, "count", ("Stage",), MetricTypes.COUNTER),
    MetricSpec(MetricName.STAGE_ROWS, "count", ("Stage",), MetricTypes.COUNTER),
    # TorchServe's Prometheus histograms have the client's fixed default buckets (0.005 .. 10 s). One observation
    # per request is one log line; a second unit (ms, for sub-5 ms handler times) doubled that and was dropped.
    MetricSpec(MetricName.REQUEST_LATENCY, "s", (), MetricTypes.HISTOGRAM),
)
SPECS: dict[MetricName, MetricSpec] = {spec.name: spec for spec in METRICS}


class Metrics:
    """The registered metrics of one model, and the ways to emit them: at once (`emit`), or kept for the flush
    thread (`count` sums counters, `observe` keeps histogram observations)."""

    def __init__(self, cache: Any, model_name: str, flush_interval_s: float = 0.0) -> None:
        """Register every spec with TorchServe's metric cache (`context.metrics`); raises ValueError on a yaml mismatch.

        flush_interval_s: seconds between writes of the summed counters (`count`) and kept observations
        (`observe`); 0 writes each at once. With an interval, a daemon thread flushes, and so does interpreter
        exit; what a worker killed outright (SIGKILL) kept in its last interval is lost.
        """
        if flush_interval_s < 0:
            raise ValueError(f"flush_interval_s must be >= 0, got {flush_interval_s}")
        self.model_name = model_name
        self.flush_interval_s = flush_interval_s
        self._pending: dict[tuple[MetricName, tuple[str, ...]], float] = {}
        self._observed: list[tuple[MetricName, float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._metrics: dict[MetricName, Any] = {}
        for spec in METRICS:
            try:
                metric = cache.get_metric(spec.name.value, spec.kind)
            except MetricsCacheKeyError:
                log.warning("metric %s is not declared in metrics.yaml: TorchServe will drop it", spec.name.value)
                metric = cache.add_metric_to_cache(spec.name.value, spec.unit, spec.all_dimensions, spec.kind)
            if list(metric.dimension_names) != spec.all_dimensions:
                raise ValueError(f"metrics.yaml declares {spec.name.value} with dimensions "
                                 f"{metric.dimension_names}; the handler emits {spec.all_dimensions}")
            self._metrics[spec.name] = metric
        if flush_interval_s > 0:
            self._flusher = threading.Thread(target=self._flush_every_interval, name="metrics-flush", daemon=True)
            self._flusher.start()
            atexit.register(self.close)

    def emit(self, name: MetricName, value: float, *dimensions: str, request_id: str = "") -> None:
        """Write one metric line now (a histogram observation, a gauge value, or a counter increment).

        request_id may come from the client (TorchServe takes an x-request-id header): it is escaped, since it ends
        the metric line the frontend parses and a line break in it would start a forged one."""
        self._metrics[name].add_or_update(value, [*dimensions, self.model_name, LEVEL], printable(request_id))

    def count(self, name: MetricName, value: float, *dimensions: str) -> None:
        """Add `value` (>= 0) to counter `name` for these dimension values; written by the next `flush`
        (at once when there is no flush interval). Raises ValueError for a metric that is not a counter."""
        if SPECS[name].kind is not MetricTypes.COUNTER:
            raise ValueError(f"{name.value} is not a counter")
        if self._flusher is None:
            self.emit(name, value, *dimensions)
            return
        key = (name, dimensions)
        with self._lock:
            self._pending[key] = self._pending.get(key, 0.0) + value

    def observe(self, name: MetricName, value: float) -> None:
        """One observation of histogram `name` (no own dimensions); written by the next `flush` (at once when there
        is no flush interval). Raises ValueError for a metric that is not a histogram."""
        if SPECS[name].kind is not MetricTypes.HISTOGRAM:
            raise ValueError(f"{name.value} is not a histogram")
        if self._flusher is None:
            self.emit(name, value)
            return
        with self._lock:
            self._observed.append((name, value))

    def flush(self) -> None:
        """Write every summed counter and every kept observation (one line each), and start anew."""
        with self._lock:
            pending, self._pending = self._pending, {}
            observed, self._observed = self._observed, []
        for (name, dimensions), value in pending.items():
            self.emit(name, value, *dimensions)
        for name, value in observed:
            self.emit(name, value)

    def close(self) -> None:
        """Stop the flush thread and write what it had not written yet; later counts are written at once."""
        self._stop.set()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join(timeout=5)
        self._flusher = None
        self.flush()

    def _flush_every_interval(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            try:
                self.flush()
            except Exception:  # a failed write must not end the thread: later counts would never be written
                log.exception("writing summed metrics failed")

    def start_series(self, exits: Iterable[str], stages: Iterable[str], reasons: Iterable[str],
                     audited: Iterable[str] = (), outcomes: Iterable[str] = ()) -> None:
        """Every counter series at 0 from load on: ratios and rates over label values (exit k of K, a reason)
        must not start from missing series on a fresh server. Histograms cannot be started without a sample."""
        for exit_index in exits:
            self.emit(MetricName.EARLY_EXIT_COUNT, 0, exit_index)
        for reason in reasons:
            self.emit(MetricName.REQUESTS_REJECTED, 0, reason)
        outcomes = list(outcomes)
        for exit_index in audited:
            for outcome in outcomes:
                self.emit(MetricName.EARLY_EXIT_AUDIT, 0, exit_index, outcome)
        for name in (MetricName.COMPUTE_SPENT, MetricName.COMPUTE_FULL, MetricName.BUDGET_CLIPPED,
                     MetricName.AUDIT_DROPPED, MetricName.AUDIT_COMPUTE):
            self.emit(name, 0)
        for stage in stages:
            for name in (MetricName.STAGE_TIME, MetricName.STAGE_RUNS, MetricName.STAGE_ROWS):
                self.emit(name, 0, stage)
