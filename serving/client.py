"""A small client for the early-exit server (standard library only: copy it anywhere).

    python -m serving.client digit.png --budget 5
    EARLY_EXIT_TOKEN="$KEY" python -m serving.client input.json --url https://ee.example.org --ca-file ca.pem

The body is sent as is: a PNG/JPEG image, or JSON {"data": nested list C x H x W in [0, 1]}.
The token is read from the environment variable EARLY_EXIT_TOKEN, else from the inference key in
.serve/key_file.json (written by `make serve`); never from the command line, where `ps` and the shell history
would show it. https URLs verify the server's certificate (system CAs, or --ca-file). A token is never sent over
plain http except to a loopback host: that is refused before connecting (exit status 2).
A 503 (no worker free) or 507 (a worker restarting) is retried once after --retry-delay seconds (or the
server's Retry-After, at most 30 s), said on stderr: inference is idempotent, so sending it again is safe.
Exit status: 0 for HTTP 200, 1 for any other answer, 2 when the server could not be reached (or its certificate
did not verify), or a token would have gone over plain http to another host.
"""
from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import math
import os
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

BUDGET_HEADER = "X-Compute-Budget"
DEFAULT_KEY_FILE = Path(".serve/key_file.json")
TOKEN_ENV = "EARLY_EXIT_TOKEN"
DEFAULT_PORTS = {"http": 80, "https": 443}
# The model `make serve` serves by default: the default preset's run (training.config.DEFAULT_PRESET; this module
# stays torch-free, so the name is written here and tests/unit/test_doc_examples.py checks that they agree).
DEFAULT_MODEL = "mnist-quick"
RETRY_STATUSES = frozenset({503, 507})  # TorchServe: no worker free / the model's worker is (re)starting
MAX_RETRY_AFTER_S = 30.0


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: Any  # parsed JSON, or the raw text when the server did not answer JSON

    @property
    def ok(self) -> bool:
        return self.status == 200


class InsecureURLError(ValueError):
    """The URL cannot be used as asked: an unknown scheme, no host, or a token bound for plain http off loopback."""


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback addresses (127.0.0.0/8, ::1); names are not resolved."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Client:
    """One persistent HTTP(S) connection (reopened when the server closes it, as TorchServe does after a 4xx).

    url       http:// or https:// (certificate and host name verified against the system CAs or `ca_file`); the
              port defaults to the scheme's (80, 443); a path is a prefix (a gateway's route).
    token     sent as "Authorization: Bearer <token>"; refused (InsecureURLError) for plain http to a host that is
              not loopback, where anyone on the path could read it.
    Raises InsecureURLError for such a URL, ssl errors for an unreadable `ca_file`. Not thread-safe: give each
    thread its own Client.
    """

    def __init__(self, url: str = "http://127.0.0.1:8080", model: str = DEFAULT_MODEL, token: str | None = None,
                 timeout: float = 30.0, ca_file: str | Path | None = None) -> None:
        parts = urlsplit(url)
        self.scheme = parts.scheme.lower()
        if self.scheme not in DEFAULT_PORTS:
            raise InsecureURLError(f"URL {url!r} must start with http:// or https://")
        if not parts.hostname:
            raise InsecureURLError(f"URL {url!r} names no host")
        self.host, self.port = parts.hostname, parts.port or DEFAULT_PORTS[self.scheme]
        if token and self.scheme == "http" and not is_loopback(self.host):
            raise InsecureURLError(f"refusing to send the token over plain http to {self.host}: use an https URL "
                                   "(or a loopback address)")
        self.prefix = parts.path.rstrip("/")
        self.model, self.token, self.timeout = model, token, timeout
        self._tls = ssl.create_default_context(cafile=str(ca_file) if ca_file else None) \
            if self.scheme == "https" else None
        self._conn: http.client.HTTPConnection | None = None

    def predict(self, body: bytes, budget: float | str | None = None, content_type: str | None = None,
                headers: dict[str, str] | None = None) -> Response:
        """POST /predictions/<model>; content type guessed from the body when not given."""
        sent = {"Content-Type": content_type or guess_content_type(body), **(headers or {})}
        if budget is not None:
            sent[BUDGET_HEADER] = str(budget)
        if self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        return self.request("POST", f"{self.prefix}/predictions/{self.model}", body, sent)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Response:
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = (http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                          context=self._tls) if self._tls is not None
                              else http.client.HTTPConnection(self.host, self.port, timeout=self.timeout))
            try:
                self._conn.request(method, path, body=body, headers=headers or {})
                raw = self._conn.getresponse()
                data = raw.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()  # a kept-alive connection the server had closed: retry once on a fresh one
                if attempt:
                    raise
                continue
            response_headers = {k.lower(): v for k, v in raw.getheaders()}
            if response_headers.get("connection", "").lower() == "close":
                self.close()
            try:
                parsed: Any = json.loads(data) if data else None
            except ValueError:
                parsed = data.decode("utf-8", "replace")
            return Response(raw.status, response_headers, parsed)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def guess_content_type(body: bytes) -> str:
    if body.startswith(b"\x89PNG"):
        return "image/png"
    if body.startswith(b"\xff\xd8"):
        return "image/jpeg"
    return "application/json"


def token_from_environment(key_file: Path = DEFAULT_KEY_FILE) -> str | None:
    """$EARLY_EXIT_TOKEN when set and not empty, else the key file's inference key (None: no token)."""
    return os.environ.get(TOKEN_ENV) or read_token(key_file)


def read_token(key_file: Path = DEFAULT_KEY_FILE) -> str | None:
    """The inference key TorchServe wrote, or None when there is no key file (token auth off)."""
    try:
        return str(json.loads(Path(key_file).read_text())["inference"]["key"])
    except FileNotFoundError:
        return None


def retry_delay(response: Response, default: float) -> float:
    """Seconds to wait before retrying: the server's Retry-After (seconds form, capped), else `default`."""
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:  # absent, or the HTTP-date form
        return default
    return min(seconds, MAX_RETRY_AFTER_S) if math.isfinite(seconds) and seconds >= 0 else default


def _reason(response: Response) -> str:
    body = response.body
    if isinstance(body, dict):
        return str(body.get("type") or body.get("message") or body)[:120]
    return str(body or "")[:120]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.client", description=__doc__.splitlines()[0])
    p.add_argument("input", type=Path, help="a PNG/JPEG image or a JSON file {\"data\": [...]}")
    p.add_argument("--url", default="http://127.0.0.1:8080",
                   help="http:// (loopback only when a token is sent) or https:// (certificate verified)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"the served model: the run's name (default {DEFAULT_MODEL}, what `make serve` serves)")
    p.add_argument("--budget", help="MFLOPs per input (X-Compute-Budget); default: the model's")
    p.add_argument("--token", help=argparse.SUPPRESS)  # gone: refused with a pointer to the variable
    p.add_argument("--key-file", type=Path, default=DEFAULT_KEY_FILE,
                   help=f"where the inference key is read when ${TOKEN_ENV} is not set (default {DEFAULT_KEY_FILE})")
    p.add_argument("--ca-file", type=Path, help="PEM file of CA certificates to verify an https server with "
                   "(default: the system's)")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--retry-delay", type=float, default=1.0,
                   help="seconds before the one retry of a 503/507 answer (default 1; Retry-After wins)")
    args = p.parse_args(argv)
    if args.token is not None:
        print(f"error: --token is not accepted (the command line shows in ps and the shell history): set {TOKEN_ENV}",
              file=sys.stderr)
        return 2
    try:
        body = args.input.read_bytes()
    except OSError as exc:
        p.error(f"cannot read {args.input}: {exc}")
    try:
        client = Client(args.url, args.model, token_from_environment(args.key_file), args.timeout, args.ca_file)
    except InsecureURLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ssl.SSLError) as exc:  # an unreadable or malformed --ca-file
        print(f"error: cannot use --ca-file {args.ca_file}: {exc}", file=sys.stderr)
        return 2
    try:
        response = client.predict(body, args.budget)
        if response.status in RETRY_STATUSES:
            delay = retry_delay(response, args.retry_delay)
            print(f"HTTP {response.status} ({_reason(response)}): retrying once in {delay:g} s", file=sys.stderr)
            time.sleep(delay)
            response = client.predict(body, args.budget)
    except OSError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    print(f"HTTP {response.status}  exit {response.headers.get('x-exit-index', '-')}  "
          f"spent {response.headers.get('x-compute-spent', '-')} MFLOPs", file=sys.stderr)
    print(json.dumps(response.body, indent=2))
    return 0 if response.ok else 1


if __name__ == "__main__":
    sys.exit(main())
