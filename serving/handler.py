"""TorchServe handler: staged early exit under a per-request compute budget.

The archive holds `manifest.json`, one ONNX graph per stage (stage k maps
features_{k-1} to (features_k, logits_k); the last stage returns logits only),
optionally `full.onnx`, and the `early_exit` package, which TorchServe puts on
the worker's path (the model directory is on PYTHONPATH). Everything about the
model comes from the manifest; the exit decision is `early_exit.policy`, the
same code offline evaluation and calibration run, so HTTP answers and offline
figures agree by construction.

Request (one element of a TorchServe batch)
    body    a PNG or JPEG image (converted to the model's channels and size), or
            JSON {"data": nested list} of shape C x H x W (or 1 x C x H x W), values in [0, 1]
    header  X-Compute-Budget: <MFLOPs per input>, any case; absent -> the manifest's default budget.
            It caps the deepest exit (cumulative cost <= budget) and picks the calibration row
            (thresholds) of the largest tabulated budget not above it.
Response 200 (application/json)
    {"class_index", "label", "confidence", "top_k": [{"class_index", "label", "probability"}],
     "exit_index" (1-based), "num_exits", "max_exit_allowed", "mflops_spent", "full_mflops",
     "budget_mflops", "budget_source" ("header"|"default"), "calibrated_budget_mflops", "mode"}
    headers X-Exit-Index, X-Compute-Spent (MFLOPs), X-Compute-Budget-Applied
Response 4xx (application/json), for that request only
    {"error": <what is wrong>, "reason": <RejectReason value>, "status": <code>, ...details}
    details: "valid_budget_mflops" {"min", "full_depth"} for budget errors, "expected_shape" for shapes,
    "max_payload_bytes" for oversize bodies.

Options: the `handler:` section of model-config.yaml (see `HandlerOptions`).

TorchServe loads a class-based handler only if its module defines exactly one
class; this module defines several (enums, small records), so it exposes the
module-level entry point `handle(data, context)` that TorchServe prefers when
present, wrapping one `EarlyExitHandler` (a `BaseHandler` subclass).
"""
from __future__ import annotations

import io
import json
import logging
import math
import struct
import time
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image
from ts.handler_utils.timer import timed
from ts.metrics.metric_cache_errors import MetricsCacheKeyError
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

import early_exit
from early_exit.manifest import Manifest, ManifestError, load_manifest, verify_files
from early_exit.policy import (
    BudgetEntry,
    BudgetError,
    confidence,
    deepest_exit_within,
    entry_for_budget,
    exit_mask,
    softmax,
)

logger = logging.getLogger(__name__)

BUDGET_HEADER = "x-compute-budget"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
LEVEL = "Model"  # TorchServe's Level dimension value for model metrics


class RejectReason(str, Enum):
    """Why a request got a 4xx: the closed set behind the RequestsRejected{Reason} label."""

    INVALID_BUDGET = "invalid_budget"  # not a number, NaN, infinite or negative
    BUDGET_BELOW_MINIMUM = "budget_below_minimum"  # below the cheapest exit
    UNDECODABLE_IMAGE = "undecodable_image"  # neither JSON nor a decodable PNG/JPEG
    WRONG_SHAPE = "wrong_shape"
    NON_FINITE = "non_finite"  # NaN or infinite values
    OUT_OF_RANGE = "out_of_range"  # values outside [0, 1]
    EMPTY_BODY = "empty_body"
    PAYLOAD_TOO_LARGE = "payload_too_large"  # body over max_payload_bytes, or image over max_image_pixels
    BAD_JSON = "bad_json"  # malformed JSON, or not {"data": numbers}
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"  # form-urlencoded: the frontend split the body

    @property
    def status(self) -> int:
        return {RejectReason.PAYLOAD_TOO_LARGE: 413, RejectReason.UNSUPPORTED_CONTENT_TYPE: 415}.get(self, 400)


HTTP_PHRASES = {400: "Bad Request", 413: "Payload Too Large", 415: "Unsupported Media Type"}
FORM_URLENCODED = "application/x-www-form-urlencoded"


class ServingMode(str, Enum):
    """EARLY_EXIT runs the stages with the exit policy; FULL_GRAPH_ONLY answers from full.onnx (a baseline)."""

    EARLY_EXIT = "early_exit"
    FULL_GRAPH_ONLY = "full_graph_only"


class BudgetSource(str, Enum):
    HEADER = "header"
    DEFAULT = "default"


class MetricName(str, Enum):
    """Metric names are an interface (alerts and dashboards query them): keep them stable."""

    EARLY_EXIT_COUNT = "EarlyExitCount"
    COMPUTE_SPENT = "ComputeSpentMFLOPs"
    COMPUTE_FULL = "ComputeFullMFLOPs"
    REQUESTS_REJECTED = "RequestsRejected"
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
        # TorchServe matches values to the yaml's names by position: own dimensions first (stack notes).
        return [*self.dimensions, "ModelName", "Level"]


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(MetricName.EARLY_EXIT_COUNT, "count", ("ExitIndex",), MetricTypes.COUNTER),
    MetricSpec(MetricName.COMPUTE_SPENT, "MFLOPs", (), MetricTypes.COUNTER),
    MetricSpec(MetricName.COMPUTE_FULL, "MFLOPs", (), MetricTypes.COUNTER),
    MetricSpec(MetricName.REQUESTS_REJECTED, "count", ("Reason",), MetricTypes.COUNTER),
    MetricSpec(MetricName.STAGE_TIME, "ms", ("Stage",), MetricTypes.COUNTER),
    MetricSpec(MetricName.STAGE_RUNS, "count", ("Stage",), MetricTypes.COUNTER),
    MetricSpec(MetricName.STAGE_ROWS, "count", ("Stage",), MetricTypes.COUNTER),
    # TorchServe's Prometheus histograms have the client's fixed default buckets (0.005 .. 10): in seconds they
    # resolve 5 ms .. 10 s; the same observation in ms resolves 5 us .. 10 ms (small models on CPU).
    MetricSpec(MetricName.REQUEST_LATENCY, "s", (), MetricTypes.HISTOGRAM),
    MetricSpec(MetricName.REQUEST_LATENCY_MS, "ms", (), MetricTypes.HISTOGRAM),
)


class RequestRejected(Exception):
    """One request's input is unusable: becomes that request's 4xx, never the batch's."""

    def __init__(self, reason: RejectReason, message: str, **details: Any) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "reason": self.reason.value, "status": self.reason.status, **self.details}


@dataclass(frozen=True)
class HandlerOptions:
    """The `handler:` section of model-config.yaml; unknown keys refuse to load (a typo must not go unnoticed)."""

    mode: ServingMode = ServingMode.EARLY_EXIT
    max_payload_bytes: int = 1 << 20
    max_image_pixels: int = 4096 * 4096
    top_k: int = 5
    intra_op_threads: int = 1
    profile: bool = False  # read by TorchServe's @timed: per-phase ts_handler_* metrics

    @classmethod
    def from_config(cls, section: dict[str, Any] | None) -> "HandlerOptions":
        section = dict(section or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown handler option(s) {unknown} in model-config.yaml; known: {sorted(known)}")
        opts = cls(**{**section, "mode": ServingMode(section.get("mode", ServingMode.EARLY_EXIT.value))})
        for name in ("max_payload_bytes", "max_image_pixels", "top_k", "intra_op_threads"):
            value = getattr(opts, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"handler option {name} must be a positive integer, got {value!r}")
        return opts


@dataclass(frozen=True)
class Prepared:
    """A decoded, validated request: its input and the budget row that governs it."""

    x: np.ndarray  # C x H x W float32 in [0, 1]
    budget: float
    source: BudgetSource
    entry: BudgetEntry | None  # None in FULL_GRAPH_ONLY mode
    max_exit: int  # 0-based deepest exit allowed


@dataclass(frozen=True)
class Answer:
    prepared: Prepared
    exit: int  # 0-based exit that answered
    probs: np.ndarray  # C
    confidence: float


class EarlyExitHandler(BaseHandler):
    """Decode -> run stage 1 on the batch, let confident rows leave, run stage 2 on the rest, ... -> JSON."""

    def __init__(self) -> None:
        super().__init__()
        self.options = HandlerOptions()
        self.model_manifest: Manifest | None = None  # BaseHandler's `manifest` is the .mar's MANIFEST.json
        self.sessions: list[ort.InferenceSession] = []
        self.full_session: ort.InferenceSession | None = None
        self.provider = "CPUExecutionProvider"
        self.metrics: dict[MetricName, Any] = {}
        self.model_name = ""

    # ------------------------------------------------------------------ load
    def initialize(self, context: Any) -> None:
        """Load and verify the manifest and graphs; any problem raises, so a bad archive never serves."""
        self.context = context
        self.manifest = context.manifest
        self.model_yaml_config = context.model_yaml_config or {}
        self.model_name = context.model_name
        model_dir = Path(context.system_properties["model_dir"])
        self.options = HandlerOptions.from_config(self.model_yaml_config.get("handler"))
        logger.info("early_exit imported from %s; model_dir %s", Path(early_exit.__file__).parent, model_dir)

        manifest = load_manifest(model_dir)
        verify_files(manifest, model_dir)  # sha256 mismatch -> ManifestError -> the worker refuses to load
        self.model_manifest = manifest
        if len(manifest.input_shape) != 3:
            raise ManifestError(f"input_shape must be C, H, W, got {manifest.input_shape}")

        gpu_id = context.system_properties.get("gpu_id")
        if self.options.mode is ServingMode.FULL_GRAPH_ONLY:
            if not manifest.full_graph:
                raise ManifestError("mode full_graph_only needs a full_graph in the manifest")
            self.full_session = self._open_session(model_dir / manifest.full_graph["file"], gpu_id)
            self._check_io(self.full_session, "full graph", manifest.full_graph["input_name"],
                           [manifest.full_graph["logits_name"]])
        else:
            for k, spec in enumerate(manifest.exits):
                session = self._open_session(model_dir / spec.file, gpu_id)
                self._check_io(session, f"exit {spec.index}", spec.input_name, self._output_names(k))
                self.sessions.append(session)
        self._register_metrics(context.metrics)
        self._warm_up()
        self._start_series()
        self.initialized = True
        logger.info(
            "loaded %s v%s: %d exits %s MFLOPs, mode %s, provider %s, default budget %g MFLOPs",
            manifest.name, manifest.version, manifest.num_exits, manifest.exit_mflops,
            self.options.mode.value, self.provider, manifest.default_budget_mflops,
        )

    def _open_session(self, path: Path, gpu_id: int | None) -> ort.InferenceSession:
        """CUDA only when it really is active: onnxruntime-gpu silently falls back to CPU, so check get_providers()."""
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.options.intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        providers: list[Any] = ["CPUExecutionProvider"]
        want_cuda = gpu_id is not None and "CUDAExecutionProvider" in ort.get_available_providers()
        if want_cuda:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(gpu_id)}))
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        active = session.get_providers()
        if want_cuda and active[0] != "CUDAExecutionProvider":
            logger.warning("CUDA was requested for %s but onnxruntime runs it on %s", path.name, active[0])
        self.provider = active[0]
        return session

    @staticmethod
    def _check_io(session: ort.InferenceSession, what: str, input_name: str, output_names: Sequence[str]) -> None:
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if inputs != [input_name] or any(name not in outputs for name in output_names):
            raise ManifestError(f"{what}: graph has inputs {inputs} / outputs {outputs}, manifest says "
                                f"{input_name} -> {list(output_names)}")

    def _register_metrics(self, cache: Any) -> None:
        """Register every metric once; a metrics.yaml that lists other dimensions (or order) refuses to load."""
        for spec in METRICS:
            try:
                metric = cache.get_metric(spec.name.value, spec.kind)
            except MetricsCacheKeyError:
                logger.warning("metric %s is not declared in metrics.yaml: TorchServe will drop it", spec.name.value)
                metric = cache.add_metric_to_cache(spec.name.value, spec.unit, spec.all_dimensions, spec.kind)
            if list(metric.dimension_names) != spec.all_dimensions:
                raise ValueError(f"metrics.yaml declares {spec.name.value} with dimensions "
                                 f"{metric.dimension_names}; the handler emits {spec.all_dimensions}")
            self.metrics[spec.name] = metric

    def _start_series(self) -> None:
        """Every counter series at 0 from load on: ratios and rates over label values (exit k of K, a reason)
        must not start from missing series on a fresh server. Histograms cannot be started without a sample."""
        stages = ["full"] if self.full_session is not None else [str(e.index) for e in self.model_manifest.exits]
        exits = [str(self.model_manifest.num_exits)] if self.full_session is not None else stages
        for exit_index in exits:
            self._emit(MetricName.EARLY_EXIT_COUNT, 0, exit_index)
        for reason in RejectReason:
            self._emit(MetricName.REQUESTS_REJECTED, 0, reason.value)
        for name in (MetricName.COMPUTE_SPENT, MetricName.COMPUTE_FULL):
            self._emit(name, 0)
        for stage in stages:
            for name in (MetricName.STAGE_TIME, MetricName.STAGE_RUNS, MetricName.STAGE_ROWS):
                self._emit(name, 0, stage)

    def _warm_up(self) -> None:
        """One batch-1 pass: first-run allocations happen now, and a chain of stages that does not fit fails load."""
        x = np.zeros((1, *self.model_manifest.input_shape), dtype=np.float32)
        if self.full_session is not None:
            self.full_session.run(None, {self.model_manifest.full_graph["input_name"]: x})
            return
        features = x
        for spec, session in zip(self.model_manifest.exits, self.sessions):
            outputs = session.run(self._output_names(spec.index - 1), {spec.input_name: features})
            features = outputs[0]

    # --------------------------------------------------------------- request
    def _output_names(self, k: int) -> list[str]:
        """Stage k's outputs in the order the loop reads them: features (if any) first, logits last."""
        spec = self.model_manifest.exits[k]
        return [spec.features_name, spec.logits_name] if spec.features_name else [spec.logits_name]

    @property
    def _costs(self) -> list[float]:
        """Cumulative MFLOPs of the answers this server can give (the full graph alone in FULL_GRAPH_ONLY)."""
        if self.options.mode is ServingMode.FULL_GRAPH_ONLY:
            return [float(self.model_manifest.full_graph["mflops"])]
        return self.model_manifest.exit_mflops

    def _budget_error(self, reason: RejectReason, message: str) -> RequestRejected:
        costs = self._costs
        return RequestRejected(reason, message, valid_budget_mflops={"min": costs[0], "full_depth": costs[-1]},
                               hint=f"send X-Compute-Budget as a finite number >= {costs[0]:g} (MFLOPs per input); "
                                    f"budgets above {costs[-1]:g} allow full depth")

    def _header(self, idx: int, name: str) -> str | None:
        """Request header `name` (lower case), matched case-insensitively: TorchServe keeps the client's case."""
        headers = self.context.get_all_request_header(idx) or {}
        return next((v for k, v in headers.items() if isinstance(k, str) and isinstance(v, str)
                     and k.lower() == name), None)

    def _read_budget(self, idx: int) -> tuple[float, BudgetSource, BudgetEntry | None, int]:
        """The budget of request idx and what it implies: calibration row and deepest allowed exit (0-based)."""
        raw = self._header(idx, BUDGET_HEADER)
        if raw is None:
            budget, source = self.model_manifest.default_budget_mflops, BudgetSource.DEFAULT
        else:
            text = str(raw).strip()
            try:
                budget = float(text)
            except ValueError:
                raise self._budget_error(RejectReason.INVALID_BUDGET,
                                         f"X-Compute-Budget {text[:64]!r} is not a number") from None
            if not math.isfinite(budget) or budget < 0:
                raise self._budget_error(RejectReason.INVALID_BUDGET,
                                         f"X-Compute-Budget must be finite and non-negative, got {text[:64]!r}")
            source = BudgetSource.HEADER
        try:
            if self.options.mode is ServingMode.FULL_GRAPH_ONLY:
                deepest_exit_within(budget, self._costs)  # the full graph is the only answer: it must fit
                return budget, source, None, self.model_manifest.num_exits - 1
            entry = entry_for_budget(budget, self.model_manifest.calibration, self.model_manifest.exit_mflops)
        except BudgetError as exc:
            raise self._budget_error(RejectReason.BUDGET_BELOW_MINIMUM, str(exc)) from None
        return budget, source, entry, entry.max_exit

    def _read_input(self, idx: int, row: Any) -> np.ndarray:
        """Request body -> C x H x W float32 in [0, 1], or RequestRejected."""
        content_type = (self._header(idx, "content-type") or "").lower()
        if content_type.startswith(FORM_URLENCODED):  # the frontend has already split (and mangled) the body
            raise RequestRejected(RejectReason.UNSUPPORTED_CONTENT_TYPE,
                                  f"{FORM_URLENCODED} bodies are parsed as form fields before they reach the model "
                                  "(curl's default for -d/--data-binary): send the image or JSON with Content-Type "
                                  "image/png, image/jpeg or application/json (curl -H 'Content-Type: image/png' or -T)")
        payload = row
        if isinstance(row, dict):  # {"body": ...} for a raw body, the field name for multipart forms
            payload = row.get("data", row.get("body"))
            if payload is None and row:
                payload = next(iter(row.values()))
        if payload is None or (isinstance(payload, (bytes, bytearray, str)) and not payload.strip()):
            raise RequestRejected(RejectReason.EMPTY_BODY, "the request has no body: send a PNG/JPEG image or "
                                  'JSON {"data": [...]}')
        if isinstance(payload, str):  # TorchServe decoded a text/* body
            payload = payload.encode("utf-8")
        if isinstance(payload, (bytes, bytearray)):
            payload = bytes(payload)
            if len(payload) > self.options.max_payload_bytes:
                raise RequestRejected(RejectReason.PAYLOAD_TOO_LARGE,
                                      f"body has {len(payload)} bytes, the limit is {self.options.max_payload_bytes}",
                                      max_payload_bytes=self.options.max_payload_bytes)
            if payload.lstrip()[:1] in (b"{", b"["):
                return self._parse_json(payload)
            return self._decode_image(payload)
        # TorchServe already parsed an application/json body (decode_input_request=true)
        return self._validate_array(payload)

    def _parse_json(self, payload: bytes) -> np.ndarray:
        try:
            document = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise RequestRejected(RejectReason.BAD_JSON, f"body is not valid JSON: {str(exc)[:200]}") from None
        return self._validate_array(document)

    def _validate_array(self, document: Any) -> np.ndarray:
        shape = tuple(self.model_manifest.input_shape)
        if not isinstance(document, dict) or "data" not in document:
            raise RequestRejected(RejectReason.BAD_JSON, 'JSON body must be an object {"data": nested list}',
                                  expected_shape=list(shape))
        try:
            array = np.asarray(document["data"])
        except (ValueError, RecursionError):  # ragged nesting
            raise RequestRejected(RejectReason.WRONG_SHAPE, f"'data' is not a regular array; expected shape "
                                  f"{list(shape)}", expected_shape=list(shape)) from None
        if array.ndim == len(shape) + 1 and array.shape[0] == 1:
            array = array[0]
        if array.shape != shape:
            raise RequestRejected(RejectReason.WRONG_SHAPE, f"'data' has shape {list(array.shape)}, expected "
                                  f"{list(shape)} (or [1, ...])", expected_shape=list(shape))
        if array.dtype.kind not in "iuf":
            raise RequestRejected(RejectReason.BAD_JSON, f"'data' must hold numbers, got {array.dtype.kind!r} values")
        array = array.astype(np.float32)
        return self._check_values(array)

    @staticmethod
    def _check_values(array: np.ndarray) -> np.ndarray:
        finite = np.isfinite(array)
        if not finite.all():
            raise RequestRejected(RejectReason.NON_FINITE, f"'data' holds {int((~finite).sum())} NaN or infinite "
                                  "value(s)")
        if array.min() < 0.0 or array.max() > 1.0:
            raise RequestRejected(RejectReason.OUT_OF_RANGE, f"values must be in [0, 1], got "
                                  f"[{float(array.min()):g}, {float(array.max()):g}]")
        return np.ascontiguousarray(array)

    def _decode_image(self, payload: bytes) -> np.ndarray:
        channels, height, width = self.model_manifest.input_shape
        if channels not in (1, 3):
            raise RequestRejected(RejectReason.UNDECODABLE_IMAGE, f"this model takes {channels} channels: send JSON")
        mode = "L" if channels == 1 else "RGB"
        try:
            with Image.open(io.BytesIO(payload), formats=("PNG", "JPEG")) as image:
                pixels = image.size[0] * image.size[1]
                if pixels > self.options.max_image_pixels:
                    raise RequestRejected(RejectReason.PAYLOAD_TOO_LARGE,
                                          f"image has {pixels} pixels, the limit is {self.options.max_image_pixels}",
                                          max_image_pixels=self.options.max_image_pixels)
                image.draft(mode, (width, height))  # JPEG: decode at a reduced scale when it is much larger
                image = image.convert(mode)
                if image.size != (width, height):
                    image = image.resize((width, height), Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.float32) / 255.0
        except Image.DecompressionBombError as exc:  # beyond Pillow's own pixel limit, before ours could look
            raise RequestRejected(RejectReason.PAYLOAD_TOO_LARGE, str(exc)[:200],
                                  max_image_pixels=self.options.max_image_pixels) from None
        # Pillow reports corrupt or truncated data through all of these.
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
            kind = "PNG/JPEG image" if payload.startswith((PNG_MAGIC, JPEG_MAGIC)) else "PNG/JPEG image or JSON"
            raise RequestRejected(RejectReason.UNDECODABLE_IMAGE,
                                  f"body is not a decodable {kind}: {str(exc)[:200]}") from None
        array = array[None] if channels == 1 else array.transpose(2, 0, 1)
        return self._check_values(array)

    @timed
    def preprocess(self, data: list[Any]) -> list[Prepared | RequestRejected]:
        """Budget and input of every request; a bad one becomes its RequestRejected, the others go on."""
        prepared: list[Prepared | RequestRejected] = []
        for idx, row in enumerate(data):
            try:
                budget, source, entry, max_exit = self._read_budget(idx)
                prepared.append(Prepared(self._read_input(idx, row), budget, source, entry, max_exit))
            except RequestRejected as rejected:
                logger.info("request %s rejected (%s): %s", self.context.get_request_id(idx),
                            rejected.reason.value, rejected.message)
                prepared.append(rejected)
        return prepared

    @timed
    def inference(self, prepared: list[Prepared | RequestRejected], *args: Any, **kwargs: Any
                  ) -> list[Answer | RequestRejected]:
        """Staged early exit on the valid rows: stage k runs only on rows that have not left yet."""
        results: list[Answer | RequestRejected] = list(prepared)  # rejected entries pass through
        valid = [i for i, p in enumerate(prepared) if isinstance(p, Prepared)]
        if not valid:
            return results
        x = np.stack([prepared[i].x for i in valid])
        measure = self.model_manifest.confidence
        if self.full_session is not None:
            logits = self._run_stage("full", self.full_session, self.model_manifest.full_graph["input_name"],
                                     [self.model_manifest.full_graph["logits_name"]], x)[0]
            probs = softmax(logits)
            conf = confidence(probs, measure)
            last = self.model_manifest.num_exits - 1
            for j, i in enumerate(valid):
                results[i] = Answer(prepared[i], last, probs[j], float(conf[j]))
            return results

        pending = np.asarray(valid)  # batch indices still running
        entries = [prepared[i].entry for i in valid]
        features = x
        for k, (spec, session) in enumerate(zip(self.model_manifest.exits, self.sessions)):
            outputs = self._run_stage(str(spec.index), session, spec.input_name, self._output_names(k), features)
            probs = softmax(outputs[-1])
            conf = confidence(probs, measure)
            leave = np.zeros(len(pending), dtype=bool)
            for entry in set(entries):  # rows of one budget row share thresholds and cap
                rows = np.asarray([e == entry for e in entries])
                leave[rows] = exit_mask(conf[rows], entry.thresholds[k], k == entry.max_exit)
            for j in np.flatnonzero(leave):
                i = int(pending[j])
                results[i] = Answer(prepared[i], k, probs[j], float(conf[j]))
            stay = ~leave
            if not stay.any():
                break
            pending = pending[stay]
            entries = [e for e, s in zip(entries, stay) if s]
            features = outputs[0][stay]
        return results

    def _run_stage(self, stage: str, session: ort.InferenceSession, input_name: str, output_names: list[str],
                   features: np.ndarray) -> list[np.ndarray]:
        started = time.perf_counter()
        outputs = session.run(output_names, {input_name: features})
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        self._emit(MetricName.STAGE_TIME, elapsed_ms, stage)
        self._emit(MetricName.STAGE_RUNS, 1, stage)
        self._emit(MetricName.STAGE_ROWS, len(features), stage)
        return outputs

    @timed
    def postprocess(self, results: list[Answer | RequestRejected]) -> list[dict[str, Any]]:
        """JSON bodies, per-request status and headers, and the batch's metrics."""
        responses: list[dict[str, Any]] = []
        exits: dict[int, int] = {}
        spent = full = 0.0
        full_cost = self._costs[-1]
        for idx, result in enumerate(results):
            self.context.set_response_content_type(idx, "application/json")
            if isinstance(result, RequestRejected):
                status = result.reason.status
                self.context.set_response_status(status, HTTP_PHRASES[status], idx)
                self._emit(MetricName.REQUESTS_REJECTED, 1, result.reason.value, idx=idx)
                responses.append(result.body())
                continue
            body = self._answer_body(result)
            exits[body["exit_index"]] = exits.get(body["exit_index"], 0) + 1
            spent += body["mflops_spent"]
            full += full_cost
            self.context.set_response_header(idx, "X-Exit-Index", str(body["exit_index"]))
            self.context.set_response_header(idx, "X-Compute-Spent", f"{body['mflops_spent']:.6g}")
            self.context.set_response_header(idx, "X-Compute-Budget-Applied", f"{body['budget_mflops']:.6g}")
            responses.append(body)
        for exit_index, count in sorted(exits.items()):
            self._emit(MetricName.EARLY_EXIT_COUNT, count, str(exit_index))
        if exits:
            self._emit(MetricName.COMPUTE_SPENT, spent)
            self._emit(MetricName.COMPUTE_FULL, full)
        return responses

    def _answer_body(self, answer: Answer) -> dict[str, Any]:
        manifest = self.model_manifest
        order = np.argsort(-answer.probs, kind="stable")[: min(self.options.top_k, len(answer.probs))]
        best = int(order[0])
        prepared = answer.prepared
        return {
            "class_index": best,
            "label": manifest.classes[best] if best < len(manifest.classes) else str(best),
            "confidence": answer.confidence,
            "top_k": [{"class_index": int(c), "label": manifest.classes[int(c)] if int(c) < len(manifest.classes)
                       else str(int(c)), "probability": float(answer.probs[c])} for c in order],
            "exit_index": answer.exit + 1,
            "num_exits": manifest.num_exits,
            "max_exit_allowed": prepared.max_exit + 1,
            "mflops_spent": self._costs[-1] if self.full_session is not None else manifest.exit_mflops[answer.exit],
            "full_mflops": self._costs[-1],
            "budget_mflops": prepared.budget,
            "budget_source": prepared.source.value,
            "calibrated_budget_mflops": prepared.entry.budget_mflops if prepared.entry else None,
            "mode": self.options.mode.value,
        }

    def _emit(self, name: MetricName, value: float, *dimensions: str, idx: int | None = None) -> None:
        request_id = self.context.get_request_id(idx) if idx is not None else self._batch_request_ids()
        self.metrics[name].add_or_update(value, [*dimensions, self.model_name, LEVEL], request_id or "")

    def _batch_request_ids(self) -> str:
        ids = getattr(self.context, "request_ids", None) or {}
        return ",".join(str(v) for v in ids.values())

    def _is_explain(self) -> bool:
        """No Captum explanations here; BaseHandler would let one request's `explain` header redirect the batch."""
        return False

    def _is_describe(self) -> bool:
        """Likewise for `describe`: BaseHandler answers it with one item for the batch, failing all its requests."""
        return False

    def handle(self, data: list[Any], context: Any) -> list[dict[str, Any]]:
        """BaseHandler.handle (preprocess -> inference -> postprocess), plus one latency observation per request."""
        started = time.perf_counter()
        output = super().handle(data, context)
        elapsed = time.perf_counter() - started
        for idx in range(len(output)):
            self._emit(MetricName.REQUEST_LATENCY, elapsed, idx=idx)
            self._emit(MetricName.REQUEST_LATENCY_MS, elapsed * 1000.0, idx=idx)
        return output


_service = EarlyExitHandler()


def handle(data: list[Any] | None, context: Any) -> list[dict[str, Any]] | None:
    """TorchServe's module-level entry point: the load call (data is None) initializes, later calls serve batches."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
