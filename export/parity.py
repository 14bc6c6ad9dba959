"""Export-time checks: onnxruntime against PyTorch, clean and under attack.

A graph that does not match the model it came from must never reach a server,
so these checks fail the export rather than warn.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from early_exit.runner import FullGraphRunner, StagedRunner
from export.errors import ExportError
from training.config import validate_config
from training.models import MultiExitNetwork

log = logging.getLogger(__name__)

PARITY_BATCH_SIZES = (1, 7, 64)
PARITY_ATOL = 1e-4
ACCURACY_TOLERANCE = 0.001  # 0.1 point, as a fraction

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AttackFactory = Callable[[MultiExitNetwork], Attack]


@dataclass(frozen=True)
class AttackParams:
    """The max-average PGD of the robustness check: L-inf radius and step (images in [0, 1]), steps, seed."""

    eps: float
    step_size: float
    steps: int
    seed: int = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "AttackParams":
        """The run's configured evaluation attack (eval_eps, eval_step_size, eval_steps, seed) from a checkpoint's
        saved training config, read as every training step reads it (`training.config.validate_config`).

        Raises ConfigError (one line) for a config that is not a training config.
        """
        cfg = validate_config(dict(config))
        return cls(eps=cfg.eval_eps, step_size=cfg.eval_step_size, steps=cfg.eval_steps, seed=cfg.seed)

    def to_dict(self) -> dict[str, Any]:
        return {"name": "max-average-pgd", "eps": self.eps, "step_size": self.step_size,
                "steps": self.steps, "seed": self.seed}


def max_average_pgd(params: AttackParams) -> AttackFactory:
    """Factory for the max-average PGD of `training.attacks`, imported only when an attack is run."""

    def build(model: MultiExitNetwork) -> Attack:
        try:
            from training.attacks import MaxAveragePGD
        except ImportError as exc:
            raise ExportError(f"the robustness check needs training.attacks.MaxAveragePGD ({exc})") from exc
        return MaxAveragePGD(model, params.eps, params.step_size, params.steps, seed=params.seed)

    return build


def load_test_subset(dataset: str, data_dir: str, n: int, config: Mapping[str, Any] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` test images of the checkpoint's dataset (the samples training's evaluation attacks).

    config: the checkpoint's training config; an image folder takes its saved split and transform from it."""
    from training.data import DataError, load_tensors

    try:
        return load_tensors(dataset, data_dir, "test", limit=n, config=config)
    except DataError as exc:
        raise ExportError(str(exc)) from exc


@torch.no_grad()
def _torch_outputs(model: MultiExitNetwork, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(stage inputs, logits) per exit: stage_inputs[k] is what stage k reads."""
    inputs, logits = [], []
    features = x
    for k in range(model.num_exits):
        inputs.append(features)
        features = model.forward_stage(k, features)
        logits.append(model.forward_head(k, features))
    return inputs, logits


def _compare(onnx_logits: np.ndarray, torch_logits: torch.Tensor) -> tuple[float, float]:
    """(max abs diff, fraction of rows with the same argmax)."""
    ref = torch_logits.numpy()
    diff = float(np.abs(onnx_logits - ref).max())
    agree = float((onnx_logits.argmax(-1) == ref.argmax(-1)).mean())
    return diff, agree


def _summarize(entry: dict[str, Any], atol: float, what: str, failures: list[str]) -> dict[str, Any]:
    by_batch = entry["by_batch"]
    entry["max_abs_diff_logits"] = max(b["max_abs_diff_logits"] for b in by_batch.values())
    entry["argmax_agree"] = all(b["argmax_agreement"] == 1.0 for b in by_batch.values())
    if not entry["max_abs_diff_logits"] <= atol:  # also catches NaN
        failures.append(f"{what}: max |logits diff| {entry['max_abs_diff_logits']:.3g} > {atol:g}")
    if not entry["argmax_agree"]:
        failures.append(f"{what}: argmax differs from PyTorch")
    return entry


def _run_graph(session: ort.InferenceSession, input_name: str, x: np.ndarray) -> list[np.ndarray]:
    """One graph on its own (no chaining): its outputs in the graph's order."""
    return session.run(None, {input_name: np.ascontiguousarray(x, dtype=np.float32)})


def check_parity(
    model: MultiExitNetwork,
    runner: StagedRunner,
    full_runner: FullGraphRunner | None = None,
    batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
    atol: float = PARITY_ATOL,
    seed: int = 0,
) -> dict[str, Any]:
    """Every stage alone (fed PyTorch's features), the chain of stages (the staged runner, as served), and
    the full graph, per batch size.

    Returns a JSON-ready report with `passed` and `failures`; it raises nothing, so a failed report can
    still be written out for inspection.
    """
    model.eval()
    x = torch.rand(max(batch_sizes), *model.input_shape, generator=torch.Generator().manual_seed(seed))
    exits = runner.manifest.exits
    stages: list[dict[str, Any]] = [{"exit": e.index, "file": e.file, "by_batch": {}} for e in exits]
    chain: list[dict[str, Any]] = [{"exit": e.index, "by_batch": {}} for e in exits]
    full_entry: dict[str, Any] | None = None
    if full_runner is not None:
        full_entry = {"file": full_runner.spec.file, "by_batch": {}}
    for b in tqdm(batch_sizes, desc="parity", unit="batch", disable=None):
        inputs, logits = _torch_outputs(model, x[:b])
        for k, (session, spec) in enumerate(zip(runner.sessions, exits)):
            outputs = dict(zip([o.name for o in session.get_outputs()],
                               _run_graph(session, spec.input_name, inputs[k].numpy())))
            diff, agree = _compare(outputs[spec.logits_name], logits[k])
            row = {"max_abs_diff_logits": diff, "argmax_agreement": agree}
            if spec.features_name is not None:
                row["max_abs_diff_features"] = float(np.abs(outputs[spec.features_name] - inputs[k + 1].numpy()).max())
            stages[k]["by_batch"][str(b)] = row
        for k, out in enumerate(runner.exit_logits(x[:b].numpy())):
            diff, agree = _compare(out, logits[k])
            chain[k]["by_batch"][str(b)] = {"max_abs_diff_logits": diff, "argmax_agreement": agree}
        if full_entry is not None and full_runner is not None:
            out = _run_graph(full_runner.session, full_runner.spec.input_name, x[:b].numpy())[0]
            diff, agree = _compare(out, logits[-1])
            full_entry["by_batch"][str(b)] = {"max_abs_diff_logits": diff, "argmax_agreement": agree}
    failures: list[str] = []
    for entry in stages:
        _summarize(entry, atol, f"{entry['file']} alone", failures)
    for entry in chain:
        _summarize(entry, atol, f"chain to exit {entry['exit']}", failures)
    if full_entry is not None:
        _summarize(full_entry, atol, full_entry["file"], failures)
    return {
        "atol": atol,
        "batch_sizes": list(batch_sizes),
        "stages": stages,
        "chain": chain,
        "full": full_entry,
        "passed": not failures,
        "failures": failures,
    }


def _accuracies(logits: Sequence[np.ndarray], y: np.ndarray) -> list[float]:
    return [float((out.argmax(-1) == y).mean()) for out in logits]


def _batched(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def check_robustness(
    model: MultiExitNetwork,
    runner: StagedRunner,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Attack,
    tolerance: float = ACCURACY_TOLERANCE,
    batch_size: int = 250,
) -> dict[str, Any]:
    """Per-exit accuracy of the chained ONNX graphs (the staged runner) against PyTorch, on `x` and `attack(x, y)`.

    The adversarial set is built against the PyTorch model: robustness survives export when the
    graphs answer it as the model does (within `tolerance`, a fraction: 0.001 is 0.1 point).
    """
    model.eval()
    x, y = x.float(), y.long()
    slices = _batched(len(x), batch_size)
    adv = torch.cat([attack(x[s], y[s]).detach() for s in tqdm(slices, desc="attack", unit="batch", disable=None)])
    labels = y.numpy()
    report: dict[str, Any] = {"samples": int(len(x)), "tolerance": tolerance}
    failures: list[str] = []
    for name, data in (("clean", x), ("adversarial", adv)):
        torch_logits = [torch.cat(parts).numpy() for parts in zip(*(_torch_outputs(model, data[s])[1] for s in slices))]
        onnx_logits = [np.concatenate(parts) for parts in zip(*(runner.exit_logits(data[s].numpy()) for s in slices))]
        acc_torch, acc_onnx = _accuracies(torch_logits, labels), _accuracies(onnx_logits, labels)
        agreement = [float((a.argmax(-1) == b.argmax(-1)).mean()) for a, b in zip(torch_logits, onnx_logits)]
        report[name] = {"torch": acc_torch, "onnx": acc_onnx, "argmax_agreement": agreement}
        for k, (a, b) in enumerate(zip(acc_torch, acc_onnx)):
            if not abs(a - b) <= tolerance:
                failures.append(f"{name} accuracy at exit {k + 1}: onnx {b:.4f} vs torch {a:.4f}")
        log.info("%s accuracy per exit: torch %s, onnx %s", name,
                 [round(a, 4) for a in acc_torch], [round(a, 4) for a in acc_onnx])
    report["passed"] = not failures
    report["failures"] = failures
    return report
