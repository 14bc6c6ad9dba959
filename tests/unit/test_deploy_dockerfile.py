"""The Dockerfile and .dockerignore, checked without a Docker engine: hadolint passes (and really checks), every
COPY source exists and reaches the builder, the image runs unprivileged as the uid the Kubernetes manifests ask
for, exposes inference and metrics only, has a healthcheck, and pins what pyproject.toml pins."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import subprocess
from pathlib import Path

from tests.deploy_files import dev_tool, dockerfile_lines, k8s_docs, pyproject_pins
from tests.promtools import REPO, load_yaml

HADOLINT_CONFIG = REPO / ".hadolint.yaml"

# ----------------------------------------------------------------------------- Dockerfile
def _hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([dev_tool("hadolint"), "--no-color", "--config", str(HADOLINT_CONFIG), str(dockerfile)],
                          capture_output=True, text=True, timeout=60)


def test_hadolint_passes_on_the_dockerfile() -> None:
    """hadolint (with its built-in ShellCheck on every RUN) at failure threshold `style`; the rules
    .hadolint.yaml or an inline pragma switches off each carry a reason next to them."""
    assert load_yaml(HADOLINT_CONFIG)["failure-threshold"] == "style"
    proc = _hadolint(REPO / "Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (REPO / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(text):
        if line.startswith("# hadolint ignore="):
            assert text[i - 1].startswith("# ") and "hadolint" not in text[i - 1], \
                f"Dockerfile:{i + 1}: say why, in the comment line above the pragma"


def test_hadolint_is_really_checking(tmp_path: Path) -> None:
    """The configuration does not switch hadolint off: a root user, an untagged base and `cd` fail."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN cd /tmp && echo hi\nUSER root\n")
    proc = _hadolint(bad)
    assert proc.returncode != 0
    for rule in ("DL3006", "DL3003", "DL3002"):
        assert rule in proc.stdout, proc.stdout


def _dockerignore_includes(path: str) -> bool:
    """Does the whitelist-style .dockerignore send `path` to the builder (last matching pattern wins)?"""
    included = True
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        if pattern == "*" or path == pattern or path.startswith(pattern + "/"):
            included = negate
    return included


def test_dockerfile_copies_existing_whitelisted_files() -> None:
    copies = [line.split()[1:] for line in dockerfile_lines() if line.split()[0] == "COPY"]
    sources = []
    for args in copies:
        args = [a for a in args if not a.startswith("--chmod") and not a.startswith("--chown")]
        if args[0].startswith("--from="):
            continue
        sources += args[:-1]
    assert sources, "no COPY from the build context"
    for source in sources:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
        assert _dockerignore_includes(source.rstrip("/")), f".dockerignore excludes {source}"
    assert not _dockerignore_includes(".venv") and not _dockerignore_includes("data")


def test_dockerfile_runs_unprivileged_exposes_inference_and_metrics_and_has_a_healthcheck() -> None:
    lines = dockerfile_lines()
    instructions = [line.split()[0] for line in lines]
    (user,) = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert instructions.index("USER") < instructions.index("ENTRYPOINT")
    (expose,) = [line.split()[1:] for line in lines if line.startswith("EXPOSE")]
    assert sorted(expose) == ["8080", "8082"]
    (health,) = [line for line in lines if line.startswith("HEALTHCHECK")]
    assert "entrypoint.sh" in health and "healthcheck" in health
    assert any(line.startswith("ENTRYPOINT") and "docker/entrypoint.sh" in line for line in lines)
    # USER is the numeric uid:gid of the user the image creates (so runAsNonRoot can check it), which is
    # the one the Kubernetes securityContext asks for.
    (useradd,) = [line for line in lines if "useradd" in line]
    uid = re.search(r"--uid (\d+)", useradd).group(1)
    assert "--user-group" in useradd and user == f"{uid}:{uid}" and uid != "0"
    pod = next(d for d in k8s_docs() if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert str(pod["securityContext"]["runAsUser"]) == uid and str(pod["securityContext"]["runAsGroup"]) == uid


def test_dockerfile_variants_and_pins_match_pyproject() -> None:
    text = " ".join(dockerfile_lines())
    args = dict(re.findall(r"\bARG (\w+)=(\S+)", text))
    assert args["VARIANT"] == "cpu"
    assert "nvidia/cuda" in args["GPU_BASE"] and "cudnn" in args["GPU_BASE"]
    assert args["CPU_BASE"].startswith("python:3.11")
    pins = pyproject_pins()
    assert args["ORT_CPU"] == pins["onnxruntime"]
    assert args["ORT_GPU"].startswith("onnxruntime-gpu==")
    assert "FROM base-${VARIANT}" in text
    requirements = [line.strip() for line in (REPO / "docker" / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    for req in requirements:
        name = re.split(r"[<>=!~ \[]", req, maxsplit=1)[0].lower()
        assert pins.get(name) == req.replace(" ", ""), f"docker/requirements.txt {req} != pyproject {pins.get(name)}"
    assert not any(r.startswith("onnxruntime") for r in requirements), "onnxruntime comes per VARIANT"


# Distributions the image needs that its own code does not import: TorchServe's worker imports torch.
IMPORTED_BY_TORCHSERVE = {"torch"}
VARIANT_PACKAGES = {"onnxruntime", "onnxruntime-gpu"}  # the Dockerfile adds one per VARIANT


def _image_requirements() -> dict[str, str]:
    lines = [line.strip() for line in (REPO / "docker" / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return {re.split(r"[<>=!~ \[]", line, maxsplit=1)[0].lower(): line for line in lines}


def _third_party_imports(folders: tuple[str, ...]) -> set[str]:
    """Top-level modules imported anywhere in these folders' .py files (function-level imports included),
    less the standard library and the project's own packages."""
    modules = set()
    for folder in folders:
        for path in (REPO / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"serving", "early_exit"}


def test_image_requirements_are_exactly_what_the_image_imports() -> None:
    """Both ways: every module the image's code imports is installed by a requirement (or the variant's
    onnxruntime), and every requirement is imported (or needed by TorchServe's worker)."""
    distributions = importlib.metadata.packages_distributions()
    needed = set()
    for module in _third_party_imports(("serving", "early_exit")):
        assert module in distributions, f"{module} is imported but no installed distribution provides it"
        needed |= {d.lower() for d in distributions[module]}
    requirements = set(_image_requirements())
    assert needed - VARIANT_PACKAGES <= requirements, f"missing from docker/requirements.txt: {needed - requirements}"
    assert needed & VARIANT_PACKAGES, "the handler should import onnxruntime"
    assert requirements <= needed | IMPORTED_BY_TORCHSERVE, f"not imported: {requirements - needed}"
    pins = pyproject_pins()
    for name, line in _image_requirements().items():
        assert pins.get(name) == line.replace(" ", ""), f"docker/requirements.txt {line} != pyproject {pins.get(name)}"
