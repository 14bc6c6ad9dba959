"""The container's commands against a real TorchServe: `serving.server start --foreground` (what
docker/entrypoint.sh `serve` runs), the entrypoint's `healthcheck` and `key`, an answer with that key, and
SIGTERM (what `docker stop` sends) stopping TorchServe. Same environment variables as the image; loopback
ports of its own (the image's 8080-8082 may be taken on a shared machine)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from serving.client import Client
from serving.server import Server, _pid_alive, _read_pid, pin_line
from tests.promtools import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
READY_TIMEOUT_S = 180


def container_env(home: Path, store: Path, models: str) -> dict[str, str]:
    """The image's environment (Dockerfile ENV) with this test's folders and Python, and the served archives'
    sha256 pinned as the deployment pins them (EE_MODEL_SHA256)."""
    archives = sorted(store.glob("*.mar")) if models == "all" else [store / m.split("=", 1)[-1] for m in models.split(",")]
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("EE_", "TS_"))},
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(REPO), "EE_HOME": str(home), "EE_MODEL_STORE": str(store), "EE_MODELS": models,
            "EE_MODEL_SHA256": pin_line(archives).split("=", 1)[1]}


def entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=60)


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float) -> list[str]:
    """stdout lines of `proc` up to the first that starts with `prefix`; fails on exit or timeout."""
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(prefix):
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found.wait(0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {prefix!r} line (exit {proc.poll()}): {lines}\n{proc.stderr.read() if proc.poll() else ''}")
    return lines


def test_foreground_start_healthcheck_key_and_sigterm(tiny_mnist, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = container_env(home, tiny_mnist.model_store, f"{tiny_mnist.name}.mar")
    port = free_port()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "serving.server", "start", "--foreground", "--port", str(port)],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(proc, "TorchServe is READY", READY_TIMEOUT_S)
        print(f"\nforeground start READY in {time.monotonic() - started:.1f} s")
        health = entrypoint(env, "healthcheck")
        assert health.returncode == 0 and health.stdout.strip() == "healthy", health.stderr
        key = entrypoint(env, "key").stdout.strip()
        assert key and key == entrypoint(env, "key", "--kind", "inference").stdout.strip()
        server = Server.from_state_dir(home)
        assert server.ports.inference == port and server.token_auth
        client = Client(server.inference_url, tiny_mnist.name, key)
        try:
            answer = client.predict(tiny_mnist.png(0))
            refused = Client(server.inference_url, tiny_mnist.name, "not-the-key").predict(tiny_mnist.png(0))
        finally:
            client.close()
        assert answer.status == 200 and answer.body["class_index"] == tiny_mnist.offline_classes[0]
        assert refused.status in (400, 401), refused
        frontend = _read_pid(home)
        assert frontend is not None and _pid_alive(frontend)
    finally:
        proc.send_signal(signal.SIGTERM)  # docker stop
        try:
            returncode = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert returncode == 0, proc.stderr.read()
    assert not _pid_alive(frontend), "SIGTERM left TorchServe running"
    after = entrypoint(env, "healthcheck")
    assert after.returncode == 1 and after.stderr.startswith("unhealthy: "), after.stderr
    assert len(after.stderr.splitlines()) == 1
    stop = subprocess.run([sys.executable, "-m", "serving.server", "stop"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert stop.returncode == 0 and stop.stdout.startswith("no server running")


KEY_MINUTES = 0.25  # TorchServe reads token_expiration_min as a float: 15 s keys


def test_keys_are_renewed_before_they_expire(tiny_mnist, tmp_path: Path) -> None:
    """With 15 s keys, 20 s past the first keys' expiry: the healthcheck and a request with the key read anew
    succeed, the first (stale) inference key is refused."""
    base = (REPO / "serving" / "config.properties").read_text()
    config = tmp_path / "short-keys.properties"
    config.write_text(base.replace("token_expiration_min=1440", f"token_expiration_min={KEY_MINUTES}"))
    assert config.read_text() != base
    home = tmp_path / "home"
    env = {**container_env(home, tiny_mnist.model_store, f"{tiny_mnist.name}.mar"), "EE_BASE_CONFIG": str(config)}
    proc = subprocess.Popen([sys.executable, "-m", "serving.server", "start", "--foreground",
                             "--port", str(free_port())], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(proc, "TorchServe is READY", READY_TIMEOUT_S)
        first = entrypoint(env, "key").stdout.strip()
        server = Server.from_state_dir(home)
        time.sleep(KEY_MINUTES * 60 + 5)
        assert entrypoint(env, "healthcheck").returncode == 0
        current = entrypoint(env, "key").stdout.strip()
        assert current and current != first
        fresh = Client(server.inference_url, tiny_mnist.name, current).predict(tiny_mnist.png(0))
        stale = Client(server.inference_url, tiny_mnist.name, first).predict(tiny_mnist.png(0))
        assert fresh.status == 200, fresh
        assert stale.status in (400, 401), stale
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
    assert "renewed the inference and management keys" in proc.stderr.read()
