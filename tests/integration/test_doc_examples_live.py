"""The README's and docs' curl and client examples, run as written against the session's real TorchServe, and
the README sections of LIVE_SECTIONS run from start to end.

Only what differs on this machine is substituted: the server's URL (free ports), the served model's name, the
inference key (in $KEY; the docs' `$(docker exec ... key)` becomes $KEY) and the image file (a test digit
written to a temporary folder). tests/unit/test_doc_examples.py checks every other shell example statically.

"Your own network and photos" runs as one bash script, every command as written, with these substitutions:
`/tmp/` is a temporary folder and `my-photos` a name of this test's own (so a user's real run of that name is
never touched; its run folder, export and archive are removed afterwards), `.venv/bin/python` and make's PY
are this interpreter (make also gets STAMP= and a free PORT; TorchServe's state folder is EE_HOME in the
temporary folder), `@photo.jpg` is a generated JPEG, and the preset's here-document gets TINY's values (2
iterations, a few attacked images) so the whole make train-export takes about a minute on 2 cores. The folder
of photos is generated: four classes of JPEGs of unequal sizes. The listing's output must equal the README's.
"""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from serving.client import TOKEN_ENV
from serving.server import KeyKind, stop_server
from tests.unit.test_doc_examples import LIVE_SECTIONS, REPO, Example, bash_examples

pytestmark = pytest.mark.integration

CURL_EXAMPLES = [e for e in bash_examples() if e.argv[0] == "curl" and e.section not in LIVE_SECTIONS]
CLIENT_EXAMPLES = [e for e in bash_examples() if e.argv[1:3] == ["-m", "serving.client"]]
PHOTOS_SECTION = "Your own network and photos"
# The preset's keys this test sets (on top of the README's): a 2-iteration run, a few attacked images.
TINY = {"iterations": 2, "batch_size": 8, "val_size": 8, "test_size": 8, "attack_steps": 1, "eps_warmup_iters": 0,
        "eval_limit": 8, "eval_steps": 2, "slowdown_steps": 2, "apgd_steps": 2, "apgd_target_classes": 1,
        "policy_attack_steps": 2, "calibration_attack_limit": 8, "checkpoint_every": 1000, "log_every": 1,
        "threads": 1}
# mean RGB of each generated class; four, so the evaluation runs APGD-T too (its DLR loss needs 4 classes)
PHOTO_CLASSES = {"bird": (200, 200, 60), "cat": (200, 60, 40), "dog": (40, 80, 200), "fish": (60, 200, 90)}
PHOTOS_PER_CLASS = 8
MARK = "@@doc-example "


def _localise(text: str, live, image: Path) -> str:
    """The example with this machine's server URL, model name, key variable and image file."""
    text = re.sub(r"http://[^/\s]+:8080", live.server.inference_url, text)
    text = re.sub(r"/predictions/[\w.-]+", f"/predictions/{live.model}", text)
    text = re.sub(r"\$\((?:[^()]*)\)", "$KEY", text)  # $(docker exec ... key): the key, read another way here
    return text.replace("@digit.png", f"@{shlex.quote(str(image))}")


def _run_curl(example: Example, live, tmp_path: Path, key: str) -> tuple[int, object]:
    image = tmp_path / "digit.png"
    image.write_bytes(live.tiny.png(0))
    answer = tmp_path / "answer.json"
    command = _localise(example.text, live, image) + f" -sS -o {shlex.quote(str(answer))} -w '%{{http_code}}'"
    proc = subprocess.run(["bash", "-c", command], env={**os.environ, "KEY": key}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, f"{example.where}: {command}\n{proc.stderr}"
    return int(proc.stdout), json.loads(answer.read_text())


def test_the_docs_have_curl_and_client_examples() -> None:
    assert {e.path.name for e in CURL_EXAMPLES} == {"README.md", "deploy-and-monitor.md"}
    assert CLIENT_EXAMPLES


@pytest.mark.parametrize("example", CURL_EXAMPLES, ids=[e.where for e in CURL_EXAMPLES])
def test_curl_example_gets_a_json_answer(example: Example, torchserve_server, tmp_path: Path) -> None:
    status, body = _run_curl(example, torchserve_server, tmp_path, torchserve_server.server.key(KeyKind.INFERENCE))
    assert status == 200, f"{example.where}: HTTP {status} {body}"
    assert isinstance(body, dict) and {"class_index", "exit_index", "mflops_spent"} <= set(body), body


@pytest.mark.parametrize("key", ["", "not-the-key"])
def test_a_missing_or_wrong_token_is_400_invalid_key_exception_as_the_readme_says(
        key: str, torchserve_server, tmp_path: Path) -> None:
    """TorchServe's frontend answers auth failures itself, before the handler: 400, not 401 (README)."""
    readme_curl = next(e for e in CURL_EXAMPLES if e.path.name == "README.md")
    status, body = _run_curl(readme_curl, torchserve_server, tmp_path, key)
    assert status == 400 and body["type"] == "InvalidKeyException", body


@pytest.mark.parametrize("example", CLIENT_EXAMPLES, ids=[e.where for e in CLIENT_EXAMPLES])
def test_client_example_gets_a_json_answer(example: Example, torchserve_server, tmp_path: Path) -> None:
    live = torchserve_server
    image = tmp_path / "digit.png"
    image.write_bytes(live.tiny.png(1))
    argv = [sys.executable if w.endswith("python") else str(image) if w == "digit.png" else w
            for w in example.argv]
    argv += ["--url", live.server.inference_url, "--model", live.model]
    env = {**os.environ, TOKEN_ENV: live.server.key(KeyKind.INFERENCE)}  # the client takes no token argument
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"{example.where}: {proc.stderr}"
    assert proc.stderr.startswith("HTTP 200")
    assert {"class_index", "exit_index"} <= set(json.loads(proc.stdout))


# ----------------------------------------------------------------------------- a README section, run as written
def _photo(rng: np.random.Generator, rgb: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    from PIL import Image

    pixels = np.clip(rng.normal(rgb, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_photos(folder: Path) -> None:
    """ImageFolder layout: PHOTOS_PER_CLASS JPEGs per class, of a few sizes (landscape and portrait)."""
    rng = np.random.default_rng(0)
    for name, rgb in PHOTO_CLASSES.items():
        (folder / name).mkdir(parents=True)
        for i in range(PHOTOS_PER_CLASS):
            (folder / name / f"{i:04d}.jpg").write_bytes(_photo(rng, rgb, [(48, 40), (40, 56), (32, 32)][i % 3]))


def _free_port_block(count: int = 3) -> int:
    """A port p with p .. p+count-1 all free (make serve PORT=p puts management and metrics on p+1, p+2)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no block of free ports")


def _readme_text_after(command: Example) -> str:
    """The ```text block that follows `command`'s ```bash block in its file (the output the doc shows)."""
    lines = command.path.read_text().splitlines()
    start = next(i for i in range(command.line, len(lines)) if lines[i].strip() == "```text")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "```")
    return "\n".join(lines[start + 1:end])


def _localised_script(example: Example, tmp: Path, name: str, port: int) -> str:
    """One README command as this test runs it (see the module docstring)."""
    def paths(text: str) -> str:
        return text.replace("/tmp/", f"{tmp}/").replace("my-photos", name)

    python = shlex.quote(sys.executable)
    text = paths(example.text).replace(".venv/bin/python", python)
    if example.argv[0] == "make":
        text = f"make PY={python} STAMP= PORT={port}" + text[len("make"):]
    if example.argv[0] == "curl":
        text = text.replace("127.0.0.1:8080", f"127.0.0.1:{port}").replace("@photo.jpg", f"@{tmp}/photo.jpg")
        text += " -sS -w '\\n%{http_code}\\n'"
    if example.heredoc is None:
        return text
    values = yaml.safe_load(paths(example.heredoc))
    assert isinstance(values, dict), f"{example.where}: the here-document is not a preset"
    return f"{text}\n{yaml.safe_dump({**values, **TINY}, sort_keys=False)}EOF"


def _remove_run(name: str) -> None:
    for path in (REPO / "runs" / name, REPO / "artifacts" / "export" / name):
        shutil.rmtree(path, ignore_errors=True)
    for path in (REPO / "model_store").glob(f"{name}.mar*"):
        path.unlink()


def test_the_own_photos_section_runs_as_written(tmp_path: Path) -> None:
    """List the exits, write a preset outside the repository, make train-export with it, make serve NAME=...,
    send a JPEG with curl, make stop: every command of the section, in order, in one bash script."""
    examples = [e for e in bash_examples() if e.section == PHOTOS_SECTION]

    def index(predicate) -> int:
        (i,) = [i for i, e in enumerate(examples) if predicate(e)]
        return i

    listing = index(lambda e: e.argv[1:3] == ["-m", "training.models"])
    train = index(lambda e: e.argv[:2] == ["make", "train-export"])
    serve = index(lambda e: e.argv[:2] == ["make", "serve"])
    curl = index(lambda e: e.argv[0] == "curl")
    stop = index(lambda e: e.argv[:2] == ["make", "stop"])
    preset = index(lambda e: e.heredoc is not None)
    assert listing < preset < train < serve < curl < stop, [e.text for e in examples]
    name = f"doctest-photos-{os.getpid()}"
    port = _free_port_block()
    _write_photos(tmp_path / name)
    (tmp_path / "photo.jpg").write_bytes((tmp_path / name / "dog" / "0000.jpg").read_bytes())
    state = tmp_path / "serve-state"
    lines = ["set -euo pipefail"]
    for i, example in enumerate(examples):
        lines += [f"echo '{MARK}{i}'", _localised_script(example, tmp_path, name, port)]
    started = time.monotonic()
    try:
        proc = subprocess.run(["bash", "-c", "\n".join(lines)], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "EE_HOME": str(state)}, timeout=1200)
        seconds = time.monotonic() - started
        assert proc.returncode == 0, f"the section failed after {seconds:.0f} s:\n{proc.stdout[-6000:]}\n" \
                                     f"{proc.stderr[-6000:]}"
        outputs = dict(zip(range(len(examples)), re.split(rf"^{MARK}\d+\n", proc.stdout, flags=re.M)[1:]))

        assert outputs[listing].rstrip() == _readme_text_after(examples[listing]).rstrip(), \
            f"{examples[listing].where}: the README shows another output than the command prints:\n{outputs[listing]}"
        assert f"Archive: model_store/{name}.mar" in outputs[train]
        assert f"Serve it with:  make serve NAME={name}" in outputs[train]
        assert (REPO / "model_store" / f"{name}.mar").is_file() and (REPO / "runs" / name / "split.json").is_file()
        saved = yaml.safe_load((REPO / "runs" / name / "config.yaml").read_text())
        assert saved["name"] == name and saved["data_dir"] == f"{tmp_path}/{name}" and saved["iterations"] == 2

        body, status = outputs[curl].rstrip("\n").rsplit("\n", 1)
        answer = json.loads(body)
        assert status == "200", answer
        assert answer["label"] in PHOTO_CLASSES and answer["num_exits"] == 3, answer
        assert 1 <= answer["exit_index"] <= 3 and answer["mflops_spent"] > 0, answer
        assert stop_server(state) is False, "make stop left the server running"
        print(f"\n{PHOTOS_SECTION}: the section ran in {seconds:.0f} s")
    finally:
        stop_server(state)
        _remove_run(name)
    assert not (REPO / "model_store" / f"{name}.mar").exists()
