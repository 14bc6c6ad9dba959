"""Export: checkpoint -> per-stage ONNX graphs + manifest.json -> TorchServe archive.

May import training code (it reads checkpoints) and torch; serving must never import this package,
only `early_exit`. Names are imported lazily (PEP 562) so `python -m export --help` and
`export.archive` (torch-free) stay light.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServeConfig": "export.archive",
    "build_archive": "export.archive",
    "read_mar_manifest": "export.archive",
    "verify_archive": "export.archive",
    "write_model_config": "export.archive",
    "ExportCheckError": "export.errors",
    "ExportError": "export.errors",
    "GraphSpec": "export.onnx_export",
    "export_graphs": "export.onnx_export",
    "stage_spec": "export.onnx_export",
    "AttackParams": "export.parity",
    "check_parity": "export.parity",
    "check_robustness": "export.parity",
    "ExportResult": "export.pipeline",
    "export_checkpoint": "export.pipeline",
    "read_checkpoint": "export.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'export' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
