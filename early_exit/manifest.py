"""The manifest: the one contract between export and serving.

`export` writes it with `write_manifest`; the handler reads it with
`load_manifest` and checks every graph with `verify_files` before opening a
session. Nothing else about a model reaches the server.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from early_exit.costs import CostError, CostProfile
from early_exit.policy import BudgetEntry, ConfidenceMeasure
from early_exit.transform import EvalTransform, TransformError

# Format 2: per-stage and per-head costs; budgets, calibration and the full graph speak in staged cost
# (early_exit/costs.py).
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """The manifest is malformed, or a file it lists is missing or tampered with."""


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a temporary file beside `path`, which is then renamed onto `path`, so a reader (or a
    crash mid-write) never leaves half a file there; the temporary file is removed if `write` fails. Creates the
    parent folder. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json_atomic(data: Any, path: str | Path) -> Path:
    """`data` as indented JSON at `path`, written atomically (`write_atomic`). Returns the path."""

    def dump(tmp: Path) -> None:
        with tmp.open("w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    return write_atomic(path, dump)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ExitSpec:
    """One stage graph: stage k maps features_{k-1} to (features_k, logits_k); the last returns logits only.

    Costs in MFLOPs per input: `stage_mflops` and `head_mflops` are this stage's and this head's own;
    `staged_mflops` (stages and heads 1..k) is what an answer here costs, `anytime_mflops` (stages 1..k
    plus head k) the papers' per-exit figure. Both are derived and checked at load.
    """

    index: int  # 1-based exit number
    file: str
    sha256: str
    stage_mflops: float
    head_mflops: float
    staged_mflops: float
    anytime_mflops: float
    input_name: str
    logits_name: str
    features_name: str | None  # None for the last stage


@dataclass(frozen=True)
class FullGraphSpec:
    """`full.onnx`: the whole network to its last exit without the early heads (anytime cost of exit K)."""

    file: str
    sha256: str
    mflops: float
    input_name: str
    logits_name: str


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    dataset: str
    input_shape: tuple[int, ...]  # C, H, W (no batch axis)
    input_background: float  # value transparent image pixels are composited onto, in [0, 1] (0: black)
    classes: tuple[str, ...]
    confidence: ConfidenceMeasure
    exits: tuple[ExitSpec, ...]
    calibration: tuple[BudgetEntry, ...]
    default_budget_mflops: float
    opset: int
    full_graph: FullGraphSpec | None = None
    # Per exit: among validation images the policy answers at that exit (default budget), the share whose
    # answer equals the last exit's: the audit's "normal" (None for an exit nobody left at; the whole field is
    # None when the export did not measure it).
    exit_agreement: tuple[float | None, ...] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # The evaluation transform (early_exit/transform.py) the server applies to every client image: the one the
    # model's evaluation images went through. None (and manifests without the key): EvalTransform.for_shape.
    input_transform: EvalTransform | None = None

    @property
    def transform(self) -> EvalTransform:
        """The input transform, explicit or the default of the input shape."""
        return self.input_transform or EvalTransform.for_shape(self.input_shape)

    @property
    def cost(self) -> CostProfile:
        return CostProfile(tuple(e.stage_mflops for e in self.exits), tuple(e.head_mflops for e in self.exits))

    @property
    def staged_mflops(self) -> list[float]:
        """What an answer at each exit costs under staged early exit (MFLOPs): the budget's unit."""
        return [e.staged_mflops for e in self.exits]

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "dataset": self.dataset,
            "input_shape": list(self.input_shape),
            "input_range": [0.0, 1.0],
            "input_background": self.input_background,
            "input_transform": self.transform.to_dict(),
            "classes": list(self.classes),
            "confidence": self.confidence.value,
            "exits": [asdict(e) for e in self.exits],
            "full_graph": asdict(self.full_graph) if self.full_graph else None,
            "exit_agreement": list(self.exit_agreement) if self.exit_agreement is not None else None,
            "calibration": [r.to_dict() for r in self.calibration],
            "default_budget_mflops": self.default_budget_mflops,
            "opset": self.opset,
            "versions": dict(self.versions),
            "evaluation": dict(self.evaluation),
            **({"extra": dict(self.extra)} if self.extra else {}),
        }


def exit_specs(cost: CostProfile, graphs: list[dict[str, Any]]) -> tuple[ExitSpec, ...]:
    """Exit entries from a measured cost profile and each stage graph's file/sha256/IO names (export)."""
    return tuple(
        ExitSpec(stage_mflops=cost.stage_mflops[k], head_mflops=cost.head_mflops[k],
                 staged_mflops=cost.staged[k], anytime_mflops=cost.anytime[k], **g)
        for k, g in enumerate(graphs)
    )


def _typed(cls: type, d: Any, what: str) -> Any:
    """A frozen dataclass from a JSON object whose keys must be exactly the dataclass's fields."""
    if not isinstance(d, dict):
        raise ManifestError(f"{what} must be a JSON object")
    names = [f.name for f in fields(cls)]
    missing, unknown = sorted(set(names) - set(d)), sorted(set(d) - set(names))
    if missing or unknown:
        raise ManifestError(f"{what}: missing keys {missing}, unknown keys {unknown}")
    for f in fields(cls):
        value = d[f.name]
        kinds = {"int": int, "float": (int, float), "str": str, "str | None": (str, type(None))}[str(f.type)]
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ManifestError(f"{what}: '{f.name}' has type {type(value).__name__}")
        if str(f.type) == "float" and not math.isfinite(value):
            raise ManifestError(f"{what}: '{f.name}' must be finite")
    return cls(**{f.name: (float(d[f.name]) if str(f.type) == "float" else d[f.name]) for f in fields(cls)})


def _require(d: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in d:
        raise ManifestError(f"manifest is missing '{key}'")
    if not isinstance(d[key], kind):
        raise ManifestError(f"manifest field '{key}' has type {type(d[key]).__name__}")
    return d[key]


def manifest_from_dict(d: dict[str, Any]) -> Manifest:
    """Validate a parsed manifest and build the typed view; every problem is a one-line ManifestError."""
    if not isinstance(d, dict):
        raise ManifestError("manifest must be a JSON object")
    version = _require(d, "format_version", int)
    if version < FORMAT_VERSION:
        raise ManifestError(f"manifest format_version {version} is from an older export (its costs leave out the "
                            f"heads a request runs through); re-export the model: make archive")
    if version != FORMAT_VERSION:
        raise ManifestError(f"manifest format_version {version} is not supported (expected {FORMAT_VERSION})")
    raw_exits = _require(d, "exits", list)
    if not raw_exits:
        raise ManifestError("manifest lists no exits")
    exits = tuple(_typed(ExitSpec, e, f"exit entry {i + 1}") for i, e in enumerate(raw_exits))
    full = None if d.get("full_graph") is None else _typed(FullGraphSpec, d["full_graph"], "full_graph")
    try:
        calibration = tuple(BudgetEntry.from_dict(r) for r in _require(d, "calibration", list))
        confidence_measure = ConfidenceMeasure(_require(d, "confidence", str))
    except (TypeError, KeyError, ValueError) as exc:
        raise ManifestError(f"manifest entry is malformed: {exc}") from exc
    for name in [e.file for e in exits] + ([full.file] if full else []):
        if "/" in name or "\\" in name or name.startswith("."):
            raise ManifestError(f"graph file name {name!r} must be a plain file name inside the model folder")
    if [e.index for e in exits] != list(range(1, len(exits) + 1)):
        raise ManifestError("exit indices must be 1..K in order")
    try:
        cost = CostProfile(tuple(e.stage_mflops for e in exits), tuple(e.head_mflops for e in exits))
        CostProfile.from_dict({**cost.to_dict(), "staged_mflops": [e.staged_mflops for e in exits],
                               "anytime_mflops": [e.anytime_mflops for e in exits]})
    except CostError as exc:
        raise ManifestError(f"exit costs: {exc}") from None
    costs = cost.staged
    if any(b <= a for a, b in zip(costs, costs[1:])):
        raise ManifestError(f"staged exit costs must grow strictly with depth, got {costs}")
    if full is not None and not math.isclose(full.mflops, cost.full, rel_tol=1e-9):
        raise ManifestError(f"full_graph mflops {full.mflops} is not the last exit's anytime cost {cost.full}")
    if exits[-1].features_name is not None or any(e.features_name is None for e in exits[:-1]):
        raise ManifestError("every stage but the last must output features")
    if not calibration:
        raise ManifestError("calibration table is empty")
    for row in calibration:
        if len(row.thresholds) != len(exits) or not 0 <= row.max_exit < len(exits):
            raise ManifestError(f"calibration row for {row.budget_mflops} does not fit {len(exits)} exits")
        if costs[row.max_exit] > row.budget_mflops + 1e-9:
            raise ManifestError(f"calibration row for {row.budget_mflops} MFLOPs allows a deeper exit than it pays for")
    default_budget = float(_require(d, "default_budget_mflops", (int, float)))
    if not math.isfinite(default_budget) or default_budget < costs[0]:
        raise ManifestError(f"default budget {default_budget} is below the cheapest exit")
    agreement = d.get("exit_agreement")
    if agreement is not None:
        if not isinstance(agreement, list) or len(agreement) != len(exits) or not all(
                a is None or (isinstance(a, (int, float)) and not isinstance(a, bool) and 0.0 <= a <= 1.0)
                for a in agreement):
            raise ManifestError(f"exit_agreement must list {len(exits)} fractions in [0, 1] (or null)")
        agreement = tuple(None if a is None else float(a) for a in agreement)
    background = float(_require(d, "input_background", (int, float)))
    if not 0.0 <= background <= 1.0:
        raise ManifestError(f"input_background must be in [0, 1], got {background}")
    input_shape = tuple(int(s) for s in _require(d, "input_shape", list))
    try:
        transform = (EvalTransform.from_dict(d["input_transform"]) if d.get("input_transform") is not None
                     else EvalTransform.for_shape(input_shape))
    except TransformError as exc:
        raise ManifestError(f"input_transform: {exc}") from None
    if transform.input_shape != input_shape:
        raise ManifestError(f"input_transform gives {list(transform.input_shape)}, input_shape is {list(input_shape)}")
    return Manifest(
        name=_require(d, "name", str),
        version=str(_require(d, "version", (str, int))),
        dataset=_require(d, "dataset", str),
        input_shape=input_shape,
        input_background=background,
        classes=tuple(str(c) for c in _require(d, "classes", list)),
        confidence=confidence_measure,
        exits=exits,
        calibration=calibration,
        default_budget_mflops=default_budget,
        opset=int(_require(d, "opset", int)),
        full_graph=full,
        exit_agreement=agreement,
        versions=dict(d.get("versions", {})),
        evaluation=dict(d.get("evaluation", {})),
        extra=dict(d.get("extra", {})),
        input_transform=transform,
    )


def write_manifest(manifest: Manifest, folder: str | Path) -> Path:
    return write_json_atomic(manifest.to_dict(), Path(folder) / MANIFEST_NAME)


def load_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_NAME} in {folder}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    return manifest_from_dict(data)


def verify_files(manifest: Manifest, folder: str | Path) -> None:
    """Check that every graph the manifest lists exists and matches its sha256.

    Serving calls this before opening any session: a tampered or truncated
    graph refuses to load instead of answering wrongly.
    """
    folder = Path(folder)
    files = [(f"exit {e.index}", e.file, e.sha256) for e in manifest.exits]
    if manifest.full_graph:
        files.append(("full graph", manifest.full_graph.file, manifest.full_graph.sha256))
    for what, name, expected in files:
        path = folder / name
        if not path.is_file():
            raise ManifestError(f"{what}: file {name} is missing from {folder}")
        actual = sha256_file(path)
        if actual != expected:
            raise ManifestError(f"{what}: sha256 of {name} is {actual[:12]}..., manifest says {expected[:12]}...")
