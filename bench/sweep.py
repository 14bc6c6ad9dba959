"""The settings sweep of `python -m bench.bench_serve --sweep-settings`: what one setting is, how it becomes an
archive's model-config.yaml and config.properties keys, the coordinate search over settings, and the driver that
measures them on live servers.

A setting is TorchServe's per-model knobs (workers, batchSize, maxBatchDelay), the handler's onnxruntime
threads, and the frontend's thread pools and queue (config.properties); its defaults are what export ships
(export.archive.ServeConfig). The search starts at the archive's own setting, walks the axes in order, measures
each value of an axis against the best setting found so far (both servers up, load bursts alternating between
them: bench/servers.py), and keeps a value only when it `wins`: more concurrency-16 throughput by `min_gain` (a
noisy machine must not flip a default on a blip) without worse single-request latency, or clearly lower
single-request latency without less throughput. The measurement is injected (`Compare`), so the search itself is
tested without a server; `SettingsSweep` is the measurement on live servers, `settings_sweep` the whole
procedure (A/A control, search, confirmation) and `run` its entry point.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from bench import servers
from bench.archives import rewrite_model_config
from bench.common import ratio
from bench.inprocess import InProcess
from bench.overhead import TARGET, cpu_bound_estimate
from early_exit.manifest import Manifest
from export.archive import ServeConfig

log = logging.getLogger("bench.sweep")
_SHIPPED = ServeConfig()


@dataclass(frozen=True)
class Setting:
    """One server setting. Defaults: what export ships (export.archive.ServeConfig and its handler section)."""

    workers: int = _SHIPPED.min_workers  # minWorkers = maxWorkers
    batch_size: int = _SHIPPED.batch_size  # batchSize
    max_batch_delay: int = _SHIPPED.max_batch_delay  # maxBatchDelay, ms
    intra_op_threads: int = _SHIPPED.handler.intra_op_threads  # handler.intra_op_threads: threads per session
    # config.properties; None keeps the shipped file's value (absent there: TorchServe's default, which for
    # both netty pools is the number of logical CPUs)
    netty_threads: int | None = None  # number_of_netty_threads: frontend event loops (HTTP in/out)
    netty_client_threads: int | None = None  # netty_client_threads: backend loops (worker sockets)
    job_queue_size: int | None = None  # job_queue_size: requests queued per model before 503

    @classmethod
    def from_model_config(cls, config: ServeConfig, **server: Any) -> "Setting":
        """The setting an archive's model-config.yaml serves (minWorkers as the worker count); `server`: the
        config.properties fields."""
        return cls(workers=config.min_workers, batch_size=config.batch_size, max_batch_delay=config.max_batch_delay,
                   intra_op_threads=config.handler.intra_op_threads, **server)

    def model_config(self, base: ServeConfig) -> ServeConfig:
        """`base` (an archive's model-config.yaml) with this setting's per-model keys, validated (ExportError for
        a value ServeConfig refuses)."""
        values = base.model_dump(exclude={"handler"})
        values.update(min_workers=self.workers, max_workers=self.workers, batch_size=self.batch_size,
                      max_batch_delay=self.max_batch_delay)
        return ServeConfig.from_values(handler={**base.handler.to_config(), "intra_op_threads": self.intra_op_threads},
                                       **values)

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
    "netty_threads": (1, 4),  # unset = TorchServe's default, the logical CPU count
    "netty_client_threads": (1, 4),
    "job_queue_size": (64, 1024),  # only matters once more requests queue than the concurrency sends
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


# ------------------------------------------------------------------------------------- on live servers
class SettingsSweep:
    """Compares settings side by side: a fresh server per setting (the archive rewritten with its model-config,
    config.properties keys over ours), all warmed up alike, then `rounds` rounds of a concurrency-16 burst and a
    concurrency-1 burst per server, order alternating, plus the in-process loop with the candidate's batch size
    and threads. Fresh servers on both sides: a server that has run longer has a warmer JIT and would beat a
    fresh copy of its own setting. At most two servers run at once."""

    def __init__(self, archive: Path, folder: Path, manifest: Manifest, work: Path, bodies: Sequence[bytes],
                 warmup_s: float, rounds: int, burst_s: float, c1_s: float = 0.0) -> None:
        self.archive, self.work = archive, work
        self.bodies, self.warmup_s, self.rounds, self.burst_s, self.c1_s = bodies, warmup_s, rounds, burst_s, c1_s
        self.limit = InProcess(folder, manifest)

    def in_process(self, setting: Setting) -> dict[str, Any]:
        """One in-process run of every body at the setting's batch size and threads (InProcess.run's run)."""
        return self.limit.run(self.bodies, setting.batch_size, setting.intra_op_threads)[0]

    def interleaved(self, settings: Sequence[Setting], rounds: int, with_in_process: bool = False,
                    c1: bool = False) -> list[dict[str, list[dict[str, Any]]]]:
        """One fresh server per entry of `settings` (an entry may repeat: an A/A control), warmed up alike; then
        `rounds` rounds of one concurrency-16 burst each (order alternating), with_in_process one in-process burst
        right after each HTTP burst, with c1 a concurrency-1 burst right after each concurrency-16 burst. Returns per
        entry {"http": [runs], "in_process": [runs], "c1": [runs]}."""
        out: list[dict[str, list[dict[str, Any]]]] = [{"http": [], "in_process": [], "c1": []} for _ in settings]
        live: list[servers.Running] = []
        try:
            targets = []
            for s in settings:
                archive = rewrite_model_config(self.archive, self.work / s.label() / self.archive.name, s.model_config)
                targets.append(servers.Target(s.label(), archive, s.server_config()))
            live = servers.start_all(targets, self.work)
            for running in live:
                running.warm_up(self.bodies, self.warmup_s)
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

    def __call__(self, candidate: Setting, reference: Setting) -> dict[str, Any]:
        """A `Compare`: the candidate's medians, its paired ratio over the reference, c=1 latency of both, and
        its HTTP / in-process ratio (wall time and CPU-bound estimate)."""
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

    def control(self, base: Setting) -> dict[str, Any]:
        """A/A: two fresh servers with the same setting; how far from 1.0 their paired ratio lands is the noise
        floor of one comparison on this machine now."""
        a, b = self.interleaved([base, base], self.rounds)
        return {"setting": base.label(), "paired_ratio": servers.paired_ratio(b["http"], a["http"]),
                "requests_per_s": [servers.medians(a["http"])["requests_per_s"],
                                   servers.medians(b["http"])["requests_per_s"]]}

    def confirm(self, base: Setting, best: Setting, rounds: int) -> dict[str, Any]:
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


class Measure(Protocol):
    """What `settings_sweep` measures with (SettingsSweep, or a fake in tests): a `Compare` plus `confirm`; an
    optional `control(base)` (the A/A noise floor) is used when present."""

    def __call__(self, candidate: Setting, reference: Setting) -> dict[str, Any]: ...

    def confirm(self, base: Setting, best: Setting, rounds: int) -> dict[str, Any]: ...


def settings_sweep(measure: Measure, base: Setting, axes: dict[str, Sequence[Any]], confirm_rounds: int,
                   min_gain: float, max_c1_p50_increase: float = 0.25) -> dict[str, Any]:
    """An A/A control, the coordinate sweep (paired comparisons), then base and best confirmed A/B/A/B with the
    in-process limit measured beside each; the recommendation stands only if the confirmation repeats the gain.
    A gain must exceed both min_gain and the A/A control's distance from 1 (the noise floor right now)."""
    control_fn: Callable[[Setting], dict[str, Any]] | None = getattr(measure, "control", None)
    control = control_fn(base) if control_fn is not None else None
    noise = abs(1.0 - control["paired_ratio"]["median"]) if control and control["paired_ratio"]["median"] else 0.0
    gain_needed = round(max(min_gain, noise), 3)
    best, rows = coordinate_sweep(base, axes, measure, gain_needed, max_c1_p50_increase)
    confirm = measure.confirm(base, best, confirm_rounds)
    gain = confirm["best_over_base"]["median"]
    c1 = {which: (confirm[which].get("c1") or {}).get("p50_ms") for which in ("base", "best")}
    confirmed = best != base and gain is not None and wins(
        {"errors": 0, "paired_ratio": gain, "c1_p50_ms": c1["best"], "reference_c1_p50_ms": c1["base"]},
        gain_needed, max_c1_p50_increase)
    chosen = best if confirmed else base
    chosen_confirm = confirm["best" if confirmed else "base"]
    chosen_ratio = chosen_confirm["http_vs_in_process"]["median"]
    return {
        "objective": "requests/s at concurrency 16 (HTTP, early exit at the default budget), no errors; each "
                     "candidate against the best so far, interleaved",
        "min_gain": min_gain, "gain_needed": gain_needed, "max_c1_p50_increase": max_c1_p50_increase,
        "axes": {k: list(v) for k, v in axes.items()}, "base": base.to_dict(),
        "noise_control": control, "rows": rows, "sweep_best": best.to_dict(), "confirm": confirm,
        "best_over_base": gain,
        "confirmed": confirmed, "chosen": chosen.to_dict(), "chosen_label": chosen.label(),
        "http_vs_in_process_c16": {"ratio": chosen_ratio, "target": TARGET,
                                   "meets_target": None if chosen_ratio is None else chosen_ratio >= TARGET,
                                   "cpu": chosen_confirm.get("cpu")},
        "recommended_defaults": recommendation(base, chosen),
    }


@dataclass(frozen=True)
class SweepOptions:
    """How long and how often the sweep measures (bench_serve's --settings-* flags)."""

    warmup_s: float  # wrk load per fresh server before its bursts
    burst_s: float  # each concurrency-16 burst
    c1_s: float  # each concurrency-1 burst (0: none)
    rounds: int  # bursts per setting in each comparison
    confirm_rounds: int  # A/B rounds of base against the best
    min_gain: float  # relative gain a setting needs to win (raised to the A/A noise floor)
    max_c1_p50_increase: float  # a setting whose c=1 p50 exceeds the reference's by more never wins


def run(archive: Path, folder: Path, manifest: Manifest, config: ServeConfig, work: Path, bodies: Sequence[bytes],
        axes: dict[str, Sequence[Any]], options: SweepOptions) -> dict[str, Any]:
    """The settings sweep from the archive's own setting (`config`, its model-config.yaml) over `axes`, sending
    `bodies` (cycling) and running them in process; servers and rewritten archives live under `work`. Returns
    the result's `settings_sweep` section."""
    measure = SettingsSweep(archive, folder, manifest, work, bodies, options.warmup_s, options.rounds,
                            options.burst_s, options.c1_s)
    return {"images": len(bodies), "seconds_per_burst": options.burst_s, "rounds_per_comparison": options.rounds,
            "concurrency": 16,
            **settings_sweep(measure, Setting.from_model_config(config), axes, options.confirm_rounds,
                             options.min_gain, options.max_c1_p50_increase)}
