"""Start, wait for, and stop a local TorchServe for the early-exit handler (`make serve`, `make stop`).

    python -m serving.server start [--model-store model_store] [--models all|NAME.mar ...] [--no-token-auth]
    python -m serving.server stop
    python -m serving.server key [--kind inference|management]

Each server gets its own state folder (default `.serve/`): TMPDIR (TorchServe keeps its PID file and the
unpacked archives there), logs, the rendered config.properties and the token key file (`key_file.json`,
written to the directory torchserve starts in). Two servers on one machine therefore need their own state
folder, ports and initial_worker_port, which `start_server` takes as arguments (the tests use this).

`/ping` says Healthy before any worker is up, so readiness is a worker whose status is READY in
`GET :8081/models/<name>` (with the management key).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SERVING = Path(__file__).resolve().parent
DEFAULT_STATE = REPO / ".serve"
DEFAULT_STORE = REPO / "model_store"
KEY_FILE = "key_file.json"
PID_FILE = ".model_server.pid"  # torchserve's name, inside $TMPDIR


class KeyKind(str, Enum):
    INFERENCE = "inference"
    MANAGEMENT = "management"
    API = "API"


class ServerError(RuntimeError):
    """TorchServe did not start, did not become ready, or is not running."""


@dataclass(frozen=True)
class Ports:
    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071
    worker: int = 9000  # initial_worker_port: workers take worker, worker+1, ...

    @classmethod
    def free(cls, worker_span: int = 16) -> "Ports":
        """Ports nobody listens on now (loopback); the worker range is checked as a block."""
        picked: list[int] = []
        socks = []
        try:
            for _ in range(5):
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                socks.append(s)
                picked.append(s.getsockname()[1])
        finally:
            for s in socks:
                s.close()
        for base in range(20000 + os.getpid() % 20000, 60000, 97):
            if all(_port_free(base + i) for i in range(worker_span)) and not set(picked) & set(
                    range(base, base + worker_span)):
                return cls(*picked, worker=base)
        raise ServerError("no free block of worker ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Server:
    """A started TorchServe: where it lives, its ports and its keys (None with token auth off)."""

    state_dir: Path
    ports: Ports
    models: list[str] = field(default_factory=list)
    token_auth: bool = True

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.inference}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.management}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}/metrics"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def key(self, kind: KeyKind = KeyKind.INFERENCE) -> str | None:
        return read_key(self.state_dir, kind) if self.token_auth else None

    def auth_header(self, kind: KeyKind = KeyKind.INFERENCE) -> dict[str, str]:
        key = self.key(kind)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def describe(self, model: str) -> list[dict[str, Any]]:
        """GET /models/<name> from the management API."""
        return _get_json(f"{self.management_url}/models/{model}", self.auth_header(KeyKind.MANAGEMENT))

    def workers(self, model: str) -> list[dict[str, Any]]:
        return [w for entry in self.describe(model) for w in entry.get("workers", [])]

    def stop(self, timeout: float = 60.0) -> None:
        stop_server(self.state_dir, timeout)


def read_key(state_dir: Path, kind: KeyKind = KeyKind.INFERENCE) -> str:
    path = Path(state_dir) / KEY_FILE
    try:
        keys = json.loads(path.read_text())
        return str(keys[kind.value]["key"])
    except FileNotFoundError:
        raise ServerError(f"{path} does not exist: is the server running with token authorization?") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ServerError(f"{path} has no {kind.value} key ({exc})") from None


def _get_json(url: str, headers: dict[str, str], timeout: float = 5.0) -> Any:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def render_config(template: Path, out: Path, values: dict[str, str]) -> Path:
    """Copy a config.properties, replacing (or appending) the given keys; comments and order are kept."""
    lines, seen = [], set()
    for line in template.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and key in values:
            lines.append(f"{key}={values[key]}")
            seen.add(key)
        else:
            lines.append(line)
    lines += [f"{k}={v}" for k, v in values.items() if k not in seen]
    out.write_text("\n".join(lines) + "\n")
    return out


def _env(state_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # TMPDIR: torchserve's PID file; TEMP: java.io.tmpdir, where the frontend unpacks archives.
    env.update(TMPDIR=str(state_dir / "tmp"), TEMP=str(state_dir / "tmp"), LOG_LOCATION=str(state_dir / "logs"),
               METRICS_LOCATION=str(state_dir / "logs"))
    # The venv's bin first: TorchServe starts workers with the `python` it finds.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _torchserve() -> str:
    exe = Path(sys.executable).parent / "torchserve"
    return str(exe) if exe.exists() else "torchserve"


def start_server(
    model_store: Path = DEFAULT_STORE,
    models: Sequence[str] = ("all",),
    state_dir: Path = DEFAULT_STATE,
    ports: Ports = Ports(),
    *,
    config_template: Path = SERVING / "config.properties",
    metrics_config: Path = SERVING / "metrics.yaml",
    log_config: Path = SERVING / "log4j2.xml",
    token_auth: bool = True,
    extra_config: dict[str, str] | None = None,
    ready_timeout: float = 180.0,
) -> Server:
    """Start TorchServe in the background and return once every model has a READY worker.

    `models`: "all" (every archive in the store) or archive file names / NAME=FILE.mar entries.
    On a failed start the server is stopped again and ServerError says where the logs are.
    """
    state_dir, model_store = Path(state_dir).resolve(), Path(model_store).resolve()
    if (state_dir / "tmp" / PID_FILE).exists() and _pid_alive(_read_pid(state_dir)):
        raise ServerError(f"a server from {state_dir} is already running (stop it with `make stop`)")
    for sub in ("tmp", "logs"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    (state_dir / KEY_FILE).unlink(missing_ok=True)
    names = _model_names(model_store, models)
    if not names:
        raise ServerError(f"no model archive (.mar) in {model_store}; build one first (make train-export)")
    config = render_config(Path(config_template), state_dir / "config.properties", {
        "inference_address": f"http://127.0.0.1:{ports.inference}",
        "management_address": f"http://127.0.0.1:{ports.management}",
        "metrics_address": f"http://127.0.0.1:{ports.metrics}",
        "grpc_inference_port": str(ports.grpc_inference),
        "grpc_management_port": str(ports.grpc_management),
        "initial_worker_port": str(ports.worker),
        "model_store": str(model_store),
        "metrics_config": str(Path(metrics_config).resolve()),
        "load_models": ",".join(_load_entries(models)),
        **(extra_config or {}),
    })
    cmd = [_torchserve(), "--start", "--ncs", "--ts-config", str(config), "--model-store", str(model_store),
           "--log-config", str(Path(log_config).resolve())]
    if not token_auth:
        cmd.append("--disable-token-auth")
    log.info("starting TorchServe: %s", " ".join(cmd))
    offsets = _log_sizes(state_dir / "logs")
    with open(state_dir / "logs" / "launcher.log", "ab") as out:
        proc = subprocess.run(cmd, cwd=state_dir, env=_env(state_dir), stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise ServerError(f"torchserve --start exited with {proc.returncode}; see {state_dir / 'logs'}")
    server = Server(state_dir, ports, names, token_auth)
    try:
        wait_until_ready(server, names, ready_timeout, offsets)
    except BaseException:  # not ready, or Ctrl-C while waiting: never leave a half-started server behind
        stop_server(state_dir)
        raise
    return server


def _load_entries(models: Sequence[str]) -> list[str]:
    return ["ALL"] if [m.lower() for m in models] == ["all"] else list(models)


def _model_names(model_store: Path, models: Sequence[str]) -> list[str]:
    """Served names: NAME of NAME=FILE entries, else the modelName inside each archive (not its file name)."""
    if [m.lower() for m in models] == ["all"]:
        return sorted(_mar_model_name(p) for p in model_store.glob("*.mar"))
    return [m.split("=", 1)[0] if "=" in m else _mar_model_name(model_store / m) for m in models]


def _mar_model_name(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            return str(json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelName"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ServerError(f"{path} is not a readable model archive ({exc})") from None


def wait_until_ready(server: Server, models: Sequence[str], timeout: float,
                     log_offsets: dict[str, int] | None = None) -> None:
    """Poll the management API until each model has a READY worker (key file first, with token auth)."""
    deadline = time.monotonic() + timeout
    pending = list(models)
    last_error = ""
    while pending and time.monotonic() < deadline:
        pid = _read_pid(server.state_dir)
        if pid is not None and not _pid_alive(pid):
            raise ServerError(f"TorchServe (pid {pid}) exited during start; see {server.log_dir}")
        failure = _load_failure(server.log_dir, log_offsets or {})
        if failure:
            raise ServerError(f"the model does not load ({failure}); see {server.log_dir / 'model_log.log'}")
        try:
            if server.token_auth and not (server.state_dir / KEY_FILE).exists():
                raise ServerError("key file not written yet")
            for model in list(pending):
                if any(w.get("status") == "READY" for w in server.workers(model)):
                    pending.remove(model)
        except (OSError, ServerError, ValueError) as exc:  # not listening yet, 404 while loading, partial file
            last_error = str(exc)
        if pending:
            time.sleep(0.25)
    if pending:
        raise ServerError(f"no READY worker for {pending} after {timeout:.0f} s ({last_error}); see {server.log_dir}")


LOAD_FAILED = "Load model failed"
PYTHON_ERROR = re.compile(r"MODEL_LOG - ((?:\w+\.)*\w+(?:Error|Exception): .*)$")


def _log_sizes(log_dir: Path) -> dict[str, int]:
    """Where each log ends now: a new start only reads what it appends (logs are kept across starts)."""
    return {name: (log_dir / name).stat().st_size if (log_dir / name).exists() else 0
            for name in ("ts_log.log", "model_log.log")}


def _read_new(log_dir: Path, name: str, offsets: dict[str, int]) -> str:
    try:
        with open(log_dir / name, "rb") as f:
            f.seek(offsets.get(name, 0))
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _load_failure(log_dir: Path, offsets: dict[str, int], attempts: int = 2) -> str | None:
    """The worker's last Python error once TorchServe failed to load the model `attempts` times, else None.

    TorchServe retries a failing load forever with back-off; a handler that refuses to load (bad sha256,
    bad options) would otherwise only show up as a readiness timeout.
    """
    if _read_new(log_dir, "ts_log.log", offsets).count(LOAD_FAILED) < attempts:
        return None
    errors = PYTHON_ERROR.findall(_read_new(log_dir, "model_log.log", offsets))
    return errors[-1] if errors else "the worker died while loading"


def _read_pid(state_dir: Path) -> int | None:
    try:
        return int((Path(state_dir) / "tmp" / PID_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_server(state_dir: Path = DEFAULT_STATE, timeout: float = 60.0) -> bool:
    """`torchserve --stop` with the server's own TMPDIR; SIGKILL to that PID (only) if it hangs. True if one ran."""
    state_dir = Path(state_dir).resolve()
    pid = _read_pid(state_dir)
    if pid is None or not _pid_alive(pid):
        return False
    with open(state_dir / "logs" / "launcher.log", "ab") as out:
        subprocess.run([_torchserve(), "--stop"], cwd=state_dir, env=_env(state_dir), stdout=out,
                       stderr=subprocess.STDOUT, timeout=timeout)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _pid_alive(pid):
        log.warning("TorchServe pid %d ignored --stop; sending SIGKILL", pid)
        os.kill(pid, signal.SIGKILL)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start TorchServe and wait until every model has a READY worker")
    start.add_argument("--model-store", type=Path, default=DEFAULT_STORE)
    start.add_argument("--models", nargs="+", default=["all"], help="'all' or NAME.mar / NAME=NAME.mar entries")
    start.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    start.add_argument("--port", type=int, default=8080,
                       help="inference port; management and metrics are the next two (gRPC/worker ports: free ones)")
    start.add_argument("--no-token-auth", action="store_true", help="local work only: no Authorization header")
    start.add_argument("--timeout", type=float, default=180.0)
    stop = sub.add_parser("stop", help="stop the server started from --state-dir")
    stop.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    key = sub.add_parser("key", help="print a token from the running server's key file")
    key.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    key.add_argument("--kind", choices=[k.value for k in KeyKind], default=KeyKind.INFERENCE.value)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.command == "start":
            ports = Ports()
            if args.port != ports.inference:  # a second server: gRPC and worker ports must not clash either
                free = Ports.free()
                ports = Ports(args.port, args.port + 1, args.port + 2, free.grpc_inference, free.grpc_management,
                              free.worker)
            server = start_server(args.model_store, args.models, args.state_dir, ports,
                                  token_auth=not args.no_token_auth, ready_timeout=args.timeout)
            print(f"TorchServe is READY: {', '.join(server.models)}")
            for model in server.models:
                print(f"  inference   {server.inference_url}/predictions/{model}")
            print(f"  management  {server.management_url}/models")
            print(f"  metrics     {server.metrics_url}")
            if server.token_auth:
                print(f"  token       python -m serving.server key   (reads {server.state_dir / KEY_FILE})")
                print(f'  example     curl -H "Authorization: Bearer $(python -m serving.server key)" '
                      f'-H "X-Compute-Budget: 10" -H "Content-Type: image/png" --data-binary @digit.png '
                      f"{server.inference_url}/predictions/"
                      f"{server.models[0]}")
            print(f"  logs        {server.log_dir}   stop: make stop")
        elif args.command == "stop":
            print("stopped" if stop_server(args.state_dir) else f"no server running from {args.state_dir}")
        else:
            print(read_key(args.state_dir, KeyKind(args.kind)))
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
