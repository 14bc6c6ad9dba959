"""Only local, pinned archives, against a real TorchServe (issue 19 item 5).

* With the model-registration API switched on (`enable_model_api=true`, which the shipped config and `check`
  refuse; without it TorchServe refuses registration before it looks at allowed_urls), registering the tiny
  archive from an http URL or a file URL outside the store is refused by allowed_urls, and so is a workflow from
  an http URL; a workflow named by file finds an empty workflow store. Nothing is downloaded (the http server
  sees no request) and neither store changes. (TorchServe 0.12's workflow API is open even with
  enable_model_api=false, and by default downloads into the model store: seen by hand before this change.)
* `python -m serving.server start` refuses an archive whose bytes are not the pinned ones (same file name, one
  file added inside) with one line on stderr, exit status 2, and starts no TorchServe.
"""
from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Iterator

import pytest

from serving.server import PID_FILE, KeyKind, Ports, Server, pin_line, read_properties, start_server

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


class _Recorder(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@pytest.fixture()
def archive_site(tiny_mnist, tmp_path: Path) -> Iterator[tuple[str, type[_Recorder]]]:
    """An http server on loopback offering a copy of the tiny archive (copy.mar) and a workflow file (w.war),
    recording the paths it is asked for."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(tiny_mnist.mar, site / "copy.mar")
    (site / "w.war").write_bytes(b"PK not a real workflow")
    handler = type("Recorder", (_Recorder,), {"requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            lambda *a, **k: handler(*a, directory=str(site), **k))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def _post(server: Server, path: str, url: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"{server.management_url}{path}?url={urllib.parse.quote(url, safe='')}",
                                     method="POST", headers=server.auth_header(KeyKind.MANAGEMENT))
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_registration_from_urls_and_workflows_is_refused(tiny_mnist, archive_site, tmp_path: Path) -> None:
    base_url, recorder = archive_site
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(tiny_mnist.mar, store / tiny_mnist.mar.name)
    state = tmp_path / "state"
    server = start_server(store, [tiny_mnist.mar.name], state, Ports.free(),
                          extra_config={"enable_model_api": "true"},
                          model_sha256=pin_line([store / tiny_mnist.mar.name]).split("=", 1)[1], ready_timeout=180)
    try:
        props = read_properties(state / "config.properties")
        assert props["enable_model_api"] == "true" and props["enable_envvars_config"] == "false"
        workflows = Path(props["workflow_store"])
        outside = tmp_path / "elsewhere.mar"
        shutil.copy(tiny_mnist.mar, outside)
        refused = {url: _post(server, "/models", url) for url in
                   (f"{base_url}/copy.mar", outside.as_uri(), "https://example.com/copy.mar")}
        refused[f"workflow {base_url}/w.war"] = _post(server, "/workflows", f"{base_url}/w.war")
        for what, (status, body) in refused.items():
            assert status == 404 and "does not match any allowed URL(s)" in body.get("message", ""), (what, body)
        status, body = _post(server, "/workflows", "w.war")
        assert status == 404 and "not found in workflow store" in body["message"], body
        assert recorder.requests == [], "TorchServe fetched a URL it should have refused"
        assert sorted(p.name for p in store.iterdir()) == [tiny_mnist.mar.name]
        assert list(workflows.iterdir()) == [] and workflows.stat().st_mode & 0o222 == 0
        models = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{server.management_url}/models", headers=server.auth_header(KeyKind.MANAGEMENT)), timeout=10).read())
        assert [m["modelName"] for m in models["models"]] == [tiny_mnist.name]
    finally:
        server.stop()


def test_start_refuses_a_swapped_archive_with_one_line(tiny_mnist, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    pinned = pin_line([tiny_mnist.mar]).split("=", 1)[1]
    swapped = store / tiny_mnist.mar.name  # same name, other bytes: the archive plus one more file
    with zipfile.ZipFile(tiny_mnist.mar) as src, zipfile.ZipFile(swapped, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item.filename))
        dst.writestr("serving/extra.py", "print('not what was pinned')\n")
    home = tmp_path / "home"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("EE_", "TS_"))},
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "PYTHONPATH": str(REPO),
           "EE_HOME": str(home), "EE_MODEL_STORE": str(store), "EE_MODELS": "all", "EE_MODEL_SHA256": pinned}
    ports = Ports.free()
    proc = subprocess.run([sys.executable, "-m", "serving.server", "start", "--port", str(ports.inference)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("config check FAILED: ") and "refusing to serve a replaced archive" in line, line
    assert pinned.split("=", 1)[1] in line and proc.stdout == ""
    assert not (home / "tmp" / PID_FILE).exists(), "a TorchServe was started"
    # the control: the pinned bytes start (the archive is put back, the same command and environment)
    shutil.copy(tiny_mnist.mar, swapped)
    started = subprocess.run([sys.executable, "-m", "serving.server", "check", "--port", str(ports.inference)],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
