"""The image's Python environment, built without Docker, serves an archive (issue 19 item 1).

A fresh venv in a temporary folder gets exactly what the Dockerfile installs: `docker/requirements.txt` and the
CPU variant's onnxruntime (the Dockerfile's ARG ORT_CPU), with this machine's pip configuration (torch==2.14.1
comes from local wheels here; the image takes it from the PyTorch CPU index). The files the Dockerfile COPYs
are laid out as in the image, and the image's entrypoint runs `serve` from that venv (PATH as the image's ENV
sets it): `python -m serving.server start --foreground`, then TorchServe's worker imports the handler from the
archive with only those packages. One PNG gets the answer the offline policy gives.

Cost on a 2-core machine: `pip install --no-compile` 86-147 s (5.6 GB: torch's CUDA build and its libraries;
with byte-compiling it took 265 s), READY 7 s later; the test about 110 s beside the session's tiny model
(about 100 s more when it runs alone). Marked `slow`, still run by `make test` and CI.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from serving.client import Client
from serving.server import Server, pin_line
from tests.deploy_files import dockerfile_lines
from tests.integration.test_container_commands import wait_for_line
from tests.promtools import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PIP_TIMEOUT_S = 1200
READY_TIMEOUT_S = 240


def _image_install() -> tuple[Path, str]:
    """(the requirements file, the CPU onnxruntime requirement) as the Dockerfile installs them; fails when the
    Dockerfile stops installing `-r <that file>` plus the variant's onnxruntime."""
    text = "\n".join(dockerfile_lines())
    (source,) = [line.split()[1] for line in dockerfile_lines()
                 if line.startswith("COPY ") and line.split()[-1] == "/tmp/requirements.txt"]
    assert "uv pip install -r /tmp/requirements.txt \"$ort\"" in text and 'cpu) torch_index="$TORCH_CPU_INDEX"; ' \
        'ort="$ORT_CPU"' in text, "the Dockerfile no longer installs the requirements file plus ORT_CPU"
    (ort,) = re.findall(r"\bARG ORT_CPU=(\S+)", text)
    return REPO / source, ort


def _image_files(home: Path) -> None:
    """Copy what the Dockerfile COPYs from the build context (WORKDIR-relative destinations) into `home`, except
    the model store (the test serves its own archive, as a mounted volume does)."""
    for line in dockerfile_lines():
        args = [a for a in line.split()[1:] if not a.startswith("--chmod") and not a.startswith("--chown")]
        if not line.startswith("COPY ") or args[0].startswith("--from=") or args[-1].startswith("/"):
            continue
        *sources, dest = args
        if dest.rstrip("/") == "model-store":
            continue
        for source in sources:
            target = home / dest / Path(source).name if dest.endswith("/") else home / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / source, target)


def test_image_environment_serves_an_archive(tiny_mnist, tmp_path: Path) -> None:
    requirements, ort = _image_install()
    with tempfile.TemporaryDirectory(prefix="ee-image-venv-") as scratch:  # 5.6 GB: removed at the end
        venv = Path(scratch) / "venv"
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile",
                              "-r", str(requirements), ort], capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-4000:]
        installed = time.monotonic()
        print(f"\nimage venv: pip install {installed - started:.0f} s")

        home = tmp_path / "home"  # the image's /home/model-server
        _image_files(home)
        workflows = home / "workflow-store"
        workflows.mkdir(mode=0o555)
        env = {**{k: v for k, v in os.environ.items()
                  if not k.startswith(("EE_", "TS_", "PYTHON", "VIRTUAL_ENV"))},
               # the Dockerfile's ENV, with this test's store (a mounted volume) and the archive's pin
               "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "EE_HOME": str(home),
               "EE_MODEL_STORE": str(tiny_mnist.model_store), "EE_WORKFLOW_STORE": str(workflows),
               "EE_MODELS": tiny_mnist.mar.name, "EE_MODEL_SHA256": pin_line([tiny_mnist.mar]).split("=", 1)[1]}
        entrypoint = ["bash", str(home / "docker" / "entrypoint.sh")]
        # `serve` as the image runs it; only the listeners move to loopback and a free port on a shared machine
        proc = subprocess.Popen([*entrypoint, "serve", "--bind", "127.0.0.1", "--port", str(free_port())], env=env,
                                cwd=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_line(proc, "TorchServe is READY", READY_TIMEOUT_S)
            ready = time.monotonic()
            server = Server.from_state_dir(home)
            key = subprocess.run([*entrypoint, "key"], env=env, capture_output=True, text=True, timeout=60)
            assert key.returncode == 0, key.stderr
            client = Client(server.inference_url, tiny_mnist.name, key.stdout.strip())
            try:
                answer = client.predict(tiny_mnist.png(0))
            finally:
                client.close()
            assert answer.status == 200, answer
            assert answer.body["class_index"] == tiny_mnist.offline_classes[0]
            assert answer.body["exit_index"] == tiny_mnist.offline_exits[0] + 1
            # the worker that answered is the venv's Python (symlinked to its base interpreter), not this one's
            (worker,) = server.workers(tiny_mnist.name)
            cmdline = Path(f"/proc/{worker['pid']}/cmdline").read_bytes().split(b"\0")
            assert cmdline[0].decode() == str(venv / "bin" / "python"), cmdline
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        assert proc.returncode == 0, proc.stderr.read()
        print(f"image venv: READY {ready - installed:.0f} s after install, total {time.monotonic() - started:.0f} s")
