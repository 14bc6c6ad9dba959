"""`make bench-serve`: the early-exit server against stock TorchServe, a full-graph server and the in-process limit.

On an MNIST archive (default model_store/mnist-quick.mar from `make train-export`) and the MNIST test set over HTTP
(token auth on, loopback):
  (a) early_exit_http   TorchServe + serving/handler.py, staged early exit at the default budget; PNG bodies
  (b) stock_torchserve  what a user runs without this project: TorchServe 0.12 serving the archive's full.onnx
                        through BaseHandler's ONNX path (bench/stock.py, bench/stock_onnx_handler.py), the same
                        batchSize, maxBatchDelay, workers, config.properties and log4j2.xml; the same images as
                        JSON {"instances": [C x H x W floats]} (TorchServe's JSON envelope), answers = logits
  (c) full_graph_http   (a)'s server and archive with handler mode full_graph_only (full.onnx); PNG bodies
  (d) in_process        the same handler called in-process (bench/inprocess.py: TorchServe's Context, no HTTP,
                        no frontend), batch 1 and batch = the archive's batchSize; with several workers also as
                        many loops at once, one process each (in_process_parallel)
  (e) stock_torchserve_no_spin (--stock-no-spin) (b) with onnxruntime's thread-pool spinning off: what the stock
                        server's busy-waiting does to its figures (bench/stock_onnx_no_spin_handler.py)
at concurrency 1 and 16: requests/s, p50/p99 latency, mean staged MFLOPs per request, CPU per request of the
client, TorchServe's Java frontend and its Python workers. All servers run at once and get timed bursts in
interleaved rounds (bench/servers.py); figures are medians over `--rounds`, ratios medians of per-round ratios.
The timed bursts come from wrk (bench/wrk.py: one C thread, so the load generator takes little of the cores the
server runs on); then every test image goes once through this project's Python client, whose answers are the ones
checked (its throughput is reported beside, as `python_client_c16`).

Reported: (a) against (b) per concurrency (targets: STOCK_TARGETS) and (a) against (d) at c=16 (the HTTP
overhead, bench/overhead.py), the latter also from CPU time. Answers through HTTP are compared row for row with
the offline answers of the same staged runner (early_exit/runner.py) on the same graphs, per calibrated budget
too; budget violations are counted against the staged cost of the exit that answered (bench/answers.py).

On an image-folder (photo) archive (`dataset: imagefolder`, e.g. model_store/cifar10-jpeg-quick.mar) the
requests are the original files (JPEG) of the run's held-out TEST split, carved by training.image_folders from the
training config recorded in the checkpoint beside the archive (`--checkpoint`, default
runs/<archive name>/checkpoint.pt); the offline check decodes the same bytes with the handler's decoding and the
manifest's input_transform (bench/photos.py); stock TorchServe gets those decoded pixels as JSON.
`--attacked N` (torch) also sends attacked loads to (a): DeepSloth on the first N images (bench/photos.py,
bench/attacked_loads.py), all attacked and one in ten attacked; the Makefile turns it on for a photo preset, and
--stock-no-spin for every preset.

Also reported for every archive: `compute_bound` at the highest concurrency, wall-time saving over staged-FLOP
saving of (a) against (c) and against (e) (bench.common.efficiency; target TARGET_EFFICIENCY), with its
`breakdown` (`time_breakdown`: the same figure for the onnxruntime runners alone, and the network's share of a
full-graph request's server CPU, measured after the servers are down), and `latency_spread`:
p50/p99 at every concurrency for every server as median, min and max over rounds, with the check that (a)'s p99 is
no worse than (e)'s.

`--sweep-settings` also sweeps the server's settings (bench/sweep.py) and puts the sweep and the recommended
defaults into the result (`--sweep-only`: the sweep alone). Client threads and the server share the machine's
cores: figures are for this machine only. Writes bench/results/serve-<dataset>.json (serve-<dataset>-sweep.json
with --sweep-only; for a photo archive serve-<model name>.json).

The standard runs go in three steps: `measure` (servers up, timed rounds, the answer pass, the budget pass),
`summarize_runs` (medians, ratios against stock and the in-process limit) and `check` (answers against the
offline runners).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from bench import attacked_loads, photos, servers, stock, sweep, wrk
from bench.answers import accuracy, answer_field, answer_stats, offline_policy, summarize
from bench.archives import full_graph_archive, unpack
from bench.common import TARGET_EFFICIENCY, Call, efficiency, load, png_bodies, ratio, result_header
from bench.inprocess import InProcess, ParallelInProcess, forced_exit_rates
from bench.overhead import TARGET, Run, http_vs_in_process
from early_exit.manifest import Manifest
from early_exit.policy import entry_for_budget
from early_exit.runner import FullGraphRunner, StagedRunner
from export.archive import ServeConfig
from training.train import seed_everything

log = logging.getLogger("bench.serve")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
STOCK_TARGETS = {1: 1.0, 16: 1.2}  # early exit / stock requests/s, per concurrency
OFFLINE_THREADS = 2  # onnxruntime threads of the offline reference runners (run while no server is loaded)

__all__ = ["main", "standard_runs", "measure", "summarize_runs", "check"]


@dataclass(frozen=True)
class Inputs:
    """What the standard runs work on."""

    args: argparse.Namespace
    work: Path  # scratch folder (archives, server state)
    folder: Path  # the unpacked archive
    manifest: Manifest
    config: ServeConfig  # the archive's model-config.yaml
    x: np.ndarray  # N x C x H x W test images as the server decodes the bodies (MNIST: values k/255)
    y: np.ndarray  # N labels
    bodies: list[bytes]  # MNIST: x as PNG; photo archive: the test files' bytes (JPEG)
    attacked: photos.AttackedSet | None = None  # DeepSloth on the first images (--attacked)
    photo: bool = False  # an image-folder archive

    @property
    def c_high(self) -> int:
        return max(self.args.concurrency)

    @property
    def c1_requests(self) -> int:
        return min(self.args.c1_requests, len(self.bodies))

    @property
    def budget_requests(self) -> int:
        return min(self.args.sweep_requests, len(self.bodies))

    @property
    def full_mflops(self) -> float:
        return self.manifest.full_graph.mflops if self.manifest.full_graph else self.manifest.cost.full


@dataclass(frozen=True)
class Lineup:
    """The servers of the standard runs, in interleaving order, with what each is sent and charged."""

    targets: list[servers.Target]
    sent: dict[Run, list[bytes]]
    costs: dict[Run, list[float]]  # MFLOPs per exit its answers are judged against
    stock_baseline: dict[str, Any]  # the result's description of (b)


def line_up(inp: Inputs) -> Lineup:
    """(a), (b) and (e) unless skipped or the archive has no full graph, (c) when it has one."""
    args, manifest = inp.args, inp.manifest
    full_costs = [inp.full_mflops] * manifest.num_exits  # a full-graph answer costs the full network
    targets = [servers.Target(Run.EARLY, args.archive)]
    sent = {Run.EARLY: inp.bodies, Run.FULL: inp.bodies}
    costs = {Run.EARLY: manifest.staged_mflops, Run.FULL: full_costs, Run.STOCK: full_costs,
             Run.STOCK_NO_SPIN: full_costs}
    described: dict[str, Any] = {"skipped": True}
    if manifest.full_graph is not None and not args.no_stock:
        variants = {Run.STOCK: (stock.HANDLER, "stock")}
        if args.stock_no_spin:
            variants[Run.STOCK_NO_SPIN] = (stock.NO_SPIN_HANDLER, "stock_no_spin")
        full_onnx = stock.extract_full_graph(args.archive, inp.work / "full.onnx", manifest.full_graph.file)
        parse = partial(stock.parse_answer, num_exits=manifest.num_exits, full_mflops=inp.full_mflops)
        json_bodies = stock.json_bodies(inp.x)
        for label, (handler, suffix) in variants.items():
            mar = stock.build_stock_archive(full_onnx, inp.config, inp.work / f"{label}-archive",
                                            f"{manifest.name}_{suffix}", handler)
            targets.append(servers.Target(label, mar, stock.SERVER_CONFIG, parse))
            sent[label] = json_bodies
        described = stock.describe(manifest.full_graph.file, inp.config,
                                   Run.STOCK_NO_SPIN if args.stock_no_spin else None)
    if manifest.full_graph is not None:
        targets.append(servers.Target(Run.FULL, full_graph_archive(args.archive,
                                                                   inp.work / "full-archive" / args.archive.name)))
    return Lineup(targets, sent, costs, described)


# ------------------------------------------------------------------------------------------------ measure
@dataclass
class Measured:
    """What the standard runs measured."""

    rounds: dict[tuple[Run, int], list[dict[str, Any]]] = field(default_factory=dict)  # per (server, concurrency)
    answers: dict[Run, list[Call]] = field(default_factory=dict)  # answer pass: every image once, in order
    answer_runs: dict[Run, dict[str, Any]] = field(default_factory=dict)  # that pass's run + answer_stats
    budget_calls: dict[float, list[Call]] = field(default_factory=dict)  # per calibrated budget, (a) only
    attacked: dict[str, Any] | None = None  # attacked_loads.summarize_loads's rows (--attacked)
    attacked_answers: dict[str, list[Call]] = field(default_factory=dict)  # per load, the uncapped answer pass


def measure(inp: Inputs, lineup: Lineup) -> Measured:
    """Every server up at once and warmed up; `--rounds` timed rounds (`timed_rounds`); then the answer pass (the
    Python client, every server, at the highest concurrency) and the budget pass (the early-exit server at each
    calibrated budget on the first `--sweep-requests` images)."""
    config, measured = inp.config, Measured()
    threads, loops = config.handler.intra_op_threads, config.min_workers
    with servers.serving(lineup.targets, inp.work / "servers") as live, contextlib.ExitStack() as stack:
        parallel = None
        if loops > 1 and inp.c_high > 1:
            parallel = ParallelInProcess(inp.folder, loops)
            stack.callback(parallel.close)
            parallel.run(inp.bodies[:config.batch_size * 10], config.batch_size, threads)  # children load handlers
        for label, running in live.items():
            running.warm_up(lineup.sent[label], inp.args.warmup_seconds)
        measured.rounds = timed_rounds(inp, lineup, live, InProcess(inp.folder, inp.manifest), parallel)
        for label, running in live.items():
            run, measured.answers[label] = running.run(lineup.sent[label], inp.c_high)
            measured.answer_runs[label] = {**run, **answer_stats(measured.answers[label], lineup.costs[label], inp.y)}
            log.info("answer check %s c=%d: %s", label, inp.c_high, {k: measured.answer_runs[label].get(k) for k in (
                "requests_per_s", "errors", "accuracy", "budget_violations")})
        early = live[Run.EARLY]
        for budget in calibrated_budgets(inp.manifest):
            measured.budget_calls[budget], _ = load(early.server.inference_url, early.server.models[0], early.token,
                                                    inp.bodies[:inp.budget_requests], inp.c_high, budget)
        if inp.attacked is not None:
            measured.attacked, measured.attacked_answers = attacked_pass(inp, early)
    return measured


def attacked_pass(inp: Inputs, early: servers.Running) -> tuple[dict[str, Any], dict[str, list[Call]]]:
    """The attacked loads (bench/attacked_loads.py) on the early-exit server: clean = the attacked images' own
    files, deepsloth = every request attacked, mixed = one in ten; the cap is the second-to-last exit's cost."""
    if inp.attacked is None:
        raise ValueError("attacked_pass needs the attacked set (--attacked)")
    attacked, staged = inp.attacked.bodies, inp.manifest.staged_mflops
    mixed, flags = photos.mixed_bodies(inp.bodies, attacked)
    loads = {"clean": inp.bodies[:len(attacked)], "deepsloth": attacked, "mixed": mixed}
    figures, answers, increases = attacked_loads.run_loads(early, loads, staged, inp.c_high, inp.args.rounds,
                                                          inp.args.burst_seconds, staged[-2])
    rows = attacked_loads.summarize_loads(figures, increases, inp.manifest.exit_agreement)
    rows["mixed"]["attacked_share"] = round(sum(flags) / len(flags), 4)
    rows["attack"] = {**inp.attacked.attack, "max_perturbation_after_png": round(inp.attacked.max_perturbation, 5)}
    return rows, answers


def timed_rounds(inp: Inputs, lineup: Lineup, live: dict[str, servers.Running], limit: InProcess,
                 parallel: ParallelInProcess | None) -> dict[tuple[Run, int], list[dict[str, Any]]]:
    """Per round and concurrency one wrk burst per server (order alternating between rounds), then one in-process
    run (batch 1 at c=1, else batchSize) and, at the highest concurrency, the parallel loops. Returns the runs per
    (server, concurrency), one per round."""
    args, threads, batch_size = inp.args, inp.config.handler.intra_op_threads, inp.config.batch_size
    labels = [Run(label) for label in live]
    per: dict[tuple[Run, int], list[dict[str, Any]]] = {}
    for round_ in tqdm(range(args.rounds), desc="bench-serve rounds", unit="round"):
        for c in args.concurrency:
            for label in (labels if round_ % 2 == 0 else labels[::-1]):
                run = live[label].burst(lineup.sent[label], c, args.c1_seconds if c == 1 else args.burst_seconds)
                per.setdefault((label, c), []).append(run)
                log.info("round %d %s c=%d: %s", round_ + 1, label, c,
                         {k: run[k] for k in ("requests", "requests_per_s", "p50_ms", "p99_ms", "errors")})
            n, batch = (inp.c1_requests, 1) if c == 1 else (len(inp.bodies), batch_size)
            run, calls = limit.run(inp.bodies[:n], batch, threads)
            run.update(answer_stats(calls, inp.manifest.staged_mflops, inp.y[:n]))
            per.setdefault((Run.IN_PROCESS, c), []).append(run)
            if parallel is not None and c == inp.c_high:
                per.setdefault((Run.PARALLEL, c), []).append(parallel.run(inp.bodies, batch_size, threads))
    return per


def calibrated_budgets(manifest: Manifest) -> list[float]:
    """The calibration table's budgets (MFLOPs), ascending, each once."""
    return sorted({row.budget_mflops for row in manifest.calibration})


# ---------------------------------------------------------------------------------------------- summarize
def summarize_runs(inp: Inputs, measured: Measured) -> dict[str, Any]:
    """The result's run rows (medians over rounds, in Run order) and the ratios read from them: early exit against
    stock (and stock without spinning), HTTP against in-process, and the answer pass's figures."""
    per, c_high = measured.rounds, inp.c_high
    runs = sorted((_run_row(inp, label, c, rs, measured.answer_runs) for (label, c), rs in per.items()),
                  key=lambda r: (list(Run).index(r["server"]), r["concurrency"]))
    paired_limit = servers.paired_ratio(per[(Run.EARLY, c_high)], per[(Run.IN_PROCESS, c_high)]) if c_high > 1 \
        else None
    paired_parallel = servers.paired_ratio(per[(Run.EARLY, c_high)], per[(Run.PARALLEL, c_high)]) \
        if (Run.PARALLEL, c_high) in per else None
    return {"runs": runs,
            "early_exit_vs_stock": _against(per, runs, Run.STOCK, STOCK_TARGETS),
            "early_exit_vs_stock_no_spin": _against(per, runs, Run.STOCK_NO_SPIN, {}) or None,
            "http_vs_in_process": http_vs_in_process(runs, inp.config.batch_size, Run.EARLY, c_high, paired_limit,
                                                     paired_parallel),
            "python_client_c16": python_client_figures(measured.answer_runs, runs, c_high),
            "latency_spread": latency_spread(per)}


def compute_bound(per: dict[tuple[Run, int], list[dict[str, Any]]], early_mflops: float | None, full_mflops: float,
                  concurrency: int, baselines: Sequence[Run] = (Run.FULL, Run.STOCK_NO_SPIN)) -> dict[str, Any]:
    """Wall-time saving over staged-FLOP saving of the early-exit server against each baseline at `concurrency`:
    bench.common.efficiency with time = 1 / requests-per-s (the median of per-round throughput ratios, as
    bench_compute) and FLOPs = (a)'s mean staged MFLOPs per answer against the full graph's MFLOPs (what every
    baseline runs). Target TARGET_EFFICIENCY against each baseline; a baseline not served gets None and fails."""
    rows: dict[str, Any] = {}
    for baseline in baselines:
        if (Run.EARLY, concurrency) not in per or (baseline, concurrency) not in per or early_mflops is None:
            rows[baseline] = None
            continue
        paired = servers.paired_ratio(per[(Run.EARLY, concurrency)], per[(baseline, concurrency)])
        speedup = paired["median"]
        figure = efficiency(1 / speedup if speedup else None, 1.0, early_mflops, full_mflops)
        per_round = [efficiency(1 / r, 1.0, early_mflops, full_mflops)["efficiency"] for r in paired["per_round"]]
        rows[baseline] = {**figure, "throughput_ratio": speedup, "throughput_ratio_per_round": paired["per_round"],
                          "efficiency_per_round": per_round,
                          "meets_target": figure["efficiency"] is not None and figure["efficiency"] >= TARGET_EFFICIENCY}
    return {"concurrency": concurrency, "target_efficiency": TARGET_EFFICIENCY,
            "early_exit_mean_mflops": early_mflops, "full_mflops": full_mflops,
            "formula": "(1 - t_early / t_full) / (1 - c_early / c_full); t = 1 / requests-per-s",
            "against": rows, "met": all(r is not None and r["meets_target"] for r in rows.values())}


def time_breakdown(rates: dict[str, dict[str, Any]], early_mflops: float | None, full_mflops: float,
                   runs: Sequence[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """Why the HTTP wall-time saving is what it is: the same efficiency figure (bench.common.efficiency) with the
    onnxruntime runners alone (`rates`: bench.inprocess.forced_exit_rates with its "policy" key, rows/s on
    decoded arrays at the server's batch size and threads), and how much of a full-graph request's server CPU
    (TorchServe's frontend and workers, `runs`' full_graph_http row at `concurrency`) is that network compute.

    `early_mflops` is the policy's mean staged MFLOPs per image, `full_mflops` the full graph's. When compute is a
    share s of the request and the rest is the same for both servers, the HTTP efficiency tends to s times the
    runner's (`http_efficiency_if_rest_fixed`): the bound the served figure can reach on this model."""
    ms = {key: None if not r.get("rows_per_s") else round(1000 / r["rows_per_s"], 4) for key, r in rates.items()}
    runner = efficiency(ms.get("policy"), ms.get("full"), early_mflops, full_mflops) if early_mflops else None
    full_row = next((r for r in runs if r["server"] == Run.FULL and r["concurrency"] == concurrency), None)
    server_ms = ((full_row or {}).get("cpu_ms_per_request") or {}).get("server")
    share = None if not server_ms or ms.get("full") is None else round(ms["full"] / server_ms, 3)
    runner_eff = None if runner is None else runner["efficiency"]
    return {"runner_ms_per_image": ms, "runner_rows_per_s": rates, "runner": runner,
            "full_graph_http_server_cpu_ms_per_request": server_ms, "compute_share_of_full_graph_request": share,
            "http_efficiency_if_rest_fixed": None if share is None or runner_eff is None else round(
                share * runner_eff, 3),
            "note": "runner: onnxruntime sessions alone on the decoded test images (no HTTP, decoding or answers), "
                    "the staged runner under the default budget's thresholds against the full graph; share: the "
                    "full graph's runner ms per image over the full-graph server's CPU ms per request"}


def latency_spread(per: dict[tuple[Run, int], list[dict[str, Any]]], baseline: Run = Run.STOCK_NO_SPIN
                   ) -> dict[str, Any]:
    """p50 and p99 per server and concurrency as median, min and max over rounds (HTTP servers; the in-process
    loops report no latency), and per concurrency whether (a)'s median p99 is no worse than `baseline`'s."""
    rows = [{"server": label, "concurrency": c, "rounds": len(rs),
             **{key: attacked_loads.spread([r.get(key) for r in rs]) for key in ("p50_ms", "p99_ms")}}
            for (label, c), rs in sorted(per.items(), key=lambda kv: (list(Run).index(kv[0][0]), kv[0][1]))
            if any(r.get("p99_ms") is not None for r in rs)]
    by = {(r["server"], r["concurrency"]): r for r in rows}
    checks = []
    for (label, c), row in by.items():
        if label != Run.EARLY:
            continue
        base = by.get((baseline, c))
        ours, theirs = row["p99_ms"]["median"], base["p99_ms"]["median"] if base else None
        checks.append({"concurrency": c, "early_exit_p99_ms": ours, f"{baseline}_p99_ms": theirs,
                       "passed": None if ours is None or theirs is None else ours <= theirs})
    return {"rows": rows, f"p99_no_worse_than_{baseline}": checks,
            "passed": bool(checks) and all(c["passed"] is True for c in checks)}


def _run_row(inp: Inputs, label: Run, c: int, rs: list[dict[str, Any]], answer_runs: dict[Run, dict[str, Any]]
             ) -> dict[str, Any]:
    """One result row: servers.medians of the rounds, MFLOPs and accuracy of the answers (the answer pass over
    HTTP, the first round in process), what the in-process loops ran with."""
    batch_size, threads = inp.config.batch_size, inp.config.handler.intra_op_threads
    answers = rs[0] if label in (Run.IN_PROCESS, Run.PARALLEL) else answer_runs[label]
    row = {"server": label, "concurrency": c, **servers.medians(rs),
           **{k: answers.get(k) for k in ("mean_mflops", "accuracy")}}
    if label == Run.PARALLEL:
        row.update(loops=rs[0]["loops"], batch_size=batch_size, intra_op_threads=threads)
    if label == Run.IN_PROCESS:
        row.update(batch_size=1 if c == 1 else batch_size, intra_op_threads=threads,
                   budget_violations=int(sum(r.get("budget_violations", 0) for r in rs)))
    return row


def _against(per: dict[tuple[Run, int], list[dict[str, Any]]], runs: list[dict[str, Any]], baseline: Run,
             targets: dict[int, float]) -> list[dict[str, Any]]:
    """stock.compare of the early-exit server with `baseline` per concurrency, with the per-round ratios."""
    paired = {c: servers.paired_ratio(per[(Run.EARLY, c)], per[(baseline, c)]) for label, c in per
              if label == baseline}
    rows = stock.compare([r for r in runs if r["server"] == Run.EARLY], [r for r in runs if r["server"] == baseline],
                         targets, {c: p["median"] for c, p in paired.items()})
    for row in rows:
        row["throughput_ratio_per_round"] = paired[row["concurrency"]]["per_round"]
    return rows


def python_client_figures(checked: dict[Run, dict[str, Any]], runs: Sequence[dict[str, Any]], concurrency: int
                          ) -> dict[str, Any]:
    """What the answer pass (one pass per server, this project's Python client sharing the cores) measured, beside
    wrk's figures as a cross-check. Ratios of single passes, not medians over rounds."""
    limit = next((r for r in runs if r["server"] == Run.IN_PROCESS and r["concurrency"] == concurrency), None)
    rate = {label: c["requests_per_s"] for label, c in checked.items()}
    return {"concurrency": concurrency, "note": "one pass per server after the timed rounds; the client's CPU is "
                                                "billed to the server's wall time",
            "servers": {label: {k: c.get(k) for k in ("requests", "requests_per_s", "p50_ms", "p99_ms", "errors")}
                        | {"client_cpu_ms_per_request": (c.get("cpu") or {}).get("client_cpu_ms_per_request")}
                        for label, c in checked.items()},
            "early_exit_vs_stock": ratio(rate.get(Run.EARLY), rate.get(Run.STOCK)),
            "http_vs_in_process": ratio(rate.get(Run.EARLY), limit and limit["requests_per_s"])}


# -------------------------------------------------------------------------------------------------- check
def check(inp: Inputs, measured: Measured) -> dict[str, Any]:
    """The answers against the offline runners on the same graphs: the result's `accuracy` (the answer pass
    against the staged runner at the default budget, stock against the full graph), `compute` (MFLOPs per
    request) and `budget_sweep` (one row per calibrated budget)."""
    manifest, folder, x, y = inp.manifest, inp.folder, inp.x, inp.y
    runner = StagedRunner.from_folder(manifest, folder, intra_op_threads=OFFLINE_THREADS)
    offline = offline_policy(runner, x, y, manifest.default_budget_mflops)
    early = measured.answers.get(Run.EARLY, [])
    http_pred, http_exits = answer_field(early, "class_index"), answer_field(early, "exit_index") - 1
    complete = len(early) == len(y)
    stock_pred = answer_field(measured.answers[Run.STOCK], "class_index") if Run.STOCK in measured.answers else None
    full_offline = None
    if manifest.full_graph is not None and stock_pred is not None:
        fg = FullGraphRunner.from_folder(manifest, folder, intra_op_threads=OFFLINE_THREADS)
        full_offline = np.concatenate([fg.run(x[i:i + 256]).probs.argmax(-1) for i in range(0, len(x), 256)])
    full_http = measured.answers.get(Run.FULL)
    spent = [c.body["mflops_spent"] for c in early if c.status == 200 and c.body]
    return {
        "accuracy": {
            "http_early_exit": accuracy(http_pred, y),
            "offline_same_policy": offline["accuracy"],
            "answers_differing_from_offline": int((http_pred != offline["pred"]).sum()) if complete else None,
            "exits_differing_from_offline": int((http_exits != offline["exits"]).sum()) if complete else None,
            "offline_exit_histogram": np.bincount(offline["exits"], minlength=manifest.num_exits).tolist(),
            "http_full_graph": accuracy(None if full_http is None else answer_field(full_http, "class_index"), y),
            "http_stock": accuracy(stock_pred, y),
            "stock_answers_differing_from_offline_full_graph":
                int((stock_pred != full_offline).sum()) if full_offline is not None else None},
        "compute": {"mean_mflops_per_request_http": float(np.mean(spent)) if early else None,
                    "mean_mflops_offline": offline["mean_mflops"], "full_network_mflops": inp.full_mflops,
                    "staged_full_depth_mflops": manifest.staged_mflops[-1],
                    "saving_vs_full_network": 1.0 - offline["mean_mflops"] / inp.full_mflops,
                    "unit": "staged MFLOPs per request (stages and heads run); the full network runs no early "
                            "heads"},
        "budget_sweep": [_budget_row(runner, budget, calls, x, y) for budget, calls in measured.budget_calls.items()],
        "attacked_offline": _attacked_row(runner, inp, measured),
    }


def _attacked_row(runner: StagedRunner, inp: Inputs, measured: Measured) -> dict[str, Any] | None:
    """The early-exit server's answers to the DeepSloth PNGs against the staged runner offline on what those PNGs
    decode to (default budget); None without --attacked."""
    calls = measured.attacked_answers.get("deepsloth")
    if inp.attacked is None or calls is None:
        return None
    y = inp.y[:len(calls)]
    ref = offline_policy(runner, inp.attacked.x, y, inp.manifest.default_budget_mflops)
    return {"requests": len(calls), "offline_mean_mflops": round(ref["mean_mflops"], 4),
            "offline_accuracy": ref["accuracy"], "http_accuracy": accuracy(answer_field(calls, "class_index"), y),
            "answers_differing": int((answer_field(calls, "class_index") != ref["pred"]).sum()),
            "exits_differing": int((answer_field(calls, "exit_index") - 1 != ref["exits"]).sum())}


def _budget_row(runner: StagedRunner, budget: float, calls: list[Call], x: np.ndarray, y: np.ndarray
                ) -> dict[str, Any]:
    """The early-exit server at one calibrated budget against the staged runner offline on the same images."""
    n = len(calls)
    ref = offline_policy(runner, x[:n], y[:n], budget)
    s = summarize(calls, 1.0, runner.manifest.staged_mflops, y[:n])
    return {"budget_mflops": budget, "requests": n, "errors": s["errors"],
            "http_accuracy": s["accuracy"], "offline_accuracy": ref["accuracy"],
            "http_mean_mflops": s["mean_mflops"], "offline_mean_mflops": round(ref["mean_mflops"], 4),
            "answers_differing": int((answer_field(calls, "class_index") != ref["pred"]).sum()),
            "budget_violations": s["budget_violations"],
            "max_exit_used": max((c.body["exit_index"] for c in calls if c.status == 200), default=None)}


# ---------------------------------------------------------------------------------------------- standard runs
def standard_runs(inp: Inputs) -> dict[str, Any]:
    """(a)-(e) at the archive's own settings: the result's sections from `measure`, `summarize_runs`, `check`."""
    lineup = line_up(inp)
    measured = measure(inp, lineup)
    summary, checked = summarize_runs(inp, measured), check(inp, measured)
    violations = sum(r.get("budget_violations", 0) for r in summary["runs"]) + sum(
        r["budget_violations"] for r in [*measured.answer_runs.values(), *checked["budget_sweep"]]) + (
        measured.attacked["budget_violations"] if measured.attacked else 0)
    early_mflops = (measured.answer_runs.get(Run.EARLY) or {}).get("mean_mflops")
    bound = compute_bound(measured.rounds, early_mflops, inp.full_mflops, inp.c_high)
    if inp.manifest.full_graph is not None:  # the servers are down: the runners alone, on the same images
        entry = entry_for_budget(inp.manifest.default_budget_mflops, inp.manifest.calibration,
                                 inp.manifest.staged_mflops)
        rates = forced_exit_rates(inp.folder, inp.manifest, inp.x, inp.config.batch_size,
                                  inp.config.handler.intra_op_threads, inp.args.rounds, policy=entry)
        bound["breakdown"] = time_breakdown(rates, early_mflops, inp.full_mflops, summary["runs"], inp.c_high)
    out = {"settings": settings_description(inp), "stock_baseline": lineup.stock_baseline,
           **{k: summary[k] for k in ("runs", "early_exit_vs_stock", "early_exit_vs_stock_no_spin",
                                      "http_vs_in_process", "latency_spread")},
           "compute_bound": bound,
           "accuracy": checked["accuracy"], "compute": checked["compute"],
           "python_client_c16": summary["python_client_c16"], "budget_violations": violations,
           "budget_sweep": checked["budget_sweep"]}
    if measured.attacked is not None:
        out["attacked_loads"] = {**measured.attacked, "offline_check": checked["attacked_offline"]}
    return out


def settings_description(inp: Inputs) -> dict[str, Any]:
    """The result's `settings`: what was sent, how, and the archive's serving settings."""
    config = inp.config
    return {"test_images": len(inp.y), "rounds": inp.args.rounds, "concurrency_1_requests_per_round": inp.c1_requests,
            "input": f"{Run.EARLY} / {Run.FULL}: {'the test files (JPEG)' if inp.photo else 'PNG'} over HTTP, "
                     f"token auth on; {Run.STOCK}: " + stock.INPUT_FORM,
            "batch_size": config.batch_size, "max_batch_delay_ms": config.max_batch_delay,
            "workers": config.min_workers, "intra_op_threads": config.handler.intra_op_threads,
            "handler_options": config.handler.to_config(),
            "interleaving": "all servers up at once (idle ones use no CPU); each round sends one burst per "
                            "server and concurrency, then one in-process burst; figures are medians over "
                            "rounds, ratios are medians of per-round ratios",
            "in_process": "concurrency 1 = batches of 1; concurrency 16 = batches of batchSize "
                          "(the largest batch the server forms)",
            "cpu": "client: this process (the client threads); frontend: TorchServe's Java process; "
                   "workers: its Python workers (from /proc)",
            "note": "client threads and TorchServe share this machine's CPU cores"}


# -------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bench_serve", description=__doc__.splitlines()[0])
    p.add_argument("--archive", type=Path, default=REPO / "model_store" / "mnist-quick.mar")
    p.add_argument("--data-dir", type=Path, default=REPO / "data")
    p.add_argument("--limit", type=int, help="use the first N test images (default: all)")
    p.add_argument("--checkpoint", type=Path,
                   help="photo archive: the checkpoint it was exported from, whose training config gives the test "
                        "split and the DeepSloth settings (default runs/<archive name>/checkpoint.pt)")
    p.add_argument("--attacked", type=int, default=0, metavar="N",
                   help="photo archive: also send attacked loads, DeepSloth (torch) on the first N test images, "
                        "every request attacked and one in ten (0: skip)")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds: every server (and the in-process loop) gets one burst per round and "
                        "concurrency; medians and per-round ratios are reported (the spread of the per-round ratios "
                        "in the result shows whether there were enough)")
    p.add_argument("--burst-seconds", type=float, default=4.0,
                   help="length of each timed wrk burst at concurrency > 1 (bench/wrk.py)")
    p.add_argument("--c1-seconds", type=float, default=6.0, help="length of each timed wrk burst at concurrency 1")
    p.add_argument("--c1-requests", type=int, default=1000,
                   help="images in each in-process batch-1 run (the concurrency-1 limit)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--sweep-requests", type=int, default=2000, help="images per calibrated budget in the sweep")
    p.add_argument("--warmup-seconds", type=float, default=6.0,
                   help="wrk load sent to each server (concurrency 16, then a fifth as long at 1) before measuring: "
                        "the frontend's JIT compiles during the first thousands of requests and would bill the first "
                        "rounds")
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
    from training.data import DataError, DatasetName, Split, load_tensors  # the bench may use training's loader

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
    seed_everything(args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        folder = work / "model"
        manifest, config = unpack(args.archive, folder)
        photo = manifest.dataset == DatasetName.IMAGEFOLDER.value
        attacked = None
        if photo:
            checkpoint = args.checkpoint or photos.default_checkpoint(args.archive)
            try:
                run_config = photos.run_config(checkpoint, manifest)
                test = photos.test_set(run_config, manifest, args.limit)
            except (OSError, ValueError, DataError) as exc:  # ManifestError is a ValueError; each says one line
                p.error(str(exc))
            x, y, bodies = test.x, test.y, test.bodies
            if args.attacked > 0:
                attacked = photos.deepsloth(checkpoint, run_config, manifest, x[:args.attacked], args.seed)
        else:
            if args.attacked > 0:
                p.error("--attacked needs an image-folder archive")
            x_t, y_t = load_tensors(manifest.dataset, args.data_dir, Split.TEST, limit=args.limit)
            x, y = x_t.numpy().astype(np.float32), y_t.numpy()
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
                           "calibrated_budgets_mflops": calibrated_budgets(manifest)}
        result["targets"] = {"stock_throughput_ratio": {f"c{c}": t for c, t in STOCK_TARGETS.items()},
                             "http_vs_in_process_c16": TARGET}
        if not args.sweep_only:
            result.update(standard_runs(Inputs(args, work, folder, manifest, config, x, y, bodies, attacked, photo)))
        if args.sweep_settings or args.sweep_only:
            options = sweep.SweepOptions(args.warmup_seconds, args.settings_seconds, args.settings_c1_seconds,
                                         args.settings_rounds, args.confirm_rounds, args.min_gain,
                                         args.max_c1_p50_increase)
            result["settings_sweep"] = sweep.run(args.archive, folder, manifest, config, work / "sweep",
                                                 bodies[:args.settings_requests], axes, options)
        out = args.out or RESULTS / f"serve-{manifest.name if photo else manifest.dataset}" \
            f"{'-sweep' if args.sweep_only else ''}.json"
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
    cb = result.get("compute_bound")
    if cb:
        for baseline, row in cb["against"].items():
            print(f"compute-bound at c={cb['concurrency']} against {baseline}: " + (
                "not served" if row is None else
                f"efficiency {row['efficiency']} (wall saving {row['wall_saving']} / FLOP saving {row['flop_saving']}; "
                f"per round {row['efficiency_per_round']}), target {cb['target_efficiency']}: "
                f"{'met' if row['meets_target'] else 'NOT met'}"))
        b = cb.get("breakdown")
        if b:
            print(f"  runners alone: {b['runner_ms_per_image']} ms per image, efficiency "
                  f"{(b['runner'] or {}).get('efficiency')}; the full graph's compute is "
                  f"{b['compute_share_of_full_graph_request']} of a full-graph request's server CPU "
                  f"({b['full_graph_http_server_cpu_ms_per_request']} ms), so HTTP efficiency tends to "
                  f"{b['http_efficiency_if_rest_fixed']}")
    spread = result.get("latency_spread")
    if spread:
        for row in spread["rows"]:
            print(f"{row['server']:24s} c={row['concurrency']:<3d} p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms")
        print(f"p99 no worse than stock without spinning: {'passed' if spread['passed'] else 'NOT passed'} "
              f"{[c for k, c in spread.items() if k.startswith('p99_no_worse')]}")
    loads = result.get("attacked_loads")
    if loads:
        for name in ("clean", "deepsloth", "mixed"):
            row = loads[name]
            print(f"load {name:9s}: {row['requests_per_s']['median']} req/s, p50 {row['p50_ms']['median']} ms, p99 "
                  f"{row['p99_ms']['median']} ms, {row['answer_pass']['mean_mflops']} MFLOPs/request (x"
                  f"{row['cost_ratio_to_clean']} of clean), violations {row['answer_pass']['budget_violations']} "
                  f"(capped at {row['capped_pass']['budget_mflops']}: {row['capped_pass']['budget_violations']}), "
                  f"alerts: rate drop {row['alerts']['EarlyExitRateDrop']}, near full "
                  f"{row['alerts']['ComputePerRequestNearFull']}, audit disagreement "
                  f"{row['alerts']['EarlyExitDisagreementHigh']['condition_met']}")
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
