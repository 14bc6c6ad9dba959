"""Server settings for `python -m bench.bench_serve --sweep-settings`: what one setting is, how it becomes an
archive's model-config.yaml and config.properties keys, and the coordinate search over them.

A setting is TorchServe's per-model knobs (workers, batchSize, maxBatchDelay), the handler's onnxruntime
threads, and the frontend's thread pools and queue (config.properties). The search starts at the archive's
own setting, walks the axes in order, measures each value of an axis against the best setting found so far
(both servers up, load bursts alternating between them: bench/servers.py), and keeps a value only when it
`wins`: more concurrency-16 throughput by `min_gain` (a noisy 2-core machine must not flip a default on a 2%
blip) without worse single-request latency, or clearly lower single-request latency without less throughput.
The measurement is injected, so the search itself is tested without a server.
"""
from __future__ import annotations

import zipfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from export.archive import ServeConfig
from serving.options import HandlerOptions

MODEL_CONFIG = "model-config.yaml"
_SHIPPED, _HANDLER = ServeConfig(), HandlerOptions()


@dataclass(frozen=True)
class Setting:
    # defaults: what export ships (export.archive.ServeConfig, serving.options.HandlerOptions)
    workers: int = _SHIPPED.min_workers  # minWorkers = maxWorkers
    batch_size: int = _SHIPPED.batch_size  # batchSize
    max_batch_delay: int = _SHIPPED.max_batch_delay  # maxBatchDelay, ms
    intra_op_threads: int = _HANDLER.intra_op_threads  # handler.intra_op_threads: onnxruntime threads per session
    # config.properties; None keeps the shipped file's value (absent there: TorchServe's default, which for
    # both netty pools is the number of logical CPUs)
    netty_threads: int | None = None  # number_of_netty_threads: frontend event loops (HTTP in/out)
    netty_client_threads: int | None = None  # netty_client_threads: backend loops (worker sockets)
    job_queue_size: int | None = None  # job_queue_size: requests queued per model before 503

    @classmethod
    def from_model_config(cls, config: dict[str, Any], **server: Any) -> "Setting":
        handler = config.get("handler") or {}
        return cls(workers=int(config.get("minWorkers", 1)), batch_size=int(config.get("batchSize", 1)),
                   max_batch_delay=int(config.get("maxBatchDelay", 100)),
                   intra_op_threads=int(handler.get("intra_op_threads", 1)), **server)

    def model_config(self, base: dict[str, Any]) -> dict[str, Any]:
        """`base` (an archive's model-config.yaml) with this setting's per-model keys."""
        out = dict(base)
        out.update(minWorkers=self.workers, maxWorkers=self.workers, batchSize=self.batch_size,
                   maxBatchDelay=self.max_batch_delay)
        out["handler"] = {**(base.get("handler") or {}), "intra_op_threads": self.intra_op_threads}
        return out

    def server_config(self) -> dict[str, str]:
        """The config.properties keys this setting overrides (rendered by serving.server.render_config)."""
        keys = {"number_of_netty_threads": self.netty_threads, "netty_client_threads": self.netty_client_threads,
                "job_queue_size": self.job_queue_size}
        return {k: str(v) for k, v in keys.items() if v is not None}

    def label(self) -> str:
        parts = [f"w{self.workers}", f"b{self.batch_size}", f"d{self.max_batch_delay}", f"t{self.intra_op_threads}"]
        for short, value in (("n", self.netty_threads), ("nc", self.netty_client_threads), ("q", self.job_queue_size)):
            if value is not None:
                parts.append(f"{short}{value}")
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


AXES: dict[str, tuple[Any, ...]] = {
    "workers": (1, 2),
    "batch_size": (4, 8, 16, 32),
    "max_batch_delay": (1, 2, 5, 10),
    "intra_op_threads": (1, 2),
    "netty_threads": (1, 4),  # unset = TorchServe's default, the logical CPU count (2 here)
    "netty_client_threads": (1, 4),
    "job_queue_size": (64, 1024),  # serving/config.properties sets 256; only matters once 16+ requests queue
}
AXIS_NAMES = tuple(f.name for f in fields(Setting))


def parse_axes(specs: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """`name=v1,v2` strings -> axes (values as ints); an unknown name is a ValueError."""
    out: dict[str, tuple[Any, ...]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        if not sep or name not in AXIS_NAMES:
            raise ValueError(f"bad axis {spec!r}: expected NAME=V1,V2 with NAME one of {', '.join(AXIS_NAMES)}")
        out[name] = tuple(int(v) for v in values.split(",") if v.strip())
    return out


Compare = Callable[[Setting, Setting], dict[str, Any]]
"""(candidate, reference) -> a row measured with the two interleaved: at least `paired_ratio` (candidate's
requests/s over the reference's, per round, median) and `errors`."""


def wins(row: dict[str, Any], min_gain: float, max_c1_p50_increase: float = 0.25, min_c1_p50_gain: float = 0.2
         ) -> bool:
    """Does a candidate beat its reference? Never with errors. Either on throughput: paired concurrency-16 ratio
    >= 1 + min_gain, with a concurrency-1 p50 at most max_c1_p50_increase above the reference's (throughput bought
    with single-request latency, e.g. a longer maxBatchDelay, does not win); or on latency: concurrency-1 p50 at
    least min_c1_p50_gain below the reference's, with a concurrency-16 ratio no worse than 1 - min_gain."""
    if row.get("errors"):
        return False
    paired = row.get("paired_ratio") or 0.0
    c1, ref_c1 = row.get("c1_p50_ms"), row.get("reference_c1_p50_ms")
    if c1 is None or ref_c1 is None:
        return paired >= 1.0 + min_gain
    if paired >= 1.0 + min_gain and c1 <= ref_c1 * (1.0 + max_c1_p50_increase):
        return True
    return paired >= 1.0 - min_gain and c1 <= ref_c1 * (1.0 - min_c1_p50_gain)


def coordinate_sweep(base: Setting, axes: dict[str, Sequence[Any]], compare: Compare, min_gain: float = 0.05,
                     max_c1_p50_increase: float = 0.25, min_c1_p50_gain: float = 0.2
                     ) -> tuple[Setting, list[dict[str, Any]]]:
    """Walk the axes in order, each value against the best setting so far; a value replaces the best when it
    `wins`. Returns (best, one row per measured candidate, in order)."""
    rows: list[dict[str, Any]] = []
    seen = {base}
    best = base
    for axis, values in axes.items():
        for value in values:
            candidate = replace(best, **{axis: value})
            if candidate in seen:
                continue
            seen.add(candidate)
            row = {"setting": candidate.to_dict(), "label": candidate.label(), "axis": axis,
                   "reference": best.label(), **compare(candidate, best)}
            row["won"] = wins(row, min_gain, max_c1_p50_increase, min_c1_p50_gain)
            rows.append(row)
            if row["won"]:
                best = candidate
    return best, rows


def rewrite_model_config(archive: Path, out: Path, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> Path:
    """A copy of the archive whose model-config.yaml is edit(old config); every other entry unchanged."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == MODEL_CONFIG:
                data = yaml.safe_dump(edit(yaml.safe_load(data) or {}), sort_keys=False).encode()
            dst.writestr(item, data)
    return out


def recommendation(base: Setting, best: Setting) -> dict[str, Any]:
    """Which defaults to change: export.archive.ServeConfig fields and serving/config.properties keys."""
    serve_fields = {"workers": ("min_workers", "max_workers"), "batch_size": ("batch_size",),
                    "max_batch_delay": ("max_batch_delay",), "intra_op_threads": ("handler.intra_op_threads",)}
    serve: dict[str, Any] = {}
    for name, targets in serve_fields.items():
        if getattr(best, name) != getattr(base, name):
            serve.update({t: getattr(best, name) for t in targets})
    props = {k: v for k, v in best.server_config().items() if base.server_config().get(k) != v}
    return {"export.archive.ServeConfig": serve, "serving/config.properties": props,
            "unchanged": not serve and not props}
