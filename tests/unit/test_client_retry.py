"""The CLI client retries a 503/507 once, says so on stderr, and leaves every other answer alone; it takes its
token from EARLY_EXIT_TOKEN (or the key file), speaks https with certificate verification, and never sends a token
over plain http to a host that is not loopback.

A tiny local HTTP(S) server plays TorchServe: it answers a scripted list of statuses and records each request.
"""
from __future__ import annotations

import json
import shutil
import ssl
import subprocess
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

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
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
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def run(self, tmp_path: Path, *statuses: int | tuple[int, dict[str, str]], options: tuple[str, ...] = ()) -> int:
        self.script = [s if isinstance(s, tuple) else (s, {}) for s in statuses]
        image = tmp_path / "digit.png"
        image.write_bytes(PNG)
        return client.main([str(image), "--url", self.url, "--model", "mnist", "--budget", "5",
                            "--retry-delay", "0", "--key-file", str(tmp_path / "no-key-file.json"), *options])


def _serve(server: FakeServer) -> Iterator[FakeServer]:
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    monkeypatch.setenv(client.TOKEN_ENV, "k")
    yield from _serve(FakeServer())


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA): (cert.pem, key.pem)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture
def tls_fake(certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    monkeypatch.setenv(client.TOKEN_ENV, "k")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    yield from _serve(FakeServer(context))


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


def test_https_is_spoken_and_the_certificate_verified_with_the_ca_file(
        tls_fake: FakeServer, certificate: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tls_fake.url.startswith("https://")
    assert tls_fake.run(tmp_path, 200, options=("--ca-file", str(certificate[0]))) == 0
    (path, headers, body), = tls_fake.requests
    assert path == "/predictions/mnist" and headers["authorization"] == "Bearer k" and body == PNG


def test_an_https_server_whose_certificate_does_not_verify_gets_nothing(
        tls_fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tls_fake.run(tmp_path, 200) == 2  # self-signed, and not in the system's CAs
    err = capsys.readouterr().err
    assert "CERTIFICATE_VERIFY_FAILED" in err and len(err.strip().splitlines()) == 1
    assert tls_fake.requests == []


@pytest.mark.parametrize("url", ["http://ee.example.org:8080", "http://10.0.0.7:8080", "http://[2001:db8::1]:8080",
                                 "HTTP://192.0.2.1"])
def test_a_token_is_never_sent_over_plain_http_off_loopback(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(client.TOKEN_ENV, "secret-token")
    connections: list[tuple] = []
    monkeypatch.setattr(client.http.client, "HTTPConnection", lambda *a, **k: connections.append(a))
    image = tmp_path / "digit.png"
    image.write_bytes(PNG)
    assert client.main([str(image), "--url", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to send the token over plain http") and err.count("\n") == 1
    assert "secret-token" not in err and connections == []


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080",
                                 "http://127.8.9.10:8080"])
def test_loopback_or_no_token_may_use_plain_http(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert client.Client(url, token="k").token == "k"
    assert client.Client("http://ee.example.org:8080", token=None).port == 8080


def test_the_url_decides_scheme_port_and_path() -> None:
    secure = client.Client("https://ee.example.org/gateway/", token="k")
    assert (secure.scheme, secure.host, secure.port, secure.prefix) == ("https", "ee.example.org", 443, "/gateway")
    assert client.Client("http://localhost").port == 80
    for bad in ("ftp://127.0.0.1", "127.0.0.1:8080", "https://"):
        with pytest.raises(client.InsecureURLError):
            client.Client(bad)


def test_the_token_comes_from_the_environment_else_the_key_file(fake: FakeServer, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "from-file"}}))
    image = tmp_path / "digit.png"
    image.write_bytes(PNG)
    base = [str(image), "--url", fake.url, "--key-file", str(key_file)]
    assert client.main(base) == 0
    monkeypatch.delenv(client.TOKEN_ENV)
    assert client.main(base) == 0
    assert [h["authorization"] for _, h, _ in fake.requests] == ["Bearer k", "Bearer from-file"]


def test_the_token_option_is_refused_with_a_pointer_to_the_variable(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert client.main([str(tmp_path / "digit.png"), "--token", "k"]) == 2
    err = capsys.readouterr().err
    assert client.TOKEN_ENV in err and len(err.strip().splitlines()) == 1
