"""bench-train's report of the recipe targets: measured figures, never adjusted, met or missed, per preset."""
from __future__ import annotations

import pytest

from bench.intervals import accuracy_interval, difference_interval
from bench.train_targets import PRESET_TARGETS, MnistTargets, PhotoTargets, targets

N_ATTACKED, N_TEST = 1000, 10000


def _method(exit1_maxavg: float, worst: list[float], robust: float, cost_ratio: float, clean: float = 0.99,
            clean_cost_ratio: float = 0.2) -> dict:
    """bench_train's per-method result, as far as the targets read it (figures are counts out of the images)."""
    return {
        "samples": {"attacked": N_ATTACKED, "clean_test": N_TEST},
        "exits": [{"exit": k + 1, "staged_mflops": 10.0 * (k + 1), "clean_acc": clean,
                   "adv_acc": {"max-average": exit1_maxavg if k == 0 else 0.9, "strong_worst_case": w}}
                  for k, w in enumerate(worst)],
        "policy_default_budget": {"robust_accuracy": robust, "robust_cost_over_full_network": cost_ratio,
                                  "clean_cost_over_full_network": clean_cost_ratio},
    }


def test_mnist_targets_report_each_figure_and_whether_it_is_met() -> None:
    neokd = _method(0.86, [0.80, 0.87, 0.89], 0.84, 0.45)
    adv = _method(0.70, [0.81, 0.85, 0.88], 0.80, 0.50)
    t = targets({"neokd": neokd, "adv": adv}, "mnist-quick")
    assert t["source"] == MnistTargets.source
    assert t["neokd_exit1_pgd40_max_average"] == {"measured": 0.86, "target": 0.85, "met": True, "direction": ">=",
                                                  "interval": accuracy_interval(0.86, N_ATTACKED).to_list()}
    assert t["neokd_last_exit_strong_worst_case"]["met"] is True
    assert t["policy_robust_accuracy_default_budget"]["met"] is False
    assert t["policy_robust_accuracy_default_budget"]["target"] == 0.85
    assert t["policy_robust_cost_over_full_network"]["met"] is True
    # exit 1: 0.80 < 0.81, so neokd is not at least adv on every exit
    every = t["neokd_at_least_adv_every_exit"]
    assert every["met"] is False and every["measured"][0] == (0.80, 0.81)
    assert every["differences"][0]["interval"] == difference_interval(0.80, N_ATTACKED, 0.81, N_ATTACKED).to_list()
    assert not any(name.startswith("deepsloth") for name in t)


def _slowdown_row(budget: float, max_exit: int, clean_mflops: float, attacked_mflops: float) -> dict:
    return {"budget_mflops": budget, "max_exit": max_exit, "clean": {"mean_mflops": clean_mflops},
            "deepsloth": {"mean_mflops": attacked_mflops},
            "cost_rise": {"deepsloth": attacked_mflops - clean_mflops}}


def _photo(robust: float, worst_last: float) -> dict:
    neokd = _method(0.5, [0.20, 0.28, worst_last], robust, 0.65, clean=0.66, clean_cost_ratio=0.55)
    neokd["slowdown_runs"] = [{"name": "deepsloth", "eps": 8 / 255}]
    neokd["slowdown"] = [_slowdown_row(10.0, 1, 10.0, 10.0), _slowdown_row(20.0, 2, 12.0, 19.0),
                         _slowdown_row(30.0, 3, 14.0, 27.0)]
    return neokd


def test_photo_targets_hold_the_policy_to_the_final_exits_worst_case_on_the_same_images() -> None:
    neokd, adv = _photo(robust=0.305, worst_last=0.31), _method(0.4, [0.19, 0.28, 0.33], 0.3, 0.6)
    t = targets({"neokd": neokd, "adv": adv}, "cifar10-jpeg-quick")
    assert t["source"] == PhotoTargets.source
    assert t["neokd_final_exit_clean"] == {"measured": 0.66, "target": 0.65, "met": True, "direction": ">=",
                                           "interval": accuracy_interval(0.66, N_TEST).to_list()}
    assert t["neokd_final_exit_strong_worst_case"]["met"] is True
    policy = t["policy_robust_accuracy_default_budget"]
    assert policy["target"] == pytest.approx(0.30) and policy["met"] is True  # 0.305 >= 0.31 - 0.01
    assert t["policy_robust_cost_over_full_network"]["met"] is True  # 0.65 <= 0.7
    assert t["policy_clean_cost_over_full_network"] == {"measured": 0.55, "target": 0.5, "met": False,
                                                        "direction": "<="}
    assert t["neokd_at_least_adv_every_exit"]["met"] is False  # exit 3: 0.31 < 0.33
    no_cap, cap = t["deepsloth_cost_rise_no_cap"], t["deepsloth_cost_rise_with_cap"]
    assert no_cap["met"] is None and no_cap["target"] is None  # reported, no threshold
    assert no_cap["measured"]["cost_rise_mflops"] == 13.0 and no_cap["measured"]["max_exit"] == 3
    assert no_cap["measured"]["cost_rise_over_full_network"] == pytest.approx(13.0 / 30.0)
    assert cap["measured"]["cost_rise_mflops"] == 7.0 and cap["measured"]["budget_mflops"] == 20.0
    lower = targets({"neokd": _photo(robust=0.29, worst_last=0.31), "adv": adv}, "cifar10-jpeg-quick")
    assert lower["policy_robust_accuracy_default_budget"]["met"] is False


def test_deepsloth_rise_needs_a_set_at_its_radius_and_other_presets_have_no_targets() -> None:
    neokd, adv = _photo(0.3, 0.3), _method(0.4, [0.19, 0.28, 0.29], 0.3, 0.6)
    neokd["slowdown_runs"] = [{"name": "deepsloth", "eps": 0.3}]
    with pytest.raises(KeyError, match="no DeepSloth set at eps 0.03137"):
        targets({"neokd": neokd, "adv": adv}, "cifar10-jpeg-quick")
    assert set(targets({"neokd": neokd, "adv": adv}, "cifar10-paper")) == {"source"}
    assert set(PRESET_TARGETS) == {"mnist-quick", "cifar10-jpeg-quick"}


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


def test_the_benchmark_attacks_at_least_its_minimum_whatever_the_presets_evaluation_size() -> None:
    from bench.bench_train import MIN_ATTACKED, attacked_limit
    from training.config import load_config

    photo = load_config("cifar10-jpeg-quick")  # the preset sizes its own evaluation for the CPU (500)
    assert photo.eval_limit < MIN_ATTACKED and attacked_limit(photo) == MIN_ATTACKED
    more = load_config("cifar10-jpeg-quick", [f"eval_limit={MIN_ATTACKED + 500}"])
    assert attacked_limit(more) == MIN_ATTACKED + 500  # a larger evaluation is kept
    assert attacked_limit(load_config("cifar10-jpeg-quick", ["eval_limit=null"])) is None  # the whole test split
