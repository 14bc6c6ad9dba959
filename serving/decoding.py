"""Request decoding for the TorchServe handler: one request of a batch -> a validated model input.

Pure functions over numpy and Pillow (no torch, no TorchServe import): `decode_request` turns one element of
TorchServe's `data` list plus that request's headers into a `DecodedInput` (C x H x W float32 in [0, 1]), or
raises `RequestRejected` (a 4xx for that request only). Anything else that escapes is a bug and is left to the
handler (a 500 for that request).

How TorchServe 0.12 presents a request (frontend `InferenceRequestHandler.parseRequest` and `NettyUtils.getFormData`;
worker `ts/protocol/otf_message_handler.py::_retrieve_input_data` and `ts/service.py::retrieve_data_for_inference`):

* Each request is a dict {parameter name: value}; values read off the socket are `bytearray`.
* A plain body (any Content-Type but the two form types) is ONE parameter named "body". The worker decodes it
  when its mime type (the frontend strips ";charset=..." parameters) is exactly `application/json`: the value is
  then the parsed object (dict, list, number, ...), or the raw bytearray when `json.loads` fails (invalid JSON,
  a UTF-8 BOM, an integer literal over Python's int-str digit limit, ...). A `text/*` body arrives as `str`
  (bytearray when it is not UTF-8). TS_DECODE_INPUT_REQUEST=false turns both decodings off.
* multipart/form-data: one parameter per form field, keyed by field name; file parts carry their own
  Content-Type (so the JSON/text decoding above applies per part), plain fields have none (bytearray). Two fields
  of the same name collapse to the last one (the worker builds a dict), so they cannot be told apart here.
* application/x-www-form-urlencoded: one parameter per key=value pair: the body is gone (415).
* The legacy `/{model}/predict` and `/invocations` routes add query-string parameters next to "body";
  `/predictions/{model}` does not. Next to "body" they are ignored; in a multipart form they count as fields.
* Headers (`context.get_all_request_header(idx)`): the request headers with the client's spelling, plus one entry
  {parameter name: {"content-type": ...}} per parameter: not every value is a string.

Accepted bodies
    PNG or JPEG image   decoded as a viewer shows it (EXIF orientation applied, transparency composited onto
                        `InputSpec.background`), converted to 1 or 3 channels, brought to H x W by the model's
                        evaluation transform (`InputSpec.transform`, early_exit/transform.py: shorter side
                        resized, centre crop), the code its evaluation images went through.
    JSON (raw)          {"data": nested list} of shape C x H x W or 1 x C x H x W, numbers in [0, 1].
    JSON (KServe v2 /   {"inputs": [{"name", "shape": [1, C, H, W] or [C, H, W], "datatype": "FP32"|"FP64",
    Open Inference)     "data": flat (row-major) or nested list}], "id"?: str}; answer with `v2_outputs`.
"""
from __future__ import annotations

import io
import json
import logging
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from early_exit.transform import EIGHT_BIT_BASE, EvalTransform, composite
from serving.rejections import RejectReason, RequestRejected, clip, printable

__all__ = [
    "BodyFormat",
    "DecodedInput",
    "InputLimits",
    "InputSpec",
    "Protocol",
    "V2Datatype",
    "V2_OUTPUT_NAME",
    "decode_image",
    "decode_request",
    "derive_limits",
    "header_value",
    "image_to_array",
    "v2_outputs",
]

logger = logging.getLogger(__name__)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
UTF8_BOM = b"\xef\xbb\xbf"
FORM_URLENCODED = "application/x-www-form-urlencoded"
IMAGE_FORMATS = ("PNG", "JPEG")  # Pillow plugin names; a JPEG with several pictures opens as MPO, first picture
V2_OUTPUT_NAME = "probabilities"
MAX_NAME_CHARS = 256  # v2 tensor names and request ids are echoed back: keep them short
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_MAX_DIGITS = len(str(int(FLOAT32_MAX)))  # 39: a longer integer literal cannot be a float32
U8_MAX = np.float32(255.0)
U16_MAX = np.float32(65535.0)
FORM_URLENCODED_HINT = (
    f"{FORM_URLENCODED} bodies are parsed as form fields before they reach the model (curl's default for "
    "-d/--data-binary): send the image or JSON with Content-Type image/png, image/jpeg or application/json "
    "(curl -H 'Content-Type: image/png' or -T)"
)

# Pillow raises these for corrupt, truncated or unidentifiable PNG/JPEG data (UnidentifiedImageError is an OSError).
_PILLOW_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)

# Single-band high-depth modes: 16-bit PNG greys (I;16*, or I in older Pillow) and floats.
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_HIGH_DEPTH = (*_SIXTEEN_BIT, "I", "F")
# Modes whose transparency is a key colour in info["transparency"] (PNG tRNS), which Pillow stores raw.
_KEYED_GREY = ("1", "L", *_SIXTEEN_BIT, "I")
# PNG greys below 8 bits: Pillow scales the pixels to 0..255 but keeps the tRNS key in file units.
_LOW_BIT_GREY_SCALE = {"L;1": 255, "L;2": 85, "L;4": 17}
_JSON_TYPE_NAMES = {bool: "boolean", str: "string", type(None): "null", dict: "object", list: "array"}
_V2_KNOWN_DATATYPES = frozenset(
    {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64",
     "BF16", "BYTES"}
)


class Protocol(str, Enum):
    """How the request was phrased, hence how to phrase the answer."""

    RAW = "raw"  # an image, or our JSON {"data": ...}
    OPEN_INFERENCE_V2 = "open_inference_v2"  # KServe v2 / Open Inference Protocol {"inputs": [...]}


class V2Datatype(str, Enum):
    """Open Inference Protocol tensor datatypes this server accepts (both become float32)."""

    FP32 = "FP32"
    FP64 = "FP64"


class BodyFormat(str, Enum):
    """What a body is, as far as its cost to decode goes (PNG decodes every pixel, JPEG at up to 1/8 scale)."""

    JSON = "json"
    PNG = "png"
    JPEG = "jpeg"


# Input limits derived from the model's input (`derive_limits`). n = C x H x W input values, A = H x W pixels.
JSON_BYTES_PER_VALUE = 48  # a float64 written with 17 digits, indented as json.dumps(indent=4) nests it
JSON_OVERHEAD_BYTES = 4096  # keys, v2 "name"/"shape"/"datatype"/"id", whitespace
PNG_PIXELS_PER_INPUT_PIXEL = 32  # PNG decodes every pixel: up to 5.7x the input's side
PNG_BYTES_PER_PIXEL = 8  # 16-bit RGBA, stored (incompressible) at the pixel limit
PNG_OVERHEAD_BYTES = 64 << 10  # ancillary chunks (ICC profile, EXIF, text)
JPEG_PIXELS_PER_PNG_PIXEL = 16  # draft mode decodes at up to 1/8 scale, but every 8x8 block is still read
JPEG_PNG_PIXELS_PER_BYTE = 2  # entropy decoding reads every byte: a progressive JPEG byte costs ~2 PNG pixels
JPEG_OVERHEAD_BYTES = 4096  # markers, quantization and Huffman tables (about 600 bytes), a short EXIF block
PHOTO_JPEG_PIXELS = 1 << 24  # a 3-channel model takes photos: a 16.8-megapixel camera JPEG always fits
PHOTO_JPEG_BYTES = 8 << 20  # ... of up to 8 MiB (a 12-megapixel phone photo is 2.5-6 MB)
MAX_IMAGE_PIXELS_CAP = 1 << 26  # never more, whatever the model (Pillow's own bomb warning is at 89.5 M)


@dataclass(frozen=True)
class InputLimits:
    """What one request may cost to decode, per body format (bytes of the body; width x height declared)."""

    json_bytes: int
    png_bytes: int
    png_pixels: int
    jpeg_bytes: int
    jpeg_pixels: int

    def max_bytes(self, fmt: BodyFormat | None = None) -> int:
        """The byte limit of `fmt`; None: the largest of all (checked before the body is looked at)."""
        if fmt is None:
            return max(self.json_bytes, self.png_bytes, self.jpeg_bytes)
        return {BodyFormat.JSON: self.json_bytes, BodyFormat.PNG: self.png_bytes,
                BodyFormat.JPEG: self.jpeg_bytes}[fmt]

    def max_pixels(self, fmt: BodyFormat) -> int:
        """The declared width x height limit of an image format (PNG or JPEG)."""
        return self.jpeg_pixels if fmt is BodyFormat.JPEG else self.png_pixels


def derive_limits(shape: tuple[int, int, int], max_payload_bytes: int | None = None,
                  max_image_pixels: int | None = None) -> InputLimits:
    """Per-format request limits for a model whose input is `shape` (C, H, W); explicit limits override.

    n = C*H*W values, A = H*W pixels:
        JSON   bytes   48 n + 4096
        PNG    pixels  32 A (every pixel is decoded)
               bytes   8 pixels + 64 KiB (16-bit RGBA stored uncompressed, plus ancillary chunks)
        JPEG   pixels  16 x PNG pixels (draft mode decodes at up to 1/8 scale), bytes PNG pixels / 2 + 4 KiB (entropy work, tables);
                       a 3-channel (photo) model gets at least 2^24 pixels and 8 MiB, so a camera photo fits
        pixels never above 2^26.
    max_payload_bytes replaces every byte limit, max_image_pixels both pixel limits.
    """
    channels, height, width = (int(d) for d in shape)
    area = height * width
    png_pixels = min(PNG_PIXELS_PER_INPUT_PIXEL * area, MAX_IMAGE_PIXELS_CAP)
    jpeg_pixels = JPEG_PIXELS_PER_PNG_PIXEL * png_pixels
    jpeg_bytes = png_pixels // JPEG_PNG_PIXELS_PER_BYTE + JPEG_OVERHEAD_BYTES
    if channels == 3:
        jpeg_pixels, jpeg_bytes = max(jpeg_pixels, PHOTO_JPEG_PIXELS), max(jpeg_bytes, PHOTO_JPEG_BYTES)
    limits = InputLimits(json_bytes=JSON_BYTES_PER_VALUE * channels * area + JSON_OVERHEAD_BYTES,
                         png_bytes=PNG_BYTES_PER_PIXEL * png_pixels + PNG_OVERHEAD_BYTES, png_pixels=png_pixels,
                         jpeg_bytes=jpeg_bytes, jpeg_pixels=min(jpeg_pixels, MAX_IMAGE_PIXELS_CAP))
    if max_payload_bytes is not None:
        limits = replace(limits, json_bytes=max_payload_bytes, png_bytes=max_payload_bytes,
                         jpeg_bytes=max_payload_bytes)
    if max_image_pixels is not None:
        limits = replace(limits, png_pixels=max_image_pixels, jpeg_pixels=max_image_pixels)
    return limits


@dataclass(frozen=True)
class InputSpec:
    """What the model takes and what a request may cost.

    shape               (C, H, W) of one input; images need C in {1, 3}.
    background          grey level in [0, 1] that transparent pixels are composited onto (0.0 = black, right for
                        MNIST / Fashion-MNIST: white ink on black).
    max_payload_bytes   explicit body limit for every format; None: derived from `shape` per format
                        (`derive_limits`). Larger bodies are rejected (413) before any parsing.
    max_image_pixels    explicit limit on an image's declared width x height for PNG and JPEG; None: derived.
                        Larger images are rejected (413) before decoding.
    transform           the model's evaluation transform (the manifest's `input_transform`), applied to every
                        image; None: `EvalTransform.for_shape(shape)`. Its input_shape must be `shape`.
    limits              the limits in force (derived in __post_init__).
    Raises ValueError for an inconsistent spec (a configuration error, not a request error).
    """

    shape: tuple[int, int, int]
    background: float = 0.0
    max_payload_bytes: int | None = None
    max_image_pixels: int | None = None
    transform: EvalTransform | None = None
    limits: InputLimits = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any(not _is_int(d) or d < 1 for d in self.shape):
            raise ValueError(f"shape must be three positive integers (C, H, W), got {self.shape}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if isinstance(self.background, bool) or not (isinstance(self.background, (int, float))
                                                     and 0.0 <= float(self.background) <= 1.0):
            raise ValueError(f"background must be a number in [0, 1], got {self.background}")
        object.__setattr__(self, "background", float(self.background))
        for name in ("max_payload_bytes", "max_image_pixels"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value}")
        object.__setattr__(self, "limits", derive_limits(self.shape, self.max_payload_bytes, self.max_image_pixels))
        if self.shape[0] in (1, 3):  # other channel counts take JSON only
            transform = self.transform or EvalTransform.for_shape(self.shape)
            if transform.input_shape != self.shape:
                raise ValueError(f"transform gives {list(transform.input_shape)}, the shape is {list(self.shape)}")
            object.__setattr__(self, "transform", transform)


@dataclass(frozen=True, eq=False)
class DecodedInput:
    """A validated request input.

    x             C x H x W float32 in [0, 1], C-contiguous (the spec's shape).
    protocol      RAW or OPEN_INFERENCE_V2: answer in the same form.
    input_name    v2 only: the request tensor's name.
    request_id    v2 only: the request's optional "id", to echo in the answer.
    """

    x: np.ndarray
    protocol: Protocol
    input_name: str | None = None
    request_id: str | None = None


# ---------------------------------------------------------------------------------------------------- entry point
def decode_request(row: Any, headers: Mapping[str, Any], spec: InputSpec) -> DecodedInput:
    """One element of TorchServe's `data` list -> the model input, or RequestRejected.

    row       {parameter name: value} as TorchServe builds it (see the module docstring); anything else is taken
              as the payload itself (bytes, str, or a parsed JSON document).
    headers   that request's headers, any case (non-string entries such as TorchServe's per-parameter
              {"content-type": ...} dicts are ignored).
    Raises RequestRejected: UNSUPPORTED_CONTENT_TYPE (415, form-urlencoded), EMPTY_BODY, TOO_MANY_INPUTS,
    PAYLOAD_TOO_LARGE (413), BAD_JSON, WRONG_SHAPE, NON_FINITE, OUT_OF_RANGE, UNDECODABLE_IMAGE,
    UNSUPPORTED_IMAGE_MODE, UNSUPPORTED_DATATYPE. Raises TypeError for a payload no TorchServe request can hold
    (a caller bug: the handler's 500).
    """
    mime = (header_value(headers, "content-type") or "").split(";", 1)[0].strip().lower()
    if mime == FORM_URLENCODED:
        raise RequestRejected(RejectReason.UNSUPPORTED_CONTENT_TYPE, FORM_URLENCODED_HINT)
    payload = _select_payload(row, multipart=mime.startswith("multipart/"))
    if payload is None:
        raise _empty_body()
    if isinstance(payload, str):  # TorchServe decoded a text/* body (or a caller passed text)
        payload = payload.encode("utf-8")
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(payload), mime, spec)
    if isinstance(payload, (Mapping, list, int, float)):  # TorchServe already parsed an application/json body
        return _decode_document(payload, spec)
    raise TypeError(f"unexpected request payload type {type(payload).__name__}")


def header_value(headers: Mapping[str, Any] | None, name: str) -> str | None:
    """The value of header `name`, matched case-insensitively; None when absent or not a string."""
    wanted = name.lower()
    for key, value in (headers or {}).items():
        if isinstance(key, str) and isinstance(value, str) and key.lower() == wanted:
            return value
    return None


def _select_payload(row: Any, multipart: bool) -> Any:
    """The one input of a request: the "body" parameter, or the single field of a multipart form."""
    if not isinstance(row, Mapping):
        return row
    if not multipart and "body" in row:
        return row["body"]  # any other parameters are query-string parameters of the legacy routes
    if len(row) > 1:
        raise RequestRejected(
            RejectReason.TOO_MANY_INPUTS,
            f"the request has {len(row)} form fields; exactly one input per request is accepted: send one file "
            "or field holding a PNG/JPEG image or JSON",
            fields=len(row),
        )
    return next(iter(row.values()), None)


def _empty_body() -> RequestRejected:
    return RequestRejected(RejectReason.EMPTY_BODY,
                           'the request has no body: send a PNG/JPEG image or JSON {"data": [...]}')


def _decode_bytes(payload: bytes, mime: str, spec: InputSpec) -> DecodedInput:
    """A raw body: size limits (the largest first, then the format's), then PNG/JPEG by magic number, JSON by its
    first character or its content type."""
    _check_size(payload, None, spec)
    if payload.startswith(PNG_MAGIC):
        return DecodedInput(decode_image(_check_size(payload, BodyFormat.PNG, spec), spec), Protocol.RAW)
    if payload.startswith(JPEG_MAGIC):
        return DecodedInput(decode_image(_check_size(payload, BodyFormat.JPEG, spec), spec), Protocol.RAW)
    text_start = payload.removeprefix(UTF8_BOM).lstrip()
    if not text_start:
        raise _empty_body()
    if text_start[:1] in (b"{", b"[") or mime == "application/json" or mime.endswith("+json") \
            or mime.startswith("text/"):
        _check_size(payload, BodyFormat.JSON, spec)
        return _decode_document(_parse_json(_check_value_count(payload, spec)), spec)
    return DecodedInput(decode_image(payload, spec), Protocol.RAW)


def _check_size(payload: bytes, fmt: BodyFormat | None, spec: InputSpec) -> bytes:
    """`payload` if it is within the byte limit of `fmt` (None: of every format), else PAYLOAD_TOO_LARGE (413)."""
    limit = spec.limits.max_bytes(fmt)
    if len(payload) > limit:
        what = f"the limit for a {fmt.name} body" if fmt is not None else "the limit"
        raise RequestRejected(RejectReason.PAYLOAD_TOO_LARGE, f"body has {len(payload)} bytes, {what} is {limit}",
                              max_payload_bytes=limit)
    return payload


# --------------------------------------------------------------------------------------------------------- JSON
def _parse_json(payload: bytes) -> Any:
    """UTF-8 JSON (an optional BOM is skipped) -> document; numbers beyond float32 raise OUT_OF_RANGE at once."""
    try:
        text = payload.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RequestRejected(RejectReason.BAD_JSON,
                              f"body is not UTF-8 text (invalid byte at offset {exc.start})") from None
    try:
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float)
    except json.JSONDecodeError as exc:
        raise RequestRejected(RejectReason.BAD_JSON, f"body is not valid JSON: {exc.msg} at line {exc.lineno} "
                              f"column {exc.colno}") from None
    except RecursionError:
        raise RequestRejected(RejectReason.BAD_JSON, "body is not valid JSON: nested too deeply") from None


def _check_value_count(payload: bytes, spec: InputSpec) -> bytes:
    """`payload` unless its commas show more values than any accepted document holds, else WRONG_SHAPE, before
    parsing: each number costs a Python call (`_parse_int`/`_parse_float`, about 1 us), so 20 000 one-digit numbers
    in a body within the byte limit would cost 100x a small model's pass. An accepted document has fewer commas than
    C*H*W values + C*H + C list separators + its v2 keys and strings (name and id, MAX_NAME_CHARS each)."""
    channels, height, width = spec.shape
    allowed = channels * height * width + channels * height + channels + 2 * MAX_NAME_CHARS + 64
    commas = payload.count(b",")
    if commas > allowed:
        raise RequestRejected(RejectReason.WRONG_SHAPE, f"body holds about {commas + 1} values or more; shape "
                              f"{list(spec.shape)} has {channels * height * width}", expected_shape=list(spec.shape))
    return payload


def _parse_int(literal: str) -> int:
    """JSON integer literal -> int; more digits than any float32 has -> OUT_OF_RANGE.

    Also keeps Python's int-str conversion limit (4300 digits, a ValueError inside json.loads) out of the way.
    """
    digits = len(literal) - literal.startswith("-")
    if digits > FLOAT32_MAX_DIGITS:
        raise RequestRejected(RejectReason.OUT_OF_RANGE,
                              f"an integer literal with {digits} digits is beyond the float32 range")
    return int(literal)


def _parse_float(literal: str) -> float:
    """JSON number literal with a fraction or exponent -> float; beyond float32 -> OUT_OF_RANGE."""
    value = float(literal)
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise RequestRejected(RejectReason.OUT_OF_RANGE,
                              f"the number {clip(literal, 40)} is beyond the float32 range")
    return value


def _decode_document(document: Any, spec: InputSpec) -> DecodedInput:
    """Parsed JSON -> input: {"data": ...} (RAW) or {"inputs": [...]} (Open Inference Protocol v2)."""
    expected = list(spec.shape)
    if not isinstance(document, Mapping) or ("data" in document) == ("inputs" in document):
        raise RequestRejected(RejectReason.BAD_JSON, 'JSON body must be an object {"data": nested list} or an '
                              'Open Inference Protocol request {"inputs": [one tensor]}', expected_shape=expected)
    if "inputs" in document:
        return _decode_v2(document, spec)
    values = _numbers(document["data"], "'data'", spec)
    if values.ndim == len(spec.shape) + 1 and values.shape[0] == 1:
        values = values[0]
    if values.shape != spec.shape:
        raise RequestRejected(RejectReason.WRONG_SHAPE, f"'data' has shape {list(values.shape)}, expected "
                              f"{expected} (or [1, ...])", expected_shape=expected)
    return DecodedInput(_check_values(values, "'data'"), Protocol.RAW)


def _numbers(data: Any, what: str, spec: InputSpec) -> np.ndarray:
    """A nested list of JSON numbers -> float64 array of its nesting shape.

    Raises BAD_JSON (not a list; strings, booleans, null or objects among the numbers), WRONG_SHAPE (ragged
    nesting, nested deeper than the input's rank plus a batch axis, more values than the input has),
    OUT_OF_RANGE (an integer too large for a float).
    """
    expected = list(spec.shape)
    if not isinstance(data, list):
        raise RequestRejected(RejectReason.BAD_JSON, f"{what} must be a (nested) list of numbers",
                              expected_shape=expected)
    _check_nesting(data, what, spec)
    cells = np.array(data, dtype=object)  # ragged nesting stops at its regular part, leaving lists as cells
    kinds = set(map(type, cells.flat))
    if list in kinds:
        raise RequestRejected(RejectReason.WRONG_SHAPE, f"{what} is not a regular array (nested lists of "
                              f"different lengths or depths); expected shape {expected}", expected_shape=expected)
    others = kinds - {int, float}
    if others:
        names = sorted(_JSON_TYPE_NAMES.get(kind, "non-number") for kind in others)
        raise RequestRejected(RejectReason.BAD_JSON, f"{what} must hold only numbers, found {', '.join(names)}")
    try:
        return cells.astype(np.float64)
    except OverflowError:  # an int from an already parsed body, beyond float64
        raise RequestRejected(RejectReason.OUT_OF_RANGE, f"{what} holds an integer beyond the float32 range") \
            from None


def _check_nesting(data: list[Any], what: str, spec: InputSpec) -> None:
    """Before numpy sees `data`: lists nested at most rank + 1 deep (C, H, W and a batch axis) holding at most
    C*H*W entries on any level, else WRONG_SHAPE. Numpy refuses more than 32 dimensions with a ValueError, and a
    body TorchServe parsed was never held to the byte limit: this walk costs at most (rank + 1) x C*H*W steps."""
    expected = list(spec.shape)
    max_depth = len(spec.shape) + 1
    max_values = math.prod(spec.shape)
    level: list[list[Any]] = [data]
    for depth in range(1, max_depth + 1):
        entries = sum(map(len, level))
        if entries > max_values:
            raise RequestRejected(RejectReason.WRONG_SHAPE, f"{what} holds more than the {max_values} values of "
                                  f"shape {expected}", expected_shape=expected)
        level = [child for item in level for child in item if isinstance(child, list)]
        if not level:
            return
    raise RequestRejected(RejectReason.WRONG_SHAPE, f"{what} is nested deeper than {max_depth} lists; shape "
                          f"{expected} has rank {len(expected)} ({max_depth} with a batch axis)",
                          expected_shape=expected)


def _check_values(array: np.ndarray, what: str) -> np.ndarray:
    """Finite and in [0, 1] -> C-contiguous float32 copy; else NON_FINITE / OUT_OF_RANGE."""
    finite = np.isfinite(array)
    if not finite.all():
        raise RequestRejected(RejectReason.NON_FINITE, f"{what} holds {int((~finite).sum())} NaN or infinite "
                              "value(s)")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise RequestRejected(RejectReason.OUT_OF_RANGE, f"{what} values must be in [0, 1], got [{low:g}, {high:g}]")
    return np.ascontiguousarray(array, dtype=np.float32)


# ------------------------------------------------------------------------------------------- Open Inference v2
def _decode_v2(document: Mapping[str, Any], spec: InputSpec) -> DecodedInput:
    """{"inputs": [{"name", "shape", "datatype", "data"}], "id"?} -> input (see the module docstring)."""
    expected = [1, *spec.shape]
    inputs = document["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise RequestRejected(RejectReason.BAD_JSON, '"inputs" must be a list holding one tensor '
                              '{"name", "shape", "datatype", "data"}', expected_shape=expected)
    if len(inputs) > 1:
        raise RequestRejected(RejectReason.TOO_MANY_INPUTS, f'"inputs" holds {len(inputs)} tensors; exactly one '
                              "input per request is accepted", expected_shape=expected)
    tensor = inputs[0]
    if not isinstance(tensor, Mapping):
        raise RequestRejected(RejectReason.BAD_JSON, 'each input must be an object {"name", "shape", "datatype", '
                              '"data"}', expected_shape=expected)
    name = _short_string(tensor.get("name"), "the input's \"name\"", required=True)
    request_id = _short_string(document.get("id"), 'the request "id"', required=False)
    _v2_datatype(tensor.get("datatype"))

    shape = tensor.get("shape")
    if not isinstance(shape, list) or any(not _is_int(d) or d < 0 for d in shape):
        raise RequestRejected(RejectReason.BAD_JSON, 'the input\'s "shape" must be a list of non-negative '
                              "integers", expected_shape=expected)
    if tuple(shape) not in (spec.shape, (1, *spec.shape)):
        raise RequestRejected(RejectReason.WRONG_SHAPE, f"input shape {shape} is not {expected} (or "
                              f"{list(spec.shape)})", expected_shape=expected)
    if "data" not in tensor:
        raise RequestRejected(RejectReason.BAD_JSON, 'the input has no "data"', expected_shape=expected)
    values = _numbers(tensor["data"], "the input's \"data\"", spec)
    count = math.prod(shape)
    if values.shape != tuple(shape) and not (values.ndim == 1 and values.size == count):
        raise RequestRejected(RejectReason.WRONG_SHAPE, f"the input's \"data\" holds {values.size} values in shape "
                              f"{list(values.shape)}; shape {shape} needs {count} (flat) or that nesting",
                              expected_shape=expected)
    x = _check_values(values.reshape(spec.shape), "the input's \"data\"")
    return DecodedInput(x, Protocol.OPEN_INFERENCE_V2, input_name=name, request_id=request_id)


def _v2_datatype(value: Any) -> V2Datatype:
    try:
        return V2Datatype(value)
    except ValueError:
        shown = f"datatype {value}" if isinstance(value, str) and value in _V2_KNOWN_DATATYPES else "this datatype"
        raise RequestRejected(RejectReason.UNSUPPORTED_DATATYPE, f"{shown} is not supported: send "
                              f"{' or '.join(d.value for d in V2Datatype)} values in [0, 1]") from None


def _short_string(value: Any, what: str, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
        raise RequestRejected(RejectReason.BAD_JSON, f"{what} must be a string of 1 to {MAX_NAME_CHARS} "
                              "characters")
    return value


def v2_outputs(name: str, probs: np.ndarray) -> dict[str, Any]:
    """The "outputs" part of an Open Inference Protocol (KServe v2) response for one request.

    name    the output tensor's name (conventionally `V2_OUTPUT_NAME`).
    probs   class probabilities, shape (K,) or (1, K).
    Returns {"outputs": [{"name": name, "shape": [1, K], "datatype": "FP32", "data": [K floats]}]}; the caller
    adds "model_name" (required by the protocol), and "model_version" / "id" (the request's, if it sent one).
    Raises ValueError for probs of another shape.
    """
    values = np.asarray(probs, dtype=np.float32)
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2 or values.shape[0] != 1:
        raise ValueError(f"probs must have shape (K,) or (1, K), got {values.shape}")
    return {"outputs": [{"name": name, "shape": list(values.shape), "datatype": V2Datatype.FP32.value,
                         "data": values.ravel().tolist()}]}


# ------------------------------------------------------------------------------------------------------- images
def decode_image(payload: bytes, spec: InputSpec) -> np.ndarray:
    """PNG or JPEG bytes -> C x H x W float32 in [0, 1], as a viewer shows the image (see `image_to_array`).

    Raises RequestRejected: PAYLOAD_TOO_LARGE (413: over the format's pixel limit, or Pillow's decompression-bomb
    limit), UNDECODABLE_IMAGE (not PNG/JPEG, corrupt, truncated), UNSUPPORTED_IMAGE_MODE.
    """
    _require_image_channels(spec)
    image, rawmode = _load_image(payload, spec)
    return image_to_array(image, spec, rawmode)


def _load_image(payload: bytes, spec: InputSpec) -> tuple[Image.Image, str | None]:
    """Decode the pixels (checking the pixel limit first) and apply the EXIF orientation.

    Returns the upright image and, for PNG, Pillow's raw mode (it tells 2/4-bit greys and 16-bit RGB apart).
    """
    try:
        with Image.open(io.BytesIO(payload), formats=IMAGE_FORMATS) as opened:
            pixels = opened.width * opened.height
            fmt = BodyFormat.PNG if opened.format == "PNG" else BodyFormat.JPEG  # JPEG or MPO
            limit = spec.limits.max_pixels(fmt)
            if pixels > limit:
                raise RequestRejected(RejectReason.PAYLOAD_TOO_LARGE,
                                      f"image has {pixels} pixels, the limit for a {fmt.name} image is {limit}",
                                      max_image_pixels=limit)
            rawmode = _png_rawmode(opened)
            spec.transform.draft(opened)  # JPEG: decode at a reduced scale when it is much larger
            opened.load()
            ImageOps.exif_transpose(opened, in_place=True)  # upright as a viewer shows it
            return opened, rawmode
    except Image.DecompressionBombError:  # beyond Pillow's own pixel limit, before ours could look
        limit = spec.limits.max_pixels(BodyFormat.PNG if payload.startswith(PNG_MAGIC) else BodyFormat.JPEG)
        raise RequestRejected(RejectReason.PAYLOAD_TOO_LARGE, "image is too large to decode (decompression-bomb "
                              f"limit); the limit is {limit} pixels", max_image_pixels=limit) from None
    except _PILLOW_DECODE_ERRORS as exc:
        logger.debug("image decoding failed: %s: %s", type(exc).__name__, printable(exc))
        if payload.startswith((PNG_MAGIC, JPEG_MAGIC)):
            message = "body is a corrupt or truncated PNG/JPEG image"
        else:
            message = "body is neither JSON nor a PNG/JPEG image"
        raise RequestRejected(RejectReason.UNDECODABLE_IMAGE, message) from None


def _png_rawmode(image: Image.Image) -> str | None:
    """PNG only: the raw mode of the pixel data (e.g. "L;2", "RGB;16B"), read before load() drops the tile."""
    if image.format != "PNG" or not image.tile:
        return None
    args = image.tile[0][3]
    return args if isinstance(args, str) else None


def _require_image_channels(spec: InputSpec) -> None:
    if spec.shape[0] not in (1, 3):
        raise RequestRejected(RejectReason.UNSUPPORTED_IMAGE_MODE,
                              f"this model takes {spec.shape[0]} channels, which no image mode maps to: send JSON")


def image_to_array(image: Image.Image, spec: InputSpec, rawmode: str | None = None) -> np.ndarray:
    """A decoded, upright Pillow image -> C x H x W float32 in [0, 1] (C-contiguous).

    Values are SCALED to [0, 1], never clipped: 8-bit modes / 255; 16-bit greys (I;16*, and I as Pillow < 10 opened
    16-bit PNGs) / 65535, so 8-bit values x 257 give the 8-bit result exactly; I outside 0..65535 cannot be
    honoured (UNSUPPORTED_IMAGE_MODE); F (no PNG/JPEG carries it) is taken as already in [0, 1] and rejected
    (OUT_OF_RANGE / NON_FINITE) otherwise. Palette, premultiplied and other colour spaces (CMYK, YCbCr, RGBX, HSV)
    are expanded by Pillow.
    Transparency (alpha band, palette alpha, or a tRNS key colour in info["transparency"]) is composited onto
    spec.background: out = alpha * pixel + (1 - alpha) * background.
    Channels: grey by Pillow's ITU-R 601-2 luma (L = R*299/1000 + G*587/1000 + B*114/1000); grey -> 3 channels
    by repetition. Size: spec.transform (shorter side resized, centre crop; Pillow premultiplies alpha while
    resizing), the same code as the evaluation pipeline's (early_exit/transform.py).
    rawmode: PNG raw mode from `decode_image`; fixes Pillow keeping the tRNS key in file units for 2/4-bit greys
    and 16-bit RGB (whose pixels Pillow truncates to their high byte: the key is compared on that byte too).
    """
    _require_image_channels(spec)
    if image.width == 0 or image.height == 0:
        raise RequestRejected(RejectReason.UNDECODABLE_IMAGE, "image has no pixels")
    if image.mode in EIGHT_BIT_BASE:  # k/255 composited on a background in [0, 1]: in range by construction
        return np.ascontiguousarray(_eight_bit_planes(image, rawmode, spec), dtype=np.float32)
    if image.mode in _HIGH_DEPTH:
        planes = _high_depth_planes(image, rawmode, spec)
    else:
        raise RequestRejected(RejectReason.UNSUPPORTED_IMAGE_MODE,
                              f"images of Pillow mode {clip(image.mode, 16)} are not supported: send an 8- or "
                              "16-bit grey, RGB, RGBA or palette PNG, or a JPEG")
    return _check_values(planes, "image")


def _eight_bit_planes(image: Image.Image, rawmode: str | None, spec: InputSpec) -> np.ndarray:
    """8-bit modes through Pillow (expand, add the key-colour alpha), then the shared evaluation transform (luma,
    resize, crop, composite) -> C x H x W float32."""
    opacity = _opacity_mask(image, rawmode)
    base_mode = EIGHT_BIT_BASE[image.mode]
    base = image if image.mode == base_mode else image.convert(base_mode)
    if opacity is not None:  # a tRNS key colour: make it an alpha band
        base = Image.merge(base.mode + "A", (*base.split(), Image.fromarray(opacity)))
    return spec.transform.planes(base, spec.background)


def _high_depth_planes(image: Image.Image, rawmode: str | None, spec: InputSpec) -> np.ndarray:
    """16-bit grey, I and F in float32: scale, composite, check, then channels and resize -> C x H x W."""
    channels = spec.shape[0]
    pixels = np.asarray(image)
    if image.mode == "F":
        values = pixels.astype(np.float32)  # no declared range: taken as [0, 1], checked below
    else:
        if image.mode == "I" and (int(pixels.min()) < 0 or int(pixels.max()) > int(U16_MAX)):
            raise RequestRejected(RejectReason.UNSUPPORTED_IMAGE_MODE, "32-bit integer images must hold 16-bit "
                                  "values (0..65535)")
        values = pixels.astype(np.float32) / U16_MAX
    values = values[..., None]
    opacity = _opacity_mask(image, rawmode)
    if opacity is not None:
        values = composite(values, (opacity.astype(np.float32) / U8_MAX)[..., None], spec.background)
    values = _check_values(values, "image")  # F outside [0, 1] or NaN: rejected before resizing hides it
    plane = values[..., 0]
    plane = np.asarray(spec.transform.geometry(Image.fromarray(plane), fill=spec.background))  # mode F
    plane = np.clip(plane, 0.0, 1.0)  # bilinear weights are convex: this only absorbs float rounding
    return np.repeat(plane[None], channels, axis=0)


def _opacity_mask(image: Image.Image, rawmode: str | None) -> np.ndarray | None:
    """uint8 H x W: 0 where a pixel has the tRNS key colour, 255 elsewhere; None when the image has no key.

    Only for modes whose transparency is a key colour (1, L, RGB, 16-bit grey, I); P's is applied by Pillow.
    Raises UNSUPPORTED_IMAGE_MODE for a key Pillow did not hand over as a number (grey) or 3 numbers (RGB).
    """
    key = image.info.get("transparency")
    if key is None or image.mode not in (*_KEYED_GREY, "RGB"):
        return None
    pixels = np.asarray(image)
    if image.mode == "RGB":
        if not (isinstance(key, tuple) and len(key) == 3 and all(_is_int(v) for v in key)):
            raise _bad_transparency()
        if rawmode == "RGB;16B":  # Pillow keeps the 16-bit key but only the high byte of each sample
            key = tuple(v >> 8 for v in key)
        keyed = np.all(pixels == np.asarray(key), axis=-1)
    else:
        if not _is_int(key):
            raise _bad_transparency()
        if image.mode == "1":
            pixels = np.where(pixels, 255, 0)  # Pillow stores the key of a 1-bit PNG as 0 or 255
        elif image.mode == "L":
            key *= _LOW_BIT_GREY_SCALE.get(rawmode or "", 1)
        keyed = pixels == key
    return np.where(keyed, 0, 255).astype(np.uint8)


def _bad_transparency() -> RequestRejected:
    return RequestRejected(RejectReason.UNSUPPORTED_IMAGE_MODE, "the image's transparency key (tRNS) cannot be "
                           "honoured: send an alpha channel instead")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
