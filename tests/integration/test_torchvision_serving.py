"""A `torchvision:resnet` ([1, 1, 1, 1] BasicBlocks, 32x32 RGB, random init) exported, archived and served by a
real TorchServe: answers match the exported stage graphs, and a budget caps the exit at its staged cost."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from tests.torchvision_cases import export_case

pytestmark = pytest.mark.integration
CASE = "resnet-1111"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    from early_exit.runner import StagedRunner
    from export.archive import ServeConfig, build_archive
    from serving.server import Ports, start_server

    root = tmp_path_factory.mktemp("tv_serving")
    started = time.monotonic()
    _, _, result = export_case(CASE, root, batch_sizes=(1, 2))
    manifest = result.manifest
    mar = build_archive(result.out_dir, root / "store", manifest.name, "1.0",
                        Path(__file__).parents[2] / "serving/handler.py",
                        serve_config=ServeConfig.from_values(min_workers=1, max_workers=1, batch_size=1,
                                                             max_batch_delay=5, response_timeout=60,
                                                             handler={"intra_op_threads": 1}))
    exported = time.monotonic()
    server = start_server(mar.parent, [mar.name], root / "state", Ports.free(), ready_timeout=180)
    print(f"\n{CASE}: exported+archived in {exported - started:.1f} s, TorchServe READY in "
          f"{time.monotonic() - exported:.1f} s")
    try:
        yield server, manifest, StagedRunner.from_folder(manifest, result.out_dir)
    finally:
        server.stop()


def test_a_torchvision_backbone_is_served_as_its_stage_graphs_answer(served) -> None:
    from serving.client import Client
    from serving.server import KeyKind

    server, manifest, runner = served
    x = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32)).astype(np.float32) / 255
    logits = runner.exit_logits(x)
    client = Client(server.inference_url, manifest.name, server.key(KeyKind.INFERENCE), timeout=60)
    try:
        for i in range(len(x)):
            body = json.dumps({"data": x[i].tolist()}).encode()
            capped = client.predict(body, budget=manifest.staged_mflops[0])
            assert capped.status == 200, capped.body
            assert capped.body["exit_index"] == 1 and capped.body["num_exits"] == 3
            assert capped.body["class_index"] == int(logits[0][i].argmax())
            assert capped.body["mflops_spent"] == pytest.approx(manifest.staged_mflops[0])
            free = client.predict(body, budget=manifest.staged_mflops[-1])
            assert free.status == 200, free.body
            k = free.body["exit_index"] - 1
            assert free.body["class_index"] == int(logits[k][i].argmax())
            assert free.body["mflops_spent"] == pytest.approx(manifest.staged_mflops[k])
    finally:
        client.close()
