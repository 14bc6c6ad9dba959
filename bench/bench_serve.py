"""`make bench-serve`: the early-exit server against a full-graph server and the in-process upper bound.

On an MNIST archive (default model_store/mnist.mar from `make train-export`) and the MNIST test set sent
as PNG over HTTP (token auth on, loopback):
  (a) early_exit_http   TorchServe + serving/handler.py, staged early exit at the default budget
  (b) full_graph_http   the same server and archive with handler mode full_graph_only (full.onnx)
  (c) in_process        the same handler called in-process (TorchServe's Context, no HTTP, no frontend):
                        the staged onnxruntime loop plus decoding, batch 1 and batch = the archive's batchSize
at concurrency 1 and 16: requests/s, p50/p99 latency, mean staged MFLOPs per request. Answers through HTTP
are compared row for row with the offline answers of the same staged runner (early_exit/runner.py) on the
same graphs, per calibrated budget too; budget violations are counted against the staged cost of the exit
that answered (stages and heads 1..k, taken from the manifest's cost profile, not from the response).
Client threads and the server share the machine's cores: figures are for this machine only.
Writes bench/results/serve-<dataset>.json.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml
from PIL import Image

from bench.common import machine, now, versions
from early_exit.manifest import Manifest, load_manifest, verify_files
from early_exit.policy import entry_for_budget
from early_exit.runner import StagedRunner
from serving.client import Client
from serving.server import KeyKind, Ports, start_server

log = logging.getLogger("bench.serve")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MODEL_CONFIG = "model-config.yaml"


@dataclass
class Call:
    status: int | None
    latency_s: float
    body: dict[str, Any] | None


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
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == MODEL_CONFIG:
                config = yaml.safe_load(data) or {}
                config.setdefault("handler", {})["mode"] = "full_graph_only"
                data = yaml.safe_dump(config, sort_keys=False).encode()
            dst.writestr(item, data)
    return out


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


def violations(calls: list["Call"], staged: Sequence[float]) -> int:
    """Answers whose exit's staged cost (from the manifest) exceeds the budget applied, or whose reported
    spend differs from that staged cost."""
    ok = [c for c in calls if c.status == 200 and c.body]
    return sum(1 for c in ok if staged[c.body["exit_index"] - 1] > c.body["budget_mflops"] + 1e-9
               or abs(c.body["mflops_spent"] - staged[c.body["exit_index"] - 1]) > 1e-9 * staged[-1])


def load(url: str, model: str, token: str | None, bodies: Sequence[bytes], concurrency: int,
         budget: float | None = None) -> tuple[list[Call], float]:
    """Send every body once with `concurrency` client threads (persistent connections); answers in order."""
    calls: list[Call | None] = [None] * len(bodies)
    counter = iter(range(len(bodies)))
    lock = threading.Lock()

    def worker() -> None:
        client = Client(url, model, token, timeout=60)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                started = time.perf_counter()
                try:
                    r = client.predict(bodies[i], budget)
                    calls[i] = Call(r.status, time.perf_counter() - started, r.body if isinstance(r.body, dict) else None)
                except OSError as exc:
                    log.warning("request %d failed: %s", i, exc)
                    calls[i] = Call(None, time.perf_counter() - started, None)
        finally:
            client.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return [c for c in calls if c is not None], time.perf_counter() - started


def summarize(calls: list[Call], seconds: float, staged: Sequence[float], y: np.ndarray | None = None
              ) -> dict[str, Any]:
    ok = [c for c in calls if c.status == 200 and c.body]
    lat = np.array([c.latency_s for c in calls]) * 1000
    out: dict[str, Any] = {
        "requests": len(calls), "errors": len(calls) - len(ok), "seconds": round(seconds, 3),
        "requests_per_s": round(len(calls) / seconds, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3), "p99_ms": round(float(np.percentile(lat, 99)), 3),
        "mean_mflops": round(float(np.mean([c.body["mflops_spent"] for c in ok])), 4) if ok else None,
        "budget_violations": violations(calls, staged),
    }
    if y is not None and len(calls) == len(y):
        out["accuracy"] = float(np.mean([c.status == 200 and c.body["class_index"] == t for c, t in zip(calls, y)]))
    return out


def http_runs(label: str, archive: Path, state: Path, bodies: list[bytes], y: np.ndarray, staged: Sequence[float],
              c1_requests: int,
              concurrency: Sequence[int], warmup: int, sweep: Sequence[float] = (), sweep_requests: int = 0,
              ) -> tuple[list[dict[str, Any]], dict[float, list[Call]], list[Call]]:
    """Start a server on `archive`, run the concurrency levels (and an optional budget sweep), stop it."""
    store = state / "store"
    store.mkdir(parents=True)
    shutil.copy(archive, store / archive.name)
    server = start_server(store, [archive.name], state / "serve", Ports.free())
    runs, swept, full_calls = [], {}, []
    try:
        token, model = server.key(KeyKind.INFERENCE), server.models[0]
        load(server.inference_url, model, token, bodies[:warmup], max(concurrency))
        for c in concurrency:
            subset = bodies if c > 1 else bodies[:c1_requests]
            calls, seconds = load(server.inference_url, model, token, subset, c)
            runs.append({"server": label, "concurrency": c, **summarize(calls, seconds, staged, y[:len(subset)])})
            log.info("%s c=%d: %s", label, c, runs[-1])
            if len(subset) == len(bodies):
                full_calls = calls
        for budget in sweep:
            calls, _ = load(server.inference_url, model, token, bodies[:sweep_requests], max(concurrency), budget)
            swept[budget] = calls
    finally:
        server.stop()
    return runs, swept, full_calls


def in_process_runs(folder: Path, manifest: Manifest, bodies: list[bytes], y: np.ndarray, batch_sizes: Sequence[int],
                    c1_requests: int, threads: int) -> list[dict[str, Any]]:
    """(c): EarlyExitHandler.handle on batches of PNG bodies, with TorchServe's Context and metrics cache."""
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.service import Service

    from serving.handler import EarlyExitHandler

    cache = MetricsCacheYamlImpl(config_file_path=str(REPO / "serving" / "metrics.yaml"))
    cache.initialize_cache()
    cache.model_name = manifest.name
    logging.getLogger("ts.metrics.caching_metric").setLevel(logging.WARNING)  # metric lines go to stdout
    ctx = Context(manifest.name, str(folder), {"model": {"modelName": manifest.name}}, max(batch_sizes), None,
                  "0.12.0", metrics=cache, model_yaml_config={"handler": {"intra_op_threads": threads}})
    handler = EarlyExitHandler()
    handler.initialize(ctx)
    runs = []
    for b in batch_sizes:
        subset = bodies if b > 1 else bodies[:c1_requests]
        calls: list[Call] = []
        started = time.perf_counter()
        for start in range(0, len(subset), b):
            chunk = subset[start:start + b]
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
        runs.append({"server": "in_process", "concurrency": 1 if b == 1 else 16, "batch_size": b,
                     **summarize(calls, seconds, manifest.staged_mflops, y[:len(subset)])})
        log.info("in_process batch=%d: %s", b, runs[-1])
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_serve", description=__doc__.splitlines()[0])
    p.add_argument("--archive", type=Path, default=REPO / "model_store" / "mnist.mar")
    p.add_argument("--data-dir", type=Path, default=REPO / "data")
    p.add_argument("--limit", type=int, help="use the first N test images (default: all)")
    p.add_argument("--c1-requests", type=int, default=2000, help="requests of the concurrency-1 runs")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--sweep-requests", type=int, default=2000, help="images per calibrated budget in the sweep")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--out", type=Path, help="default bench/results/serve-<dataset>.json")
    p.add_argument("--note", default="", help="free text stored in the result (e.g. which checkpoint)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from training.data import Split, load_tensors  # the bench, not serving, may use training's data loader

    if not args.archive.is_file():
        p.error(f"{args.archive} does not exist: run `make train-export` first")
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        folder = work / "model"
        manifest, model_config = unpack(args.archive, folder)
        x, y = load_tensors(manifest.dataset, args.data_dir, Split.TEST, limit=args.limit)
        x, y = x.numpy().astype(np.float32), y.numpy()
        bodies = png_bodies(x)
        c1 = min(args.c1_requests, len(bodies))
        sweep_n = min(args.sweep_requests, len(bodies))
        default_budget = manifest.default_budget_mflops
        budgets = sorted({row.budget_mflops for row in manifest.calibration})
        runner = StagedRunner.from_folder(manifest, folder, intra_op_threads=2)
        offline = offline_policy(runner, x, y, default_budget)
        staged = manifest.staged_mflops
        full_cost = manifest.full_graph.mflops if manifest.full_graph else manifest.cost.full
        full_graph_costs = [full_cost] * manifest.num_exits  # full-graph answers all cost the full network
        threads = int((model_config.get("handler") or {}).get("intra_op_threads", 1))
        batch_size = int(model_config.get("batchSize", 1))

        runs = in_process_runs(folder, manifest, bodies, y, [1, batch_size], c1, threads)
        early, swept, early_calls = http_runs("early_exit_http", args.archive, work / "a", bodies, y, staged, c1,
                                              args.concurrency, args.warmup, budgets, sweep_n)
        full, _, _ = http_runs("full_graph_http", full_graph_archive(args.archive, work / "b-archive" / args.archive.name), work / "b",
                               bodies, y, full_graph_costs, c1, args.concurrency, args.warmup)
        runs = early + full + runs

        http_pred = np.array([c.body["class_index"] if c.status == 200 else -1 for c in early_calls])
        http_exits = np.array([c.body["exit_index"] - 1 if c.status == 200 else -1 for c in early_calls])
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
        result = {
            "benchmark": "serve", "time": now(), "note": args.note, "machine": machine(),
            "versions": versions("onnxruntime", "torchserve", "torch", "numpy", "pillow"),
            "model": {"archive": str(args.archive), "name": manifest.name, "version": manifest.version,
                      "dataset": manifest.dataset, "cost": manifest.cost.to_dict(),
                      "default_budget_mflops": default_budget, "calibrated_budgets_mflops": budgets},
            "settings": {"test_images": len(y), "concurrency_1_requests": c1, "input": "PNG over HTTP, token auth on",
                         "batch_size": batch_size, "max_batch_delay_ms": model_config.get("maxBatchDelay"),
                         "workers": model_config.get("minWorkers"), "intra_op_threads": threads,
                         "in_process": "concurrency 1 = batches of 1; concurrency 16 = batches of batchSize "
                                       "(the largest batch the server forms)",
                         "note": "client threads and TorchServe share this machine's CPU cores"},
            "runs": runs,
            "accuracy": {
                "http_early_exit": float((http_pred == y).mean()) if len(http_pred) == len(y) else None,
                "offline_same_policy": offline["accuracy"],
                "answers_differing_from_offline": int((http_pred != offline["pred"]).sum()),
                "exits_differing_from_offline": int((http_exits != offline["exits"]).sum()),
                "offline_exit_histogram": np.bincount(offline["exits"], minlength=manifest.num_exits).tolist(),
                "http_full_graph": next((r["accuracy"] for r in full if r.get("accuracy") is not None), None),
            },
            "compute": {"mean_mflops_per_request_http": float(np.mean([c.body["mflops_spent"] for c in early_calls
                                                                       if c.status == 200])) if early_calls else None,
                        "mean_mflops_offline": offline["mean_mflops"], "full_network_mflops": full_cost,
                        "staged_full_depth_mflops": staged[-1],
                        "saving_vs_full_network": 1.0 - offline["mean_mflops"] / full_cost,
                        "unit": "staged MFLOPs per request (stages and heads run); the full network runs no early "
                                "heads"},
            "budget_violations": sum(r["budget_violations"] for r in runs) + sum(r["budget_violations"]
                                                                                 for r in sweep_rows),
            "budget_sweep": sweep_rows,
        }
        out = args.out or RESULTS / f"serve-{manifest.dataset}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("accuracy", "compute", "budget_violations")}, indent=2))
        for r in runs:
            print(f"{r['server']:16s} c={r['concurrency']:<3d} {r['requests_per_s']:8.1f} req/s  p50 {r['p50_ms']:7.2f} ms"
                  f"  p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}  MFLOPs {r['mean_mflops']}")
        print(f"wrote {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
