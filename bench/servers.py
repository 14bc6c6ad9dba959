"""Several TorchServe instances side by side for interleaved measurements.

On a machine shared with other jobs, throughput drifts by tens of percent within minutes, so two servers
measured one after the other are compared across different conditions. The benchmarks therefore start every
server they compare at once (an idle TorchServe uses no CPU) and alternate short load bursts between them,
round after round; medians over rounds and per-round ratios cancel most of the drift.
"""
from __future__ import annotations

import itertools
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from bench import wrk
from bench.common import Call, CpuMeter, Parse, latency_summary, load
from serving.client import guess_content_type
from serving.server import PID_FILE, KeyKind, Ports, Server, start_server

log = logging.getLogger("bench.servers")


@dataclass
class Target:
    """What to serve and how to talk to it."""

    label: str
    archive: Path
    extra_config: dict[str, str] | None = None  # config.properties keys over serving/config.properties
    parse: Parse | None = None  # normalizes a 200 answer (see bench.common.load)
    log_config: Path | None = None  # default: serving/log4j2.xml


@dataclass
class Running:
    target: Target
    server: Server
    token: str | None = field(default=None, repr=False)
    # wrk's body files, one per list of bodies this server was sent (the list is kept so its id stays unique)
    _body_files: dict[int, tuple[Sequence[bytes], wrk.BodyFiles]] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return self.target.label

    @property
    def pid(self) -> int | None:
        try:
            return int((self.server.state_dir / "tmp" / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None

    def run(self, bodies: Sequence[bytes], concurrency: int, budget: float | None = None
            ) -> tuple[dict[str, Any], list[Call]]:
        """One burst: every body once at `concurrency`; latency summary + CPU of client and server."""
        with CpuMeter(self.pid) as cpu:
            calls, seconds = load(self.server.inference_url, self.server.models[0], self.token, bodies, concurrency,
                                  budget, parse=self.target.parse)
        run = {**latency_summary([c.latency_s for c in calls], seconds),
               "errors": sum(1 for c in calls if c.status != 200 or c.body is None),
               "cpu": per_request(cpu.result, len(calls))}
        return run, calls

    def burst(self, bodies: Sequence[bytes], concurrency: int, seconds: float) -> dict[str, Any]:
        """One timed burst with wrk (bench/wrk.py): `bodies` in order, cycling, for `seconds` at `concurrency`;
        latency summary, errors (statuses only: answers are not read) and CPU of wrk and the server."""
        files = self._files(bodies)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        with CpuMeter(self.pid) as cpu:
            run = wrk.burst(self.server.inference_url, f"/predictions/{self.server.models[0]}", files, concurrency,
                            seconds, headers)
        cpu.result["client_cpu_s"] = run.pop("client_cpu_s")
        run["cpu"] = per_request(cpu.result, run["requests"])
        return run

    def warm_up(self, bodies: Sequence[bytes], seconds: float) -> None:
        """`seconds` of bursts (cycling through `bodies`) at concurrency 16, then a fifth as long (at least 1 s)
        at concurrency 1, unmeasured: the frontend's JIT compiles during the first thousands of requests."""
        if seconds <= 0 or not bodies:
            return
        self.burst(bodies, 16, seconds)
        self.burst(bodies, 1, max(1.0, seconds / 5))

    def _files(self, bodies: Sequence[bytes]) -> wrk.BodyFiles:
        if id(bodies) not in self._body_files:
            folder = self.server.state_dir / "wrk" / str(len(self._body_files))
            self._body_files[id(bodies)] = (bodies, wrk.BodyFiles.write(bodies, folder, guess_content_type(bodies[0])))
        return self._body_files[id(bodies)][1]

    def stop(self) -> None:
        self.server.stop()


def per_request(cpu: dict[str, float], requests: int) -> dict[str, float]:
    """CPU seconds of a burst (client = this process, server = TorchServe's process tree, split into the Java
    frontend and the Python workers) and the same per request in ms."""
    out = dict(cpu)
    if requests:
        for who in ("client", "server", "frontend", "workers"):
            if f"{who}_cpu_s" in cpu:
                out[f"{who}_cpu_ms_per_request"] = round(cpu[f"{who}_cpu_s"] * 1000 / requests, 3)
    return out


_started = itertools.count()


def start(target: Target, work: Path) -> Running:
    """A server for `target` with its own store, state folder and ports (worker port blocks staggered)."""
    index = next(_started)  # atomic under the GIL: several starts may run in threads
    root = work / f"{index:02d}-{target.label}"
    store = root / "store"
    store.mkdir(parents=True)
    shutil.copy(target.archive, store / target.archive.name)
    ports = Ports.free()
    ports = replace(ports, worker=ports.worker + 32 * (index % 8))
    options: dict[str, Any] = {"log_config": target.log_config} if target.log_config else {}
    server = start_server(store, [target.archive.name], root / "state", ports, extra_config=target.extra_config,
                          **options)
    return Running(target, server, server.key(KeyKind.INFERENCE))


def start_all(targets: Sequence[Target], work: Path) -> list[Running]:
    """Start the targets concurrently (a start is mostly waiting for the JVM and the worker); if one fails, the
    others are stopped and the error raised."""
    with ThreadPoolExecutor(max(1, len(targets))) as pool:
        futures = [pool.submit(start, t, work) for t in targets]
        wait(futures)
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        for f in futures:
            if f.exception() is None:
                f.result().stop()
        raise failed[0]
    return [f.result() for f in futures]


@contextmanager
def serving(targets: Sequence[Target], work: Path) -> Iterator[dict[str, Running]]:
    """Start every target (stopping the ones already started if one fails), yield them by label, stop them all."""
    live: dict[str, Running] = {}
    try:
        for target, running in zip(targets, start_all(targets, work)):
            live[target.label] = running
        yield live
    finally:
        for running in live.values():
            try:
                running.stop()
            except Exception as exc:  # keep stopping the others
                log.warning("stopping %s: %s", running.label, exc)


def medians(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One figure per key over rounds: median requests/s, p50, p99 and per-request CPU; summed requests and
    errors; each round kept under `per_round`."""
    def med(values: list[float]) -> float | None:
        return round(float(np.median(values)), 3) if values else None

    out: dict[str, Any] = {
        "rounds": len(runs), "requests": int(sum(r["requests"] for r in runs)),
        "errors": int(sum(r.get("errors", 0) for r in runs)),
        "requests_per_s": med([r["requests_per_s"] for r in runs if r.get("requests_per_s") is not None]),
        "p50_ms": med([r["p50_ms"] for r in runs if r.get("p50_ms") is not None]),
        "p99_ms": med([r["p99_ms"] for r in runs if r.get("p99_ms") is not None]),
    }
    cpu_keys = sorted({k for r in runs for k in (r.get("cpu") or {}) if k.endswith("_ms_per_request")})
    if cpu_keys:
        out["cpu_ms_per_request"] = {k.replace("_cpu_ms_per_request", ""): med([r["cpu"][k] for r in runs
                                                                               if k in (r.get("cpu") or {})])
                                     for k in cpu_keys}
    out["per_round"] = [{k: r.get(k) for k in ("requests", "requests_per_s", "p50_ms", "p99_ms", "errors")}
                        for r in runs]
    return out


def paired_ratio(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], key: str = "requests_per_s"
                 ) -> dict[str, Any]:
    """Round by round a[key] / b[key] (bursts of the same round ran back to back) and their median."""
    per_round = [round(x[key] / y[key], 3) for x, y in zip(a, b) if x.get(key) and y.get(key)]
    return {"median": round(float(np.median(per_round)), 3) if per_round else None, "per_round": per_round}
