"""The front door (deploy/proxy/haproxy.cfg): a real HAProxy on loopback in front of the real TorchServe.

The shipped config file is run as is; only its environment variables differ from production: loopback
addresses, a certificate made by deploy/proxy/make-cert.sh, shorter timeouts, and the body limit of the
test archive's handler (conftest SERVE_OPTIONS["max_payload_bytes"], the value the handler was built with).
Every check goes through TLS to the proxy; the access log (the proxy's stdout) is read from a file.
"""
from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from serving.server import KeyKind, Ports
from tests.integration.conftest import SERVE_OPTIONS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROXY_DIR = REPO / "deploy" / "proxy"
CONFIG = PROXY_DIR / "haproxy.cfg"
MAX_BODY = SERVE_OPTIONS["max_payload_bytes"]  # the handler's limit in the test archive
TIMEOUT_REQUEST_S = 2  # EE_PROXY_TIMEOUT_REQUEST for the test proxies (production: 10 s)
TIMEOUT_IDLE_S = 4
RATE_LIMIT = 5  # the rate-limited proxy: requests per RATE_PERIOD_S per address
RATE_PERIOD_S = 30
LOAD_CONCURRENCY = 32
CLIENT_TIMEOUT_S = 60.0
_instances = itertools.count()


def _haproxy() -> str:
    path = shutil.which("haproxy")
    if not path:
        pytest.fail("`haproxy` is not on PATH: apt-get install haproxy (Makefile SYSTEM_PACKAGES)", pytrace=False)
    return path


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documented local certificate: make-cert.sh's server.pem (for the proxy) and server.crt (clients)."""
    out = tmp_path_factory.mktemp("proxy-cert")
    subprocess.run([str(PROXY_DIR / "make-cert.sh"), str(out)], check=True, capture_output=True, timeout=60)
    return out


@dataclass
class Proxy:
    port: int
    process: subprocess.Popen
    log_path: Path
    cafile: Path

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cafile))  # verifies the chain and the host name

    def connection(self, timeout: float = 30.0) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("localhost", self.port, timeout=timeout, context=self.context())

    def log_lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def log_line(self, request_id: str, wait_s: float = 2.0) -> str:
        deadline = time.monotonic() + wait_s
        while True:
            lines = [line for line in self.log_lines() if f"id={request_id} " in line]
            if lines or time.monotonic() > deadline:
                assert len(lines) == 1, f"access log lines for {request_id}: {lines}"
                return lines[0]
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _start_proxy(live, cert: Path, tmp: Path, **overrides: str) -> Proxy:
    port = Ports.free().inference
    log_path = tmp / "access.log"
    env = {**os.environ,
           "EE_PROXY_BIND": f"127.0.0.1:{port}",
           "EE_PROXY_CERT": str(cert / "server.pem"),
           "EE_PROXY_BACKEND": f"127.0.0.1:{live.server.ports.inference}",
           "EE_PROXY_INNER": f"abns@ee-proxy-test-{os.getpid()}-{next(_instances)}",
           "EE_MAX_PAYLOAD_BYTES": str(MAX_BODY),
           "EE_PROXY_BUFSIZE": str(MAX_BODY + 65536),
           "EE_PROXY_TIMEOUT_REQUEST": f"{TIMEOUT_REQUEST_S}s",
           "EE_PROXY_TIMEOUT_IDLE": f"{TIMEOUT_IDLE_S}s",
           "EE_PROXY_RATE_LIMIT": "1000000",
           **overrides}
    check = subprocess.run([_haproxy(), "-c", "-q", "-f", str(CONFIG)], env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    with open(log_path, "wb") as out:
        process = subprocess.Popen([_haproxy(), "-db", "-f", str(CONFIG)], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    proxy = Proxy(port, process, log_path, cert / "server.crt")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proxy
        except OSError:
            time.sleep(0.05)
    proxy.stop()
    pytest.fail(f"the proxy did not listen on {port}: {log_path.read_text()}")


@pytest.fixture(scope="module")
def proxy(torchserve_server, cert, tmp_path_factory) -> Iterator[Proxy]:
    p = _start_proxy(torchserve_server, cert, tmp_path_factory.mktemp("proxy"))
    yield p
    p.stop()


@pytest.fixture(scope="module")
def limited_proxy(torchserve_server, cert, tmp_path_factory) -> Iterator[Proxy]:
    p = _start_proxy(torchserve_server, cert, tmp_path_factory.mktemp("proxy-limited"),
                     EE_PROXY_RATE_LIMIT=str(RATE_LIMIT), EE_PROXY_RATE_PERIOD=f"{RATE_PERIOD_S}s")
    yield p
    p.stop()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: object  # parsed JSON, or the text

    @property
    def request_id(self) -> str:
        return self.headers["x-request-id"]


def _request(conn: http.client.HTTPSConnection, method: str, path: str, body: bytes | None = None,
             headers: list[tuple[str, str]] | None = None) -> Answer:
    """One request; `headers` as a list so a name can be sent twice (putheader keeps every line)."""
    conn.putrequest(method, path, skip_accept_encoding=True)
    for name, value in headers or []:
        conn.putheader(name, value)
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    response = conn.getresponse()
    raw = response.read()
    try:
        parsed: object = json.loads(raw)
    except ValueError:
        parsed = raw.decode(errors="replace")
    return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, parsed)


def _auth(live) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {live.server.key(KeyKind.INFERENCE)}")]


def _predict(proxy: Proxy, live, body: bytes, extra: list[tuple[str, str]] | None = None,
             content_type: str = "image/png") -> Answer:
    conn = proxy.connection()
    try:
        return _request(conn, "POST", f"/predictions/{live.model}", body,
                        _auth(live) + [("Content-Type", content_type)] + (extra or []))
    finally:
        conn.close()


def _is_proxy_json(answer: Answer, status: int) -> None:
    assert answer.status == status, (answer.status, answer.body)
    assert answer.headers["content-type"] == "application/json"
    assert isinstance(answer.body, dict) and answer.body["code"] == status, answer.body


# ----------------------------------------------------------------------------------------------------- TLS
def test_tls_with_the_documented_certificate_and_a_prediction_through_it(proxy, torchserve_server) -> None:
    live, tiny = torchserve_server, torchserve_server.tiny
    conn = proxy.connection()
    try:
        answer = _request(conn, "GET", "/ping", headers=_auth(live))
        assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert conn.sock.getpeercert()["subjectAltName"] == (("DNS", "localhost"), ("IP Address", "127.0.0.1"))
    finally:
        conn.close()
    assert answer.status == 200 and answer.body == {"status": "Healthy"}
    for i in range(3):
        answer = _predict(proxy, live, tiny.png(i))
        assert answer.status == 200, answer.body
        assert answer.body["class_index"] == tiny.offline_classes[i]
        assert answer.body["exit_index"] == tiny.offline_exits[i] + 1
    # Plain HTTP on the TLS port gets no HTTP answer: the token never travels in clear.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as plain:
        plain.sendall(b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
        try:
            reply = plain.recv(1024)
        except ConnectionResetError:
            reply = b""
    assert not reply.startswith(b"HTTP/")


def test_access_log_names_each_request(proxy, torchserve_server) -> None:
    live = torchserve_server
    seen = []
    for path, headers in (("/ping?probe=access-log-1", _auth(live)), ("/ping?probe=access-log-2", []),
                          ("/models?probe=access-log-3", _auth(live))):
        conn = proxy.connection()
        try:
            seen.append((path, _request(conn, "GET", path, headers=headers)))
        finally:
            conn.close()
    for path, answer in seen:
        line = proxy.log_line(answer.request_id)
        assert f'"GET {path} HTTP/1.1"' in line and f"status={answer.status}" in line, line
        assert line.startswith("127.0.0.1:")
        assert live.server.key(KeyKind.INFERENCE) not in line  # the token is never logged
    assert [a.status for _, a in seen] == [200, 401, 404]


# -------------------------------------------------------------------------------------------------- routes
@pytest.mark.parametrize("method,path", [
    ("GET", "/models"),                                   # management API routes
    ("GET", "/models/mnist_tiny"),
    ("POST", "/models?url=evil.mar"),
    ("GET", "/metrics"),                                  # metrics
    ("GET", "/api-description"),
    ("OPTIONS", "/"),
    ("GET", "/v2/models/mnist_tiny"),                    # v2 metadata: not an inference route
    ("POST", "/predictions/..%2Fmodels"),                 # encoded traversal
    ("POST", "/predictions/mnist_tiny/1.0/extra"),
    ("POST", "/explanations/mnist_tiny"),
])
def test_only_prediction_and_health_routes_are_forwarded(proxy, torchserve_server, method, path) -> None:
    conn = proxy.connection()
    try:
        answer = _request(conn, method, path, b"" if method == "POST" else None, _auth(torchserve_server))
    finally:
        conn.close()
    _is_proxy_json(answer, 404)
    assert "backend=fe_https/<NOSRV>" in proxy.log_line(answer.request_id)  # never reached TorchServe


def test_the_v2_route_is_forwarded_and_methods_are_checked(proxy, torchserve_server) -> None:
    live, tiny = torchserve_server, torchserve_server.tiny
    body = json.dumps({"inputs": [{"name": "input-0", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                   "data": tiny.test_x[0].ravel().tolist()}]}).encode()
    conn = proxy.connection()
    try:
        answer = _request(conn, "POST", f"/v2/models/{live.model}/infer", body,
                          _auth(live) + [("Content-Type", "application/json")])
        assert answer.status == 200, answer.body
        assert "outputs" in answer.body
        wrong = _request(conn, "GET", f"/predictions/{live.model}", headers=_auth(live))
        _is_proxy_json(wrong, 405)
        assert wrong.headers["allow"] == "POST"
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------------- body
def test_body_limit_is_the_handlers_limit(proxy, torchserve_server) -> None:
    live = torchserve_server
    over = _predict(proxy, live, b"\0" * (MAX_BODY + 1))
    _is_proxy_json(over, 413)
    assert "backend=fe_https/<NOSRV>" in proxy.log_line(over.request_id)
    # At the limit the body passes the proxy and the handler answers (not an image: 400 from the handler).
    at = _predict(proxy, live, b"\0" * MAX_BODY)
    assert at.status == 400 and "be_inference/inner" in proxy.log_line(at.request_id), at.body
    # A chunked upload (no Content-Length) is measured as it arrives: one byte over the limit in 64 KiB chunks.
    # The whole message fits the proxy's buffer (MAX_BODY + 64 KiB), so the proxy reads it to its end before it
    # answers and closes; a body that filled the buffer would be answered early, racing the client's last send.
    conn = proxy.connection()
    try:
        conn.putrequest("POST", f"/predictions/{live.model}")
        for name, value in _auth(live) + [("Content-Type", "image/png"), ("Transfer-Encoding", "chunked")]:
            conn.putheader(name, value)
        conn.endheaders()
        for start in range(0, MAX_BODY + 1, 65536):
            chunk = b"\0" * min(65536, MAX_BODY + 1 - start)
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
        response = conn.getresponse()
        assert response.status == 413 and json.loads(response.read())["code"] == 413
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------------- slowloris
def _slow_client(proxy: Proxy, prefix: bytes, payload: bytes, every_s: float, results: dict) -> None:
    """Send `prefix` at once, then `payload` one byte every `every_s`; record how long until the proxy answered
    or closed the connection, and what it answered."""
    started = time.monotonic()
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT_IDLE_S * 5)
    tls = proxy.context().wrap_socket(raw, server_hostname="localhost")
    reply = b""
    try:
        tls.sendall(prefix)
        for byte in payload:
            tls.sendall(bytes([byte]))
            time.sleep(every_s)
        reply = tls.recv(4096)
    except (OSError, ssl.SSLError):
        try:
            reply = tls.recv(4096)  # the proxy's answer, if it sent one before closing
        except (OSError, ssl.SSLError):
            pass
    finally:
        results["seconds"] = time.monotonic() - started
        results["reply"] = reply
        tls.close()


@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_slow_client_is_cut_within_the_request_timeout_while_others_pass(proxy, torchserve_server,
                                                                           part) -> None:
    live, tiny = torchserve_server, torchserve_server.tiny
    head = (f"POST /predictions/{live.model} HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: Bearer {live.server.key(KeyKind.INFERENCE)}\r\nContent-Type: image/png\r\n")
    png = tiny.png(0)
    if part == "headers":  # slowloris: the header block never ends, one byte every 0.2 s (~30 s of bytes)
        prefix, payload = b"", (head + "X-Padding: " + "a" * 150).encode()
    else:  # the headers arrive at once, the body one byte every 0.2 s
        prefix, payload = f"{head}Content-Length: {len(png)}\r\n\r\n".encode(), png
    results: dict = {}
    slow = threading.Thread(target=_slow_client, args=(proxy, prefix, payload, 0.2, results))
    slow.start()
    good = []
    while slow.is_alive() and len(good) < 200:
        good.append(_predict(proxy, live, png).status)
        time.sleep(0.05)
    slow.join(timeout=30)
    assert not slow.is_alive()
    assert results["seconds"] < TIMEOUT_REQUEST_S + 2.0, results
    # Cut by the proxy, answered 408 (headers) or closed: never forwarded, never completed.
    assert not results["reply"] or results["reply"].startswith(b"HTTP/1.1 408"), results["reply"][:200]
    assert good and set(good) == {200}, good


# ------------------------------------------------------------------------------------------------ policies
def test_rate_limit_answers_429_with_json(limited_proxy, torchserve_server) -> None:
    conn = limited_proxy.connection()
    statuses, last = [], None
    try:
        for _ in range(RATE_LIMIT + 3):
            last = _request(conn, "GET", "/ping", headers=_auth(torchserve_server))
            statuses.append(last.status)
    finally:
        conn.close()
    assert statuses == [200] * RATE_LIMIT + [429] * 3, statuses
    _is_proxy_json(last, 429)
    assert int(last.headers["retry-after"].rstrip("s")) == RATE_PERIOD_S


@pytest.mark.parametrize("headers", [
    [("X-Compute-Budget", "5"), ("X-Compute-Budget", "1000000")],
    [("X-Compute-Budget", "5"), ("x-compute-BUDGET", "1000000")],
    [("x-compute-budget", "5, 1000000")],
])
def test_a_repeated_budget_header_is_refused(proxy, torchserve_server, headers) -> None:
    answer = _predict(proxy, torchserve_server, torchserve_server.tiny.png(0), headers)
    _is_proxy_json(answer, 400)
    assert answer.body["type"] == "RepeatedBudgetHeader"
    assert "backend=fe_https/<NOSRV>" in proxy.log_line(answer.request_id)


def test_a_single_budget_header_is_forwarded(proxy, torchserve_server) -> None:
    live, tiny = torchserve_server, torchserve_server.tiny
    answer = _predict(proxy, live, tiny.png(0), [("X-Compute-Budget", "3")])
    assert answer.status == 200, answer.body
    offline_exits, _ = tiny.offline(3.0)
    assert answer.body["exit_index"] == offline_exits[0] + 1


@pytest.mark.parametrize("token", [None, "not-the-key", ""])
def test_missing_or_wrong_token_is_401_with_www_authenticate(proxy, torchserve_server, token) -> None:
    headers = [] if token is None else [("Authorization", f"Bearer {token}")]
    conn = proxy.connection()
    try:
        answer = _request(conn, "POST", f"/predictions/{torchserve_server.model}", torchserve_server.tiny.png(0),
                          headers + [("Content-Type", "image/png")])
    finally:
        conn.close()
    _is_proxy_json(answer, 401)
    assert answer.headers["www-authenticate"].startswith('Bearer realm="early-exit"')
    # Without the proxy TorchServe answers the same wrong token with 400 (what the proxy rewrites).
    if token:
        direct = http.client.HTTPConnection("127.0.0.1", torchserve_server.server.ports.inference, timeout=10)
        try:
            assert _request(direct, "POST", f"/predictions/{torchserve_server.model}", b"x",
                            [("Authorization", f"Bearer {token}")]).status == 400
        finally:
            direct.close()


# ------------------------------------------------------------------------------------------------- retries
def test_killing_the_workers_under_load_loses_no_answer(proxy, torchserve_server, record_property) -> None:
    """Concurrency 32 through the proxy, every worker SIGKILLed after 1 s: every request still gets its 200
    (the proxy re-sends the requests of the dead batch), with the offline answer."""
    live, tiny = torchserve_server, torchserve_server.tiny
    n = len(tiny.test_x)
    old_pids = live.worker_pids()
    assert old_pids
    outcomes: list[tuple[int, int, object]] = []  # (image, status, body)
    lock = threading.Lock()
    stop = threading.Event()
    counter = itertools.count()

    def worker() -> None:
        conn = proxy.connection(CLIENT_TIMEOUT_S)
        try:
            while not stop.is_set():
                i = next(counter) % n
                try:
                    a = _request(conn, "POST", f"/predictions/{live.model}", tiny.png(i),
                                 _auth(live) + [("Content-Type", "image/png")])
                    result = (i, a.status, a.body)
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    conn = proxy.connection(CLIENT_TIMEOUT_S)
                    result = (i, -1, f"{type(exc).__name__}: {exc}")
                with lock:
                    outcomes.append(result)
        finally:
            conn.close()

    log_start = len(proxy.log_lines())
    pool = ThreadPoolExecutor(LOAD_CONCURRENCY)
    futures = [pool.submit(worker) for _ in range(LOAD_CONCURRENCY)]
    try:
        time.sleep(1.0)
        killed_at = time.monotonic()
        for pid in old_pids:
            os.kill(pid, signal.SIGKILL)  # the workers of this test's server, by pid
        ready_at = None
        while time.monotonic() - killed_at < 90:
            try:
                pids = live.worker_pids()
            except OSError:
                pids = []
            if pids and not set(pids) & set(old_pids):
                ready_at = time.monotonic()
                break
            time.sleep(0.1)
        assert ready_at is not None, "no new READY worker within 90 s"
        time.sleep(2.0)
    finally:
        stop.set()
        for f in futures:
            f.result(timeout=CLIENT_TIMEOUT_S + 10)
        pool.shutdown()
    # HAProxy writes a request's log line after the answer has gone out: give the last ones a moment to land.
    deadline = time.monotonic() + 5.0
    while len(lines := proxy.log_lines()[log_start:]) < len(outcomes) and time.monotonic() < deadline:
        time.sleep(0.05)
    retried = [line for line in lines if not re.search(r" retries=0 ", line)]
    errors = [o for o in outcomes if o[1] != 200]
    wrong = [o for o in outcomes if o[1] == 200 and (o[2]["class_index"] != tiny.offline_classes[o[0]]
                                                     or o[2]["exit_index"] != tiny.offline_exits[o[0]] + 1)]
    figures = {"requests": len(outcomes), "errors": len(errors), "error_samples": [str(e)[:200] for e in errors[:3]],
               "retried_requests": len(retried), "worker_ready_after_kill_s": round(ready_at - killed_at, 2),
               "answers_differing_from_offline": len(wrong)}
    print(f"\nworkers killed under load behind the proxy: {json.dumps(figures)}")
    record_property("proxy_worker_kill", json.dumps(figures))
    assert not errors, figures
    # At most one access-log line per request, and nearly all of them: under this load on 2 cores, with the workers
    # killed, a fresh-clone run found 1978 lines for 1982 answered requests (none doubled). Each request's own line
    # is checked exactly, without load, by test_access_log_names_each_request.
    assert 0.99 * len(outcomes) <= len(lines) <= len(outcomes), ("about one access-log line per request",
                                                                len(lines), len(outcomes))
    # The kill really hit requests in flight, and the proxy re-sent them (else this test proved nothing).
    assert retried, "no request was retried: the kill did not hit a batch in flight"
    assert len(wrong) <= 1, figures
