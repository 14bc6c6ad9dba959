"""HTTP against in-process: how much of the in-process limit (bench/inprocess.py) the server reaches.

The ratio is HTTP requests/s at concurrency 16 over the in-process loop's rows/s at batch = the server's
batchSize (the largest batch the server forms). It is judged against `TARGET`; wall time on a shared machine
drifts, so it is also estimated from CPU time (`cpu_bound_estimate`), and, for a server with several workers,
against as many loops at once (the stricter limit: the in-process loop on every core the workers use).
"""
from __future__ import annotations

import os
from enum import StrEnum
from typing import Any, Sequence

from bench.common import ratio

TARGET = 0.35  # HTTP / in-process requests/s at concurrency 16


class Run(StrEnum):
    """The `server` of a bench_serve run row, in report order."""

    EARLY = "early_exit_http"  # TorchServe + serving/handler.py, staged early exit
    STOCK = "stock_torchserve"  # stock TorchServe serving full.onnx (bench/stock.py)
    STOCK_NO_SPIN = "stock_torchserve_no_spin"  # the same with onnxruntime's thread-pool spinning off
    FULL = "full_graph_http"  # EARLY's server and archive in handler mode full_graph_only
    IN_PROCESS = "in_process"  # bench.inprocess.InProcess
    PARALLEL = "in_process_parallel"  # bench.inprocess.ParallelInProcess, one loop per server worker


def _find(runs: Sequence[dict[str, Any]], server: Run, **match: Any) -> dict[str, Any] | None:
    return next((r for r in runs if r["server"] == server and all(r.get(k) == v for k, v in match.items())), None)


def http_vs_in_process(runs: Sequence[dict[str, Any]], batch_size: int, label: Run = Run.EARLY,
                       concurrency: int = 16, paired: dict[str, Any] | None = None,
                       paired_parallel: dict[str, Any] | None = None) -> dict[str, Any]:
    """`label`'s requests/s at `concurrency` over the in-process run's at batch `batch_size` among `runs` (rows
    with `server`, `concurrency`, `requests_per_s`, in-process ones with `batch_size`). The ratio is the median
    of per-round ratios when `paired` (servers.paired_ratio) has one, else the ratio of the rows' figures; None
    when either row is missing. Also: the CPU-time estimate and, when `runs` hold a Run.PARALLEL row, the ratio
    against it (`against_parallel_loops`, per round from `paired_parallel`)."""
    http = _find(runs, label, concurrency=concurrency)
    limit = _find(runs, Run.IN_PROCESS, batch_size=batch_size)
    value = ratio(http and http["requests_per_s"], limit and limit["requests_per_s"])
    if paired and paired.get("median") is not None:
        value = paired["median"]
    return {"concurrency": concurrency, "http_requests_per_s": http and http["requests_per_s"],
            "in_process_requests_per_s": limit and limit["requests_per_s"], "in_process_batch_size": batch_size,
            "ratio": value, "per_round": (paired or {}).get("per_round"), "target": TARGET,
            "meets_target": None if value is None else value >= TARGET,
            "cpu": cpu_bound_estimate(http, limit),
            "against_parallel_loops": _against_parallel(runs, http, paired_parallel)}


def _against_parallel(runs: Sequence[dict[str, Any]], http: dict[str, Any] | None,
                      paired: dict[str, Any] | None) -> dict[str, Any] | None:
    limit = _find(runs, Run.PARALLEL)
    if limit is None:
        return None
    value = (paired or {}).get("median") or ratio(http and http["requests_per_s"], limit["requests_per_s"])
    return {"loops": limit.get("loops"), "in_process_requests_per_s": limit["requests_per_s"], "ratio": value,
            "per_round": (paired or {}).get("per_round")}


def cpu_bound_estimate(http: dict[str, Any] | None, limit: dict[str, Any] | None,
                       cores: int | None = None) -> dict[str, Any] | None:
    """The ratio from CPU time instead of wall time, which other jobs on a shared machine disturb much less.

    `http`: a run with cpu_ms_per_request {"server", optionally "client"}; `limit`: an in-process run with
    cpu_ms_per_request {"process"}. Returns CPU ms per request over HTTP (client + TorchServe's processes) and
    in process (one thread), and the ratio both would reach if CPU were the only limit, HTTP spreading over
    `cores` (default: this machine's) and the in-process loop on one; None when either figure is missing."""
    cores = cores or os.cpu_count() or 1
    h = (http or {}).get("cpu_ms_per_request") or {}
    p = (limit or {}).get("cpu_ms_per_request") or {}
    if "server" not in h or "process" not in p:
        return None
    http_ms = h["server"] + h.get("client", 0.0)
    return {"http_ms_per_request": round(http_ms, 4), "http_server_ms_per_request": h["server"],
            "http_client_ms_per_request": h.get("client"), "in_process_ms_per_request": p["process"],
            "cores": cores, "ratio_if_cpu_bound": round(cores * p["process"] / http_ms, 3) if http_ms else None,
            "note": "wall-time ratio on a quiet machine tends to this; the client's share goes away when clients "
                    "run elsewhere"}
