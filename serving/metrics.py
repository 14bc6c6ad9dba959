"""The handler's metrics: specs (names are an interface), registration once, emission.

TorchServe drops metrics that serving/metrics.yaml does not declare, and matches dimension values to
the yaml's names by position: our own dimensions first, then ModelName and Level (stack-notes.md).
`register` refuses to load when the yaml disagrees with a spec here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable

from ts.metrics.metric_cache_errors import MetricsCacheKeyError
from ts.metrics.metric_type_enum import MetricTypes

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
    REQUEST_LATENCY_MS = "RequestLatencyMs"


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
    # TorchServe's Prometheus histograms have the client's fixed default buckets (0.005 .. 10): in seconds they
    # resolve 5 ms .. 10 s; the same observation in ms resolves 5 us .. 10 ms (small models on CPU).
    MetricSpec(MetricName.REQUEST_LATENCY, "s", (), MetricTypes.HISTOGRAM),
    MetricSpec(MetricName.REQUEST_LATENCY_MS, "ms", (), MetricTypes.HISTOGRAM),
)


class Metrics:
    """The registered metrics of one model, and the one way to emit them."""

    def __init__(self, cache: Any, model_name: str) -> None:
        """Register every spec with TorchServe's metric cache (`context.metrics`); raises ValueError on a yaml mismatch."""
        self.model_name = model_name
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

    def emit(self, name: MetricName, value: float, *dimensions: str, request_id: str = "") -> None:
        self._metrics[name].add_or_update(value, [*dimensions, self.model_name, LEVEL], request_id)

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
