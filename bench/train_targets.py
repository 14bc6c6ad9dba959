"""bench-train's recipe targets, per preset: a small typed table (`PRESET_TARGETS`) and how each is judged.

Every target records the measured figure, its threshold and whether it is met (never adjusted); an accuracy
carries its 95% Wilson interval (bench.intervals) over the images it was measured on, a neokd - adv difference
its Newcombe interval. A figure with no threshold (DeepSloth's cost rise) is reported, `met` None.

The input, `methods`, is bench_train's per-method results ("adv", "neokd"), built from eval.json:
`exits[k]` (clean_acc on all `samples.clean_test` test images, adv_acc on the `samples.attacked` attacked ones),
`policy_default_budget` (the deployed policy at the default budget, on the attacked images), `slowdown`
(eval.json's slowdown rows) and `slowdown_runs` (eval.json's slowdown_attack runs: set name and radius).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Mapping

from bench.intervals import Interval, accuracy_interval, difference_interval


class Direction(str, Enum):
    """How a measured figure is held against its threshold."""

    AT_LEAST = ">="
    AT_MOST = "<="


@dataclass(frozen=True)
class Judged:
    """One target's outcome: measured value, threshold (None: reported only) and its interval if any."""

    measured: Any
    target: float | None = None
    direction: Direction = Direction.AT_LEAST
    interval: Interval | None = None

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        if self.direction is Direction.AT_LEAST:
            return self.measured >= self.target
        return self.measured <= self.target

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"measured": self.measured, "target": self.target, "met": self.met}
        if self.target is not None:
            out["direction"] = self.direction.value
        if self.interval is not None:
            out["interval"] = self.interval.to_list()
        return out


def _n_attacked(method: Mapping[str, Any]) -> int:
    return int(method["samples"]["attacked"])


def strong_worst_case_differences(methods: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per exit: neokd's and adv's strong worst case, their difference and its Newcombe 95% interval
    (both measured on the same attacked images, so the interval is conservative; bench.intervals)."""
    neokd, adv = methods["neokd"], methods["adv"]
    rows = []
    for n_exit, a_exit in zip(neokd["exits"], adv["exits"]):
        n, a = n_exit["adv_acc"]["strong_worst_case"], a_exit["adv_acc"]["strong_worst_case"]
        rows.append({"exit": n_exit["exit"], "neokd": n, "adv": a, "difference": n - a,
                     "interval": difference_interval(n, _n_attacked(neokd), a, _n_attacked(adv)).to_list()})
    return rows


def _neokd_at_least_adv(methods: Mapping[str, Any]) -> dict[str, Any]:
    """neokd >= adv on every exit under the strong suite (per-exit pairs and their difference intervals)."""
    rows = strong_worst_case_differences(methods)
    return {"measured": [(r["neokd"], r["adv"]) for r in rows], "met": all(r["difference"] >= 0 for r in rows),
            "differences": rows}


def _policy_rows(method: Mapping[str, Any], robust_accuracy: float, robust_cost: float) -> dict[str, Judged]:
    """The deployed policy at the default budget under attack: robust accuracy >= `robust_accuracy` (with its
    interval) and mean staged cost <= `robust_cost` of the full network."""
    policy = method["policy_default_budget"]
    return {
        "policy_robust_accuracy_default_budget": Judged(
            policy["robust_accuracy"], robust_accuracy,
            interval=accuracy_interval(policy["robust_accuracy"], _n_attacked(method))),
        "policy_robust_cost_over_full_network": Judged(policy["robust_cost_over_full_network"], robust_cost,
                                                       Direction.AT_MOST),
    }


def _with_comparison(rows: Mapping[str, Judged], methods: Mapping[str, Any]) -> dict[str, Any]:
    """`rows` as JSON, then neokd >= adv on every exit."""
    return {**{name: j.to_dict() for name, j in rows.items()},
            "neokd_at_least_adv_every_exit": _neokd_at_least_adv(methods)}


@dataclass(frozen=True)
class MnistTargets:
    """mnist-quick's targets (issue 9)."""

    exit1_max_average: float = 0.85
    last_exit_strong_worst_case: float = 0.88
    policy_robust_accuracy: float = 0.85
    policy_robust_cost: float = 0.5  # of the full network's staged cost, under attack
    source: ClassVar[str] = (
        "issue 9: neokd exit 1 PGD-40 max-average >= 0.85; neokd last exit strong worst case >= 0.88; policy "
        "robust accuracy at the default budget >= 0.85 at <= 0.5 of the full network; neokd >= adv per exit "
        "(strong worst case)")

    def judge(self, methods: Mapping[str, Any]) -> dict[str, Any]:
        neokd = methods["neokd"]
        exit1, last = neokd["exits"][0]["adv_acc"]["max-average"], neokd["exits"][-1]["adv_acc"]["strong_worst_case"]
        rows = {
            "neokd_exit1_pgd40_max_average": Judged(exit1, self.exit1_max_average,
                                                    interval=accuracy_interval(exit1, _n_attacked(neokd))),
            "neokd_last_exit_strong_worst_case": Judged(last, self.last_exit_strong_worst_case,
                                                        interval=accuracy_interval(last, _n_attacked(neokd))),
            **_policy_rows(neokd, self.policy_robust_accuracy, self.policy_robust_cost),
        }
        return _with_comparison(rows, methods)


@dataclass(frozen=True)
class PhotoTargets:
    """cifar10-jpeg-quick's targets (the photo preset)."""

    final_exit_clean: float = 0.65
    final_exit_strong_worst_case: float = 0.30
    policy_margin: float = 0.01  # the policy's robust accuracy may fall this far below the final exit's
    policy_robust_cost: float = 0.7  # of the full network's staged cost, under attack
    policy_clean_cost: float = 0.5  # of the full network's staged cost, on clean images
    deepsloth_eps: float = 8 / 255
    source: ClassVar[str] = (
        "photo preset: neokd final exit clean >= 0.65 and strong worst case >= 0.30; the deployed policy at the "
        "default budget: robust accuracy >= the final exit's strong worst case - 0.01 (same images) at mean staged "
        "cost <= 0.7 of the full network under attack and <= 0.5 on clean images; neokd >= adv on every exit "
        "(strong worst case); DeepSloth at eps 8/255: the rise in mean cost with and without a budget cap "
        "(reported)")

    def judge_one(self, method: Mapping[str, Any]) -> dict[str, Judged]:
        """The targets that concern one trained model (`method`, bench_train.evaluation_figures of its
        eval.json): its final exit and its deployed policy; neokd >= adv and DeepSloth are left to `judge`."""
        last = method["exits"][-1]
        clean, worst = last["clean_acc"], last["adv_acc"]["strong_worst_case"]
        clean_cost = method["policy_default_budget"]["clean_cost_over_full_network"]
        return {
            "neokd_final_exit_clean": Judged(clean, self.final_exit_clean,
                                             interval=accuracy_interval(clean, method["samples"]["clean_test"])),
            "neokd_final_exit_strong_worst_case": Judged(worst, self.final_exit_strong_worst_case,
                                                         interval=accuracy_interval(worst, _n_attacked(method))),
            **_policy_rows(method, worst - self.policy_margin, self.policy_robust_cost),
            "policy_clean_cost_over_full_network": Judged(clean_cost, self.policy_clean_cost, Direction.AT_MOST),
        }

    def judge(self, methods: Mapping[str, Any]) -> dict[str, Any]:
        neokd = methods["neokd"]
        return {**_with_comparison(self.judge_one(neokd), methods), **deepsloth_cost_rise(neokd, self.deepsloth_eps)}


def deepsloth_cost_rise(method: Mapping[str, Any], eps: float) -> dict[str, Any]:
    """DeepSloth at radius `eps`: the rise in the policy's mean staged cost over clean images, at the default
    budget (no cap: every exit allowed) and at the deepest capped budget row, if the calibration has one.

    Reported figures (no threshold). KeyError if the evaluation ran no DeepSloth set at `eps`."""
    name = next((r["name"] for r in method["slowdown_runs"] if math.isclose(r["eps"], eps, rel_tol=1e-6)), None)
    if name is None:
        raise KeyError(f"no DeepSloth set at eps {eps:.4g} in the evaluation "
                       f"(it ran {[r['eps'] for r in method['slowdown_runs']]})")
    rows = method["slowdown"]
    full = method["exits"][-1]["staged_mflops"]
    uncapped = rows[-1]
    capped = [r for r in rows if r["max_exit"] < uncapped["max_exit"]]
    out = {}
    for key, row in (("deepsloth_cost_rise_no_cap", uncapped), ("deepsloth_cost_rise_with_cap",
                                                                 capped[-1] if capped else None)):
        if row is None:
            continue
        rise = row["cost_rise"][name]
        out[key] = Judged({"set": name, "budget_mflops": row["budget_mflops"], "max_exit": row["max_exit"],
                           "clean_mean_mflops": row["clean"]["mean_mflops"],
                           "attacked_mean_mflops": row[name]["mean_mflops"], "cost_rise_mflops": rise,
                           "cost_rise_over_full_network": rise / full}).to_dict()
    return out


PRESET_TARGETS: dict[str, MnistTargets | PhotoTargets] = {
    "mnist-quick": MnistTargets(),
    "cifar10-jpeg-quick": PhotoTargets(),
}


def targets(methods: Mapping[str, Any], preset: str = "mnist-quick") -> dict[str, Any]:
    """The preset's targets judged on `methods`, with their `source` text; only the source for a preset
    without targets."""
    table = PRESET_TARGETS.get(preset)
    if table is None:
        return {"source": f"no targets are recorded for preset {preset!r} (bench/train_targets.py PRESET_TARGETS)"}
    return {"source": table.source, **table.judge(methods)}
