"""Timed load bursts with wrk (https://github.com/wg/wrk, Debian package `wrk`), the benchmarks' load generator.

Why not this project's Python client for timing: on a small machine the load generator shares the cores with the
server, and 16 Python threads with http.client spend a large share of what the server itself spends per request
(compare `python_client_c16` with the wrk runs in bench/results/serve-mnist.json). That CPU would be billed to the
server as "HTTP overhead", and it is not the server's: in production clients run elsewhere. wrk is one C event
loop (`-t1`) over persistent HTTP/1.1 connections, each sending its next request as soon as its answer arrives (a
closed loop, like the Python client); its latency is measured from the write of a request to the read of its
answer. The Python client still sends every request whose answer the benchmarks check (bench/common.py `load`):
wrk counts statuses only.

A burst lasts a fixed time (wrk has no request count): its bodies are sent in order, cycling.
"""
from __future__ import annotations

import json
import logging
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("bench.wrk")
SCRIPT = Path(__file__).resolve().parent / "wrk_bodies.lua"
INSTALL = "apt-get install wrk (Debian/Ubuntu), brew install wrk (macOS)"


class WrkMissing(RuntimeError):
    """wrk is not on PATH."""


def executable() -> str:
    """The wrk binary on PATH; WrkMissing (saying how to install it) otherwise."""
    found = shutil.which("wrk")
    if found is None:
        raise WrkMissing(f"the serving benchmark times its bursts with wrk, which is not installed: {INSTALL} "
                         f"(`make bench-serve` installs it when run as root with apt-get)")
    return found


def version() -> str:
    """wrk's version line, e.g. 'wrk 4.1.0 [epoll] ...' (wrk -v exits 1 after printing it)."""
    done = subprocess.run([executable(), "-v"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).strip().splitlines()[0]


@dataclass(frozen=True)
class BodyFiles:
    """Request bodies as wrk_bodies.lua reads them: `data` holds them back to back, `lengths` one size per line."""

    data: Path
    lengths: Path
    count: int
    content_type: str

    @classmethod
    def write(cls, bodies: Sequence[bytes], folder: Path, content_type: str) -> "BodyFiles":
        """Raises ValueError for an empty list."""
        if not bodies:
            raise ValueError("no bodies to send")
        folder.mkdir(parents=True, exist_ok=True)
        data, lengths = folder / "bodies.bin", folder / "bodies.len"
        data.write_bytes(b"".join(bodies))
        lengths.write_text("".join(f"{len(b)}\n" for b in bodies))
        return cls(data, lengths, len(bodies), content_type)


def command(url: str, path: str, bodies: BodyFiles, concurrency: int, seconds: float,
            headers: dict[str, str] | None = None, timeout_s: float = 60.0) -> list[str]:
    """The wrk command line of one burst: one thread, `concurrency` connections, `seconds` long (whole seconds,
    at least 1)."""
    duration = max(1, round(seconds))
    extra = [f"{name}: {value}" for name, value in (headers or {}).items()]
    return [executable(), "-t1", f"-c{concurrency}", f"-d{duration}s", f"--timeout={max(1, round(timeout_s))}s",
            "-s", str(SCRIPT), url, "--", str(bodies.data), str(bodies.lengths), path, bodies.content_type, *extra]


def parse_summary(stdout: str) -> dict[str, Any]:
    """The JSON line wrk_bodies.lua's done() prints (the last stdout line starting with '{'); ValueError if
    there is none."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise ValueError(f"wrk printed no summary: {stdout[-500:]!r}")
    return json.loads(lines[-1])


def summarize(raw: dict[str, Any], concurrency: int) -> dict[str, Any]:
    """wrk's summary in the benchmarks' run form: requests, seconds, requests/s, p50/p99 (ms), errors (non-2xx/3xx
    answers, socket errors and timeouts together, each kind also under `wrk_errors`)."""
    seconds = raw["duration_us"] / 1e6
    lat = raw["latency_us"]
    return {"requests": raw["requests"], "seconds": round(seconds, 3),
            "requests_per_s": round(raw["requests"] / seconds, 1) if seconds > 0 else None,
            "p50_ms": round(lat["p50"] / 1000, 3), "p99_ms": round(lat["p99"] / 1000, 3),
            "mean_ms": round(lat["mean"] / 1000, 3), "concurrency": concurrency,
            "errors": int(sum(raw["errors"].values())), "wrk_errors": raw["errors"]}


def burst(url: str, path: str, bodies: BodyFiles, concurrency: int, seconds: float,
          headers: dict[str, str] | None = None, timeout_s: float = 60.0) -> dict[str, Any]:
    """One timed burst (see `summarize` for the fields) plus `client_cpu_s`, the CPU seconds wrk used.

    Raises WrkMissing, or RuntimeError when wrk fails (its stderr in the message)."""
    argv = command(url, path, bodies, concurrency, seconds, headers, timeout_s)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=seconds + timeout_s + 30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip()[-500:]}")
    out = summarize(parse_summary(done.stdout), concurrency)
    out["client_cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3)
    log.debug("wrk %s: %s", " ".join(argv[1:5]), out)
    return out
