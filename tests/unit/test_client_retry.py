"""The CLI client retries a 503/507 once, says so on stderr, and leaves every other answer alone.

A tiny local HTTP server plays TorchServe: it answers a scripted list of statuses and records each request.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from serving import client
from serving.client import Response, retry_delay

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


class FakeServer:
    """Answers POST /predictions/<model> with the next scripted (status, headers) and records the requests."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, str]]] = []
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                status, headers = fake.script.pop(0) if fake.script else (200, {})
                answer = (json.dumps({"class_index": 3}) if status == 200 else
                          json.dumps({"code": status, "type": "ServiceUnavailableException",
                                      "message": "Model worker is not ready"})).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:  # keep pytest's output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def run(self, tmp_path: Path, *statuses: int | tuple[int, dict[str, str]]) -> int:
        self.script = [s if isinstance(s, tuple) else (s, {}) for s in statuses]
        image = tmp_path / "digit.png"
        image.write_bytes(PNG)
        return client.main([str(image), "--url", self.url, "--model", "mnist", "--token", "k", "--budget", "5",
                            "--retry-delay", "0"])


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


@pytest.mark.parametrize("status", [503, 507])
def test_a_503_or_507_is_retried_once_and_the_retry_is_visible(
        fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], status: int) -> None:
    assert fake.run(tmp_path, status, 200) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"class_index": 3}
    lines = err.splitlines()
    assert lines[0] == f"HTTP {status} (ServiceUnavailableException): retrying once in 0 s", err
    assert lines[-1].startswith("HTTP 200")
    assert len(fake.requests) == 2
    (path1, headers1, body1), (path2, headers2, body2) = fake.requests
    assert path1 == path2 == "/predictions/mnist" and body1 == body2 == PNG
    for headers in (headers1, headers2):
        assert headers["x-compute-budget"] == "5" and headers["authorization"] == "Bearer k"
        assert headers["content-type"] == "image/png"


def test_only_one_retry(fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fake.run(tmp_path, 507, 507, 200) == 1
    err = capsys.readouterr().err
    assert err.count("retrying once") == 1 and "HTTP 507  exit" in err
    assert len(fake.requests) == 2


@pytest.mark.parametrize("status", [200, 400, 415, 500])
def test_other_answers_are_not_retried(fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       status: int) -> None:
    assert fake.run(tmp_path, status) == (0 if status == 200 else 1)
    assert "retrying" not in capsys.readouterr().err
    assert len(fake.requests) == 1


def test_retry_after_is_honoured_within_a_cap() -> None:
    def answer(value: str | None) -> Response:
        return Response(503, {} if value is None else {"retry-after": value}, None)

    assert retry_delay(answer(None), 1.0) == 1.0
    assert retry_delay(answer("2"), 1.0) == 2.0
    assert retry_delay(answer("3600"), 1.0) == client.MAX_RETRY_AFTER_S
    for bad in ("Wed, 21 Oct 2015 07:28:00 GMT", "-1", "nan", "inf"):
        assert retry_delay(answer(bad), 1.0) == 1.0, bad


def test_an_unreadable_input_is_a_usage_error_not_a_network_error(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        client.main([str(tmp_path / "missing.png"), "--url", "http://127.0.0.1:9"])
    assert exc.value.code == 2 and "cannot read" in capsys.readouterr().err
