"""`make bench-serve`: the early-exit server against stock TorchServe, a full-graph server and the in-process limit.

On an MNIST archive (default model_store/mnist.mar from `make train-export`) and the MNIST test set over HTTP
(token auth on, loopback):
  (a) early_exit_http   TorchServe + serving/handler.py, staged early exit at the default budget; PNG bodies
  (b) stock_torchserve  what a user runs without this project: TorchServe 0.12 serving the archive's full.onnx
                        through BaseHandler's ONNX path (bench/stock.py, bench/stock_onnx_handler.py), the same
                        batchSize, maxBatchDelay, workers, config.properties and log4j2.xml; the same images as
                        JSON {"instances": [C x H x W floats]} (TorchServe's JSON envelope), answers = logits
  (c) full_graph_http   (a)'s server and archive with handler mode full_graph_only (full.onnx); PNG bodies
  (d) in_process        the same handler called in-process (TorchServe's Context, no HTTP, no frontend):
                        the staged onnxruntime loop plus decoding, batch 1 and batch = the archive's batchSize;
                        with several workers also as many loops at once, one process each (in_process_parallel)
  (e) stock_torchserve_no_spin (--stock-no-spin) (b) with onnxruntime's thread-pool spinning off, which explains
                        most of (b)'s concurrency-1 figure (bench/stock_onnx_no_spin_handler.py)
at concurrency 1 and 16: requests/s, p50/p99 latency, mean staged MFLOPs per request, CPU per request of the
client, TorchServe's Java frontend and its Python workers. All servers run at once and get timed bursts in
interleaved rounds (bench/servers.py); figures are medians over `--rounds`, ratios medians of per-round ratios.
The timed bursts come from wrk (bench/wrk.py: one C thread, so the load generator takes little of the 2 cores the
server runs on); then every test image goes once through this project's Python client, whose answers are the ones
checked below (its throughput is reported beside, as `python_client_c16`).
Reported: (a) against (b) per concurrency (targets: >= 1.0x at c=1, >= 1.2x at c=16) and (a) against (d) at
c=16 (the HTTP overhead; target >= 0.35), the latter also from CPU time (what it tends to on a quiet machine).
Answers through HTTP are compared row
for row with the offline answers of the same staged runner (early_exit/runner.py) on the same graphs, per
calibrated budget too; budget violations are counted against the staged cost of the exit that answered
(stages and heads 1..k, taken from the manifest's cost profile, not from the response).

`--sweep-settings` also sweeps the server's settings (workers, batchSize, maxBatchDelay, onnxruntime threads,
netty thread pools, job queue; bench/sweep.py) at concurrency 16: an A/A control (the noise floor), then each
candidate against the best so far, both on fresh servers with interleaved bursts, each also against the
in-process loop with its batch size and threads; the best is confirmed against the archive's own setting
A/B/A/B, and the sweep and the recommended defaults go into the result (`--sweep-only`: the sweep alone).
Client threads and the server share the machine's cores: figures are for this machine only.
Writes bench/results/serve-<dataset>.json (serve-<dataset>-sweep.json with --sweep-only).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm

from bench import servers, stock, sweep, wrk
from bench.common import Call, latency_summary, load, ratio, result_header, seed_everything, self_cpu_seconds
from early_exit.manifest import Manifest, load_manifest, verify_files
from early_exit.policy import entry_for_budget
from early_exit.runner import StagedRunner

log = logging.getLogger("bench.serve")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MODEL_CONFIG = "model-config.yaml"
TARGETS = {"stock_throughput_ratio": {1: 1.0, 16: 1.2}, "http_vs_in_process_c16": 0.35}

__all__ = ["Call", "load", "main", "summarize"]


def png_bodies(x: np.ndarray) -> list[bytes]:
    """Test images as 8-bit PNG: x holds k/255 values, so decoding gives back exactly x."""
    out = []
    for img in x:
        buf = io.BytesIO()
        Image.fromarray((img[0] * 255).round().astype(np.uint8), mode="L").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def unpack(archive: Path, folder: Path) -> tuple[Manifest, dict[str, Any]]:
    with zipfile.ZipFile(archive) as z:
        z.extractall(folder)
    manifest = load_manifest(folder)
    verify_files(manifest, folder)
    config = yaml.safe_load((folder / MODEL_CONFIG).read_text()) if (folder / MODEL_CONFIG).exists() else {}
    return manifest, config or {}


def full_graph_archive(archive: Path, out: Path) -> Path:
    """A copy of the archive whose model-config.yaml sets handler.mode: full_graph_only (same name)."""
    def edit(config: dict[str, Any]) -> dict[str, Any]:
        config.setdefault("handler", {})["mode"] = "full_graph_only"
        return config
    return sweep.rewrite_model_config(archive, out, edit)


def offline_policy(runner: StagedRunner, x: np.ndarray, y: np.ndarray, budget: float, batch: int = 256
                   ) -> dict[str, Any]:
    """What the staged runner answers offline on the whole set under `budget`: the figure HTTP must reproduce."""
    manifest = runner.manifest
    entry = entry_for_budget(budget, manifest.calibration, manifest.staged_mflops)
    parts = [runner.run(x[i:i + batch], entry.thresholds, entry.max_exit) for i in range(0, len(x), batch)]
    exits = np.concatenate([p.exits for p in parts])
    pred = np.concatenate([p.probs.argmax(-1) for p in parts])
    return {"exits": exits, "pred": pred, "accuracy": float((pred == y).mean()),
            "mean_mflops": float(np.concatenate([p.mflops for p in parts]).mean())}


def violations(calls: list[Call], staged: Sequence[float]) -> int:
    """Answers whose exit's staged cost (from the manifest) exceeds the budget applied, or whose reported
    spend differs from that staged cost."""
    ok = [c for c in calls if c.status == 200 and c.body]
    return sum(1 for c in ok if staged[c.body["exit_index"] - 1] > c.body["budget_mflops"] + 1e-9
               or abs(c.body["mflops_spent"] - staged[c.body["exit_index"] - 1]) > 1e-9 * staged[-1])


def summarize(calls: list[Call], seconds: float, staged: Sequence[float], y: np.ndarray | None = None
              ) -> dict[str, Any]:
    """One run: requests/s and latency (bench.common.latency_summary), errors, mean MFLOPs, violations, accuracy."""
    ok = [c for c in calls if c.status == 200 and c.body]
    out: dict[str, Any] = {**latency_summary([c.latency_s for c in calls], seconds), "errors": len(calls) - len(ok),
                           "mean_mflops": round(float(np.mean([c.body["mflops_spent"] for c in ok])), 4) if ok else None,
                           "budget_violations": violations(calls, staged)}
    if y is not None and len(calls) == len(y):
        out["accuracy"] = float(np.mean([c.status == 200 and c.body is not None and c.body["class_index"] == t
                                         for c, t in zip(calls, y)]))
    return out


def warm_up(running: "servers.Running", bodies: Sequence[bytes], seconds: float) -> None:
    """`seconds` of bodies (cycling) at concurrency 16, then a fifth as long (at least 1 s) at concurrency 1."""
    if seconds <= 0 or not bodies:
        return
    running.burst(bodies, 16, seconds)
    running.burst(bodies, 1, max(1.0, seconds / 5))


def answer_stats(calls: list[Call], staged: Sequence[float], y: np.ndarray | None) -> dict[str, Any]:
    """What a burst's answers say beyond its latency: mean MFLOPs, budget violations, accuracy."""
    s = summarize(calls, 1.0, staged, y)
    return {k: s[k] for k in ("mean_mflops", "budget_violations", "accuracy") if k in s}


class InProcess:
    """(d): EarlyExitHandler.handle on batches of PNG bodies, with TorchServe's Context and metrics cache; one
    handler per onnxruntime thread count. Metric lines are not written anywhere (a worker prints them for the
    frontend), so this is the limit without TorchServe's own per-request work."""

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.folder, self.manifest = folder, manifest
        self._handlers: dict[int, tuple[Any, Any, Any]] = {}

    def _handler(self, threads: int) -> tuple[Any, Any, Any]:
        if threads not in self._handlers:
            from ts.context import Context
            from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

            from serving.handler import EarlyExitHandler

            cache = MetricsCacheYamlImpl(config_file_path=str(REPO / "serving" / "metrics.yaml"))
            cache.initialize_cache()
            cache.model_name = self.manifest.name
            logging.getLogger("ts.metrics.caching_metric").setLevel(logging.WARNING)  # metric lines go to stdout
            ctx = Context(self.manifest.name, str(self.folder), {"model": {"modelName": self.manifest.name}}, 64,
                          None, "0.12.0", metrics=cache, model_yaml_config={"handler": {"intra_op_threads": threads}})
            handler = EarlyExitHandler()
            handler.initialize(ctx)
            self._handlers[threads] = (handler, ctx, cache)
        return self._handlers[threads]

    def run(self, bodies: Sequence[bytes], batch_size: int, threads: int) -> tuple[dict[str, Any], list[Call]]:
        from ts.service import Service

        handler, ctx, cache = self._handler(threads)
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
            out = handler.handle(inputs, ctx)
            dt = time.perf_counter() - t0
            calls += [Call(ctx.get_response_status(j)[0], dt, o) for j, o in enumerate(out)]
        seconds = time.perf_counter() - started
        cpu = self_cpu_seconds() - cpu0
        calls = [replace(c, body=json.loads(c.body)) for c in calls]  # the handler's JSON text, read untimed
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
    assert _LOOP is not None, "_loop_init did not run"
    started = time.time()
    run, calls = _LOOP.run(bodies, batch_size, threads)
    return started, time.time(), len(calls), run["errors"], run["cpu"]["process_cpu_s"]


class ParallelInProcess:
    """`loops` in-process loops at once, each in its own process (one per server worker): what the machine
    answers without HTTP when every core runs the staged loop, the stricter limit once the server runs
    several workers. Children start with the first run (handler load included in none of the figures: call
    `run` once to warm up)."""

    def __init__(self, folder: Path, loops: int) -> None:
        self.loops = loops
        self.pool = ProcessPoolExecutor(loops, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_loop_init, initargs=(str(folder),))

    def run(self, bodies: Sequence[bytes], batch_size: int, threads: int) -> dict[str, Any]:
        """Every loop answers all of `bodies`; requests/s = all rows over the span from the first start to the
        last end."""
        spans = [f.result() for f in [self.pool.submit(_loop_run, bodies, batch_size, threads)
                                      for _ in range(self.loops)]]
        seconds = max(s[1] for s in spans) - min(s[0] for s in spans)
        rows = sum(s[2] for s in spans)
        return {"loops": self.loops, "requests": rows, "errors": sum(s[3] for s in spans), "seconds": round(seconds, 3),
                "requests_per_s": round(rows / seconds, 1) if seconds > 0 else None,
                "cpu": {"process_cpu_ms_per_request": round(sum(s[4] for s in spans) * 1000 / max(1, rows), 4)}}

    def close(self) -> None:
        self.pool.shutdown()


def http_vs_in_process(runs: Sequence[dict[str, Any]], batch_size: int, label: str = "early_exit_http",
                       concurrency: int = 16, paired: dict[str, Any] | None = None,
                       paired_parallel: dict[str, Any] | None = None) -> dict[str, Any]:
    """HTTP requests/s at `concurrency` over the in-process loop's at batch = the server's batchSize (the median
    of per-round ratios when `paired` is given, else the ratio of the runs' figures): the target's yardstick.
    With a server of several workers, also over as many loops at once (`in_process_parallel`, the stricter limit:
    the in-process loop on every core the workers use)."""
    http = next((r for r in runs if r["server"] == label and r["concurrency"] == concurrency), None)
    limit = next((r for r in runs if r["server"] == "in_process" and r.get("batch_size") == batch_size), None)
    value = ratio(http and http["requests_per_s"], limit and limit["requests_per_s"])
    if paired and paired.get("median") is not None:
        value = paired["median"]
    target = TARGETS["http_vs_in_process_c16"]
    return {"concurrency": concurrency, "http_requests_per_s": http and http["requests_per_s"],
            "in_process_requests_per_s": limit and limit["requests_per_s"], "in_process_batch_size": batch_size,
            "ratio": value, "per_round": (paired or {}).get("per_round"), "target": target,
            "meets_target": None if value is None else value >= target,
            "cpu": cpu_bound_estimate(http, limit), "against_parallel_loops": _against_parallel(runs, http, paired_parallel)}


def _against_parallel(runs: Sequence[dict[str, Any]], http: dict[str, Any] | None,
                      paired: dict[str, Any] | None) -> dict[str, Any] | None:
    limit = next((r for r in runs if r["server"] == PARALLEL), None)
    if limit is None:
        return None
    value = (paired or {}).get("median") or ratio(http and http["requests_per_s"], limit["requests_per_s"])
    return {"loops": limit.get("loops"), "in_process_requests_per_s": limit["requests_per_s"], "ratio": value,
            "per_round": (paired or {}).get("per_round")}


def cpu_bound_estimate(http: dict[str, Any] | None, limit: dict[str, Any] | None,
                       cores: int | None = None) -> dict[str, Any] | None:
    """The same ratio from CPU time instead of wall time, which other jobs on a shared machine disturb much less:
    CPU ms per request over HTTP (client + TorchServe's processes) and in process (one thread), and the ratio both
    would reach if CPU were the only limit: HTTP spreading over every core, the in-process loop on one."""
    cores = cores or os.cpu_count() or 1
    h = ((http or {}).get("cpu_ms_per_request") or {})
    p = ((limit or {}).get("cpu_ms_per_request") or {})
    if "server" not in h or "process" not in p:
        return None
    http_ms = h["server"] + h.get("client", 0.0)
    return {"http_ms_per_request": round(http_ms, 4), "http_server_ms_per_request": h["server"],
            "http_client_ms_per_request": h.get("client"), "in_process_ms_per_request": p["process"],
            "cores": cores, "ratio_if_cpu_bound": round(cores * p["process"] / http_ms, 3) if http_ms else None,
            "note": "wall-time ratio on a quiet machine tends to this; the client's share goes away when clients "
                    "run elsewhere"}


# ------------------------------------------------------------------------------------------ settings sweep
class SettingsSweep:
    """Compares settings side by side: a fresh server per setting (the archive rewritten with its model-config,
    config.properties keys over ours), all warmed up alike, then `rounds` rounds of a concurrency-16 burst and a
    concurrency-1 burst per server, order alternating, plus the in-process loop with the candidate's batch size
    and threads. Fresh servers on both sides, because a server that has run longer has a warmer JIT: kept alive
    as the reference, it beat fresh copies of its own setting by 10-35% here. At most two servers run at once."""

    def __init__(self, archive: Path, folder: Path, manifest: Manifest, work: Path, bodies: list[bytes],
                 warmup_s: float, rounds: int, burst_s: float, c1_s: float = 0.0) -> None:
        self.archive, self.folder, self.manifest, self.work = archive, folder, manifest, work
        self.bodies, self.warmup_s, self.rounds, self.burst_s, self.c1_s = bodies, warmup_s, rounds, burst_s, c1_s
        self.limit = InProcess(folder, manifest)

    def close(self) -> None:
        """Nothing outlives a comparison (kept for symmetry with callers that always close)."""

    def in_process(self, setting: sweep.Setting) -> dict[str, Any]:
        return self.limit.run(self.bodies, setting.batch_size, setting.intra_op_threads)[0]

    def interleaved(self, settings: Sequence[sweep.Setting], rounds: int, with_in_process: bool = False,
                    c1: bool = False) -> list[dict[str, Any]]:
        """One fresh server per entry of `settings` (an entry may repeat: an A/A control), warmed up alike; then
        `rounds` rounds of one concurrency-16 burst each (order alternating), with_in_process one in-process burst
        right after each HTTP burst, with c1 a concurrency-1 burst right after each concurrency-16 burst. Returns per
        entry {"http": [runs], "in_process": [runs], "c1": [runs]}."""
        out: list[dict[str, Any]] = [{"http": [], "in_process": [], "c1": []} for _ in settings]
        live: list[servers.Running] = []
        try:
            targets = []
            for s in settings:
                archive = sweep.rewrite_model_config(self.archive, self.work / s.label() / self.archive.name,
                                                     s.model_config)
                targets.append(servers.Target(s.label(), archive, s.server_config()))
            live = servers.start_all(targets, self.work)
            for running in live:
                warm_up(running, self.bodies, self.warmup_s)
            for i in range(rounds):
                for j in (range(len(settings)) if i % 2 == 0 else reversed(range(len(settings)))):
                    out[j]["http"].append(live[j].burst(self.bodies, 16, self.burst_s))
                    if c1 and self.c1_s > 0:
                        out[j]["c1"].append(live[j].burst(self.bodies, 1, self.c1_s))
                    if with_in_process:
                        out[j]["in_process"].append(self.in_process(settings[j]))
        finally:
            for running in live:
                running.stop()
        return out

    def __call__(self, candidate: sweep.Setting, reference: sweep.Setting) -> dict[str, Any]:
        ref_got, cand_got = self.interleaved([reference, candidate], self.rounds, c1=True)
        cand, ref = cand_got["http"], ref_got["http"]
        m, mr = servers.medians(cand), servers.medians(ref)
        row = {"requests": m["requests"], "errors": m["errors"], "requests_per_s": m["requests_per_s"],
               "p50_ms": m["p50_ms"], "p99_ms": m["p99_ms"], "reference_requests_per_s": mr["requests_per_s"],
               "paired_ratio": servers.paired_ratio(cand, ref)["median"],
               "cpu_ms_per_request": m.get("cpu_ms_per_request")}
        if cand_got["c1"] and ref_got["c1"]:
            c1, ref_c1 = servers.medians(cand_got["c1"]), servers.medians(ref_got["c1"])
            row.update(c1_requests_per_s=c1["requests_per_s"], c1_p50_ms=c1["p50_ms"], c1_p99_ms=c1["p99_ms"],
                       reference_c1_p50_ms=ref_c1["p50_ms"])
            row["errors"] += c1["errors"]
        limit = self.in_process(candidate)
        estimate = cpu_bound_estimate(m, servers.medians([limit]))
        row.update(in_process_requests_per_s=limit["requests_per_s"],
                   http_vs_in_process=ratio(row["requests_per_s"], limit["requests_per_s"]),
                   http_vs_in_process_if_cpu_bound=estimate and estimate["ratio_if_cpu_bound"])
        log.info("sweep %s vs %s: %s", candidate.label(), reference.label(), row)
        return row

    def control(self, base: sweep.Setting) -> dict[str, Any]:
        """A/A: two fresh servers with the same setting; how far from 1.0 their paired ratio lands is the noise
        floor of one comparison on this machine now."""
        a, b = self.interleaved([base, base], self.rounds)
        return {"setting": base.label(), "paired_ratio": servers.paired_ratio(b["http"], a["http"]),
                "requests_per_s": [servers.medians(a["http"])["requests_per_s"],
                                   servers.medians(b["http"])["requests_per_s"]]}

    def confirm(self, base: sweep.Setting, best: sweep.Setting, rounds: int) -> dict[str, Any]:
        """Base and best side by side again (fresh), each with its in-process limit right after its HTTP burst."""
        settings = [base] if best == base else [base, best]
        got = self.interleaved(settings, rounds, with_in_process=True, c1=True)
        by = {"base": got[0], "best": got[-1]}
        out: dict[str, Any] = {}
        for which, s in (("base", base), ("best", best)):
            http, limit = by[which]["http"], by[which]["in_process"]
            m_http, m_limit = servers.medians(http), servers.medians(limit)
            out[which] = {"setting": s.to_dict(), "label": s.label(), "http": m_http, "in_process": m_limit,
                          "c1": servers.medians(by[which]["c1"]) if by[which]["c1"] else None,
                          "http_vs_in_process": servers.paired_ratio(http, limit),
                          "cpu": cpu_bound_estimate(m_http, m_limit)}
        out["best_over_base"] = servers.paired_ratio(by["best"]["http"], by["base"]["http"])
        return out


def settings_sweep(measure: Any, base: sweep.Setting, axes: dict[str, Sequence[Any]], confirm_rounds: int,
                   min_gain: float, max_c1_p50_increase: float = 0.25) -> dict[str, Any]:
    """An A/A control, the coordinate sweep (paired comparisons), then base and best confirmed A/B/A/B with the
    in-process limit measured beside each; the recommendation stands only if the confirmation repeats the gain.
    A gain must exceed both min_gain and the A/A control's distance from 1 (the noise floor right now)."""
    control = measure.control(base) if hasattr(measure, "control") else None
    noise = abs(1.0 - control["paired_ratio"]["median"]) if control and control["paired_ratio"]["median"] else 0.0
    gain_needed = round(max(min_gain, noise), 3)
    best, rows = sweep.coordinate_sweep(base, axes, measure, gain_needed, max_c1_p50_increase)
    confirm = measure.confirm(base, best, confirm_rounds)
    gain = confirm["best_over_base"]["median"]
    c1 = {which: (confirm[which].get("c1") or {}).get("p50_ms") for which in ("base", "best")}
    confirmed = best != base and gain is not None and sweep.wins(
        {"errors": 0, "paired_ratio": gain, "c1_p50_ms": c1["best"], "reference_c1_p50_ms": c1["base"]},
        gain_needed, max_c1_p50_increase)
    chosen = best if confirmed else base
    chosen_confirm = confirm["best" if confirmed else "base"]
    chosen_ratio = chosen_confirm["http_vs_in_process"]["median"]
    target = TARGETS["http_vs_in_process_c16"]
    return {
        "objective": "requests/s at concurrency 16 (HTTP, early exit at the default budget), no errors; each "
                     "candidate against the best so far, interleaved",
        "min_gain": min_gain, "gain_needed": gain_needed, "max_c1_p50_increase": max_c1_p50_increase,
        "axes": {k: list(v) for k, v in axes.items()}, "base": base.to_dict(),
        "noise_control": control, "rows": rows, "sweep_best": best.to_dict(), "confirm": confirm,
        "best_over_base": gain,
        "confirmed": confirmed, "chosen": chosen.to_dict(), "chosen_label": chosen.label(),
        "http_vs_in_process_c16": {"ratio": chosen_ratio, "target": target,
                                   "meets_target": None if chosen_ratio is None else chosen_ratio >= target,
                                   "cpu": chosen_confirm.get("cpu")},
        "recommended_defaults": sweep.recommendation(base, chosen),
    }


# -------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bench_serve", description=__doc__.splitlines()[0])
    p.add_argument("--archive", type=Path, default=REPO / "model_store" / "mnist.mar")
    p.add_argument("--data-dir", type=Path, default=REPO / "data")
    p.add_argument("--limit", type=int, help="use the first N test images (default: all)")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds: every server (and the in-process loop) gets one burst per round and "
                        "concurrency; medians and per-round ratios are reported (3 rounds left c=1 ratios spread "
                        "over +-4%%)")
    p.add_argument("--burst-seconds", type=float, default=4.0,
                   help="length of each timed wrk burst at concurrency > 1 (bench/wrk.py)")
    p.add_argument("--c1-seconds", type=float, default=6.0, help="length of each timed wrk burst at concurrency 1")
    p.add_argument("--c1-requests", type=int, default=1000,
                   help="images in each in-process batch-1 run (the concurrency-1 limit)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--sweep-requests", type=int, default=2000, help="images per calibrated budget in the sweep")
    p.add_argument("--warmup-seconds", type=float, default=6.0,
                   help="wrk load sent to each server (concurrency 16, then a fifth as long at 1) before measuring: "
                        "the frontend's JIT compiles for the first thousands of requests and would bill the first "
                        "rounds (measured: c=16 throughput still rose by a third between the 2000th and 10000th "
                        "request; 6 s is ~20000 requests)")
    p.add_argument("--no-stock", action="store_true", help="skip the stock TorchServe baseline")
    p.add_argument("--stock-no-spin", action="store_true",
                   help="also serve the stock baseline with onnxruntime's thread-pool spinning off "
                        "(bench/stock_onnx_no_spin_handler.py): what the stock server's busy-waiting buys at c=1")
    p.add_argument("--sweep-settings", action="store_true",
                   help="also sweep the server's settings at concurrency 16 (bench/sweep.py)")
    p.add_argument("--sweep-only", action="store_true", help="the settings sweep alone (implies --sweep-settings)")
    p.add_argument("--settings-requests", type=int, default=3000,
                   help="images the sweep sends (cycling) and runs in process")
    p.add_argument("--settings-seconds", type=float, default=3.0,
                   help="length of each concurrency-16 burst in the sweep (a few seconds: shorter bursts are noise)")
    p.add_argument("--settings-rounds", type=int, default=3, help="bursts per setting in each sweep comparison")
    p.add_argument("--settings-c1-seconds", type=float, default=2.0,
                   help="length of each setting's concurrency-1 burst (reported beside, not optimized; 0 skips)")
    p.add_argument("--sweep-axis", action="append", default=[], metavar="NAME=V1,V2",
                   help=f"sweep only these axes, in this order (repeatable; names: {', '.join(sweep.AXIS_NAMES)})")
    p.add_argument("--confirm-rounds", type=int, default=4, help="A/B rounds of base against the sweep's best")
    p.add_argument("--min-gain", type=float, default=0.05,
                   help="relative gain a setting needs to win (raised to the A/A control's noise when that is larger)")
    p.add_argument("--max-c1-p50-increase", type=float, default=0.25,
                   help="a setting whose concurrency-1 p50 exceeds the reference's by more than this never wins")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="default bench/results/serve-<dataset>.json")
    p.add_argument("--note", default="", help="free text stored in the result (e.g. which checkpoint)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("serving.server").setLevel(logging.WARNING)
    from training.data import Split, load_tensors  # the bench, not serving, may use training's data loader

    if not args.archive.is_file():
        p.error(f"{args.archive} does not exist: run `make train-export` first")
    try:
        axes = sweep.parse_axes(args.sweep_axis) if args.sweep_axis else dict(sweep.AXES)
    except ValueError as exc:
        p.error(str(exc))
    if args.rounds < 1 or args.confirm_rounds < 1 or args.settings_rounds < 1:
        p.error("rounds must be at least 1")
    try:
        load_generator = wrk.version()
    except wrk.WrkMissing as exc:
        p.error(str(exc))
    do_sweep = args.sweep_settings or args.sweep_only
    seed_everything(args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        folder = work / "model"
        manifest, model_config = unpack(args.archive, folder)
        x, y = load_tensors(manifest.dataset, args.data_dir, Split.TEST, limit=args.limit)
        x, y = x.numpy().astype(np.float32), y.numpy()
        bodies = png_bodies(x)
        result = result_header("serve", args.seed, args.note)
        result["load_generator"] = {
            "timing": f"{load_generator}, one thread, persistent connections, closed loop (bench/wrk.py, "
                      "bench/wrk_bodies.lua); bodies in order, cycling; statuses counted, answers not read",
            "answers": "this project's Python client (bench/common.py load, 16 threads, http.client) in a separate "
                       "pass per server: the answers, exits and budgets checked"}
        result["model"] = {"archive": str(args.archive), "name": manifest.name, "version": manifest.version,
                           "dataset": manifest.dataset, "cost": manifest.cost.to_dict(),
                           "default_budget_mflops": manifest.default_budget_mflops,
                           "calibrated_budgets_mflops": sorted({r.budget_mflops for r in manifest.calibration})}
        result["targets"] = {"stock_throughput_ratio": {f"c{c}": t for c, t in
                                                        TARGETS["stock_throughput_ratio"].items()},
                             "http_vs_in_process_c16": TARGETS["http_vs_in_process_c16"]}
        if not args.sweep_only:
            result.update(standard_runs(args, work, folder, manifest, model_config, x, y, bodies))
        if do_sweep:
            n = min(args.settings_requests, len(bodies))
            measure = SettingsSweep(args.archive, folder, manifest, work / "sweep", bodies[:n], args.warmup_seconds,
                                    args.settings_rounds, args.settings_seconds, args.settings_c1_seconds)
            try:
                result["settings_sweep"] = {
                    "images": n, "seconds_per_burst": args.settings_seconds,
                    "rounds_per_comparison": args.settings_rounds, "concurrency": 16,
                    **settings_sweep(measure, sweep.Setting.from_model_config(model_config), axes,
                                     args.confirm_rounds, args.min_gain, args.max_c1_p50_increase)}
            finally:
                measure.close()
        suffix = "-sweep" if args.sweep_only else ""
        out = args.out or RESULTS / f"serve-{manifest.dataset}{suffix}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
        report(result)
        print(f"wrote {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


EARLY, STOCK, FULL = "early_exit_http", "stock_torchserve", "full_graph_http"
STOCK_NO_SPIN = "stock_torchserve_no_spin"  # --stock-no-spin: the explanation of the concurrency-1 figure
PARALLEL = "in_process_parallel"  # one in-process loop per server worker, at once


def standard_runs(args: argparse.Namespace, work: Path, folder: Path, manifest: Manifest,
                  model_config: dict[str, Any], x: np.ndarray, y: np.ndarray, bodies: list[bytes]) -> dict[str, Any]:
    """(a)-(d) at the archive's own settings in interleaved rounds, the budget sweep, accuracy and compute."""
    threads = int((model_config.get("handler") or {}).get("intra_op_threads", 1))
    batch_size = int(model_config.get("batchSize", 1))
    c1 = min(args.c1_requests, len(bodies))
    sweep_n = min(args.sweep_requests, len(bodies))
    default_budget = manifest.default_budget_mflops
    budgets = sorted({row.budget_mflops for row in manifest.calibration})
    runner = StagedRunner.from_folder(manifest, folder, intra_op_threads=2)
    offline = offline_policy(runner, x, y, default_budget)
    staged = manifest.staged_mflops
    full_cost = manifest.full_graph.mflops if manifest.full_graph else manifest.cost.full
    full_graph_costs = [full_cost] * manifest.num_exits  # full-graph answers all cost the full network

    targets = [servers.Target(EARLY, args.archive)]
    sent = {EARLY: bodies, FULL: bodies}
    costs = {EARLY: staged, FULL: full_graph_costs, STOCK: full_graph_costs, STOCK_NO_SPIN: full_graph_costs}
    stock_info: dict[str, Any] = {"skipped": True}
    if not args.no_stock and manifest.full_graph is not None:
        full_onnx = stock.extract_full_graph(args.archive, work / "full.onnx", manifest.full_graph.file)
        stock_mar = stock.build_stock_archive(full_onnx, model_config, work / "stock-archive", f"{manifest.name}_stock")
        parse = (lambda body: stock.parse_answer(body, manifest.num_exits, full_cost))
        targets.append(servers.Target(STOCK, stock_mar, stock.SERVER_CONFIG, parse))
        sent[STOCK] = stock.json_bodies(x)
        if args.stock_no_spin:
            no_spin_mar = stock.build_stock_archive(full_onnx, model_config, work / "stock-no-spin-archive",
                                                   f"{manifest.name}_stock_no_spin", stock.NO_SPIN_HANDLER)
            targets.append(servers.Target(STOCK_NO_SPIN, no_spin_mar, stock.SERVER_CONFIG, parse))
            sent[STOCK_NO_SPIN] = sent[STOCK]
        stock_info = {
            "handler": "bench/stock_onnx_handler.py: BaseHandler with inference = session.run (base_handler alone "
                       "fails: 'InferenceSession' object is not callable)",
            "serialized_file": manifest.full_graph.file, "model_config": stock.stock_model_config(model_config),
            "server_config_over_ours": stock.SERVER_CONFIG, "input": stock.INPUT_FORM,
            "onnxruntime_intra_op_threads": "psutil.cpu_count(logical=True) (BaseHandler's setup_ort_session)",
            "answer": '{"predictions": [[logits]]}; class = argmax',
            "no_spin_variant": f"{STOCK_NO_SPIN}: bench/stock_onnx_no_spin_handler.py, the same with onnxruntime's "
                               "session.intra_op.allow_spinning=0" if args.stock_no_spin else None,
        }
    if manifest.full_graph is not None:
        targets.append(servers.Target(FULL, full_graph_archive(args.archive, work / "full-archive" / args.archive.name)))
    labels = [t.label for t in targets]
    c_high = max(args.concurrency)
    limit = InProcess(folder, manifest)
    workers = int(model_config.get("minWorkers", 1))
    parallel = ParallelInProcess(folder, workers) if workers > 1 and c_high > 1 else None
    per: dict[tuple[str, int], list[dict[str, Any]]] = {}
    first: dict[str, list[Call]] = {}
    swept: dict[float, list[Call]] = {}
    checked: dict[str, dict[str, Any]] = {}
    with servers.serving(targets, work / "servers") as live, contextlib.ExitStack() as stack:
        if parallel is not None:
            stack.callback(parallel.close)
            parallel.run(bodies[:batch_size * 10], batch_size, threads)  # the children load their handlers
        for label in labels:
            warm_up(live[label], sent[label], args.warmup_seconds)
        for round_ in tqdm(range(args.rounds), desc="bench-serve rounds", unit="round"):
            order = labels if round_ % 2 == 0 else list(reversed(labels))
            for c in args.concurrency:
                for label in order:
                    run = live[label].burst(sent[label], c, args.c1_seconds if c == 1 else args.burst_seconds)
                    per.setdefault((label, c), []).append(run)
                    log.info("round %d %s c=%d: %s", round_ + 1, label, c,
                             {k: run[k] for k in ("requests", "requests_per_s", "p50_ms", "p99_ms", "errors")})
                n = len(bodies) if c > 1 else c1
                b = 1 if c == 1 else batch_size
                run, calls = limit.run(bodies[:n], b, threads)
                run.update(answer_stats(calls, staged, y[:n]))
                per.setdefault(("in_process", c), []).append(run)
                if parallel is not None and c == c_high:
                    per.setdefault((PARALLEL, c), []).append(parallel.run(bodies, batch_size, threads))
        for label in labels:  # the answers: every test image once through the Python client
            run, first[label] = live[label].run(sent[label], c_high)
            checked[label] = {**run, **answer_stats(first[label], costs[label], y)}
            log.info("answer check %s c=%d: %s", label, c_high,
                     {k: checked[label].get(k) for k in ("requests_per_s", "errors", "accuracy", "budget_violations")})
        for budget in budgets:
            swept[budget], _ = load(live[EARLY].server.inference_url, live[EARLY].server.models[0], live[EARLY].token,
                                    bodies[:sweep_n], max(args.concurrency), budget)

    runs = []
    for (label, c), rs in per.items():
        answers = rs[0] if label in ("in_process", PARALLEL) else checked[label]
        row = {"server": label, "concurrency": c, **servers.medians(rs),
               **{k: answers.get(k) for k in ("mean_mflops", "accuracy")}}
        if label == PARALLEL:
            row.update(loops=rs[0]["loops"], batch_size=batch_size, intra_op_threads=threads)
        if label == "in_process":
            row.update(batch_size=1 if c == 1 else batch_size, intra_op_threads=threads,
                       budget_violations=int(sum(r.get("budget_violations", 0) for r in rs)))
        runs.append(row)
    order_key = {EARLY: 0, STOCK: 1, STOCK_NO_SPIN: 2, FULL: 3, "in_process": 4, PARALLEL: 5}
    runs.sort(key=lambda r: (order_key[r["server"]], r["concurrency"]))
    early_runs = [r for r in runs if r["server"] == EARLY]

    def against(baseline: str, targets: dict[int, float]) -> list[dict[str, Any]]:
        """stock.compare of the early-exit server with `baseline`, per concurrency, with per-round ratios."""
        paired = {c: servers.paired_ratio(per[(EARLY, c)], per[(baseline, c)]) for c in args.concurrency
                  if (baseline, c) in per}
        rows = stock.compare(early_runs, [r for r in runs if r["server"] == baseline], targets,
                             {c: p["median"] for c, p in paired.items()})
        for row in rows:
            row["throughput_ratio_per_round"] = paired[row["concurrency"]]["per_round"]
        return rows

    vs_stock = against(STOCK, TARGETS["stock_throughput_ratio"])
    vs_no_spin = against(STOCK_NO_SPIN, {})
    paired_limit = servers.paired_ratio(per[(EARLY, c_high)], per[("in_process", c_high)]) \
        if c_high > 1 else None
    paired_parallel = servers.paired_ratio(per[(EARLY, c_high)], per[(PARALLEL, c_high)]) \
        if (PARALLEL, c_high) in per else None

    early_calls = first.get(EARLY, [])
    http_pred = np.array([c.body["class_index"] if c.status == 200 else -1 for c in early_calls])
    http_exits = np.array([c.body["exit_index"] - 1 if c.status == 200 else -1 for c in early_calls])
    stock_calls = first.get(STOCK)
    stock_pred = None if stock_calls is None else np.array(
        [c.body["class_index"] if c.status == 200 and c.body else -1 for c in stock_calls])
    full_offline = None
    if manifest.full_graph is not None and stock_pred is not None:
        from early_exit.runner import FullGraphRunner
        fg = FullGraphRunner.from_folder(manifest, folder, intra_op_threads=2)
        full_offline = np.concatenate([fg.run(x[i:i + 256]).probs.argmax(-1) for i in range(0, len(x), 256)])
    sweep_rows = []
    for budget in budgets:
        calls = swept[budget]
        ref = offline_policy(runner, x[:sweep_n], y[:sweep_n], budget)
        s = summarize(calls, 1.0, staged, y[:sweep_n])
        sweep_rows.append({
            "budget_mflops": budget, "requests": sweep_n, "errors": s["errors"],
            "http_accuracy": s["accuracy"], "offline_accuracy": ref["accuracy"],
            "http_mean_mflops": s["mean_mflops"], "offline_mean_mflops": round(ref["mean_mflops"], 4),
            "answers_differing": int(sum(1 for c, pr in zip(calls, ref["pred"])
                                         if c.status != 200 or c.body["class_index"] != pr)),
            "budget_violations": s["budget_violations"],
            "max_exit_used": max((c.body["exit_index"] for c in calls if c.status == 200), default=None),
        })
    return {
        "settings": {"test_images": len(y), "rounds": args.rounds, "concurrency_1_requests_per_round": c1,
                     "input": f"{EARLY} / {FULL}: PNG over HTTP, token auth on; {STOCK}: " + stock.INPUT_FORM,
                     "batch_size": batch_size, "max_batch_delay_ms": model_config.get("maxBatchDelay"),
                     "workers": model_config.get("minWorkers"), "intra_op_threads": threads,
                     "handler_options": model_config.get("handler"),
                     "interleaving": "all servers up at once (idle ones use no CPU); each round sends one burst per "
                                     "server and concurrency, then one in-process burst; figures are medians over "
                                     "rounds, ratios are medians of per-round ratios",
                     "in_process": "concurrency 1 = batches of 1; concurrency 16 = batches of batchSize "
                                   "(the largest batch the server forms)",
                     "cpu": "client: this process (the client threads); frontend: TorchServe's Java process; "
                            "workers: its Python workers (from /proc)",
                     "note": "client threads and TorchServe share this machine's CPU cores"},
        "stock_baseline": stock_info,
        "runs": runs,
        "early_exit_vs_stock": vs_stock,
        "early_exit_vs_stock_no_spin": vs_no_spin or None,
        "http_vs_in_process": http_vs_in_process(runs, batch_size, EARLY, c_high, paired_limit, paired_parallel),
        "accuracy": {
            "http_early_exit": float((http_pred == y).mean()) if len(http_pred) == len(y) else None,
            "offline_same_policy": offline["accuracy"],
            "answers_differing_from_offline": int((http_pred != offline["pred"]).sum()) if len(http_pred) == len(y)
            else None,
            "exits_differing_from_offline": int((http_exits != offline["exits"]).sum()) if len(http_exits) == len(y)
            else None,
            "offline_exit_histogram": np.bincount(offline["exits"], minlength=manifest.num_exits).tolist(),
            "http_full_graph": float(np.mean([c.status == 200 and c.body["class_index"] == t
                                              for c, t in zip(first[FULL], y)])) if len(first.get(FULL, [])) == len(y)
            else None,
            "http_stock": float((stock_pred == y).mean()) if stock_pred is not None else None,
            "stock_answers_differing_from_offline_full_graph":
                int((stock_pred != full_offline).sum()) if full_offline is not None else None,
        },
        "compute": {"mean_mflops_per_request_http": float(np.mean([c.body["mflops_spent"] for c in early_calls
                                                                   if c.status == 200])) if early_calls else None,
                    "mean_mflops_offline": offline["mean_mflops"], "full_network_mflops": full_cost,
                    "staged_full_depth_mflops": staged[-1],
                    "saving_vs_full_network": 1.0 - offline["mean_mflops"] / full_cost,
                    "unit": "staged MFLOPs per request (stages and heads run); the full network runs no early "
                            "heads"},
        "python_client_c16": python_client_figures(checked, runs, c_high),
        "budget_violations": sum(r.get("budget_violations", 0) for r in runs) + sum(
            r["budget_violations"] for r in [*checked.values(), *sweep_rows]),
        "budget_sweep": sweep_rows,
    }


def python_client_figures(checked: dict[str, dict[str, Any]], runs: Sequence[dict[str, Any]], concurrency: int
                          ) -> dict[str, Any]:
    """What the answer-check pass (one pass per server, this project's Python client sharing the cores) measured:
    the yardstick before wrk, kept beside it. Ratios of single passes, not medians over rounds."""
    limit = next((r for r in runs if r["server"] == "in_process" and r["concurrency"] == concurrency), None)
    rate = {label: c["requests_per_s"] for label, c in checked.items()}
    return {"concurrency": concurrency, "note": "one pass per server after the timed rounds; the client's CPU is "
                                                "billed to the server's wall time",
            "servers": {label: {k: c.get(k) for k in ("requests", "requests_per_s", "p50_ms", "p99_ms", "errors")}
                        | {"client_cpu_ms_per_request": (c.get("cpu") or {}).get("client_cpu_ms_per_request")}
                        for label, c in checked.items()},
            "early_exit_vs_stock": ratio(rate.get(EARLY), rate.get(STOCK)),
            "http_vs_in_process": ratio(rate.get(EARLY), limit and limit["requests_per_s"])}


def report(result: dict[str, Any]) -> None:
    """The headline figures on stdout."""
    if "accuracy" in result:
        print(json.dumps({k: result[k] for k in ("accuracy", "compute", "budget_violations")}, indent=2))
    for r in result.get("runs", []):
        latency = "" if r["p50_ms"] is None else f"  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms"
        print(f"{r['server']:24s} c={r['concurrency']:<3d} {r['requests_per_s']:8.1f} req/s{latency}  errors "
              f"{r['errors']}  MFLOPs {r['mean_mflops']}  (median of {r['rounds']} rounds)")
    for key, name in (("early_exit_vs_stock", "stock TorchServe"), ("early_exit_vs_stock_no_spin", "stock, no spin")):
        for row in result.get(key) or []:
            print(f"early exit / {name} at c={row['concurrency']}: {row['throughput_ratio']}x requests/s "
                  f"(per round {row['throughput_ratio_per_round']}, target {row['target_throughput_ratio']}), "
                  f"p50 {row['early_exit_p50_ms']} vs {row['stock_p50_ms']} ms, p99 {row['early_exit_p99_ms']} vs "
                  f"{row['stock_p99_ms']} ms, server CPU {row['early_exit_server_cpu_ms_per_request']} vs "
                  f"{row['stock_server_cpu_ms_per_request']} ms per request")
    if "http_vs_in_process" in result:
        h = result["http_vs_in_process"]
        print(f"HTTP / in-process at c={h['concurrency']}: {h['ratio']} (per round {h['per_round']}, target {h['target']})"
              + (f"; from CPU time: {h['cpu']['ratio_if_cpu_bound']} ({h['cpu']['http_ms_per_request']} ms per HTTP "
                 f"request, {h['cpu']['in_process_ms_per_request']} ms in process)" if h.get("cpu") else ""))
        if h.get("against_parallel_loops"):
            a = h["against_parallel_loops"]
            print(f"HTTP / {a['loops']} in-process loops at once: {a['ratio']} (per round {a['per_round']}; "
                  f"{a['in_process_requests_per_s']} req/s in process)")
    pc = result.get("python_client_c16")
    if pc:
        print(f"with the Python client instead of wrk (one pass, c={pc['concurrency']}): early exit / stock "
              f"{pc['early_exit_vs_stock']}x, HTTP / in-process {pc['http_vs_in_process']}")
    s = result.get("settings_sweep")
    if s:
        if s.get("noise_control"):
            print(f"sweep A/A control ({s['noise_control']['setting']} against itself): "
                  f"x{s['noise_control']['paired_ratio']['median']}; a gain must reach x{1 + s['gain_needed']:.3f}")
        for row in s["rows"]:
            print(f"sweep {row['label']:24s} vs {row['reference']:16s} x{row['paired_ratio']}  c16 "
                  f"{row['requests_per_s']:7.1f} req/s p99 {row['p99_ms']:6.1f} ms  c1 p50 "
                  f"{row.get('c1_p50_ms', float('nan')):5.2f} ms  HTTP/in-process {row['http_vs_in_process']} "
                  f"(CPU-bound {row.get('http_vs_in_process_if_cpu_bound')})  "
                  f"errors {row['errors']}{'  <- won' if row['won'] else ''}")
        c = s["confirm"]
        print(f"sweep: best {c['best']['label']} = {s['best_over_base']}x base {c['base']['label']} "
              f"({'confirmed' if s['confirmed'] else 'not confirmed'}); chosen {s['chosen_label']}: HTTP/in-process "
              f"at c=16 {s['http_vs_in_process_c16']['ratio']} (target {s['http_vs_in_process_c16']['target']}; "
              f"CPU-bound {(s['http_vs_in_process_c16'].get('cpu') or {}).get('ratio_if_cpu_bound')}); "
              f"recommended {json.dumps(s['recommended_defaults'])}")


if __name__ == "__main__":
    raise SystemExit(main())
