"""What every benchmark shares: the result header (machine, versions, seed, time), the request bodies, the HTTP
load generator and the pure summaries of its calls (requests/s, latency percentiles, ratios)."""
from __future__ import annotations

import datetime as _dt
import io
import logging
import os
import platform
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

log = logging.getLogger("bench.common")


def machine() -> dict[str, object]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    out: dict[str, object] = {"hostname": platform.node(), "platform": platform.platform(), "cpu": cpu,
                              "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        out["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]  # others' jobs make figures noisy
    except OSError:
        pass
    return out


def versions(*packages: str) -> dict[str, str]:
    names = packages or ("torch", "torchvision", "onnx", "onnxruntime", "torchserve", "numpy")
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


SERVE_PACKAGES = ("onnxruntime", "torchserve", "torch-model-archiver", "torch", "numpy", "pillow")


def result_header(benchmark: str, seed: int, note: str = "", packages: Sequence[str] = SERVE_PACKAGES
                  ) -> dict[str, Any]:
    """The first keys of every result JSON: what ran, when, where, with which versions and seed."""
    return {"benchmark": benchmark, "time": now(), "note": note, "seed": seed, "machine": machine(),
            "versions": versions(*packages)}


# ------------------------------------------------------------------------------------------------ bodies
def png_bodies(x: np.ndarray) -> list[bytes]:
    """One 8-bit PNG per image of `x` (N x C x H x W float, C = 1 grey or 3 RGB, values k/255 in [0, 1]): decoding
    a body gives back its image exactly, so a server is sent precisely the pixels the offline runs see."""
    out = []
    for img in x:
        pixels = (np.transpose(img, (1, 2, 0)) * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


# --------------------------------------------------------------------------------------------- HTTP load
@dataclass
class Call:
    """One request: its HTTP status (None when the connection failed), latency in seconds and answer JSON."""

    status: int | None
    latency_s: float
    body: dict[str, Any] | None


Parse = Callable[[Any], "dict[str, Any] | None"]


def load(url: str, model: str, token: str | None, bodies: Sequence[bytes], concurrency: int,
         budget: float | None = None, parse: Parse | None = None) -> tuple[list[Call], float]:
    """Send every body once with `concurrency` client threads (persistent connections); answers in order.

    `parse` turns a 200 answer's JSON into the dict kept in Call.body (default: kept when it is a dict); a
    server answering in another form (the stock TorchServe baseline) is normalized to the early-exit fields."""
    from serving.client import Client

    calls: list[Call | None] = [None] * len(bodies)
    counter = iter(range(len(bodies)))
    lock = threading.Lock()

    def keep(status: int, body: Any) -> dict[str, Any] | None:
        if parse is not None and status == 200:
            return parse(body)
        return body if isinstance(body, dict) else None

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
                    calls[i] = Call(r.status, time.perf_counter() - started, keep(r.status, r.body))
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


def latency_summary(latencies_s: Sequence[float], seconds: float) -> dict[str, Any]:
    """requests, seconds, requests/s, p50/p99 (ms) of one run."""
    lat = np.asarray(latencies_s, dtype=np.float64) * 1000
    n = len(lat)
    return {"requests": n, "seconds": round(seconds, 3),
            "requests_per_s": round(n / seconds, 1) if seconds > 0 else None,
            "p50_ms": round(float(np.percentile(lat, 50)), 3) if n else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 3) if n else None}


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    """a / b, rounded; None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)


TARGET_EFFICIENCY = 0.7  # wall saving / FLOP saving a compute-bound server should reach (bench_compute, bench_serve)


def efficiency(time_exit: float | None, time_full: float | None, flops_exit: float, flops_full: float
               ) -> dict[str, float | None]:
    """Wall-time saving over FLOP saving of answering at one exit (or under the early-exit policy) instead of running
    the full graph: (1 - time_exit / time_full) / (1 - flops_exit / flops_full). Times in any one unit (s per
    request, or 1 / requests-per-s), FLOPs in MFLOPs; None where a time is missing or nothing is saved."""
    flop_saving = 1.0 - flops_exit / flops_full
    wall_saving = None if not time_exit or not time_full else 1.0 - time_exit / time_full
    value = None if wall_saving is None or flop_saving <= 0 else wall_saving / flop_saving
    return {"flop_saving": round(flop_saving, 4), "wall_saving": None if wall_saving is None else round(wall_saving, 4),
            "efficiency": None if value is None else round(value, 3)}


# ------------------------------------------------------------------------------------------- CPU accounting
def process_cpu_seconds(pids: Sequence[int]) -> dict[int, float]:
    """user + system CPU seconds of each live pid (from /proc; a pid that is gone is left out)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of stat)
    return out


def children_of(pid: int) -> list[int]:
    """pid and its descendants (TorchServe's Java frontend and its Python workers)."""
    found, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        kids: list[str] = []
        try:  # a child belongs to the thread that forked it: read every thread's list
            for task in Path(f"/proc/{parent}/task").iterdir():
                try:
                    kids += (task / "children").read_text().split()
                except OSError:
                    continue
        except OSError:
            continue
        for kid in map(int, kids):
            found.append(kid)
            frontier.append(kid)
    return found


def self_cpu_seconds() -> float:
    """user + system CPU seconds this process has used so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU seconds spent by the client (this process) and by a server's process tree during a block."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.result: dict[str, float] = {}

    def __enter__(self) -> "CpuMeter":
        self._pids = children_of(self.server_pid) if self.server_pid else []
        self._server0 = process_cpu_seconds(self._pids)
        self._client0 = self_cpu_seconds()
        self._wall0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        server1 = process_cpu_seconds(self._pids)
        spent = {p: server1[p] - self._server0[p] for p in server1 if p in self._server0}
        self.result = {
            "wall_s": round(time.perf_counter() - self._wall0, 3),
            "client_cpu_s": round(self_cpu_seconds() - self._client0, 3),
            "server_cpu_s": round(sum(spent.values()), 3),
        }
        if self.server_pid in spent:  # the Java frontend is the pid TorchServe records; workers are its children
            self.result["frontend_cpu_s"] = round(spent[self.server_pid], 3)
            self.result["workers_cpu_s"] = round(sum(v for p, v in spent.items() if p != self.server_pid), 3)
