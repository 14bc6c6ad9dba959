"""`make bench-train`: train `adv` and `neokd` with the same preset, seed and budget; evaluate both alike.

Writes bench/results/train-<preset>.json and .md: per exit and for the deployed policy, the accuracies with their
95% Wilson intervals (bench.intervals), neokd - adv per exit with Newcombe's interval, and the preset's targets
(bench.train_targets), each measured, with its threshold and whether it is met. For an image-folder preset also
train-<preset>-photos-exit<k>.png: sample test photos per exit, clean and under DeepSloth (bench.photo_grid).

Throughput against a bound, both from the same training run: training times every part of its iterations
(train.json `timing`, training/train.py): data loading, each exit's attack (PGD steps take gradients with
respect to the input only), the attack's scoring forwards, the update (forward, loss, backward, optimizer
step). The bound is the throughput the run would have if its iterations did nothing but the measured
compute (attack, scoring, update): batch / (their seconds per iteration). Measured throughput divides
by the whole iteration time, which contains those parts, so ratio = compute time / iteration time <= 1;
what is left (data, bookkeeping) is the loop's overhead. The breakdown per part, per iteration and per
attack step of each exit, is in the JSON, with the FLOP rate each part achieves (from the model's cost
profile: an input-gradient step on exit k ~ 2x the anytime forward of exit k, a scoring pass = the full
staged forward per candidate, the update ~ 3x the staged forward on the clean and adversarial rows).

That bound is about 1 by construction. The machine's own rate is the other bound (train.json `machine_rate`
and `efficiency`, training/train.py `measure_machine_rate`): the GFLOP/s of one plain forward and backward of the
whole network at the training batch size, timed in the same run, against the GFLOP/s the training iterations
achieved (FlopCounterMode over one whole iteration, attack steps on truncated prefixes included, times the
iterations, over the training seconds). Its ratio shows what truncated prefixes, mode switches, data loading and
Python overhead cost.
"""
from __future__ import annotations

import argparse
import shutil
import json
import logging
from pathlib import Path
from typing import Any

from bench.common import machine, now, versions
from bench.intervals import Interval, accuracy_interval
from bench.photo_grid import photo_grids
from bench.train_targets import strong_worst_case_differences, targets
from training.calibrate import CalibrationError, calibration_path, read_calibration
from training.calibration_attack import calibrate_checkpoint
from training.checkpoint import load_checkpoint
from training.config import TrainConfig, TrainingAttack, load_config
from training.data import DatasetName
from training.evaluate import run_evaluation
from training.losses import Method
from training.train import train

log = logging.getLogger("bench.train")
RESULTS = Path(__file__).parent / "results"
COMPUTE_PARTS = ("attack", "update")  # `attack` holds each exit's PGD steps and the scoring forwards
# The benchmark attacks at least this many test images, whatever the preset's eval_limit: a preset may size its
# own evaluation for the CPU, the benchmark's figures may not be sized down (at 1,000 images the 95% interval of
# an accuracy near 0.5 is about +-3 points).
MIN_ATTACKED = 1000


def attacked_limit(cfg: TrainConfig) -> int | None:
    """Test images the benchmark attacks: the preset's eval_limit raised to MIN_ATTACKED (None: all of them)."""
    return None if cfg.eval_limit is None else max(cfg.eval_limit, MIN_ATTACKED)


def compute_bound(summary: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """Bound, ratio and breakdown from one run's train.json (see the module docstring)."""
    timing = summary["timing"]
    steps, parts = timing["iterations"], timing["parts_s"]
    compute_s = sum(parts.get(k, 0.0) for k in COMPUTE_PARTS)
    samples_per_rank = steps * batch_size
    measured = samples_per_rank / max(timing["seconds"], 1e-12)
    bound = samples_per_rank / max(compute_s, 1e-12)
    return {
        "samples_per_s": measured, "bound_samples_per_s": bound, "ratio": measured / bound,
        "ms_per_iteration": timing["ms_per_iteration"], "share": timing["share"],
        "attack_step_ms_per_exit": timing["attack_step_ms_per_exit"],
        **machine_efficiency(summary),
    }


def machine_efficiency(summary: dict[str, Any]) -> dict[str, Any]:
    """train.json's machine rate and the training's efficiency against it (empty for a run that predates them)."""
    if "efficiency" not in summary:
        return {}
    eff = summary["efficiency"]
    return {"machine_gflops_per_s": eff["machine_gflops_per_s"], "achieved_gflops_per_s": eff["achieved_gflops_per_s"],
            "machine_ratio": eff["ratio"], "iteration_gflop": summary["machine_rate"]["iteration_gflop"]}


def achieved_gflops(summary: dict[str, Any], cfg: TrainConfig) -> dict[str, float]:
    """FLOP rate of each timed part (estimates from the cost profile; see the module docstring)."""
    timing, cost = summary["timing"], summary["cost"]
    ms = timing["ms_per_iteration"]
    b, steps, k_exits = cfg.batch_size, cfg.attack_steps, len(cost["anytime_mflops"])
    out: dict[str, float] = {}
    if cfg.method is not Method.CLEAN and cfg.attack is TrainingAttack.MAX_AVERAGE:
        for k, anytime in enumerate(cost["anytime_mflops"]):
            key = f"attack/exit{k}"
            if ms.get(key):
                out[key] = 2 * anytime * b * steps / ms[key]
        if ms.get("attack/scoring"):
            out["attack/scoring"] = cost["staged_mflops"][-1] * b * k_exits / ms["attack/scoring"]
    rows = b if cfg.method is Method.CLEAN else 2 * b
    if ms.get("update"):
        out["update"] = 3 * cost["staged_mflops"][-1] * rows / ms["update"]
    return out


def _same_recipe(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two resolved configs train the same model (names and output folders aside)."""
    ignore = {"name", "out_dir"}
    return {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}


def find_reusable_run(cfg: TrainConfig, search: Path = Path("runs")) -> Path | None:
    """A finished run (e.g. `make train-export`'s) with exactly this recipe and a timed train.json."""
    for train_json in sorted(search.glob("*/train.json")):
        ckpt = train_json.parent / "checkpoint.pt"
        if not ckpt.is_file() or "timing" not in json.loads(train_json.read_text()):
            continue
        saved = load_checkpoint(ckpt)["config"]
        if _same_recipe(saved, cfg.to_dict()):
            return train_json.parent
    return None


def run_method(preset: str, method: Method, overrides: list[str], reuse: bool) -> tuple[dict[str, Any], TrainConfig]:
    cfg = load_config(preset, [f"method={method.value}", f"name=bench-{preset}-{method.value}",
                               "out_dir=runs/bench", *overrides])
    run_dir = find_reusable_run(cfg) if reuse else None
    reused = run_dir is not None
    if run_dir is None:
        run_dir = train(cfg, resume=False).parent
    else:
        log.info("reusing %s: it was trained with exactly this recipe", run_dir)
    ckpt = run_dir / "checkpoint.pt"
    summary = json.loads((run_dir / "train.json").read_text())
    limit = attacked_limit(cfg)
    eval_json = finished_evaluation(run_dir, cfg, limit)
    if eval_json is not None:
        log.info("reusing %s: the same checkpoint evaluated with the same settings", eval_json)
        ev = json.loads(eval_json.read_text())
    else:
        eval_json = Path("runs/bench") / f"eval-{method.value}" / "eval.json"
        try:  # the run's own calibration when it has one for these weights (the same config calibrated it)
            read_calibration(calibration_path(ckpt), ckpt)
        except CalibrationError:
            calibrate_checkpoint(ckpt)
        ev = run_evaluation(ckpt, out_dir=eval_json.parent, limit=limit)
    return {
        "train_seconds": summary["train_seconds"], "train_samples_per_s": summary["train_samples_per_s"],
        "steps": summary["steps"],
        "throughput": {**compute_bound(summary, cfg.batch_size), "achieved_gflops": achieved_gflops(summary, cfg)},
        "run_dir": str(run_dir), "reused": reused, **evaluation_figures(ev),
        "eval_json": str(eval_json),
    }, cfg


def evaluation_figures(ev: dict[str, Any]) -> dict[str, Any]:
    """What bench-train reports of one eval.json (`ev`, training/evaluate.py): per exit the accuracies clean (all
    `split_samples` images of the evaluated split: the test split for bench-train) and under each attack (the
    `attacked_samples` attacked ones), the deployed policy at the default budget (the calibration's last row), the
    slowdown rows; every accuracy with its 95% interval."""
    a = ev["anytime"]
    # clean_full / split_samples: the whole evaluated split (the test split for bench-train; equal to eval.json's
    # clean_full_test / test_samples there), so a validation-split evaluation reads the same way
    samples = {"attacked": ev["attacked_samples"], "clean_test": ev["split_samples"]}
    exits = []
    for k, (mf, anytime_mf) in enumerate(zip(ev["cost"]["staged_mflops"], ev["cost"]["anytime_mflops"])):
        adv_acc = {"max-average": a["max-average"][k], "average": a["average"][k],
                   "single": [s[k] for s in a["single"]], "pgd_worst_case": a["pgd_worst_case"][k],
                   **{name: a[name][k] for name in ("apgd-ce", "apgd-t") if name in a},
                   "strong_worst_case": a["worst_case"][k]}
        exits.append({
            "exit": k + 1, "staged_mflops": mf, "anytime_mflops": anytime_mf, "clean_acc": a["clean_full"][k],
            "clean_acc_attacked_subset": a["clean"][k], "adv_acc": adv_acc,
            "intervals": {"clean_acc": interval(a["clean_full"][k], samples["clean_test"]),
                          "clean_acc_attacked_subset": interval(a["clean"][k], samples["attacked"]),
                          **{name: interval(v, samples["attacked"]) for name, v in adv_acc.items()
                             if name != "single"}},
        })
    policy_default = ev["policy"]["budgets"][-1]
    full_network = ev["cost"]["anytime_mflops"][-1]
    return {
        "exits": exits, "samples": samples,
        "mean_adv_acc_max_average": sum(e["adv_acc"]["max-average"] for e in exits) / len(exits),
        "budgeted_default": ev["budgeted"]["budgets"][-1],
        "policy_default_budget": {
            "budget_mflops": policy_default["budget_mflops"], "clean_accuracy": policy_default["clean"]["accuracy"],
            "clean_mean_mflops": policy_default["clean"]["mean_mflops"],
            "robust_accuracy": policy_default["robust_accuracy"],
            "robust_mean_mflops": policy_default["robust_mean_mflops"],
            "robust_cost_over_full_network": policy_default["robust_mean_mflops"] / full_network,
            "clean_cost_over_full_network": policy_default["clean"]["mean_mflops"] / full_network,
            "weakest_set": policy_default.get("weakest_set"),
            "intervals": {"clean_accuracy": interval(policy_default["clean"]["accuracy"], samples["attacked"]),
                          "robust_accuracy": interval(policy_default["robust_accuracy"], samples["attacked"])}},
        "policy_by_budget": [{k: r[k] for k in ("budget_mflops", "max_exit", "robust_accuracy", "robust_mean_mflops")}
                             | {"clean_accuracy": r["clean"]["accuracy"]} for r in ev["policy"]["budgets"]],
        "slowdown": ev["slowdown"]["budgets"], "slowdown_runs": ev["slowdown_attack"]["runs"],
        "eval_seconds": ev.get("timing", {}).get("total_seconds"),
    }


def interval(accuracy: float, n: int) -> list[float]:
    """The 95% Wilson interval [low, high] of an accuracy measured on `n` images (bench.intervals)."""
    return accuracy_interval(accuracy, n).to_list()


def finished_evaluation(run_dir: Path, cfg: TrainConfig, limit: int | None) -> Path | None:
    """The run's own eval/eval.json (written by `make train-export`) when it describes exactly this checkpoint
    (calibration.json's sha256 of it) with this config's attack and calibration settings on `limit` attacked
    images; None otherwise."""
    from training.evaluate import attack_settings

    eval_json, ckpt = run_dir / "eval" / "eval.json", run_dir / "checkpoint.pt"
    try:
        read_calibration(calibration_path(ckpt), ckpt)  # raises unless written for exactly these weights
    except CalibrationError:
        return None
    if not eval_json.is_file() or eval_json.stat().st_mtime < calibration_path(ckpt).stat().st_mtime:
        return None
    ev = json.loads(eval_json.read_text())
    calibration = ev.get("calibration") or {}
    robust = calibration.get("robust") or {}
    same = (ev.get("split") == "test" and ev.get("attack") == json.loads(json.dumps(attack_settings(cfg)))
            and ev.get("attacked_samples") == limit
            and calibration.get("tolerance") == cfg.calibration_tolerance
            and robust.get("tolerance") == cfg.calibration_robust_tolerance
            and robust.get("samples", cfg.calibration_attack_limit) == cfg.calibration_attack_limit)
    return eval_json if same else None


def _acc(value: float, bounds: list[float] | None) -> str:
    """An accuracy and its 95% interval for the tables: 0.6520 [0.610, 0.690]."""
    return f"{value:.4f}" if bounds is None else f"{value:.4f} {Interval(*bounds)}"


def markdown(result: dict[str, Any]) -> str:
    pgd = f"PGD-{result['eval_steps']}"
    lines = [f"# bench-train: {result['preset']} (seed {result['seed']}, {result['machine']['cpu']})", "",
             "Accuracies with their 95% Wilson intervals [low, high]: clean over all test images, the attacks over "
             "the attacked ones; neokd - adv with Newcombe's hybrid score interval (conservative: the same images).",
             "",
             f"| method | exit | staged MFLOPs | anytime MFLOPs | clean | {pgd} max-average | {pgd} average | "
             "APGD-CE | APGD-T | strong worst case |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, r in result["methods"].items():
        for e in r["exits"]:
            adv, ci = e["adv_acc"], e.get("intervals", {})
            cells = [_acc(e["clean_acc"], ci.get("clean_acc"))] + [
                _acc(adv[name], ci.get(name)) if name in adv else "n/a"
                for name in ("max-average", "average", "apgd-ce", "apgd-t", "strong_worst_case")]
            lines.append(f"| {method} | {e['exit']} | {e['staged_mflops']:.2f} | {e['anytime_mflops']:.2f} | "
                         + " | ".join(cells) + " |")
    lines += ["", "| method | default budget (staged MFLOPs) | clean acc | clean cost / full | policy robust acc | "
              "robust cost / full |", "|---|---|---|---|---|---|"]
    for method, r in result["methods"].items():
        p = r["policy_default_budget"]
        ci = p.get("intervals", {})
        lines.append(f"| {method} | {p['budget_mflops']:.2f} | {_acc(p['clean_accuracy'], ci.get('clean_accuracy'))} | "
                     f"{p['clean_cost_over_full_network']:.3f} | "
                     f"{_acc(p['robust_accuracy'], ci.get('robust_accuracy'))} | "
                     f"{p['robust_cost_over_full_network']:.3f} |")
    diffs = result["comparison"].get("neokd_minus_adv_strong_worst_case")
    if diffs:
        lines += ["", "| exit | neokd strong worst case | adv | neokd - adv | 95% interval |", "|---|---|---|---|---|"]
        lines += [f"| {d['exit']} | {d['neokd']:.4f} | {d['adv']:.4f} | {d['difference']:+.4f} | "
                  f"{Interval(*d['interval'])} |" for d in diffs]
    lines += ["", "Targets (" + result["targets"]["source"] + "):", ""]
    for name, t in result["targets"].items():
        if name != "source":
            verdict = "reported" if t["met"] is None else "met" if t["met"] else "MISSED"
            bounds = f" {Interval(*t['interval'])}" if "interval" in t else ""
            target = f"target {t.get('direction', '')} {t['target']}, " if t.get("target") is not None else ""
            lines.append(f"- {name}: measured {t['measured']}{bounds}, {target}{verdict}")
    t = result["throughput"]
    lines += ["", f"Training throughput {t['train_samples_per_s']:.1f} samples/s, bound {t['bound_samples_per_s']:.1f} "
              f"samples/s (ratio {t['ratio']:.3f}; the bound counts only the attack, scoring and update time "
              "measured inside the same runs); train seconds: "
              + ", ".join(f"{m} {r['train_seconds']:.0f}" for m, r in result["methods"].items()), ""]
    machine = [(m, r["throughput"]) for m, r in result["methods"].items() if "machine_ratio" in r["throughput"]]
    if machine:
        lines += ["Against the machine's own rate (one plain forward+backward at the training batch size, timed in "
                  "the same run; FLOPs by FlopCounterMode): "
                  + "; ".join(f"{m} achieved {tp['achieved_gflops_per_s']:.1f} of {tp['machine_gflops_per_s']:.1f} "
                              f"GFLOP/s (ratio {tp['machine_ratio']:.3f})" for m, tp in machine), ""]
    lines += ["| method | part | ms / iteration | share | GFLOP/s |", "|---|---|---|---|---|"]
    for method, r in result["methods"].items():
        tp = r["throughput"]
        for part, ms in tp["ms_per_iteration"].items():
            gflops = tp["achieved_gflops"].get(part)
            lines.append(f"| {method} | {part} | {ms:.1f} | {tp['share'][part]:.3f} | "
                         f"{'' if gflops is None else f'{gflops:.1f}'} |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m bench.bench_train")
    p.add_argument("--preset", default="mnist-quick")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-reuse", action="store_true",
                   help="always train, even when runs/ holds a finished run with the same recipe")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    started = now()
    methods, cfg = {}, None
    for method in (Method.ADV, Method.NEOKD):
        methods[method.value], cfg = run_method(args.preset, method, args.overrides, reuse=not args.no_reuse)
    assert cfg is not None
    # Throughput from the runs trained inside this benchmark (a reused run may have shared the CPU).
    timed = [m for m in methods.values() if not m["reused"]] or list(methods.values())
    mean = lambda key: sum(m["throughput"][key] for m in timed) / len(timed)  # noqa: E731
    result = {
        "preset": args.preset, "seed": cfg.seed, "eval_steps": cfg.eval_steps, "started": started, "finished": now(),
        "machine": machine(), "versions": versions(), "config": cfg.to_dict(),
        "methods": methods,
        "comparison": {"neokd_minus_adv_mean_adv_acc": methods["neokd"]["mean_adv_acc_max_average"]
                       - methods["adv"]["mean_adv_acc_max_average"],
                       "neokd_minus_adv_strong_worst_case": strong_worst_case_differences(methods)},
        "targets": targets(methods, args.preset),
        "throughput": {"train_samples_per_s": mean("samples_per_s"), "bound_samples_per_s": mean("bound_samples_per_s"),
                       "ratio": mean("ratio"), "measured_on": [k for k, m in methods.items() if m in timed],
                       "bound": "batch / (attack + scoring + update seconds per iteration), timed inside the run",
                       **({"machine_ratio": mean("machine_ratio"), "machine_bound":
                           "achieved GFLOP/s of the training iterations over the GFLOP/s of one plain forward+backward "
                           "at the training batch size, both in the same run"}
                          if all("machine_ratio" in m["throughput"] for m in timed) else {})},
    }
    out = args.out or RESULTS / f"train-{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.dataset is DatasetName.IMAGEFOLDER:  # which test photos leave at which exit, clean and under DeepSloth
        grids = photo_grids(Path(methods["neokd"]["run_dir"]) / "checkpoint.pt",
                            out.parent / f"{out.stem}-photos")
        result["photo_grids"] = [g.name for g in grids]  # beside the JSON
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    # The plots of the NEO-KD model's evaluation, beside the JSON (the README shows them).
    plots = Path(methods["neokd"]["eval_json"]).parent
    for name in ("accuracy_vs_mflops.png", "exit_histogram.png"):
        if (plots / name).is_file():
            shutil.copy2(plots / name, out.parent / f"train-{args.preset}-neokd-{name}")
    log.info("wrote %s", out)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
