"""The README's and docs' curl and client examples, run as written against the session's real TorchServe.

Only what differs on this machine is substituted: the server's URL (free ports), the served model's name, the
inference key (in $KEY; the docs' `$(docker exec ... key)` becomes $KEY) and the image file (a test digit
written to a temporary folder). tests/unit/test_doc_examples.py checks every other shell example statically.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from serving.server import KeyKind
from tests.unit.test_doc_examples import Example, bash_examples

pytestmark = pytest.mark.integration

CURL_EXAMPLES = [e for e in bash_examples() if e.argv[0] == "curl"]
CLIENT_EXAMPLES = [e for e in bash_examples() if e.argv[1:3] == ["-m", "serving.client"]]


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
    argv += ["--url", live.server.inference_url, "--model", live.model, "--token", live.server.key(KeyKind.INFERENCE)]
    proc = subprocess.run(argv, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{example.where}: {proc.stderr}"
    assert proc.stderr.startswith("HTTP 200")
    assert {"class_index", "exit_index"} <= set(json.loads(proc.stdout))
