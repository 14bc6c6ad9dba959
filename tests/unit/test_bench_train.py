"""bench-train's report of the recipe targets: measured figures, never adjusted, met or missed."""
from __future__ import annotations

from bench.bench_train import targets


def _method(exit1_maxavg: float, worst: list[float], robust: float, cost_ratio: float) -> dict:
    return {
        "exits": [{"adv_acc": {"max-average": exit1_maxavg if k == 0 else 0.9, "strong_worst_case": w}}
                  for k, w in enumerate(worst)],
        "policy_default_budget": {"robust_accuracy": robust, "robust_cost_over_full_network": cost_ratio},
    }


def test_targets_report_each_figure_and_whether_it_is_met() -> None:
    neokd = _method(0.86, [0.80, 0.87, 0.89], 0.84, 0.45)
    adv = _method(0.70, [0.81, 0.85, 0.88], 0.80, 0.50)
    t = targets({"neokd": neokd, "adv": adv})
    assert t["neokd_exit1_pgd40_max_average"] == {"measured": 0.86, "target": 0.85, "met": True}
    assert t["neokd_last_exit_strong_worst_case"]["met"] is True
    assert t["policy_robust_accuracy_default_budget"] == {"measured": 0.84, "target": 0.85, "met": False}
    assert t["policy_robust_cost_over_full_network"]["met"] is True
    # exit 1: 0.80 < 0.81, so neokd is not at least adv on every exit
    assert t["neokd_at_least_adv_every_exit"]["met"] is False


def _summary(with_machine_rate: bool) -> dict:
    summary = {"timing": {"iterations": 10, "seconds": 20.0, "parts_s": {"attack": 12.0, "update": 6.0, "data": 2.0},
                          "ms_per_iteration": {}, "share": {}, "attack_step_ms_per_exit": []}}
    if with_machine_rate:
        summary["machine_rate"] = {"iteration_gflop": {"attack": 30.0, "update": 10.0, "total": 40.0}}
        summary["efficiency"] = {"achieved_gflops_per_s": 20.0, "machine_gflops_per_s": 80.0, "ratio": 0.25}
    return summary


def test_compute_bound_carries_the_machine_rate_from_train_json() -> None:
    from bench.bench_train import compute_bound

    bound = compute_bound(_summary(True), batch_size=8)
    assert abs(bound["ratio"] - 18.0 / 20.0) < 1e-12  # the in-run bound: compute seconds over iteration seconds
    assert bound["machine_ratio"] == 0.25 and bound["machine_gflops_per_s"] == 80.0
    assert bound["iteration_gflop"]["total"] == 40.0
    # a run trained before train.json had a machine rate: no machine figures, nothing made up
    assert "machine_ratio" not in compute_bound(_summary(False), batch_size=8)
