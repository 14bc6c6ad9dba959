"""Decode cost of the worst requests the derived input limits accept, against one model pass, on this machine.

    python -m bench.bench_decode [--shape 1 28 28] [--out bench/results/decode-limits.json]

The limits are `serving.decoding.derive_limits(shape)` (what the handler applies when the options leave them
unset). For each body format the benchmark builds the most expensive bodies that still pass the limits: PNGs at the
pixel limit in every costly mode (16-bit RGBA incompressible, 8-bit RGBA, 16-bit grey, grey, flat and noisy, EXIF
rotated), JPEGs at the pixel limit (flat, so they fit the byte limit) and at the byte limit (noisy, the largest that
fits; progressive; CMYK), JSON at the byte limit (784 numbers padded, and as many numbers as fit, which is refused
as WRONG_SHAPE after parsing). Each is decoded with `serving.decoding.decode_request` (median of --repeats).

The model pass is a stand-in MNIST-sized network (training.models smallcnn, seeded random weights: the cost does
not depend on the weights) exported with the project's exporter and run by onnxruntime at batch 1 with one intra-op
thread (the handler's default): the full graph, and the staged chain through every exit (what a request that runs
to the last exit costs). The ratio is the worst decode time over the cheaper of the two.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import statistics
import struct
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench.common import result_header, seed_everything

log = logging.getLogger("bench.bench_decode")
DEFAULT_OUT = Path("bench/results/decode-limits.json")
RATIO_LIMIT = 10.0


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # first-call allocations
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def _encode(image: Any, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_rgba16(pixels: np.ndarray) -> bytes:
    """16-bit RGBA PNG written by hand (Pillow does not write it), stored uncompressed-ish (zlib level 0)."""
    height, width, _ = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 0))
            + chunk(b"IEND", b""))


def worst_bodies(shape: tuple[int, int, int], seed: int) -> list[tuple[str, bytes, str]]:
    """(name, body, content type) of the costliest bodies within the derived limits for `shape`."""
    from PIL import Image

    from serving.decoding import derive_limits

    limits = derive_limits(shape)
    rng = np.random.default_rng(seed)
    side = math.isqrt(limits.png_pixels)
    bodies: list[tuple[str, bytes, str]] = []

    def png(name: str, body: bytes) -> None:
        bodies.append((f"png {name} {side}x{side}", body, "image/png"))

    noise = rng.integers(0, 256, (side, side, 4), dtype=np.uint8)
    png("rgba16 noise stored", _png_rgba16(rng.integers(0, 65536, (side, side, 4), dtype=np.uint16)))
    png("rgba16 flat", _png_rgba16(np.zeros((side, side, 4), dtype=np.uint16)))
    png("rgba noise", _encode(Image.fromarray(noise, "RGBA"), "PNG"))
    png("rgb noise", _encode(Image.fromarray(noise[..., :3], "RGB"), "PNG"))
    png("grey16 noise", _encode(Image.frombytes("I;16", (side, side),
                                                rng.integers(0, 65536, (side, side)).astype("<u2").tobytes()), "PNG"))
    png("grey noise", _encode(Image.fromarray(noise[..., 0], "L"), "PNG"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: a transpose on top of the decode
    png("rgba noise exif-rotated", _encode(Image.fromarray(noise, "RGBA"), "PNG", exif=exif))

    jpeg_side = math.isqrt(limits.jpeg_pixels)
    for mode in ("RGB", "CMYK", "L"):
        body = _encode(Image.new(mode, (jpeg_side, jpeg_side)), "JPEG", quality=100)
        bodies.append((f"jpeg {mode} flat q100 {jpeg_side}x{jpeg_side}", body, "image/jpeg"))
    for mode, progressive in (("RGB", False), ("RGB", True), ("CMYK", False)):
        body, size = _largest_noisy_jpeg(mode, progressive, limits.jpeg_bytes, rng)
        bodies.append((f"jpeg {mode} noise q95{' progressive' if progressive else ''} {size}x{size}", body,
                       "image/jpeg"))

    values = rng.random(math.prod(shape)).reshape(shape).tolist()
    document = json.dumps({"data": values}).encode()
    padded = document[:-1] + b" " * (limits.json_bytes - len(document)) + b"}"
    bodies.append((f"json {math.prod(shape)} values padded to the limit", padded, "application/json"))
    many = b'{"data": [' + b",".join([b"0"] * ((limits.json_bytes - 12) // 2)) + b"]}"
    bodies.append((f"json {(limits.json_bytes - 12) // 2} zeros (refused: wrong shape)", many, "application/json"))
    channels, height, width = shape
    commas = math.prod(shape) + channels * height + channels + 2 * 256 + 64  # the most _check_value_count lets by
    at_limit = b'{"data": [' + b",".join([b"0"] * (commas + 1)) + b"]}"
    bodies.append((f"json {commas + 1} zeros, the most commas parsed (refused)", at_limit, "application/json"))
    deep = b'{"data": ' + b"[" * 900 + b"]" * 900 + b"}"
    bodies.append(("json nested 900 deep (refused)", deep, "application/json"))
    for name, body, _ in bodies:
        assert len(body) <= limits.max_bytes(), name
    return bodies


def _largest_noisy_jpeg(mode: str, progressive: bool, max_bytes: int, rng: np.random.Generator) -> tuple[bytes, int]:
    """The largest square noisy JPEG (quality 95) within `max_bytes`: the most entropy-coded data per byte."""
    from PIL import Image

    bands = len(mode)
    lo, hi, best = 8, 4096, (b"", 0)
    while lo <= hi:
        size = (lo + hi) // 2
        pixels = rng.integers(0, 256, (size, size, bands), dtype=np.uint8)
        body = _encode(Image.frombytes(mode, (size, size), pixels.tobytes()), "JPEG", quality=95,
                       progressive=progressive)
        if len(body) <= max_bytes:
            best, lo = (body, size), size + 1
        else:
            hi = size - 1
    return best


def model_pass_ms(shape: tuple[int, int, int], repeats: int) -> dict[str, Any]:
    """Median onnxruntime time (ms) of one batch-1 pass of the stand-in model: full graph and staged chain."""
    import onnxruntime as ort
    import torch

    from export.onnx_export import export_graphs
    from training.models import create_model

    model = create_model("smallcnn", num_classes=10, in_channels=shape[0])
    if tuple(model.input_shape) != tuple(shape):
        raise SystemExit(f"the stand-in model takes {model.input_shape}, not {shape}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        specs = export_graphs(model, Path(folder))
        sessions = {spec.file: ort.InferenceSession(str(Path(folder) / spec.file), options,
                                                    providers=["CPUExecutionProvider"]) for spec in specs}
        stages, full = [sessions[s.file] for s in specs[:-1]], sessions[specs[-1].file]

        def staged() -> None:
            features = x
            for session in stages:
                outputs = session.run(None, {session.get_inputs()[0].name: features})
                features = outputs[0]

        full_ms = _median_ms(lambda: full.run(None, {full.get_inputs()[0].name: x}), repeats)
        staged_ms = _median_ms(staged, repeats)
    return {"model": "smallcnn (random weights, MNIST-sized)", "mflops_staged": list(model.cost_profile().staged),
            "mflops_full": model.cost_profile().full, "full_graph_ms": round(full_ms, 4),
            "staged_all_exits_ms": round(staged_ms, 4), "runtime": "onnxruntime CPU, batch 1, 1 intra-op thread"}


def run(shape: tuple[int, int, int], seed: int, repeats: int) -> dict[str, Any]:
    from dataclasses import asdict

    from serving.decoding import InputSpec, decode_request
    from serving.rejections import RequestRejected

    seed_everything(seed)
    spec = InputSpec(shape)
    model = model_pass_ms(shape, repeats * 10)
    cases = []
    for name, body, content_type in worst_bodies(shape, seed):
        def decode() -> str:
            try:
                decode_request({"body": body}, {"Content-Type": content_type}, spec)
                return "accepted"
            except RequestRejected as rejected:
                return f"{rejected.reason.value} ({rejected.reason.status})"

        outcome = decode()
        cases.append({"body": name, "bytes": len(body), "outcome": outcome,
                      "decode_ms": round(_median_ms(decode, repeats), 3)})
        log.info("%-55s %8d bytes %-28s %8.3f ms", name, len(body), outcome, cases[-1]["decode_ms"])
    worst = max(cases, key=lambda c: c["decode_ms"])
    reference = min(model["full_graph_ms"], model["staged_all_exits_ms"])
    ratio = worst["decode_ms"] / reference
    return {**result_header("decode-limits", seed, note=f"derived limits for input shape {list(shape)}"),
            "input_shape": list(shape), "limits": asdict(spec.limits), "repeats": repeats, "model_pass": model,
            "cases": cases, "worst": {"body": worst["body"], "decode_ms": worst["decode_ms"],
                                      "model_pass_ms": reference, "ratio": round(ratio, 2),
                                      "within": RATIO_LIMIT, "ok": ratio <= RATIO_LIMIT}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bench_decode", description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[1, 28, 28], metavar=("C", "H", "W"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=21, help="decodes per body (median)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run(tuple(args.shape), args.seed, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    worst = result["worst"]
    log.info("worst accepted body %s: %.3f ms = %.2fx a model pass (%.3f ms); wrote %s", worst["body"],
             worst["decode_ms"], worst["ratio"], worst["model_pass_ms"], args.out)
    return 0 if worst["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
