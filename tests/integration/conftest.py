"""Session fixtures: a small MNIST model built during the run, archived, served by a real TorchServe.

`tiny_mnist`  (session) -> TinyModel: smallcnn trained a few seconds with plain cross-entropy on 4k MNIST
              images, calibrated on 1k validation images, checkpointed, exported (export.export_checkpoint)
              and archived (export.build_archive); plus held-out test images and the offline answers the
              same policy gives on them.
`torchserve_server` (session) -> LiveServer: TorchServe (Java frontend + Python worker) serving that archive
              on free loopback ports with its own state folder, token auth ON; stopped at the end of the
              session even when tests fail. Other suites (monitoring) can reuse it: see LiveServer.

Everything is built under pytest's tmp folder; nothing is written to the repository.
"""
from __future__ import annotations

import io
import json
import logging
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from early_exit.manifest import Manifest
from serving.client import Client, Response
from serving.server import KeyKind, Ports, Server, start_server

log = logging.getLogger(__name__)

MODEL_NAME = "mnist_tiny"
TRAIN_SAMPLES, VAL_SAMPLES, TEST_SAMPLES = 4000, 1000, 300
# audit_rate 1: every early answer is audited, so the audit's metrics and alert move within seconds
SERVE_OPTIONS = {"max_payload_bytes": 262_144, "top_k": 3, "intra_op_threads": 1, "audit_rate": 1.0}
MAX_BATCH_DELAY_MS = 20  # long enough that concurrent requests share a batch, short enough for serial tests


@dataclass
class TinyModel:
    name: str
    checkpoint: Path  # the trained tiny model (training.checkpoint format), for attacks built during a test
    export_dir: Path
    model_store: Path
    mar: Path
    manifest: Manifest
    test_x: np.ndarray  # N x 1 x 28 x 28 float32 in [0, 1] (k/255 values, so PNG round-trips exactly)
    test_y: np.ndarray
    ceiling: float  # the handler option max_budget_mflops the archive was built with (twice the full depth)
    offline_exits: np.ndarray  # 0-based exit the shared policy picks at the default budget (ORT logits)
    offline_classes: np.ndarray
    exit_logits: list[np.ndarray] = field(repr=False)  # per exit, N x 10, from the exported stage graphs

    def png(self, i: int) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray((self.test_x[i, 0] * 255).round().astype(np.uint8), mode="L").save(buf, format="PNG")
        return buf.getvalue()

    def json_body(self, i: int) -> bytes:
        return json.dumps({"data": self.test_x[i].tolist()}).encode()

    def offline(self, budget: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(0-based exits, classes) the shared policy gives every test image under `budget` (after the ceiling)."""
        from early_exit.policy import confidence, entry_for_budget, select_exits, softmax

        budget = min(self.manifest.default_budget_mflops if budget is None else budget, self.ceiling)
        entry = entry_for_budget(budget, self.manifest.calibration, self.manifest.staged_mflops)
        conf = np.stack([confidence(softmax(l), self.manifest.confidence) for l in self.exit_logits], axis=1)
        exits = select_exits(conf, entry.thresholds, entry.max_exit)
        classes = np.array([int(np.argmax(self.exit_logits[e][i])) for i, e in enumerate(exits)])
        return exits, classes


def _train_tiny(data_dir: Path, seed: int = 0):
    """Plain cross-entropy on every exit, one pass over 4k images: exits end up with different confidences."""
    import torch

    from training.data import Split, load_tensors
    from training.models import create_model

    torch.manual_seed(seed)
    x, y = load_tensors("mnist", data_dir, Split.TRAIN, limit=TRAIN_SAMPLES)
    model = create_model("smallcnn", num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for epoch in range(2):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, len(x), 128):
            idx = perm[start:start + 128]
            loss = sum(torch.nn.functional.cross_entropy(l, y[idx]) for l in model(x[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


def _build_tiny(root: Path) -> TinyModel:
    import torch

    from early_exit.manifest import load_manifest
    from export.archive import ServeConfig, build_archive
    from export.pipeline import export_checkpoint
    from early_exit.manifest import sha256_file
    from early_exit.policy import ConfidenceMeasure
    from training.calibrate import Calibration, ExitOutputs, agreement_with_last_exit, calibrate_table, \
        calibration_path, write_calibration
    from training.checkpoint import make_checkpoint, save_checkpoint
    from training.data import Split, dataset_info, load_tensors, prepare_data

    started = time.monotonic()
    torch.set_num_threads(2)
    data_dir = prepare_data("mnist", root / "data")
    model = _train_tiny(data_dir)
    vx, vy = load_tensors("mnist", data_dir, Split.VAL, limit=VAL_SAMPLES)
    with torch.no_grad():
        val_logits = [l.numpy() for l in model(vx)]
    cost = model.cost_profile()
    exit_mflops = cost.staged
    val_outputs = ExitOutputs.from_logits(val_logits, vy.numpy())
    table = calibrate_table(val_outputs, exit_mflops)
    ckpt = make_checkpoint(model, dataset_info("mnist").to_dict(), {"purpose": "integration test", "loss": "ce"})
    ckpt_path = save_checkpoint(ckpt, root / "tiny.pt")
    write_calibration(Calibration(ConfidenceMeasure.MAX_PROB, 0.003, cost, tuple(table), exit_mflops[-1],
                                  sha256_file(ckpt_path), {"purpose": "integration test"},
                                  tuple(agreement_with_last_exit(val_outputs, table[-1]))),
                      calibration_path(ckpt_path))
    trained = time.monotonic()
    ceiling = round(2 * exit_mflops[-1], 3)
    result = export_checkpoint(ckpt_path, root / "export", MODEL_NAME, "1.0", adv_samples=0, batch_sizes=(1, 5))
    store = root / "model_store"
    mar = build_archive(result.out_dir, store, MODEL_NAME, "1.0", Path(__file__).parents[2] / "serving/handler.py",
                        # one worker (the shipped default is 2): the reliability test kills it by its pid
                        serve_config=ServeConfig.from_values(min_workers=1, max_workers=1, batch_size=8,
                                                             max_batch_delay=MAX_BATCH_DELAY_MS,
                                                             response_timeout=30,
                                                             handler={**SERVE_OPTIONS, "max_budget_mflops": ceiling}))
    manifest = load_manifest(result.out_dir)

    tx, ty = load_tensors("mnist", data_dir, Split.TEST, limit=TEST_SAMPLES)
    test_x = tx.numpy().astype(np.float32)
    exit_logits = _ort_exit_logits(result.out_dir, manifest, test_x)
    tiny = TinyModel(MODEL_NAME, ckpt_path, result.out_dir, store, mar, manifest, test_x, ty.numpy(), ceiling, np.empty(0),
                     np.empty(0), exit_logits)
    tiny.offline_exits, tiny.offline_classes = tiny.offline()
    print("\ntiny model: trained+calibrated in %.1f s, exported+archived in %.1f s; exit MFLOPs %s; "
                "offline exits at default budget %s" % (trained - started, time.monotonic() - trained,
                [round(c, 3) for c in exit_mflops], np.bincount(tiny.offline_exits, minlength=3).tolist()))
    return tiny


def _ort_exit_logits(folder: Path, manifest, x: np.ndarray) -> list[np.ndarray]:
    """Every exit's logits from the exported stage graphs through the staged runner, one row at a time (as a
    lone request runs)."""
    from early_exit.runner import StagedRunner

    runner = StagedRunner.from_folder(manifest, folder)
    rows = [runner.exit_logits(row[None]) for row in x]
    return [np.concatenate([r[k] for r in rows]) for k in range(manifest.num_exits)]


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return _build_tiny(tmp_path_factory.mktemp("tiny_mnist"))


@dataclass
class LiveServer:
    """A running TorchServe for the tiny model; what a test (or the monitoring suite) needs to talk to it.

    server      serving.server.Server: inference_url, management_url, metrics_url, key(), auth_header(),
                workers(model), log_dir, state_dir
    model       served model name (also the ModelName label on :8082/metrics)
    tiny        the TinyModel (test images, offline answers, manifest)
    """

    server: Server
    model: str
    tiny: TinyModel

    def client(self, timeout: float = 30.0) -> Client:
        """A new HTTP client with the inference token (one per thread)."""
        return Client(self.server.inference_url, self.model, self.server.key(KeyKind.INFERENCE), timeout)

    def predict(self, body: bytes, budget: float | str | None = None, **kwargs) -> Response:
        client = self.client()
        try:
            return client.predict(body, budget, **kwargs)
        finally:
            client.close()

    def scrape(self) -> str:
        with urllib.request.urlopen(self.server.metrics_url, timeout=10) as response:
            return response.read().decode()

    def samples(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Every series of sample `name` on the scrape, parsed by prometheus_client's own parser:
        {((label, value), ...) in exposition order: value}. The parser names counter samples `<name>_total`
        (TorchServe exposes them without the suffix); either spelling finds them."""
        from prometheus_client.parser import text_string_to_metric_families

        return {tuple(sample.labels.items()): sample.value
                for family in text_string_to_metric_families(self.scrape())
                for sample in family.samples if sample.name in (name, f"{name}_total")}

    def worker_pids(self) -> list[int]:
        return [int(w["pid"]) for w in self.server.workers(self.model) if w.get("status") == "READY"]

    def model_log(self) -> str:
        path = self.server.log_dir / "model_log.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture(scope="session")
def torchserve_server(tiny_mnist: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    state = tmp_path_factory.mktemp("torchserve")
    started = time.monotonic()
    server = start_server(tiny_mnist.model_store, [f"{tiny_mnist.name}.mar"], state, Ports.free(), ready_timeout=180)
    print(f"\nTorchServe READY in {time.monotonic() - started:.1f} s (state {state})")
    try:
        yield LiveServer(server, tiny_mnist.name, tiny_mnist)
    finally:
        server.stop()
