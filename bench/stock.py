"""The stock TorchServe baseline: the server a user runs without this project, on the same full graph.

TorchServe 0.12 serving the early-exit archive's `full.onnx` through BaseHandler's ONNX path (see
bench/stock_onnx_handler.py for why one `inference` method is all it takes, and why `--handler base_handler`
alone cannot answer), with the early-exit archive's batchSize, maxBatchDelay, workers and responseTimeout,
the same config.properties and log4j2.xml (token auth on), and TorchServe's default request handling for
such a model: `decode_input_request=true` (the frontend's JSON body parsed by the worker) and the JSON
request envelope (`service_envelope=json`) that joins `{"instances": [...]}` rows of a batch into one
tensor and splits the answers again.

What it is sent: the same test images as float tensors in JSON, `{"instances": [C x H x W nested list]}`
(values k/255, exactly the pixels the PNG the early-exit server gets decodes to). It answers
`{"predictions": [[logit_0, ..., logit_9]]}`; the benchmark takes the argmax.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from export.archive import MODEL_CONFIG_NAME, ServeConfig

HANDLER = Path(__file__).resolve().parent / "stock_onnx_handler.py"
NO_SPIN_HANDLER = Path(__file__).resolve().parent / "stock_onnx_no_spin_handler.py"  # --stock-no-spin
# The keys of model-config.yaml both servers share; the early-exit `handler:` section is ours alone.
SHARED_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")
# TorchServe's defaults for a tensor model, over our config.properties (which hands raw bytes to our handler).
SERVER_CONFIG = {"decode_input_request": "true", "service_envelope": "json"}
INPUT_FORM = ('JSON {"instances": [C x H x W nested list of floats in [0, 1]]} (TorchServe JSON envelope, '
              "decode_input_request=true); the same pixels as the PNG the early-exit server gets")


def stock_model_config(early_exit_config: ServeConfig) -> dict[str, Any]:
    """The stock archive's model-config.yaml: the early-exit archive's TorchServe keys, nothing else."""
    return {k: v for k, v in early_exit_config.to_yaml_dict().items() if k in SHARED_KEYS}


def build_stock_archive(full_onnx: Path, early_exit_config: ServeConfig, out_dir: Path, name: str,
                        handler: Path = HANDLER) -> Path:
    """`torch-model-archiver --serialized-file full.onnx --handler stock_onnx_handler.py` into out_dir/name.mar."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stock-mar-") as tmp:
        config = Path(tmp) / MODEL_CONFIG_NAME
        config.write_text(yaml.safe_dump(stock_model_config(early_exit_config), sort_keys=False))
        cmd = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name, "--version", "1.0",
               "--serialized-file", str(full_onnx), "--handler", str(handler), "--config-file", str(config),
               "--export-path", str(out_dir), "--archive-format", "default", "--force"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": tmp})
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"torch-model-archiver failed (exit {proc.returncode}): {lines[-1] if lines else ''}")
    return out_dir / f"{name}.mar"


def describe(serialized_file: str, early_exit_config: ServeConfig, no_spin_label: str | None) -> dict[str, Any]:
    """The result's description of the stock baseline; `no_spin_label`: the run label of the no-spin variant when
    it is served too."""
    return {
        "handler": "bench/stock_onnx_handler.py: BaseHandler with inference = session.run (base_handler alone "
                   "fails: 'InferenceSession' object is not callable)",
        "serialized_file": serialized_file, "model_config": stock_model_config(early_exit_config),
        "server_config_over_ours": SERVER_CONFIG, "input": INPUT_FORM,
        "onnxruntime_intra_op_threads": "psutil.cpu_count(logical=True) (BaseHandler's setup_ort_session)",
        "answer": '{"predictions": [[logits]]}; class = argmax',
        "no_spin_variant": None if no_spin_label is None else (
            f"{no_spin_label}: bench/stock_onnx_no_spin_handler.py, the same with onnxruntime's "
            "session.intra_op.allow_spinning=0"),
    }


def extract_full_graph(archive: Path, out: Path, file: str = "full.onnx") -> Path:
    """The archive's entry `file` written to `out`."""
    with zipfile.ZipFile(archive) as z:
        out.write_bytes(z.read(file))
    return out


def json_bodies(x: np.ndarray) -> list[bytes]:
    """One `{"instances": [image]}` body per image (C x H x W float32 values)."""
    return [json.dumps({"instances": [img.tolist()]}, separators=(",", ":")).encode() for img in x]


def parse_answer(body: Any, num_exits: int, full_mflops: float) -> dict[str, Any] | None:
    """{"predictions": [[logits]]} -> the early-exit answer fields the summaries read (full graph: last exit,
    full cost, no budget)."""
    try:
        logits = np.asarray(body["predictions"][0], dtype=np.float64)
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if logits.ndim != 1 or not logits.size:
        return None
    return {"class_index": int(np.argmax(logits)), "exit_index": num_exits, "mflops_spent": full_mflops,
            "budget_mflops": float("inf")}


def compare(early: Sequence[dict[str, Any]], stock: Sequence[dict[str, Any]],
            targets: dict[int, float], paired: dict[int, float | None] | None = None) -> list[dict[str, Any]]:
    """Per concurrency: early-exit / stock requests/s (the median of per-round ratios when `paired` has it, else
    the ratio of the two runs' figures), both servers' p50/p99 (ratios < 1 are faster) and CPU ms per request
    of their process trees (frontend + workers; ratio < 1 is cheaper)."""
    by_c = {r["concurrency"]: r for r in stock}
    rows = []
    for r in early:
        s = by_c.get(r["concurrency"])
        if s is None:
            continue
        of_medians = round(r["requests_per_s"] / s["requests_per_s"], 3) if s["requests_per_s"] else None
        speedup = (paired or {}).get(r["concurrency"]) or of_medians
        target = targets.get(r["concurrency"])
        cpu = {who: (run.get("cpu_ms_per_request") or {}).get("server") for who, run in (("early", r), ("stock", s))}
        rows.append({
            "concurrency": r["concurrency"],
            "early_exit_requests_per_s": r["requests_per_s"], "stock_requests_per_s": s["requests_per_s"],
            "throughput_ratio": speedup, "throughput_ratio_of_medians": of_medians,
            "early_exit_p50_ms": r["p50_ms"], "stock_p50_ms": s["p50_ms"],
            "early_exit_p99_ms": r["p99_ms"], "stock_p99_ms": s["p99_ms"],
            "p50_ratio": round(r["p50_ms"] / s["p50_ms"], 3) if s["p50_ms"] else None,
            "p99_ratio": round(r["p99_ms"] / s["p99_ms"], 3) if s["p99_ms"] else None,
            "early_exit_server_cpu_ms_per_request": cpu.get("early"), "stock_server_cpu_ms_per_request": cpu.get("stock"),
            "server_cpu_ratio": round(cpu["early"] / cpu["stock"], 3) if cpu.get("early") and cpu.get("stock") else None,
            "target_throughput_ratio": target,
            "meets_target": None if target is None or speedup is None else speedup >= target,
        })
    return rows
