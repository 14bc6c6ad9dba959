"""The one staged runner: a batch through the exported stage graphs, rows leaving as they become confident.

Stage k (1-based) maps features_{k-1} to (features_k, logits_k); the last returns logits only. The
runner feeds stage 1 the whole batch, asks the policy (`early_exit.policy.exit_mask`) which rows
leave at exit 1, runs stage 2 on the rows still there, and so on. A row answered at exit k has
paid its staged cost (stages and heads 1..k, `early_exit.costs`), which is what `RunResult.mflops`
holds. The TorchServe handler, export's parity and robustness checks, `bench_serve` and the tests
all run graphs through this module; `FullGraphRunner` is the same interface over `full.onnx`.

Torch-free: numpy and onnxruntime only (the serving worker must not need training code).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from early_exit.manifest import Manifest, ManifestError
from early_exit.policy import NEVER, confidence, exit_mask, softmax

log = logging.getLogger(__name__)



class Session(Protocol):
    """What the runner needs of an onnxruntime.InferenceSession."""

    def run(self, output_names: Sequence[str] | None, input_feed: dict[str, np.ndarray]) -> list[np.ndarray]: ...


StageHook = Callable[[str, int, float], None]
"""Called after each graph run with (stage label: "1".."K" or "full", rows, elapsed milliseconds)."""


@dataclass(frozen=True)
class RunResult:
    """Per row of the batch (N rows, C classes)."""

    exits: np.ndarray  # (N,) int64, 0-based exit that answered
    probs: np.ndarray  # (N, C) float64 softmax of the answering exit
    confidence: np.ndarray  # (N,) float64, the manifest's confidence measure of `probs`
    mflops: np.ndarray  # (N,) float64, staged cost of the answer (MFLOPs per input)
    logits: list[np.ndarray] | None = None  # per exit (N, C) float32, NaN where a row had left; keep_logits only
    # Rows asked for in `run(..., audit=...)` that left before the last exit: (row, exit, features_k) each, so the
    # remaining stages can run later (`StagedRunner.finish`) without redoing stages 1..k.
    audit: list[tuple[int, int, np.ndarray]] | None = None


def open_session(path: str | Path, intra_op_threads: int = 1, device_id: int | None = None) -> Any:
    """An onnxruntime session on CPU, or on CUDA device `device_id` when onnxruntime-gpu really runs it there.

    onnxruntime-gpu silently falls back to CPU when CUDA cannot start (stack-notes.md): the active
    provider is checked and a fallback is logged as a warning.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers: list[Any] = ["CPUExecutionProvider"]
    want_cuda = device_id is not None and "CUDAExecutionProvider" in ort.get_available_providers()
    if want_cuda:
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device_id)}))
    session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    if want_cuda and session.get_providers()[0] != "CUDAExecutionProvider":
        log.warning("CUDA was requested for %s but onnxruntime runs it on %s", Path(path).name,
                    session.get_providers()[0])
    return session


def _check_io(session: Any, what: str, input_name: str, output_names: Sequence[str]) -> None:
    if not hasattr(session, "get_inputs"):  # a test double: nothing to compare
        return
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [input_name] or any(name not in outputs for name in output_names):
        raise ManifestError(f"{what}: graph has inputs {inputs} / outputs {outputs}, manifest says "
                            f"{input_name} -> {list(output_names)}")


def _timed_run(session: Session, outputs: list[str], feed: dict[str, np.ndarray], stage: str,
               on_stage: StageHook | None) -> list[np.ndarray]:
    started = time.perf_counter()
    result = session.run(outputs, feed)
    if on_stage is not None:
        on_stage(stage, len(next(iter(feed.values()))), (time.perf_counter() - started) * 1000.0)
    return result


def _per_row(values: np.ndarray | Sequence[Any] | float | int, n: int, k: int | None, what: str) -> np.ndarray:
    array = np.asarray(values)
    shape = (n,) if k is None else (n, k)
    try:
        return np.broadcast_to(array, shape)
    except ValueError:
        raise ValueError(f"{what} of shape {array.shape} does not fit a batch of {n} rows"
                         + ("" if k is None else f" and {k} exits")) from None


class StagedRunner:
    """Staged early exit over one session per stage graph (see the module docstring)."""

    def __init__(self, manifest: Manifest, sessions: Sequence[Session], on_stage: StageHook | None = None) -> None:
        if len(sessions) != manifest.num_exits:
            raise ManifestError(f"{len(sessions)} sessions for {manifest.num_exits} stage graphs")
        self.manifest = manifest
        self.sessions = list(sessions)
        self.on_stage = on_stage
        self.costs = np.asarray(manifest.staged_mflops, dtype=np.float64)
        self._outputs = [[e.features_name, e.logits_name] if e.features_name else [e.logits_name]
                         for e in manifest.exits]
        for spec, session, outputs in zip(manifest.exits, self.sessions, self._outputs):
            _check_io(session, f"exit {spec.index}", spec.input_name, outputs)

    @classmethod
    def from_folder(cls, manifest: Manifest, folder: str | Path, intra_op_threads: int = 1,
                    device_id: int | None = None, on_stage: StageHook | None = None) -> "StagedRunner":
        """Open every stage graph the manifest lists in `folder` (verify its sha256 first: manifest.verify_files)."""
        folder = Path(folder)
        return cls(manifest, [open_session(folder / e.file, intra_op_threads, device_id) for e in manifest.exits],
                   on_stage)

    @property
    def num_exits(self) -> int:
        return self.manifest.num_exits

    def run(self, x: np.ndarray, thresholds: np.ndarray | Sequence[float], max_exits: np.ndarray | int,
            keep_logits: bool = False, audit: np.ndarray | None = None, start: int = 0, record: bool = True
            ) -> RunResult:
        """Answer a batch under per-row thresholds and caps.

        x: (N, C, H, W) float32 in [0, 1]; thresholds: (K,) shared or (N, K) per row; max_exits: the
        deepest exit (0-based) each row may reach, shared or (N,). Stage k runs only on the rows that
        have not left. With keep_logits, every exit's logits are returned for the rows that reached it.
        audit: (N,) bool, rows whose features are kept when they leave before the last exit (RunResult.audit).
        start: the first stage to run (0-based); x is then that stage's input, features_{start} (`finish`).
        record: call the stage hook (False for work that is not traffic, such as the audit).
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        n, k_exits = len(x), self.num_exits
        thresholds = _per_row(thresholds, n, k_exits, "thresholds")
        max_exits = _per_row(max_exits, n, None, "max_exits").astype(np.int64)
        if n and (max_exits.min() < 0 or max_exits.max() >= k_exits):
            raise ValueError(f"max_exits must be in [0, {k_exits - 1}]")
        exits = np.full(n, -1, dtype=np.int64)
        probs: np.ndarray | None = None
        conf_out = np.zeros(n, dtype=np.float64)
        kept: list[np.ndarray] | None = [] if keep_logits else None
        audited: list[tuple[int, int, np.ndarray]] | None = None if audit is None else []
        audit_rows = None if audit is None else _per_row(audit, n, None, "audit").astype(bool)
        pending = np.arange(n)
        features = x
        for k in range(start, k_exits):
            spec, session = self.manifest.exits[k], self.sessions[k]
            if not pending.size:
                break
            outputs = _timed_run(session, self._outputs[k], {spec.input_name: features}, str(spec.index),
                                 self.on_stage if record else None)
            logits = outputs[-1]
            p = softmax(logits)
            c = confidence(p, self.manifest.confidence)
            if probs is None:
                probs = np.zeros((n, p.shape[1]), dtype=np.float64)
            if kept is not None:
                full = np.full((n, logits.shape[1]), np.nan, dtype=np.float32)
                full[pending] = logits
                kept.append(full)
            leave = exit_mask(c, thresholds[pending, k], k, max_exits[pending])
            rows = pending[leave]
            exits[rows], probs[rows], conf_out[rows] = k, p[leave], c[leave]
            if audited is not None and k < k_exits - 1:
                for j in np.flatnonzero(leave & audit_rows[pending]):
                    audited.append((int(pending[j]), k, outputs[0][j].copy()))
            pending = pending[~leave]
            if pending.size:
                features = outputs[0][~leave]
        if kept:  # every row left before the last stage: the exits nobody reached are all NaN
            kept.extend(np.full_like(kept[0], np.nan) for _ in range(k_exits - len(kept)))
        return RunResult(exits, probs if probs is not None else np.zeros((0, 0)), conf_out, self.costs[exits], kept,
                         audited)

    def finish(self, features: np.ndarray, exit: int) -> tuple[np.ndarray, float]:
        """The last exit's probabilities (M, C) for rows that left at `exit` (0-based), from their features_exit,
        running only the stages after it; and what that cost per row in MFLOPs (staged cost of the last exit
        minus that of `exit`). Used by the audit of early answers."""
        if not 0 <= exit < self.num_exits - 1:
            raise ValueError(f"exit must be in [0, {self.num_exits - 2}] to have stages after it")
        result = self.run(features, NEVER, self.num_exits - 1, start=exit + 1, record=False)
        return result.probs, float(self.costs[-1] - self.costs[exit])

    def exit_logits(self, x: np.ndarray) -> list[np.ndarray]:
        """Every exit's logits for every row (no early exit): the chain export checks against PyTorch."""
        return self.run(x, NEVER, self.num_exits - 1, keep_logits=True).logits or []


class FullGraphRunner:
    """The same interface over `full.onnx`: every row answers at the last exit and pays the full graph's cost."""

    def __init__(self, manifest: Manifest, session: Session, on_stage: StageHook | None = None) -> None:
        if manifest.full_graph is None:
            raise ManifestError("the manifest has no full_graph")
        self.manifest = manifest
        self.session = session
        self.on_stage = on_stage
        self.spec = manifest.full_graph
        _check_io(session, "full graph", self.spec.input_name, [self.spec.logits_name])

    @classmethod
    def from_folder(cls, manifest: Manifest, folder: str | Path, intra_op_threads: int = 1,
                    device_id: int | None = None, on_stage: StageHook | None = None) -> "FullGraphRunner":
        if manifest.full_graph is None:
            raise ManifestError("the manifest has no full_graph")
        return cls(manifest, open_session(Path(folder) / manifest.full_graph.file, intra_op_threads, device_id),
                   on_stage)

    @property
    def num_exits(self) -> int:
        return self.manifest.num_exits

    def run(self, x: np.ndarray, thresholds: np.ndarray | Sequence[float] | None = None,
            max_exits: np.ndarray | int | None = None, keep_logits: bool = False, audit: np.ndarray | None = None
            ) -> RunResult:
        """Full-graph answers; thresholds, caps and audit rows are accepted for interface parity and ignored
        (every answer comes from the last exit: nothing to audit)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        logits = _timed_run(self.session, [self.spec.logits_name], {self.spec.input_name: x}, "full",
                            self.on_stage)[0]
        p = softmax(logits)
        n = len(x)
        return RunResult(np.full(n, self.num_exits - 1, dtype=np.int64), p, confidence(p, self.manifest.confidence),
                         np.full(n, self.spec.mflops, dtype=np.float64), None)

