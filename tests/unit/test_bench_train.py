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
