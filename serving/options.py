"""The handler's options: the `handler:` section of model-config.yaml, validated by pydantic.

Every default is written here once; export writes the section from this model (export/archive.py)
and the handler reads it back with `HandlerOptions.from_config`. Unknown keys refuse to load, so a
typo in a deployment never goes unnoticed.
"""
from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from early_exit.validation import describe_errors

PositiveInt = Annotated[int, Field(strict=True, ge=1)]


class ServingMode(str, Enum):
    """EARLY_EXIT runs the stages with the exit policy; FULL_GRAPH_ONLY answers from full.onnx (a baseline)."""

    EARLY_EXIT = "early_exit"
    FULL_GRAPH_ONLY = "full_graph_only"


class ResponseDetail(str, Enum):
    """How much an answer says. FULL: probabilities, top-k and confidence; LABEL: the class, its label, the exit and
    the compute only, for untrusted callers (scores are an oracle for black-box attacks)."""

    FULL = "full"
    LABEL = "label"


class OptionsError(ValueError):
    """A `handler:` section that does not validate; the message is one line naming every problem."""


class HandlerOptions(BaseModel):
    """Per-model handler settings (model-config.yaml `handler:`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: ServingMode = ServingMode.EARLY_EXIT
    # Request limits; None derives them per body format from the manifest's input shape
    # (serving/decoding.py derive_limits). A number applies to every format.
    max_payload_bytes: PositiveInt | None = None  # request body limit (bytes)
    max_image_pixels: PositiveInt | None = None  # image limit (declared width x height, PNG and JPEG)
    top_k: PositiveInt = 5  # classes listed in an answer (response_detail full)
    response_detail: ResponseDetail = ResponseDetail.FULL  # label: no probabilities, top-k or confidence
    intra_op_threads: PositiveInt = 1  # onnxruntime threads per session
    # Operator ceiling (MFLOPs per input): a larger request budget, or default, is clipped to it and the
    # answer says so. None: no ceiling.
    max_budget_mflops: Annotated[float, Field(strict=False, gt=0, allow_inf_nan=False)] | None = None
    # Share of requests whose early answer is audited against the last exit, off the request path
    # (serving/audit.py); 0 turns the audit off. Audits waiting beyond audit_queue_size are dropped.
    audit_rate: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.01
    audit_queue_size: PositiveInt = 256
    audit_seed: Annotated[int, Field(strict=True)] | None = None  # None: a fresh random sample per worker
    # Counters (exits, compute, stage times, rejections) are summed in the worker, and latency observations kept,
    # and written every this many seconds (serving/metrics.py), far below Prometheus' scrape interval, off the
    # request path; 0 writes them with every batch.
    metrics_flush_seconds: Annotated[float, Field(ge=0.0, le=60.0, allow_inf_nan=False)] = 1.0
    profile: bool = Field(default=False, strict=True)  # read by TorchServe's @timed: ts_handler_* metrics

    @classmethod
    def from_config(cls, section: dict[str, Any] | None) -> "HandlerOptions":
        """Validate a parsed `handler:` section; raises OptionsError (one line) on any problem."""
        try:
            return cls.model_validate(dict(section or {}))
        except ValidationError as exc:
            raise OptionsError(describe_errors(exc, "model-config.yaml handler section")) from None

    def to_config(self) -> dict[str, Any]:
        """The YAML-ready section (plain types), every key written so the archive shows what it serves."""
        return self.model_dump(mode="json")
