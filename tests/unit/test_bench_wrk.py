"""The benchmarks' load generator (bench/wrk.py + bench/wrk_bodies.lua): its pure parts, then a real wrk run
against a small standard-library HTTP server that records what arrives."""
from __future__ import annotations

import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from bench import wrk

SUMMARY = ('{"requests": 800, "duration_us": 2000000, "bytes": 1000, "errors": {"connect": 0, "read": 1, '
           '"write": 0, "status": 3, "timeout": 0}, "latency_us": {"min": 100, "mean": 2500.0, "p50": 2000, '
           '"p90": 4000, "p99": 9000, "max": 12000}}')


def require_wrk() -> str:
    found = shutil.which("wrk")
    if found is None:
        if os.environ.get("ALLOW_SKIP_WRK") == "1":
            pytest.skip("wrk is not installed")
        pytest.fail(f"wrk is not installed: {wrk.INSTALL}. `make setup` and .ci/run install it; set "
                    "ALLOW_SKIP_WRK=1 to skip instead")
    return found


def test_body_files_hold_every_body_in_order(tmp_path: Path) -> None:
    bodies = [b"\x89PNG-one", b"", b"{\"data\": [1]}\n", bytes(range(256))]
    files = wrk.BodyFiles.write(bodies, tmp_path / "b", "image/png")
    lengths = [int(n) for n in files.lengths.read_text().split()]
    assert lengths == [len(b) for b in bodies] and files.count == 4 and files.content_type == "image/png"
    data = files.data.read_bytes()
    assert [data[sum(lengths[:i]):sum(lengths[:i + 1])] for i in range(4)] == bodies
    with pytest.raises(ValueError, match="no bodies"):
        wrk.BodyFiles.write([], tmp_path / "none", "image/png")


def test_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wrk.shutil, "which", lambda name: "/usr/bin/wrk")
    files = wrk.BodyFiles(tmp_path / "d", tmp_path / "l", 3, "application/json")
    argv = wrk.command("http://127.0.0.1:8080", "/predictions/m", files, 16, 3.6, {"Authorization": "Bearer k"})
    assert argv[:5] == ["/usr/bin/wrk", "-t1", "-c16", "-d4s", "--timeout=60s"]
    assert argv[5:8] == ["-s", str(wrk.SCRIPT), "http://127.0.0.1:8080"]
    assert argv[8:] == ["--", str(files.data), str(files.lengths), "/predictions/m", "application/json",
                        "Authorization: Bearer k"]
    assert wrk.command("u", "/p", files, 1, 0.2)[3] == "-d1s"  # wrk counts whole seconds, at least one


def test_missing_wrk_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wrk.shutil, "which", lambda name: None)
    with pytest.raises(wrk.WrkMissing, match="apt-get install wrk"):
        wrk.executable()


def test_summary_parsing_and_run_form() -> None:
    raw = wrk.parse_summary("Running 2s test @ http://x\n  1 threads and 16 connections\n" + SUMMARY + "\n")
    run = wrk.summarize(raw, 16)
    assert (run["requests"], run["seconds"], run["requests_per_s"]) == (800, 2.0, 400.0)
    assert (run["p50_ms"], run["p99_ms"], run["mean_ms"]) == (2.0, 9.0, 2.5)
    assert run["errors"] == 4 and run["wrk_errors"]["status"] == 3 and run["concurrency"] == 16
    with pytest.raises(ValueError, match="no summary"):
        wrk.parse_summary("Running 2s test\nunable to connect\n")


# -------------------------------------------------------------------------------------------- a real run
class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as TorchServe
    seen: list[tuple[str, bytes, str | None, str | None]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            self.seen.append((self.path, body, self.headers.get("Content-Type"), self.headers.get("Authorization")))
        status = 500 if body == b"fail" else 200
        answer = b'{"ok": true}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def recorder() -> Iterator[str]:
    _Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_burst_sends_the_bodies_in_order_with_headers_and_counts_failures(recorder: str, tmp_path: Path) -> None:
    require_wrk()
    bodies = [b"one", b"two", b"fail", b"\x00\xffbinary"]
    files = wrk.BodyFiles.write(bodies, tmp_path, "image/png")
    run = wrk.burst(recorder, "/predictions/toy", files, 1, 1, {"Authorization": "Bearer secret"})
    seen = list(_Recorder.seen)
    assert run["requests"] >= 8 and len(seen) >= run["requests"]  # in-flight requests at the end are not counted
    assert [s[1] for s in seen] == [bodies[i % 4] for i in range(len(seen))]  # in order, cycling, bytes intact
    assert {(s[0], s[2], s[3]) for s in seen} == {("/predictions/toy", "image/png", "Bearer secret")}
    answered = seen[:run["requests"]]  # one connection: answers come back in the order sent
    assert run["errors"] == run["wrk_errors"]["status"] == sum(1 for s in answered if s[1] == b"fail")
    assert run["p50_ms"] > 0 and run["requests_per_s"] > 0 and run["client_cpu_s"] >= 0
