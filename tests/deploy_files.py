"""Helpers the deployment-file tests share (tests/unit/test_deploy_*.py): run promtool and the dev tools, read
the declared metrics, compose's variable interpolation, the Dockerfile's instructions, pyproject's pins and
the Kubernetes manifests."""
from __future__ import annotations

import re
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.promtools import REPO, load_yaml, promtool

K8S = REPO / "deploy" / "k8s"


def promtool_ok(*args: str, cwd: Path | None = None) -> str:
    proc = promtool(*args, cwd=cwd)
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def dev_tool(name: str) -> str:
    """A command-line tool from the dev extras (in the venv next to this Python, else on PATH)."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    if not path:
        pytest.fail(f"`{name}` is not installed: run `make setup` (pip install -e '.[dev]')", pytrace=False)
    return path


def declared_metrics() -> set[str]:
    """Series names TorchServe exposes for serving/metrics.yaml (histograms as _bucket/_sum/_count)."""
    doc = load_yaml(REPO / "serving" / "metrics.yaml")
    names = set()
    for section in ("ts_metrics", "model_metrics"):
        for kind, metrics in (doc.get(section) or {}).items():
            for m in metrics or []:
                if kind == "histogram":
                    names |= {f"{m['name']}_bucket", f"{m['name']}_sum", f"{m['name']}_count"}
                else:
                    names.add(m["name"])
    return names


class ComposeVariableError(ValueError):
    """What `docker compose` says for an unset ${VAR:?message}."""


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message} (no Docker engine here to ask)."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        if env.get(name):
            return env[name]
        if op == ":?":
            raise ComposeVariableError(f"{name}: {arg}")
        return arg if op == ":-" else ""
    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def published(port: str, env: dict[str, str]) -> tuple[str, str, str]:
    """(host address, host port, container port) of a compose `ports:` entry; address 0.0.0.0 when absent."""
    parts = interpolate(port, env).split(":")
    return ("0.0.0.0", *parts) if len(parts) == 2 else tuple(parts)  # type: ignore[return-value]


def dockerfile_lines() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments and blank lines dropped."""
    text = (REPO / "Dockerfile").read_text()
    return [line for line in text.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower(): d.replace(" ", "") for d in deps}


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs

