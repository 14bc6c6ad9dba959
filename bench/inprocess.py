"""In-process loops (no HTTP, no TorchServe frontend): the limits the served figures are measured against.

  InProcess           serving/handler.py's EarlyExitHandler.handle on batches of PNG bodies, with TorchServe's
                      own Context and metrics cache: the staged onnxruntime loop plus decoding and answers
                      (bench_serve's in-process rows and the settings sweep)
  ParallelInProcess   as many InProcess loops at once, one process each: the limit for a server with several
                      workers (bench_serve)
  forced_exit_rates   the onnxruntime runners alone, the staged one capped at each exit and the full graph, on
                      decoded arrays (bench_compute: does compute time follow the staged FLOPs?)
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench.common import Call, latency_summary, self_cpu_seconds
from early_exit.manifest import Manifest, load_manifest
from early_exit.policy import NEVER, BudgetEntry

REPO = Path(__file__).resolve().parents[1]
METRICS_YAML = REPO / "serving" / "metrics.yaml"


@dataclass(frozen=True)
class _Loaded:
    """One initialized handler with the TorchServe objects `handle` reads."""

    handler: Any  # serving.handler.EarlyExitHandler
    context: Any  # ts.context.Context
    cache: Any  # ts.metrics.metric_cache_yaml_impl.MetricsCacheYamlImpl


class InProcess:
    """EarlyExitHandler.handle on batches of PNG bodies, with TorchServe's Context and metrics cache; one handler
    per onnxruntime thread count, loaded on first use. The metric lines a worker prints for the frontend go
    nowhere, so the figures leave out TorchServe's own per-request work."""

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.folder, self.manifest = folder, manifest
        self._handlers: dict[int, _Loaded] = {}

    def _handler(self, threads: int) -> _Loaded:
        if threads not in self._handlers:
            from ts.context import Context
            from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

            from serving.handler import EarlyExitHandler

            cache = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
            cache.initialize_cache()
            cache.model_name = self.manifest.name
            logging.getLogger("ts.metrics.caching_metric").setLevel(logging.WARNING)  # one line per metric
            ctx = Context(self.manifest.name, str(self.folder), {"model": {"modelName": self.manifest.name}}, 64,
                          None, "0.12.0", metrics=cache, model_yaml_config={"handler": {"intra_op_threads": threads}})
            handler = EarlyExitHandler()
            handler.initialize(ctx)
            self._handlers[threads] = _Loaded(handler, ctx, cache)
        return self._handlers[threads]

    def run(self, bodies: Sequence[bytes], batch_size: int, threads: int) -> tuple[dict[str, Any], list[Call]]:
        """Every body once, in batches of `batch_size`, with `threads` onnxruntime threads per session.

        Returns the run (bench.common.latency_summary, with each call's latency = its batch's handle time;
        `errors` = answers with a status other than 200; `cpu`: wall and process CPU seconds, CPU ms per
        request) and one Call per body, in order, with the answer's JSON parsed (outside the timing)."""
        from ts.service import Service

        loaded = self._handler(threads)
        ctx, cache = loaded.context, loaded.cache
        calls: list[Call] = []
        cpu0 = self_cpu_seconds()
        started = time.perf_counter()
        for start in range(0, len(bodies), batch_size):
            chunk = bodies[start:start + batch_size]
            batch = [{"requestId": f"r{start + j}".encode(), "parameters": [
                {"name": "body", "contentType": "image/png", "value": body}], "headers": []}
                for j, body in enumerate(chunk)]
            processors, inputs, ids = Service.retrieve_data_for_inference(batch)
            ctx.request_ids, ctx.request_processor, cache.request_ids = ids, processors, ids
            t0 = time.perf_counter()
            out = loaded.handler.handle(inputs, ctx)
            dt = time.perf_counter() - t0
            calls += [Call(ctx.get_response_status(j)[0], dt, o) for j, o in enumerate(out)]
        seconds = time.perf_counter() - started
        cpu = self_cpu_seconds() - cpu0
        calls = [replace(c, body=json.loads(c.body)) for c in calls]
        run = {**latency_summary([c.latency_s for c in calls], seconds),
               "errors": sum(1 for c in calls if c.status != 200),
               "cpu": {"wall_s": round(seconds, 3), "process_cpu_s": round(cpu, 3),
                       "process_cpu_ms_per_request": round(cpu * 1000 / max(1, len(calls)), 4)}}
        return run, calls


_LOOP: InProcess | None = None  # the in-process loop of a ParallelInProcess child process


def _loop_init(folder: str) -> None:
    global _LOOP
    _LOOP = InProcess(Path(folder), load_manifest(Path(folder)))


def _loop_run(bodies: Sequence[bytes], batch_size: int, threads: int) -> tuple[float, float, int, int, float]:
    """In a child: one InProcess run; its wall-clock start and end (time.time, comparable across processes),
    rows answered, errors among them and CPU seconds."""
    if _LOOP is None:
        raise RuntimeError("_loop_init did not run in this process")
    started = time.time()
    run, calls = _LOOP.run(bodies, batch_size, threads)
    return started, time.time(), len(calls), run["errors"], run["cpu"]["process_cpu_s"]


class ParallelInProcess:
    """`loops` in-process loops at once, each in its own process (one per server worker): what the machine
    answers without HTTP when every core runs the staged loop. Children load their handler on the first run,
    whose figures therefore include the load: call `run` once to warm up."""

    def __init__(self, folder: Path, loops: int) -> None:
        self.loops = loops
        self.pool = ProcessPoolExecutor(loops, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_loop_init, initargs=(str(folder),))

    def run(self, bodies: Sequence[bytes], batch_size: int, threads: int) -> dict[str, Any]:
        """Every loop answers all of `bodies`: loops, requests (rows of all loops), errors, seconds (from the first
        start to the last end), requests/s over that span, CPU ms per request of all children."""
        spans = [f.result() for f in [self.pool.submit(_loop_run, bodies, batch_size, threads)
                                      for _ in range(self.loops)]]
        seconds = max(s[1] for s in spans) - min(s[0] for s in spans)
        rows = sum(s[2] for s in spans)
        return {"loops": self.loops, "requests": rows, "errors": sum(s[3] for s in spans), "seconds": round(seconds, 3),
                "requests_per_s": round(rows / seconds, 1) if seconds > 0 else None,
                "cpu": {"process_cpu_ms_per_request": round(sum(s[4] for s in spans) * 1000 / max(1, rows), 4)}}

    def close(self) -> None:
        self.pool.shutdown()


def forced_exit_rates(folder: Path, manifest: Manifest, x: np.ndarray, batch: int, threads: int, rounds: int,
                      policy: BudgetEntry | None = None) -> dict[str, dict[str, Any]]:
    """Rows/s of the full-graph runner (key "full") and of the staged runner capped at each exit (keys "1".."K",
    no threshold firing), `threads` onnxruntime threads, `x` (N x C x H x W float32) in batches of `batch`, each
    measured once per round after one untimed batch; with `policy` also the staged runner under those thresholds
    and that cap (key "policy": the natural mix of exits). Per key: the median rows_per_s and every round's
    figure."""
    from early_exit.runner import FullGraphRunner, StagedRunner

    staged = StagedRunner.from_folder(manifest, folder, threads)
    full = FullGraphRunner.from_folder(manifest, folder, threads)
    k = manifest.num_exits
    never = np.full(k, NEVER)

    def rate(fn: Callable[[np.ndarray], Any]) -> float:
        fn(x[:batch])  # first-run allocations stay out of the timing
        started = time.perf_counter()
        for i in range(0, len(x), batch):
            fn(x[i:i + batch])
        return len(x) / (time.perf_counter() - started)

    out: dict[str, list[float]] = {"full": []}
    for _ in range(rounds):
        out["full"].append(rate(full.run))
        for e in range(k):
            out.setdefault(str(e + 1), []).append(rate(lambda b, e=e: staged.run(b, never, e)))
        if policy is not None:
            out.setdefault("policy", []).append(rate(lambda b: staged.run(b, policy.thresholds, policy.max_exit)))
    return {key: {"rows_per_s": round(float(np.median(v)), 1), "per_round": [round(r, 1) for r in v]}
            for key, v in out.items()}
