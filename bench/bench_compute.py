"""`python -m bench.bench_compute`: where compute dominates, does an earlier exit save wall time in proportion?

The CIFAR multi-exit ResNet (`resnet_me`: ResNet-20 depth at four times its default width by default, so
that compute dominates the per-request overhead; random weights from `--seed`) goes through the
project's own artifacts: checkpoint (training.checkpoint.make_checkpoint), calibration.json beside it
(training.calibrate.write_calibration) whose every row has thresholds 1.01 (above any confidence: no exit ever
fires early), export (export.pipeline.export_checkpoint: stage graphs, full.onnx, manifest, parity) and the
.mar (export.archive.build_archive, serving/handler.py). Two servers run side by side on loopback, same
settings (ServeConfig defaults unless given):
  early_exit   mode early_exit; each request sends X-Compute-Budget = exit k's staged cost, which caps it at
               exit k, and since no threshold fires every answer comes from exit k (checked per answer)
  full_graph   mode full_graph_only: full.onnx, the network without early heads
The same generated 32 x 32 RGB images (8-bit PNG, seeded) go to both at concurrency 16 (throughput) and 1
(latency), in `--rounds` interleaved rounds (medians reported) so drift on a shared machine hits both alike.
Also in-process (no HTTP): the staged runner capped at each exit and the full-graph runner on the same images.

Per forced exit k:  flop_saving = 1 - staged_mflops[k] / full_mflops   (staged: stages and heads 1..k)
                    wall_saving = 1 - time_per_request[k] / time_per_request[full]
                    efficiency  = wall_saving / flop_saving     (target >= 0.7 at concurrency 16, for the exits
                                                                 that save FLOPs at all; the last exit costs more
                                                                 than the full graph: its heads)
time_per_request is 1 / requests-per-second at concurrency 16, the p50 latency at concurrency 1, and
1 / rows-per-second in process; also from CPU time per request at concurrency 16 (client + TorchServe),
which other jobs on a shared machine disturb less. Writes bench/results/serve-compute-cifar.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench import servers, wrk
from bench.archives import full_graph_archive, unpack
from bench.common import TARGET_EFFICIENCY, Call, efficiency, png_bodies, ratio, result_header
from bench.inprocess import forced_exit_rates
from early_exit.policy import NEVER
from training.train import seed_everything

log = logging.getLogger("bench.compute")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def generated_images(n: int, shape: Sequence[int], seed: int) -> np.ndarray:
    """n x C x H x W float32 with k/255 values (8-bit PNG round-trips them exactly)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, *shape), dtype=np.uint8).astype(np.float32) / 255.0)


def cpu_per_request(run: dict[str, Any]) -> float | None:
    """Client + server CPU ms per request of a (median) run: the cost other jobs on the machine disturb least."""
    cpu = run.get("cpu_ms_per_request") or {}
    return round(cpu["server"] + cpu.get("client", 0.0), 4) if "server" in cpu else None


def check_answers(calls: Sequence[Call], exit_index: int, mflops: float) -> dict[str, int]:
    """How many answers came from the forced exit at its staged cost (1-based exit_index)."""
    ok = [c for c in calls if c.status == 200 and c.body]
    at_cap = sum(1 for c in ok if c.body.get("exit_index") == exit_index
                 and abs(float(c.body.get("mflops_spent", -1)) - mflops) <= 1e-9 * max(mflops, 1.0))
    return {"answers": len(ok), "at_forced_exit": at_cap, "elsewhere": len(ok) - at_cap,
            "errors": len(calls) - len(ok)}


def build(args: argparse.Namespace, root: Path) -> Path:
    """resnet_me with random weights -> checkpoint + never-firing calibration -> export -> .mar."""
    import torch

    from bench.archives import calibrated_archive
    from training.data import dataset_info
    from training.models import create_model

    torch.manual_seed(args.seed)
    model = create_model("resnet_me", num_classes=10, blocks_per_stage=args.blocks_per_stage, width=args.width)
    info = dataset_info("cifar10")
    gen = torch.Generator().manual_seed(args.seed)
    calib_x = torch.rand(128, *info.input_shape, generator=gen)
    calib_y = torch.randint(0, 10, (128,), generator=gen).numpy()
    serve = {k: v for k, v in {"batch_size": args.batch_size, "max_batch_delay": args.max_batch_delay,
                                "min_workers": args.workers, "max_workers": args.workers}.items() if v is not None}
    if args.intra_op_threads is not None:
        serve["handler"] = {"intra_op_threads": args.intra_op_threads}
    built = calibrated_archive(model, info.to_dict(), calib_x, calib_y, root, "cifar_compute", serve,
                               thresholds=[NEVER] * (model.num_exits - 1),
                               config={"purpose": "bench_compute", "weights": "random", "seed": args.seed})
    return built.mar


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bench_compute", description=__doc__.splitlines()[0])
    p.add_argument("--blocks-per-stage", type=int, default=3, help="resnet_me depth: 3 = ResNet-20, 6 = ResNet-38")
    p.add_argument("--width", type=int, default=64,
                   help="channels of the first stage: wide enough that an image's compute outweighs the CPU that "
                        "HTTP and TorchServe spend per request (at resnet_me's own 16 it does not); the result "
                        "records the MFLOPs per exit")
    p.add_argument("--images", type=int, default=512, help="generated images sent per concurrency-16 burst")
    p.add_argument("--c1-requests", type=int, default=100, help="requests per concurrency-1 burst")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    p.add_argument("--warmup-seconds", type=float, default=3.0,
                   help="wrk load per server before measuring (JIT warm-up; bench.servers.Running.warm_up)")
    p.add_argument("--batch-size", type=int, help="batchSize (default: export.archive.ServeConfig's)")
    p.add_argument("--max-batch-delay", type=int, help="maxBatchDelay ms (default: ServeConfig's)")
    p.add_argument("--workers", type=int, help="min = max workers (default: ServeConfig's)")
    p.add_argument("--intra-op-threads", type=int, help="handler.intra_op_threads (default: HandlerOptions')")
    p.add_argument("--no-c1", action="store_true", help="skip the concurrency-1 runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "serve-compute-cifar.json")
    p.add_argument("--note", default="")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.warmup_seconds > 0:
        try:
            wrk.executable()
        except wrk.WrkMissing as exc:
            p.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("export", "onnxscript", "onnx_ir", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    seed_everything(args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench-compute-"))
    try:
        mar = build(args, work / "build")
        folder = work / "model"
        manifest, config = unpack(mar, folder)
        staged = manifest.staged_mflops
        full_mflops = manifest.full_graph.mflops
        x = generated_images(args.images, manifest.input_shape, args.seed + 1)
        bodies = png_bodies(x)
        c1_bodies = bodies[:min(args.c1_requests, len(bodies))]
        threads, batch = config.handler.intra_op_threads, config.batch_size

        compute = forced_exit_rates(folder, manifest, x, batch, threads, args.rounds)
        targets = [servers.Target("early_exit", mar),
                   servers.Target("full_graph", full_graph_archive(mar, work / "full-archive" / mar.name))]
        forced = [("full_graph", None)] + [(str(k + 1), k) for k in range(manifest.num_exits)]
        runs: dict[str, dict[int, list[dict[str, Any]]]] = {t: {1: [], 16: []} for t, _ in forced}
        answers: dict[str, dict[str, int]] = {}
        levels = [16] if args.no_c1 else [16, 1]
        with servers.serving(targets, work / "servers") as live:
            early, full = live["early_exit"], live["full_graph"]
            for running in (early, full):
                running.warm_up(bodies, args.warmup_seconds)
            for round_ in range(args.rounds):
                for label, k in (forced if round_ % 2 == 0 else list(reversed(forced))):
                    server = full if k is None else early
                    budget = None if k is None else staged[k]
                    for c in levels:
                        run, calls = server.run(bodies if c == 16 else c1_bodies, c, budget)
                        runs[label][c].append(run)
                        if k is not None:
                            got = check_answers(calls, k + 1, staged[k])
                            prev = answers.setdefault(label, dict.fromkeys(got, 0))
                            answers[label] = {key: prev[key] + got[key] for key in got}
                        log.info("round %d %s c=%d: %s", round_ + 1, label, c,
                                 {key: run[key] for key in ("requests_per_s", "p50_ms", "p99_ms", "errors")})

        summary = {label: {f"c{c}": servers.medians(rs) for c, rs in by_c.items() if rs}
                   for label, by_c in runs.items()}
        paired16 = {label: servers.paired_ratio(runs[label][16], runs["full_graph"][16]) for label, _ in forced[1:]}
        full_c16 = summary["full_graph"]["c16"]["requests_per_s"]
        full_c1 = summary["full_graph"].get("c1", {}).get("p50_ms")
        rows = []
        for label, k in forced[1:]:
            s = summary[label]
            rps = s["c16"]["requests_per_s"]
            speedup = paired16[label]["median"]  # per-round exit/full throughput: drift cancels
            eff16 = efficiency(1 / speedup if speedup else None, 1.0, staged[k], full_mflops)
            eff1 = efficiency(s.get("c1", {}).get("p50_ms"), full_c1, staged[k], full_mflops)
            ip = compute[label]["rows_per_s"]
            eff_ip = efficiency(1 / ip, 1 / compute["full"]["rows_per_s"], staged[k], full_mflops)
            eff_cpu = efficiency(cpu_per_request(s["c16"]), cpu_per_request(summary["full_graph"]["c16"]), staged[k],
                                 full_mflops)
            applies = eff16["flop_saving"] > 0
            rows.append({
                "exit": k + 1, "budget_mflops": staged[k], "staged_mflops": staged[k], "full_mflops": full_mflops,
                "flop_saving": eff16["flop_saving"], "answers": answers.get(label),
                "http_c16": {**{key: s["c16"][key] for key in ("requests_per_s", "p50_ms", "p99_ms", "errors")},
                             "throughput_vs_full": speedup, "throughput_vs_full_per_round": paired16[label]["per_round"],
                             "throughput_vs_full_of_medians": ratio(rps, full_c16), "wall_saving": eff16["wall_saving"],
                             "efficiency": eff16["efficiency"],
                             "cpu_ms_per_request": cpu_per_request(s["c16"]),
                             "efficiency_from_cpu": eff_cpu["efficiency"]},
                "http_c1": None if "c1" not in s else {
                    **{key: s["c1"][key] for key in ("requests_per_s", "p50_ms", "p99_ms", "errors")},
                    "p50_vs_full": ratio(s["c1"]["p50_ms"], full_c1), "wall_saving": eff1["wall_saving"],
                    "efficiency": eff1["efficiency"]},
                "in_process": {"rows_per_s": ip, "vs_full": ratio(ip, compute["full"]["rows_per_s"]),
                               "wall_saving": eff_ip["wall_saving"], "efficiency": eff_ip["efficiency"]},
                "target_applies": applies,
                "meets_target": (eff16["efficiency"] is not None and eff16["efficiency"] >= TARGET_EFFICIENCY)
                if applies else None,
            })
        applicable = [r for r in rows if r["target_applies"]]
        result = {
            **result_header("serve-compute", args.seed, args.note),
            "model": {"architecture": "resnet_me", "blocks_per_stage": args.blocks_per_stage, "width": args.width,
                      "weights": f"random (torch.manual_seed({args.seed}))", "dataset": manifest.dataset,
                      "input_shape": list(manifest.input_shape), "cost": manifest.cost.to_dict(),
                      "staged_mflops": staged, "full_graph_mflops": full_mflops,
                      "calibration": "every threshold 1.01: no exit fires early; the budget header forces the cap"},
            "settings": {"images": len(bodies), "c1_requests": len(c1_bodies), "rounds": args.rounds,
                         "input": "generated RGB 32x32 8-bit PNG (seed + 1), token auth on, loopback",
                         "batch_size": batch, "max_batch_delay_ms": config.max_batch_delay,
                         "workers": config.min_workers, "intra_op_threads": threads,
                         "handler_options": config.handler.to_config(),
                         "note": "client threads and both TorchServe instances share this machine's cores"},
            "target": {"efficiency_at_c16": TARGET_EFFICIENCY,
                       "min_efficiency_at_c16": min((r["http_c16"]["efficiency"] for r in applicable
                                                     if r["http_c16"]["efficiency"] is not None), default=None),
                       "met": bool(applicable) and all(r["meets_target"] for r in applicable)},
            "exits": rows,
            "full_graph": {"http": summary["full_graph"], "in_process_rows_per_s": compute["full"]["rows_per_s"]},
            "runs": summary,
            "in_process": compute,
        }
        result["settings"]["interleaving"] = ("both servers up at once (the idle one uses no CPU); each round runs the "
                                              "full graph and every forced exit, order alternating between rounds; "
                                              "figures are medians over rounds, the c=16 wall saving uses the median "
                                              "of per-round throughput ratios")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"full graph: c16 {full_c16} req/s, c1 p50 {full_c1} ms, in-process {compute['full']['rows_per_s']} rows/s")
        for r in rows:
            c1 = r["http_c1"] or {}
            print(f"exit {r['exit']}: {r['staged_mflops']:.2f} MFLOPs (saving {r['flop_saving']:+.3f})  "
                  f"c16 {r['http_c16']['requests_per_s']} req/s eff {r['http_c16']['efficiency']} (from CPU "
                  f"{r['http_c16']['efficiency_from_cpu']})  "
                  f"c1 p50 {c1.get('p50_ms')} ms eff {c1.get('efficiency')}  in-process eff "
                  f"{r['in_process']['efficiency']}  at cap {r['answers']['at_forced_exit']}/{r['answers']['answers']}")
        print(f"target: efficiency >= {TARGET_EFFICIENCY} at c=16 -> {result['target']}")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
