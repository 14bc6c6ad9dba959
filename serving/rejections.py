"""Why a request is refused: the closed set of reasons and the exception that carries one.

A `RequestRejected` becomes that request's 4xx answer, never the batch's (INTERNAL_ERROR, which the handler makes
for a request that hit a bug, is a 500). Its `body()` is the JSON the client receives and its `reason.value` the
`Reason` label of the RequestsRejected metric, so the values of `RejectReason` are an interface (alerts and
dashboards query them): add new ones, never rename.

Messages are written for the client: they name what is wrong and how to fix it, never carry Python reprs, stack
traces or the text of arbitrary exceptions, and are capped at `MAX_MESSAGE_CHARS`.
"""
from __future__ import annotations

from enum import Enum
from typing import Any

__all__ = ["HTTP_PHRASES", "MAX_LOGGED_CHARS", "MAX_MESSAGE_CHARS", "RejectReason", "RequestRejected", "clip",
           "printable"]

MAX_MESSAGE_CHARS = 400
MAX_LOGGED_CHARS = 600  # a rejection message with escapes fits


class RejectReason(str, Enum):
    """Why a request got a 4xx: the closed set behind the RequestsRejected{Reason} label."""

    INVALID_BUDGET = "invalid_budget"  # not a number, NaN, infinite or negative
    BUDGET_BELOW_MINIMUM = "budget_below_minimum"  # below the cheapest exit
    UNDECODABLE_IMAGE = "undecodable_image"  # neither JSON nor a decodable PNG/JPEG
    WRONG_SHAPE = "wrong_shape"
    NON_FINITE = "non_finite"  # NaN or infinite values
    OUT_OF_RANGE = "out_of_range"  # values outside [0, 1], or numbers beyond float32
    EMPTY_BODY = "empty_body"
    PAYLOAD_TOO_LARGE = "payload_too_large"  # body over max_payload_bytes, or image over max_image_pixels
    BAD_JSON = "bad_json"  # malformed JSON, or not {"data": numbers} / {"inputs": [...]}
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"  # form-urlencoded: the frontend split the body
    TOO_MANY_INPUTS = "too_many_inputs"  # multipart form with several fields, v2 request with several inputs
    UNSUPPORTED_IMAGE_MODE = "unsupported_image_mode"  # an image mode (or model channel count) we cannot honour
    UNSUPPORTED_DATATYPE = "unsupported_datatype"  # Open Inference Protocol datatype other than FP32/FP64
    INTERNAL_ERROR = "internal_error"  # not a client fault: the handler's 500 for one request that hit a bug

    @property
    def status(self) -> int:
        """The HTTP status of this rejection: 413, 415 and 500 where they apply, 400 otherwise."""
        return _STATUS.get(self, 400)


_STATUS = {RejectReason.PAYLOAD_TOO_LARGE: 413, RejectReason.UNSUPPORTED_CONTENT_TYPE: 415,
           RejectReason.INTERNAL_ERROR: 500}

HTTP_PHRASES: dict[int, str] = {400: "Bad Request", 413: "Payload Too Large", 415: "Unsupported Media Type",
                                500: "Internal Server Error"}


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` cut to at most `limit` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def printable(text: object, limit: int = MAX_LOGGED_CHARS) -> str:
    """Text that came from a client, made safe for a log line: every character a terminal or a log parser could
    act on (C0 and C1 controls such as ESC, CR, LF and NUL, DEL, Unicode format characters such as bidi overrides,
    line and paragraph separators, unassigned and lone surrogate code points; `str.isprintable()` false, ASCII
    space excepted) becomes a visible escape (\\xNN, \\uNNNN or \\UNNNNNNNN) and a backslash is doubled, so the
    escaped text reads back unambiguously. Cut to `limit` characters (after escaping) with an ellipsis."""
    text = str(text)
    if not (text.isprintable() and "\\" not in text):
        text = "".join(c if c == " " or (c.isprintable() and c != "\\") else _escape(c) for c in text)
    return clip(text, limit)


def _escape(char: str) -> str:
    code = ord(char)
    if char == "\\":
        return "\\\\"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class RequestRejected(Exception):
    """One request's input is unusable: becomes that request's 4xx (INTERNAL_ERROR: 500), never the batch's.

    `details` are extra JSON-serialisable fields of the answer (e.g. expected_shape, max_payload_bytes).
    """

    def __init__(self, reason: RejectReason, message: str, **details: Any) -> None:
        message = clip(message)
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        """The JSON answer: {"error": message, "reason": reason value, "status": HTTP status, **details}."""
        return {"error": self.message, "reason": self.reason.value, "status": self.reason.status, **self.details}
