"""A synthetic three-stage ONNX chain built with onnx.helper (no torch, no export), and its manifest.

Exit k's logits are linear in the input (flat(x) @ W_k): pixel 0 drives confidence, pixels 1 and 2
pick the class at depth, so the expected exit of every row follows from the shared policy functions
applied to numpy logits (`reference`). Used by the handler, runner and manifest tests.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from early_exit.costs import CostProfile
from early_exit.manifest import FullGraphSpec, Manifest, exit_specs, sha256_file, write_manifest
from early_exit.policy import NEVER, BudgetEntry, ConfidenceMeasure, confidence, entry_for_budget, select_exits, softmax

REPO = Path(__file__).resolve().parents[1]
METRICS_YAML = REPO / "serving" / "metrics.yaml"
SHAPE = (1, 4, 4)
CLASSES = ("zero", "one", "two")
# Staged costs 1.0 / 2.5 / 4.0 (stages and heads on the way); the full graph (no early heads) costs 3.5.
COST = CostProfile(stage_mflops=(0.75, 1.25, 1.25), head_mflops=(0.25, 0.25, 0.25))
COSTS = COST.staged
FULL_MFLOPS = COST.full
TABLE = (
    BudgetEntry(1.0, 0, (NEVER, NEVER, NEVER), 0.5, 1.0),
    BudgetEntry(2.5, 1, (0.9, NEVER, NEVER), 0.6, 1.5),
    BudgetEntry(4.0, 2, (0.8, 0.95, NEVER), 0.7, 2.0),
)
MODEL = "toy"
EXIT_AGREEMENT = (0.9, 0.95, 1.0)  # what the audit should see (validation agreement with the last exit)


def _weights() -> list[np.ndarray]:
    """Exit k's logits = flat(x) @ W_k; pixel 0 drives confidence, pixels 1 and 2 pick the class at depth."""
    ws = []
    for k, scale in enumerate((5.0, 10.0, 1.0)):
        w = np.zeros((16, 3), dtype=np.float32)
        w[0, 0] = scale
        if k == 2:
            w[1, 1] = w[2, 2] = 8.0
        ws.append(w)
    return ws


def _stage_graph(k: int, w: np.ndarray, last: bool) -> onnx.ModelProto:
    inp = "image" if k == 0 else f"features_{k}"
    nodes = [helper.make_node("Flatten", [inp], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "W"], ["logits"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])]
    if not last:
        nodes.append(helper.make_node("Identity", [inp], [f"features_{k + 1}"]))
        outputs.insert(0, helper.make_tensor_value_info(f"features_{k + 1}", TensorProto.FLOAT, ["N", *SHAPE]))
    graph = helper.make_graph(nodes, f"stage_{k + 1}", [helper.make_tensor_value_info(inp, TensorProto.FLOAT,
                              ["N", *SHAPE])], outputs, initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def build_model_dir(folder: Path) -> Manifest:
    ws = _weights()
    exits = []
    for k, w in enumerate(ws):
        last = k == len(ws) - 1
        name = f"stage_{k + 1}.onnx"
        onnx.save(_stage_graph(k, w, last), folder / name)
        exits.append({"index": k + 1, "file": name, "sha256": sha256_file(folder / name),
                      "input_name": "image" if k == 0 else f"features_{k}", "logits_name": "logits",
                      "features_name": None if last else f"features_{k + 1}"})
    onnx.save(_stage_graph(0, ws[-1], True), folder / "full.onnx")
    manifest = Manifest(
        name=MODEL, version="1", dataset="synthetic", input_shape=SHAPE, input_background=0.0, classes=CLASSES,
        confidence=ConfidenceMeasure.MAX_PROB, exits=exit_specs(COST, exits), calibration=TABLE,
        default_budget_mflops=4.0, opset=18,
        full_graph=FullGraphSpec(file="full.onnx", sha256=sha256_file(folder / "full.onnx"), mflops=FULL_MFLOPS,
                                 input_name="image", logits_name="logits"),
        exit_agreement=EXIT_AGREEMENT,
    )
    write_manifest(manifest, folder)
    return manifest


def reference(x: np.ndarray, budget: float) -> tuple[np.ndarray, np.ndarray]:
    """Expected (0-based exit, class) per row: numpy logits through the shared policy."""
    logits = [x.reshape(len(x), -1) @ w for w in _weights()]
    conf = np.stack([confidence(softmax(l), ConfidenceMeasure.MAX_PROB) for l in logits], axis=1)
    entry = entry_for_budget(budget, TABLE, COSTS)
    exits = select_exits(conf, entry.thresholds, entry.max_exit)
    classes = np.array([int(np.argmax(logits[e][i])) for i, e in enumerate(exits)])
    return exits, classes


