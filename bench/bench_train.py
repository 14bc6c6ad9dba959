"""`make bench-train`: train `adv` and `neokd` with the same preset, seed and budget; evaluate both alike.

Writes bench/results/train-<preset>.json and .md. Throughput is compared with a bound measured in
the same run: the forward+backward throughput of the same network, divided by the forward+backward
passes one training sample needs (in full-network equivalents; an attack step on exit k costs only
stages 1..k plus head k, counted by FLOPs).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import machine, now, versions
from training.checkpoint import load_checkpoint
from training.config import TrainConfig, load_config
from training.evaluate import run_evaluation
from training.losses import Method
from training.train import build_model, train

log = logging.getLogger("bench.train")
RESULTS = Path(__file__).parent / "results"


def forward_backward_throughput(cfg: TrainConfig, seconds: float = 10.0) -> float:
    """Samples/s of one full-network forward+backward (all exits' CE), at the training batch size."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    model.train()
    x = torch.rand(cfg.batch_size, *model.input_shape)
    y = torch.randint(0, 10, (cfg.batch_size,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(3):  # warm-up
        sum(F.cross_entropy(o, y) for o in model(x)).backward()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        opt.zero_grad()
        sum(F.cross_entropy(o, y) for o in model(x)).backward()
        opt.step()
        n += 1
    return n * cfg.batch_size / (time.perf_counter() - start)


def passes_per_sample(cfg: TrainConfig, exit_mflops: list[float]) -> float:
    """Forward+backward passes per training sample, in full-network equivalents."""
    full = exit_mflops[-1]
    train_step = 2.0  # clean + adversarial rows through the whole network
    if cfg.method is Method.CLEAN:
        return 1.0
    if cfg.attack == "average":
        return cfg.attack_steps * 1.0 + train_step
    # max-average: K single-exit attacks on prefixes, then K no-grad forward scorings (~1/3 of fwd+bwd)
    attack = cfg.attack_steps * sum(c / full for c in exit_mflops)
    scoring = len(exit_mflops) / 3.0
    return attack + scoring + train_step


def _same_recipe(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two resolved configs train the same model (names and output folders aside)."""
    ignore = {"name", "out_dir"}
    return {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}


def find_reusable_run(cfg: TrainConfig, search: Path = Path("runs")) -> Path | None:
    """A finished run (e.g. `make train-export`'s) with exactly this recipe: training it again is the same work."""
    for train_json in sorted(search.glob("*/train.json")):
        ckpt = train_json.parent / "checkpoint.pt"
        if not ckpt.is_file():
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
    ev = run_evaluation(ckpt, out_dir=Path("runs/bench") / f"eval-{method.value}", write_calibration_file=False)
    a = ev["anytime"]
    exits = []
    for k, (mf, anytime_mf) in enumerate(zip(ev["cost"]["staged_mflops"], ev["cost"]["anytime_mflops"])):
        exits.append({
            "exit": k + 1, "staged_mflops": mf, "anytime_mflops": anytime_mf, "clean_acc": a["clean_full_test"][k],
            "clean_acc_attacked_subset": a["clean"][k],
            "adv_acc": {"max-average": a["max-average"][k], "average": a["average"][k],
                        "single": [s[k] for s in a["single"]]},
        })
    default = ev["budgeted"]["budgets"][-1]
    return {
        "train_seconds": summary["train_seconds"], "train_samples_per_s": summary["train_samples_per_s"],
        "steps": summary["steps"], "exits": exits,
        "mean_adv_acc_max_average": sum(e["adv_acc"]["max-average"] for e in exits) / len(exits),
        "budgeted_default": default, "run_dir": str(run_dir), "reused": reused,
        "eval_json": str(Path("runs/bench") / f"eval-{method.value}" / "eval.json"),
    }, cfg


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# bench-train: {result['preset']} (seed {result['seed']}, {result['machine']['cpu']})", "",
             "| method | exit | MFLOPs | clean | max-average | average | single (per attacked exit) |",
             "|---|---|---|---|---|---|---|"]
    for method, r in result["methods"].items():
        for e in r["exits"]:
            single = ", ".join(f"{s:.3f}" for s in e["adv_acc"]["single"])
            lines.append(f"| {method} | {e['exit']} | {e['mflops']:.2f} | {e['clean_acc']:.4f} | "
                         f"{e['adv_acc']['max-average']:.4f} | {e['adv_acc']['average']:.4f} | {single} |")
    t = result["throughput"]
    lines += ["", f"Training throughput {t['train_samples_per_s']:.1f} samples/s, bound {t['bound_samples_per_s']:.1f} "
              f"samples/s (ratio {t['ratio']:.2f}); train seconds: "
              + ", ".join(f"{m} {r['train_seconds']:.0f}" for m, r in result["methods"].items()), ""]
    return "\n".join(lines)


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
    fb = forward_backward_throughput(cfg)
    exit_mflops = [e["anytime_mflops"] for e in methods["neokd"]["exits"]]
    passes = passes_per_sample(cfg, exit_mflops)
    # Throughput from the runs trained inside this benchmark (a reused run may have shared the CPU).
    timed = [m for m in methods.values() if not m["reused"]] or list(methods.values())
    train_sps = sum(m["train_samples_per_s"] for m in timed) / len(timed)
    result = {
        "preset": args.preset, "seed": cfg.seed, "started": started, "finished": now(),
        "machine": machine(), "versions": versions(), "config": cfg.to_dict(),
        "methods": methods,
        "comparison": {"neokd_minus_adv_mean_adv_acc": methods["neokd"]["mean_adv_acc_max_average"]
                       - methods["adv"]["mean_adv_acc_max_average"]},
        "throughput": {"train_samples_per_s": train_sps, "measured_on": [k for k, m in methods.items() if m in timed], "forward_backward_samples_per_s": fb,
                       "passes_per_sample": passes, "bound_samples_per_s": fb / passes,
                       "ratio": train_sps / (fb / passes)},
    }
    out = args.out or RESULTS / f"train-{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    log.info("wrote %s", out)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
