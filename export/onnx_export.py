"""Per-stage ONNX graphs of a multi-exit network.

Stage k (1-based) maps features_{k-1} to (features_k, logits_k); the last stage
returns logits only. A sample that leaves at exit k has then paid stages 1..k
and heads 1..k, its staged cost (docs/design.md, "Why stages and not prefixes").
The exporter walks `forward_stage`/`forward_head` and knows no architecture by
name. Running the graphs is early_exit/runner.py's job.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn
from tqdm import tqdm

from export.errors import ExportCheckError, ExportError
from training.models import MultiExitNetwork

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MIN_OPSET = 18  # dynamo silently gives 18 after a failed down-conversion (stack-notes.md)
FULL_FILE = "full.onnx"
IMAGE_INPUT = "image"
FULL_OUTPUT = "logits"
EXAMPLE_BATCH = 2  # torch.export specializes a batch of 1, so trace with 2 and mark the axis dynamic


def stage_file(index: int) -> str:
    """File name of the graph of exit `index` (1-based)."""
    return f"stage_{index}.onnx"


@dataclass(frozen=True)
class GraphSpec:
    """A graph file and its I/O names; `index` is the 1-based exit, None for the full graph."""

    file: str
    input_name: str
    output_names: tuple[str, ...]
    index: int | None

    @property
    def logits_name(self) -> str:
        return self.output_names[-1]

    @property
    def features_name(self) -> str | None:
        return self.output_names[0] if len(self.output_names) == 2 else None


def stage_spec(k: int, num_exits: int) -> GraphSpec:
    """Names for stage k (0-based in code, 1-based in names): input features_k (or image), outputs features/logits_{k+1}."""
    index = k + 1
    input_name = IMAGE_INPUT if k == 0 else f"features_{k}"
    outputs = (f"logits_{index}",) if index == num_exits else (f"features_{index}", f"logits_{index}")
    return GraphSpec(stage_file(index), input_name, outputs, index)


def full_spec() -> GraphSpec:
    return GraphSpec(FULL_FILE, IMAGE_INPUT, (FULL_OUTPUT,), None)


class StageModule(nn.Module):
    """Stage k plus head k of `model` (0-based k), as one exportable module."""

    def __init__(self, model: MultiExitNetwork, k: int) -> None:
        super().__init__()
        self.model = model
        self.k = k
        self.last = k == model.num_exits - 1

    def forward(self, features: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_stage(self.k, features)
        logits = self.model.forward_head(self.k, features)
        return logits if self.last else (features, logits)


class FullModule(nn.Module):
    """The whole network to its final exit (no early heads): the reference graph `full.onnx`."""

    def __init__(self, model: MultiExitNetwork) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = image
        for k in range(self.model.num_exits):
            features = self.model.forward_stage(k, features)
        return self.model.forward_head(self.model.num_exits - 1, features)


@torch.no_grad()
def example_inputs(model: MultiExitNetwork, batch: int = EXAMPLE_BATCH, seed: int = 0) -> list[torch.Tensor]:
    """The input of each stage for a seeded random image batch (image first, then features_1..K-1)."""
    x = torch.rand(batch, *model.input_shape, generator=torch.Generator().manual_seed(seed))
    inputs = [x]
    for k in range(model.num_exits - 1):
        inputs.append(model.forward_stage(k, inputs[-1]))
    return inputs


def export_graph(module: nn.Module, example: torch.Tensor, path: Path, spec: GraphSpec, opset: int) -> Path:
    """Dynamo export with a dynamic batch axis and the weights inside the file."""
    module.eval()
    try:
        torch.onnx.export(
            module,
            (example,),
            f=str(path),
            dynamo=True,
            input_names=[spec.input_name],
            output_names=list(spec.output_names),
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    except Exception as exc:  # an exporter failure is a bug to see in full, not a user error: re-raise
        exc.add_note(f"while exporting {spec.file} (opset {opset}) from {type(module).__name__}")
        raise
    sidecar = path.with_name(path.name + ".data")
    if sidecar.exists():
        raise ExportCheckError(f"{spec.file} was written with external data ({sidecar.name}); expected weights inside")
    return path


def export_graphs(model: MultiExitNetwork, out_dir: Path, opset: int = DEFAULT_OPSET) -> list[GraphSpec]:
    """Write stage_1..K.onnx and full.onnx into `out_dir`; returns their specs, stages first, full last."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is not supported; use {MIN_OPSET} or later")
    model.eval()
    inputs = example_inputs(model)
    specs = [stage_spec(k, model.num_exits) for k in range(model.num_exits)] + [full_spec()]
    jobs: list[tuple[nn.Module, torch.Tensor, GraphSpec]] = [
        (StageModule(model, k), inputs[k], specs[k]) for k in range(model.num_exits)
    ] + [(FullModule(model), inputs[0], specs[-1])]
    for module, example, spec in tqdm(jobs, desc="export", unit="graph", disable=None):
        export_graph(module, example, out_dir / spec.file, spec, opset)
        log.info("exported %s", spec.file)
    return specs


def check_graph(path: Path, spec: GraphSpec, opset: int) -> None:
    """onnx.checker with full_check, plus the contract: names, dynamic batch, opset, no external data."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError, DecodeError...
        raise ExportCheckError(f"onnx.checker rejected {spec.file}: {str(exc).splitlines()[0]}") from exc
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != [spec.input_name] or outputs != list(spec.output_names):
        raise ExportCheckError(f"{spec.file} has inputs {inputs} and outputs {outputs}, "
                               f"expected {[spec.input_name]} and {list(spec.output_names)}")
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch.dim_param:
        raise ExportCheckError(f"{spec.file} has a fixed batch axis ({batch.dim_value}); expected a dynamic one")
    default_opset = {o.domain: o.version for o in proto.opset_import}.get("", 0)
    if default_opset != opset:
        raise ExportCheckError(f"{spec.file} uses opset {default_opset}, asked for {opset}")
    if any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer):
        raise ExportCheckError(f"{spec.file} refers to external data; weights must be inside the file")
