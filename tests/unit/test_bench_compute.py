"""bench_compute's pure parts: the efficiency figure, medians over rounds, the forced-exit check, its inputs."""
from __future__ import annotations

import numpy as np
import pytest

from bench.bench_compute import build_parser, check_answers, cpu_per_request, efficiency, generated_images
from bench.common import Call, png_bodies
from serving.decoding import InputSpec, decode_request


def test_efficiency_is_wall_saving_over_flop_saving() -> None:
    e = efficiency(time_exit=0.6, time_full=1.0, flops_exit=40.0, flops_full=100.0)
    assert e == {"flop_saving": 0.6, "wall_saving": 0.4, "efficiency": pytest.approx(0.667, abs=1e-3)}
    assert efficiency(0.4, 1.0, 40.0, 100.0)["efficiency"] == 1.0  # time in proportion to FLOPs
    last = efficiency(1.1, 1.0, 110.0, 100.0)  # the last exit costs more than the full graph (its heads)
    assert last["flop_saving"] == -0.1 and last["efficiency"] is None
    assert efficiency(None, 1.0, 40.0, 100.0)["wall_saving"] is None


def test_check_answers_counts_the_forced_exit() -> None:
    calls = [Call(200, 0.0, {"exit_index": 2, "mflops_spent": 64.85}),
             Call(200, 0.0, {"exit_index": 1, "mflops_spent": 33.9}),
             Call(200, 0.0, {"exit_index": 2, "mflops_spent": 60.0}),
             Call(503, 0.0, None)]
    assert check_answers(calls, 2, 64.85) == {"answers": 3, "at_forced_exit": 1, "elsewhere": 2, "errors": 1}


def test_generated_images_round_trip_through_the_handlers_decoder() -> None:
    x = generated_images(3, (3, 32, 32), seed=1)
    assert x.dtype == np.float32 and x.shape == (3, 3, 32, 32)
    assert np.array_equal(x, generated_images(3, (3, 32, 32), seed=1))
    spec = InputSpec((3, 32, 32), 1.0, 1 << 20, 4096 * 4096)
    for body, img in zip(png_bodies(x), x):
        decoded = decode_request({"body": body}, {"Content-Type": "image/png"}, spec)
        assert np.array_equal(decoded.x, img)


def test_cli_defaults() -> None:
    args = build_parser().parse_args([])
    assert (args.blocks_per_stage, args.width, args.rounds) == (3, 64, 3)
    assert args.out.name == "serve-compute-cifar.json"


def test_cpu_per_request_adds_client_and_server() -> None:
    assert cpu_per_request({"cpu_ms_per_request": {"client": 0.25, "server": 2.0, "workers": 1.5}}) == 2.25
    assert cpu_per_request({}) is None
