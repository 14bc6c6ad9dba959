"""Start, check, probe and stop a TorchServe for the early-exit handler: `make serve`, `make stop` and the
container's entrypoint (docker/entrypoint.sh) all run these subcommands.

    python -m serving.server start [--model-store DIR] [--models all|NAME.mar ...] [--bind ADDR] [--foreground]
    python -m serving.server check         render the config, check it, print it (exit 2 with one line a problem)
    python -m serving.server pin FILE.mar ...   print the EE_MODEL_SHA256 line that pins these archives
    python -m serving.server healthcheck   exit 0 when every registered model has a READY worker, else 1
    python -m serving.server stop
    python -m serving.server key [--kind inference|management|API]

Each server gets its own state folder (default `.serve/`, or $EE_HOME): TMPDIR (TorchServe keeps its PID file
and the unpacked archives there), logs, the rendered config.properties and the token key file (`key_file.json`,
written to the directory torchserve starts in). Two servers on one machine therefore need their own state
folder, ports and initial_worker_port, which `start_server` takes as arguments (the tests use this).

Options default to the container's environment variables where one exists (EE_HOME, EE_MODEL_STORE, EE_MODELS,
EE_BASE_CONFIG, EE_METRICS_CONFIG, EE_LOG_CONFIG, EE_MANAGEMENT_PORT, EE_TOKEN_AUTH, EE_MODEL_SHA256,
EE_WORKFLOW_STORE), so the entrypoint passes no paths of its own.

Only local, pinned archives are served. `start` and `check` hash every archive to be served and refuse one whose
sha256 is not the one pinned in EE_MODEL_SHA256 ("mnist.mar=<hex>,other.mar=<hex>", the deployment's
configuration: compose environment, a Kubernetes ConfigMap; `python -m export` prints the line), and refuse to
start without a pin unless EE_MODEL_SHA256=unpinned (local work). The rendered config restricts registration to
archive files in the model store (allowed_urls), points the workflow store at an empty folder without write
permission, and sets enable_envvars_config=false so TS_* environment variables cannot override it; TS_* variables
are also removed from TorchServe's environment.

`/ping` says Healthy before any worker is up, so readiness is a worker whose status is READY in
`GET :8081/models/<name>` (with the management key).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SERVING = Path(__file__).resolve().parent
DEFAULT_STATE = REPO / ".serve"
DEFAULT_STORE = REPO / "model_store"
KEY_FILE = "key_file.json"
PID_FILE = ".model_server.pid"  # torchserve's name, inside $TMPDIR
CONFIG_FILE = "config.properties"  # the rendered config, in the state folder
LOOPBACK = "127.0.0.1"
EXIT_CHECK_FAILED = 2  # `check` (and `start`) when the configuration is refused
PIN_ENV = "EE_MODEL_SHA256"  # the archives' pinned digests: "NAME.mar=<sha256 hex>,..." or UNPINNED
UNPINNED = "unpinned"  # explicit opt-out for local work: archives are served without a digest check
WORKFLOW_STORE = "workflow-store"  # default empty, read-only workflow store, inside the state folder
_PIN = re.compile(r"^([^=,/\\\s]+\.mar)=([0-9a-f]{64})$")


class KeyKind(str, Enum):
    INFERENCE = "inference"
    MANAGEMENT = "management"
    API = "API"  # only calls the token API (POST /token?type=...); TorchServe never expires it


class TokenAuth(str, Enum):
    """EE_TOKEN_AUTH: whether TorchServe asks for its bearer keys."""

    ON = "on"
    # Keys off: only for replicas whose inference port is reachable solely through an authenticating gateway
    # (deploy/k8s), since each TorchServe process draws its own random keys. Also `start --no-token-auth`.
    OFF_BEHIND_GATEWAY = "off-behind-gateway"

    @classmethod
    def parse(cls, value: str) -> "TokenAuth":
        """The mode named by `value`; ServerError names the accepted values otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ServerError(f"EE_TOKEN_AUTH must be {' or '.join(repr(m.value) for m in cls)}, "
                              f"got {value!r}") from None


class ServerError(RuntimeError):
    """TorchServe did not start, did not become ready, or is not running."""


def parse_pins(text: str) -> dict[str, str] | None:
    """EE_MODEL_SHA256's value -> {archive file name: sha256 hex}; None for the explicit opt-out `unpinned`.

    Entries are `NAME.mar=<64 lowercase hex digits>` separated by commas (spaces around them are ignored).
    Raises ServerError (one line) when the value is empty, an entry is malformed or names an archive twice."""
    text = text.strip()
    if text == UNPINNED:
        return None
    if not text:
        raise ServerError(f"{PIN_ENV} is not set: pin each archive's sha256 in the deployment's configuration, "
                          f'e.g. {PIN_ENV}="mnist.mar=<sha256>" (python -m export and `python -m serving.server pin '
                          f"FILE.mar` print the line), or set {PIN_ENV}={UNPINNED} for local work only")
    pins: dict[str, str] = {}
    for entry in (e.strip() for e in text.split(",")):
        match = _PIN.match(entry)
        if not match:
            raise ServerError(f"{PIN_ENV}: expected NAME.mar=<64 hex digits>[,...] or {UNPINNED}, got {entry!r}")
        if match.group(1) in pins:
            raise ServerError(f"{PIN_ENV} pins {match.group(1)} twice")
        pins[match.group(1)] = match.group(2)
    return pins


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in `chunk`-byte blocks; OSError when it cannot be read."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def pin_line(archives: Sequence[Path]) -> str:
    """The `EE_MODEL_SHA256=...` line that pins these archives (by file name), for an operator to paste."""
    return f"{PIN_ENV}=" + ",".join(f"{Path(a).name}={sha256_of(Path(a))}" for a in archives)


def served_archives(model_store: Path, models: Sequence[str]) -> list[str]:
    """The archive file names a launch serves: every .mar in the store for "all", else each entry's FILE."""
    if [m.lower() for m in models] == ["all"]:
        return sorted(p.name for p in Path(model_store).glob("*.mar"))
    return [m.split("=", 1)[-1].strip() for m in models]


def archive_pin_problems(model_store: Path, models: Sequence[str], pins_text: str) -> list[str]:
    """How the archives to be served disagree with EE_MODEL_SHA256's pins ([] = every one matches, or the value
    is `unpinned`): no or a malformed value, a served archive without a pin or with another sha256, a pinned
    archive missing from the store. One line each."""
    try:
        pins = parse_pins(pins_text)
    except ServerError as exc:
        return [str(exc)]
    if pins is None:
        return []
    problems = []
    served = served_archives(model_store, models)
    for name in served:
        path = Path(model_store) / name
        if not path.is_file():
            continue  # reported by the model store check
        if name not in pins:
            problems.append(f"{path} is served but {PIN_ENV} pins no sha256 for {name}")
            continue
        try:
            actual = sha256_of(path)
        except OSError as exc:
            problems.append(f"cannot read {path} ({exc})")
            continue
        if actual != pins[name]:
            problems.append(f"{path} has sha256 {actual}, not the pinned {pins[name]} ({PIN_ENV}): "
                            f"refusing to serve a replaced archive")
    problems += [f"{PIN_ENV} pins {name}, which is not in {model_store}"
                 for name in pins if name not in served and not (Path(model_store) / name).is_file()]
    return problems


def allowed_urls(model_store: Path) -> str:
    """allowed_urls for config.properties: only `file://` URLs of archives directly inside the store.

    TorchServe matches each registration URL against these regexes (Java, case-insensitive, whole URL); http(s)
    and file URLs elsewhere are refused ("does not match any allowed URL(s)"), a plain file name still names an
    archive in the store. Every character of the path but letters, digits, `/` and `_` is escaped, and each
    backslash doubled for the properties file."""
    quoted = "".join(c if c.isascii() and (c.isalnum() or c in "/_") else "\\\\" + c
                     for c in str(Path(model_store).resolve()))
    return f"file://{quoted}/[^/]+\\\\.mar"


def workflow_store_problems(folder: Path) -> list[str]:
    """[] when `folder` is an empty directory without write permission bits, else one line why not."""
    try:
        entries = list(Path(folder).iterdir())
        mode = Path(folder).stat().st_mode
    except OSError as exc:
        return [f"workflow store {folder} is not a readable directory ({exc})"]
    problems = []
    if entries:
        problems.append(f"workflow store {folder} must be empty, holds {sorted(e.name for e in entries)[:3]}")
    if mode & 0o222:
        problems.append(f"workflow store {folder} must not be writable (mode {mode & 0o777:o}; chmod a-w)")
    return problems


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


    @classmethod
    def from_state_dir(cls, state_dir: Path) -> "Server":
        """The server whose rendered config is in `state_dir` (ports and token mode read back from it).

        Raises ServerError when there is no rendered config (the server was never started from there)."""
        state_dir = Path(state_dir).resolve()
        props = read_properties(state_dir / CONFIG_FILE)
        if not props:
            raise ServerError(f"no {CONFIG_FILE} in {state_dir}: no server was started from there")

        def port(key: str, default: int) -> int:
            match = re.search(r":(\d+)/?$", props.get(key, ""))
            return int(match.group(1)) if match else default

        defaults = Ports()
        ports = Ports(port("inference_address", defaults.inference), port("management_address", defaults.management),
                      port("metrics_address", defaults.metrics))
        return cls(state_dir, ports, token_auth=props.get("disable_token_authorization", "false") != "true")


def read_key(state_dir: Path, kind: KeyKind = KeyKind.INFERENCE, attempts: int = 5) -> str:
    """The current `kind` key from the server's key_file.json, read anew on every call (keys are renewed).

    TorchServe rewrites the file in place when it renews a key, so a half-written file is read again after
    50 ms, up to `attempts` times. Raises ServerError when the file is missing or has no such key."""
    path = Path(state_dir) / KEY_FILE
    for attempt in range(attempts):
        try:
            keys = json.loads(path.read_text())
            return str(keys[kind.value]["key"])
        except FileNotFoundError:
            raise ServerError(f"{path} does not exist: is the server running with token authorization?") from None
        except json.JSONDecodeError as exc:
            if attempt == attempts - 1:
                raise ServerError(f"{path} is not valid JSON ({exc})") from None
            time.sleep(0.05)
        except (KeyError, TypeError) as exc:
            raise ServerError(f"{path} has no {kind.value} key ({exc})") from None
    raise AssertionError("unreachable")


def _get_json(url: str, headers: dict[str, str], timeout: float = 5.0) -> Any:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


_PROPERTY = re.compile(r"^\s*([^#!\s=:][^\s=:]*)\s*[=:]\s*(.*?)\s*$")


def read_properties(path: Path) -> dict[str, str]:
    """A Java properties file as TorchServe reads it: `key=value` or `key: value`, `#`/`!` comments, the last
    value of a repeated key wins. A missing file reads as {}. (Line continuations are not used by TorchServe's
    keys and are not supported.)"""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    props = {}
    for line in text.splitlines():
        match = _PROPERTY.match(line)
        if match:
            props[match.group(1)] = match.group(2)
    return props


def render_config(template: Path, out: Path, values: Mapping[str, str]) -> Path:
    """Copy a config.properties with the given keys set: the first line of each key is replaced, its later
    repeats dropped (so a key appears once), keys the template lacks are appended; comments and order are kept."""
    lines, seen = [], set()
    for line in Path(template).read_text().splitlines():
        match = _PROPERTY.match(line)
        key = match.group(1) if match else None
        if key in values:
            if key not in seen:
                lines.append(f"{key}={values[key]}")
                seen.add(key)
        else:
            lines.append(line)
    lines += [f"{k}={v}" for k, v in values.items() if k not in seen]
    Path(out).write_text("\n".join(lines) + "\n")
    return Path(out)


def _env(state_dir: Path) -> dict[str, str]:
    """TorchServe's environment: this process's, less every TS_* variable (TorchServe's configuration overrides)
    and PYTHONPATH, with the state folder's paths and this Python's bin first on PATH.

    PYTHONPATH is the launcher's own (the entrypoint puts the image's folder there, which holds only the launcher's
    part of `serving`); passed on, it would come before the archive's folder on the worker's path and shadow the
    `serving` and `early_exit` packages riding inside the archive (seen: the image's worker failed to import
    serving.audit)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TS_") and k != "PYTHONPATH"}
    # TMPDIR: torchserve's PID file; TEMP: java.io.tmpdir, where the frontend unpacks archives.
    env.update(TMPDIR=str(state_dir / "tmp"), TEMP=str(state_dir / "tmp"), LOG_LOCATION=str(state_dir / "logs"),
               METRICS_LOCATION=str(state_dir / "logs"))
    # The venv's bin first: TorchServe starts workers with the `python` it finds.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _torchserve() -> str:
    exe = Path(sys.executable).parent / "torchserve"
    return str(exe) if exe.exists() else "torchserve"


@dataclass(frozen=True)
class Launch:
    """What a server is started from: archives, state folder, ports, listeners and configuration files."""

    model_store: Path = DEFAULT_STORE
    models: tuple[str, ...] = ("all",)  # "all", or archive file names / NAME=FILE.mar entries
    state_dir: Path = DEFAULT_STATE
    ports: Ports = Ports()
    bind: str = LOOPBACK  # address of the inference and metrics listeners; management and gRPC stay on loopback
    token_auth: bool = True
    config_template: Path = SERVING / "config.properties"
    metrics_config: Path = SERVING / "metrics.yaml"
    log_config: Path = SERVING / "log4j2.xml"
    extra_config: Mapping[str, str] = field(default_factory=dict)  # further keys, set last (tests, benchmarks)
    # EE_MODEL_SHA256's value. The Python API (tests, benchmarks serving archives they just built) defaults to the
    # opt-out; the CLI, and so the container, defaults to $EE_MODEL_SHA256 and refuses to start without it.
    model_sha256: str = UNPINNED
    workflow_store: Path | None = None  # None: WORKFLOW_STORE in the state folder, created empty and read-only

    @property
    def config_path(self) -> Path:
        return Path(self.state_dir).resolve() / CONFIG_FILE

    @property
    def workflow_store_path(self) -> Path:
        return Path(self.workflow_store or Path(self.state_dir) / WORKFLOW_STORE).resolve()

    def config_values(self) -> dict[str, str]:
        """The keys the launch sets over the template: addresses, ports, paths, models and token mode."""
        ports = self.ports
        return {
            "inference_address": f"http://{self.bind}:{ports.inference}",
            "management_address": f"http://{LOOPBACK}:{ports.management}",
            "metrics_address": f"http://{self.bind}:{ports.metrics}",
            "grpc_inference_address": LOOPBACK,
            "grpc_management_address": LOOPBACK,
            "grpc_inference_port": str(ports.grpc_inference),
            "grpc_management_port": str(ports.grpc_management),
            "initial_worker_port": str(ports.worker),
            "model_store": str(Path(self.model_store).resolve()),
            "metrics_config": str(Path(self.metrics_config).resolve()),
            # "all" is expanded to the archives there now: those are what the pins were checked against.
            "load_models": ",".join(_load_entries(self.model_store, self.models)),
            "disable_token_authorization": "false" if self.token_auth else "true",
            "allowed_urls": allowed_urls(Path(self.model_store)),
            "workflow_store": str(self.workflow_store_path),
            "enable_envvars_config": "false",
            **self.extra_config,
        }

    def render(self) -> Path:
        """Write the state folder's config.properties (the folder is created) and create the workflow store, empty
        and read-only (mode 0555), when it does not exist; returns the config's path. OSError when either cannot
        be written."""
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        workflows = self.workflow_store_path
        if not workflows.exists():
            workflows.mkdir(parents=True)
            workflows.chmod(0o555)
        return render_config(Path(self.config_template), self.config_path, self.config_values())


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
    bind: str = LOOPBACK,
    extra_config: dict[str, str] | None = None,
    model_sha256: str = UNPINNED,
    ready_timeout: float = 180.0,
) -> Server:
    """Start TorchServe in the background and return once every model has a READY worker.

    `models`: "all" (every archive in the store) or archive file names / NAME=FILE.mar entries. `model_sha256`:
    EE_MODEL_SHA256's format; a served archive that does not match is refused (ServerError) before TorchServe
    starts. `ready_timeout` in seconds. On a failed start the server is stopped again and ServerError says where
    the logs are.
    """
    return start_launch(Launch(Path(model_store), tuple(models), Path(state_dir), ports, bind, token_auth,
                               Path(config_template), Path(metrics_config), Path(log_config), extra_config or {},
                               model_sha256),
                        ready_timeout)


def start_launch(launch: Launch, ready_timeout: float = 180.0) -> Server:
    """`start_server` for a Launch (what the CLI builds); `ready_timeout` in seconds."""
    state_dir, model_store = Path(launch.state_dir).resolve(), Path(launch.model_store).resolve()
    pid = _read_pid(state_dir)
    # A PID file left by a killed container can name a reused PID, this process's own included.
    if pid is not None and pid != os.getpid() and _pid_alive(pid):
        raise ServerError(f"a server from {state_dir} is already running (stop it with `make stop`)")
    for sub in ("tmp", "logs"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    (state_dir / KEY_FILE).unlink(missing_ok=True)
    # The digests first: an archive is not even opened (its manifest read) before it is known to be the pinned one.
    pin_problems = archive_pin_problems(model_store, launch.models, launch.model_sha256)
    if pin_problems:
        raise ServerError("; ".join(pin_problems))
    names = _model_names(model_store, launch.models)
    if not names:
        raise ServerError(f"no model archive (.mar) in {model_store}; build one first (make train-export)")
    if launch.model_sha256.strip() == UNPINNED:
        log.warning("WARNING: %s=%s: the archives' sha256 is not checked (local work only)", PIN_ENV, UNPINNED)
    config = launch.render()
    cmd = [_torchserve(), "--start", "--ncs", "--ts-config", str(config), "--model-store", str(model_store),
           "--log-config", str(Path(launch.log_config).resolve())]
    log.info("starting TorchServe: %s", " ".join(cmd))
    offsets = _log_sizes(state_dir / "logs")
    with open(state_dir / "logs" / "launcher.log", "ab") as out:
        proc = subprocess.run(cmd, cwd=state_dir, env=_env(state_dir), stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise ServerError(f"torchserve --start exited with {proc.returncode}; see {state_dir / 'logs'}")
    server = Server(state_dir, launch.ports, names, launch.token_auth)
    try:
        wait_until_ready(server, names, ready_timeout, offsets)
    except BaseException:  # not ready, or Ctrl-C while waiting: never leave a half-started server behind
        stop_server(state_dir)
        raise
    return server


def check_launch(launch: Launch, environ: Mapping[str, str] | None = None) -> list[str]:
    """Render the launch's config.properties and return every problem that should stop a start ([] = none).

    Refused: a missing config/metrics/log file; token authorization off when `launch.token_auth` asks for it;
    enable_envvars_config other than false (TS_* variables would override the file); the model-registration API
    on; allowed_urls other than the model store's archives; a workflow store that is not empty and read-only; an
    archive whose sha256 is not the one pinned in `launch.model_sha256`, or no pin (archive_pin_problems);
    management off loopback; listeners not where the launch puts them; metrics_mode other than prometheus; a
    metrics.yaml that does not declare the handler's metrics (serving/metrics.py) as the handler emits them; no
    archive to serve; torchserve or java not on PATH; a state or log folder that is not writable.
    `environ` defaults to os.environ."""
    environ = os.environ if environ is None else environ
    missing = [f"missing file: {p}" for p in (launch.config_template, launch.metrics_config, launch.log_config)
               if not os.access(p, os.R_OK)]
    if missing:
        return missing
    try:
        props = read_properties(launch.render())
    except OSError as exc:
        return [f"cannot write {launch.config_path} ({exc})"]
    errors = []
    if launch.token_auth and props.get("disable_token_authorization") != "false":
        errors.append("token authorization must stay on (disable_token_authorization=false)")
    if props.get("enable_envvars_config") != "false":
        overrides = sorted(k for k in environ if k.startswith("TS_"))
        errors.append(f"enable_envvars_config must be false, got {props.get('enable_envvars_config')!r}: TS_* "
                      f"environment variables would override the config file (set now: {overrides or 'none'})")
    if props.get("enable_model_api") == "true":
        errors.append("enable_model_api=true lets any management caller register arbitrary model code: keep it off")
    expected_urls = allowed_urls(Path(launch.model_store))
    if props.get("allowed_urls") != expected_urls:
        errors.append(f"allowed_urls must be {expected_urls} (archives in the model store only), "
                      f"got {props.get('allowed_urls')!r}")
    if props.get("workflow_store") != str(launch.workflow_store_path):
        errors.append(f"workflow_store must be {launch.workflow_store_path}, got {props.get('workflow_store')!r}")
    errors += workflow_store_problems(launch.workflow_store_path)
    if not re.match(r"^https?://(127\.0\.0\.1|localhost):\d+$", props.get("management_address", "")):
        errors.append(f"management_address must bind to loopback, got {props.get('management_address')!r}")
    for key, port in (("inference_address", launch.ports.inference), ("metrics_address", launch.ports.metrics)):
        if props.get(key) != f"http://{launch.bind}:{port}":
            errors.append(f"{key} must be http://{launch.bind}:{port}, got {props.get(key)!r}")
    if props.get("metrics_mode") != "prometheus":
        errors.append(f"metrics_mode must be prometheus (Prometheus scrapes :{launch.ports.metrics}/metrics), "
                      f"got {props.get('metrics_mode')!r}")
    errors += metrics_config_problems(Path(launch.metrics_config))
    errors += _model_store_problems(Path(launch.model_store), launch.models)
    errors += archive_pin_problems(Path(launch.model_store), launch.models, launch.model_sha256)
    if not Path(_torchserve()).exists() and not shutil.which(_torchserve()):
        errors.append("torchserve is not on PATH")
    if not shutil.which("java"):
        errors.append("java is not on PATH (TorchServe's frontend needs a JRE >= 17)")
    logs = Path(launch.state_dir).resolve() / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        errors.append(f"cannot create {logs} ({exc})")
    for folder in (Path(launch.state_dir).resolve(), logs):
        if folder.is_dir() and not os.access(folder, os.W_OK):
            errors.append(f"{folder} is not writable (TorchServe writes key_file.json, its PID file and logs there)")
    return errors


def metrics_config_problems(path: Path) -> list[str]:
    """How `path` (metrics.yaml) disagrees with the handler's metric specs: a metric it does not declare in
    model_metrics (TorchServe drops it), or declares with another kind or other dimensions ([] = none)."""
    import yaml

    from serving.metrics import METRICS

    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        return [f"{path} is not readable YAML ({exc})"]
    declared = {m["name"]: (kind, list(m.get("dimensions") or []))
                for kind, metrics in (doc.get("model_metrics") or {}).items() for m in metrics or []}
    problems = []
    for spec in METRICS:
        name = spec.name.value
        if name not in declared:
            problems.append(f"{path} does not declare the model metric {name} (TorchServe drops undeclared metrics)")
        elif declared[name] != (spec.kind.value, spec.all_dimensions):
            problems.append(f"{path} declares {name} as {declared[name][0]} {declared[name][1]}; the handler emits "
                            f"a {spec.kind.value} with dimensions {spec.all_dimensions}")
    return problems


def _model_store_problems(model_store: Path, models: Sequence[str]) -> list[str]:
    if not model_store.is_dir():
        return [f"model store {model_store} does not exist: mount one, or build the image after 'make train-export'"]
    if [m.lower() for m in models] == ["all"]:
        if not any(model_store.glob("*.mar")):
            return [f"no .mar archive in {model_store}: run 'make train-export' before 'docker build', "
                    f"or mount a model store"]
        return []
    files = [m.split("=", 1)[-1].strip() for m in models]
    return [f"models names {f}, which is not in {model_store}" for f in files if not (model_store / f).is_file()]


def healthcheck(state_dir: Path, timeout: float = 4.0) -> list[str]:
    """The registered models, when each has a READY worker; raises ServerError (one line) otherwise.

    Reads the management address and token mode from the state folder's rendered config and the management key
    from key_file.json anew (keys are renewed). `timeout`: seconds per HTTP call."""
    server = Server.from_state_dir(state_dir)
    try:
        headers = server.auth_header(KeyKind.MANAGEMENT)
        models = [m["modelName"] for m in _get_json(f"{server.management_url}/models", headers, timeout)["models"]]
        if not models:
            raise ServerError("no model registered")
        for model in models:
            desc = _get_json(f"{server.management_url}/models/{urllib.parse.quote(model)}", headers, timeout)
            if not any(w.get("status") == "READY" for version in desc for w in version.get("workers", [])):
                raise ServerError(f"no READY worker for {model}")
    except (OSError, ValueError, KeyError, TypeError) as exc:  # refused, 4xx/5xx, timeout, malformed answer
        raise ServerError(f"{server.management_url}: {exc}") from None
    return models


TORCHSERVE_DEFAULT_KEY_MINUTES = 60.0  # TorchServe 0.12 when token_expiration_min is unset or not a number


def key_lifetime_s(state_dir: Path) -> float:
    """Seconds an inference or management key stays valid: the rendered config's token_expiration_min (TorchServe
    reads it as a float number of minutes, so 0.1 is 6 s)."""
    value = read_properties(Path(state_dir) / CONFIG_FILE).get("token_expiration_min", "")
    try:
        return float(value) * 60
    except ValueError:
        return TORCHSERVE_DEFAULT_KEY_MINUTES * 60


def keys_expire_at(state_dir: Path) -> float:
    """When the first of the inference and management keys expires (seconds since the epoch), from the
    "expiration time" TorchServe writes beside each key. Raises ServerError when the key file lacks them."""
    path = Path(state_dir) / KEY_FILE
    try:
        keys = json.loads(path.read_text())
        stamps = [keys[kind.value]["expiration time"] for kind in (KeyKind.INFERENCE, KeyKind.MANAGEMENT)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ServerError(f"{path} has no key expiration times ({exc})") from None
    # Java's Instant.toString: up to 9 fractional digits and a Z; Python reads at most 6.
    return min(datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", t).replace("Z", "+00:00")).timestamp()
               for t in stamps)


def renew_keys(server: Server, timeout: float = 5.0) -> None:
    """Replace the management and inference keys through TorchServe's token API (`POST /token?type=...` on the
    management port, authorized by the API key, which never expires). TorchServe writes the new keys to
    key_file.json and refuses the old ones from then on, so every user of a key reads the file anew
    (read_key). Raises ServerError when a renewal is refused or the server does not answer; `timeout` in seconds."""
    api = {"Authorization": f"Bearer {read_key(server.state_dir, KeyKind.API)}"}
    for kind in (KeyKind.MANAGEMENT, KeyKind.INFERENCE):
        request = urllib.request.Request(f"{server.management_url}/token?type={kind.value}", method="POST", headers=api)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read()
        except OSError as exc:
            raise ServerError(f"renewing the {kind.value} key failed ({exc})") from None


def serve_foreground(server: Server, poll_s: float = 1.0) -> int:
    """Block while TorchServe runs, renewing its keys at half their lifetime; SIGTERM or SIGINT stop it (exit
    status 0). Returns 1 when TorchServe exits on its own. `poll_s`: seconds between liveness checks.

    A failed renewal is logged and tried again at the next poll; keys that expire anyway make the healthcheck
    fail, so the orchestrator restarts the container."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    pid = _read_pid(server.state_dir)
    half_life = key_lifetime_s(server.state_dir) / 2 if server.token_auth else None
    if half_life is not None:
        poll_s = min(poll_s, half_life / 4)
    while not stop.wait(poll_s):
        _reap_children()
        if not _pid_alive(pid):
            log.error("TorchServe (pid %s) exited; see %s", pid, server.log_dir)
            return 1
        try:
            if half_life is not None and time.time() >= keys_expire_at(server.state_dir) - half_life:
                renew_keys(server)
                log.info("renewed the inference and management keys (valid %.0f s)", 2 * half_life)
        except ServerError as exc:
            log.error("%s; trying again in %.1f s", exc, poll_s)
    log.info("stopping TorchServe")
    server.stop()
    return 0


def _load_entries(model_store: Path, models: Sequence[str]) -> list[str]:
    """load_models: the archives in the store now for "all" (not TorchServe's ALL, which would also load one
    that appears after the pins were checked), else the entries as given."""
    return served_archives(model_store, models) if [m.lower() for m in models] == ["all"] else list(models)


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


def _reap_children() -> None:
    """Collect exited children: as a container's PID 1 this process inherits TorchServe's daemonized frontend,
    whose zombie would otherwise still look alive to `_pid_alive`."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # no children left to wait for
            return
        if pid == 0:
            return


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


def _env_path(name: str, default: Path | None) -> Path | None:
    return Path(os.environ[name]) if os.environ.get(name) else default


def _state_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, default=_env_path("EE_HOME", DEFAULT_STATE),
                        help="the server's state folder (default: $EE_HOME, else .serve)")


def _launch_args(parser: argparse.ArgumentParser) -> None:
    """Options `start` and `check` share: what is served, where, and from which configuration files."""
    _state_dir_arg(parser)
    parser.add_argument("--model-store", type=Path, default=_env_path("EE_MODEL_STORE", DEFAULT_STORE))
    parser.add_argument("--models", nargs="+", default=os.environ.get("EE_MODELS", "all").split(","),
                        help="'all' or NAME.mar / NAME=NAME.mar entries (default: $EE_MODELS, comma-separated)")
    parser.add_argument("--port", type=int, default=Ports().inference,
                        help="inference port; metrics is port+2 and management port+1 unless --management-port")
    parser.add_argument("--management-port", type=int,
                        default=int(os.environ["EE_MANAGEMENT_PORT"]) if os.environ.get("EE_MANAGEMENT_PORT") else None)
    parser.add_argument("--bind", default=LOOPBACK,
                        help="address of the inference and metrics listeners (the container: 0.0.0.0)")
    parser.add_argument("--token-auth", default=os.environ.get("EE_TOKEN_AUTH", TokenAuth.ON.value),
                        help=f"{' or '.join(m.value for m in TokenAuth)} (default: $EE_TOKEN_AUTH, else on)")
    parser.add_argument("--no-token-auth", action="store_true",
                        help="local work only: --token-auth off-behind-gateway, no Authorization header")
    parser.add_argument("--config", type=Path, default=_env_path("EE_BASE_CONFIG", SERVING / "config.properties"))
    parser.add_argument("--metrics-config", type=Path, default=_env_path("EE_METRICS_CONFIG", SERVING / "metrics.yaml"))
    parser.add_argument("--log-config", type=Path, default=_env_path("EE_LOG_CONFIG", SERVING / "log4j2.xml"))
    parser.add_argument("--model-sha256", default=os.environ.get(PIN_ENV, ""),
                        help=f"NAME.mar=<sha256>[,...]: each served archive's pinned digest, or {UNPINNED} (local "
                             f"work only); default: ${PIN_ENV}, refused when empty")
    parser.add_argument("--workflow-store", type=Path, default=_env_path("EE_WORKFLOW_STORE", None),
                        help=f"an empty folder without write permission (default: $EE_WORKFLOW_STORE, else "
                             f"{WORKFLOW_STORE}/ in the state folder, created so)")


def _launch(args: argparse.Namespace) -> Launch:
    """The Launch the options describe; a token mode that does not exist is printed and raises ConfigRefused."""
    try:
        mode = TokenAuth.OFF_BEHIND_GATEWAY if args.no_token_auth else TokenAuth.parse(args.token_auth)
    except ServerError as exc:
        print(f"config check FAILED: {exc}", file=sys.stderr)
        raise ConfigRefused(str(exc)) from None
    if mode is TokenAuth.OFF_BEHIND_GATEWAY:
        log.warning("WARNING: token authorization is OFF (%s): the inference port must only be reachable through "
                    "an authenticating gateway", mode.value)
    defaults = Ports()
    ports = defaults
    if args.port != defaults.inference:  # a second server: gRPC and worker ports must not clash either
        free = Ports.free()
        ports = Ports(args.port, args.port + 1, args.port + 2, free.grpc_inference, free.grpc_management, free.worker)
    if args.management_port is not None:
        ports = Ports(ports.inference, args.management_port, ports.metrics, ports.grpc_inference,
                      ports.grpc_management, ports.worker)
    return Launch(args.model_store, tuple(m.strip() for m in args.models if m.strip()), args.state_dir, ports,
                  args.bind, mode is TokenAuth.ON, args.config, args.metrics_config, args.log_config,
                  model_sha256=args.model_sha256, workflow_store=args.workflow_store)


def _checked(launch: Launch) -> Path:
    """Run check_launch; every problem goes to stderr, one line each, and raises ConfigRefused."""
    errors = check_launch(launch)
    for error in errors:
        print(f"config check FAILED: {error}", file=sys.stderr)
    if errors:
        raise ConfigRefused(f"{len(errors)} problem(s)")
    log.info("config check passed: token auth %s, models %s from %s (%s), config %s",
             "on" if launch.token_auth else "OFF", ",".join(launch.models), launch.model_store,
             "sha256 NOT checked" if launch.model_sha256.strip() == UNPINNED else "sha256 pinned",
             launch.config_path)
    return launch.config_path


class ConfigRefused(ServerError):
    """check_launch found problems (already printed, one line each)."""


def _print_started(server: Server) -> None:
    print(f"TorchServe is READY: {', '.join(server.models)}")
    for model in server.models:
        print(f"  inference   {server.inference_url}/predictions/{model}")
    print(f"  management  {server.management_url}/models")
    print(f"  metrics     {server.metrics_url}")
    if server.token_auth:
        print(f"  token       python -m serving.server key   (reads {server.state_dir / KEY_FILE})")
        print(f'  example     curl -H "Authorization: Bearer $(python -m serving.server key)" '
              f'-H "X-Compute-Budget: 10" -H "Content-Type: image/png" --data-binary @digit.png '
              f"{server.inference_url}/predictions/{server.models[0]}")
    print(f"  logs        {server.log_dir}   stop: make stop")


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (module docstring). Exit status: 0 done, 1 a failed start/stop/probe, 2 a refused configuration."""
    p = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="check the configuration, start TorchServe, wait for a READY worker")
    _launch_args(start)
    start.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for READY workers")
    start.add_argument("--foreground", action="store_true",
                       help="stay until TorchServe exits or SIGTERM/SIGINT arrives (then stop it): the container")
    check = sub.add_parser("check", help="render and check the configuration; print it (exit 2 if refused)")
    _launch_args(check)
    health = sub.add_parser("healthcheck", help="exit 0 when every registered model has a READY worker")
    _state_dir_arg(health)
    health.add_argument("--timeout", type=float, default=4.0, help="seconds per HTTP call")
    stop = sub.add_parser("stop", help="stop the server started from --state-dir")
    _state_dir_arg(stop)
    key = sub.add_parser("key", help="print a token from the running server's key file")
    _state_dir_arg(key)
    key.add_argument("--kind", choices=[k.value for k in KeyKind], default=KeyKind.INFERENCE.value)
    pin = sub.add_parser("pin", help=f"print the {PIN_ENV}=... line that pins these archives")
    pin.add_argument("archives", type=Path, nargs="+", help="the .mar files, as they will be served")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.command == "start":
            launch = _launch(args)
            _checked(launch)
            server = start_launch(launch, args.timeout)
            _print_started(server)
            if args.foreground:
                sys.stdout.flush()
                return serve_foreground(server)
        elif args.command == "check":
            print(_checked(_launch(args)).read_text(), end="")
        elif args.command == "healthcheck":
            healthcheck(args.state_dir, args.timeout)
            print("healthy")
        elif args.command == "stop":
            print("stopped" if stop_server(args.state_dir) else f"no server running from {args.state_dir}")
        elif args.command == "pin":
            try:
                print(pin_line(args.archives))
            except OSError as exc:
                raise ServerError(f"cannot read an archive ({exc})") from None
        else:
            print(read_key(args.state_dir, KeyKind(args.kind)))
    except ConfigRefused:
        return EXIT_CHECK_FAILED
    except ServerError as exc:
        prefix = "unhealthy" if args.command == "healthcheck" else "error"
        print(f"{prefix}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
